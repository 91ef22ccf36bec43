"""The router: names, routes and packets between authenticated connections.

Theory of operation
-------------------
``component.Connection`` negotiates a stream; once a peer is authenticated
its top-level elements arrive here. A jabberd2 component sends ``<bind/>``,
``<unbind/>``, ``<route/>`` and ``<throttle/>`` (spec 4); an XEP-0114
component sends plain stanzas, which are wrapped into a ``<route/>`` on the
way in and unwrapped on the way out (spec 5), so both protocols share one
routing path.

A routed packet is forwarded as the bytes it arrived in whenever the
receiver's stream gives them the same meaning as the sender's (the usual
case: both streams declare only the default namespace and ``stream:``).
Otherwise, and for the rare packets the router must change (bounces get an
``error`` attribute spliced in, filter redirects rewrite ``to``), it builds
what is needed.

Problems with a packet are answered, never raised: the packet goes back to
its sender with ``error='CODE'`` (spec 4.5), or as a stanza error for an
XEP-0114 sender. A packet that already carries an error is never bounced.

This module must not know about sockets, gevent or the clock.
"""

import random as _random

from . import balance
from .balance import HoldQueue, IqTracker, SlotBusy, SlotsFull
from .component import NS_ACCEPT, NS_COMPONENT, Connection, State
from .jid import parse_jid
from .policy import DEFAULT_POLICY, DELIVER, HOLD, key_attribute, place, placement_key
from .routing import MULTI_FROM, MULTI_TO, SINGLE, RouteTable
from .stats import Counters, fold
from .xmlstream import (STREAMS_NS, Element, NamespaceContext, StreamError, StreamReader,
                        quoteattr, stream_header)

NS_CLIENT = "jabber:client"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"

_ROUTE = NS_COMPONENT + " route"
_BIND = NS_COMPONENT + " bind"
_UNBIND = NS_COMPONENT + " unbind"
_THROTTLE = NS_COMPONENT + " throttle"
_STREAM_ERROR = STREAMS_NS + " error"
_DEFAULT = "{%s}default" % NS_COMPONENT
_LOG = "{%s}log" % NS_COMPONENT

# The namespace context of a stream that declares only ``xmlns:stream`` and
# a default namespace: what our own stream headers give every peer.
_STREAM_PREFIXES = (("stream", STREAMS_NS),)

# The context of elements the router built itself: they declare every
# namespace they use, so their bytes mean the same in any stream. A packet
# whose sender key is None carries such bytes.
SELF_CONTAINED = NamespaceContext(None, dict(_STREAM_PREFIXES))


class Router:
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
        self._tracking_iq = _any_tracking(config.clustering)
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
        self._tracking_iq = _any_tracking(config.clustering)

    # -- connections -------------------------------------------------------

    def connect(self, ip, port):
        """A new peer: log it and return its Connection."""
        self.log.notice(f"[{ip}, port={port}] connect")
        connection = Connection(self, ip, port)
        self.connections[connection] = None
        return connection

    def disconnect(self, connection, now=None):
        """Forget a peer whose socket is gone (spec 4.10); packets queued for
        it and not sent go to another member of the name they were for."""
        if connection not in self.connections:
            return
        del self.connections[connection]
        fold(self.closed_counters, connection.counters)
        self.log.notice(f"{connection.label} disconnect")
        unsent = _unsent_routes(connection)
        for name in list(connection.names):
            self._drop_name(connection, name, now=now)
        connection.throttle_queue = None
        connection.state = State.CLOSED
        for element in unsent:
            self._redeliver(element, connection, now)

    def _redeliver(self, element, dead, now):
        """Route again a packet a dead member never got (no sender checks:
        they were made when it first came in)."""
        to = parse_jid(element.attrs.get("to") or "")
        route = self.table.routes.get(to.domain) if to is not None else None
        if route is None or (not route.members and route.slots is None):
            self.log.notice(f"[{dead.ip}, port={dead.port}] lost a queued packet for "
                            f"'{element.attrs.get('to')}': nobody serves it now")
            return
        # The bytes were written for the dead peer's stream, or wrapped anew.
        key = None if isinstance(element, WrappedRoute) else dead.context
        target = self._choose(None, route, element, to, key, None,
                              dead.last_activity if now is None else now)
        if target is not None:
            target.deliver(self._bytes_for(target, element, key))

    def shutdown(self):
        """Say goodbye to every peer (spec 1.8)."""
        self.log.notice("shutting down")
        for connection in list(self.connections):
            connection.close()

    def tick(self, now):
        """The periodic checks: whitespace keepalive (spec 3.9)."""
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
        return self.context_key(default_ns, dict(_STREAM_PREFIXES))

    # -- jabberd2 component protocol (spec 4) ------------------------------

    def component_packet(self, connection, element):
        handler = self._dispatch.get(element.name)
        if handler is not None:
            handler(connection, element)
        elif element.name == _STREAM_ERROR:
            connection._on_peer_stream_error(element)
        else:
            connection.counters.drops += 1  # silently, as jabberd2 does (spec 4.1)

    def _route(self, connection, element):
        attrs = element.attrs
        if "error" in attrs:
            connection.counters.drops += 1
            return          # loop protection (spec 4.5 step 0)
        kind = attrs.get("type")
        if kind is None:
            to = attrs.get("to")
            from_ = attrs.get("from")
            self._unicast(connection, element, _sender_key(connection, element.raw),
                          None if to is None else parse_jid(to),
                          None if from_ is None else parse_jid(from_))
        elif kind == "broadcast":
            self._broadcast(connection, element)
        else:
            connection.counters.drops += 1
            self.log.debug(f"unknown route type '{kind}', dropping")

    def _unicast(self, sender, element, sender_key, to, from_, origin=None):
        """Route one packet (spec 4.5) from ``from_`` to ``to`` (parsed JIDs;
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
            target.deliver(element.raw)         # the common case, spelled out
        else:
            target.deliver(self._bytes_for(target, element, sender_key))

    def _pick(self, route, element, route_to):
        """Which member of a clustered route gets this packet (spec 6.4)."""
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
            connection.deliver(self._bytes_for(connection, element, sender_key))

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

    # -- IQ tracking (policy track-iq) -----------------------------------------

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

    def _bytes_for(self, target, element, sender_key):
        """The bytes that carry ``element`` to ``target``."""
        if target.legacy:
            # XEP-0114 peers get the payload only, with no namespace rewriting
            # (spec 5, outbound): a child that inherited the sender's default
            # namespace is read in jabber:component:accept, as from jabberd2.
            if sender_key is None or sender_key[1] == _STREAM_PREFIXES:
                return element.first_child()
            return _serialize_first_child(element)
        if sender_key is target.context or sender_key is None:
            return element.raw
        return _serialize(element.tree())

    def _bounce(self, sender, element, code, origin):
        """Send a packet back to its sender with an error (never an error twice)."""
        sender.counters.bounces += 1
        if origin is not None:
            data = self._stanza_error(element, code)
            if data is not None:
                sender.deliver(data)
            return
        sender.deliver(element.with_attribute("error", code))

    def _stanza_error(self, element, code):
        """A bounce for an XEP-0114 sender: the stanza as a stanza error (spec 5)."""
        from lxml import etree

        stanza = etree.fromstring(element.first_child())
        if stanza.get("type") == "error":
            return None
        stanza.set("type", "error")
        if code == "400":
            condition, kind = "bad-request", "modify"
        else:
            condition, kind = "service-unavailable", "cancel"
        namespace = etree.QName(stanza).namespace
        error = etree.Element("{%s}error" % namespace if namespace else "error",
                              type=kind, code="400" if code == "400" else "503")
        etree.SubElement(error, "{%s}%s" % (NS_STANZAS, condition), nsmap={None: NS_STANZAS})
        stanza.insert(0, error)
        return etree.tostring(stanza)

    def _copy_to_log_sinks(self, element, sender_key):
        for sink in self.table.log_sinks.values():
            if sender_key is sink.context or sender_key is None:
                sink.deliver(element.with_attribute("type", "log"))
            else:
                tree = _copy_tree(element.tree())
                tree.set("type", "log")
                sink.deliver(_serialize(tree))

    def _filter(self, element):
        """Match router-filter.xml (spec 2.5); log and dump as the rule says."""
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
        """Send a copy to every other authenticated peer (spec 4.6; jabberd2
        also sends to unauthenticated ones, which leaks traffic)."""
        from_ = _jid_or_none(element.attrs.get("from"))
        if from_ is None:
            return self._bounce(sender, element, "400", None)
        if from_.domain not in sender.names:
            self.log.notice(f"{sender.label} tried to send a packet from '{from_.domain}', "
                            "but that name is not bound to this component")
            return self._bounce(sender, element, "401", None)
        sender_key = _sender_key(sender, element.raw)
        for target in self.connections:
            if target is not sender and target.state in _AUTHENTICATED:
                target.deliver(self._bytes_for(target, element, sender_key))

    def _throttle(self, connection, element):
        """Toggle holding back packets for a peer (spec 4.9)."""
        if connection.throttle_queue is None:
            connection.send(element.raw)
            self.log.notice(f"{connection.label} throttling packets on request")
            connection.throttle_queue = []
        else:
            self.log.notice(f"{connection.label} unthrottling packets on request")
            held = connection.throttle_queue
            connection.throttle_queue = None
            connection.send(element.raw)
            for data in held:
                connection.send(data)

    # -- bind and unbind (spec 4.2, 4.4) -------------------------------------

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

    def _bind_aliases(self, connection, name, kind):
        """Aliases of a bound name become routes to the same peer (spec 4.11;
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

    # -- advertisements (spec 4.3) -------------------------------------------

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

    # -- XEP-0114 components (spec 5) ---------------------------------------

    def legacy_online(self, connection):
        """An XEP-0114 component finished its handshake: bind its name."""
        requested = connection.requested_name
        jid = parse_jid(requested)
        name = jid.domain if jid is not None and not jid.node and not jid.resource \
            else requested.lower()
        if name in self.aliases:
            connection.fail("host-unknown", "requested name is aliased")
        joined = self._join(connection, name, MULTI_FROM)
        if joined is None:
            connection.fail("conflict", f"all slots of '{name}' are taken")
        self._online(connection, *joined)
        self._advertise(name, connection, available=True)
        self._bind_aliases(connection, name, MULTI_FROM)

    def legacy_packet(self, connection, stanza):
        """A stanza from an XEP-0114 component: wrap it and route it."""
        if stanza.name == _STREAM_ERROR:
            return connection._on_peer_stream_error(stanza)
        attrs = stanza.attrs
        to = _jid_or_none(attrs.get("to"))
        from_ = _jid_or_none(attrs.get("from"))
        if to is None or from_ is None:
            connection.counters.drops += 1
            self.log.debug("invalid or missing address on legacy packet, dropping it")
            return
        route = self._wrap(connection, stanza, to.domain, from_.domain)
        self._unicast(connection, route, None, to, from_, origin=stanza)

    def _wrap(self, connection, stanza, to_domain, from_domain):
        """``<route>`` around an XEP-0114 stanza, moved into jabber:client."""
        raw = stanza.raw
        cut, tag_end = stanza._start_tag()
        if (_sender_key(connection, raw) is self._accept_context and stanza.name.startswith(_ACCEPT_PREFIX)
                and raw.find(b":", 1, cut) < 0 and raw.find(b"xmlns", cut, tag_end) < 0):
            # Unprefixed, no declaration of its own: it inherited the stream's
            # jabber:component:accept, and so did any child that declares nothing.
            body = b"".join((raw[:cut], b" xmlns='jabber:client'", raw[cut:]))
        else:
            body = _serialize(self._client_view(stanza))
        heads = self._route_heads
        head = heads.get((to_domain, from_domain))
        if head is None:
            if len(heads) > 10000:
                heads.clear()
            head = heads[(to_domain, from_domain)] = (
                f"<route xmlns='{NS_COMPONENT}' to={quoteattr(to_domain)} "
                f"from={quoteattr(from_domain)}>").encode()
        return WrappedRoute(head, body, {"to": to_domain, "from": from_domain},
                            stanza.name, stanza.attrs)

    def _client_view(self, stanza):
        """The stanza parsed as if its stream's jabber:component:accept were
        jabber:client (what jabberd2 does to inherited names)."""
        context = stanza.context
        swap = {NS_ACCEPT: NS_CLIENT}
        view = NamespaceContext(swap.get(context.default_ns, context.default_ns),
                                {p: swap.get(u, u) for p, u in context.prefixes.items()})
        tree = view.parse(stanza.raw)
        if tree.tag.startswith("{%s}" % NS_ACCEPT):
            tree.tag = "{%s}%s" % (NS_CLIENT, tree.tag.rpartition("}")[2])
        return tree


_AUTHENTICATED = (State.ONLINE, State.LEGACY)
_ACCEPT_PREFIX = NS_ACCEPT + " "


class WrappedRoute(Element):
    """The ``<route>`` built around an XEP-0114 stanza: its bytes declare
    every namespace they use, and its payload is known without a search."""

    __slots__ = ("payload",)

    def __init__(self, head, payload, attrs, child_name, child_attrs):
        # Every field set here, without Element.__init__: one per XEP-0114 packet.
        start = len(head)
        self.name = _ROUTE
        self.attrs = attrs
        self.raw = b"".join((head, payload, b"</route>"))
        self.child_name = child_name
        self.child_attrs = child_attrs
        self.child_start = start
        self.child_mark = start + len(payload) - 1
        self.context = SELF_CONTAINED
        self.end = None
        self._tree = None
        self._tag = (6, start)
        self.payload = payload

    def first_child(self):
        return self.payload


def _sender_key(connection, raw):
    """The namespace context a sender's raw packet needs: the plain one
    unless it uses a prefix its stream header declared beyond xmlns:stream
    (a cheap byte search; a false alarm only costs a re-serialisation)."""
    extra = connection.extra_prefixes
    if extra:
        for prefix in extra:
            if prefix in raw:
                return connection.input_key
    return connection.plain_key


def _any_tracking(policies):
    return policies is not None and any(p.track_iq for p in policies.policies())


def _full(address):
    """An address as IQ tracking compares it: the prepped full JID."""
    jid = None if address is None else parse_jid(address)
    return jid.full if jid is not None else (address or "")


def _unsent_routes(connection):
    """The routed packets still queued for a connection that is going away,
    taken out of its queues as route elements (an XEP-0114 peer's stanzas
    wrapped again); what is not a routed packet (a goodbye) stays queued."""
    if not connection.names:
        return []
    kept, routes = [], []
    for data in connection.out:
        route = _reroutable(connection, data)
        if route is None:
            kept.append(data)
        else:
            routes.append(route)
    for data in connection.throttle_queue or ():
        route = _reroutable(connection, data)
        if route is not None:
            routes.append(route)
    connection.out[:] = kept
    return routes


def _reroutable(connection, data):
    """``data`` (one queued packet) as a route to one of the connection's
    names, or None."""
    reader = StreamReader()
    reader.feed(stream_header(connection.default_ns, declaration=False))
    try:
        events = reader.feed(data)
    except StreamError:
        return None
    if len(events) != 1 or not isinstance(events[0], Element):
        return None
    event = events[0]
    if not connection.legacy:
        if event.name == _ROUTE and "type" not in event.attrs \
                and _domain(event.attrs.get("to")) in connection.names:
            return event
        return None
    to, from_ = _domain(event.attrs.get("to")), _domain(event.attrs.get("from"))
    if to not in connection.names or from_ is None:
        return None
    head = (f"<route xmlns='{NS_COMPONENT}' to={quoteattr(to)} "
            f"from={quoteattr(from_)}>").encode()
    return WrappedRoute(head, event.raw, {"to": to, "from": from_}, event.name, event.attrs)


def _domain(address):
    jid = None if address is None else parse_jid(address)
    return None if jid is None else jid.domain


def _message_log(config, log):
    """The message log router.xml asks for, or None (spec 7.2)."""
    if not config.message_logging:
        return None
    from .msglog import MessageLog

    return MessageLog(config.message_logging_file, log)


def _jid_or_none(text):
    return None if text is None else parse_jid(text)


def _serialize(tree):
    from lxml import etree

    return etree.tostring(tree)


def _serialize_first_child(element):
    tree = element.tree()
    return _serialize(tree[0]) if len(tree) else b""


def _copy_tree(tree):
    import copy

    return copy.deepcopy(tree)


def _with_route_to(element, to):
    """A copy of a route with another ``to`` (a filter redirect)."""
    from lxml import etree

    from .xmlstream import StreamReader

    tree = _copy_tree(element.tree())
    tree.set("to", to)
    reader = StreamReader()
    reader.feed(b"<s:stream xmlns:s='%s'>" % STREAMS_NS.encode())
    (rebuilt,) = reader.feed(etree.tostring(tree))
    rebuilt.context = SELF_CONTAINED
    return rebuilt


