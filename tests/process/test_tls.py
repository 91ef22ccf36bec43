"""STARTTLS on the router port (protocol §3.5), against both routers."""

import pytest

from tests.support.peer import Peer, header
from tests.support.tls import make_pemfile

NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"


@pytest.fixture(scope="module")
def pemfile(tmp_path_factory):
    """A self-signed certificate and its key in one PEM file, as jabberd2 wants."""
    return make_pemfile(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_router(router_factory, router_kind, pemfile):
    return router_factory(router_kind, local_extra=f"<pemfile>{pemfile}</pemfile>")


def test_starttls_is_offered_first_then_sasl_runs_inside_tls(tls_router):
    """With a pemfile: <starttls/> first, <proceed/>, TLS, then SASL and routing work."""
    secure = Peer(tls_router.ip, tls_router.port)
    features = secure.starttls()
    assert [child.tag for child in features] == [
        "{%s}starttls" % NS_TLS, "{urn:ietf:params:xml:ns:xmpp-sasl}mechanisms"]
    secure.send(header())
    secure.next()
    after_tls = secure.stanza()
    assert [child.tag for child in after_tls] == ["{urn:ietf:params:xml:ns:xmpp-sasl}mechanisms"]
    secure.authenticate(opened=True).bind("sm")
    plain = Peer(tls_router.ip, tls_router.port).authenticate().bind("c2s")
    secure.drain()
    plain.send("<route to='sm' from='c2s'><message id='over-tls'/></route>")
    assert secure.route()[0].get("id") == "over-tls"


def test_broken_pemfile_disables_tls_and_serves_on(router_factory, router_kind, tmp_path):
    """An unreadable pemfile is logged and TLS is simply not offered."""
    bad = tmp_path / "broken.pem"
    bad.write_text("not a certificate")
    router = router_factory(router_kind, local_extra=f"<pemfile>{bad}</pemfile>")
    assert "failed to load SSL pemfile, SSL disabled" in router.wait_for_log("listening")
    peer = Peer(router.ip, router.port)
    peer.send(header())
    peer.next()
    features = peer.stanza()
    assert [child.tag for child in features] == ["{urn:ietf:params:xml:ns:xmpp-sasl}mechanisms"]
    peer.authenticate(opened=True).bind("sm")


def test_failed_tls_handshake_leaves_others_alone(tls_router):
    """A peer that asks for TLS and then talks garbage is dropped; others carry on."""
    sm = Peer(tls_router.ip, tls_router.port).authenticate().bind("sm")
    c2s = Peer(tls_router.ip, tls_router.port).authenticate().bind("c2s")
    rogue = Peer(tls_router.ip, tls_router.port)
    rogue.send(header())
    rogue.next(), rogue.stanza()
    rogue.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    rogue.stanza()
    rogue.send(b"this is not a TLS client hello\r\n" * 10)
    rogue.read_until_eof(timeout=10)
    rogue.close()
    sm.drain()
    c2s.send("<route to='sm' from='c2s'><message id='still-here'/></route>")
    assert sm.route()[0].get("id") == "still-here"


def test_encrypted_key_with_private_key_password(router_factory, router_kind, tmp_path):
    """<private_key_password> unlocks an encrypted key in the pemfile."""
    import subprocess

    key, cert = tmp_path / "enc.key", tmp_path / "enc.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-keyout", str(key),
                    "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-passout", "pass:s3cret"], check=True, capture_output=True)
    pem = tmp_path / "enc.pem"
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    router = router_factory(router_kind, local_extra=(
        f"<pemfile>{pem}</pemfile><private_key_password>s3cret</private_key_password>"))
    assert "failed to load SSL pemfile" not in router.wait_for_log("listening")
    peer = Peer(router.ip, router.port)
    peer.starttls()
    peer.send(header())
    peer.next()
    peer.stanza()
    peer.authenticate(opened=True).bind("sm")
