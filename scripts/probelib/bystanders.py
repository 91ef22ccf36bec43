"""The bystanders: two components that ping each other through the router every 50 ms.

Owns: the pair `ping.probe` and `pong.probe` (jabberd2 protocol, SASL and
<bind/>), run in a process of its own so that a probe's own work never
delays a ping, and `Bystanders`, the probe side that starts it, stops it by
its PID and reads its result.  Knows nothing about what the probe does.

Every `--interval` s each of the two sends the other one
`<route><message id='aN'/></route>` (`bN` the other way); the time of the
send and of the arrival (CLOCK_MONOTONIC, which every process shares) go into
the result, so the probe can ask for the worst latency within any window of
its own.  A ping that comes back to its sender is bounced; one that has not
arrived `grace` s after "stop" is lost.  The router closing a connection
ends the pings (the result says when).

    python -m probelib.bystanders PORT [INTERVAL [LIFETIME]]
    stdout: "ready", then after "stop GRACE" on stdin (or LIFETIME s) one JSON line
"""

from __future__ import annotations

import json
import os
import re
import selectors
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from benchlib import routers

from . import net

NAMES = ("ping.probe", "pong.probe")
PING_ID = re.compile(rb"\bid=['\"]([ab]\d+)['\"]")
SETUP_S = 15.0


class Pair:
    """Both components in one selectors loop."""

    def __init__(self, port: int, interval: float) -> None:
        deadline = time.monotonic() + SETUP_S
        self.conns = [net.component(port, name, deadline) for name in NAMES]
        self.interval = interval
        self.scanners = [net.Scanner(PING_ID) for _ in self.conns]
        self.out = [bytearray() for _ in self.conns]
        self.sent: Dict[str, float] = {}
        self.arrived: Dict[str, float] = {}
        self.bounced: List[str] = []
        self.ended: Optional[str] = None
        self.seq = 0
        for i, conn in enumerate(self.conns):
            conn.sock.setblocking(False)
            self._take(i, conn.buf)

    def tick(self) -> None:
        """One ping each way."""
        self.seq += 1
        now = time.monotonic()
        for i, (prefix, src, dst) in enumerate((("a", 0, 1), ("b", 1, 0))):
            ping = f"{prefix}{self.seq}"
            self.sent[ping] = now
            self.out[src] += (f"<route to='{NAMES[dst]}' from='{NAMES[src]}'>"
                              f"<message id='{ping}'/></route>").encode()
            self._flush(src)

    def _flush(self, i: int) -> None:
        if self.out[i]:
            try:
                del self.out[i][:self.conns[i].sock.send(self.out[i])]
            except BlockingIOError:
                pass
            except OSError as e:
                self.ended = self.ended or f"{NAMES[i]}: {e}"

    def _take(self, i: int, data: bytes) -> None:
        now = time.monotonic()
        for (ping,) in self.scanners[i].feed(data):
            ping = ping.decode()
            if (ping[0] == "a") == (i == 0):
                self.bounced.append(ping)      # back at its own sender
            else:
                self.arrived.setdefault(ping, now)

    def pump(self, until: float) -> None:
        """Read and write until `until` (monotonic) or the router ends a stream."""
        with selectors.DefaultSelector() as sel:
            for i, conn in enumerate(self.conns):
                sel.register(conn.sock, selectors.EVENT_READ, i)
            while self.ended is None:
                left = until - time.monotonic()
                if left <= 0:
                    return
                for key, _ in sel.select(left):
                    i = key.data
                    try:
                        data = self.conns[i].sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError as e:
                        data, self.ended = b"", f"{NAMES[i]}: {e}"
                    if not data:
                        self.ended = self.ended or f"the router closed {NAMES[i]}'s connection"
                        return
                    self._take(i, data)
                for i in range(len(self.conns)):
                    self._flush(i)

    def outstanding(self) -> int:
        return len(self.sent) - len(self.arrived) - len(self.bounced)

    def result(self) -> Dict[str, Any]:
        pings = sorted((t, ping) for ping, t in self.sent.items())
        bounced = set(self.bounced)
        return {"samples": [[t, self.arrived[p] - t if p in self.arrived else None, p in bounced]
                            for t, p in pings],
                "bounced": len(self.bounced), "ended": self.ended}


def main(argv: List[str]) -> int:
    port = int(argv[0])
    interval = float(argv[1]) if len(argv) > 1 else 0.05
    lifetime = float(argv[2]) if len(argv) > 2 else 900.0
    grace = 5.0
    pair = Pair(port, interval)
    print("ready", flush=True)
    stop_at = time.monotonic() + lifetime
    stdin = sys.stdin.buffer
    with selectors.DefaultSelector() as sel:
        sel.register(stdin, selectors.EVENT_READ)
        next_tick = time.monotonic()
        while time.monotonic() < stop_at and pair.ended is None:
            pair.tick()
            next_tick += interval
            pair.pump(max(time.monotonic(), next_tick))
            if sel.select(0):
                words = os.read(stdin.fileno(), 100).split()   # "stop GRACE", or EOF
                grace = float(words[1]) if len(words) > 1 else grace
                break
    deadline = time.monotonic() + grace
    while pair.outstanding() > 0 and pair.ended is None and time.monotonic() < deadline:
        pair.pump(min(deadline, time.monotonic() + 0.1))
    print(json.dumps(pair.result()), flush=True)
    for conn in pair.conns:
        conn.sock.close()
    return 0


class Bystanders:
    """The probe's handle on the bystander process."""

    def __init__(self, port: int, python: str, scripts: str, repo: str) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([scripts, repo]), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([python, "-m", "probelib.bystanders", str(port)],
                                     cwd=scripts, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     preexec_fn=routers.child_setup(None))
        self.result: Dict[str, Any] = {}

    def wait_ready(self, timeout: float = SETUP_S + 5) -> Optional[str]:
        """None when both are online, else why not."""
        line = _readline(self.proc, timeout)
        if line.strip() == b"ready":
            return None
        self.kill()
        err = self.proc.stderr.read().decode("utf-8", "replace").strip().splitlines()[-3:]
        return "bystanders did not come up: " + " / ".join(err or [repr(line)])

    def stop(self, grace: float = 5.0) -> Dict[str, Any]:
        """Stop pinging, wait at most `grace` s for the pings in flight; the result."""
        try:
            self.proc.stdin.write(f"stop {grace}\n".encode())
            self.proc.stdin.flush()
        except OSError:
            pass
        line = _readline(self.proc, grace + 10)
        self.kill()
        try:
            self.result = json.loads(line)
        except ValueError:
            self.result = {"samples": [], "bounced": 0, "ended": "bystander process failed"}
        return self.result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()        # by its PID (Popen.kill)
        self.proc.wait(5)

    def worst(self, since: float = 0.0, until: float = float("inf")) -> Tuple[Optional[float], int]:
        """(worst latency in ms, pings lost) among the pings sent within [since, until]:
        lost is neither arrived nor bounced."""
        window = [s for s in self.result.get("samples", []) if since <= s[0] <= until]
        got = [s[1] for s in window if s[1] is not None]
        lost = sum(1 for s in window if s[1] is None and not s[2])
        return (1000 * max(got) if got else None), lost


def _readline(proc: "subprocess.Popen[bytes]", timeout: float) -> bytes:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if sel.select(timeout):
            return proc.stdout.readline()
        return b""
    finally:
        sel.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
