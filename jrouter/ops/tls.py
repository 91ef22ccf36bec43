"""TLS for STARTTLS (protocol §3.5): one server context built from router.xml.

jabberd2 reads the certificate chain and the key from one PEM file
(``<pemfile>``), with an optional passphrase and cipher list, asks no client
certificate and accepts any TLS version but SSLv3.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from gevent import ssl

from jrouter.config import DEFAULT_CIPHERS

if TYPE_CHECKING:
    import ssl as stdlib_ssl        # gevent's SSLContext is a subclass; gevent has no types


def make_server_context(pemfile: str, password: Optional[str] = None,
                        ciphers: Optional[str] = None) -> stdlib_ssl.SSLContext:
    """A gevent-cooperative server SSLContext; raises OSError or ssl.SSLError."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.options |= ssl.OP_NO_SSLv3
    context.load_cert_chain(pemfile, password=password or None)
    context.set_ciphers(ciphers or DEFAULT_CIPHERS)
    return context
