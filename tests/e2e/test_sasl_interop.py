"""SASL DIGEST-MD5 against the real thing, on loopback: the client role
(jrouter.testing.component_client) logs in to Debian's jabberd2-router, and
jrouter.wire.sasl's server lets the real jabberd2-sm and -c2s (GNU SASL) in."""

import base64
import os
import re
import socket
import threading
import time

import pytest

from jrouter.wire.sasl import SaslServer
from tests.support.jabberd2 import JABBERD2_C2S as C2S, JABBERD2_SM as SM, module_dir
from tests.support.peer import Peer, header
from tests.support.ports import free_port
from tests.support.process import ManagedProcess

HEADER = header(to="localhost")
FEATURES_SASL = (b"<stream:features xmlns:stream='http://etherx.jabber.org/streams'><mechanisms "
                 b"xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>DIGEST-MD5</mechanism>"
                 b"</mechanisms></stream:features>")
FEATURES_EMPTY = b"<stream:features xmlns:stream='http://etherx.jabber.org/streams'></stream:features>"


class Reader:
    """Reads from a socket until a regex matches; bounded in time and rounds."""

    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def until(self, pattern, timeout=10.0):
        deadline = time.monotonic() + timeout
        for _ in range(1000):
            m = re.search(pattern, self.buf, re.S)
            if m:
                self.buf = self.buf[m.end():]
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            if not data:
                break
            self.buf += data
        raise AssertionError(f"no {pattern!r} in {self.buf[:300]!r}")


@pytest.fixture
def real_router(router_factory):
    """Debian's jabberd2-router, with a user whose password is not ASCII."""
    return router_factory("jabberd2", users={"jabberd": "secret", "lat": "p\u00e4ss"})


def login(router, user, password):
    """DIGEST-MD5 and the restarted stream (where the router logs the identity); the client role."""
    peer = Peer(router.ip, router.port, timeout=10).authenticate(user, password, stream_header=HEADER)
    peer.close()
    return peer.client


def test_client_authenticates_to_real_router(real_router):
    """The client role logs in to jabberd2-router and accepts its rspauth."""
    client = login(real_router, "jabberd", "secret")
    assert client.authenticated and client.server_verified
    real_router.wait_for_log("authenticated as jabberd@jabberd-router", timeout=5)


def test_client_latin1_password_to_real_router(real_router):
    """A password with ISO 8859-1 characters hashes the way GNU SASL's server expects."""
    client = login(real_router, "lat", "p\u00e4ss")
    assert client.authenticated and client.server_verified


def test_real_router_refuses_wrong_password(real_router):
    """A wrong password gets not-authorized from the real router too."""
    peer = Peer(real_router.ip, real_router.port, timeout=10)
    with pytest.raises(AssertionError, match="SASL failed"):
        peer.authenticate("jabberd", "wrong", stream_header=HEADER)
    assert peer.client.failure.condition == "not-authorized"
    peer.close()


def serve_once(listener, sasl, result):
    """A minimal router: SASL with SaslServer, stream restart, wait for the first <bind/>."""
    try:
        conn, _ = listener.accept()
        with conn:
            r = Reader(conn)
            r.until(rb"<(?:\w+:)?stream[^>]*>")
            conn.sendall(HEADER + FEATURES_SASL)
            m = r.until(rb"<auth[^>]*mechanism=['\"]([^'\"]*)['\"][^>]*?(?:/>|>([^<]*)</auth>)")
            conn.sendall(sasl.on_element("auth", m.group(1).decode(), (m.group(2) or b"").decode()).to_bytes())
            m = r.until(rb"<response[^>]*?(?:/>|>([^<]*)</response>)")
            result["response"] = base64.b64decode(m.group(1) or b"")
            reply = sasl.on_element("response", None, (m.group(1) or b"").decode())
            result["reply"] = reply
            conn.sendall(reply.to_bytes())
            if reply.kind == "success":
                r.until(rb"<(?:\w+:)?stream[^>]*>")
                conn.sendall(HEADER + FEATURES_EMPTY)
                result["bind"] = r.until(rb"<bind[^>]*>").group(0)
    except Exception as exc:  # reported by the test thread
        result["error"] = exc


@pytest.mark.parametrize("daemon", [SM, C2S], ids=["sm", "c2s"])
def test_real_gsasl_client_authenticates_to_sasl_server(tmp_path, daemon):
    """The real sm/c2s (GNU SASL client) log in to SaslServer and go on to <bind/>."""
    if not os.access(daemon, os.X_OK):
        pytest.fail(f"{daemon} is not installed: run scripts/bootstrap")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(15)
    port = listener.getsockname()[1]
    users = {"jabberd": "secret"}
    sasl = SaslServer(users.get, "dGVzdC1ub25jZS0xMjM0NQ==")
    result = {}
    t = threading.Thread(target=serve_once, args=(listener, sasl, result), daemon=True)
    t.start()
    common = (f"<router><ip>127.0.0.1</ip><port>{port}</port><user>jabberd</user><pass>secret</pass>"
              f"<retry><init>0</init><lost>0</lost><sleep>1</sleep></retry></router>"
              f"<log type='file'><file>{tmp_path}/d.log</file></log><pidfile>{tmp_path}/d.pid</pidfile>")
    moddir = module_dir()
    if daemon == SM:
        (tmp_path / "fs").mkdir()
        xml = (f"<sm><id>sm</id>{common}<local><id>example.com</id></local><storage><path>{moddir}</path>"
               f"<driver>fs</driver><fs><path>{tmp_path}/fs</path></fs></storage></sm>")
    else:
        xml = (f"<c2s><id>c2s</id>{common}<local><id>example.com</id><ip>127.0.0.1</ip>"
               f"<port>{free_port()}</port></local>"
               f"<authreg><path>{moddir}</path><module>anon</module></authreg></c2s>")
    (tmp_path / "d.xml").write_text(xml)
    with ManagedProcess("daemon", [daemon, "-c", str(tmp_path / "d.xml")], tmp_path).spawn():
        try:
            t.join(20)
        finally:
            listener.close()
    assert "error" not in result, result.get("error")
    reply = result["reply"]
    assert reply.kind == "success", (reply, result["response"])
    assert reply.identity(None) == "jabberd@jabberd-router"
    assert result["response"].startswith(b'username="jabberd", realm="jabberd-router", nonce="dGVzdC1ub25jZS0xMjM0NQ==", ')
    assert b"<bind" in result["bind"]
