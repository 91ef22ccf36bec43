"""One peer connection: its stream, its negotiation and its one state table.

Theory of operation
-------------------
Every TCP peer of the router is a ``Connection``. Bytes go in through
``receive(data, now)``; what the router has to say to the peer piles up in
its ``outbox.Outbox``, which the shell drains with ``data_to_send()`` (the
outbox calls ``on_output()`` when it stops being empty, so the shell knows
to wake its writer). Nothing here touches a socket, the clock or
randomness: time comes in with the bytes, stream ids and SASL nonces come
from ``router.make_id()``.

A connection starts in ``HEADER``. The stream header decides the protocol:
the default namespace ``jabber:component:accept`` means XEP-0114 (the
``HANDSHAKE`` state, then ``LEGACY``); anything else is jabberd2's component
protocol (``NEGOTIATING`` for STARTTLS and SASL, a stream restart, then
``ONLINE``). Once a peer is authenticated it gets the router's port for its
protocol (``router.protocol_port``), and its elements go to the port's
``inbound``; names and routing are the router's (``routing/``).

A fatal problem queues the stream error and ``</stream:stream>``, moves to
``CLOSED`` and raises ``ConnectionClosed``; the shell then sends what is
queued and closes the socket.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Optional

from jrouter.errors import ConnectionClosed

# CPython's own SHA-1 and constant-time comparison (what hmac.compare_digest
# falls back to), the same answers: hashlib and hmac would load OpenSSL's
# libcrypto, ~3.5 MiB resident for the process's life, at the first XEP-0114
# handshake of a router that has no TLS to need it (docs/architecture.md, memory).
try:
    from _operator import _compare_digest
    from _sha1 import sha1 as _sha1  # type: ignore[import-not-found]  # no stub in typeshed
except ImportError:     # an interpreter built without them
    from hashlib import sha1 as _sha1
    from hmac import compare_digest as _compare_digest  # type: ignore[no-redef]
from jrouter.wire.counters import Counters
from jrouter.wire.outbox import Outbox
from jrouter.wire.xmlstream import STREAMS_NS, Element, StreamClose, StreamError, StreamOpen, StreamReader
from jrouter.wire.xmlwrite import STREAM_CLOSE, stream_error, stream_header

if TYPE_CHECKING:
    from typing import TypeAlias

    from jrouter.routing.ports import Port
    from jrouter.routing.router import Router
    from jrouter.wire.sasl import SaslServer
    from jrouter.wire.xmlstream import StreamEvent

NS_COMPONENT = "http://jabberd.jabberstudio.org/ns/component/1.0"
NS_ACCEPT = "jabber:component:accept"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"

# The two protocols a peer may speak; the router gives each its port.
JABBERD2 = "jabberd2"          # jabberd2's component protocol (protocol §4)
XEP0114 = "xep0114"            # XEP-0114, jabber:component:accept (protocol §5)

STREAM_ROOT = STREAMS_NS + " stream"
STREAM_ERROR = STREAMS_NS + " error"

#: What a state does with one event (of the type it is filed under in _HANDLERS).
_Handler: TypeAlias = Callable[["Connection", Any, float], None]

#: The key of a namespace context (``Router.context_key``): the default
#: namespace and the sorted (prefix, uri) declarations, interned so that two
#: streams in the same context share one key object. Compared with ``==``
#: (item by item, each found identical at once): compiled (mypyc,
#: docs/architecture.md), a fixed-length tuple travels as a C struct and is
#: boxed anew where it becomes an object, so ``is`` would never hold. Where a
#: key is Optional, None means "the bytes stand alone" (they declare every
#: namespace they use).
ContextKey: TypeAlias = tuple[Optional[str], tuple[tuple[str, str], ...]]


class State(enum.Enum):
    HEADER = "waiting for a stream header"
    NEGOTIATING = "jabberd2 stream open, not authenticated (STARTTLS, SASL)"
    STARTING_TLS = "<proceed/> queued, the shell starts TLS"
    HANDSHAKE = "XEP-0114 stream open, waiting for <handshake/>"
    ONLINE = "authenticated jabberd2 component"
    LEGACY = "authenticated XEP-0114 component"
    CLOSED = "stream closed"


# Legal moves between states: every change of ``Connection.state`` goes
# through ``_move``, which checks this table; a move not in it ends the
# stream with a stream error, as any protocol error does. What each state
# does with each event is ``_HANDLERS``, after the class.
_MOVES = {
    State.HEADER: {State.NEGOTIATING, State.HANDSHAKE, State.ONLINE, State.CLOSED},
    State.NEGOTIATING: {State.HEADER, State.STARTING_TLS, State.CLOSED},
    State.STARTING_TLS: {State.HEADER, State.CLOSED},
    State.HANDSHAKE: {State.LEGACY, State.CLOSED},
    State.ONLINE: {State.CLOSED},
    State.LEGACY: {State.CLOSED},
    State.CLOSED: set(),
}
_AUTHENTICATED = (State.ONLINE, State.LEGACY)
#: No stream header's namespaces to intern (shared, never changed: replaced).
_NO_HEADER: tuple[Optional[str], dict[str, str]] = (None, {})


class Connection:
    """One peer, as the router sees it."""

    # One per peer: slots keep it at ~300 bytes (as a dict of its 34
    # attributes, too many to share keys, it was ~1.5 KiB; issue 12). The
    # ``__dict__`` slot is made only if something sets an attribute of its
    # own (a test wrapping a method): an idle connection has none.
    __slots__ = ("router", "ip", "port", "label", "reader", "state", "stream_id", "header_sent",
                 "protocol", "protocol_port", "default_ns", "context", "input_key", "plain_key",
                 "extra_prefixes", "_header_namespaces", "requested_name", "stream_from",
                 "payload_ns", "tls_restart_offset", "_restart_leftover", "sasl", "user",
                 "auth_id", "realm", "tls_active", "auth_failures", "names", "closing",
                 "last_activity", "connected_at", "counters", "outbox", "send", "deliver",
                 "data_to_send", "__weakref__", "__dict__")

    def __init__(self, router: Router, ip: str, port: int) -> None:
        self.router = router
        self.ip = ip
        self.port = port
        self.label = f"[{ip}, port={port}]"
        self.reader = StreamReader(router.guard.element_limit)  # small until authenticated (§3.10)
        self.state = State.HEADER
        self.stream_id: Optional[str] = None
        self.header_sent = False
        self.protocol: Optional[str] = None  # JABBERD2 or XEP0114, from the stream header
        # Its protocol's port, set when it authenticates: before, nothing routes to or from it.
        self.protocol_port: Port = None  # type: ignore[assignment]
        self.default_ns: Optional[str] = None
        self.context: Optional[ContextKey] = None    # key of the namespace context our stream gives the peer
        self.input_key: Optional[ContextKey] = None  # key of the namespace context of the peer's stream
        self.plain_key: Optional[ContextKey] = None  # the same without prefixes beyond xmlns:stream
        self.extra_prefixes: tuple[bytes, ...] = ()  # b"p:" for each of those prefixes
        # The last stream header's default namespace and prefixes, until they are interned.
        self._header_namespaces = _NO_HEADER
        self.requested_name: Optional[str] = None    # XEP-0114: the header's 'to'
        self.stream_from: Optional[str] = None       # XEP-0114: the header's 'from'
        self.payload_ns = NS_ACCEPT  # XEP-0114: the namespace its stanzas are delivered in
        self.tls_restart_offset = 0
        self._restart_leftover: Optional[bytes] = None  # bytes after the element that restarted the stream
        self.sasl: Optional[SaslServer] = None
        self.user: Optional[str] = None  # SASL username (for ACLs) or the XEP-0114 name
        self.auth_id: Optional[str] = None
        self.realm: Optional[str] = None
        self.tls_active = False
        self.auth_failures = 0   # failed SASL exchanges and handshakes (routing.guard)
        self.names: dict[str, str] = {}  # names bound by this connection (ordered set) -> bind kind
        self.closing = False
        self.last_activity = 0.0     # set by the shell, from its clock (keepalive, status)
        self.connected_at = 0.0      # set by the shell, from its clock
        self.counters = Counters()
        self.outbox = Outbox(self.counters, router.config.queue_limit)
        # The output buffer's own methods, bound once: one call per packet.
        self.send = self.outbox.send
        self.deliver = self.outbox.deliver
        self.data_to_send = self.outbox.data_to_send

    def __repr__(self) -> str:
        return f"<Connection {self.ip}:{self.port} {self.state.name}>"

    # -- input -------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> None:
        """Feed bytes from the peer, read at time ``now``. Raises
        ConnectionClosed when done."""
        self.counters.bytes_in += len(data)
        while data and self.state is not State.CLOSED:
            data = self._receive_once(data, now)
        if self.closing:
            raise ConnectionClosed()

    def _receive_once(self, data: bytes, now: float) -> bytes:
        """Handle what ``data`` completes; return bytes that belong to a
        restarted stream (sent right after SASL success), else b''."""
        try:
            events = self.reader.feed(data)
        except StreamError as exc:
            # What the peer completed before the error is handled first. If
            # that restarted the stream, the error came from reading the new
            # stream's bytes with the old parser: they are read again.
            leftover = self._handle(exc.events, now)
            if leftover is not None:
                return leftover
            self.router.log.notice(f"{self.label} error: {_error_kind(exc.condition)} "
                                   f"({exc.text or exc.condition})")
            self.fail(exc.condition, exc.text)
        return self._handle(events, now) or b""

    def _handle(self, events: list[StreamEvent], now: float) -> Optional[bytes]:
        """Act on events; after a stream restart stop and return the bytes
        that follow it (maybe b''), else return None."""
        inbound = self._inbound()
        counters = self.counters
        for event in events:
            # The fast path: an authenticated peer's packet goes to its port.
            if inbound is not None and event.__class__ is Element and not self.closing:
                counters.packets_in += 1
                inbound(self, event, now)
                continue
            handler = _HANDLERS[self.state].get(event.__class__)
            if handler is None:
                self.fail("bad-format")
            handler(self, event, now)
            if self.state is State.CLOSED:
                break
            if self._restart_leftover is not None:
                leftover, self._restart_leftover = self._restart_leftover, None
                return leftover
            inbound = self._inbound()
        return None

    def _inbound(self) -> Optional[Callable[[Connection, Element, float], None]]:
        return self.protocol_port.inbound if self.protocol_port is not None and self.state in _AUTHENTICATED else None

    def _move(self, state: State) -> None:
        if state not in _MOVES[self.state]:
            self.fail("bad-format", f"not allowed while {self.state.value}")
        self.state = state

    def _end(self, goodbye: bytes = b"") -> None:
        """Queue ``goodbye`` (unless the stream is over already) and move to
        CLOSED: the one way a stream ends, from any state."""
        if self.state is not State.CLOSED:
            if goodbye:
                self.send(goodbye)
            self.state = State.CLOSED      # legal from every state (_MOVES)
        self.closing = True

    @property
    def authenticated(self) -> bool:
        return self.state in _AUTHENTICATED

    @property
    def starting_tls(self) -> bool:
        """The shell must start TLS now (``<proceed/>`` is queued)."""
        return self.state is State.STARTING_TLS

    # -- ending the stream ---------------------------------------------------

    def fail(self, condition: str, text: Optional[str] = None) -> NoReturn:
        """Queue a stream error and the close, then raise (house rule 3)."""
        self._end(stream_error(condition, text, self.header_sent))
        raise ConnectionClosed(condition)

    def kick(self, condition: str, text: Optional[str] = None) -> None:
        """End the stream from outside its own input (a newer connection of
        the same instance replaces it): queue the error, wake the writer."""
        self._end(stream_error(condition, text, self.header_sent))
        self.outbox.on_output()

    def close(self) -> None:
        """Close our side of the stream politely (shutdown, peer's close)."""
        if self.state is not State.CLOSED and not self.header_sent:
            self.send(stream_header(None, declaration=False))
        self._end(STREAM_CLOSE)

    def rest(self) -> bool:
        """The peer has been quiet: its reader lets its parser go till it speaks."""
        return not self.closing and self.reader.rest()

    def forget(self) -> None:
        """The socket is gone: nothing more is said or sent. The reader and
        the shell's output hook are let go, so that reference counting alone
        frees the connection (no cycle waits for the garbage collector)."""
        self._end()
        self.reader.release()
        self.outbox.unhook()

    # -- stream header (protocol §3.2) -------------------------------------

    def _on_header(self, header: StreamOpen, now: float) -> None:
        if header.name != STREAM_ROOT:
            self.fail("bad-format")
        version = header.attrs.get("version")
        if version is not None and version != "1.0":
            self.fail("unsupported-version")
        self.default_ns = header.default_ns
        self.stream_id = self.router.make_id()
        xep0114 = self.user is None and header.default_ns == NS_ACCEPT
        if xep0114:
            # XEP-0114 has no stream features: answer a version='1.0' header
            # as a pre-1.0 stream (RFC 6120 4.7.5), as Prosody and ejabberd
            # do, so that the component goes on to its <handshake/>.
            version = None
        self.send(stream_header(header.default_ns, self.stream_id, to=header.attrs.get("from"),
                                from_=header.attrs.get("to"), version=version))
        self.header_sent = True
        self._header_namespaces = (header.default_ns, header.prefixes)
        if self.user is not None:
            self._open_authenticated(header, version, now)
            return
        self.protocol = XEP0114 if xep0114 else JABBERD2
        if xep0114:
            self._open_xep0114(header)
        else:
            self._move(State.NEGOTIATING)
        if version is not None:
            self.send(self._features())

    def _authenticated(self, state: State, protocol: str, now: float, reply: bytes = b"") -> None:
        """The peer proved who it is: the router's namespace keys for its
        stream (only now: the router keeps every key it hands out), its
        protocol's port, and the port takes it from here."""
        self._move(state)
        self.context, self.input_key, self.plain_key, self.extra_prefixes = \
            _namespace_keys(self.router, *self._header_namespaces)
        self._header_namespaces = _NO_HEADER    # interned now: the header's copy goes
        self.router.log.notice(f"{self.label} authenticated as {self.auth_id}")
        self.protocol_port = self.router.protocol_port(protocol)
        self.protocol_port.online(self, now, reply)

    def _features(self) -> bytes:
        negotiating = self.state is State.NEGOTIATING or self.state is State.HANDSHAKE
        return stream_features(negotiating, self.router.tls_available and not self.tls_active)

    def _open_authenticated(self, header: StreamOpen, version: Optional[str], now: float) -> None:
        if not self.realm:
            self.realm = header.attrs.get("to") or ""
        self.auth_id = f"{self.user}@{self.realm}"
        if version is not None:
            self.send(stream_features(False, False))
        self._authenticated(State.ONLINE, JABBERD2, now)

    def _open_xep0114(self, header: StreamOpen) -> None:
        self._move(State.HANDSHAKE)
        if self.router.config.secret is None:
            self.fail("invalid-namespace", "support for legacy components not available")
        to = header.attrs.get("to")
        if to is None:
            self.fail("host-unknown", "no 'to' attribute on stream header")
        self.requested_name = to
        self.stream_from = header.attrs.get("from")   # the instance's identity, if it gives one

    def _on_stream_close(self, _event: StreamClose, now: float) -> None:
        self.close()

    # -- STARTTLS and SASL (protocol §3.5, §3.6) -----------------------------

    def _on_negotiation(self, element: Element, now: float) -> None:
        name = element.name
        if name == NS_TLS + " starttls":
            self._on_starttls(element)
        elif name.startswith(NS_SASL):
            self._on_sasl(element, now)
        elif name == STREAM_ERROR:
            self.peer_stream_error(element)
        # Anything else before authentication is dropped (protocol §3.7).

    def _on_starttls(self, element: Element) -> None:
        if self.state is not State.NEGOTIATING or not self.router.tls_available or self.tls_active:
            return      # jabberd2 ignores it silently (protocol §3.5)
        self.send(f"<proceed xmlns='{NS_TLS}'/>".encode())
        self._move(State.STARTING_TLS)
        self.tls_restart_offset = element.end  # type: ignore[assignment]  # a peer's element: an int

    def tls_started(self) -> bytes:
        """The shell finished the TLS handshake: a new stream begins.
        Returns bytes that arrived after <starttls/> in the clear (a
        well-behaved peer sends none)."""
        self.tls_active = True
        leftover = self.reader.restart(self.tls_restart_offset)
        self._restart_stream()
        return leftover

    def _restart_stream(self) -> None:
        self.header_sent = False
        self._move(State.HEADER)

    def _on_sasl(self, element: Element, now: float) -> None:
        from jrouter.wire.sasl import SaslServer

        kind = element.local_name
        if kind not in ("auth", "response", "abort") or self.state is not State.NEGOTIATING:
            return
        if self.sasl is None:
            self.sasl = SaslServer(self.router.users.get, self.router.make_id)
        text = element.tree().text or "" if kind != "abort" else ""
        reply = self.sasl.on_element(kind, element.attrs.get("mechanism"), text)
        self.send(reply.to_bytes())
        if reply.kind == "success":
            self.user = reply.username
            self.realm = reply.realm
            self.sasl = None
            self.reader.max_element_size = self.router.config.stanza_size_limit
            self._restart_leftover = self.reader.restart(element.end)  # type: ignore[arg-type]  # as above
            self._restart_stream()
        elif reply.kind == "failure" and self.router.guard.failed(self, now):
            self.fail("policy-violation", "too many failed authentications")   # protocol §3.10

    def peer_stream_error(self, element: Element) -> None:
        """The peer sent <stream:error/>: log it and end without a word."""
        self.router.log.notice(f"{self.label} error: Stream error ({_stream_error_text(element)})")
        # jabberd2 closes without a word (protocol §3.3).
        self._end()

    # -- XEP-0114 handshake (protocol §5.1) ------------------------------------

    def _on_handshake(self, element: Element, now: float) -> None:
        if element.local_name != "handshake":
            if element.name == STREAM_ERROR:
                self.peer_stream_error(element)
            return      # anything else before the handshake is dropped
        tree = element.tree()
        # The secret is read now: a SIGHUP since the header may have removed it.
        refusal = handshake_refusal(tree.text or "", self.stream_id or "", self.router.config.secret)
        if refusal is not None:
            if refusal != NO_SECRET:        # the peer's failure: counted (protocol §3.10)
                self.router.guard.failed(self, now)
            self.fail("not-authorized", refusal)
        self.reader.max_element_size = self.router.config.stanza_size_limit
        tree.text = None
        from lxml import etree

        self.user = self.auth_id = self.requested_name
        self._authenticated(State.LEGACY, XEP0114, now, etree.tostring(tree))

    # -- after authentication ----------------------------------------------------

    def _on_packet(self, element: Element, now: float) -> None:
        self.protocol_port.inbound(self, element, now)


# What each state does with each event; a missing entry is a protocol error.
_HANDLERS: dict[State, dict[type[StreamEvent], _Handler]] = {
    State.HEADER: {StreamOpen: Connection._on_header},
    State.NEGOTIATING: {Element: Connection._on_negotiation, StreamClose: Connection._on_stream_close},
    State.STARTING_TLS: {Element: Connection._on_negotiation, StreamClose: Connection._on_stream_close},
    State.HANDSHAKE: {Element: Connection._on_handshake, StreamClose: Connection._on_stream_close},
    State.ONLINE: {Element: Connection._on_packet, StreamClose: Connection._on_stream_close},
    State.LEGACY: {Element: Connection._on_packet, StreamClose: Connection._on_stream_close},
    State.CLOSED: {},
}
assert set(_HANDLERS) == set(_MOVES) == set(State)


def _error_kind(condition: str) -> str:
    """How jabberd2's log line names a stream error we raise."""
    return "XML parse error" if condition == "xml-not-well-formed" else "Stream error"


def _namespace_keys(router: Any, default_ns: Optional[str], prefixes: dict[str, str]
                    ) -> tuple[ContextKey, ContextKey, ContextKey, tuple[bytes, ...]]:
    """(output key, input key, plain input key, extra prefixes) of a stream:
    real jabberd2 components declare more on their header (xmlns:ack), and a
    packet that uses none of those means what it would on a plain stream."""
    extra = tuple(f"{prefix}:".encode() for prefix, uri in prefixes.items()
                  if (prefix, uri) != ("stream", STREAMS_NS))
    return (router.output_context(default_ns), router.context_key(default_ns, prefixes),
            router.output_context(default_ns), extra)


def stream_features(negotiating: bool, offer_tls: bool) -> bytes:
    """<stream:features/>: STARTTLS and SASL while negotiating, else nothing."""
    parts = [f"<stream:features xmlns:stream='{STREAMS_NS}'>"]
    if negotiating:
        if offer_tls:
            parts.append(f"<starttls xmlns='{NS_TLS}'/>")
        parts.append(f"<mechanisms xmlns='{NS_SASL}'><mechanism>DIGEST-MD5</mechanism></mechanisms>")
    parts.append("</stream:features>")
    return "".join(parts).encode()


#: Why a handshake is refused when the secret is gone (a SIGHUP removed it): not the peer's fault.
NO_SECRET = "support for legacy components not available"


def handshake_refusal(offered: str, stream_id: str, secret: Optional[str]) -> Optional[str]:
    """XEP-0114's check, the hex SHA-1 of the stream id and the secret:
    None when ``offered`` is that, else the stream error's text (protocol §5.1)."""
    if len(offered) != 40:
        return "handshake isn't long enough to be a sha1 hash"
    if secret is None:
        return NO_SECRET
    expected = _sha1((stream_id + secret).encode()).hexdigest()
    if not _compare_digest(offered.encode(), expected.encode()):
        return "hash didn't match, auth failed"
    return None


def _stream_error_text(element: Element) -> str:
    """What a peer's <stream:error/> says: its <text/>, else its content."""
    tree = element.tree()
    text = None
    for child in tree:
        # A comment's tag is not a str (lxml gives it the Comment function).
        if isinstance(child.tag, str) and child.tag.endswith("}text"):
            text = child.text
    return text or tree.text or element.raw.decode("utf-8", "replace")


def sender_key(connection: Connection, raw: bytes) -> Optional[ContextKey]:
    """The namespace context a sender's raw packet needs: the plain one
    unless it uses a prefix its stream header declared beyond xmlns:stream
    (a cheap byte search; a false alarm only costs a re-serialisation)."""
    extra = connection.extra_prefixes
    if extra:
        for prefix in extra:
            if prefix in raw:
                return connection.input_key
    return connection.plain_key
