"""Whether a string is an RFC 3986 URI reference, without lxml.

Owns: ``is_uri_reference``, the reader's cheap answer to "would libxml2 take
this namespace name?" (``lxml_side.uri_refused``). libxml2 refuses a
namespace name its ``xmlParseURI`` cannot parse; asking lxml costs memory for
the life of the thread (it keeps every namespace name it parses in its string
dictionary), so this check answers first, in Python, with no memory kept.

The one promise is soundness: every string accepted here is one libxml2
(2.14's ``uri.c``) takes. Where libxml2 departs from the RFC, or where a
form is rare and fiddly, this check is the stricter of the two and refuses:

* IP-literals (``http://[::1]/``, RFC 3986 section 3.2.2): libxml2 takes
  anything between the brackets; no namespace name in use has one. ``[`` and
  ``]`` are refused everywhere, also in a fragment, where libxml2 allows them
  for XPointer (RFC 3986 section 3.5 does not).
* A port (section 3.2.3) must have 1 to 9 digits: libxml2 refuses an empty
  port (``http://h:/``) and one past ``INT_MAX`` (``http://h:99999999999/``).
* ASCII only: an IRI (``caf\\u00e9``) is not a URI, and libxml2 refuses it.

The grammar, by section of RFC 3986: characters are unreserved, reserved or
percent-encoded with two hex digits (2.1-2.3); a URI-reference is a URI or a
relative reference (4.1, 4.2); a URI is ``scheme ":" hier-part [ "?" query ]
[ "#" fragment ]`` (3), with the scheme a letter then letters, digits, ``+``,
``-``, ``.`` (3.1); an authority after ``//`` is ``[ userinfo "@" ] host [
":" port ]`` (3.2, 3.2.1-3.2.3); a path holds no ``?`` or ``#``, and a
relative one without an authority has no ``:`` in its first segment (3.3,
4.2); the query and the fragment may hold ``/`` and ``?`` but not ``#``
(3.4, 3.5). The string is split at the delimiters as in Appendix B, then
each part is checked with regular expressions of one character class each:
no nested repetition, so time is linear in the length, whatever the input.

Must not know: XML, lxml, streams. Standard library only: the benchmark's
load generator runs without lxml.
"""

from __future__ import annotations

import re

# Every character a URI may hold once ``[`` and ``]`` (IP-literals only) are
# left out: unreserved, sub-delims, the other gen-delims, and "%" (2.1-2.3).
_URI_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/?#%]*")
# A "%" not followed by two hex digits (2.1).
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")   # 3.1
_PORT = re.compile(r"[0-9]{1,9}")                     # 3.2.3, below libxml2's INT_MAX


def is_uri_reference(s: str) -> bool:
    """Whether ``s`` is a URI reference (RFC 3986 section 4.1) libxml2 takes,
    IP-literals and ports over 9 digits refused (module docstring)."""
    if not s.isascii() or not _URI_CHARS.fullmatch(s) or _BAD_PERCENT.search(s):
        return False
    rest, _, fragment = s.partition("#")
    if "#" in fragment:                      # 3.5: a fragment has no "#"
        return False
    rest = rest.partition("?")[0]            # 3.4: the query may hold "?" and "/"
    colon, slash = rest.find(":"), rest.find("/")
    scheme = colon >= 0 and (slash < 0 or colon < slash)
    if scheme:
        if not _SCHEME.fullmatch(rest, 0, colon):
            return False                     # not a scheme, nor a path-noscheme (4.2)
        rest = rest[colon + 1:]
    if rest.startswith("//"):
        end = rest.find("/", 2)
        return _authority(rest[2:] if end < 0 else rest[2:end])
    # 3.3, 4.2: path-absolute, path-rootless or path-empty after a scheme;
    # without one, path-noscheme can hold no ":" before its first "/", and
    # it does not: such a ":" was taken for the end of a scheme above.
    return True


def _authority(authority: str) -> bool:
    """``[ userinfo "@" ] host [ ":" port ]`` (3.2), the string already known
    to hold no "/", "?", "#", "[" or "]". userinfo is every other character
    but "@" (3.2.1); a reg-name host every other character but ":" too
    (3.2.2)."""
    userinfo, at, hostport = authority.partition("@")
    if not at:
        hostport = userinfo
    if "@" in hostport:
        return False
    port = hostport.partition(":")[2] if ":" in hostport else None
    return port is None or bool(_PORT.fullmatch(port))
