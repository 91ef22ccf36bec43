"""Writing the stream: escaping, our stream headers, stream errors, the close.

Owns: the few byte strings every session writes that are not routed
packets (protocol §3.2, §3.3), and the two namespaces they use.

Must not know: reading (``xmlstream``), routing, sockets.
"""

from __future__ import annotations

from typing import Optional

STREAMS_NS = "http://etherx.jabber.org/streams"
STREAM_ERRORS_NS = "urn:ietf:params:xml:ns:xmpp-streams"

_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "'": "&apos;", '"': "&quot;"})


def escape(text: str) -> str:
    """Escape text for element content or a single-quoted attribute value."""
    return text.translate(_ESCAPES)


def quoteattr(value: str) -> str:
    return "'" + value.translate(_ESCAPES) + "'"


def stream_header(default_ns: Optional[str], stream_id: Optional[str] = None, to: Optional[str] = None,
                  from_: Optional[str] = None, version: Optional[str] = None,
                  declaration: bool = True) -> bytes:
    """Our stream header, attribute for attribute as jabberd2 writes it (protocol §3.2)."""
    parts = ["<?xml version='1.0'?>" if declaration else "",
             "<stream:stream xmlns:stream='", STREAMS_NS, "'"]
    if default_ns:
        parts.append(" xmlns=" + quoteattr(default_ns))
    if to is not None:
        parts.append(" to=" + quoteattr(to))
    if from_ is not None:
        parts.append(" from=" + quoteattr(from_))
    if version is not None:
        parts.append(" version=" + quoteattr(version))
    if stream_id is not None:
        parts.append(" id=" + quoteattr(stream_id))
    parts.append(">")
    return "".join(parts).encode()


def stream_error(condition: str, text: Optional[str] = None, header_sent: bool = True) -> bytes:
    """A stream error and the stream close (protocol §3.3); before our header was
    sent, jabberd2 prefixes a minimal header, and so do we."""
    parts = [] if header_sent else [
        "<stream:stream xmlns:stream='", STREAMS_NS, "' version='1.0'>"]
    parts += ["<stream:error xmlns:stream='", STREAMS_NS, "'><", condition,
              " xmlns='", STREAM_ERRORS_NS, "'/>"]
    if text:
        parts += ["<text xmlns='", STREAM_ERRORS_NS, "'>", escape(text), "</text>"]
    parts.append("</stream:error></stream:stream>")
    return "".join(parts).encode()


STREAM_CLOSE = b"</stream:stream>"

# The declarations our own stream headers make, besides the default namespace.
STREAM_PREFIXES = (("stream", STREAMS_NS),)
