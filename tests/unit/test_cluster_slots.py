"""Unit tests for slot numbers agreed across nodes (issue 13, item 4):
``ClusterSlots.choose``/``claimed`` against a fake etcd as strict
as the real one about its one rule here: a txn that compares a slot key's
mod_revision fails when anyone wrote the key since (etcd's compare on MOD).

Each view's mirror is fed the txns as etcd's watch would (test_cluster_view's
Table); the routers are the in-memory harness's.
"""

from jrouter.cluster.keys import MemberKey, MemberValue, SlotKey, SlotValue, encode_value
from jrouter.routing.cluster_view import ClaimSlot
from jrouter.routing.policy import ClusterPolicy, PolicyTable
from jrouter.routing.table import SINGLE

from .test_cluster_view import LAYOUT, Etcd, Table, _element, node_view


class SlotEtcd(Etcd):
    """Etcd that also takes slot claims as ClusterNode._claim_slot writes
    them: choose, txn on the slot key's mod_revision, choose again on a
    lost race. ``concurrent``: claims wait for ``run``, where every waiting
    claim chooses before any of them writes (binds at the same instant on
    several nodes)."""

    def __init__(self):
        super().__init__()
        self.table = None
        self.concurrent = False
        self.pending = []       # (node, view, claim)
        self.lost_races = 0

    def serve(self, node, view):
        effects = view.take_effects()
        rest = []
        for effect in effects:
            if isinstance(effect, ClaimSlot):
                self.pending.append((node, view, effect))
            else:
                rest.append(effect)
        view.effects[:0] = rest
        super().serve(node, view)
        if not self.concurrent:
            self.run()

    def run(self):
        pending, self.pending = self.pending, []
        choices = [(node, view, claim, view.slots.choose(claim, 0.0)) for node, view, claim in pending]
        for node, view, claim, choice in choices:
            while not isinstance(choice, str):
                key = LAYOUT.key(SlotKey(claim.name, choice.slot))
                if choice.held or self.table.mods.get(key, 0) == choice.mod_revision:
                    break
                self.lost_races += 1
                choice = view.slots.choose(claim, 0.0)
            if isinstance(choice, str):
                view.slots.claimed(claim, None, choice, 0.0)
                continue
            identity = claim.connection.protocol_port.identity(claim.connection)
            self.table.txn(puts=[
                (key, encode_value(SlotValue(claim.identity, node, claim.member))),
                (LAYOUT.key(MemberKey(claim.name, node, claim.member)),
                 encode_value(MemberValue(claim.kind, identity, 1.0)))])
            view.slots.claimed(claim, choice.slot, None, 0.0)


class SlotTableOfEtcd(Table):
    """Table that keeps each key's mod_revision, as etcd does."""

    def __init__(self, *views):
        super().__init__(*views)
        self.mods = {}

    def txn(self, puts=(), deletes=()):
        super().txn(puts, deletes)
        for key, _ in puts:
            self.mods[key] = self.revision
        for key in deletes:
            self.mods.pop(key, None)


def policy(**settings):
    return PolicyTable([ClusterPolicy(match="example.com", **settings)])


def nodes(names, **settings):
    etcd = SlotEtcd()
    made = [node_view(name, etcd, clustering=policy(**settings)) for name in names]
    etcd.table = SlotTableOfEtcd(*(view for _, view, _ in made))
    return etcd, made


def slots_as_seen(net, view):
    """slot -> (node, member id) of every member of example.com, as this node has them."""
    route = net.router.table.routes["example.com"]
    return {slot: getattr(member, "ref", (view.node, view.ids.get(member)))
            for slot, member in route.by_slot.items()}


def placements(net, view, count=60):
    route = net.router.table.routes["example.com"]
    placed = {}
    for i in range(count):
        member = net.router.placement.member_for(route, f"user{i}@example.com")
        placed[i] = getattr(member, "ref", (view.node, view.ids.get(member)))
    return placed


def test_members_bound_at_once_on_two_nodes_get_one_numbering_and_one_placement():
    """Each node binds two members of a consistent-hashed name at the same
    instant, so both first choose slot 0: one txn wins each race, the loser
    chooses again from the table, and both nodes end with the same member
    in each slot and place every user on the same member."""
    etcd, [(net_a, view_a, _), (net_b, view_b, _)] = nodes("ab", algorithm="consistent")
    etcd.concurrent = True
    peers = [net_a.component(), net_b.component(), net_a.component(), net_b.component()]
    for peer in peers:
        peer.bind("example.com", multi=True)
    etcd.run()
    assert etcd.lost_races >= 1
    for peer in peers:
        assert [e.get("error") for e in peer.stanzas() if e.tag.endswith("bind")] == [None]
    seen_a, seen_b = slots_as_seen(net_a, view_a), slots_as_seen(net_b, view_b)
    assert seen_a == seen_b and sorted(seen_a) == [0, 1, 2, 3]
    assert len(set(seen_a.values())) == 4
    assert placements(net_a, view_a) == placements(net_b, view_b)
    assert len(set(placements(net_a, view_a).values())) > 1


def test_an_instance_back_on_another_node_gets_its_slot_again_on_every_node():
    etcd, [(net_a, view_a, _), (net_b, view_b, _)] = nodes("ab", algorithm="slots", slots=4)
    gw1 = net_a.legacy("example.com", instance="gw-1")
    gw2 = net_b.legacy("example.com", instance="gw-2")
    assert slots_as_seen(net_a, view_a) == slots_as_seen(net_b, view_b) == {
        0: ("a", view_a.ids[gw1.connection]), 1: ("b", view_b.ids[gw2.connection])}
    before = placements(net_b, view_b)
    gw1.hang_up()
    etcd.table.unbind("example.com", "a", "1")          # its member key goes from etcd
    assert slots_as_seen(net_a, view_a) == slots_as_seen(net_b, view_b) == {1: ("b", "1")}
    back = net_b.legacy("example.com", instance="gw-1")     # now through node b
    member = ("b", view_b.ids[back.connection])
    assert slots_as_seen(net_a, view_a) == slots_as_seen(net_b, view_b) == {0: member, 1: ("b", "1")}
    after_a, after_b = placements(net_a, view_a), placements(net_b, view_b)
    assert after_a == after_b
    # The users of slot 0 are gw-1's again, the others stayed on gw-2.
    assert {i for i, ref in after_b.items() if ref == member} == \
        {i for i, ref in before.items() if ref == ("a", view_a.ids.get(gw1.connection, "1"))}


def test_a_new_identity_skips_slots_kept_for_absent_ones():
    etcd, [(net_a, view_a, _), (net_b, view_b, _)] = nodes("ab", algorithm="slots", slots=4,
                                                            dead="hold")
    gw1 = net_a.legacy("example.com", instance="gw-1")
    gw1.hang_up()
    etcd.table.unbind("example.com", "a", "1")
    net_b.legacy("example.com", instance="gw-2")
    assert sorted(slots_as_seen(net_b, view_b)) == [1]          # slot 0 is kept for gw-1
    route_a = net_a.router.table.routes["example.com"]
    assert route_a.slots.known() == (0, 1) and route_a.slots.live() == (1,)


def test_a_member_no_slot_key_names_is_never_placed_on():
    """A member key without a slot key (written by a node that did not
    claim one) joins as an extra member: slot placement never picks it."""
    etcd, [(net_a, view_a, _), (net_b, view_b, _)] = nodes("ab", algorithm="consistent")
    net_b.component().bind("example.com", multi=True)
    etcd.table.bind("example.com", "c", "c.9")
    route = net_a.router.table.routes["example.com"]
    assert len(route.members) == 2 and list(route.by_slot) == [0]
    assert set(placements(net_a, view_a).values()) == {("b", "1")}


def test_no_slot_left_in_the_cluster_refuses_the_bind():
    etcd, [(net_a, _, _), (net_b, _, _)] = nodes("ab", algorithm="slots", slots=1)
    net_a.legacy("example.com", instance="gw-1")
    late = net_b.peer()
    late.handshake("example.com", instance="gw-2")
    error, = late.stanzas()         # no <handshake/>: the name never bound
    assert error.tag == "{http://etherx.jabber.org/streams}error"
    assert error[0].tag == "{urn:ietf:params:xml:ns:xmpp-streams}conflict"
    assert late.connection not in net_b.router.connections
    assert net_b.logged("all its slots are taken in the cluster")
    assert "example.com" not in late.connection.names


def test_a_claim_whose_connection_went_meanwhile_deletes_its_member_key():
    etcd, [(net_a, view_a, _)] = nodes("a", algorithm="consistent")
    etcd.concurrent = True
    peer = net_a.component()
    peer.bind("example.com", multi=True)
    peer.hang_up()
    etcd.run()
    assert [type(e).__name__ for _, e in etcd.writes] == ["UnregisterMember"]


# -- session affinity learnt on one node, known on every node ----------------------------------

SC = "http://jabberd.jabberstudio.org/ns/session/1.0"


def test_a_session_started_on_one_node_places_its_user_there_from_every_node():
    """Node a has two sm (sm0, sm1) of example.com under consistent hashing
    with affinity='session'; node b has none. sm1 answers 'started' for a
    user whose hash home is sm0: node a learns it from its own member, and
    node b from a's session notice, so both place her packets on sm1 until
    her session ends."""
    etcd, [(net_a, view_a, _), (net_b, view_b, _)] = nodes("ab", algorithm="consistent",
                                                            affinity="session")
    notices = []
    view_a.send_session_notice = lambda data, member: notices.append((data, member))
    sms = {}
    for instance in ("sm0", "sm1"):
        sms[instance] = net_a.component(instance)
        sms[instance].bind("example.com", multi="to")
        sms[instance].take()
    etcd.table.bind("c2s", "b", "b.1", SINGLE)        # the c2s the replies go to, on node b
    ref = {("a", view_a.ids[peer.connection]): instance for instance, peer in sms.items()}
    route_b = net_b.router.table.routes["example.com"]
    home = {user: ref[net_b.router.placement.member_for(route_b, f"u{user}@example.com").ref]
            for user in range(20)}
    user = next(u for u, instance in home.items() if instance == "sm0")
    jid = f"u{user}@example.com"

    sms["sm1"].send(f"<route to='c2s' from='sm1'><sc:session xmlns:sc='{SC}' action='started' "
                    f"target='{jid}/res' sc:sm='s-1' sc:c2s='8'/></route>")
    assert [member for _, member in notices] == [view_a.ids[sms["sm1"].connection]]
    for data, member in notices:
        view_b.session_noticed(_element(data), "a", member, 0.0)
    route_a = net_a.router.table.routes["example.com"]
    assert net_a.router.placement.member_for(route_a, jid) is sms["sm1"].connection
    holder, why = net_b.router.placement.explain(route_b, jid)
    assert ref[holder.ref] == "sm1" and why.startswith("affinity")

    notices.clear()
    sms["sm1"].send(f"<route to='c2s' from='sm1'><sc:session xmlns:sc='{SC}' action='ended' "
                    f"sc:sm='s-1' sc:c2s='8'/></route>")
    for data, member in notices:
        view_b.session_noticed(_element(data), "a", member, 0.0)
    assert len(notices) == 1
    assert ref[net_b.router.placement.member_for(route_b, jid).ref] == "sm0"


def test_a_notice_from_a_member_gone_is_ignored():
    etcd, [(net_b, view_b, _)] = nodes("b", algorithm="consistent", affinity="session")
    data = (f"<route to='c2s' from='sm1'><sc:session xmlns:sc='{SC}' action='started' "
            "target='u@example.com/res' sc:sm='s-1' sc:c2s='8'/></route>").encode()
    view_b.session_noticed(_element(data), "a", "9", 0.0)
    assert net_b.router.placement.affinities == {} or \
        all(len(table) == 0 for table in net_b.router.placement.affinities.values())
