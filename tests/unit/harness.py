"""An in-memory router and scripted peers: the whole router without a socket.

``Network`` builds a ``core.Router`` with a ``Config``; ``Peer`` feeds bytes
into a ``Connection`` and hands what the router queued for it to a
``ComponentClient`` (jrouter.testing.component_client), which answers the
negotiation and parses the rest, so tests compare XML by meaning.
"""

import itertools

from lxml import etree

from jrouter.wire.connection import ConnectionClosed
from jrouter.config import Alias, Config
from jrouter.routing.router import Router
from jrouter.ops.logs import MemoryLog
from jrouter.testing.component_client import (NS_ACCEPT, NS_COMPONENT, NS_SASL, AuthFailed,
                                              Authenticated, ComponentClient, Event, header)
from jrouter.wire.xmlstream import STREAMS_NS, Element, StreamClose, StreamOpen

NS_C = NS_COMPONENT
STREAMS = STREAMS_NS
__all__ = ["NS_ACCEPT", "NS_C", "NS_SASL", "STREAMS", "header", "same", "Network", "Peer"]


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
                             self.log, lambda: f"{next(counter):040d}", randint=lambda n: 0)
        self._ports = itertools.count(40000)
        self.now = 0.0          # the network's clock: what every peer's bytes arrive at

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

    def settle(self):
        """What the shell does after each read: route again what dead peers
        left, and end the streams of peers that stopped reading."""
        router = self.router
        for connection in list(router.connections):
            if connection.outbox.overflowed:
                router.overflowed(connection, self.now)
        while router.redeliver(self.now):
            pass

    def logged(self, text):
        return [m for level, m in self.log.records if text in m]


class Peer:
    """One component on the in-memory network; ``client`` speaks its side of the protocol."""

    def __init__(self, network, port):
        self.network = network
        self.connection = network.router.connect("127.0.0.1", port)
        self.connection.connected_at = network.now     # the shell's stamp
        self.client = ComponentClient()
        self.closed = False

    @property
    def reader(self):
        return self.client.reader

    @property
    def stream_id(self):
        return self.client.stream_id

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        try:
            self.connection.receive(data, self.network.now)
        except ConnectionClosed:
            self.closed = True
        if self.connection.closing:
            self.closed = True
        self.network.settle()

    def hang_up(self):
        """The socket is gone: the router forgets the peer, and routes again
        what was queued for it, slice by slice as the shell would ask."""
        self.network.router.disconnect(self.connection, self.network.now)
        self.network.settle()
        self.closed = True

    def raw(self):
        """The bytes the router queued for this peer since the last look,
        written to the peer as the shell does (``outbox.sent``)."""
        data = self.connection.data_to_send()
        self.connection.outbox.sent(len(data))
        return data

    def flush(self):
        """Send what the client has queued."""
        data = self.client.data_to_send()
        if data:
            self.send(data)

    def converse(self):
        """Send what the client queued, and what it queued in answer, until it
        has nothing more to say; every event that came back, in order."""
        events = []
        while (data := self.client.data_to_send()):
            self.send(data)
            events += self.client.receive(self.raw())
        return events

    def take(self):
        """What the router sent since the last look, as stream events; stanzas
        come as lxml elements."""
        return stream_events(self.client.receive(self.raw()))

    def stanzas(self):
        return [e for e in self.take() if not isinstance(e, (StreamOpen, StreamClose))]

    def restart_reader(self):
        self.client.restart()

    # -- scripted conversations ------------------------------------------------

    def authenticate(self, user="jabberd", password="secret", opened=False, stream_header=None):
        """SASL, then the restarted stream; its events (header, features)."""
        client = self.client
        client.stream_header = stream_header or client.stream_header
        if not opened:
            client.open()
            self.converse()
        client.authenticate(user, password, cnonce="0123456789abcdef")
        events = self.converse()
        outcome = next(e for e in events if isinstance(e, (Authenticated, AuthFailed)))
        if isinstance(outcome, AuthFailed):
            raise AssertionError(f"SASL failed: {outcome}")
        return stream_events(events[events.index(outcome) + 1:])

    def bind(self, name, multi=None, default=False, log=False):
        """Ask for ``name``; the reply is left for the test to take."""
        self.client.bind(name, multi=multi, default=default, log=log)
        self.flush()

    def handshake(self, name, secret="secret", instance=None):
        """XEP-0114 header and handshake; the reply is left for the test to take."""
        self.client.open(header(NS_ACCEPT, version=False, to=name, from_=instance))
        self.flush()
        self.take()
        self.client.handshake(secret)
        self.flush()


def stream_events(events):
    """The stream's own events (stanzas as lxml elements), without the client's readings."""
    return [e.tree() if isinstance(e, Element) else e for e in events if not isinstance(e, Event)]
