"""JIDs as jabberd2's util/jid.c parses them: split, then stringprep each part.

Owns: `parse_jid` (str -> prepped `JID` or None) and the three
RFC 3920 profiles (nodeprep, nameprep, resourceprep) with libidn's settings.
Must not know: routing, XML, where the string came from.

How jabberd2 (jid_reset + jid_prep, libidn 1.41) reads a JID, and what we copy:
  * the whole string must be 1..3071 bytes; a leading '/' or '@' is invalid;
  * the resource is everything after the first '/', and must not be empty;
  * the node is what precedes the first '@' before that; the domain must not
    be empty.  A second '@' stays in the domain ("a@b@c" has domain "b@c"),
    because nameprep does not forbid '@';
  * node -> nodeprep, domain -> nameprep, resource -> resourceprep, with
    libidn flags 0: unassigned code points are allowed (query strings);
  * a part that preps to "" (e.g. only U+00AD) is simply absent, except the
    domain (see below).
Verified against the real router with `<bind name=…/>` (only the domain is
used there): 'EXAMPLE.COM' -> 'example.com', 'ex\\u200bample.com' ->
'example.com', '\\uff41\\uff42\\uff43.com' -> 'abc.com', 'u\\u3000x.com' -> 'u x.com',
'\\u05d0a.com' / U+FFFD / U+E000 / U+FDD0 / U+E0001 / U+0085 -> invalid.

Deliberate differences from the C code, which has bugs here:
  * C *truncates* each part to 1023 bytes before prepping (so 'd'*1024 binds
    as 'd'*1023 and two names alias); we reject a part over 1023 bytes,
    before or after prep (RFC 3920 §3.1; libidn's 1024-byte buffer).
  * C accepts a domain that preps to "" (binding the empty name); we reject.
  * NUL is rejected (C would silently cut the string there; XML cannot carry it).

Speed: results are cached (bounded LRU keyed on the input string), and pure
ASCII input takes a fast path without stringprep, since for ASCII the three
profiles reduce to lower-casing (node, domain) and a handful of forbidden
characters.
"""

from __future__ import annotations

import re
import stringprep
import unicodedata
from functools import lru_cache
from typing import Callable, NamedTuple, Optional

__all__ = ["JID", "parse_jid", "nodeprep", "nameprep", "resourceprep",
           "MAXLEN_PART", "MAXLEN_JID", "CACHE_SIZE"]

MAXLEN_PART = 1023  # bytes, util/jid.h MAXLEN_JID_COMP
MAXLEN_JID = 3071   # bytes, util/jid.h MAXLEN_JID
CACHE_SIZE = 1 << 16


class JID(NamedTuple):
    """A prepped JID.  node/resource are '' when absent; bare/full are strings."""

    node: str
    domain: str
    resource: str
    bare: str
    full: str

    def __str__(self) -> str:
        return self.full


# ---------------------------------------------------------------------------
# The stringprep profiles (RFC 3454 steps: map, NFKC, prohibit, bidi).

_UCD32 = unicodedata.ucd_3_2_0  # stringprep is defined on Unicode 3.2

# Per-character answers are memoised (bounded): prepping is then a few dict hits
# per character instead of a dozen table look-ups.
_char_cache = lru_cache(maxsize=8192)


# --- NFKC on Unicode 3.2, as libidn computes it ---------------------------------
# unicodedata.ucd_3_2_0.normalize() decomposes with 3.2 data but reorders
# combining marks with the *current* combining classes (e.g. U+035E was class 0
# in 3.2, 234 now), so it disagrees with libidn on such sequences.  Here every
# table comes from ucd_3_2_0, and composition follows libidn's code.

_S_BASE, _L_BASE, _V_BASE, _T_BASE = 0xAC00, 0x1100, 0x1161, 0x11A7
_L_COUNT, _V_COUNT, _T_COUNT = 19, 21, 28
_N_COUNT = _V_COUNT * _T_COUNT
_S_COUNT = _L_COUNT * _N_COUNT


# Unicode 3.2's original (erroneous) mappings for five CJK compatibility
# ideographs, fixed by Corrigendum #4; libidn keeps the 3.2 values, Python's
# ucd_3_2_0 reports the corrected ones.
_CJK_32 = {0x2F868: "\U0002136A", 0x2F874: "\u5F33", 0x2F91F: "\u43AB",
           0x2F95F: "\u7AAE", 0x2F9BF: "\u4D57"}


def _decompose(c: str) -> str:
    """Full compatibility decomposition of one character (3.2 data)."""
    cp = ord(c)
    if cp in _CJK_32:
        return _CJK_32[cp]
    if _S_BASE <= cp < _S_BASE + _S_COUNT:
        i = cp - _S_BASE
        t = i % _T_COUNT
        return (chr(_L_BASE + i // _N_COUNT) + chr(_V_BASE + (i % _N_COUNT) // _T_COUNT)
                + (chr(_T_BASE + t) if t else ""))
    d = _UCD32.decomposition(c)
    if not d:
        return c
    return "".join(_decompose(chr(int(h, 16))) for h in d.split() if h[0] != "<")


_decomposition = _char_cache(_decompose)


@lru_cache(maxsize=1)
def _composition_pairs() -> dict[tuple[str, str], str]:
    """(first, second) -> primary composite, from 3.2 canonical decompositions.

    A character is a primary composite if it has a two-character canonical
    decomposition and is not excluded from composition; "NFC leaves it alone"
    tests exclusion (singletons, non-starter decompositions and the
    CompositionExclusions list all fail it) without hard-coding the list.
    Every such character lies in the BMP.
    """
    pairs = {}
    for cp in range(0x10000):
        c = chr(cp)
        d = _UCD32.decomposition(c)
        if d and d[0] != "<":
            parts = d.split()
            if len(parts) == 2 and _UCD32.normalize("NFC", c) == c:
                pairs[(chr(int(parts[0], 16)), chr(int(parts[1], 16)))] = c
    return pairs


def _compose_pair(a: str, b: str, pairs: dict[tuple[str, str], str]) -> Optional[str]:
    la, lb = ord(a), ord(b)
    if _L_BASE <= la < _L_BASE + _L_COUNT and _V_BASE <= lb < _V_BASE + _V_COUNT:
        return chr(_S_BASE + ((la - _L_BASE) * _V_COUNT + lb - _V_BASE) * _T_COUNT)
    if (_S_BASE <= la < _S_BASE + _S_COUNT and (la - _S_BASE) % _T_COUNT == 0
            and _T_BASE < lb < _T_BASE + _T_COUNT):
        return chr(la + lb - _T_BASE)
    return pairs.get((a, b))


def _nfkc(text: str) -> str:
    """NFKC with Unicode 3.2 tables throughout (decompose, reorder, compose)."""
    chars = list("".join([_decomposition(c) for c in text]))
    ccc = _UCD32.combining
    # canonical ordering: stable sort of each run of non-starters by class
    i, n = 0, len(chars)
    while i < n:
        if ccc(chars[i]) == 0:
            i += 1
            continue
        j = i
        while j < n and ccc(chars[j]) != 0:
            j += 1
        chars[i:j] = sorted(chars[i:j], key=ccc)
        i = j
    # Composition exactly as libidn's nfkc.c (from GLib) does it, which is not
    # quite UAX #15: a starter may combine with the last starter across
    # intervening marks ("last_cc != cc"), so U+1103 U+0340 U+1172 composes to
    # U+B4C0 U+0300 there.  Copied because jabberd2 keys routes on the result.
    pairs = _composition_pairs()
    buf = chars
    last_start, last_cc, i = 0, 0, 0
    while i < len(buf):
        cc = ccc(buf[i])
        if i > 0 and (last_cc == 0 or last_cc != cc):
            comp = _compose_pair(buf[last_start], buf[i], pairs)
            if comp is not None:
                buf[last_start] = comp
                del buf[i]
                i -= 1
                last_cc = 0 if i == last_start else ccc(buf[i - 1])
                i += 1
                continue
        if cc == 0:
            last_start = i
        last_cc = cc
        i += 1
    return "".join(buf)


# Characters assigned in Unicode 3.2 without a lower-case mapping there, which
# later versions gave one (U+04C0 palochka, Georgian capitals, Cherokee, U+2132,
# U+2183).  Found by comparing every code point with libidn 1.41 (test_jid.py).
_B2_UNMAPPED = frozenset(
    [0x04C0, 0x2132, 0x2183] + list(range(0x10A0, 0x10C6)) + list(range(0x13A0, 0x13F5)))


@_char_cache
def _map_b2(c: str) -> str:
    """Table B.2 (case fold for NFKC), exactly as in RFC 3454 / libidn.

    Python's stringprep.map_table_b2 lower-cases with the *current* Unicode
    database, so characters unassigned in 3.2, or assigned but caseless there,
    must be left alone by hand."""
    if ord(c) in _B2_UNMAPPED or _UCD32.category(c) == "Cn":
        return c
    return stringprep.map_table_b2(c)

_COMMON_PROHIBITED = (
    stringprep.in_table_c12, stringprep.in_table_c22, stringprep.in_table_c3,
    stringprep.in_table_c4, stringprep.in_table_c5, stringprep.in_table_c6,
    stringprep.in_table_c7, stringprep.in_table_c8, stringprep.in_table_c9,
)
_NODE_EXTRA = frozenset("\"&'/:<>@")  # RFC 3920 Appendix A.5


@_char_cache
def _node_prohibited(c: str) -> bool:
    return (c in _NODE_EXTRA or stringprep.in_table_c11(c) or stringprep.in_table_c21(c)
            or any(t(c) for t in _COMMON_PROHIBITED))


@_char_cache
def _resource_prohibited(c: str) -> bool:
    return stringprep.in_table_c21(c) or any(t(c) for t in _COMMON_PROHIBITED)


@_char_cache
def _name_prohibited(c: str) -> bool:
    return any(t(c) for t in _COMMON_PROHIBITED)


_in_b1 = _char_cache(stringprep.in_table_b1)
_in_d1 = _char_cache(stringprep.in_table_d1)
_in_d2 = _char_cache(stringprep.in_table_d2)


def _stringprep(text: str, casefold: bool, prohibited: Callable[[str], bool]) -> Optional[str]:
    """One stringprep profile; None if a prohibited character or bad bidi results."""
    if casefold:
        mapped = "".join([_map_b2(c) for c in text if not _in_b1(c)])
    else:
        mapped = "".join([c for c in text if not _in_b1(c)])
    out = _nfkc(mapped)
    for c in out:
        if prohibited(c):
            return None
    # RFC 3454 §6 over the whole string, as libidn does (not per label).
    ral = [_in_d1(c) for c in out]
    if any(ral) and (any(_in_d2(c) for c in out) or not (ral[0] and ral[-1])):
        return None
    return out


def nodeprep(text: str) -> Optional[str]:
    """RFC 3920 Appendix A Nodeprep (unassigned allowed); None if invalid."""
    return _stringprep(text, True, _node_prohibited)


def nameprep(text: str) -> Optional[str]:
    """RFC 3491 Nameprep over the whole domain (unassigned allowed); None if invalid."""
    return _stringprep(text, True, _name_prohibited)


def resourceprep(text: str) -> Optional[str]:
    """RFC 3920 Appendix B Resourceprep (unassigned allowed); None if invalid."""
    return _stringprep(text, False, _resource_prohibited)


# ---------------------------------------------------------------------------
# Parsing.

# For pure ASCII, nodeprep = lower() unless one of these appears (C.1.1 space,
# C.2.1 controls, and the eight RFC 3920 extras; '/' and '@' cannot reach it);
# resourceprep = identity unless a C.2.1 control appears; nameprep = lower()
# (nameprep forbids no ASCII character; NUL we refuse ourselves).
_ASCII_NODE_BAD = re.compile(r"[\x00-\x20\"&'/:<>@\x7f]")
_ASCII_RESOURCE_BAD = re.compile(r"[\x00-\x1f\x7f]")


def _split(s: str) -> Optional[tuple[str, str, str]]:
    """jid_reset's split into (node, domain, resource), before prep."""
    if not s or s[0] in "/@" or "\x00" in s:
        return None
    node, resource = "", ""
    slash = s.find("/")
    if slash >= 0:
        s, resource = s[:slash], s[slash + 1:]
        if not resource:
            return None
    at = s.find("@")
    if at >= 0:
        node, s = s[:at], s[at + 1:]
        if not s:
            return None
    return node, s, resource


_tuple_new = tuple.__new__


def _make(node: str, domain: str, resource: str) -> JID:
    bare = f"{node}@{domain}" if node else domain
    full = f"{bare}/{resource}" if resource else bare
    return _tuple_new(JID, (node, domain, resource, bare, full))  # skip NamedTuple's slow __new__


def _parse_ascii(s: str) -> Optional[JID]:
    if len(s) > MAXLEN_JID:
        return None
    parts = _split(s)
    if parts is None:
        return None
    node, domain, resource = parts
    if len(node) > MAXLEN_PART or len(domain) > MAXLEN_PART or len(resource) > MAXLEN_PART:
        return None
    if _ASCII_NODE_BAD.search(node) or _ASCII_RESOURCE_BAD.search(resource):
        return None
    return _make(node.lower(), domain.lower(), resource)


def _utf8_len(s: str) -> int:
    return len(s.encode("utf-8"))


def _parse_unicode(s: str) -> Optional[JID]:
    try:
        if _utf8_len(s) > MAXLEN_JID:
            return None
    except UnicodeEncodeError:  # lone surrogates
        return None
    parts = _split(s)
    if parts is None:
        return None
    prepped = []
    for raw, prep in zip(parts, (nodeprep, nameprep, resourceprep)):
        if not raw:
            prepped.append("")
            continue
        if _utf8_len(raw) > MAXLEN_PART:
            return None
        out = prep(raw)
        if out is None or _utf8_len(out) > MAXLEN_PART:
            return None
        prepped.append(out)
    node, domain, resource = prepped
    if not domain:
        return None
    return _make(node, domain, resource)


@lru_cache(maxsize=CACHE_SIZE)
def parse_jid(s: object) -> Optional[JID]:
    """Parse and stringprep a JID the way jabberd2 does; None if invalid,
    or not a string: callers hand it attributes that may be absent (None),
    and lru_cache hides the parameter's type from mypy, so compiled code
    would otherwise raise TypeError there (the message log did)."""
    if not isinstance(s, str):
        return None
    return _parse_ascii(s) if s.isascii() else _parse_unicode(s)
