"""Traffic counters of one connection (or a sum of several).

Owns: ``Counters``, the figures the router bumps while it reads, routes and
writes (a bare ``__slots__`` record: on the hot path a counter is one
attribute increment, house rule 9), and ``fold``, which adds one record into
another when a connection closes so router-wide totals never go backwards.

Must not know: connections, routing, how figures are shown (ops/stats.py).
"""

from __future__ import annotations

from typing import Optional

#: The counter fields, in the order reports show them.
FIELDS = ("packets_in", "packets_out", "bytes_in", "bytes_out", "bounces", "drops", "throttled")


class Counters:
    """Traffic figures of one connection (or a sum of several).

    packets_in   top-level elements received from the authenticated peer
    packets_out  packets queued for the peer (routed, broadcast, log copies, bounces)
    bytes_in     bytes read from the peer's socket
    bytes_out    bytes written to the peer's socket
    bounces      packets from this peer sent back to it with an error
    drops        packets from this peer thrown away without an answer
    throttled    packets for this peer held back because it asked for <throttle/>
    """

    __slots__ = FIELDS

    def __init__(self) -> None:
        self.packets_in = 0
        self.packets_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.bounces = 0
        self.drops = 0
        self.throttled = 0

    def __repr__(self) -> str:
        return "Counters(%s)" % ", ".join(f"{f}={getattr(self, f)}" for f in FIELDS)

    def as_dict(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in FIELDS}


def fold(into: Counters, counters: Optional[Counters]) -> Counters:
    """Add ``counters`` (may be None) into ``into``; return ``into``.

    The core calls this when a connection goes away, with
    ``router.closed_counters`` as ``into``.
    """
    if counters is not None:
        for f in FIELDS:
            setattr(into, f, getattr(into, f) + getattr(counters, f))
    return into
