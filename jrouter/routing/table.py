"""The route table: which connections serve which names.

Owns the names -> members mapping, the one default route, the log sinks,
and for clustered names under a slot policy (``policy.py``) which member
holds which slot.

Membership follows jabberd2 exactly by default (protocol §6.2): members are kept
in bind order, the route's kind is fixed by its first binder, and removing
a member moves the last member into its slot (swap-remove), because
jabberd2's cluster placement (``balance.jabberd2_pick``) depends on that
order. A name whose policy uses slots (``consistent`` or ``slots``) instead
gives each member a stable slot id from its identity, so placement does not
depend on connection order; such a route outlives its last member while a
dead slot's traffic is to be held or bounced rather than fall through to the
default route.

It must not know about sockets, XML or how a member is chosen for a packet.
"""

from jrouter.routing.balance import SlotTable
from jrouter.routing.policy import DEFAULT_POLICY

SINGLE = "single"
MULTI_TO = "multi-to"          # jabberd2 components bound with multi: hash the stanza 'to'
MULTI_FROM = "multi-from"      # XEP-0114 components: hash the stanza 'from'


class Route:
    """One routable name and the connections bound to it."""

    __slots__ = ("name", "kind", "members", "alias_of", "policy", "slots", "by_slot")

    def __init__(self, name, kind, alias_of=None, policy=DEFAULT_POLICY):
        self.name = name
        self.kind = kind
        self.members = []
        self.alias_of = alias_of
        self.policy = policy
        # Slot algorithms only: slot ids by identity, and slot -> connection.
        self.slots = SlotTable(policy.slots) if policy.algorithm != "jabberd2" else None
        self.by_slot = {}

    def slot_of(self, connection):
        for slot, member in self.by_slot.items():
            if member is connection:
                return slot
        return None

    def __repr__(self):
        return f"Route({self.name!r}, {self.kind}, {len(self.members)} members)"


class RouteTable:
    """Names to routes, plus the default route and the log sinks."""

    def __init__(self, policies=None):
        self.routes = {}
        self.default_name = None
        self.log_sinks = {}         # name -> connection
        self.policies = policies    # policy.PolicyTable, or None: jabberd2's behaviour

    def get(self, name):
        return self.routes.get(name)

    def __contains__(self, name):
        """Whether anything serves ``name`` now (a kept route without
        members does not count)."""
        route = self.routes.get(name)
        return route is not None and bool(route.members)

    def served(self):
        """The routes with at least one member."""
        return [route for route in self.routes.values() if route.members]

    def add(self, name, connection, kind, alias_of=None, identity=None):
        """Append ``connection`` to ``name``'s members; return (route, mixed,
        slot): ``mixed`` says the route already had another kind, ``slot`` is
        the member's slot under a slot policy (else None). Raises
        balance.SlotBusy / SlotsFull when no slot can be had."""
        route = self.routes.get(name)
        mixed = False
        if route is None:
            policy = self.policies.policy_for(name) if self.policies is not None else DEFAULT_POLICY
            route = Route(name, kind, alias_of, policy)
        elif route.kind != kind and route.members:
            mixed = True
        slot = None
        if route.slots is not None:
            slot = route.slots.claim(identity)
            route.by_slot[slot] = connection
        self.routes[name] = route
        route.members.append(connection)
        return route, mixed, slot

    def remove(self, name, connection):
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

    @staticmethod
    def _keep_empty(route):
        # A dead slot's traffic is held or bounced by the policy, not sent
        # to the default route, while some identity may still come back.
        return route.slots is not None and route.policy.dead != "failover" \
            and bool(route.slots.known())
