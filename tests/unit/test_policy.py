"""jrouter.routing.policy: per-name clustering policies, their placement decisions, and <clustering> parsing."""

import collections
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from jrouter.routing.balance import SlotTable, fixed_slot, jabberd2_index, rendezvous_order, rendezvous_pick
from jrouter.wire.jid import parse_jid
from jrouter.config import parse_clustering
from jrouter.routing.policy import (
    BOUNCE, DEFAULT_POLICY, DELIVER, HOLD, Choice, ClusterPolicy, PolicyError, PolicyTable, key_attribute,
    place, placement_key)

USERS = [f"user{i}@example.com" for i in range(3000)]
CONSISTENT = ClusterPolicy(match="example.com", algorithm="consistent")
SLOTS4 = ClusterPolicy(match="example.com", algorithm="slots", slots=4)


def no_random(n):
    raise AssertionError("randint must not be called")


def serving(policy, users, live, known):
    """user -> the slot that gets its packets (None when held or bounced)."""
    out = {}
    for user in users:
        choice = place(policy, placement_key(policy, user), live, known, no_random)
        out[user] = choice.slot if choice.action == DELIVER else None
    return out


# ---------------------------------------------------------------------------
# Defaults are jabberd2.


@settings(max_examples=200)
@given(st.integers(min_value=1, max_value=16), st.integers(min_value=0, max_value=10**6))
def test_default_policy_places_like_jabberd2(n, i):
    """With no policy, a user goes to the member jabberd2 2.7 picks (bare JID, modulo, bind order)."""
    address = f"User{i}@Example.COM/res"
    key = placement_key(DEFAULT_POLICY, address)
    expected = jabberd2_index(n, parse_jid(address).bare) if n > 1 else 0
    assert place(DEFAULT_POLICY, key, range(n), range(n), no_random) == Choice(DELIVER, expected)


@pytest.mark.parametrize("address", [None, "example.com", "example.com/res", "@bad", "a@/x"])
def test_default_policy_no_node_or_invalid_is_random(address):
    """No address, no node or an invalid JID goes to randint's member (jabberd2; the C router crashes on invalid)."""
    key = placement_key(DEFAULT_POLICY, address)
    assert key is None
    assert place(DEFAULT_POLICY, key, range(3), range(3), lambda n: 5) == Choice(DELIVER, 5 % 3)


def test_default_single_member_needs_nothing():
    """One member under the jabberd2 algorithm: no hash, no rand()."""
    assert place(DEFAULT_POLICY, None, (0,), (0,), no_random) == Choice(DELIVER, 0)


def test_default_policy_values():
    """The default policy is jabberd2's behaviour: by bind kind, bare, jabberd2, random, no IQ tracking, no replace."""
    p = DEFAULT_POLICY
    assert (p.match, p.key, p.address, p.algorithm, p.slots, p.dead, p.nodeless, p.track_iq, p.replace) == (
        "*", None, "bare", "jabberd2", None, "failover", "random", False, "never")
    assert p.hold_seconds == 30


def test_key_attribute():
    """Default key: 'to' for multi binds, 'from' for XEP-0114; a policy's key overrides both."""
    assert key_attribute(DEFAULT_POLICY, legacy=False) == "to"
    assert key_attribute(DEFAULT_POLICY, legacy=True) == "from"
    muc = ClusterPolicy(key="to")
    assert key_attribute(muc, legacy=True) == "to"


# ---------------------------------------------------------------------------
# Placement keys.


def test_placement_key_bare_and_full():
    """address='bare' hashes the prepped bare JID, 'full' the prepped full JID."""
    assert placement_key(CONSISTENT, "Alice@Example.com/Home") == "alice@example.com"
    full = ClusterPolicy(address="full")
    assert placement_key(full, "Alice@Example.com/Home") == "alice@example.com/Home"


def test_placement_key_nodeless_hash():
    """nodeless='hash' gives a deterministic key: the domain, the full JID, or the raw text of an invalid one."""
    p = ClusterPolicy(nodeless="hash")
    assert placement_key(p, "MUC.example.com/x") == "muc.example.com"
    assert placement_key(ClusterPolicy(nodeless="hash", address="full"), "muc.example.com/x") == "muc.example.com/x"
    assert placement_key(p, "@bad") == "@bad"
    assert placement_key(p, None) is None


@settings(max_examples=50)
@given(st.integers(min_value=2, max_value=16))
def test_nodeless_hash_is_deterministic(n):
    """With nodeless='hash', a domain always reaches the same member, and randint is never asked."""
    p = ClusterPolicy(nodeless="hash")
    picks = {place(p, placement_key(p, "example.com"), range(n), range(n), no_random) for _ in range(3)}
    assert len(picks) == 1


# ---------------------------------------------------------------------------
# Consistent and fixed slots.


def test_consistent_delivers_home_slot():
    """A user whose home slot is live goes there."""
    key = "alice@example.com"
    home = rendezvous_pick(key, (0, 1, 2))
    assert place(CONSISTENT, key, (0, 1, 2), (0, 1, 2), no_random) == Choice(DELIVER, home)


@pytest.mark.parametrize("dead,action", [("bounce", BOUNCE), ("hold", HOLD)])
def test_dead_slot_bounce_or_hold(dead, action):
    """With dead='bounce' or 'hold', a user whose home slot is down gets that action, naming the slot."""
    policy = ClusterPolicy(algorithm="consistent", dead=dead)
    key = next(u for u in USERS if rendezvous_pick(u, (0, 1, 2)) == 1)
    assert place(policy, key, (0, 2), (0, 1, 2), no_random) == Choice(action, 1)


def test_dead_slot_failover_is_next_choice():
    """With dead='failover', a user whose home slot is down goes to its next live choice."""
    key = next(u for u in USERS if rendezvous_pick(u, (0, 1, 2)) == 1)
    expected = [s for s in rendezvous_order(key, (0, 1, 2)) if s != 1][0]
    assert place(CONSISTENT, key, (0, 2), (0, 1, 2), no_random) == Choice(DELIVER, expected)


def test_nobody_live():
    """With no live member: hold still holds (the only instance may be restarting), failover bounces."""
    hold = ClusterPolicy(algorithm="slots", slots=4, dead="hold")
    key = "alice@example.com"
    assert place(hold, key, (), (), no_random) == Choice(HOLD, fixed_slot(key, 4))
    assert place(CONSISTENT, key, (), (0, 1), no_random) == Choice(BOUNCE, rendezvous_pick(key, (0, 1)))
    assert place(CONSISTENT, key, (), (), no_random) == Choice(BOUNCE, None)
    assert place(CONSISTENT, None, (), (0, 1), no_random) == Choice(BOUNCE, None)
    assert place(DEFAULT_POLICY, key, (), (), no_random) == Choice(BOUNCE, None)


def test_no_key_consistent_is_random_among_live():
    """A key-less packet under a slot algorithm goes to randint's live slot."""
    assert place(CONSISTENT, None, (0, 3, 5), (0, 1, 3, 5), lambda n: 4) == Choice(DELIVER, 3)


def test_slots_delivers_fixed_slot():
    """algorithm='slots' places a user in fixed_slot(key, slots) when that slot is live."""
    for user in USERS[:50]:
        assert place(SLOTS4, user, (0, 1, 2, 3), (), no_random) == Choice(DELIVER, fixed_slot(user, 4))


@settings(max_examples=16, deadline=None)
@given(st.integers(min_value=2, max_value=16), st.data())
def test_consistent_leave_and_rejoin_through_slot_table(n, data):
    """Instance restarts with identities: ≤ 1/N + 5% move on leave, only its users; all return on rejoin, any order."""
    table = SlotTable()
    names = [f"sm{i}" for i in range(n)]
    for name in names:
        table.claim(name)
    before = serving(CONSISTENT, USERS, table.live(), table.known())
    leaver = data.draw(st.sampled_from(names))
    table.release(table.slot_of(leaver))
    during = serving(CONSISTENT, USERS, table.live(), table.known())
    moved = {u for u in USERS if during[u] != before[u]}
    assert moved == {u for u in USERS if before[u] == table.slot_of(leaver)}
    assert len(moved) / len(USERS) <= 1 / n + 0.05
    for slot in table.live():  # everyone drops, then reconnects in another order
        table.release(slot)
    for name in data.draw(st.permutations(names)):
        table.claim(name)
    assert serving(CONSISTENT, USERS, table.live(), table.known()) == before


@settings(max_examples=16, deadline=None)
@given(st.integers(min_value=2, max_value=16), st.data(), st.sampled_from(["failover", "hold", "bounce"]))
def test_slots_nobody_else_moves(n, data, dead):
    """With fixed slots, a dead slot affects only its own users; failover spreads them; rejoin restores all."""
    policy = ClusterPolicy(algorithm="slots", slots=n, dead=dead)
    live = tuple(range(n))
    before = serving(policy, USERS, live, live)
    leaver = data.draw(st.sampled_from(live))
    survivors = tuple(s for s in live if s != leaver)
    during = serving(policy, USERS, survivors, live)
    assert all(during[u] == before[u] for u in USERS if before[u] != leaver)
    orphans = [during[u] for u in USERS if before[u] == leaver]
    if dead == "failover":
        assert set(orphans) <= set(survivors)
        if len(orphans) >= 40 * len(survivors):
            counts = collections.Counter(orphans)
            assert len(counts) == len(survivors)  # spread, not all on one survivor
    else:
        assert set(orphans) == {None}
    assert serving(policy, USERS, live, live) == before


# ---------------------------------------------------------------------------
# Policy table.


def test_policy_table_precedence():
    """Exact name first, then the longest matching wildcard, then '*', else the jabberd2 default."""
    exact = ClusterPolicy(match="icq.gateway.example.com", algorithm="consistent")
    wide = ClusterPolicy(match="*.example.com", key="to")
    narrow = ClusterPolicy(match="*.gateway.example.com", key="from")
    table = PolicyTable([wide, narrow, exact])
    assert table.policy_for("icq.gateway.example.com") is exact
    assert table.policy_for("msn.gateway.example.com") is narrow
    assert table.policy_for("a.b.gateway.example.com") is narrow
    assert table.policy_for("gateway.example.com") is wide
    assert table.policy_for("example.com") is DEFAULT_POLICY  # *.x does not match x itself
    assert table.policy_for("other.org") is DEFAULT_POLICY
    star = ClusterPolicy(match="*", nodeless="hash")
    assert PolicyTable([wide, star]).policy_for("other.org") is star


def test_policy_constructor_checks():
    """A policy contradicting itself cannot be built; the error names every attribute at fault."""
    with pytest.raises(PolicyError) as caught:
        ClusterPolicy(algorithm="slots", dead="maybe", match="User@x")
    attrs = [attr for attr, _message in caught.value.problems]
    assert attrs == ["dead", "name", "slots"]


# ---------------------------------------------------------------------------
# Parsing <clustering>.


def parse(text):
    root = etree.fromstring(("<router>\n" + text + "\n</router>").encode())
    section = root.find("clustering")
    return parse_clustering(section, "router.xml")


def test_parse_example():
    """The documented example reads into the two policies it describes."""
    table, problems = parse("""<clustering>
  <policy name='example.com' key='to' address='bare' algorithm='consistent' nodeless='hash' dead='failover' track-iq='yes' replace='half-open'/>
  <policy name='*.gateway.example.com' key='from' algorithm='slots' slots='4' dead='hold' hold='60'/>
</clustering>""")
    assert problems == []
    assert table.policy_for("example.com") == ClusterPolicy(
        match="example.com", key="to", address="bare", algorithm="consistent", nodeless="hash",
        dead="failover", track_iq=True, replace="half-open")
    assert table.policy_for("icq.gateway.example.com") == ClusterPolicy(
        match="*.gateway.example.com", key="from", algorithm="slots", slots=4, dead="hold", hold_seconds=60)


def test_parse_affinity():
    """affinity='session' or 'traffic', its idle time and its bound; each problem named."""
    table, problems = parse("""<clustering>
  <policy name='example.com' algorithm='consistent' affinity='session'/>
  <policy name='gw.example.com' affinity='traffic' affinity-idle='60' affinity-max='5000'/>
</clustering>""")
    assert problems == []
    assert table.policy_for("example.com").affinity == "session"
    gw = table.policy_for("gw.example.com")
    assert (gw.affinity, gw.affinity_idle, gw.affinity_max) == ("traffic", 60, 5000)
    assert DEFAULT_POLICY.affinity == "none"
    _table, problems = parse("""<clustering>
  <policy name='a.example.com' affinity='sticky'/>
  <policy name='b.example.com' affinity-idle='60'/>
  <policy name='c.example.com' affinity='traffic' affinity-idle='0' affinity-max='0'/>
</clustering>""")
    assert problems == [
        "router.xml:3: clustering.policy@affinity: must be one of 'none', 'session', 'traffic', got 'sticky'",
        "router.xml:4: clustering.policy@affinity: affinity-idle and affinity-max need "
        "affinity='session' or 'traffic'",
        "router.xml:5: clustering.policy@affinity-idle: must be at least 1 second, got 0",
        "router.xml:5: clustering.policy@affinity-max: must be at least 1, got 0",
    ]


def test_parse_absent_or_empty_section():
    """No <clustering> (or an empty one) means every name behaves as under jabberd2."""
    for section in (None, etree.fromstring("<clustering/>")):
        table, problems = parse_clustering(section, "router.xml")
        assert problems == [] and table.policy_for("example.com") is DEFAULT_POLICY


def test_parse_names_are_prepped():
    """Names are prepped like bind names, so 'Example.COM' matches the route 'example.com'."""
    table, problems = parse("<clustering><policy name='Example.COM' algorithm='consistent'/>"
                            "<policy name='*.GW.example.com' key='to'/></clustering>")
    assert problems == []
    assert table.policy_for("example.com").algorithm == "consistent"
    assert table.policy_for("icq.gw.example.com").key == "to"


def test_parse_every_problem_with_its_line():
    """Unknown attributes, values and elements, contradictions and duplicates are all reported, with lines."""
    _table, problems = parse("""<clustering>
  <policy name='a.example.com' algorithm='fastest'/>
  <policy name='b.example.com' algorithm='slots' colour='blue'/>
  <policy name='c.example.com' slots='4'/>
  <policy name='d.example.com' dead='hold'/>
  <policy name='e.example.com' algorithm='consistent' hold='10'/>
  <policy name='f.example.com' algorithm='slots' slots='four' track-iq='perhaps'/>
  <policy algorithm='consistent'/>
  <policy name='user@example.com'/>
  <policy name='a.example.com'/>
  <polcy name='g.example.com'/>
  <policy name='h.example.com' algorithm='consistent' dead='hold' hold='0'/>
</clustering>""")
    assert problems == [
        "router.xml:3: clustering.policy@algorithm: must be one of 'jabberd2', 'consistent', 'slots', got 'fastest'",
        "router.xml:4: clustering.policy@colour: unknown attribute (known: name, key, address, algorithm, "
        "slots, dead, hold, nodeless, track-iq, replace, affinity, affinity-idle, affinity-max)",
        "router.xml:4: clustering.policy@slots: algorithm='slots' needs the slot count, e.g. slots='4'",
        "router.xml:5: clustering.policy@slots: is only used with algorithm='slots'",
        "router.xml:6: clustering.policy@dead: dead='hold' needs algorithm='consistent' or 'slots' "
        "(jabberd2's algorithm has no slot to wait for)",
        "router.xml:7: clustering.policy@hold: is only used with dead='hold'",
        "router.xml:8: clustering.policy@slots: expected an integer, got 'four'",
        "router.xml:8: clustering.policy@track-iq: expected yes or no, got 'perhaps'",
        "router.xml:9: clustering.policy: missing the name attribute",
        "router.xml:10: clustering.policy@name: expected a name like 'example.com' or a wildcard like "
        "'*.example.com', got 'user@example.com'",
        "router.xml:12: clustering: unknown element <polcy>, expected <policy>",
        "router.xml:13: clustering.policy@hold: must be at least 1 second, got 0",
    ]


def test_parse_duplicate_name():
    """A second policy for the same (prepped) name is a problem naming the first one's line."""
    table, problems = parse("<clustering>\n<policy name='example.com' algorithm='consistent'/>\n"
                            "<policy name='EXAMPLE.com'/>\n</clustering>")
    assert problems == ["router.xml:4: clustering.policy@name: 'example.com' already has a policy, on line 3"]
    assert table.policy_for("example.com").algorithm == "consistent"


def test_parse_keeps_valid_policies_beside_bad_ones():
    """A bad policy does not take the good ones with it (the caller refuses to start anyway)."""
    table, problems = parse("<clustering><policy name='a.com' algorithm='x'/>"
                            "<policy name='b.com' algorithm='consistent'/></clustering>")
    assert len(problems) == 1
    assert table.policy_for("b.com").algorithm == "consistent"
    assert table.policy_for("a.com") is DEFAULT_POLICY


def test_parse_unknown_attribute_on_section():
    """An attribute on <clustering> itself is reported too."""
    _table, problems = parse("<clustering enabled='yes'/>")
    assert problems == ["router.xml:2: clustering: unknown attribute 'enabled'"]


@pytest.mark.parametrize("value,expected", [("yes", True), ("no", False), ("true", True), ("0", False),
                                            (" YES ", True)])
def test_parse_booleans(value, expected):
    """track-iq accepts yes/no, true/false, 1/0, on/off, any case, spaces trimmed."""
    table, problems = parse(f"<clustering><policy name='a.com' track-iq='{value}'/></clustering>")
    assert problems == [] and table.policy_for("a.com").track_iq is expected


def test_random_function_is_only_used_for_key_less_packets():
    """Deterministic policies never ask randint for packets with a key."""
    rnd = random.Random(1)
    for user in USERS[:100]:
        for policy in (CONSISTENT, SLOTS4, DEFAULT_POLICY):
            place(policy, placement_key(policy, user), (0, 1, 2, 3), (0, 1, 2, 3), no_random)
        place(CONSISTENT, None, (0, 1, 2, 3), (0, 1, 2, 3), rnd.randrange)
