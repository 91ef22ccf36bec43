"""A blocking jabberd2-protocol / XEP-0114 test peer for process-level tests.

Owns: one loopback socket to a router process, with bounded timeouts, and a
queue of what arrived.  The protocol is ``jrouter.testing.component_client``'s:
it parses what arrives (so tests look at lxml elements rather than bytes) and
answers the negotiation; this module only carries its bytes.
Must not know: the protocol's bytes.
"""

import socket
import ssl
import time

from jrouter.testing.component_client import (
    NS_ACCEPT, AuthFailed, Authenticated, BindRefused, Bound, ComponentClient, Event,
    ProceedToTls, header)
from jrouter.wire.xmlstream import Element, StreamClose, StreamOpen


class PeerClosed(Exception):
    """The router closed the connection."""


class Peer:
    """One TCP connection to a router under test."""

    def __init__(self, host, port, timeout=5.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self.client = ComponentClient()
        self.events = []        # what arrived and nobody took yet, the client's readings included
        self.eof = False

    @property
    def stream_id(self):
        return self.client.stream_id

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data):
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def _flush(self):
        data = self.client.data_to_send()
        if data:
            self.send(data)

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
        self.events += self.client.receive(data)
        self._flush()           # the client's answers (SASL response, restarted header)

    def _pop(self, timeout):
        """The next thing that arrived, the client's readings included."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self.events:
            if self.eof:
                raise PeerClosed()
            if time.monotonic() >= deadline:
                raise TimeoutError("nothing received")
            self._pump(deadline)
        return self.events.pop(0)

    def _outcome(self, *kinds):
        """Skip what arrives up to the client's reading of one of ``kinds``; return it."""
        while True:
            event = self._pop(None)
            if isinstance(event, kinds):
                return event

    def next(self, timeout=None):
        """The next event (StreamOpen, lxml element or StreamClose); raises
        PeerClosed on EOF and TimeoutError when nothing comes in time."""
        while True:
            event = self._pop(timeout)
            if not isinstance(event, Event):
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

    def _open(self, stream_header=None):
        """Our header; the router's header and features."""
        self.client.open(stream_header)
        self._flush()
        self.next()
        return self.stanza()

    def starttls(self):
        """Open a stream, ask for STARTTLS and finish the TLS handshake;
        returns the features that offered it."""
        features = self._open()
        self.client.starttls()
        self._flush()
        self._outcome(ProceedToTls)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")
        return features

    def authenticate(self, user="jabberd", password="secret", opened=False, stream_header=None):
        """SASL DIGEST-MD5 and the restarted stream (``stream_header``: what to
        open with, and again after SASL)."""
        if not opened:
            self._open(stream_header)
        self.client.authenticate(user, password)
        self._flush()
        outcome = self._outcome(Authenticated, AuthFailed)
        if isinstance(outcome, AuthFailed):
            raise AssertionError(f"SASL failed: {outcome}")
        self.next()                  # the new stream's header
        self.stanza()                # empty features
        return self

    def bind(self, name, extra=""):
        self.client.bind(name, extra=extra)
        self._flush()
        outcome = self._outcome(Bound, BindRefused)
        if isinstance(outcome, BindRefused):
            raise AssertionError(f"bind {name} refused: {outcome.error}")
        return self

    def handshake(self, name, secret="secret", instance=None):
        """XEP-0114 header (``instance``: its 'from', the copy's identity) and handshake."""
        self.client.open(header(NS_ACCEPT, version=False, to=name, from_=instance))
        self._flush()
        self.next()
        self.client.handshake(secret)
        self._flush()
        if isinstance(self._outcome(Authenticated, AuthFailed), AuthFailed):
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
