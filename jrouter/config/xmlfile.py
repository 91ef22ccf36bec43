"""Hardened XML for every configuration file: no DTD, no entities, no network.

Owns: parsing a whole file (``parse_xml``), the text of an element as
jabberd2's expat reads it (``element_text``), and element names as its
config reader writes them.  Must not know: what any element means.
"""

from __future__ import annotations

from lxml import etree

from jrouter.errors import ConfigurationError


class XMLProblem(ConfigurationError):
    """A file is not well-formed XML (or uses a DOCTYPE, which we refuse)."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


def parse_xml(data: bytes) -> etree._Element:
    """Parse a whole document without DTDs, entity expansion or network access."""
    parser = etree.XMLParser(
        resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False, remove_comments=False
    )
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        log = parser.error_log  # exc.error_log also holds errors of earlier parses
        errors = [e for e in log if e.level >= etree.ErrorLevels.ERROR] or list(log)
        if errors:
            raise XMLProblem(errors[0].line, errors[0].message) from None
        raise XMLProblem(exc.lineno or 0, str(exc)) from None
    if root.getroottree().docinfo.doctype:
        # expat would expand internal entities (config_load) or stop at their
        # declaration (nad_parse); a DOCTYPE has no use here, so refuse it.
        line = data[: max(data.find(b"<!DOCTYPE"), 0)].count(b"\n") + 1
        raise XMLProblem(line, "DOCTYPE declarations are not allowed")
    return root


def element_text(el: etree._Element) -> str:
    """The text expat gives jabberd2 for ``el``: all text before its first child element."""
    parts = [el.text or ""]
    for child in el:
        if isinstance(child.tag, str):
            break
        parts.append(child.tail or "")  # a comment or PI splits the text, expat joins it
    return "".join(parts)


def xml_name(el: etree._Element) -> str:
    # config_load's expat does no namespace processing: keys use the name as written.
    local = etree.QName(el).localname
    return f"{el.prefix}:{local}" if el.prefix else local


def children(el: etree._Element, name: str) -> list[etree._Element]:
    return [c for c in el.iterchildren(etree.Element) if xml_name(c) == name]


