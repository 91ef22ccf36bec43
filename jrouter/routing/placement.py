"""The one place that decides which member of a name gets a packet.

Owns: the per-name clustering policies (``policy.PolicyTable``), the packets
held for dead slots (``balance.HoldQueue``), IQ tracking
(``balance.IqTracker``) and the random function jabberd2's placement needs.
Routing a packet (``target``) and the operator's ``/placement`` question
(``member_for``) go through the same ``decide``, so the two cannot drift.

Must not know: sockets, the clock (``now`` is handed in), how a packet is
delivered, held packets' contents or how a bounce looks (the router does
that with what ``target`` and ``expire`` return).

How a packet is placed (protocol §6.3, and policy.py for the policies):

1. An IQ result or error for a name with ``track-iq`` goes to the member
   that sent the request, if it is still a member.
2. The address that is hashed (``address``): under jabberd2's behaviour the
   payload's ``to`` (or ``target``) on a name bound with ``multi``, its
   ``from`` on an XEP-0114 cluster, and the route's ``to`` otherwise (which
   jabberd2 logs as an error); under a policy, the policy's attribute.
3. Under a policy with ``affinity`` (affinity.py, protocol §6.9): the member
   holding that key's session, if the name's affinity table knows one and
   it is still a member.
4. ``decide``: the policy's algorithm over the live (and reserved) slots.

Affinity learns in ``learn`` (every unicast, when some policy has it):
session starts and ends the sm reports, and for ``traffic`` every packet
placed or sent by a member.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Hashable, Mapping, Optional, Union

from jrouter.routing.affinity import DEFAULT_IDLE, NONE, SESSION, AffinityTable
from jrouter.routing.balance import HoldQueue, IqTracker
from jrouter.routing.policy import (BOUNCE, DEFAULT_POLICY, DELIVER, HOLD, Choice, home_slot, key_attribute,
                                    place, placement_key)
from jrouter.routing.table import MULTI_FROM, MULTI_TO
from jrouter.wire.jid import parse_jid

if TYPE_CHECKING:
    from jrouter.routing.policy import PolicyTable
    from jrouter.routing.router import HeldPacket, Log
    from jrouter.routing.table import Route, RouteTable
    from jrouter.routing.member import RouteMember
    from jrouter.wire.jid import JID
    from jrouter.wire.xmlstream import Element

__all__ = ["Placement", "Choice", "DELIVER", "HOLD", "BOUNCE"]


class Placement:
    """Policies, holds and IQ tracking for every clustered name."""

    def __init__(self, policies: Optional[PolicyTable], randint: Callable[[int], int], log: Log,
                 hold_bytes: int = 0) -> None:
        self.policies = policies          # policy.PolicyTable or None (jabberd2's behaviour)
        self.randint = randint
        self.log = log
        self.holds = HoldQueue(limit_bytes=hold_bytes)   # io.limits.queue per slot
        self.iqs = IqTracker()
        self.tracking = _any_tracking(policies)
        self.affinities: dict[str, AffinityTable] = {}    # name -> its table (affinity.py)
        self.learning = _any_affinity(policies)
        #: Several nodes: announce(name, key, member) tells the other nodes of
        #: a traffic entry (affinity.py; set by the cluster view before routing starts).
        self.announce: Optional[Callable[[str, Hashable, RouteMember], None]] = None

    def reconfigure(self, policies: Optional[PolicyTable]) -> None:
        """New policies (SIGHUP); they apply to names bound from now on."""
        self.policies = policies
        self.tracking = _any_tracking(policies)
        self.learning = _any_affinity(policies) or bool(self.affinities)

    def affinity(self, route: Route) -> Optional[AffinityTable]:
        """The name's affinity table (made when first needed), None without affinity."""
        policy = route.policy
        if policy.affinity == NONE:
            return None
        table = self.affinities.get(route.name)
        if table is None or table.mode != policy.affinity:
            idle = policy.affinity_idle or DEFAULT_IDLE[policy.affinity]
            announce = self.announce
            name = route.name
            told = None if announce is None else (lambda key, member: announce(name, key, member))
            table = self.affinities[name] = AffinityTable(policy.affinity, idle,
                                                          policy.affinity_max, told)
        return table

    def noticed(self, route: Route, key: str, member: RouteMember, now: float) -> None:
        """Another node's traffic entry for ``key`` on ``route``'s ``member``."""
        if member in route.members:
            affinity = self.affinity(route)
            if affinity is not None:
                affinity.noticed(key, member, now)

    # -- routing -------------------------------------------------------------

    def target(self, route: Route, element: Element, route_to: Optional[JID],
               now: float) -> Union[RouteMember, Choice]:
        """The member that gets ``element`` (a ``<route/>`` for ``route_to``),
        or a ``Choice`` to HOLD or BOUNCE it for a dead slot."""
        members = route.members
        if route.slots is None and len(members) == 1:
            return members[0]             # jabberd2 asks neither hash nor rand() then
        child = element.child_attrs or {}
        if route.policy.track_iq:
            waiting = self._tracked_reply(route, element, child, now)
            if waiting is not None:
                return waiting
        key = placement_key(route.policy, self.address(route, element, route_to))
        affinity = self.affinity(route) if self.learning else None
        if affinity is not None and key is not None:
            holder = affinity.lookup(key, now, members.__contains__)
            if holder is not None:
                return holder
        choice = self.decide(route, key)
        if choice.action != DELIVER:
            return choice
        # A DELIVER choice always names its slot (policy.place).
        member = members[choice.slot] if route.slots is None else route.by_slot[choice.slot]  # type: ignore[index]
        if affinity is not None and key is not None:
            affinity.placed(key, member, now)
        return member

    def learn(self, table: RouteTable, sender: RouteMember, element: Element, from_: JID,
              now: float) -> None:
        """What a unicast from ``sender`` says of where sessions live: an sm's
        session started or ended (``session``), or a member talking to a
        user (``traffic``)."""
        child = element.child_attrs
        if child is None:
            return
        if element.child_name == SC_SESSION:
            self._learn_session(table, sender, child, now)
            return
        route = table.routes.get(from_.domain)
        if route is None or route.policy.affinity == NONE or sender not in route.members:
            return
        # The member talks to a user: the user is in the attribute opposite
        # to the one packets for the name are placed by.
        placed_by = key_attribute(route.policy, route.kind == MULTI_FROM)
        key = placement_key(route.policy, child.get("from" if placed_by == "to" else "to"))
        affinity = self.affinity(route)
        if key is not None and affinity is not None:
            affinity.heard_from(key, sender, now)

    def _learn_session(self, table: RouteTable, sender: RouteMember, child: Mapping[str, str],
                       now: float) -> None:
        """An sm's session-control reply (docs §6.9): ``started`` names the
        user (``target``) and the sm's session id (``sc:sm``), ``ended`` the
        id alone; c2s's own ``start``/``end`` and refusals are not looked at."""
        action = child.get("action")
        session = child.get(SC_SM)
        if action == "started":
            target = child.get("target")
            jid = _jid(target)
            route = None if jid is None else table.routes.get(jid.domain)
            if route is None or route.policy.affinity != SESSION or sender not in route.members:
                return
            key = placement_key(route.policy, target)
            affinity = self.affinity(route)
            if key is not None and affinity is not None:
                affinity.session_started(key, sender, session or target, now)  # type: ignore[arg-type]
        elif action == "ended" and session is not None and SC_FAILED not in child:
            for affinity in self.affinities.values():
                if affinity.mode == SESSION:
                    affinity.session_ended(sender, session, now)

    def address(self, route: Route, element: Element, route_to: Optional[JID]) -> Optional[str]:
        """The address whose JID places ``element`` on ``route``."""
        child = element.child_attrs or {}
        policy = route.policy
        if policy is DEFAULT_POLICY:
            return self._jabberd2_address(route, element, child, route_to)
        attribute = key_attribute(policy, route.kind == MULTI_FROM)
        address = child.get(attribute)
        if address is None and attribute == "to":
            address = child.get("target")       # c2s -> sm session starts
        if address is None and route_to is not None:
            address = route_to.full
        return address

    def _jabberd2_address(self, route: Route, element: Element, child: Mapping[str, str],
                          route_to: Optional[JID]) -> Optional[str]:
        """What jabberd2 2.7 hashes, with its error lines (protocol §6.3)."""
        if route.kind == MULTI_TO:
            address = child.get("to") or child.get("target")
            if address is not None:
                return address
            self.log.error("Cannot get destination for multiple route: "
                           + element.raw.decode("utf-8", "replace"))
        elif route.kind == MULTI_FROM:
            address = child.get("from")
            if address is not None:
                return address
            self.log.error("Cannot get source for multiple route: "
                           + element.raw.decode("utf-8", "replace"))
        else:
            self.log.error(f"Multiple components bound to single component route '{route.name}'")
        return None if route_to is None else route_to.full

    def decide(self, route: Route, key: Optional[str]) -> Choice:
        """Where a packet with placement key ``key`` goes on ``route`` now
        (a random member for a key of None, as jabberd2)."""
        if route.slots is None:
            indices = range(len(route.members))
            return place(route.policy, key, indices, indices, self.randint)
        return place(route.policy, key, route.slots.live(), route.slots.known(), self.randint)

    # -- the operator's question ---------------------------------------------

    def member_for(self, route: Route, address: str) -> Optional[RouteMember]:
        """The member a stanza for (on a from-hashed name, from) ``address``
        goes to now; None when the choice would be random or nobody gets it."""
        return self.explain(route, address)[0]

    def explain(self, route: Route, address: str) -> tuple[Optional[RouteMember], str]:
        """``member_for`` and why, in words for the operator: the only member,
        affinity, the hash (jabberd2's), the home slot, a failover, random,
        or held or bounced for a dead slot."""
        members = route.members
        if route.slots is None and len(members) == 1:
            return members[0], "the only member"
        key = placement_key(route.policy, address)
        if key is None:
            return None, "random: the address has no node (each packet goes to a random member)"
        holder = self.affinity_holder(route, key)
        if holder is not None:
            return holder, f"affinity ({route.policy.affinity}): the user's session is there"
        choice = self.decide(route, key)
        if route.slots is None:
            return (members[choice.slot] if choice.action == DELIVER else None,  # type: ignore[index]
                    f"hash: jabberd2's, modulo the {len(members)} members in bind order")
        home = home_slot(route.policy, key, route.slots.known() or route.slots.live())
        if choice.action != DELIVER:
            verb = "held until it returns" if choice.action == HOLD else "bounced"
            return None, f"slot {home} is down: {verb} (dead='{route.policy.dead}')"
        member = route.by_slot[choice.slot]  # type: ignore[index]
        if choice.slot == home:
            return member, f"hash: home slot {home} ({route.policy.algorithm})"
        return member, f"failover: home slot {home} is down, slot {choice.slot} serves it"

    def affinity_holder(self, route: Route, key: str) -> Optional[RouteMember]:
        """The live member the name's affinity table gives ``key``, if any (untouched)."""
        affinity = self.affinities.get(route.name)
        holder = None if affinity is None else affinity.member_of(key)
        return holder if holder is not None and holder in route.members else None

    # -- holds ---------------------------------------------------------------

    def hold(self, route: Route, slot: int, packet: HeldPacket, now: float) -> list[HeldPacket]:
        """Keep ``packet`` for a dead slot; returns what no longer fits (bounce it)."""
        return self.holds.hold(route.name, slot, packet, now, size=_held_size(packet))

    def member_left(self, route: Route, slot: Optional[int], now: float,
                    member: Optional[RouteMember] = None) -> None:
        """A member gave its slot up: under dead='hold' its packets wait;
        its affinity entries go (their users are placed afresh)."""
        if slot is not None and route.policy.dead == "hold":
            self.holds.down(route.name, slot, now, route.policy.hold_seconds)
        affinity = self.affinities.get(route.name)
        if affinity is not None and member is not None:
            affinity.member_left(member)

    def member_back(self, route: Route, slot: int) -> list[HeldPacket]:
        """An instance took its slot back: the packets held for it."""
        return self.holds.release(route.name, slot)

    def expire(self, now: float) -> list[tuple[Hashable, int, list[HeldPacket]]]:
        """Forget old IQs and idle affinity; return (name, slot, packets) held past their grace."""
        self.iqs.expire(now)
        for affinity in self.affinities.values():
            affinity.expire(now)
        return self.holds.expired(now)

    # -- IQ tracking (policy track-iq) ---------------------------------------

    def remember_request(self, table: RouteTable, sender: RouteMember, element: Element, from_: JID,
                         now: float) -> None:
        """Remember which member of a tracked cluster sent an IQ request."""
        if not self.tracking or element.child_name is None or not element.child_name.endswith(" iq"):
            return
        child: dict[str, str] = element.child_attrs  # type: ignore[assignment]  # it has a child
        if child.get("type") not in ("get", "set") or child.get("id") is None:
            return
        route = table.routes.get(from_.domain)
        if route is None or not route.policy.track_iq or len(route.members) < 2:
            return
        self.iqs.remember(child["id"], _full(child.get("from")), _full(child.get("to")), sender, now)

    def _tracked_reply(self, route: Route, element: Element, child: Mapping[str, str],
                       now: float) -> Optional[RouteMember]:
        if element.child_name is None or not element.child_name.endswith(" iq") \
                or child.get("type") not in ("result", "error") or child.get("id") is None:
            return None
        member = self.iqs.take(child["id"], _full(child.get("to")), _full(child.get("from")), now)
        return member if member is not None and member in route.members else None


#: The session-control element c2s and sm exchange (jabberd2's sm/sm.c, c2s/sm.c).
SC_SESSION = "http://jabberd.jabberstudio.org/ns/session/1.0 session"
SC_SM = "http://jabberd.jabberstudio.org/ns/session/1.0 sm"          # the sm's session id
SC_FAILED = "http://jabberd.jabberstudio.org/ns/session/1.0 failed"


def _any_affinity(policies: Optional[PolicyTable]) -> bool:
    return policies is not None and any(p.affinity != NONE for p in policies.policies())


def _jid(address: Optional[str]) -> Optional[JID]:
    return None if address is None else parse_jid(address)


def _any_tracking(policies: Optional[PolicyTable]) -> bool:
    return policies is not None and any(p.track_iq for p in policies.policies())


def _full(address: Optional[str]) -> str:
    """An address as IQ tracking compares it: the prepped full JID."""
    jid = None if address is None else parse_jid(address)
    return jid.full if jid is not None else (address or "")


#: What a held packet costs beyond its bytes: its Element and the queue's entry.
HELD_OVERHEAD = 512


def _held_size(packet: HeldPacket) -> int:
    return len(packet[1].raw) + HELD_OVERHEAD
