"""The soak's load generator process: ``python -m soaklib.loadgen '<spec as JSON>'``.

Owns: the phases of one soak (setup, traffic, drain, the final count), the
samples, and the process's output: JSON lines on stdout, each with a "type":
"ready" once every component is online, "sample" every `interval` seconds of
traffic (and one after the drain), then "result" (or "error").  It runs in
its own process, pinned by the orchestrator (scripts/jrouter-soak) to a core
of its own, so the router has the other one.

Bounded: setup has `setup_timeout` s, the traffic `seconds`, the drain
`drain_s` (plus QUIET), and SIGALRM ends the process if everything together
overruns.
"""

from __future__ import annotations

import json
import resource
import signal
import sys
import time
from array import array
from dataclasses import asdict
from typing import Any, Dict, List

from benchlib.loadgen import gen_cpu, percentile
from benchlib.routers import cpu_seconds, memory_kb

from .engine import Soak, now_us, quantiles
from .peer import Phase, PeerError

WAVE = 32      # components connecting at once during setup
QUIET = 1.0    # s read after the drain, for broadcast copies still on the way
GONE = 2_000_000  # us after a receiver's close when its packets are given up


def emit(kind: str, **doc: Any) -> None:
    print(json.dumps(dict(doc, type=kind)), flush=True)


class Sampler:
    """The figures of each interval: the router's memory and CPU, and the traffic."""

    def __init__(self, soak: Soak, pid: int) -> None:
        self.soak, self.pid = soak, pid
        self.t0 = time.monotonic()
        self.last_t, self.last_cpu, self.last_gen = self.t0, cpu_seconds(pid), gen_cpu()
        self.lat: array[int] = array("q")     # the whole run's, for the totals
        self.rtt: array[int] = array("q")
        self.bcast: array[int] = array("q")
        self.next = self.t0

    def due(self) -> bool:
        return time.monotonic() >= self.next

    def sample(self, phase: str) -> Dict[str, Any]:
        soak, mono = self.soak, time.monotonic()
        w, soak.window = soak.window, type(soak.window)()
        self.lat.extend(w.lat)
        self.rtt.extend(w.rtt)
        self.bcast.extend(w.bcast)
        mem, cpu, gen = memory_kb(self.pid), cpu_seconds(self.pid), gen_cpu()
        span = max(mono - self.last_t, 1e-9)
        led = soak.ledger
        doc = dict(
            phase=phase, t_s=round(mono - self.t0, 2), rss_kb=mem.get("rss_kb", 0),
            hwm_kb=mem.get("hwm_kb", 0), router_cpu_pct=100 * (cpu - self.last_cpu) / span,
            loadgen_cpu_pct=100 * (gen - self.last_gen) / span, gen_stall_ms=w.stall_us / 1000,
            delivered_per_s=w.delivered / span, bounced_in_interval=w.bounced,
            latency_ms=quantiles(w.lat), iq_rtt_ms=quantiles(w.rtt),
            broadcast_ms=quantiles(w.bcast), broadcast_copies=len(w.bcast),
            sent=led.counts.sent, delivered=led.counts.delivered, bounced=led.counts.bounced,
            inflight=len(led.inflight), overdue=led.overdue(now_us(), soak.spec["overdue_s"] * 10**6),
            away=sum(1 for p in soak.peers if p.phase is not Phase.ONLINE),
            churn=soak.stats["churn_unbind"] + soak.stats["churn_reconnect"],
            defects=defects(soak))
        self.last_t, self.last_cpu, self.last_gen = mono, cpu, gen
        self.next += soak.spec["interval"]
        return doc


def defects(soak: Soak) -> int:
    """Everything so far that is wrong whatever the timing (loss is counted at the end)."""
    c, b = soak.ledger.counts, soak.bcasts.counts
    return (c.bounced_unexpected + c.duplicates + c.reordered + c.misrouted + c.phantom
            + b.missing + b.disorder + b.misrouted + soak.stats["router_closed"]
            + soak.stats["broadcast_bounced"])


def setup(soak: Soak, deadline: float) -> bool:
    """Connect every component, WAVE at a time; True once all are online."""
    peers = soak.peers
    for start in range(0, len(peers), WAVE):
        wave = peers[start:start + WAVE]
        for p in wave:
            soak.connect(p, now_us())
        if not soak.pump(lambda: all(p.phase is Phase.ONLINE for p in wave), deadline):
            return False
    return True


def traffic(soak: Soak, sampler: Sampler) -> None:
    """`seconds` of paced traffic and churn, a sample every `interval`."""
    spec = soak.spec
    start = time.monotonic()
    done = {"unicast": 0, "broadcast": 0, "churn": 0}
    rates = {"unicast": spec["rate"], "broadcast": spec["broadcast_rate"],
             "churn": spec["churn_rate"]}
    actions = {"unicast": soak.send_unicast, "broadcast": soak.send_broadcast,
               "churn": soak.churn}

    def each(now: int) -> None:
        elapsed = time.monotonic() - start
        for what, rate in rates.items():
            due = int(rate * elapsed) - done[what]
            for _ in range(due):
                actions[what](now)
            done[what] += max(0, due)
        soak.settle(now)
        if sampler.due():
            emit("sample", **sampler.sample("traffic"))

    soak.pump(lambda: False, start + spec["seconds"], each)


def drain(soak: Soak) -> bool:
    """No new traffic or churn: wait until every component is back online and
    every packet settled, or can no longer arrive (its receiver's connection
    closed GONE s ago); then read QUIET s more.  True if it all settled."""
    led = soak.ledger

    def settled() -> bool:
        if not all(p.phase is Phase.ONLINE for p in soak.peers):
            return False
        now = now_us()
        for (_src, dst, _seq), f in led.inflight.items():
            closed = led.closed_at.get((dst, f.rgen))
            if closed is None or now - closed < GONE:
                return False
        return True

    ok = soak.pump(settled, time.monotonic() + soak.spec["drain_s"], soak.settle)
    soak.pump(lambda: False, time.monotonic() + QUIET, soak.settle)
    return ok


def result(soak: Soak, sampler: Sampler, setup_s: float, drained: bool) -> Dict[str, Any]:
    led, bc = soak.ledger, soak.bcasts
    detail = led.finish()
    dropped: Dict[str, int] = {}
    for d in detail:
        d["receiver_protocol"] = "jabberd2" if soak.peers[d["to"]].jabberd2 else "xep0114"
    for proto in ("jabberd2", "xep0114"):
        dropped[proto] = led.dropped_by(lambda i: soak.peers[i].jabberd2 == (proto == "jabberd2"))
    bc.finish([(p.index, p.gen) for p in soak.peers if p.sock is not None])
    lat = sorted(sampler.lat)
    overall = {k: percentile(lat, q) / 1000.0
               for k, q in (("p50", 50), ("p99", 99), ("p99.9", 99.9), ("max", 100))}
    return dict(
        setup_s=setup_s, drained=drained, unicast=asdict(led.counts), broadcast=asdict(bc.counts),
        dropped_at_close_to=dropped,
        latency_ms=overall, iq_rtt_ms=quantiles(sampler.rtt),
        broadcast_ms=quantiles(sampler.bcast), bounce_codes=soak.bounce_codes,
        events=soak.stats, lost_detail=detail, problems=led.problems + bc.problems,
        router_ended=soak.gone_why, broken_by_broadcast=soak.broken_why, components={
            "jabberd2": sum(1 for p in soak.peers if p.jabberd2),
            "xep0114": sum(1 for p in soak.peers if not p.jabberd2)},
        connections=sum(p.gen for p in soak.peers), defects=defects(soak))


def run(spec: Dict[str, Any]) -> None:
    soak = Soak(spec)
    t0 = time.monotonic()
    try:
        if not setup(soak, t0 + spec["setup_timeout"]):
            late = [p.name for p in soak.peers if p.phase is not Phase.ONLINE]
            emit("error", error=f"setup: {len(late)} components not online within "
                                f"{spec['setup_timeout']:.0f} s (first: {late[:5]}); "
                                f"{soak.gone_why[:3]}")
            return
        setup_s = time.monotonic() - t0
        emit("ready", setup_s=setup_s)
        sampler = Sampler(soak, spec["router_pid"])
        sampler.next += spec["interval"]
        traffic(soak, sampler)
        drained = drain(soak)
        emit("sample", **sampler.sample("after drain"))
        emit("result", **result(soak, sampler, setup_s, drained))
    finally:
        for p in soak.peers:
            if p.sock is not None:
                try:
                    p.sock.send(b"</stream:stream>")
                except OSError:
                    pass
                p.drop()


def main(argv: List[str]) -> int:
    spec = json.loads(argv[1])
    sys.path.insert(0, spec["repo"])
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.alarm(int(spec["setup_timeout"] + spec["seconds"] + spec["drain_s"] + 60))
    try:
        run(spec)
    except (PeerError, OSError) as e:
        emit("error", error=f"{type(e).__name__}: {e}")
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
