"""A blocking jabberd2-protocol / XEP-0114 test peer for process-level tests.

Speaks to a router process on loopback with plain sockets and bounded
timeouts; parses what it receives with jrouter's own stream reader so tests
can look at elements (lxml) rather than bytes.
"""

import base64
import hashlib
import socket
import ssl
import time

from jrouter.testing.sasl_client import DigestMD5Client
from jrouter.wire.xmlstream import Element, StreamClose, StreamOpen, StreamReader

NS_C = "http://jabberd.jabberstudio.org/ns/component/1.0"
NS_ACCEPT = "jabber:component:accept"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
STREAMS = "http://etherx.jabber.org/streams"


def header(ns=NS_C, version=True, to=None):
    attrs = f" xmlns='{ns}'" + (" version='1.0'" if version else "") + (f" to='{to}'" if to else "")
    return f"<?xml version='1.0'?><stream:stream xmlns:stream='{STREAMS}'{attrs}>".encode()


class PeerClosed(Exception):
    """The router closed the connection."""


class Peer:
    """One TCP connection to a router under test."""

    def __init__(self, host, port, timeout=5.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self.reader = StreamReader()
        self.events = []
        self.stream_id = None
        self.eof = False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data):
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def _pump(self, deadline):
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return
        for event in self.reader.feed(data):
            if isinstance(event, StreamOpen):
                self.stream_id = event.attrs.get("id")
            self.events.append(event)

    def next(self, timeout=None):
        """The next event (StreamOpen, lxml element or StreamClose); raises
        PeerClosed on EOF and TimeoutError when nothing comes in time."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self.events:
            if self.eof:
                raise PeerClosed()
            if time.monotonic() >= deadline:
                raise TimeoutError("nothing received")
            self._pump(deadline)
        event = self.events.pop(0)
        return event.tree() if isinstance(event, Element) else event

    def stanza(self, timeout=None):
        """The next top-level element, skipping stream headers."""
        while True:
            event = self.next(timeout)
            if not isinstance(event, (StreamOpen, StreamClose)):
                return event

    def route(self, timeout=None):
        """The next <route/>, skipping advertisements."""
        while True:
            stanza = self.stanza(timeout)
            if stanza.tag.endswith("}route"):
                return stanza

    def quiet(self, seconds=0.3):
        """True when nothing at all arrives for ``seconds``."""
        try:
            self.next(seconds)
        except TimeoutError:
            return True
        return False

    def read_until_eof(self, timeout=None):
        """Every event until the router closes the connection."""
        events = []
        try:
            while True:
                events.append(self.next(timeout))
        except PeerClosed:
            return events

    def starttls(self):
        """Open a stream, ask for STARTTLS and finish the TLS handshake;
        returns the features that offered it."""
        self.send(header())
        self.next()
        features = self.stanza()
        self.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        proceed = self.stanza()
        if not proceed.tag.endswith("}proceed"):
            raise AssertionError(f"no <proceed/>: {proceed.tag}")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")
        self.reader = StreamReader()
        return features

    def authenticate(self, user="jabberd", password="secret", opened=False):
        if not opened:
            self.send(header())
            self.next()                  # header
            self.stanza()                # features
        self.send(f"<auth xmlns='{NS_SASL}' mechanism='DIGEST-MD5'/>")
        challenge = self.stanza()
        client = DigestMD5Client(user, password)
        answer = client.respond(base64.b64decode(challenge.text))
        self.send(f"<response xmlns='{NS_SASL}'>{base64.b64encode(answer).decode()}</response>")
        result = self.stanza()
        if not result.tag.endswith("}success"):
            raise AssertionError(f"SASL failed: {result.tag}")
        self.reader = StreamReader()
        self.send(header())
        self.next()
        self.stanza()                    # empty features
        return self

    def bind(self, name, extra=""):
        self.send(f"<bind name='{name}'{extra}/>")
        reply = self.stanza()
        if reply.get("error"):
            raise AssertionError(f"bind {name} refused: {reply.get('error')}")
        return self

    def handshake(self, name, secret="secret"):
        self.send(header(NS_ACCEPT, version=False, to=name))
        self.next()
        digest = hashlib.sha1((self.stream_id + secret).encode()).hexdigest()
        self.send(f"<handshake>{digest}</handshake>")
        reply = self.stanza()
        if not reply.tag.endswith("handshake"):
            raise AssertionError("handshake refused")
        return self

    def drain(self, seconds=0.2):
        """Drop whatever arrives within ``seconds`` (advertisements)."""
        got = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                got.append(self.next(max(0.01, deadline - time.monotonic())))
            except (TimeoutError, PeerClosed):
                break
        return got
