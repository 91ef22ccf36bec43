"""Slot numbers agreed across the nodes of a cluster (issue 13, docs/cluster.md §8).

Owns: for a name under a slot policy (``consistent``, ``slots``), which slot
a local member takes (``choose``, from the cluster's slot keys and the
members present, as one router's SlotTable would choose), what follows
etcd's answer (``claimed``), and each route's SlotTable set from the slot
keys after every batch of the mirror's changes (``sync``).

Theory: ``slots/<name>/<slot>`` names the member that took the slot last and
the identity it is kept for, and outlives the member. A member joins only
once the shell has written that key and its member key in one txn, on
condition that the slot key's mod_revision is still the one chosen from,
so two nodes never give one slot to two members; every node reads a
remote member's slot from the key that names it. So all nodes number
members alike at every revision.

Must not know: etcd, sockets, the clock (``now`` is handed in).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional, Union, cast

from jrouter.cluster.mirror import MemberRef
from jrouter.routing.balance import SlotBusy, SlotsFull, SlotTable
from jrouter.routing.cluster_effects import ClaimSlot, ReleaseClaim, SlotChoice, UnregisterMember

if TYPE_CHECKING:
    from jrouter.routing.cluster_view import ClusterView, RemoteMember
    from jrouter.routing.member import RouteMember
    from jrouter.wire.connection import Connection


class ClusterSlots:
    """The slot claims of one node's view."""

    def __init__(self, view: ClusterView) -> None:
        self.view = view
        self.router = view.router
        # (connection, name) waiting for a slot; and while it joins, already in etcd
        self._claims: set[tuple[Connection, str]] = set()
        self._registered: set[tuple[Connection, str]] = set()

    def waiting(self, connection: Connection, name: str) -> bool:
        """Whether ``connection`` waits for a slot of ``name``."""
        return (connection, name) in self._claims

    def registered(self, connection: Connection, name: str) -> bool:
        """Whether the member key of this join was written with its slot (once)."""
        if (connection, name) in self._registered:
            self._registered.discard((connection, name))
            return True
        return False

    def needs_slot(self, name: str) -> bool:
        """Whether a member of ``name`` must take its slot in etcd first."""
        route = self.router.table.routes.get(name)
        if route is not None:
            return route.slots is not None
        policies = self.router.table.policies
        return policies is not None and policies.policy_for(name).algorithm != "jabberd2"

    def claim(self, connection: Connection, name: str, kind: str,
                   resume: Callable[[Optional[int], Optional[str], float], None]) -> None:
        """A local member of a name under a slot policy waits for its slot."""
        identity = connection.protocol_port.identity(connection)
        self._claims.add((connection, name))
        self.view._effect(ClaimSlot(connection, name, self.view.member_id(connection), kind, identity, resume))

    def choose(self, claim: ClaimSlot, now: float) -> Union[SlotChoice, str]:
        """The slot a ClaimSlot takes, from the cluster's slot keys and the
        members present; or the refusal ("409": none is left). A live
        instance of the same identity on this node, under
        replace='half-open', is ended first (it is half-open: protocol §6.5);
        one on another node makes this one an extra identity-less member."""
        name, identity = claim.name, claim.identity
        held = self.view.mirror.slot_of(name, MemberRef(self.view.node, claim.member))
        if held is not None:
            return SlotChoice(held, 0, held=True)
        slots = self._table(name)
        policy = self._policy(name)
        try:
            slot = slots.choose(identity)
        except SlotBusy as busy:
            route = self.router.table.routes.get(name)
            old = route.by_slot.get(busy.slot) if route is not None else None
            if policy.replace == "half-open" and old is not None and old in self.router.connections:
                self.router.log.notice(f"[{name}] {claim.connection.label} replaces {old.label} "
                                       f"(instance '{busy.identity}')")
                old.kick("conflict", "replaced by a new connection of the same instance")
                self.router.disconnect(old, now)
                return self.choose(claim, now)
            send_replace = self.view.send_replace
            if policy.replace == "half-open" and old is not None and send_replace is not None \
                    and old.protocol_port is self.view.port \
                    and send_replace(*cast("RemoteMember", old).ref):
                self.router.log.notice(f"[{name}] {claim.connection.label} replaces {old.label} "
                                       f"(instance '{busy.identity}')")
                return SlotChoice(busy.slot, 0, replacing=cast("RemoteMember", old).ref)
            claim.identity = identity = None       # an extra member, as jabberd2 allows
            try:
                slot = self._table(name).choose(None)
            except SlotsFull:
                return "409"
        except SlotsFull:
            return "409"
        record = self.view.mirror.slots(name).get(slot)
        return SlotChoice(slot, record.mod_revision if record is not None else 0)

    def claimed(self, claim: ClaimSlot, slot: Optional[int], refusal: Optional[str],
                     now: float) -> None:
        """etcd's answer to a ClaimSlot: the member joins in ``slot`` (its
        member key is in etcd already), or is refused."""
        connection, name = claim.connection, claim.name
        self._claims.discard((connection, name))
        gone = connection not in self.router.connections or connection.closing
        if refusal is None and gone:
            self.view._effect(UnregisterMember(name, claim.member))
            return
        if refusal is not None:
            # A claim of unique/<name> or the default route made for this bind goes too.
            self.view._effect(ReleaseClaim(name, claim.member, unique=True, default=True))
            if refusal == "409":
                self.router.log.notice(f"{connection.label} tried to bind '{name}', but all its "
                                       "slots are taken in the cluster")
            elif not gone:
                self.router.log.notice(f"{connection.label} tried to bind '{name}', but the "
                                       "cluster's table (etcd) did not answer in time")
            if gone:
                return
        else:
            self._registered.add((connection, name))
        try:
            claim.resume(slot, refusal, now)
        finally:
            self._registered.discard((connection, name))
        if refusal is None and name not in connection.names:
            self.view._effect(UnregisterMember(name, claim.member))

    def _policy(self, name: str) -> Any:
        route = self.router.table.routes.get(name)
        if route is not None:
            return route.policy
        return self.router.table.policies.policy_for(name)      # type: ignore[union-attr]

    def _table(self, name: str) -> SlotTable:
        """``name``'s slots as the cluster holds them, with the members present here."""
        slots = SlotTable(self._policy(name).slots)
        live: set[int] = set()
        for member in self.view.mirror.members(name):
            number = self.view.mirror.slot_of(name, member.ref)
            if number is not None and member.node != self.view.node:   # ours: as the route has them
                live.add(number)
        route = self.router.table.routes.get(name)
        by_slot = route.by_slot if route is not None else {}
        slots.reset(self._reserved(name, by_slot), live.union(by_slot))
        return slots

    def sync(self, name: str) -> None:
        """A route's SlotTable as the cluster's slot keys say, with its members."""
        route = self.router.table.routes.get(name)
        if route is None or route.slots is None:
            return
        route.slots.reset(self._reserved(name, route.by_slot), route.by_slot)

    def _reserved(self, name: str, by_slot: dict[int, RouteMember]) -> dict[int, Optional[str]]:
        """Slot -> the identity it is kept for, in slot order (the same on
        every node): the slot keys', and a member's own for a slot whose key
        the watch has not brought yet."""
        records = self.view.mirror.slots(name)
        reserved = {number: record.identity for number, record in records.items()}
        for number, holder in by_slot.items():
            if number not in records:
                reserved[number] = holder.protocol_port.identity(holder)
        return dict(sorted(reserved.items()))
