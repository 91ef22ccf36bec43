"""The gevent shell: sockets, greenlets, timers and TLS around the sans-IO router.

Each accepted socket gets a reader (the handler greenlet). When the router
queues something for a peer (``Connection.on_output``) the peer is marked;
right after each read, the reader that routed it flushes the marked peers:
everything queued for one peer goes out in one non-blocking ``send`` if the
kernel takes it. Only when a send would have to wait does the peer get a
writer greenlet, the only greenlet that ever waits on that socket (house
rule 5, as gevent requires); it sends what is left, and everything queued
while it is busy, so order is kept, and it ends when nothing is left. An
idle connection so costs no writer greenlet at all. A reader yields after
every read, so one busy peer cannot starve the rest.

This module must not know the protocols: it moves bytes and calls
``Connection.receive``, ``Router.connect``/``disconnect``/``tick``.
"""

from __future__ import annotations

import errno
import ssl
import time
from typing import TYPE_CHECKING, Callable, Optional

import gevent
from gevent import socket
from gevent.pool import Pool

from jrouter.ops.effects import EffectWriter
from jrouter.ops.listener import Listener
from jrouter.ops.memory import HeapTrimmer
from jrouter.routing.access import RateCounter
from jrouter.wire.connection import ConnectionClosed
from jrouter.errors import ListenError

if TYPE_CHECKING:
    from gevent import Greenlet

    from jrouter.config import Config
    from jrouter.ops.placement_state import PlacementState
    from jrouter.routing.access import AccessRules, ConnectLimiter
    from jrouter.routing.router import Log, Router
    from jrouter.wire.connection import Connection


class RouterServer:
    """Accept peers on ``config.ip``:``config.port`` and serve the router."""

    #: bytes asked of the kernel per read
    read_size = 65536
    #: seconds a peer gets to answer our ``</stream:stream>`` at shutdown
    shutdown_grace = 2.0
    #: seconds of silence after which a peer's parser is let go (Router.rest_idle)
    rest_after = 30.0
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
        self._pool = Pool()
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
    def address(self) -> Optional[tuple[str, int]]:
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
        self._server = Listener(listener, self._handle, self._pool.spawn, self.log.notice)
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
        self._pool.join(timeout=self.shutdown_grace)
        for sock in list(self._sockets.values()):
            _shutdown(sock)
        self._pool.join(timeout=1.0)
        self._pool.kill(timeout=1.0)

    # -- one peer ----------------------------------------------------------

    def _handle(self, sock: socket.socket, address: tuple[str, int]) -> None:
        ip, port = address[0], address[1]
        if not self._admit(sock, ip):
            sock.close()
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection = self.router.connect(ip, port)
        connection.connected_at = self.clock()
        key = id(connection)
        self._sockets[key] = sock
        peer = _Peer(self, sock, connection)
        try:
            peer.run()
        finally:
            self._sockets.pop(key, None)
            self.router.disconnect(connection, self.clock())
            peer.finish()


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
    """The reader loop and the writer greenlet of one connection."""

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
        connection.outbox.on_output = self._mark
        connection.last_activity = server.clock()

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

    def run(self) -> None:
        connection = self.connection
        clock = self.server.clock
        read_size = self.server.read_size
        limit = self.server.config.bytes_limit
        budget = RateCounter(limit) if limit.total > 0 else None
        try:
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
                self.server.flush()
                if connection.starting_tls:
                    self._start_tls()
                # recv() does not yield while data is waiting: without a turn
                # for the others here, one busy peer could starve the rest.
                gevent.sleep(0)
        except ConnectionClosed:
            pass
        except (OSError, ssl.SSLError) as exc:
            if exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.EBADF, None):
                self.server.log.notice(f"{connection.label} read error: {exc}")

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
        except (OSError, ssl.SSLError):
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
        except (OSError, ssl.SSLError, gevent.Timeout) as exc:
            self.server.log.notice(f"{connection.label} TLS handshake failed: {exc}")
            raise ConnectionClosed() from None
        leftover = connection.tls_started()
        if leftover:
            self.server.log.notice(f"{connection.label} sent data in the clear after <starttls/>")
            raise ConnectionClosed()

    def finish(self) -> None:
        """Let the writer flush what is queued (bounded), then close. What the
        socket had not taken was routed again by the router: it is not sent."""
        self.connection.forget()
        self.pending = b""
        self._start_writer()            # so there is a writer (the type cannot tell)
        self.writer.join(timeout=self.server.shutdown_grace)  # type: ignore[union-attr]
        self.writer.kill(block=False)  # type: ignore[union-attr]
        try:
            self.sock.close()
        except OSError:
            pass


#: Every peer's reads land here first (one greenlet runs at a time, and a
#: read copies out before it yields): ``recv(65536)`` would allocate 64 KiB
#: and shrink it to what came, leaving a hole in the C heap next to a chunk
#: the stream reader keeps, and under connection churn those holes grew the
#: router by ~60 KiB per reconnect (docs/architecture.md, memory).
_READ_BUFFER = bytearray(RouterServer.read_size)
_READ_VIEW = memoryview(_READ_BUFFER)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
