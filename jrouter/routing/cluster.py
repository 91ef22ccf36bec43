"""Clustered names inside the router: who joins which slot, who gets a packet.

By default a name served by several connections places its users exactly
as jabberd2 does (``core.Router._pick``). A name with a policy from
``<clustering>`` (``policy.py``) is handled here: members claim stable slots
by instance identity (``_join``), each packet is placed by the policy
(``_choose``) and may be held for a dead slot or bounced, IQ replies can go
back to the member that asked, and the packets still queued for a member
that dies are routed again (``_redeliver``).

``ClusterRouting`` is a part of ``core.Router`` (a mixin): it uses the
router's route table, connections and bounce/delivery helpers. It must not
know about sockets or the clock (``now`` is handed in).
"""

from jrouter.routing.balance import SlotBusy, SlotsFull
from jrouter.wire.jid import parse_jid
from jrouter.routing.policy import DELIVER, HOLD, key_attribute, place, placement_key
from jrouter.routing.table import MULTI_FROM, SINGLE


class ClusterRouting:
    """The clustering half of the router."""

    def _join(self, connection, name, kind, alias_of=None):
        """Make ``connection`` a member of ``name``; returns (route, slot),
        or None when a slot policy has no slot left for it."""
        identity = self._identity(connection)
        try:
            route, mixed, slot = self.table.add(name, connection, kind, alias_of, identity)
        except SlotBusy as busy:
            route = self.table.routes[name]
            old = route.by_slot.get(busy.slot)
            if route.policy.replace == "half-open" and old is not None:
                # The same instance is back: its old connection is half-open.
                self.log.notice(f"[{name}] {connection.label} replaces {old.label} "
                                f"(instance '{busy.identity}')")
                old.kick("conflict", "replaced by a new connection of the same instance")
                self.disconnect(old, connection.last_activity)
                identity_now = identity
            else:
                identity_now = None        # an extra member, as jabberd2 allows
            try:
                route, mixed, slot = self.table.add(name, connection, kind, alias_of, identity_now)
            except SlotsFull:
                return self._refuse_full(connection, name)
        except SlotsFull:
            return self._refuse_full(connection, name)
        if mixed:
            self.log.error(f"Mixed route types for '{name}' bind request")
        connection.names[name] = kind
        if slot is not None:
            self._release_held(route, slot, connection)
        return route, slot

    def _replace_instance(self, name, connection):
        """A cluster instance reconnects while its old connection still holds
        its own name (an sm's <id>): under replace='half-open' the old
        connection is ended and the name is free again."""
        holder = self.table.routes[name].members[0]
        if holder is connection or holder.user != connection.user or self._identity(holder) != name:
            return False
        if not any(holder in route.members and route.policy.replace == "half-open"
                   for route in self.table.served()):
            return False
        self.log.notice(f"[{name}] {connection.label} replaces {holder.label} (instance '{name}')")
        holder.kick("conflict", "replaced by a new connection of the same instance")
        self.disconnect(holder, connection.last_activity)
        return True

    def _refuse_full(self, connection, name):
        self.log.notice(f"{connection.label} tried to bind '{name}', but all its slots are taken")
        return None

    @staticmethod
    def _identity(connection):
        """Who a member is across reconnections: an XEP-0114 component's
        header 'from', else the first name it bound without multi (an sm's
        <id>); None when it does not say."""
        if connection.legacy:
            return connection.stream_from
        for name, kind in connection.names.items():
            if kind == SINGLE:
                return name
        return None

    def _choose(self, sender, route, element, route_to, sender_key, origin, now):
        """The member a packet goes to under the name's clustering policy,
        or None when the policy holds or bounces it (done here)."""
        policy = route.policy
        child = element.child_attrs or {}
        if policy.track_iq:
            waiting = self._tracked_reply(route, element, child, now)
            if waiting is not None:
                return waiting
        choice = place(policy, placement_key(policy, self._key_address(route, child, route_to)),
                       *self._slots_of(route), self.randint)
        if choice.action == DELIVER:
            if route.slots is None:
                return route.members[choice.slot]
            return route.by_slot[choice.slot]
        if choice.action == HOLD:
            held = (sender, element, sender_key, origin)
            for packet in self.holds.hold(route.name, choice.slot, held, now):
                self._bounce_held(packet)
            return None
        if sender is not None:
            self._bounce(sender, element, "503", origin)
        return None

    @staticmethod
    def _slots_of(route):
        """(live, known) as place() wants them."""
        if route.slots is None:
            indices = range(len(route.members))
            return indices, indices
        return route.slots.live(), route.slots.known()

    @staticmethod
    def _key_address(route, child, route_to):
        attribute = key_attribute(route.policy, route.kind == MULTI_FROM)
        address = child.get(attribute)
        if address is None and attribute == "to":
            address = child.get("target")       # c2s -> sm session starts
        if address is None and route_to is not None:
            address = route_to.full
        return address

    def _release_held(self, route, slot, connection):
        """An instance took its slot back: what was held for it is delivered."""
        for sender, element, sender_key, origin in self.holds.release(route.name, slot):
            connection.deliver(self._bytes_for(connection, element, sender_key), element, sender_key)

    def _bounce_held(self, packet):
        sender, element, sender_key, origin = packet
        if sender is not None and sender in self.connections:
            self._bounce(sender, element, "503", origin)

    def expire(self, now):
        """Timers: bounce what a dead slot held too long; forget old IQs."""
        for name, slot, packets in self.holds.expired(now):
            self.log.notice(f"[{name}] slot {slot} did not come back in time: "
                            f"bouncing {len(packets)} held packets")
            for packet in packets:
                self._bounce_held(packet)
        self.iqs.expire(now)

    def _track_request(self, sender, element, from_):
        """Remember which member of a tracked cluster sent an IQ request."""
        if element.child_name is None or not element.child_name.endswith(" iq"):
            return
        child = element.child_attrs
        if child.get("type") not in ("get", "set") or child.get("id") is None:
            return
        route = self.table.routes.get(from_.domain)
        if route is None or not route.policy.track_iq or len(route.members) < 2:
            return
        self.iqs.remember(child["id"], _full(child.get("from")), _full(child.get("to")),
                          sender, sender.last_activity)

    def _tracked_reply(self, route, element, child, now):
        if element.child_name is None or not element.child_name.endswith(" iq") \
                or child.get("type") not in ("result", "error") or child.get("id") is None:
            return None
        member = self.iqs.take(child["id"], _full(child.get("to")), _full(child.get("from")), now)
        return member if member is not None and member in route.members else None

    def placement(self, name, jid_text):
        """Which member of ``name`` a stanza for (or, on a from-hashed
        route, from) ``jid_text`` goes to now; None when nothing serves the
        name or the choice would be random (an address without a node)."""
        route = self.table.routes.get(name)
        if route is None or not route.members:
            return None
        if len(route.members) == 1 and route.slots is None:
            return route.members[0]
        key = placement_key(route.policy, jid_text)
        if key is None:
            return None
        choice = place(route.policy, key, *self._slots_of(route), self.randint)
        if choice.action != DELIVER:
            return None
        return route.members[choice.slot] if route.slots is None else route.by_slot[choice.slot]

    def _redeliver(self, element, key, dead, now):
        """Route again a packet a dead member never got (no sender checks:
        they were made when it first came in); ``key`` is its sender's
        namespace context, as when it was first routed."""
        to = parse_jid(element.attrs.get("to") or "")
        route = self.table.routes.get(to.domain) if to is not None else None
        if route is None or (not route.members and route.slots is None):
            self.log.notice(f"[{dead.ip}, port={dead.port}] lost a queued packet for "
                            f"'{element.attrs.get('to')}': nobody serves it now")
            return
        target = self._choose(None, route, element, to, key, None,
                              dead.last_activity if now is None else now)
        if target is not None:
            target.deliver(self._bytes_for(target, element, key), element, key)


def any_tracking(policies):
    return policies is not None and any(p.track_iq for p in policies.policies())


def _full(address):
    """An address as IQ tracking compares it: the prepped full JID."""
    jid = None if address is None else parse_jid(address)
    return jid.full if jid is not None else (address or "")


def unsent_routes(connection):
    """The routes still queued for a connection that is going away and
    addressed to one of its names, as (route, sender key), taken out of its
    queues; they were kept with the bytes, so nothing is parsed again."""
    if not connection.names:
        return []
    return [(route, key) for route, key in connection.take_unsent()
            if _domain(route.attrs.get("to")) in connection.names]


def _domain(address):
    jid = None if address is None else parse_jid(address)
    return None if jid is None else jid.domain
