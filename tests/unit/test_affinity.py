"""routing.affinity.AffinityTable, alone and inside placement (protocol §6.9):
bounded, expiring, never a gone member; and with a cluster of three sm, a
returning member gets only new sessions."""

from hypothesis import given, settings, strategies as st

from jrouter.routing.affinity import SESSION, TRAFFIC, AffinityTable
from jrouter.routing.policy import ClusterPolicy, PolicyTable

from .harness import Network

SC = "http://jabberd.jabberstudio.org/ns/session/1.0"


class Member:
    """Stands for a connection: the table only compares and hashes it."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


A, B, C = Member("a"), Member("b"), Member("c")


def everyone(member):
    return True


def test_session_entries_count_sessions_and_go_at_the_last_end():
    """'ended' names only the sm's session id (as jabberd2's sm sends it)."""
    table = AffinityTable(SESSION, idle=1000)
    table.session_started("u@x", A, "s1", 0)
    table.session_started("u@x", A, "s2", 1)          # a second resource
    table.session_ended(A, "s1", 2)
    assert table.lookup("u@x", 3, everyone) is A
    table.session_ended(B, "s2", 3)                   # another member's word counts for nothing
    table.session_ended(A, "unknown", 3)
    assert table.lookup("u@x", 3, everyone) is A
    table.session_ended(A, "s2", 4)
    assert table.lookup("u@x", 5, everyone) is None and len(table) == 0


def test_a_start_elsewhere_moves_the_entry():
    table = AffinityTable(SESSION, idle=1000)
    table.session_started("u@x", A, "s1", 0)
    table.session_started("u@x", B, "s9", 1)
    assert table.lookup("u@x", 2, everyone) is B and table.moves == 1
    table.session_ended(A, "s1", 3)                   # the old one ends: B keeps it
    assert table.lookup("u@x", 3, everyone) is B


def test_never_a_gone_member():
    table = AffinityTable(TRAFFIC, idle=1000)
    table.placed("u@x", A, 0)
    table.placed("v@x", A, 0)
    table.placed("w@x", B, 0)
    assert table.lookup("u@x", 1, lambda m: m is not A) is None     # not a member any more
    assert table.member_left(A) == 1 and table.lookup("v@x", 1, everyone) is None
    assert table.lookup("w@x", 1, everyone) is B


def test_traffic_entries_expire_when_idle_and_touching_keeps_them():
    table = AffinityTable(TRAFFIC, idle=10)
    table.placed("u@x", A, 0)
    table.placed("v@x", A, 0)
    assert table.lookup("u@x", 9, everyone) is A      # touched at 9
    assert table.expire(12) == 1                      # v idle since 0
    assert table.lookup("u@x", 18, everyone) is A
    assert table.lookup("u@x", 28.5, everyone) is None


def test_session_mode_ignores_traffic_and_traffic_mode_ignores_sessions():
    session, traffic = AffinityTable(SESSION, idle=100), AffinityTable(TRAFFIC, idle=100)
    session.placed("u@x", A, 0)
    traffic.session_started("u@x", A, "s1", 0)
    assert len(session) == len(traffic) == 0


OPS = st.lists(st.tuples(st.sampled_from(["placed", "started", "ended", "left", "lookup", "expire"]),
                         st.integers(0, 30), st.sampled_from([A, B, C]), st.floats(0, 5)),
               max_size=120)


@settings(max_examples=300, deadline=None)
@given(OPS, st.sampled_from([SESSION, TRAFFIC]))
def test_bounded_and_never_answers_a_gone_member(ops, mode):
    """Hypothesis: whatever happens, at most max_entries entries, no entry of
    a member that left (until it is placed again), nothing idle answered."""
    table = AffinityTable(mode, idle=20, max_entries=8)
    gone = set()
    last = {}
    now = 0.0
    for op, user, member, gap in ops:
        now += gap
        key = f"u{user}@x"
        if op == "placed":
            table.placed(key, member, now)
            gone.discard(member)
            last[key] = now
        elif op == "started":
            table.session_started(key, member, f"{key}-{member}", now)
            gone.discard(member)
            last[key] = now
        elif op == "ended":
            table.session_ended(member, f"{key}-{member}", now)
        elif op == "left":
            table.member_left(member)
            gone.add(member)
        elif op == "lookup":
            answer = table.lookup(key, now, lambda m: m not in gone)
            assert answer is None or answer not in gone
        else:
            table.expire(now)
        assert len(table) <= 8
        assert not any(m in gone for m in table.counts())
        assert len(table._session_key) <= sum(len(e.sessions) for e in table._entries.values())
    table.expire(now + 21)
    assert len(table) == 0


# -- inside placement: three sm on one domain --------------------------------

USERS = [f"user{i}@example.com" for i in range(40)]


def network(affinity):
    return Network(clustering=PolicyTable([ClusterPolicy(
        match="example.com", algorithm="consistent", affinity=affinity)]))


def sm(net, instance):
    peer = net.component()
    peer.bind(instance)
    peer.bind("example.com", multi="to")
    peer.take()
    return peer


def login(net, c2s, members, user):
    """c2s asks the domain to start a session; the sm that gets it answers 'started'."""
    c2s.send(f"<route to='example.com' from='c2s'><sc:session xmlns:sc='{SC}' action='start' "
             f"target='{user}/res'/></route>")
    for instance, member in members.items():
        if member is not None and [s for s in member.stanzas() if s.tag.endswith("}route")]:
            member.send(f"<route to='c2s' from='{instance}'><sc:session xmlns:sc='{SC}' "
                        f"action='started' target='{user}/res' sc:sm='{instance}-{user}' "
                        "sc:c2s='8'/></route>")
            c2s.take()
            return instance
    raise AssertionError(f"no sm got the session start of {user}")


def where(net, c2s, members, user):
    """The sm a message for ``user`` from someone else reaches."""
    c2s.send(f"<route to='example.com' from='c2s'><message xmlns='jabber:client' to='{user}' "
             "from='friend@example.com/r'/></route>")
    got = [i for i, m in members.items()
           if m is not None and [s for s in m.stanzas() if s.tag.endswith("}route")]]
    assert len(got) == 1, got
    return got[0]


def churn(affinity):
    """sm1 leaves, its users log in again elsewhere, sm1 comes back: where
    messages for each user go, and where each user's live session is."""
    net = network(affinity)
    members = {name: sm(net, name) for name in ("sm0", "sm1", "sm2")}
    c2s = net.component("c2s")
    session = {user: login(net, c2s, members, user) for user in USERS}
    members["sm1"].hang_up()
    members["sm1"] = None
    for user in [u for u, s in session.items() if s == "sm1"]:
        session[user] = login(net, c2s, members, user)
    members["sm1"] = sm(net, "sm1")
    return net, c2s, members, session


def test_without_affinity_the_returning_sm_takes_back_users_whose_session_is_elsewhere():
    net, c2s, members, session = churn("none")
    astray = [u for u in USERS if where(net, c2s, members, u) != session[u]]
    assert astray and all(session[u] != "sm1" for u in astray)


def test_with_session_affinity_every_live_session_keeps_its_messages():
    net, c2s, members, session = churn("session")
    assert all(where(net, c2s, members, u) == session[u] for u in USERS)
    # one of sm1's users (by the hash) living elsewhere logs out and in again: back to sm1
    back = next(u for u in USERS if session[u] != "sm1" and _hash_member(net, u) == "sm1")
    instance = session[back]
    members[instance].send(f"<route to='c2s' from='{instance}'><sc:session xmlns:sc='{SC}' "
                           f"action='ended' sc:sm='{instance}-{back}' sc:c2s='8'/></route>")
    c2s.take()
    assert login(net, c2s, members, back) == "sm1"
    assert where(net, c2s, members, back) == "sm1"
    assert all(where(net, c2s, members, u) == session[u] for u in USERS if u != back)


def _hash_member(net, user):
    """The sm the hash alone gives ``user`` (affinity aside)."""
    from jrouter.routing.policy import placement_key

    route = net.router.table.routes["example.com"]
    choice = net.router.placement.decide(route, placement_key(route.policy, user))
    return next(name for name in route.by_slot[choice.slot].names if name.startswith("sm"))


# -- what the operator sees (/placement, /status, /metrics) -------------------

def test_the_operator_sees_who_serves_a_user_and_why():
    from jrouter.ops import stats
    from jrouter.ops.status import metric_families

    net, c2s, members, session = churn("session")
    router = net.router
    moved = next(u for u in USERS if session[u] != "sm1" and _hash_member(net, u) == "sm1")
    member, reason = router.explain_placement("example.com", moved)
    assert member is members[session[moved]].connection and reason.startswith("affinity (session)")
    answer = stats.which_instance(router, "example.com", moved)
    assert answer["reason"].startswith("affinity") and answer["member"] == member.label
    snap = stats.snapshot(router, 0.0)
    (entry,) = [n for n in snap["names"] if n["name"] == "example.com"]
    assert entry["affinity"]["mode"] == "session" and entry["affinity"]["entries"] == len(USERS)
    assert sum(entry["affinity"]["per_member"].values()) == len(USERS)
    assert entry["affinity"]["dropped_left"] > 0           # sm1's entries went with it
    names = {f.name: f for f in metric_families(snap)}
    samples = names["jrouter_affinity_entries"].samples
    assert sum(s.value for s in samples if s.labels["name"] == "example.com") == len(USERS)


def test_explain_says_hash_home_slot_and_failover():
    net = Network(clustering=PolicyTable([ClusterPolicy(match="example.com", algorithm="slots",
                                                        slots=3)]))
    members = {name: sm(net, name) for name in ("sm0", "sm1", "sm2")}
    reasons = {u: net.router.explain_placement("example.com", u)[1] for u in USERS}
    assert all(r.startswith("hash: home slot") for r in reasons.values())
    members["sm1"].hang_up()
    after = [net.router.explain_placement("example.com", u)[1] for u in USERS]
    assert any(r.startswith("failover: home slot 1 is down") for r in after)
    assert net.router.explain_placement("example.com", "example.com")[1].startswith("random")


def test_a_members_traffic_refreshes_or_makes_but_never_moves_an_entry():
    """A gateway copy talking to a user (an old connection left behind) must
    not take her entry from the copy her packets are placed on."""
    table = AffinityTable(TRAFFIC, idle=10)
    table.heard_from("u@x", A, 0)                  # no entry: made on A
    assert table.member_of("u@x") is A
    table.placed("v@x", B, 0)
    table.heard_from("v@x", A, 5)                  # elsewhere: stays on B, not refreshed
    assert table.member_of("v@x") is B and table.moves == 0
    table.heard_from("v@x", B, 8)                  # on its member: refreshed
    assert table.lookup("v@x", 15, everyone) is B


# -- several nodes: entries told to the other nodes (docs/cluster.md §8, Affinity) --------------


def test_a_traffic_entry_is_told_when_made_or_moved_and_again_half_its_idle_later():
    said = []
    table = AffinityTable(TRAFFIC, idle=10, announce=lambda key, member: said.append((key, member)))
    table.placed("u@x", A, 0)
    assert said == [("u@x", A)]
    assert table.lookup("u@x", 4, everyone) is A and said == [("u@x", A)]    # touched, not said
    assert table.lookup("u@x", 5, everyone) is A and said == [("u@x", A)] * 2  # half the idle since
    table.heard_from("u@x", A, 9.9)
    assert len(said) == 2                                     # 4.9 s since it was said
    table.heard_from("u@x", A, 10)
    assert said[-1] == ("u@x", A) and len(said) == 3
    table.heard_from("v@x", B, 11)                            # made by the member's own traffic
    assert said[-1] == ("v@x", B)
    assert table.lookup("u@x", 11, lambda m: m is not A) is None   # A left: the entry goes
    table.placed("u@x", C, 11)                                # placed again: moved, said
    assert said[-1] == ("u@x", C) and len(said) == 5


def test_what_another_node_said_is_made_or_refreshed_here_never_moved_and_not_said_again():
    said = []
    table = AffinityTable(TRAFFIC, idle=10, announce=lambda key, member: said.append((key, member)))
    table.noticed("u@x", A, 0)
    assert table.lookup("u@x", 1, everyone) is A
    table.noticed("u@x", B, 2)                                 # another member: A keeps it
    assert table.lookup("u@x", 3, everyone) is A and table.moves == 0
    table.noticed("u@x", A, 9)                                 # the other node refreshes it
    assert table.lookup("u@x", 18, everyone) is A              # alive: 9 s since
    assert said == [("u@x", A)] and len(table) == 1            # 18 - 9 >= 5: said again here


def test_session_tables_and_single_routers_tell_nobody():
    said = []
    session = AffinityTable(SESSION, idle=10, announce=lambda key, member: said.append(key))
    session.session_started("u@x", A, "s1", 0)
    session.noticed("v@x", A, 0)
    assert said == [] and session.announce is None and len(session) == 1
    plain = AffinityTable(TRAFFIC, idle=10)
    plain.placed("u@x", A, 0)
    assert plain.lookup("u@x", 6, everyone) is A
