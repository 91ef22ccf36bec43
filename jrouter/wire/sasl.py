"""SASL for the jabberd2 component protocol: DIGEST-MD5 (RFC 2831), sans-IO.

Owns: the DIGEST-MD5 directive syntax, the digest arithmetic, the server-side
exchange as jabberd2 2.7.0 + GNU SASL 2.2 run it (protocol §3.6), the
exact bytes of `<challenge/>`, `<success/>` and `<failure/>`.  The client
side, for tests and the benchmark, is `jrouter.testing.sasl_client`.

Must not know: sockets, the clock, randomness (the server nonce is handed in),
the users table (a `lookup_password` callable is handed in), XML parsing, or
what happens after authentication (stream restart, ACLs).

Base64: `SaslServer.auth/response` take *decoded* payloads.  Callers that hold
the element text can use `SaslServer.on_element`, which decodes (RFC 6120
§6.4.2: "=" is an empty payload) and answers `incorrect-encoding` on bad input,
as jabberd2 does.

Theory of operation (server)
----------------------------
One exchange at a time; `State` says where it is, `TRANSITIONS` lists every
legal (state, event) -> possible next states.  A SASL element arriving when
the table has no entry (i.e. after success) is a caller bug: the connection
layer must drop SASL elements once authenticated (protocol §3.6), and we raise
`SaslStateError` to make that visible.

    IDLE --auth DIGEST-MD5--> CHALLENGED --good response--> SUCCEEDED
    IDLE --auth other / abort / stray response--> IDLE       (failure)
    CHALLENGED --bad response / abort / auth other--> IDLE   (failure)
    CHALLENGED --auth DIGEST-MD5--> CHALLENGED               (new nonce)

Every failure resets to IDLE, so the client may start again with `<auth/>`.
(The C router keeps the failed GNU SASL session around, so a stray
`<response/>` after a failure gets `invalid-mechanism` there and
`mechanism-too-weak` here; nothing relies on that, protocol §3.6.)

Quirks copied from GNU SASL because the real sm/c2s and the real router
agree on them (checked against /usr/sbin/jabberd2-router on the wire):
  * The password is hashed as ISO 8859-1 when every character fits, else as
    UTF-8 (gsasl `utf8tolatin1ifpossible`); username and realm are hashed as
    the bytes the client sent.
  * A response without `qop` is accepted and hashed with an *empty* qop.
  * A response without `realm` fails as "password was not provided";
    `realm=""` succeeds and the identity's domain is then the stream `to`.
  * `nc` must be 8 hex digits worth 1; the nonce must be ours; unknown
    directives are ignored; a response of 4096 bytes or more is refused.
  * The mechanism name is matched exactly: `digest-md5` is refused.
Deliberate differences: duplicate directives are all errors (gsasl lets a
repeated `charset` through), and quoted strings honour RFC 2831 `\\` escapes
(gsasl's parser and printer ignore escaping; no sane router user name
contains `"` or `\\`).
"""

from __future__ import annotations

import base64
import binascii
import enum
from dataclasses import dataclass
from typing import Callable, Optional, TypedDict, Union

from jrouter.errors import JrouterError, ProtocolError

# CPython's own MD5 and constant-time comparison (hmac.compare_digest's
# fallback), the same answers bit for bit: hashlib and hmac would load
# OpenSSL's libcrypto, 3.4 MiB resident for the process's life, at the first
# SASL exchange of a router that has no TLS to need it.
try:
    from _md5 import md5 as _md5  # type: ignore[import-not-found]  # no stub in typeshed
    from _operator import _compare_digest
except ImportError:     # an interpreter built without them
    from hashlib import md5 as _md5
    from hmac import compare_digest as _compare_digest  # type: ignore[no-redef]

__all__ = [
    "SaslError",
    "SaslEncodingError",
    "SaslStateError",
    "SaslReply",
    "SaslServer",
    "State",
    "TRANSITIONS",
    "NS_SASL",
    "b64decode",
    "b64encode",
    "digest_response",
    "parse_directives",
]

NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
MECHANISM = "DIGEST-MD5"
MAX_RESPONSE = 4096  # RFC 2831 §2.1.2: "less than 4096 bytes"

# Failure texts are GNU SASL's gsasl_strerror() strings (2.2.0) and jabberd2's
# own; tests assert the conditions, not these (protocol §3.6).
TEXT_AUTH_ERROR = "Error authenticating user"
TEXT_NO_PASSWORD = "Authentication failed because the password was not provided."
TEXT_PARSE_ERROR = "SASL mechanism could not parse input"
TEXT_BASE64 = "Base 64 coding error in SASL library"
TEXT_NO_AUTH = "response send before auth request enabling mechanism"


class SaslError(ProtocolError, ValueError):
    """A DIGEST-MD5 message that cannot be parsed or is inconsistent."""


class SaslEncodingError(SaslError):
    """A SASL element's text is not valid base64."""


class SaslStateError(JrouterError, RuntimeError):
    """The caller fed a SASL event the state table does not allow."""


# --------------------------------------------------------------------------
# Directive lists: `name=value` or `name="quoted \"value\""`, comma separated,
# with optional linear white space and empty list elements (RFC 2831 §7.1).
# Values are returned as latin-1 decoded str, i.e. one char per byte, so that
# `value.encode("latin-1")` gives back exactly the bytes that were sent.

_LWS = " \t\r\n"


def parse_directives(data: bytes) -> dict[str, str]:
    """Parse a challenge or response into {lower-case name: raw value}.

    Raises SaslError on bad syntax or a repeated directive.
    """
    text = data.decode("latin-1")
    out: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        while i < n and (text[i] in _LWS or text[i] == ","):
            i += 1
        if i >= n:
            break
        j = text.find("=", i)
        if j < 0:
            raise SaslError("directive without '='")
        name = text[i:j].strip(_LWS).lower()
        if not name or any(c in name for c in ' \t\r\n",'):
            raise SaslError("bad directive name")
        value, i = _parse_value(text, j + 1)
        if name in out:
            raise SaslError(f"duplicate directive {name}")
        out[name] = value
        while i < n and text[i] in _LWS:
            i += 1
        if i < n and text[i] != ",":
            raise SaslError("garbage after directive value")
    return out


def _parse_value(text: str, i: int) -> tuple[str, int]:
    """Read a token or quoted-string value starting at i; return (value, next index)."""
    n = len(text)
    while i < n and text[i] in _LWS:
        i += 1
    if i < n and text[i] == '"':
        buf = []
        i += 1
        while i < n:
            c = text[i]
            if c == "\\" and i + 1 < n:
                buf.append(text[i + 1])
                i += 2
            elif c == '"':
                return "".join(buf), i + 1
            else:
                buf.append(c)
                i += 1
        raise SaslError("unterminated quoted string")
    j = i
    while j < n and text[j] != "," and text[j] not in _LWS:
        if text[j] == '"':
            raise SaslError("quote inside token")
        j += 1
    return text[i:j], j


def quote(value: str) -> str:
    """Render a quoted-string value, escaping '"' and '\\'."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --------------------------------------------------------------------------
# Digest arithmetic (RFC 2831 §2.1.2.1, qop=auth only).


def _hex_md5(data: bytes) -> str:
    return _md5(data).hexdigest()


def password_bytes(password: str) -> bytes:
    """The password as GNU SASL hashes it: ISO 8859-1 if it fits, else UTF-8."""
    try:
        return password.encode("latin-1")
    except UnicodeEncodeError:
        return password.encode("utf-8")


def digest_response(
    *,
    username: bytes,
    realm: bytes,
    password: bytes,
    nonce: str,
    cnonce: str,
    nc: str,
    qop: str,
    digest_uri: str,
    authzid: Optional[str],
    initiator: bool,
) -> str:
    """Return the 32-hex `response` (initiator=True) or `rspauth` (False) value.

    username/realm are the bytes as sent; password as `password_bytes` gives it.
    The string arguments are taken as latin-1 "raw" strings (one char per
    byte, as `parse_directives` returns them); plain ASCII is the usual case.
    """
    raw = lambda s: s.encode("latin-1")  # noqa: E731 - raw strings back to bytes
    secret = _md5(username + b":" + realm + b":" + password).digest()
    a1 = secret + b":" + raw(nonce) + b":" + raw(cnonce)
    if authzid:
        a1 += b":" + raw(authzid)
    a2 = (b"AUTHENTICATE:" if initiator else b":") + raw(digest_uri)
    kd = b":".join([_hex_md5(a1).encode(), raw(nonce), raw(nc), raw(cnonce), raw(qop),
                    _hex_md5(a2).encode()])
    return _hex_md5(kd)


# --------------------------------------------------------------------------
# Base64 as the connection layer needs it.


def b64decode(text: Union[str, bytes]) -> bytes:
    """Decode a SASL element's text; whitespace is ignored, "=" means empty.

    Raises SaslEncodingError on anything that is not strict base64.
    """
    if isinstance(text, str):
        try:
            text = text.encode("ascii")
        except UnicodeEncodeError as exc:
            raise SaslEncodingError("non-ASCII in base64") from exc
    text = b"".join(text.split())
    if text in (b"", b"="):
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SaslEncodingError(str(exc)) from exc


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --------------------------------------------------------------------------
# Server.


class State(enum.Enum):
    IDLE = "idle"              # no exchange under way
    CHALLENGED = "challenged"  # challenge sent, waiting for <response/>
    SUCCEEDED = "succeeded"    # <success/> sent; terminal for this stream


class Event(enum.Enum):
    AUTH = "auth"
    RESPONSE = "response"
    ABORT = "abort"
    BAD_ENCODING = "bad-encoding"


# Every legal move.  Absent key = SaslStateError.
TRANSITIONS: dict[tuple[State, Event], frozenset[State]] = {
    (State.IDLE, Event.AUTH): frozenset({State.CHALLENGED, State.IDLE}),
    (State.IDLE, Event.RESPONSE): frozenset({State.IDLE}),
    (State.IDLE, Event.ABORT): frozenset({State.IDLE}),
    (State.IDLE, Event.BAD_ENCODING): frozenset({State.IDLE}),
    (State.CHALLENGED, Event.AUTH): frozenset({State.CHALLENGED, State.IDLE}),
    (State.CHALLENGED, Event.RESPONSE): frozenset({State.SUCCEEDED, State.IDLE}),
    (State.CHALLENGED, Event.ABORT): frozenset({State.IDLE}),
    (State.CHALLENGED, Event.BAD_ENCODING): frozenset({State.IDLE}),
}


@dataclass(frozen=True)
class SaslReply:
    """What to send back.  kind: 'challenge' | 'success' | 'failure'.

    data: decoded payload of <challenge/>/<success/>; condition/text: failure.
    On success: username (str, the key for ACLs), realm (client's, may be ''),
    authzid (client's request, unchecked, None if absent), digest_uri.
    """

    kind: str
    data: bytes = b""
    condition: Optional[str] = None
    text: Optional[str] = None
    username: Optional[str] = None
    realm: Optional[str] = None
    authzid: Optional[str] = None
    digest_uri: Optional[str] = None

    def identity(self, stream_to: Optional[str]) -> str:
        """jabberd2's authenticated id: USERNAME@REALM, REALM empty -> stream `to`."""
        if self.kind != "success":
            raise ValueError("no identity on a non-success reply")
        return f"{self.username}@{self.realm or stream_to or ''}"

    def to_bytes(self) -> bytes:
        """The element exactly as jabberd2 2.7.0 writes it (protocol §3.6)."""
        ns = f"xmlns='{NS_SASL}'"
        if self.kind != "failure":
            return f"<{self.kind} {ns}>{b64encode(self.data)}</{self.kind}>".encode("ascii")
        if self.text is None:  # jabberd2's own failures: <cond></cond>
            inner = f"<{self.condition}></{self.condition}>"
        else:                  # failures carrying a gsasl text: <cond/><text/>
            inner = f"<{self.condition}/><text>{_xml_escape(self.text)}</text>"
        return f"<failure {ns}>{inner}</failure>".encode("utf-8")


def _xml_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _failure(condition: str, text: Optional[str] = None) -> SaslReply:
    return SaslReply(kind="failure", condition=condition, text=text)


class _Reject(Exception):
    """Internal: abandon this response with the given failure."""

    def __init__(self, condition: str, text: Optional[str]) -> None:
        super().__init__(condition)
        self.reply = _failure(condition, text)


_PARSE_ERROR = ("invalid-mechanism", TEXT_PARSE_ERROR)  # what 2.7.0 answers


class SaslServer:
    """Server side of one stream's SASL negotiation (DIGEST-MD5 only).

    lookup_password(username) -> password or None (unknown user).
    nonce: a string used for every exchange, or a zero-argument callable
    called once per `<auth/>` (preferred: a fresh nonce per attempt).
    The digest-uri is not checked, as jabberd2 does not check it.
    """

    def __init__(
        self,
        lookup_password: Callable[[str], Optional[str]],
        nonce: Union[str, Callable[[], str]],
        realm: str = "jabberd-router",
    ) -> None:
        self._lookup = lookup_password
        self._nonce_source = nonce if callable(nonce) else (lambda: nonce)
        self.realm = realm
        self.state = State.IDLE
        self._nonce: Optional[str] = None

    # -- events ------------------------------------------------------------

    def auth(self, mechanism: Optional[str], initial: Optional[bytes] = None) -> SaslReply:
        """`<auth mechanism=…>`; the initial response is ignored (DIGEST-MD5 has none)."""
        if mechanism != MECHANISM:
            return self._move(Event.AUTH, State.IDLE, _failure("invalid-mechanism"))
        self._nonce = _check_nonce(self._nonce_source())
        challenge = (f'realm={quote(self.realm)}, nonce={quote(self._nonce)}, '
                     f'qop="auth", charset=utf-8, algorithm=md5-sess')
        return self._move(Event.AUTH, State.CHALLENGED,
                          SaslReply(kind="challenge", data=challenge.encode("utf-8")))

    def response(self, data: bytes) -> SaslReply:
        """`<response>`: verify the digest-response; success carries rspauth."""
        if self.state is State.IDLE:
            return self._move(Event.RESPONSE, State.IDLE,
                              _failure("mechanism-too-weak", TEXT_NO_AUTH))
        try:
            reply = self._verify(data)
        except _Reject as rej:
            return self._move(Event.RESPONSE, State.IDLE, rej.reply)
        return self._move(Event.RESPONSE, State.SUCCEEDED, reply)

    def abort(self) -> SaslReply:
        """`<abort/>`: always answered with `aborted`, exchange forgotten."""
        return self._move(Event.ABORT, State.IDLE, _failure("aborted"))

    def encoding_error(self) -> SaslReply:
        """The caller could not base64-decode an `<auth/>` or `<response/>`."""
        return self._move(Event.BAD_ENCODING, State.IDLE,
                          _failure("incorrect-encoding", TEXT_BASE64))

    def on_element(self, name: str, mechanism: Optional[str] = None,
                   text: Union[str, bytes] = "") -> SaslReply:
        """Dispatch a SASL element by local name, decoding its base64 text."""
        if name == "abort":
            return self.abort()
        if name not in ("auth", "response"):
            raise ValueError(f"not a client SASL element: {name!r}")
        if name == "auth" and mechanism != MECHANISM:
            return self.auth(mechanism, None)  # mechanism is checked before the payload
        try:
            payload = b64decode(text)
        except SaslEncodingError:
            return self.encoding_error()
        return self.auth(mechanism, payload) if name == "auth" else self.response(payload)

    # -- internals ---------------------------------------------------------

    def _move(self, event: Event, new: State, reply: SaslReply) -> SaslReply:
        allowed = TRANSITIONS.get((self.state, event))
        if allowed is None or new not in allowed:
            raise SaslStateError(f"{event.value} not allowed in state {self.state.value}")
        self.state = new
        if new is not State.CHALLENGED:
            self._nonce = None
        return reply

    def _verify(self, data: bytes) -> SaslReply:
        d = self._parse_response(data)
        charset_utf8 = "charset" in d
        username = _to_text(d["username"], charset_utf8)
        realm = _to_text(d["realm"], charset_utf8) if "realm" in d else None
        # gsasl asks jabberd2 for the password only with a realm present.
        password = self._lookup(username) if (username is not None and realm is not None) else None
        if password is None:
            raise _Reject("not-authorized", TEXT_NO_PASSWORD)
        args: _DigestArgs = dict(
            username=d["username"].encode("latin-1"),
            realm=d["realm"].encode("latin-1"),
            password=password_bytes(password),
            nonce=d["nonce"], cnonce=d["cnonce"], nc=d["nc"], qop=d.get("qop", ""),
            digest_uri=d["digest-uri"], authzid=d.get("authzid"),
        )
        del password
        expected = digest_response(initiator=True, **args)
        if not _compare_digest(expected.encode("ascii"), d["response"].encode("latin-1")):
            raise _Reject("not-authorized", TEXT_AUTH_ERROR)
        rspauth = digest_response(initiator=False, **args)
        authzid = d.get("authzid")
        return SaslReply(
            kind="success", data=f"rspauth={rspauth}".encode("ascii"),
            username=username, realm=realm,
            authzid=_to_text(authzid, charset_utf8) if authzid is not None else None,
            digest_uri=_to_text(d["digest-uri"], charset_utf8),
        )

    def _parse_response(self, data: bytes) -> dict[str, str]:
        """Parse and check a digest-response the way gsasl's parser/validator do."""
        if len(data) >= MAX_RESPONSE:
            raise _Reject(*_PARSE_ERROR)
        try:
            d = parse_directives(data)
        except SaslError:
            raise _Reject(*_PARSE_ERROR) from None
        required = ("username", "nonce", "cnonce", "nc", "digest-uri", "response")
        ok = (
            all(k in d for k in required)
            and _compare_digest(d["nonce"].encode("latin-1"), (self._nonce or "").encode("latin-1"))
            and len(d["nc"]) == 8 and _is_hex(d["nc"]) and int(d["nc"], 16) == 1
            and len(d["response"]) == 32
            and d.get("qop", "auth") == "auth"
            and d.get("charset", "utf-8") == "utf-8"
            and "cipher" not in d
            and d.get("authzid", "x") != ""
            and ("maxbuf" not in d or (d["maxbuf"].isdigit() and 16 < int(d["maxbuf"]) <= 0xFFFFFF))
        )
        if not ok:
            raise _Reject(*_PARSE_ERROR)
        return d


class _DigestArgs(TypedDict):
    """What ``digest_response`` takes, but ``initiator``: the same for both digests."""

    username: bytes
    realm: bytes
    password: bytes
    nonce: str
    cnonce: str
    nc: str
    qop: str
    digest_uri: str
    authzid: Optional[str]


def _check_nonce(nonce: str) -> str:
    """A nonce must survive quoting untouched: printable ASCII without '"' or '\\'."""
    if not nonce or not all(" " < c <= "~" and c not in '"\\' for c in nonce):
        raise ValueError("nonce must be printable ASCII without quotes or backslashes")
    return nonce


def _is_hex(s: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in s)


def _to_text(raw: str, utf8: bool) -> Optional[str]:
    """Raw (latin-1) directive value -> text: UTF-8 if charset=utf-8, else ISO 8859-1."""
    if not utf8:
        return raw
    try:
        return raw.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        return None
