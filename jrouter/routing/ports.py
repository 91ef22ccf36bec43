"""Protocol ports: how each kind of peer meets the one routing path.

A port is the adapter between one protocol and the router. Every
authenticated connection has one (``connection.protocol_port``), and the router
talks to peers only through it:

``online(connection, now)``
    the peer has authenticated (an XEP-0114 component's name is bound here);
``inbound(connection, element, now)``
    one top-level element from the peer: control elements are handled,
    packets become a ``<route/>`` handed to ``Router.unicast``/``broadcast``;
``outbound(target, route, key)``
    the bytes that carry a route to the peer (``key``: the namespace
    context of its sender's stream, see ``Router.context_key``);
``bounce(sender, route, code)``
    the bytes that tell the peer its packet could not be routed, or None;
``identity(connection)``
    who the peer is across reconnections, for slot policies (or None);
``advertised``
    whether the peer hears of names coming and going (protocol §4.3).

``ComponentPort`` is jabberd2's component protocol (protocol §4); the
XEP-0114 port is ``accept.AcceptPort`` (protocol §5).

Must not know: sockets, the clock (``now`` is handed in), placement.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Protocol

from jrouter.routing.table import MULTI_TO, SINGLE
from jrouter.wire.connection import NS_COMPONENT, sender_key
from jrouter.wire.jid import parse_jid
from jrouter.wire.xmlstream import STREAMS_NS

if TYPE_CHECKING:
    from lxml import etree

    from jrouter.routing.router import Router
    from jrouter.routing.table import Route
    from jrouter.wire.connection import Connection, ContextKey
    from jrouter.wire.jid import JID
    from jrouter.wire.xmlstream import Element

ROUTE = NS_COMPONENT + " route"
_BIND = NS_COMPONENT + " bind"
_UNBIND = NS_COMPONENT + " unbind"
_THROTTLE = NS_COMPONENT + " throttle"
_STREAM_ERROR = STREAMS_NS + " error"
_DEFAULT = "{%s}default" % NS_COMPONENT
_LOG = "{%s}log" % NS_COMPONENT


class Port(Protocol):
    """What the router and a connection need of a protocol port (the module
    docstring says what each member means); the ports are checked against it
    by type only, they do not inherit from it."""

    advertised: bool

    def online(self, connection: Connection, now: float, reply: bytes = b"") -> None: ...

    def inbound(self, connection: Connection, element: Element, now: float) -> None: ...

    def outbound(self, target: Connection, route: Element, key: Optional[ContextKey]) -> bytes: ...

    def bounce(self, sender: Connection, route: Element, code: str) -> Optional[bytes]: ...

    def identity(self, connection: Connection) -> Optional[str]: ...


class ComponentPort:
    """jabberd2's component protocol: <bind/>, <unbind/>, <route/>, <throttle/>."""

    advertised = True

    def __init__(self, router: Router) -> None:
        self.router = router
        self.log = router.log
        self._dispatch: dict[str, Callable[[Connection, Element, float], None]] = {
            ROUTE: self._route, _BIND: self._bind, _UNBIND: self._unbind, _THROTTLE: self._throttle}

    def online(self, connection: Connection, now: float, reply: bytes = b"") -> None:
        pass                             # names come with <bind/>; SASL has no reply here

    def inbound(self, connection: Connection, element: Element, now: float) -> None:
        handler = self._dispatch.get(element.name)
        if handler is not None:
            handler(connection, element, now)
        elif element.name == _STREAM_ERROR:
            connection.peer_stream_error(element)
        else:
            connection.counters.drops += 1  # silently, as jabberd2 does (protocol §4.1)

    def outbound(self, target: Connection, route: Element, key: Optional[ContextKey]) -> bytes:
        if key is None or key == target.context:
            return route.raw
        return _serialize(route.tree())

    def bounce(self, sender: Connection, route: Element, code: str) -> bytes:
        return route.with_attribute("error", code)

    @staticmethod
    def identity(connection: Connection) -> Optional[str]:
        """The first name it bound without multi (an sm's <id>)."""
        for name, kind in connection.names.items():
            if kind == SINGLE:
                return name
        return None

    # -- packets (protocol §4.5, §4.6, §4.9) ---------------------------------

    def _route(self, connection: Connection, element: Element, now: float) -> None:
        attrs = element.attrs
        if "error" in attrs:
            connection.counters.drops += 1
            return          # loop protection (protocol §4.5 step 0)
        kind = attrs.get("type")
        if kind is None:
            to = attrs.get("to")
            from_ = attrs.get("from")
            self.router.unicast(connection, element, sender_key(connection, element.raw),
                                None if to is None else parse_jid(to),
                                None if from_ is None else parse_jid(from_), now)
        elif kind == "broadcast":
            self.router.broadcast(connection, element)
        else:
            connection.counters.drops += 1
            self.log.debug(f"unknown route type '{kind}', dropping")

    def _throttle(self, connection: Connection, element: Element, now: float) -> None:
        """Toggle holding back packets for a peer (protocol §4.9)."""
        if not connection.outbox.throttled:
            connection.send(element.raw)
            self.log.notice(f"{connection.label} throttling packets on request")
            connection.outbox.throttle()
        else:
            self.log.notice(f"{connection.label} unthrottling packets on request")
            connection.send(element.raw)
            connection.outbox.release_throttled()

    # -- bind and unbind (protocol §4.2, §4.4) -------------------------------

    def _bind(self, connection: Connection, element: Element, now: float) -> None:
        request = element.tree()
        name = _requested_name(connection, request)
        if name is None:
            return
        multi = request.get("multi") is not None
        wants_default = request.find(_DEFAULT) is not None
        wants_log = request.find(_LOG) is not None
        refusal = self._refusal(connection, name, multi, wants_default, wants_log, now)
        if refusal is not None:
            return _reply(connection, request, refusal)
        cluster = self.router.cluster
        if cluster is not None and (not multi or wants_default):
            # Unique in the cluster, not only here: the bind waits for etcd
            # (routing/cluster_view.py; docs/cluster.md §8).
            def resume(refusal: Optional[str], now: float) -> None:
                if refusal is not None:
                    return _reply(connection, request, refusal)
                self._bound(connection, request, name, multi, wants_default, wants_log, now)
            return cluster.claim(connection, name, unique=not multi, default=wants_default,
                                 resume=resume)
        self._bound(connection, request, name, multi, wants_default, wants_log, now)

    def _bound(self, connection: Connection, request: etree._Element, name: str, multi: bool,
               wants_default: bool, wants_log: bool, now: float) -> None:
        """The bind goes ahead: the name joins, the binder and the others hear of it."""
        kind = MULTI_TO if multi else SINGLE

        def then(joined: Optional[tuple[Route, Optional[int]]], refusal: Optional[str],
                 now: float) -> None:
            if joined is None:
                return _reply(connection, request, refusal or "409")
            self._joined(connection, request, name, kind, joined, wants_default, wants_log, now)
        self.router.membership.join_then(connection, name, kind, now, then)

    def _joined(self, connection: Connection, request: etree._Element, name: str, kind: str,
                joined: tuple[Route, Optional[int]], wants_default: bool, wants_log: bool,
                now: float) -> None:
        router = self.router
        if connection not in router.connections or connection.closing:
            return          # gone while the cluster gave it its slot
        if wants_default:
            router.table.default_name = name
            self.log.notice(f"[{name}] set as default route")
        if wants_log:
            router.table.log_sinks[name] = connection
            self.log.notice(f"[{name}] set as log sink")
            if router.cluster is not None:
                router.cluster.log_sink_bound(connection, name)     # every node copies to it
        membership = router.membership
        membership.online(connection, *joined)
        _reply(connection, request, None)
        membership.advertise(name, connection, available=True)
        membership.advertise_reverse(connection)
        membership.join_aliases(connection, name, kind, now)

    def _refusal(self, connection: Connection, name: str, multi: bool, wants_default: bool,
                 wants_log: bool, now: float) -> Optional[str]:
        """The error code a bind gets, or None when it may go ahead. Every check
        comes before anything takes effect: jabberd2 commits the default
        route first and keeps it when <log/> is then refused."""
        router = self.router
        user: str           # it is authenticated, so it has a user name
        user, config, label = connection.user, router.config, connection.label  # type: ignore[assignment]
        if user != name and not config.acl_allows("bind", user):
            self.log.notice(f"{label} tried to bind '{name}', but their username ({user}) "
                            "is not permitted to bind other names")
            return "403"
        if name in connection.names:
            self.log.notice(f"{label} tried to bind '{name}', but it's already bound to this component")
            return "409"
        if name in router.table and not multi \
                and not router.membership.replace_instance(name, connection, now):
            self.log.notice(f"{label} tried to bind '{name}', but it's already bound")
            return "409"
        if name in router.aliases:
            self.log.notice(f"{label} tried to bind '{name}', but that name is aliased")
            return "409"
        if wants_default:
            if not config.acl_allows("default-route", user):
                self.log.notice(f"{label} tried to bind '{name}' as the default route, but their "
                                f"username ({user}) is not permitted to set a default route")
                return "403"
            if router.table.default_name is not None:
                self.log.notice(f"{label} tried to bind '{name}' as the default route, "
                                "but one already exists")
                return "409"
        if wants_log and not config.acl_allows("log", user):
            self.log.notice(f"{label} tried to bind '{name}' as a log sink, but their "
                            f"username ({user}) is not permitted to do this")
            return "403"
        return None

    def _unbind(self, connection: Connection, element: Element, now: float) -> None:
        request = element.tree()
        name = _requested_name(connection, request)
        if name is None:
            return
        if name not in connection.names:
            self.log.notice(f"{connection.label} tried to unbind '{name}', "
                            "but it's not bound to this component")
            return _reply(connection, request, "404")
        self.router.membership.leave_with_aliases(
            connection, name, now, reply=lambda: _reply(connection, request, None))


def _requested_name(connection: Connection, request: etree._Element) -> Optional[str]:
    """The name a bind or unbind asks for; None (and a 400 answered) when it is no JID."""
    jid = _jid_or_none(request.get("name"))
    if jid is None:
        _reply(connection, request, "400", keep_name=True)
        return None
    return jid.domain


def _reply(connection: Connection, request: etree._Element, error: Optional[str],
           keep_name: bool = False) -> None:
    """Answer a bind/unbind with the request itself, ``name`` removed
    (kept on a 400), ``error`` added when refused."""
    import copy

    reply = copy.deepcopy(request)
    if not keep_name:
        reply.attrib.pop("name", None)
    if error is not None:
        reply.set("error", error)
    connection.send(_serialize(reply))


def _jid_or_none(text: Optional[str]) -> Optional[JID]:
    return None if text is None else parse_jid(text)


def _serialize(tree: etree._Element) -> bytes:
    from lxml import etree

    return etree.tostring(tree)
