"""The probes' results as markdown: the table, the notes, docs/reliability.md.

Owns: how one router's result reads in a table cell (outcome, the probe's own
facts, the figures every probe has), the verdict (jrouter's result against
jrouter's expectation), the per-probe notes and the whole document with its
introduction.  Knows nothing about running anything.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from .harness import PROMPT_MS, Probe

COLUMNS = ("probe", "tried", "how many", "jrouter: outcome, figures",
           "C router (jabberd2): outcome, figures", "verdict")
NOT_RUN = "not run"


def cell(text: str) -> str:
    """Table-safe text: no pipes, no line breaks but <br>."""
    return text.replace("|", "\\|").replace("\n", "<br>")


def _mib(x: Optional[float]) -> str:
    return "?" if x is None else f"{x:.0f}"


def figures_line(f: Dict[str, Any]) -> str:
    """The figures every probe has, in one line."""
    ping = ("no ping in the window" if f.get("ping_max_ms") is None
            else f"ping max {f['ping_max_ms']:.0f} ms")
    parts = [f"RSS {_mib(f.get('rss_before_mib'))} → {_mib(f.get('rss_peak_mib'))} → "
             f"{_mib(f.get('rss_after_mib'))} MiB", f"{ping}, {f.get('pings_lost', 0)} lost",
             f"log +{f.get('log_lines', 0):,} lines"
             + (f" ({f['tracebacks']} tracebacks)" if f.get("tracebacks") else ""),
             f"CPU {f.get('router_cpu_s', 0):.1f} s"]
    return " · ".join(parts)


def router_cell(r: Optional[Dict[str, Any]], mark_unmet: bool) -> str:
    if r is None:
        return NOT_RUN
    lines = [f"**{r.get('outcome', '?')}**"]
    facts = [x for x in r.get("facts", []) if x]
    if facts:
        lines.append("; ".join(facts))
    if "error" not in r:
        lines.append(figures_line(r["figures"]))
    if mark_unmet and r.get("unmet"):
        lines.append("(jrouter's expectation not met)")
    return cell("\n".join(lines))


def verdict(r: Optional[Dict[str, Any]]) -> str:
    if r is None:
        return NOT_RUN
    return "pass" if not r["unmet"] else "**FAIL**: " + cell("; ".join(r["unmet"]))


def table(probes: Sequence[Probe], results: Dict[str, Dict[str, Dict[str, Any]]],
          quick: bool) -> List[str]:
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for p in probes:
        got = results.get(p.name, {})
        rows.append("| " + " | ".join([
            f"**{p.name}**<br>{cell(p.title)}", cell(p.tried), cell(p.how_many(quick)),
            router_cell(got.get("jrouter"), False), router_cell(got.get("jabberd2"), True),
            verdict(got.get("jrouter"))]) + " |")
    return rows


def summary(probes: Sequence[Probe], results: Dict[str, Dict[str, Dict[str, Any]]]) -> List[str]:
    """One line: how many of jrouter's expectations held, and which did not."""
    ran = [(p, results[p.name]["jrouter"]) for p in probes
           if "jrouter" in results.get(p.name, {})]
    failed = [f"{p.name} ({'; '.join(r['unmet'])})" for p, r in ran if r["unmet"]]
    if not ran:
        return []
    line = f"jrouter met {len(ran) - len(failed)} of {len(ran)} expectations."
    return [line + (" Not met: " + "; ".join(failed) + "." if failed else "")]


def notes(probes: Sequence[Probe], results: Dict[str, Dict[str, Dict[str, Any]]],
          quick: bool) -> List[str]:
    out: List[str] = []
    for p in probes:
        out += ["", f"### {p.name}: {p.title}", "",
                f"Tried: {p.tried}; {p.how_many(quick)}.", "",
                f"jrouter's expectation: {p.expectation}."]
        if p.note:
            out += ["", p.note]
        for name, label in (("jrouter", "jrouter"), ("jabberd2", "C router")):
            r = results.get(p.name, {}).get(name)
            if r is None:
                continue
            unmet = "; ".join(r["unmet"]) or "none"
            out += ["", f"- {label}: {r.get('outcome', '?')}. Unmet: {unmet}. "
                        f"({r['seconds']:.0f} s)"]
    return out


INTRO = """\
# Reliability report: hostile and unlucky peers

Issue 10's seven findings, tried against jrouter and against jabberd2's C router
(`{c_router}`) side by side. Regenerate it with

    scripts/jrouter-probes --write docs/reliability.md

(a few minutes; `--quick` is the smaller run that tests/process/test_probes_smoke.py makes,
`--only 3,5a` picks probes, `--json` gives every figure).

How it runs: every probe gets a fresh router process on 127.0.0.1, with benchlib's config
files (`scripts/benchlib/routers.py`) and the defaults an operator gets out of the box:
`io.max_fds` 1,024, no `<io><limits>` of jabberd2's, jrouter's own limits at their defaults
(`queue` 16 MiB, `authstanzasize` 16 KiB, `authtimeout` 30 s, `unauthenticated` 64,
`authattempts` 3, `authfailures` 10 in 60 s), and the soft RLIMIT_NOFILE of a systemd service
(1,024). A probe changes a setting only where it says so (2-backlog-disconnect raises `queue`).
Hostile peers come from 127.0.0.2 (and .3), so a blocked address never touches the
bystanders: two components (`ping.probe`, `pong.probe`, jabberd2 protocol, in a process of
their own) that send each other a `<route/>` every 50 ms through the router for the whole
probe. "Ping max" is their worst one-way latency and "lost" the pings that never arrived, from
the probe's start until its last figure was taken; a probe fails when a ping took more than
{prompt:.0f} ms or was lost, the router is not alive at the end, or its log has a traceback.
"RSS a → b → c" is the router's resident set before the probe, at its peak (sampled every
50 ms) and after the probe's peers left; "log +N" the lines the router logged meanwhile; "CPU"
the router's CPU time. The verdict is jrouter's result against jrouter's expectation (in the
notes); the C router's result is shown against the same expectation.

Absolute times and rates come from {machine} and drift by ±30% on a shared machine; the
outcomes, counts and memory figures do not.

Generated by `scripts/jrouter-probes{args}` on {date}, jrouter {commit}, jabberd2 {c_version};
the whole run took {took:.0f} s.
"""


def document(probes: Sequence[Probe], results: Dict[str, Dict[str, Dict[str, Any]]],
             quick: bool, meta: Dict[str, Any]) -> str:
    parts = [INTRO.format(prompt=PROMPT_MS, **meta), "## The probes", ""]
    parts += table(probes, results, quick)
    parts += [""] + summary(probes, results)
    parts += ["", "## Notes"] + notes(probes, results, quick)
    return "\n".join(parts) + "\n"
