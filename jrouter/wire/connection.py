"""One peer connection: its stream, its negotiation and its output buffer.

Theory of operation
-------------------
Every TCP peer of the router is a ``Connection``. Bytes go in through
``receive()``; what the router has to say to the peer piles up in an output
buffer that the shell drains with ``data_to_send()`` (the connection calls
``on_output()`` when the buffer stops being empty, so the shell knows to
wake its writer). Nothing here touches a socket, the clock or randomness:
stream ids and SASL nonces come from ``router.make_id()``.

A connection starts in ``HEADER``. The stream header decides the protocol:
the default namespace ``jabber:component:accept`` means XEP-0114 (the
``HANDSHAKE`` state, then ``LEGACY``); anything else is jabberd2's component
protocol (``NEGOTIATING`` for STARTTLS and SASL, a stream restart, then
``ONLINE``). Once a peer is authenticated its elements go to the router
(``core.Router``), which owns names and routing.

A fatal problem queues the stream error and ``</stream:stream>``, moves to
``CLOSED`` and raises ``ConnectionClosed``; the shell then sends what is
queued and closes the socket.
"""

import enum
import hashlib
import hmac

from jrouter.errors import ConnectionClosed
from jrouter.wire.counters import Counters
from jrouter.wire.xmlstream import (STREAM_CLOSE, STREAMS_NS, Element, StreamClose, StreamError,
                        StreamOpen, StreamReader, stream_error, stream_header)

NS_COMPONENT = "http://jabberd.jabberstudio.org/ns/component/1.0"
NS_ACCEPT = "jabber:component:accept"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"

STREAM_ROOT = STREAMS_NS + " stream"
STREAM_ERROR = STREAMS_NS + " error"


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


class Connection:
    """One peer, as the router sees it."""

    def __init__(self, router, ip, port):
        self.router = router
        self.ip = ip
        self.port = port
        self.label = f"[{ip}, port={port}]"
        self.reader = StreamReader(router.config.stanza_size_limit)
        self.state = State.HEADER
        self.stream_id = None
        self.header_sent = False
        self.legacy = False
        self.default_ns = None
        self.context = None          # key of the namespace context our stream gives the peer
        self.input_key = None        # key of the namespace context of the peer's stream
        self.plain_key = None        # the same without prefixes beyond xmlns:stream
        self.extra_prefixes = ()     # b"p:" for each of those prefixes
        self.requested_name = None   # XEP-0114: the header's 'to'
        self.stream_from = None      # XEP-0114: the header's 'from'
        self.payload_ns = NS_ACCEPT  # XEP-0114: the namespace its stanzas are delivered in
        self.tls_restart_offset = 0
        self._restart_leftover = None  # bytes after the element that restarted the stream
        self.sasl = None
        self.user = None             # SASL username (for ACLs) or the XEP-0114 name
        self.auth_id = None
        self.realm = None
        self.tls_active = False
        self.names = {}              # names bound by this connection (ordered set)
        self.throttle_queue = None   # while throttled: [(bytes, route, sender key)] held back
        self.out = []
        # (position in out, route, its sender's namespace key) of each routed
        # packet in out, so one that is never sent can be routed again
        # without parsing its bytes (protocol §6.6).
        self.routed = []
        self.closing = False
        self.on_output = _nothing
        # Where an authenticated peer's elements go, by state.
        self._packet_handlers = {State.ONLINE: router.component_packet,
                                 State.LEGACY: router.legacy_packet}
        self.last_activity = 0.0
        self.connected_at = 0.0      # set by the shell, from its clock
        self.counters = Counters()

    def __repr__(self):
        return f"<Connection {self.ip}:{self.port} {self.state.name}>"

    # -- input -------------------------------------------------------------

    def receive(self, data):
        """Feed bytes from the peer. Raises ConnectionClosed when done."""
        self.counters.bytes_in += len(data)
        while data and self.state is not State.CLOSED:
            data = self._receive_once(data)
        if self.closing:
            raise ConnectionClosed()

    def _receive_once(self, data):
        """Handle what ``data`` completes; return bytes that belong to a
        restarted stream (sent right after SASL success), else b''."""
        try:
            events = self.reader.feed(data)
        except StreamError as exc:
            # What the peer completed before the error is handled first. If
            # that restarted the stream, the error came from reading the new
            # stream's bytes with the old parser: they are read again.
            leftover = self._handle(exc.events)
            if leftover is not None:
                return leftover
            self._log_error(exc.condition, exc.text)
            self.fail(exc.condition, exc.text)
        return self._handle(events) or b""

    def _handle(self, events):
        """Act on events; after a stream restart stop and return the bytes
        that follow it (maybe b''), else return None."""
        handle_packet = self._packet_handlers.get(self.state)
        counters = self.counters
        for event in events:
            # The fast path: an authenticated peer's packet.
            if handle_packet is not None and event.__class__ is Element and not self.closing:
                counters.packets_in += 1
                handle_packet(self, event)
                continue
            handler = _HANDLERS[self.state].get(event.__class__)
            if handler is None:
                self.fail("bad-format")
            handler(self, event)
            if self.state is State.CLOSED:
                break
            if self._restart_leftover is not None:
                leftover, self._restart_leftover = self._restart_leftover, None
                return leftover
            handle_packet = self._packet_handlers.get(self.state)
        return None

    def _move(self, state):
        if state not in _MOVES[self.state]:
            self.fail("bad-format", f"not allowed while {self.state.value}")
        self.state = state

    def _end(self, goodbye=b""):
        """Queue ``goodbye`` (unless the stream is over already) and move to
        CLOSED: the one way a stream ends, from any state."""
        if self.state is not State.CLOSED:
            if goodbye:
                self.send(goodbye)
            self.state = State.CLOSED      # legal from every state (_MOVES)
        self.closing = True

    @property
    def authenticated(self):
        return self.state in _AUTHENTICATED

    @property
    def starting_tls(self):
        """The shell must start TLS now (``<proceed/>`` is queued)."""
        return self.state is State.STARTING_TLS

    # -- output ------------------------------------------------------------

    def send(self, data):
        """Queue bytes for the peer, bypassing the throttle queue."""
        out = self.out
        out.append(data)
        if len(out) == 1:
            self.on_output()

    def deliver(self, data, route=None, key=None):
        """Queue a routed packet: held back while the peer throttles us.
        ``route`` (with its sender's namespace ``key``) is the unicast route
        the bytes carry, kept until they are handed to the shell."""
        counters = self.counters
        counters.packets_out += 1
        if self.throttle_queue is not None:
            counters.throttled += 1
            self.throttle_queue.append((data, route, key))
            return
        out = self.out
        if route is not None:
            self.routed.append((len(out), route, key))
        out.append(data)
        if len(out) == 1:
            self.on_output()

    def release_throttled(self):
        """Queue what was held back while the peer throttled us, in order."""
        held, self.throttle_queue = self.throttle_queue or [], None
        for data, route, key in held:
            if route is not None:
                self.routed.append((len(self.out), route, key))
            self.send(data)

    def take_unsent(self):
        """The routes queued for this peer and not handed to the shell yet,
        taken out of its queues as (route, sender key), oldest first; what is
        not a routed packet (a goodbye) stays queued."""
        routed = self.routed
        if routed:
            taken = {position for position, _route, _key in routed}
            self.out[:] = [data for i, data in enumerate(self.out) if i not in taken]
        unsent = [(route, key) for _position, route, key in routed]
        unsent.extend((route, key) for _data, route, key in self.throttle_queue or () if route is not None)
        self.routed = []
        if self.throttle_queue:
            self.throttle_queue = []
        return unsent

    def data_to_send(self):
        """Everything queued for the peer, as one bytes object."""
        out = self.out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        if self.routed:
            self.routed = []
        self.counters.bytes_out += len(data)
        return data

    def fail(self, condition, text=None):
        """Queue a stream error and the close, then raise (house rule 3)."""
        self._end(stream_error(condition, text, self.header_sent))
        raise ConnectionClosed(condition)

    def kick(self, condition, text=None):
        """End the stream from outside its own input (a newer connection of
        the same instance replaces it): queue the error, wake the writer."""
        self._end(stream_error(condition, text, self.header_sent))
        self.on_output()

    def close(self):
        """Close our side of the stream politely (shutdown, peer's close)."""
        if self.state is not State.CLOSED and not self.header_sent:
            self.send(stream_header(None, declaration=False))
        self._end(STREAM_CLOSE)

    def forget(self):
        """The socket is gone: nothing more is said or sent."""
        self._end()

    def _log_error(self, condition, text):
        generic = "XML parse error" if condition == "xml-not-well-formed" else "Stream error"
        self.router.log.notice(f"{self.label} error: {generic} ({text or condition})")

    # -- stream header (protocol §3.2) -------------------------------------

    def _on_header(self, header):
        if header.name != STREAM_ROOT:
            self.fail("bad-format")
        version = header.attrs.get("version")
        if version is not None and version != "1.0":
            self.fail("unsupported-version")
        self.default_ns = header.default_ns
        self.stream_id = self.router.make_id()
        legacy = self.user is None and header.default_ns == NS_ACCEPT
        if legacy:
            # XEP-0114 has no stream features: answer a version='1.0' header
            # as a pre-1.0 stream (RFC 6120 4.7.5), as Prosody and ejabberd
            # do, so that the component goes on to its <handshake/>.
            version = None
        self.send(stream_header(header.default_ns, self.stream_id, to=header.attrs.get("from"),
                                from_=header.attrs.get("to"), version=version))
        self.header_sent = True
        self.context = self.router.output_context(header.default_ns)
        self.input_key = self.router.context_key(header.default_ns, header.prefixes)
        # Real jabberd2 components declare more on their header (xmlns:ack);
        # a packet that uses none of those means what it would on a plain stream.
        self.plain_key = self.router.output_context(header.default_ns)
        self.extra_prefixes = tuple(
            f"{prefix}:".encode() for prefix, uri in header.prefixes.items()
            if (prefix, uri) != ("stream", STREAMS_NS))
        if self.user is not None:
            self._open_authenticated(header, version)
            return
        self.legacy = legacy
        if legacy:
            self._open_legacy(header)
        else:
            self._move(State.NEGOTIATING)
        if version is not None:
            self.send(self._features())

    def _features(self):
        parts = [f"<stream:features xmlns:stream='{STREAMS_NS}'>"]
        if self.state is State.NEGOTIATING or self.state is State.HANDSHAKE:
            if self.router.tls_available and not self.tls_active:
                parts.append(f"<starttls xmlns='{NS_TLS}'/>")
            parts.append(f"<mechanisms xmlns='{NS_SASL}'><mechanism>DIGEST-MD5</mechanism></mechanisms>")
        parts.append("</stream:features>")
        return "".join(parts).encode()

    def _open_authenticated(self, header, version):
        if not self.realm:
            self.realm = header.attrs.get("to") or ""
        self.auth_id = f"{self.user}@{self.realm}"
        self._move(State.ONLINE)
        self.router.log.notice(f"{self.label} authenticated as {self.auth_id}")
        if version is not None:
            self.send(self._features())

    def _open_legacy(self, header):
        self._move(State.HANDSHAKE)
        if self.router.config.secret is None:
            self.fail("invalid-namespace", "support for legacy components not available")
        to = header.attrs.get("to")
        if to is None:
            self.fail("host-unknown", "no 'to' attribute on stream header")
        self.requested_name = to
        self.stream_from = header.attrs.get("from")   # the instance's identity, if it gives one

    def _on_stream_close(self, _event):
        self.close()

    # -- STARTTLS and SASL (protocol §3.5, §3.6) -----------------------------

    def _on_negotiation(self, element):
        name = element.name
        if name == NS_TLS + " starttls":
            self._on_starttls(element)
        elif name.startswith(NS_SASL):
            self._on_sasl(element)
        elif name == STREAM_ERROR:
            self._on_peer_stream_error(element)
        # Anything else before authentication is dropped (protocol §3.7).

    def _on_starttls(self, element):
        if self.state is not State.NEGOTIATING or not self.router.tls_available or self.tls_active:
            return      # jabberd2 ignores it silently (protocol §3.5)
        self.send(f"<proceed xmlns='{NS_TLS}'/>".encode())
        self._move(State.STARTING_TLS)
        self.tls_restart_offset = element.end

    def tls_started(self):
        """The shell finished the TLS handshake: a new stream begins.
        Returns bytes that arrived after <starttls/> in the clear (a
        well-behaved peer sends none)."""
        self.tls_active = True
        leftover = self.reader.restart(self.tls_restart_offset)
        self._restart_stream()
        return leftover

    def _restart_stream(self):
        self.header_sent = False
        self._move(State.HEADER)

    def _on_sasl(self, element):
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
            self._restart_leftover = self.reader.restart(element.end)
            self._restart_stream()

    def _on_peer_stream_error(self, element):
        tree = element.tree()
        text = None
        for child in tree:
            if child.tag.endswith("}text"):
                text = child.text
        if not text:
            text = tree.text or element.raw.decode("utf-8", "replace")
        self.router.log.notice(f"{self.label} error: Stream error ({text})")
        # jabberd2 closes without a word (protocol §3.3).
        self._end()

    # -- XEP-0114 handshake (protocol §5.1) ------------------------------------

    def _on_handshake(self, element):
        if element.local_name != "handshake":
            if element.name == STREAM_ERROR:
                self._on_peer_stream_error(element)
            return      # anything else before the handshake is dropped
        tree = element.tree()
        offered = tree.text or ""
        if len(offered) != 40:
            self.fail("not-authorized", "handshake isn't long enough to be a sha1 hash")
        secret = self.router.config.secret
        expected = hashlib.sha1((self.stream_id + secret).encode()).hexdigest()
        if not hmac.compare_digest(offered.encode(), expected.encode()):
            self.fail("not-authorized", "hash didn't match, auth failed")
        tree.text = None
        from lxml import etree

        self.send(etree.tostring(tree))
        self.user = self.auth_id = self.requested_name
        self.router.log.notice(f"{self.label} authenticated as {self.auth_id}")
        self._move(State.LEGACY)
        self.router.legacy_online(self)

    # -- after authentication ----------------------------------------------------

    def _on_packet(self, element):
        self.router.component_packet(self, element)

    def _on_legacy_packet(self, element):
        self.router.legacy_packet(self, element)


# What each state does with each event; a missing entry is a protocol error.
_HANDLERS = {
    State.HEADER: {StreamOpen: Connection._on_header},
    State.NEGOTIATING: {Element: Connection._on_negotiation, StreamClose: Connection._on_stream_close},
    State.STARTING_TLS: {Element: Connection._on_negotiation, StreamClose: Connection._on_stream_close},
    State.HANDSHAKE: {Element: Connection._on_handshake, StreamClose: Connection._on_stream_close},
    State.ONLINE: {Element: Connection._on_packet, StreamClose: Connection._on_stream_close},
    State.LEGACY: {Element: Connection._on_legacy_packet, StreamClose: Connection._on_stream_close},
    State.CLOSED: {},
}
assert set(_HANDLERS) == set(_MOVES) == set(State)


def _nothing():
    pass


def sender_key(connection, raw):
    """The namespace context a sender's raw packet needs: the plain one
    unless it uses a prefix its stream header declared beyond xmlns:stream
    (a cheap byte search; a false alarm only costs a re-serialisation)."""
    extra = connection.extra_prefixes
    if extra:
        for prefix in extra:
            if prefix in raw:
                return connection.input_key
    return connection.plain_key
