"""Limits on peers that have not authenticated yet (ours: jabberd2 has none).

Owns: every decision about unauthenticated connections (protocol §3.10): how
long one may take to authenticate, how many may be open at once, which one
makes room for a newcomer, how large its elements may be, and how many
failed authentications a connection and an address may make, with the
per-address failure counters. It decides and queues the goodbye
(``Connection.kick``); the shell closes the socket, and refuses at accept
time the addresses ``refuses`` names. Must not know sockets or the clock:
``now`` comes in with every call that needs it.

Theory of operation
-------------------
An unauthenticated connection holds a file descriptor and a place under
``io.max_fds`` but has proved nothing, so it gets little:

* a deadline: ``authtimeout`` seconds after ``connected_at`` (the shell's
  stamp), ``expire`` ends it with ``connection-timeout``;
* a cap: at most ``unauthenticated`` are open. A newcomer at the cap, or at
  ``io.max_fds``, takes the place of the one that matters least: the oldest
  that has not sent a stream header yet, else the oldest. Silent sockets so
  never keep out a component that is negotiating, and ``io.max_fds`` refuses
  a newcomer only when every connection has authenticated;
* a small element limit (``element_limit``; ``Connection`` switches to
  ``stanzasize`` when the peer authenticates);
* failures: a connection's ``authattempts``-th failed SASL exchange ends its
  stream (``policy-violation``). Every failure, a failed XEP-0114 handshake
  too, counts against the address (``util/rate.c``'s counter, as for
  ``<connects>``): ``authfailures`` of them within ``seconds`` block it for
  ``throttle`` seconds, logged once in fixed words for fail2ban. While it is
  blocked the shell refuses it, and any further failure from it ends the
  connection at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from jrouter.routing.access import AddressCounters, RateLimit

if TYPE_CHECKING:
    from jrouter.routing.router import Log
    from jrouter.wire.connection import Connection

@dataclass(frozen=True)
class AuthLimits:
    """``<io><limits>``' settings for unauthenticated peers; 0 turns one off."""

    timeout: int = 30              # authtimeout: seconds to authenticate in
    stanza_size: int = 16384       # authstanzasize: bytes per element before authentication
    unauthenticated: int = 64      # unauthenticated: connections open at once
    attempts: int = 3              # authattempts: failed SASL exchanges per connection
    failures: RateLimit = field(default_factory=lambda: RateLimit(10, 60, 300))  # authfailures, per address


def smaller_limit(a: int, b: int) -> int:
    """The tighter of two size limits where 0 means none."""
    return min(a, b) if a and b else a or b


class AuthGuard:
    """The unauthenticated connections' limits, and the failed-authentication counters."""

    def __init__(self, limits: AuthLimits, stanza_size: int, log: Log) -> None:
        self.limits = limits
        self.log = log
        #: What a connection's reader allows until the peer authenticates.
        self.element_limit = smaller_limit(limits.stanza_size, stanza_size)
        self.failures = AddressCounters(limits.failures)   # ip -> failed authentications

    # -- a newcomer ------------------------------------------------------------

    def refuses(self, ip: str, now: float) -> bool:
        """Whether ``ip`` is blocked for failed authentications: the shell
        refuses its connections."""
        counter = self.failures.get(ip)
        return counter is not None and not counter.check(now)

    def arriving(self, connections: Iterable[Connection]) -> None:
        """A new peer is about to join ``connections``: at the cap, the
        unauthenticated connection that matters least goes."""
        cap = self.limits.unauthenticated
        if cap > 0:
            waiting = _unauthenticated(connections)
            if len(waiting) >= cap:
                self._evict(waiting, f"{cap} unauthenticated connections already "
                                     "(io.limits.unauthenticated)")

    def make_room(self, connections: Iterable[Connection], max_fds: int) -> bool:
        """``io.max_fds`` is reached: end an unauthenticated connection so
        the newcomer gets its place; False when all have authenticated (the
        newcomer is refused)."""
        waiting = _unauthenticated(connections)
        if not waiting:
            return False
        self._evict(waiting, f"{max_fds} connections already (io.max_fds)")
        return True

    def _evict(self, waiting: list[Connection], why: str) -> None:
        silent = [connection for connection in waiting if connection.stream_id is None]
        victim = (silent or waiting)[0]      # both in connect order: the oldest
        self.log.notice(f"{victim.label} closed to make room: {why}")
        victim.kick("resource-constraint", "too many unauthenticated connections")

    # -- the clock ---------------------------------------------------------------

    def expire(self, connections: Iterable[Connection], now: float) -> None:
        """End the connections that did not authenticate in time."""
        timeout = self.limits.timeout
        if timeout <= 0:
            return
        late = [connection for connection in _unauthenticated(connections)
                if now - connection.connected_at >= timeout]
        for connection in late:
            self.log.notice(f"{connection.label} not authenticated within {timeout} s, closing")
            connection.kick("connection-timeout", f"not authenticated within {timeout} s")

    # -- failed authentications ------------------------------------------------------

    def failed(self, connection: Connection, now: float) -> bool:
        """``connection`` failed to authenticate: counted for it and for its
        address; True when its stream must end."""
        connection.auth_failures += 1
        self.log.debug(f"{connection.label} authentication failed")
        blocked = self._count(connection.ip, now)
        attempts = self.limits.attempts
        if not blocked and attempts > 0 and connection.auth_failures >= attempts:
            self.log.notice(f"{connection.label} too many failed authentications on one "
                            f"connection ({connection.auth_failures}), closing")
            return True
        return blocked

    def _count(self, ip: str, now: float) -> bool:
        """Count a failure from ``ip``; True when the address is blocked."""
        limit = self.limits.failures
        if not limit.enabled:
            return False
        counter = self.failures.counter(ip, now)
        if not counter.check(now):
            return True          # blocked already, and logged when it began
        counter.add(now)
        if counter.bad_since is None:
            return False
        self.log.notice(f"[{ip}] too many failed authentications ({limit.total} in "
                        f"{limit.seconds} s), refusing connections for {limit.throttle} s")
        return True


def _unauthenticated(connections: Iterable[Connection]) -> list[Connection]:
    """The open connections that have not authenticated, in connect order."""
    return [connection for connection in connections
            if not connection.authenticated and not connection.closing]
