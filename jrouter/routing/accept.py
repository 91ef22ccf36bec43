"""XEP-0114 components inside the router (protocol §5).

A component that opened its stream in ``jabber:component:accept`` and
passed its handshake is bound to the name it asked for. Its stanzas are
wrapped into a ``<route/>`` in ``jabber:client`` on the way in, so they take
the router's one routing path, and routes to it are unwrapped on the way
out into ``jabber:component:accept``, the namespace of the component's own
stream (XEP-0114 section 3; ``component_payload``). A packet it sent that
cannot be routed comes back to it as a stanza error.

jabberd2 hands the payload over as it is, ``<message xmlns='jabber:client'>``,
and component libraries that look for stanzas in their stream's namespace
(biboumi, slixmpp, xmpp.js) silently ignore it; Prosody and ejabberd deliver
in ``jabber:component:accept`` as we do. ``<components><component
name='...' namespace='jabber:client'/>`` in router.xml keeps jabberd2's
behaviour for one name.

``AcceptPort`` is the XEP-0114 protocol port (ports.py says what a port
is): it hands the router routes and turns routes into the component's
bytes. It must not know about sockets, the clock or placement.
"""

from __future__ import annotations

import functools
import re
from copy import deepcopy
from typing import TYPE_CHECKING, Optional, Union

from lxml import etree

from jrouter.routing.ports import ROUTE
from jrouter.wire.connection import NS_ACCEPT, NS_COMPONENT, sender_key
from jrouter.wire.jid import parse_jid
from jrouter.routing.table import MULTI_FROM
from jrouter.wire.xmlstream import _START_TAG, SELF_CONTAINED, STREAM_PREFIXES, STREAMS_NS, Element, NamespaceContext
from jrouter.wire.xmlwrite import quoteattr

if TYPE_CHECKING:
    from jrouter.routing.router import Router
    from jrouter.routing.table import Route
    from jrouter.wire.connection import Connection, ContextKey
    from jrouter.wire.jid import JID

NS_CLIENT = "jabber:client"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
_STREAM_ERROR = STREAMS_NS + " error"
_ACCEPT_PREFIX = NS_ACCEPT + " "
# Names of a payload that a component reads in its own stream namespace.
_CLIENT_NAMESPACES = (NS_CLIENT, "jabber:server")
_CLIENT_PREFIXES = tuple(ns + " " for ns in _CLIENT_NAMESPACES)
_CLIENT_DECLARATIONS = tuple(f" xmlns={q}{ns}{q}".encode() for ns in _CLIENT_NAMESPACES for q in "'\"")
# One attribute of a start tag: its name and where its quoted value starts and ends.
_ATTRIBUTE = re.compile(rb"\s([^\s=/>]+)\s*=\s*(?:'([^']*)'|\"([^\"]*)\")")


class AcceptPort:
    """XEP-0114 components: the stream's stanzas are the packets (protocol §5)."""

    advertised = False                  # XEP-0114 has no name advertisements

    def __init__(self, router: Router) -> None:
        self.router = router
        self.log = router.log
        self._accept_context = router.output_context(NS_ACCEPT)
        self._route_heads: dict[tuple[str, str], bytes] = {}  # (to, from) -> b"<route ...>"

    def online(self, connection: Connection, now: float, reply: bytes = b"") -> None:
        """The handshake passed: bind the name the stream header asked for,
        then send ``reply`` (the ``<handshake/>``): on a node of a cluster a
        name under a slot policy waits for etcd first, and the component,
        which may send as soon as it has the reply, must be bound by then."""
        router = self.router
        requested: str = connection.requested_name  # type: ignore[assignment]  # the header had one
        jid = parse_jid(requested)
        name = jid.domain if jid is not None and not jid.node and not jid.resource \
            else requested.lower()
        if name in router.aliases:
            connection.fail("host-unknown", "requested name is aliased")
        connection.payload_ns = router.config.component_namespaces.get(name, NS_ACCEPT)
        membership = router.membership
        cluster = router.cluster
        if cluster is None or not cluster.slots.needs_slot(name):
            if reply:                   # as one router always did: the reply, then the bind
                connection.send(reply)
            joined = membership.join(connection, name, MULTI_FROM, now)
            if joined is None:
                connection.fail("conflict", f"all slots of '{name}' are taken")
            return self._announce(connection, name, joined, now)

        def then(joined: Optional[tuple[Route, Optional[int]]], refusal: Optional[str],
                 now: float) -> None:
            if connection not in router.connections or connection.closing:
                return          # gone while etcd gave it its slot
            if joined is None:  # not in its own input: kick, not fail (house rule 3)
                if refusal == "503":
                    connection.kick("remote-server-timeout",
                                    "the cluster's table (etcd) did not answer")
                else:
                    connection.kick("conflict", f"all slots of '{name}' are taken")
                return router.disconnect(connection, now)
            if reply:
                connection.send(reply)
            self._announce(connection, name, joined, now)
        membership.join_then(connection, name, MULTI_FROM, now, then)

    def _announce(self, connection: Connection, name: str, joined: tuple[Route, Optional[int]],
                  now: float) -> None:
        membership = self.router.membership
        membership.online(connection, *joined)
        membership.advertise(name, connection, available=True)
        membership.join_aliases(connection, name, MULTI_FROM, now)

    def inbound(self, connection: Connection, stanza: Element, now: float) -> None:
        """A stanza from an XEP-0114 component: wrap it and route it."""
        if stanza.name == _STREAM_ERROR:
            return connection.peer_stream_error(stanza)
        attrs = stanza.attrs
        to: Union[str, JID, None]           # the attribute, then its JID
        from_: Union[str, JID, None]
        to = attrs.get("to")
        to = None if to is None else parse_jid(to)
        from_ = attrs.get("from")
        from_ = None if from_ is None else parse_jid(from_)
        if to is None or from_ is None:
            connection.counters.drops += 1
            self.log.debug("invalid or missing address on legacy packet, dropping it")
            return
        route = self._wrap(connection, stanza, to.domain, from_.domain)
        self.router.unicast(connection, route, None, to, from_, now)

    def outbound(self, target: Connection, route: Element, key: Optional[ContextKey]) -> bytes:
        """Only the payload, in the namespace of the component's stream."""
        return component_payload(route, key, target.payload_ns)

    def bounce(self, sender: Connection, route: Element, code: str) -> Optional[bytes]:
        """The stanza as a stanza error (protocol §5.5), in the namespace its
        stanzas are delivered in; None for a stanza that is an error already."""
        # Parsed as the reader would (its lxml parser, the stream: prefix bound).
        stanza = SELF_CONTAINED.parse(component_payload(route, None, sender.payload_ns))
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

    @staticmethod
    def identity(connection: Connection) -> Optional[str]:
        """The stream header's 'from', if the instance gives one."""
        return connection.stream_from

    def _wrap(self, connection: Connection, stanza: Element, to_domain: str,
              from_domain: str) -> WrappedRoute:
        """``<route>`` around an XEP-0114 stanza, moved into jabber:client."""
        raw = stanza.raw
        as_sent: Optional[bytes]
        cut = stanza.name_end
        # Its start tag ends before its first child: 'xmlns' up to there may be
        # a declaration of its own (in text, a false alarm costs the slow path).
        tag_end = stanza.child_start if stanza.child_name is not None else len(raw)
        if (sender_key(connection, raw) == self._accept_context and stanza.name.startswith(_ACCEPT_PREFIX)
                and raw.find(b":", 1, cut) < 0 and raw.find(b"xmlns", cut, tag_end) < 0):
            # Unprefixed, no declaration of its own: it inherited the stream's
            # jabber:component:accept, and so did any child that declares nothing.
            body = b"".join((raw[:cut], b" xmlns='jabber:client'", raw[cut:]))
            as_sent = raw
        else:
            body = etree.tostring(_client_view(stanza))
            as_sent = None
        heads = self._route_heads
        head = heads.get((to_domain, from_domain))
        if head is None:
            if len(heads) > 10000:
                heads.clear()
            head = heads[(to_domain, from_domain)] = route_head(to_domain, from_domain)
        # The payload is named as its bytes now read: in jabber:client.
        name = stanza.name
        if name.startswith(_ACCEPT_PREFIX):
            name = NS_CLIENT + name[len(NS_ACCEPT):]
        return WrappedRoute(head, body, {"to": to_domain, "from": from_domain}, name, stanza.attrs,
                            as_sent)


def _client_view(stanza: Element) -> etree._Element:
    """The stanza parsed as if its stream's jabber:component:accept were
    jabber:client (what jabberd2 does to inherited names)."""
    context = stanza.context
    swap: dict[Optional[str], str] = {NS_ACCEPT: NS_CLIENT}
    view = NamespaceContext(swap.get(context.default_ns, context.default_ns),
                            {p: swap.get(u, u) for p, u in context.prefixes.items()})
    tree = view.parse(stanza.raw)
    # Parsed, so its tag is a str (lxml's type also allows what may be set).
    if tree.tag.startswith("{%s}" % NS_ACCEPT):  # type: ignore[union-attr, arg-type]
        tree.tag = "{%s}%s" % (  # type: ignore[str-bytes-safe]
            NS_CLIENT, tree.tag.rpartition("}")[2])  # type: ignore[union-attr, arg-type]
    return tree


def component_payload(element: Element, sender_key: Optional[ContextKey],
                      namespace: str = NS_ACCEPT) -> bytes:
    """The bytes an XEP-0114 component receives for a route: its payload,
    moved from ``jabber:client`` (or ``jabber:server``) into ``namespace``.

    The common case is a byte splice: the payload declares its namespace
    on its own start tag, and its children inherit it. A payload that
    needs prefixes from its sender's stream header is serialised first; a
    prefixed stanza is rebuilt from the route's tree."""
    if namespace == NS_ACCEPT and isinstance(element, WrappedRoute) and element.as_sent is not None:
        return element.as_sent        # from one XEP-0114 component to another
    if sender_key is None or sender_key[1] == STREAM_PREFIXES:
        payload = element.first_child()
        if _more_after(element, payload):
            return _every_payload(element.tree(), namespace)
    else:
        tree = element.tree()
        if len(tree) > 1:
            return _every_payload(tree, namespace)
        payload = etree.tostring(tree[0]) if len(tree) else b""
    child = element.child_name
    if namespace == NS_CLIENT or child is None or not child.startswith(_CLIENT_PREFIXES):
        return payload
    spliced = _redeclared(payload, namespace)
    if spliced is not None:
        return spliced
    # <c:message xmlns:c='jabber:client'>: the tree was parsed in the
    # sender's context, so every prefix it uses is bound.
    return etree.tostring(_rebuilt(element.tree()[0], namespace))


def _more_after(element: Element, payload: bytes) -> bool:
    """Whether the route holds anything after its first payload (another
    stanza, a comment): a search through the few bytes before ``</route>``."""
    raw = element.raw
    return raw.find(b"<", element.child_start + len(payload), raw.rfind(b"</")) >= 0


def _every_payload(route: etree._Element, namespace: str) -> bytes:
    """Each element a route carries, in order, as the component reads them
    (jabberd2 delivers every child of the route, not only the first)."""
    parts = []
    for child in route:
        if not isinstance(child.tag, str):
            continue                    # comments and processing instructions
        if namespace != NS_CLIENT and etree.QName(child).namespace in _CLIENT_NAMESPACES:
            child = _rebuilt(child, namespace)
        parts.append(etree.tostring(child, with_tail=False))
    return b"".join(parts)


def _redeclared(payload: bytes, namespace: str) -> Optional[bytes]:
    """``payload`` with its start tag's default namespace declaration set to
    ``namespace``; None unless the element itself is unprefixed and
    declares one of the client namespaces there."""
    # Where jabberd2 (nad) and our own wrap put it: right after the name.
    cut = payload.find(b" ", 1, 64)
    if cut > 0:
        name = payload[1:cut]
        if b":" not in name and b">" not in name and b"/" not in name:
            for declaration in _CLIENT_DECLARATIONS:
                if payload.startswith(declaration, cut):
                    return b"".join((payload[:cut], _declaration(namespace),
                                     payload[cut + len(declaration):]))
    tag = _START_TAG.match(payload)
    if tag is None or b":" in tag.group(1):
        return None
    for match in _ATTRIBUTE.finditer(payload, tag.end(1), tag.end()):
        if match.group(1) == b"xmlns":
            value = match.group(2) if match.group(2) is not None else match.group(3)
            if value.decode() not in _CLIENT_NAMESPACES:
                return None
            return b"".join((payload[:match.start(1) - 1], _declaration(namespace),
                             payload[match.end():]))
    return None


@functools.lru_cache(maxsize=8)
def _declaration(namespace: str) -> bytes:
    """`` xmlns='namespace'`` as bytes (a handful of namespaces, built once)."""
    return f" xmlns={quoteattr(namespace)}".encode()


def _rebuilt(element: etree._Element, namespace: str,
             parent: Optional[etree._Element] = None) -> etree._Element:
    """A copy of ``element`` with it and the descendants that inherited its
    client namespace moved into ``namespace``, written unprefixed (xmpp.js
    takes a prefixed stanza for something else). A child declaring a
    namespace of its own, such as a forwarded message, is copied as it is."""
    old = etree.QName(element).namespace
    tag = "{%s}%s" % (namespace, etree.QName(element).localname)
    if parent is None:
        copy = etree.Element(tag, dict(element.attrib), nsmap={None: namespace})
    else:
        copy = etree.SubElement(parent, tag, dict(element.attrib))
        copy.tail = element.tail
    copy.text = element.text
    for child in element:
        if isinstance(child.tag, str) and etree.QName(child).namespace == old:
            _rebuilt(child, namespace, copy)
        else:
            copy.append(deepcopy(child))
    return copy


class WrappedRoute(Element):
    """The ``<route>`` built around an XEP-0114 stanza: its bytes declare
    every namespace they use, and its payload is known without a search."""

    __slots__ = ("payload", "as_sent")

    def __init__(self, head: bytes, payload: bytes, attrs: dict[str, str], child_name: str,
                 child_attrs: dict[str, str], as_sent: Optional[bytes] = None) -> None:
        # Every field set here, without Element.__init__: one per XEP-0114 packet.
        start = len(head)
        self.name = ROUTE
        self.attrs = attrs
        self.raw = b"".join((head, payload, b"</route>"))
        self.child_name = child_name
        self.child_attrs = child_attrs
        self.child_start = start
        self.child_mark = start + len(payload) - 1
        self.context = SELF_CONTAINED
        self.end = None
        self._tree = None
        self._name_end = 6
        self.payload = payload
        # The stanza's own bytes when they inherit jabber:component:accept
        # and nothing else: another XEP-0114 component gets them as they are.
        self.as_sent = as_sent

    def first_child(self) -> bytes:
        return self.payload


def route_head(to_domain: str, from_domain: str) -> bytes:
    """The start tag of a route built around an XEP-0114 stanza."""
    return (f"<route xmlns='{NS_COMPONENT}' to={quoteattr(to_domain)} "
            f"from={quoteattr(from_domain)}>").encode()
