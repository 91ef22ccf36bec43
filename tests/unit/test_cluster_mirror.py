"""jrouter.cluster.mirror: the cluster table mirrored from etcd's snapshot and watch, and its
changes, without sockets (etcd is a small model here: one revision per txn, a lease's keys gone
in one revision, as scaleout notes measured)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jrouter.cluster.keys import (
    DefaultKey, DefaultValue, Layout, LogKey, LogValue, MemberKey, MemberValue, NodeKey, NodeValue,
    OwnerValue, UniqueKey, encode_value)
from jrouter.cluster.mirror import (
    Batch, DefaultChanged, DefaultRoute, Delete, LogSinkChanged, MemberJoined, MemberLeft,
    MemberRef, MemberUpdated, NameDown, NameUp, NodeJoined, NodeLeft, NodeUpdated, Put,
    TableMirror, UniqueReleased, UniqueTaken, Unreadable)
from jrouter.routing.table import MULTI_FROM, MULTI_TO, SINGLE

LAYOUT = Layout("test")


class Store:
    """etcd's key space as its watch reports it: each txn one revision (none if nothing changed),
    every key of an expired lease deleted in one revision."""

    def __init__(self):
        self.revision = 1
        self.kvs = {}
        self.history = []           # one event list per revision

    def txn(self, puts=(), deletes=()):
        revision = self.revision + 1
        events = []
        for key in deletes:
            if self.kvs.pop(key, None) is not None:
                events.append(Delete(key, revision))
        for key, value, lease in puts:
            old = self.kvs.get(key)
            put = Put(key, value, lease, old.create_revision if old else revision, revision)
            self.kvs[key] = put
            events.append(put)
        if events:
            self.revision = revision
            self.history.append(events)
        return events

    def expire(self, lease):
        return self.txn(deletes=[key for key, kv in self.kvs.items() if kv.lease == lease])

    def snapshot(self):
        return self.revision, list(self.kvs.values())

    def batch(self, events):
        return Batch(self.revision, events)


# Writers, as the I/O side will write (key, value, lease).

def node(n, lease, address="10.0.0.1:5348", started=100.0):
    return LAYOUT.key(NodeKey(n)), encode_value(NodeValue(address, started, "0.1.0")), lease


def member(name, n, m, lease, kind=MULTI_TO, identity=None, bound=1.0):
    return LAYOUT.key(MemberKey(name, n, m)), encode_value(MemberValue(kind, identity, bound)), lease


def unique(name, n, m, lease):
    return LAYOUT.key(UniqueKey(name)), encode_value(OwnerValue(n, m)), lease


def default(name, n, m, lease):
    return LAYOUT.key(DefaultKey()), encode_value(DefaultValue(name, n, m)), lease


def log(name, n, m, lease):
    return LAYOUT.key(LogKey(name, n, m)), encode_value(LogValue(1.0)), lease


def key(entry):
    return entry[0]


def bind_single(store, name, n, m, lease):
    """A bind without multi: the member and its unique key in one txn."""
    return store.txn([member(name, n, m, lease, kind=SINGLE, identity=name), unique(name, n, m, lease)])


def refs(members):
    return [(m.node, m.id) for m in members]


def loaded(store):
    mirror = TableMirror(LAYOUT)
    mirror.load_snapshot(*store.snapshot())
    return mirror


# -- snapshot, then batches ------------------------------------------------------

def test_snapshot_then_batches():
    """A first snapshot reports everything as joined; each batch after it only what it changed."""
    store = Store()
    store.txn([node("n1", 7)])
    bind_single(store, "sm1", "n1", "1", 7)
    store.txn([member("example.com", "n1", "1", 7, identity="sm1")])
    mirror = TableMirror(LAYOUT)
    changes = mirror.load_snapshot(*store.snapshot())
    assert [type(c) for c in changes] == [NodeJoined, MemberJoined, MemberJoined, NameUp, NameUp,
                                          UniqueTaken]
    assert mirror.revision == store.revision == 4
    assert refs(mirror.members("example.com")) == [("n1", "1")]
    assert mirror.owner_of_unique("sm1") == MemberRef("n1", "1")

    events = store.txn([member("example.com", "n1", "2", 7)])
    changes = mirror.apply(store.batch(events))
    assert changes == [MemberJoined(mirror.members("example.com")[1])]
    assert refs(mirror.members("example.com")) == [("n1", "1"), ("n1", "2")]
    assert mirror.revision == 5


def test_dead_node_is_one_batch():
    """A dead node's lease expiry (all its keys in one revision) is one batch of changes, in the
    documented order; names other nodes still serve do not go down."""
    store = Store()
    store.txn([node("n1", 7), node("n2", 8)])
    store.txn([member("example.com", "n1", "1", 7)])
    store.txn([member("example.com", "n2", "1", 8)])
    bind_single(store, "c2s", "n2", "2", 8)
    store.txn([member("s2s", "n2", "3", 8, kind=SINGLE), default("s2s", "n2", "3", 8),
               log("example.com", "n2", "3", 8)])
    mirror = loaded(store)
    before = dict(mirror.nodes())["n2"]
    gone = {name: mirror.members(name) for name in ("example.com", "c2s", "s2s")}
    old_default = mirror.default_route()

    events = store.expire(8)
    assert len(events) == 7 and len({e.mod_revision for e in events}) == 1
    changes = mirror.apply(store.batch(events))
    assert changes == [
        NodeLeft(before),
        MemberLeft(gone["c2s"][0]), MemberLeft(gone["example.com"][1]), MemberLeft(gone["s2s"][0]),
        NameDown("c2s"), NameDown("s2s"),
        UniqueReleased("c2s", MemberRef("n2", "2")),
        DefaultChanged(old_default, None),
        LogSinkChanged("example.com", MemberRef("n2", "3"), None)]
    assert refs(mirror.members("example.com")) == [("n1", "1")]
    assert list(mirror.nodes()) == ["n1"]
    assert mirror.default_route() is None and mirror.log_sinks() == {}


def test_member_order_is_create_revision_then_key():
    """Members are ordered by the revision that created their key, then by key, whatever order the
    events come in; updating a member's value keeps its place."""
    store = Store()
    store.txn([member("example.com", "n2", "1", 0)])
    store.txn([member("example.com", "n1", "9", 0), member("example.com", "n1", "10", 0)])  # one txn
    store.txn([member("example.com", "n0", "1", 0)])
    mirror = loaded(store)
    assert refs(mirror.members("example.com")) == [("n2", "1"), ("n1", "10"), ("n1", "9"), ("n0", "1")]
    events = store.txn([member("example.com", "n2", "1", 0, bound=2.0)])
    [changed] = mirror.apply(store.batch(events))
    assert isinstance(changed, MemberUpdated) and changed.new.bound == 2.0
    assert refs(mirror.members("example.com"))[0] == ("n2", "1")


def test_leaver_keeps_the_others_order():
    """A member leaving removes it; the rest keep their order (no jabberd2 swap-remove)."""
    store = Store()
    for m in "abc":
        store.txn([member("example.com", "n1", m, 0)])
    mirror = loaded(store)
    mirror.apply(store.batch(store.txn(deletes=[key(member("example.com", "n1", "a", 0))])))
    assert refs(mirror.members("example.com")) == [("n1", "b"), ("n1", "c")]


def test_replacement_in_one_txn_does_not_flap():
    """A member replaced by another within one revision leaves and joins, but the name never goes
    down and up: within a revision only the net difference counts."""
    store = Store()
    store.txn([member("example.com", "n1", "1", 0)])
    mirror = loaded(store)
    events = store.txn([member("example.com", "n2", "1", 0)],
                       deletes=[key(member("example.com", "n1", "1", 0))])
    changes = mirror.apply(store.batch(events))
    assert [type(c) for c in changes] == [MemberLeft, MemberJoined]


def test_revisions_within_one_batch_each_count():
    """A batch with several revisions gives each revision's changes in order: a name gone at one
    revision and back at the next goes down and up, as in one router."""
    store = Store()
    store.txn([member("example.com", "n1", "1", 0)])
    mirror = loaded(store)
    events = store.txn(deletes=[key(member("example.com", "n1", "1", 0))])
    events += store.txn([member("example.com", "n1", "2", 0)])
    changes = mirror.apply(store.batch(events))
    assert [type(c) for c in changes] == [MemberLeft, NameDown, MemberJoined, NameUp]


def test_recreated_key_leaves_and_joins():
    """A key created anew (a new create_revision) is a leave and a join, not an update: here a node
    that came back under a new lease, seen only in a re-snapshot."""
    store = Store()
    store.txn([node("n1", 7)])
    mirror = loaded(store)
    old = mirror.nodes()["n1"]
    store.expire(7)
    store.txn([node("n1", 9)])
    changes = mirror.load_snapshot(*store.snapshot())
    assert changes == [NodeLeft(old), NodeJoined(mirror.nodes()["n1"])]
    events = store.txn([node("n1", 9, address="10.0.0.2:5348")])
    [updated] = mirror.apply(store.batch(events))
    assert isinstance(updated, NodeUpdated) and updated.new.address == "10.0.0.2:5348"
    assert mirror.apply(store.batch(store.txn([node("n1", 9, address="10.0.0.2:5348")]))) == []


# -- idempotence and order --------------------------------------------------------

def test_old_and_overlapping_batches():
    """A batch at or below the applied revision changes nothing; an overlapping one applies only
    its new events."""
    store = Store()
    first = store.txn([member("example.com", "n1", "1", 0)])
    mirror = TableMirror(LAYOUT)
    assert len(mirror.apply(store.batch(first))) == 2
    assert mirror.apply(store.batch(first)) == []
    second = store.txn([member("example.com", "n1", "2", 0)])
    changes = mirror.apply(Batch(store.revision, first + second))
    assert [type(c) for c in changes] == [MemberJoined]
    assert mirror.apply(Batch(1, second)) == []
    assert mirror.load_snapshot(1, []) == []          # an older snapshot too
    assert len(mirror.members("example.com")) == 2


def test_progress_batch_moves_the_revision():
    """An event-less batch (a watch progress notice) only advances the revision."""
    mirror = TableMirror(LAYOUT)
    assert mirror.apply(Batch(40, [])) == [] and mirror.revision == 40


def test_long_catch_up_split_over_responses():
    """A catch-up response whose header is ahead of its last event (etcd leaves the rest of a long
    catch-up to the next response) does not make the mirror skip the rest."""
    store = Store()
    a = store.txn([member("example.com", "n1", "1", 0)])
    b = store.txn([member("example.com", "n1", "2", 0)])
    mirror = TableMirror(LAYOUT)
    mirror.apply(Batch(store.revision, a))
    assert mirror.revision == a[0].mod_revision
    mirror.apply(Batch(store.revision, b))
    assert refs(mirror.members("example.com")) == [("n1", "1"), ("n1", "2")]
    assert mirror.revision == store.revision


def test_events_out_of_order_are_refused_whole():
    """Events out of revision order are the I/O side's bug: ValueError, and nothing applied."""
    store = Store()
    a = store.txn([member("example.com", "n1", "1", 0)])
    b = store.txn([member("example.com", "n1", "2", 0)])
    mirror = TableMirror(LAYOUT)
    with pytest.raises(ValueError):
        mirror.apply(Batch(store.revision, b + a))
    with pytest.raises(ValueError):
        mirror.apply(Batch(a[0].mod_revision, a + b))    # an event after the batch's revision
    assert mirror.revision == 0 and mirror.members("example.com") == ()


# -- unique names, the default route, log sinks, unreadable keys --------------------------

def test_unique_and_default():
    """Unique owners and the default route follow their keys."""
    store = Store()
    mirror = TableMirror(LAYOUT)
    changes = mirror.apply(store.batch(bind_single(store, "s2s", "n1", "1", 7)
                                       + store.txn([default("s2s", "n1", "1", 7)])))
    new = DefaultRoute("s2s", MemberRef("n1", "1"), store.revision)
    assert changes[-2:] == [UniqueTaken("s2s", MemberRef("n1", "1")), DefaultChanged(None, new)]
    assert mirror.default_route() == new
    events = store.txn(deletes=[key(default("s2s", "n1", "1", 7)), key(unique("s2s", "n1", "1", 7)),
                                key(member("s2s", "n1", "1", 7))])
    assert mirror.apply(store.batch(events))[1:] == [
        NameDown("s2s"), UniqueReleased("s2s", MemberRef("n1", "1")), DefaultChanged(new, None)]
    assert mirror.owner_of_unique("s2s") is None


def test_latest_log_sink_wins():
    """A later log sink of a name replaces the earlier (protocol §4.7); when it goes, the earlier
    one, still bound, is the sink again."""
    store = Store()
    store.txn([log("sm", "n1", "1", 0)])
    mirror = loaded(store)
    events = store.txn([log("sm", "n2", "1", 0)])
    assert mirror.apply(store.batch(events)) == [
        LogSinkChanged("sm", MemberRef("n1", "1"), MemberRef("n2", "1"))]
    assert mirror.log_sinks() == {"sm": MemberRef("n2", "1")}
    events = store.txn(deletes=[key(log("sm", "n2", "1", 0))])
    assert mirror.apply(store.batch(events)) == [
        LogSinkChanged("sm", MemberRef("n2", "1"), MemberRef("n1", "1"))]


def test_unreadable_entries_reported_once_and_left_out():
    """A key or value the layout cannot read is reported when it appears or changes, never
    enters the table, and a good value later replaces it."""
    store = Store()
    bad_key = LAYOUT.prefix + b"routes/x"
    good = member("example.com", "n1", "1", 0)
    mirror = TableMirror(LAYOUT)
    changes = mirror.apply(store.batch(store.txn([(bad_key, b"{}", 0), (key(good), b"garbage", 0)])))
    assert [type(c) for c in changes] == [Unreadable, Unreadable]
    assert {c.key for c in changes} == {bad_key, key(good)}
    assert mirror.members("example.com") == ()
    assert mirror.apply(store.batch(store.txn([(key(good), b"garbage", 0)]))) == []
    assert mirror.load_snapshot(*store.snapshot()) == []
    changes = mirror.apply(store.batch(store.txn([good])))
    assert [type(c) for c in changes] == [MemberJoined, NameUp]


def test_node_of_and_queries():
    """node_of gives a member's node (its peer address); the query views are read-only."""
    store = Store()
    store.txn([node("n1", 7, address="10.0.0.9:5348"), member("example.com", "n1", "1", 7)])
    store.txn([member("example.com", "ghost", "1", 0)])     # no node key (yet)
    mirror = loaded(store)
    first, second = mirror.members("example.com")
    assert mirror.node_of(first).address == "10.0.0.9:5348"
    assert mirror.node_of(first.ref) == mirror.nodes()["n1"]
    assert mirror.node_of(second) is None
    assert set(mirror.names()) == {"example.com"}
    with pytest.raises(TypeError):
        mirror.nodes()["x"] = None
    assert mirror.members("nobody") == ()


def test_identity_and_kind_kept():
    """A member carries its kind and slot identity as written."""
    store = Store()
    store.txn([member("gw.example.com", "n1", "1", 0, kind=MULTI_FROM, identity="copy1")])
    [m] = loaded(store).members("gw.example.com")
    assert (m.kind, m.identity) == (MULTI_FROM, "copy1")


# -- properties: batching, snapshots, replays ---------------------------------------

NODES = ["n1", "n/2"]
NAMES = ["example.com", "a/b.example"]
MIDS = ["1", "%2"]
LEASES = [0, 7, 8]


def _universe():
    """Every key the property tests write, each with its values (two good, one unreadable)."""
    out = []
    for n in NODES:
        out.append([node(n, 0)[:2], node(n, 0, address="h:2")[:2]])
    for name in NAMES:
        out.append([unique(name, "n1", "1", 0)[:2], unique(name, "n/2", "%2", 0)[:2]])
        for n in NODES:
            for m in MIDS:
                out.append([member(name, n, m, 0)[:2], member(name, n, m, 0, bound=2.0)[:2]])
                out.append([log(name, n, m, 0)[:2], (log(name, n, m, 0)[0], b'{"bound":2}')])
    out.append([default(NAMES[0], "n1", "1", 0)[:2], default(NAMES[1], "n/2", "1", 0)[:2]])
    out.append([(LAYOUT.prefix + b"nodes/%zz", b"{}")] * 2)
    return [[*values, (values[0][0], b"garbage")] for values in out]


UNIVERSE = _universe()
MEMBER_KEYS = [i for i, values in enumerate(UNIVERSE) if b"/members/" in values[0][0]]
# Mostly member keys, mostly puts, so that names fill up and empty again.
WRITE = st.tuples(st.sampled_from(MEMBER_KEYS) | st.integers(0, len(UNIVERSE) - 1),
                  st.sampled_from([True, True, False]), st.integers(0, 2), st.sampled_from(LEASES))
OP = st.one_of(st.tuples(st.just("txn"), st.lists(WRITE, min_size=1, max_size=5)),
               st.tuples(st.just("expire"), st.sampled_from(LEASES[1:])))
HISTORIES = st.lists(OP, max_size=30)


def run(ops):
    """The store after ``ops``: each txn puts or deletes a few keys of the universe."""
    store = Store()
    for op, arg in ops:
        if op == "expire":
            store.expire(arg)
            continue
        puts, deletes, seen = [], [], set()
        for index, put, choice, lease in arg:
            raw_key, value = UNIVERSE[index][choice]
            if raw_key in seen:
                continue                    # etcd refuses a key twice in one txn
            seen.add(raw_key)
            if put:
                puts.append((raw_key, value, lease))
            else:
                deletes.append(raw_key)
        store.txn(puts, deletes)
    return store


def batches(history, cuts, start=0, overlap=0):
    """history[start:] as batches, cut before the given indices; with ``overlap``, each batch
    repeats that many revisions before it (a watch resumed from an older revision)."""
    bounds = [start] + sorted(c for c in set(cuts) if start < c < len(history)) + [len(history)]
    return [Batch(history[b - 1][0].mod_revision,
                  [e for events in history[max(0, a - overlap):b] for e in events])
            for a, b in zip(bounds, bounds[1:]) if b > a]


def view(mirror):
    """Everything the query API shows."""
    return {"nodes": dict(mirror.nodes()),
            "members": {name: mirror.members(name) for name in mirror.names()},
            "unique": {name: mirror.owner_of_unique(name) for name in NAMES
                       if mirror.owner_of_unique(name) is not None},
            "default": mirror.default_route(),
            "sinks": dict(mirror.log_sinks())}


class Replay:
    """The table rebuilt from change values alone, checking each is consistent with what it
    held (a NameUp only for an unserved name, a leaver that was there, ...)."""

    def __init__(self, start=None):
        start = start or {"nodes": {}, "members": {}, "unique": {}, "default": None, "sinks": {}}
        self.nodes = dict(start["nodes"])
        self.members = {name: {m.ref: m for m in ms} for name, ms in start["members"].items()}
        self.served = set(self.members)
        self.unique = dict(start["unique"])
        self.default = start["default"]
        self.sinks = dict(start["sinks"])

    def feed(self, changes):
        for c in changes:
            self._one(c)
        assert self.served == {name for name, ms in self.members.items() if ms}
        return self

    def _one(self, c):
        if isinstance(c, NodeJoined):
            assert c.node.id not in self.nodes
            self.nodes[c.node.id] = c.node
        elif isinstance(c, NodeLeft):
            assert self.nodes.pop(c.node.id) == c.node
        elif isinstance(c, NodeUpdated):
            assert self.nodes[c.old.id] == c.old and c.old.create_revision == c.new.create_revision
            self.nodes[c.new.id] = c.new
        elif isinstance(c, MemberJoined):
            assert c.member.ref not in self.members.setdefault(c.member.name, {})
            self.members[c.member.name][c.member.ref] = c.member
        elif isinstance(c, MemberLeft):
            assert self.members[c.member.name].pop(c.member.ref) == c.member
        elif isinstance(c, MemberUpdated):
            assert self.members[c.old.name][c.old.ref] == c.old
            self.members[c.new.name][c.new.ref] = c.new
        elif isinstance(c, NameUp):
            assert c.name not in self.served
            self.served.add(c.name)
        elif isinstance(c, NameDown):
            self.served.remove(c.name)
        elif isinstance(c, UniqueTaken):
            assert self.unique.setdefault(c.name, c.owner) is c.owner
        elif isinstance(c, UniqueReleased):
            assert self.unique.pop(c.name) == c.owner
        elif isinstance(c, DefaultChanged):
            assert self.default == c.old != c.new
            self.default = c.new
        elif isinstance(c, LogSinkChanged):
            assert self.sinks.get(c.name) == c.old != c.new
            self.sinks.pop(c.name, None)
            if c.new is not None:
                self.sinks[c.name] = c.new
        else:
            assert isinstance(c, Unreadable)

    def view(self):
        def order(m):
            return m.create_revision, LAYOUT.key(MemberKey(m.name, m.node, m.id))
        return {"nodes": self.nodes,
                "members": {name: tuple(sorted(ms.values(), key=order))
                            for name, ms in self.members.items() if ms},
                "unique": self.unique, "default": self.default, "sinks": self.sinks}


@settings(max_examples=150, deadline=None)
@given(HISTORIES, st.lists(st.integers(0, 30)), st.lists(st.integers(0, 30)), st.integers(0, 3))
def test_batching_does_not_matter(ops, cuts_a, cuts_b, overlap):
    """Two mirrors fed the same events in different batchings (one with batches that repeat
    events already applied) end in the same table and member order, having reported the same
    changes; a snapshot of the end state gives that table too."""
    store = run(ops)
    a, b = TableMirror(LAYOUT), TableMirror(LAYOUT)
    changes_a = [c for batch in batches(store.history, cuts_a) for c in a.apply(batch)]
    changes_b = [c for batch in batches(store.history, cuts_b, overlap=overlap) for c in b.apply(batch)]
    assert changes_a == changes_b
    assert view(a) == view(b) == view(loaded(store))
    assert a.revision == b.revision == (store.revision if store.history else 0)


@settings(max_examples=150, deadline=None)
@given(HISTORIES, st.lists(st.integers(0, 30)))
def test_changes_rebuild_the_table(ops, cuts):
    """Replaying the change values batch by batch rebuilds the table exactly, each change
    consistent with the state before it (no name advertised twice, none missed)."""
    store = run(ops)
    mirror, replay = TableMirror(LAYOUT), Replay()
    for batch in batches(store.history, cuts):
        replay.feed(mirror.apply(batch))
        assert replay.view() == view(mirror)
    assert all(mirror.apply(batch) == [] for batch in batches(store.history, cuts))  # idempotent


@settings(max_examples=150, deadline=None)
@given(HISTORIES, st.data())
def test_resnapshot_gives_the_missed_difference(ops, data):
    """A mirror that missed batches (a compaction) and then loads a snapshot ends where one that
    applied them does, and the snapshot's changes take its old table to the new one as the missed
    batches' changes do."""
    store = run(ops)
    history = store.history
    k = data.draw(st.integers(0, len(history)), label="applied")
    cuts = data.draw(st.lists(st.integers(0, 30)), label="cuts")
    behind, ahead = TableMirror(LAYOUT), TableMirror(LAYOUT)
    for batch in batches(history[:k], cuts):
        behind.apply(batch)
        ahead.apply(batch)
    old = view(behind)
    missed = [c for batch in batches(history, cuts, start=k) for c in ahead.apply(batch)]
    diff = behind.load_snapshot(*store.snapshot())
    assert view(behind) == view(ahead) == Replay(old).feed(diff).view() == Replay(old).feed(missed).view()
    was, now = set(old["members"]), set(view(ahead)["members"])
    assert {c.name for c in diff if isinstance(c, NameUp)} == now - was
    assert {c.name for c in diff if isinstance(c, NameDown)} == was - now
    assert behind.load_snapshot(*store.snapshot()) == []        # the same snapshot again: nothing
