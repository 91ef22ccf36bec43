"""The gevent shell: sockets, greenlets, timers and TLS around the sans-IO router.

Each accepted socket gets a reader: the hub itself, through a read watcher
whose callback reads what waits and returns (no greenlet, so an idle peer
costs none), or, for a peer that must be able to wait while reading (TLS,
a byte budget), a greenlet of its own (``_Peer``). When the router queues
something for a peer (``Connection.on_output``) the peer is marked; right
after each read, the reader that routed it flushes the marked peers:
everything queued for one peer goes out in one non-blocking ``send`` if the
kernel takes it. Only when a send would have to wait does the peer get a
writer greenlet, the only greenlet that ever waits on that socket (house
rule 5, as gevent requires); it sends what is left, and everything queued
while it is busy, so order is kept, and it ends when nothing is left. An
idle connection so costs no writer greenlet at all. A reader takes one read
at a time and lets the others have theirs, so one busy peer cannot starve
the rest.

This module must not know the protocols: it moves bytes and calls
``Connection.receive``, ``Router.connect``/``disconnect``/``tick``.
"""

from __future__ import annotations

import errno
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

import gevent
from gevent import socket

from jrouter.ops.effects import EffectWriter
from jrouter.ops.listener import Listener
from jrouter.ops.memory import HeapTrimmer
from jrouter.routing.access import RateCounter
from jrouter.wire.connection import ConnectionClosed
from jrouter.errors import ListenError

if TYPE_CHECKING:
    import ssl

    from gevent import Greenlet

    from jrouter.config import Config
    from jrouter.ops.placement_state import PlacementState
    from jrouter.routing.access import AccessRules, ConnectLimiter
    from jrouter.routing.router import Log, Router
    from jrouter.wire.connection import Connection


#: What a read asks of the kernel at most (``RouterServer.read_size``).
READ_SIZE = 65536


class RouterServer:
    """Accept peers on ``config.ip``:``config.port`` and serve the router."""

    #: bytes asked of the kernel per read
    read_size = READ_SIZE
    #: seconds a peer gets to answer our ``</stream:stream>`` at shutdown
    shutdown_grace = 2.0
    #: seconds of silence after which a peer's parser is let go (Router.rest_idle)
    rest_after = 30.0
    #: until a peer has sent this many bytes it is setting up (a header, SASL
    #: or a handshake, its binds), and its parser is let go after every read
    #: (``Connection.rest``; the next read renews it, ~5 us). An idle
    #: component then holds no parser at all, and peers that connect one
    #: after another reuse the same memory: held for 30 s, the parsers of
    #: 1,000 components set up in a second left 10 MiB of holes in the heap
    #: that no rest gave back (docs/architecture.md, memory).
    settle_bytes = 4096
    #: seconds the TLS handshake may take
    tls_timeout = 30.0
    #: packets of a dead peer routed again before the other greenlets get a turn
    redelivery_slice = 256

    def __init__(self, config: Config, router: Router, log: Log, access: Optional[AccessRules] = None,
                 connect_limiter: Optional[ConnectLimiter] = None,
                 tls_context: Optional[ssl.SSLContext] = None,
                 clock: Callable[[], float] = time.monotonic,
                 placement_state: Optional[PlacementState] = None) -> None:
        self.config = config
        self.router = router
        self.log = log
        self.access = access
        self.connect_limiter = connect_limiter
        self.tls_context = tls_context
        self.clock = clock
        router.tls_available = tls_context is not None
        self.effects = EffectWriter(router, log)
        router.on_effects = self._schedule_flush
        # Unbounded: a pool that is full stops accepting, and peers would
        # wait unanswered; over max_fds a peer is refused at once instead.
        self._handlers = _Greenlets()
        self._marked: list[_Peer] = []  # peers with output since the last flush
        self._flush_scheduled = False
        self._redelivering = False    # a greenlet is routing packets of dead peers again
        self._server: Optional[Listener] = None
        self._timer: Optional[Greenlet] = None
        self._sockets: dict[int, socket.socket] = {}
        self.heap = HeapTrimmer()     # freed memory goes back to the system
        self.placement_state = placement_state   # slots saved over restarts, if configured
        self._save_again_at = 0.0

    @property
    def address(self) -> Optional[tuple[Any, ...]]:
        """(host, port) where it listens; IPv6 adds flowinfo and scope id."""
        return self._server.address if self._server else None

    def start(self) -> None:
        """Listen; raise ListenError with jabberd2's log line on failure."""
        ip, port = self.config.ip, self.config.port
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        try:
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            listener.bind((ip, port))
            listener.listen(1024)
        except OSError as exc:
            raise ListenError(f"[{ip}, port={port}] unable to listen ({exc.strerror})") from None
        self.router.started_at = self.clock()
        self._server = Listener(listener, self._handle, self._handlers.spawn, self.log.notice)
        self._server.start()
        self.log.notice(f"[{ip}, port={port}] listening for incoming connections")
        self._timer = gevent.spawn(self._time_checks)

    def _time_checks(self) -> None:
        """jabberd2's checks every <check><interval> (keepalive), and every
        second the clustering timers (held packets, IQ tracking) and the heap."""
        interval = self.config.check_interval
        next_check = next_rest = self.clock()
        while True:
            now = self.clock()
            if interval > 0 and now >= next_check:
                self.router.tick(now)
                next_check = now + interval
            if now >= next_rest:
                self.router.rest_idle(now, self.rest_after)
                next_rest = now + self.rest_after / 3
            self.router.expire(now)
            self.heap.check()
            self.save_placement()
            gevent.sleep(1.0)

    def save_placement(self) -> None:
        """Write the slots out if they changed (at most once a second, and at
        stop; after a failure, which was logged, a minute later)."""
        table = self.router.table
        if self.placement_state is None or not table.remembered_changed \
                or self.clock() < self._save_again_at:
            return
        table.remembered_changed = False
        if not self.placement_state.save(table.remembered):
            table.remembered_changed = True
            self._save_again_at = self.clock() + 60.0

    def stop(self) -> None:
        """Graceful shutdown, bounded in time (jabberd2 can wait forever)."""
        if self._server is not None:
            self._server.close()
        if self._timer is not None:
            self._timer.kill()
        self.router.shutdown()
        self.save_placement()
        self._wait_for_peers(self.shutdown_grace)
        for sock in list(self._sockets.values()):
            _shutdown(sock)
        self._wait_for_peers(1.0)
        self._handlers.kill(timeout=1.0)

    def _wait_for_peers(self, timeout: float) -> None:
        """Until every peer is gone and torn down, or ``timeout`` s passed."""
        deadline = time.monotonic() + timeout
        while (self._sockets or self._handlers.greenlets) and time.monotonic() < deadline:
            gevent.sleep(0.01)

    # -- one peer ----------------------------------------------------------

    def _handle(self, sock: socket.socket, address: tuple[Any, ...]) -> None:
        # (host, port), or over IPv6 (host, port, flowinfo, scope id)
        ip, port = address[0], address[1]
        if not self._admit(sock, ip):
            sock.close()
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection = self.router.connect(ip, port)
        connection.connected_at = self.clock()
        self._sockets[id(connection)] = sock
        peer = _Peer(self, sock, connection)
        if peer.raw is not None and self.config.bytes_limit.total <= 0:
            peer.listen()       # this greenlet ends; the hub reads (the common case)
            return
        self.serve(peer)

    def serve(self, peer: _Peer, start_tls: bool = False) -> None:
        """A peer read by its own greenlet (a byte budget; TLS), to the end."""
        try:
            peer.run(start_tls)
        finally:
            self.disconnect(peer)
            peer.let_go()
            peer.close()

    def disconnect(self, peer: _Peer) -> None:
        """The peer's stream is over: the router lets it go."""
        self._sockets.pop(id(peer.connection), None)
        self.router.disconnect(peer.connection, self.clock())

    def finish(self, peer: _Peer, error: Optional[Exception] = None) -> None:
        """The end of a peer read by the hub (``_Peer.listen``), in a greenlet
        of its own: the goodbye may have to wait for the socket. An error that
        was not the peer's is raised again here, so that gevent reports it as
        it reports a failed handler."""
        peer.close()
        if error is not None:
            raise error

    def mark(self, peer: _Peer) -> None:
        """A peer has output: it goes out at the next flush, which the
        reader that routed it runs at once, or else the hub soon after."""
        self._marked.append(peer)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            gevent.get_hub().loop.run_callback(self.flush)

    def flush(self) -> None:
        """Send what is queued for every marked peer; write the router's files;
        start routing again what dead peers left, if there is any."""
        self._flush_scheduled = False
        if self.router.effects:
            self.effects.write()
        marked = self._marked
        while marked:
            peer = marked.pop()
            peer.marked = False
            peer.push()
        if self.router.redelivery.pending and not self._redelivering:
            self._redelivering = True
            gevent.spawn(self._redeliver)

    def _redeliver(self) -> None:
        """Route again what dead peers never got, a slice at a time, letting
        every other greenlet run between slices (issue 10, #2)."""
        try:
            while self.router.redeliver(self.clock(), self.redelivery_slice):
                self.flush()
                gevent.sleep(0)
        finally:
            self._redelivering = False
        self.flush()

    def overflow(self, peer: _Peer) -> None:
        """A peer's queue passed its bound: the router ends it, and its socket
        is shut at once (a peer that does not read would never take a goodbye)."""
        self.router.overflowed(peer.connection, self.clock())
        _shutdown(peer.sock)

    def _admit(self, sock: socket.socket, ip: str) -> bool:
        """The accept checks (protocol §3.1): access rules, connect rate,
        failed authentications, max_fds (where an unauthenticated peer makes
        room, protocol §3.10)."""
        if self.access is not None and not self.access.allows(ip):
            self.log.notice(f"[{sock.fileno()}] [{ip}] access denied by configuration")
            return False
        now = self.clock()
        limiter = self.connect_limiter
        if limiter is not None:
            if not limiter.admit(ip, now):
                self.log.notice(f"[{sock.fileno()}] [{ip}] is being rate limited")
                return False
        guard = self.router.guard
        if guard.refuses(ip, now):
            self.log.notice(f"[{sock.fileno()}] [{ip}] refused: too many failed authentications")
            return False
        max_fds = self.config.max_fds
        # Counted in connections, not handlers: a burst of accepts spawns
        # handlers faster than they connect (or are refused).
        connections = self.router.connections
        if max_fds > 0 and len(connections) >= max_fds and not guard.make_room(connections, max_fds):
            self.log.notice(f"[{sock.fileno()}] [{ip}] refused: {max_fds} connections "
                            "already (io.max_fds)")
            return False
        return True


class _Peer:
    """The reader and the writer greenlet of one connection.

    A plain TCP peer without a byte budget is read by the hub: ``listen``
    starts a watcher whose callback reads whatever came, hands it to the
    connection and returns (``_readable``); an idle connection so holds no
    greenlet at all. A greenlet parked in ``recv`` kept ~8 KiB: its C stack
    slice (~3 KiB, copied to the heap by greenlet), the page it touched of
    the interpreter's 16 KiB frame stack, and the Greenlet itself
    (docs/architecture.md, memory). STARTTLS and ``<limits><bytes>`` need a
    reader that can wait (the TLS handshake and its reads, the byte budget's
    pauses): such a peer gets the greenlet loop, ``run``.
    """

    __slots__ = ("server", "sock", "raw", "connection", "busy", "pending", "marked", "writer",
                 "watcher")

    def __init__(self, server: RouterServer, sock: socket.socket, connection: Connection) -> None:
        self.server = server
        self.sock = sock
        self.raw = sock._sock if hasattr(sock, "_sock") else None   # None: send through gevent
        self.connection = connection
        self.busy = False           # the writer greenlet is sending; others only queue
        self.pending = b""          # what a direct send left over, for the writer
        self.marked = False
        # The writer greenlet lives only while a send has to wait: an idle
        # connection costs no greenlet of its own for writing.
        self.writer: Optional[Greenlet] = None
        self.watcher: Any = None    # the hub's read watcher (listen), if the hub reads
        connection.outbox.on_output = self._mark
        connection.last_activity = server.clock()

    def listen(self) -> None:
        """Let the hub read this peer: ``_readable`` runs whenever bytes wait."""
        self.watcher = gevent.get_hub().loop.io(self.sock.fileno(), 1)
        self.watcher.start(self._readable)

    def _readable(self) -> None:
        """One read, as ``run`` does one: read what waits, hand it to the
        connection, flush. Runs in the hub, so it never waits: a peer that
        must (STARTTLS) goes on in a greenlet of its own, and the end of the
        stream is finished in one (``RouterServer.finish``)."""
        connection = self.connection
        try:
            received = self.raw.recv_into(_READ_BUFFER, self.server.read_size)  # type: ignore[union-attr]  # listen() only with raw
            if not received:
                self._stop()
                return
            data = bytes(_READ_VIEW[:received])
            connection.last_activity = now = self.server.clock()
            connection.receive(data, now)
            if connection.counters.bytes_in < self.server.settle_bytes:
                connection.rest()
            self.server.flush()
            if connection.starting_tls:
                self._unwatch()
                self.server._handlers.spawn(self._serve_tls)
        except BlockingIOError:
            pass                    # woken for nothing: the next turn reads
        except ConnectionClosed:
            self._stop()
        except OSError as exc:
            self._log_read_error(exc)
            self._stop()
        except Exception as exc:    # a bug: the stream ends, and gevent reports it
            self._stop(exc)

    def _serve_tls(self) -> None:
        self.server.serve(self, start_tls=True)

    def _unwatch(self) -> None:
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            watcher.stop()
            watcher.close()

    def _stop(self, error: Optional[Exception] = None) -> None:
        """The stream read by the hub is over: as ``RouterServer.serve`` ends one."""
        self._unwatch()
        self.server.disconnect(self)
        self.let_go()
        self.server._handlers.spawn(self.server.finish, self, error)

    def _log_read_error(self, exc: OSError) -> None:
        if exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.EBADF, None):
            self.server.log.notice(f"{self.connection.label} read error: {exc}")

    def _start_writer(self) -> None:
        if self.writer is None or self.writer.dead:
            self.writer = gevent.spawn(self._write_loop)

    def _mark(self) -> None:
        if not self.marked:
            self.marked = True
            self.server.mark(self)

    def push(self) -> None:
        """Send what is queued at once if the socket takes it without waiting
        (no greenlet switch, no hub callback); the writer greenlet, the one
        that may wait on this socket, sends whatever is left."""
        connection = self.connection
        if connection.outbox.overflowed and not connection.closing:
            self.server.overflow(self)
            return
        if self.busy or self.pending or self.raw is None or connection.closing:
            self._start_writer()
            return
        data = connection.data_to_send()
        if not data:
            return
        try:
            sent = self.raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            connection.forget()
            self._start_writer()
            return
        connection.outbox.sent(sent)
        connection.last_activity = self.server.clock()
        if sent < len(data):
            self.pending = data[sent:]
            self._start_writer()

    def run(self, start_tls: bool = False) -> None:
        """Read in this greenlet till the stream ends (after STARTTLS first,
        if the hub read the peer up to its ``<starttls/>``)."""
        connection = self.connection
        clock = self.server.clock
        read_size = self.server.read_size
        limit = self.server.config.bytes_limit
        budget = RateCounter(limit) if limit.total > 0 else None
        settle = self.server.settle_bytes
        counters = connection.counters
        try:
            if start_tls:
                self._start_tls()
            while True:
                size = read_size if budget is None else self._allowance(budget)
                received = self.sock.recv_into(_READ_BUFFER, size)
                if not received:
                    return
                data = bytes(_READ_VIEW[:received])
                connection.last_activity = now = clock()
                if budget is not None:
                    budget.add(now, len(data))
                connection.receive(data, now)
                if counters.bytes_in < settle:
                    connection.rest()
                self.server.flush()
                if connection.starting_tls:
                    self._start_tls()
                # recv() does not yield while data is waiting: without a turn
                # for the others here, one busy peer could starve the rest.
                gevent.sleep(0)
        except ConnectionClosed:
            pass
        except OSError as exc:         # ssl.SSLError among them
            self._log_read_error(exc)

    def _allowance(self, budget: RateCounter) -> int:
        """How much the next read may take under <limits><bytes> (protocol §3.9):
        while the peer is over its budget, nothing is read (it waits)."""
        logged = False
        while not budget.check(self.server.clock()):
            if not logged:
                self.server.log.notice(f"{self.connection.label} is being byte rate limited")
                logged = True
            gevent.sleep(min(1.0, max(0.05, budget.throttle / 10)))
        return max(1, min(self.server.read_size, budget.left()))

    def _write_loop(self) -> None:
        """Send everything queued, waiting on the socket as needed; end when
        nothing is left (or close the socket when the stream is over)."""
        connection = self.connection
        try:
            while True:
                self.busy = True
                data = self.pending + connection.data_to_send()
                self.pending = b""
                if data:
                    self._send_all(data)
                    connection.last_activity = self.server.clock()
                self.busy = False
                if connection.outbox.out:
                    continue
                if not connection.closing:
                    return
                break
        except OSError:                # ssl.SSLError among them
            self.busy = False
            connection.forget()
        _shutdown(self.sock)

    def _send_all(self, data: bytes) -> None:
        """Write ``data``, waiting on the socket as needed, telling the outbox
        how far it got (what a peer cut off meanwhile never got is routed again)."""
        outbox = self.connection.outbox
        view = memoryview(data)
        while view:
            sent = self.sock.send(view)
            outbox.sent(sent)
            view = view[sent:]

    def _start_tls(self) -> None:
        """Send <proceed/>, then turn the socket into a TLS server socket."""
        connection = self.connection
        self._start_writer()            # <proceed/> must be out before the handshake
        self.writer.join(timeout=self.server.tls_timeout)  # type: ignore[union-attr]  # just made
        self.raw = None             # TLS: every byte goes through the SSL layer
        try:
            with gevent.Timeout(self.server.tls_timeout):
                # Set: the router offers STARTTLS only with a context (tls_available).
                self.sock = self.server.tls_context.wrap_socket(  # type: ignore[union-attr]
                    self.sock, server_side=True)
        except (OSError, gevent.Timeout) as exc:     # OSError: ssl.SSLError too
            self.server.log.notice(f"{connection.label} TLS handshake failed: {exc}")
            raise ConnectionClosed() from None
        leftover = connection.tls_started()
        if leftover:
            self.server.log.notice(f"{connection.label} sent data in the clear after <starttls/>")
            raise ConnectionClosed()

    def let_go(self) -> None:
        """The stream is over (the router has let it go): nothing more is
        read or queued. What the socket had not taken was routed again by
        the router: it is not sent."""
        self.connection.forget()
        self.pending = b""

    def close(self) -> None:
        """Let the writer flush what is queued (bounded), then close."""
        self._start_writer()            # so there is a writer (the type cannot tell)
        self.writer.join(timeout=self.server.shutdown_grace)  # type: ignore[union-attr]
        self.writer.kill(block=False)  # type: ignore[union-attr]
        try:
            self.sock.close()
        except OSError:
            pass


class _Greenlets:
    """The greenlets the shell spawns for its peers (the accept's handler, a
    greenlet reader, a peer's end), kept to be waited for and killed at
    stop: what gevent.pool.Group does for the server, without importing
    gevent.pool (with its queue, lock and monkey modules, ~1.4 MiB)."""

    def __init__(self) -> None:
        self.greenlets: set[Greenlet] = set()

    def spawn(self, func: Callable[..., Any], *args: Any) -> Greenlet:
        greenlet = gevent.spawn(func, *args)
        self.greenlets.add(greenlet)
        greenlet.rawlink(self.greenlets.discard)
        return greenlet

    def kill(self, timeout: float) -> None:
        gevent.killall(list(self.greenlets), timeout=timeout)


#: Every peer's reads land here first (one greenlet runs at a time, and a
#: read copies out before it yields): ``recv(65536)`` would allocate 64 KiB
#: and shrink it to what came, leaving a hole in the C heap next to a chunk
#: the stream reader keeps, and under connection churn those holes grew the
#: router by ~60 KiB per reconnect (docs/architecture.md, memory).
_READ_BUFFER = bytearray(READ_SIZE)
_READ_VIEW = memoryview(_READ_BUFFER)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
