"""jrouter/ops/cluster_agent.py against a real etcd on loopback (issue 13):
joining and leaving, a node's death, unique claims and the default route,
fencing (etcd or the node itself stalled past the TTL, a revoked lease, a
unique name taken meanwhile), an etcd restart within the TTL, a watch
resumed past a compaction, binds during an outage.

Agents run in this process's gevent hub (nothing is monkey-patched, so a
time.sleep blocks every greenlet: the node "paused"); etcd is Debian's
etcd-server (tests/support/etcd.py) with its fast election flags, stopped by
PID. Measured seconds are printed (pytest -s shows them).
"""

import base64
import json
import time
import urllib.request

import gevent
import pytest

from jrouter.cluster.keys import LogKey, LogValue, MemberKey, MemberValue, OwnerValue, UniqueKey
from jrouter.cluster.mirror import MemberJoined, MemberLeft, NodeJoined, NodeLeft
from jrouter.ops.cluster_agent import AgentState, ClusterAgent, ClusterUnavailable, Fenced
from jrouter.ops.etcd_client import EtcdClient
from tests.support.etcd import EtcdServer

pytestmark = pytest.mark.timeout(90)

CLUSTER = "test"
TIMEOUT = 1.0


class Recorder:
    """The router's side: records every hook call and log line, holds a fixed list of keys."""

    def __init__(self, held=()):
        self.calls = []             # (monotonic time, hook name, args)
        self.held = list(held)
        self.lines = []             # the agent's log

    def notice(self, message):
        self.lines.append(message)

    warning = notice

    def on_changes(self, changes, revision):
        self.calls.append((time.monotonic(), "changes", (changes, revision)))

    def on_fenced(self):
        self.calls.append((time.monotonic(), "fenced", ()))

    def on_rejoined(self, lost):
        self.calls.append((time.monotonic(), "rejoined", (lost,)))

    def held_keys(self):
        return list(self.held)

    def named(self, name):
        return [call for call in self.calls if call[1] == name]

    def batches(self, since=0.0):
        """[(time, changes)] of on_changes calls after `since`."""
        return [(t, args[0]) for t, name, args in self.calls if name == "changes" and t >= since]

    def changes(self, since=0.0):
        return [change for _, changes in self.batches(since) for change in changes]


def wait_for(predicate, seconds, what):
    """Poll (every 20 ms: no load on the benchmark's machine) until true; the time it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > seconds:
            raise AssertionError("no %s within %gs" % (what, seconds))
        gevent.sleep(0.02)
    return time.monotonic() - started


def node_events(recorder, node, since=0.0):
    """The NodeJoined/NodeLeft of `node` the recorder saw, as ('join'|'leave', lease)."""
    out = []
    for change in recorder.changes(since):
        if isinstance(change, (NodeJoined, NodeLeft)) and change.node.id == node:
            out.append(("join" if isinstance(change, NodeJoined) else "leave", change.node.lease))
    return out


def member(node, name, member_id):
    return MemberKey(name, node, member_id), MemberValue("single", None, 1.0e9)


@pytest.fixture
def etcd(tmp_path):
    server = EtcdServer(tmp_path).start()
    yield server
    server.close()


@pytest.fixture
def agents(etcd):
    """make(node, ttl=2, bind_wait=1.0, held=()) -> (agent, recorder), joined;
    every agent is stopped at teardown."""
    made = []

    def make(node, ttl=2, bind_wait=1.0, held=()):
        recorder = Recorder(held)
        agent = ClusterAgent(CLUSTER, node, "127.0.0.1:%d" % (7000 + len(made)), [etcd.endpoint],
                             recorder, timeout=TIMEOUT, ttl=ttl, bind_wait=bind_wait, log=recorder)
        made.append(agent)
        agent.start()
        assert agent.wait_joined(5), "agent %s did not join" % node
        return agent, recorder

    yield make
    for agent in made:
        agent.stop(timeout=2.0)


@pytest.fixture
def client(etcd):
    client = EtcdClient([etcd.endpoint], TIMEOUT)
    yield client
    client.close()


def blocking_call(etcd, path, request):
    """One etcd gateway call that blocks the whole process (stdlib HTTP,
    nothing monkey-patched): no agent greenlet runs until it is done."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(etcd.endpoint + path, json.dumps(request).encode(), timeout=5) as response:
        return json.loads(response.read())


def blocking_put(etcd, key, value):
    """A put that blocks the whole process; the revision of the write."""
    answer = blocking_call(etcd, "/v3/kv/put", {"key": b64(key), "value": b64(value)})
    return int(answer["header"]["revision"])


def b64(data):
    return base64.b64encode(data).decode()


MEMBER_VALUE = b'{"bound":1,"identity":null,"kind":"single"}'


def in_thread(function):
    """Run `function` in a real thread, so the hub (and the agents) keep running."""
    return gevent.get_hub().threadpool.apply(function)


# -- joining and leaving -------------------------------------------------------


def test_two_agents_see_each_other_join_and_a_stop_is_seen_at_once(agents):
    """Each agent's changes show the other's NodeJoined; after one's stop
    (revoke) the other hears NodeLeft for it at once."""
    a, seen_by_a = agents("a")
    b, seen_by_b = agents("b")
    wait_for(lambda: node_events(seen_by_a, "b") == [("join", b.lease)], 2, "NodeJoined(b) at a")
    assert node_events(seen_by_b, "a") == [("join", a.lease)]       # in b's snapshot
    assert set(a.mirror.nodes()) == set(b.mirror.nodes()) == {"a", "b"}
    assert a.mirror.nodes()["a"].address == "127.0.0.1:7000"

    lease, stopped = a.lease, time.monotonic()
    a.stop()
    stopping = time.monotonic() - stopped
    wait_for(lambda: node_events(seen_by_b, "a", stopped) == [("leave", lease)], 2, "NodeLeft(a) at b")
    took = seen_by_b.batches(stopped)[0][0] - stopped
    print("stop() took %.3fs; stop -> NodeLeft at the other agent %.3fs" % (stopping, took))
    assert took < 0.1
    assert set(b.mirror.nodes()) == {"b"} and a.state is AgentState.STOPPED
    assert seen_by_a.named("fenced") == [] and seen_by_b.named("fenced") == []


def test_an_abandoned_agent_leaves_after_its_ttl_in_one_batch(agents):
    """A node that dies without revoking (kill -9: greenlets gone, no revoke):
    after ~TTL the other sees its NodeLeft and all its member keys gone, in
    one on_changes call."""
    a, _ = agents("a", ttl=2)
    b, seen_by_b = agents("b")
    for i in range(3):
        a.register_member(*member("a", "sm%d.example.com" % i, "m%d" % i))
    wait_for(lambda: sum(isinstance(c, MemberJoined) for c in seen_by_b.changes()) == 3, 2, "3 members at b")

    lease, abandoned = a.lease, time.monotonic()
    a.stop(timeout=1.0, revoke=False)
    took = wait_for(lambda: node_events(seen_by_b, "a", abandoned) == [("leave", lease)], 4.0, "NodeLeft(a)")
    print("abandoned -> NodeLeft at the other agent: %.3fs (ttl 2)" % took)
    assert 2 * 2 / 3 - 0.2 <= took <= 2 + 2
    [(_, changes)] = seen_by_b.batches(abandoned)          # one call, everything in it
    assert sum(isinstance(c, NodeLeft) for c in changes) == 1
    assert sorted(c.member.name for c in changes if isinstance(c, MemberLeft)) == [
        "sm0.example.com", "sm1.example.com", "sm2.example.com"]
    assert list(b.mirror.names()) == [] and set(b.mirror.nodes()) == {"b"}


def test_an_agent_started_while_etcd_is_down_joins_when_it_answers(etcd, tmp_path):
    """Started with etcd stopped: not joined, writes refused at once (Fenced),
    an empty mirror; etcd started: it joins within the backoff's 1 s."""
    etcd.stop()
    recorder = Recorder()
    agent = ClusterAgent(CLUSTER, "a", "127.0.0.1:7000", [etcd.endpoint], recorder,
                         timeout=TIMEOUT, ttl=2, bind_wait=1.0, log=recorder)
    agent.start()
    try:
        assert not agent.wait_joined(0.5) and agent.state is AgentState.JOINING
        with pytest.raises(Fenced):
            agent.claim_unique("sm.example.com", "m1")
        assert list(agent.mirror.nodes()) == []
        in_thread(etcd.start)
        started = time.monotonic()
        assert agent.wait_joined(3)
        print("etcd up -> joined %.3fs" % (time.monotonic() - started))
        assert set(agent.mirror.nodes()) == {"a"} and recorder.named("rejoined") == []
        assert [name for _, name, _ in recorder.calls] == ["changes"]
        assert agent.claim_unique("sm.example.com", "m1") is True
    finally:
        agent.stop(timeout=2.0)


# -- writes -------------------------------------------------------------------


def test_claim_unique_on_two_agents_at_once_has_exactly_one_winner(agents):
    """Two nodes claim one name at the same moment, 10 times: exactly one True
    each time; both mirrors then name the winner; a release lets the loser in."""
    a, _ = agents("a")
    b, _ = agents("b")
    for round in range(10):
        name = "c2s%d.example.com" % round
        racers = [gevent.spawn(agent.claim_unique, name, "m1") for agent in (a, b)]
        gevent.joinall(racers, timeout=5, raise_error=True)
        results = [racer.value for racer in racers]
        assert sorted(results) == [False, True], results
        winner = "a" if results[0] else "b"
        wait_for(lambda: all(ag.mirror.owner_of_unique(name) == (winner, "m1") for ag in (a, b)),
                 2, "the owner in both mirrors")
    owner, loser = (a, b) if a.mirror.owner_of_unique(name).node == "a" else (b, a)
    assert owner.claim_unique(name, "m1") is True          # again: still ours
    assert owner.claim_unique(name, "m2") is False         # another member of ours: taken
    owner.release_unique(name, "m1")
    assert owner.flush(2)
    assert loser.claim_unique(name, "m2") is True


def test_claim_unique_during_an_outage_fails_after_bind_wait(agents, etcd):
    """etcd killed, then paused: claim_unique retries for bind_wait (1 s), then
    raises ClusterUnavailable (not Fenced), bounded; the node is not fenced
    (TTL 10 s)."""
    a, seen = agents("a", ttl=10, bind_wait=1.0)
    etcd.kill()
    started = time.monotonic()
    with pytest.raises(ClusterUnavailable) as failure:
        a.claim_unique("sm.example.com", "m1")
    killed = time.monotonic() - started
    assert not isinstance(failure.value, Fenced)
    in_thread(etcd.start)
    etcd.pause()
    try:
        started = time.monotonic()
        with pytest.raises(ClusterUnavailable):
            a.register_member(*member("a", "sm.example.com", "m1"))
        paused = time.monotonic() - started
    finally:
        etcd.resume()
    print("claim during outage failed after %.3fs (etcd killed), %.3fs (paused); bind_wait 1s"
          % (killed, paused))
    assert 1.0 <= killed < 1.3 and 1.0 <= paused < 1.3
    assert seen.named("fenced") == [] and a.state is AgentState.JOINED
    assert a.claim_unique("sm.example.com", "m1") is True


# -- fencing ------------------------------------------------------------------


def test_etcd_stopped_past_the_ttl_fences_the_node_and_it_rejoins(agents, etcd):
    """etcd SIGSTOPped for longer than the TTL (2 s): the node fences once (at
    ~TTL after its last keepalive), refuses writes while fenced, and after
    SIGCONT rejoins once with a new lease, re-creating its held keys; an
    observer with a long lease sees one leave and one join for it."""
    key, value = member("a", "sm.example.com", "m1")
    held = [(key, value), (UniqueKey("sm.example.com"), OwnerValue("a", "m1"))]
    a, seen_by_a = agents("a", ttl=2, held=held)
    a.register_member(key, value)
    assert a.claim_unique("sm.example.com", "m1") is True
    observer, seen = agents("observer", ttl=30)
    old_lease = a.lease
    wait_for(lambda: observer.mirror.owner_of_unique("sm.example.com") == ("a", "m1"), 2, "a's claim")

    paused = time.monotonic()
    etcd.pause()
    try:
        wait_for(lambda: seen_by_a.named("fenced"), 3.0, "on_fenced")
        took = seen_by_a.named("fenced")[0][0] - paused
        assert a.state is AgentState.FENCED and a.lease == 0 and list(a.mirror.nodes()) == []
        started = time.monotonic()
        with pytest.raises(Fenced):
            a.claim_unique("other.example.com", "m2")
        assert time.monotonic() - started < 0.05
        gevent.sleep(max(0.0, 3.5 - (time.monotonic() - paused)))
    finally:
        etcd.resume()
    resumed = time.monotonic()
    wait_for(lambda: seen_by_a.named("rejoined"), 5.0, "on_rejoined")
    back = seen_by_a.named("rejoined")[0][0] - resumed
    wait_for(lambda: ("join", a.lease) in node_events(seen, "a"), 3.0, "the observer to see a again")
    print("etcd paused -> fenced %.3fs (ttl 2); SIGCONT -> rejoined %.3fs" % (took, back))
    assert 2 * 2 / 3 - 0.1 <= took <= 2.2

    assert len(seen_by_a.named("fenced")) == 1
    [(_, _, (lost,))] = seen_by_a.named("rejoined")
    assert lost == []
    assert a.lease not in (0, old_lease) and a.state is AgentState.JOINED
    assert [m.ref for m in observer.mirror.members("sm.example.com")] == [("a", "m1")]
    assert observer.mirror.members("sm.example.com")[0].lease == a.lease
    assert observer.mirror.owner_of_unique("sm.example.com") == ("a", "m1")
    assert node_events(seen, "a") == [("join", old_lease), ("leave", old_lease), ("join", a.lease)]
    assert seen.named("fenced") == []
    gevent.sleep(0.3)                                          # nothing more comes
    assert len(seen_by_a.named("fenced")) == 1 and len(seen_by_a.named("rejoined")) == 1
    assert resumed > paused


def test_a_node_paused_past_the_ttl_fences_itself_on_waking(agents):
    """The node's own process stalls (a time.sleep that blocks the hub, 3 s >
    TTL 2 s): on waking it fences before handing over any change, then rejoins
    with a new lease and its held keys."""
    key, value = member("a", "sm.example.com", "m1")
    a, seen_by_a = agents("a", ttl=2, held=[(key, value)])
    a.register_member(key, value)
    observer, seen = agents("observer", ttl=30)
    old_lease = a.lease
    wait_for(lambda: observer.mirror.members("sm.example.com"), 2, "a's member at the observer")
    before = len(seen_by_a.calls)

    time.sleep(3.0)                 # every greenlet of this process stalls
    woke = time.monotonic()
    wait_for(lambda: seen_by_a.named("fenced"), 1.0, "on_fenced")
    wait_for(lambda: seen_by_a.named("rejoined"), 3.0, "on_rejoined")
    took = seen_by_a.named("fenced")[0][0] - woke
    print("woke -> fenced %.3fs, rejoined %.3fs" % (took, seen_by_a.named("rejoined")[0][0] - woke))
    assert took < 0.2
    assert [name for _, name, _ in seen_by_a.calls[before:]][:2] == ["fenced", "rejoined"]
    assert a.lease not in (0, old_lease)
    wait_for(lambda: [m.lease for m in observer.mirror.members("sm.example.com")] == [a.lease], 2,
             "the member again under the new lease")
    assert node_events(seen, "a") == [("join", old_lease), ("leave", old_lease), ("join", a.lease)]
    assert seen.named("fenced") == [] and len(seen_by_a.named("fenced")) == 1


def test_a_lease_revoked_behind_the_nodes_back_fences_it_at_once(agents, client):
    """`etcdctl lease revoke` of the node's lease: its node key's deletion
    arrives by watch and the node fences at once, then rejoins."""
    a, seen_by_a = agents("a", ttl=10)
    old_lease = a.lease
    revoked = time.monotonic()
    assert client.revoke(old_lease)
    wait_for(lambda: seen_by_a.named("fenced"), 1.0, "on_fenced")
    wait_for(lambda: seen_by_a.named("rejoined"), 2.0, "on_rejoined")
    took = seen_by_a.named("fenced")[0][0] - revoked
    print("revoke -> fenced %.3fs, rejoined %.3fs" % (took, seen_by_a.named("rejoined")[0][0] - revoked))
    assert 0 <= took < 0.2
    assert a.lease not in (0, old_lease) and set(a.mirror.nodes()) == {"a"}


# -- etcd away within the TTL ---------------------------------------------------


def test_etcd_restarted_within_the_ttl_costs_no_fencing_and_nothing_is_missed(agents, etcd, client):
    """etcd SIGKILLed and restarted (same data dir) within the TTL (6 s): no
    fencing, the lease survives, the watch resumes from its last revision + 1:
    a member another client wrote before the agent could look arrives once,
    an unregister asked for during the outage is done once etcd is back, and
    nothing else comes."""
    a, seen_by_a = agents("a", ttl=6)
    lease = a.lease
    a.register_member(*member("a", "sm.example.com", "m1"))
    a.register_member(*member("a", "sm2.example.com", "m2"))
    wait_for(lambda: a.mirror.members("sm2.example.com"), 2, "a's own members")
    gevent.sleep(0.1)
    killed = time.monotonic()
    etcd.kill()
    a.unregister_member(member("a", "sm2.example.com", "m2")[0])
    gevent.sleep(0.5)                     # keepalives, the watch and the delete fail meanwhile
    assert not a.flush(0)
    # With the hub blocked (no agent greenlet runs): etcd back, and a write
    # the agent's watch can only get by resuming from its last revision + 1.
    etcd.start()
    blocking_put(etcd, b"/jrouter/test/members/c2s.example.com/b/m9", MEMBER_VALUE)
    down = time.monotonic() - killed
    took = wait_for(lambda: a.mirror.members("c2s.example.com") and not a.mirror.members("sm2.example.com"),
                    4.0, "the member written meanwhile, and the delete")
    print("etcd down %.3fs; then the changes seen after %.3fs" % (down, took))
    assert down < 6 * 2 / 3 and a.flush(0)
    gevent.sleep(2.5)                     # keepalives go on past a TTL/3 or two
    assert seen_by_a.named("fenced") == [] and a.lease == lease and a.state is AgentState.JOINED
    after = [(type(c).__name__, getattr(c, "member", c).name) for c in seen_by_a.changes(killed)]
    assert after == [("MemberJoined", "c2s.example.com"), ("NameUp", "c2s.example.com"),
                     ("MemberLeft", "sm2.example.com"), ("NameDown", "sm2.example.com")], after
    assert client.time_to_live(lease).ttl > 0


def test_a_watch_resumed_past_a_compaction_gets_the_net_difference(agents, etcd):
    """The agent's watch is down while the table moves and etcd compacts its
    history: the agent reads the table again and hands over exactly what
    differs (a key put and deleted meanwhile is never seen), no fencing."""
    a, seen_by_a = agents("a", ttl=6)
    x = b"/jrouter/test/members/x.example.com/b/m1"
    blocking_put(etcd, x, MEMBER_VALUE)
    wait_for(lambda: a.mirror.members("x.example.com"), 2, "x")
    etcd.kill()
    gevent.sleep(0.3)                     # the watch breaks
    marked = time.monotonic()
    etcd.start()                          # hub blocked from here to the compaction
    blocking_call(etcd, "/v3/kv/deleterange", {"key": b64(x)})
    blocking_put(etcd, b"/jrouter/test/members/y.example.com/b/m2", MEMBER_VALUE)
    z = b"/jrouter/test/members/z.example.com/b/m3"
    blocking_put(etcd, z, MEMBER_VALUE)
    blocking_call(etcd, "/v3/kv/deleterange", {"key": b64(z)})
    latest = blocking_put(etcd, b"/elsewhere", b"not in the cluster's prefix")
    blocking_call(etcd, "/v3/kv/compaction", {"revision": str(latest), "physical": True})
    took = wait_for(lambda: a.mirror.members("y.example.com"), 4.0, "y after the compaction")
    print("compacted: the difference handed over %.3fs after etcd was back" % took)
    gevent.sleep(0.2)
    after = [(type(c).__name__, getattr(c, "member", c).name) for c in seen_by_a.changes(marked)]
    assert after == [("MemberLeft", "x.example.com"), ("MemberJoined", "y.example.com"),
                     ("NameDown", "x.example.com"), ("NameUp", "y.example.com")], after
    assert len(seen_by_a.batches(marked)) == 1 and seen_by_a.named("fenced") == []
    assert any("compacted" in line for line in seen_by_a.lines)


def test_a_held_unique_name_taken_while_fenced_is_reported_lost(agents, etcd):
    """The node's lease is revoked and its unique name taken by another before
    it can rejoin: the rejoin re-creates its member, reports the name lost,
    and leaves the other's claim alone."""
    key, value = member("a", "sm.example.com", "m1")
    unique = UniqueKey("sm.example.com")
    a, seen_by_a = agents("a", ttl=10, held=[(key, value), (unique, OwnerValue("a", "m1"))])
    a.register_member(key, value)
    assert a.claim_unique("sm.example.com", "m1")
    old = a.lease
    blocking_call(etcd, "/v3/lease/revoke", {"ID": str(old)})
    blocking_put(etcd, b"/jrouter/test/unique/sm.example.com", b'{"member":"m7","node":"b"}')
    wait_for(lambda: seen_by_a.named("rejoined"), 3.0, "on_rejoined")
    [(_, _, (lost,))] = seen_by_a.named("rejoined")
    assert lost == [unique]
    assert a.lease not in (0, old) and len(seen_by_a.named("fenced")) == 1
    assert a.mirror.owner_of_unique("sm.example.com") == ("b", "m7")
    assert [m.lease for m in a.mirror.members("sm.example.com")] == [a.lease]


def test_default_route_and_log_sinks(agents):
    """claim_default has one winner among two nodes and is released by its
    owner only; a log sink registered shows in both mirrors and goes on
    unregister."""
    a, _ = agents("a")
    b, _ = agents("b")
    racers = [gevent.spawn(agent.claim_default, "s2s", "m1") for agent in (a, b)]
    gevent.joinall(racers, timeout=5, raise_error=True)
    assert sorted(racer.value for racer in racers) == [False, True]
    owner, other = (a, b) if racers[0].value else (b, a)
    wait_for(lambda: other.mirror.default_route() is not None, 2, "the default route")
    assert other.mirror.default_route().owner == (owner.node, "m1")
    other.release_default("s2s", "m1")            # not its own: left alone
    assert other.flush(2)
    owner.release_default("s2s", "m1")
    assert owner.flush(2)
    wait_for(lambda: other.mirror.default_route() is None, 2, "the default route gone")
    assert other.claim_default("s2s", "m1") is True

    log = LogKey("sm.example.com", "a", "m5")
    a.register_log_sink(log, LogValue(1.0e9))
    wait_for(lambda: b.mirror.log_sinks().get("sm.example.com") == ("a", "m5"), 2, "the log sink")
    a.unregister_log_sink(log)
    wait_for(lambda: "sm.example.com" not in b.mirror.log_sinks(), 2, "the log sink gone")
    with pytest.raises(ValueError):
        a.register_log_sink(LogKey("sm.example.com", "b", "m5"), LogValue(1.0e9))
