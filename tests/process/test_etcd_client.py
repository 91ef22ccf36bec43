"""jrouter/ops/etcd_client.py against a real etcd on loopback (issue 13): keys,
create-if-absent, leases, watches, and etcd going away and coming back.

The client runs in this process's gevent hub; etcd is Debian's etcd-server
(tests/support/etcd.py), one member per test, stopped by PID.
"""

import time

import gevent
import pytest
from gevent import socket

from jrouter.ops.etcd_client import (EtcdClient, EtcdError, EtcdUnavailable, EventKind,
                                     WatchCompacted)
from tests.support.etcd import EtcdServer
from tests.support.ports import free_port

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 1.0   # the client's bound on every call


@pytest.fixture
def etcd(tmp_path):
    server = EtcdServer(tmp_path).start()
    yield server
    server.close()


@pytest.fixture
def client(etcd):
    client = EtcdClient([etcd.endpoint], TIMEOUT)
    yield client
    client.close()


def collect(watch, count, seconds=5.0):
    """The watch's batches until `count` events have come (bounded)."""
    batches = []
    with gevent.Timeout(seconds):
        for batch in watch:
            batches.append(batch)
            if sum(len(b.events) for b in batches) >= count:
                return batches
    raise AssertionError("watch ended after %r" % batches)


def events(batches):
    return [(e.kind, e.kv.key, e.kv.value, e.kv.mod_revision) for b in batches for e in b.events]


def timed(function, *args):
    """(seconds taken, the exception raised) for a call that must fail."""
    started = time.monotonic()
    with pytest.raises(EtcdUnavailable) as failure:
        function(*args)
    return time.monotonic() - started, failure.value


class Blackhole:
    """A listening socket nobody accepts from: connections complete in the
    kernel and never get an answer, like a member that hangs."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.endpoint = "http://127.0.0.1:%d" % self.sock.getsockname()[1]

    def close(self):
        self.sock.close()


class TrickleRelay:
    """A loopback relay to etcd that hands etcd's bytes on one at a time and
    yields between them, so the client's reads cut HTTP heads, chunk sizes and
    JSON lines anywhere."""

    def __init__(self, port):
        self.port = port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.endpoint = "http://127.0.0.1:%d" % self.listener.getsockname()[1]
        self.greenlets = [gevent.spawn(self._accept)]
        self.sockets = [self.listener]

    def _accept(self):
        while True:
            downstream, _ = self.listener.accept()
            upstream = socket.create_connection(("127.0.0.1", self.port))
            self.sockets += [downstream, upstream]
            self.greenlets += [gevent.spawn(self._pump, downstream, upstream, False),
                               gevent.spawn(self._pump, upstream, downstream, True)]

    @staticmethod
    def _pump(source, target, trickle):
        try:
            while data := source.recv(65536):
                if not trickle:
                    target.sendall(data)
                    continue
                for i in range(len(data)):
                    target.sendall(data[i:i + 1])
                    gevent.idle()   # the client reads it before the next byte
        except OSError:
            pass
        finally:
            try:
                target.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self):
        gevent.killall(self.greenlets)
        for sock in self.sockets:
            sock.close()


# -- keys --------------------------------------------------------------------


def test_put_range_delete_round_trip(client):
    """Keys and values are any bytes; each write has a higher revision; a prefix
    range has exactly the keys under it, in key order; delete removes."""
    r1 = client.put(b"t/a", b"\x00\xff one")
    r2 = client.put(b"t/b\xff", b"two")
    r3 = client.put(b"u/c", b"elsewhere")
    assert r1 < r2 < r3

    revision, kvs = client.range(b"t/a")
    assert revision == r3
    assert [(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.lease) for kv in kvs] == [
        (b"t/a", b"\x00\xff one", r1, r1, 0)]
    assert [kv.key for kv in client.range(b"t/", prefix=True)[1]] == [b"t/a", b"t/b\xff"]
    assert client.range(b"nothing")[1] == []

    r4 = client.put(b"t/a", b"again")
    kv = client.range(b"t/a")[1][0]
    assert (kv.create_revision, kv.mod_revision) == (r1, r4)

    r5 = client.delete(b"t/a")
    assert r5 > r4 and client.range(b"t/a")[1] == []
    r6 = client.delete(b"t/", prefix=True)
    assert r6 > r5 and client.range(b"t/", prefix=True)[1] == []
    assert [kv.key for kv in client.range(b"u/", prefix=True)[1]] == [b"u/c"]


def test_an_error_answer_is_an_etcd_error_with_its_code(client):
    """A put under a lease etcd does not know: EtcdError with gRPC code 5."""
    with pytest.raises(EtcdError) as failure:
        client.put(b"k", b"v", lease=12345)
    assert failure.value.code == 5 and "lease not found" in failure.value.message


def test_create_if_absent_one_winner_among_concurrent_greenlets(client):
    """Two greenlets create one key at once, 20 times: exactly one wins each
    time, and the loser is told the winner's value and revision."""
    for round in range(20):
        key = b"bind/%d" % round
        racers = [gevent.spawn(client.create_if_absent, key, name) for name in (b"A", b"B")]
        gevent.joinall(racers, timeout=5, raise_error=True)
        results = [racer.value for racer in racers]
        assert sorted(created for created, _, _ in results) == [False, True]
        (_, won_at, winner), (_, _, seen) = sorted(results, key=lambda r: not r[0])
        assert seen == winner
        assert (winner.key, winner.create_revision, winner.mod_revision) == (key, won_at, won_at)
        assert client.range(key)[1] == [winner]


# -- leases ------------------------------------------------------------------


def test_a_lease_left_alone_takes_its_keys_in_one_revision(client):
    """A 1 s lease with no keepalive: its three keys are deleted together, one
    watch batch of three DELETEs in one revision, 1-3 s after the grant."""
    granted = time.monotonic()
    lease = client.grant(1)
    assert lease.ttl == 1
    for name in (b"a", b"b", b"c"):
        revision = client.put(b"l/" + name, b"x", lease=lease.id)
    assert client.range(b"l/a")[1][0].lease == lease.id
    with client.watch(b"l/", revision + 1) as watch:
        [batch] = collect(watch, 3)
    gone = time.monotonic() - granted
    assert [(e.kind, e.kv.key) for e in batch.events] == [
        (EventKind.DELETE, b"l/a"), (EventKind.DELETE, b"l/b"), (EventKind.DELETE, b"l/c")]
    assert {e.kv.mod_revision for e in batch.events} == {batch.revision}
    assert 0.9 <= gone <= 3.0, gone
    assert client.keepalive(lease.id) == 0 and client.time_to_live(lease.id) is None


def test_keepalives_keep_a_lease_past_its_ttl(client):
    """Keepalives every 0.3 s keep a 1 s lease's key for 2.5 s; once they stop,
    the key goes within 3 s."""
    lease = client.grant(1)
    client.put(b"k/alive", b"x", lease=lease.id)
    started = time.monotonic()
    while time.monotonic() - started < 2.5:
        assert client.keepalive(lease.id) == 1
        gevent.sleep(0.3)
    assert client.range(b"k/alive")[1]
    info = client.time_to_live(lease.id, keys=True)
    assert info.granted_ttl == 1 and info.keys == [b"k/alive"]
    deadline = time.monotonic() + 3.0
    while client.range(b"k/alive")[1]:
        assert time.monotonic() < deadline, "the key outlived its lease"
        gevent.sleep(0.1)


def test_revoke_removes_a_leases_keys_at_once(client):
    """Revoking a 10 s lease deletes its keys before the call returns; a second
    revoke says it was already gone."""
    lease = client.grant(10)
    client.put(b"r/1", b"x", lease=lease.id)
    client.put(b"r/2", b"y", lease=lease.id)
    assert client.revoke(lease.id) is True
    assert client.range(b"r/", prefix=True)[1] == []
    assert client.revoke(lease.id) is False
    assert client.keepalive(lease.id) == 0


# -- watches -----------------------------------------------------------------


def test_watch_from_a_revision_delivers_every_event_after_it_in_order(client):
    """History replayed from a revision, then live writes as they happen: every
    event of the prefix in revision order; a live batch is one revision, and a
    prefix delete's events come together."""
    first = client.put(b"w/a", b"1")
    client.put(b"other", b"not watched")
    client.put(b"w/b", b"2")
    with client.watch(b"w/", first) as watch:
        history = collect(watch, 2)
        live = []
        for write in (lambda: client.put(b"w/c", b"3"), lambda: client.delete(b"w/", prefix=True)):
            gevent.spawn(write)
            live += collect(watch, 1)
    assert events(history) == [(EventKind.PUT, b"w/a", b"1", first), (EventKind.PUT, b"w/b", b"2", first + 2)]
    assert [len(batch.events) for batch in live] == [1, 3]
    assert events(live) == [(EventKind.PUT, b"w/c", b"3", first + 3)] + [
        (EventKind.DELETE, key, b"", first + 4) for key in (b"w/a", b"w/b", b"w/c")]
    assert [batch.revision for batch in live] == [first + 3, first + 4]


def test_watch_from_a_compacted_revision_raises_watch_compacted(client):
    """After compaction up to revision R, a watch from before R raises
    WatchCompacted(R) when read."""
    old = client.put(b"c/x", b"1")
    client.put(b"c/x", b"2")
    latest = client.put(b"c/x", b"3")
    client.compact(latest)
    with client.watch(b"c/", old) as watch:
        with gevent.Timeout(5), pytest.raises(WatchCompacted) as failure:
            next(iter(watch))
    assert failure.value.compact_revision == latest


def test_a_watch_closed_from_another_greenlet_ends_quietly(client):
    """close() from another greenlet ends a watch blocked on its socket: the
    iteration stops without an exception."""
    watch = client.watch(b"q/", 0)
    reader = gevent.spawn(lambda: list(watch))
    gevent.sleep(0.2)
    assert not reader.ready()
    watch.close()
    assert reader.get(timeout=2) == []


def test_every_answer_read_through_a_trickle_of_single_bytes(etcd):
    """Through a relay that hands etcd's bytes on one at a time: heads, chunk
    sizes and watch lines cut anywhere still read the same."""
    relay = TrickleRelay(etcd.client_port)
    client = EtcdClient([relay.endpoint], 5.0)
    try:
        first = client.put(b"s/a", b"1" * 300)
        assert client.create_if_absent(b"s/a", b"2")[0] is False
        lease = client.grant(5)
        assert client.keepalive(lease.id) == 5
        with client.watch(b"s/", first) as watch:
            gevent.spawn(client.delete, b"s/a")
            batches = collect(watch, 2, seconds=10)
        assert events(batches) == [(EventKind.PUT, b"s/a", b"1" * 300, first),
                                   (EventKind.DELETE, b"s/a", b"", first + 1)]
    finally:
        client.close()
        relay.close()


# -- etcd away ---------------------------------------------------------------


def test_a_stopped_etcd_is_unavailable_in_time_and_a_restarted_one_serves(etcd, client):
    """etcd stopped: every call and an open watch raise EtcdUnavailable within
    the timeout; restarted on the same data dir: calls work and see old keys."""
    client.put(b"d/kept", b"x")
    lease = client.grant(60)
    watch = client.watch(b"d/", 0)
    etcd.stop()
    for call, args in ((client.range, (b"d/kept",)), (client.put, (b"d/k", b"v")),
                       (client.create_if_absent, (b"d/k", b"v")), (client.keepalive, (lease.id,)),
                       (client.grant, (1,)), (client.watch, (b"d/", 0))):
        took, failure = timed(call, *args)
        assert took < TIMEOUT + 0.5, (call, took)
        assert "refused" in str(failure)
    with gevent.Timeout(2), pytest.raises(EtcdUnavailable):
        next(iter(watch))

    etcd.restart()
    assert client.range(b"d/kept")[1][0].value == b"x"
    assert client.keepalive(lease.id) == 60
    assert client.put(b"d/k", b"v") > 0


def test_a_paused_etcd_costs_a_call_its_timeout_and_no_more(etcd, client):
    """SIGSTOP'd etcd (connections still accepted): a read and a write each raise
    EtcdUnavailable after the timeout; after SIGCONT calls work again."""
    client.put(b"p/k", b"v")
    etcd.pause()
    try:
        for call, args in ((client.range, (b"p/k",)), (client.put, (b"p/k", b"w"))):
            took, _ = timed(call, *args)
            assert TIMEOUT - 0.05 <= took < TIMEOUT + 0.5, (call, took)
    finally:
        etcd.resume()
    assert client.range(b"p/k")[0] > 0


def test_with_the_first_endpoint_dead_calls_go_to_the_second(etcd):
    """Nothing listens at the first endpoint: calls and watches are served by the
    second at once."""
    client = EtcdClient(["http://127.0.0.1:%d" % free_port(), etcd.endpoint], TIMEOUT)
    started = time.monotonic()
    revision = client.put(b"e/k", b"v")
    assert client.range(b"e/k")[1][0].value == b"v"
    assert client.create_if_absent(b"e/k", b"w")[0] is False
    with client.watch(b"e/", revision) as watch:
        assert events(collect(watch, 1)) == [(EventKind.PUT, b"e/k", b"v", revision)]
    assert time.monotonic() - started < 0.5
    client.close()


def test_with_the_first_endpoint_hung_one_call_times_out_then_the_second_serves(etcd):
    """The first endpoint accepts and never answers: the first call fails after
    the timeout, and the calls after it go to the second endpoint at once."""
    hung = Blackhole()
    client = EtcdClient([hung.endpoint, etcd.endpoint], TIMEOUT)
    try:
        took, _ = timed(client.range, b"h/k")
        assert TIMEOUT - 0.05 <= took < TIMEOUT + 0.5
        started = time.monotonic()
        client.put(b"h/k", b"v")
        assert client.range(b"h/k")[1][0].value == b"v"
        assert time.monotonic() - started < 0.5
    finally:
        client.close()
        hung.close()
