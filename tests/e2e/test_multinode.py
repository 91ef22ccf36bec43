"""End to end: several jrouter nodes act as one router (issue 13).

One etcd (Debian's etcd-server) and three jrouter nodes a, b, c on loopback
(tests/support/cluster_nodes.py), each with the same ``<cluster>`` but for
its node id and peer port; lease TTL 3 s unless a test says otherwise.
The components are raw jabberd2-protocol and XEP-0114 peers
(tests/support/peer.py), which see the exact bytes that arrive, and real
jabberd2 sm/c2s with slixmpp users.

What each test asserts is what arrives at a component or a user, and what
etcd holds; a time is asserted only beside what arrived (a name dropped no
sooner than its node's lease can have expired). Every wait is bounded.

Waiting until a node knows a name bound on another: a jabberd2-protocol
component is told `<presence from='NAME'/>` when its router's table gets
the name (protocol §4.3), so senders of that protocol wait for that; an
XEP-0114 component gets no advertisements, so it sends probes until one
arrives, and only the packets after that count.
"""

import re
import time

import pytest
from lxml import etree

from jrouter.cluster.keys import MemberKey, SlotKey, UniqueKey
from tests.support.cluster_nodes import (NS_ACCEPT, NS_COMPONENT, ClusterBed, ComponentPeer, SplitStack,
                                         advertised, advertisement, stanza_id)
from tests.support.routers import JROUTER_KINDS
from tests.support.xmpp import Clients, run

try:  # failure reports then show the bed's logs and etcd keys
    from tests.conftest import _track
except ImportError:  # pragma: no cover - conftest imported under another name
    def _track(request, thing):
        pass

pytestmark = pytest.mark.timeout(150)

NODES = ("a", "b", "c")
TTL = 3                     # the bed's default <lease-ttl>


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(params=JROUTER_KINDS)
def cluster_router_kind(request):
    """The build every node runs: each test runs on the interpreted and the
    compiled one (docs/architecture.md, compiled: a member on another node
    goes where compiled code checks types)."""
    return request.param


@pytest.fixture
def bed_factory(request, tmp_path, cluster_router_kind):
    """make(node_ids=NODES, **ClusterBed settings) -> a started bed (each
    node's component port answers); every bed is stopped at teardown. Each
    test's first step is ``bed.wait_ready()``, so that a cluster that does
    not form fails the test itself, with what etcd and the logs showed."""
    made = []

    def make(node_ids=NODES, **settings):
        directory = tmp_path / ("bed" if not made else "bed-%d" % (len(made) + 1))
        bed = ClusterBed(directory, node_ids, router_kind=cluster_router_kind, **settings)
        made.append(bed)
        _track(request, bed)
        return bed.start()

    yield make
    for bed in reversed(made):
        bed.stop()


@pytest.fixture
def bed(bed_factory):
    return bed_factory()


class Peers:
    """The components of one test, closed at teardown (before the bed stops)."""

    def __init__(self):
        self.opened = []

    def _keep(self, peer):
        self.opened.append(peer)
        return peer

    def bound(self, bed, node_id, name, multi=None):
        """A jabberd2-protocol component on node `node_id`, bound to `name`."""
        return self._keep(ComponentPeer.bound(bed.address(node_id), name, multi=multi,
                                              label="%s on node %s" % (name, node_id)))

    def accepted(self, bed, node_id, name):
        """An XEP-0114 component of `name` on node `node_id`."""
        return self._keep(ComponentPeer.accepted(bed.address(node_id), name,
                                                 label="%s (XEP-0114) on node %s" % (name, node_id)))

    def authenticated(self, bed, node_id, label):
        """A jabberd2-protocol component on node `node_id`, authenticated, nothing bound."""
        peer = ComponentPeer(*bed.address(node_id), label="%s on node %s" % (label, node_id))
        return self._keep(peer.authenticate())

    def close(self):
        for peer in self.opened:
            peer.close()


@pytest.fixture
def peers(bed_factory):
    made = Peers()
    yield made
    made.close()


# -- what the tests send and look for ----------------------------------------------------


def route(to, from_, stanza_id_, body="x"):
    return ("<route to='%s' from='%s'><message xmlns='jabber:client' to='u@%s' from='v@%s' "
            "id='%s'><body>%s</body></message></route>" % (to, from_, to, from_, stanza_id_, body))


def message(to, from_, stanza_id_, body="x"):
    """An XEP-0114 component's stanza (jabber:component:accept, its stream's namespace)."""
    return ("<message to='u@%s/r' from='v@%s/r' id='%s' type='chat'><body>%s</body></message>"
            % (to, from_, stanza_id_, body))


def with_id(stanza_id_):
    return lambda element: stanza_id(element) == stanza_id_


def knows(peer, name, timeout=6.0):
    """Wait until `peer`'s node advertised `name` as available to it."""
    peer.take(lambda e: advertisement(e, name, available=True), timeout,
              "advertisement of %s (its node's table has it)" % name)


def lost(peer, name, timeout):
    """Wait until `peer`'s node advertised `name` as gone."""
    return peer.take(lambda e: advertisement(e, name, available=False), timeout,
                     "<presence type='unavailable' from='%s'/>" % name)


def until_delivered(sender, receiver, make, prefix, timeout=6.0):
    """Send `make(id)` with new ids until one reaches `receiver`: the nodes'
    tables have caught up. The probes and their bounces are then forgotten."""
    deadline = time.monotonic() + timeout
    n = 0
    while True:
        n += 1
        probe = "%s-%d" % (prefix, n)
        sender.send(make(probe))
        if receiver.find(with_id(probe), 0.25) is not None:
            break
        if time.monotonic() >= deadline:
            raise AssertionError("%s never reached %s within %.1fs (%d probes); the sender got:\n%s"
                                 % (prefix, receiver.label, timeout, n, sender.shown()))
    probes = lambda e: (stanza_id(e) or "").startswith(prefix + "-")  # noqa: E731
    receiver.find(lambda e: False, 0.1)        # late probes land in kept, then go
    sender.find(lambda e: False, 0.1)          # and so do the bounces of early ones
    sender.forget(probes)
    receiver.forget(probes)


def round_trip(a, a_name, b, b_name, tag):
    """A route from a to b and one back, each taken where it arrives: what
    either node queued before for the other has arrived too."""
    a.send(route(b_name, a_name, "%s-there" % tag))
    b.take(with_id("%s-there" % tag), 5.0, "barrier %s-there" % tag)
    b.send(route(a_name, b_name, "%s-back" % tag))
    a.take(with_id("%s-back" % tag), 5.0, "barrier %s-back" % tag)


def same_bytes(element, sent, ns=NS_ACCEPT):
    """What arrived is what was sent, byte for byte, as one router delivers
    it; if not, the message says whether it at least means the same XML
    (`sent` read in the stream's default namespace `ns`)."""
    if element.raw == sent.encode():
        return
    sent_tree = etree.fromstring(("<w xmlns='%s'>%s</w>" % (ns, sent)).encode())[0]
    same = _c14n(element.tree()) == _c14n(sent_tree)
    raise AssertionError("%s:\n  sent:    %r\n  arrived: %r" % (
        "the same XML, but not the bytes sent" if same else "not what was sent",
        sent.encode(), element.raw))


def _c14n(tree):
    return etree.tostring(tree, method="c14n", exclusive=True)


def no_bounces(peer):
    bounces = [e.raw for e in peer.kept if e.attrs.get("error") or e.attrs.get("type") == "error"]
    assert not bounces, "%s got bounces:\n%s" % (peer.label, bounces)


# -- 1. cross-node delivery ---------------------------------------------------------------


def test_xep0114_components_on_two_nodes_exchange_stanzas_byte_identical_and_unbounced(bed, peers):
    """An XEP-0114 component on node a and one on node b: each one's stanza arrives at the other, byte for byte, once, and nothing is bounced."""
    bed.wait_ready()
    xa = peers.accepted(bed, "a", "xa.test")
    xb = peers.accepted(bed, "b", "xb.test")
    until_delivered(xa, xb, lambda i: message("xb.test", "xa.test", i), "probe-ab")
    until_delivered(xb, xa, lambda i: message("xa.test", "xb.test", i), "probe-ba")

    there = ("<message to='bob@xb.test/r' from='alice@xa.test/r' id='x1' type='chat'>"
             "<body>Grüße &amp; &lt;friends&gt; ✓</body><thread>t-1</thread>"
             "<x xmlns='urn:example:payload' a=\"double\" b='single'>  spaced <y/></x></message>")
    xa.send(there)
    got = xb.take(with_id("x1"), 5.0, "x1 from node a")
    same_bytes(got, there)
    back = ("<message to='alice@xa.test/r' from='bob@xb.test/r' id='x2'>"
            "<body>zurück</body><p:z xmlns:p='urn:example:prefixed' p:k='v'/></message>")
    xb.send(back)
    got = xa.take(with_id("x2"), 5.0, "x2 from node b")
    same_bytes(got, back)
    # x2 came after x1 was delivered: any bounce of x1 would be here by now.
    no_bounces(xa)
    no_bounces(xb)
    assert xb.find(with_id("x1"), 0.3) is None, "x1 delivered twice"


def test_jabberd2_components_on_two_nodes_exchange_routes_byte_identical_and_unbounced(bed, peers):
    """A jabberd2-protocol component on node a and one on node b (<bind/>, <route/>): each route arrives at the other exactly as sent, once, without error."""
    bed.wait_ready()
    ca = peers.bound(bed, "a", "ca.test")
    cb = peers.bound(bed, "b", "cb.test")
    knows(ca, "cb.test")
    knows(cb, "ca.test")

    there = ("<route to='cb.test' from='ca.test'><message xmlns='jabber:client' to='u@cb.test/r' "
             "from='v@ca.test/r' id='j1' type='chat'><body>Grüße &amp; &lt;x/&gt; ✓</body>"
             "<x xmlns='urn:example:payload' a=\"double\" b='single'>  spaced <y/></x>"
             "</message></route>")
    ca.send(there)
    got = cb.take(with_id("j1"), 5.0, "route j1 from node a")
    same_bytes(got, there, NS_COMPONENT)
    back = ("<route xmlns:p='urn:example:prefixed' to='ca.test' from='cb.test'>"
            "<p:iq type='get' id='j2' p:k='v'><query xmlns='jabber:iq:version'/></p:iq></route>")
    cb.send(back)
    got = ca.take(with_id("j2"), 5.0, "route j2 from node b")
    same_bytes(got, back, NS_COMPONENT)
    no_bounces(ca)
    no_bounces(cb)
    assert cb.find(with_id("j1"), 0.3) is None, "j1 delivered twice"


def test_a_broadcast_reaches_each_component_on_the_other_nodes_once_and_not_its_sender(bed, peers):
    """<route type='broadcast'> from a component on node a: exactly one copy at the component on b and at the one on c, byte for byte, none back at the sender."""
    bed.wait_ready()
    ba = peers.bound(bed, "a", "ba.test")
    bb = peers.bound(bed, "b", "bb.test")
    bc = peers.bound(bed, "c", "bc.test")
    for peer, others in ((ba, ("bb.test", "bc.test")), (bb, ("ba.test",)), (bc, ("ba.test",))):
        for name in others:
            knows(peer, name)

    sent = ("<route type='broadcast' from='ba.test'><presence xmlns='jabber:client' "
            "from='ba.test' id='bcast-1'><status>everyone</status></presence></route>")
    ba.send(sent)
    for peer in (bb, bc):
        same_bytes(peer.take(with_id("bcast-1"), 5.0, "the broadcast"), sent, NS_COMPONENT)
    # Barriers both ways on each link: a second copy, or one sent back to a,
    # was queued before them.
    round_trip(ba, "ba.test", bb, "bb.test", "after-b")
    round_trip(ba, "ba.test", bc, "bc.test", "after-c")
    for peer in (ba, bb, bc):
        copies = [e.raw for e in peer.kept if stanza_id(e) == "bcast-1"]
        assert copies == [], "%s got the broadcast again: %s" % (peer.label, copies)
    no_bounces(ba)


# -- 2. binds that must be unique in the cluster ------------------------------------------


def test_concurrent_binds_of_one_name_on_two_nodes_give_one_success_and_one_409(bed, peers):
    """The same name without multi bound at once on nodes a and b (five names, each node first in turn): exactly one bind answered OK, the other error='409'; etcd holds one member and the winner's unique key; traffic from node c reaches the winner."""
    bed.wait_ready()
    on = {"a": peers.authenticated(bed, "a", "binder"), "b": peers.authenticated(bed, "b", "binder")}
    sender = peers.bound(bed, "c", "sender.test")
    for i in range(5):
        name = "dup%d.test" % i
        order = ("a", "b") if i % 2 == 0 else ("b", "a")
        for node_id in order:
            on[node_id].ask_bind(name)
        answers = {node_id: on[node_id].bind_answer() for node_id in order}
        errors = sorted((error or "") for _name, error in answers.values())
        assert errors == ["", "409"], "%s: bind answers %s" % (name, answers)
        winner = next(n for n, (_name, error) in answers.items() if error is None)
        bed.wait_members(name, lambda ms: [m.node for m in ms] == [winner], 3.0,
                         "one member, on node %s" % winner)
        members = bed.members(name)
        owner = bed.owner(name)
        assert owner is not None and (owner.node, owner.member) == (winner, members[0].member), owner

        knows(sender, name)
        sender.send(route(name, "sender.test", "to-%s" % name))
        on[winner].take(with_id("to-%s" % name), 5.0, "the route to %s at the winner" % name)
    again = [e.raw for p in on.values() for e in p.kept if (stanza_id(e) or "").startswith("to-dup")]
    assert again == [], "routes to the names arrived twice or at the loser: %s" % again
    no_bounces(sender)


def test_concurrent_default_route_binds_on_two_nodes_give_one_success_and_one_409(bed, peers):
    """<bind><default/></bind> of two names at once on nodes a and b: one OK, one error='409'; etcd's default route is the winner's, and a route from node c to a name nobody bound reaches the winner."""
    bed.wait_ready()
    da = peers.authenticated(bed, "a", "default-a")
    db = peers.authenticated(bed, "b", "default-b")
    da.ask_bind("da.test", default=True)
    db.ask_bind("db.test", default=True)
    answers = {"a": da.bind_answer(), "b": db.bind_answer()}
    assert sorted((error or "") for _n, error in answers.values()) == ["", "409"], answers
    winner = "a" if answers["a"][1] is None else "b"
    winner_name, winner_peer = ("da.test", da) if winner == "a" else ("db.test", db)
    bed.wait_members(winner_name, lambda ms: [m.node for m in ms] == [winner], 3.0,
                     "one member, on node %s" % winner)
    default = bed.default_route()
    assert default is not None and (default.name, default.node) == (winner_name, winner), default
    loser_name = "db.test" if winner == "a" else "da.test"
    assert bed.members(loser_name) == [], "the refused bind left a member"

    sender = peers.bound(bed, "c", "elsewhere-sender.test")
    until_delivered(sender, winner_peer, lambda i: route("nobody-bound-this.test",
                                                         "elsewhere-sender.test", i), "default")
    sender.send(route("nobody-bound-this.test", "elsewhere-sender.test", "via-default"))
    got = winner_peer.take(with_id("via-default"), 5.0, "the route via the default route")
    assert got.attrs.get("to") == "nobody-bound-this.test" and "error" not in got.attrs
    no_bounces(sender)


# -- 3. real jabberd2: sm on node a, c2s on node b ----------------------------------------


DOMAIN = "example.test"
PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw"}


def bare(user):
    return "%s@%s" % (user, DOMAIN)


def full(user, resource="r"):
    return "%s/%s" % (bare(user), resource)


def presence(kind, sender):
    return lambda p: p["type"] == kind and str(p["from"]) == sender


def message_from(sender):
    return lambda m: str(m["from"]) == sender


async def login(clients, user, resource="r"):
    client = await clients.login(full(user, resource), PASSWORDS[user])
    client.send_presence()
    return client


async def subscribe(a, b):
    """a subscribes to b's presence and b approves (RFC 6121 §3.1)."""
    a.send_presence_subscription(pto=b.boundjid.bare, ptype="subscribe")
    await b.wait_for("presence", presence("subscribe", a.boundjid.bare))
    b.send_presence_subscription(pto=a.boundjid.bare, ptype="subscribed")
    await a.wait_for("presence", presence("subscribed", b.boundjid.bare))
    await a.wait_for("presence", presence("available", str(b.boundjid)))


def test_jabberd2_sm_on_one_node_and_c2s_on_another_serve_chat_presence_and_offline(
        request, tmp_path, bed):
    """Debian's sm on node a, c2s on node b: two users register and log in, subscribe, see each other's presence, chat both ways, and a message to a user gone offline is stored and delivered, stamped, at her next login."""
    bed.wait_ready()
    stack = SplitStack(tmp_path / "jabberd2", bed["a"], bed["b"])
    _track(request, stack)
    try:
        stack.start(timeout=10)   # c2s serves the domain once node b advertised a's sm to it

        async def scenario():
            async with Clients(stack.c2s_ip, stack.c2s_port) as clients:
                for user, password in PASSWORDS.items():
                    await clients.register(bare(user), password)
                alice = await login(clients, "alice")
                bob = await login(clients, "bob")
                await subscribe(alice, bob)
                await subscribe(bob, alice)

                bob.send_presence(pshow="away", pstatus="on node b")
                changed = await alice.wait_for("presence", presence("away", full("bob")))
                assert changed["status"] == "on node b"

                text = "Grüße über zwei Knoten & <xml> ✓"
                alice.send_message(mto=full("bob"), mbody=text, mtype="chat")
                got = await bob.wait_for("message", message_from(full("alice")))
                assert (got["body"], got["type"], str(got["to"])) == (text, "chat", full("bob"))
                bob.send_message(mto=bare("alice"), mbody="and back", mtype="chat")
                got = await alice.wait_for("message", message_from(full("bob")))
                assert got["body"] == "and back"

                await bob.logout()
                await alice.wait_for("presence", presence("unavailable", full("bob")))
                bodies = ["while you were away", "second one"]
                for body in bodies:
                    alice.send_message(mto=bare("bob"), mbody=body, mtype="chat")
                await alice.fetch_roster()     # answered after the sm filed the messages

                bob = await login(clients, "bob", resource="again")
                got = [await bob.wait_for("message", message_from(full("alice"))) for _ in bodies]
                assert [m["body"] for m in got] == bodies
                for m in got:
                    assert m.xml.find("{urn:xmpp:delay}delay") is not None, m
        run(scenario(), timeout=60)
    finally:
        stack.stop()


# -- 4. a node killed -----------------------------------------------------------------------


def test_a_killed_node_is_dropped_after_its_lease_and_serves_again_when_restarted(bed, peers):
    """kill -9 of node b: its members stay in etcd until its lease expires, then node a's components are told <presence type='unavailable'/> for the names only b served (not for one c serves too) and packets to them bounce (404, XEP-0114 503); b restarted, new components bind there and traffic flows again."""
    bed.wait_ready()
    ka = peers.bound(bed, "a", "ka.test")
    xa = peers.accepted(bed, "a", "xa.test")
    peers.bound(bed, "b", "kb.test")
    xb = peers.accepted(bed, "b", "xb.test")
    peers.bound(bed, "b", "shared.test", multi="to")
    shared_c = peers.bound(bed, "c", "shared.test", multi="to")
    for name in ("kb.test", "xb.test", "shared.test"):
        knows(ka, name)
    until_delivered(xa, xb, lambda i: message("xb.test", "xa.test", i), "probe-xb")
    assert sorted(m.node for m in bed.members("shared.test")) == ["b", "c"]

    # b's lease cannot expire sooner than etcd's count of what is left of it
    # (whole seconds) after this read.
    left = bed.client.time_to_live(bed.nodes_in_etcd()["b"]).ttl
    bed.kill_node("b")
    killed = time.monotonic()
    assert bed.members("kb.test"), "b's member vanished from etcd at once, not with its lease"

    lost(ka, "kb.test", TTL + 4)
    gone_after = time.monotonic() - killed
    lost(ka, "xb.test", 3.0)
    assert gone_after >= left - 0.5, (
        "node a dropped kb.test %.2fs after b died, before b's lease (%d s left) can have expired"
        % (gone_after, left))
    assert "b" not in bed.nodes_in_etcd()
    assert bed.members("kb.test") == [] and bed.members("xb.test") == []
    assert [m.node for m in bed.members("shared.test")] == ["c"]
    print("\nkill -9 of b: its names dropped at a %.2f s after (lease: %d s left, TTL %d s)"
          % (gone_after, left, TTL))

    ka.send(route("kb.test", "ka.test", "after-ttl"))
    bounced = ka.take(with_id("after-ttl"), 5.0, "the bounce of a route to kb.test")
    assert bounced.attrs.get("error") == "404", bounced.raw
    xa.send(message("xb.test", "xa.test", "after-ttl-x"))
    error = xa.take(with_id("after-ttl-x"), 5.0, "the stanza error for xb.test")
    assert error.attrs.get("type") == "error" and b"service-unavailable" in error.raw, error.raw
    ka.send(route("shared.test", "ka.test", "still-shared"))
    shared_c.take(with_id("still-shared"), 5.0, "shared.test on node c")
    assert False not in advertised(ka, "shared.test"), "shared.test advertised as gone"

    marks = {n: bed[n].log_mark() for n in ("a", "c")}
    bed.start_node("b")
    bed.wait_ready(["b"], timeout=10, since=marks)
    kb = peers.bound(bed, "b", "kb.test")
    knows(ka, "kb.test")
    ka.send(route("kb.test", "ka.test", "back-1"))
    assert "error" not in kb.take(with_id("back-1"), 5.0, "back-1 at the new kb.test").attrs
    xb2 = peers.accepted(bed, "b", "xb.test")
    until_delivered(xa, xb2, lambda i: message("xb.test", "xa.test", i), "probe-xb2")
    xa.send(message("xb.test", "xa.test", "back-2"))
    xb2.take(with_id("back-2"), 5.0, "back-2 at the new xb.test")
    assert [m.node for m in bed.members("kb.test")] == ["b"]


def test_a_link_lost_between_live_nodes_sends_nothing_twice(bed_factory, peers):
    """Node a dials node b through a relay. With b's writes back to a dropped
    (its acknowledgements too), 200 stanzas from a component on a reach one
    on b; then the relay cuts the link. a holds all 200 (b never said it read
    them) and, when a new link is up, b's hello says it read 200 routes of
    the lost one (docs/cluster.md §3, Resuming): none is sent again. Without
    that, each would arrive twice."""
    bed = bed_factory(("a", "b"), relayed=("b",))
    bed.wait_ready()
    relay = bed["b"].relay
    xa = peers.accepted(bed, "a", "xa.test")
    xb = peers.accepted(bed, "b", "xb.test")
    until_delivered(xa, xb, lambda i: message("xb.test", "xa.test", i), "probe-ab")
    time.sleep(0.2)              # b's acknowledgements of the probes reach a
    mark = bed["a"].log_mark()
    relay.mute = True
    for i in range(200):
        xa.send(message("xb.test", "xa.test", "m-%d" % i))
    for i in range(200):
        xb.take(with_id("m-%d" % i), 5.0, "m-%d at node b" % i)
    time.sleep(0.3)              # b's acknowledgements went out (and were dropped)
    relay.mute = False
    relay.cut()
    down = bed.wait_log("a", r"peer link with node 'b' down \((\d+) packets not sent\)", 5.0,
                        since=mark)
    handed_back = int(down.group(1))
    assert handed_back >= 200, "what b never acknowledged comes back: %d" % handed_back
    skipped = bed.wait_log("a", r"node 'b' had read (\d+) of the routes its lost link handed back",
                           10.0, since=mark)
    assert int(skipped.group(1)) == handed_back
    assert bed["a"].linked_to(mark) == {"b"}
    # held routes go out on the new link before anything newer: once this one
    # is in, anything sent again would be too
    xa.send(message("xb.test", "xa.test", "after-cut"))
    xb.take(with_id("after-cut"), 5.0, "after-cut at node b")
    again = [e for e in xb.collect(0.5) if (stanza_id(e) or "").startswith("m-")]
    assert again == [], "%d stanzas delivered twice, e.g. %r" % (len(again), again[:1])
    no_bounces(xa)
    print("\nlink cut between live nodes: %d routes handed back, %d not sent again, 0 delivered twice"
          % (handed_back, int(skipped.group(1))))


def test_what_survivors_hold_for_a_killed_node_is_delivered_or_bounced_never_lost(bed, peers):
    """kill -9 of node b, then routes for its names from node a until its lease ends: each one is held by a
    (b's members are still in the table), then placed again: those for a name c serves too reach c, those
    for a name only b served bounce to their sender. sent = delivered + bounced, none twice."""
    bed.wait_ready()
    ka = peers.bound(bed, "a", "ka.test")
    peers.bound(bed, "b", "only-b.test")
    peers.bound(bed, "b", "both.test", multi="to")
    both_c = peers.bound(bed, "c", "both.test", multi="to")
    for name in ("only-b.test", "both.test"):
        knows(ka, name)
    bed.kill_node("b")
    ids = {"only-b.test": [], "both.test": []}
    n = 0
    deadline = time.monotonic() + TTL + 4
    # Until a's table drops b's members: every route sent meanwhile is held by a.
    while bed.members("only-b.test") and time.monotonic() < deadline:
        for name in ids:
            n += 1
            ids[name].append("held-%d" % n)
            # Distinct users, so that both.test's placement sends some to b's member.
            ka.send(route(name, "ka.test", ids[name][-1]).replace("u@%s" % name, "u%d@%s" % (n, name)))
        time.sleep(0.05)
    assert ids["both.test"], "b's members left etcd before a route could be sent"
    lost(ka, "only-b.test", TTL + 4)
    delivered = {stanza_id(e) for e in both_c.collect(3.0) if stanza_id(e)}
    bounced = {stanza_id(e) for e in ka.collect(1.0) if e.attrs.get("error")}
    for_both, for_b = set(ids["both.test"]), set(ids["only-b.test"])
    assert for_both <= delivered, "routes for both.test not delivered: %s" % sorted(for_both - delivered)
    assert for_b <= bounced, "routes for only-b.test neither delivered nor bounced: %s" % sorted(for_b - bounced)
    assert not (for_both & bounced) and not (for_b & delivered)
    duplicates = [e for e in both_c.kept if stanza_id(e) in for_both]
    assert len(duplicates) == len(for_both), "a held route was delivered twice"
    print("\nheld for killed b until its lease ended: sent %d = delivered %d (both.test, at c) + "
          "bounced %d (only-b.test); 0 lost, 0 twice" % (n, len(for_both), len(for_b)))


# -- 5. a node paused past its lease ----------------------------------------------------------


def test_a_node_paused_past_its_lease_fences_itself_and_no_name_is_held_twice(bed, peers):
    """SIGSTOP of node b past its TTL: its lease and names go; node a binds b's name meanwhile. SIGCONT: b logs that it fenced itself, closes its components, rejoins under a new lease; the name stays a's alone in etcd, a bind of it on b gets 409, and a new name binds on b and carries traffic."""
    bed.wait_ready()
    sa = peers.bound(bed, "a", "sa.test")
    sb = peers.bound(bed, "b", "sb.test")
    xsb = peers.accepted(bed, "b", "xsb.test")
    knows(sa, "sb.test")
    old_lease = bed.nodes_in_etcd()["b"]
    mark = bed["b"].log_mark()

    bed.pause_node("b")
    bed.wait(lambda: "b" not in bed.nodes_in_etcd(), TTL + 4, "node b's lease expiring",
             lambda: bed.shown_keys())
    lost(sa, "sb.test", 4.0)
    taker = peers.bound(bed, "a", "sb.test")        # free again: b's lease is gone
    marks = {n: bed[n].log_mark() for n in ("a", "c")}

    resumed = time.monotonic()
    bed.resume_node("b")
    bed.wait_log("b", r"node b fenced", 5.0, since=mark)
    fenced_after = time.monotonic() - resumed
    assert sb.closed_within(5.0), "b did not close sb.test's connection when it fenced"
    assert xsb.closed_within(5.0), "b did not close xsb.test's connection when it fenced"
    bed.wait_log("b", r"node b rejoined", 10.0, since=mark)
    rejoined_after = time.monotonic() - resumed
    bed.wait(lambda: bed.nodes_in_etcd().get("b") not in (None, old_lease), 5.0,
             "node b back under a new lease")
    marks["b"] = bed.wait_log("b", r"node b fenced", 1.0, since=mark).end() + mark
    bed.wait_linked(["b"], timeout=10, since=marks)

    # No name is held twice: sb.test is a's, and so is every unique name.
    assert [m.node for m in bed.members("sb.test")] == ["a"]
    assert bed.owner("sb.test").node == "a"
    table = bed.keys()
    for key, (value, _kv) in table.items():
        if isinstance(key, UniqueKey):
            holders = [m for m in table if isinstance(m, MemberKey) and m.name == key.name]
            assert [(m.node, m.member) for m in holders] == [(value.node, value.member)], (key, holders)
    again = peers.authenticated(bed, "b", "rebinder")
    again.ask_bind("sb.test")
    assert again.bind_answer() == ("sb.test", "409")

    nb = peers.bound(bed, "b", "sb-new.test")
    knows(sa, "sb-new.test")
    sa.send(route("sb-new.test", "sa.test", "after-rejoin"))
    nb.take(with_id("after-rejoin"), 5.0, "a route to the name bound on b after it rejoined")
    sa.send(route("sb.test", "sa.test", "to-taker"))
    taker.take(with_id("to-taker"), 5.0, "sb.test at node a's component")
    no_bounces(sa)
    print("\nSIGSTOP of b past its lease, SIGCONT: fenced within %.2f s, rejoined within %.2f s; "
          "sb.test held once (by a), a rebind on b got 409" % (fenced_after, rejoined_after))


# -- 6. etcd restarted ------------------------------------------------------------------------------


ETCD_TTL = 6                # long enough for etcd to come back well within it


def lease_refreshed(bed, lease, timeout):
    """Wait until etcd shows `lease` counting down and then refreshed (a
    keepalive got through)."""
    seen = []

    def refreshed():
        info = bed.client.time_to_live(lease)
        assert info is not None, "lease %x is gone" % lease
        seen.append(info.ttl)
        return any(later > earlier for earlier, later in zip(seen, seen[1:]))
    bed.wait(refreshed, timeout, "lease %x refreshed" % lease, lambda: "ttls seen: %s" % seen)


def test_etcd_killed_and_restarted_within_the_ttl_costs_no_traffic_and_no_member(bed_factory, peers):
    """etcd SIGKILLed: routes between nodes a and b go on, both protocols; restarted (same data) within the lease TTL: every node and member key is still there under the same lease, the leases are refreshed again, nothing was advertised as gone, nobody fenced, and a new bind works."""
    bed = bed_factory(lease_ttl=ETCD_TTL)
    bed.wait_ready()
    ea = peers.bound(bed, "a", "ea.test")
    eb = peers.bound(bed, "b", "eb.test")
    xea = peers.accepted(bed, "a", "xea.test")
    xeb = peers.accepted(bed, "b", "xeb.test")
    knows(ea, "eb.test")
    knows(eb, "ea.test")
    until_delivered(xea, xeb, lambda i: message("xeb.test", "xea.test", i), "probe-x")
    before = {key: kv.lease for key, (_value, kv) in bed.keys().items()}
    names = ("ea.test", "eb.test", "xea.test", "xeb.test")
    assert {k.name for k in before if isinstance(k, MemberKey)} >= set(names), before

    bed.kill_etcd()
    killed = time.monotonic()
    for i in range(10):
        ea.send(route("eb.test", "ea.test", "down-ab-%d" % i))
        eb.send(route("ea.test", "eb.test", "down-ba-%d" % i))
        xea.send(message("xeb.test", "xea.test", "down-x-%d" % i))
    for i in range(10):
        eb.take(with_id("down-ab-%d" % i), 5.0, "down-ab-%d while etcd is down" % i)
        ea.take(with_id("down-ba-%d" % i), 5.0, "down-ba-%d while etcd is down" % i)
        xeb.take(with_id("down-x-%d" % i), 5.0, "down-x-%d while etcd is down" % i)
    assert not bed.etcd.process.running(), "etcd came back by itself?"
    bed.start_etcd()
    away = time.monotonic() - killed
    assert away < ETCD_TTL * 2 / 3, "etcd was away %.1fs: not within the TTL, the test proves nothing" % away

    bed.wait(lambda: {k: kv.lease for k, (_v, kv) in bed.keys().items()} == before, 5.0,
             "the same keys under the same leases after the restart",
             lambda: "before: %s\nnow:\n%s" % (sorted(map(str, before)), bed.shown_keys()))
    for node_id, lease in bed.nodes_in_etcd().items():
        lease_refreshed(bed, lease, 2 * ETCD_TTL)
    now = {k: kv.lease for k, (_v, kv) in bed.keys().items()}
    assert now == before, "keys changed after a lease period: %s" % (set(before) ^ set(now))

    for node_id in NODES:
        assert not re.search(r"fenced", bed[node_id].log_text_of_run), "node %s fenced" % node_id
    for peer, name in ((ea, "eb.test"), (eb, "ea.test")):
        assert advertised(peer, name) == [], "%s saw %s advertised again: %s" % (
            peer.label, name, advertised(peer, name))
    late = peers.bound(bed, "c", "late.test")
    knows(ea, "late.test")
    ea.send(route("late.test", "ea.test", "after-restart"))
    late.take(with_id("after-restart"), 5.0, "a route to a name bound after the restart")
    round_trip(ea, "ea.test", eb, "eb.test", "after-restart")
    for peer in (ea, eb, xea, xeb):
        no_bounces(peer)
    print("\netcd SIGKILLed for %.2f s (lease TTL %d s): 30 routes across nodes delivered meanwhile, "
          "%d keys kept under the same leases, nobody fenced" % (away, ETCD_TTL, len(before)))


# -- 7. placement agreed across nodes, and kept for survivors ------------------------------------

CONSISTENT = "<clustering><policy name='hash.test' algorithm='consistent'/></clustering>"
USERS = 60


def placed_by(senders, members, phase):
    """Each sender (name, peer) sends a route for every user of hash.test;
    returns {user: member label} per sender, after checking that every
    route reached exactly one member, once, unbounced."""
    sent = {}
    for name, sender in senders:
        for user in range(USERS):
            tag = "%s-%s-%d" % (phase, name, user)
            sent[tag] = (name, user)
            sender.send(route("hash.test", name, tag).replace("u@hash.test", "u%d@hash.test" % user))
    got = {}
    deadline = time.monotonic() + 10
    while len(got) < len(sent) and time.monotonic() < deadline:
        for label, member in members.items():
            for element in member.collect(0.05):
                tag = stanza_id(element)
                if tag in sent:
                    assert tag not in got, "%s arrived twice (at %s and %s)" % (tag, got[tag], label)
                    got[tag] = label
            member.forget(lambda e: stanza_id(e) in sent)
    missing = sorted(set(sent) - set(got))
    assert not missing, "%d of %d routes never arrived: %s; bounces: %s" % (
        len(missing), len(sent), missing[:5], [s.shown() for _, s in senders])
    by_sender = {name: {} for name, _ in senders}
    for tag, label in got.items():
        name, user = sent[tag]
        by_sender[name][user] = label
    return by_sender


def test_consistent_placement_is_one_across_nodes_and_survivors_keep_their_users(bed_factory, peers):
    """hash.test (algorithm='consistent') has a member on each of a, b, c; senders on a and c place
    every user on the same member. kill -9 of b: after its lease, b's users are spread over a's and
    c's members, and not one user of a's or c's member moves. b restarted with a new member: it gets
    back b's users and no others."""
    bed = bed_factory(clustering=CONSISTENT)
    bed.wait_ready()
    ka = peers.bound(bed, "a", "ka.test")
    kc = peers.bound(bed, "c", "kc.test")
    # a's and c's members bind at once: each node has its own before it hears of the other.
    members = {node: peers.authenticated(bed, node, "hash.test") for node in ("a", "c")}
    for member in members.values():
        member.ask_bind("hash.test", multi="to")
    for member in members.values():
        assert member.bind_answer() == ("hash.test", None)
    members["b"] = peers.bound(bed, "b", "hash.test", multi="to")
    bed.wait_members("hash.test", lambda found: len(found) == 3, 6.0, "three members of hash.test")
    time.sleep(0.5)             # every node's mirror has the three (the watch lags by ms)
    senders = [("ka.test", ka), ("kc.test", kc)]

    before = placed_by(senders, members, "p1")
    assert before["ka.test"] == before["kc.test"], "nodes a and c place users differently"
    home = before["ka.test"]
    assert set(home.values()) == set(NODES), "a member got no user: %s" % home

    bed.kill_node("b")
    bed.wait_members("hash.test", lambda found: len(found) == 2, TTL + 4, "b's member gone")
    time.sleep(0.5)
    del members["b"]
    after = placed_by(senders, members, "p2")
    assert after["ka.test"] == after["kc.test"], "after b's loss, nodes a and c place users differently"
    moved = sorted(user for user, label in home.items() if label != "b" and after["ka.test"][user] != label)
    assert moved == [], "users of surviving members moved: %s" % moved
    assert {after["ka.test"][user] for user, label in home.items() if label == "b"} <= {"a", "c"}

    marks = {n: bed[n].log_mark() for n in ("a", "c")}
    bed.start_node("b")
    bed.wait_ready(["b"], timeout=10, since=marks)
    members["b"] = peers.bound(bed, "b", "hash.test", multi="to")
    bed.wait_members("hash.test", lambda found: len(found) == 3, 6.0, "b's new member")
    time.sleep(0.5)
    back = placed_by(senders, members, "p3")
    assert back["ka.test"] == back["kc.test"], "after b's return, nodes a and c place users differently"
    assert back["ka.test"] == home, "b's return moved users other than its own: %s" % sorted(
        user for user in home if back["ka.test"][user] != home[user])
    of_b = sum(1 for label in home.values() if label == "b")
    print("\nconsistent placement, %d users, members on a, b, c: kill -9 of b moved its %d users "
          "and 0 of the other %d; b's return gave back those %d and moved no other"
          % (USERS, of_b, USERS - of_b, of_b))


# -- 8. a log sink sees what every node routes ----------------------------------------------------


def test_a_log_sink_on_one_node_gets_one_copy_of_every_route_any_node_places(bed, peers):
    """<bind><log/> on node c: routes placed on a (to a component on b, and to one on a itself) and on
    b reach their destinations and each reaches c's sink once, as type='log' copies."""
    bed.wait_ready()
    ka, ka2 = peers.bound(bed, "a", "ka.test"), peers.bound(bed, "a", "ka2.test")
    kb = peers.bound(bed, "b", "kb.test")
    sink = peers.authenticated(bed, "c", "log sink")
    sink.ask_bind("logger", log=True)
    assert sink.bind_answer() == ("logger", None)
    for peer in (ka, kb):
        knows(peer, "logger")
    knows(ka, "kb.test")
    knows(kb, "ka.test")
    # The sink's key follows its member key: probe until a's copies reach it.
    deadline = time.monotonic() + 6
    n = 0
    while True:
        n += 1
        ka.send(route("ka2.test", "ka.test", "probe-%d" % n))
        if sink.find(with_id("probe-%d" % n), 0.25) is not None:
            break
        assert time.monotonic() < deadline, "no log copy from node a reached the sink on c"
    time.sleep(0.3)
    sink.forget(lambda e: (stanza_id(e) or "").startswith("probe-"))
    sent = [(ka, "kb.test", "ka.test", "a-to-b"), (ka, "ka2.test", "ka.test", "a-to-a"),
            (kb, "ka.test", "kb.test", "b-to-a")]
    for sender, to, from_, tag in sent:
        sender.send(route(to, from_, tag))
    kb.take(with_id("a-to-b"), 5.0, "a-to-b at kb")
    ka2.take(with_id("a-to-a"), 5.0, "a-to-a at ka2")
    ka.take(with_id("b-to-a"), 5.0, "b-to-a at ka")
    copies = [e for e in sink.collect(2.0) if stanza_id(e) in {tag for *_, tag in sent}]
    assert sorted(stanza_id(e) for e in copies) == ["a-to-a", "a-to-b", "b-to-a"], [e.raw for e in copies]
    assert all(e.attrs.get("type") == "log" for e in copies), [e.raw for e in copies]


# -- 9. session affinity: a session start learnt by every node -------------------------------------

def senders_and_two_members(bed, peers, name, label):
    """c2s.test on node c, s2s.test on node b, and `name` with a member on a
    (`label`0) and one on b (`label`1), each node knowing all of them."""
    bed.wait_ready()
    c2s = peers.bound(bed, "c", "c2s.test")
    s2s = peers.bound(bed, "b", "s2s.test")
    members = {label + "0": peers.bound(bed, "a", name, multi="to"),
               label + "1": peers.bound(bed, "b", name, multi="to")}
    bed.wait_members(name, lambda found: len(found) == 2, 6.0, "two %s members" % name)
    knows(s2s, "c2s.test")
    knows(c2s, name)
    time.sleep(0.5)
    return c2s, s2s, members


def a_third_member_moves_nobody(bed, peers, name, label, members, c2s, s2s, before):
    """A third member of `name` joins on node a: messages from s2s on b and
    from c2s on c still reach each user of `before` ({user: label}) on her
    member, and 30 users never seen follow the new hash (some go to the new one)."""
    members[label + "2"] = peers.bound(bed, "a", name, multi="to")
    bed.wait_members(name, lambda found: len(found) == 3, 6.0, "the new member")
    time.sleep(0.5)
    users = sorted(before)
    guests = ["g%d@%s" % (i, name) for i in range(30)]          # unknown anywhere
    for sender, sender_name, tag in ((s2s, "s2s.test", "from-b"), (c2s, "c2s.test", "from-c")):
        got = members_reached(members, name, sender, sender_name, users, tag + "-users")
        moved = sorted(user for user in users if got[user] != before[user])
        assert moved == [], "%s: users moved to another %s member: %s" % (tag, name, moved)
        placed = members_reached(members, name, sender, sender_name, guests, tag + "-guests")
        assert label + "2" in placed.values(), "%s: the new member got no user at all: %s" % (tag, placed)


def members_reached(members, name, sender, sender_name, targets, tag):
    """`sender` sends a message to each user in `targets` through `name`;
    {user: the label (in `members`) of the member it reached}, all within 10 s."""
    for i, target in enumerate(targets):
        sender.send("<route to='%s' from='%s'><message xmlns='jabber:client' to='%s' "
                    "from='x@remote.test/r' id='%s-%d'><body>hi</body></message></route>"
                    % (name, sender_name, target, tag, i))
    got = {}
    deadline = time.monotonic() + 10
    while len(got) < len(targets) and time.monotonic() < deadline:
        for label, member in members.items():
            for element in member.collect(0.05):
                found = re.search((r"id='%s-(\d+)'" % tag).encode(), element.raw)
                if found:
                    got[targets[int(found.group(1))]] = label
            member.forget(lambda e: True)
    assert len(got) == len(targets), "%s: %d of %d arrived" % (tag, len(got), len(targets))
    return got


SC = "http://jabberd.jabberstudio.org/ns/session/1.0"
AFFINITY = "<clustering><policy name='sm.test' algorithm='consistent' affinity='session'/></clustering>"


def test_a_live_session_stays_on_its_sm_from_every_node_when_another_sm_joins(bed_factory, peers):
    """sm.test (consistent, affinity='session') has a member on a and one on b; c2s on c starts a session
    for each of 30 users and the member that got each start answers 'started', as the real sm does. A third
    member joins on a. Messages from s2s on b and from c2s on c still reach, for every user with a session,
    the member holding it (node b saw none of the starts: it learnt them from the session notices), while
    users without a session follow the new hash (some go to the new member)."""
    bed = bed_factory(clustering=AFFINITY)
    c2s, s2s, sms = senders_and_two_members(bed, peers, "sm.test", "sm")
    users = ["u%d@sm.test" % i for i in range(30)]
    session = {}
    for user in users:
        c2s.send("<route to='sm.test' from='c2s.test'><sc:session xmlns:sc='%s' action='start' "
                 "sc:c2s='c-%s' target='%s/res'/></route>" % (SC, user, user))
    deadline = time.monotonic() + 10
    while len(session) < len(users) and time.monotonic() < deadline:
        for label, sm in sms.items():
            for element in sm.collect(0.05):
                if b"action='start'" in element.raw:
                    user = re.search(rb"target='([^/']+)", element.raw).group(1).decode()
                    session[user] = label
                    sm.send("<route to='c2s.test' from='sm.test'><sc:session xmlns:sc='%s' "
                            "action='started' sc:c2s='c-%s' sc:sm='%s-%s' target='%s/res'/></route>"
                            % (SC, user, label, user, user))
            sm.forget(lambda e: True)
    assert len(session) == len(users), "session starts never reached an sm: %s" % sorted(set(users) - set(session))
    started = [e for e in c2s.collect(2.0) if b"action='started'" in e.raw]
    assert len(started) == len(users), "c2s got %d of %d 'started' replies" % (len(started), len(users))
    assert set(session.values()) == {"sm0", "sm1"}

    a_third_member_moves_nobody(bed, peers, "sm.test", "sm", sms, c2s, s2s, session)


TRAFFIC = "<clustering><policy name='gw.test' algorithm='consistent' affinity='traffic'/></clustering>"


def test_a_users_gateway_member_stays_hers_from_every_node_when_another_member_joins(bed_factory, peers):
    """gw.test (consistent, affinity='traffic', as for a gateway that says nothing of sessions) has a
    member on a and one on b; c2s on c sends each of 30 users a message, placed by the hash, and node c
    tells the other nodes where each went. A third member joins on a. Messages from s2s on b and from c2s
    on c still reach each user's member (node b placed none of them: it learnt the entries from c's
    <t/> notices), while users gw.test never heard of follow the new hash (some go to the new member)."""
    bed = bed_factory(clustering=TRAFFIC)
    c2s, s2s, gws = senders_and_two_members(bed, peers, "gw.test", "gw")

    users = ["u%d@gw.test" % i for i in range(30)]
    first = members_reached(gws, "gw.test", c2s, "c2s.test", users, "first")
    assert set(first.values()) == {"gw0", "gw1"}
    time.sleep(0.5)                          # c's notices reach a and b

    a_third_member_moves_nobody(bed, peers, "gw.test", "gw", gws, c2s, s2s, first)


# -- 10. replace='half-open' across nodes -------------------------------------------------------------

HALF_OPEN = ("<clustering><policy name='sm.test' replace='half-open'/>"
             "<policy name='gw.test' algorithm='slots' slots='2' replace='half-open'/></clustering>")
STREAM_ERROR = "http://etherx.jabber.org/streams error"


def test_an_sm_back_through_another_node_replaces_its_half_open_connection(bed_factory, peers):
    """An sm bound its id (sm-1) and sm.test on node a, then its connection went half-open (it reads
    nothing more). The same sm comes back through node b (a balancer in front of the nodes): under
    replace='half-open' its bind of sm-1 succeeds, node a ends the old connection (stream error
    conflict), etcd holds sm-1 for b's member, and routes for sm-1 from node a reach the new one."""
    bed = bed_factory(clustering=HALF_OPEN)
    bed.wait_ready()
    old = peers.authenticated(bed, "a", "sm (first connection)")
    for name, multi in (("sm-1", None), ("sm.test", "to")):
        old.ask_bind(name, multi=multi)
        assert old.bind_answer() == (name, None)
    watcher_b = peers.bound(bed, "b", "kb.test")
    ka = peers.bound(bed, "a", "ka.test")
    knows(watcher_b, "sm-1")
    knows(ka, "kb.test")
    new = peers.authenticated(bed, "b", "sm (back through b)")
    new.ask_bind("sm-1")
    assert new.bind_answer(timeout=6.0) == ("sm-1", None)
    error = old.take(lambda e: e.name == STREAM_ERROR, 5.0, "the old connection's stream error")
    assert b"conflict" in error.raw, error.raw
    assert old.closed_within(5.0)
    owner = bed.owner("sm-1")
    assert owner is not None and owner.node == "b", owner
    assert bed.wait_log("a", r"is replaced by a new connection of the same instance on node b", 2.0)
    until_delivered(ka, new, lambda i: route("sm-1", "ka.test", i), "probe-sm")
    ka.send(route("sm-1", "ka.test", "after-replace"))
    new.take(with_id("after-replace"), 5.0, "a route for sm-1 at the new connection")


def test_a_gateway_copy_back_through_another_node_replaces_its_half_open_connection_in_its_slot(
        bed_factory, peers):
    """XEP-0114 copies of gw.test (algorithm='slots', replace='half-open') gw-1 on a and gw-2 on b. gw-1
    comes back through b while its first connection is half-open: node a ends that one (conflict) and
    the new connection takes gw-1's slot, so gw-1's users are placed on it from every node."""
    bed = bed_factory(clustering=HALF_OPEN)
    bed.wait_ready()
    old = peers._keep(ComponentPeer.accepted(bed.address("a"), "gw.test", instance="gw-1",
                                             label="gw-1 (first connection) on node a"))
    peers._keep(ComponentPeer.accepted(bed.address("b"), "gw.test", instance="gw-2",
                                       label="gw-2 on node b"))
    bed.wait_members("gw.test", lambda found: len(found) == 2, 6.0, "gw-1 and gw-2")
    def slots():
        return {key.slot: value for key, (value, _kv) in bed.keys().items() if isinstance(key, SlotKey)}
    before = slots()
    assert sorted(v.identity for v in before.values()) == ["gw-1", "gw-2"], before
    (gw1_slot,) = [slot for slot, v in before.items() if v.identity == "gw-1"]
    assert before[gw1_slot].node == "a"
    time.sleep(0.3)
    peers._keep(ComponentPeer.accepted(bed.address("b"), "gw.test", instance="gw-1",
                                       label="gw-1 (back through node b)"))
    error = old.take(lambda e: e.name == STREAM_ERROR, 5.0, "the old connection's stream error")
    assert b"conflict" in error.raw, error.raw
    assert sorted(m.node for m in bed.members("gw.test")) == ["b", "b"], bed.shown_keys()
    after = slots()
    assert sorted(after) == sorted(before), "slots changed: %s -> %s" % (before, after)
    assert after[gw1_slot].identity == "gw-1" and after[gw1_slot].node == "b", after
