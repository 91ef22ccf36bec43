"""The load generator process: ``python -m benchlib.loadgen '<spec as JSON>'``.

Owns: one benchmark run as seen from the components - set up N components,
run the measured phase (mode "throughput") or just hold N idle components
(mode "idle"), sample the router's CPU time and memory from /proc at the
moments that matter, and print one JSON object on stdout.  It runs in its
own process (pinned to its own core by the orchestrator) so that what it
costs is visible and never mixed with the orchestrator's work.

Bounded: setup has `setup_timeout` s, the measured phase `time_limit` s plus
`grace` s, and SIGALRM ends the process if everything together overruns.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time
from typing import Any, Dict

from . import peers
from .routers import busy_seconds, cpu_seconds, memory_kb


def percentile(sorted_values, q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (q in 0..100)."""
    if not sorted_values:
        return 0.0
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100.0 * len(sorted_values) + 0.5)) - 1))
    return float(sorted_values[k])


def gen_cpu() -> float:
    t = os.times()
    return t.user + t.system


def throughput(spec: Dict[str, Any]) -> Dict[str, Any]:
    deadline = time.monotonic() + spec["setup_timeout"]
    t0 = time.monotonic()
    conns = peers.setup_all(spec["protocol"], spec["components"], spec["port"], deadline,
                            user=spec["user"], password=spec["password"], secret=spec["secret"])
    engine = peers.Engine(spec["protocol"], conns, nap=spec.get("nap_us", 0) / 1e6)
    try:
        if spec["protocol"] == "jabberd2":
            missing = engine.wait_advertised(deadline, everyone=False)
            if missing:
                raise peers.PeerError("advertisements missing: " + "; ".join(missing[:5]))
        attempts = engine.warm_up(spec["size"], deadline)
        setup_s = time.monotonic() - t0
        pid = spec["router_pid"]
        cpu0, gen0, busy0 = cpu_seconds(pid), gen_cpu(), busy_seconds()
        t = engine.measure(spec["messages"], spec["window"], spec["size"],
                           spec["time_limit"], spec["grace"], spec["stall"])
        cpu1, gen1, busy1 = cpu_seconds(pid), gen_cpu(), busy_seconds()
        mem = memory_kb(pid)
    finally:
        engine.close()
        peers.close_all(conns)

    delivered, bounced, sent = sum(t.delivered), sum(t.bounced), t.total_sent()
    elapsed = max(t.last_arrival - t.first_send, 1e-9) if delivered else 0.0
    lat = sorted(t.latency_us)
    wire = len(t.templates[0] % (0, 0))
    return {
        "sent": sent,
        "delivered": delivered,
        "bounced": bounced,
        "lost": sent - delivered - bounced,
        "unsent": spec["components"] * spec["messages"] - sent,
        "lost_detail": peers.lost_detail(t),
        "stop_reason": t.stop_reason,
        "elapsed_s": elapsed,
        "stanzas_per_s": delivered / elapsed if elapsed else 0.0,
        "mbytes_per_s": delivered * wire / elapsed / 1e6 if elapsed else 0.0,
        "wire_bytes": wire,
        "latency_ms": {name: percentile(lat, q) / 1000.0
                       for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
        "router_cpu_s": cpu1 - cpu0,
        "router_rss_kb": mem.get("rss_kb", 0),
        "router_peak_rss_kb": mem.get("hwm_kb", 0),
        "loadgen_cpu_s": gen1 - gen0,
        # CPU the rest of the machine used meanwhile: other work skews the figures
        "other_cpu_s": max(0.0, (busy1 - busy0) - (cpu1 - cpu0) - (gen1 - gen0)),
        "setup_s": setup_s,
        "warmup_attempts": attempts,
    }


def idle(spec: Dict[str, Any]) -> Dict[str, Any]:
    pid, n = spec["router_pid"], spec["components"]
    before = memory_kb(pid)
    deadline = time.monotonic() + spec["setup_timeout"]
    t0 = time.monotonic()
    conns = peers.setup_all(spec["protocol"], n, spec["port"], deadline,
                            user=spec["user"], password=spec["password"], secret=spec["secret"])
    setup_s = time.monotonic() - t0
    engine = peers.Engine(spec["protocol"], conns)
    try:
        missing = []
        if spec["protocol"] == "jabberd2":
            missing = engine.wait_advertised(deadline, everyone=True)
        engine.drain(0.5, deadline)
        after = memory_kb(pid)
    finally:
        engine.close()
        peers.close_all(conns)
    return {
        "router_rss_before_kb": before.get("rss_kb", 0),
        "router_rss_kb": after.get("rss_kb", 0),
        "router_peak_rss_kb": after.get("hwm_kb", 0),
        "per_component_kb": (after.get("rss_kb", 0) - before.get("rss_kb", 0)) / n,
        "setup_s": setup_s,
        "advertisements_missing": missing[:5],
    }


def main(argv) -> int:
    spec = json.loads(argv[1])
    sys.path.insert(0, spec["repo"])  # for jrouter.wire.sasl
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.alarm(int(spec["setup_timeout"] + spec.get("time_limit", 0) + spec.get("grace", 0) + 30))
    try:
        result = (throughput if spec["mode"] == "throughput" else idle)(spec)
    except (peers.PeerError, OSError) as e:
        result = {"error": str(e)}
    except KeyboardInterrupt:
        return 130
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
