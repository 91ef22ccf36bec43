"""One probe against one router: a fresh process, the bystanders, the figures, the stop.

Owns: what a probe is (`Probe`), the router's config for it (benchlib's
files with the defaults an operator gets: `io.max_fds` 1024, no limits,
plus what the probe itself needs in `<io>`), starting the router under
systemd's default RLIMIT_NOFILE (1024; jabberd-router.service sets none),
the bystanders, sampling the router's RSS, what the log gained, telling a
crash from an exit, stopping everything by PID, and the checks every probe
shares.  Knows nothing about any one probe's traffic.

Each probe gets a router of its own, so a crash, a leak or a blocked
address never spills into the next probe, and RSS before/peak/after belong
to that probe alone.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from benchlib import routers
from benchlib.runner import REPO, SCRIPTS

from .bystanders import Bystanders

NOFILE = 1024          # systemd's default soft RLIMIT_NOFILE for a service
PROMPT_MS = 1000.0     # the longest bystander latency we call prompt (tests/e2e/test_faults.py)
PROBE_TIME = 150.0     # s a probe may take at most, on top of its router's start
HELD_MIB = 8.0         # RSS after a probe within this of the start needs no explaining
BENCH_IO = "<io>\n    <max_fds>4096</max_fds>\n  </io>"


@dataclass(frozen=True)
class Probe:
    """One thing tried against a router, and what jrouter promises about it."""
    name: str                                          # "1-stuck-peer"
    title: str                                         # the finding, in a few words
    tried: str                                         # what is done (the table's column)
    how_many: Callable[[bool], str]                    # quick -> the counts and sizes
    run: Callable[["Context"], Dict[str, Any]]         # -> outcome, facts, figures
    expect: Callable[[Dict[str, Any]], List[str]]      # a result -> unmet expectations
    expectation: str                                   # jrouter's promise, in words
    config: Callable[[bool], str] = lambda quick: ""   # children of <io> it needs
    note: str = ""                                     # for docs/reliability.md


@dataclass(frozen=True)
class Settings:
    python: str            # the interpreter of `python -m jrouter`
    helper_python: str     # the bystanders' and the flood's interpreter
    quick: bool


@dataclass
class Context:
    """What a probe gets: its router, the clock's limit, a place for figures."""
    router: routers.Router
    quick: bool
    deadline: float
    sampler: "Sampler"
    helper_python: str                 # for the probe's own helper processes
    windows: Dict[str, List[float]] = field(default_factory=dict)
    rss_after: Optional[float] = None

    @property
    def port(self) -> int:
        return self.router.port

    def scale(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full

    def left(self, most: float) -> float:
        """A deadline `most` s from now, never past the probe's own."""
        return min(self.deadline, time.monotonic() + most)

    def alive(self) -> bool:
        return self.router.alive()

    def rss_mib(self) -> Optional[float]:
        return self.sampler.sample()

    def helper(self, module: str, *args: object) -> "subprocess.Popen[bytes]":
        """`python -m probelib.MODULE ARGS` (the caller waits for it and stops it by PID)."""
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([SCRIPTS, REPO]))
        return subprocess.Popen([self.helper_python, "-m", f"probelib.{module}",
                                 *map(str, args)], cwd=SCRIPTS, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, preexec_fn=routers.child_setup(None))

    def log(self) -> List[str]:
        return read_log(self.router.logpath)

    def settle(self, seconds: float = 1.5) -> None:
        """Wait for the router to give memory back, then take "RSS after"."""
        time.sleep(seconds)
        self.rss_after = self.rss_mib()

    def window(self, name: str, since: float, until: Optional[float] = None) -> None:
        """Name a stretch of time: the bystanders' worst latency in it is reported."""
        self.windows[name] = [since, until if until is not None else time.monotonic()]


class Sampler(threading.Thread):
    """The router's RSS every 50 ms: the peak since the probe started, the latest."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak: Optional[float] = None
        self.last: Optional[float] = None
        self.done = threading.Event()

    def sample(self) -> Optional[float]:
        try:
            mib = routers.memory_kb(self.pid)["rss_kb"] / 1024
        except (OSError, KeyError):
            return self.last        # gone (crashed, or a zombie without a mm)
        self.last = mib
        self.peak = mib if self.peak is None else max(self.peak, mib)
        return mib

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.sample()


def read_log(path: str) -> List[str]:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []


def write_config(directory: str, port: int, io_extra: str) -> str:
    """benchlib's three files, with `<io>` holding only what the probe needs
    (so `io.max_fds` is the default, 1024, for both routers)."""
    path = routers.write_config(directory, port)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert BENCH_IO in text, "benchlib.routers.ROUTER_XML changed: update BENCH_IO"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace(BENCH_IO, f"<io>{io_extra}</io>"))
    return path


def status_text(returncode: Optional[int]) -> str:
    if returncode is None:
        return "alive"
    if returncode < 0:
        try:
            return f"crashed ({signal.Signals(-returncode).name})"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


def start_router(router: routers.Router) -> None:
    """Start with the soft RLIMIT_NOFILE an operator's service gets; ours stays high."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        router.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def run(probe: Probe, name: str, settings: Settings) -> Dict[str, Any]:
    """Probe `name` ("jrouter" or "jabberd2") with a fresh router; the result."""
    started = time.monotonic()
    result: Dict[str, Any] = {"probe": probe.name, "router": name, "figures": {}, "facts": []}
    with tempfile.TemporaryDirectory(prefix="jrouter-probes-") as tmp:
        port = routers.free_port()
        config = write_config(tmp, port, probe.config(settings.quick))
        argv, cwd, env = routers.launch(name, config, settings.python, REPO)
        router = routers.Router(name, argv, cwd, os.path.join(tmp, "router.log"), port, env=env)
        bystanders: Optional[Bystanders] = None
        sampler: Optional[Sampler] = None
        try:
            start_router(router)
            bystanders = Bystanders(port, settings.helper_python, SCRIPTS, REPO)
            trouble = bystanders.wait_ready()
            if trouble:
                raise routers.RouterError(trouble)
            time.sleep(0.3)                    # advertisements settle
            sampler = Sampler(router.pid)
            before, cpu0, lines0 = sampler.sample(), routers.cpu_seconds(router.pid), \
                len(read_log(router.logpath))
            sampler.start()
            ctx = Context(router, settings.quick, time.monotonic() + PROBE_TIME, sampler,
                          settings.helper_python)
            t0 = time.monotonic()
            result.update(_attempt(probe, ctx))
            if ctx.rss_after is None:
                ctx.settle(1.0)
            t1 = time.monotonic()              # the bystanders' window includes the settling
            cpu1 = _cpu(router.pid, cpu0)
            returncode = router.proc.poll()
            pings = bystanders.stop()
            _common(result, ctx, bystanders, pings, before, cpu1 - cpu0, t0, t1)
            log = read_log(router.logpath)[lines0:]
            result["figures"].update(log_lines=len(log),
                                     tracebacks=sum(x.startswith("Traceback") for x in log))
            result["log_sample"] = [x for x in log if "Traceback" in x or "Error" in x][:3]
        except routers.RouterError as e:
            returncode = router.proc.poll() if router.proc else None
            result["outcome"] = f"could not run: {str(e).splitlines()[0]}"
            result["error"] = str(e)
        finally:
            if sampler is not None:
                sampler.done.set()
            if bystanders is not None:
                bystanders.kill()
            router.stop()
        result["figures"]["status"] = status_text(returncode)
        if returncode is not None:
            result["outcome"] = f"router {status_text(returncode)}; " + result.get("outcome", "")
    result["seconds"] = round(time.monotonic() - started, 1)
    result["unmet"] = shared_unmet(result) + (probe.expect(result) if "error" not in result else [])
    return result


def _attempt(probe: Probe, ctx: Context) -> Dict[str, Any]:
    """The probe's own result; a probe that raises is a result too (a router that
    died under it is the usual reason), with the traceback kept for --json."""
    try:
        return probe.run(ctx)
    except Exception as e:  # noqa: BLE001 - any failure is a finding to show
        return {"outcome": f"probe stopped: {type(e).__name__}: {e}",
                "probe_error": traceback.format_exc()}


def _cpu(pid: int, fallback: float) -> float:
    try:
        return routers.cpu_seconds(pid)
    except OSError:
        return fallback


def _common(result: Dict[str, Any], ctx: Context, bystanders: Bystanders, pings: Dict[str, Any],
            before: Optional[float], cpu: float, t0: float, t1: float) -> None:
    """The figures every probe has: RSS, router CPU, the bystanders."""
    worst, lost = bystanders.worst(t0, t1)
    f = result["figures"]
    f.update(rss_before_mib=_r(before), rss_peak_mib=_r(ctx.sampler.peak),
             rss_after_mib=_r(ctx.rss_after), router_cpu_s=round(cpu, 2),
             ping_max_ms=_r(worst), pings_lost=lost, pings_bounced=pings.get("bounced", 0),
             pings_sent=len([s for s in pings.get("samples", []) if t0 <= s[0] <= t1]),
             bystanders_ended=pings.get("ended"))
    for name, (since, until) in ctx.windows.items():
        worst_in, lost_in = bystanders.worst(since, until)
        f[f"{name}_ping_max_ms"], f[f"{name}_pings_lost"] = _r(worst_in), lost_in


def _r(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x, 1)


def rss_unmet(f: Dict[str, Any], peak: Optional[float] = None) -> List[str]:
    """Memory bounded (peak growth within `peak` MiB, if given) and given back: once
    the probe's peers are gone, RSS is back within HELD_MIB of where it started or has
    at least given back half of what it grew (issue 10: "memory that is given back")."""
    before, top, after = f.get("rss_before_mib"), f.get("rss_peak_mib"), f.get("rss_after_mib")
    if before is None or top is None or after is None:
        return []
    unmet = []
    if peak is not None and top - before > peak:
        unmet.append(f"RSS grew by {top - before:.0f} MiB (> {peak})")
    if after - before > max(HELD_MIB, (top - before) / 2):
        unmet.append(f"RSS still {after - before:.0f} MiB above the start after the peers "
                     f"left (of {top - before:.0f} MiB grown)")
    return unmet


def shared_unmet(result: Dict[str, Any]) -> List[str]:
    """What jrouter promises in every probe: alive, no traceback, bystanders served."""
    f = result["figures"]
    unmet = []
    if "error" in result:
        unmet.append("the probe could not run")
    if f.get("status") != "alive":
        unmet.append(f"router {f.get('status')}")
    if f.get("tracebacks"):
        unmet.append(f"{f['tracebacks']} traceback(s) in the log")
    if f.get("pings_lost"):
        unmet.append(f"{f['pings_lost']} bystander ping(s) lost")
    if f.get("bystanders_ended"):
        unmet.append(f"bystanders cut off: {f['bystanders_ended']}")
    if (f.get("ping_max_ms") or 0) > PROMPT_MS:
        unmet.append(f"bystander ping took {f['ping_max_ms']:.0f} ms (> {PROMPT_MS:.0f})")
    if "probe_error" in result:
        unmet.append("the probe could not finish")
    return unmet
