"""The route table: which connections serve which names.

Owns the names -> members mapping, the one default route, the log sinks,
and for clustered names under a slot policy (``policy.py``) which member
holds which slot.

Membership follows jabberd2 exactly by default (protocol §6.2): members are kept
in bind order, the route's kind is fixed by its first binder, and removing
a member moves the last member into its slot (swap-remove), because
jabberd2's cluster placement (``policy.place``, protocol §6.3) depends on that
order. A name whose policy uses slots (``consistent`` or ``slots``) instead
gives each member a stable slot id from its identity, so placement does not
depend on connection order; such a route outlives its last member while a
dead slot's traffic is to be held or bounced rather than fall through to the
default route.

It must not know about sockets, XML or how a member is chosen for a packet.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping, Optional

from jrouter.routing.balance import SlotTable
from jrouter.routing.policy import DEFAULT_POLICY

if TYPE_CHECKING:
    from jrouter.routing.policy import ClusterPolicy, PolicyTable
    from jrouter.routing.member import RouteMember

SINGLE = "single"
MULTI_TO = "multi-to"          # jabberd2 components bound with multi: hash the stanza 'to'
MULTI_FROM = "multi-from"      # XEP-0114 components: hash the stanza 'from'
#: RouteTable.add's ``slot`` when the route's own SlotTable numbers the member
#: (one router); a cluster's node passes the slot etcd gave, or None.
CLAIM = -1


class Route:
    """One routable name and the connections bound to it."""

    __slots__ = ("name", "kind", "members", "alias_of", "policy", "slots", "by_slot")

    def __init__(self, name: str, kind: str, alias_of: Optional[str] = None,
                 policy: ClusterPolicy = DEFAULT_POLICY,
                 remembered: Mapping[str, int] = MappingProxyType({})) -> None:
        self.name = name
        self.kind = kind
        self.members: list[RouteMember] = []
        self.alias_of = alias_of
        self.policy = policy
        # Slot algorithms only: slot ids by identity, and slot -> connection.
        self.slots = SlotTable(policy.slots, remembered) if policy.algorithm != "jabberd2" else None
        self.by_slot: dict[int, RouteMember] = {}

    def slot_of(self, connection: RouteMember) -> Optional[int]:
        for slot, member in self.by_slot.items():
            if member is connection:
                return slot
        return None

    def __repr__(self) -> str:
        return f"Route({self.name!r}, {self.kind}, {len(self.members)} members)"


class RouteTable:
    """Names to routes, plus the default route and the log sinks."""

    def __init__(self, policies: Optional[PolicyTable] = None) -> None:
        self.routes: dict[str, Route] = {}
        self.default_name: Optional[str] = None
        self.log_sinks: dict[str, RouteMember] = {}  # name -> its member
        self.policies = policies    # policy.PolicyTable, or None: jabberd2's behaviour
        #: name -> {identity: slot}: the slot each instance had, kept when its
        #: route goes and, saved by the shell, over a restart (protocol §6.10).
        self.remembered: dict[str, dict[str, int]] = {}
        self.remembered_changed = False   # the shell saves, then resets it

    def get(self, name: str) -> Optional[Route]:
        return self.routes.get(name)

    def __contains__(self, name: str) -> bool:
        """Whether anything serves ``name`` now (a kept route without
        members does not count)."""
        route = self.routes.get(name)
        return route is not None and bool(route.members)

    def served(self) -> list[Route]:
        """The routes with at least one member."""
        return [route for route in self.routes.values() if route.members]

    def add(self, name: str, connection: RouteMember, kind: str, alias_of: Optional[str] = None,
            identity: Optional[str] = None, slot: Optional[int] = CLAIM
            ) -> tuple[Route, bool, Optional[int]]:
        """Append ``connection`` to ``name``'s members; return (route, mixed,
        slot): ``mixed`` says the route already had another kind, ``slot`` is
        the member's slot under a slot policy (else None). Under a slot
        policy ``slot`` CLAIM numbers it here (balance.SlotBusy / SlotsFull
        when no slot can be had); a slot number is one the cluster gave it;
        None: an extra member without a slot, which slot placement never
        picks (a cluster member no slot key names)."""
        route = self.routes.get(name)
        mixed = False
        if route is None:
            policy = self.policies.policy_for(name) if self.policies is not None else DEFAULT_POLICY
            route = Route(name, kind, alias_of, policy, self.remembered.get(name, {}))
        elif route.kind != kind and route.members:
            mixed = True
        if route.slots is None:
            slot = None
        elif slot is not None:
            if slot == CLAIM:
                slot = route.slots.claim(identity)
            else:
                route.slots.take(slot, identity)
            route.by_slot[slot] = connection
            self._remember(route)
        self.routes[name] = route
        route.members.append(connection)
        return route, mixed, slot

    def remove(self, name: str, connection: RouteMember) -> tuple[int, Optional[int]]:
        """Take ``connection`` out of ``name``; return (remaining members,
        the slot it held or None)."""
        route = self.routes.get(name)
        if route is None or connection not in route.members:
            return (len(route.members) if route else 0), None
        members = route.members
        index = members.index(connection)
        last = members.pop()
        if index < len(members):
            members[index] = last
        slot = None
        if route.slots is not None:
            slot = route.slot_of(connection)
            if slot is not None:
                del route.by_slot[slot]
                route.slots.release(slot)
        if not members and not self._keep_empty(route):
            del self.routes[name]
        return len(members), slot

    def restore(self, remembered: Mapping[str, Mapping[str, int]]) -> None:
        """Slots saved before a restart: routes made from now on start from them."""
        self.remembered = {name: dict(slots) for name, slots in remembered.items()}

    def _remember(self, route: Route) -> None:
        snapshot = route.slots.snapshot()  # type: ignore[union-attr]  # a slot route
        if snapshot != self.remembered.get(route.name, {}):
            self.remembered[route.name] = snapshot
            self.remembered_changed = True

    @staticmethod
    def _keep_empty(route: Route) -> bool:
        # A dead slot's traffic is held or bounced by the policy, not sent
        # to the default route, while some identity may still come back.
        return route.slots is not None and route.policy.dead != "failover" \
            and bool(route.slots.known())
