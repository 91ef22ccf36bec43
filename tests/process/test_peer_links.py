"""jrouter/ops/peer_links.py on loopback (docs/cluster.md): links up, packets byte-identical
and in order, a node killed and back, a node that stops reading, replacement, keepalive and
dead links, TLS.

Both nodes run in this process's gevent hub (nothing is monkey-patched) unless a test needs a
node to die for real: then it is a child process (``_NODE_SCRIPT``) killed with SIGKILL.
Measured figures are printed (pytest -s shows them).
"""

import os
import signal
import socket as std_socket
import subprocess
import sys
import time

import gevent
import gevent.event
import gevent.socket
import pytest

from jrouter.errors import ListenError
from jrouter.ops.peer_links import PeerLinks, make_client_context
from jrouter.ops.tls import make_server_context
from jrouter.wire.peer_stream import Broadcast, Forwarded
from tests.support.ports import free_port
from tests.support.relay import MutingRelay
from tests.support.tls import make_pemfile

pytestmark = pytest.mark.timeout(60)

SECRET = "the cluster secret, 16+"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def route(i, size=250):
    """A 250-byte route numbered i."""
    head = b"<route to='sm' from='c2s'><message xmlns='jabber:client' id='%08d' to='u@example.com'><body>" % i
    tail = b"</body></message></route>"
    return head + b"x" * (size - len(head) - len(tail)) + tail


class Node:
    """One PeerLinks and what its callbacks saw."""

    def __init__(self, node_id, secret=SECRET, tunables=None, **kw):
        self.node_id = node_id
        self.got = []            # (from node, event)
        self.calls = []          # ("up"|"down", node, unsent)
        self.lines = []
        self.stall = None        # a gevent Event: on_packet waits on it when set here
        self.links = PeerLinks(node_id, secret, on_packet=self._packet, on_link_up=self._up,
                               on_link_down=self._down, log=self, **kw)
        for name, value in (tunables or {}).items():    # the class attributes, for this node
            setattr(self.links, name, value)

    def notice(self, message):
        self.lines.append(message)

    def _packet(self, node, event):
        self.got.append((node, event))
        if self.stall is not None:
            self.stall.wait()

    def _up(self, node):
        self.calls.append(("up", node, None))

    def _down(self, node, unsent):
        self.calls.append(("down", node, unsent))

    def ups(self):
        return [c for c in self.calls if c[0] == "up"]

    def downs(self):
        return [c for c in self.calls if c[0] == "down"]


def wait_for(predicate, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        gevent.sleep(0.005)


@pytest.fixture
def nodes():
    """make(node_id, **kw) -> Node; every PeerLinks made is stopped at teardown."""
    made = []

    def make(node_id, **kw):
        node = Node(node_id, **kw)
        made.append(node)
        return node

    yield make
    for node in made:
        if node.stall is not None:
            node.stall.set()
        node.links.stop(graceful=False)


def pair(nodes, **kw):
    """Node 'a' dialling node 'b' on a loopback port; both links up."""
    b = nodes("b", **kw.get("b", {}))
    port = b.links.listen("127.0.0.1", free_port())[1]
    a = nodes("a", **kw.get("a", {}))
    a.links.dial("b", "127.0.0.1", port)
    wait_for(lambda: a.ups() and b.ups(), what="the link up at both ends")
    return a, b, port


def send_many(node, to, count, first=0, batch=500):
    """Forward routes first..first+count-1 to `to` in batches (a router's reads); returns how many were taken."""
    taken = 0
    for i in range(first, first + count):
        if not node.links.forward(to, route(i), f"m{i % 7}", 1, tag=i):
            return taken
        taken += 1
        if taken % batch == 0:
            gevent.sleep(0)
    return taken


# -- up, packets, order ---------------------------------------------------------------------------


def test_a_dialled_link_comes_up_at_both_ends(nodes):
    """a dials b: on_link_up('b') at a, on_link_up('a') at b; linked() names the other node."""
    a, b, _port = pair(nodes)
    assert a.ups() == [("up", "b", None)] and b.ups() == [("up", "a", None)]
    assert a.links.linked() == ["b"] and b.links.linked() == ["a"]
    assert any("peer link with node 'a' up" in line for line in b.lines)


def test_ten_thousand_forwards_arrive_byte_identical_and_in_order(nodes):
    """10,000 forwards a -> b (and broadcasts b -> a): every route's bytes, member and hops as sent, in order."""
    a, b, _port = pair(nodes)
    started = time.perf_counter()
    assert send_many(a, "b", 10_000) == 10_000
    for i in range(100):
        assert b.links.broadcast("a", route(i, 300), 1)
    wait_for(lambda: len(b.got) == 10_000 and len(a.got) == 100, what="every packet")
    elapsed = time.perf_counter() - started
    assert [(n, e.route.raw, e.member, e.hops) for n, e in b.got] == [
        ("a", route(i), f"m{i % 7}", 1) for i in range(10_000)]
    assert all(isinstance(e, Forwarded) for _n, e in b.got)
    assert [(n, type(e), e.route.raw) for n, e in a.got] == [("b", Broadcast, route(i, 300)) for i in range(100)]
    stream = a.links.link_stream("b")
    print(f"\n10,000 forwards in one process (both ends on one CPU): {elapsed * 1e3:.0f} ms, "
          f"{10_000 / elapsed:,.0f} packets/s, {stream.counters.bytes_out / 10_000:.0f} bytes/packet on the wire")


def test_forward_to_a_node_without_a_link_is_not_taken(nodes):
    """forward/broadcast to a node with no open link return False (the router treats the packet as unsent)."""
    a = nodes("a")
    assert a.links.forward("b", route(1), "m", 1) is False
    assert a.links.broadcast("b", route(1), 1) is False


# -- a node killed, and back ------------------------------------------------------------------------

_NODE_SCRIPT = r"""
import sys, time
import gevent
from jrouter.ops.peer_links import PeerLinks
node, port, stall_after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
count = 0
def packet(peer, event):
    global count
    count += 1
    if count == stall_after:
        print("stalled", flush=True)
        time.sleep(60)            # blocks the whole process: nothing more is read
    if count % 10000 == 0:
        print("got", count, flush=True)
links = PeerLinks(node, "the cluster secret, 16+", on_packet=packet,
                  on_link_up=lambda n: print("up", n, flush=True),
                  on_link_down=lambda n, u: print("down", n, len(u), flush=True))
links.listen("127.0.0.1", port)
print("listening", flush=True)
gevent.sleep(60)
"""


class ChildNode:
    """Node 'b' in a child process, killed for real."""

    def __init__(self, port, stall_after=0):
        self.proc = subprocess.Popen([sys.executable, "-c", _NODE_SCRIPT, "b", str(port), str(stall_after)],
                                     cwd=ROOT, stdout=subprocess.PIPE)
        self.output = ""

    def expect(self, prefix, timeout=10.0):
        """Wait for a line starting with prefix (polling: nothing here may block the hub)."""
        fd = self.proc.stdout.fileno()
        os.set_blocking(fd, False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                chunk = b""
            self.output += chunk.decode()
            for line in self.output.splitlines():
                if line.startswith(prefix):
                    return line
            gevent.sleep(0.01)
        raise AssertionError(f"child never said {prefix!r} (said {self.output!r})")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=5)
        self.proc.stdout.close()


def test_a_killed_node_is_seen_down_with_the_unsent_packets_then_redialled(nodes):
    """b stops reading, a's queue grows, b is SIGKILLed: a gets link_down with a contiguous tail of
    unsent packets; b comes back on the same port and a's link is up again."""
    port = free_port()
    child = ChildNode(port, stall_after=100)
    try:
        child.expect("listening")
        a = nodes("a", queue_limit=64 << 20, tunables={"backoff_max": 0.5})
        a.links.dial("b", "127.0.0.1", port)
        wait_for(lambda: a.ups(), what="link up")
        total = send_many(a, "b", 60_000)       # ~15 MB: past the loopback socket buffers
        assert total == 60_000
        child.expect("stalled")
        wait_for(lambda: a.links.link_stream("b").buffered > 1 << 20, what="a backlog")
        child.proc.send_signal(signal.SIGKILL)
        while child.proc.poll() is None:
            gevent.sleep(0.001)
        killed = time.monotonic()           # b's process is gone (its sockets reset)
        wait_for(lambda: a.downs(), what="link_down")
        seen_down = time.monotonic() - killed
        (_down, node, unsent) = a.downs()[0]
        tags = [u.tag for u in unsent]
        assert node == "b" and tags, "a backlog was queued when b died"
        assert tags == list(range(tags[0], total)), "the unsent packets are the newest, in order"
        assert tags[0] <= 100, "b read 100: no packet it did not read is missing"
        assert all(u.route_raw == route(u.tag) and u.member == f"m{u.tag % 7}" for u in unsent)
        print(f"\nb killed: link_down {seen_down * 1e3:.1f} ms after its process was gone, {len(unsent)} of {total} packets "
              f"handed back; {tags[0]} acknowledged by b (it read 100, then stalled before saying so)")
        child = ChildNode(port)
        back = time.monotonic()
        child.expect("listening")
        wait_for(lambda: len(a.ups()) == 2, timeout=10, what="the link up again")
        print(f"b back: link up again {(time.monotonic() - back) * 1e3:.0f} ms after b was started")
        assert a.links.forward("b", route(1), "m", 1)
    finally:
        child.kill()


def test_a_node_back_on_its_port_is_redialled_in_process(nodes):
    """b stopped at once (reset), a sees it down and dials again with backoff; a new b on the port gets the link."""
    a, b, port = pair(nodes, a={"tunables": {"backoff_max": 0.3}})
    b.links.stop(graceful=False)
    wait_for(lambda: a.downs(), what="link_down at a")
    gevent.sleep(0.5)                       # a few refused dials
    b2 = nodes("b")
    b2.links.listen("127.0.0.1", port)
    wait_for(lambda: len(a.ups()) == 2 and b2.ups(), timeout=5, what="the link up again")
    assert sum("cannot reach node 'b'" in line for line in a.lines) == 1, "one line per episode"


# -- bounds ------------------------------------------------------------------------------------------


def test_a_node_that_stops_reading_overflows_the_bound_and_its_packets_come_back(nodes):
    """b stops reading; a's queue passes queue_limit (1 MiB): the link closes, every packet b has not
    said it read comes back through on_link_down (what b reads afterwards from its socket is then a
    duplicate, never a loss), forward says False from then on."""
    a, b, _port = pair(nodes, a={"queue_limit": 1 << 20})
    b.stall = gevent.event.Event()
    taken = send_many(a, "b", 200_000)
    assert taken < 200_000, "the bound was reached"
    wait_for(lambda: a.downs(), what="link_down after the overflow")
    (_down, node, unsent) = a.downs()[0]
    tags = [u.tag for u in unsent]
    assert node == "b" and tags == list(range(tags[0], taken))
    marker = len(b"<f xmlns='urn:jrouter:peer:0' h='1' m='m0' n='00001'/>")   # members rotate: one each
    assert sum(marker + len(u.route_raw) for u in unsent) > 1 << 20, "all that waited comes back"
    assert a.links.forward("b", route(1), "m", 1) is False
    assert any("is not reading: more than 1048576 bytes queued" in line for line in a.lines)
    b.stall.set()
    wait_for(lambda: b.downs(), what="b sees the link down")
    received = [e.route.raw for _n, e in b.got]
    assert received == [route(i) for i in range(len(received))], "what b read is a prefix, in order"
    assert tags[0] <= len(received), "nothing b never read is missing from what came back"
    print(f"\noverflow: {taken} packets taken, {len(unsent)} handed back ({tags[0]} acknowledged by b); "
          f"b read {len(received) - tags[0]} of those from its socket after the close (duplicates)")


def test_after_a_link_lost_between_live_nodes_the_new_hello_says_how_many_routes_were_read(nodes):
    """b reads 300 routes but its acknowledgements never reach a (the relay drops b's writes);
    the relay is cut: a hands back all 300, numbered 1..300 on the lost link's sequence. On the
    new link b's hello says it read 300 of that sequence (docs/cluster.md §3, Resuming), so
    the router can skip them instead of sending duplicates."""
    b = nodes("b")
    b_port = b.links.listen("127.0.0.1", free_port())[1]
    relay = MutingRelay("127.0.0.1", b_port)
    try:
        a = nodes("a", tunables={"backoff_first": 0.05, "backoff_max": 0.1})
        a.links.dial("b", "127.0.0.1", relay.port)
        wait_for(lambda: a.ups() and b.ups(), what="the link up at both ends")
        assert a.links.link_stream("b").peer_read is None       # a first link: nothing to resume
        relay.mute = True
        assert send_many(a, "b", 300) == 300
        wait_for(lambda: len(b.got) == 300, what="b reads all 300")
        assert a.links.link_stream("b").unread > 0, "no acknowledgement reached a"
        relay.mute = False
        relay.cut()
        wait_for(lambda: a.downs() and b.downs(), what="the link down at both ends")
        (_down, _node, unsent) = a.downs()[0]
        assert [u.tag for u in unsent] == list(range(300))
        assert [u.number for u in unsent] == list(range(1, 301))
        sequence = unsent[0].sequence
        assert sequence and {u.sequence for u in unsent} == {sequence}
        wait_for(lambda: len(a.ups()) == 2 and len(b.ups()) == 2, what="the new link up")
        assert a.links.link_stream("b").peer_read == (sequence, 300)
        assert b.links.link_stream("a").peer_read[1] == 0     # b sent a nothing
        assert a.links.link_stream("b").sequence != sequence   # the new link numbers afresh
    finally:
        relay.stop()


# -- replacement, keepalive, dead links, refusals ----------------------------------------------------


def test_a_new_link_from_a_linked_node_replaces_the_old_one_down_first(nodes):
    """A second link from node 'a' (it restarted): b reports the old one down, then the new one up."""
    a, b, port = pair(nodes, a={"tunables": {"backoff_first": 30.0, "backoff_max": 30.0}})
    a2 = nodes("a")      # the old a waits 30 s before it dials again
    a2.links.dial("b", "127.0.0.1", port)
    wait_for(lambda: a2.ups() and len(b.ups()) == 2, what="the new link up")
    assert [c[:2] for c in b.calls] == [("up", "a"), ("down", "a"), ("up", "a")]
    wait_for(lambda: a.downs(), what="the old link down at the old a")
    assert a2.links.forward("b", route(5), "m", 1)
    wait_for(lambda: b.got, what="a packet on the new link")


def test_keepalive_spaces_keep_a_quiet_link_up_and_a_silent_one_is_closed(nodes):
    """keepalive 0.1 s, dead after 0.5 s: with both ends pinging the link outlives 1.2 s; when b
    stops pinging, a closes the link."""
    fast = {"tunables": {"keepalive": 0.1, "dead_after": 0.5}}
    a, b, _port = pair(nodes, a=fast, b=fast)
    gevent.sleep(1.2)
    assert not a.downs() and not b.downs()
    assert a.links.link_stream("b").counters.bytes_in > 0
    b.links.keepalive = 1000.0
    started = time.monotonic()
    wait_for(lambda: a.downs(), timeout=3, what="a closes the silent link")
    assert any("silent for 0.5 s" in line for line in a.lines)
    print(f"\nsilent link closed after {time.monotonic() - started:.2f} s (dead_after 0.5 s)")


def test_a_wrong_secret_never_brings_a_link_up(nodes):
    """A node dialling with another secret: not-authorized, no link_up at either end."""
    b = nodes("b")
    port = b.links.listen("127.0.0.1", free_port())[1]
    a = nodes("a", secret="another secret, 16 chars")
    a.links.dial("b", "127.0.0.1", port)
    wait_for(lambda: any("not-authorized" in line for line in a.lines)
             and any("not-authorized" in line for line in b.lines), what="the refusal at both ends")
    gevent.sleep(0.2)
    assert not a.ups() and not b.ups()


def test_a_connection_that_never_negotiates_is_closed_at_the_deadline(nodes):
    """A TCP peer that says nothing is closed after negotiation_timeout, with a log line."""
    b = nodes("b", tunables={"negotiation_timeout": 0.3})
    port = b.links.listen("127.0.0.1", free_port())[1]
    sock = gevent.socket.create_connection(("127.0.0.1", port), timeout=3)
    try:
        sock.settimeout(3)
        data = b""
        started = time.monotonic()
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        assert 0.2 < time.monotonic() - started < 2
        assert any("not open within 0.3 s" in line for line in b.lines)
    finally:
        sock.close()


def test_listening_on_a_taken_port_is_a_listen_error(nodes):
    """A port already bound: ListenError with the jabberd2-style line."""
    holder = std_socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    try:
        with pytest.raises(ListenError, match="unable to listen for peer links"):
            nodes("b").links.listen("127.0.0.1", holder.getsockname()[1])
    finally:
        holder.close()


def test_hang_up_closes_the_link_and_stops_dialling(nodes):
    """hang_up('b'): the link closes politely at both ends and a does not dial b again."""
    a, b, _port = pair(nodes, a={"tunables": {"backoff_first": 0.05}})
    a.links.hang_up("b")
    wait_for(lambda: a.downs() and b.downs(), what="both ends down")
    gevent.sleep(0.3)
    assert len(a.ups()) == 1 and len(b.ups()) == 1 and a.links.linked() == []


def test_a_graceful_stop_closes_with_the_stream_close_and_reports_both_ends(nodes):
    """stop(): </stream:stream> both ways; each end reports the link down, nothing unsent."""
    a, b, _port = pair(nodes)
    send_many(a, "b", 100)
    wait_for(lambda: len(b.got) == 100, what="the packets")
    a.links.stop()
    wait_for(lambda: a.downs() and b.downs(), what="both ends down")
    assert a.downs()[0][2] == [] and b.downs()[0][2] == []


# -- TLS -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pemfile(tmp_path_factory):
    return str(make_pemfile(tmp_path_factory.mktemp("peer-tls")))


def test_with_a_pemfile_links_run_over_tls_and_packets_stay_byte_identical(nodes, pemfile):
    """b offers STARTTLS (and requires it), a requires it: the link is TLS at both ends; 1,000 routes arrive intact."""
    a, b, _port = pair(nodes, b={"server_tls": make_server_context(pemfile), "require_tls": True},
                       a={"server_tls": make_server_context(pemfile), "require_tls": True})
    assert a.links.link_stream("b").tls_active and b.links.link_stream("a").tls_active
    assert send_many(a, "b", 1000) == 1000
    wait_for(lambda: len(b.got) == 1000, what="every packet over TLS")
    assert [e.route.raw for _n, e in b.got] == [route(i) for i in range(1000)]


def test_with_a_cafile_the_dialler_links_only_to_a_node_whose_certificate_the_ca_signed(nodes, tmp_path, pemfile):
    """<peer><cafile>: a dials b with b's (self-signed) certificate as its CA: the link comes up over TLS.
    A CA that did not sign b's certificate: the handshake fails, the link never comes up."""
    ca = pemfile + ".crt"                      # make_pemfile keeps the certificate beside the PEM
    a, b, _port = pair(nodes, b={"server_tls": make_server_context(pemfile), "require_tls": True},
                       a={"client_tls": make_client_context(ca)})
    assert a.links.link_stream("b").tls_active
    other_ca = str(make_pemfile(tmp_path, "other.pem")) + ".crt"
    c = nodes("c", server_tls=make_server_context(pemfile), require_tls=True)
    port = c.links.listen("127.0.0.1", free_port())[1]
    d = nodes("b", client_tls=make_client_context(other_ca))     # 'b' < 'c': b dials
    d.links.dial("c", "127.0.0.1", port)
    wait_for(lambda: any("CERTIFICATE_VERIFY_FAILED" in line or "certificate verify failed" in line
                         for line in d.lines), what="the refused certificate")
    assert not d.ups() and not c.ups()


def test_a_node_requiring_tls_refuses_a_node_without_it(nodes, pemfile):
    """a requires TLS, b offers none: policy-violation, the link never comes up."""
    b = nodes("b")
    port = b.links.listen("127.0.0.1", free_port())[1]
    a = nodes("a", server_tls=make_server_context(pemfile), require_tls=True)
    a.links.dial("b", "127.0.0.1", port)
    wait_for(lambda: any("policy-violation" in line for line in a.lines), what="the refusal")
    assert not a.ups() and not b.ups()
