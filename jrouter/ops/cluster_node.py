"""This router as one node of several (``<cluster>``, issue 13): the gevent
shell around the cluster's parts.

Owns: making and starting the node's agent in etcd (``ops/cluster_agent.py``),
its peer links (``ops/peer_links.py``) and its view of the table
(``routing/cluster_view.py``), and the traffic between them: the agent's
batches of changes go to the view and open or close links to the nodes they
name; the view's effects become etcd writes, in order, in one greenlet; the
view's forwards and broadcasts go onto links; what links receive, or hand
back when they go down, goes to the view. Fencing ends every local stream and
every link, so that a node out of the cluster serves no one (docs/cluster.md
§8).

Must not know: the protocols, placement, the bytes on a link.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

import gevent
import gevent.event

from jrouter.cluster.keys import (DefaultKey, DefaultValue, Key, LogKey, LogValue, MemberKey, MemberValue,
                                  OwnerValue, SlotKey, SlotValue, UniqueKey, Value)
from jrouter.cluster.mirror import NodeJoined, NodeLeft, NodeUpdated
from jrouter.config.grammar import host_port
from jrouter.errors import ConfigurationError
from jrouter.ops.cluster_agent import ClusterAgent, ClusterUnavailable
from jrouter.ops.peer_links import LinkPacket, PeerLinks, make_client_context
from jrouter.routing.cluster_view import (Claim, ClaimSlot, ClusterView, Effect, LogSinkKey,
                                          RegisterMember, ReleaseClaim, UnregisterMember)
from jrouter.routing.table import SINGLE
from jrouter.wire.peer_stream import AffinityNotice, Forwarded, ReplaceMember, SessionNotice, Unsent, dials

if TYPE_CHECKING:
    from jrouter.cluster.mirror import Change, Node
    from jrouter.config import ClusterSettings
    from jrouter.ops.logs import RouterLog
    from jrouter.ops.server import RouterServer
    from jrouter.routing.router import Router


class ClusterNode:
    """The agent, the links and the view of one node; the agent's hooks."""

    def __init__(self, settings: ClusterSettings, router: Router, server: RouterServer,
                 log: RouterLog, queue_limit: int, stanza_limit: int) -> None:
        self.settings = settings
        self.node = settings.node
        self.router = router
        self.server = server
        self.log = log
        self.revision = 0
        etcd = settings.etcd
        self.agent = ClusterAgent(settings.name, settings.node, settings.peer.address,
                                  etcd.endpoints, self, timeout=etcd.timeout, ttl=etcd.lease_ttl,
                                  bind_wait=etcd.bind_wait, log=log)
        self.view = ClusterView(router, settings.node, self.agent.mirror, self._forward,
                                self._broadcast, max_hops=settings.hops,
                                hold_limit=queue_limit or 16 << 20,
                                session_notice=self._session_notice)
        self.view.on_effects = self._effects_queued
        self.view.shell_status = self.status
        router.cluster = self.view
        self.links = PeerLinks(settings.node, settings.peer.secret, on_packet=self._packet,
                               on_link_up=self._link_up, on_link_down=self._link_down, log=log,
                               revision=lambda: self.revision, max_hops=settings.hops,
                               queue_limit=queue_limit or 16 << 20, max_element_size=stanza_limit,
                               server_tls=self._peer_tls(),
                               client_tls=self._client_tls(),
                               require_tls=settings.peer.tls)
        self.view.send_replace = self.links.replace_member
        self.view.send_affinity_notice = self._affinity_notice
        self._dialled: dict[str, str] = {}        # node -> the address dialled
        self._writes: deque[Effect] = deque()
        self._write_ready = gevent.event.Event()
        self._writer: Optional[gevent.Greenlet] = None

    # -- life ------------------------------------------------------------------

    def start(self, join_timeout: float) -> bool:
        """Listen for links, join the cluster (waiting ``join_timeout`` s at
        most); False when etcd did not answer by then (the agent goes on
        trying, and the router serves meanwhile)."""
        peer = self.settings.peer
        self.links.listen(peer.ip, peer.port)
        self._writer = gevent.spawn(self._write_loop)
        self.agent.start()
        joined = self.agent.wait_joined(join_timeout)
        if not joined:
            self.log.warning(f"cluster: node {self.node} has not joined yet: etcd at "
                             f"{', '.join(self.settings.etcd.endpoints)} does not answer; "
                             "trying on")
        return joined

    def stop(self) -> None:
        """Leave: the deletes the router asked for, then the lease revoked
        (every key of the node goes in one revision), then the links."""
        self._drain_writes(2.0)
        self.agent.flush(2.0)
        self.agent.stop()
        if self._writer is not None:
            self._writer.kill(block=False)
        self.links.stop()

    def status(self) -> dict[str, Any]:
        """The agent's and the links' figures (``ClusterView.status`` adds the table's)."""
        agent = self.agent
        nodes = []
        linked = set(self.links.linked())
        for node in agent.mirror.nodes().values():
            entry: dict[str, Any] = {"id": node.id, "address": node.address, "self": node.id == self.node,
                                     "linked": node.id in linked, "version": node.version}
            stream = self.links.link_stream(node.id)
            if stream is not None:
                counters = stream.counters
                entry.update(packets_out=counters.packets_out, packets_in=counters.packets_in,
                             bytes_out=counters.bytes_out, bytes_in=counters.bytes_in,
                             queued_bytes=stream.buffered, peer_revision=stream.peer_revision)
            nodes.append(entry)
        return {"cluster": agent.layout.cluster, "state": agent.state.value,
                "lease": f"{agent.lease:x}" if agent.lease else None,
                "revision": self.revision, "nodes": nodes}

    # -- the agent's hooks (ClusterHooks) -------------------------------------------

    def on_changes(self, changes: list[Change], revision: int) -> None:
        self.revision = revision
        self.view.mirror = self.agent.mirror
        if self.agent.lease:
            self.view.run = f"{self.agent.lease:x}"
        for change in changes:
            if isinstance(change, NodeJoined):
                self._node_up(change.node)
            elif isinstance(change, NodeUpdated):
                self._node_up(change.new)
            elif isinstance(change, NodeLeft) and change.node.id != self.node:
                self._dialled.pop(change.node.id, None)
                self.links.hang_up(change.node.id)
        self.view.apply(changes, self.server.clock())
        self.server.flush()

    def on_fenced(self) -> None:
        """Act dead: no stream of ours goes on while our keys may be gone
        and another node may hold our names (docs/cluster.md §8)."""
        self.log.warning(f"cluster: node {self.node} is fenced (its lease may be gone): closing "
                         "every component connection and peer link until it rejoins")
        now = self.server.clock()
        for node in list(self._dialled):
            self.links.hang_up(node)
        self._dialled.clear()
        for node in self.links.linked():
            self.links.hang_up(node)
        self.view.forget_remote(now)
        for connection in list(self.router.connections):
            connection.kick("system-shutdown", "this router node is out of its cluster for a while")
            self.router.disconnect(connection, now)
        self.server.flush()

    def on_rejoined(self, lost: list[Key]) -> None:
        self.log.notice(f"cluster: node {self.node} rejoined (lease {self.agent.lease:x})")
        now = self.server.clock()
        for key in lost:
            if isinstance(key, UniqueKey):
                for connection in list(self.router.connections):
                    if connection.names.get(key.name) == SINGLE:
                        self.log.notice(f"{connection.label} lost '{key.name}' to another node "
                                        "while this one was fenced, closing")
                        connection.kick("conflict", "the name is bound on another node")
                        self.router.disconnect(connection, now)
        self.server.flush()

    def held_keys(self) -> Iterable[tuple[Key, Value]]:
        bound = time.time()
        for held in self.view.held_names():
            yield MemberKey(held.name, self.node, held.member), \
                MemberValue(held.kind, held.identity, bound)
            if held.kind == SINGLE:
                yield UniqueKey(held.name), OwnerValue(self.node, held.member)
            if held.default:
                yield DefaultKey(), DefaultValue(held.name, self.node, held.member)
            if held.sink:
                yield LogKey(held.name, self.node, held.member), LogValue(bound)

    def _node_up(self, node: Node) -> None:
        if node.id == self.node or not dials(self.node, node.id):
            return              # the other node dials this one
        if self._dialled.get(node.id) == node.address:
            return
        if node.id in self._dialled:
            self.links.hang_up(node.id)             # it moved: a restart elsewhere
        try:
            host, port = host_port(node.address)
        except ValueError as exc:
            self.log.warning(f"cluster: node {node.id} has an unusable address {node.address!r} ({exc})")
            return
        self._dialled[node.id] = node.address
        self.links.dial(node.id, host, port)

    # -- the view's writes, in order ---------------------------------------------

    def _effects_queued(self) -> None:
        gevent.get_hub().loop.run_callback(self._take_effects)

    def _take_effects(self) -> None:
        effects = self.view.take_effects()
        if effects:
            self._writes.extend(effects)
            self._write_ready.set()

    def _write_loop(self) -> None:
        """One write after another, as the router asked for them: a member
        key is never put after the delete that followed it."""
        while True:
            self._write_ready.wait()
            while self._writes:
                effect = self._writes.popleft()
                try:
                    self._write(effect)
                except Exception as exc:     # a bug must not stop every later write
                    self.log.warning(f"cluster: {effect} failed: {exc!r}")
            self._write_ready.clear()

    def _drain_writes(self, timeout: float) -> None:
        self._take_effects()
        _wait_until(lambda: not self._writes, time.monotonic() + timeout)

    def _write(self, effect: Effect) -> None:
        agent = self.agent
        if isinstance(effect, RegisterMember):
            try:
                agent.register_member(MemberKey(effect.name, self.node, effect.member),
                                      MemberValue(effect.kind, effect.identity, time.time()))
            except ClusterUnavailable as exc:
                # Written again when the node rejoins (held_keys).
                self.log.warning(f"cluster: member {effect.member} of '{effect.name}' is not in "
                                 f"the cluster's table yet ({exc})")
        elif isinstance(effect, UnregisterMember):
            agent.unregister_member(MemberKey(effect.name, self.node, effect.member))
        elif isinstance(effect, LogSinkKey):
            key = LogKey(effect.name, self.node, effect.member)
            if not effect.bound:
                agent.unregister_log_sink(key)
                return
            try:
                agent.register_log_sink(key, LogValue(time.time()))
            except ClusterUnavailable as exc:
                # Written again when the node rejoins (held_keys).
                self.log.warning(f"cluster: the log sink of '{effect.name}' is not in the "
                                 f"cluster's table yet ({exc})")
        elif isinstance(effect, ReleaseClaim):
            if effect.unique:
                agent.release_unique(effect.name, effect.member)
            if effect.default:
                agent.release_default(effect.name, effect.member)
        elif isinstance(effect, Claim):
            refusal = self._claim(effect)
            self.view.claimed(effect, refusal, self.server.clock())
            self.server.flush()
        elif isinstance(effect, ClaimSlot):
            slot, refusal = self._claim_slot(effect)
            self.view.slots.claimed(effect, slot, refusal, self.server.clock())
            self.server.flush()

    #: txns a slot claim tries before it gives up (each lost one means another
    #: node took that slot meanwhile; the next choice sees it)
    SLOT_ATTEMPTS = 8

    def _freed(self, name: str) -> bool:
        """Wait (bind-wait at most) until nobody holds ``unique/<name>``: the
        holder another node was asked to end has gone."""
        return _wait_until(lambda: self.agent.mirror.owner_of_unique(name) is None,
                           time.monotonic() + self.settings.etcd.bind_wait)

    def _claim_slot(self, claim: ClaimSlot) -> tuple[Optional[int], Optional[str]]:
        """(slot, None) once the slot key and the member key are written;
        (None, "409") when no slot is left, (None, "503") when etcd did not
        answer, or kept being raced, within bind-wait."""
        deadline = time.monotonic() + self.settings.etcd.bind_wait
        connection = claim.connection
        identity = connection.protocol_port.identity(connection)
        for _ in range(self.SLOT_ATTEMPTS):
            choice = self.view.slots.choose(claim, self.server.clock())
            self.server.flush()         # a half-open instance it ended
            if isinstance(choice, str):
                return None, choice
            if choice.held:
                return choice.slot, None
            if choice.replacing is not None:
                # Its node ends it: choose again once its member key has gone.
                old = choice.replacing
                _wait_until(lambda: all(m.ref != old for m in self.agent.mirror.members(claim.name)),
                            deadline)
                continue
            try:
                taken, revision = self.agent.claim_slot(
                    SlotKey(claim.name, choice.slot), SlotValue(claim.identity, self.node, claim.member),
                    choice.mod_revision, MemberKey(claim.name, self.node, claim.member),
                    MemberValue(claim.kind, identity, time.time()))
            except ClusterUnavailable:
                return None, "503"
            if taken:
                return choice.slot, None
            # Another node took it: choose again once the mirror has its write.
            _wait_until(lambda: self.agent.mirror.revision >= revision, deadline)
            if time.monotonic() >= deadline:
                break
        return None, "503"

    def _claim(self, claim: Claim) -> Optional[str]:
        """None when every claim is ours; "409" when one is taken (those won
        are given back); "503" when etcd did not answer in bind-wait."""
        agent = self.agent
        try:
            if claim.unique and not agent.claim_unique(claim.name, claim.member) \
                    and not (claim.replacing and self._freed(claim.name)
                             and agent.claim_unique(claim.name, claim.member)):
                return "409"
            if claim.default and not agent.claim_default(claim.name, claim.member):
                if claim.unique:
                    agent.release_unique(claim.name, claim.member)
                return "409"
        except ClusterUnavailable:
            if claim.unique:
                agent.release_unique(claim.name, claim.member)
            return "503"
        return None

    # -- packets over the links --------------------------------------------------

    def _forward(self, node: str, data: bytes, member: str, hops: int, tag: Any,
                 as_sent: bool) -> bool:
        return self.links.forward(node, data, member, hops, tag, as_sent)

    def _broadcast(self, data: bytes, hops: int) -> None:
        for node in self.links.linked():
            self.links.broadcast(node, data, hops)

    def _session_notice(self, data: bytes, member: str) -> None:
        self._to_every_node(self.links.session_notice, data, member)

    def _affinity_notice(self, name: str, key: str, owner: str, member: str) -> None:
        self._to_every_node(self.links.affinity_notice, name, key, owner, member)

    def _to_every_node(self, send: Callable[..., bool], *args: Any) -> None:
        """A notice to every node with an open link (a node without one misses it)."""
        for node in self.links.linked():
            send(node, *args)

    def _packet(self, node: str, event: LinkPacket) -> None:
        if isinstance(event, Forwarded):
            self.view.forwarded(event.route, event.member, self.server.clock(), event.hops,
                                event.as_sent)
        elif isinstance(event, AffinityNotice):
            self.view.affinity_noticed(event.name, event.key, event.node, event.member,
                                       self.server.clock())
        elif isinstance(event, SessionNotice):
            self.view.session_noticed(event.route, node, event.member, self.server.clock())
        elif isinstance(event, ReplaceMember):
            self.view.replace_requested(node, event.member, self.server.clock())
        else:
            self.view.broadcasted(event.route)
        self.router.on_effects()            # a flush once this read is handled

    def _link_up(self, node: str) -> None:
        stream = self.links.link_stream(node)
        self.view.link_up(node, stream.peer_read if stream is not None else None)
        self.router.on_effects()

    def _link_down(self, node: str, unsent: list[Unsent]) -> None:
        self.view.link_down(node, [(packet.member, packet.route_raw, packet.hops, packet.tag,
                                    packet.number) for packet in unsent],
                            unsent[0].sequence if unsent else "")
        self.router.on_effects()

    def _client_tls(self) -> Any:
        cafile = self.settings.peer.cafile
        try:
            return make_client_context(cafile)
        except OSError as exc:        # ssl.SSLError too: not PEM certificates
            raise ConfigurationError(f"cluster.peer.cafile {cafile}: cannot load CA certificates "
                                     f"({exc})") from None

    def _peer_tls(self) -> Any:
        pemfile = self.settings.peer.pemfile
        if not pemfile:
            return None
        from jrouter.ops.tls import make_server_context

        return make_server_context(pemfile)


def _wait_until(condition: Callable[[], bool], deadline: float) -> bool:
    """Poll ``condition`` (what the agent's greenlet changes) until it holds
    or ``time.monotonic()`` passes ``deadline``; whether it held."""
    while not condition():
        if time.monotonic() >= deadline:
            return False
        gevent.sleep(0.005)
    return True
