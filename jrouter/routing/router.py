"""The router: names, routes and packets between authenticated connections.

Theory of operation
-------------------
``component.Connection`` negotiates a stream; once a peer is authenticated
its top-level elements arrive here. A jabberd2 component sends ``<bind/>``,
``<unbind/>``, ``<route/>`` and ``<throttle/>`` (protocol §4); an XEP-0114
component sends plain stanzas, which are wrapped into a ``<route/>`` on the
way in and unwrapped on the way out (protocol §5), so both protocols share one
routing path.

A routed packet is forwarded as the bytes it arrived in whenever the
receiver's stream gives them the same meaning as the sender's (the usual
case: both streams declare only the default namespace and ``stream:``).
Otherwise, and for the rare packets the router must change (bounces get an
``error`` attribute spliced in, filter redirects rewrite ``to``), it builds
what is needed.

Problems with a packet are answered, never raised: the packet goes back to
its sender with ``error='CODE'`` (protocol §4.5), or as a stanza error for an
XEP-0114 sender. A packet that already carries an error is never bounced.

Two parts of the router live in modules of their own and join ``Router``
as mixins: the XEP-0114 wrapping (``accept.XepRouting``) and the clustering
policies (``cluster.ClusterRouting``).

This module must not know about sockets, gevent or the clock.
"""

import random as _random

from jrouter.routing import balance
from jrouter.routing.accept import ROUTE as _ROUTE
from jrouter.routing.accept import XepRouting, component_payload
from jrouter.routing.balance import HoldQueue, IqTracker
from jrouter.routing.cluster import ClusterRouting, any_tracking, unsent_routes
from jrouter.wire.connection import NS_ACCEPT, NS_COMPONENT, Connection, State, sender_key
from jrouter.wire.jid import parse_jid
from jrouter.routing.policy import DEFAULT_POLICY
from jrouter.routing.table import MULTI_FROM, MULTI_TO, SINGLE, RouteTable
from jrouter.wire.counters import Counters, fold
from jrouter.wire.xmlstream import SELF_CONTAINED, STREAM_PREFIXES, STREAMS_NS, StreamReader, quoteattr

_BIND = NS_COMPONENT + " bind"
_UNBIND = NS_COMPONENT + " unbind"
_THROTTLE = NS_COMPONENT + " throttle"
_STREAM_ERROR = STREAMS_NS + " error"
_DEFAULT = "{%s}default" % NS_COMPONENT
_LOG = "{%s}log" % NS_COMPONENT

class Router(XepRouting, ClusterRouting):
    """All connections and the route table of one router process."""

    def __init__(self, config, users, log, make_id, filter_rules=None, randint=None,
                 dump=None, message_log=None):
        self.config = config
        self.users = users
        self.log = log
        self.make_id = make_id
        self.filter_rules = filter_rules
        self._dumps_off = set()           # rules whose dump file could not be written
        self.randint = randint or (lambda n: _random.randrange(n))
        self.dump = dump                  # dump(path, bytes): the filter's dump files
        self.message_log = message_log    # msglog.MessageLog when <message_logging> is on
        self.table = RouteTable(config.clustering)
        self.holds = HoldQueue()
        self.iqs = IqTracker()
        self._tracking_iq = any_tracking(config.clustering)
        self.connections = {}             # Connection -> None, in connect order
        self.closed_counters = Counters() # what connections that closed had counted
        self.started_at = 0.0             # set by the shell, from its clock
        self.aliases = {alias.name: alias.target for alias in config.aliases}
        self.tls_available = False
        self._context_keys = {}
        self._accept_context = self.output_context(NS_ACCEPT)
        self._route_heads = {}            # (to, from) -> b"<route ...>" for XEP-0114 packets
        self._client_context = None
        self._dispatch = {
            _ROUTE: self._route,
            _BIND: self._bind,
            _UNBIND: self._unbind,
            _THROTTLE: self._throttle,
        }

    def reconfigure(self, config):
        """Take the settings that can change without a restart (SIGHUP):
        ACLs, aliases, the secret and keepalive apply from now on; names
        already bound keep their aliases until they unbind."""
        self.config = config
        self.aliases = {alias.name: alias.target for alias in config.aliases}
        self.message_log = _message_log(config, self.log)
        # New policies apply to names bound from now on: moving the users of
        # a name that is already served would break their sessions.
        self.table.policies = config.clustering
        self._tracking_iq = any_tracking(config.clustering)

    # -- connections -------------------------------------------------------

    def connect(self, ip, port):
        """A new peer: log it and return its Connection."""
        self.log.notice(f"[{ip}, port={port}] connect")
        connection = Connection(self, ip, port)
        self.connections[connection] = None
        return connection

    def disconnect(self, connection, now=None):
        """Forget a peer whose socket is gone (protocol §4.10); packets queued for
        it and not sent go to another member of the name they were for."""
        if connection not in self.connections:
            return
        del self.connections[connection]
        fold(self.closed_counters, connection.counters)
        self.log.notice(f"{connection.label} disconnect")
        unsent = unsent_routes(connection)
        for name in list(connection.names):
            self._drop_name(connection, name, now=now)
        connection.throttle_queue = None
        connection.forget()
        for element, key in unsent:
            self._redeliver(element, key, connection, now)

    def shutdown(self):
        """Say goodbye to every peer (protocol §1.5)."""
        self.log.notice("shutting down")
        for connection in list(self.connections):
            connection.close()

    def tick(self, now):
        """The periodic checks: whitespace keepalive (protocol §3.9)."""
        keepalive = self.config.keepalive
        if keepalive <= 0:
            return
        for connection in self.connections:
            idle = now - connection.last_activity
            if connection.header_sent and connection.state is not State.CLOSED \
                    and connection.last_activity and idle > keepalive:
                connection.send(b" ")

    def context_key(self, default_ns, prefixes):
        """An interned key for a namespace context, compared by identity on
        the hot path: raw bytes keep their meaning between two streams whose
        keys are the same object."""
        key = (default_ns, tuple(sorted(prefixes.items())))
        return self._context_keys.setdefault(key, key)

    def output_context(self, default_ns):
        return self.context_key(default_ns, dict(STREAM_PREFIXES))

    # -- jabberd2 component protocol (protocol §4) -------------------------

    def component_packet(self, connection, element):
        handler = self._dispatch.get(element.name)
        if handler is not None:
            handler(connection, element)
        elif element.name == _STREAM_ERROR:
            connection._on_peer_stream_error(element)
        else:
            connection.counters.drops += 1  # silently, as jabberd2 does (protocol §4.1)

    def _route(self, connection, element):
        attrs = element.attrs
        if "error" in attrs:
            connection.counters.drops += 1
            return          # loop protection (protocol §4.5 step 0)
        kind = attrs.get("type")
        if kind is None:
            to = attrs.get("to")
            from_ = attrs.get("from")
            self._unicast(connection, element, sender_key(connection, element.raw),
                          None if to is None else parse_jid(to),
                          None if from_ is None else parse_jid(from_))
        elif kind == "broadcast":
            self._broadcast(connection, element)
        else:
            connection.counters.drops += 1
            self.log.debug(f"unknown route type '{kind}', dropping")

    def _unicast(self, sender, element, sender_key, to, from_, origin=None):
        """Route one packet (protocol §4.5) from ``from_`` to ``to`` (parsed JIDs;
        only their domains and, for clustering, nodes matter). ``origin`` is
        the XEP-0114 stanza the packet was wrapped from, for a stanza-error
        bounce."""
        if to is None or from_ is None:
            return self._bounce(sender, element, "400", origin)
        if from_.domain not in sender.names:
            self.log.notice(f"{sender.label} tried to send a packet from '{from_.domain}', "
                            "but that name is not bound to this component")
            return self._bounce(sender, element, "401", origin)
        if self.filter_rules:
            verdict = self._filter(element)
            if verdict is not None:
                if verdict.redirect:
                    element = _with_route_to(element, verdict.redirect)
                    sender_key = None       # rebuilt: self-contained
                    to = _jid_or_none(verdict.redirect) or to
                if verdict.action == "deny":
                    return self._bounce(sender, element, str(verdict.error_code), origin)
        table = self.table
        route = table.routes.get(to.domain)
        if route is None:
            default = table.default_name
            if default is None or default == from_.domain:
                return self._bounce(sender, element, "404", origin)
            route = table.routes.get(default)
            if route is None:
                return self._bounce(sender, element, "404", origin)
        if table.log_sinks:
            self._copy_to_log_sinks(element, sender_key)
        if self._tracking_iq:
            self._track_request(sender, element, from_)
        if route.policy is DEFAULT_POLICY:      # jabberd2, bit for bit
            members = route.members
            target = members[0] if len(members) == 1 else members[self._pick(route, element, to)]
        else:
            target = self._choose(sender, route, element, to, sender_key, origin,
                                  sender.last_activity)
            if target is None:
                return
        if self.message_log is not None:
            self.message_log.log_route(element)
        if (sender_key is target.context or sender_key is None) and not target.legacy:
            target.deliver(element.raw, element, sender_key)    # the common case, spelled out
        else:
            target.deliver(self._bytes_for(target, element, sender_key), element, sender_key)

    def _pick(self, route, element, route_to):
        """Which member of a clustered route gets this packet (protocol §6.3)."""
        child = element.child_attrs or {}
        key = route_to
        if route.kind == MULTI_TO:
            address = child.get("to") or child.get("target")
            if address is not None:
                key = parse_jid(address)
            else:
                self.log.error(f"Cannot get destination for multiple route: {element.raw.decode('utf-8', 'replace')}")
        elif route.kind == MULTI_FROM:
            address = child.get("from")
            if address is not None:
                key = parse_jid(address)
            else:
                self.log.error(f"Cannot get source for multiple route: {element.raw.decode('utf-8', 'replace')}")
        else:
            self.log.error(f"Multiple components bound to single component route '{route.name}'")
        # An invalid address counts as one without a node (jabberd2 crashes).
        return balance.jabberd2_pick(len(route.members), key, self.randint)

    # -- IQ tracking (policy track-iq) -----------------------------------------

    def _bytes_for(self, target, element, sender_key):
        """The bytes that carry ``element`` to ``target``."""
        if target.legacy:
            # XEP-0114 peers get the payload only, in their stream's namespace.
            return component_payload(element, sender_key, target.payload_ns)
        if sender_key is target.context or sender_key is None:
            return element.raw
        return _serialize(element.tree())

    def _bounce(self, sender, element, code, origin):
        """Send a packet back to its sender with an error (never an error twice)."""
        sender.counters.bounces += 1
        if origin is not None:
            data = self._stanza_error(element, code, sender.payload_ns)
            if data is not None:
                sender.deliver(data)
            return
        sender.deliver(element.with_attribute("error", code))

    def _copy_to_log_sinks(self, element, sender_key):
        for sink in self.table.log_sinks.values():
            if sender_key is sink.context or sender_key is None:
                sink.deliver(element.with_attribute("type", "log"))
            else:
                tree = _copy_tree(element.tree())
                tree.set("type", "log")
                sink.deliver(_serialize(tree))

    def _filter(self, element):
        """Match router-filter.xml (protocol §2.5); log and dump as the rule says."""
        child = element.child_attrs or {}
        verdict = self.filter_rules.match(child.get("from"), child.get("to"), element.tree)
        if verdict is not None:
            if verdict.log_line:
                self.log.notice(verdict.log_line)
            if verdict.dump and self.dump is not None:
                self._dump(verdict, element)
        return verdict

    def _dump(self, verdict, element):
        """Append the stanza to the rule's dump file; a file that cannot be
        written ends dumping for that rule, as jabberd2 does."""
        if verdict.rule_index in self._dumps_off:
            return
        try:
            self.dump(verdict.dump, element.first_child() + b"\n")
        except OSError as exc:
            self.log.notice(f'filter: cannot open dump file {verdict.dump}: "{exc.strerror}", '
                            "disabling dump for this rule.")
            self._dumps_off.add(verdict.rule_index)

    def set_filter(self, rules):
        """New router-filter.xml rules (startup, SIGHUP)."""
        self.filter_rules = rules
        self._dumps_off = set()

    def _broadcast(self, sender, element):
        """Send a copy to every other authenticated peer (protocol §4.6; jabberd2
        also sends to unauthenticated ones, which leaks traffic)."""
        from_ = _jid_or_none(element.attrs.get("from"))
        if from_ is None:
            return self._bounce(sender, element, "400", None)
        if from_.domain not in sender.names:
            self.log.notice(f"{sender.label} tried to send a packet from '{from_.domain}', "
                            "but that name is not bound to this component")
            return self._bounce(sender, element, "401", None)
        key = sender_key(sender, element.raw)
        for target in self.connections:
            if target is not sender and target.authenticated:
                target.deliver(self._bytes_for(target, element, key))

    def _throttle(self, connection, element):
        """Toggle holding back packets for a peer (protocol §4.9)."""
        if connection.throttle_queue is None:
            connection.send(element.raw)
            self.log.notice(f"{connection.label} throttling packets on request")
            connection.throttle_queue = []
        else:
            self.log.notice(f"{connection.label} unthrottling packets on request")
            connection.send(element.raw)
            connection.release_throttled()

    # -- bind and unbind (protocol §4.2, §4.4) -------------------------------

    def _bind(self, connection, element):
        request = element.tree()
        name_attr = request.get("name")
        jid = _jid_or_none(name_attr)
        if jid is None:
            return self._reply(connection, request, "400", keep_name=True)
        name = jid.domain
        user = connection.user
        config = self.config
        label = connection.label
        if user != name and not config.acl_allows("bind", user):
            self.log.notice(f"{label} tried to bind '{name}', but their username ({user}) "
                            "is not permitted to bind other names")
            return self._reply(connection, request, "403")
        multi = request.get("multi") is not None
        if name in self.table and not multi and not self._replace_instance(name, connection):
            self.log.notice(f"{label} tried to bind '{name}', but it's already bound")
            return self._reply(connection, request, "409")
        if name in self.aliases:
            self.log.notice(f"{label} tried to bind '{name}', but that name is aliased")
            return self._reply(connection, request, "409")
        wants_default = request.find(_DEFAULT) is not None
        wants_log = request.find(_LOG) is not None
        # Both checks come before either takes effect: jabberd2 commits the
        # default route first and keeps it when <log/> is then refused.
        if wants_default:
            if not config.acl_allows("default-route", user):
                self.log.notice(f"{label} tried to bind '{name}' as the default route, but their "
                                f"username ({user}) is not permitted to set a default route")
                return self._reply(connection, request, "403")
            if self.table.default_name is not None:
                self.log.notice(f"{label} tried to bind '{name}' as the default route, "
                                "but one already exists")
                return self._reply(connection, request, "409")
        if wants_log and not config.acl_allows("log", user):
            self.log.notice(f"{label} tried to bind '{name}' as a log sink, but their "
                            f"username ({user}) is not permitted to do this")
            return self._reply(connection, request, "403")
        kind = MULTI_TO if multi else SINGLE
        joined = self._join(connection, name, kind)
        if joined is None:
            return self._reply(connection, request, "409")
        if wants_default:
            self.table.default_name = name
            self.log.notice(f"[{name}] set as default route")
        if wants_log:
            self.table.log_sinks[name] = connection
            self.log.notice(f"[{name}] set as log sink")
        self._online(connection, *joined)
        self._reply(connection, request, None)
        self._advertise(name, connection, available=True)
        self._advertise_reverse(connection)
        self._bind_aliases(connection, name, kind)

    def _online(self, connection, route, slot, alias_of=None):
        where = f"bound to {connection.ip}, port {connection.port}"
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

    def _bind_aliases(self, connection, name, kind):
        """Aliases of a bound name become routes to the same peer (protocol §4.11;
        jabberd2 gets this wrong for jabberd2-protocol components)."""
        for alias, target in self.aliases.items():
            if target == name and alias not in connection.names:
                joined = self._join(connection, alias, kind, alias_of=name)
                if joined is not None:
                    self._online(connection, *joined, alias_of=name)
                    self._advertise(alias, connection, available=True)

    def _unbind(self, connection, element):
        request = element.tree()
        jid = _jid_or_none(request.get("name"))
        if jid is None:
            return self._reply(connection, request, "400", keep_name=True)
        name = jid.domain
        if name not in connection.names:
            self.log.notice(f"{connection.label} tried to unbind '{name}', "
                            "but it's not bound to this component")
            return self._reply(connection, request, "404")
        self._drop_name(connection, name, reply=lambda: self._reply(connection, request, None))
        for alias, target in self.aliases.items():
            if target == name and alias in connection.names:
                self._drop_name(connection, alias)

    def _drop_name(self, connection, name, reply=None, now=None):
        table = self.table
        if table.log_sinks.get(name) is connection:
            del table.log_sinks[name]
        route = table.routes.get(name)
        remaining, slot = table.remove(name, connection)
        if slot is not None and route.policy.dead == "hold":
            self.holds.down(name, slot, connection.last_activity if now is None else now,
                            route.policy.hold_seconds)
        connection.names.pop(name, None)
        if table.default_name == name:
            table.default_name = None
            self.log.notice(f"[{name}] default route offline")
        self.log.notice(f"[{name}] offline")
        if reply is not None:
            reply()
        if remaining == 0:
            self._advertise(name, connection, available=False)

    def _reply(self, connection, request, error, keep_name=False):
        """Answer a bind/unbind with the request itself, ``name`` removed
        (kept on a 400), ``error`` added when refused."""
        reply = _copy_tree(request)
        if not keep_name:
            reply.attrib.pop("name", None)
        if error is not None:
            reply.set("error", error)
        connection.send(_serialize(reply))

    # -- advertisements (protocol §4.3) --------------------------------------

    def _advertise(self, name, source, available):
        """Tell every bound jabberd2 component that ``name`` came or went.
        jabberd2 sends one copy per name the receiver has bound; one is enough."""
        kind = "" if available else " type='unavailable'"
        data = f"<presence xmlns='{NS_COMPONENT}'{kind} from={quoteattr(name)}/>".encode()
        for connection in self.connections:
            if connection is not source and connection.names and not connection.legacy:
                connection.send(data)

    def _advertise_reverse(self, connection):
        """Tell a binder about every name it does not serve itself."""
        parts = [f"<presence xmlns='{NS_COMPONENT}' from={quoteattr(route.name)}/>"
                 for route in self.table.served() if connection not in route.members]
        if parts:
            connection.send("".join(parts).encode())


def _message_log(config, log):
    """The message log router.xml asks for, or None (protocol §7.1)."""
    if not config.message_logging:
        return None
    from jrouter.routing.message_log import MessageLog

    return MessageLog(config.message_logging_file, log)


def _jid_or_none(text):
    return None if text is None else parse_jid(text)


def _serialize(tree):
    from lxml import etree

    return etree.tostring(tree)


def _copy_tree(tree):
    import copy

    return copy.deepcopy(tree)


def _with_route_to(element, to):
    """A copy of a route with another ``to`` (a filter redirect)."""
    from lxml import etree

    tree = _copy_tree(element.tree())
    tree.set("to", to)
    reader = StreamReader()
    reader.feed(b"<s:stream xmlns:s='%s'>" % STREAMS_NS.encode())
    (rebuilt,) = reader.feed(etree.tostring(tree))
    rebuilt.context = SELF_CONTAINED
    return rebuilt


