"""Probe 5: wrong passwords and wrong handshakes, as fast as the router answers.

Owns: a peer from 127.0.0.2 that tries SASL DIGEST-MD5 with a wrong password
again and again on one connection (and, once cut off, on new ones until the
address is refused), and one that tries wrong XEP-0114 handshakes, a new
connection each (both routers end the stream on a failed handshake); then a
legitimate component from 127.0.0.1.  The client role is
jrouter.testing.component_client's.  What jrouter promises:
docs/jabberd2-router.md §3.10 (`authattempts` 3 per connection, `authfailures`
10 in 60 s per address, the fail2ban line).  Knows nothing about processes.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable, Dict, List, Optional

from benchlib import routers
from jrouter.testing.component_client import NS_ACCEPT, ComponentClient, State, header
from jrouter.wire.xmlstream import StreamError

from . import net
from .harness import Context, Probe

FAIL2BAN = re.compile(r"\[[\d.]+\] too many failed authentications \(\d+ in \d+ s\)")


class Attempt:
    """One hostile connection and its client role; `refused`: closed before a byte."""

    def __init__(self, port: int, stream_header: Optional[bytes] = None) -> None:
        self.sock = net.dial(port, net.HOSTILE)
        self.client = ComponentClient(stream_header)
        self.received = 0
        self.eof = False
        self.client.open()

    @property
    def refused(self) -> bool:
        return self.eof and self.received == 0

    def pump(self, done: Callable[[], bool], deadline: float) -> bool:
        """Carry bytes until `done()`; False when the stream ended or time ran out."""
        client = self.client
        while True:
            out = client.data_to_send()
            if out and net.send_all(self.sock, out, deadline):
                self.eof = True
            if done():
                return True
            if self.eof or client.state is State.CLOSED or time.monotonic() >= deadline:
                return False
            if not net.io_ready(self.sock, deadline - time.monotonic())[0]:
                continue
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                self.eof = True
                continue
            self.received += len(data)
            try:
                client.receive(data)
            except StreamError:
                self.eof = True

    def close(self) -> None:
        self.sock.close()


def passwords(ctx: Context) -> Dict[str, Any]:
    limit = 2000
    per_conn: List[int] = []
    ends: List[str] = []
    refused_after: Optional[int] = None
    started = time.monotonic()
    deadline = ctx.left(90)
    while sum(per_conn) < limit and time.monotonic() < deadline:
        a = Attempt(ctx.port)
        if not a.pump(lambda: a.client.state is State.READY, ctx.left(5)):
            a.close()
            if a.refused:
                refused_after = sum(per_conn)
            else:
                ends.append(f"no features ({a.client.stream_error})")
            break
        failures = 0
        while sum(per_conn) + failures < limit:
            a.client.authenticate(routers.USER, "wrong-password")
            seen = a.client.failure
            ok = a.pump(lambda: a.client.state is State.READY, ctx.left(5))
            failures += a.client.failure is not seen
            if not ok:
                break
        per_conn.append(failures)
        cond = (a.client.stream_error or (None,))[0]
        ends.append(cond or ("closed" if a.eof else "open"))
        a.close()
    return _summary(ctx, "wrong password", per_conn, ends, refused_after, started)


def handshakes(ctx: Context) -> Dict[str, Any]:
    limit = 2000
    per_conn: List[int] = []
    ends: List[str] = []
    refused_after: Optional[int] = None
    started = time.monotonic()
    deadline = ctx.left(90)
    while len(per_conn) < limit and time.monotonic() < deadline:
        a = Attempt(ctx.port, header(NS_ACCEPT, version=False, to=f"h{len(per_conn)}.probe"))
        if not a.pump(lambda: a.client.stream_id is not None, ctx.left(5)):
            a.close()
            if a.refused:
                refused_after = len(per_conn)
            else:
                ends.append("no header")
            break
        a.client.handshake("wrong-secret")
        a.pump(lambda: a.client.authenticated, ctx.left(5))
        per_conn.append(1 if a.client.failure else 0)
        ends.append((a.client.stream_error or ("closed" if a.eof else "open",))[0])
        a.close()
    return _summary(ctx, "wrong handshake", per_conn, ends, refused_after, started)


def _summary(ctx: Context, what: str, per_conn: List[int], ends: List[str],
             refused_after: Optional[int], started: float) -> Dict[str, Any]:
    took = time.monotonic() - started
    total = sum(per_conn)
    log = ctx.log()
    fail2ban = [x for x in log if FAIL2BAN.search(x)]
    legit_s, legit_why = net.try_component(ctx.port, ctx.deadline, "legit.probe", 5.0)
    first = per_conn[0] if per_conn else 0
    if per_conn and ends[-1] == "open":
        cut = f"{total:,} {what}s on {len(per_conn):,} connection(s), the last never cut off"
    elif what == "wrong password" and per_conn:
        cut = (f"first connection cut off after {first:,} ({ends[0]}); {total:,} on "
               f"{len(per_conn):,} connections")
    else:
        cut = f"{total:,} {what}s on {len(per_conn):,} connections"
    outcome = (cut + ("; then the address was refused" if refused_after is not None
                      else "; the address never refused")
               + ("; fail2ban line logged" if fail2ban else "; no fail2ban line"))
    facts = [f"streams ended by: {_kinds(ends)}", f"{took:.1f} s ({total / took:,.0f}/s)",
             "then 127.0.0.1 " + (f"still gets in ({legit_s * 1000:.0f} ms)" if legit_s is not None
                                  else f"is locked out: {legit_why}")]
    if fail2ban:
        facts.append(f"log: \"{fail2ban[0].split('] ', 1)[-1]}\"")
    return {"outcome": outcome, "facts": facts,
            "figures": dict(attempts=total, connections=len(per_conn), first_connection=first,
                            per_connection=per_conn[:12], ends=_count(ends),
                            refused_after=refused_after, fail2ban_lines=len(fail2ban),
                            seconds=round(took, 2), legit_ms=None if legit_s is None
                            else round(legit_s * 1000, 1), legit_error=legit_why)}


def _count(things: List[str]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for thing in things:
        counts[thing] = counts.get(thing, 0) + 1
    return counts


def _kinds(things: List[str]) -> str:
    return ", ".join(f"{n:,} × {k}" for k, n in sorted(_count(things).items(), key=lambda x: -x[1]))


def unmet(per_connection_limit: Optional[int]) -> Callable[[Dict[str, Any]], List[str]]:
    def check(r: Dict[str, Any]) -> List[str]:
        f = r["figures"]
        if "attempts" not in f:
            return ["no figures"]
        out = []
        if per_connection_limit and f["first_connection"] > per_connection_limit:
            out.append(f"{f['first_connection']:,} failures on one connection (> "
                       f"{per_connection_limit})")
        if f["refused_after"] is None or f["refused_after"] > 10:
            out.append("the address was not blocked within 10 failures")
        if f["fail2ban_lines"] != 1:
            out.append(f"{f['fail2ban_lines']} fail2ban lines (want 1)")
        if f["legit_ms"] is None:
            out.append(f"127.0.0.1 locked out too: {f['legit_error']}")
        return out
    return check


PROBES = [
    Probe("5a-wrong-passwords", "authentication: wrong passwords",
          "SASL DIGEST-MD5 with a wrong password from 127.0.0.2, again at once on the same "
          "connection; once cut off, on new connections until the address is refused",
          lambda q: "2,000 attempts", passwords, unmet(3),
          "the 3rd failure on a connection ends it (`policy-violation`), the 10th from an "
          "address blocks it for 300 s with one fail2ban line; a component from another "
          "address still gets in",
          note="`io.limits.authattempts` 3 and `authfailures` 10 in 60 s are jrouter's "
               "defaults (jabberd2 has neither). \"Fail2ban line\": `[IP] too many failed "
               "authentications (N in S s), refusing connections for T s`."),
    Probe("5b-wrong-handshakes", "authentication: wrong handshakes",
          "XEP-0114 handshakes with a wrong secret from 127.0.0.2, each on a new "
          "connection (a failed handshake ends the stream), until the address is refused",
          lambda q: "2,000 attempts", handshakes, unmet(None),
          "the 10th failure from an address blocks it (one fail2ban line); a component from "
          "another address still gets in"),
]
