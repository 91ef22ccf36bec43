"""Probe 7: a `<route/>` carrying several payloads to an XEP-0114 component.

Owns: a jabberd2-protocol component that sends one `<route/>` holding five
stanzas (message, presence, iq, message, message) to an XEP-0114 component,
and what arrives there, in which order.  What jrouter promises:
docs/jabberd2-router.md §5.4 and issue 10 finding 7 (every payload, in
order, as jabberd2 delivers them).  Knows nothing about processes.
"""

from __future__ import annotations

import re
import time
from typing import Any, Dict, List

from . import net
from .harness import Context, Probe

STANZA_ID = re.compile(rb"<(message|presence|iq)\b[^>]*?\bid=['\"](p\d)['\"]")
PAYLOADS = [
    "<message xmlns='jabber:client' to='u@multi.probe' from='s@sender.probe' id='p1'>"
    "<body>one</body></message>",
    "<presence xmlns='jabber:client' to='u@multi.probe' from='s@sender.probe' id='p2'/>",
    "<iq xmlns='jabber:client' type='get' to='u@multi.probe' from='s@sender.probe' id='p3'>"
    "<query xmlns='jabber:iq:version'/></iq>",
    "<message xmlns='jabber:client' to='u@multi.probe' from='s@sender.probe' id='p4'/>",
    "<message xmlns='jabber:client' to='u@multi.probe' from='s@sender.probe' id='p5'>"
    "<body>five</body></message>",
]
WANTED = [f"p{i}" for i in range(1, len(PAYLOADS) + 1)]


def multi_payload(ctx: Context) -> Dict[str, Any]:
    setup = ctx.left(20)
    target = net.accept_component(ctx.port, "multi.probe", setup)
    sender = net.component(ctx.port, "sender.probe", setup)
    time.sleep(0.2)
    route = f"<route to='multi.probe' from='sender.probe'>{''.join(PAYLOADS)}</route>"
    net.send_all(sender.sock, route.encode(), ctx.left(5))
    got, _ = net.read_until(target.sock, ctx.left(10), quiet=1.0)
    back, _ = net.read_until(sender.sock, ctx.left(5), quiet=0.3)
    ids = [m.group(2).decode() for m in STANZA_ID.finditer(target.buf + got)]
    for conn in (target, sender):
        conn.sock.close()
    in_order = ids == WANTED
    if in_order:
        outcome = f"{len(ids)} of {len(WANTED)} delivered, in order"
    else:
        outcome = (f"{len([i for i in ids if i in WANTED])} of {len(WANTED)} delivered "
                   f"({', '.join(ids) or 'none'})")
    bounced = b"error=" in back
    return {"outcome": outcome + ("; the sender got a bounce" if bounced else ""),
            "facts": [], "figures": dict(delivered=ids, in_order=in_order, bounced=bounced)}


def unmet(r: Dict[str, Any]) -> List[str]:
    f = r["figures"]
    if "delivered" not in f:
        return ["no figures"]
    return [] if f["in_order"] else [f"delivered {f['delivered']}, want {WANTED}"]


PROBES = [
    Probe("7-multi-payload-route", "a `<route/>` with several payloads",
          "a jabberd2 component sends one `<route/>` holding message, presence, iq, "
          "message, message to an XEP-0114 component", lambda q: "5 payloads",
          multi_payload, unmet, "each payload delivered, in order, as jabberd2 does"),
]
