"""Figures and tables: derived metrics, medians, ratios, aligned text.

Owns: what a run's figures mean for a reader (per-stanza CPU cost, CPU
share, MiB) and how they line up on a terminal.  Pure functions over the
result dicts the runner returns; no processes, no clock.
"""

from __future__ import annotations

import statistics
from typing import Any, Dict, Iterable, List, Sequence

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
