"""The soak's books: every packet sent, and what became of it.

Owns: sequence numbers per (sender, receiver) pair and per broadcaster, the
packets in flight, each component's connections (generations) and the
intervals it was away, and the verdict on every arrival: delivered, bounced
(expected or not), duplicate, out of order, misrouted, or never seen (lost,
or dropped because its receiver closed while it was in flight).
Must not know: sockets, the clock (times come in as integer microseconds),
XML, or processes.

Theory of operation
-------------------
Unicast (messages, IQ requests, IQ replies) shares one sequence space per
ordered pair (s, r).  A packet is in flight from its send until it arrives at
r (delivered) or comes back to s (bounced); whatever is still in flight when
the soak has drained is classified at the end:

* ``dropped_at_close``: r's connection current at the send was closed by r
  (we closed it) before r ever saw the packet: the router had it queued for a
  connection that went away (jabberd2 drops such packets; jrouter routes
  them again and loses them when nobody serves the name, protocol §4.10);
* ``lost``: anything else: a defect.

Per pair, deliveries to one receiver connection must be strictly increasing
(no duplicate, no reordering while both ends stay connected: one socket in,
one socket out, and a router that routes in order); bounces back to s are
strictly increasing too.  A bounce is *expected* only when r was away
(unbinding, unbound, closing or disconnected) at some moment between the send
and the bounce's arrival; any other bounce is a defect.

Broadcasts (protocol §4.6) go to every other authenticated peer.  A receiver
connection r/g that became ready (authenticated, bound) at time T must get
every broadcast its sender sent after T: the router read r/g's authentication
before it answered, and the broadcast after it was sent.  While r/g lives, a
gap in what it receives from one sender is a missing copy; at the end, a
connection still open must have all of them.  Copies of broadcasts sent
before T may arrive too (``early``: harmless).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

Pair = Tuple[int, int]
Key = Tuple[int, int, int]  # (sender, receiver, seq)
Conn = Tuple[int, int]      # (component, generation)


@dataclass
class Flight:
    t_us: int     # when it was sent
    kind: str     # 'U' message, 'Q' IQ request, 'R' IQ reply
    rgen: int     # the receiver's connection generation at the send


@dataclass
class Span:
    """A time a component was away; `end` None while it still is."""
    start: int
    end: Optional[int] = None


@dataclass
class Counts:
    sent: int = 0
    delivered: int = 0
    bounced: int = 0
    bounced_unexpected: int = 0
    duplicates: int = 0
    reordered: int = 0
    misrouted: int = 0
    phantom: int = 0           # a marker we never sent
    lost: int = 0
    dropped_at_close: int = 0
    by_kind: Dict[str, int] = field(default_factory=dict)


class Ledger:
    """Unicast accounting for `n` components."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.counts = Counts()
        self.next_seq: Dict[Pair, int] = {}
        self.inflight: Dict[Key, Flight] = {}
        self.outstanding = [0] * n             # in flight per sender
        self.last_delivered: Dict[Pair, Tuple[int, int]] = {}  # pair -> (rgen, seq)
        self.last_bounced: Dict[Pair, int] = {}
        self.gen = [0] * n                     # current connection of each component
        self.closed_at: Dict[Conn, int] = {}   # connection -> when its close completed
        self.away: List[List[Span]] = [[] for _ in range(n)]
        self.problems: List[str] = []          # the first few defects, spelled out
        self.dropped_to: List[int] = []        # receivers of the packets dropped at a close

    # ---- connections and absences

    def connected(self, i: int, gen: int) -> None:
        self.gen[i] = gen

    def closed(self, i: int, gen: int, now: int) -> None:
        self.closed_at[(i, gen)] = now

    def away_start(self, i: int, now: int) -> None:
        spans = self.away[i]
        if not spans or spans[-1].end is not None:
            spans.append(Span(now))

    def away_end(self, i: int, now: int) -> None:
        spans = self.away[i]
        if spans and spans[-1].end is None:
            spans[-1].end = now

    def is_away(self, i: int) -> bool:
        spans = self.away[i]
        return bool(spans) and spans[-1].end is None

    def was_away(self, i: int, start: int, end: int) -> bool:
        """Whether component i was away at any moment in [start, end]."""
        for span in reversed(self.away[i]):
            if span.end is not None and span.end < start:
                return False  # this one and all before it ended too early
            if span.start <= end:
                return True
        return False

    # ---- unicast

    def send(self, src: int, dst: int, kind: str, now: int) -> int:
        """Book a packet; returns its sequence number in the pair."""
        pair = (src, dst)
        seq = self.next_seq.get(pair, 0)
        self.next_seq[pair] = seq + 1
        self.inflight[(src, dst, seq)] = Flight(now, kind, self.gen[dst])
        self.outstanding[src] += 1
        c = self.counts
        c.sent += 1
        c.by_kind[kind] = c.by_kind.get(kind, 0) + 1
        return seq

    def _settle(self, src: int, dst: int, seq: int, what: str) -> Optional[Flight]:
        flight = self.inflight.pop((src, dst, seq), None)
        if flight is None:
            c = self.counts
            if seq < self.next_seq.get((src, dst), 0):
                c.duplicates += 1
                self._problem(f"duplicate {what} {src}->{dst} #{seq}")
            else:
                c.phantom += 1
                self._problem(f"{what} of a packet never sent: {src}->{dst} #{seq}")
            return None
        self.outstanding[src] -= 1
        return flight

    def delivered(self, src: int, dst: int, seq: int, at: int, at_gen: int,
                  now: int) -> Optional[int]:
        """Packet (src, dst, seq) arrived at component `at` (connection `at_gen`).
        Returns its latency in microseconds, or None if it was a defect."""
        if at != dst:
            self.counts.misrouted += 1
            self._problem(f"{src}->{dst} #{seq} delivered to component {at}")
            return None
        flight = self._settle(src, dst, seq, "delivery")
        if flight is None:
            return None
        self.counts.delivered += 1
        pair = (src, dst)
        last = self.last_delivered.get(pair)
        if last is not None and last[0] == at_gen and seq < last[1]:
            self.counts.reordered += 1
            self._problem(f"{src}->{dst} #{seq} delivered after #{last[1]}")
        if last is None or last[0] != at_gen or seq > last[1]:
            self.last_delivered[pair] = (at_gen, seq)
        return now - flight.t_us

    def bounced(self, src: int, dst: int, seq: int, at: int, now: int) -> Optional[Flight]:
        """Packet (src, dst, seq) came back to component `at` as a bounce."""
        if at != src:
            self.counts.misrouted += 1
            self._problem(f"bounce of {src}->{dst} #{seq} reached component {at}")
            return None
        flight = self._settle(src, dst, seq, "bounce")
        if flight is None:
            return None
        c = self.counts
        c.bounced += 1
        if not self.was_away(dst, flight.t_us, now):
            c.bounced_unexpected += 1
            self._problem(f"{src}->{dst} #{seq} bounced although {dst} was online")
        pair = (src, dst)
        if seq < self.last_bounced.get(pair, -1):
            c.reordered += 1
            self._problem(f"bounce {src}->{dst} #{seq} after #{self.last_bounced[pair]}")
        self.last_bounced[pair] = max(seq, self.last_bounced.get(pair, -1))
        return flight

    def overdue(self, now: int, limit_us: int) -> int:
        """Packets in flight for longer than `limit_us`: lost unless they turn up."""
        return sum(1 for f in self.inflight.values() if now - f.t_us > limit_us)

    def finish(self) -> List[Dict[str, Any]]:
        """Classify what is still in flight (call after draining); the first few."""
        detail: List[Dict[str, Any]] = []
        for (src, dst, seq), f in sorted(self.inflight.items()):
            closed = self.closed_at.get((dst, f.rgen))
            why = "dropped_at_close" if closed is not None and f.t_us < closed else "lost"
            setattr(self.counts, why, getattr(self.counts, why) + 1)
            if why == "dropped_at_close":
                self.dropped_to.append(dst)
            if len(detail) < 20:
                detail.append({"from": src, "to": dst, "seq": seq, "kind": f.kind,
                               "sent_us": f.t_us, "receiver_gen": f.rgen, "as": why})
        self.inflight.clear()
        return detail

    def dropped_by(self, which: Callable[[int], bool]) -> int:
        """How many packets dropped at a close were for receivers that `which` picks."""
        return sum(1 for dst in self.dropped_to if which(dst))

    def _problem(self, text: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(text)


@dataclass
class BroadcastCounts:
    sent: int = 0
    copies: int = 0
    early: int = 0
    missing: int = 0
    disorder: int = 0
    misrouted: int = 0


class Broadcasts:
    """Broadcast accounting: what each sender sent when, what each connection got."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.counts = BroadcastCounts()
        self.times: List[List[int]] = [[] for _ in range(n)]
        self.ready_at: Dict[Conn, int] = {}
        self.last: Dict[Tuple[int, int, int], int] = {}  # (sender, receiver, gen) -> seq
        self.problems: List[str] = []

    def send(self, src: int, now: int) -> int:
        self.times[src].append(now)
        self.counts.sent += 1
        return len(self.times[src]) - 1

    def ready(self, i: int, gen: int, now: int) -> None:
        self.ready_at[(i, gen)] = now

    def _first_expected(self, src: int, conn: Conn) -> int:
        """The first broadcast of `src` that connection `conn` must get."""
        ready = self.ready_at.get(conn)
        if ready is None:
            return len(self.times[src])  # not ready yet: nothing is owed
        return bisect_right(self.times[src], ready)

    def received(self, src: int, seq: int, at: int, gen: int, now: int) -> Optional[int]:
        """Broadcast `seq` of `src` reached connection (at, gen); its latency."""
        c = self.counts
        if at == src or not 0 <= seq < len(self.times[src]):
            c.misrouted += 1
            self._problem(f"broadcast {src}#{seq} reached {at}")
            return None
        c.copies += 1
        key = (src, at, gen)
        last = self.last.get(key, -1)
        lo = self._first_expected(src, (at, gen))
        if seq <= last:
            c.disorder += 1
            self._problem(f"broadcast {src}#{seq} reached {at}/{gen} after #{last}")
            return None
        if seq < lo:
            c.early += 1
        floor = max(last + 1, lo)
        if seq > floor:
            c.missing += seq - floor
            self._problem(f"broadcasts {src}#{floor}..{seq - 1} missing at {at}/{gen}")
        self.last[key] = seq
        return now - self.times[src][seq]

    def finish(self, open_conns: List[Conn]) -> None:
        """Every connection still open must have every broadcast owed to it."""
        for at, gen in open_conns:
            for src in range(self.n):
                if src == at or not self.times[src]:
                    continue
                floor = max(self.last.get((src, at, gen), -1) + 1,
                            self._first_expected(src, (at, gen)))
                short = len(self.times[src]) - floor
                if short > 0:
                    self.counts.missing += short
                    self._problem(f"broadcasts {src}#{floor}.. ({short}) never reached "
                                  f"{at}/{gen}")

    def _problem(self, text: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(text)
