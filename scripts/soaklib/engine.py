"""The soak's engine: every component, one event loop, the traffic and the churn.

Owns: the components of one soak (`peer.Peer`), the one event loop that
drives them all (a `selectors` loop with a timer heap), the paced traffic,
the churn, and what each arrival means for the books (`ledger`).  Knows
nothing of phases, samples or output (`loadgen` runs the engine).

Theory of operation
-------------------
Every TICK the loop sends what the rates say is due: unicast messages and IQ
requests (`rate` per second, an `iq_share` of them IQs) from a random online
component to a random other one, each booked in the ledger first; broadcasts
(`broadcast_rate`) from random online jabberd2 components; and churn events
(`churn_rate`): an online component unbinds its name and binds it again
later, or leaves (unbind first, if it can; wait until its own packets have
settled; `</stream:stream>`; read until the router closes) and reconnects
later, away for `away_s` on average (half to one and a half times).  A
sender keeps at most `window` packets in flight; a packet that would exceed
it is not sent (`skipped`).  A component that receives an IQ request while
online answers at once.  All of one tick's bytes for a socket go in one write.
"""

from __future__ import annotations

import heapq
import random
import selectors
import time
from array import array
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

from benchlib.loadgen import percentile

from jrouter.wire.xmlstream import Element

from . import stanzas
from .ledger import Broadcasts, Ledger
from .peer import Gone, Peer, Phase, Ready, Refused, Unbound

TICK = 0.005                # s between traffic rounds
SETTLE_TIMEOUT = 5_000_000  # us a leaving component waits for its own packets
CLOSE_TIMEOUT = 5_000_000   # us a closing component waits for the router to close
RETRY_BIND = 200_000        # us before asking again for a refused name
RETRY_CONNECT = 1_000_000   # us before connecting again after a failure


def now_us() -> int:
    return time.monotonic_ns() // 1000


def is_xep0114(i: int, share: float) -> bool:
    """Spread `share` of the components over the indices (0.5: every odd one)."""
    return int((i + 1) * share) > int(i * share)


def quantiles(values: "array[int]") -> Dict[str, float]:
    """p50/p99/max in milliseconds."""
    s = sorted(values)
    return {k: percentile(s, q) / 1000.0 for k, q in (("p50", 50), ("p99", 99), ("max", 100))}


class Window:
    """What one sampling interval saw."""

    def __init__(self) -> None:
        self.lat: array[int] = array("q")     # one-way latency of each unicast delivery, us
        self.rtt: array[int] = array("q")     # IQ request to its result, us
        self.bcast: array[int] = array("q")   # broadcast send to each copy, us
        self.delivered = self.bounced = 0
        self.stall_us = 0   # the longest pass of the loop (work between two selects)


class Soak:
    def __init__(self, spec: Dict[str, Any]) -> None:
        self.spec = spec
        n = spec["components"]
        self.rng = random.Random(spec["seed"])
        self.peers = [Peer(i, not is_xep0114(i, spec["xep0114_share"]), spec["port"],
                           spec["user"], spec["password"], spec["secret"]) for i in range(n)]
        self.ledger, self.bcasts = Ledger(n), Broadcasts(n)
        self.sel = selectors.DefaultSelector()
        self.timers: List[Tuple[int, int, Callable[[int], None]]] = []
        self.timer_seq = 0
        self.dirty: Set[Peer] = set()
        self.writing: Set[Peer] = set()
        self.settling: Set[Peer] = set()  # components waiting for their own packets to settle
        self.window = Window()
        self.fill = "x" * (2 * spec["size"] + 1)
        self.stats: Dict[str, int] = dict(
            skipped=0, iq_unanswered=0, churn_unbind=0, churn_reconnect=0,
            router_closed=0, settle_timeouts=0, close_timeouts=0, bind_retries=0,
            connect_failures=0, broadcast_bounced=0, broken_by_broadcast=0, other=0)
        self.bounce_codes: Dict[str, int] = {}
        self.gone_why: List[str] = []
        self.broken_why: List[str] = []  # setups a broadcast broke (see peer.Gone)

    # ---- timers and the loop

    def at(self, t_us: int, fn: Callable[[int], None]) -> None:
        self.timer_seq += 1
        heapq.heappush(self.timers, (t_us, self.timer_seq, fn))

    def pump(self, until: Callable[[], bool], deadline: float,
             each: Optional[Callable[[int], None]] = None) -> bool:
        """Run the loop until `until()` (True) or the monotonic `deadline` (False);
        `each(now)` runs every TICK."""
        next_tick = time.monotonic()
        while not until():
            mono = time.monotonic()
            if mono >= deadline:
                return False
            wake = min(deadline, next_tick)
            if self.timers:
                wake = min(wake, self.timers[0][0] / 1e6)
            ready = self.sel.select(max(0.0, wake - mono))
            t_work = now_us()
            self.read_all(ready)
            now = now_us()
            while self.timers and self.timers[0][0] <= now:
                heapq.heappop(self.timers)[2](now)
            if time.monotonic() >= next_tick:
                next_tick += TICK
                if each is not None:
                    each(now)
            self.flush()
            self.window.stall_us = max(self.window.stall_us, now_us() - t_work)
        return True

    def flush(self) -> None:
        for p in self.dirty:
            if p.sock is None:
                continue
            left = p.flush()
            if left != (p in self.writing):
                (self.writing.add if left else self.writing.discard)(p)
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if left else 0)
                self.sel.modify(p.sock, events, p)
        self.dirty.clear()

    # ---- connections

    def connect(self, p: Peer, now: int) -> None:
        try:
            sock = p.connect(now)
        except OSError as e:
            self.stats["connect_failures"] += 1
            self.gone_why.append(f"{p.name}: connect: {e}")
            self.at(now + RETRY_CONNECT, lambda t: self.connect(p, t))
            return
        self.ledger.connected(p.index, p.gen)
        self.sel.register(sock, selectors.EVENT_READ, p)
        self.dirty.add(p)

    def read_all(self, ready: List[Tuple[selectors.SelectorKey, int]]) -> None:
        """Read every ready socket first, each read timed, then make sense of
        them: a packet's latency is then the router's and the kernel's, not
        the time this process spent parsing the others (a broadcast makes
        hundreds of sockets ready at once)."""
        reads = []
        for key, mask in ready:
            p = key.data
            if mask & selectors.EVENT_WRITE:
                self.dirty.add(p)
            if mask & selectors.EVENT_READ and p.sock is not None:
                reads.append((p, p.gen, p.recv(), now_us()))
        for p, gen, got, t in reads:
            if p.gen == gen and p.sock is not None:
                self.on_data(p, got, t)

    def on_data(self, p: Peer, got: Union[bytes, Gone], now: int) -> None:
        for ev in [got] if isinstance(got, Gone) else p.feed(got) if got else []:
            if isinstance(ev, Gone):
                self.on_gone(p, ev, now)
                return
            if isinstance(ev, Ready):
                self.on_ready(p, now)
            elif isinstance(ev, Unbound):
                self.on_unbound(p, now)
            elif isinstance(ev, Refused):
                self.stats["bind_retries"] += 1
                self.at(now + RETRY_BIND, lambda t: self.retry_bind(p))
            elif isinstance(ev, Element):
                self.on_stanza(p, stanzas.arrival(ev), now)
        self.dirty.add(p)

    def retry_bind(self, p: Peer) -> None:
        p.retry_bind()
        self.dirty.add(p)

    def on_ready(self, p: Peer, now: int) -> None:
        if p.phase is Phase.SETUP:
            self.bcasts.ready(p.index, p.gen, now)
        p.move(Phase.ONLINE, now)
        self.ledger.away_end(p.index, now)

    def on_unbound(self, p: Peer, now: int) -> None:
        p.move(Phase.UNBOUND, now)
        if p.leaving:
            p.leave(now)
            self.settling.add(p)
        else:
            self.at(p.back_at, lambda t: self.rebind(p, t))

    def rebind(self, p: Peer, now: int) -> None:
        if p.phase is Phase.UNBOUND:
            p.bind(now)
            self.dirty.add(p)

    def on_gone(self, p: Peer, ev: Gone, now: int) -> None:
        if ev.broadcast_first:
            self.stats["broken_by_broadcast"] += 1
            if len(self.broken_why) < 5:
                self.broken_why.append(f"{p.name}: {ev.why}")
            p.back_at = now + RETRY_CONNECT
        elif not ev.expected:
            self.stats["router_closed"] += 1
            if len(self.gone_why) < 20:  # how the router ended them, for the report
                self.gone_why.append(f"{p.name} ({p.phase.name}): {ev.why}")
            p.back_at = now + RETRY_CONNECT
        if p.sock is not None:
            self.sel.unregister(p.sock)
            self.writing.discard(p)
        p.drop()
        self.settling.discard(p)
        self.ledger.closed(p.index, p.gen, now)
        self.ledger.away_start(p.index, now)
        p.move(Phase.AWAY, now)
        self.at(max(now, p.back_at), lambda t: self.connect(p, t))

    # ---- what arrives

    def on_stanza(self, p: Peer, a: stanzas.Arrival, now: int) -> None:
        w = self.window
        if a.what == "delivery":
            lat = self.ledger.delivered(a.src, a.dst, a.seq, p.index, p.gen, now)
            if lat is None:
                return
            w.delivered += 1
            w.lat.append(lat)
            if a.kind == "Q":
                self.answer(p, a, now)
            elif a.kind == "R":
                w.rtt.append(now - a.request_t_us)
        elif a.what == "bounce":
            if self.ledger.bounced(a.src, a.dst, a.seq, p.index, now) is not None:
                w.bounced += 1
                key = ("jabberd2" if p.jabberd2 else "xep0114") + ":" + a.code
                self.bounce_codes[key] = self.bounce_codes.get(key, 0) + 1
        elif a.what == "broadcast":
            lat = self.bcasts.received(a.src, a.seq, p.index, p.gen, now)
            if lat is not None:
                w.bcast.append(lat)
        elif a.what == "broadcast-bounce":
            self.stats["broadcast_bounced"] += 1
        else:
            self.stats["other"] += 1

    def answer(self, p: Peer, a: stanzas.Arrival, now: int) -> None:
        """An IQ result for a request that reached `p`, if `p` may still send."""
        if p.phase is not Phase.ONLINE:
            self.stats["iq_unanswered"] += 1
            return
        now = now_us()  # sent now, not when the request was read
        seq = self.ledger.send(p.index, a.src, "R", now)
        p.send(stanzas.unicast(p.jabberd2, "R", p.index, a.src, seq, now,
                               request_t=a.t_us))
        self.dirty.add(p)

    # ---- traffic and churn

    def pick(self, ok: Callable[[Peer], bool]) -> Optional[Peer]:
        for _ in range(4):
            p = self.peers[self.rng.randrange(len(self.peers))]
            if p.phase is Phase.ONLINE and ok(p):
                return p
        return None

    def send_unicast(self, now: int) -> None:
        window = self.spec["window"]
        p = self.pick(lambda q: self.ledger.outstanding[q.index] < window)
        n = len(self.peers)
        if p is None or n < 2:
            self.stats["skipped"] += 1
            return
        dst = (p.index + 1 + self.rng.randrange(n - 1)) % n
        kind = "Q" if self.rng.random() < self.spec["iq_share"] else "U"
        seq = self.ledger.send(p.index, dst, kind, now)
        fill = self.fill[:self.rng.randrange(len(self.fill))] if kind == "U" else ""
        p.send(stanzas.unicast(p.jabberd2, kind, p.index, dst, seq, now, fill))
        self.dirty.add(p)

    def send_broadcast(self, now: int) -> None:
        p = self.pick(lambda q: q.jabberd2)
        if p is None:
            self.stats["skipped"] += 1
            return
        bseq = self.bcasts.send(p.index, now)
        p.send(stanzas.broadcast(p.index, bseq, now, self.fill[:self.spec["size"]]))
        self.dirty.add(p)

    def churn(self, now: int) -> None:
        away = sum(1 for p in self.peers if p.phase is not Phase.ONLINE)
        p = self.pick(lambda q: True)
        if p is None or away >= max(1, len(self.peers) // 8):
            return
        a = self.spec["away_s"]
        p.back_at = now + int(self.rng.uniform(0.5 * a, 1.5 * a) * 1e6)
        p.leaving = not p.jabberd2 or self.rng.random() < 0.5
        self.stats["churn_reconnect" if p.leaving else "churn_unbind"] += 1
        if p.jabberd2:
            self.ledger.away_start(p.index, now)
            p.unbind(now)
        else:
            p.leave(now)
            self.settling.add(p)
        self.dirty.add(p)

    def settle(self, now: int) -> None:
        """Leaving components whose own packets have settled say goodbye."""
        for p in list(self.settling):
            left = self.ledger.outstanding[p.index]
            if left and now - p.since < SETTLE_TIMEOUT:
                continue
            if left:
                self.stats["settle_timeouts"] += 1
            self.settling.discard(p)
            self.ledger.away_start(p.index, now)
            p.close(now)
            self.at(now + CLOSE_TIMEOUT, self.close_timer(p, p.gen))
            self.dirty.add(p)

    def close_timer(self, p: Peer, gen: int) -> Callable[[int], None]:
        return lambda now: self.close_late(p, gen, now)

    def close_late(self, p: Peer, gen: int, now: int) -> None:
        if p.gen == gen and p.phase is Phase.CLOSING:
            self.stats["close_timeouts"] += 1
            self.on_gone(p, Gone(True, "no close from the router"), now)

    def __repr__(self) -> str:
        return f"Soak({len(self.peers)} components)"
