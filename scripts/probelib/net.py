"""The probes' sockets: loopback connections, component setup, reading raw bytes.

Owns: connecting from a chosen loopback address (the hostile peer comes from
127.0.0.2, so what the router does to that address never touches the
bystanders and the legitimate components on 127.0.0.1), setting up a
component over either protocol with benchlib.peers' blocking setup (the
client role of jrouter.testing.component_client), reading a socket until EOF
or a quiet spell within a deadline, and finding stream errors and stanza ids
in raw bytes.  Knows nothing about routers, probes or reports.

After setup nothing is parsed as XML: what a hostile probe makes the router
send (a stanza 300 levels deep, say) would trip a client-side reader's own
limits, so the probes look at bytes with regular expressions.
"""

from __future__ import annotations

import re
import select
import socket
import struct
import time
from typing import Callable, List, Optional, Tuple

from benchlib import peers, routers

HOST = "127.0.0.1"      # where the router listens, and where the friendly peers come from
HOSTILE = "127.0.0.2"   # where hostile peers come from (any 127/8 address reaches loopback)

STREAM_ERROR = re.compile(rb"<([a-z-]+)\s+xmlns=['\"]urn:ietf:params:xml:ns:xmpp-streams['\"]")
STREAM_CLOSE = re.compile(rb"</(?:[\w.-]+:)?stream>")


def io_ready(sock: socket.socket, timeout: float, write: bool = False) -> Tuple[bool, bool]:
    """(readable, writable) within `timeout` s; poll(2), so any fd number works
    (select(2) stops at 1,024, and probe 4 holds more sockets than that)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | (select.POLLOUT if write else 0))
    events = poller.poll(max(0, int(timeout * 1000)))
    flags = events[0][1] if events else 0
    return bool(flags & (select.POLLIN | select.POLLERR | select.POLLHUP)), bool(flags & select.POLLOUT)


def dial(port: int, source: str = HOST, timeout: float = 5.0,
         rcvbuf: Optional[int] = None) -> socket.socket:
    """A TCP connection to the router from `source`; `rcvbuf` is set before
    connecting, so that the window stays small (a peer that will not read)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.connect((HOST, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def component(port: int, name: str, deadline: float, source: str = HOST,
              rcvbuf: Optional[int] = None) -> peers.Conn:
    """A jabberd2-protocol component authenticated (SASL DIGEST-MD5) and bound to `name`;
    `conn.buf` holds what came behind the bind reply."""
    conn = peers.Conn(0, dial(port, source, max(0.1, deadline - time.monotonic()), rcvbuf))
    conn.name = name
    try:
        peers.setup_jabberd2(conn, routers.USER, routers.PASSWORD, deadline)
    except BaseException:
        conn.sock.close()
        raise
    return conn


def try_component(port: int, deadline: float, name: str,
                  seconds: float) -> Tuple[Optional[float], str]:
    """A legitimate component from 127.0.0.1: (seconds to authenticate and bind, "")
    or (None, why not); closed again at once."""
    started = time.monotonic()
    try:
        conn = component(port, name, min(deadline, started + seconds))
    except (OSError, peers.PeerError) as e:
        return None, str(e).replace(f"{name}: ", "")
    took = time.monotonic() - started
    conn.sock.close()
    return took, ""


def accept_component(port: int, name: str, deadline: float, source: str = HOST) -> peers.Conn:
    """An XEP-0114 component that did its handshake as `name`."""
    conn = peers.Conn(0, dial(port, source, max(0.1, deadline - time.monotonic())))
    conn.name = name
    try:
        peers.setup_xep0114(conn, routers.SECRET, deadline)
        conn.buf = conn.client.hand_over()
    except BaseException:
        conn.sock.close()
        raise
    return conn


def read_until(sock: socket.socket, deadline: float, quiet: Optional[float] = None,
               most: Optional[int] = None) -> Tuple[bytes, bool]:
    """(bytes read, EOF seen): read until EOF, `deadline`, `quiet` s with nothing
    arriving, or `most` bytes.  A reset counts as EOF."""
    got: List[bytes] = []
    size = 0
    last = time.monotonic()
    while True:
        now = time.monotonic()
        wait = deadline - now
        if quiet is not None:
            wait = min(wait, last + quiet - now)
        if wait <= 0 or (most is not None and size >= most):
            return b"".join(got), False
        ready, _ = io_ready(sock, wait)
        if not ready:
            continue
        try:
            data = sock.recv(256 * 1024)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        except BlockingIOError:
            continue
        if not data:
            return b"".join(got), True
        got.append(data)
        size += len(data)
        last = time.monotonic()


def exchange(sock: socket.socket, data: bytes, deadline: float,
             done: Optional[Callable[[bytes], bool]] = None,
             after: float = 0.0) -> Tuple[bytes, bool, Optional[str]]:
    """Send `data` while reading what comes back (a router that ends the stream
    midway says why before it resets), then keep reading until `done(received)`,
    EOF, `after` s or `deadline`.  (received, EOF seen, why the send stopped or None)."""
    got = bytearray()
    view, trouble = memoryview(data), None
    sock.setblocking(False)
    finished_at: Optional[float] = None
    try:
        while True:
            now = time.monotonic()
            if done is not None and done(bytes(got)):
                return bytes(got), False, trouble
            if finished_at is None and (not view or trouble):
                finished_at = now
            if now >= deadline or (finished_at is not None and now - finished_at >= after):
                if view and not trouble:
                    trouble = f"sent {len(data) - len(view)} of {len(data)} bytes by the deadline"
                return bytes(got), False, trouble
            writing = [sock] if view and not trouble else []
            until = deadline if finished_at is None else min(deadline, finished_at + after)
            wait = 0.05 if writing else until - now
            readable, writable = io_ready(sock, wait, bool(writing))
            if readable:
                try:
                    chunk: Optional[bytes] = sock.recv(256 * 1024)
                except BlockingIOError:
                    chunk = None
                except OSError:
                    chunk = b""
                if chunk == b"":
                    sent = None if not view else f"sent {len(data) - len(view)} of {len(data)} bytes"
                    return bytes(got), True, trouble or sent
                got += chunk or b""
            if writable:
                try:
                    view = view[sock.send(view):]
                except BlockingIOError:
                    pass
                except OSError as e:
                    trouble = f"{type(e).__name__} after {len(data) - len(view)} of {len(data)} bytes"
    finally:
        sock.setblocking(True)


def stream_error(data: bytes) -> Optional[str]:
    """The condition of the first stream error in `data` (RFC 6120 §4.9.3), or None."""
    for match in STREAM_ERROR.finditer(data):
        if match.group(1) != b"text":
            return match.group(1).decode()
    return None


def abort(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0): nothing lingers in TIME_WAIT."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def send_all(sock: socket.socket, data: bytes, deadline: float) -> Optional[str]:
    """Send `data` by `deadline`; None when it all went, else what stopped it."""
    view = memoryview(data)
    while view:
        left = deadline - time.monotonic()
        if left <= 0:
            return f"sent {len(data) - len(view)} of {len(data)} bytes by the deadline"
        sock.settimeout(left)
        try:
            view = view[sock.send(view):]
        except socket.timeout:
            continue
        except OSError as e:
            return f"{type(e).__name__} after {len(data) - len(view)} of {len(data)} bytes"
    return None


def tcp_queues(local_port: int, remote_port: int) -> Optional[Tuple[int, int]]:
    """(tx_queue, rx_queue) bytes of the IPv4 socket local_port -> remote_port, from
    /proc/net/tcp: written and not yet acknowledged, arrived and not yet read."""
    with open("/proc/net/tcp", encoding="ascii") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote = fields[1].rsplit(":", 1)[1], fields[2].rsplit(":", 1)[1]
            if int(local, 16) == local_port and int(remote, 16) == remote_port:
                tx, rx = fields[4].split(":")
                return int(tx, 16), int(rx, 16)
    return None


class Scanner:
    """Pulls regular-expression matches out of a byte stream as it arrives:
    only the part up to the last `cut` is searched, the rest waits for more."""

    def __init__(self, pattern: "re.Pattern[bytes]", cut: bytes = b">") -> None:
        self.pattern, self.cut = pattern, cut
        self.tail = b""
        self.bytes = 0

    def feed(self, data: bytes) -> List[Tuple[bytes, ...]]:
        self.bytes += len(data)
        data = self.tail + data
        end = data.rfind(self.cut)
        if end < 0:
            self.tail = data
            return []
        end += len(self.cut)
        self.tail = data[end:]
        return [m.groups() for m in self.pattern.finditer(data, 0, end)]
