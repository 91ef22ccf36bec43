"""The client side of DIGEST-MD5 as jabberd2's sm and c2s speak it to the router.

Owns: answering the router's challenge and checking its rspauth, with GNU
SASL's message layout (", " separators, the same directive order), for the
tests and the benchmark (jrouter itself is only ever the server).
Must not know: sockets or XML: payloads are decoded bytes in and out.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Optional

from jrouter.wire.sasl import SaslError, digest_response, parse_directives, password_bytes, quote

_LWS = " \t\r\n"  # RFC 2831's linear white space, around list items


class DigestMD5Client:
    """DIGEST-MD5 client side, for tests and the benchmark.

    respond(challenge) -> response; verify(success payload) -> bool.
    Messages look like GNU SASL's (", " separators, same directive order).
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
        if "auth" not in [q.strip(_LWS) for q in d.get("qop", "auth").split(",")]:
            raise SaslError("server does not offer qop=auth")
        # Work on raw strings (one char per wire byte) so hashing sees the bytes sent.
        user, realm, uri = _raw(self.username), d.get("realm", ""), _raw(self.digest_uri)
        authzid = _raw(self.authzid) if self.authzid else None
        password = password_bytes(self._password)

        def digest(initiator: bool) -> str:
            return digest_response(
                username=user.encode("latin-1"), realm=realm.encode("latin-1"), password=password,
                nonce=d["nonce"], cnonce=self.cnonce, nc="00000001", qop="auth",
                digest_uri=uri, authzid=authzid, initiator=initiator)

        response = digest(True)
        self._rspauth = digest(False)
        self._password = ""  # no longer needed: keep the secret no longer than this
        parts = [
            f"username={quote(user)}", f"realm={quote(realm)}",
            f"nonce={quote(d['nonce'])}", f"cnonce={quote(self.cnonce)}",
            "nc=00000001", "qop=auth", f"digest-uri={quote(uri)}",
            f"response={response}", "charset=utf-8",
        ]
        if authzid:
            parts.append(f"authzid={quote(authzid)}")
        return ", ".join(parts).encode("latin-1")

    def verify(self, success_data: bytes) -> bool:
        """True if the decoded <success/> payload carries the expected rspauth."""
        if self._rspauth is None:
            return False
        try:
            got = parse_directives(success_data).get("rspauth", "")
        except SaslError:
            return False
        return hmac.compare_digest(got.encode("latin-1"), self._rspauth.encode("ascii"))


def _raw(s: str) -> str:
    """Text -> raw latin-1 string holding its UTF-8 bytes (what the wire carries)."""
    return s.encode("utf-8").decode("latin-1")
