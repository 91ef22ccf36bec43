"""The soak's figures for a reader: samples as they come, the curves, the totals, the verdict.

Owns: the line printed per sample, the RSS curve and the p99-over-time table
at the end, the totals, RSS growth between the first and last third of the
run, and the list of problems that make the soak fail.  Pure functions over
the load generator's JSON documents; no processes, no clock.
"""

from __future__ import annotations

import statistics
from typing import Any, Dict, List, Optional, Sequence

from benchlib.report import bar, f1, n0, table

MAX_ROWS = 40  # rows of the tables at the end; longer runs are shown every k-th sample

SAMPLE_HEADERS = ["t s", "RSS MiB", "dRSS", "router CPU %", "gen CPU %", "gen stall", "delivered/s",
                  "p50 ms", "p99 ms", "max ms", "IQ p99", "bcast p99", "bounced",
                  "in flight", "overdue", "away", "defects"]


def sample_row(s: Dict[str, Any], first_rss_kb: int) -> List[str]:
    lat = s["latency_ms"]
    return [f1(s["t_s"]), f1(s["rss_kb"] / 1024), f"{(s['rss_kb'] - first_rss_kb) / 1024:+.1f}",
            f1(s["router_cpu_pct"]), f1(s["loadgen_cpu_pct"]), f"{s['gen_stall_ms']:.1f}",
            n0(s["delivered_per_s"]),
            f"{lat['p50']:.2f}", f"{lat['p99']:.2f}", f"{lat['max']:.1f}",
            f"{s['iq_rtt_ms']['p99']:.2f}", f"{s['broadcast_ms']['p99']:.2f}",
            n0(s["bounced"]), n0(s["inflight"]), n0(s["overdue"]), str(s["away"]),
            str(s["defects"])]


def sample_lines(s: Dict[str, Any], first_rss_kb: int, header: bool) -> List[str]:
    """One sample as a table row (with the header the first time)."""
    lines = table(SAMPLE_HEADERS, [sample_row(s, first_rss_kb)])
    return lines if header else lines[2:]


def thinned(samples: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """At most MAX_ROWS samples, evenly spread, the last one always kept."""
    k = max(1, -(-len(samples) // MAX_ROWS))
    rows = list(samples[::k])
    if samples and rows[-1] is not samples[-1]:
        rows.append(samples[-1])
    return rows


def rss_curve(samples: Sequence[Dict[str, Any]]) -> List[str]:
    """The router's RSS over time, as bars from the smallest value up."""
    if not samples:
        return ["(no samples)"]
    low = min(s["rss_kb"] for s in samples)
    top = max(s["rss_kb"] for s in samples) - low
    rows = [[f1(s["t_s"]), f1(s["rss_kb"] / 1024), bar(s["rss_kb"] - low, top) or "|"]
            for s in thinned(samples)]
    return table(["t s", "RSS MiB", f"bar (from {low / 1024:.1f} MiB)"], rows)


def p99_table(samples: Sequence[Dict[str, Any]]) -> List[str]:
    if not samples:
        return ["(no samples)"]
    top = max(s["latency_ms"]["p99"] for s in samples)
    rows = [[f1(s["t_s"]), n0(s["delivered_per_s"]), f"{s['latency_ms']['p50']:.2f}",
             f"{s['latency_ms']['p99']:.2f}", f"{s['latency_ms']['max']:.1f}",
             f"{s['iq_rtt_ms']['p99']:.2f}", f"{s['broadcast_ms']['p99']:.2f}",
             bar(s["latency_ms"]["p99"], top) or "|"] for s in thinned(samples)]
    return table(["t s", "delivered/s", "p50 ms", "p99 ms", "max ms", "IQ RTT p99",
                  "bcast p99", "p99 bar"], rows)


def rss_growth_mib(samples: Sequence[Dict[str, Any]]) -> Optional[float]:
    """Median RSS of the last third of the traffic samples minus that of the first third."""
    rss = [s["rss_kb"] for s in samples if s["phase"] == "traffic"]
    if len(rss) < 2:
        return None
    third = max(1, len(rss) // 3)
    growth: float = statistics.median(rss[-third:]) - statistics.median(rss[:third])
    return growth / 1024


def totals_lines(r: Dict[str, Any]) -> List[str]:
    u, b, ev = r["unicast"], r["broadcast"], r["events"]
    kinds = ", ".join(f"{k} {n0(v)}" for k, v in sorted(u["by_kind"].items()))
    codes = ", ".join(f"{k} x{n0(v)}" for k, v in sorted(r["bounce_codes"].items())) or "none"
    lat = r["latency_ms"]
    return [
        f"unicast: sent {n0(u['sent'])} ({kinds}; U message, Q IQ get, R IQ result) = "
        f"delivered {n0(u['delivered'])} + bounced {n0(u['bounced'])} + lost {n0(u['lost'])}"
        f" + dropped at close {n0(u['dropped_at_close'])}"
        + (" (to jabberd2 / XEP-0114 components: {jabberd2} / {xep0114})".format(
            **r["dropped_at_close_to"]) if u["dropped_at_close"] else ""),
        f"  bounces: {codes}; unexpected (receiver online) {u['bounced_unexpected']}",
        f"  duplicates {u['duplicates']}, reordered {u['reordered']}, misrouted "
        f"{u['misrouted']}, never sent {u['phantom']}",
        f"  latency ms: p50 {lat['p50']:.2f}, p99 {lat['p99']:.2f}, p99.9 {lat['p99.9']:.2f}, "
        f"max {lat['max']:.1f}; IQ round trip p99 {r['iq_rtt_ms']['p99']:.2f}",
        f"broadcast: sent {n0(b['sent'])}, copies received {n0(b['copies'])} (early "
        f"{n0(b['early'])}), missing {b['missing']}, out of order {b['disorder']}, "
        f"misrouted {b['misrouted']}, bounced {ev['broadcast_bounced']}; "
        f"p99 {r['broadcast_ms']['p99']:.2f} ms",
        f"churn: {ev['churn_unbind']} unbind/rebind, {ev['churn_reconnect']} reconnects "
        f"({r['connections']} connections in all); bind retries {ev['bind_retries']}, "
        f"settle timeouts {ev['settle_timeouts']}, close timeouts {ev['close_timeouts']}",
        f"  connections the router ended on its own: {ev['router_closed']}; setups broken by a "
        f"broadcast before the stream header: {ev.get('broken_by_broadcast', 0)}; IQs left "
        f"unanswered by a leaving component: {ev['iq_unanswered']}; sends skipped "
        f"(window full or nobody online): {n0(ev['skipped'])}",
    ]


def problems(r: Optional[Dict[str, Any]], samples: Sequence[Dict[str, Any]],
             max_growth_mib: float, router: Dict[str, Any],
             allow_jabberd2_defects: bool = False) -> List[str]:
    """Everything that makes the soak fail, one line each; [] when it passed.
    Two things jabberd2 is known to do fail it unless `allow_jabberd2_defects`:
    drop the packets it had queued for a connection that closes (protocol
    §4.10), and send broadcasts to connections that have not logged in (§8 #6),
    which breaks the stream of a component whose setup is under way."""
    out = []
    if router.get("died"):
        out.append(f"the router died during the soak: {router['died']}")
    if r is None:
        return out + ["the load generator gave no result"]
    u, b, ev = r["unicast"], r["broadcast"], r["events"]
    checks = [
        (u["lost"], "unicast packets lost"),
        (0 if allow_jabberd2_defects else u["dropped_at_close"],
         "unicast packets dropped at a receiver's close"),
        (0 if allow_jabberd2_defects else ev.get("broken_by_broadcast", 0),
         "connections whose setup a broadcast broke (it came before the stream header)"),
        (u["bounced_unexpected"], "bounces although the receiver was online"),
        (u["duplicates"], "duplicate deliveries"), (u["reordered"], "packets out of order"),
        (u["misrouted"], "misrouted packets"), (u["phantom"], "packets never sent"),
        (b["missing"], "broadcast copies missing"), (b["disorder"], "broadcasts out of order"),
        (b["misrouted"], "broadcasts misrouted"), (ev["broadcast_bounced"], "broadcasts bounced"),
        (ev["router_closed"], "connections the router ended on its own"),
    ]
    out += [f"{n0(n)} {what}" for n, what in checks if n]
    accounted = u["delivered"] + u["bounced"] + u["lost"] + u["dropped_at_close"]
    if accounted != u["sent"]:
        out.append(f"accounting: sent {u['sent']} but {accounted} accounted for")
    growth = rss_growth_mib(samples)
    if growth is not None and growth > max_growth_mib:
        out.append(f"router RSS grew {growth:.1f} MiB between the first and last third "
                   f"(limit {max_growth_mib:g} MiB)")
    return out
