"""Figures and tables: derived metrics, medians, ratios, aligned text.

Owns: what a run's figures mean for a reader (per-stanza CPU cost, CPU
share, MiB) and how they line up on a terminal.  Pure functions over the
result dicts the runner returns; no processes, no clock.
"""

from __future__ import annotations

import statistics
from typing import Any, Dict, Iterable, List, Sequence, Tuple

BAR_WIDTH = 24


def ok(r: Dict[str, Any]) -> bool:
    """A run that measured something and lost nothing."""
    return "error" not in r and r.get("lost", 0) == 0 and r.get("unsent", 0) == 0


def derive(r: Dict[str, Any]) -> Dict[str, Any]:
    """Add the figures computed from the raw ones (in place; returns r)."""
    if "error" in r or "delivered" not in r:
        return r
    el = r["elapsed_s"] or 1e-9
    r["router_cpu_pct"] = 100.0 * r["router_cpu_s"] / el
    r["loadgen_cpu_pct"] = 100.0 * r["loadgen_cpu_s"] / el
    r["other_cpu_pct"] = 100.0 * r.get("other_cpu_s", 0.0) / el
    r["cpu_us_per_stanza"] = 1e6 * r["router_cpu_s"] / r["delivered"] if r["delivered"] else 0.0
    return r


# --------------------------------------------------------------------------
# Formatting helpers

def n0(v: float) -> str:
    return f"{v:,.0f}"


def f1(v: float) -> str:
    return f"{v:.1f}"


def f2(v: float) -> str:
    return f"{v:.2f}"


def mib(kb: float) -> str:
    return f"{kb / 1024:.1f}"


def size(b: int) -> str:
    return f"{b // 1024} KiB" if b >= 1024 and b % 1024 == 0 else f"{b} B"


def bar(v: float, top: float) -> str:
    """A bar `BAR_WIDTH` wide at `top`, so a column of them reads as a chart."""
    if top <= 0 or v <= 0:
        return ""
    eighths = int(round(BAR_WIDTH * 8 * min(v, top) / top))
    return "#" * (eighths // 8) + ("+" if eighths % 8 >= 4 else "")


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], left: int = 0) -> List[str]:
    """Aligned text: the first `left` columns left-aligned, the rest right-aligned
    (a column headed '' or ending in a bar is left-aligned too)."""
    rows = [list(map(str, row)) for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, (cell, w) in enumerate(zip(cells, widths)):
            leftish = i < left or headers[i] in ("", "bar") or headers[i].endswith(" bar")
            out.append(cell.ljust(w) if leftish else cell.rjust(w))
        return "  ".join(out).rstrip()

    return [line(headers), line(["-" * w for w in widths])] + [line(row) for row in rows]


# --------------------------------------------------------------------------
# The comparison

RUN_HEADERS = ["round", "protocol", "router", "stanzas/s", "p50 ms", "p99 ms", "max ms",
               "CPU s", "CPU %", "us/stanza", "peak RSS MiB", "gen CPU %", "other %", "lost"]


def run_row(r: Dict[str, Any]) -> List[str]:
    head = [str(r.get("round", "")), r["protocol"], r["router"]]
    if "error" in r:
        return head + ["failed"] + [""] * (len(RUN_HEADERS) - 4)
    lat = r["latency_ms"]
    return head + [n0(r["stanzas_per_s"]), f2(lat["p50"]), f2(lat["p99"]), f1(lat["max"]),
                   f2(r["router_cpu_s"]), n0(r["router_cpu_pct"]), f1(r["cpu_us_per_stanza"]),
                   mib(r["router_peak_rss_kb"]), n0(r["loadgen_cpu_pct"]),
                   n0(r["other_cpu_pct"]), lost_cell(r)]


def lost_cell(r: Dict[str, Any]) -> str:
    s = str(r["lost"])
    if r.get("unsent"):
        s += f" (+{r['unsent']} unsent)"
    if r.get("bounced"):
        s += f" ({r['bounced']} bounced)"
    return s


def problems(runs: Iterable[Dict[str, Any]]) -> List[str]:
    """One paragraph per run that failed or did not deliver everything."""
    out = []
    for r in runs:
        where = f"{r['router']}, {r['protocol']} protocol, {r['components']} components" + (
            f", round {r['round']}" if "round" in r else "")
        if "error" in r:
            out.append(f"FAILED ({where}): {r['error']}")
            continue
        if r.get("mode") == "idle" or ok(r):
            continue
        out.append(f"NOT ALL DELIVERED ({where}): lost {r['lost']}, bounced {r['bounced']}, "
                   f"unsent {r['unsent']} (phase ended by: {r['stop_reason']})")
        for d in r["lost_detail"][:10]:
            out.append(f"    {d['from']} -> {d['to']}: sent {d['sent']}, delivered "
                       f"{d['delivered']}, bounced {d['bounced']}, lost {d['lost']}, "
                       f"unsent {d['unsent']}")
        for j, d in enumerate(r.get("links", [])):  # several nodes: what each node saw
            out.append(f"    node n{j + 1}: forwarded in {d['forwarded_in']}, link packets out "
                       f"{d['link_packets_out']}, in {d['link_packets_in']}, dropped "
                       f"{d['dropped']}, bounced (hold full) {d['bounced_held_full']}")
        if r.get("logs"):
            out.append(r["logs"])
    return out


BUSY_GEN_PCT = 90.0  # above: the load generator may be what limits the run
BUSY_OTHER_PCT = 20.0  # above: something else on the machine competed for the cores


def caveats(runs: Iterable[Dict[str, Any]]) -> List[str]:
    """Warnings about runs whose figures the machine itself may have skewed."""
    runs = [r for r in runs if "loadgen_cpu_pct" in r]
    gen = [r for r in runs if r["loadgen_cpu_pct"] > BUSY_GEN_PCT]
    other = [r for r in runs if r["other_cpu_pct"] > BUSY_OTHER_PCT]
    out = []
    if gen:
        out.append(f"note: the load generator used more than {BUSY_GEN_PCT:.0f}% of its core in "
                   f"{len(gen)} of {len(runs)} runs; there it may be the bottleneck.")
    if other:
        worst = max(r["other_cpu_pct"] for r in other)
        out.append(f"note: other processes used more than {BUSY_OTHER_PCT:.0f}% of a core in "
                   f"{len(other)} of {len(runs)} runs (up to {worst:.0f}%, column 'other %'); "
                   f"those figures are skewed, rerun on a quiet machine.")
    return out


METRICS = [  # (label, key path, formatter)
    ("stanzas/s", ("stanzas_per_s",), n0),
    ("p50 latency ms", ("latency_ms", "p50"), f2),
    ("p99 latency ms", ("latency_ms", "p99"), f2),
    ("max latency ms", ("latency_ms", "max"), f1),
    ("router CPU s", ("router_cpu_s",), f2),
    ("CPU us/stanza", ("cpu_us_per_stanza",), f1),
    ("peak RSS MiB", ("router_peak_rss_kb",), lambda kb: mib(kb)),
]


def get(r: Dict[str, Any], path: Sequence[str]) -> float:
    for k in path:
        r = r[k]
    return float(r)  # type: ignore[arg-type]


def summary(runs: List[Dict[str, Any]], protocols: Sequence[str],
            names: Sequence[str]) -> List[Dict[str, Any]]:
    """Median of every metric per (protocol, router) over the good rounds."""
    out = []
    for proto in protocols:
        for name in names:
            good = [r for r in runs if r["protocol"] == proto and r["router"] == name and ok(r)]
            if not good:
                continue
            row: Dict[str, Any] = {"protocol": proto, "router": name, "rounds": len(good)}
            for label, path, _ in METRICS:
                row[label] = statistics.median(get(r, path) for r in good)
            out.append(row)
    return out


def summary_lines(rows: List[Dict[str, Any]]) -> List[str]:
    headers = ["protocol", "router", "rounds"] + [label for label, _, _ in METRICS]
    return table(headers, ([r["protocol"], r["router"], str(r["rounds"])]
                           + [fmt(r[label]) for label, _, fmt in METRICS] for r in rows), left=2)


def ratios(runs: List[Dict[str, Any]], protocols: Sequence[str], a: str,
           b: str) -> List[Dict[str, Any]]:
    """a/b per round for each metric, then min/median/max over the rounds in
    which both runs succeeded."""
    out = []
    for proto in protocols:
        by_round: Dict[int, Dict[str, Dict[str, Any]]] = {}
        for r in runs:
            if r["protocol"] == proto and ok(r):
                by_round.setdefault(r["round"], {})[r["router"]] = r
        pairs = [(v[a], v[b]) for _, v in sorted(by_round.items()) if a in v and b in v]
        if not pairs:
            continue
        for label, path, _ in METRICS:
            if label == "router CPU s":  # same message count: same ratio as us/stanza
                continue
            values = [get(x, path) / get(y, path) for x, y in pairs if get(y, path)]
            if values:
                out.append({"protocol": proto, "metric": label, "rounds": len(values),
                            "min": min(values), "median": statistics.median(values),
                            "max": max(values)})
    return out


def ratio_lines(rows: List[Dict[str, Any]], a: str, b: str) -> List[str]:
    headers = ["protocol", "metric", "rounds", "min", "median", "max"]
    body = [[r["protocol"], r["metric"], str(r["rounds"]),
             f"{r['min']:.3f}", f"{r['median']:.3f}", f"{r['max']:.3f}"] for r in rows]
    return [f"ratio {a}/{b} (throughput: higher is better for {a}; the rest: lower is better)"
            ] + table(headers, body, left=2)


def throughput_lines(summary_rows: List[Dict[str, Any]], pairs: Sequence[Dict[str, Any]],
                     protocols: Sequence[str], names: Sequence[str]) -> List[str]:
    """One row per protocol: each router's median stanzas/s, then each pair's
    stanzas/s ratio as "median [min-max]" over the rounds (several pairs at a glance)."""
    med = {(r["protocol"], r["router"]): r["stanzas/s"] for r in summary_rows}
    headers = ["protocol"] + [f"{n} stanzas/s" for n in names] + [
        f"{p['a']}/{p['b']}" for p in pairs]
    body = []
    for proto in protocols:
        row = [proto] + [n0(med[(proto, n)]) if (proto, n) in med else "-" for n in names]
        for p in pairs:
            cell = next((r for r in p["rows"] if r["protocol"] == proto
                         and r["metric"] == "stanzas/s"), None)
            row.append(f"{cell['median']:.3f} [{cell['min']:.3f}-{cell['max']:.3f}]"
                       if cell else "-")
        body.append(row)
    return ["throughput: median stanzas/s per router; ratios median [min-max] over the "
            "rounds (higher is better for the first)"] + table(headers, body, left=1)


# --------------------------------------------------------------------------
# The curves

def curve_lines(runs: List[Dict[str, Any]], key: str, key_label: str, key_fmt,
                names: Sequence[str]) -> List[str]:
    """Throughput against `key` (components or size): one row per run, a bar
    per row scaled to the table's best, and each router's cost per stanza."""
    good = [r for r in runs if ok(r)]
    top = max((r["stanzas_per_s"] for r in good), default=0.0)
    base = {}  # router -> first point's stanzas/s, for the "x first" column
    rows = []
    for r in runs:
        head = [key_fmt(r[key]), r["protocol"], r["router"]]
        if not ok(r):
            rows.append(head + ["failed" if "error" in r else f"lost {r['lost']}"] + [""] * 8)
            continue
        base.setdefault((r["protocol"], r["router"]), r["stanzas_per_s"])
        lat = r["latency_ms"]
        rows.append(head + [
            n0(r["stanzas_per_s"]), f"{r['mbytes_per_s']:.1f}",
            f"{r['stanzas_per_s'] / base[(r['protocol'], r['router'])]:.2f}",
            f1(r["cpu_us_per_stanza"]), f2(lat["p99"]), mib(r["router_peak_rss_kb"]),
            n0(r["loadgen_cpu_pct"]), bar(r["stanzas_per_s"], top)])
    headers = [key_label, "protocol", "router", "stanzas/s", "MB/s", "x first",
               "us/stanza", "p99 ms", "peak RSS MiB", "gen CPU %", "stanzas/s bar"]
    return table(headers, rows, left=3)


def memory_lines(runs: List[Dict[str, Any]]) -> List[str]:
    top = max((r.get("router_rss_kb", 0) for r in runs if "error" not in r), default=0)
    rows = []
    for r in runs:
        head = [str(r["components"]), r["protocol"], r["router"]]
        if "error" in r:
            rows.append(head + ["failed", "", "", "", "", ""])
            continue
        rows.append(head + [mib(r["router_rss_before_kb"]), mib(r["router_rss_kb"]),
                            mib(r["router_peak_rss_kb"]), f1(r["per_component_kb"]),
                            f1(r["setup_s"]), bar(r["router_rss_kb"], top)])
    headers = ["idle components", "protocol", "router", "RSS before MiB", "RSS MiB",
               "peak RSS MiB", "KiB/component", "setup s", "RSS bar"]
    return table(headers, rows, left=3)


def memory_ratios(runs: List[Dict[str, Any]], pairs: Sequence[Tuple[str, str]]
                  ) -> List[Dict[str, Any]]:
    """Per point (idle components, protocol) and pair (a, b) that both measured:
    a's RSS over b's, and a's growth per component over b's (the runs shown)."""
    shown = {(r["components"], r["protocol"], r["router"]): r for r in runs
             if "error" not in r and not r.get("extra")}
    points = list(dict.fromkeys((n, proto) for n, proto, _ in shown))
    rows = []
    for n, proto in points:
        for a, b in pairs:
            ra, rb = shown.get((n, proto, a)), shown.get((n, proto, b))
            if ra is None or rb is None:
                continue
            rows.append({"components": n, "protocol": proto, "a": a, "b": b,
                         "rss_a_kb": ra["router_rss_kb"], "rss_b_kb": rb["router_rss_kb"],
                         "rss": ra["router_rss_kb"] / rb["router_rss_kb"],
                         "per_component": (ra["per_component_kb"] / rb["per_component_kb"]
                                           if rb["per_component_kb"] > 0 else None)})
    return rows


def memory_ratio_lines(rows: List[Dict[str, Any]]) -> List[str]:
    if not rows:
        return ["memory ratios: none (they are over jabberd2 and over the first "
                "--jrouter-tree, at points both measured)"]
    body = [[str(r["components"]), r["protocol"], f"{r['a']}/{r['b']}",
             f"{mib(r['rss_a_kb'])} / {mib(r['rss_b_kb'])}", f2(r["rss"]),
             "" if r["per_component"] is None else f2(r["per_component"])] for r in rows]
    return table(["idle components", "protocol", "routers", "RSS MiB", "x RSS",
                  "x KiB/component"], body, left=3)


# --------------------------------------------------------------------------
# Several nodes as one router (--nodes)

NODE_RUN_HEADERS = ["round", "protocol", "router", "stanzas/s", "p50 ms", "p99 ms", "max ms",
                    "crossed %", "CPU s", "CPU s per node", "us/stanza", "gen CPU %",
                    "other %", "lost"]

NODES_LEGEND = [
    "Several nodes: one etcd and k jrouter nodes with the same <cluster>, component i on",
    "  node i % k, traffic i -> i+1 (ring) or i+k (local). crossed %: packets that reached",
    "  their node over a link from another node (the nodes' /status forwarded_in) /",
    "  delivered (expected: the share of routes whose ends are on different nodes).",
    "  CPU s, us/stanza: all nodes together; CPU s per node: n1+n2+...; peak RSS: the",
    "  nodes' sum. 'x 1 node', 'x jabberd2':",
    "  stanzas/s over that router's in the same round, median [min-max] over the rounds;",
    "  'p50 +ms': median of the rounds' p50 minus 1 node's p50 (the latency a node adds).",
    "",
]


def node_run_row(r: Dict[str, Any]) -> List[str]:
    head = [str(r.get("round", "")), r["protocol"], r["router"]]
    if "error" in r:
        return head + ["failed"] + [""] * (len(NODE_RUN_HEADERS) - 4)
    lat = r["latency_ms"]
    several = r.get("nodes", 0) > 1
    crossed = f"{100 * r['crossed_fraction']:.1f}" if "crossed_fraction" in r else "-"
    per_node = "+".join(f2(c) for c in r.get("node_cpu_s", [])) if several else ""
    return head + [n0(r["stanzas_per_s"]), f2(lat["p50"]), f2(lat["p99"]), f1(lat["max"]),
                   crossed, f2(r["router_cpu_s"]), per_node, f1(r["cpu_us_per_stanza"]),
                   n0(r["loadgen_cpu_pct"]), n0(r["other_cpu_pct"]), lost_cell(r)]


def _by_round(runs: List[Dict[str, Any]], proto: str) -> Dict[int, Dict[str, Dict[str, Any]]]:
    """round -> router -> the run, for the runs of `proto` that delivered everything."""
    out: Dict[int, Dict[str, Dict[str, Any]]] = {}
    for r in runs:
        if r["protocol"] == proto and ok(r):
            out.setdefault(r["round"], {})[r["router"]] = r
    return out


def _spread(values: List[float], fmt: str = "{:.2f}") -> str:
    if not values:
        return "-"
    return (fmt.format(statistics.median(values)) + " ["
            + fmt.format(min(values)) + "-" + fmt.format(max(values)) + "]")


def nodes_overview(runs: List[Dict[str, Any]], protocols: Sequence[str],
                   names: Sequence[str]) -> List[Dict[str, Any]]:
    """Per protocol and router: medians over the good rounds, and the per-round
    comparisons with '1 node' and 'jabberd2' (stanzas/s ratio, added p50)."""
    out = []
    for proto in protocols:
        rounds = _by_round(runs, proto)
        for name in names:
            good = [v[name] for _, v in sorted(rounds.items()) if name in v]
            if not good:
                continue
            row: Dict[str, Any] = {"protocol": proto, "router": name, "rounds": len(good)}
            row["stanzas_per_s"] = statistics.median(r["stanzas_per_s"] for r in good)
            for q in ("p50", "p99"):
                row[f"{q}_ms"] = statistics.median(r["latency_ms"][q] for r in good)
            row["cpu_us_per_stanza"] = statistics.median(r["cpu_us_per_stanza"] for r in good)
            row["peak_rss_kb"] = statistics.median(r["router_peak_rss_kb"] for r in good)
            if "crossed_fraction" in good[0]:
                row["crossed_fraction"] = statistics.median(r["crossed_fraction"] for r in good)
                row["crossing_expected"] = good[0]["crossing_expected"]
                row["node_cpu_s"] = [statistics.median(r["node_cpu_s"][j] for r in good)
                                     for j in range(len(good[0]["node_cpu_s"]))]
            for base, key in (("1 node", "x_1_node"), ("jabberd2", "x_jabberd2")):
                pairs = [(v[name], v[base]) for _, v in sorted(rounds.items())
                         if name in v and base in v]
                row[key] = [a["stanzas_per_s"] / b["stanzas_per_s"] for a, b in pairs
                            if b["stanzas_per_s"]]
                if base == "1 node":
                    row["p50_added_ms"] = [a["latency_ms"]["p50"] - b["latency_ms"]["p50"]
                                           for a, b in pairs]
            out.append(row)
    return out


def nodes_lines(rows: List[Dict[str, Any]]) -> List[str]:
    headers = ["protocol", "router", "rounds", "stanzas/s", "x 1 node", "x jabberd2",
               "p50 ms", "p50 +ms", "p99 ms", "crossed % (expected)", "CPU s per node",
               "us/stanza", "peak RSS MiB"]
    body = []
    for r in rows:
        crossed = (f"{100 * r['crossed_fraction']:.1f} ({100 * r['crossing_expected']:.0f})"
                   if "crossed_fraction" in r else "-")
        per_node = "+".join(f2(c) for c in r["node_cpu_s"]) if "node_cpu_s" in r else "-"
        added = r["p50_added_ms"]
        body.append([r["protocol"], r["router"], str(r["rounds"]), n0(r["stanzas_per_s"]),
                     _spread(r["x_1_node"]), _spread(r["x_jabberd2"]), f2(r["p50_ms"]),
                     f"{statistics.median(added):+.2f}" if added else "-", f2(r["p99_ms"]),
                     crossed, per_node, f1(r["cpu_us_per_stanza"]), mib(r["peak_rss_kb"])])
    return table(headers, body, left=2)
