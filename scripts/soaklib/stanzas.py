"""The soak's packets: the bytes a component sends, and what an arrival is.

Owns: the marker every packet carries in its `id` (kind, sender, receiver,
sequence number, send time), the stanzas of both protocols (a jabberd2
component wraps its stanza in a `<route/>`, protocol §4.5; an XEP-0114
component sends the bare stanza, §5.3), and the reading of a received
top-level element: a delivery, a bounce (jabberd2: `<route error='CODE'>`,
§4.5; XEP-0114: the stanza back with `type='error'`, §5.5), a broadcast copy
(§4.6; an XEP-0114 component gets the stanza only, §5.4), or something else.
Must not know: sockets, the clock, the books.

The marker sits in the stanza's `id`, which both routers pass on unchanged
(jabberd2 re-serialises the XML, but keeps attribute values), so nothing
needs parsing beyond the attributes `xmlstream.Element` already has:

    s.U.<src>.<dst>.<seq>.<t>         message      s.Q... IQ get
    s.R.<src>.<dst>.<seq>.<t>.<qt>    IQ result (qt: the request's send time)
    s.B.<src>.<bseq>.<t>              broadcast
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from jrouter.wire.xmlstream import Element

NS_COMPONENT = "http://jabberd.jabberstudio.org/ns/component/1.0"
CODE = re.compile(rb"\bcode=['\"](\d+)['\"]")


def comp_name(i: int) -> str:
    return f"comp{i}.soak"


def _wrap(stanza: str, src: int, dst: Optional[int]) -> str:
    if dst is None:
        return f"<route type='broadcast' from='{comp_name(src)}'>{stanza}</route>"
    return f"<route to='{comp_name(dst)}' from='{comp_name(src)}'>{stanza}</route>"


def unicast(jabberd2: bool, kind: str, src: int, dst: int, seq: int, t: int,
            fill: str = "", request_t: int = 0) -> bytes:
    """A packet from component `src` to `dst`: 'U' message, 'Q' IQ get, 'R' IQ result."""
    ns = " xmlns='jabber:client'" if jabberd2 else ""
    mark = f"s.{kind}.{src}.{dst}.{seq}.{t}" + (f".{request_t}" if kind == "R" else "")
    addr = f"to='u{dst}@{comp_name(dst)}' from='u{src}@{comp_name(src)}/r' id='{mark}'"
    if kind == "U":
        stanza = f"<message{ns} {addr}><body>{fill}</body></message>"
    elif kind == "Q":
        stanza = f"<iq{ns} type='get' {addr}><ping xmlns='urn:xmpp:ping'/></iq>"
    else:
        stanza = f"<iq{ns} type='result' {addr}/>"
    return (_wrap(stanza, src, dst) if jabberd2 else stanza).encode()


def broadcast(src: int, bseq: int, t: int, fill: str = "") -> bytes:
    """A jabberd2 component's `<route type='broadcast'>` (XEP-0114 cannot send one)."""
    stanza = (f"<message xmlns='jabber:client' from='u{src}@{comp_name(src)}/r' "
              f"id='s.B.{src}.{bseq}.{t}'><body>{fill}</body></message>")
    return _wrap(stanza, src, None).encode()


@dataclass(frozen=True)
class Arrival:
    """What one received element means.

    what: 'delivery', 'bounce', 'broadcast', 'broadcast-bounce' or 'other'."""
    what: str
    kind: str = ""
    src: int = -1
    dst: int = -1        # broadcasts: -1
    seq: int = -1
    t_us: int = 0
    request_t_us: int = 0
    code: str = ""       # bounces: the error code as the router wrote it


OTHER = Arrival("other")


def _marker(what: str, mark: Optional[str], code: str = "") -> Arrival:
    if not mark or not mark.startswith("s."):
        return OTHER
    try:
        parts = mark.split(".")
        kind = parts[1]
        if kind == "B":
            return Arrival("broadcast-bounce" if what == "bounce" else "broadcast", kind,
                           int(parts[2]), -1, int(parts[3]), int(parts[4]), code=code)
        req = int(parts[6]) if kind == "R" else 0
        return Arrival(what, kind, int(parts[2]), int(parts[3]), int(parts[4]),
                       int(parts[5]), req, code)
    except (IndexError, ValueError):
        return OTHER


def arrival(el: Element) -> Arrival:
    """Read one top-level element a component received."""
    local = el.local_name
    if local == "route" and el.namespace == NS_COMPONENT:
        inner = el.child_attrs or {}
        error = el.attrs.get("error")
        if error is not None:
            return _marker("bounce", inner.get("id"), error)
        return _marker("delivery", inner.get("id"))
    if local in ("message", "iq", "presence") and el.namespace != NS_COMPONENT:
        if el.attrs.get("type") == "error":
            m = CODE.search(el.raw)
            return _marker("bounce", el.attrs.get("id"), m.group(1).decode() if m else "?")
        return _marker("delivery", el.attrs.get("id"))
    return OTHER
