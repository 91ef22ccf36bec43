"""The load generator process: ``python -m benchlib.loadgen '<spec as JSON>'``.

Owns: one benchmark run as seen from the components - set up N components
(component i on ports[i % len(ports)]: one port per node when several nodes
act as one router, and then wait until every node's table has every name),
run the measured phase (mode "throughput") or just hold N idle components
(mode "idle"), sample the router's CPU time and memory from /proc (each
node's, with several) and the nodes' link counters from their /status at the
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
from typing import Any, Dict, List

from . import cluster, peers
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


def wait_known(spec: Dict[str, Any], deadline: float) -> None:
    """Several nodes: wait until every component's name is in every node's
    table (each node's /status), so no packet of the run meets a node that
    has not heard of its target yet."""
    ports = spec.get("status_ports") or []
    names = [peers.comp_name(i) for i in range(spec["components"])]
    while ports:
        missing = cluster.missing_names(ports, names)
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise peers.PeerError("binds not known on every node in time: " + "; ".join(missing))
        time.sleep(0.05)


def link_figures(spec: Dict[str, Any]) -> List[Dict[str, int]]:
    """Per node: its /status counters of traffic across nodes ([] for one router)."""
    return [cluster.link_figures(cluster.status(p)) for p in spec.get("status_ports") or []]


def memory(pids: List[int]) -> Dict[str, Any]:
    """RSS and peak RSS of each pid, and their sums (several nodes: the whole router)."""
    mems = [memory_kb(pid) for pid in pids]
    return {"rss_kb": sum(m.get("rss_kb", 0) for m in mems),
            "hwm_kb": sum(m.get("hwm_kb", 0) for m in mems),
            "node_hwm_kb": [m.get("hwm_kb", 0) for m in mems]}


def throughput(spec: Dict[str, Any]) -> Dict[str, Any]:
    deadline = time.monotonic() + spec["setup_timeout"]
    t0 = time.monotonic()
    conns = peers.setup_all(spec["protocol"], spec["components"], spec["ports"], deadline,
                            user=spec["user"], password=spec["password"], secret=spec["secret"])
    engine = peers.Engine(spec["protocol"], conns, nap=spec.get("nap_us", 0) / 1e6,
                          step=spec.get("step", 1))
    try:
        wait_known(spec, deadline)
        if spec["protocol"] == "jabberd2":
            missing = engine.wait_advertised(deadline, everyone=False)
            if missing:
                raise peers.PeerError("advertisements missing: " + "; ".join(missing[:5]))
        attempts = engine.warm_up(spec["size"], deadline)
        setup_s = time.monotonic() - t0
        pids = spec["router_pids"]
        etcd = spec.get("etcd_pid")
        links0 = link_figures(spec)
        cpu0, gen0, busy0 = [cpu_seconds(p) for p in pids], gen_cpu(), busy_seconds()
        etcd0 = cpu_seconds(etcd) if etcd else 0.0
        t = engine.measure(spec["messages"], spec["window"], spec["size"],
                           spec["time_limit"], spec["grace"], spec["stall"])
        cpu1, gen1, busy1 = [cpu_seconds(p) for p in pids], gen_cpu(), busy_seconds()
        etcd1 = cpu_seconds(etcd) if etcd else 0.0
        links1 = link_figures(spec)
        mem = memory(pids)
    finally:
        engine.close()
        peers.close_all(conns)

    delivered, bounced, sent = sum(t.delivered), sum(t.bounced), t.total_sent()
    elapsed = max(t.last_arrival - t.first_send, 1e-9) if delivered else 0.0
    lat = sorted(t.latency_us)
    wire = len(t.templates[0] % (0, 0))
    node_cpu = [b - a for a, b in zip(cpu0, cpu1)]
    result = {
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
        "router_cpu_s": sum(node_cpu),
        "node_cpu_s": node_cpu,
        "router_rss_kb": mem["rss_kb"],
        "router_peak_rss_kb": mem["hwm_kb"],
        "node_peak_rss_kb": mem["node_hwm_kb"],
        "loadgen_cpu_s": gen1 - gen0,
        # CPU the rest of the machine used meanwhile (etcd included): other
        # work skews the figures
        "other_cpu_s": max(0.0, (busy1 - busy0) - sum(node_cpu) - (gen1 - gen0)),
        "setup_s": setup_s,
        "warmup_attempts": attempts,
    }
    if etcd:
        result["etcd_cpu_s"] = etcd1 - etcd0
    if links0:
        # Across nodes, per node, over the measured phase: routes other nodes
        # forwarded to it, and what its links carried and dropped.
        result["links"] = [{k: after[k] - before[k] for k in after}
                           for before, after in zip(links0, links1)]
        result["crossed"] = sum(d["forwarded_in"] for d in result["links"])
    return result


def idle(spec: Dict[str, Any]) -> Dict[str, Any]:
    pids, n = spec["router_pids"], spec["components"]
    before = memory(pids)
    deadline = time.monotonic() + spec["setup_timeout"]
    t0 = time.monotonic()
    conns = peers.setup_all(spec["protocol"], n, spec["ports"], deadline,
                            user=spec["user"], password=spec["password"], secret=spec["secret"])
    setup_s = time.monotonic() - t0
    engine = peers.Engine(spec["protocol"], conns)
    try:
        wait_known(spec, deadline)
        missing = []
        if spec["protocol"] == "jabberd2":
            missing = engine.wait_advertised(deadline, everyone=True)
        engine.drain(0.5, deadline)
        after = memory(pids)
    finally:
        engine.close()
        peers.close_all(conns)
    return {
        "router_rss_before_kb": before["rss_kb"],
        "router_rss_kb": after["rss_kb"],
        "router_peak_rss_kb": after["hwm_kb"],
        "per_component_kb": (after["rss_kb"] - before["rss_kb"]) / n,
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
