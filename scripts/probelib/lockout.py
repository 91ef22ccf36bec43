"""Probe 4: can hostile connections lock the real components out?

Owns: 1,022 silent TCP connections from 127.0.0.2 (with the 2 bystanders,
the router's `io.max_fds` of 1,024 and its soft RLIMIT_NOFILE of 1,024 are
used up), then a real component that connects and authenticates; and a
connect/close flood from two flood processes (127.0.0.2 and 127.0.0.3)
while legitimate components connect, authenticate and bind every 100 ms
from 127.0.0.1.  What jrouter promises: docs/jabberd2-router.md §3.1, §3.10
(a cap on unauthenticated connections that leaves room for components).
Knows nothing about the router's process beyond its log.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Dict, List, Optional, Tuple

from . import net
from .harness import Context, Probe

SILENT = 1022
FLOOD_SOURCES = ("127.0.0.2", "127.0.0.3")


def open_silent(ctx: Context, count: int) -> Tuple[List[socket.socket], Dict[str, int]]:
    """Up to `count` connections that never say a word; after 10 failed connects
    in a row (a router that stopped accepting) the rest are not tried."""
    socks: List[socket.socket] = []
    errors: Dict[str, int] = {}
    in_a_row = 0
    deadline = ctx.left(40)
    while len(socks) + sum(errors.values()) < count and in_a_row < 10 \
            and time.monotonic() < deadline:
        try:
            socks.append(net.dial(ctx.port, net.HOSTILE, timeout=1.0))
            in_a_row = 0
        except OSError as e:
            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
            in_a_row += 1
    return socks, errors


def open_fds(pid: int) -> Optional[int]:
    """The router's open file descriptors (sockets, its log, ...), from /proc."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def closed_by_router(socks: List[socket.socket], closed: Dict[int, str]) -> None:
    """Add to `closed` (socket index -> stream error or "none") the sockets the router
    has closed since the last look."""
    for i, sock in enumerate(socks):
        if i in closed or not net.io_ready(sock, 0)[0]:
            continue
        data, eof = net.read_until(sock, time.monotonic() + 0.05)
        if eof:
            closed[i] = net.stream_error(data) or "none"


def silent_connections(ctx: Context) -> Dict[str, Any]:
    socks, errors = open_silent(ctx, SILENT)
    fds_busiest = open_fds(ctx.router.pid)
    time.sleep(1.0)
    fds = open_fds(ctx.router.pid)
    gone: Dict[int, str] = {}
    closed_by_router(socks, gone)
    took, why = net.try_component(ctx.port, ctx.deadline, "late.probe", 10.0)
    closed_by_router(socks, gone)
    closed, conditions = len(gone), _count(gone.values())
    for sock in socks:
        sock.close()
    ctx.settle(2.0)
    outcome = (f"real component authenticated and bound in {took * 1000:.0f} ms" if took is not None
               else f"real component failed: {why}")
    facts = [f"{len(socks):,} silent connections made"
             + (f", {sum(errors.values())} connects failed ({_kinds(errors)})" if errors else ""),
             f"closed by the router {closed:,}"
             + (f" (stream error: {_kinds(conditions)})" if closed else ""),
             f"router fds open: {fds_busiest} after the last connect, {fds} 1 s later"]
    return {"outcome": outcome, "facts": facts,
            "figures": dict(silent=len(socks), connect_errors=errors, closed_by_router=closed,
                            router_fds=[fds_busiest, fds],
                            close_conditions=conditions, component_ms=None if took is None
                            else round(took * 1000, 1), component_error=why)}


def silent_unmet(r: Dict[str, Any]) -> List[str]:
    f = r["figures"]
    if "silent" not in f:
        return ["no figures"]
    unmet = []
    if f["component_ms"] is None:
        unmet.append(f"the real component could not connect: {f['component_error']}")
    elif f["component_ms"] > 5000:
        unmet.append(f"the real component took {f['component_ms']:.0f} ms")
    return unmet


def connect_flood(ctx: Context) -> Dict[str, Any]:
    seconds = ctx.scale(5.0, 2.0)
    lines = len(ctx.log())
    started = time.monotonic()
    floods = [ctx.helper("flood", ctx.port, seconds, source) for source in FLOOD_SOURCES]
    tries: List[Tuple[Optional[float], str]] = []
    try:
        while time.monotonic() < started + seconds:
            tries.append(net.try_component(ctx.port, ctx.deadline, f"legit{len(tries)}.probe", 5.0))
            time.sleep(0.1)
        made = [_flood_result(proc, seconds + 15) for proc in floods]
    finally:
        for proc in floods:
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)
    ctx.window("flood", started, started + seconds)
    log = ctx.log()[lines:]
    handled = sum(1 for x in log if x.endswith("] connect")
                  and any(f"[{s}," in x for s in FLOOD_SOURCES))
    total = sum(m.get("made", 0) for m in made)
    failed = [why for took, why in tries if took is None]
    slowest = max((took for took, _ in tries if took is not None), default=None)
    outcome = (f"{len(tries) - len(failed)} of {len(tries)} legitimate components got in"
               + (f" (failed: {failed[0]})" if failed else "")
               + f"; {handled / seconds:,.0f} connections/s logged by the router")
    facts = [f"flood: {total / seconds:,.0f} connects/s made, "
             f"{sum(m.get('failed', 0) for m in made):,} failed",
             f"slowest legitimate setup {slowest * 1000:.0f} ms" if slowest else ""]
    return {"outcome": outcome, "facts": [x for x in facts if x],
            "figures": dict(flood_s=seconds, flood_made=total, flood_failed=sum(
                m.get("failed", 0) for m in made), router_logged=handled,
                legit_tries=len(tries), legit_failed=len(failed), legit_errors=failed[:3],
                legit_slowest_ms=None if slowest is None else round(slowest * 1000, 1))}


def _flood_result(proc: Any, timeout: float) -> Dict[str, Any]:
    try:
        out, _ = proc.communicate(timeout=timeout)
        return json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError, OSError, Exception):  # noqa: BLE001 - shown as 0
        return {}


def flood_unmet(r: Dict[str, Any]) -> List[str]:
    f = r["figures"]
    if "legit_tries" not in f:
        return ["no figures"]
    if f["legit_failed"]:
        return [f"{f['legit_failed']} of {f['legit_tries']} legitimate components failed"]
    return []


def _count(things: Any) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for thing in things:
        counts[thing] = counts.get(thing, 0) + 1
    return counts


def _kinds(counts: Dict[str, int]) -> str:
    return ", ".join(f"{n:,} × {k}" for k, n in sorted(counts.items(), key=lambda x: -x[1]))


PROBES = [
    Probe("4a-silent-connections", "lockout: silent connections",
          "peers from 127.0.0.2 open TCP connections and say nothing; then a real "
          "component connects from 127.0.0.1, authenticates (SASL) and binds",
          lambda q: f"{SILENT:,} silent connections (max_fds 1,024, RLIMIT_NOFILE 1,024)",
          silent_connections, silent_unmet,
          "unauthenticated connections are capped (`io.limits.unauthenticated`, 64): the "
          "oldest silent one makes room (`resource-constraint`), so a real component always "
          "gets in (within 5 s)",
          note="Both routers run with `io.max_fds` 1,024 (the default, and Debian's) and the "
               "soft RLIMIT_NOFILE a systemd service gets (1,024; jabberd-router.service sets "
               "none). A connect that has not completed within 1 s counts as failed; after "
               "10 in a row the rest are not tried."),
    Probe("4b-connect-flood", "lockout: a connect/close flood",
          "two processes connect and reset as fast as they can (from 127.0.0.2 and "
          ".3) while a legitimate component connects, authenticates and binds every 100 ms",
          lambda q: f"{2.0 if q else 5.0:.0f} s of flood, 2 flood processes",
          connect_flood, flood_unmet,
          "every legitimate component gets in while the flood lasts; the bystanders stay "
          "prompt",
          note="\"Connections/s logged\" counts the router's `connect` lines for the flood's "
               "addresses: connections it accepted and looked at. A legitimate component has "
               "5 s to authenticate and bind."),
]
