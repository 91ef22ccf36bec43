"""A connect/close flood, as a process of its own (probe 4).

Owns: connecting to the router from one loopback address as fast as one
process can, for a fixed time, and closing each connection at once with a
reset (SO_LINGER 0: no TIME_WAIT, so the address's ports never run out).
Prints one JSON line: connections made, connects that failed and why.

    python -m probelib.flood PORT SECONDS SOURCE
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time
from typing import Dict, List

LINGER_RESET = struct.pack("ii", 1, 0)


def flood(port: int, seconds: float, source: str) -> Dict[str, object]:
    made, errors = 0, {}  # type: int, Dict[str, int]
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            sock.bind((source, 0))
            sock.settimeout(1.0)
            sock.connect(("127.0.0.1", port))
            made += 1
        except OSError as e:
            name = type(e).__name__
            errors[name] = errors.get(name, 0) + 1
        finally:
            sock.close()
    return {"made": made, "failed": sum(errors.values()), "errors": errors, "seconds": seconds}


def main(argv: List[str]) -> int:
    print(json.dumps(flood(int(argv[0]), float(argv[1]), argv[2])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
