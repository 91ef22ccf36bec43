"""Unit tests for jrouter.routing.cluster_view: members on other nodes in this
node's route table, without a socket (issue 13).

The cluster table is fed as etcd's watch would feed it (each txn one
revision, ``Put`` with create and mod revisions) into a real TableMirror;
the router is the in-memory harness's, with real jabberd2 components.
"""

import pytest

from jrouter.cluster.keys import DefaultKey, DefaultValue, Layout, MemberKey, MemberValue, encode_value
from jrouter.cluster.mirror import Batch, Delete, Put, TableMirror
from jrouter.routing.cluster_view import Claim, ClusterView, ReleaseClaim, RemoteMember
from jrouter.routing.policy import ClusterPolicy, PolicyTable
from jrouter.routing.table import MULTI_TO, SINGLE

from jrouter.wire.connection import NS_COMPONENT
from jrouter.wire.xmlstream import STREAMS_NS, StreamReader

from .harness import Network

LAYOUT = Layout("test")


class Table:
    """A cluster table as etcd keeps it: revisions, create revisions, one
    watch batch per txn, handed to every view's mirror."""

    def __init__(self, *views):
        self.revision = 1
        self.created = {}
        self.views = views

    def txn(self, puts=(), deletes=()):
        self.revision += 1
        events = [Delete(key, self.revision) for key in deletes if self.created.pop(key, None)]
        for key, value in puts:
            created = self.created.setdefault(key, self.revision)
            events.append(Put(key, value, 7, created, self.revision))
        for view in self.views:
            view.apply(view.mirror.apply(Batch(self.revision, events)), 0.0)

    def bind(self, name, node, member, kind=MULTI_TO):
        key = LAYOUT.key(MemberKey(name, node, member))
        self.txn(puts=[(key, encode_value(MemberValue(kind, None, 1.0)))])

    def unbind(self, name, node, member):
        self.txn(deletes=[LAYOUT.key(MemberKey(name, node, member))])


class Etcd:
    """The claims of a cluster as etcd answers them: create-if-absent on
    ``unique/<name>`` and the default route; every other write recorded."""

    def __init__(self):
        self.held = {}          # ("unique", name) or ("default",) -> (node, member)
        self.writes = []        # (node, effect) of member keys, in order
        self.answer = True      # False: etcd does not answer (bind-wait runs out)

    def serve(self, node, view):
        for effect in view.take_effects():
            if isinstance(effect, Claim):
                view.claimed(effect, self._claim(node, effect), 0.0)
            elif isinstance(effect, ReleaseClaim):
                for key, wanted in ((("unique", effect.name), effect.unique), (("default",), effect.default)):
                    if wanted and self.held.get(key) == (node, effect.member):
                        del self.held[key]
            else:
                self.writes.append((node, effect))

    def _claim(self, node, claim):
        if not self.answer:
            return "503"
        keys = ([("unique", claim.name)] if claim.unique else []) + ([("default",)] if claim.default else [])
        if any(self.held.get(key, (node, claim.member)) != (node, claim.member) for key in keys):
            return "409"
        for key in keys:
            self.held[key] = (node, claim.member)
        return None


def node_view(node, etcd=None, **settings):
    """A node: the harness router (``settings`` its Config's), its view, and what it forwarded."""
    net = Network(**settings)
    forwarded = []
    etcd = etcd if etcd is not None else Etcd()

    def forward(to_node, data, member, hops, routed, as_sent=False):
        forwarded.append(((to_node, member), data))
        view.as_sent_flags.append(as_sent)
        return True
    view = ClusterView(net.router, node, TableMirror(LAYOUT), forward)
    view.as_sent_flags = []
    net.router.cluster = view
    view.on_effects = lambda: etcd.serve(node, view)
    return net, view, forwarded


def route_bytes(to, frm, body="hi"):
    return (f"<route to='{to}' from='{frm}'><message xmlns='jabber:client' to='u@{to}' "
            f"from='v@{frm}'><body>{body}</body></message></route>").encode()


def test_packet_for_a_name_served_elsewhere_is_forwarded_as_it_came():
    net, view, forwarded = node_view("a")
    Table(view).bind("sm.example", "b", "b.1", SINGLE)
    c2s = net.component("c2s.example")
    packet = route_bytes("sm.example", "c2s.example", "x > y &amp; 'z'")
    c2s.send(packet)
    assert forwarded == [(("b", "b.1"), packet)]
    assert c2s.stanzas() == []                      # delivered, not bounced


def test_local_components_hear_of_remote_binds_and_of_the_last_one_leaving():
    net, view, _ = node_view("a")
    table = Table(view)
    sm = net.component("sm.example")
    table.bind("muc.example", "b", "b.1")
    table.bind("muc.example", "c", "c.1")
    table.unbind("muc.example", "b", "b.1")
    table.unbind("muc.example", "c", "c.1")
    presences = [(p.get("from"), p.get("type")) for p in sm.stanzas()]
    # One router tells of every bind, and of the name going when nothing serves it.
    assert presences == [("muc.example", None), ("muc.example", None), ("muc.example", "unavailable")]
    assert "muc.example" not in net.router.table


def test_every_node_orders_members_by_the_table_not_by_when_it_heard():
    """Nodes a and b each have a local member of one multi name; each binds
    its own first, yet both end with the table's order."""
    net_a, view_a, _ = node_view("a")
    net_b, view_b, _ = node_view("b")
    table = Table(view_a, view_b)
    local_a = net_a.component("muc.example", multi=True)
    local_b = net_b.component("muc.example", multi=True)
    table.bind("muc.example", "b", view_b.member_id(local_b.connection))
    table.bind("muc.example", "a", view_a.member_id(local_a.connection))
    order_a = [getattr(m, "ref", ("a", view_a.ids.get(m))) for m in net_a.router.table.routes["muc.example"].members]
    order_b = [getattr(m, "ref", ("b", view_b.ids.get(m))) for m in net_b.router.table.routes["muc.example"].members]
    assert order_a == order_b == [("b", "1"), ("a", "1")]


def test_unconfirmed_local_member_comes_last():
    net, view, _ = node_view("a")
    table = Table(view)
    local = net.component("muc.example", multi=True)
    table.bind("muc.example", "b", "b.1")
    members = net.router.table.routes["muc.example"].members
    assert isinstance(members[0], RemoteMember) and members[1] is local.connection


def test_forwarded_route_reaches_the_local_member_byte_identical():
    net, view, _ = node_view("a")
    sm = net.component("sm.example")
    member = view.member_id(sm.connection)
    packet = route_bytes("sm.example", "c2s.example")
    route = _element(packet)
    assert view.forwarded(route, member, 0.0)
    assert sm.raw() == packet


def test_forwarded_route_for_a_member_gone_is_placed_again_here():
    net, view, _ = node_view("a")
    sm = net.component("sm.example")
    packet = route_bytes("sm.example", "c2s.example")
    assert view.forwarded(_element(packet), "gone-member", 0.0)
    assert sm.raw() == packet
    assert not view.forwarded(_element(route_bytes("nowhere.example", "c2s.example")), "x", 0.0)
    assert view.counters.drops == 1


def test_forwarded_route_placed_again_on_another_node_counts_a_hop_and_stops_at_the_limit():
    net, view, forwarded = node_view("a")
    Table(view).bind("muc.example", "b", "b.1")
    packet = route_bytes("muc.example", "c2s.example")
    assert view.forwarded(_element(packet), "gone", 0.0, hops=1)
    assert forwarded == [(("b", "b.1"), packet)]
    view.forwarded(_element(packet), "gone", 0.0, hops=2)       # a third link: past hops=2
    assert len(forwarded) == 1 and view.counters.drops == 1
    assert net.logged("would cross more than 2 nodes")


def test_binds_put_and_delete_member_keys():
    etcd = Etcd()
    net, view, _ = node_view("a", etcd)
    view.run = "7"
    sm = net.component("sm.example")
    muc = net.legacy("muc.example", instance="muc-1")
    sm.send(f"<unbind xmlns='{NS_COMPONENT}' name='sm.example'/>")
    muc.hang_up()
    assert [(type(e).__name__, e.name, e.member) for _, e in etcd.writes] == [
        ("RegisterMember", "sm.example", "7.1"), ("RegisterMember", "muc.example", "7.2"),
        ("UnregisterMember", "sm.example", "7.1"), ("UnregisterMember", "muc.example", "7.2")]
    assert etcd.writes[1][1].identity == "muc-1" and etcd.writes[1][1].kind == "multi-from"
    assert etcd.held == {} and view.local == {}


def test_one_name_bound_on_two_nodes_at_once_gets_one_success_and_one_409():
    etcd = Etcd()
    net_a, view_a, _ = node_view("a", etcd)
    net_b, view_b, _ = node_view("b", etcd)
    first = net_a.component()
    second = net_b.component()
    first.bind("sm.example")
    second.bind("sm.example")       # b's mirror has not seen a's member yet
    assert first.stanzas()[0].get("error") is None
    assert second.stanzas()[0].get("error") == "409"
    assert "sm.example" not in second.connection.names
    assert net_b.logged("already bound on another node")


def test_default_route_is_unique_in_the_cluster():
    etcd = Etcd()
    net_a, view_a, _ = node_view("a", etcd)
    net_b, view_b, _ = node_view("b", etcd)
    s2s_a, s2s_b = net_a.component(), net_b.component()
    s2s_a.bind("s2s-a", default=True)
    s2s_b.bind("s2s-b", default=True)
    assert s2s_a.stanzas()[0].get("error") is None and s2s_b.stanzas()[0].get("error") == "409"
    assert etcd.held == {("unique", "s2s-a"): ("a", "1"), ("default",): ("a", "1")}
    assert net_b.router.table.default_name is None and "s2s-b" not in net_b.router.table
    s2s_a.hang_up()
    assert etcd.held == {}          # both claims given back


def test_bind_fails_with_503_when_etcd_does_not_answer():
    etcd = Etcd()
    etcd.answer = False
    net, view, _ = node_view("a", etcd)
    sm = net.component()
    sm.bind("sm.example")
    assert sm.stanzas()[0].get("error") == "503"
    assert "sm.example" not in net.router.table
    assert net.logged("did not answer in time")


def test_packets_wait_for_a_link_and_go_out_when_it_is_back():
    net, view, forwarded = node_view("a")
    Table(view).bind("muc.example", "b", "b.1")
    c2s = net.component("c2s.example")
    link_open = [False]
    sent = []

    def forward(node, data, member, hops, routed, as_sent):
        if link_open[0]:
            sent.append(data)
        return link_open[0]
    view.send_forward = forward
    packets = [route_bytes("muc.example", "c2s.example", str(i)) for i in range(3)]
    c2s.send(packets[0])
    c2s.send(packets[1])
    assert sent == [] and c2s.stanzas() == []
    link_open[0] = True
    c2s.send(packets[2])            # behind the two held: order is kept
    assert sent == []
    view.link_up("b")
    assert sent == packets
    c2s.send(packets[0])            # nothing held: straight onto the link
    assert sent == packets + [packets[0]]


def test_what_a_lost_link_never_sent_is_placed_again_when_its_node_leaves():
    net, view, forwarded = node_view("a")
    table = Table(view)
    table.bind("muc.example", "b", "b.1")
    c2s = net.component("c2s.example")
    packet = route_bytes("muc.example", "c2s.example", "lost")
    c2s.send(packet)
    (_, data), = forwarded
    local = net.component("muc.example", multi=True)    # a member here too, from now on
    c2s.take()
    view.link_down("b", [("b.1", data, 1, (_element(packet), None, c2s.connection), 1)], "s1")
    assert local.raw() == b"" and c2s.stanzas() == []     # held while b's lease lives
    table.unbind("muc.example", "b", "b.1")                 # its lease expired
    net.settle()
    assert local.raw() == packet and c2s.stanzas() == []


def _lost_link(sent_ok):
    """Node a, member b.1 of muc.example on node b, four routes sent on link
    's1' (numbered 1..4 there) that b never acknowledged, handed back."""
    net, view, forwarded = node_view("a")
    Table(view).bind("muc.example", "b", "b.1")
    c2s = net.component("c2s.example")
    packets = [route_bytes("muc.example", "c2s.example", str(i)) for i in range(4)]
    for packet in packets:
        c2s.send(packet)
    unsent = [("b.1", data, 1, (_element(packet), None, c2s.connection), number)
              for number, ((_, data), packet) in enumerate(zip(forwarded, packets), 1)]
    sent = []

    def forward(node, data, member, hops, routed, as_sent):
        if sent_ok(len(sent)):
            sent.append(data)
            return True
        return False
    view.send_forward = forward
    view.link_down("b", unsent, "s1")
    return view, packets, sent


def test_a_new_link_does_not_send_again_what_its_hello_says_the_lost_link_delivered():
    """b's hello on the new link: of link s1 it read 3 routes. Only the 4th
    goes out again (docs/cluster.md §3, Resuming); the count shows it."""
    view, packets, sent = _lost_link(lambda n: True)
    view.link_up("b", ("s1", 3))
    assert sent == packets[3:] and view.not_resent == 3
    assert view.status()["not_resent"] == 3 and "b" not in view.waiting


@pytest.mark.parametrize("read", [None, ("s0", 4), ("s1", 0)])
def test_a_new_link_sends_again_everything_held_without_a_count_for_the_lost_link(read):
    """No word on s1 (a restarted node), a count of another link, or 0 read:
    everything held goes out, in order."""
    view, packets, sent = _lost_link(lambda n: True)
    view.link_up("b", read)
    assert sent == packets and view.not_resent == 0


def test_a_lost_links_numbers_are_forgotten_once_a_new_link_took_part_of_what_was_held():
    """The new link took two routes and then no more: the two left lose their
    numbers, so a later hello's count (of another link) never skips them."""
    view, packets, sent = _lost_link(lambda n: n < 2)
    view.link_up("b", None)
    assert sent == packets[:2]
    assert [packet[4] for packet in view.waiting["b"].packets] == [0, 0]
    view.send_forward = lambda node, data, member, hops, routed, as_sent: sent.append(data) or True
    view.link_up("b", ("s1", 4))
    assert sent == packets and view.not_resent == 0


TRAFFIC_POLICY = PolicyTable([ClusterPolicy(match="gw.example", affinity="traffic")])


def traffic_view(node):
    """Node ``node`` with gw.example (affinity='traffic') on b.1 and c.1, and what it says of entries."""
    net, view, forwarded = node_view(node, clustering=TRAFFIC_POLICY)
    said = []
    view.send_affinity_notice = lambda *notice: said.append(notice)
    table = Table(view)
    table.bind("gw.example", "b", "b.1")
    table.bind("gw.example", "c", "c.1")
    return net, view, forwarded, said


def user_route(user, tag):
    return (f"<route to='gw.example' from='c2s.example'><message xmlns='jabber:client' "
            f"to='{user}@gw.example' from='v@c2s.example' id='{tag}'/></route>").encode()


def test_a_traffic_entry_this_node_makes_is_told_to_the_other_nodes_once():
    net, view, forwarded, said = traffic_view("a")
    c2s = net.component("c2s.example")
    c2s.send(user_route("u", "1"))
    c2s.send(user_route("u", "2"))
    ((node, member), _data), again = forwarded
    assert again[0] == (node, member)
    assert said == [("gw.example", "u@gw.example", node, member)]


def test_what_another_node_says_of_an_entry_places_the_user_here_as_there():
    """Node b said where each of 8 users is: on the member the hash would
    not choose. Node a sends each user's packet there, and tells nobody."""
    net, view, forwarded, said = traffic_view("a")
    c2s = net.component("c2s.example")
    users = ["u%d" % i for i in range(8)]
    _net2, _view2, by_hash, _said2 = traffic_view("d")      # the same table: where the hash puts them
    other = _net2.component("c2s.example")
    for user in users:
        other.send(user_route(user, "h"))
    hashed = {user: ref for user, (ref, _data) in zip(users, by_hash)}
    elsewhere = {user: ("c", "c.1") if hashed[user] == ("b", "b.1") else ("b", "b.1") for user in users}
    for user in users:
        view.affinity_noticed("gw.example", user + "@gw.example", *elsewhere[user], 0.0)
    for user in users:
        c2s.send(user_route(user, "n"))
    assert {user: ref for user, (ref, _data) in zip(users, forwarded)} == elsewhere
    assert said == []
    view.affinity_noticed("gw.example", "x@gw.example", "e", "e.1", 0.0)     # no such member
    view.affinity_noticed("nothing.example", "x@gw.example", "b", "b.1", 0.0)
    c2s.send(user_route("x", "x"))
    # both ignored: x had no entry, so node a made one by the hash, and told it
    assert said == [("gw.example", "x@gw.example", *forwarded[-1][0])]


def test_broadcasts_cross_once_and_reach_each_local_connection_once():
    net, view, _ = node_view("a")
    crossed = []
    view.send_broadcast = lambda data, hops: crossed.append((data, hops))
    sm = net.component("sm.example")
    c2s = net.component("c2s.example")
    sm.take()
    packet = (b"<route type='broadcast' from='sm.example'><presence xmlns='jabber:client' "
              b"from='u@sm.example'/></route>")
    sm.send(packet)
    assert crossed == [(packet, 1)] and c2s.raw() == packet and sm.raw() == b""
    view.broadcasted(_element(packet))
    assert c2s.raw() == packet and sm.raw() == packet and len(crossed) == 1


def test_the_clusters_default_route_is_followed_and_dropped():
    net, view, forwarded = node_view("a")
    table = Table(view)
    table.bind("s2s", "b", "b.1", SINGLE)
    key = LAYOUT.key(DefaultKey())
    table.txn(puts=[(key, encode_value(DefaultValue("s2s", "b", "b.1")))])
    c2s = net.component("c2s.example")
    c2s.send(route_bytes("remote.example.org", "c2s.example"))
    assert [ref for ref, _ in forwarded] == [("b", "b.1")]
    table.txn(deletes=[key])
    assert net.router.table.default_name is None


@pytest.mark.parametrize("run, expected", [("", "1"), ("7f3a", "7f3a.1")])
def test_member_ids_carry_the_run(run, expected):
    net, view, _ = node_view("a")
    view.run = run
    sm = net.component("sm.example")
    assert view.member_id(sm.connection) == expected
    assert view.member_id(sm.connection) == expected
    view.forget(sm.connection)
    assert view.local == {}


def _element(raw):
    """``raw`` as a node reads it from a jabberd2-framed stream (a peer link's)."""
    reader = StreamReader()
    reader.feed(f"<stream:stream xmlns:stream='{STREAMS_NS}' xmlns='{NS_COMPONENT}'>".encode())
    (element,) = reader.feed(raw)
    return element


def test_status_and_metrics_show_the_node_its_table_and_its_links():
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client import generate_latest
    from prometheus_client.core import CollectorRegistry

    from jrouter.ops.stats import snapshot
    from jrouter.ops.status import RouterCollector
    from jrouter.ops.status_cli import format_status

    net, view, _ = node_view("a")
    Table(view).bind("muc.example", "b", "b.1")
    net.component("sm.example")
    view.forwarded(_element(route_bytes("sm.example", "muc.example")), "1", 0.0)
    view.shell_status = lambda: {
        "cluster": "test", "state": "joined", "lease": "7", "revision": 42, "nodes": [
            {"id": "a", "address": "127.0.0.1:1", "self": True, "linked": False, "version": "0"},
            {"id": "b", "address": "127.0.0.1:2", "self": False, "linked": True, "version": "0",
             "packets_out": 3, "packets_in": 1, "bytes_out": 300, "bytes_in": 100,
             "queued_bytes": 0, "peer_revision": 41}]}
    data = snapshot(net.router, 0.0)["cluster"]
    assert data["node"] == "a" and data["remote_members"] == 1 and data["forwarded_in"] == 1
    assert data["revision"] == 42
    registry = CollectorRegistry()
    registry.register(RouterCollector(net.router, lambda: 0.0))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(generate_latest(registry).decode())
               for s in family.samples}
    assert samples[("jrouter_node_info", (("cluster", "test"), ("node", "a"), ("state", "joined")))] == 1
    assert samples[("jrouter_node_table_revision", ())] == 42
    assert samples[("jrouter_peer_link_up", (("peer", "b"),))] == 1
    assert samples[("jrouter_peer_link_packets_out_total", (("peer", "b"),))] == 3
    assert samples[("jrouter_node_forwarded_in_total", ())] == 1
    assert samples[("jrouter_node_not_resent_total", ())] == 0
    text = format_status(snapshot(net.router, 0.0))
    assert "Cluster test: node a, joined, table at revision 42" in text
    assert any(line.split()[:3] == ["b", "127.0.0.1:2", "linked"] for line in text.splitlines())


@pytest.mark.parametrize("stanza", [
    b"<message to='u@muc.example' from='v@gw.example'><body>caf\xc3\xa9 &amp; \"q\"</body></message>",
    b"<iq type='get' id='1' to='muc.example' from='gw.example'><query xmlns='jabber:iq:version'/></iq>",
])
def test_an_xep0114_stanza_reaches_an_xep0114_member_on_another_node_as_it_was_sent(stanza):
    """One router gives XEP-0114 to XEP-0114 the stanza's bytes unchanged; two nodes do too."""
    net_a, view_a, forwarded = node_view("a")
    net_b, view_b, _ = node_view("b")
    muc = net_b.legacy("muc.example")
    Table(view_a).bind("muc.example", "b", view_b.member_id(muc.connection), "multi-from")
    gateway = net_a.legacy("gw.example")
    gateway.send(stanza)
    ((_, data),) = forwarded
    assert view_a.as_sent_flags == [True]
    view_b.forwarded(_element(data), view_b.member_id(muc.connection), 0.0, 1, as_sent=True)
    assert muc.raw() == stanza


def test_a_prefixed_xep0114_stanza_crosses_without_the_flag_and_still_means_the_same():
    net_a, view_a, forwarded = node_view("a")
    Table(view_a).bind("muc.example", "b", "b.1", "multi-from")
    gateway = net_a.legacy("gw.example")
    gateway.send(b"<message xmlns='jabber:component:accept' to='u@muc.example' from='v@gw.example'/>")
    assert view_a.as_sent_flags == [False] and len(forwarded) == 1


def test_a_log_sink_on_another_node_gets_a_copy_of_what_this_node_routes_and_nothing_else():
    """A <bind><log/> on node b: node a copies each route it places to it
    (type='log'), over the link to b's member; b gives the copy to its sink
    only, never to the route's own destination, even once the sink is gone."""
    from jrouter.cluster.keys import LogKey, LogValue
    etcd = Etcd()
    net_a, view_a, forwarded = node_view("a", etcd)
    net_b, view_b, _ = node_view("b", etcd)
    table = Table(view_a, view_b)
    sink = net_b.component(user="logger", password="pwl")
    sink.bind("logger", log=True)
    assert sink.stanzas()[0].get("error") is None
    member = view_b.ids[sink.connection]
    assert [(type(e).__name__, getattr(e, "bound", None)) for _, e in etcd.writes] == [
        ("RegisterMember", None), ("LogSinkKey", True)]
    table.bind("logger", "b", member, SINGLE)
    table.txn(puts=[(LAYOUT.key(LogKey("logger", "b", member)), encode_value(LogValue(1.0)))])
    sm, c2s = net_a.component("sm.example"), net_a.component("c2s.example")
    packet = route_bytes("sm.example", "c2s.example")
    c2s.send(packet)
    assert [e.get("to") for e in sm.stanzas() if e.tag.endswith("route")] == ["sm.example"]  # here, and
    ((to, copy),) = forwarded                                              # copied to b's sink
    assert to == ("b", member) and _element(copy).attrs == {"to": "sm.example", "from": "c2s.example",
                                                             "type": "log"}
    view_b.forwarded(_element(copy), member, 0.0)
    (got,) = sink.stanzas()
    assert got.get("type") == "log" and got.get("to") == "sm.example"
    sink.hang_up()
    sm_b = net_b.component("sm.example")        # the route's own 'to', served on b too
    view_b.forwarded(_element(copy), member, 0.0)
    assert [e for e in sm_b.stanzas() if e.tag.endswith("route")] == []
    assert view_b.counters.drops == 1
    assert ("b", "LogSinkKey", False) in [(n, type(e).__name__, getattr(e, "bound", None))
                                          for n, e in etcd.writes]
