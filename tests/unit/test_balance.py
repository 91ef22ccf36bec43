"""jrouter.routing.balance: jabberd2's cluster member choice, bit for bit (protocol §6.3), and the
consistent/fixed-slot algorithms, SlotTable, IqTracker and HoldQueue."""

import collections
import hashlib
import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jrouter.routing.policy import BOUNCE, DEFAULT_POLICY, DELIVER, Choice, place, placement_key
from jrouter.routing.balance import (
    MAX_SLOT_ID, HoldQueue, IqTracker, SlotBusy, SlotsFull, SlotTable, fixed_slot, jabberd2_hash,
    jabberd2_index, node_less_key, rendezvous_order, rendezvous_pick)
from jrouter.wire.jid import parse_jid

# protocol §6.3 worked values: bare JID, SHA-1, (w1^w2^w3)>>2, %2, %3 — observed on the real router.
WORKED = [
    ("user0@example.com", "e9ccc188c9a7614d928892410d79abfdf0d35d59", 1012274581, 1, 1),
    ("user1@example.com", "4d42f50e4040fd3d04eb0063774faedba1ad3c9f", 559216908, 0, 0),
    ("user4@example.com", "38be55d3f2de766bb6f2c6cd09404fb930b6816f", 134208275, 1, 2),
    ("alice@example.com", "fc2398a73dd54d6237c4fdb58fd7d75347cf5af3", 555348385, 1, 1),
    ("carol@example.com", "b0f029c273770d81c0829b098a0abe7f25955c9b", 1036664782, 0, 1),
]


def no_random(n):
    raise AssertionError("randint must not be called")


def jabberd2_pick(count, key, randint):
    """The member index routing gives a packet for ``key`` (a JID or None)
    among ``count`` members under jabberd2's placement (no policy)."""
    address = None if key is None else key.full
    choice = place(DEFAULT_POLICY, placement_key(DEFAULT_POLICY, address), range(count), range(count),
                   randint)
    return choice.slot if choice.action == DELIVER else None


@pytest.mark.parametrize("bare,sha1,value,mod2,mod3", WORKED, ids=[w[0] for w in WORKED])
def test_worked_values(bare, sha1, value, mod2, mod3):
    """The hash and the picks for 2 and 3 members match the worked table of protocol §6.3."""
    assert hashlib.sha1(bare.encode()).hexdigest() == sha1
    assert jabberd2_hash(bare) == value
    assert jabberd2_index(2, bare) == mod2
    assert jabberd2_index(3, bare) == mod3
    key = parse_jid(bare)
    assert jabberd2_pick(2, key, no_random) == mod2
    assert jabberd2_pick(3, key, no_random) == mod3


def test_hash_uses_prepped_bare_jid():
    """User0@Example.COM/res picks like user0@example.com (resource dropped, parts prepped)."""
    key = parse_jid("User0@Example.COM/res")
    assert jabberd2_pick(3, key, no_random) == 1
    assert jabberd2_pick(2, key, no_random) == 1


def test_single_member_needs_no_key_or_random():
    """With one member the choice is 0 whatever the key."""
    assert jabberd2_pick(1, None, no_random) == 0
    assert jabberd2_pick(1, parse_jid("example.com"), no_random) == 0


@pytest.mark.parametrize("key", [None, parse_jid("example.com"), parse_jid("example.com/res")])
def test_no_node_is_random(key):
    """No key, or a key without a node, takes the injected random function."""
    calls = []

    def randint(n):
        calls.append(n)
        return 7

    assert jabberd2_pick(3, key, randint) == 7 % 3
    assert calls == [3]


def test_random_result_is_reduced_mod_n():
    """A rand()-like function returning any non-negative int still gives a valid index."""
    assert jabberd2_pick(4, None, lambda n: 2**31 - 1) == (2**31 - 1) % 4


def test_zero_members_is_an_error():
    """There is nothing to pick from an empty member list: the packet bounces."""
    assert place(DEFAULT_POLICY, None, range(0), range(0), random.randrange) == Choice(BOUNCE, None)


BARE = st.builds(lambda n, d: f"{n}@{d}.example",
                 st.from_regex(r"[a-z0-9._-]{1,20}", fullmatch=True),
                 st.from_regex(r"[a-z0-9-]{1,12}", fullmatch=True))


@settings(max_examples=300)
@given(BARE, st.integers(min_value=1, max_value=64))
def test_deterministic_and_in_range(bare, n):
    """The same key always picks the same member, and the index is in range(n)."""
    key = parse_jid(bare)
    a = jabberd2_pick(n, key, no_random)
    assert a == jabberd2_pick(n, parse_jid(bare), no_random)
    assert 0 <= a < n


@given(BARE)
def test_hash_fits_30_bits(bare):
    """(w1^w2^w3)>>2 is a 30-bit unsigned value."""
    assert 0 <= jabberd2_hash(bare) < 2**30


@settings(max_examples=20, deadline=None)
@given(st.integers(min_value=2, max_value=7), st.integers(min_value=0, max_value=10**6))
def test_roughly_uniform_spread(n, offset):
    """3000 users spread over n members within ±25% of the fair share."""
    counts = collections.Counter(
        jabberd2_pick(n, parse_jid(f"user{offset + i}@example.com"), no_random) for i in range(3000))
    fair = 3000 / n
    assert len(counts) == n
    assert all(abs(c - fair) < 0.25 * fair for c in counts.values())


# ---------------------------------------------------------------------------
# Rendezvous (HRW) over stable slot ids.

KEYS = st.text(min_size=0, max_size=40)
SLOT_SETS = st.sets(st.integers(min_value=0, max_value=MAX_SLOT_ID), min_size=1, max_size=24).map(sorted)
USERS = [f"user{i}@example.com" for i in range(4000)]


def reference_score(key, slot):
    """The documented definition: big-endian word slot%8 of BLAKE2b-512(b'hrw<slot//8>:' + key)."""
    digest = hashlib.blake2b(b"hrw%d:" % (slot // 8) + key.encode()).digest()
    return int.from_bytes(digest[8 * (slot % 8):8 * (slot % 8) + 8], "big")


def test_rendezvous_pinned_values():
    """A few picks pinned: a change here moves users on upgrade and makes routers disagree."""
    picks = [rendezvous_pick(f"user{i}@example.com", range(4)) for i in range(8)]
    assert picks == [0, 0, 3, 3, 2, 1, 1, 2]


@settings(max_examples=300)
@given(KEYS, SLOT_SETS, st.randoms(use_true_random=False))
def test_rendezvous_deterministic_in_range_order_free(key, ids, rnd):
    """The same key and slot set give the same slot, a member of the set, whatever the order given."""
    shuffled = list(ids)
    rnd.shuffle(shuffled)
    pick = rendezvous_pick(key, ids)
    assert pick in ids
    assert pick == rendezvous_pick(key, shuffled) == rendezvous_pick(key, tuple(ids))
    assert pick == max(ids, key=lambda s: reference_score(key, s))


@settings(max_examples=200)
@given(KEYS, SLOT_SETS)
def test_rendezvous_order_is_the_failover_chain(key, ids):
    """The order is a permutation, best first; without the first choice, the pick is the second."""
    order = rendezvous_order(key, ids)
    assert sorted(order) == ids and order[0] == rendezvous_pick(key, ids)
    if len(ids) > 1:
        assert rendezvous_pick(key, [s for s in ids if s != order[0]]) == order[1]


@settings(max_examples=200)
@given(KEYS, SLOT_SETS, st.integers(min_value=0, max_value=MAX_SLOT_ID))
def test_rendezvous_adding_a_slot_only_takes_keys(key, ids, new):
    """Adding a slot (even in a new block of eight) either gives it the key or changes nothing."""
    after = rendezvous_pick(key, sorted(set(ids) | {new}))
    assert after in (new, rendezvous_pick(key, ids))


@settings(max_examples=15, deadline=None)
@given(st.integers(min_value=2, max_value=16), st.data())
def test_rendezvous_leave_and_rejoin(n, data):
    """One of n leaving moves at most 1/n + 5% of users, only its own; its return restores everyone."""
    ids = list(range(n))
    leaver = data.draw(st.sampled_from(ids))
    survivors = [s for s in ids if s != leaver]
    before = [rendezvous_pick(u, ids) for u in USERS]
    during = [rendezvous_pick(u, survivors) for u in USERS]
    moved = [b != d for b, d in zip(before, during)]
    assert all(m == (b == leaver) for m, b in zip(moved, before))  # nobody of a survivor moves
    assert sum(moved) / len(USERS) <= 1 / n + 0.05
    assert [rendezvous_pick(u, ids) for u in USERS] == before


@settings(max_examples=15, deadline=None)
@given(st.sets(st.integers(min_value=0, max_value=40), min_size=2, max_size=16))
def test_rendezvous_spread(ids):
    """4000 users spread over any slot ids within 5 standard deviations of the fair share."""
    counts = collections.Counter(rendezvous_pick(u, sorted(ids)) for u in USERS)
    fair = len(USERS) / len(ids)
    assert set(counts) == ids
    assert all(abs(c - fair) <= 5 * fair ** 0.5 for c in counts.values())


@pytest.mark.parametrize("ids", [[], [-1, 2], [0, MAX_SLOT_ID + 1]])
def test_rendezvous_bad_slot_ids(ids):
    """No slots, a negative id or one above MAX_SLOT_ID is refused, not silently mis-scored."""
    with pytest.raises(ValueError):
        rendezvous_pick("a@b", ids)


def test_rendezvous_odd_keys_do_not_raise():
    """Any string is a key, lone surrogates included (never crash on odd input)."""
    assert rendezvous_pick("\ud800x", [0, 1]) in (0, 1)
    assert rendezvous_pick("", [3]) == 3


# ---------------------------------------------------------------------------
# Fixed slots and keys without a node.


@settings(max_examples=300)
@given(BARE, st.integers(min_value=1, max_value=64))
def test_fixed_slot_is_jabberd2_modulo(bare, slots):
    """With every slot connected in slot order, fixed slots place a user where jabberd2 would."""
    slot = fixed_slot(bare, slots)
    assert 0 <= slot < slots
    assert slot == jabberd2_index(slots, bare) == jabberd2_pick(slots, parse_jid(bare), no_random)


@pytest.mark.parametrize("slots", [2, 4, 7, 16])
def test_fixed_slot_spread(slots):
    """4000 users fill every slot within 5 standard deviations of the fair share."""
    counts = collections.Counter(fixed_slot(u, slots) for u in USERS)
    fair = len(USERS) / slots
    assert len(counts) == slots and all(abs(c - fair) <= 5 * fair ** 0.5 for c in counts.values())


def test_fixed_slot_needs_a_count():
    """Zero slots is an error, not a division by zero."""
    with pytest.raises(ValueError):
        fixed_slot("a@b", 0)


def test_node_less_key():
    """Without a node: the domain (full JID if asked); not a JID at all: the raw text."""
    assert node_less_key(parse_jid("Example.COM/res"), "Example.COM/res") == "example.com"
    assert node_less_key(parse_jid("Example.COM/res"), "Example.COM/res", full=True) == "example.com/res"
    assert node_less_key(None, "@bad") == "@bad"


# ---------------------------------------------------------------------------
# SlotTable.


def test_slot_table_lowest_free_and_return():
    """New identities take 0, 1, 2; a returning identity gets its slot back, not the lowest free."""
    table = SlotTable()
    assert [table.claim(i) for i in ("sm-a", "sm-b", "sm-c")] == [0, 1, 2]
    table.release(0)
    table.release(1)
    assert table.live() == (2,) and table.known() == (0, 1, 2)
    assert table.claim("sm-b") == 1
    assert table.claim("sm-d") == 3  # 0 stays reserved for sm-a
    assert table.claim("sm-a") == 0
    assert table.live() == (0, 1, 2, 3)


def test_slot_table_identity_less_members():
    """A member without identity takes the lowest slot neither live nor reserved;
    after it leaves the slot stays known (so dead='hold' applies) and the next
    identity-less member gets it back, before any fresh slot."""
    table = SlotTable()
    table.claim("sm-a")
    table.release(0)
    assert table.claim(None) == 1
    assert table.claim(None) == 2
    table.release(1)
    assert table.known() == (0, 1, 2) and table.live() == (2,)
    assert table.claim("sm-b") == 3          # a new identity never takes the absent one's slot
    assert table.claim(None) == 1
    table.release(2)
    table.release(1)
    assert table.claim(None) == 1            # two absent: the lowest first
    assert table.claim(None) == 2
    assert table.known() == (0, 1, 2, 3)


def test_slot_table_identity_less_slot_taken_over_when_full():
    """With every slot reserved, a newcomer takes an absent identity-less member's slot first."""
    table = SlotTable(slots=2)
    table.claim("a")
    table.claim(None)
    table.release(0)
    table.release(1)
    assert table.claim("b") == 1
    assert table.snapshot() == {"a": 0, "b": 1} and table.known() == (0, 1)


def test_slot_table_fixed_count_full():
    """With slots=2, a third live member is refused clearly."""
    table = SlotTable(slots=2)
    table.claim("a")
    table.claim(None)
    with pytest.raises(SlotsFull, match="all 2 slots"):
        table.claim("c")


def test_slot_table_takes_over_absent_owner_when_all_reserved():
    """When every slot is reserved, a newcomer takes the lowest absent owner's slot; that owner is forgotten."""
    table = SlotTable(slots=2)
    table.claim("a")
    table.claim("b")
    table.release(0)
    assert table.claim("renamed") == 0
    assert table.snapshot() == {"b": 1, "renamed": 0}


def test_slot_table_busy_identity():
    """A second live connection with the same identity raises SlotBusy naming the slot."""
    table = SlotTable()
    table.claim("x")
    table.claim("sm")
    with pytest.raises(SlotBusy) as caught:
        table.claim("sm")
    assert caught.value.slot == 1 and caught.value.identity == "sm"
    table.release(1)  # the router replaced the half-open old connection
    assert table.claim("sm") == 1


def test_slot_table_snapshot_restore_forget():
    """snapshot() survives a router restart through `remembered`; forget() frees a slot for good."""
    table = SlotTable()
    for name in ("a", "b", "c"):
        table.claim(name)
    restored = SlotTable(remembered=table.snapshot())
    assert restored.live() == () and restored.known() == (0, 1, 2)
    assert restored.claim("c") == 2 and restored.claim("a") == 0
    restored.forget("b")
    assert restored.known() == (0, 2)
    assert restored.claim("new") == 1


def test_slot_table_release_is_idempotent():
    """Releasing a slot twice, or one never claimed, changes nothing."""
    table = SlotTable()
    table.claim("a")
    table.release(0)
    table.release(0)
    table.release(7)
    assert table.live() == () and table.known() == (0,)


def test_slot_table_bad_count():
    """A slot count outside 1..MAX_SLOT_ID+1 is refused."""
    with pytest.raises(ValueError):
        SlotTable(slots=0)


@settings(max_examples=100)
@given(st.permutations(["sm1", "sm2", "sm3", "sm4", "sm5"]), st.permutations(["sm1", "sm2", "sm3", "sm4", "sm5"]))
def test_slot_table_reconnect_order_does_not_matter(first, second):
    """After all instances drop and reconnect in any other order, every one has its old slot."""
    table = SlotTable(slots=5)
    before = {name: table.claim(name) for name in first}
    for slot in table.live():
        table.release(slot)
    after = {name: table.claim(name) for name in second}
    assert after == before


class SlotTableMachine(RuleBasedStateMachine):
    """Random connects/disconnects of named and anonymous members against a model."""

    NAMES = ("a", "b", "c", "d", "e", "f")

    def __init__(self):
        super().__init__()
        self.table = SlotTable(slots=8)
        self.connected = {}   # connection number -> (identity, slot)
        self.reserved = {}    # identity -> slot, as the model expects it
        self.counter = itertools.count()

    @rule(name=st.sampled_from(NAMES + (None,)))
    def connect(self, name):
        live_names = {n for n, _ in self.connected.values()}
        if name is not None and name in live_names:
            with pytest.raises(SlotBusy):
                self.table.claim(name)
            return
        if len(self.connected) == 8 and name not in self.reserved:
            with pytest.raises(SlotsFull):
                self.table.claim(name)
            return
        slot = self.table.claim(name)
        if name in self.reserved:
            assert slot == self.reserved[name]  # a returning identity gets its own slot back
        else:
            taken = [n for n, s in self.reserved.items() if s == slot]
            assert not set(taken) & live_names  # only an absent owner's slot is taken over
            for n in taken:
                del self.reserved[n]
            if name is not None:
                self.reserved[name] = slot
        self.connected[next(self.counter)] = (name, slot)

    @precondition(lambda self: self.connected)
    @rule(data=st.data())
    def disconnect(self, data):
        key = data.draw(st.sampled_from(sorted(self.connected)))
        self.table.release(self.connected.pop(key)[1])

    @invariant()
    def live_slots_match(self):
        slots = [slot for _, slot in self.connected.values()]
        assert len(set(slots)) == len(slots)
        assert self.table.live() == tuple(sorted(slots))
        assert all(0 <= s < 8 for s in slots)
        assert self.table.snapshot() == self.reserved


TestSlotTableMachine = SlotTableMachine.TestCase
TestSlotTableMachine.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


# ---------------------------------------------------------------------------
# IqTracker.


def test_iq_tracker_round_trip():
    """A reply finds the member that sent the request, once."""
    iqs = IqTracker(timeout=60)
    iqs.remember("q1", "example.com", "other.org", "sm-2", now=0)
    assert iqs.take("q1", "example.com", "other.org", now=10) == "sm-2"
    assert iqs.take("q1", "example.com", "other.org", now=10) is None


def test_iq_tracker_key_is_id_and_both_addresses():
    """The same id between other addresses is another request."""
    iqs = IqTracker()
    iqs.remember("q1", "example.com", "other.org", "sm-1", now=0)
    assert iqs.take("q1", "example.com", "third.org", now=1) is None
    assert iqs.take("q1", "other.org", "example.com", now=1) is None
    assert len(iqs) == 1


def test_iq_tracker_expiry():
    """After the timeout, the entry is gone: take() returns None and expire() drops it."""
    iqs = IqTracker(timeout=5)
    iqs.remember("q1", "a", "b", "m1", now=0)
    iqs.remember("q2", "a", "b", "m2", now=3)
    assert iqs.take("q1", "a", "b", now=5) is None
    assert iqs.expire(now=7.9) == 0 and iqs.expire(now=8) == 1 and len(iqs) == 0


def test_iq_tracker_bounded_oldest_dropped():
    """Beyond `limit` entries the oldest are dropped first."""
    iqs = IqTracker(timeout=60, limit=3)
    for i in range(5):
        iqs.remember(f"q{i}", "a", "b", i, now=i)
    assert len(iqs) == 3
    assert [iqs.take(f"q{i}", "a", "b", now=10) for i in range(5)] == [None, None, 2, 3, 4]


def test_iq_tracker_reused_id_refreshes():
    """Remembering the same request again keeps the newest member and lifetime."""
    iqs = IqTracker(timeout=5)
    iqs.remember("q", "a", "b", "old", now=0)
    iqs.remember("q", "a", "b", "new", now=4)
    assert iqs.expire(now=6) == 0
    assert iqs.take("q", "a", "b", now=6) == "new"


@settings(max_examples=100)
@given(st.lists(st.tuples(st.integers(0, 20), st.floats(0, 1, allow_nan=False)), max_size=60),
       st.integers(1, 10))
def test_iq_tracker_never_exceeds_limit(events, limit):
    """Whatever is remembered, the tracker holds at most `limit` entries."""
    iqs = IqTracker(timeout=2, limit=limit)
    now = 0.0
    for ident, step in events:
        now += step
        iqs.remember(str(ident), "a", "b", ident, now)
        assert len(iqs) <= limit


# ---------------------------------------------------------------------------
# HoldQueue.


def test_hold_then_release_in_order():
    """Packets held for a slot come back in arrival order when the instance returns."""
    holds = HoldQueue(seconds=30)
    assert holds.hold("sm", 1, "p1", now=0) == []
    assert holds.hold("sm", 1, "p2", now=1) == []
    holds.hold("sm", 2, "other", now=1)
    assert len(holds) == 3
    assert holds.release("sm", 1) == ["p1", "p2"]
    assert holds.release("sm", 1) == []
    assert len(holds) == 1


def test_hold_expiry_then_gone_until_return():
    """After the grace period packets are handed over for bouncing, later ones bounce at once, until return."""
    holds = HoldQueue(seconds=30)
    holds.hold("sm", 1, "p1", now=0)
    assert holds.expired(now=29.9) == []
    assert holds.expired(now=30) == [("sm", 1, ["p1"])]
    assert holds.hold("sm", 1, "p2", now=31) == ["p2"]
    assert holds.release("sm", 1) == []
    assert holds.hold("sm", 1, "p3", now=40) == []


def test_hold_grace_starts_at_down_not_extended():
    """down() starts the grace period; a later down() or hold() does not extend it; seconds per call."""
    holds = HoldQueue(seconds=30)
    holds.down("gw", 0, now=100, seconds=60)
    holds.down("gw", 0, now=150, seconds=60)
    holds.hold("gw", 0, "p", now=159, seconds=60)
    assert holds.expired(now=159) == []
    assert holds.expired(now=160) == [("gw", 0, ["p"])]


def test_hold_full_bounces_oldest():
    """A full slot queue bounces its oldest packet to make room for the new one."""
    holds = HoldQueue(seconds=30, limit=2)
    assert holds.hold("sm", 0, "p1", now=0) == []
    assert holds.hold("sm", 0, "p2", now=0) == []
    assert holds.hold("sm", 0, "p3", now=0) == ["p1"]
    assert holds.release("sm", 0) == ["p2", "p3"]


def test_hold_bounded_in_bytes_bounces_oldest_keeps_newest():
    """Past limit_bytes per slot the oldest go, however few; a packet
    bigger than the bound alone is still kept (the newest always is)."""
    holds = HoldQueue(seconds=30, limit=100, limit_bytes=1000)
    assert holds.hold("sm", 0, "a", now=0, size=400) == []
    assert holds.hold("sm", 0, "b", now=0, size=400) == []
    assert holds.hold("sm", 0, "c", now=0, size=400) == ["a"]
    assert holds.size() == 800
    assert holds.hold("sm", 0, "big", now=0, size=5000) == ["b", "c"]
    assert holds.size() == 5000
    assert holds.release("sm", 0) == ["big"]
    assert holds.size() == 0


def test_hold_names_are_separate():
    """The same slot number of two names are two queues."""
    holds = HoldQueue(seconds=10)
    holds.hold("a", 0, "pa", now=0)
    holds.hold("b", 0, "pb", now=5)
    assert holds.expired(now=10) == [("a", 0, ["pa"])]
    assert holds.release("b", 0) == ["pb"]
