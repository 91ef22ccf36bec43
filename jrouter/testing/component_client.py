"""The component side of the router's two protocols, sans-IO: bytes in, events and bytes out.

Owns: what a component says up to the point where it may route, and what it
makes of the answers: the stream header (protocol §3.2, XEP-0114 §3), STARTTLS
up to ``<proceed/>`` (§3.5), SASL DIGEST-MD5 driven by the router's challenges
and checked against its rspauth (§3.6, with ``sasl_client.DigestMD5Client``),
the restart after ``<success/>``, ``<bind/>`` and its reply (§4.2), the
XEP-0114 handshake (§5.1).  For tests and the benchmark; the router never
imports it.
Must not know: sockets, the clock, lxml (the benchmark's interpreter may lack
it), or the router's code: the namespaces are declared here, so a wrong one
on either side fails the exchange instead of agreeing with itself.

Theory of operation
-------------------
``receive(data)`` returns, in order, the stream's own events (``StreamOpen``,
``Element``, ``StreamClose`` of ``jrouter.wire.xmlstream``) with this module's
``Event`` s right after the element that caused them.  Answers that need no
decision (the SASL response, the restarted stream's header) are queued at
once, as in h2 and wsproto, for ``data_to_send()``.  The caller's requests are
legal in some states only (``_MOVES``); one out of turn raises
``LocalProtocolError``.  The client keeps state, not history: stanzas reach
the caller as ``Element`` events and nowhere else.

    START --open--> OPENING --header--> OPEN --features--> READY
    START --header (the caller sent its own)--> OPEN
    READY --authenticate--> SASL --success--> RESTARTING --features--> ONLINE
    SASL --failure--> READY            READY --starttls--> STARTTLS --proceed--> START
    OPEN/READY --handshake--> HANDSHAKE --<handshake/>--> ONLINE
    any --<stream:error/> or </stream:stream>--> CLOSED
"""

from __future__ import annotations

import base64
import enum
import hashlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

from jrouter.testing.sasl_client import DigestMD5Client
from jrouter.wire.xmlstream import STREAMS_NS, Element, StreamClose, StreamError, StreamOpen, StreamReader
from jrouter.wire.xmlwrite import quoteattr

NS_COMPONENT = "http://jabberd.jabberstudio.org/ns/component/1.0"
NS_ACCEPT = "jabber:component:accept"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"


def header(ns: Optional[str] = NS_COMPONENT, version: bool = True, to: Optional[str] = None,
           from_: Optional[str] = None) -> bytes:
    """A component's opening stream header (``ns=None``: no default namespace)."""
    attrs = (f" xmlns='{ns}'" if ns else "") + (" version='1.0'" if version else "")
    attrs += (f" to='{to}'" if to else "") + (f" from='{from_}'" if from_ else "")
    return f"<?xml version='1.0'?><stream:stream xmlns:stream='{STREAMS_NS}'{attrs}>".encode()


class LocalProtocolError(Exception):
    """The caller asked for something the client's state does not allow."""


class RemoteProtocolError(Exception):
    """The router broke the protocol in a way a real component would refuse (a wrong rspauth)."""


class Event:
    """Something the router's answer means, beyond the element that carried it."""


@dataclass(frozen=True)
class Authenticated(Event):
    """SASL ``<success/>`` (the restarted stream is under way) or the ``<handshake/>`` reply."""


@dataclass(frozen=True)
class AuthFailed(Event):
    """SASL ``<failure/>`` (the stream stays open), or the stream error ending a handshake."""
    condition: Optional[str]
    text: Optional[str]
    raw: bytes


@dataclass(frozen=True)
class Bound(Event):
    name: str


@dataclass(frozen=True)
class BindRefused(Event):
    name: str
    error: str


@dataclass(frozen=True)
class ProceedToTls(Event):
    """``<proceed/>``: the caller starts TLS now, then opens a new stream (state START)."""


class State(enum.Enum):
    START = "nothing said on this stream yet"
    OPENING = "our header sent, waiting for the router's"
    OPEN = "the router's header received"
    READY = "stream features received: SASL or STARTTLS may start"
    SASL = "<auth/> sent, answering challenges"
    STARTTLS = "<starttls/> sent, waiting for <proceed/>"
    RESTARTING = "SASL succeeded, the new stream is opening"
    HANDSHAKE = "XEP-0114 <handshake/> sent"
    ONLINE = "authenticated: binds and stanzas"
    CLOSED = "the router ended the stream"


# Every legal move; CLOSED is reachable from everywhere (a stream error, a close).
_MOVES = {
    State.START: {State.OPENING, State.OPEN},
    State.OPENING: {State.OPEN},
    State.OPEN: {State.READY, State.HANDSHAKE},
    State.READY: {State.SASL, State.STARTTLS, State.HANDSHAKE},
    State.SASL: {State.READY, State.RESTARTING},
    State.STARTTLS: {State.START},
    State.RESTARTING: {State.ONLINE},
    State.HANDSHAKE: {State.ONLINE},
    State.ONLINE: set(),
    State.CLOSED: set(),
}

FEATURES = STREAMS_NS + " features"
STREAM_ERROR = STREAMS_NS + " error"
Received = Union[StreamOpen, Element, StreamClose, Event]


class ComponentClient:
    """One component's side of one connection to the router."""

    def __init__(self, stream_header: Optional[bytes] = None) -> None:
        self.stream_header = stream_header or header()   # what open() and the SASL restart send
        self.reader = StreamReader()
        self.state = State.START
        self.stream_id: Optional[str] = None
        self.bound: List[str] = []                        # names granted, in order
        self.refused: Dict[str, str] = {}                 # names refused -> the error
        self.failure: Optional[AuthFailed] = None         # the last refusal of SASL or handshake
        self.stream_error: Optional[Tuple[Optional[str], Optional[str]]] = None
        self.server_verified = False                      # the router proved it knows the password
        self._out: List[bytes] = []
        self._sasl: Optional[DigestMD5Client] = None
        self._binds: List[str] = []                       # names asked for, not answered yet
        self._restart_at: Optional[int] = None            # stream offset after <success/>
        self._mark: Optional[int] = 0                     # offset after the last element that moved us

    # -- what the caller asks for --------------------------------------------

    @property
    def authenticated(self) -> bool:
        return self.state in (State.RESTARTING, State.ONLINE)

    def data_to_send(self) -> bytes:
        data, self._out = b"".join(self._out), []
        return data

    def send(self, data: Union[bytes, str]) -> None:
        """Queue a stanza (or any bytes) as given."""
        self._out.append(data.encode() if isinstance(data, str) else data)

    def open(self, stream_header: Optional[bytes] = None) -> None:
        """Queue the header; a header given here is also the one sent again after SASL."""
        self._move(State.OPENING)
        self.stream_header = stream_header or self.stream_header
        self.send(self.stream_header)

    def authenticate(self, username: str, password: str, cnonce: Optional[str] = None,
                     authzid: Optional[str] = None) -> None:
        """Start SASL DIGEST-MD5; the challenges are answered as they come."""
        self._move(State.SASL)
        self._sasl = DigestMD5Client(username, password, cnonce=cnonce, authzid=authzid)
        self.send(f"<auth xmlns='{NS_SASL}' mechanism='DIGEST-MD5'/>")

    def starttls(self) -> None:
        self._move(State.STARTTLS)
        self.send(f"<starttls xmlns='{NS_TLS}'/>")

    def handshake(self, secret: str) -> None:
        """XEP-0114 §3: the hex SHA-1 of the router's stream id and the secret."""
        self._move(State.HANDSHAKE)
        digest = hashlib.sha1(((self.stream_id or "") + secret).encode()).hexdigest()
        self.send(f"<handshake>{digest}</handshake>")

    def bind(self, name: str, multi: Optional[str] = None, default: bool = False,
             log: bool = False, extra: str = "") -> None:
        """Ask for a name (protocol §4.2); ``extra`` is more attributes, written as given."""
        if not self.authenticated:
            raise LocalProtocolError(f"bind while {self.state.value}")
        self._binds.append(name)
        attrs = f" name='{name}'" + (f" multi='{multi}'" if multi is not None else "") + extra
        children = ("<default/>" if default else "") + ("<log/>" if log else "")
        self.send(f"<bind{attrs}>{children}</bind>" if children else f"<bind{attrs}/>")

    def restart(self) -> None:
        """A new stream on the same connection (after SASL or TLS): a fresh reader, nothing sent."""
        self.reader = StreamReader()

    def hand_over(self) -> bytes:
        """Stop reading: the bytes that came after the element that last moved the client
        (a bind or handshake reply), for a caller that reads the rest its own way.
        Call it straight after the receive() that reported that move."""
        return self.reader.restart(self._mark or 0)

    def _move(self, state: State) -> None:
        if state is not State.CLOSED and state not in _MOVES[self.state]:
            raise LocalProtocolError(f"cannot go from {self.state.name} to {state.name}")
        self.state = state

    # -- what the router says ------------------------------------------------

    def receive(self, data: bytes) -> List[Received]:
        """Parse what arrived; the stream events and what they mean, in order."""
        received: List[Received] = []
        while data:
            try:
                events = self.reader.feed(data)
            except StreamError as exc:
                # The old parser trips over the new stream's header: what came
                # before the error stands, and the restart reads the rest.
                self._handle(exc.events, received)
                if self._restart_at is None:
                    raise
            else:
                self._handle(events, received)
            data = self._restart_stream()
        return received

    def _restart_stream(self) -> bytes:
        """After ``<success/>``: a new reader and our header again; the bytes
        that came behind it, which belong to the new stream."""
        if self._restart_at is None:
            return b""
        offset, self._restart_at = self._restart_at, None
        self.send(self.stream_header)
        return self.reader.restart(offset)

    def _handle(self, events: List[Union[StreamOpen, Element, StreamClose]],
                received: List[Received]) -> None:
        for event in events:
            received.append(event)
            if isinstance(event, StreamOpen):
                self.stream_id = event.attrs.get("id")
                if self.state in (State.START, State.OPENING):
                    self._move(State.OPEN)
            elif isinstance(event, StreamClose):
                self._move(State.CLOSED)
            else:
                handler = (ComponentClient._on_stream_error if event.name == STREAM_ERROR
                           else _HANDLERS.get(self.state, {}).get(event.name))
                meaning = handler(self, event) if handler else None
                if meaning is not None:
                    received.append(meaning)
                    self._mark = event.end
            if self._restart_at is not None:
                return      # the rest belongs to the new stream

    def _on_features(self, element: Element) -> None:
        self._move(State.READY if self.state is State.OPEN else State.ONLINE)

    def _on_challenge(self, element: Element) -> None:
        assert self._sasl is not None
        payload = _payload(element)
        if b"rspauth=" not in payload:      # the digest challenge
            answer = base64.b64encode(self._sasl.respond(payload)).decode()
            self.send(f"<response xmlns='{NS_SASL}'>{answer}</response>")
            return
        self._verify(payload)               # GNU SASL's way: rspauth in a second challenge
        self.send(f"<response xmlns='{NS_SASL}'/>")

    def _on_success(self, element: Element) -> Event:
        payload = _payload(element)
        if payload:
            self._verify(payload)
        self._move(State.RESTARTING)
        self._sasl = None
        self._restart_at = element.end
        return Authenticated()

    def _on_failure(self, element: Element) -> Event:
        self._move(State.READY)
        self._sasl = None
        self.failure = AuthFailed(*_condition(element), raw=element.raw)
        return self.failure

    def _verify(self, payload: bytes) -> None:
        assert self._sasl is not None
        if not self._sasl.verify(payload):
            raise RemoteProtocolError(f"the router's rspauth is wrong: {payload!r}")
        self.server_verified = True

    def _on_proceed(self, element: Element) -> Event:
        self._move(State.START)
        self.restart()      # what follows is TLS, then a new stream
        return ProceedToTls()

    def _on_handshake(self, element: Element) -> Event:
        self._move(State.ONLINE)
        return Authenticated()

    def _on_bind_reply(self, element: Element) -> Optional[Event]:
        if not self._binds:
            return None     # a bind the caller wrote by hand
        name = self._binds.pop(0)
        error = element.attrs.get("error")
        if error:
            self.refused[name] = error
            return BindRefused(name, error)
        self.bound.append(name)
        return Bound(name)

    def _on_stream_error(self, element: Element) -> Optional[Event]:
        self.stream_error = _condition(element)
        handshaking = self.state is State.HANDSHAKE
        self._move(State.CLOSED)
        if not handshaking:
            return None
        self.failure = AuthFailed(*self.stream_error, raw=element.raw)
        return self.failure


# What each state makes of each element; any other element is a stanza for the caller.
_Handler = Callable[[ComponentClient, Element], Optional[Event]]
_HANDLERS: Dict[State, Dict[str, _Handler]] = {
    State.OPEN: {FEATURES: ComponentClient._on_features},
    State.SASL: {NS_SASL + " challenge": ComponentClient._on_challenge,
                 NS_SASL + " success": ComponentClient._on_success,
                 NS_SASL + " failure": ComponentClient._on_failure},
    State.STARTTLS: {NS_TLS + " proceed": ComponentClient._on_proceed},
    State.RESTARTING: {FEATURES: ComponentClient._on_features,
                       NS_COMPONENT + " bind": ComponentClient._on_bind_reply},
    State.HANDSHAKE: {NS_ACCEPT + " handshake": ComponentClient._on_handshake},
    State.ONLINE: {NS_COMPONENT + " bind": ComponentClient._on_bind_reply},
}


def _payload(element: Element) -> bytes:
    """The decoded base64 text of a SASL element (RFC 6120 §6.4.2: "=" is empty)."""
    text = (_tree(element).text or "").strip()
    return b"" if text in ("", "=") else base64.b64decode(text)


def _condition(element: Element) -> Tuple[Optional[str], Optional[str]]:
    """(condition, text) of a ``<failure/>`` or ``<stream:error/>``."""
    condition = text = None
    for child in _tree(element):
        local = child.tag.rpartition("}")[2]
        if local == "text":
            text = child.text
        elif condition is None:
            condition = local
    return condition, text


def _tree(element: Element) -> ET.Element:
    """The element as a stdlib tree, in its stream's namespaces (not ``Element.tree()``:
    the benchmark's load generator may run on an interpreter without lxml)."""
    context = element.context
    decls = "".join(f" xmlns:{p}={quoteattr(u)}" for p, u in context.prefixes.items())
    if context.default_ns:
        decls += f" xmlns={quoteattr(context.default_ns)}"
    return ET.fromstring(f"<w{decls}>".encode() + element.raw + b"</w>")[0]
