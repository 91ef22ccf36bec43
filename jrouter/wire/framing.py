"""Framers: expat's reading of one XML stream, as frames for ``xmlstream``.

A framer owns one expat parser and turns the bytes it is given into
*frames*, appended to a list in stream order:

* the header: ``(name, attrs, declarations, start)``, with the root's
  expanded name, its attributes, its namespace declarations as
  ``[(prefix, uri)]`` (None for the default namespace, and for the URI of
  ``xmlns=''``) and the offset of its ``<``;
* a top-level element: ``(start, end, name, attrs, child_name,
  child_attrs, child_start, child_mark)``: where it starts and ends, its
  expanded name and attributes, those of its first child (or None), where
  that child starts and where expat reported its end, relative to
  ``start`` (0 when there is none);
* ``None``: the root's end tag.

Offsets count the bytes given to this framer. A framer refuses what the
stream must not carry with ``error(condition, text)`` (``StreamError``):
anything expat refuses, a DOCTYPE or entity declaration, an encoding other
than UTF-8, an element deeper than ``max_depth`` levels, a namespace name
that lxml would refuse (``refused``, remembered in ``known``). The frames
completed before the error stay in the list.

Two framers make the same frames from the same bytes (tests/unit run every
reader test on both):

* ``_expatframe.Framer``, in C (``_expatframe.c``): Python objects only for
  what the frames hold. setup.py builds it for CPython;
* ``ExpatFramer``, with pyexpat's Python callbacks for every element: the
  one on PyPy (where a C extension runs through a slow emulation), and
  wherever the C one was not built.

``FRAMER`` is the best one here. Must not know: routing, sockets, the
clock, or what ``xmlstream`` makes of the frames.
"""

from __future__ import annotations

import pyexpat
import re
from typing import Any, Callable, Optional

#: One frame (see the module docstring); a tuple, or None.
Frame = Optional[tuple[Any, ...]]

#: What makes a framer: ``(max_depth, known, refused, error)``.
FramerFactory = Callable[[int, "set[Optional[str]]", Callable[[Optional[str]], bool],
                          Callable[[str, str], Exception]], Any]

#: The start tag of an element that expat has already accepted: the name,
#: then anything up to '>' that is not inside a quoted attribute value.
START_TAG = re.compile(rb"<([^\s/>]+)[^'\">]*(?:(?:'[^']*'|\"[^\"]*\")[^'\">]*)*>")

#: Every handler ``ExpatFramer`` sets (``close`` unsets them).
_HANDLERS = ("XmlDeclHandler", "StartDoctypeDeclHandler", "EntityDeclHandler",
             "StartNamespaceDeclHandler", "StartElementHandler", "EndElementHandler")


class ExpatFramer:
    """Frames read by pyexpat, whose handlers are these methods.

    pyexpat does not tell where an end tag ends, so ``parse`` is also given
    the reader's buffer (the bytes from absolute offset ``base``, ``data``
    their tail) to find it in.
    """

    def __init__(self, max_depth: int, known: set[Optional[str]],
                 refused: Callable[[Optional[str]], bool], error: Callable[[str, str], Exception]) -> None:
        self.max_depth = max_depth
        self._known = known
        self._refused = refused
        self._error = error
        # Always UTF-8, whatever the XML declaration says (xmlstream's
        # docstring). No name interning: the table would keep every name
        # the peer ever sent.
        parser = pyexpat.ParserCreate(encoding="UTF-8", namespace_separator=" ", intern=None)
        parser.SetParamEntityParsing(pyexpat.XML_PARAM_ENTITY_PARSING_NEVER)
        parser.XmlDeclHandler = self._refuse_encoding
        parser.StartDoctypeDeclHandler = self._refuse_doctype
        parser.EntityDeclHandler = self._refuse_entity
        parser.StartNamespaceDeclHandler = self._header_namespace
        parser.StartElementHandler = self._start
        parser.EndElementHandler = self._end
        self._parser = parser
        self.depth = 0
        self._frames: list[Frame] = []
        self._buffer = b""
        self._base = 0
        self._declarations: list[tuple[Optional[str], Optional[str]]] = []
        self._top_start = 0
        self._top_name: Optional[str] = None
        self._top_attrs: Optional[dict[str, str]] = None
        self._child_name: Optional[str] = None
        self._child_attrs: Optional[dict[str, str]] = None
        self._child_start = 0
        self._child_mark: Optional[int] = None

    def parse(self, data: bytes, buffer: bytes, base: int, frames: list[Frame]) -> None:
        self._frames = frames
        self._buffer = buffer
        self._base = base
        try:
            self._parser.Parse(data)
        except pyexpat.ExpatError as exc:
            raise self._error("xml-not-well-formed", pyexpat.ErrorString(exc.code)) from None
        finally:
            self._frames = []
            self._buffer = b""

    def close(self) -> None:
        """Unset the handlers: they are this framer's methods, a cycle that
        only the garbage collector would otherwise break, long after the
        connection (docs/architecture.md, memory)."""
        for handler in _HANDLERS:
            setattr(self._parser, handler, None)

    # -- expat callbacks ---------------------------------------------------

    def _refuse_encoding(self, version: str, encoding: Optional[str], standalone: int) -> None:
        if encoding is not None and encoding.upper() not in ("UTF-8", "UTF8"):
            raise self._error("unsupported-encoding", "only UTF-8 is supported")

    def _refuse_doctype(self, *args: object) -> None:
        raise self._error("restricted-xml", "DTDs are not allowed")

    def _refuse_entity(self, *args: object) -> None:
        raise self._error("restricted-xml", "entity declarations are not allowed")

    def _header_namespace(self, prefix: Optional[str], uri: Optional[str]) -> None:
        self._vet(prefix, uri)
        self._declarations.append((prefix, uri))

    def _vet(self, prefix: Optional[str], uri: Optional[str]) -> None:
        if uri not in self._known and self._refused(uri):
            raise self._error("xml-not-well-formed", "namespace name is not a URI")

    # These run for every element (and declaration) of every stanza: keep them lean.

    def _start(self, name: str, attrs: dict[str, str]) -> None:
        depth = self.depth
        self.depth = depth + 1
        if depth == 1:
            self._top_start = self._parser.CurrentByteIndex
            self._top_name = name
            self._top_attrs = attrs
        elif depth == 2:
            if self._child_name is None:
                self._child_name = name
                self._child_attrs = attrs
                self._child_start = self._parser.CurrentByteIndex
        elif depth == 0:
            # Later declarations belong to stanzas, not to the stream context.
            self._parser.StartNamespaceDeclHandler = self._vet
            self._frames.append((name, attrs, self._declarations, self._parser.CurrentByteIndex))
            self._declarations = []
        elif depth > self.max_depth:        # depth is the new element's level
            raise self._error("policy-violation", f"stanza nested too deeply (limit {self.max_depth} levels)")

    def _end(self, name: str) -> None:
        depth = self.depth - 1
        self.depth = depth
        if depth == 1:
            start = self._top_start
            child_name = self._child_name
            if child_name is not None:      # expat points at its end tag
                end = self._tag_end(self._parser.CurrentByteIndex)
            else:
                end = self._childless_end(start)
            mark = self._child_mark
            self._frames.append((start, end, self._top_name, self._top_attrs, child_name, self._child_attrs,
                                 self._child_start - start if child_name is not None else 0,
                                 0 if mark is None else mark - start))
            # The frame has them now: a stanza's attributes are not kept here.
            self._child_name = self._child_mark = self._child_attrs = None
            self._top_attrs = None
        elif depth == 2:
            if self._child_mark is None:
                self._child_mark = self._parser.CurrentByteIndex
        elif depth == 0:
            self._frames.append(None)

    def _tag_end(self, offset: int) -> int:
        """Just after the '>' of the end tag at ``offset``."""
        base = self._base
        return self._buffer.index(b">", offset - base) + 1 + base

    def _childless_end(self, start: int) -> int:
        """Where an element without child elements ends: its start tag, if
        that is empty (``/>``), else its end tag, where expat points (for an
        empty element expat points just after it, which could be anything)."""
        base = self._base
        tag = START_TAG.match(self._buffer, start - base)
        assert tag is not None              # expat accepted this start tag
        if self._buffer[tag.end() - 2] == 0x2F:
            return tag.end() + base
        return self._tag_end(self._parser.CurrentByteIndex)


def _c_framer() -> Optional[FramerFactory]:
    try:
        from jrouter.wire import _expatframe  # type: ignore[attr-defined]
    except ImportError:
        return None
    framer: FramerFactory = _expatframe.Framer
    return framer


#: The framers by name: ``"expat"`` always, ``"c"`` where it was built.
FRAMERS: dict[str, FramerFactory] = {"expat": ExpatFramer}
_C = _c_framer()
if _C is not None:
    FRAMERS["c"] = _C

#: The one readers use: the C framer, except on PyPy or where it is missing.
FRAMER: FramerFactory = FRAMERS["c"] if _C is not None else ExpatFramer
