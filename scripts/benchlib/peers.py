"""The benchmark's components, on raw sockets.

Owns: carrying each component's setup over a blocking socket (the protocol
up to the point where a component may route is
`jrouter.testing.component_client`'s: XEP-0114 handshake, protocol §5.1;
jabberd2 SASL DIGEST-MD5 + `<bind/>`, protocol §3.2, §3.6, §4.2), and the
non-blocking engine that moves the measured traffic.  Knows nothing about
processes or reporting.

Theory of operation
-------------------
Setup is blocking and sequential: a handful of round trips per component,
outside the clock, each one the client role's to say and to read.  Then the
role hands over what it read past the last reply, every socket turns
non-blocking and one `selectors` loop drives them all, on bytes alone.

Topology: N components in a ring; component i sends to component (i+step) % N
(step 1 unless the spec says otherwise: with several nodes, step k keeps every
route on one node, see --traffic in jrouter-bench).
Everything component j receives while the clock runs therefore comes from
component j-1 (or is a bounce of its own message), so arrivals are attributed
without parsing: the engine only *counts*.  With N = 1 the component sends to
itself through the router.

Every message body starts with a marker, `BM` + the 16-digit send time in
microseconds (CLOCK_MONOTONIC), followed by `x` filler.  Markers sit in text,
which every serialiser keeps byte for byte, and neither `>` nor the tokens
counted below occur inside them, so a received chunk can be cut after its last
`>` and everything before the cut scanned with C-speed `count`/`findall`:

  arrivals  = markers - bounces
  bounces   = ` error=` (jabberd2: `<route error='404'>`, protocol §4.5)
            + `<error`  (XEP-0114: the stanza turned into an error, protocol §5.5)

A sender keeps `window` messages in flight: a message is in flight until its
receiver counted it (or it came back as a bounce).  Each arrival at j lets
j-1 send one more, so the window refills in batches; a batch shares one send
time, and all its stanzas are formatted from one pre-built template.
"""

from __future__ import annotations

import re
import selectors
import socket
import time
from array import array
from typing import Callable, Dict, List, Optional, Sequence

from jrouter.testing.component_client import (NS_ACCEPT, ComponentClient, RemoteProtocolError,
                                              State, header)
from jrouter.wire.xmlstream import StreamError

PROTOCOLS = ("jabberd2", "xep0114")
RECV_SIZE = 256 * 1024

MARK = re.compile(rb"BM(\d{16})")
PRESENCE = re.compile(rb"<presence\b([^>]*)>")
FROM = re.compile(rb"\sfrom=['\"]([^'\"]*)['\"]")


def comp_name(i: int) -> str:
    return f"comp{i}.bench"


def now_us() -> int:
    return time.monotonic_ns() // 1000


class PeerError(Exception):
    """A component could not be set up, or the router broke its stream."""


class Conn:
    """One component connection: socket, client role (setup), and engine state."""

    __slots__ = ("index", "name", "sock", "client", "buf", "tail", "out", "writing", "seen")

    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index = index
        self.name = comp_name(index)
        self.sock = sock
        self.client = ComponentClient()  # setup: the protocol up to routing
        self.buf = b""  # setup: bytes the client read past its last reply
        self.tail = b""  # engine: bytes after the last '>' of the previous chunk
        self.out = bytearray()  # engine: bytes the kernel did not take yet
        self.writing = False  # engine: registered for EVENT_WRITE
        self.seen: set = set()  # names advertised to this component

    # ---- blocking setup: the client role talks, this carries its bytes
    def converse(self, done: Callable[[], bool], deadline: float, what: str) -> None:
        """Send what the client queued, and feed it what arrives, until `done()`."""
        client = self.client
        while True:
            data = client.data_to_send()
            if data:
                self.sock.sendall(data)
            if done():
                return
            if client.state is State.CLOSED:
                raise PeerError(f"{self.name}: router ended the stream while waiting "
                                f"for {what}: {client.stream_error}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerError(f"{self.name}: no {what} from the router in time "
                                f"(state: {client.state.value})")
            self.sock.settimeout(left)
            # Acknowledge at once: a router that writes one reply in several
            # small segments (Nagle) would otherwise wait for our delayed ACK
            # (40 ms) at every setup step.  Linux clears the flag again itself.
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            try:
                data = self.sock.recv(RECV_SIZE)
            except socket.timeout:
                continue
            if not data:
                raise PeerError(f"{self.name}: router closed the connection while waiting "
                                f"for {what} (state: {client.state.value})")
            try:
                client.receive(data)
            except (StreamError, RemoteProtocolError) as e:
                raise PeerError(f"{self.name}: {e}") from None


def _snippet(data: bytes, n: int = 300) -> str:
    text = data.decode("utf-8", "replace")
    return repr(text if len(text) <= n else text[:n] + "...")


# --------------------------------------------------------------------------
# Setup: one function per protocol, each leaves the component able to route.

def connect(index: int, port: int, deadline: float) -> Conn:
    sock = socket.create_connection(("127.0.0.1", port), timeout=max(0.1, deadline - time.monotonic()))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Conn(index, sock)


def setup_xep0114(conn: Conn, secret: str, deadline: float) -> None:
    """Stream header to our name, handshake sha1hex(id + secret) (XEP-0114 §3)."""
    client = conn.client
    client.open(header(NS_ACCEPT, version=False, to=conn.name))
    conn.converse(lambda: client.state is State.OPEN, deadline, "stream header")
    client.handshake(secret)
    conn.converse(lambda: client.authenticated, deadline, "<handshake/> reply")


def setup_jabberd2(conn: Conn, user: str, password: str, deadline: float) -> None:
    """Header, SASL DIGEST-MD5, header again, `<bind name='compN.bench'/>`."""
    client, name = conn.client, conn.name
    client.open()
    conn.converse(lambda: client.state is State.READY, deadline, "stream features")
    client.authenticate(user, password)
    conn.converse(lambda: client.state is State.ONLINE or client.failure is not None,
                  deadline, "SASL success and stream features")
    if client.failure:
        raise PeerError(f"{name}: SASL failure {client.failure}")
    client.bind(name)
    conn.converse(lambda: name in client.bound or name in client.refused, deadline, "bind reply")
    if name in client.refused:
        raise PeerError(f"{name}: bind refused: error {client.refused[name]}")
    conn.buf = client.hand_over()  # advertisements that came behind the reply


def setup_all(protocol: str, n: int, ports: Sequence[int], deadline: float, *,
              user: str, password: str, secret: str) -> List[Conn]:
    """Set up components 0..n-1, component i on ports[i % len(ports)] (one
    port per node when several nodes act as one router)."""
    conns: List[Conn] = []
    try:
        for i in range(n):
            conn = connect(i, ports[i % len(ports)], deadline)
            conns.append(conn)
            if protocol == "jabberd2":
                setup_jabberd2(conn, user, password, deadline)
            else:
                setup_xep0114(conn, secret, deadline)
    except BaseException:
        close_all(conns)
        raise
    for conn in conns:
        conn.sock.setblocking(False)
    return conns


def close_all(conns: List[Conn]) -> None:
    """Say goodbye and close; never blocks (the router may be gone)."""
    for conn in conns:
        try:
            conn.sock.setblocking(False)
            conn.sock.send(b"</stream:stream>")
        except OSError:
            pass
        conn.sock.close()


# --------------------------------------------------------------------------
# Templates: the stanza bytes, built once per sender.

def template(protocol: str, src: int, dst: int, size: int) -> bytes:
    """A %-template of sender `src`'s message to `dst` (args: seq, send time).

    `size` is the length of the <message/> stanza as the component writes it;
    the jabberd2 protocol adds the <route/> wrapper around it (~55 bytes).
    """
    frm, to = comp_name(src), comp_name(dst)
    xmlns = " xmlns='jabber:client'" if protocol == "jabberd2" else ""
    head = f"<message{xmlns} to='user@{to}' from='user@{frm}' id='{src}-%08d'><body>BM%016d"
    end = "</body></message>"
    fill = max(0, size - len(head % (0, 0)) - len(end))
    stanza = head + "x" * fill + end
    if protocol == "jabberd2":
        stanza = f"<route to='{to}' from='{frm}'>{stanza}</route>"
    return stanza.encode()


# --------------------------------------------------------------------------
# The engine.

class Traffic:
    """Counters and the receive/refill logic of one phase (warm-up or measure)."""

    def __init__(self, engine: "Engine", messages: int, window: int, size: int) -> None:
        n, step = len(engine.conns), engine.step
        self.engine, self.n, self.step = engine, n, step
        self.messages, self.window = messages, window
        self.templates = [template(engine.protocol, i, (i + step) % n, size) for i in range(n)]
        self.sent = [0] * n
        self.delivered = [0] * n  # indexed by sender
        self.bounced = [0] * n  # indexed by sender
        self.latency_us = array("q")
        self.sending = True
        self.first_send = 0.0
        self.last_arrival = 0.0
        self.progress = 0.0  # time of the last arrival or bounce

    def total_sent(self) -> int:
        return sum(self.sent)

    def settled(self) -> int:
        return sum(self.delivered) + sum(self.bounced)

    def done(self) -> bool:
        if self.sending:
            return self.settled() == self.n * self.messages
        return self.settled() == self.total_sent()

    def refill(self, i: int) -> None:
        if not self.sending:
            return
        sent = self.sent[i]
        k = min(self.window - (sent - self.delivered[i] - self.bounced[i]), self.messages - sent)
        if k <= 0:
            return
        tmpl, t = self.templates[i], now_us()
        self.engine.send(self.engine.conns[i], b"".join([tmpl % (s, t) for s in range(sent, sent + k)]))
        self.sent[i] = sent + k

    def start(self) -> None:
        self.first_send = self.progress = time.monotonic()
        for i in range(self.n):
            self.refill(i)

    def on_data(self, conn: Conn, data: bytes) -> None:
        region = conn.tail + data if conn.tail else data
        cut = region.rfind(b">") + 1
        conn.tail = region[cut:]
        if not cut:
            return
        if b"stream:" in region:
            self.engine.check_stream(conn, region)
        stamps = MARK.findall(region, 0, cut)
        if not stamps:
            return
        now = now_us()
        self.latency_us.extend([now - int(s) for s in stamps])
        self.last_arrival = self.progress = time.monotonic()
        j = conn.index
        errors = region.count(b" error=", 0, cut) + region.count(b"<error", 0, cut)
        src = (j - self.step) % self.n
        self.delivered[src] += len(stamps) - errors
        self.refill(src)
        if errors:
            self.bounced[j] += errors
            self.refill(j)


class Engine:
    """The selectors loop over all component sockets."""

    def __init__(self, protocol: str, conns: List[Conn], nap: float = 0.0, step: int = 1) -> None:
        self.protocol, self.conns, self.nap, self.step = protocol, conns, nap, step
        self.sel = selectors.DefaultSelector()
        for conn in conns:
            self.sel.register(conn.sock, selectors.EVENT_READ, conn)

    def close(self) -> None:
        self.sel.close()

    def send(self, conn: Conn, data: bytes) -> None:
        """Write now what the kernel takes; queue the rest for EVENT_WRITE."""
        if conn.out:
            conn.out += data
            return
        try:
            n = conn.sock.send(data)
        except BlockingIOError:
            n = 0
        if n < len(data):
            conn.out += memoryview(data)[n:]
            self._want_write(conn, True)

    def _flush(self, conn: Conn) -> None:
        try:
            n = conn.sock.send(conn.out)
        except BlockingIOError:
            return
        del conn.out[:n]
        if not conn.out:
            self._want_write(conn, False)

    def _want_write(self, conn: Conn, on: bool) -> None:
        if conn.writing != on:
            conn.writing = on
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0)
            self.sel.modify(conn.sock, events, conn)

    def check_stream(self, conn: Conn, region: bytes) -> None:
        if b"<stream:error" in region or b"</stream:stream>" in region:
            raise PeerError(f"{conn.name}: router ended the stream: {_snippet(region[-300:])}")

    def pump(self, on_data: Callable[[Conn, bytes], None], until: Callable[[], bool],
             deadline: float, idle: Optional[float] = None,
             progress: Optional[Callable[[], float]] = None, nap: float = 0.0) -> str:
        """Run until `until()` ("done"), `deadline` ("deadline"), or, if `idle`
        is given, no progress for `idle` seconds ("idle").

        `nap` > 0 sleeps that long after each pass over the ready sockets, so
        that arrivals coalesce into fewer, larger reads and writes.  Without it
        the generator wakes for every packet the router writes and burns a core
        on system calls; with it the router still has the rest of every window
        queued, so its load does not drop (see --nap in jrouter-bench)."""
        select, recv_size, sleep = self.sel.select, RECV_SIZE, time.sleep
        last = time.monotonic()
        while not until():
            now = time.monotonic()
            if now >= deadline:
                return "deadline"
            if idle is not None:
                if progress is not None:
                    last = max(last, progress())
                if now - last >= idle:
                    return "idle"
            for key, mask in select(min(0.2, deadline - now)):
                conn = key.data
                if mask & selectors.EVENT_WRITE:
                    self._flush(conn)
                if mask & selectors.EVENT_READ:
                    try:
                        data = conn.sock.recv(recv_size)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as e:
                        raise PeerError(f"{conn.name}: {e}") from None
                    if not data:
                        raise PeerError(f"{conn.name}: router closed the connection")
                    if progress is None:
                        last = time.monotonic()
                    on_data(conn, data)
            if nap:
                sleep(nap)
        return "done"

    # ---- phases

    def wait_advertised(self, deadline: float, everyone: bool) -> List[str]:
        """jabberd2 protocol: read `<presence from=X/>` (protocol §4.3) until each
        component has seen the one it sends to (or, if `everyone`, all others).
        Returns the names still missing, per component, if time ran out."""
        n = len(self.conns)

        def need(conn: Conn) -> set:
            if everyone:
                return {comp_name(k) for k in range(n) if k != conn.index}
            # a component is not advertised to itself (one component, or a
            # step of N: each sends to itself)
            peer = (conn.index + self.step) % n
            return set() if peer == conn.index else {comp_name(peer)}

        needs = {conn.index: need(conn) for conn in self.conns}

        def on_data(conn: Conn, data: bytes) -> None:
            region = conn.tail + data
            cut = region.rfind(b">") + 1
            conn.tail = region[cut:]
            self.check_stream(conn, region[:cut])
            for attrs in PRESENCE.findall(region, 0, cut):
                if b"unavailable" in attrs:
                    continue
                m = FROM.search(attrs)
                if m:
                    conn.seen.add(m.group(1).decode())

        for conn in self.conns:  # what setup read past the bind reply
            if conn.buf:
                data, conn.buf = conn.buf, b""
                on_data(conn, data)

        def until() -> bool:
            return all(needs[c.index] <= c.seen for c in self.conns)

        self.pump(on_data, until, deadline)
        return [f"{c.name} lacks {sorted(needs[c.index] - c.seen)[:3]}"
                for c in self.conns if not needs[c.index] <= c.seen]

    def drain(self, quiet: float, deadline: float) -> None:
        """Read and discard until nothing arrived for `quiet` seconds."""
        for conn in self.conns:
            conn.buf = b""

        def on_data(conn: Conn, data: bytes) -> None:
            region = conn.tail + data
            conn.tail = region[-64:]
            self.check_stream(conn, region)

        self.pump(on_data, lambda: False, deadline, idle=quiet)

    def warm_up(self, size: int, deadline: float) -> int:
        """One message per sender until every route delivers (a bounce means the
        router has not finished binding: retry). Returns the attempts used."""
        attempt = 0
        while True:
            attempt += 1
            t = Traffic(self, 1, 1, size)
            t.start()
            self.pump(t.on_data, t.done, min(deadline, time.monotonic() + 5))
            if t.done() and not any(t.bounced):
                return attempt
            if time.monotonic() >= deadline or attempt >= 50:
                raise PeerError(f"warm-up failed after {attempt} attempts: "
                                f"delivered {t.delivered}, bounced {t.bounced} per sender")
            self.drain(0.1, deadline)

    def measure(self, messages: int, window: int, size: int, time_limit: float,
                grace: float, stall: float) -> Traffic:
        """The measured phase: each component sends `messages`, `window` in flight.

        Bounded: no new sends after `time_limit` s, then at most `grace` s to
        collect what is in flight; a phase with no arrival for `stall` s stops.
        """
        for conn in self.conns:
            conn.tail = b""
        t = Traffic(self, messages, window, size)
        t.start()
        end = t.first_send + time_limit
        why = self.pump(t.on_data, t.done, end, idle=stall, progress=lambda: t.progress,
                        nap=self.nap)
        if why != "done":
            t.sending = False
            self.pump(t.on_data, t.done, time.monotonic() + grace)
        t.stop_reason = why  # type: ignore[attr-defined]
        return t


def lost_detail(t: Traffic) -> List[Dict[str, object]]:
    """Per sender → receiver: what was sent and what became of it."""
    out = []
    for i in range(t.n):
        lost = t.sent[i] - t.delivered[i] - t.bounced[i]
        if lost or t.bounced[i] or t.sent[i] < t.messages:
            out.append({"from": comp_name(i), "to": comp_name((i + t.step) % t.n),
                        "sent": t.sent[i], "delivered": t.delivered[i],
                        "bounced": t.bounced[i], "lost": lost,
                        "unsent": t.messages - t.sent[i]})
    return out
