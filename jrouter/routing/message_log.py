"""jabberd2's message log: one line per routed ``<message/>`` with a body (protocol §7.1).

Owns: which routed packets are logged and the exact line (``message_log_line``,
pure), where the body comes from (``route_body``, pure), and the file itself
is the shell's (``ops/message_log_file.py``).

Must not know: routing, sockets, files, the clock. The router asks
``entry_for(element)`` for each unicast route it delivers, after the target
was chosen (a bounced packet is never logged) and only when
``config.message_logging`` is on, and hands the entry to the shell, which
stamps it with local time (``format_line``) and appends it.

What the real ``jabberd2-router`` (Debian 2.7.0) writes, checked on loopback
with two components, TZ=Europe/Berlin::

    # This message log is created by the jabberd router.
    # See router.xml for logging options.
    # Format: DateTime FromJID ToJID MessageBody<line end>
    2026-11-25T08:09:31+0100 user@a.test/Res x@b.test/r one\\x01two & three <x> ü
    2026-11-25T08:09:31+0100 u@a.test/r x@b.test/r \n   (an empty <body/>)

and, from ``_router_process_route`` and ``message_log`` in router/router.c:

* the route's first child must be named ``message`` in any namespace;
* the route needs ``from`` and ``to``, its ``to`` must not start with the
  three characters ``c2s`` (c2s would log the same message twice), and both
  must be valid JIDs;
* the message needs valid ``from`` and ``to``; the line shows them as full
  JIDs after stringprep (``User@A.test/Res`` -> ``user@a.test/Res``);
* the body is the first child of the message named ``body`` in any namespace
  (``<html><body>`` does not count, ``<body xmlns='urn:x'>`` does); its text
  is what comes before its first child element (``<body>a<b/>c</body>`` logs
  ``a``); no body, no line; an empty body logs an empty text;
* every ``\\n`` becomes byte 0x01; ``\\r``, tabs and spaces stay as they are;
* the timestamp is local time, ``%Y-%m-%dT%H:%M:%S%z``;
* a file that did not exist gets the three header lines first, and mode 0600
  (jabberd2 sets ``umask(0077)`` for the whole process to get it; we give the
  mode to ``open`` instead and leave the umask alone, protocol §8 #10).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Mapping, NamedTuple, Optional

from jrouter.wire.jid import parse_jid

if TYPE_CHECKING:
    from lxml import etree

    from jrouter.wire.xmlstream import Element

HEADER = (
    "# This message log is created by the jabberd router.\n"
    "# See router.xml for logging options.\n"
    "# Format: DateTime FromJID ToJID MessageBody<line end>\n"
)
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S%z"
_LOCAL_TIME = TIMESTAMP_FORMAT[:-2]       # %z: utc_offset()
FILE_MODE = 0o600


def _local_name(name: Optional[str]) -> Optional[str]:
    """``"uri local"`` or ``"local"`` (xmlstream's expanded names) -> ``local``."""
    return None if name is None else name.rpartition(" ")[2]


def wanted(route_attrs: Mapping[str, str], child_name: Optional[str]) -> bool:
    """The cheap half of the checks: worth looking for a body at all?"""
    to = route_attrs.get("to")
    return (_local_name(child_name) == "message" and to is not None
            and not to.startswith("c2s") and "from" in route_attrs)


class Entry(NamedTuple):
    """What one line of the message log says, bar the time the shell adds."""

    sender: str                 # the message's from, a prepped full JID
    receiver: str               # its to
    body: str                   # the body's leading text


def entry(route_attrs: Mapping[str, str], child_name: Optional[str],
          child_attrs: Optional[Mapping[str, str]], body_text: Optional[str]) -> Optional[Entry]:
    """The entry for a delivered route, or None when jabberd2 would not log
    it. ``body_text`` is None when there is no body."""
    if body_text is None or not wanted(route_attrs, child_name):
        return None
    if parse_jid(route_attrs["from"]) is None or parse_jid(route_attrs["to"]) is None:
        return None
    child_attrs = child_attrs or {}
    sender = parse_jid(child_attrs.get("from"))
    receiver = parse_jid(child_attrs.get("to"))
    if sender is None or receiver is None:
        return None
    return Entry(sender.full, receiver.full, body_text)


def entry_for(element: Element) -> Optional[Entry]:
    """The entry for a delivered route (``xmlstream.Element``); parses the
    packet only when the cheap checks pass."""
    if not wanted(element.attrs, element.child_name):
        return None
    return entry(element.attrs, element.child_name, element.child_attrs, route_body(element.tree()))


def format_line(logged: Entry, now_struct_time: time.struct_time) -> str:
    """The line jabberd2 writes, with its ``\\n``, stamped with local time."""
    stamp = time.strftime(_LOCAL_TIME, now_struct_time) + utc_offset(now_struct_time)
    return f"{stamp} {logged.sender} {logged.receiver} {logged.body.replace(chr(10), chr(1))}\n"


def utc_offset(local: time.struct_time) -> str:
    """``%z`` of ``local`` (``+0100``), from its ``tm_gmtoff``: PyPy's
    ``strftime`` writes ``+0000`` whatever the zone (docs/architecture.md, PyPy)."""
    offset = local.tm_gmtoff or 0
    sign = "-" if offset < 0 else "+"
    minutes = abs(offset) // 60
    return "%s%02d%02d" % (sign, minutes // 60, minutes % 60)

def message_log_line(route_attrs: Mapping[str, str], child_name: Optional[str],
                     child_attrs: Optional[Mapping[str, str]], body_text: Optional[str],
                     now_struct_time: time.struct_time) -> Optional[str]:
    """The log line for a delivered route, or None when jabberd2 would not log it."""
    logged = entry(route_attrs, child_name, child_attrs, body_text)
    return None if logged is None else format_line(logged, now_struct_time)


def route_body(route_tree: etree._Element) -> Optional[str]:
    """The body text jabberd2 logs for a ``<route>`` (lxml tree), or None.

    nad keeps an element's text up to its first child element (comments
    skipped) as its cdata, and that is what gets logged.
    """
    message = _first_element(route_tree)
    if message is None:
        return None
    for child in message.iterchildren():
        if isinstance(child.tag, str) and child.tag.rpartition("}")[2] == "body":
            return _leading_text(child)
    return None


def _first_element(tree: etree._Element) -> Optional[etree._Element]:
    for child in tree.iterchildren():
        if isinstance(child.tag, str):
            return child
    return None


def _leading_text(element: etree._Element) -> str:
    parts = [element.text or ""]
    for child in element.iterchildren():
        if isinstance(child.tag, str):
            break
        parts.append(child.tail or "")      # a comment or PI splits the text; expat joins it
    return "".join(parts)
