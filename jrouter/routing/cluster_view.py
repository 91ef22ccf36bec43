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

Must not know: sockets, etcd, the clock (``now`` is handed in), the peer
link's bytes (``forward`` takes a route and its member).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Optional

from jrouter.cluster.mirror import (DefaultChanged, Member, MemberJoined, MemberLeft, MemberRef,
                                    TableMirror)
from jrouter.wire.counters import Counters

if TYPE_CHECKING:
    from jrouter.cluster.mirror import Change
    from jrouter.routing.router import Router
    from jrouter.wire.connection import Connection, ContextKey
    from jrouter.wire.xmlstream import Element

#: forward(member, route, key, sender): send a route to a member on another
#: node (the shell's peer link); sender is the local connection it came from.
Forward = Callable[["RemoteMember", "Element", "Optional[ContextKey]", "Optional[Connection]"], None]


class RemotePort:
    """The protocol port of members on other nodes, as routing uses ports:
    what bytes a packet for one becomes (the route itself: the node it goes
    to hands it to the member's own port), and the member's identity."""

    advertised = False          # remote members hear advertisements from their own node

    def __init__(self, forward: Forward) -> None:
        self.forward = forward

    def outbound(self, target: RemoteMember, route: Element, key: Optional[ContextKey]) -> bytes:
        return route.raw        # not used: RemoteMember.deliver forwards the route itself

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
        self.ip = member.node                    # for the "online" log line
        self.port = 0
        self.user = None
        self.counters = Counters()
        self.protocol_port = port

    def deliver(self, data: bytes, route: Optional[Element] = None,
                key: Optional[ContextKey] = None, sender: Optional[Connection] = None) -> None:
        """Send a routed packet on to the member's node (``data``, the bytes a
        local member would get, is not what crosses: the route is)."""
        self.counters.packets_out += 1
        if route is not None:
            self.protocol_port.forward(self, route, key, sender)

    def send(self, data: bytes) -> None:
        """Advertisements and other router-made bytes: its own node sends them."""

    def __repr__(self) -> str:
        return f"RemoteMember{self.label}"


class ClusterView:
    """This node's part in the cluster's one route table."""

    def __init__(self, router: Router, node: str, mirror: TableMirror, forward: Forward) -> None:
        self.router = router
        self.node = node
        self.mirror = mirror
        self.port = RemotePort(forward)
        self.remote: dict[MemberRef, RemoteMember] = {}
        # This node's own members: its connections by member id, and back.
        self.local: dict[str, Connection] = {}
        self.ids: dict[Connection, str] = {}
        self._next_id = 0
        self.run = ""           # set by the shell: this run's lease, so ids never repeat

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

    # -- the table's changes -------------------------------------------------

    def apply(self, changes: Iterable[Change], now: float) -> None:
        """One batch of the mirror's changes (never one event at a time:
        held packets are placed once per batch)."""
        touched: set[str] = set()
        for change in changes:
            if isinstance(change, MemberJoined) and change.member.node != self.node:
                self._joined(change.member, now)
                touched.add(change.member.name)
            elif isinstance(change, MemberLeft) and change.member.node != self.node:
                self._left(change.member, now)
                touched.add(change.member.name)
            elif isinstance(change, MemberJoined | MemberLeft):
                touched.add(change.member.name)     # ours: only its place in the order
            elif isinstance(change, DefaultChanged):
                self._default(change)
        for name in touched:
            self.put_in_order(name)

    def _joined(self, member: Member, now: float) -> None:
        remote = self.remote.get(member.ref)
        if remote is None:
            remote = self.remote[member.ref] = RemoteMember(member, self.port)
        joined = self.router.membership.join(remote, member.name, member.kind, now)  # type: ignore[arg-type]
        if joined is not None:
            route, slot = joined
            self.router.membership.online(remote, route, slot)  # type: ignore[arg-type]
            # One router tells its components of every bind (protocol §4.3).
            self.router.membership.advertise(member.name, remote, available=True)  # type: ignore[arg-type]

    def _left(self, member: Member, now: float) -> None:
        remote = self.remote.get(member.ref)
        if remote is None:
            return
        self.router.membership.leave(remote, member.name, now)  # type: ignore[arg-type]
        if not remote.names:
            del self.remote[member.ref]

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
        ordered: list[Connection] = []
        for member in self.mirror.members(name):
            holder = self.local.get(member.id) if member.node == self.node \
                else self.remote.get(member.ref)
            if holder is not None and id(holder) in present:
                ordered.append(holder)      # type: ignore[arg-type]
        placed = set(map(id, ordered))
        ordered += [member for member in route.members if id(member) not in placed]
        route.members[:] = ordered

    # -- packets from other nodes --------------------------------------------

    def forwarded(self, route: Element, member: str, now: float) -> bool:
        """A route another node placed on ``member``, one of ours: delivered
        as if a local component had sent it; False if the member is gone
        (the caller bounces it or places it again, by the hop limit)."""
        target = self.local.get(member)
        if target is None or target.closing:
            return False
        key = None      # the peer link's routes stand alone in the node's stream context
        target.deliver(target.protocol_port.outbound(target, route, key), route, key, None)
        return True
