"""The route table as one node of a cluster sees it (issue 13).

Owns: members that live on other nodes (``RemoteMember``), putting them in
and out of this node's ``RouteTable`` as the cluster table's mirror changes
(``jrouter/cluster/mirror.py``), the one member order every node agrees on,
the advertisements local components get for names served elsewhere, the
cluster's default route, and packets other nodes forwarded to a member here.

Theory of operation
-------------------
Every node keeps the whole table: its own connections, and for every member
on another node a ``RemoteMember`` that stands in for it. Routing does not
tell them apart: ``Router.unicast`` asks placement for a member and delivers
to it; a remote member's ``deliver`` hands the packet to the shell's peer
link to its node (``forward``), stamped with the member the sending node
chose, so that the receiving node never places it again.

One router places a ``multi`` name's packets by the order its members bound
in (jabberd2's placement, protocol §6.3) and moves the last member into a
leaving one's place. Nodes see binds at different times, so in a cluster the
order is the table's: by the revision each member's key was created in
etcd, which every node reads the same (``TableMirror.members``). After each
batch of changes the members of every name it touched are put in that
order. A local member whose key etcd has not confirmed yet comes last (it
is placed in order once the watch brings its key, a few milliseconds later).

This node's own binds go into the cluster table through effects the shell
carries out (``take_effects``): a member key for every name a local
connection joins (``RegisterMember``, ``UnregisterMember``), and, before a
bind that must be unique cluster-wide (a name without ``multi``, a default
route) goes ahead, a claim (``Claim``): the bind waits for etcd's answer
(``claimed``), which is what makes two nodes binding one name at once get
one success and one 409 (docs/cluster.md, §8).

Under a slot policy (``consistent``, ``slots``) the slot numbers are the
cluster's: a member joins only once etcd gave it its slot (``ClaimSlot``;
``cluster_slots.py`` chooses it and the shell writes it). Each slot key
names the member holding it and the identity it is kept for, outlives the
member, and is read by every node alike: a remote member's slot is the one
whose key names it, and each route's SlotTable is set from the slot keys
after every batch. So every node finds the same member in the same slot at
the same revision, and an instance back on any node gets its slot again.

Packets for a member on another node go to the shell's peer link with the
member stamped (``Forward``). A link that is not open, or that went down
with packets the socket never took, leaves them here, held for that node
(bounded): they go out when the link is back, or, once the member has left
the table (its node's lease expired), they are placed again by the name's
policy through the router's redelivery. A packet another node forwarded is
delivered to the member it names; if that member is gone it is placed again
here, one hop further, never past ``<cluster><hops>``.

Must not know: sockets, etcd, the clock (``now`` is handed in), the peer
link's bytes (``forward`` takes a route and its member).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable, Optional

from jrouter.cluster.mirror import (DefaultChanged, LogSinkChanged, Member, MemberJoined, MemberLeft,
                                    MemberRef, SlotsChanged, TableMirror)
from jrouter.routing.accept import WrappedRoute
from jrouter.routing.cluster_effects import (Claim, ClaimSlot, Effect, HeldName, LogSinkKey,
                                             RegisterMember, ReleaseClaim, SlotChoice, UnregisterMember)
from jrouter.routing.cluster_slots import ClusterSlots
from jrouter.routing.placement import HOLD, Choice
from jrouter.routing.table import SINGLE
from jrouter.wire.connection import NS_COMPONENT, Connection
from jrouter.wire.counters import Counters
from jrouter.wire.jid import parse_jid

if TYPE_CHECKING:
    from jrouter.cluster.mirror import Change
    from jrouter.routing.member import RouteMember
    from jrouter.routing.router import Router
    from jrouter.wire.connection import ContextKey
    from jrouter.wire.xmlstream import Element

#: forward(node, data, member, hops, tag, as_sent): queue a route's bytes for
#: a member on another node on the peer link to it; False when no link is
#: open (the packet is not taken). ``tag`` comes back with it if the link
#: loses it; ``as_sent``: an XEP-0114 stanza its member gets as it was sent.
Forward = Callable[[str, bytes, str, int, "Optional[Routed]", bool], bool]
#: broadcast(data, hops): a broadcast route's bytes to every other node.
Broadcast = Callable[[bytes, int], None]
#: session_notice(data, member): a session-control route a local member
#: sent, to every other node, to learn from (docs/cluster.md §8, Affinity).
SessionNoticeOut = Callable[[bytes, str], None]


# The effects (cluster_effects.py) are named here too, where the shell and tests look for them.
__all__ = ["ClusterView", "RemoteMember", "RemotePort", "RegisterMember", "UnregisterMember",
           "LogSinkKey", "Claim", "ClaimSlot", "SlotChoice", "ReleaseClaim", "HeldName", "Effect"]

#: A packet as routing keeps it to route again: (route, its sender's key, sender).
Routed = tuple["Element", "Optional[ContextKey]", "Optional[Connection]"]


class RemotePort:
    """The protocol port of members on other nodes, as routing uses ports:
    what bytes a packet for one becomes (the route itself: the node it goes
    to hands it to the member's own port), and the member's identity."""

    advertised = False          # remote members hear advertisements from their own node

    def __init__(self, view: ClusterView, plain: ContextKey) -> None:
        self.view = view
        self.plain = plain      # a jabberd2 component's context with nothing more declared

    def outbound(self, target: RemoteMember, route: Element, key: Optional[ContextKey]) -> bytes:
        """The route as it must cross: bytes that mean on a plain component
        stream what they meant on the sender's (docs/cluster.md §3)."""
        if key is None or key == self.plain:
            return route.raw
        from lxml import etree

        return etree.tostring(route.tree())

    @staticmethod
    def identity(member: RemoteMember) -> Optional[str]:
        return member.identity


class RemoteMember:
    """A member bound on another node: what routing needs of a connection."""

    __slots__ = ("ref", "identity", "names", "label", "ip", "port", "counters", "protocol_port",
                 "user")

    def __init__(self, member: Member, port: RemotePort) -> None:
        self.ref = member.ref
        self.identity = member.identity
        self.names: dict[str, str] = {}          # name -> kind, as Connection.names
        self.label = f"[node {member.node}, member {member.id}]"
        self.ip = f"node {member.node}"          # for the "online" log line
        self.port = 0
        self.user = None
        self.counters = Counters()
        self.protocol_port = port

    def deliver(self, data: bytes, route: Optional[Element] = None,
                key: Optional[ContextKey] = None, sender: Optional[Connection] = None) -> None:
        """Send a routed packet on to the member's node: ``data`` is the
        route as it crosses (``RemotePort.outbound``)."""
        self.counters.packets_out += 1
        if route is not None:
            self.protocol_port.view.forward(self, data, (route, key, sender))

    def send(self, data: bytes) -> None:
        """Advertisements and other router-made bytes: its own node sends them."""

    def __repr__(self) -> str:
        return f"RemoteMember{self.label}"


class _Waiting:
    """Packets for one node's members that its link did not take, oldest first."""

    __slots__ = ("packets", "size", "sequence")

    def __init__(self) -> None:
        # member, data, hops, routed, and its number on the lost link `sequence` (0: none)
        self.packets: deque[tuple[str, bytes, int, Routed, int]] = deque()
        self.size = 0
        self.sequence = ""


class ClusterView:
    """This node's part in the cluster's one route table."""

    def __init__(self, router: Router, node: str, mirror: TableMirror,
                 forward: Forward, broadcast: Optional[Broadcast] = None,
                 max_hops: int = 2, hold_limit: int = 16 << 20,
                 session_notice: Optional[SessionNoticeOut] = None) -> None:
        self.router = router
        self.node = node
        self.mirror = mirror
        self.send_forward = forward
        self.send_broadcast = broadcast
        self.send_session_notice = session_notice
        #: send_replace(node, member): ask ``node`` to end its member (False: no link)
        self.send_replace: Optional[Callable[[str, str], bool]] = None
        #: send_affinity_notice(name, key, node, member): to every other node,
        #: a traffic-affinity entry (affinity.py): made, moved, or refreshed
        self.send_affinity_notice: Optional[Callable[[str, str, str, str], None]] = None
        router.placement.announce = self._affinity_entry
        self._replacing: dict[tuple[Connection, str], bool] = {}
        self.max_hops = max_hops
        self.hold_limit = hold_limit          # bytes held for one node whose link is not open
        self.port = RemotePort(self, router.output_context(NS_COMPONENT))
        self.remote: dict[MemberRef, RemoteMember] = {}
        # This node's own members: its connections by member id, and back.
        self.local: dict[str, Connection] = {}
        self.ids: dict[Connection, str] = {}
        self._next_id = 0
        self.run = ""           # set by the shell: this run's lease, so ids never repeat
        self.effects: list[Effect] = []
        self.on_effects: Callable[[], None] = _nothing
        # Slot numbers under slot policies, agreed in etcd (cluster_slots.py).
        self.slots = ClusterSlots(self)
        self.waiting: dict[str, _Waiting] = {}
        self.hops_in = 0        # while a forwarded packet is placed again: the hops it crossed
        self.not_resent = 0     # held routes a node's hello said it had read on the lost link
        # packets_in: routes other nodes sent here; drops: none could take
        # it, or past the hop limit; bounces: more held for a node than allowed
        self.counters = Counters()
        # The shell's part of the status page (agent, links), as JSON-ready data.
        self.shell_status: Callable[[], dict[str, Any]] = dict

    # -- local members -------------------------------------------------------

    def member_id(self, connection: Connection) -> str:
        """The id ``connection`` has in the cluster table (made on first use)."""
        member = self.ids.get(connection)
        if member is None:
            self._next_id += 1
            member = f"{self.run}.{self._next_id}" if self.run else str(self._next_id)
            self.ids[connection] = member
            self.local[member] = connection
        return member

    def forget(self, connection: Connection) -> None:
        member = self.ids.pop(connection, None)
        if member is not None:
            del self.local[member]
        if self._replacing and connection not in self.router.connections:   # gone: its asks too
            for key in [key for key in self._replacing if key[0] is connection]:
                del self._replacing[key]

    def joined(self, connection: RouteMember, name: str, kind: str) -> None:
        """A connection of this node joined ``name`` (Membership.join): its
        member key (put already with a slot it claimed)."""
        if not isinstance(connection, Connection):      # a RemoteMember: its node's
            return
        if self.slots.registered(connection, name):
            return
        identity = connection.protocol_port.identity(connection)
        self._effect(RegisterMember(name, self.member_id(connection), kind, identity))

    def left(self, connection: RouteMember, name: str, kind: Optional[str], default: bool,
             sink: bool = False) -> None:
        """A connection of this node left ``name``: its keys go; its claims
        (a name without multi, the default route it held) are released."""
        if not isinstance(connection, Connection):      # a RemoteMember: its node's
            return
        member = self.ids.get(connection)
        if member is None:
            return
        if sink:
            self._effect(LogSinkKey(name, member, bound=False))
        self._effect(UnregisterMember(name, member))
        if kind == SINGLE or default:
            self._effect(ReleaseClaim(name, member, unique=kind == SINGLE, default=default))
        if not connection.names:
            self.forget(connection)     # a bind after this is a new member

    def claim(self, connection: Connection, name: str, unique: bool, default: bool,
              resume: Callable[[Optional[str], float], None]) -> None:
        """A bind that must be unique in the cluster waits for etcd (``claimed``)."""
        replacing = self._replacing.pop((connection, name), False)
        self._effect(Claim(connection, name, self.member_id(connection), unique, default, resume,
                           replacing))

    def replace_remote(self, connection: Connection, name: str, holder: RemoteMember) -> bool:
        """``connection`` is a new connection of the instance ``holder`` is,
        on another node (replace='half-open'): that node is asked to end
        it, and ``connection``'s claim of ``name`` waits for the name to be
        free. False when no link to its node is open (the bind is refused)."""
        node, member = holder.ref
        if self.send_replace is None or not self.send_replace(node, member):
            return False
        self._replacing[(connection, name)] = True
        return True

    def replace_requested(self, node: str, member: str, now: float) -> None:
        """Another node has a new connection of the instance our ``member`` is: it ends."""
        target = self.local.get(member)
        if target is None or target.closing:
            return
        self.router.log.notice(f"{target.label} is replaced by a new connection of the same "
                               f"instance on node {node}")
        target.kick("conflict", "replaced by a new connection of the same instance")
        self.router.disconnect(target, now)

    def log_sink_bound(self, connection: Connection, name: str) -> None:
        """A local connection became ``name``'s log sink: its key, so that
        every node copies what it routes to it (docs/cluster.md §8)."""
        self._effect(LogSinkKey(name, self.member_id(connection), bound=True))

    def copy_to_sink(self, sink: RemoteMember, data: bytes) -> None:
        """A log copy (``type='log'``) for a sink on another node: over the
        link if it is open, else lost, as a broadcast would be (a copy is
        never held, nor placed again)."""
        node, member = sink.ref
        sink.counters.packets_out += 1
        if self.waiting.get(node) is not None or \
                not self.send_forward(node, data, member, 1, None, False):
            self.counters.drops += 1

    def claimed(self, claim: Claim, refusal: Optional[str], now: float) -> None:
        """etcd's answer to a claim: the bind goes on or is refused; a
        connection gone meanwhile gives back what it was granted."""
        connection = claim.connection
        if connection not in self.router.connections or connection.closing:
            if refusal is None:
                self._effect(ReleaseClaim(claim.name, claim.member, claim.unique, claim.default))
            return
        if refusal == "409":
            self.router.log.notice(f"{connection.label} tried to bind '{claim.name}', but it's "
                                   "already bound on another node")
        elif refusal is not None:
            self.router.log.notice(f"{connection.label} tried to bind '{claim.name}', but the "
                                   "cluster's table (etcd) did not answer in time")
        claim.resume(refusal, now)
        if refusal is None and claim.name not in connection.names \
                and not self.slots.waiting(connection, claim.name):   # no slot left for it
            self._effect(ReleaseClaim(claim.name, claim.member, claim.unique, claim.default))

    def held_names(self) -> list[HeldName]:
        """What this node holds in the table, to write again under a new
        lease: each name of each local connection, with its claims."""
        held: list[HeldName] = []
        table = self.router.table
        for member, connection in self.local.items():
            identity = connection.protocol_port.identity(connection)
            for name, kind in connection.names.items():
                held.append(HeldName(name, member, kind, identity, name == table.default_name,
                                     table.log_sinks.get(name) is connection))
        return held

    def status(self) -> dict[str, Any]:
        """This node's part in the cluster, for the status page and /metrics."""
        status = {
            "node": self.node,
            "remote_members": len(self.remote),
            "local_members": len(self.local),
            "forwarded_in": self.counters.packets_in,
            "dropped": self.counters.drops,
            "bounced_held_full": self.counters.bounces,
            "held_for_nodes": {node: len(waiting.packets) for node, waiting in self.waiting.items()},
            "not_resent": self.not_resent,
        }
        status.update(self.shell_status())
        return status

    def take_effects(self) -> list[Effect]:
        effects, self.effects = self.effects, []
        return effects

    def _effect(self, effect: Effect) -> None:
        self.effects.append(effect)
        if len(self.effects) == 1:
            self.on_effects()

    # -- the table's changes -------------------------------------------------

    def apply(self, changes: Iterable[Change], now: float) -> None:
        """One batch of the mirror's changes (never one event at a time:
        held packets are placed once per batch)."""
        touched: set[str] = set()
        gone: list[MemberRef] = []
        for change in changes:
            if isinstance(change, MemberJoined) and change.member.node != self.node:
                self._joined(change.member, now)
                touched.add(change.member.name)
            elif isinstance(change, MemberLeft) and change.member.node != self.node:
                if self._left(change.member, now):
                    gone.append(change.member.ref)
                touched.add(change.member.name)
            elif isinstance(change, (MemberJoined, MemberLeft)):
                touched.add(change.member.name)     # ours: only its place in the order
            elif isinstance(change, DefaultChanged):
                self._default(change)
            elif isinstance(change, SlotsChanged):
                touched.add(change.name)
            elif isinstance(change, LogSinkChanged):
                self._log_sink(change)
        for name in touched:
            self.put_in_order(name)
            self.slots.sync(name)
        if gone:
            self._place_again_held(set(gone))

    def forget_remote(self, now: float) -> None:
        """Every member on another node leaves (this node is fenced: it
        acts as if it were alone, and out of the cluster)."""
        for remote in list(self.remote.values()):
            for name in list(remote.names):
                self.router.membership.leave(remote, name, now)
        self.remote.clear()
        self._place_again_held(None)

    def _joined(self, member: Member, now: float) -> None:
        remote = self.remote.get(member.ref)
        if remote is None:
            remote = self.remote[member.ref] = RemoteMember(member, self.port)
        # Under a slot policy: the slot whose key names it (None: an extra member).
        slot = self.mirror.slot_of(member.name, member.ref)
        joined = self.router.membership.join(remote, member.name, member.kind, now,
                                             slot=slot)
        if joined is not None:
            route, slot = joined
            self.router.membership.online(remote, route, slot)
            # One router tells its components of every bind (protocol §4.3).
            self.router.membership.advertise(member.name, remote, available=True)

    def _left(self, member: Member, now: float) -> bool:
        """True when the remote member has no name left (it is gone)."""
        remote = self.remote.get(member.ref)
        if remote is None:
            return False
        self.router.membership.leave(remote, member.name, now)
        if not remote.names:
            del self.remote[member.ref]
            return True
        return False

    def _log_sink(self, change: LogSinkChanged) -> None:
        """The table's log sink of a name: a remote one replaces ours, as a
        later <log/> bind does in one router (protocol §4.7)."""
        sinks = self.router.table.log_sinks
        old = change.old
        if old is not None and old.node != self.node:
            holder = self.remote.get(old)
            if holder is not None and sinks.get(change.name) is holder:
                del sinks[change.name]
        new = change.new
        if new is not None and new.node != self.node:
            holder = self.remote.get(new)
            if holder is not None:
                sinks[change.name] = holder

    def _default(self, change: DefaultChanged) -> None:
        table = self.router.table
        new = change.new
        if new is None:
            if change.old is not None and change.old.owner.node != self.node:
                table.default_name = None
        elif new.owner.node != self.node:
            table.default_name = new.name

    def put_in_order(self, name: str) -> None:
        """The members of ``name`` in the table's order, which every node
        shares; local members etcd has not confirmed yet come last."""
        route = self.router.table.routes.get(name)
        if route is None:
            return
        present = set(map(id, route.members))
        ordered: list[RouteMember] = []
        for member in self.mirror.members(name):
            holder = self.local.get(member.id) if member.node == self.node \
                else self.remote.get(member.ref)
            if holder is not None and id(holder) in present:
                ordered.append(holder)
        placed = set(map(id, ordered))
        ordered += [member for member in route.members if id(member) not in placed]
        route.members[:] = ordered

    # -- packets to other nodes ----------------------------------------------

    def forward(self, target: RemoteMember, data: bytes, routed: Routed) -> None:
        """Routing chose ``target``, on another node: over the link, stamped
        with the member, or held for the node while its link is not open."""
        hops = self.hops_in + 1
        if hops > self.max_hops:
            self._past_hop_limit(routed)
            return
        node, member = target.ref
        waiting = self.waiting.get(node)
        if waiting is None and self.send_forward(node, data, member, hops, routed, _as_sent(routed)):
            return
        self._hold(node, member, data, hops, routed)

    def broadcast(self, data: bytes) -> None:
        """A broadcast route from a local connection, to every other node
        (each gives it to its own connections: each gets it once)."""
        if self.send_broadcast is not None:
            self.send_broadcast(data, 1)

    def _hold(self, node: str, member: str, data: bytes, hops: int, routed: Routed,
              number: int = 0) -> None:
        waiting = self.waiting.get(node)
        if waiting is None:
            waiting = self.waiting[node] = _Waiting()
        if waiting.size + len(data) > self.hold_limit:
            # Not placed again: the node is in the table, so placement would
            # choose its member again. Back to the sender, as a full queue.
            route, _key, sender = routed
            self.counters.bounces += 1
            if sender is not None and sender in self.router.connections:
                self.router.bounce(sender, route, "503")
            return
        waiting.packets.append((member, data, hops, routed, number))
        waiting.size += len(data)

    def link_down(self, node: str, unsent: Iterable[tuple[Optional[str], bytes, int, object, int]],
                  sequence: str = "") -> None:
        """The link to ``node`` went down; ``unsent`` (member, data, hops, tag,
        number) is what ``node`` did not say it read, oldest first, numbered
        on the link ``sequence``: held again, ahead of what waits already;
        broadcasts are lost with the link."""
        waiting = self.waiting.pop(node, None)
        for member, data, hops, tag, number in unsent:
            if member is not None and tag is not None:      # not a log copy
                self._hold(node, member, data, hops, tag, number)   # type: ignore[arg-type]
        if sequence and node in self.waiting:
            self.waiting[node].sequence = sequence
        if waiting is not None:
            again = self.waiting.setdefault(node, _Waiting())
            again.packets.extend(waiting.packets)
            again.size += waiting.size
        if not any(ref.node == node for ref in self.remote):
            self._place_again_held(self._held_refs(node))   # its members left already

    def link_up(self, node: str, read: Optional[tuple[str, int]] = None) -> None:
        """The link to ``node`` is open: what was held for it goes out, but
        for what ``read`` (its hello: a lost link's sequence, how many of its
        routes it read) says it had read already (docs/cluster.md §3, Resuming)."""
        waiting = self.waiting.pop(node, None)
        if waiting is None:
            return
        packets = waiting.packets
        if read is not None and waiting.sequence == read[0]:
            count = read[1]
            kept = deque(packet for packet in packets if not 0 < packet[4] <= count)
            if len(kept) < len(packets):
                self.router.log.notice(f"node '{node}' had read {len(packets) - len(kept)} of the "
                                       f"routes its lost link handed back: not sent again")
            self.not_resent += len(packets) - len(kept)
            packets = waiting.packets = kept
            waiting.size = sum(len(packet[1]) for packet in kept)
        waiting.sequence = ""       # the numbers are the lost link's: said once
        while packets:
            member, data, hops, routed, _number = packets[0]
            if not self.send_forward(node, data, member, hops, routed, _as_sent(routed)):
                waiting.packets = deque(packet[:4] + (0,) for packet in packets)
                self.waiting[node] = waiting
                return
            packets.popleft()

    def _held_refs(self, node: str) -> set[MemberRef]:
        waiting = self.waiting.get(node)
        return {MemberRef(node, member) for member, *_ in waiting.packets} if waiting else set()

    def _place_again_held(self, gone: Optional[set[MemberRef]]) -> None:
        """Members gone from the table (None: every remote one): what was held
        for them is placed again by their names' policies (redelivery)."""
        for node in list(self.waiting):
            waiting = self.waiting[node]
            keep: deque[tuple[str, bytes, int, Routed, int]] = deque()
            again: list[Routed] = []
            for packet in waiting.packets:
                if gone is None or MemberRef(node, packet[0]) in gone:
                    again.append(packet[3])
                else:
                    keep.append(packet)
            if again:
                self.router.redelivery.add(f"[node {node}]", again)
                self.router.on_effects()
            if keep:
                waiting.packets = keep
                waiting.size = sum(len(packet[1]) for packet in keep)
            else:
                del self.waiting[node]

    def _past_hop_limit(self, routed: Routed) -> None:
        route, _key, sender = routed
        self.counters.drops += 1
        self.router.log.notice(f"packet to '{route.attrs.get('to')}' would cross more than "
                               f"{self.max_hops} nodes (cluster.hops): bounced")
        if sender is not None and sender in self.router.connections:
            self.router.bounce(sender, route, "503")

    # -- packets from other nodes --------------------------------------------

    def forwarded(self, route: Element, member: str, now: float, hops: int = 1,
                  as_sent: bool = False) -> bool:
        """A route another node placed on ``member``, one of ours: delivered
        as if a local component had sent it. If the member is gone it is
        placed again here, one hop further (False if nothing could take it).
        ``as_sent``: AcceptPort wrapped it from a stanza that declared
        nothing, so an XEP-0114 member gets the stanza's bytes as they were
        sent, as from a component of this node."""
        self.counters.packets_in += 1
        key = self.port.plain      # a route on a peer link stands in a plain component context
        if route.attrs.get("type") == "log":
            target = self.local.get(member)      # a log copy: for its sink only, never placed again
            if target is not None and not target.closing:
                target.deliver(target.protocol_port.outbound(target, route, key))
            else:
                self.counters.drops += 1
            return True
        if as_sent:
            route = _rewrapped(route)
        target = self.local.get(member)
        if target is not None and not target.closing:
            target.deliver(target.protocol_port.outbound(target, route, key), route, key, None)
            return True
        return self._place_again(route, key, hops, now)

    def _place_again(self, route: Element, key: ContextKey, hops: int, now: float) -> bool:
        router = self.router
        to = parse_jid(route.attrs.get("to") or "")
        from_ = parse_jid(route.attrs.get("from") or "")
        found = router.route_for(to.domain, from_.domain if from_ else None) if to else None
        if found is None or to is None:
            self.counters.drops += 1
            return False
        self.hops_in = hops
        try:
            target = router.placement.target(found, route, to, now)
            if target.__class__ is Choice:
                if target.action == HOLD:
                    router.hold(found, target, (None, route, key), now)
                    return True
                self.counters.drops += 1
                return False
            target.deliver(target.protocol_port.outbound(target, route, key),  # type: ignore[union-attr]
                           route, key, None)
        finally:
            self.hops_in = 0
        return True

    def session_notice(self, sender: Connection, route: Element, key: Optional[ContextKey]) -> None:
        """A session-control route from a local member (an sm's ``started``
        or ``ended``, which this node learnt from): every other node learns
        it too, so that each places the user on the member holding her
        session, whichever node the packet for her comes from."""
        member = self.ids.get(sender)
        if member is not None and self.send_session_notice is not None:
            self.send_session_notice(self.port.outbound(None, route, key), member)   # type: ignore[arg-type]

    def _affinity_entry(self, name: str, key: Hashable, member: RouteMember) -> None:
        """A traffic-affinity entry this node made, moved or kept alive: every
        other node gets it, so that all place the user alike (§8, Affinity)."""
        if self.send_affinity_notice is None or not isinstance(key, str):
            return
        if isinstance(member, RemoteMember):
            node, member_id = member.ref
        elif isinstance(member, Connection) and member in self.ids:
            node, member_id = self.node, self.ids[member]
        else:
            return          # ours, with no member id in the cluster table yet
        self.send_affinity_notice(name, key, node, member_id)

    def affinity_noticed(self, name: str, key: str, node: str, member: str, now: float) -> None:
        """Another node's traffic-affinity entry: ``key`` of ``name`` is on
        ``member`` of ``node`` (one of ours, or of any node)."""
        holder = self.local.get(member) if node == self.node else self.remote.get(MemberRef(node, member))
        route = self.router.table.routes.get(name)
        if holder is None or route is None:
            return            # gone meanwhile: its entries went with it
        self.router.placement.noticed(route, key, holder, now)

    def session_noticed(self, route: Element, node: str, member: str, now: float) -> None:
        """Another node's session notice: learnt as if its member had sent it here."""
        sender = self.remote.get(MemberRef(node, member))
        from_ = parse_jid(route.attrs.get("from") or "")
        if sender is None or from_ is None:
            return          # gone meanwhile: its entries went with it
        self.router.placement.learn(self.router.table, sender, route, from_, now)

    def broadcasted(self, route: Element) -> None:
        """A broadcast from another node: once to each of this node's
        authenticated connections (protocol §4.6)."""
        self.counters.packets_in += 1
        key = self.port.plain
        for target in self.router.connections:
            if target.authenticated:
                target.deliver(target.protocol_port.outbound(target, route, key))


def _as_sent(routed: Routed) -> bool:
    route = routed[0]
    return route.__class__ is WrappedRoute and route.as_sent is not None


#: What AcceptPort._wrap puts after the name of a stanza that declared nothing.
_WRAP_DECLARATION = b" xmlns='jabber:client'"


def _rewrapped(route: Element) -> Element:
    """The WrappedRoute the sending node had: its bytes, and the stanza as
    sent (the wrap's declaration taken out again); ``route`` itself if it
    does not have the wrap's form."""
    if route.child_name is None:
        return route
    payload = route.first_child()
    raw = route.raw
    # The wrap's form: the payload is all there is between the start tag and </route>.
    if len(raw) != route.child_start + len(payload) + 8 or not raw.endswith(b"</route>"):
        return route
    name_end = payload.find(_WRAP_DECLARATION)
    if name_end <= 1:
        return route
    as_sent = payload[:name_end] + payload[name_end + len(_WRAP_DECLARATION):]
    return WrappedRoute(raw[:route.child_start], payload, route.attrs, route.child_name,
                        route.child_attrs or {}, as_sent)


def _nothing() -> None:
    pass
