"""jrouter.wire.sasl against the real thing: Debian's jabberd2-router, -sm and -c2s (GNU SASL) on loopback."""

import base64
import os
import re
import socket
import subprocess
import threading
import time

import pytest

from jrouter.wire.sasl import SaslServer
from jrouter.testing.sasl_client import DigestMD5Client

ROUTER = "/usr/sbin/jabberd2-router"
SM = "/usr/sbin/jabberd2-sm"
C2S = "/usr/sbin/jabberd2-c2s"

NS_C = "http://jabberd.jabberstudio.org/ns/component/1.0"
HEADER = ("<?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' "
          f"xmlns='{NS_C}' to='localhost' version='1.0'>").encode()
FEATURES_SASL = (b"<stream:features xmlns:stream='http://etherx.jabber.org/streams'><mechanisms "
                 b"xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>DIGEST-MD5</mechanism>"
                 b"</mechanisms></stream:features>")
FEATURES_EMPTY = b"<stream:features xmlns:stream='http://etherx.jabber.org/streams'></stream:features>"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def wait_listening(port, proc, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError("daemon exited early")
        with open("/proc/net/tcp") as f:
            if any(line.split()[1].endswith(":%04X" % port) and line.split()[3] == "0A"
                   for line in f.readlines()[1:]):
                return
        time.sleep(0.05)
    raise AssertionError("router did not listen")


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def real_router(tmp_path):
    if not os.access(ROUTER, os.X_OK):
        pytest.fail("jabberd2-router is not installed: run scripts/bootstrap")
    port = free_port()
    (tmp_path / "router-users.xml").write_text(
        "<users><user><name>jabberd</name><secret>secret</secret></user>"
        "<user><name>lat</name><secret>p&#xe4;ss</secret></user></users>")
    (tmp_path / "router.xml").write_text(f"""<router><id>router</id>
  <pidfile>{tmp_path}/router.pid</pidfile>
  <log type='file'><file>{tmp_path}/router.log</file></log>
  <local><ip>127.0.0.1</ip><port>{port}</port><users>{tmp_path}/router-users.xml</users></local>
  <check><interval>0</interval><keepalive>0</keepalive></check>
  <io><max_fds>64</max_fds><limits><bytes>0</bytes><connects>0</connects></limits></io>
  <aci><acl type='all'><user>jabberd</user></acl></aci></router>""")
    proc = subprocess.Popen([ROUTER, "-c", str(tmp_path / "router.xml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, proc)
        yield port, tmp_path
    finally:
        stop(proc)


def login(port, user, password):
    """One DIGEST-MD5 exchange with a router; returns (reply element, client)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        r = Reader(s)
        s.sendall(HEADER)
        r.until(rb"</stream:features>")
        s.sendall(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='DIGEST-MD5'/>")
        challenge = base64.b64decode(r.until(rb"<challenge[^>]*>([^<]*)</challenge>").group(1))
        client = DigestMD5Client(user, password)
        s.sendall(b"<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
                  + base64.b64encode(client.respond(challenge)) + b"</response>")
        m = r.until(rb"<(success|failure)[^>]*>(.*?)</\1>")
        if m.group(1) == b"success":  # the router logs the identity on the restarted stream
            s.sendall(HEADER)
            r.until(rb"</stream:features>|<stream:features[^>]*/>")
        return m, client


def test_client_authenticates_to_real_router(real_router):
    """DigestMD5Client logs in to jabberd2-router and accepts its rspauth."""
    port, tmp = real_router
    m, client = login(port, "jabberd", "secret")
    assert m.group(1) == b"success"
    assert client.verify(base64.b64decode(m.group(2)))
    deadline = time.monotonic() + 5
    while b"authenticated as jabberd@jabberd-router" not in (tmp / "router.log").read_bytes():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_client_latin1_password_to_real_router(real_router):
    """A password with ISO 8859-1 characters hashes the way GNU SASL's server expects."""
    m, client = login(real_router[0], "lat", "p\u00e4ss")
    assert m.group(1) == b"success" and client.verify(base64.b64decode(m.group(2)))


def test_real_router_refuses_wrong_password(real_router):
    """A wrong password gets not-authorized from the real router too."""
    m, _ = login(real_router[0], "jabberd", "wrong")
    assert m.group(1) == b"failure" and b"<not-authorized/>" in m.group(2)


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
    moddir = next((d for d in ("/usr/lib/x86_64-linux-gnu/jabberd2", "/usr/lib/jabberd2")
                   if os.path.isdir(d)), "/usr/lib/jabberd2")
    if daemon == SM:
        (tmp_path / "fs").mkdir()
        xml = (f"<sm><id>sm</id>{common}<local><id>example.com</id></local><storage><path>{moddir}</path>"
               f"<driver>fs</driver><fs><path>{tmp_path}/fs</path></fs></storage></sm>")
    else:
        xml = (f"<c2s><id>c2s</id>{common}<local><id>example.com</id><ip>127.0.0.1</ip>"
               f"<port>{free_port()}</port></local>"
               f"<authreg><path>{moddir}</path><module>anon</module></authreg></c2s>")
    (tmp_path / "d.xml").write_text(xml)
    proc = subprocess.Popen([daemon, "-c", str(tmp_path / "d.xml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t.join(20)
    finally:
        stop(proc)
        listener.close()
    assert "error" not in result, result.get("error")
    reply = result["reply"]
    assert reply.kind == "success", (reply, result["response"])
    assert reply.identity(None) == "jabberd@jabberd-router"
    assert result["response"].startswith(b'username="jabberd", realm="jabberd-router", nonce="dGVzdC1ub25jZS0xMjM0NQ==", ')
    assert b"<bind" in result["bind"]
