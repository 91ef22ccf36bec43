"""Sans-IO XML stream reader and the few writer helpers every session needs.

Theory of operation
-------------------
A component connection is one long XML document: a ``<stream:stream>`` header,
then top-level elements (stanzas), then ``</stream:stream>``. ``StreamReader``
takes bytes as they arrive and returns events:

* ``StreamOpen``  - the header, with its attributes and namespace declarations;
* ``Element``     - one complete top-level element, with its *raw bytes*;
* ``StreamClose`` - the peer's ``</stream:stream>``.

Routing is the router's whole job, so an element is not turned into a tree:
expat (with namespace processing, so unbound prefixes are errors as in
jabberd2) checks well-formedness, and a framer (``framing.py``: in C on
CPython, with pyexpat on PyPy) reports where each top-level element starts
and ends, and the element keeps the exact bytes it arrived in. The
router forwards those bytes unchanged, inserts an attribute by splicing, and
asks for an lxml tree (``Element.tree()``) only on cold paths such as
``<bind/>``. For each top-level element the reader keeps its attributes and
those of its first child, which is all that routing, hashing and filtering
look at.

Byte positions are the framer's, counted from the start of its parser; the
reader keeps the bytes from the first unfinished element on and cuts each
element out of them. The end of a start tag is found with a quote-aware
regular expression (an attribute value may contain ``>``).

Hardening: a DOCTYPE is refused before expat can read any declaration, so no
entity is ever defined or expanded, and nothing is fetched. A top-level
element (or the header, or junk between elements) larger than
``max_element_size`` ends the stream with ``policy-violation``, and so does
one nested deeper than ``MAX_DEPTH`` levels. A stream is read as UTF-8 only
(RFC 6120 section 11.6): one that declares another encoding, or is UTF-16,
ends with ``unsupported-encoding``.

The same limits on every parse path: whatever this reader accepts, lxml can
parse later, on its own (``Element.tree()``) or wrapped once more by the
router (an XEP-0114 stanza inside a ``<route/>``). lxml refuses more than 256
levels, and without ``huge_tree`` names over 50,000 characters and text over
10 MB; ``MAX_DEPTH`` is well under the first, our lxml parser lifts the
others (safe here: no DTD, no entity, and the size is ours to bound), and the
rare element over ``_PARSEABLE_SIZE`` (only when ``max_element_size`` allows
one) is parsed once on arrival so that it fails here, as a stream error.
libxml2 also wants every namespace name to be an RFC 3986 URI, where expat
takes any string: each new one is shown to lxml once (``lxml_side.py``).

Memory stays with the stanza: the reader keeps no stanza's attributes
after handing it over, and expat's tables of every name it has seen (which
only grow) go with a fresh parser every ``RENEW_AFTER`` bytes (``_renew``).

This module must not know about routing, SASL, sockets or the clock.
"""

from __future__ import annotations

import re
import weakref
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Union

from mypy_extensions import mypyc_attr

from jrouter.errors import ProtocolError
from jrouter.wire import framing
from jrouter.wire.framing import START_TAG as _START_TAG
from jrouter.wire.framing import Frame, FramerFactory
from jrouter.wire.lxml_side import KNOWN_URIS, lxml_parser, uri_refused
from jrouter.wire.xmlwrite import STREAM_PREFIXES, STREAMS_NS, quoteattr

if TYPE_CHECKING:
    from lxml import etree


#: The deepest nesting a top-level element may have, itself counted as level
#: 1 (``<message><body/></message>`` has 2). Deeper ends the stream with
#: ``policy-violation``. lxml refuses more than 256 levels; the router's
#: ``<route/>`` around an XEP-0114 stanza and ``NamespaceContext``'s wrapper
#: add two, so anything accepted here parses. Real stanzas rarely pass 10.
MAX_DEPTH = 128

#: Elements larger than this are parsed with lxml as they arrive (see the
#: module docstring): below it no name or text can reach lxml's limits.
_PARSEABLE_SIZE = 10_000_000


#: The bytes that end a tag name: XML's white space, '/' and '>'.
_NAME_ENDS = frozenset(b" \t\r\n/>")

#: A wrapper start tag longer than this is cut to what each element needs
#: (``NamespaceContext._opening_for``); real headers stay far below it.
_LONG_OPENING = 1024
# A default namespace declaration in a start tag (XML 1.0 [25] Eq allows spaces).
_OWN_DEFAULT = re.compile(rb"\sxmlns\s*=")
_QUOTED = re.compile(rb"'[^']*'|\"[^\"]*\"")

# Only ever applied where expat has just accepted a start tag, so it always
# matches: the type says so (a plain assignment, which mypyc compiles too).
_match_tag: Callable[..., re.Match[bytes]] = _START_TAG.match  # type: ignore[assignment]

#: What ``StreamReader.feed`` returns.
StreamEvent = Union["StreamOpen", "Element", "StreamClose"]


class StreamError(ProtocolError):
    """A fatal problem with what the peer sent: answered by a stream error.

    ``condition`` is an RFC 6120 stream error condition; ``text`` is the
    optional human-readable explanation sent in ``<text/>``.
    """

    def __init__(self, condition: str, text: Optional[str] = None) -> None:
        super().__init__(f"{condition}: {text}" if text else condition)
        self.condition = condition
        self.text = text
        self.events: list[StreamEvent] = []   # what the reader completed before the error


class StreamOpen:
    """The peer's stream header.

    ``name`` is the expanded name (``"uri local"`` or ``"local"``), ``attrs``
    the non-namespace attributes, ``default_ns`` the default namespace
    declared on it (or None) and ``prefixes`` the other declarations.
    """

    __slots__ = ("name", "attrs", "default_ns", "prefixes")

    def __init__(self, name: str, attrs: dict[str, str], default_ns: Optional[str],
                 prefixes: dict[str, str]) -> None:
        self.name = name
        self.attrs = attrs
        self.default_ns = default_ns
        self.prefixes = prefixes

    def __repr__(self) -> str:
        return f"StreamOpen({self.name!r}, {self.attrs!r}, default_ns={self.default_ns!r})"


class StreamClose:
    """The peer closed its stream with ``</stream:stream>``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "StreamClose()"


@mypyc_attr(native_class=False)
class NamespaceContext:
    """The namespace declarations in force at the top level of one stream.

    Shared by every element of the stream: it is what ``Element.tree()``
    needs to parse a raw element on its own. Never changed once made, so
    streams whose headers declare the same, in the same order, share one
    (``shared``): ~0.5 KiB less per connection. Shared by weak reference,
    which mypyc's native classes do not take: so compiled, this one stays
    a Python class (docs/architecture.md, compiled).
    """

    __slots__ = ("default_ns", "prefixes", "declarations", "opening", "__weakref__")

    @classmethod
    def shared(cls, default_ns: Optional[str], prefixes: Mapping[str, str]) -> NamespaceContext:
        """The context of these declarations that live streams already
        share, or a new one. It lives as long as an element or a stream
        holds it: what peers declare is not kept after them."""
        key = (default_ns, tuple(prefixes.items()))
        context = _CONTEXTS.get(key)
        if context is None:
            context = _CONTEXTS[key] = cls(default_ns, prefixes)
        return context

    def __init__(self, default_ns: Optional[str], prefixes: Mapping[str, str]) -> None:
        self.default_ns = default_ns
        self.prefixes = dict(prefixes)
        decls = "".join(f" xmlns:{p}={quoteattr(u)}" for p, u in self.prefixes.items())
        if default_ns:
            decls += f" xmlns={quoteattr(default_ns)}"
        #: Their declarations as attributes, and a start tag with them all:
        #: what an element's bytes need before them.
        self.declarations = decls.encode()
        self.opening = b"<w" + self.declarations + b">"

    def parse(self, raw: bytes) -> etree._Element:
        """Parse one top-level element's bytes into an lxml element."""
        from lxml import etree

        opening = self.opening
        if len(opening) > _LONG_OPENING:
            opening = self._opening_for(raw)
        wrapper = etree.fromstring(opening + raw + b"</w>", lxml_parser())
        return wrapper[0]

    def _opening_for(self, raw: bytes) -> bytes:
        """Only the declarations ``raw`` may need. libxml2 keeps every
        namespace name it parses for the process's life: a header declaring
        long names nothing uses (an unauthenticated peer's, say) must not
        leave them there with every SASL element parsed. A prefix is needed
        if ``raw`` has ``prefix:`` anywhere; the default namespace unless the
        element declares its own (its descendants then inherit that one)."""
        decls = [f" xmlns:{p}={quoteattr(u)}" for p, u in self.prefixes.items()
                 if p.encode() + b":" in raw]
        start_tag = _QUOTED.sub(b"", _match_tag(raw).group(0))
        if self.default_ns and not _OWN_DEFAULT.search(start_tag):
            decls.append(f" xmlns={quoteattr(self.default_ns)}")
        return ("<w" + "".join(decls) + ">").encode()




class Element:
    """One complete top-level element, as raw bytes plus what routing needs.

    ``name``: expanded name (``"uri local"``, or ``"local"`` without a
    namespace); ``attrs``: its attributes (namespaced ones keyed ``"uri
    local"``); ``raw``: its exact bytes; ``child_name`` / ``child_attrs``:
    its first child element, or None. ``context``: the stream's
    NamespaceContext (what unprefixed names and stream-level prefixes in
    ``raw`` mean). ``end``: absolute stream offset just after the element.

    The offset of the end of the tag name inside ``raw`` (``name_end``) is
    worked out on demand: forwarding a packet does not need it.
    """

    __slots__ = ("name", "attrs", "raw", "child_name", "child_attrs", "child_start",
                 "child_mark", "context", "end", "_tree", "_name_end")

    def __init__(self, name: str, attrs: dict[str, str], raw: bytes, child_name: Optional[str],
                 child_attrs: Optional[dict[str, str]], child_start: int, child_mark: int,
                 context: NamespaceContext, end: int) -> None:
        self.name = name
        self.attrs = attrs
        self.raw = raw
        self.child_name = child_name
        self.child_attrs = child_attrs
        # Where the first child starts, and where expat reported its end:
        # enough to cut it out on demand (first_child()).
        self.child_start = child_start
        self.child_mark = child_mark
        self.context = context
        self.end: Optional[int] = end  # None only for routes the router built (accept.WrappedRoute)
        self._tree: Optional[etree._Element] = None
        self._name_end: Optional[int] = None

    @property
    def name_end(self) -> int:
        """Offset just after the tag name: where an attribute can be spliced in.
        A scan to the first byte that ends a name (expat accepted the tag, so
        there is one): a regular expression cost ~1 us here, on every
        XEP-0114 stanza (accept.AcceptPort._wrap)."""
        end = self._name_end
        if end is None:
            raw = self.raw
            end = 2                         # '<' and a name of one byte at least
            while raw[end] not in _NAME_ENDS:
                end += 1
            self._name_end = end
        return end

    @property
    def local_name(self) -> str:
        return self.name.rpartition(" ")[2]

    @property
    def namespace(self) -> Optional[str]:
        ns, sep, _ = self.name.rpartition(" ")
        return ns if sep else None

    def first_child(self) -> bytes:
        """The bytes of the first child element, or b'' when there is none."""
        if self.child_name is None:
            return b""
        raw = self.raw
        match = _match_tag(raw, self.child_start)
        if raw[match.end() - 2] == 0x2F:     # an empty element: its start tag is all of it
            return raw[self.child_start:match.end()]
        return raw[self.child_start:raw.index(b">", self.child_mark) + 1]

    def tree(self) -> etree._Element:
        """The element as an lxml tree (parsed once, on demand)."""
        if self._tree is None:
            self._tree = self.context.parse(self.raw)
        return self._tree

    def with_attribute(self, name: str, value: str) -> bytes:
        """The raw bytes with ``name='value'`` added first (jabberd2 puts added
        attributes first too). The attribute must not be present already."""
        raw = self.raw
        cut = self.name_end
        return b"".join((raw[:cut], b" ", name.encode(), b"=", quoteattr(value).encode(), raw[cut:]))

    def __repr__(self) -> str:
        return f"Element({self.raw[:80]!r})"


#: The contexts live streams share (``NamespaceContext.shared``), by their declarations.
_CONTEXTS: weakref.WeakValueDictionary[tuple[Optional[str], tuple[tuple[str, str], ...]],
                                       NamespaceContext] = weakref.WeakValueDictionary()
#: Stream root names (b"stream:stream"), one object each; a few at most.
_ROOT_NAMES: dict[bytes, bytes] = {}

#: Bytes a stream reader's framer reads before it is renewed (``_renew``).
RENEW_AFTER = 1 << 18


class StreamReader:
    """Incremental parser for one XML stream: ``feed(bytes) -> [events]``.

    Raises ``StreamError`` for anything that must end the stream; its
    ``events`` are those completed before the error. After a stream restart
    (STARTTLS, SASL) call ``restart(offset)``.

    ``max_element_size`` (bytes, 0 = unlimited) may be changed at any time
    (a peer that authenticates gets a larger one); ``max_depth`` is
    ``MAX_DEPTH`` and ``framer`` is ``framing.FRAMER`` unless a test asks
    for another.
    """

    def __init__(self, max_element_size: int = 0, max_depth: int = MAX_DEPTH,
                 renew_after: int = RENEW_AFTER, framer: Optional[FramerFactory] = None) -> None:
        self.max_element_size = max_element_size
        self.max_depth = max_depth
        self.renew_after = renew_after
        self._make_framer: FramerFactory = framer if framer is not None else framing.FRAMER
        self._framer: Any = None
        self._new_parser()

    @property
    def max_element_size(self) -> int:
        return self._limit

    @max_element_size.setter
    def max_element_size(self, limit: int) -> None:
        self._limit = limit
        # _events compares each element's size with this one number.
        self._check_above = limit if 0 < limit < _PARSEABLE_SIZE else _PARSEABLE_SIZE

    def _framer_for_stream(self) -> Any:
        return self._make_framer(self.max_depth, KNOWN_URIS, uri_refused, StreamError)

    def _new_parser(self) -> None:
        self._drop_parser()
        self._framer = self._framer_for_stream()
        self._parsed = 0        # bytes fed to this framer
        self._buffer = b""
        self._base = 0          # absolute offset of _buffer[0]
        self._keep_from = 0     # absolute offset where unconsumed bytes begin
        # None until the header is read (_open); every element comes after it.
        self.context: NamespaceContext = None  # type: ignore[assignment]

    def release(self) -> None:
        """The stream is over: let go of the framer and what was read
        (docs/architecture.md, memory). ``feed`` must not be called again."""
        self._drop_parser()
        self._buffer = b""
        self.context = None  # type: ignore[assignment]

    def rest(self) -> bool:
        """The stream is idle: let its framer go (~12 KiB each) until bytes
        come again, when ``feed`` renews it (``_renew``) as it does every
        ``renew_after`` bytes. Only between top-level elements (what follows
        the last one, a keepalive space or the start of a tag, is read again
        by the new framer); True if it let go."""
        if self._framer is None or self._framer.depth != 1:
            return False
        self._drop_parser()
        self._buffer = self._buffer[self._keep_from - self._base:]
        self._base = self._keep_from
        self._parsed = self.renew_after + 1      # the next feed renews
        return True

    def _drop_parser(self) -> None:
        framer = self._framer
        if framer is not None:
            framer.close()
        self._framer = None     # feed renews it before any use

    # -- public API --------------------------------------------------------

    def feed(self, data: bytes) -> list[StreamEvent]:
        """Parse ``data``; return the events it completed."""
        # Keep only what an unfinished element still needs, usually nothing:
        # then the buffer is the chunk itself, and elements are cut from it
        # with one copy.
        self._parsed += len(data)
        if self._parsed > self.renew_after and (self._framer is None or self._framer.depth):
            data = self._renew(data)
        old = self._buffer
        keep = self._keep_from - self._base
        self._base = self._keep_from
        self._buffer = buffer = data if keep >= len(old) else old[keep:] + data
        # No NUL is ever UTF-8 XML: one beside the first '<' of a stream
        # means UTF-16, which expat detects on its own even when told UTF-8.
        # Refused before any byte is framed: offsets would not be bytes.
        if self.context is None and b"\x00" in buffer[:buffer.find(b"<") + 2]:
            raise StreamError("unsupported-encoding", "only UTF-8 is supported")
        frames: list[Frame] = []
        failure: Optional[StreamError] = None
        try:
            self._framer.parse(data, buffer, self._base, frames)
        except StreamError as exc:
            failure = exc
        # What came before the failure first: an element in it may fail first.
        events = self._events(frames)
        if failure is None:
            limit = self._limit
            if limit and self._base + len(buffer) - self._keep_from > limit:
                failure = _too_large(limit)
            else:
                return events
        failure.events = events
        raise failure

    def _events(self, frames: list[Frame]) -> list[StreamEvent]:
        """The events of the framer's frames (framing.py), in order."""
        events: list[StreamEvent] = []
        context = self.context
        try:
            for frame in frames:
                if frame is None:
                    events.append(StreamClose())
                elif context is None:
                    events.append(self._open(frame))
                    context = self.context
                else:
                    start, end, name, attrs, child_name, child_attrs, child_start, child_mark = frame
                    if end - start > self._check_above:
                        self._check_large(start, end)
                    base = self._base
                    events.append(Element(name, attrs, self._buffer[start - base:end - base], child_name,
                                          child_attrs, child_start, child_mark, context, end))
                    self._keep_from = end
        except StreamError as exc:
            exc.events = events
            raise
        return events

    def _check_large(self, start: int, end: int) -> None:
        """An element over the size limit, or so large (the limit allows it)
        that a name or text in it may pass lxml's limits: it is parsed now, so
        that it fails here, and not where the router asks for its tree."""
        limit = self._limit
        if limit and end - start > limit:
            raise _too_large(limit)
        from lxml import etree

        try:
            self.context.parse(self._buffer[start - self._base:end - self._base])
        except etree.XMLSyntaxError as exc:
            raise StreamError("policy-violation", f"stanza beyond the XML parser's limits ({exc})") from None

    def _open(self, header: tuple[Any, ...]) -> StreamOpen:
        name, attrs, declarations, start = header
        default_ns: Optional[str] = None
        prefixes: dict[str, str] = {}
        for prefix, uri in declarations:
            if prefix is None:
                default_ns = uri
            else:
                prefixes[prefix] = uri or ""    # never None: expat refuses xmlns:p=''
        context = self.context = NamespaceContext.shared(default_ns, prefixes)
        tag = _match_tag(self._buffer, start - self._base)
        self._keep_from = self._base + tag.end()
        root = tag.group(1)                 # _renew reopens the stream with it
        self._root_name = _ROOT_NAMES.setdefault(root, root) if len(_ROOT_NAMES) < 16 else root
        # The shared context's strings: the header's own copies go with the event.
        return StreamOpen(name, attrs, context.default_ns, dict(context.prefixes))

    def _renew(self, data: bytes) -> bytes:
        """A new framer in the middle of the stream; returns what to feed
        it. expat remembers every attribute and element name it has seen
        until the parser goes (its DTD tables): a peer sending names it
        never repeats would grow them by ~9 MiB per MiB. So every
        ``renew_after`` bytes the reader starts a framer afresh: the
        header's declarations again (the context's wrapper), then the
        unfinished element's bytes read again, so no event changes. Offsets
        from here on are the new framer's, as after ``restart``."""
        pending = self._buffer[self._keep_from - self._base:]
        self._drop_parser()
        framer = self._framer_for_stream()
        # The root's own name, so that </stream:stream> still closes it; its
        # frame is the header again, not an event.
        opening = b"<" + self._root_name + self.context.declarations + b">"
        framer.parse(opening, opening, 0, [])
        self._framer = framer
        self._parsed = len(data)
        self._buffer = b""
        self._base = self._keep_from = len(opening)
        return pending + data

    def restart(self, offset: int) -> bytes:
        """Start a new stream after the element that ended at ``offset``.

        Returns the bytes the peer sent after that element (normally none:
        a peer waits for ``<success/>`` or ``<proceed/>``); they belong to the
        new stream, or, after STARTTLS, to the TLS handshake.
        """
        leftover = self._buffer[max(0, offset - self._base):]
        self._new_parser()
        return leftover


def _too_large(limit: int) -> StreamError:
    return StreamError("policy-violation", f"stanza too large (limit {limit} bytes)")


# The context of elements the router built itself: they declare every
# namespace they use, so their bytes mean the same in any stream.
SELF_CONTAINED = NamespaceContext(None, dict(STREAM_PREFIXES))


def standalone_element(raw: bytes) -> Element:
    """An ``Element`` for the bytes of one element that declares every
    namespace it uses (what lxml serialises), read outside any stream: the
    router builds such a packet when it must change one (a filter redirect)."""
    reader = StreamReader()
    reader.feed(b"<s:stream xmlns:s='%s'>" % STREAMS_NS.encode())
    (element,) = reader.feed(raw)
    assert isinstance(element, Element)
    element.context = SELF_CONTAINED
    return element
