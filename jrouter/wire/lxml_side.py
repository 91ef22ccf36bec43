"""What the reader does for lxml: its one parser, and the namespace names it takes.

Owns: the lxml parser for bytes ``xmlstream.StreamReader`` accepted, and the
answer to "would lxml refuse this namespace name?" (``uri_refused``, with
the set ``KNOWN_URIS`` of names already taken). libxml2 refuses a namespace
name that is not an RFC 3986 URI reference ('a{b}', 'caf\\u00e9',
'http://h:99999999999/') where expat takes any string, so the reader asks
about each new one and ends the stream if lxml would refuse it later (issue
10, finding 6).

Memory: asking lxml costs memory for good. libxml2 keeps every namespace
name it parses in lxml's per-thread string dictionary, which is never freed,
so a peer sending unique 15 KB names grew the router without bound. The
question is answered in Python first (``uri.is_uri_reference``, sound:
whatever it takes, libxml2 takes), and lxml is asked only about what it
refuses, only for names of at most ``_LXML_NAME_LIMIT`` characters and at
most ``_LXML_CONSULT_LIMIT`` times in the process's life: that dictionary
grows by at most 256 x 512 characters from here (128 KB of ASCII, 512 KB
if every one were 4-byte UTF-8). Past those limits such a name is refused
(the pure check is stricter than libxml2 only for rare forms: IP-literals,
ports over 9 digits, "[" or "]" in a fragment). ``KNOWN_URIS`` keeps only
short ASCII names, at most ``_KNOWN_LIMIT`` of them: well under 1 MiB.

Must not know: streams, routing, sockets. Works without lxml installed (the
benchmark's load generator reads streams with the standard library only):
then nothing will be parsed by lxml, so nothing is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from jrouter.wire.uri import is_uri_reference
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


#: Namespace names lxml takes (the pure check's or lxml's word), so that the
#: reader need not ask again: only ASCII names of at most ``_LXML_NAME_LIMIT``
#: characters, at most ``_KNOWN_LIMIT`` of them, under 0.7 MiB in all (past
#: that a new name is checked every time it comes; only an odd peer uses
#: that many). None is how expat reports ``xmlns=''``. xmlstream holds this
#: very set: it is changed in place, never replaced.
KNOWN_URIS: set[Optional[str]] = {None, "", STREAMS_NS, STREAM_ERRORS_NS, "jabber:client", "jabber:server",
                                  "jabber:component:accept",
                                  "http://jabberd.jabberstudio.org/ns/component/1.0"}
_KNOWN_LIMIT = 1024

#: lxml is asked only about names this short, this many times in the
#: process's life (module docstring): 256 x 512 characters of its dictionary.
_LXML_NAME_LIMIT = 512
_LXML_CONSULT_LIMIT = 256
_lxml_consulted = 0


def uri_refused(uri: Optional[str]) -> bool:
    """Whether lxml would refuse ``uri`` as a namespace name (remembered when not).

    The two reserved names (the ``xml`` namespace, the ``xmlns`` one) are
    URIs, so not refused here, although libxml2 refuses binding them as a
    default namespace: expat refuses every such binding first, and takes
    only ``xmlns:xml`` with the ``xml`` namespace, which libxml2 takes too.
    """
    global _lxml_consulted
    name = uri or ""
    if not is_uri_reference(name):
        try:
            from lxml import etree
        except ImportError:
            return False        # nothing will be parsed by lxml: nothing to refuse
        if len(name) > _LXML_NAME_LIMIT or _lxml_consulted >= _LXML_CONSULT_LIMIT:
            return True
        _lxml_consulted += 1
        try:
            etree.fromstring(f"<a xmlns={quoteattr(name)}/>".encode(), lxml_parser())
        except etree.XMLSyntaxError:
            return True
    # ASCII too (a byte a character): lxml takes anything between brackets
    # ('http://[\u263a]/'), and 4 bytes a character would pass the 1 MiB.
    if len(name) <= _LXML_NAME_LIMIT and name.isascii() and len(KNOWN_URIS) < _KNOWN_LIMIT:
        KNOWN_URIS.add(uri)
    return False
