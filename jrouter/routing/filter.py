"""router-filter.xml's rules: matching a unicast route against them.

Owns the semantics of jabberd2's ``router/filter.c`` (protocol §2.5): how a
rule matches, and what the first matching rule decides.  It must not know
about connections or the route table, and it performs no I/O: the file is
read by ``config/filter_xml.py``, and appending a matched stanza to a
``dump`` file and writing the log line are left to the caller, which gets
both from the ``Verdict``.

Theory of operation
-------------------
``config.filter_xml.load_filter`` turns every ``<rule>`` child of the root
into an immutable ``Rule``.  ``FilterRules.match`` is then a pure function of the stanza's ``from``
and ``to`` attributes (resource stripped, no case folding), plus, only when
some candidate rule has a ``what`` path, the parsed ``<route>`` element, which
the caller supplies lazily because building it costs a parse.

A rule's outcome follows ``filter_load`` exactly, including its corners:

* ``error`` selects the first condition whose name *starts with* the value
  (so ``''`` is ``bad-request`` and ``re`` is ``recipient-unavailable``), or
  ``not-allowed`` when none does;
* ``redirect`` alone makes a redirect; ``error`` together with ``redirect``
  bounces with the error *after* rewriting the route's ``to`` (protocol §2.5);
* an ``error`` that selects the ``redirect`` condition is no error at all:
  jabberd2 treats the result as a redirect and, without a ``redirect``
  attribute, delivers the route unchanged (while logging "deny");
* ``log`` is on when its value is a case-insensitive prefix of ``YES`` or
  ``ON`` -- the empty string included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from lxml import etree


# util/stanza.c's _stanza_errors, in table order: (condition, legacy code).
# The nameless 401 entry (stanza_err_OLD_UNAUTH) can never be selected by name.
STANZA_ERRORS: tuple[tuple[Optional[str], int], ...] = (
    ("bad-request", 400),
    ("conflict", 409),
    ("feature-not-implemented", 501),
    ("forbidden", 403),
    ("gone", 302),
    ("internal-server-error", 500),
    ("item-not-found", 404),
    ("jid-malformed", 400),
    ("not-acceptable", 406),
    ("not-allowed", 405),
    ("payment-required", 402),
    ("recipient-unavailable", 404),
    ("redirect", 302),
    ("registration-required", 407),
    ("remote-server-not-found", 404),
    ("remote-server-timeout", 502),
    ("resource-constraint", 500),
    ("service-unavailable", 503),
    ("subscription-required", 407),
    ("undefined-condition", 500),
    ("unexpected-request", 400),
    (None, 401),
    ("unknown-sender", 400),
)
ERROR_CODES: dict[str, int] = {name: code for name, code in STANZA_ERRORS if name}

ALLOW, DENY, REDIRECT = "allow", "deny", "redirect"


# ---------------------------------------------------------------------------
# Wildcards: POSIX fnmatch(3) with flags 0, as filter_packet calls it.


_CLASSES = {
    "alnum": b"0-9A-Za-z", "alpha": b"A-Za-z", "blank": b" \\t", "cntrl": b"\\x00-\\x1f\\x7f",
    "digit": b"0-9", "graph": b"!-~", "lower": b"a-z", "print": b" -~",
    "punct": b"!-/:-@\\[-`{-~", "space": b" \\t\\n\\r\\x0b\\x0c", "upper": b"A-Z",
    "xdigit": b"0-9A-Fa-f",
}
_NEVER = re.compile(b"(?!)")


class _Never(Exception):
    """The pattern holds something glibc answers FNM_NOMATCH for, whatever the text."""


def compile_wildcard(pattern: str) -> "re.Pattern[bytes]":
    """Compile a shell wildcard into a regex over UTF-8 bytes, matching as glibc fnmatch(p, s, 0).

    Byte-wise, because jabberd2 never calls setlocale: ``?`` is one byte.
    ``*`` and ``?`` match ``/`` and a leading ``.``; ``\\`` quotes the next
    character; ``[...]`` takes ``!`` or ``^`` for negation, ranges,
    ``[:class:]``, ``[.c.]`` and ``[=c=]``; an unterminated ``[`` is literal.
    Patterns glibc can never match (trailing ``\\``, unknown class, a range
    running off the end) compile to a regex that matches nothing.

    Known limit: glibc reads the items *after* the one that matched with a
    second, different scanner; for garbage such as ``[x[=a.]`` or
    ``[a[:bogus:]]`` the two disagree and glibc's answer depends on the text
    (``x`` fails, ``a`` matches).  We give the first scanner's reading, or no
    match at all.  Well-formed patterns are checked against libc by a
    property test.
    """
    pat = pattern.encode("utf-8")
    out: list[bytes] = []
    i = 0
    try:
        while i < len(pat):
            c = pat[i:i + 1]
            i += 1
            if c == b"*":
                if not out or out[-1] != b".*":
                    out.append(b".*")
            elif c == b"?":
                out.append(b".")
            elif c == b"\\":
                if i == len(pat):
                    raise _Never  # a trailing backslash never matches
                out.append(re.escape(pat[i:i + 1]))
                i += 1
            elif c == b"[" and (bracket := _bracket(pat, i)) is not None:
                out.append(bracket[0])
                i = bracket[1]
            else:
                out.append(re.escape(c))
    except _Never:
        return _NEVER
    return re.compile(b"(?s:" + b"".join(out) + b")\\Z")


def _bracket(pat: bytes, i: int) -> Optional[tuple[bytes, int]]:
    """Parse a bracket expression whose ``[`` is just before ``i``.

    Returns (regex, index after ``]``), or None when the bracket is
    unterminated and so stands for a literal ``[``.  Raises ``_Never``.
    """
    negate = pat[i:i + 1] in (b"!", b"^")
    i += negate
    items: list[bytes] = []
    first = True
    while i < len(pat):
        if pat[i:i + 1] == b"]" and not first:
            if not items:  # only empty ranges such as [c-a]
                return (b"[\\x00-\\xff]" if negate else b"(?!)"), i + 1
            return b"[" + (b"^" if negate else b"") + b"".join(items) + b"]", i + 1
        first = False
        kind, value, i = _bracket_item(pat, i)
        if kind == "class":
            items.append(value)
            continue
        if kind == "char" and pat[i:i + 1] == b"-" and pat[i + 1:i + 2] != b"]":  # "-" at the end: a range to NUL
            high, i = _range_end(pat, i + 1)
            if value <= high:
                items.append(re.escape(value) + b"-" + re.escape(high))
            continue
        items.append(re.escape(value))
    return None  # unterminated: glibc goes back and compares a literal '['


def _bracket_item(pat: bytes, i: int) -> tuple[str, bytes, int]:
    """One bracket item at ``i``: ("char" | "equiv" | "class", regex-or-byte, next index)."""
    c, nxt = pat[i:i + 1], pat[i + 1:i + 2]
    if c == b"\\":
        if i + 1 >= len(pat):
            raise _Never
        return "char", nxt, i + 2
    if c == b"[" and nxt == b":":
        j = i + 2
        while j < len(pat) and pat[j:j + 2] != b":]":
            if not b"a" <= pat[j:j + 1] < b"z":  # glibc's test, which also refuses 'z'
                return "char", c, i + 1  # not a class name: a plain '['
            j += 1
        if j >= len(pat):
            return "char", c, i + 1
        name = pat[i + 2:j].decode("ascii")
        if name not in _CLASSES:
            raise _Never
        return "class", _CLASSES[name], j + 2
    if c == b"[" and nxt in (b".", b"="):
        # Collating symbol [.x.] or equivalence class [=x=]: in the C locale
        # only single characters exist, and only [.x.] may bound a range.
        # A malformed [. never matches; a malformed [= is a plain '['.
        if pat[i + 3:i + 5] == nxt + b"]":
            return ("char" if nxt == b"." else "equiv"), pat[i + 2:i + 3], i + 5
        if nxt == b".":
            raise _Never
    return "char", c, i + 1


def _range_end(pat: bytes, i: int) -> tuple[bytes, int]:
    c = pat[i:i + 1]
    if c == b"[" and pat[i + 1:i + 2] == b".":
        kind, value, i = _bracket_item(pat, i)
        return value, i
    if c == b"[" and pat[i + 1:i + 2] in (b":", b"="):
        # glibc's matcher reads this '[' as the range end but its skipper reads
        # a class: the two disagree on where the bracket ends.  Refuse it.
        raise _Never
    if c == b"\\":
        c = pat[i + 1:i + 2]
        i += 1
    if not c:
        raise _Never
    return c, i + 1


# ---------------------------------------------------------------------------
# The what path: util/nad.c's nad_find_elem_path, evaluated on lxml elements.


def _local(el: etree._Element) -> str:
    return etree.QName(el).localname


def _children(el: etree._Element, name: str) -> Iterator[etree._Element]:
    """Child elements called ``name`` (local name, any namespace); ``''`` means any name."""
    return (c for c in el.iterchildren(etree.Element) if not name or _local(c) == name)


def _has_attr(el: etree._Element, name: str, value: Optional[str]) -> bool:
    # nad_find_attr: attribute local name; an empty or absent value tests presence only.
    for key, val in el.attrib.items():
        if etree.QName(key).localname == name and (not value or val == value):
            return True
    return False


def _has_namespace(el: etree._Element, uri: Optional[str], top: etree._Element) -> bool:
    """nad_find_namespace: ``uri`` is the namespace of, or declared on, ``el`` or an ancestor up to ``top``."""
    if uri is None:
        return False
    node: Optional[etree._Element] = el
    while node is not None:
        parent = node.getparent()
        inherited = parent.nsmap if parent is not None else {}
        declared: set[Optional[str]] = {u for p, u in node.nsmap.items() if inherited.get(p) != u}
        declared.add(etree.QName(node).namespace)
        declared.update(etree.QName(k).namespace for k in node.attrib)
        if uri in declared:
            return True
        if node is top:
            break
        node = parent
    return False


def find_path(el: etree._Element, path: str, top: Optional[etree._Element] = None) -> Optional[etree._Element]:
    """A port of ``nad_find_elem_path(nad, el, -1, path)``: the element ``path`` selects, or None.

    The C code cuts the path in place with NUL bytes; ``_cstr`` reproduces that
    so odd paths (``a=b?c``, ``iq?type=get/query``) select what jabberd2 selects.
    """
    top = el if top is None else top
    if "/" not in path and "?" not in path and "!" not in path:
        return next(_children(el, path), None)
    slash, qmark, excl, equals = (path.find(ch) for ch in "/?!=")
    for mark, wanted in ((qmark, True), (excl, False)):
        if mark >= 0 and (slash < 0 or mark < slash):
            cuts = {mark} | ({equals} if equals >= 0 else set())
            name = _cstr(path, 0, cuts)
            attr = _cstr(path, mark + 1, cuts)
            value = _cstr(path, equals + 1, cuts) if equals >= 0 else None
            for child in _children(el, name):
                if attr == "xmlns":
                    found = _has_namespace(child, value, top)
                else:
                    found = _has_attr(child, attr, value)
                if found == wanted:
                    return child
            return None
    # Only the first child called ``name`` is searched: the C loop overwrites
    # its cursor with the failed recursion's -1 and stops.
    first = next(_children(el, path[:slash]), None)
    return None if first is None else find_path(first, path[slash + 1:], top)


def _cstr(s: str, start: int, cuts: set[int]) -> str:
    ends = [c for c in cuts if c >= start]
    return s[start:min(ends)] if ends else s[start:]


# ---------------------------------------------------------------------------
# Rules and verdicts.


def strip_resource(jid: Optional[str]) -> Optional[str]:
    """``filter_packet``'s resource strip: cut at the first ``/`` after ``@`` (or the first ``/``)."""
    if not jid:
        return None
    at = jid.find("@")
    cut = jid.find("/", at if at >= 0 else 0)
    return jid if cut < 0 else jid[:cut]


@dataclass(frozen=True)
class Rule:
    """One ``<rule/>``; empty attribute values are stored as None, as filter_load does."""

    sender: Optional[str] = None  # the ``from`` pattern
    to: Optional[str] = None
    what: Optional[str] = None  # None also for ``what='*'``
    redirect: Optional[str] = None
    error: Optional[str] = None  # condition name the ``error`` attribute selected
    log: bool = False
    dump: Optional[str] = None
    line: int = 0

    @property
    def code_name(self) -> Optional[str]:
        """jabberd2's ``acl->error``: the condition, ``redirect`` for a redirect rule, None to allow."""
        if self.error is not None:
            return self.error
        return "redirect" if self.redirect is not None else None


@dataclass(frozen=True)
class Verdict:
    """What the first matching rule decided for one route.

    ``action``: ``allow`` (deliver), ``deny`` (bounce the route with
    ``error=error_code``) or ``redirect`` (rewrite the route's ``to`` to ``redirect``
    and deliver).  A ``deny`` may also carry ``redirect``: rewrite the route's
    ``to`` first, then bounce (protocol §2.5).  ``log_line`` is the notice to log.
    ``dump`` is the file to append to: jabberd2 writes ``nad_print(nad, 1)``,
    the stanza (the route's first child, with its descendants, not the
    route), then a newline, before any redirect.  If the file cannot be
    opened it logs ``filter: cannot open dump file X: "reason", disabling
    dump for this rule.`` and stops dumping for ``rule_index``; the rules are
    immutable, so the caller keeps that state.
    """

    action: str
    error_code: Optional[int] = None  # legacy code of ``condition`` (protocol §4.5)
    condition: Optional[str] = None
    redirect: Optional[str] = None
    log_line: Optional[str] = None
    dump: Optional[str] = None
    rule_index: int = 0


def _n(value: Optional[str]) -> str:
    return "(null)" if value is None else value  # glibc's printf of NULL %s


#: Address pairs whose outcome ``FilterRules`` remembers; past it the memo
#: starts again (a busy server's pairs come and go: no eviction order pays).
MEMO_SIZE = 4096

#: What the rules decide for one (from, to) pair: the ``what`` paths to try
#: in order, each with its verdict, then the verdict if none matches.
Outcome = tuple[tuple[tuple[str, "Verdict"], ...], Optional["Verdict"]]


@dataclass(frozen=True)
class FilterRules:
    """The loaded rule list; empty means filtering is off (jabberd2 skips it).

    A rule's ``from`` and ``to`` depend only on the stanza's two addresses,
    so what they decide is worked out once per address pair and remembered
    (``_memo``): then a packet costs one dictionary look-up, plus the
    ``what`` paths of the rules its addresses reached, which depend on the
    packet itself and are matched every time."""

    rules: tuple[Rule, ...] = ()
    # Caches, not part of the value (set by __post_init__): pattern ->
    # compiled. A rule's pattern is looked up only when the stanza has that
    # attribute, and then the rule has the pattern, so never with None.
    _wildcards: dict[Optional[str], re.Pattern[bytes]] = field(init=False, repr=False, compare=False)
    _memo: dict[tuple[Optional[str], Optional[str]], Outcome] = field(init=False, repr=False,
                                                                      compare=False)

    def __post_init__(self) -> None:
        wildcards = {}
        for rule in self.rules:
            for pattern in (rule.sender, rule.to):
                if pattern is not None and pattern not in wildcards:
                    wildcards[pattern] = compile_wildcard(pattern)
        object.__setattr__(self, "_wildcards", wildcards)
        object.__setattr__(self, "_memo", {})

    def __len__(self) -> int:
        return len(self.rules)

    def match(
        self,
        stanza_from: Optional[str],
        stanza_to: Optional[str],
        route_tree_factory: Callable[[], etree._Element],
    ) -> Optional[Verdict]:
        """The verdict of the first rule matching this route, or None (allow, silently).

        ``stanza_from``/``stanza_to`` are the raw attributes of the route's first
        child (None if absent).  ``route_tree_factory()`` must return the
        ``<route>`` element; it is called at most once, and only if a rule
        with a ``what`` path is reached.
        """
        memo = self._memo
        outcome = memo.get((stanza_from, stanza_to))
        if outcome is None:
            if len(memo) >= MEMO_SIZE:
                memo.clear()
            outcome = memo[(stanza_from, stanza_to)] = self._outcome(stanza_from, stanza_to)
        paths, verdict = outcome
        if paths:
            route = route_tree_factory()
            for path, path_verdict in paths:
                if find_path(route, path) is not None:
                    return path_verdict
        return verdict

    def _outcome(self, stanza_from: Optional[str], stanza_to: Optional[str]) -> Outcome:
        """Walk the rules for one address pair: the rules whose ``from`` and
        ``to`` match, up to the first without a ``what`` path (it decides)."""
        sender, to = strip_resource(stanza_from), strip_resource(stanza_to)
        sender_bytes = None if sender is None else sender.encode("utf-8")
        to_bytes = None if to is None else to.encode("utf-8")
        paths: list[tuple[str, Verdict]] = []
        for index, rule in enumerate(self.rules):
            if (sender is None) != (rule.sender is None) or (to is None) != (rule.to is None):
                continue
            if sender_bytes is not None and not self._wildcards[rule.sender].match(sender_bytes):
                continue
            if to_bytes is not None and not self._wildcards[rule.to].match(to_bytes):
                continue
            verdict = _verdict(rule, index, sender, to)
            if rule.what is None:
                return tuple(paths), verdict
            paths.append((rule.what, verdict))
        return tuple(paths), None


def _verdict(rule: Rule, index: int, sender: Optional[str], to: Optional[str]) -> Verdict:
    name = rule.code_name
    log_line = None
    if rule.log:
        context = f"from={_n(sender)} to={_n(to)} - rule (from={_n(rule.sender)} to={_n(rule.to)} what={_n(rule.what)})"
        if rule.redirect is not None:
            log_line = f"filter: redirect packet {context}, new to={rule.redirect}"
        else:
            log_line = f"filter: {'deny' if name else 'allow'} packet {context}"
    if name is None:
        return Verdict(ALLOW, log_line=log_line, dump=rule.dump, rule_index=index)
    if name == "redirect":
        # router.c re-reads the route's to and routes on; without a target
        # nothing was rewritten, so the route goes where it was going.
        action = REDIRECT if rule.redirect is not None else ALLOW
        return Verdict(action, redirect=rule.redirect, log_line=log_line, dump=rule.dump, rule_index=index)
    return Verdict(DENY, ERROR_CODES[name], name, rule.redirect, log_line, rule.dump, index)
