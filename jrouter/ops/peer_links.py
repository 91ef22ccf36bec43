"""The gevent shell of the links between nodes (docs/cluster.md).

Owns: the peer port's listening socket, dialling other nodes (again, with a
bounded backoff, while they are wanted), each link's socket and greenlets,
STARTTLS, the keepalive and the dead-link check, the bound on what waits for
one link, and telling the router when a link comes up, what it carries, and
when it goes down with the packets it never sent.

Must not know: routing. Which node gets a packet, and what to do with one a
link handed back, are the router's: it gives callbacks

    on_packet(node, event)          a Forwarded, Broadcast, SessionNotice, ReplaceMember or
                                    AffinityNotice from node
    on_link_up(node)                a link to node is open (PeerReady)
    on_link_down(node, unsent)      it is gone; unsent: [peer_stream.Unsent]

and calls ``forward``/``broadcast``, which return False when no link to the
node is open (the packet is not taken: the router treats it as unsent).

Theory of operation
-------------------
Each link has a reader greenlet (the accepting handler, or the dialling
loop) and, once the link is open, one writer greenlet: the only greenlet that
ever waits to write on that socket (house rule 5). While the link negotiates
the reader writes the few negotiation bytes itself; no writer exists yet.
``forward`` only appends to the stream's buffer and wakes the writer once;
the writer takes everything queued meanwhile in one ``send`` (coalescing),
and reports each write (``PeerStream.sent``), so that a link that dies hands
back exactly the packets its socket never took.

Bound: at most ``queue_limit`` bytes wait for one link (queued or handed to
the socket and not written). Past it the node on the other side is not
reading: the link is closed at once and everything it had not written goes
back to the router through ``on_link_down`` (as a component's queue does,
protocol §3.9). ``forward`` returns False from then on.

A second link from a node already linked replaces the first (it has
restarted, or the old link is half-open): the old one goes down first
(``on_link_down``), then the new one comes up.

Resuming: each link's streams give the routes they send an id (``sequence``)
in their hello, and say how many routes of the other node's last link they
read (``read_before``: the link still up, or the last one that went down;
counted once each read's packets are all dispatched, so never more than was
delivered). ``link_stream(node).peer_read`` is then the other node's word on
our last link, for the router to skip what it would send twice
(docs/cluster.md §3, Resuming).
"""

from __future__ import annotations

import errno
import random
import secrets
import struct
import time
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Union

import gevent
from gevent import socket, ssl
from gevent.event import Event
from gevent.pool import Pool

from jrouter.errors import ListenError
from jrouter.ops.listener import Listener
from jrouter.wire.peer_stream import (AffinityNotice, Broadcast, Forwarded, PeerAcceptor, PeerClosed,
                                      PeerDialer, PeerProtocolError, PeerReady, PeerStream,
                                      ReplaceMember, SessionNotice, State, Unsent)

#: What a link hands to on_packet.
LinkPacket = Union[Forwarded, Broadcast, SessionNotice, ReplaceMember, AffinityNotice]

if TYPE_CHECKING:
    import ssl as stdlib_ssl

    from gevent import Greenlet

    from jrouter.wire.peer_stream import PeerEvent


class _Log(Protocol):
    def notice(self, message: str) -> None: ...


class _Quiet:
    def notice(self, message: str) -> None:
        pass


_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def make_id() -> str:
    """A stream id or nonce: 40 of [0-9a-z], as the router's."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(40))


def make_client_context(cafile: Optional[str] = None) -> stdlib_ssl.SSLContext:
    """The dialling side's TLS context. Without ``cafile`` the other node's
    certificate is not checked (both ends prove the secret with SASL; TLS
    then keeps the link private from a passive listener only: see
    docs/cluster.md); with it, the certificate must be signed by it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.options |= ssl.OP_NO_SSLv3
    context.check_hostname = False          # nodes are dialled by address
    if cafile is None:
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(cafile)
    return context


class PeerLinks:
    """The links of node ``node_id`` to the other nodes of its cluster."""

    #: seconds without a write before a link gets a keepalive space
    keepalive = 10.0
    #: seconds without a read (both ends send keepalives) before a link is dead
    dead_after = 35.0
    #: seconds a dial may take to connect
    connect_timeout = 5.0
    #: seconds from connect to an open link (TLS and SASL included)
    negotiation_timeout = 10.0
    #: first and longest pause between two dials of one node
    backoff_first = 0.1
    backoff_max = 5.0
    #: a link that stayed open this long starts its backoff afresh
    backoff_reset_after = 10.0
    #: seconds a closing link may take to write what it has queued
    flush_grace = 1.0
    #: bytes asked of the kernel per read
    read_size = 65536

    def __init__(self, node_id: str, secret: str, *,
                 on_packet: Callable[[str, LinkPacket], None],
                 on_link_up: Callable[[str], None],
                 on_link_down: Callable[[str, list[Unsent]], None],
                 log: Optional[_Log] = None, revision: Callable[[], int] = lambda: 0,
                 max_hops: int = 2, queue_limit: int = 16 << 20, max_element_size: int = 0,
                 server_tls: Optional[stdlib_ssl.SSLContext] = None,
                 client_tls: Optional[stdlib_ssl.SSLContext] = None,
                 require_tls: bool = False, clock: Callable[[], float] = time.monotonic,
                 new_id: Callable[[], str] = make_id) -> None:
        if require_tls and server_tls is None:
            raise ValueError("require_tls needs server_tls (this node must offer STARTTLS)")
        self.node_id = node_id
        self._secret = secret
        self.on_packet = on_packet
        self.on_link_up = on_link_up
        self.on_link_down = on_link_down
        self.log: _Log = log or _Quiet()
        self.revision = revision
        self.max_hops = max_hops
        self.queue_limit = queue_limit
        self.max_element_size = max_element_size
        self.server_tls = server_tls
        self.client_tls = client_tls if client_tls is not None else make_client_context()
        self.require_tls = require_tls
        self.clock = clock
        self.new_id = new_id
        self._up: dict[str, _Link] = {}        # node -> its open link
        # node -> (its sequence id, routes we read) of the last link from it that went down
        self._read_from: dict[str, tuple[str, int]] = {}
        self._links: set[_Link] = set()        # every link with a socket, open or not
        self._dialers: dict[str, Greenlet] = {}
        self._pool = Pool()
        self._listener: Optional[Listener] = None
        self._timer: Optional[Greenlet] = None
        self._stopping = False
        # Reads land here first and are copied out before the reader yields
        # (one greenlet runs at a time), as in ops/server.py.
        self._buffer = bytearray(self.read_size)
        self._view = memoryview(self._buffer)

    # -- the router's side ------------------------------------------------------

    def forward(self, node: str, route_raw: bytes, member: str, hops: int, tag: Any = None,
                as_sent: bool = False) -> bool:
        """Queue a route for ``member`` on the link to ``node``; False (not
        taken) when no link to it is open. See ``PeerStream.forward``."""
        link = self._up.get(node)
        if link is None or link.stream.state is not State.OPEN:
            return False
        stream = link.stream
        stream.forward(route_raw, member, hops, tag, as_sent)
        if stream.unread > self.queue_limit:
            link.overflow()
        elif not link.woken:
            link.wake()
        return True

    def broadcast(self, node: str, route_raw: bytes, hops: int, tag: Any = None) -> bool:
        """Queue a broadcast route on the link to ``node``; False when none is open."""
        return self._queue_on(node, lambda stream: stream.broadcast(route_raw, hops, tag))

    def session_notice(self, node: str, route_raw: bytes, member: str) -> bool:
        """Queue a session-control route our ``member`` sent on the link to
        ``node``, to learn from; False when none is open."""
        return self._queue_on(node, lambda stream: stream.session_notice(route_raw, member))

    def replace_member(self, node: str, member: str) -> bool:
        """Ask ``node`` to end its member ``member``; False when no link to it is open."""
        return self._queue_on(node, lambda stream: stream.replace_member(member))

    def affinity_notice(self, node: str, name: str, key: str, owner: str, member: str) -> bool:
        """Tell ``node`` that ``key`` of ``name`` is on member ``member`` of
        node ``owner`` (traffic affinity); False when no link to it is open."""
        return self._queue_on(node, lambda stream: stream.affinity_notice(name, key, owner, member))

    def _queue_on(self, node: str, queue: Callable[[PeerStream], None]) -> bool:
        link = self._up.get(node)
        if link is None or link.stream.state is not State.OPEN:
            return False
        stream = link.stream
        queue(stream)
        if stream.unread > self.queue_limit:
            link.overflow()
        elif not link.woken:
            link.wake()
        return True

    def linked(self) -> list[str]:
        """The nodes with an open link."""
        return list(self._up)

    def link_stream(self, node: str) -> Optional[PeerStream]:
        """The open link's stream (its counters, the peer's revision), or None."""
        link = self._up.get(node)
        return link.stream if link is not None else None

    # -- listening and dialling ----------------------------------------------------

    def listen(self, ip: str, port: int) -> tuple[str, int]:
        """Accept links on ``ip``:``port``; returns the address bound."""
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((ip, port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise ListenError(f"[{ip}, port={port}] unable to listen for peer links ({exc.strerror})") from None
        self._listener = Listener(sock, self._accepted, self._pool.spawn, self.log.notice)
        self._listener.start()
        self._start_timer()
        self.log.notice(f"[{ip}, port={port}] listening for peer links")
        address: tuple[str, int] = sock.getsockname()[:2]
        return address

    def dial(self, node: str, host: str, port: int) -> None:
        """Keep a link to ``node`` at ``host``:``port`` open, dialling again
        after each loss (backoff from ``backoff_first`` to ``backoff_max``),
        until ``hang_up(node)``. The caller keeps to the dialling rule
        (``peer_stream.dials``): the other node refuses it otherwise."""
        if node in self._dialers or self._stopping:
            return
        self._start_timer()
        self._dialers[node] = gevent.spawn(self._dial_loop, node, host, port)

    def hang_up(self, node: str) -> None:
        """Stop dialling ``node``, and close its link politely (or the one
        being negotiated with it)."""
        self._dialers.pop(node, None)
        for link in list(self._links):
            if link.node == node or link.dialled == node:
                link.close()

    def _dial_loop(self, node: str, host: str, port: int) -> None:
        delay = self.backoff_first
        failing = False
        while self._dialers.get(node) is gevent.getcurrent() and not self._stopping:
            try:
                sock = socket.create_connection((host, port), timeout=self.connect_timeout)
                # The timeout was for the connect: left on, every read of a
                # link quiet for that long would end it (keepalives come
                # every `keepalive` s; silence is `dead_after`'s to judge).
                sock.settimeout(None)
            except OSError as exc:
                if not failing:
                    self.log.notice(f"[{host}, port={port}] cannot reach node '{node}' ({exc.strerror or exc});"
                                    f" dialling again every {self.backoff_max:g} s at most")
                failing = True
            else:
                failing = False
                opened = self._dialled(node, host, port, sock)
                if opened is not None and self.clock() - opened >= self.backoff_reset_after:
                    delay = self.backoff_first
            if self._dialers.get(node) is not gevent.getcurrent() or self._stopping:
                break
            gevent.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.backoff_max)

    def _dialled(self, node: str, host: str, port: int, sock: socket.socket) -> Optional[float]:
        """Run a link we dialled; a bug in a callback ends the link, not the dialling."""
        try:
            return self._run_link(sock, (host, port), node, PeerDialer(
                self.node_id, self._secret, cnonce=self.new_id, expect_node=node,
                revision=self.revision, require_tls=self.require_tls, max_hops=self.max_hops,
                max_element_size=self.max_element_size, sequence=self.new_id(),
                read_before=self._read_before))
        except Exception as exc:           # the hub would print it; the loop must go on
            self.log.notice(f"[{host}, port={port}] peer link with node '{node}' failed: {exc!r}")
            return None

    def _accepted(self, sock: socket.socket, address: tuple) -> None:
        if self._stopping:
            sock.close()
            return
        self._run_link(sock, address, None, PeerAcceptor(
            self.node_id, self._secret, make_id=self.new_id, revision=self.revision,
            offer_tls=self.server_tls is not None, require_tls=self.require_tls,
            max_hops=self.max_hops, max_element_size=self.max_element_size,
            sequence=self.new_id(), read_before=self._read_before))

    def _read_before(self, node: str) -> Optional[tuple[str, int]]:
        """(sequence, routes read) of the last link from ``node``: the one up
        (its count stops when the new link replaces it), or the last one down."""
        link = self._up.get(node)
        if link is not None and link.stream.peer_sequence:
            return link.stream.peer_sequence, link.read_routes
        return self._read_from.get(node)

    def _run_link(self, sock: socket.socket, address: tuple, dialled: Optional[str],
                  stream: PeerStream) -> Optional[float]:
        """Run one link on this greenlet until it ends; when it was open, the time it opened."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(self, sock, address, stream)
        link.dialled = dialled
        self._links.add(link)
        try:
            link.run()
        finally:
            self._links.discard(link)
            link.down()
        return link.opened_at

    def _opened(self, link: _Link, node: str) -> None:
        """A link said hello: it replaces an older one of the same node."""
        old = self._up.get(node)
        if old is not None:
            self.log.notice(f"{link.label} peer link from node '{node}' replaces its older link")
            old.down()
        self._up[node] = link
        self.log.notice(f"{link.label} peer link with node '{node}' up")
        self.on_link_up(node)

    # -- timers --------------------------------------------------------------------

    def _start_timer(self) -> None:
        if self._timer is None:
            self._timer = gevent.spawn(self._time_checks)

    def _time_checks(self) -> None:
        """Once a second: a space on links quiet for ``keepalive``, and the
        end of links silent for ``dead_after``."""
        while True:
            now = self.clock()
            for link in list(self._up.values()):
                if now - link.last_read > self.dead_after:
                    self.log.notice(f"{link.label} peer link with node '{link.node}' silent for "
                                    f"{self.dead_after:g} s, closing")
                    link.shut()
                elif now - link.last_write >= self.keepalive:
                    link.stream.ping()
                    link.wake()
            gevent.sleep(min(1.0, self.keepalive / 2))

    # -- stopping ------------------------------------------------------------------

    def stop(self, graceful: bool = True) -> None:
        """Stop listening and dialling, and close every link: politely
        (``</stream:stream>``, ``flush_grace`` to write what is queued), or
        at once with a reset (``graceful=False``: a fenced node). Every link
        that was up is reported down with what it never sent."""
        self._stopping = True
        if self._listener is not None:
            self._listener.close()
        dialers, self._dialers = list(self._dialers.values()), {}
        links = list(self._links)
        for link in links:
            if graceful:
                link.close()
            else:
                link.reset()
        if graceful:
            deadline = self.clock() + self.flush_grace
            while self._links and self.clock() < deadline:
                gevent.sleep(0.01)
        for link in list(self._links):
            link.shut()
        for link in links:
            link.down()
        gevent.joinall(dialers, timeout=1.0)
        gevent.killall(dialers, timeout=1.0)
        self._pool.join(timeout=1.0)
        self._pool.kill(timeout=1.0)
        if self._timer is not None:
            self._timer.kill()
            self._timer = None


class _Link:
    """One socket: its stream, its reader (the greenlet that runs it) and writer."""

    def __init__(self, links: PeerLinks, sock: socket.socket, address: tuple, stream: PeerStream) -> None:
        self.links = links
        self.sock = sock
        self.stream = stream
        self.label = f"[{address[0]}, port={address[1]}]"
        self.node: Optional[str] = None       # the other node, once it said hello
        self.dialled: Optional[str] = None    # the node this link dials (None: accepted)
        self.opened_at: Optional[float] = None
        self.writer: Optional[Greenlet] = None
        self._wake = Event()
        self.woken = False            # the writer has been woken and has not looked yet
        self.finished = False         # down() ran
        self._deadline = gevent.Timeout(links.negotiation_timeout)
        self.last_read = self.last_write = links.clock()
        #: routes read on this link whose packets were all dispatched
        self.read_routes = 0

    # -- reading -------------------------------------------------------------------

    def run(self) -> None:
        """Negotiate (bounded in time), then read until the link ends."""
        deadline = self._deadline
        deadline.start()
        try:
            self._send_direct()
            self._read_loop()
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise
            self.links.log.notice(f"{self.label} peer link not open within "
                                  f"{self.links.negotiation_timeout:g} s, closing")
        except PeerProtocolError as exc:
            self._dispatch(exc.events)
            self.links.log.notice(f"{self.label} peer link error: {exc}")
            self._flush_goodbye()
        except (OSError, ssl.SSLError) as exc:
            if getattr(exc, "errno", None) not in (errno.ECONNRESET, errno.EPIPE, errno.EBADF, None):
                self.links.log.notice(f"{self.label} peer link read error: {exc}")
        finally:
            deadline.close()

    def _read_loop(self) -> None:
        links, stream = self.links, self.stream
        buffer, view, size = links._buffer, links._view, links.read_size
        while True:
            received = self.sock.recv_into(buffer, size)
            if not received:
                return
            data = bytes(view[:received])
            self.last_read = links.clock()
            self._dispatch(stream.receive_data(data))
            if not self.finished:
                self.read_routes = stream.routes_read
            if stream.starting_tls:
                self._start_tls()
            if stream.state is State.CLOSED:
                self._flush_goodbye()
                return
            if self.writer is None:
                self._send_direct()
            elif not self.woken:
                self.wake()
            gevent.sleep(0)        # one busy link must not starve the rest

    def _dispatch(self, events: list[PeerEvent]) -> None:
        on_packet = self.links.on_packet
        for event in events:
            cls = event.__class__
            if self.finished:
                return            # reported down (replaced, stopped) while a callback waited
            if cls is Forwarded or cls is Broadcast or cls is SessionNotice or cls is ReplaceMember \
                    or cls is AffinityNotice:
                on_packet(self.node, event)           # type: ignore[arg-type]  # set by PeerReady
            elif cls is PeerReady:
                self._ready(event)                    # type: ignore[arg-type]
            elif cls is PeerClosed:
                self._closed(event)                   # type: ignore[arg-type]

    def _ready(self, event: PeerReady) -> None:
        self._deadline.close()
        self.node = event.node
        self.opened_at = self.links.clock()
        self.writer = gevent.spawn(self._write_loop)
        self.links._opened(self, event.node)

    def _closed(self, event: PeerClosed) -> None:
        if event.condition is not None:
            self.links.log.notice(f"{self.label} peer link closed by node '{self.node}': "
                                  f"{event.condition} ({event.text or ''})")

    def _start_tls(self) -> None:
        """Write what is queued (the acceptor's <proceed/>), then run the handshake."""
        self._send_direct()
        acceptor = isinstance(self.stream, PeerAcceptor)
        links = self.links
        context = links.server_tls if acceptor else links.client_tls
        self.sock = context.wrap_socket(self.sock, server_side=acceptor)  # type: ignore[union-attr]  # offered only with one
        if self.stream.tls_started():
            raise PeerProtocolError("bad-format", "bytes in the clear after STARTTLS")
        self._send_direct()

    # -- writing -------------------------------------------------------------------

    def _send_direct(self) -> None:
        """While negotiating (no writer yet), the reader writes."""
        data = self.stream.data_to_send()
        if data:
            self.sock.sendall(data)
            self.stream.sent(len(data))
            self.last_write = self.links.clock()

    def wake(self) -> None:
        self.woken = True
        self._wake.set()

    def _write_loop(self) -> None:
        """Send everything queued in one go, wait to be woken, again; end
        when the stream is over and nothing is left."""
        stream = self.stream
        try:
            while True:
                self.woken = False
                self._wake.clear()
                data = stream.data_to_send()
                if data:
                    self._send_all(data)
                    continue
                if stream.state is State.CLOSED:
                    return
                self._wake.wait()
        except (OSError, ssl.SSLError):
            self.shut()

    def _send_all(self, data: bytes) -> None:
        view = memoryview(data)
        sock, stream = self.sock, self.stream
        while view:
            sent = sock.send(view)
            stream.sent(sent)
            view = view[sent:]
        self.last_write = self.links.clock()

    def _flush_goodbye(self) -> None:
        """The stream is over: let the writer (or the reader, before there is
        one) write what is queued, for ``flush_grace`` at most."""
        grace = self.links.flush_grace
        try:
            if self.writer is None:
                with gevent.Timeout(grace, False):
                    self._send_direct()
            else:
                self.wake()
                self.writer.join(timeout=grace)
        except (OSError, ssl.SSLError):
            pass

    # -- ending --------------------------------------------------------------------

    def overflow(self) -> None:
        """More than ``queue_limit`` bytes wait: the other node is not
        reading. The link ends now; ``down`` hands its packets back."""
        links = self.links
        self.links.log.notice(f"{self.label} node '{self.node}' is not reading: more than "
                              f"{links.queue_limit} bytes queued for its peer link, closing")
        if links._up.get(self.node) is self:   # type: ignore[arg-type]  # an open link has a node
            del links._up[self.node]          # type: ignore[arg-type]
        self.shut()

    def close(self) -> None:
        """Close politely: ``</stream:stream>`` after what is queued."""
        self.stream.close()
        if self.writer is not None:
            self.wake()
        else:
            self.shut()

    def shut(self) -> None:
        """End the socket both ways: the reader sees the end and the link goes down."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def reset(self) -> None:
        """End the socket with a reset, nothing more said (a fenced node)."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.shut()

    def down(self) -> None:
        """The link is over (once): the writer stops, the socket closes, and
        an open link is reported down with the packets it never wrote."""
        if self.finished:
            return
        self.finished = True
        links = self.links
        node = self.node
        if node is not None and links._up.get(node) is self:
            del links._up[node]
            if self.stream.peer_sequence:
                links._read_from[node] = (self.stream.peer_sequence, self.read_routes)
        if self.writer is not None and self.writer is not gevent.getcurrent():
            self.writer.kill(block=True, timeout=1.0)
        try:
            self.sock.close()
        except OSError:
            pass
        if node is not None:
            unsent = self.stream.take_unsent()
            links.log.notice(f"{self.label} peer link with node '{node}' down"
                             + (f" ({len(unsent)} packets not sent)" if unsent else ""))
            links.on_link_down(node, unsent)
