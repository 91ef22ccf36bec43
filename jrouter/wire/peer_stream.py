"""One link between two jrouter nodes, sans-IO: both ends of it (docs/cluster.md).

Owns: what a node says to another node it shares a route table with, from the
first byte to the last: the stream header with the peer role, STARTTLS up to
"start TLS now", SASL DIGEST-MD5 with the node id and the cluster secret, the
restart, the ``<hello/>`` each way, then packets (a route for one member of a
name, or a broadcast), the whitespace keepalive and the close; and which of
the packets queued here have not been written yet (``take_unsent``).

Must not know: sockets, the clock, randomness (stream ids, nonces and the
table revision are handed in), routing (which node or member gets a packet),
or how a route's bytes came to mean what they mean on this stream (the
sender's routing makes them so; see ``PeerStream.forward``).

Theory of operation
-------------------
Bytes from the other node go in through ``receive_data(data)``, which returns
events (``PeerReady``, ``Forwarded``, ``Broadcast``, ``PeerClosed``); what this
end has to say piles up in an output buffer, drained with ``data_to_send()``,
because reading often makes the stream answer on its own (a header, features,
a challenge), as in h2 and wsproto. The shell reports every write with
``sent(count)``, so that a link that dies hands back exactly the packets the
socket never took.

The dialling node is a ``PeerDialer``; the node dialled runs a
``PeerAcceptor``. Both move through one state table (``_MOVES``):

    dialer    HEADER -> FEATURES -> [TLS_REQUESTED -> STARTING_TLS -> HEADER -> FEATURES]
              -> AUTHENTICATING -> HEADER -> HELLO -> OPEN -> CLOSING -> CLOSED
    acceptor  HEADER -> NEGOTIATING -> [STARTING_TLS -> HEADER -> NEGOTIATING]
              -> AUTHENTICATING -> HEADER -> HELLO -> OPEN -> CLOSING -> CLOSED

What a state does with each event is in ``_DIALER`` and ``_ACCEPTOR``; an event a
state has no entry for is a protocol error. A fatal problem queues
``<stream:error/>`` and ``</stream:stream>``, moves to CLOSED and raises
``PeerProtocolError`` (``PeerAuthFailed`` for authentication); the shell sends
what is queued and closes. Calling a method the state does not allow (a
``forward`` before the link is open) raises ``PeerStateError``: the caller's bug.

Packets: a marker element, then the routes it announces, as siblings at the
top of the stream (``<f h='1' m='sm-1' n='00003'/><route/><route/><route/>``):
consecutive packets for the same member and hops share one marker, so a
busy link pays for a marker about once per write, not once per packet. The
routes' bytes are exactly those the sending node was handed, and the
receiving node's ``StreamReader`` makes of them the ``Element`` a local
component's route would give (same attributes, first child, namespace
context), without a second parse. The count is written when the shell takes
the bytes (``data_to_send``), in five digits, so its length is known when the
run begins. The rules a packet must keep, and why some break the link and
one is only dropped, are in docs/cluster.md.
"""

from __future__ import annotations

import enum
import hmac
import re
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, NoReturn, Optional, Union

from jrouter.errors import JrouterError, ProtocolError
from jrouter.wire.counters import Counters
from jrouter.wire.sasl import (NS_SASL, SaslError, SaslEncodingError, SaslServer, b64decode, b64encode,
                               digest_response, parse_directives, password_bytes, quote)
from jrouter.wire.xmlstream import STREAMS_NS, Element, StreamClose, StreamError, StreamOpen, StreamReader
from jrouter.wire.xmlwrite import STREAM_CLOSE, STREAM_ERRORS_NS, quoteattr, stream_error, stream_header

if TYPE_CHECKING:
    from typing import TypeAlias

NS_COMPONENT = "http://jabberd.jabberstudio.org/ns/component/1.0"
NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"
#: Our elements on a peer link; the ``0`` is the protocol's version.
NS_PEER = "urn:jrouter:peer:0"
#: The stream header's ``to`` on a peer link: no component sends it, so a
#: component dialling the peer port, or a node dialling a component port, is
#: told at once (``host-unknown``; a router's port answers SASL "not-authorized").
PEER_ROLE = "jrouter-peer"
#: The element limit until SASL succeeds (SASL elements are a few hundred bytes).
PREAUTH_ELEMENT_SIZE = 16384

ROUTE = NS_COMPONENT + " route"
_STREAM_ROOT = STREAMS_NS + " stream"
_STREAM_ERROR = STREAMS_NS + " error"
_FEATURES = STREAMS_NS + " features"
_FORWARD = NS_PEER + " f"
# Routes wrapped from an XEP-0114 stanza that inherited its stream's namespace:
# the receiving node gives an XEP-0114 member the stanza as it was sent.
_FORWARD_AS_SENT = NS_PEER + " x"
_BROADCAST = NS_PEER + " b"
# Session-control routes a member of the sending node sent (``m``): the
# receiver learns where sessions live from them and delivers nothing.
_SESSION = NS_PEER + " s"
# <r m='MEMBER'/>: end your member MEMBER: a new connection of the same
# instance arrived at the sending node (replace='half-open', protocol §6.5).
_REPLACE = NS_PEER + " r"
# <t n='NAME' k='KEY' o='NODE' m='MEMBER'/>: under affinity='traffic' the user
# KEY of NAME is on member MEMBER of node NODE (docs/cluster.md §8, Affinity).
_AFFINITY = NS_PEER + " t"
_HELLO = NS_PEER + " hello"
# How many routes the sender of <a/> has read on this link so far (docs/cluster.md §3).
_ACK = NS_PEER + " a"
_ACK_HEAD = b"<a xmlns='" + NS_PEER.encode() + b"' n='"
_DIGEST_URI = "jabberd-router/" + PEER_ROLE
_ERRORS_PREFIX = "{%s}" % STREAM_ERRORS_NS
#: The namespaces every peer stream header declares, and no others: a route
#: read off a link means what it means on a plain component stream.
_PREFIXES = {"stream": STREAMS_NS}


def dials(local: str, remote: str) -> bool:
    """Whether node ``local`` dials node ``remote`` (else it waits for
    ``remote`` to dial it): the lower node id dials, so two nodes have one
    link, and the acceptor refuses a link from a node that should wait."""
    return local < remote


class State(enum.Enum):
    HEADER = "waiting for the other end's stream header"
    FEATURES = "dialer: waiting for <stream:features/>"
    NEGOTIATING = "acceptor: features sent, waiting for STARTTLS or SASL"
    TLS_REQUESTED = "dialer: <starttls/> sent, waiting for <proceed/>"
    STARTING_TLS = "the shell runs the TLS handshake now"
    AUTHENTICATING = "SASL DIGEST-MD5 under way"
    HELLO = "authenticated, waiting for the other end's <hello/>"
    OPEN = "packets flow both ways"
    CLOSING = "our </stream:stream> is queued, reading until theirs"
    CLOSED = "stream closed"


# Legal moves; every change of state goes through _move (a move to CLOSED,
# legal from every state, through _end). HEADER is left three ways: to the
# features of a first stream (by role), or, after SASL, to HELLO.
_MOVES: dict[State, frozenset[State]] = {
    State.HEADER: frozenset({State.FEATURES, State.NEGOTIATING, State.HELLO, State.CLOSED}),
    State.FEATURES: frozenset({State.TLS_REQUESTED, State.AUTHENTICATING, State.CLOSED}),
    State.NEGOTIATING: frozenset({State.STARTING_TLS, State.AUTHENTICATING, State.CLOSED}),
    State.TLS_REQUESTED: frozenset({State.STARTING_TLS, State.CLOSED}),
    State.STARTING_TLS: frozenset({State.HEADER, State.CLOSED}),
    State.AUTHENTICATING: frozenset({State.HEADER, State.CLOSED}),
    State.HELLO: frozenset({State.OPEN, State.CLOSED}),
    State.OPEN: frozenset({State.CLOSING, State.CLOSED}),
    State.CLOSING: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}


class PeerProtocolError(ProtocolError):
    """The other end broke the link's protocol: the stream error is queued.

    ``events`` are those completed before the error (packets that arrived
    before the garbage are handled before the link ends)."""

    def __init__(self, condition: str, text: Optional[str] = None) -> None:
        super().__init__(f"{condition}: {text}" if text else condition)
        self.condition = condition
        self.text = text
        self.events: list[PeerEvent] = []


class PeerAuthFailed(PeerProtocolError):
    """SASL failed: a wrong secret on either side (the dialer checks the
    acceptor's rspauth too), or a node id this end refuses."""


class PeerStateError(JrouterError, RuntimeError):
    """The caller asked for something the link's state does not allow."""


# -- events ------------------------------------------------------------------


class PeerReady:
    """The link is open: the other end is node ``node``, whose table was at
    ``revision`` when it said hello. ``sequence``: the id it gave the routes
    it sends on this link ('' if none); ``read``: (the sequence of a
    previous link of ours, how many of its routes it had read), or None
    (docs/cluster.md §3, Resuming)."""

    __slots__ = ("node", "revision", "sequence", "read")

    def __init__(self, node: str, revision: int, sequence: str = "",
                 read: Optional[tuple[str, int]] = None) -> None:
        self.node = node
        self.revision = revision
        self.sequence = sequence
        self.read = read

    def __repr__(self) -> str:
        return f"PeerReady({self.node!r}, {self.revision}, {self.sequence!r}, {self.read!r})"


class Forwarded:
    """A route for ``member`` (the target slot the sending node chose), which
    has crossed ``hops`` links so far (the first link: 1)."""

    __slots__ = ("route", "member", "hops", "as_sent")

    def __init__(self, route: Element, member: str, hops: int, as_sent: bool = False) -> None:
        self.route = route
        self.member = member
        self.hops = hops
        # Wrapped by AcceptPort from a stanza that declared nothing (an <x/> marker)
        self.as_sent = as_sent

    def __repr__(self) -> str:
        return f"Forwarded({self.route!r}, {self.member!r}, {self.hops}{', as sent' if self.as_sent else ''})"


class Broadcast:
    """A route every connection of the receiving node gets (protocol §4.6)."""

    __slots__ = ("route", "hops")

    def __init__(self, route: Element, hops: int) -> None:
        self.route = route
        self.hops = hops

    def __repr__(self) -> str:
        return f"Broadcast({self.route!r}, {self.hops})"


class SessionNotice:
    """A session-control route that ``member`` of the sending node sent
    (docs/cluster.md §8, Affinity): to learn from, not to deliver."""

    __slots__ = ("route", "member")

    def __init__(self, route: Element, member: str) -> None:
        self.route = route
        self.member = member

    def __repr__(self) -> str:
        return f"SessionNotice({self.route!r}, {self.member!r})"


class ReplaceMember:
    """The other node asks this one to end its member ``member``: a new
    connection of the same instance arrived there (docs/cluster.md §8)."""

    __slots__ = ("member",)

    def __init__(self, member: str) -> None:
        self.member = member

    def __repr__(self) -> str:
        return f"ReplaceMember({self.member!r})"


class AffinityNotice:
    """``<t/>``: the other node made or refreshed the traffic-affinity entry
    of ``key`` (of name ``name``) on member ``member`` of node ``node``."""

    __slots__ = ("name", "key", "node", "member")

    def __init__(self, name: str, key: str, node: str, member: str) -> None:
        self.name = name
        self.key = key
        self.node = node
        self.member = member

    def __repr__(self) -> str:
        return f"AffinityNotice({self.name!r}, {self.key!r}, {self.node!r}, {self.member!r})"


class PeerClosed:
    """The other end closed the stream: ``condition`` None for its
    ``</stream:stream>``, else the condition of its ``<stream:error/>``."""

    __slots__ = ("condition", "text")

    def __init__(self, condition: Optional[str] = None, text: Optional[str] = None) -> None:
        self.condition = condition
        self.text = text

    def __repr__(self) -> str:
        return f"PeerClosed({self.condition!r}, {self.text!r})"


PeerEvent: TypeAlias = Union[PeerReady, Forwarded, Broadcast, SessionNotice, ReplaceMember,
                             AffinityNotice, PeerClosed]
_StreamEvent: TypeAlias = Union[StreamOpen, Element, StreamClose]


class Unsent(NamedTuple):
    """A packet queued on a link that the other node never said it read, as it
    was handed to ``forward``, or to ``broadcast`` (``member`` None); ``tag``
    is whatever the caller gave with it (its route, sender, ...). ``number``:
    its place among the routes sent on the link whose id is ``sequence`` (1
    for the first), which a later link's hello may say the other node had
    read after all."""

    route_raw: bytes
    member: Optional[str]
    hops: int
    tag: Any
    number: int = 0
    sequence: str = ""


_HOP_VALUES = {str(n): n for n in range(1, 256)}
#: A link's sequence id (our make_id gives 40 of [0-9a-z]).
_SEQUENCE = re.compile(r"[0-9A-Za-z]{1,64}")
#: Members whose marker bytes are kept; past it the cache starts again.
_MARKER_CACHE = 4096
#: The most routes one marker announces (its count is written in 5 digits,
#: so the marker's length is known before the run ends).
RUN_MAX = 99999
_COUNT_LENGTH = len(b"00000'/>")
# The counts the fast path reads by lookup (a longer run's marker takes the table's path).
_FAST_COUNTS = {"%05d" % n: n for n in range(1, 1025)}
#: What a marker read says of the routes it announces: (member, hops), or
#: (None, hops) for broadcasts; _DROP: they are dropped (over our hop limit).
_Run: TypeAlias = tuple[Optional[str], int]
_DROP: _Run = ("", 0)


class PeerStream:
    """What both ends share: the output buffer, packets, closing."""

    _handlers: dict[State, dict[type, Callable[[Any, Any], None]]]

    def __init__(self, local_node: str, max_hops: int, max_element_size: int,
                 revision: Callable[[], int], sequence: str = "",
                 read_before: Optional[Callable[[str], Optional[tuple[str, int]]]] = None) -> None:
        if not 1 <= max_hops <= 255:
            raise ValueError("max_hops must be 1..255")
        if sequence and not _SEQUENCE.fullmatch(sequence):
            raise ValueError("a sequence id is 1..64 of [0-9A-Za-z]")
        self.local_node = local_node
        # The id of the routes we send on this link, said in our hello; and
        # read_before(node): (sequence, routes read) of the last link from
        # node, said in our hello so that node does not send them again.
        self.sequence = sequence
        self.read_before = read_before
        self.peer_sequence = ""                 # the other end's, from its hello
        #: What the other end's hello said it had read of a link of ours: (sequence, count).
        self.peer_read: Optional[tuple[str, int]] = None
        self.max_hops = max_hops
        self.revision = revision
        self.max_element_size = max_element_size
        self.reader = StreamReader(PREAUTH_ELEMENT_SIZE if max_element_size == 0
                                   else min(PREAUTH_ELEMENT_SIZE, max_element_size))
        self.state = State.HEADER
        self.counters = Counters()
        self.peer_node: Optional[str] = None   # known at PeerReady (the acceptor: from SASL on)
        self.peer_revision: Optional[int] = None
        self.tls_active = False
        self.authenticated = False
        self.header_sent = False
        self._out: list[bytes] = []
        self._end = 0          # bytes queued since the stream began
        self._acked = 0        # of those, bytes the shell says it wrote
        # (end offset, route, member, hops, tag) of each packet the other
        # node has not said it read (<a/>): written or not, it comes back
        # from take_unsent, so that a dead node's kernel buffers lose nothing.
        self._records: deque[tuple[int, bytes, Optional[str], int, Any]] = deque()
        self._peer_read = 0    # routes the other node said it read (its last <a n/>)
        self._read_end = 0     # where the last of those ends in our stream
        self._received = 0     # routes we read (delivered or dropped), what our <a/> says
        self._said_received = 0
        self._markers: dict[str, list[bytes]] = {}
        self._as_sent_markers: dict[str, list[bytes]] = {}
        self._session_markers: dict[str, list[bytes]] = {}
        # Sending: the runs of packets in _out whose markers are still to be
        # written, as [position of the marker in _out, its head, count]; the
        # last, while the last thing queued is one of its routes, is _run.
        self._runs: list[list[Any]] = []
        self._run: Optional[list[Any]] = None
        # Reading: what the last marker announced, and how many of its routes are still to come.
        self._announced: _Run = _DROP
        self._announced_as_sent = False
        self._announced_session = False
        self._left = 0
        self._events: list[PeerEvent] = []
        self._restart_at: Optional[int] = None   # a stream restart after the element ending here
        self._tls_offset = 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.local_node}->{self.peer_node} {self.state.name}>"

    # -- the output buffer ---------------------------------------------------

    def data_to_send(self) -> bytes:
        """Everything queued, as one bytes object (b'' if nothing is)."""
        out = self._out
        if not out:
            return b""
        runs = self._runs
        if runs:
            for position, head, count in runs:
                out[position] = head + b"%05d'/>" % count
            runs.clear()
            self._run = None
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self.counters.bytes_out += len(data)
        return data

    def sent(self, count: int) -> None:
        """The shell wrote ``count`` more bytes of what it was handed (the
        packets in them stay ours until the other node says it read them)."""
        self._acked += count

    @property
    def buffered(self) -> int:
        """Bytes queued or handed to the shell and not written yet."""
        return self._end - self._acked

    @property
    def routes_read(self) -> int:
        """Routes read on this link so far (delivered or dropped): what our <a/> says."""
        return self._received

    @property
    def unread(self) -> int:
        """Bytes queued since the last route the other node said it read:
        what a lost link hands back (the bound on a link counts these)."""
        return self._end - self._read_end

    def take_unsent(self) -> list[Unsent]:
        """The link is over: the packets the other node never said it read,
        oldest first. Nothing more is sent."""
        first = self._peer_read + 1
        sequence = self.sequence
        unsent = [Unsent(raw, member, hops, tag, number, sequence)
                  for number, (_end, raw, member, hops, tag) in enumerate(self._records, first)]
        self._records.clear()
        self._out.clear()
        self._runs.clear()
        self._run = None
        self._end = self._acked
        self._end_stream()
        return unsent

    def _queue(self, data: bytes) -> None:
        self._out.append(data)
        self._end += len(data)
        self._run = None           # what follows needs a marker of its own

    # -- packets ---------------------------------------------------------------

    def forward(self, route_raw: bytes, member: str, hops: int, tag: Any = None,
                as_sent: bool = False) -> None:
        """Queue a route for ``member`` of its name; ``hops`` counts this link.

        ``route_raw`` must be one ``<route/>`` that means what it should on
        a stream whose default namespace is the component protocol's and
        which declares ``xmlns:stream`` and nothing else: a route from a
        plain component as it arrived, else re-serialised (what
        ``ComponentPort.outbound`` gives for such a target). The bytes go
        out unchanged; ``tag`` comes back with them from ``take_unsent``.
        ``as_sent``: the route is AcceptPort's wrap of a stanza that declared
        nothing (an ``<x/>`` marker, docs/cluster.md §3)."""
        if self.state is not State.OPEN:
            raise PeerStateError(f"forward while {self.state.value}")
        if not 0 < hops <= self.max_hops:
            raise ValueError(f"hops must be 1..{self.max_hops}, not {hops}")
        markers = self._as_sent_markers if as_sent else self._markers
        heads = markers.get(member)
        if heads is None:
            heads = self._member_markers(markers, member, b"x" if as_sent else b"f")
        self._packet(heads[hops], route_raw, member, hops, tag)

    def broadcast(self, route_raw: bytes, hops: int, tag: Any = None) -> None:
        """Queue a broadcast route (``type='broadcast'``), as ``forward``."""
        if self.state is not State.OPEN:
            raise PeerStateError(f"broadcast while {self.state.value}")
        if not 0 < hops <= self.max_hops:
            raise ValueError(f"hops must be 1..{self.max_hops}, not {hops}")
        self._packet(_BROADCAST_HEADS[hops], route_raw, None, hops, tag)

    def session_notice(self, route_raw: bytes, member: str, tag: Any = None) -> None:
        """Queue a session-control route that ``member`` (a connection of
        this node) sent, for the other node to learn from; like a
        broadcast, it is not handed back if the link is lost."""
        if self.state is not State.OPEN:
            raise PeerStateError(f"session notice while {self.state.value}")
        heads = self._session_markers.get(member)
        if heads is None:
            heads = self._member_markers(self._session_markers, member, b"s")
        self._packet(heads[1], route_raw, None, 1, tag)

    def _packet(self, head: bytes, route_raw: bytes, member: Optional[str], hops: int, tag: Any) -> None:
        """Queue one route: it joins the run of the packet queued just before
        when that one went to the same member with the same hops (one marker
        for all, its count written in ``data_to_send``), else starts a run."""
        out = self._out
        run = self._run
        if run is not None and run[1] is head and run[2] < RUN_MAX:
            run[2] += 1
            end = self._end + len(route_raw)
        else:
            self._run = run = [len(out), head, 1]
            self._runs.append(run)
            out.append(b"")                  # the marker, once its count is known
            end = self._end + len(head) + _COUNT_LENGTH + len(route_raw)
        out.append(route_raw)
        self._end = end
        self._records.append((end, route_raw, member, hops, tag))
        self.counters.packets_out += 1

    def _member_markers(self, markers: dict[str, list[bytes]], member: str, name: bytes) -> list[bytes]:
        """The heads of the markers ``name`` for ``member``, by hops (the same
        bytes object each time: runs are told apart by identity)."""
        if not member:
            raise ValueError("a member id must not be empty")
        if len(markers) >= _MARKER_CACHE:
            markers.clear()
        tail = f" m={quoteattr(member)} n='".encode()
        heads = [b""] + [b"<%s xmlns='%s' h='%d'%s" % (name, NS_PEER.encode(), hops, tail)
                         for hops in range(1, self.max_hops + 1)]
        markers[member] = heads
        return heads

    def replace_member(self, member: str) -> None:
        """Ask the other node to end its member ``member`` (``<r/>``)."""
        if self.state is not State.OPEN:
            raise PeerStateError(f"replace while {self.state.value}")
        if not member:
            raise ValueError("a member id must not be empty")
        self._queue(b"<r xmlns='%s' m=%s/>" % (NS_PEER.encode(), quoteattr(member).encode()))

    def affinity_notice(self, name: str, key: str, node: str, member: str) -> None:
        """Tell the other node that ``key`` of ``name`` is on ``member`` of ``node`` (``<t/>``)."""
        if self.state is not State.OPEN:
            raise PeerStateError(f"affinity notice while {self.state.value}")
        if not (name and key and node and member):
            raise ValueError("an affinity notice needs a name, a key, a node and a member")
        self._queue(b"<t xmlns='%s' n=%s k=%s o=%s m=%s/>" % (
            NS_PEER.encode(), quoteattr(name).encode("utf-8"), quoteattr(key).encode("utf-8"),
            quoteattr(node).encode("utf-8"), quoteattr(member).encode("utf-8")))

    def ping(self) -> None:
        """Queue the keepalive, one space, on an open link (else nothing)."""
        if self.state is State.OPEN:
            self._queue(b" ")

    # -- input -------------------------------------------------------------------

    @property
    def starting_tls(self) -> bool:
        """The shell must run the TLS handshake now, then call ``tls_started``."""
        return self.state is State.STARTING_TLS

    @property
    def open(self) -> bool:
        return self.state is State.OPEN

    def receive_data(self, data: bytes) -> list[PeerEvent]:
        """Feed bytes from the other node; return what they completed.
        Raises PeerProtocolError (the goodbye queued) on a broken stream."""
        state = self.state
        if state is State.CLOSED:
            return []
        if state is State.STARTING_TLS:
            raise PeerStateError("bytes read before the TLS handshake")
        self.counters.bytes_in += len(data)
        events = self._events = []
        while data and self.state is not State.CLOSED and self.state is not State.STARTING_TLS:
            data = self._feed(data)
        self._say_received()
        self._events = []
        return events

    def _feed(self, data: bytes) -> bytes:
        """Handle what ``data`` completes; return the bytes of a restarted stream."""
        try:
            parsed = self.reader.feed(data)
        except StreamError as exc:
            leftover = self._handle(exc.events)
            if leftover is not None:
                return leftover       # the new stream's bytes, read again by a new parser
            if self.state is State.STARTING_TLS:
                return b""            # TLS bytes after <proceed/>: tls_started has them
            self.fail(exc.condition, exc.text)
        return self._handle(parsed) or b""

    def _handle(self, parsed: list[_StreamEvent]) -> Optional[bytes]:
        """Run each event through the state's handler; after a stream
        restart stop and return the bytes that followed (maybe b'')."""
        if self.state is State.OPEN:
            parsed = self._packets(parsed)
        handlers = self._handlers
        for event in parsed:
            handler = handlers[self.state].get(event.__class__)
            if handler is None:
                self.fail("bad-format", f"not allowed while {self.state.value}: {_what(event)}")
            handler(self, event)
            if self.state is State.CLOSED or self.state is State.STARTING_TLS:
                return None
            if self._restart_at is not None:
                offset, self._restart_at = self._restart_at, None
                return self.reader.restart(offset)
        return None

    def _move(self, state: State) -> None:
        if state not in _MOVES[self.state]:
            self.fail("bad-format", f"not allowed while {self.state.value}")
        self.state = state

    def _packets(self, parsed: list[_StreamEvent]) -> list[_StreamEvent]:
        """The OPEN state's entry of the table for the usual case, inlined:
        the routes a marker announced, and well-formed markers within the
        hop limit. Returns the events from the first one it does not handle
        on (the table's handler, ``_on_packet``, takes those)."""
        events = self._events
        before = len(events)
        max_hops = self.max_hops
        member, hops = self._announced
        as_sent = self._announced_as_sent
        session = self._announced_session
        left = self._left
        index = len(parsed)
        notices = 0           # events that are no routes (<r/>, <t/>): not counted in <a/>
        for position, event in enumerate(parsed):
            if event.__class__ is not Element:
                index = position
                break
            if left:
                if event.name != ROUTE or hops == 0:
                    index = position
                    break
                if member is None:
                    events.append(Broadcast(event, hops))
                else:
                    events.append(Forwarded(event, member, hops, as_sent) if not session
                                  else SessionNotice(event, member))
                left -= 1
                continue
            name = event.name
            if name == _ACK:
                self._on_read(event)
                continue
            if name == _REPLACE:
                self._on_replace(event)
                notices += 1
                continue
            if name == _AFFINITY:
                self._on_affinity(event)
                notices += 1
                continue
            attrs = event.attrs
            hops = _HOP_VALUES.get(attrs.get("h", ""), 0)
            left = _FAST_COUNTS.get(attrs.get("n", ""), 0)
            as_sent = name == _FORWARD_AS_SENT
            session = name == _SESSION
            member = attrs.get("m") if name == _FORWARD or as_sent or session else None
            if not (left and 0 < hops <= max_hops and (member or name == _BROADCAST)):
                index, left, hops = position, 0, 0
                break
        routes = len(events) - before - notices
        self.counters.packets_in += routes
        self._received += routes
        self._announced, self._left = (member, hops), left
        self._announced_as_sent = as_sent
        self._announced_session = session
        return parsed[index:]

    def _on_packet(self, element: Element) -> None:
        """OPEN and CLOSING: a marker, then the routes it announced."""
        if self._left:
            if element.name != ROUTE:
                self.fail("bad-format", f"{_what(element)} where a marker announced a <route/>")
            self._left -= 1
            self._received += 1
            member, hops = self._announced
            if hops == 0:
                self.counters.drops += 1
                return
            self.counters.packets_in += 1
            if member is None:
                self._events.append(Broadcast(element, hops))
            elif self._announced_session:
                self._events.append(SessionNotice(element, member))
            else:
                self._events.append(Forwarded(element, member, hops, self._announced_as_sent))
        elif element.name == _STREAM_ERROR:
            self._on_stream_error(element)
        elif element.name == _ACK:
            self._on_read(element)
        elif element.name == _REPLACE:
            self._on_replace(element)
        elif element.name == _AFFINITY:
            self._on_affinity(element)
        else:
            self._announced, self._left = self._marker(element)
            self._announced_as_sent = element.name == _FORWARD_AS_SENT
            self._announced_session = element.name == _SESSION

    def _on_read(self, element: Element) -> None:
        """<a n='N'/>: the other node has read our first N routes; they are
        its own now, and never come back from take_unsent."""
        count = element.attrs.get("n", "")
        if not (count.isdigit() and count.isascii()):
            self.fail("bad-format", "<a/> needs a count (n)")
        read = int(count)
        records = self._records
        if not self._peer_read <= read <= self._peer_read + len(records):
            self.fail("bad-format", f"<a n='{read}'/> after {self._peer_read} of "
                      f"{self._peer_read + len(records)} routes")
        for _ in range(read - self._peer_read):
            self._read_end = records.popleft()[0]
        self._peer_read = read

    def _on_replace(self, element: Element) -> None:
        member = element.attrs.get("m")
        if not member:
            self.fail("bad-format", "<r/> needs the member to end (m)")
        self._events.append(ReplaceMember(member))

    def _on_affinity(self, element: Element) -> None:
        attrs = element.attrs
        name, key, node, member = attrs.get("n"), attrs.get("k"), attrs.get("o"), attrs.get("m")
        if not (name and key and node and member):
            self.fail("bad-format", "<t/> needs a name (n), a key (k), a node (o) and a member (m)")
        self._events.append(AffinityNotice(name, key, node, member))

    def _say_received(self) -> None:
        """Once per read that brought routes: how many we have read so far."""
        if self._received != self._said_received and self.state is State.OPEN:
            self._said_received = self._received
            self._queue(_ACK_HEAD + b"%d'/>" % self._received)

    def _marker(self, element: Element) -> tuple[_Run, int]:
        """(what a marker announces, how many routes). A broken marker is a
        protocol error, and so is any other element; hops over our limit
        announce routes to drop (counted)."""
        name = element.name
        attrs = element.attrs
        if name == _FORWARD or name == _FORWARD_AS_SENT or name == _SESSION:
            member = attrs.get("m")
            if not member:
                self.fail("bad-format", f"a packet marker {_what(element)} without its member (m)")
        elif name == _BROADCAST:
            member = None
        else:
            self.fail("unsupported-stanza-type", f"{_what(element)} where a packet marker belongs")
        hops = _HOP_VALUES.get(attrs.get("h", ""), 0)
        count = attrs.get("n", "")
        if not hops or not (count.isdigit() and count.isascii() and 0 < int(count) <= RUN_MAX):
            self.fail("bad-format", f"a packet marker needs hops (h) 1..255 and a count (n) 1..{RUN_MAX}")
        return ((member, hops) if hops <= self.max_hops else _DROP), int(count)

    # -- the stream itself -------------------------------------------------------

    def _check_header(self, header: StreamOpen) -> None:
        """What both ends demand of the other's header (docs/cluster.md)."""
        if header.name != _STREAM_ROOT:
            self.fail("bad-format")
        if header.attrs.get("version") != "1.0":
            self.fail("unsupported-version")
        if header.default_ns != NS_COMPONENT or header.prefixes != _PREFIXES:
            self.fail("invalid-namespace", "a peer stream declares the component namespace "
                      "and xmlns:stream, nothing else")

    def _hello(self, peer: Optional[str]) -> bytes:
        """Our hello to node ``peer``: who we are, our table's revision, the
        id of the routes we send, and how many routes of its last link we read."""
        parts = [f"<hello xmlns='{NS_PEER}' node={quoteattr(self.local_node)} "
                 f"revision='{int(self.revision())}'"]
        if self.sequence:
            parts.append(f" seq='{self.sequence}'")
        read = self.read_before(peer) if self.read_before is not None and peer else None
        if read is not None:
            parts.append(f" of='{read[0]}' read='{int(read[1])}'")
        parts.append("/>")
        return "".join(parts).encode()

    def _read_hello(self, element: Element) -> Optional[PeerReady]:
        """The other end's <hello/> (None: its stream error ended the link)."""
        if element.name != _HELLO:
            self._unexpected(element, "<hello/>")
            return None
        attrs = element.attrs
        node = attrs.get("node")
        revision = attrs.get("revision", "")
        if not node or not revision.isdigit() or not revision.isascii():
            self.fail("bad-format", "<hello/> needs a node and a revision")
        if node == self.local_node:
            self.fail("conflict", f"node '{node}' is this node: a link to itself")
        sequence = attrs.get("seq", "")
        if sequence and not _SEQUENCE.fullmatch(sequence):
            self.fail("bad-format", "<hello/> with a bad sequence id (seq)")
        of, count = attrs.get("of"), attrs.get("read")
        read: Optional[tuple[str, int]] = None
        if of is not None or count is not None:
            if not (of and _SEQUENCE.fullmatch(of) and count and count.isdigit() and count.isascii()):
                self.fail("bad-format", "<hello/> says what it read with a sequence (of) and a count (read)")
            read = (of, int(count))
        return PeerReady(node, int(revision), sequence, read)

    def _opened(self, ready: PeerReady) -> None:
        self.peer_node, self.peer_revision = ready.node, ready.revision
        self.peer_sequence, self.peer_read = ready.sequence, ready.read
        self.reader.max_element_size = self.max_element_size
        self._move(State.OPEN)
        self._read_end = self._end      # what came before (the negotiation) is no packet
        self._events.append(ready)

    def _on_stream_close(self, _event: StreamClose) -> None:
        """The other end's ``</stream:stream>``: ours answers it (unless sent)."""
        if self.state is not State.CLOSING:
            if not self.header_sent:
                self._queue(stream_header(None, declaration=False))
            self._queue(STREAM_CLOSE)
        self._end_stream()
        self._events.append(PeerClosed())

    def _on_stream_error(self, element: Element) -> None:
        """The other end's ``<stream:error/>``: the link ends without a word."""
        condition, text = _stream_error_of(element)
        self._end_stream()
        self._events.append(PeerClosed(condition, text))

    def _unexpected(self, element: Element, where: str) -> None:
        """An element a negotiating state has no use for: the other end's
        stream error ends the link quietly, anything else is a protocol error."""
        if element.name == _STREAM_ERROR:
            return self._on_stream_error(element)
        self.fail("bad-format", f"{_what(element)} where {where} belongs")

    def _give_up(self, error: PeerProtocolError) -> NoReturn:
        """End the stream with a plain close (the other end said why) and raise."""
        self.close()
        self._end_stream()
        error.events, self._events = self._events, []
        raise error

    def _end_stream(self) -> None:
        self.state = State.CLOSED
        self._left = 0

    def close(self) -> None:
        """Close our side politely: on an open link the other end's packets
        still come until its ``</stream:stream>`` (CLOSING); else at once."""
        if self.state is State.CLOSED or self.state is State.CLOSING:
            return
        if self.state is State.STARTING_TLS:     # nothing may go out in the clear now
            self._end_stream()
            return
        if not self.header_sent:
            self._queue(stream_header(None, declaration=False))
        self._queue(STREAM_CLOSE)
        if self.state is State.OPEN:
            self._move(State.CLOSING)
        else:
            self._end_stream()

    def fail(self, condition: str, text: Optional[str] = None,
             error: type[PeerProtocolError] = PeerProtocolError) -> NoReturn:
        """Queue a stream error and the close, then raise (house rule 3)."""
        if self.state is not State.CLOSED and self.state is not State.STARTING_TLS:
            self._queue(stream_error(condition, text, self.header_sent))
        self._end_stream()
        exc = error(condition, text)
        exc.events, self._events = self._events, []
        raise exc

    # -- STARTTLS (protocol §3.5) -----------------------------------------------

    def tls_started(self) -> bytes:
        """The shell finished the TLS handshake: a new stream begins. Returns
        what the other end sent in the clear after the element that started
        TLS (a well-behaved node sends nothing: the shell closes the link)."""
        if self.state is not State.STARTING_TLS:
            raise PeerStateError(f"tls_started while {self.state.value}")
        self.tls_active = True
        leftover = self.reader.restart(self._tls_offset)
        self._move(State.HEADER)
        self._new_stream()
        return leftover

    def _start_tls(self, element: Element) -> None:
        self._tls_offset = element.end  # type: ignore[assignment]  # read off the stream: an int
        self._move(State.STARTING_TLS)

    def _new_stream(self) -> None:
        """A stream (re)starts: the dialer speaks first, the acceptor answers."""
        self.header_sent = False


_BROADCAST_HEADS = [b""] + [b"<b xmlns='%s' h='%d' n='" % (NS_PEER.encode(), hops) for hops in range(1, 256)]


# -- the dialling node ---------------------------------------------------------------


class PeerDialer(PeerStream):
    """The end that dialled: node ``node_id``, authenticating with ``secret``.

    ``expect_node``: the node it meant to reach (another answering is a
    stale address: the link is refused). ``cnonce``: the SASL client nonce
    source. ``use_tls``: take STARTTLS when offered; ``require_tls``: refuse
    a node that does not offer it. ``sequence`` and ``read_before``: see
    PeerStream (both ends take them). The header goes out at once."""

    def __init__(self, node_id: str, secret: str, *, cnonce: Callable[[], str],
                 expect_node: Optional[str] = None, revision: Callable[[], int] = lambda: 0,
                 use_tls: bool = True, require_tls: bool = False, max_hops: int = 2,
                 max_element_size: int = 0, sequence: str = "",
                 read_before: Optional[Callable[[str], Optional[tuple[str, int]]]] = None) -> None:
        super().__init__(node_id, max_hops, max_element_size, revision, sequence, read_before)
        self._handlers = _DIALER
        self.expect_node = expect_node
        self.use_tls = use_tls or require_tls
        self.require_tls = require_tls
        self._sasl = _DigestClient(node_id, secret, cnonce)
        self._new_stream()

    def _new_stream(self) -> None:
        self._queue(stream_header(NS_COMPONENT, to=PEER_ROLE, from_=self.local_node, version="1.0"))
        self.header_sent = True
        if self.authenticated:
            self._queue(self._hello(self.expect_node))   # pipelined: the acceptor reads it after its answer

    def _on_header(self, header: StreamOpen) -> None:
        self._check_header(header)
        self._move(State.HELLO if self.authenticated else State.FEATURES)

    def _on_features(self, element: Element) -> None:
        if element.name != _FEATURES:
            return self._unexpected(element, "<stream:features/>")
        tree = element.tree()
        tls_offered = tree.find(f"{{{NS_TLS}}}starttls") is not None
        mechanisms = [m.text for m in tree.iterfind(f"{{{NS_SASL}}}mechanisms/{{{NS_SASL}}}mechanism")]
        if tls_offered and self.use_tls and not self.tls_active:
            self._queue(f"<starttls xmlns='{NS_TLS}'/>".encode())
            return self._move(State.TLS_REQUESTED)
        if self.require_tls and not self.tls_active:
            self.fail("policy-violation", "TLS is required on peer links, and the node does not offer it")
        if "DIGEST-MD5" not in mechanisms:
            self.fail("unsupported-feature", "the node does not offer SASL DIGEST-MD5")
        self._queue(f"<auth xmlns='{NS_SASL}' mechanism='DIGEST-MD5'/>".encode())
        self._move(State.AUTHENTICATING)

    def _on_proceed(self, element: Element) -> None:
        if element.name == NS_TLS + " proceed":
            return self._start_tls(element)
        self._unexpected(element, "<proceed/>")

    def _on_sasl(self, element: Element) -> None:
        name = element.name
        if name == NS_SASL + " challenge":
            response = self._sasl.respond(_payload(self, element))
            if response is None:
                self.fail("not-authorized", "a SASL challenge without a nonce", PeerAuthFailed)
            self._queue(f"<response xmlns='{NS_SASL}'>{b64encode(response)}</response>".encode())
        elif name == NS_SASL + " success":
            if not self._sasl.verify(_payload(self, element)):
                self.fail("not-authorized", "the node's rspauth is wrong: it does not know the "
                          "cluster secret", PeerAuthFailed)
            self.authenticated = True
            self.reader.max_element_size = self.max_element_size
            self._restart_at = element.end
            self._move(State.HEADER)
            self._new_stream()
        elif name == NS_SASL + " failure":
            self._give_up(PeerAuthFailed("not-authorized", "the node refused our node id or secret"))
        else:
            self._unexpected(element, "a SASL answer")

    def _on_hello(self, element: Element) -> None:
        if element.name == _FEATURES:
            return        # the restarted stream's empty features: nothing to choose
        ready = self._read_hello(element)
        if ready is None:
            return
        if self.expect_node is not None and ready.node != self.expect_node:
            self.fail("host-unknown", f"dialled node '{self.expect_node}', but node '{ready.node}' answered")
        self._opened(ready)


# -- the node dialled ------------------------------------------------------------------


class PeerAcceptor(PeerStream):
    """The end that was dialled: node ``local_node_id``. ``make_id`` gives
    stream ids and SASL nonces; ``offer_tls``: offer STARTTLS (the shell has
    a certificate); ``require_tls``: refuse SASL before TLS."""

    def __init__(self, local_node_id: str, secret: str, *, make_id: Callable[[], str],
                 revision: Callable[[], int] = lambda: 0, offer_tls: bool = False,
                 require_tls: bool = False, max_hops: int = 2, max_element_size: int = 0,
                 sequence: str = "",
                 read_before: Optional[Callable[[str], Optional[tuple[str, int]]]] = None) -> None:
        if require_tls and not offer_tls:
            raise ValueError("require_tls needs offer_tls")
        super().__init__(local_node_id, max_hops, max_element_size, revision, sequence, read_before)
        self._handlers = _ACCEPTOR
        self.make_id = make_id
        self.offer_tls = offer_tls
        self.require_tls = require_tls
        self.stream_id: Optional[str] = None
        self._sasl = SaslServer(lambda _user: secret, make_id)

    def _on_header(self, header: StreamOpen) -> None:
        self._check_header(header)
        if header.attrs.get("to") != PEER_ROLE:
            self.fail("host-unknown", f"this port takes links between jrouter nodes (to='{PEER_ROLE}')")
        self.stream_id = self.make_id()
        self._queue(stream_header(NS_COMPONENT, self.stream_id, to=header.attrs.get("from"),
                                  from_=PEER_ROLE, version="1.0"))
        self.header_sent = True
        self._queue(self._features())
        self._move(State.HELLO if self.authenticated else State.NEGOTIATING)

    def _features(self) -> bytes:
        parts = [f"<stream:features xmlns:stream='{STREAMS_NS}'>"]
        if not self.authenticated:
            if self.offer_tls and not self.tls_active:
                required = "<required/>" if self.require_tls else ""
                parts.append(f"<starttls xmlns='{NS_TLS}'>{required}</starttls>")
            parts.append(f"<mechanisms xmlns='{NS_SASL}'><mechanism>DIGEST-MD5</mechanism></mechanisms>")
        parts.append("</stream:features>")
        return "".join(parts).encode()

    def _on_negotiation(self, element: Element) -> None:
        name = element.name
        if name == NS_TLS + " starttls" and self.state is State.NEGOTIATING:
            if not self.offer_tls or self.tls_active:
                self.fail("unsupported-feature", "STARTTLS is not offered")
            self._queue(f"<proceed xmlns='{NS_TLS}'/>".encode())
            return self._start_tls(element)
        if name == NS_SASL + " auth" and self.state is State.NEGOTIATING:
            return self._on_auth(element)
        if name == NS_SASL + " response" and self.state is State.AUTHENTICATING:
            return self._on_response(element)
        self._unexpected(element, "STARTTLS or SASL")

    def _on_auth(self, element: Element) -> None:
        if self.require_tls and not self.tls_active:
            self.fail("policy-violation", "TLS is required on peer links: STARTTLS first")
        reply = self._sasl.on_element("auth", element.attrs.get("mechanism"), "")
        self._queue(reply.to_bytes())
        if reply.kind != "challenge":
            self.fail("not-authorized", "authentication failed", PeerAuthFailed)
        self._move(State.AUTHENTICATING)

    def _on_response(self, element: Element) -> None:
        reply = self._sasl.on_element("response", None, element.tree().text or "")
        if reply.kind != "success":
            self._queue(reply.to_bytes())
            self.fail("not-authorized", "authentication failed", PeerAuthFailed)
        node: str = reply.username  # type: ignore[assignment]  # set on success
        if node == self.local_node:
            self.fail("conflict", f"node '{node}' is this node: a link to itself", PeerAuthFailed)
        if not dials(node, self.local_node):
            self.fail("conflict", f"node '{node}' must not dial node '{self.local_node}': "
                      "the lower node id dials", PeerAuthFailed)
        self._queue(reply.to_bytes())
        self.peer_node = node
        self.authenticated = True
        self.reader.max_element_size = self.max_element_size
        self._restart_at = element.end
        self._move(State.HEADER)
        self._new_stream()

    def _on_hello(self, element: Element) -> None:
        ready = self._read_hello(element)
        if ready is None:
            return
        if ready.node != self.peer_node:
            self.fail("invalid-from", f"<hello/> from node '{ready.node}' on the link "
                      f"node '{self.peer_node}' authenticated")
        self._queue(self._hello(self.peer_node))
        self._opened(ready)


# -- the SASL client (the dialer's side of protocol §3.6) ------------------------------


class _DigestClient:
    """DIGEST-MD5 as a jabberd2 component answers it, for the dialer: the
    node id is the user name, the cluster secret the password; the
    acceptor's rspauth is checked (so both ends prove they know the secret).
    (``jrouter.testing.sasl_client`` is the same for tests; the router does
    not import the testing package.)"""

    def __init__(self, username: str, password: str, cnonce: Callable[[], str]) -> None:
        self._username = username.encode("utf-8").decode("latin-1")
        self._password = password
        self._cnonce = cnonce
        self._rspauth: Optional[str] = None

    def respond(self, challenge: bytes) -> Optional[bytes]:
        """The response to a decoded challenge; None if it has no nonce."""
        try:
            d = parse_directives(challenge)
        except SaslError:
            d = {}
        if "nonce" not in d:
            return None
        cnonce = self._cnonce()
        realm = d.get("realm", "")

        def digest(initiator: bool) -> str:
            return digest_response(
                username=self._username.encode("latin-1"), realm=realm.encode("latin-1"),
                password=password_bytes(self._password), nonce=d["nonce"], cnonce=cnonce,
                nc="00000001", qop="auth", digest_uri=_DIGEST_URI, authzid=None, initiator=initiator)

        response = digest(True)
        self._rspauth = digest(False)
        return ", ".join((
            f"username={quote(self._username)}", f"realm={quote(realm)}",
            f"nonce={quote(d['nonce'])}", f"cnonce={quote(cnonce)}", "nc=00000001", "qop=auth",
            f"digest-uri={quote(_DIGEST_URI)}", f"response={response}", "charset=utf-8",
        )).encode("latin-1")

    def verify(self, success: bytes) -> bool:
        if self._rspauth is None:
            return False
        try:
            got = parse_directives(success).get("rspauth", "")
        except SaslError:
            return False
        return hmac.compare_digest(got.encode("latin-1"), self._rspauth.encode("ascii"))


def _payload(stream: PeerStream, element: Element) -> bytes:
    try:
        return b64decode(element.tree().text or "")
    except SaslEncodingError:
        stream.fail("not-authorized", "SASL text that is not base64", PeerAuthFailed)


def _what(event: object) -> str:
    if isinstance(event, Element):
        return f"<{event.local_name}/>"
    return {StreamOpen: "a stream header", StreamClose: "</stream:stream>"}.get(type(event), repr(event))


def _stream_error_of(element: Element) -> tuple[Optional[str], Optional[str]]:
    """(condition, text) of a ``<stream:error/>``."""
    condition = text = None
    for child in element.tree():
        tag = child.tag
        if not isinstance(tag, str) or not tag.startswith(_ERRORS_PREFIX):
            continue
        local = tag.rpartition("}")[2]
        if local == "text":
            text = child.text
        elif condition is None:
            condition = local
    return condition, text


_Handlers: TypeAlias = dict[State, dict[type, Callable[[Any, Any], None]]]


def _table(header: Callable[[Any, Any], None], states: dict[State, Callable[[Any, Any], None]]) -> _Handlers:
    """One role's handlers: the header in HEADER, ``states``' element
    handlers, the peer's ``</stream:stream>`` in every open state."""
    table: _Handlers = {state: {} for state in State}
    table[State.HEADER] = {StreamOpen: header}
    for state, handler in states.items():
        table[state] = {Element: handler, StreamClose: PeerStream._on_stream_close}
    table[State.HEADER][StreamClose] = PeerStream._on_stream_close
    return table


# What each state does with each event, by role; a missing entry is a protocol error.
_DIALER = _table(PeerDialer._on_header, {
    State.FEATURES: PeerDialer._on_features,
    State.TLS_REQUESTED: PeerDialer._on_proceed,
    State.AUTHENTICATING: PeerDialer._on_sasl,
    State.HELLO: PeerDialer._on_hello,
    State.OPEN: PeerStream._on_packet,
    State.CLOSING: PeerStream._on_packet,
})
_ACCEPTOR = _table(PeerAcceptor._on_header, {
    State.NEGOTIATING: PeerAcceptor._on_negotiation,
    State.AUTHENTICATING: PeerAcceptor._on_negotiation,
    State.HELLO: PeerAcceptor._on_hello,
    State.OPEN: PeerStream._on_packet,
    State.CLOSING: PeerStream._on_packet,
})
assert set(_MOVES) == set(_DIALER) == set(_ACCEPTOR) == set(State)
