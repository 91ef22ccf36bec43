"""Clustering policies inside the router (policy.py + balance.py through
routing.placement), without sockets."""

import pytest

from jrouter.routing.policy import ClusterPolicy, PolicyTable

from .harness import Network

USERS = [f"user{i}@example.com" for i in range(60)]


def network(**policy):
    return Network(clustering=PolicyTable([ClusterPolicy(match="example.com", **policy)]))


def sm(net, instance, take=True):
    """A session manager: binds its own id, then the domain with multi (as jabberd2's sm)."""
    peer = net.component()
    peer.bind(instance)
    peer.bind("example.com", multi="to")
    if take:
        peer.take()
    return peer


def routes(peer):
    """The routes a peer received since the last look (advertisements skipped)."""
    return [s for s in peer.stanzas() if s.tag.endswith("}route")]


def placement(net, c2s, members):
    """user -> index of the member that got a message for that user."""
    where = {}
    for user in USERS:
        c2s.send(f"<route to='example.com' from='c2s'><message to='{user}'/></route>")
        got = [i for i, m in members.items() if m is not None and routes(m)]
        where[user] = got[0] if len(got) == 1 else None
    return where


def test_consistent_moves_only_the_leavers_users_and_restores_on_return():
    """consistent: on leave only the leaver's users move; on return (any order) all go home."""
    net = network(algorithm="consistent")
    members = {i: sm(net, f"sm{i}") for i in range(3)}
    c2s = net.component("c2s")
    before = placement(net, c2s, members)
    assert set(before.values()) == {0, 1, 2}
    members[1].hang_up()
    members[1] = None
    during = placement(net, c2s, members)
    moved = [u for u in USERS if during[u] != before[u]]
    assert moved and all(before[u] == 1 for u in moved)
    assert all(during[u] in (0, 2) for u in USERS)
    # sm0 restarts too, and both come back in the other order.
    members[0].hang_up()
    members[0] = None
    members[1] = sm(net, "sm1")
    members[0] = sm(net, "sm0")
    assert placement(net, c2s, members) == before


def test_slots_hold_keeps_a_dead_instances_packets_until_it_returns():
    """slots + dead='hold': a dead slot's packets wait for the instance; nobody else moves."""
    net = network(algorithm="slots", slots=2, dead="hold", hold_seconds=30)
    members = {0: sm(net, "sm0"), 1: sm(net, "sm1")}
    c2s = net.component("c2s")
    before = placement(net, c2s, members)
    theirs = [u for u in USERS if before[u] == 1]
    members[1].hang_up()
    members[1] = None
    for user in USERS:
        c2s.send(f"<route to='example.com' from='c2s'><message to='{user}'/></route>")
    assert len(routes(members[0])) == len(USERS) - len(theirs)
    assert routes(c2s) == []                      # nothing bounced while held
    members[1] = sm(net, "sm1", take=False)
    held = routes(members[1])
    assert sorted(r[0].get("to") for r in held) == sorted(theirs)


def test_hold_expires_into_bounces():
    """After the grace period, held packets go back to their senders with error 503."""
    net = network(algorithm="slots", slots=2, dead="hold", hold_seconds=30)
    first, second = sm(net, "sm0"), sm(net, "sm1")
    c2s = net.component("c2s")
    second.hang_up()
    net.now = 100.0
    for user in USERS:
        c2s.send(f"<route to='example.com' from='c2s'><message to='{user}'/></route>")
    first.take()
    net.router.expire(200.0)
    bounces = routes(c2s)
    assert bounces and all(b.get("error") == "503" for b in bounces)


def test_hold_bounded_by_the_queue_limit_bounces_the_oldest():
    """A slot's held packets stay under io.limits.queue bytes: the oldest
    bounce (503) as new ones arrive, the newest wait for the instance."""
    net = Network(queue_limit=8000, clustering=PolicyTable([ClusterPolicy(
        match="example.com", algorithm="slots", slots=2, dead="hold", hold_seconds=30)]))
    first, second = sm(net, "sm0"), sm(net, "sm1")
    c2s = net.component("c2s")
    second.hang_up()
    bounced = []
    for user in USERS:
        c2s.send(f"<route to='example.com' from='c2s'><message to='{user}'><body>{'x' * 1000}"
                 "</body></message></route>")
        first.take()          # the live member reads: only the hold queue fills
        for bounce in routes(c2s):
            assert bounce.get("error") == "503"
            bounced.append(bounce[0].get("to"))
        assert net.router.placement.holds.size() <= 8000
    back = sm(net, "sm1", take=False)
    held = [r[0].get("to") for r in routes(back)]
    assert 0 < len(held) <= 8000 // 1000 and len(bounced) > len(held)
    theirs = [u for u in USERS if u in held or u in bounced]
    assert theirs == bounced + held       # the oldest bounced, the newest delivered, in order


def test_dead_bounce_answers_503_at_once():
    """slots + dead='bounce': packets for a dead slot bounce with 503 right away."""
    net = network(algorithm="slots", slots=2, dead="bounce")
    members = {0: sm(net, "sm0"), 1: sm(net, "sm1")}
    c2s = net.component("c2s")
    before = placement(net, c2s, members)
    members[1].hang_up()
    user = next(u for u in USERS if before[u] == 1)
    c2s.send(f"<route to='example.com' from='c2s'><message to='{user}'/></route>")
    assert routes(c2s)[0].get("error") == "503"


def test_half_open_connection_is_replaced_by_the_same_instance():
    """replace='half-open': a reconnecting instance takes its slot; the old connection is ended."""
    net = network(algorithm="consistent", replace="half-open")
    old = sm(net, "sm0")
    other = sm(net, "sm1")
    c2s = net.component("c2s")
    before = placement(net, c2s, {0: old, 1: other})
    new = sm(net, "sm0")
    assert old.connection.closing and b"<conflict" in old.raw()
    assert placement(net, c2s, {0: new, 1: other}) == before


def test_to_hashing_for_an_xep0114_muc_cluster():
    """key='to' on an XEP-0114 name: every occupant of a room reaches the same copy."""
    net = Network(clustering=PolicyTable([ClusterPolicy(match="muc.example.com", key="to")]))
    copies = [net.legacy("muc.example.com", instance=f"muc{i}") for i in range(3)]
    sm0 = net.component("example.com")
    for user in USERS[:20]:
        sm0.send(f"<route to='muc.example.com' from='example.com'><presence "
                 f"to='room@muc.example.com/{user[:6]}' from='{user}/r'/></route>")
    got = [len(c.stanzas()) for c in copies]
    assert sorted(got) == [0, 0, 20]


def test_nodeless_hash_is_deterministic():
    """nodeless='hash': a stanza to the bare domain always reaches the same member."""
    net = network(nodeless="hash")
    members = {i: sm(net, f"sm{i}") for i in range(3)}
    c2s = net.component("c2s")
    for _ in range(10):
        c2s.send("<route to='example.com' from='c2s'><iq type='get' to='example.com' id='d'/></route>")
    counts = sorted(len(routes(m)) for m in members.values())
    assert counts == [0, 0, 10]


def test_iq_results_go_back_to_the_member_that_asked():
    """track-iq: an IQ result for the cluster reaches the member that sent the request."""
    net = network(track_iq=True)
    members = {i: sm(net, f"sm{i}") for i in range(3)}
    remote = net.component("remote.example.org")
    for i, member in members.items():
        member.send(f"<route to='remote.example.org' from='example.com'><iq type='get' "
                    f"id='q{i}' from='example.com' to='remote.example.org'/></route>")
    remote.take()
    for i in members:
        remote.send(f"<route to='example.com' from='remote.example.org'><iq type='result' "
                    f"id='q{i}' from='remote.example.org' to='example.com'/></route>")
    for i, member in members.items():
        got = routes(member)
        assert [r[0].get("id") for r in got] == [f"q{i}"]


def test_packets_queued_for_a_dying_member_go_to_a_survivor():
    """Failover loses no queued packet: what a dead member never got is routed again."""
    net = network(algorithm="consistent")
    members = {0: sm(net, "sm0"), 1: sm(net, "sm1")}
    c2s = net.component("c2s")
    before = placement(net, c2s, members)
    mine = [u for u in USERS if before[u] == 1]
    members[1].send("<throttle/>")
    members[1].take()
    for user in mine:
        c2s.send(f"<route to='example.com' from='c2s'><message to='{user}'/></route>")
    members[1].hang_up()
    assert sorted(r[0].get("to") for r in routes(members[0])) == sorted(mine)


def test_unsent_packets_are_routed_again_without_parsing_their_bytes(monkeypatch):
    """The output queue keeps each packet's route: a dead member's unsent packets
    (queued and not flushed, or held by a throttle) go to a survivor, in order,
    and no byte of them is parsed again."""
    from jrouter.wire import xmlstream

    net = network(algorithm="consistent")
    members = {0: sm(net, "sm0"), 1: sm(net, "sm1")}
    c2s = net.component("c2s")
    before = placement(net, c2s, members)
    mine = [u for u in USERS if before[u] == 1]
    half = len(mine) // 2
    for user in mine[:half]:                  # queued, never handed to the shell
        c2s.send(f"<route to='example.com' from='c2s'><message to='{user}' id='q'/></route>")
    members[1].send("<throttle/>")            # the router's answer is queued after them
    for user in mine[half:]:                  # held back by the throttle
        c2s.send(f"<route to='example.com' from='c2s'><message to='{user}' id='t'/></route>")
    fed = []
    monkeypatch.setattr(xmlstream.StreamReader, "feed", lambda self, data: fed.append(data) or [])
    members[1].hang_up()
    monkeypatch.undo()
    assert fed == []
    assert [r[0].get("to") for r in routes(members[0])] == mine


def test_default_policy_is_jabberd2_bit_for_bit():
    """Without <clustering>, placement equals jabberd2's hash over bind order."""
    from jrouter.routing.balance import jabberd2_index

    net = Network()
    members = {i: sm(net, f"sm{i}") for i in range(3)}
    c2s = net.component("c2s")
    where = placement(net, c2s, members)
    assert all(where[u] == jabberd2_index(3, u) for u in USERS)


def test_a_bad_policy_is_a_config_error_with_file_and_line(tmp_path):
    """An unknown attribute or value in <clustering> names the file, line and element."""
    from jrouter.config import ConfigError, load_config

    path = tmp_path / "router.xml"
    path.write_text("<router>\n<clustering>\n<policy name='example.com' algorithm='fastest'/>\n"
                    "<policy name='x.example.com' colour='red'/>\n</clustering>\n</router>\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    problems = "\n".join(caught.value.problems)
    assert f"{path}:3: clustering.policy@algorithm" in problems
    assert f"{path}:4: clustering.policy" in problems and "colour" in problems


def test_policies_load_from_router_xml(tmp_path):
    """<clustering> in router.xml reaches the route table."""
    from jrouter.config import load_config

    path = tmp_path / "router.xml"
    path.write_text("<router><clustering><policy name='*.gw.example.com' algorithm='slots' "
                    "slots='4' dead='hold' hold='60'/></clustering></router>")
    policy = load_config(str(path)).clustering.policy_for("icq.gw.example.com")
    assert (policy.algorithm, policy.slots, policy.dead, policy.hold_seconds) == ("slots", 4, "hold", 60)
