"""Probe 6: deep nesting on every parse path.

Owns: three deeply nested elements from authenticated components, each on a
path where the router parses more than the stanza's outline: an XEP-0114
stanza that declares its own `xmlns` (the router moves it into a `<route/>`),
a `<bind/>` with nested children (the router reads it whole), and a
jabberd2-protocol `<route/>` 100,000 levels deep; and what the sender, a
sink component (the stanzas' addressee) and the log make of each.  What
jrouter promises: docs/jabberd2-router.md §3.9 ("stanza nested too deeply
(limit 128 levels)", a stream error) and issue 10 item 5: no uncaught
exception from any input.  Knows nothing about processes.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable, Dict, List, Tuple

from . import net
from .harness import Context, Probe

TEXT = re.compile(rb"<text\b[^>]*>([^<]*)</text>")


def nest(depth: int) -> str:
    return "<a>" * depth + "</a>" * depth


def deep_probe(ctx: Context, connect: Callable[[float], Any], stanza: bytes,
               delivered: Callable[[bytes], bool],
               words: Tuple[str, str] = ("delivered to the sink", "nothing delivered")
               ) -> Dict[str, Any]:
    """Send `stanza` from the component `connect` makes; read the sender's and the
    sink's streams for a while; `delivered(sink bytes)` says the stanza took effect
    there (`words`: how to say that it did, and that it did not)."""
    setup = ctx.left(20)
    sink = net.component(ctx.port, "sink.probe", setup)
    sender = connect(setup)
    time.sleep(0.2)
    trouble = net.send_all(sender.sock, stanza, ctx.left(20))
    back, eof = net.read_until(sender.sock, ctx.left(10), quiet=1.5)
    got, _ = net.read_until(sink.sock, ctx.left(5), quiet=0.5)
    err = net.stream_error(back)
    text = TEXT.search(back)
    reason = f" (\"{text.group(1).decode('utf-8', 'replace')}\")" if text else ""
    arrived = delivered(got)
    answered = b"<bind" in back or b"error=" in back or b"type='error'" in back
    if err:
        fate = f"stream error {err}{reason}"
    elif eof:
        fate = "connection closed without a stream error"
    else:
        fate = "stream kept open"
    outcome = f"{fate}; {words[0] if arrived else words[1]}"
    for conn in (sink, sender):
        conn.sock.close()
    return {"outcome": outcome, "facts": [f"{len(stanza):,} bytes sent"]
            + ([f"send stopped: {trouble}"] if trouble else [])
            + (["the sender got an answer"] if answered and not err else []),
            "figures": dict(stanza_bytes=len(stanza), stream_error=err, closed=eof,
                            delivered=arrived, answered=answered)}


def accept_deep(ctx: Context) -> Dict[str, Any]:
    depth = 300
    stanza = (f"<message xmlns='jabber:client' to='u@sink.probe' from='x@deep.probe' "
              f"id='deep'><body>deep</body>{nest(depth)}</message>").encode()
    return deep_probe(ctx, lambda d: net.accept_component(ctx.port, "deep.probe", d), stanza,
                      lambda got: got.count(b"<a>") >= depth)


def bind_deep(ctx: Context) -> Dict[str, Any]:
    depth = 300
    stanza = f"<bind name='deepbind.probe'>{nest(depth)}</bind>".encode()
    return deep_probe(ctx, lambda d: net.component(ctx.port, "binder.probe", d), stanza,
                      lambda got: b"deepbind.probe" in got,
                      ("the name bound (advertised to the sink)", "the name not bound"))


def route_deep(ctx: Context) -> Dict[str, Any]:
    depth = 100_000
    stanza = (f"<route to='sink.probe' from='nest.probe'><message id='nest'>{nest(depth)}"
              f"</message></route>").encode()
    return deep_probe(ctx, lambda d: net.component(ctx.port, "nest.probe", d), stanza,
                      lambda got: b"id='nest'" in got or b'id="nest"' in got)


def unmet(r: Dict[str, Any]) -> List[str]:
    f = r["figures"]
    if "stanza_bytes" not in f:
        return ["no figures"]
    if f["stream_error"] or f["delivered"] or f["answered"]:
        return []
    return ["neither a stream error nor the stanza handled"
            + (" (closed without a word)" if f["closed"] else "")]


EXPECT = ("a stream error (`policy-violation`, \"stanza nested too deeply (limit 128 "
          "levels)\") or the stanza handled whole; never a traceback, a silent close or a "
          "crash")

PROBES = [
    Probe("6a-deep-xep0114", "deep nesting: an XEP-0114 stanza with its own xmlns",
          "an XEP-0114 component sends a `<message xmlns='jabber:client'>` to a jabberd2 "
          "component with nested children", lambda q: "300 levels", accept_deep, unmet,
          EXPECT),
    Probe("6b-deep-bind", "deep nesting: a `<bind/>`",
          "an authenticated jabberd2 component sends a `<bind/>` with nested children",
          lambda q: "300 levels", bind_deep, unmet, EXPECT),
    Probe("6c-deep-route", "deep nesting: a `<route/>`",
          "an authenticated jabberd2 component sends a `<route/>` to another whose "
          "message nests `<a>` elements", lambda q: "100,000 levels (700 KB)", route_deep,
          unmet, EXPECT,
          note="700 KB: under jrouter's `stanzasize` (1 MiB), so depth is what is tried."),
]
