"""Packets a peer never got: routed again, or bounced, in bounded slices.

Owns: what happens to the routes still queued for a connection that went
away (its socket closed, or it stopped reading past its queue bound): each
is routed again as it was first routed, so another member of its name gets
it or its name's clustering policy holds or bounces it; a packet nobody
can take goes back to its sender (error 503), and only a packet whose
sender is gone too is lost. An operator gets one summary line per
connection, not a line per packet (docs/jabberd2-router.md §6.6).

The work is done in slices (``run(now, budget)``), which the shell calls
until nothing is left, so tearing down a connection with a large backlog
never holds up everybody else (issue 10, #2). Nothing is parsed again: the
outbox kept each packet's route.

Must not know: sockets, the clock (``now`` is handed in).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Optional

from jrouter.routing.placement import HOLD, Choice
from jrouter.wire.jid import parse_jid

if TYPE_CHECKING:
    from jrouter.routing.router import Router
    from jrouter.wire.connection import Connection, ContextKey
    from jrouter.wire.outbox import Routed
    from jrouter.wire.xmlstream import Element


class _Backlog:
    """What one dead connection left, and what became of it so far."""

    __slots__ = ("label", "packets", "routed", "bounced", "lost")

    def __init__(self, label: str, packets: list[Routed]) -> None:
        self.label = label
        self.packets = deque(packets)
        self.routed = self.bounced = self.lost = 0


class Redelivery:
    """The router's queue of packets to route again."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self._backlogs: deque[_Backlog] = deque()

    @property
    def pending(self) -> bool:
        return bool(self._backlogs)

    def add(self, label: str, packets: list[Routed]) -> None:
        """The routes ``label``'s connection never got, oldest first."""
        if packets:
            self._backlogs.append(_Backlog(label, packets))

    def run(self, now: float, budget: int) -> bool:
        """Route again up to ``budget`` packets; True while some are left."""
        backlogs = self._backlogs
        while backlogs and budget > 0:
            backlog = backlogs[0]
            packets = backlog.packets
            while packets and budget > 0:
                element, key, sender = packets.popleft()
                self._again(backlog, element, key, sender, now)
                budget -= 1
            if not packets:
                backlogs.popleft()
                self._summary(backlog)
        return bool(backlogs)

    def _again(self, backlog: _Backlog, element: Element, key: Optional[ContextKey],
               sender: Optional[Connection], now: float) -> None:
        router = self.router
        if sender is not None and sender not in router.connections:
            sender = None                 # it went away too: nobody to bounce to
        attrs = element.attrs
        to = parse_jid(attrs.get("to") or "")
        route = router.route_for(to.domain, _domain(attrs.get("from"))) if to is not None else None
        if route is None or (not route.members and route.slots is None):
            return self._bounce(backlog, sender, element)
        target = router.placement.target(route, element, to, now)
        if target.__class__ is Choice:
            if target.action == HOLD:
                router.hold(route, target, (sender, element, key), now)
                backlog.routed += 1
                return None
            return self._bounce(backlog, sender, element)
        target.deliver(target.protocol_port.outbound(target, element, key),  # type: ignore[union-attr]
                       element, key, sender)
        backlog.routed += 1
        return None

    def _bounce(self, backlog: _Backlog, sender: Optional[Connection], element: Element) -> None:
        if sender is None:
            backlog.lost += 1
        else:
            self.router.bounce(sender, element, "503")
            backlog.bounced += 1

    def _summary(self, backlog: _Backlog) -> None:
        total = backlog.routed + backlog.bounced + backlog.lost
        self.router.log.notice(f"{backlog.label} had {total} queued packets: {backlog.routed} "
                               f"routed again, {backlog.bounced} bounced, {backlog.lost} lost "
                               "(their senders are gone)")


def _domain(address: Optional[str]) -> Optional[str]:
    jid = None if address is None else parse_jid(address)
    return None if jid is None else jid.domain
