"""router-filter.xml: reading the file into rules (protocol §2.5).

Owns: loading the filter file as jabberd2's ``filter_load`` does (which
rules load, what a missing, empty or malformed file means, the log lines),
and reading each ``<rule>``'s attributes, corners included (see
``routing/filter.py`` for what a loaded rule then does).

Must not know: routing, connections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lxml import etree

from jrouter.config.xmlfile import XMLProblem, parse_xml
from jrouter.errors import ConfigurationError
from jrouter.routing.filter import STANZA_ERRORS, FilterRules, Rule, _children


class FilterError(ConfigurationError):
    """The filter file exists but cannot be used; jabberd2 logs ``str(self)`` and exits 1."""

    def __init__(self, message: str, level: str = "error") -> None:
        super().__init__(message)
        self.level = level


def condition_for(value: str) -> str:
    """The stanza-error condition an ``error`` attribute selects (prefix lookup, protocol §2.5)."""
    for name, _code in STANZA_ERRORS:
        if name is not None and name.startswith(value):
            return name
    return "not-allowed"


# ---------------------------------------------------------------------------
# Loading.


@dataclass(frozen=True)
class FilterResult:
    """Loaded rules plus the log lines (level, text) jabberd2 would have written."""

    rules: FilterRules
    messages: list[tuple[str, str]]


def _attr(el: etree._Element, name: str) -> Optional[str]:
    # nad_find_attr matches the attribute's local name, whatever its namespace.
    for key, value in el.attrib.items():
        if etree.QName(key).localname == name:
            return value
    return None


def _rule(el: etree._Element) -> Rule:
    def nonempty(name: str) -> Optional[str]:
        return _attr(el, name) or None

    what = nonempty("what")
    error = _attr(el, "error")
    log = _attr(el, "log")
    return Rule(
        sender=nonempty("from"),
        to=nonempty("to"),
        what=None if what == "*" else what,
        redirect=nonempty("redirect"),
        error=None if error is None else condition_for(error),
        log=log is not None and ("yes".startswith(log.lower()) or "on".startswith(log.lower())),
        dump=nonempty("dump"),
        line=el.sourceline or 0,
    )


def load_filter(path: str) -> FilterResult:
    """Read router-filter.xml as ``filter_load`` does.

    A file that cannot be opened is not fatal: no rules and a notice.  An
    empty, unreadable or malformed file raises ``FilterError`` carrying
    jabberd2's log line (the router then exits 1).
    """
    try:
        handle = open(path, "rb")
    except OSError as exc:
        return FilterResult(FilterRules(), [("notice", f"couldn't open filter file {path}: {exc.strerror}")])
    try:
        with handle:
            data = handle.read()
    except OSError as exc:
        raise FilterError(f"couldn't read from filter file: {exc.strerror}") from None
    if not data:
        raise FilterError(f"empty filter file {path}", "notice")
    try:
        root = parse_xml(data)
    except XMLProblem:
        raise FilterError("couldn't parse filter file") from None
    rules = tuple(_rule(el) for el in _children(root, "rule"))
    return FilterResult(FilterRules(rules), [("notice", f"loaded filters ({len(rules)} rules)")])
