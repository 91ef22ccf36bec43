"""The router: names, routes and packets between authenticated connections.

Theory of operation
-------------------
``wire.connection.Connection`` negotiates a stream; once a peer is
authenticated it gets its protocol's port (``ports.ComponentPort`` for
jabberd2's component protocol, ``accept.AcceptPort`` for XEP-0114), and its
top-level elements go to the port. The port hands this router one packet
shape, a ``<route/>`` (an XEP-0114 stanza is wrapped into one on the way in,
protocol §5), with its sender's namespace key; ``unicast`` checks it,
filters it, asks ``placement.Placement`` which member of the destination
gets it, and the target's port says which bytes carry it (protocol §4.5).

A routed packet is forwarded as the bytes it arrived in whenever the
receiver's stream gives them the same meaning as the sender's (the usual
case). Problems with a packet are answered, never raised: it goes back to
its sender in its port's bounce form (protocol §4.5, §5.5); a packet that
already carries an error is never bounced.

What must be written to files (message log lines, filter dumps) leaves as
effects (``take_effects``) that the shell writes.

This module must not know about sockets, gevent, files or the clock: ``now``
is handed in by whoever calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping, NamedTuple, Optional, Protocol, Union

from jrouter.routing import message_log
from jrouter.routing.accept import AcceptPort
from jrouter.routing.guard import AuthGuard
from jrouter.routing.membership import Membership
from jrouter.routing.placement import Choice, HOLD, SC_SESSION, Placement
from jrouter.routing.ports import ComponentPort
from jrouter.routing.redelivery import Redelivery
from jrouter.routing.table import RouteTable
from jrouter.wire.connection import JABBERD2, XEP0114, Connection, State, sender_key
from jrouter.wire.counters import Counters, fold
from jrouter.wire.jid import parse_jid
from jrouter.wire.xmlstream import STREAM_PREFIXES, standalone_element

if TYPE_CHECKING:
    from typing import TypeAlias

    from jrouter.config import Config
    from jrouter.routing.cluster_view import ClusterView
    from jrouter.routing.filter import FilterRules, Verdict
    from jrouter.routing.member import RouteMember
    from jrouter.routing.ports import Port
    from jrouter.routing.table import Route
    from jrouter.wire.connection import ContextKey
    from jrouter.wire.jid import JID
    from jrouter.wire.xmlstream import Element


class Log(Protocol):
    """What the core needs of the operator's log (``ops.logs.RouterLog``, or
    ``MemoryLog`` in tests)."""

    def notice(self, message: str) -> None: ...

    def error(self, message: str) -> None: ...

    def debug(self, message: str) -> None: ...


#: A packet held for a dead slot: (sender, or None for one routed again, its
#: route, the sender's namespace key).
HeldPacket: TypeAlias = "tuple[Optional[Connection], Element, Optional[ContextKey]]"


class LogMessage(NamedTuple):
    """Effect: append ``entry`` (message_log.Entry) to the message log at ``path``."""
    path: str
    entry: message_log.Entry


class DumpPacket(NamedTuple):
    """Effect: append ``data`` to a filter rule's dump file; a failure is
    reported back with ``Router.dump_failed(rule_index, ...)``."""
    path: str
    data: bytes
    rule_index: int


#: What ``take_effects`` hands the shell.
Effect: TypeAlias = Union[LogMessage, DumpPacket]


class Router:
    """All connections and the route table of one router process."""

    def __init__(self, config: Config, users: Mapping[str, str], log: Log, make_id: Callable[[], str],
                 randint: Callable[[int], int], filter_rules: Optional[FilterRules] = None) -> None:
        # make_id and randint are the shell's randomness (stream ids and
        # nonces; jabberd2's pick for an address without a node).
        self.config = config
        self.users = users
        self.log = log
        self.make_id = make_id
        self.filter_rules = filter_rules
        self.filtering = bool(filter_rules)  # read per packet: a flag, not len() of the rules
        self.logging_messages = config.message_logging  # likewise, not the property
        self._dumps_off: set[int] = set()   # rules whose dump file could not be written
        self.effects: list[Effect] = []     # LogMessage / DumpPacket for the shell
        self.on_effects: Callable[[], None] = _nothing  # wakes the shell: effects or redelivery to do
        self.table = RouteTable(config.clustering)
        self.placement = Placement(config.clustering, randint, log, config.queue_limit)
        self.membership = Membership(self)
        # Limits before authentication (protocol §3.10); like all limits, kept from startup.
        self.guard = AuthGuard(config.auth_limits, config.stanza_size_limit, log)
        self.redelivery = Redelivery(self)
        self.connections: dict[Connection, None] = {}  # Connection -> None, in connect order
        self.closed_counters = Counters() # what connections that closed had counted
        self.started_at = 0.0             # set by the shell, from its clock
        self.aliases = {alias.name: alias.target for alias in config.aliases}
        self.tls_available = False
        self._context_keys: dict[ContextKey, ContextKey] = {}
        self.ports: dict[str, Port] = {JABBERD2: ComponentPort(self), XEP0114: AcceptPort(self)}
        # This node's part in a cluster of routers (<cluster>, issue 13), set by the shell.
        self.cluster: Optional[ClusterView] = None

    def reconfigure(self, config: Config) -> None:
        """Take the settings that can change without a restart (SIGHUP):
        ACLs, aliases, the secret, keepalive and message logging apply from
        now on; names already bound keep their aliases until they unbind."""
        self.config = config
        self.logging_messages = config.message_logging
        self.aliases = {alias.name: alias.target for alias in config.aliases}
        # New policies apply to names bound from now on: moving the users of
        # a name that is already served would break their sessions.
        self.table.policies = config.clustering
        self.placement.reconfigure(config.clustering)

    # -- connections -------------------------------------------------------

    def connect(self, ip: str, port: int) -> Connection:
        """A new peer: log it and return its Connection."""
        self.log.notice(f"[{ip}, port={port}] connect")
        self.guard.arriving(self.connections)   # at the cap, an unauthenticated one goes
        connection = Connection(self, ip, port)
        self.connections[connection] = None
        return connection

    def protocol_port(self, protocol: str) -> Port:
        """The port of an authenticated peer's protocol (wire.connection's names)."""
        return self.ports[protocol]

    def disconnect(self, connection: Connection, now: float) -> None:
        """Forget a peer whose socket is gone (protocol §4.10); packets queued for
        it and not sent go to another member of the name they were for."""
        if connection not in self.connections:
            return
        del self.connections[connection]
        fold(self.closed_counters, connection.counters)
        self.log.notice(f"{connection.label} disconnect")
        unsent = connection.outbox.take_unsent()
        for name in list(connection.names):
            self.membership.leave(connection, name, now)
        if self.cluster is not None:
            self.cluster.forget(connection)
        connection.forget()
        if unsent:
            # Routed again in slices the shell asks for (redeliver), never all at once.
            self.redelivery.add(connection.label, unsent)
            self.on_effects()

    def redeliver(self, now: float, budget: int = 256) -> bool:
        """Route again up to ``budget`` packets that dead peers never got
        (redelivery.py); True while some are left."""
        return self.redelivery.run(now, budget)

    def overflowed(self, connection: Connection, now: float) -> None:
        """A peer's queue passed ``<io><limits><queue>``: it is not reading.
        Its stream ends, and what was queued for it is routed again."""
        if connection not in self.connections:
            return
        self.log.notice(f"{connection.label} is not reading: more than {self.config.queue_limit} "
                        "bytes queued for it (io.limits.queue), closing")
        connection.kick("resource-constraint", "too much output queued: the peer is not reading")
        self.disconnect(connection, now)

    def shutdown(self) -> None:
        """Say goodbye to every peer (protocol §1.5)."""
        self.log.notice("shutting down")
        for connection in list(self.connections):
            connection.close()

    def rest_idle(self, now: float, quiet: float) -> int:
        """Connections silent for ``quiet`` seconds let their parsers go
        (``Connection.rest``); how many did."""
        rested = 0
        for connection in self.connections:
            last = connection.last_activity
            if last and now - last >= quiet and connection.rest():
                rested += 1
        return rested

    def tick(self, now: float) -> None:
        """The periodic checks: whitespace keepalive (protocol §3.9)."""
        keepalive = self.config.keepalive
        if keepalive <= 0:
            return
        for connection in self.connections:
            idle = now - connection.last_activity
            if connection.header_sent and connection.state is not State.CLOSED \
                    and connection.last_activity and idle > keepalive:
                connection.send(b" ")

    def expire(self, now: float) -> None:
        """Timers: bounce what a dead slot held too long; forget old IQs;
        end connections that did not authenticate in time."""
        self.guard.expire(self.connections, now)
        for name, slot, packets in self.placement.expire(now):
            self.log.notice(f"[{name}] slot {slot} did not come back in time: "
                            f"bouncing {len(packets)} held packets")
            for packet in packets:
                self._bounce_held(packet)

    def context_key(self, default_ns: Optional[str], prefixes: Mapping[str, str]) -> ContextKey:
        """An interned key for a namespace context (``ContextKey``: compared
        with ``==``): raw bytes keep their meaning between two streams whose
        keys are equal."""
        key = (default_ns, tuple(sorted(prefixes.items())))
        return self._context_keys.setdefault(key, key)

    def output_context(self, default_ns: Optional[str]) -> ContextKey:
        return self.context_key(default_ns, dict(STREAM_PREFIXES))

    # -- routing (protocol §4.5) -------------------------------------------

    def unicast(self, sender: Connection, element: Element, key: Optional[ContextKey],
                to: Optional[JID], from_: Optional[JID], now: float) -> None:
        """Route one packet from ``from_`` to ``to`` (parsed JIDs; only their
        domains and, for clustering, nodes matter); ``key`` is the sender's
        namespace context (None: the bytes stand alone)."""
        if to is None or from_ is None:
            return self.bounce(sender, element, "400")
        if from_.domain not in sender.names:
            self.log.notice(f"{sender.label} tried to send a packet from '{from_.domain}', "
                            "but that name is not bound to this component")
            return self.bounce(sender, element, "401")
        if self.filtering:
            verdict = self._filter(element)
            if verdict is not None:
                if verdict.redirect:
                    element = _with_route_to(element, verdict.redirect)
                    key = None              # rebuilt: self-contained
                    to = _jid_or_none(verdict.redirect) or to
                if verdict.action == "deny":
                    return self.bounce(sender, element, str(verdict.error_code))
        table = self.table
        route = table.routes.get(to.domain) or self.route_for(to.domain, from_.domain)
        if route is None:
            return self.bounce(sender, element, "404")
        if table.log_sinks:
            self._copy_to_log_sinks(element, key)
        placement = self.placement
        if placement.tracking:
            placement.remember_request(table, sender, element, from_, now)
        if placement.learning:
            placement.learn(table, sender, element, from_, now)
            if self.cluster is not None and element.child_name == SC_SESSION:
                self.cluster.session_notice(sender, element, key)   # the other nodes learn it too
        target = placement.target(route, element, to, now)
        if target.__class__ is Choice:
            return self._undeliverable(sender, route, element, key, target, now)
        if self.logging_messages:
            self._log_message(element)
        # Not a Choice, so a member (mypy narrows `__class__ is` only where it holds).
        target.deliver(target.protocol_port.outbound(target, element, key),  # type: ignore[union-attr]
                       element, key, sender)

    def route_for(self, to_domain: str, from_domain: Optional[str]) -> Optional[Route]:
        """The route a packet for ``to_domain`` takes: its name's, else the
        default route (never back to the name it came from, protocol §4.5)."""
        table = self.table
        route = table.routes.get(to_domain)
        if route is None:
            default = table.default_name
            if default is None or default == from_domain:
                return None
            route = table.routes.get(default)
        return route

    def _undeliverable(self, sender: Optional[Connection], route: Route, element: Element,
                       key: Optional[ContextKey], choice: Choice, now: float) -> None:
        """A packet for a dead slot: held for it, or bounced (503)."""
        if choice.action == HOLD:
            self.hold(route, choice, (sender, element, key), now)
        elif sender is not None:
            self.bounce(sender, element, "503")

    def hold(self, route: Route, choice: Choice, packet: HeldPacket, now: float) -> None:
        """Keep a packet for a dead slot; what no longer fits bounces."""
        # A HOLD choice always names its slot (policy.place).
        for overflow in self.placement.hold(route, choice.slot, packet, now):  # type: ignore[arg-type]
            self._bounce_held(overflow)

    def bounce(self, sender: Connection, element: Element, code: str) -> None:
        """Send a packet back to its sender with an error (never an error twice)."""
        sender.counters.bounces += 1
        data = sender.protocol_port.bounce(sender, element, code)
        if data is not None:
            sender.deliver(data)

    def broadcast(self, sender: Connection, element: Element) -> None:
        """Send a copy to every other authenticated peer (protocol §4.6; jabberd2
        also sends to unauthenticated ones, which leaks traffic)."""
        from_ = _jid_or_none(element.attrs.get("from"))
        if from_ is None:
            return self.bounce(sender, element, "400")
        if from_.domain not in sender.names:
            self.log.notice(f"{sender.label} tried to send a packet from '{from_.domain}', "
                            "but that name is not bound to this component")
            return self.bounce(sender, element, "401")
        key = sender_key(sender, element.raw)
        for target in self.connections:
            if target is not sender and target.authenticated:
                target.deliver(target.protocol_port.outbound(target, element, key))
        cluster = self.cluster
        if cluster is not None:     # every other node gives it to its own connections
            cluster.broadcast(cluster.port.outbound(None, element, key))  # type: ignore[arg-type]

    def deliver_held(self, route: Route, slot: int, member: RouteMember) -> None:
        """An instance took its slot back: what was held for it is delivered."""
        for sender, element, key in self.placement.member_back(route, slot):
            member.deliver(member.protocol_port.outbound(member, element, key), element, key, sender)

    def _bounce_held(self, packet: HeldPacket) -> None:
        sender, element, _key = packet
        if sender is not None and sender in self.connections:
            self.bounce(sender, element, "503")

    def _copy_to_log_sinks(self, element: Element, key: Optional[ContextKey]) -> None:
        cluster = self.cluster
        for sink in self.table.log_sinks.values():
            if isinstance(sink, Connection):
                local, context = True, sink.context
            else:   # on another node (a cluster's): it reads a plain component stream
                local, context = False, cluster.port.plain              # type: ignore[union-attr]
            if key is None or key == context:
                data = element.with_attribute("type", "log")
            else:
                from lxml import etree
                import copy

                tree = copy.deepcopy(element.tree())
                tree.set("type", "log")
                data = etree.tostring(tree)
            if local:
                sink.deliver(data)
            else:
                cluster.copy_to_sink(sink, data)        # type: ignore[union-attr, arg-type]

    # -- the operator's question ---------------------------------------------

    def member_for(self, name: str, jid_text: str) -> Optional[RouteMember]:
        """Which member of ``name`` a stanza for (or, on a from-hashed route,
        from) ``jid_text`` goes to now, as routing would choose it; None
        when nothing serves the name or the choice would be random."""
        return self.explain_placement(name, jid_text)[0]

    def explain_placement(self, name: str, jid_text: str) -> tuple[Optional[RouteMember], str]:
        """``member_for`` and why (``Placement.explain``)."""
        route = self.table.routes.get(name)
        if route is None or not route.members:
            return None, "nobody serves the name"
        return self.placement.explain(route, jid_text)

    # -- effects for the shell -----------------------------------------------

    def take_effects(self) -> list[Effect]:
        """The files to write since the last call, oldest first."""
        effects, self.effects = self.effects, []
        return effects

    def _effect(self, effect: Effect) -> None:
        self.effects.append(effect)
        if len(self.effects) == 1:
            self.on_effects()

    def _log_message(self, element: Element) -> None:
        """A delivered route for the message log, if jabberd2 would log it (protocol §7.1)."""
        entry = message_log.entry_for(element)
        if entry is not None:
            # Called only when config.message_logging, which says the file is set.
            self._effect(LogMessage(self.config.message_logging_file, entry))  # type: ignore[arg-type]

    def _filter(self, element: Element) -> Optional[Verdict]:
        """Match router-filter.xml (protocol §2.5); log and dump as the rule says."""
        child = element.child_attrs or {}
        # Called only when there are filter_rules (unicast).
        verdict = self.filter_rules.match(child.get("from"), child.get("to"), element.tree)  # type: ignore[union-attr]
        if verdict is not None:
            if verdict.log_line:
                self.log.notice(verdict.log_line)
            if verdict.dump and verdict.rule_index not in self._dumps_off:
                self._effect(DumpPacket(verdict.dump, element.first_child() + b"\n",
                                        verdict.rule_index))
        return verdict

    def dump_failed(self, rule_index: int, path: str, reason: Optional[str]) -> None:
        """A dump file could not be written: that rule dumps no more, as in jabberd2."""
        if rule_index in self._dumps_off:
            return
        self.log.notice(f'filter: cannot open dump file {path}: "{reason}", '
                        "disabling dump for this rule.")
        self._dumps_off.add(rule_index)

    def set_filter(self, rules: Optional[FilterRules]) -> None:
        """New router-filter.xml rules (startup, SIGHUP)."""
        self.filter_rules = rules
        self.filtering = bool(rules)
        self._dumps_off = set()


def _nothing() -> None:
    pass


def _jid_or_none(text: Optional[str]) -> Optional[JID]:
    return None if text is None else parse_jid(text)


def _with_route_to(element: Element, to: str) -> Element:
    """A copy of a route with another ``to`` (a filter redirect)."""
    import copy

    from lxml import etree

    tree = copy.deepcopy(element.tree())
    tree.set("to", to)
    return standalone_element(etree.tostring(tree))
