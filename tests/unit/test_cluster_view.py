"""Unit tests for jrouter.routing.cluster_view: members on other nodes in this
node's route table, without a socket (issue 13).

The cluster table is fed as etcd's watch would feed it (each txn one
revision, ``Put`` with create and mod revisions) into a real TableMirror;
the router is the in-memory harness's, with real jabberd2 components.
"""

import pytest

from jrouter.cluster.keys import DefaultKey, DefaultValue, Layout, MemberKey, MemberValue, encode_value
from jrouter.cluster.mirror import Batch, Delete, Put, TableMirror
from jrouter.routing.cluster_view import ClusterView, RemoteMember
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


def node_view(node):
    """A node: the harness router, its view, and what it forwarded."""
    net = Network()
    forwarded = []
    view = ClusterView(net.router, node, TableMirror(LAYOUT),
                       lambda member, route, key, sender: forwarded.append((member, route.raw)))
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
    assert [(member.ref, raw) for member, raw in forwarded] == [(("b", "b.1"), packet)]
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
    assert not view.forwarded(route, "no-such-member", 0.0)


def test_the_clusters_default_route_is_followed_and_dropped():
    net, view, forwarded = node_view("a")
    table = Table(view)
    table.bind("s2s", "b", "b.1", SINGLE)
    key = LAYOUT.key(DefaultKey())
    table.txn(puts=[(key, encode_value(DefaultValue("s2s", "b", "b.1")))])
    c2s = net.component("c2s.example")
    c2s.send(route_bytes("remote.example.org", "c2s.example"))
    assert [m.ref for m, _ in forwarded] == [("b", "b.1")]
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
