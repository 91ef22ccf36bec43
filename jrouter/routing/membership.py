"""Names joining and leaving: who serves which name, and who hears of it.

Owns: making a connection a member of a name (``join``: slots by instance
identity, a returning instance replacing its half-open connection, aliases
following their target), taking it out (``leave``), the "online"/"offline"
log lines operators grep for, and the name advertisements jabberd2
components get (protocol §4.3).

Must not know: sockets, the clock (``now`` is handed in), which protocol
asked (a port calls ``join``; the port's ``identity`` and ``advertised``
say what differs), or how a member is chosen for a packet (placement.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

from jrouter.routing.balance import SlotBusy, SlotsFull
from jrouter.routing.table import CLAIM
from jrouter.wire.connection import NS_COMPONENT, Connection
from jrouter.wire.xmlwrite import quoteattr

if TYPE_CHECKING:
    from jrouter.routing.router import Router
    from jrouter.routing.table import Route
    from jrouter.routing.member import RouteMember


class Membership:
    """Joins and leaves on the router's route table."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.table = router.table
        self.log = router.log

    # -- joining -------------------------------------------------------------

    def join_then(self, connection: Connection, name: str, kind: str, now: float,
                  then: Callable[[Optional[tuple[Route, Optional[int]]], Optional[str], float], None],
                  alias_of: Optional[str] = None) -> None:
        """``join``, then ``then(joined, refusal, now)``: at once, or, on a
        node of a cluster, for a name under a slot policy, once etcd gave
        the member its slot (every node numbers members alike: docs/cluster.md
        §8). ``refusal`` is the error code when ``joined`` is None."""
        cluster = self.router.cluster
        if cluster is None or not cluster.slots.needs_slot(name):
            joined = self.join(connection, name, kind, now, alias_of)
            return then(joined, None if joined is not None else "409", now)

        def resume(slot: Optional[int], refusal: Optional[str], now: float) -> None:
            if refusal is not None:
                return then(None, refusal, now)
            then(self.join(connection, name, kind, now, alias_of, slot), None, now)
        cluster.slots.claim(connection, name, kind, resume)

    def join(self, connection: RouteMember, name: str, kind: str, now: float,
             alias_of: Optional[str] = None, slot: Optional[int] = CLAIM
             ) -> Optional[tuple[Route, Optional[int]]]:
        """Make ``connection`` a member of ``name``; returns (route, slot),
        or None when a slot policy has no slot left for it. ``slot``: the
        one the cluster gave it (RouteTable.add)."""
        identity = connection.protocol_port.identity(connection)
        if slot != CLAIM:
            route, mixed, slot = self.table.add(name, connection, kind, alias_of, identity, slot)
            return self._joined(connection, name, kind, route, mixed, slot)
        try:
            route, mixed, slot = self.table.add(name, connection, kind, alias_of, identity)
        except SlotBusy as busy:
            route = self.table.routes[name]
            old = route.by_slot.get(busy.slot)
            if route.policy.replace == "half-open" and old is not None:
                # The same instance is back: its old connection is half-open.
                self.log.notice(f"[{name}] {connection.label} replaces {old.label} "
                                f"(instance '{busy.identity}')")
                self._replace(old, now)
            else:
                identity = None            # an extra member, as jabberd2 allows
            try:
                route, mixed, slot = self.table.add(name, connection, kind, alias_of, identity)
            except SlotsFull:
                return self._refuse_full(connection, name)
        except SlotsFull:
            return self._refuse_full(connection, name)
        return self._joined(connection, name, kind, route, mixed, slot)

    def _joined(self, connection: RouteMember, name: str, kind: str, route: Route, mixed: bool,
                slot: Optional[int]) -> tuple[Route, Optional[int]]:
        if mixed:
            self.log.error(f"Mixed route types for '{name}' bind request")
        connection.names[name] = kind
        if slot is not None:
            self.router.deliver_held(route, slot, connection)
        cluster = self.router.cluster
        if cluster is not None:
            cluster.joined(connection, name, kind)     # its member key in the cluster table
        return route, slot

    def replace_instance(self, name: str, connection: Connection, now: float) -> bool:
        """A cluster instance reconnects while its old connection still holds
        its own name (an sm's <id>): under replace='half-open' the old
        connection is ended and the name is free again."""
        holder = self.table.routes[name].members[0]
        ours = isinstance(holder, Connection)   # else a member on another node (a cluster's)
        if holder is connection or (holder.user != connection.user and ours) \
                or holder.protocol_port.identity(holder) != name:
            return False
        if not any(holder in route.members and route.policy.replace == "half-open"
                   for route in self.table.served()):
            return False
        self.log.notice(f"[{name}] {connection.label} replaces {holder.label} (instance '{name}')")
        if not ours:
            # Its node ends it; the bind waits for the name (docs/cluster.md §8).
            return self.router.cluster.replace_remote(connection, name, holder)  # type: ignore[union-attr, arg-type]
        self._replace(holder, now)
        return True

    def _replace(self, old: RouteMember, now: float) -> None:
        # Always one of ours: a member on another node is ended by its own
        # node (replace_instance), and one router has no other kind.
        if isinstance(old, Connection):
            old.kick("conflict", "replaced by a new connection of the same instance")
            self.router.disconnect(old, now)

    def _refuse_full(self, connection: RouteMember, name: str) -> Optional[tuple[Route, Optional[int]]]:
        # The answer join gives for a full route: None.
        self.log.notice(f"{connection.label} tried to bind '{name}', but all its slots are taken")
        return None

    def online(self, connection: RouteMember, route: Route, slot: Optional[int],
               alias_of: Optional[str] = None) -> None:
        """jabberd2's "online" line, with the member count and slot."""
        # A member on another node (cluster_view.RemoteMember) has no port of ours.
        where = f"bound to {connection.ip}, port {connection.port}" if connection.port \
            else f"bound to {connection.ip}"
        name = route.name
        count = len(route.members)
        if alias_of is not None:
            self.log.notice(f"[{name}] online (alias of '{alias_of}', {where})")
        elif slot is not None:
            self.log.notice(f"[{name}]:{count} online ({where}, slot {slot})")
        elif count > 1:
            self.log.notice(f"[{name}]:{count} online ({where})")
        else:
            self.log.notice(f"[{name}] online ({where})")

    def join_aliases(self, connection: Connection, name: str, kind: str, now: float) -> None:
        """Aliases of a bound name become routes to the same peer (protocol §4.11;
        jabberd2 gets this wrong for jabberd2-protocol components)."""
        for alias, target in self.router.aliases.items():
            if target == name and alias not in connection.names:
                def then(joined: Optional[tuple[Route, Optional[int]]], _refusal: Optional[str],
                         _now: float, alias: str = alias) -> None:
                    if joined is not None:
                        self.online(connection, *joined, alias_of=name)
                        self.advertise(alias, connection, available=True)
                self.join_then(connection, alias, kind, now, then, alias_of=name)

    # -- leaving -------------------------------------------------------------

    def leave(self, connection: RouteMember, name: str, now: float,
              reply: Optional[Callable[[], None]] = None) -> None:
        """Take ``connection`` out of ``name`` (unbind, or its socket is gone)."""
        table = self.table
        was_sink = table.log_sinks.get(name) is connection
        if was_sink:
            del table.log_sinks[name]
        route = table.routes.get(name)
        remaining, slot = table.remove(name, connection)
        if route is not None:
            self.router.placement.member_left(route, slot, now, connection)
        kind = connection.names.pop(name, None)
        was_default = table.default_name == name
        if was_default:
            table.default_name = None
            self.log.notice(f"[{name}] default route offline")
        cluster = self.router.cluster
        if cluster is not None:
            cluster.left(connection, name, kind, was_default, was_sink)
        self.log.notice(f"[{name}] offline")
        if reply is not None:
            reply()
        if remaining == 0:
            self.advertise(name, connection, available=False)

    def leave_with_aliases(self, connection: RouteMember, name: str, now: float,
                           reply: Optional[Callable[[], None]] = None) -> None:
        self.leave(connection, name, now, reply)
        for alias, target in self.router.aliases.items():
            if target == name and alias in connection.names:
                self.leave(connection, alias, now)

    # -- advertisements (protocol §4.3) --------------------------------------

    def advertise(self, name: str, source: RouteMember, available: bool) -> None:
        """Tell every bound jabberd2 component that ``name`` came or went.
        jabberd2 sends one copy per name the receiver has bound; one is enough."""
        kind = "" if available else " type='unavailable'"
        data = f"<presence xmlns='{NS_COMPONENT}'{kind} from={quoteattr(name)}/>".encode()
        for connection in self.router.connections:
            if connection is not source and connection.names and connection.protocol_port.advertised:
                connection.send(data)

    def advertise_reverse(self, connection: RouteMember) -> None:
        """Tell a binder about every name it does not serve itself."""
        parts = [f"<presence xmlns='{NS_COMPONENT}' from={quoteattr(route.name)}/>"
                 for route in self.table.served() if connection not in route.members]
        if parts:
            connection.send("".join(parts).encode())
