"""Probes 1 and 2: a peer that stops reading, and one that disconnects with a backlog.

Owns: the sender (a component that sends messages as fast as the router
takes them and reads its own stream all the while, counting bounces by
message id), the peer that never reads (SO_RCVBUF 4 KiB, set before it
connects, so the kernel holds little and the router holds the rest), and
the two probes' figures and expectations (docs/jabberd2-router.md §3.9 queue,
§4.10 disconnect cleanup, §6.6).  Knows nothing about processes.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable, Dict, List

from . import net
from .harness import Context, Probe, rss_unmet

MIB = 1024 * 1024
BODY = "x" * 900
BOUNCE = re.compile(rb"<route\b[^>]*?\berror=['\"](\d+)['\"][^>]*>\s*<message\b[^>]*?"
                    rb"\bid=['\"]m(\d+)['\"]")
MESSAGE_ID = re.compile(rb"<message\b[^>]*?\bid=['\"]m(\d+)['\"]")
BATCH = 64


def message(i: int, to: str = "stuck.probe") -> bytes:
    return (f"<route to='{to}' from='sender.probe'><message xmlns='jabber:client' "
            f"to='u@{to}' from='s@sender.probe' id='m{i}'><body>{BODY}</body></message>"
            f"</route>").encode()


MESSAGE_SIZE = len(message(10000))


class Sender:
    """`count` messages to `to`, as fast as the router reads them; bounces by id."""

    def __init__(self, conn: Any, count: int, to: str = "stuck.probe") -> None:
        self.sock, self.count, self.to = conn.sock, count, to
        self.sock.setblocking(False)
        self.queued = 0                       # messages handed to `out`
        self.out = memoryview(b"")
        self.scanner = net.Scanner(BOUNCE, cut=b"</route>")
        self.bounced: Dict[int, str] = {}     # message number -> error code
        self.last_bounce = 0.0
        self.ended = ""
        self.scanner.feed(conn.buf)

    @property
    def sent_all(self) -> bool:
        return self.queued >= self.count and not self.out

    def pump(self, stop: Callable[[], bool], deadline: float) -> None:
        while not stop() and not self.ended and time.monotonic() < deadline:
            readable, writable = net.io_ready(self.sock, 0.05, write=not self.sent_all)
            if readable:
                self._read()
            if writable:
                self._write()

    def pump_quiet(self, quiet: float, deadline: float) -> None:
        """Read until no bounce for `quiet` s."""
        mark = time.monotonic()
        self.pump(lambda: time.monotonic() - max(mark, self.last_bounce) >= quiet, deadline)

    def _read(self) -> None:
        try:
            data = self.sock.recv(256 * 1024)
        except BlockingIOError:
            return
        except OSError as e:
            data, self.ended = b"", str(e)
        if not data:
            self.ended = self.ended or "the router closed the sender's connection"
            return
        found = self.scanner.feed(data)
        if found:
            self.last_bounce = time.monotonic()
        for code, number in found:
            self.bounced[int(number)] = code.decode()

    def _write(self) -> None:
        if not self.out:
            n = min(BATCH, self.count - self.queued)
            self.out = memoryview(b"".join(message(self.queued + i, self.to) for i in range(n)))
            self.queued += n
        try:
            self.out = self.out[self.sock.send(self.out):]
        except BlockingIOError:
            pass
        except OSError as e:
            self.ended = str(e)

    def codes(self) -> str:
        tally: Dict[str, int] = {}
        for code in self.bounced.values():
            tally[code] = tally.get(code, 0) + 1
        return ", ".join(f"{n:,} × {c}" for c, n in sorted(tally.items())) or "none"


def _count(mib: int) -> int:
    return mib * MIB // MESSAGE_SIZE


def _log_value(lines: List[str], pattern: str) -> str:
    for line in lines:
        m = re.search(pattern, line)
        if m:
            return m.group(0)
    return ""


# -- probe 1 -------------------------------------------------------------------

def stuck_peer(ctx: Context) -> Dict[str, Any]:
    mib = ctx.scale(64, 24)
    setup = ctx.left(20)
    stuck = net.component(ctx.port, "stuck.probe", setup, rcvbuf=4096)
    sender = Sender(net.component(ctx.port, "sender.probe", setup), _count(mib))
    started = time.monotonic()
    sender.pump(lambda: sender.sent_all, ctx.left(90))
    took = time.monotonic() - started
    sender.pump_quiet(1.0, ctx.left(30))
    peak = ctx.sampler.peak
    data, eof = net.read_until(stuck.sock, ctx.left(10), quiet=1.5, most=16 * MIB)
    stuck.sock.close()
    sender.pump_quiet(1.0, ctx.left(10))
    ctx.settle(2.0)
    reached = {int(n) for (n,) in net.Scanner(MESSAGE_ID, cut=b"</route>").feed(data)}
    both = reached & set(sender.bounced)
    unaccounted = sender.queued - len(reached | set(sender.bounced))
    err = net.stream_error(data)
    fate = ((f"stream error {err} and disconnect" if err else "disconnected without a stream "
             "error") if eof else f"still connected: read {len(data) / MIB:.0f} MiB of its "
            "backlog and more kept coming")
    log = ctx.log()
    cut = _log_value(log, r"is not reading: more than \d+ bytes queued")
    outcome = (f"stuck peer {fate}" + (f" ({cut})" if cut else "") + f"; sender got "
               f"{len(sender.bounced):,} bounces")
    facts = [f"sent {sender.queued * MESSAGE_SIZE / MIB:.0f} MiB in {took:.1f} s",
             f"bounced {sender.codes()}", f"reached the stuck peer {len(reached):,}",
             f"unaccounted {unaccounted:,}",
             f"RSS at the end of sending {peak:.0f} MiB" if peak else ""]
    if sender.ended:
        facts.append(f"sender: {sender.ended}")
    return {"outcome": outcome, "facts": [x for x in facts if x],
            "figures": dict(sent=sender.queued, bounced=len(sender.bounced),
                            bounce_codes=sender.codes(), reached=len(reached),
                            both=len(both), unaccounted=unaccounted, stuck_eof=eof,
                            stuck_stream_error=err, sender_ended=sender.ended)}


def stuck_unmet(r: Dict[str, Any]) -> List[str]:
    f = r["figures"]
    if "sent" not in f:
        return ["no figures"]
    unmet = []
    if not f["stuck_eof"]:
        unmet.append("the stuck peer was not disconnected")
    if f["unaccounted"] or f["both"]:
        unmet.append(f"{f['unaccounted']:,} messages neither reached the peer nor bounced, "
                     f"{f['both']} both")
    if f["sender_ended"]:
        unmet.append("the sender was cut off")
    unmet += rss_unmet(f, 64)
    return unmet


# -- probe 2 -------------------------------------------------------------------

def backlog_queue(quick: bool) -> int:
    return (32 if quick else 128) * MIB


def disconnect_backlog(ctx: Context) -> Dict[str, Any]:
    mib = ctx.scale(100, 24)
    setup = ctx.left(20)
    stuck = net.component(ctx.port, "stuck.probe", setup, rcvbuf=4096)
    sender = Sender(net.component(ctx.port, "sender.probe", setup), _count(mib))
    sender.pump(lambda: sender.sent_all, ctx.left(90))
    sender.pump_quiet(1.0, ctx.left(10))
    early = len(sender.bounced)
    local = stuck.sock.getsockname()[1]
    mine, theirs = net.tcp_queues(local, ctx.port), net.tcp_queues(ctx.port, local)
    in_kernel = (mine[1] if mine else 0) + (theirs[0] if theirs else 0)
    lines = len(ctx.log())
    closed = time.monotonic()
    stuck.sock.close()                # unread data: the kernel sends a reset
    sender.pump(lambda: len(sender.bounced) >= sender.queued
                or time.monotonic() - max(closed, sender.last_bounce) > 3.0, ctx.left(60))
    ended = max(closed, sender.last_bounce)
    ctx.window("teardown", closed)
    log = ctx.log()[lines:]
    ctx.settle(2.0)
    kernel_msgs = -(-in_kernel // MESSAGE_SIZE) + (1 if in_kernel else 0)
    lost = max(0, sender.queued - len(sender.bounced) - kernel_msgs)
    summary = _log_value(log, r"had \d+ queued packets: .*")
    lost_lines = sum("lost a queued packet" in x for x in log)
    outcome = (f"{len(sender.bounced) - early:,} of {sender.queued:,} bounced "
               f"({sender.codes()}) in {ended - closed:.1f} s"
               + (f"; log: \"{summary}\"" if summary else "")
               + (f"; {lost_lines:,} 'lost a queued packet' lines" if lost_lines else ""))
    facts = [f"queued {sender.queued * MESSAGE_SIZE / MIB:.0f} MiB ({sender.queued:,} messages)",
             f"in kernel buffers at the close {in_kernel / MIB:.1f} MiB (≈{kernel_msgs:,} "
             "messages, gone with the connection)", f"lost by the router {lost:,}",
             f"{len(log)} log lines in the teardown"]
    return {"outcome": outcome, "facts": facts,
            "figures": dict(sent=sender.queued, bounced=len(sender.bounced),
                            bounced_before_close=early, in_kernel_bytes=in_kernel, lost=lost,
                            teardown_s=round(ended - closed, 2), teardown_log_lines=len(log),
                            lost_lines=lost_lines, sender_ended=sender.ended)}


def backlog_unmet(r: Dict[str, Any]) -> List[str]:
    f = r["figures"]
    if "sent" not in f:
        return ["no figures"]
    unmet = []
    if f["lost"] > 2:
        unmet.append(f"{f['lost']:,} queued packets neither bounced nor in the kernel's buffers")
    if f["teardown_log_lines"] > 10:
        unmet.append(f"{f['teardown_log_lines']:,} log lines in the teardown (> 10)")
    if f["bounced_before_close"] or f["sender_ended"]:
        unmet.append("the backlog did not fit under the queue bound")
    if (f.get("teardown_ping_max_ms") or 0) > 1000:
        unmet.append(f"bystander ping {f['teardown_ping_max_ms']:.0f} ms during the teardown")
    return unmet + rss_unmet(f)


PROBES = [
    Probe("1-stuck-peer", "a peer that stops reading",
          "a component binds a name and never reads again (SO_RCVBUF 4 KiB); another sends "
          "it ~1 KiB messages as fast as the router takes them, reading its own bounces",
          lambda q: f"{24 if q else 64} MiB ({_count(24 if q else 64):,} messages)",
          stuck_peer, stuck_unmet,
          "past `io.limits.queue` (16 MiB) the peer is disconnected (§3.9; its socket is "
          "shut at once, so a peer that does not read never sees a goodbye); "
          "every message either reached its socket or went back to the sender (503 for what "
          "was queued, 404 once the name is gone); RSS grows < 64 MiB and, once the peer has "
          "closed, gives back at least half of what it grew",
          note="Default settings. After the sender is done the stuck peer reads what it "
               "can (at most 16 MiB), then closes; \"RSS after\" is 2 s after that close."),
    Probe("2-backlog-disconnect", "a disconnect with a backlog",
          "a component that never reads gets a backlog under the queue bound, then closes "
          "(a reset: unread data); the sender counts what comes back",
          lambda q: f"{24 if q else 100} MiB ({_count(24 if q else 100):,} messages), "
                    f"io.limits.queue {backlog_queue(q) // MIB} MiB",
          disconnect_backlog, backlog_unmet,
          "the teardown never blocks the others (bystander < 1 s during it); what was queued "
          "is bounced to its sender (nothing lost but what the kernel already held), in one "
          "summary log line, not one per packet; the backlog's memory is given back",
          config=lambda q: f"<limits><queue>{backlog_queue(q)}</queue></limits>",
          note="`io.limits.queue` is raised (jrouter's own setting; jabberd2 ignores it and "
               "has no bound) so that the whole backlog is queued when the peer closes. "
               "\"In kernel buffers\" is the closing socket's unread bytes plus the router's "
               "unacknowledged ones (/proc/net/tcp) at the close: a router has written those, "
               "and they die with the connection whatever the router does."),
]
