"""What the reader does for lxml: its one parser, and the namespace names it takes.

Owns: the lxml parser for bytes ``xmlstream.StreamReader`` accepted, and the
set of namespace names lxml is known to take. libxml2 refuses a namespace
name that is not an RFC 3986 URI reference ('a{b}', 'caf\\u00e9',
'http://h:99999999999/') where expat takes any string, so the reader shows
each new one to lxml once (``uri_refused``) and ends the stream if lxml would
refuse it later (issue 10, finding 6).

Must not know: streams, routing, sockets. Works without lxml installed (the
benchmark's load generator reads streams with the standard library only):
then nothing will be parsed by lxml, so nothing is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from jrouter.wire.xmlwrite import STREAM_ERRORS_NS, STREAMS_NS, quoteattr

if TYPE_CHECKING:
    from lxml import etree

_LXML_PARSER: Optional[etree.XMLParser] = None


def lxml_parser() -> etree.XMLParser:
    """The lxml parser for bytes the reader accepted: no entities, no
    network, and ``huge_tree`` so that lxml's name and text limits (50,000
    characters, 10 MB) do not refuse what the reader let through; its depth
    and size limits are the reader's (xmlstream's docstring)."""
    global _LXML_PARSER
    if _LXML_PARSER is None:
        from lxml import etree

        _LXML_PARSER = etree.XMLParser(
            resolve_entities=False, no_network=True, load_dtd=False, huge_tree=True
        )
    return _LXML_PARSER


#: Namespace names lxml has taken. Bounded: past the limit a new name is
#: checked every time it comes (only an odd peer uses that many). None is how
#: expat reports ``xmlns=''``.
KNOWN_URIS: set[Optional[str]] = {None, "", STREAMS_NS, STREAM_ERRORS_NS, "jabber:client", "jabber:server",
                                  "jabber:component:accept",
                                  "http://jabberd.jabberstudio.org/ns/component/1.0"}
_KNOWN_LIMIT = 4096


def uri_refused(uri: Optional[str]) -> bool:
    """Whether lxml would refuse ``uri`` as a namespace name (remembered when not)."""
    try:
        from lxml import etree
    except ImportError:
        return False
    try:
        etree.fromstring(f"<a xmlns={quoteattr(uri or '')}/>".encode(), lxml_parser())
    except etree.XMLSyntaxError:
        return True
    if len(KNOWN_URIS) < _KNOWN_LIMIT:
        KNOWN_URIS.add(uri)
    return False
