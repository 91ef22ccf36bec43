"""Unit tests for jrouter.routing.access: <io><access> rules and util/rate.c counters."""

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jrouter.routing.access import (
    ALLOW_DENY,
    DENY_ALLOW,
    AccessRule,
    AccessRules,
    PRUNE_AT,
    AddressCounters,
    ConnectLimiter,
    RateCounter,
    RateLimit,
    parse_mask,
)


def rules(order=ALLOW_DENY, allow=(), deny=()):
    return AccessRules(
        order,
        tuple(AccessRule.parse(*r) for r in allow),
        tuple(AccessRule.parse(*r) for r in deny),
    )


# --- masks ---------------------------------------------------------------


@pytest.mark.parametrize(
    "mask, version, prefix",
    [
        ("255.255.255.255", 4, 32),
        ("255.255.255.0", 4, 24),
        ("255.0.0.0", 4, 8),
        ("128.0.0.0", 4, 1),
        ("0.0.0.0", 4, 0),
        ("24", 4, 24),
        (" 16 ", 4, 16),
        ("64", 6, 64),
        ("128", 6, 128),
        ("255.255.0.0", 6, 16),
    ],
)
def test_parse_mask_dotted_and_numeric(mask, version, prefix):
    """Dotted masks count their leading one bits; numbers are prefix lengths."""
    assert parse_mask(mask, version) == prefix


def test_missing_mask_is_host_for_ipv4():
    """A rule without mask gets 255.255.255.255, i.e. /32 (router.c default)."""
    assert AccessRule.parse("10.1.2.3").prefix == 32


def test_missing_mask_is_slash_32_for_ipv6_quirk():
    """jabberd2 quirk kept: an IPv6 rule without mask is a /32, not a /128."""
    rule = AccessRule.parse("2001:db8::1")
    assert rule.prefix == 32
    assert rule.matches(ipaddress.ip_address("2001:db8:ffff::7"))
    assert not rule.matches(ipaddress.ip_address("2001:db9::1"))


@pytest.mark.parametrize(
    "mask, version",
    [("abc", 4), ("", 4), ("-1", 4), ("33", 4), ("129", 6), ("255.0.255.0", 4), ("24x", 4), ("1.2.3", 4)],
)
def test_parse_mask_rejects_garbage(mask, version):
    """Garbage, out-of-range and non-contiguous masks are errors (atoi would give /0)."""
    with pytest.raises(ValueError):
        parse_mask(mask, version)


def test_rule_rejects_bad_address():
    """A rule address must be an IP literal."""
    with pytest.raises(ValueError, match="not an IPv4 or IPv6"):
        AccessRule.parse("example.com")


# --- matching ------------------------------------------------------------


def test_ipv4_network_match():
    """An IPv4 rule with a /8 mask matches the whole network and nothing else."""
    rule = AccessRule.parse("127.0.0.0", "255.0.0.0")
    assert rule.matches(ipaddress.ip_address("127.200.3.4"))
    assert not rule.matches(ipaddress.ip_address("128.0.0.1"))


def test_mapped_peer_matches_ipv4_rule():
    """A dual-stack peer ::ffff:a.b.c.d matches IPv4 rules as a.b.c.d."""
    r = rules(deny=[("192.168.0.0", "16")])
    assert not r.allows("::ffff:192.168.4.5")
    assert r.allows("::ffff:10.0.0.1")


def test_mapped_rule_matches_ipv4_peer():
    """An IPv4-mapped IPv6 rule matches IPv4 peers, its prefix less the 96 mapping bits."""
    rule = AccessRule.parse("::ffff:10.0.0.0", "104")
    assert rule.matches(ipaddress.ip_address("10.9.9.9"))
    assert not rule.matches(ipaddress.ip_address("11.0.0.1"))
    assert rule.matches(ipaddress.ip_address("::ffff:10.1.1.1"))


def test_families_do_not_mix_otherwise():
    """A plain IPv6 peer never matches an IPv4 rule and vice versa."""
    assert not AccessRule.parse("0.0.0.0", "0").matches(ipaddress.ip_address("::1"))
    assert not AccessRule.parse("::", "0").matches(ipaddress.ip_address("127.0.0.1"))


def test_zero_prefix_matches_everything():
    """mask 0 / 0.0.0.0 matches every address of the family (jabberd2 on x86 matches only the rule IP)."""
    r = rules(deny=[("0.0.0.0", "0.0.0.0")])
    assert not r.allows("127.0.0.1")
    assert not r.allows("203.0.113.9")


# --- ordering ------------------------------------------------------------


def test_allow_deny_defaults_to_allow():
    """allow,deny with no rules allows everyone."""
    assert rules().allows("203.0.113.1")


def test_deny_allow_defaults_to_deny():
    """deny,allow with no rules denies everyone."""
    assert not rules(DENY_ALLOW).allows("203.0.113.1")


def test_allow_deny_allow_wins_over_deny():
    """allow,deny: a peer matching both lists is allowed; one matching only deny is refused."""
    r = rules(allow=[("127.0.0.1",)], deny=[("127.0.0.0", "8")])
    assert r.allows("127.0.0.1")
    assert not r.allows("127.0.0.2")
    assert r.allows("10.0.0.1")


def test_deny_allow_deny_wins_over_allow():
    """deny,allow: a peer matching both lists is refused; only-allow peers get in."""
    r = rules(DENY_ALLOW, allow=[("127.0.0.0", "8")], deny=[("127.0.0.2",)])
    assert r.allows("127.0.0.1")
    assert not r.allows("127.0.0.2")
    assert not r.allows("10.0.0.1")


def test_unparsable_peer_is_denied():
    """access_check refuses an address it cannot parse."""
    assert not rules().allows("not-an-ip")


addresses4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
addresses6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)


@given(addresses4, addresses4, st.integers(0, 32))
def test_ipv4_prefix_match_agrees_with_ipaddress(rule_ip, peer, prefix):
    """IPv4 matching equals membership in ipaddress's network of the same prefix."""
    network = ipaddress.ip_network(f"{rule_ip}/{prefix}", strict=False)
    assert AccessRule(rule_ip, prefix).matches(peer) == (peer in network)


@given(addresses6, addresses6, st.integers(0, 128))
def test_ipv6_prefix_match_agrees_with_ipaddress(rule_ip, peer, prefix):
    """IPv6 matching equals membership in ipaddress's network of the same prefix."""
    network = ipaddress.ip_network(f"{rule_ip}/{prefix}", strict=False)
    assert AccessRule(rule_ip, prefix).matches(peer) == (peer in network)


@given(addresses4, addresses4, st.integers(0, 32))
def test_mapped_peer_same_as_ipv4_peer(rule_ip, peer, prefix):
    """A peer seen as ::ffff:a.b.c.d gets the same verdict as a.b.c.d."""
    mapped = ipaddress.IPv6Address("::ffff:" + str(peer))
    rule = AccessRule(rule_ip, prefix)
    assert rule.matches(mapped) == rule.matches(peer)


@given(st.integers(0, 32))
def test_dotted_mask_round_trip(prefix):
    """The dotted form of every prefix length converts back to that prefix."""
    dotted = str(ipaddress.IPv4Network(f"0.0.0.0/{prefix}").netmask)
    assert parse_mask(dotted, 4) == prefix


# --- rate counters -------------------------------------------------------


def test_counter_goes_bad_at_total_and_recovers_after_throttle():
    """3 events in the window make the source bad; it is good again throttle seconds later."""
    c = RateCounter(RateLimit(3, 10, 5))
    for t in (100, 101, 102):
        assert c.check(t)
        c.add(t)
    assert not c.check(103)
    assert not c.check(106.9)
    assert c.check(107)  # 5 s after going bad at 102
    assert c.count == 0


def test_counter_window_resets_after_seconds():
    """Events spread over more than `seconds` never trip the limit."""
    c = RateCounter(RateLimit(3, 10, 5))
    for t in (0, 5, 10, 15, 20, 25):
        assert c.check(t)
        c.add(t)
    assert c.count == 2  # window restarted at 20


def test_counter_window_starts_at_first_event():
    """The window opens at the first event, not at creation."""
    c = RateCounter(RateLimit(2, 10, 5))
    c.add(1000)
    c.add(1009)
    assert not c.check(1009)


def test_counter_left_for_byte_limits():
    """left() is the remaining allowance, and 0 while bad."""
    c = RateCounter(RateLimit(1000, 5, 5))
    assert c.left() == 1000
    c.add(0, 300)
    assert c.left() == 700
    c.add(1, 800)
    assert c.left() == 0
    assert not c.check(2)


def test_connect_limiter_refuses_fourth_connect():
    """connects 3 per 10 s, throttle 5: the 4th connect is refused (protocol §3.1)."""
    limiter = ConnectLimiter(RateLimit(3, 10, 5))
    assert [limiter.admit("1.2.3.4", t) for t in (0, 1, 2, 3)] == [True, True, True, False]
    assert limiter.admit("5.6.7.8", 3)
    assert not limiter.admit("1.2.3.4", 6.5)
    assert limiter.admit("1.2.3.4", 7)


def test_connect_limiter_disabled():
    """A total of 0 disables the limit."""
    limiter = ConnectLimiter(RateLimit(0))
    assert all(limiter.admit("1.2.3.4", 0) for _ in range(100))
    assert not limiter.counters


@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.floats(0, 5)), max_size=40))
def test_pruning_never_changes_verdicts(steps):
    """Dropping idle counters gives exactly the verdicts of never dropping them."""
    limit = RateLimit(2, 3, 2)
    kept, pruned = ConnectLimiter(limit), ConnectLimiter(limit)
    now = 0.0
    for ip, gap in steps:
        now += gap
        pruned.counters._prune(now)
        assert kept.admit(ip, now) == pruned.admit(ip, now)


def test_counters_stay_bounded_under_an_address_scan():
    """100,000 addresses failing within one window: never more than
    max_size counters, the refusing ones kept over those still counting."""
    counters = AddressCounters(RateLimit(2, 60, 300), max_size=PRUNE_AT + 10)
    refusing = [f"10.0.0.{n}" for n in range(5)]
    for ip in refusing:
        counters.counter(ip, 0).add(0, 2)
    sizes = set()
    for n in range(100_000):
        counters.counter(f"2001:db8::{n:x}", 1 + n / 1e6).add(1)
        sizes.add(len(counters))
    assert max(sizes) <= PRUNE_AT + 10
    assert all(not counters.get(ip).check(2) for ip in refusing)


def test_refusing_counters_go_last_and_oldest_first():
    """Every counter refusing and no room: the oldest refusing one goes."""
    counters = AddressCounters(RateLimit(1, 60, 300), max_size=PRUNE_AT)
    for n in range(PRUNE_AT + 1):
        counters.counter(f"a{n}", 0).add(0)
    assert len(counters) == PRUNE_AT
    assert counters.get("a0") is None and counters.get("a1") is not None
