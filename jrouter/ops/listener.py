"""The listening socket: accepting peers, and the file descriptors they need.

Owns: the accept loop and what it does when the process is out of file
descriptors, and raising the open-file limit at startup so that
``io.max_fds`` connections fit (docs/jabberd2-router.md §3.1).

Theory of operation
-------------------
gevent's ``StreamServer`` prints a traceback for every failed ``accept``
and, out of descriptors, pauses and retries on its own schedule; jabberd2's
router spins on the CPU instead (the listening socket stays readable). Here
a failed accept for want of descriptors is one log line per
``_QUIET_SECONDS``, then a pause of ``_PAUSE`` seconds while the kernel's
backlog holds the newcomers. Between accepts the loop yields every
``_BATCH`` peers, so the handlers of peers the router refuses or evicts run
and close their sockets before the loop takes more (a burst of silent
connections otherwise held hundreds of descriptors at once).

The limit: a soft open-file limit of 1,024 (systemd's default) with
``io.max_fds`` at 1,024 leaves no descriptor for the log, the listener, or a
peer being refused. At startup the soft limit is raised towards the hard
one, to what ``io.max_fds`` needs plus room for those; if the hard limit is
too low, a warning says so.

Must not know: protocols, routing.
"""

from __future__ import annotations

import errno
import time
from typing import Callable

import gevent
from gevent import socket

try:
    import resource
except ImportError:                    # not on every platform
    resource = None  # type: ignore[assignment]

#: Descriptors besides the peers': log files, the listener, the hub, a peer being refused.
SPARE_FDS = 64
#: Peers accepted before the loop lets their handlers run.
_BATCH = 16
#: Seconds the loop waits when out of descriptors.
_PAUSE = 0.1
#: Seconds between two "out of file descriptors" lines.
_QUIET_SECONDS = 10.0

_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_TRANSIENT = (errno.ECONNABORTED, errno.EAGAIN, errno.EINTR, errno.EPROTO)

Handler = Callable[[socket.socket, tuple], None]


def raise_fd_limit(max_fds: int, warn: Callable[[str], None]) -> None:
    """Raise the soft open-file limit so that ``max_fds`` peers fit."""
    if resource is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_fds + SPARE_FDS
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < wanted:
        warn(f"open file limit is {soft}: io.max_fds {max_fds} needs {wanted} "
             "(raise LimitNOFILE or ulimit -n)")


class Listener:
    """Accepts peers on ``sock`` and spawns ``handle(sock, address)`` for each."""

    def __init__(self, sock: socket.socket, handle: Handler, spawn: Callable,
                 log_notice: Callable[[str], None]) -> None:
        self.sock = sock
        self.handle = handle
        self.spawn = spawn
        self.log_notice = log_notice
        self._greenlet: gevent.Greenlet | None = None
        self._quiet_until = 0.0

    @property
    def address(self) -> tuple:
        return self.sock.getsockname()

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._accept_loop)

    def close(self) -> None:
        """Stop accepting (peers already accepted are not touched)."""
        if self._greenlet is not None:
            self._greenlet.kill()
            self._greenlet = None
        self.sock.close()

    def _accept_loop(self) -> None:
        accepted = 0
        while True:
            try:
                peer, address = self.sock.accept()
            except OSError as exc:
                if exc.errno in _OUT_OF_FDS:
                    self._out_of_fds(exc)
                    gevent.sleep(_PAUSE)
                elif exc.errno not in _TRANSIENT:
                    raise
                continue
            self.spawn(self.handle, peer, address)
            accepted += 1
            if accepted % _BATCH == 0:
                gevent.sleep(0)

    def _out_of_fds(self, exc: OSError) -> None:
        now = time.monotonic()
        if now >= self._quiet_until:
            self._quiet_until = now + _QUIET_SECONDS
            self.log_notice(f"cannot accept connections: {exc.strerror} (out of file "
                            f"descriptors; retrying every {_PAUSE} s)")
