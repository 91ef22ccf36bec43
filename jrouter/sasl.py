"""SASL DIGEST-MD5 (RFC 2831) as jabberd2's router speaks it, sans-IO.

Owns: the DIGEST-MD5 directive syntax, the digest arithmetic, and a client
that talks to a jabberd2 router (spec §3.6).  Knows nothing about sockets,
XML or base64: callers hand in and get back the *decoded* SASL payloads.
No randomness inside except the client's default cnonce (pass one for
deterministic runs).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Optional

__all__ = ["DigestMD5Client", "SaslError", "parse_directives", "digest_response"]


class SaslError(ValueError):
    """A DIGEST-MD5 message that cannot be parsed or is inconsistent."""


# --------------------------------------------------------------------------
# Directive lists: `name=value` or `name="quoted \"value\""`, comma separated,
# with optional linear white space and empty list elements (RFC 2831 §7.1).

_LWS = " \t\r\n"


def parse_directives(data: bytes) -> dict[str, str]:
    """Parse a DIGEST-MD5 challenge or response into {lower-case name: value}.

    Raises SaslError on bad syntax, non-UTF-8 bytes or a repeated directive.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SaslError("not UTF-8") from exc
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
        if not name or any(c in name for c in ' \t",'):
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


def _md5(data: bytes) -> bytes:
    return hashlib.md5(data).digest()


def _hex_md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def digest_response(
    *,
    username: str,
    realm: str,
    password: str,
    nonce: str,
    cnonce: str,
    nc: str,
    qop: str,
    digest_uri: str,
    authzid: Optional[str],
    initiator: bool,
) -> str:
    """Return the 32-hex `response` (initiator=True) or `rspauth` (False) value.

    Strings are hashed as UTF-8, which is what GNU SASL does with
    charset=utf-8 (it does not down-convert to ISO 8859-1).
    """
    secret = _md5(f"{username}:{realm}:{password}".encode("utf-8"))
    a1 = secret + f":{nonce}:{cnonce}".encode("utf-8")
    if authzid:
        a1 += b":" + authzid.encode("utf-8")
    a2 = ("AUTHENTICATE:" if initiator else ":") + digest_uri
    kd = f"{_hex_md5(a1)}:{nonce}:{nc}:{cnonce}:{qop}:{_hex_md5(a2.encode('utf-8'))}"
    return _hex_md5(kd.encode("utf-8"))


# --------------------------------------------------------------------------
# Client: what jabberd2's sm/c2s do against the router.


class DigestMD5Client:
    """DIGEST-MD5 client side, for tests and the benchmark.

    respond(challenge) -> response; verify(success payload) -> bool.
    """

    def __init__(
        self,
        username: str,
        password: str,
        service: str = "jabberd-router",
        host: str = "localhost",
        authzid: Optional[str] = None,
        cnonce: Optional[str] = None,
    ) -> None:
        self.username = username
        self._password = password
        self.digest_uri = f"{service}/{host}"
        self.authzid = authzid
        self.cnonce = cnonce if cnonce is not None else secrets.token_hex(16)
        self._rspauth: Optional[str] = None

    def respond(self, challenge: bytes) -> bytes:
        """Answer a decoded challenge with a decoded response (RFC 2831 §2.1.2)."""
        d = parse_directives(challenge)
        if "nonce" not in d:
            raise SaslError("challenge without nonce")
        if "auth" not in d.get("qop", "auth").split(","):
            raise SaslError("server does not offer qop=auth")
        realm = d.get("realm", "")
        args = dict(
            username=self.username, realm=realm, password=self._password,
            nonce=d["nonce"], cnonce=self.cnonce, nc="00000001", qop="auth",
            digest_uri=self.digest_uri, authzid=self.authzid,
        )
        response = digest_response(initiator=True, **args)
        self._rspauth = digest_response(initiator=False, **args)
        self._password = ""  # no longer needed: keep the secret no longer than this
        parts = [
            f"username={quote(self.username)}",
            f"realm={quote(realm)}",
            f"nonce={quote(d['nonce'])}",
            f"cnonce={quote(self.cnonce)}",
            "nc=00000001",
            "qop=auth",
            f"digest-uri={quote(self.digest_uri)}",
            f"response={response}",
            "charset=utf-8",
        ]
        if self.authzid:
            parts.append(f"authzid={quote(self.authzid)}")
        return ",".join(parts).encode("utf-8")

    def verify(self, success_data: bytes) -> bool:
        """True if the decoded <success/> payload carries the expected rspauth."""
        if self._rspauth is None:
            return False
        try:
            got = parse_directives(success_data).get("rspauth", "")
        except SaslError:
            return False
        return hmac.compare_digest(got.encode("ascii", "replace"), self._rspauth.encode("ascii"))
