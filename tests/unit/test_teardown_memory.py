"""A closed connection is freed by reference counting alone (issue 10,
finding 4): no cycle through the stream reader's expat handlers or the
shell's output hook waits for the garbage collector, which under connection
churn let closed connections pile up between collections."""

import gc
import sys
import weakref

import pytest

from jrouter.wire import framing
from jrouter.wire.xmlstream import StreamReader

from .harness import Network

pytestmark = pytest.mark.usefixtures("framer")


@pytest.fixture
def no_collector():
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    yield
    if was_enabled:
        gc.enable()


def test_a_released_reader_is_freed_without_the_collector(no_collector, framer):
    reader = StreamReader()
    reader.feed(b"<stream:stream xmlns='jabber:component:accept' "
                b"xmlns:stream='http://etherx.jabber.org/streams'><message to='a'><body>hi")
    gone = weakref.ref(reader)
    framer_gone = _framer_gone(reader)
    reader.release()
    del reader
    assert gone() is None
    assert framer_gone()


def test_an_unreleased_reader_leaves_its_framer_to_the_collector_only_with_pyexpat(no_collector, framer):
    """What release() is for: pyexpat's framer is in a cycle with its
    handlers, its own methods, and lives on until a collection. The C one
    holds nothing that refers back to it."""
    reader = StreamReader()
    framer_gone = _framer_gone(reader)
    del reader
    if framer == "expat":
        assert not framer_gone()
        gc.collect()
    assert framer_gone()


def _framer_gone(reader):
    """A test of whether the reader's framer is freed. The C framer takes no
    weak reference: freed with the reader if nothing else holds it."""
    framer = reader._framer
    if isinstance(framer, framing.ExpatFramer):
        ref = weakref.ref(framer)
        return lambda: ref() is None
    holders = sys.getrefcount(framer) - 2       # beyond `framer` and the call's argument
    assert holders == 1, holders                # the reader
    return lambda: True


@pytest.mark.parametrize("protocol", ["jabberd2", "xep0114"])
def test_a_closed_connection_is_freed_without_the_collector(no_collector, protocol):
    net = Network()
    other = net.component("other.example.com")
    if protocol == "jabberd2":
        peer = net.component("leaving.example.com")
        peer.send("<route to='other.example.com' from='leaving.example.com'>"
                  "<message to='x@other.example.com'/></route>")
    else:
        peer = net.legacy("leaving.example.com")
        peer.send("<message to='x@other.example.com' from='leaving.example.com'/>")
    other.take()
    connection = peer.connection
    connection.outbox.on_output = _ShellPeer(connection).mark    # a cycle, as in ops.server
    gone, reader_gone = weakref.ref(connection), weakref.ref(connection.reader)
    peer.hang_up()
    del peer, connection
    assert gone() is None
    assert reader_gone() is None


class _ShellPeer:
    """As ``ops.server._Peer``: it holds its connection, whose output hook is its method."""

    def __init__(self, connection):
        self.connection = connection

    def mark(self):
        pass


def test_quiet_connections_rest_and_wake_up():
    """Router.rest_idle: connections silent for the quiet time let their
    parsers go; the next packet wakes them and is routed as ever."""
    net = Network()
    sender, receiver = net.component("a.example.com"), net.component("b.example.com")
    busy = net.component("c.example.com")
    sender.connection.last_activity = receiver.connection.last_activity = 10.0
    busy.connection.last_activity = 95.0
    assert net.router.rest_idle(100.0, 30.0) == 2
    assert sender.connection.reader._framer is None and busy.connection.reader._framer is not None
    assert net.router.rest_idle(100.0, 30.0) == 0          # already resting
    sender.send("<route to='b.example.com' from='a.example.com'>"
                "<message xmlns='jabber:client' to='x@b.example.com' id='m1'/></route>")
    (route,) = [s for s in receiver.stanzas() if s.tag.endswith("}route")]
    assert route[0].get("id") == "m1"
