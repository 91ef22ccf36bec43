"""An in-memory router and scripted peers: the whole router without a socket.

``Network`` builds a ``core.Router`` with a ``Config``; ``Peer`` feeds bytes
into a ``Connection`` and reads back what the router queued for it, parsed
with a client-side stream reader so tests compare XML by meaning.
"""

import base64
import itertools

from lxml import etree

from jrouter.wire.connection import NS_ACCEPT, NS_COMPONENT, ConnectionClosed
from jrouter.config import Alias, Config
from jrouter.routing.router import Router
from jrouter.ops.logs import MemoryLog
from jrouter.testing.sasl_client import DigestMD5Client
from jrouter.wire.xmlstream import Element, StreamClose, StreamOpen, StreamReader

NS_C = NS_COMPONENT
STREAMS = "http://etherx.jabber.org/streams"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"


def header(ns=NS_C, version=True, to=None, from_=None):
    attrs = f" xmlns='{ns}'" if ns else ""
    attrs += " version='1.0'" if version else ""
    attrs += f" to='{to}'" if to else ""
    attrs += f" from='{from_}'" if from_ else ""
    return f"<?xml version='1.0'?><stream:stream xmlns:stream='{STREAMS}'{attrs}>".encode()


def canonical(el):
    """An element as comparable data: names, attributes in any order, text
    stripped, children in order (so <x/> equals <x></x>)."""
    return (el.tag, tuple(sorted(el.attrib.items())), (el.text or "").strip(),
            tuple(canonical(child) for child in el))


def xml(text, default_ns=NS_C):
    """Parse one expected element written in the test's own words."""
    wrapper = etree.fromstring(f"<w xmlns='{default_ns}'>{text}</w>".encode())
    return wrapper[0]


def same(actual, expected_text, default_ns=NS_C):
    return canonical(actual) == canonical(xml(expected_text, default_ns))


class Network:
    """One router, any number of peers, ids that count up."""

    def __init__(self, users=None, **settings):
        defaults = dict(
            secret="secret",
            acls={"all": frozenset({"jabberd"}), "log": frozenset({"logger"})},
            aliases=(Alias("lalias.example.com", "legacy.example.com"),),
            keepalive=0,
        )
        defaults.update(settings)
        self.config = Config(**defaults)
        self.log = MemoryLog()
        counter = itertools.count(1)
        self.router = Router(self.config, users or {"jabberd": "secret", "logger": "pwl"},
                             self.log, lambda: f"{next(counter):040d}", randint=lambda n: 0,
                             **({}))
        self._ports = itertools.count(40000)

    def peer(self):
        return Peer(self, next(self._ports))

    def component(self, name=None, user="jabberd", password="secret", **bind):
        """An authenticated jabberd2 component, bound to ``name`` if given."""
        peer = self.peer()
        peer.authenticate(user, password)
        if name:
            peer.bind(name, **bind)
        peer.take()
        return peer

    def legacy(self, name, secret="secret", instance=None):
        peer = self.peer()
        peer.handshake(name, secret, instance)
        peer.take()
        return peer

    def logged(self, text):
        return [m for level, m in self.log.records if text in m]


class Peer:
    def __init__(self, network, port):
        self.network = network
        self.connection = network.router.connect("127.0.0.1", port)
        self.reader = StreamReader()
        self.closed = False
        self.stream_id = None

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        try:
            self.connection.receive(data)
        except ConnectionClosed:
            self.closed = True
        if self.connection.closing:
            self.closed = True

    def hang_up(self):
        self.network.router.disconnect(self.connection)
        self.closed = True

    def raw(self):
        """The bytes the router queued for this peer since the last look."""
        return self.connection.data_to_send()

    def take(self):
        """What the router sent since the last look, as stream events; stanzas
        come as lxml elements."""
        events = []
        for event in self.reader.feed(self.raw()):
            if isinstance(event, StreamOpen):
                self.stream_id = event.attrs.get("id")
                events.append(event)
            elif isinstance(event, Element):
                events.append(event.tree())
            else:
                events.append(event)
        return events

    def stanzas(self):
        return [e for e in self.take() if not isinstance(e, (StreamOpen, StreamClose))]

    def restart_reader(self):
        self.reader = StreamReader()

    # -- scripted conversations ------------------------------------------------

    def authenticate(self, user="jabberd", password="secret", opened=False, stream_header=None):
        stream_header = stream_header or header()
        if not opened:
            self.send(stream_header)
            self.take()
        self.send(f"<auth xmlns='{NS_SASL}' mechanism='DIGEST-MD5'/>")
        (challenge,) = self.stanzas()
        client = DigestMD5Client(user, password, cnonce="0123456789abcdef")
        answer = client.respond(base64.b64decode(challenge.text))
        self.send(f"<response xmlns='{NS_SASL}'>{base64.b64encode(answer).decode()}</response>")
        (result,) = self.stanzas()
        assert result.tag == "{%s}success" % NS_SASL, etree.tostring(result)
        self.restart_reader()
        self.send(stream_header)
        return self.take()

    def bind(self, name, multi=None, default=False, log=False):
        children = ("<default/>" if default else "") + ("<log/>" if log else "")
        multi_attr = f" multi='{multi}'" if multi is not None else ""
        self.send(f"<bind name='{name}'{multi_attr}>{children}</bind>")

    def handshake(self, name, secret="secret", instance=None):
        import hashlib

        self.send(header(NS_ACCEPT, version=False, to=name, from_=instance))
        self.take()
        digest = hashlib.sha1((self.stream_id + secret).encode()).hexdigest()
        self.send(f"<handshake>{digest}</handshake>")
