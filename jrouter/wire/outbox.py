"""One peer's output buffer: what the router has to say to it, in order.

Owns: the bytes queued for a peer until the shell takes them
(``data_to_send``), the packets held back while the peer throttles us
(protocol §4.9), and, for each routed packet still queued, its route and its
sender's namespace key, so that a packet the peer never got can be routed
again without parsing its bytes (protocol §6.6).

Must not know: sockets, routing, what the bytes mean. The shell learns that
the buffer stopped being empty through ``on_output``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from jrouter.wire.connection import ContextKey
    from jrouter.wire.counters import Counters
    from jrouter.wire.xmlstream import Element


def _nothing() -> None:
    pass


class Outbox:
    """Bytes for one peer, and what is known of the routed packets among them."""

    __slots__ = ("out", "routed", "held", "counters", "on_output")

    def __init__(self, counters: Counters) -> None:
        self.out: list[bytes] = []
        # (position in out, route, its sender's namespace key) of each routed packet in out.
        self.routed: list[tuple[int, Element, Optional[ContextKey]]] = []
        # while throttled: [(bytes, route, key)] held back
        self.held: Optional[list[tuple[bytes, Optional[Element], Optional[ContextKey]]]] = None
        self.counters = counters
        self.on_output: Callable[[], None] = _nothing

    @property
    def throttled(self) -> bool:
        return self.held is not None

    def send(self, data: bytes) -> None:
        """Queue bytes for the peer, bypassing the throttle."""
        out = self.out
        out.append(data)
        if len(out) == 1:
            self.on_output()

    def deliver(self, data: bytes, route: Optional[Element] = None,
                key: Optional[ContextKey] = None) -> None:
        """Queue a routed packet: held back while the peer throttles us.
        ``route`` (with its sender's namespace ``key``) is the unicast route
        the bytes carry, kept until they are handed to the shell."""
        counters = self.counters
        counters.packets_out += 1
        if self.held is not None:
            counters.throttled += 1
            self.held.append((data, route, key))
            return
        out = self.out
        if route is not None:
            self.routed.append((len(out), route, key))
        out.append(data)
        if len(out) == 1:
            self.on_output()

    def throttle(self) -> None:
        """Hold routed packets back from now on."""
        if self.held is None:
            self.held = []

    def release_throttled(self) -> None:
        """Queue what was held back while the peer throttled us, in order."""
        held, self.held = self.held or [], None
        for data, route, key in held:
            if route is not None:
                self.routed.append((len(self.out), route, key))
            self.send(data)

    def take_unsent(self) -> list[tuple[Element, Optional[ContextKey]]]:
        """The routes queued and not handed to the shell yet, taken out as
        (route, sender key), oldest first; what is not a routed packet (a
        goodbye) stays queued. Throttling ends."""
        routed = self.routed
        if routed:
            taken = {position for position, _route, _key in routed}
            self.out[:] = [data for i, data in enumerate(self.out) if i not in taken]
        unsent = [(route, key) for _position, route, key in routed]
        unsent.extend((route, key) for _data, route, key in self.held or () if route is not None)
        self.routed = []
        self.held = None
        return unsent

    def data_to_send(self) -> bytes:
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

    def queued_bytes(self) -> int:
        return sum(map(len, self.out))
