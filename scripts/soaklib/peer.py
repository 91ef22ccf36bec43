"""One soak component over its whole life: many connections, one name.

Owns: the component's socket (non-blocking, with its own output buffer), its
lifecycle state and every move between states (one table, `MOVES`), and the
protocol of each step through `jrouter.testing.component_client`'s client
role: the jabberd2 component protocol (SASL DIGEST-MD5, then `<bind/>`,
protocol §3.6, §4.2; `<unbind/>`, §4.4) or XEP-0114 (the handshake, §5.1).
The role also reads every stanza that arrives afterwards (`Element` events).
Must not know: the books, the traffic, the clock (times come in), selectors.

Lifecycle
---------
    AWAY --connect--> SETUP --bound / handshake reply--> ONLINE
    ONLINE --unbind--> UNBINDING --reply--> UNBOUND --bind--> BINDING --reply--> ONLINE
    ONLINE / UNBOUND --leave--> SETTLING --own packets settled--> CLOSING --EOF--> AWAY
    any --the router closes, or a socket error--> AWAY   (counted: a defect)

(ONLINE goes straight to SETTLING only for XEP-0114.)  A setup that breaks
because a broadcast came where the router's stream header belonged is told
apart (`Gone.broadcast_first`): jabberd2 broadcasts to peers not logged in.

Only ONLINE sends new packets.  A jabberd2 component unbinds before it
leaves, so that nothing is routed to a connection that is about to go: what
the router routed before the unbind arrives ahead of the reply (one socket,
in order); after it, packets to the name bounce.  An XEP-0114 component
cannot unbind; it says `</stream:stream>` and reads until the router closes.
"""

from __future__ import annotations

import enum
import re
import socket
from typing import List, Optional, Union

from jrouter.testing.component_client import (NS_ACCEPT, Authenticated, AuthFailed,
                                              BindRefused, Bound, ComponentClient, Received,
                                              RemoteProtocolError, State, header)
from jrouter.wire.xmlstream import Element, StreamClose, StreamError

from .stanzas import comp_name

RECV_SIZE = 256 * 1024
STREAM_ERROR = "http://etherx.jabber.org/streams error"  # RFC 6120 §4.9
HEAD = 64 * 1024  # bytes of each connection kept to show when its setup fails
SHOWN = 400       # of which the report shows this many
# A stanza where the router's stream header belonged (see Gone).
BEFORE_HEADER = re.compile(rb"^\s*<(?:route|message)\b|(?:<success\b[^>]*/>|</success>)\s*"
                           rb"<(?:route|message)\b")


class Phase(enum.Enum):
    AWAY = "no connection"
    SETUP = "connected, authenticating and binding"
    ONLINE = "bound: sends and receives"
    UNBINDING = "<unbind/> sent"
    UNBOUND = "connected without its name"
    BINDING = "<bind/> sent again"
    SETTLING = "leaving: waiting for its own packets to settle"
    CLOSING = "</stream:stream> sent, reading until the router closes"


MOVES = {
    Phase.AWAY: {Phase.SETUP},
    Phase.SETUP: {Phase.ONLINE},
    Phase.ONLINE: {Phase.UNBINDING, Phase.SETTLING},
    Phase.UNBINDING: {Phase.UNBOUND},
    Phase.UNBOUND: {Phase.BINDING, Phase.SETTLING},
    Phase.BINDING: {Phase.ONLINE, Phase.UNBOUND},
    Phase.SETTLING: {Phase.CLOSING},
    Phase.CLOSING: {Phase.AWAY},
}


class Ready:
    """Event: the connection is set up (or bound again): the component may send."""


class Unbound:
    """Event: the router acknowledged `<unbind/>`."""


class Refused:
    """Event: a bind was refused (409 while the old connection is still going)."""

    def __init__(self, error: str) -> None:
        self.error = error


class Gone:
    """Event: the connection ended; `expected` unless the router ended it on its own.
    `broadcast_first`: its setup broke because a broadcast came where the
    router's stream header belonged (jabberd2 broadcasts to peers that have not
    logged in, protocol §4.6, §8 #6): first on the connection, or right after
    SASL `<success/>`, before the restarted stream's header."""

    def __init__(self, expected: bool, why: str, broadcast_first: bool = False) -> None:
        self.expected, self.why, self.broadcast_first = expected, why, broadcast_first


Event = object  # Ready, Unbound, Refused, Gone, or an xmlstream.Element (a stanza)


class PeerError(Exception):
    """A component could not even start (authentication refused, no router)."""


class Peer:
    """Component `index` (name compN.soak) speaking `protocol`."""

    def __init__(self, index: int, jabberd2: bool, port: int, user: str, password: str,
                 secret: str) -> None:
        self.index, self.jabberd2, self.port = index, jabberd2, port
        self.name = comp_name(index)
        self.user, self.password, self.secret = user, password, secret
        self.phase = Phase.AWAY
        self.gen = 0                     # connections made so far; the current one's number
        self.sock: Optional[socket.socket] = None
        self.client = ComponentClient()
        self.out = bytearray()
        self.since = 0                   # when the current phase began (us)
        self.asked = False               # a bind is under way
        self.leaving = False             # churn: leave after the unbind (else bind again)
        self.back_at = 0                 # churn: when to come back (us)
        self.head = bytearray()          # the first HEAD bytes of the connection, for errors

    def move(self, phase: Phase, now: int) -> None:
        if phase is not Phase.AWAY and phase not in MOVES[self.phase]:
            raise AssertionError(f"{self.name}: {self.phase.name} -> {phase.name}")
        self.phase, self.since = phase, now

    # ---- actions

    def connect(self, now: int, timeout: float = 5.0) -> socket.socket:
        """A new connection and the first words of its setup."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self.sock, self.gen, self.out = sock, self.gen + 1, bytearray()
        self.asked = False
        self.head = bytearray()
        if self.jabberd2:
            self.client = ComponentClient()
            self.client.open()
        else:
            self.client = ComponentClient(header(NS_ACCEPT, version=False, to=self.name))
            self.client.open()
        self.move(Phase.SETUP, now)
        self._queue()
        return sock

    def unbind(self, now: int) -> None:
        self.move(Phase.UNBINDING, now)
        self.send(f"<unbind name='{self.name}'/>".encode())

    def bind(self, now: int) -> None:
        """Bind the name again (after an unbind)."""
        self.move(Phase.BINDING, now)
        self.asked = True
        self.client.bind(self.name)
        self._queue()

    def retry_bind(self) -> None:
        """Ask again for a name refused during setup or rebinding (409: its
        previous holder's disconnect is not through yet)."""
        if self.phase in (Phase.SETUP, Phase.BINDING) and not self.asked:
            self.asked = True
            self.client.bind(self.name)
            self._queue()

    def leave(self, now: int) -> None:
        self.move(Phase.SETTLING, now)

    def close(self, now: int) -> None:
        self.move(Phase.CLOSING, now)
        self.send(b"</stream:stream>")

    def send(self, data: bytes) -> None:
        self.out += data

    def _queue(self) -> None:
        data = self.client.data_to_send()
        if data:
            self.out += data

    def flush(self) -> bool:
        """Write what the kernel takes; True if something is left (wait for EVENT_WRITE)."""
        if not self.out or self.sock is None:
            return False
        try:
            n = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False  # the read side reports the end
        del self.out[:n]
        return bool(self.out)

    def drop(self) -> None:
        """Forget the socket (the caller unregisters it first)."""
        if self.sock is not None:
            self.sock.close()
        self.sock, self.out = None, bytearray()

    # ---- what arrives

    def recv(self) -> Union[bytes, Gone]:
        """Read once: the bytes (b"" if nothing was there), or Gone."""
        assert self.sock is not None
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError as e:
            return self._gone(f"socket error: {e}")
        if not data:
            return self._gone("the router closed the connection")
        # Acknowledge at once, or a router that leaves Nagle on (jabberd2)
        # waits for our delayed ACK (40 ms) whenever it writes again; Linux
        # clears the flag itself, so it is set after every read.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        if self.phase is Phase.SETUP and len(self.head) < HEAD:
            self.head += data[:HEAD - len(self.head)]
        return data

    def feed(self, data: bytes) -> List[Event]:
        """What the bytes `recv` returned mean, in order."""
        try:
            received = self.client.receive(data)
        except (StreamError, RemoteProtocolError) as e:
            return [self._gone(f"unreadable stream: {e}")]
        events = [e for r in received for e in self._meaning(r)]
        if self.phase is Phase.SETUP:
            self._setup_step()
        self._queue()
        return events

    def _gone(self, why: str) -> Gone:
        if self.phase is not Phase.SETUP:
            return Gone(self.phase is Phase.CLOSING, why)
        head = bytes(self.head)
        m = BEFORE_HEADER.search(head)
        if m is None:
            return Gone(False, f"{why}; the connection began {head[:SHOWN]!r}")
        at = max(0, m.start() - 100)
        return Gone(False, f"a broadcast came before the router's stream header; {why}; "
                           f"at byte {at}: {head[at:at + SHOWN]!r}", True)

    def _meaning(self, r: Received) -> List[Event]:
        if isinstance(r, Element):
            return self._stanza(r)
        if isinstance(r, Bound) or (isinstance(r, Authenticated) and not self.jabberd2):
            return [Ready()]
        if isinstance(r, BindRefused):
            self.asked = False
            return [Refused(r.error)]
        if isinstance(r, AuthFailed):
            raise PeerError(f"{self.name}: authentication refused: {r.condition} {r.text}")
        if isinstance(r, StreamClose) and self.phase is not Phase.CLOSING:
            return [self._gone(f"the router ended the stream ({self.client.stream_error})")]
        return []

    def _stanza(self, r: Element) -> List[Event]:
        local = r.local_name
        if local in ("route", "message", "iq", "presence"):
            return [r]  # jabberd2 broadcasts even to peers still in setup: those too
        if local == "unbind" and self.phase is Phase.UNBINDING:
            if r.attrs.get("error"):
                raise PeerError(f"{self.name}: unbind refused: error {r.attrs['error']}")
            return [Unbound()]
        if r.name == STREAM_ERROR and self.phase is not Phase.CLOSING:
            return [self._gone(f"stream error: {r.raw[:200]!r}")]
        return []  # bind replies, features, SASL: the client role's business

    def _setup_step(self) -> None:
        """Say the next word of the setup when the client role is ready for it."""
        c = self.client
        if self.jabberd2:
            if c.state is State.READY and c.failure is None:
                c.authenticate(self.user, self.password)
            elif c.state is State.ONLINE and not self.asked and self.name not in c.bound:
                self.asked = True
                c.bind(self.name)
        elif c.state is State.OPEN:
            c.handshake(self.secret)
