"""One peer's output buffer: what the router has to say to it, in order.

Owns: the bytes queued for a peer until the shell takes them
(``data_to_send``), the packets held back while the peer throttles us
(protocol §4.9), and, for each routed packet still queued, its route, its
sender's namespace key and its sender, so that a packet the peer never got
can be routed again (or bounced) without parsing its bytes (protocol §6.6).

The buffer is bounded (``limit`` bytes, ``<io><limits><queue>``): past it the
outbox says it has ``overflowed`` and wakes the shell, and the router ends
the peer's stream and routes what was queued elsewhere (issue 10, #1). It
keeps taking bytes meanwhile: refusing one here would lose it silently.

Must not know: sockets, routing, what the bytes mean. The shell learns that
the buffer stopped being empty, or overflowed, through ``on_output``.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from typing import TypeAlias

    from jrouter.wire.connection import Connection, ContextKey
    from jrouter.wire.counters import Counters
    from jrouter.wire.xmlstream import Element


def _nothing() -> None:
    pass


#: A routed packet as the outbox keeps it: its route, its sender's namespace
#: key, and its sender (None when the router made it up, e.g. a bounce).
Routed: TypeAlias = "tuple[Element, Optional[ContextKey], Optional[Connection]]"


class Outbox:
    """Bytes for one peer, and what is known of the routed packets among them."""

    __slots__ = ("out", "routed", "held", "counters", "on_output", "size", "limit", "overflowed",
                 "unacked", "batches", "handed", "acked")

    def __init__(self, counters: Counters, limit: int = 0) -> None:
        self.out: list[bytes] = []
        # (position in out, route, key, sender) of each routed packet in out.
        self.routed: list[tuple[int, Element, Optional[ContextKey], Optional[Connection]]] = []
        # while throttled: [(bytes, route, key, sender)] held back
        self.held: Optional[list[tuple[bytes, Optional[Element], Optional[ContextKey],
                                       Optional[Connection]]]] = None
        self.counters = counters
        self.on_output: Callable[[], None] = _nothing
        self.size = 0                 # bytes in out and held
        self.limit = limit            # 0: unbounded
        self.overflowed = False
        # Routed packets handed to the shell whose bytes it has not written
        # yet, as (where they end in the stream, route, key, sender): a peer
        # cut off meanwhile never got them (see sent()). Made by the first
        # write that stops short, dropped when all is written: an empty deque
        # is ~0.7 KiB, and most peers never need one.
        self.unacked: Optional[deque[tuple[int, Element, Optional[ContextKey],
                                           Optional[Connection]]]] = None
        # Batches handed over and not written in full yet, as (stream offset
        # of the batch, its out list, its routed list): where each packet
        # ends is worked out only if a write stops short (_unpack), since
        # the shell usually writes a whole batch at once.
        self.batches: list[tuple[int, list[bytes], list[tuple[int, Element, Optional[ContextKey],
                                                                Optional[Connection]]]]] = []
        self.handed = 0               # bytes handed to the shell so far
        self.acked = 0                # of those, bytes the shell says it wrote

    @property
    def throttled(self) -> bool:
        return self.held is not None

    def unhook(self) -> None:
        """The shell is done with this queue: ``on_output`` calls nothing
        (it was the shell's, and held the shell's peer alive)."""
        self.on_output = _nothing

    def send(self, data: bytes) -> None:
        """Queue bytes for the peer, bypassing the throttle."""
        out = self.out
        out.append(data)
        self.size += len(data)
        if len(out) == 1:
            self.on_output()
        elif self.limit and self.size > self.limit:
            self._overflow()

    def deliver(self, data: bytes, route: Optional[Element] = None,
                key: Optional[ContextKey] = None, sender: Optional[Connection] = None) -> None:
        """Queue a routed packet: held back while the peer throttles us.
        ``route`` (with its sender's namespace ``key``, and its ``sender``) is
        the unicast route the bytes carry, kept until they are handed to the shell."""
        counters = self.counters
        counters.packets_out += 1
        self.size += len(data)
        if self.held is not None:
            counters.throttled += 1
            self.held.append((data, route, key, sender))
        else:
            out = self.out
            if route is not None:
                self.routed.append((len(out), route, key, sender))
            out.append(data)
            if len(out) == 1:
                self.on_output()
                return
        if self.limit and self.size > self.limit:
            self._overflow()

    def _overflow(self) -> None:
        if not self.overflowed:
            self.overflowed = True
            self.on_output()          # the shell looks, and tells the router

    def throttle(self) -> None:
        """Hold routed packets back from now on."""
        if self.held is None:
            self.held = []

    def release_throttled(self) -> None:
        """Queue what was held back while the peer throttled us, in order."""
        held, self.held = self.held or [], None
        out = self.out
        for data, route, key, sender in held:
            if route is not None:
                self.routed.append((len(out), route, key, sender))
            out.append(data)
            if len(out) == 1:
                self.on_output()

    def take_unsent(self) -> list[Routed]:
        """The routes queued and not handed to the shell yet, taken out as
        (route, sender key, sender), oldest first; what is not a routed packet
        (a goodbye) stays queued. Throttling ends."""
        routed = self.routed
        if routed:
            taken = {entry[0] for entry in routed}
            self.out[:] = [data for i, data in enumerate(self.out) if i not in taken]
        self._unpack()
        unsent: list[Routed] = [(route, key, sender) for _end, route, key, sender in self.unacked or ()]
        self.unacked = None
        unsent.extend((route, key, sender) for _position, route, key, sender in routed)
        unsent.extend((route, key, sender) for _data, route, key, sender in self.held or ()
                      if route is not None)
        self.routed = []
        self.held = None
        self.size = sum(map(len, self.out))
        return unsent

    def data_to_send(self) -> bytes:
        """Everything queued for the peer (bar what a throttle holds), as one bytes object."""
        out = self.out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        routed = self.routed
        if routed:
            self.batches.append((self.handed, out, routed))
            self.out = []
            self.routed = []
        else:
            out.clear()
        self.handed += len(data)
        self.size -= len(data)
        self.counters.bytes_out += len(data)
        return data

    def _unpack(self) -> None:
        """Where each routed packet of the batches handed over ends in the stream."""
        if not self.batches:
            return
        unacked = self.unacked
        if unacked is None:
            unacked = self.unacked = deque()
        for end, out, routed in self.batches:
            ends = []
            for data in out:
                end += len(data)
                ends.append(end)
            for position, route, key, sender in routed:
                unacked.append((ends[position], route, key, sender))
        self.batches.clear()

    def sent(self, count: int) -> None:
        """The shell wrote ``count`` more bytes of what it was handed: the
        packets that ended in them reached the peer's socket."""
        self.acked += count
        if self.acked >= self.handed:
            if self.batches:
                self.batches.clear()
            self.unacked = None
            return
        self._unpack()
        unacked = self.unacked
        while unacked and unacked[0][0] <= self.acked:
            unacked.popleft()

    def queued_bytes(self) -> int:
        return sum(map(len, self.out))
