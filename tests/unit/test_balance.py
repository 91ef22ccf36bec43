"""jrouter.balance: jabberd2's cluster member choice, bit for bit (spec §6.4)."""

import collections
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jrouter.balance import jabberd2_hash, jabberd2_index, jabberd2_pick
from jrouter.jid import parse_jid

# Spec §6.4 worked values: bare JID, SHA-1, (w1^w2^w3)>>2, %2, %3 — observed on the real router.
WORKED = [
    ("user0@example.com", "e9ccc188c9a7614d928892410d79abfdf0d35d59", 1012274581, 1, 1),
    ("user1@example.com", "4d42f50e4040fd3d04eb0063774faedba1ad3c9f", 559216908, 0, 0),
    ("user4@example.com", "38be55d3f2de766bb6f2c6cd09404fb930b6816f", 134208275, 1, 2),
    ("alice@example.com", "fc2398a73dd54d6237c4fdb58fd7d75347cf5af3", 555348385, 1, 1),
    ("carol@example.com", "b0f029c273770d81c0829b098a0abe7f25955c9b", 1036664782, 0, 1),
]


def no_random(n):
    raise AssertionError("randint must not be called")


@pytest.mark.parametrize("bare,sha1,value,mod2,mod3", WORKED, ids=[w[0] for w in WORKED])
def test_worked_values(bare, sha1, value, mod2, mod3):
    """The hash and the picks for 2 and 3 members match the spec's worked table."""
    import hashlib
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
    """There is nothing to pick from an empty member list."""
    with pytest.raises(ValueError):
        jabberd2_pick(0, None, random.randrange)


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
