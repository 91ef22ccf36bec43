"""jrouter.wire.peer_stream: one link between two nodes, both ends paired in memory (docs/cluster.md)."""

import base64
import itertools

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jrouter.wire import peer_stream
from jrouter.wire.peer_stream import (
    NS_COMPONENT, PEER_ROLE, ROUTE, AffinityNotice, Broadcast, Forwarded, PeerAcceptor, PeerAuthFailed,
    PeerClosed, PeerDialer, PeerProtocolError, PeerReady, PeerStateError, ReplaceMember, SessionNotice, State, Unsent,
    dials)
from jrouter.wire.xmlstream import StreamReader

SECRET = "a cluster secret, 16+"
STREAMS = "http://etherx.jabber.org/streams"
NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"

ROUTE_250 = (b"<route to='sm' from='c2s'><message xmlns='jabber:client' to='user1@example.com/res' "
             b"from='user2@example.com/x' type='chat' id='abcdefgh'><body>" + b"x" * 82
             + b"</body></message></route>")
assert len(ROUTE_250) == 250


def ids(prefix="id"):
    """A deterministic id/nonce source (40 printable characters)."""
    counter = itertools.count()
    return lambda: f"{prefix}{next(counter):038d}"


def dialer(node="a", secret=SECRET, **kw):
    kw.setdefault("cnonce", ids("cn"))
    return PeerDialer(node, secret, **kw)


def acceptor(node="b", secret=SECRET, **kw):
    kw.setdefault("make_id", ids("sv"))
    return PeerAcceptor(node, secret, **kw)


def pump(src, dst, chunk=None):
    """Move what src has queued into dst (all at once, or `chunk` bytes at a
    time), running the TLS step in memory; returns dst's events."""
    data = src.data_to_send()
    src.sent(len(data))
    events = []
    pieces = [data] if chunk is None else [data[i:i + chunk] for i in range(0, len(data), chunk)]
    for piece in pieces:
        while piece:
            events += dst.receive_data(piece)
            piece = dst.tls_started() if dst.starting_tls else b""
    if src.starting_tls:
        assert src.tls_started() == b""
    return events


def converse(d, a, chunk=None, rounds=12):
    """Pump both ways until quiet; returns (dialer's events, acceptor's events)."""
    got_d, got_a = [], []
    for _ in range(rounds):
        got_a += pump(d, a, chunk)
        got_d += pump(a, d, chunk)
    return got_d, got_a


def open_pair(**kw):
    d, a = dialer(**kw.pop("dialer", {})), acceptor(**kw.pop("acceptor", {}))
    converse(d, a)
    assert d.open and a.open
    return d, a


def stream_error(data):
    """(condition, text) of the stream error in data."""
    reader = StreamReader()
    reader.feed(b"<stream:stream xmlns:stream='%s'>" % STREAMS.encode())
    start = data.index(b"<stream:error")
    (element, *_rest) = reader.feed(data[start:])
    tree = element.tree()
    condition = tree[0].tag.rpartition("}")[2]
    texts = [child.text for child in tree if child.tag.endswith("}text")]
    return condition, texts[0] if texts else None


def raise_from(stream, data):
    with pytest.raises(PeerProtocolError) as caught:
        stream.receive_data(data)
    assert stream.state is State.CLOSED
    return caught.value


# -- negotiation and the state table ---------------------------------------------------------


def test_a_pair_opens_and_each_end_learns_the_others_node_and_revision():
    """Dialer and acceptor reach OPEN; each gets PeerReady(other node, other's revision)."""
    d = dialer("a", revision=lambda: 7)
    a = acceptor("b", revision=lambda: 42)
    got_d, got_a = converse(d, a)
    assert [(e.node, e.revision) for e in got_d if isinstance(e, PeerReady)] == [("b", 42)]
    assert [(e.node, e.revision) for e in got_a if isinstance(e, PeerReady)] == [("a", 7)]
    assert (d.peer_node, a.peer_node, d.peer_revision, a.peer_revision) == ("b", "a", 42, 7)


def test_each_hello_names_the_routes_its_end_sends_and_what_it_read_of_the_last_link():
    """seq: the id of the routes each end sends on this link; of/read: what
    read_before(other node) says of the other node's last link. Each end's
    PeerReady carries both; the numbers of what comes back from take_unsent
    are on the link's own sequence (docs/cluster.md §3, Resuming)."""
    asked = []

    def read_before(node):
        asked.append(node)
        return {"b": ("oldb", 17), "a": ("olda", 0)}[node]
    d = dialer("a", sequence="seqa", read_before=read_before, expect_node="b")
    a = acceptor("b", sequence="seqb", read_before=read_before)
    got_d, got_a = converse(d, a)
    (ready_d,) = [e for e in got_d if isinstance(e, PeerReady)]
    (ready_a,) = [e for e in got_a if isinstance(e, PeerReady)]
    assert (ready_d.sequence, ready_d.read) == ("seqb", ("olda", 0))
    assert (ready_a.sequence, ready_a.read) == ("seqa", ("oldb", 17))
    assert (d.peer_sequence, d.peer_read, a.peer_sequence, a.peer_read) == \
        ("seqb", ("olda", 0), "seqa", ("oldb", 17))
    assert sorted(asked) == ["a", "b"]
    d.forward(ROUTE_250, "m", 1, tag="t")
    assert d.take_unsent() == [Unsent(ROUTE_250, "m", 1, "t", 1, "seqa")]


def test_a_hello_without_sequence_or_count_opens_a_link_that_resumes_nothing():
    d, a = open_pair()
    assert (d.peer_sequence, d.peer_read, a.peer_sequence, a.peer_read) == ("", None, "", None)


@pytest.mark.parametrize("attrs", [b"seq='a b'", b"read='3'", b"of='s1'", b"of='s1' read='-1'",
                                   b"of='' read='2'", b"seq='" + b"x" * 65 + b"'"])
def test_a_hello_with_a_broken_sequence_or_count_breaks_the_link(attrs):
    d = dialer("a")
    a = acceptor("b")
    d._hello = lambda peer: b"<hello xmlns='urn:jrouter:peer:0' node='a' revision='1' " + attrs + b"/>"
    with pytest.raises(PeerProtocolError) as caught:
        converse(d, a)
    assert caught.value.condition == "bad-format" and a.state is State.CLOSED


def test_a_sequence_id_the_hello_could_not_carry_is_refused_at_once():
    with pytest.raises(ValueError):
        dialer("a", sequence="not one")


def states_seen(d, a):
    """Every state each end passes through, fed one byte at a time."""
    seen_d, seen_a = [d.state], [a.state]

    def note(seen, stream):
        if seen[-1] is not stream.state:
            seen.append(stream.state)

    for _ in range(12):
        for src, dst, seen_src, seen_dst in ((d, a, seen_d, seen_a), (a, d, seen_a, seen_d)):
            data = src.data_to_send()
            src.sent(len(data))
            for i in range(len(data)):
                dst.receive_data(data[i:i + 1])
                note(seen_dst, dst)
                if dst.starting_tls:
                    assert dst.tls_started() == b""
                    note(seen_dst, dst)
            if src.starting_tls:
                src.tls_started()
                note(seen_src, src)
    return seen_d, seen_a


def assert_legal(seen):
    for before, after in zip(seen, seen[1:]):
        assert after in peer_stream._MOVES[before], (before, after)


def test_every_state_without_tls_in_the_order_of_the_table():
    """Without TLS: dialer HEADER FEATURES AUTHENTICATING HEADER HELLO OPEN, acceptor HEADER NEGOTIATING ...; all legal moves."""
    seen_d, seen_a = states_seen(dialer(), acceptor())
    S = State
    assert seen_d == [S.HEADER, S.FEATURES, S.AUTHENTICATING, S.HEADER, S.HELLO, S.OPEN]
    assert seen_a == [S.HEADER, S.NEGOTIATING, S.AUTHENTICATING, S.HEADER, S.HELLO, S.OPEN]
    assert_legal(seen_d)
    assert_legal(seen_a)


def test_every_state_with_starttls_in_the_order_of_the_table():
    """With TLS offered: TLS_REQUESTED and STARTING_TLS, then a new stream; all legal moves."""
    seen_d, seen_a = states_seen(dialer(), acceptor(offer_tls=True))
    S = State
    assert seen_d == [S.HEADER, S.FEATURES, S.TLS_REQUESTED, S.STARTING_TLS, S.HEADER, S.FEATURES,
                      S.AUTHENTICATING, S.HEADER, S.HELLO, S.OPEN]
    assert seen_a == [S.HEADER, S.NEGOTIATING, S.STARTING_TLS, S.HEADER, S.NEGOTIATING,
                      S.AUTHENTICATING, S.HEADER, S.HELLO, S.OPEN]
    assert_legal(seen_d)
    assert_legal(seen_a)


def test_closing_moves_open_closing_closed_and_the_other_end_open_closed():
    """close(): the closer is CLOSING until the other end's </stream:stream>; the other goes OPEN -> CLOSED."""
    d, a = open_pair()
    d.close()
    assert d.state is State.CLOSING
    assert [type(e) for e in pump(d, a)] == [PeerClosed]
    assert a.state is State.CLOSED
    assert [type(e) for e in pump(a, d)] == [PeerClosed]
    assert d.state is State.CLOSED
    assert a.data_to_send() == b"" and d.data_to_send() == b""


def test_the_table_covers_every_state_for_both_roles():
    """_MOVES, and each role's handlers, have an entry for every state; CLOSED leads nowhere."""
    assert set(peer_stream._MOVES) == set(State)
    assert peer_stream._MOVES[State.CLOSED] == frozenset()
    for table in (peer_stream._DIALER, peer_stream._ACCEPTOR):
        assert set(table) == set(State)
        assert table[State.CLOSED] == {} and table[State.STARTING_TLS] == {}


def test_headers_name_the_component_namespace_and_the_peer_role():
    """The dialer's header: component namespace, to='jrouter-peer', from=its node, version 1.0."""
    d = dialer("a")
    header = d.data_to_send()
    assert header == (b"<?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' "
                      b"xmlns='%s' to='%s' from='a' version='1.0'>" % (NS_COMPONENT.encode(), PEER_ROLE.encode()))
    a = acceptor("b")
    a.receive_data(header)
    answer = a.data_to_send()
    assert b" to='a' from='jrouter-peer' version='1.0' id='sv" in answer
    assert b"<mechanism>DIGEST-MD5</mechanism>" in answer and b"starttls" not in answer


def test_an_event_out_of_turn_is_a_protocol_error():
    """An element a state has no use for (a <hello/> before SASL) ends the stream with bad-format."""
    d, a = dialer(), acceptor()
    pump(d, a)
    error = raise_from(a, b"<hello xmlns='urn:jrouter:peer:0' node='a' revision='1'/>")
    assert error.condition == "bad-format"
    assert stream_error(a.data_to_send())[0] == "bad-format"


def test_forward_before_the_link_is_open_is_the_callers_error():
    """forward/broadcast before OPEN (or after) raise PeerStateError, nothing queued."""
    d = dialer()
    d.data_to_send()
    with pytest.raises(PeerStateError):
        d.forward(ROUTE_250, "m", 1)
    with pytest.raises(PeerStateError):
        d.broadcast(ROUTE_250, 1)
    assert d.data_to_send() == b""


# -- authentication ---------------------------------------------------------------------------


def test_a_wrong_secret_gets_a_sasl_failure_then_a_stream_error():
    """Acceptor: <failure/>, then not-authorized and the close; the dialer gives up too."""
    d, a = dialer(secret="not the cluster secret"), acceptor()
    for _ in range(2):  # header, features -> <auth/>, challenge -> <response/>
        pump(d, a)
        pump(a, d)
    data = d.data_to_send()
    d.sent(len(data))
    with pytest.raises(PeerAuthFailed) as caught:
        a.receive_data(data)
    assert caught.value.condition == "not-authorized"
    answer = a.data_to_send()
    assert answer.startswith(b"<failure xmlns='%s'><not-authorized/>" % NS_SASL.encode())
    assert stream_error(answer)[0] == "not-authorized"
    assert answer.endswith(b"</stream:stream>")
    with pytest.raises(PeerAuthFailed):
        d.receive_data(answer)
    assert d.state is State.CLOSED and d.data_to_send().endswith(b"</stream:stream>")


def test_the_dialer_checks_the_acceptors_rspauth():
    """An acceptor that does not know the secret (a wrong rspauth) is refused: not-authorized."""
    d = dialer()
    d.data_to_send()
    d.receive_data(b"<stream:stream xmlns:stream='%s' xmlns='%s' from='jrouter-peer' version='1.0' id='x'>"
                   b"<stream:features><mechanisms xmlns='%s'><mechanism>DIGEST-MD5</mechanism></mechanisms>"
                   b"</stream:features>" % (STREAMS.encode(), NS_COMPONENT.encode(), NS_SASL.encode()))
    challenge = base64.b64encode(b'realm="jabberd-router", nonce="abc", qop="auth", charset=utf-8, '
                                 b'algorithm=md5-sess')
    d.receive_data(b"<challenge xmlns='%s'>%s</challenge>" % (NS_SASL.encode(), challenge))
    assert b"<response" in d.data_to_send()
    bogus = base64.b64encode(b"rspauth=00000000000000000000000000000000")
    with pytest.raises(PeerAuthFailed) as caught:
        d.receive_data(b"<success xmlns='%s'>%s</success>" % (NS_SASL.encode(), bogus))
    assert caught.value.condition == "not-authorized"
    assert stream_error(d.data_to_send())[0] == "not-authorized"


def test_a_mechanism_other_than_digest_md5_is_refused():
    """<auth mechanism='PLAIN'/>: invalid-mechanism failure, then the stream ends."""
    d, a = dialer(), acceptor()
    pump(d, a)
    a.data_to_send()
    with pytest.raises(PeerAuthFailed):
        a.receive_data(b"<auth xmlns='%s' mechanism='PLAIN'/>" % NS_SASL.encode())
    assert b"<invalid-mechanism" in a.data_to_send()


def test_the_acceptor_refuses_a_link_from_its_own_node_id():
    """A dialer authenticating with the acceptor's own node id: conflict, no <success/>."""
    d, a = dialer("b"), acceptor("b")
    with pytest.raises(PeerAuthFailed) as caught:
        converse(d, a)
    assert caught.value.condition == "conflict"
    assert a.state is State.CLOSED and a.peer_node is None


def test_the_acceptor_refuses_a_node_that_should_wait_to_be_dialled():
    """The lower node id dials: 'c' dialling 'b' is refused with conflict."""
    assert dials("a", "b") and not dials("c", "b")
    with pytest.raises(PeerAuthFailed) as caught:
        converse(dialer("c"), acceptor("b"))
    assert caught.value.condition == "conflict"
    assert "lower node id dials" in caught.value.text


def test_the_dialer_refuses_a_node_other_than_the_one_it_dialled():
    """expect_node='b' but node 'c' answers: host-unknown (a stale address)."""
    d, a = dialer("a", expect_node="b"), acceptor("c")
    with pytest.raises(PeerProtocolError) as caught:
        converse(d, a)
    assert caught.value.condition == "host-unknown"
    assert d.state is State.CLOSED


@pytest.mark.parametrize("header, condition", [
    (b"<stream:stream xmlns:stream='%s' xmlns='%s' version='1.0'>" % (STREAMS.encode(), NS_COMPONENT.encode()),
     "host-unknown"),
    (b"<stream:stream xmlns:stream='%s' xmlns='%s' to='sm' version='1.0'>" % (STREAMS.encode(), NS_COMPONENT.encode()),
     "host-unknown"),
    (b"<stream:stream xmlns:stream='%s' xmlns='jabber:component:accept' to='jrouter-peer'>" % STREAMS.encode(),
     "unsupported-version"),
    (b"<stream:stream xmlns:stream='%s' xmlns='jabber:component:accept' to='jrouter-peer' version='1.0'>"
     % STREAMS.encode(), "invalid-namespace"),
    (b"<stream:stream xmlns:stream='%s' xmlns:p='urn:x' xmlns='%s' to='jrouter-peer' version='1.0'>"
     % (STREAMS.encode(), NS_COMPONENT.encode()), "invalid-namespace"),
    (b"<stream xmlns='%s' to='jrouter-peer' version='1.0'>" % NS_COMPONENT.encode(), "bad-format"),
])
def test_a_header_for_another_role_or_namespace_is_refused(header, condition):
    """A component's header on the peer port (no or another 'to'), XEP-0114, extra prefixes, no stream: refused."""
    a = acceptor()
    error = raise_from(a, header)
    assert error.condition == condition
    assert stream_error(a.data_to_send())[0] == condition


def test_the_acceptor_keeps_elements_small_until_sasl_succeeds():
    """Before authentication an element over 16 KiB ends the stream with policy-violation."""
    d, a = dialer(), acceptor()
    pump(d, a)
    error = raise_from(a, b"<x>" + b"y" * 20000 + b"</x>")
    assert error.condition == "policy-violation"


# -- STARTTLS -----------------------------------------------------------------------------------


def test_starttls_is_signalled_and_nothing_is_read_until_the_shell_has_run_it():
    """<starttls/> -> <proceed/> queued, starting_tls; bytes before tls_started are the caller's error."""
    d, a = dialer(), acceptor(offer_tls=True)
    pump(d, a)
    pump(a, d)
    assert d.state is State.TLS_REQUESTED
    pump_raw = d.data_to_send()
    d.sent(len(pump_raw))
    assert pump_raw == b"<starttls xmlns='%s'/>" % NS_TLS.encode()
    a.receive_data(pump_raw)
    assert a.starting_tls and a.data_to_send() == b"<proceed xmlns='%s'/>" % NS_TLS.encode()
    with pytest.raises(PeerStateError):
        a.receive_data(b"<x/>")
    d.receive_data(b"<proceed xmlns='%s'/>" % NS_TLS.encode())
    assert d.starting_tls and d.data_to_send() == b""
    assert d.tls_started() == b"" and a.tls_started() == b""
    assert d.tls_active and a.tls_active
    converse(d, a)
    assert d.open and a.open


def test_bytes_in_the_clear_after_starttls_come_back_from_tls_started():
    """What follows <starttls/> in the same read is not parsed: tls_started returns it for the shell to refuse."""
    d, a = dialer(), acceptor(offer_tls=True)
    pump(d, a)
    pump(a, d)
    d.data_to_send()
    a.receive_data(b"<starttls xmlns='%s'/>\x16\x03\x01\x02\x00garbage" % NS_TLS.encode())
    assert a.starting_tls
    assert a.tls_started() == b"\x16\x03\x01\x02\x00garbage"


def test_required_tls_the_acceptor_refuses_sasl_in_the_clear():
    """require_tls: <starttls><required/> is offered; a dialer that skips it gets policy-violation."""
    d, a = dialer(use_tls=False), acceptor(offer_tls=True, require_tls=True)
    pump(d, a)
    features = a.data_to_send()
    a.sent(len(features))
    assert b"<starttls xmlns='%s'><required/></starttls>" % NS_TLS.encode() in features
    d.receive_data(features)
    with pytest.raises(PeerProtocolError) as caught:
        converse(d, a)
    assert caught.value.condition == "policy-violation"


def test_required_tls_the_dialer_refuses_a_node_without_it():
    """A dialer with require_tls refuses a node that does not offer STARTTLS: policy-violation."""
    d, a = dialer(require_tls=True), acceptor()
    with pytest.raises(PeerProtocolError) as caught:
        converse(d, a)
    assert caught.value.condition == "policy-violation"
    assert stream_error(d.data_to_send())[0] == "policy-violation"


def test_starttls_when_not_offered_ends_the_stream():
    """<starttls/> to an acceptor without a certificate: unsupported-feature."""
    d, a = dialer(), acceptor()
    pump(d, a)
    a.data_to_send()
    error = raise_from(a, b"<starttls xmlns='%s'/>" % NS_TLS.encode())
    assert error.condition == "unsupported-feature"


# -- packets ------------------------------------------------------------------------------------

ODD_ROUTES = [
    ROUTE_250,
    b"<route to='sm' from='c2s'/>",
    b"<route\n\tto = \"sm\"   from='c2s' ><message xmlns='jabber:client'>\n  <body>a &amp; b &#x263A; \xe2\x98\xba</body>"
    b"<!-- a comment --><![CDATA[<not/> markup]]></message ></route >",
    b"<route xmlns='http://jabberd.jabberstudio.org/ns/component/1.0' to='sm' from='c2s'><iq type='get'/></route>",
    b"<c:route xmlns:c='http://jabberd.jabberstudio.org/ns/component/1.0' to='sm' from='c2s'>"
    b"<c:message xmlns:c='jabber:client' c:x='1'><c:body>hi</c:body></c:message></c:route>",
    b"<route to='sm' from='c2s' xmlns:stream='http://etherx.jabber.org/streams'><stream:error/></route>",
    b"<route to='sm' from='c2s'><x:y xmlns:x='urn:x' xmlns='urn:default'><z a='&lt;&gt;&quot;&apos;'/></x:y></route>",
    b"<route error='404' type='broadcast' to='a' from='b'><presence xmlns='jabber:client'/></route>",
]


def component_element(raw):
    """The Element a local jabberd2 component's stream gives for raw."""
    reader = StreamReader()
    reader.feed(b"<stream:stream xmlns:stream='%s' xmlns='%s' version='1.0'>" % (STREAMS.encode(), NS_COMPONENT.encode()))
    (element,) = reader.feed(raw)
    return element


@pytest.mark.parametrize("raw", ODD_ROUTES)
def test_a_forwarded_route_arrives_byte_identical_and_read_as_a_components(raw):
    """The inner route's bytes are those sent; name, attrs, first child and context match a local component's."""
    d, a = open_pair()
    d.forward(raw, "sm-1", 1, tag="t")
    (event,) = pump(d, a)
    assert isinstance(event, Forwarded) and (event.member, event.hops) == ("sm-1", 1)
    route, local = event.route, component_element(raw)
    assert route.raw == raw
    assert route.name == ROUTE == local.name
    assert (route.attrs, route.child_name, route.child_attrs) == (local.attrs, local.child_name, local.child_attrs)
    assert route.first_child() == local.first_child()
    assert (route.context.default_ns, route.context.prefixes) == (local.context.default_ns, local.context.prefixes)
    assert route.tree().tag == "{%s}route" % NS_COMPONENT


def test_broadcasts_go_both_ways_in_order_with_forwards():
    """Forwards and broadcasts, both directions, arrive in the order queued."""
    d, a = open_pair()
    d.forward(ODD_ROUTES[1], "m1", 1)
    d.broadcast(ODD_ROUTES[7], 2)
    d.forward(ODD_ROUTES[3], "m2", 2)
    a.broadcast(ROUTE_250, 1)
    got = pump(d, a)
    assert [(type(e), e.route.raw) for e in got] == [
        (Forwarded, ODD_ROUTES[1]), (Broadcast, ODD_ROUTES[7]), (Forwarded, ODD_ROUTES[3])]
    assert [e.hops for e in got] == [1, 2, 2]
    (back,) = pump(a, d)
    assert isinstance(back, Broadcast) and back.route.raw == ROUTE_250


def test_session_notices_cross_with_their_sender_among_forwards_and_are_never_handed_back():
    """<s m='SENDER' .../>: routes to learn from, read as SessionNotice (its
    member is the sending node's member that sent it), in order with the
    rest; a lost link does not hand them back (they are not packets for a member)."""
    d, a = open_pair()
    d.forward(ODD_ROUTES[1], "m1", 1)
    d.session_notice(ROUTE_250, "sm-1")
    d.session_notice(ODD_ROUTES[3], "sm-1")
    d.forward(ODD_ROUTES[7], "m1", 1)
    data = d.data_to_send()
    assert b"<s xmlns='urn:jrouter:peer:0' h='1' m='sm-1' n='00002'/>" + ROUTE_250 + ODD_ROUTES[3] in data
    d.sent(len(data))
    got = a.receive_data(data)
    assert [(type(e), e.route.raw, e.member) for e in got] == [
        (Forwarded, ODD_ROUTES[1], "m1"), (SessionNotice, ROUTE_250, "sm-1"),
        (SessionNotice, ODD_ROUTES[3], "sm-1"), (Forwarded, ODD_ROUTES[7], "m1")]
    d.session_notice(ROUTE_250, "sm-2")
    # Nothing acknowledged yet: all five come back, the notices without a
    # member, so the router never takes one for a packet to place again.
    assert [u.member for u in d.take_unsent()] == ["m1", None, None, "m1", None]


def test_a_replace_request_names_the_member_to_end_and_one_without_it_breaks_the_link():
    """<r m='MEMBER'/>: the other node has a new connection of that member's
    instance (replace='half-open'); the member id survives markup."""
    d, a = open_pair()
    d.forward(ROUTE_250, "m1", 1)
    d.replace_member("s'm<1")
    got = pump(d, a)
    assert [type(e) for e in got] == [Forwarded, ReplaceMember] and got[1].member == "s'm<1"
    ack = a.data_to_send()
    assert ack == b"<a xmlns='urn:jrouter:peer:0' n='1'/>", "<r/> is no route: not counted"
    assert d.receive_data(ack) == [] and d.take_unsent() == []
    with pytest.raises(PeerProtocolError) as failed:
        a.receive_data(b"<r xmlns='urn:jrouter:peer:0'/>")
    assert failed.value.condition == "bad-format"


def test_an_affinity_notice_crosses_between_routes_and_is_no_route():
    """<t n k o m/>: traffic affinity's entry, between the routes of a run;
    not counted in <a/>, so it never comes back from take_unsent."""
    d, a = open_pair()
    d.forward(ROUTE_250, "m1", 1, tag=1)
    d.affinity_notice("gw.example", "u'<@gw.example", "c", "c.7")
    d.forward(ROUTE_250, "m1", 1, tag=2)
    got = pump(d, a)
    assert [type(e) for e in got] == [Forwarded, AffinityNotice, Forwarded]
    notice = got[1]
    assert (notice.name, notice.key, notice.node, notice.member) == ("gw.example", "u'<@gw.example", "c", "c.7")
    ack = a.data_to_send()
    assert ack == b"<a xmlns='urn:jrouter:peer:0' n='2'/>"
    assert [u.tag for u in d.take_unsent()] == [1, 2]
    d2, a2 = open_pair()
    d2.forward(ROUTE_250, "m1", 1, tag=1)
    d2.affinity_notice("gw.example", "u@gw.example", "c", "c.7")
    pump(d2, a2)
    assert d2.receive_data(a2.data_to_send()) == [] and d2.take_unsent() == []


@pytest.mark.parametrize("notice", [b"<t xmlns='urn:jrouter:peer:0' n='gw' k='u@gw' o='c'/>",
                                    b"<t xmlns='urn:jrouter:peer:0' k='u@gw' o='c' m='c.1'/>",
                                    b"<t xmlns='urn:jrouter:peer:0' n='gw' k='' o='c' m='c.1'/>"])
def test_an_affinity_notice_without_all_it_names_breaks_the_link(notice):
    _d, a = open_pair()
    with pytest.raises(PeerProtocolError) as failed:
        a.receive_data(notice)
    assert failed.value.condition == "bad-format"


def test_an_affinity_notice_needs_an_open_link_and_every_field():
    d = dialer()
    with pytest.raises(PeerStateError):
        d.affinity_notice("gw", "u@gw", "c", "c.1")
    d, _a = open_pair()
    with pytest.raises(ValueError):
        d.affinity_notice("gw", "", "c", "c.1")


def test_a_member_id_with_markup_characters_is_escaped_and_comes_back():
    """Member ids are attribute values: quotes, <, & survive the round trip."""
    d, a = open_pair()
    d.forward(ROUTE_250, "s'm\"<&>1", 1)
    (event,) = pump(d, a)
    assert event.member == "s'm\"<&>1"


def test_the_marker_is_the_documented_bytes():
    """<f xmlns='urn:jrouter:peer:0' h='H' m='M' n='N'/> then N routes; <b xmlns=... h='H' n='N'/> for broadcasts."""
    d, _a = open_pair()
    d.forward(b"<route/>", "sm-1", 2)
    d.broadcast(b"<route/>", 1)
    d.broadcast(b"<route n='2'/>", 1)
    assert d.data_to_send() == (b"<f xmlns='urn:jrouter:peer:0' h='2' m='sm-1' n='00001'/><route/>"
                                b"<b xmlns='urn:jrouter:peer:0' h='1' n='00002'/><route/><route n='2'/>")


def test_a_run_of_packets_for_one_member_shares_one_marker():
    """Consecutive forwards to the same member and hops get one marker; another member, hops, a broadcast,
    a keepalive or a write in between start a new one."""
    d, a = open_pair()
    for member, hops in [("m1", 1), ("m1", 1), ("m1", 1), ("m2", 1), ("m2", 2), ("m2", 2)]:
        d.forward(b"<route/>", member, hops)
    d.broadcast(b"<route/>", 1)
    d.ping()
    d.broadcast(b"<route/>", 1)
    data = d.data_to_send()
    assert [m.split(b"/>")[0] for m in data.split(b"<route/>") if m] == [
        b"<f xmlns='urn:jrouter:peer:0' h='1' m='m1' n='00003'", b"<f xmlns='urn:jrouter:peer:0' h='1' m='m2' n='00001'",
        b"<f xmlns='urn:jrouter:peer:0' h='2' m='m2' n='00002'", b"<b xmlns='urn:jrouter:peer:0' h='1' n='00001'",
        b" <b xmlns='urn:jrouter:peer:0' h='1' n='00001'"]
    d.forward(b"<route/>", "m2", 2)             # after data_to_send: a marker of its own
    second = d.data_to_send()
    assert second == b"<f xmlns='urn:jrouter:peer:0' h='2' m='m2' n='00001'/><route/>"
    assert d.buffered == len(data) + len(second), "the offsets count the bytes written"
    assert len(a.receive_data(data + second)) == 9


def test_a_run_stops_at_its_largest_count(monkeypatch):
    """A run never announces more than RUN_MAX routes (5 digits): the next route starts another."""
    monkeypatch.setattr(peer_stream, "RUN_MAX", 2)
    d, a = open_pair()
    for i in range(5):
        d.forward(b"<route n='%d'/>" % i, "m", 1)
    data = d.data_to_send()
    assert data.count(b"<f ") == 3 and data.count(b"n='00002'") == 2
    assert [e.route.raw for e in a.receive_data(data)] == [b"<route n='%d'/>" % i for i in range(5)]


def test_long_runs_are_read_whole_in_any_chunking():
    """A run of 1,500 routes (past the fast path's lookup table), read whole and 97 bytes at a time."""
    d, a = open_pair()
    raws = [b"<route n='%d'/>" % i for i in range(1500)]
    for raw in raws:
        d.forward(raw, "m", 1)
    d.broadcast(ROUTE_250, 1)
    got = pump(d, a, chunk=97)
    assert [e.route.raw for e in got] == raws + [ROUTE_250]
    assert isinstance(got[-1], Broadcast) and a.counters.packets_in == 1501


def test_hops_over_the_senders_limit_are_the_callers_error():
    """forward with hops 0 or above max_hops: ValueError, nothing queued."""
    d, _a = open_pair()
    for hops in (0, 3, -1):
        with pytest.raises(ValueError):
            d.forward(ROUTE_250, "m", hops)
    assert d.data_to_send() == b""


def test_a_packet_over_the_receivers_hop_limit_is_dropped_and_counted():
    """A sender allowing 3 hops, a receiver 2: the h='3' packet is dropped (drops += 1), the link goes on."""
    d, a = open_pair(dialer={"max_hops": 3}, acceptor={"max_hops": 2})
    d.forward(ODD_ROUTES[1], "m", 3)
    d.forward(ODD_ROUTES[2], "m", 3)
    d.forward(ODD_ROUTES[3], "m", 2)
    d.broadcast(ODD_ROUTES[1], 3)
    d.broadcast(ODD_ROUTES[7], 1)
    got = pump(d, a, chunk=7)
    assert [e.route.raw for e in got] == [ODD_ROUTES[3], ODD_ROUTES[7]]
    assert a.counters.drops == 3 and a.counters.packets_in == 2 and a.open


@pytest.mark.parametrize("garbage, condition", [
    (b"<f xmlns='urn:jrouter:peer:0' h='1' n='1'/><route/>", "bad-format"),        # no member
    (b"<f xmlns='urn:jrouter:peer:0' h='1' m='' n='1'/><route/>", "bad-format"),   # empty member
    (b"<f xmlns='urn:jrouter:peer:0' h='0' m='x' n='1'/><route/>", "bad-format"),  # hops 0
    (b"<f xmlns='urn:jrouter:peer:0' h='two' m='x' n='1'/><route/>", "bad-format"),  # not a number
    (b"<b xmlns='urn:jrouter:peer:0' n='1'/><route/>", "bad-format"),              # no hops
    (b"<f xmlns='urn:jrouter:peer:0' h='1' m='x'/><route/>", "bad-format"),        # no count
    (b"<f xmlns='urn:jrouter:peer:0' h='1' m='x' n='0'/><route/>", "bad-format"),  # count 0
    (b"<b xmlns='urn:jrouter:peer:0' h='1' n='100000'/><route/>", "bad-format"),   # count over RUN_MAX
    (b"<f xmlns='urn:jrouter:peer:0' h='1' m='x' n='1'/><message/>", "bad-format"),  # not a route after it
    (b"<f xmlns='urn:jrouter:peer:0' h='1' m='x' n='2'/><route/>"
     b"<f xmlns='urn:jrouter:peer:0' h='1' m='x' n='1'/>", "bad-format"),          # a marker inside a run
    (b"<route to='a' from='b'/>", "unsupported-stanza-type"),                      # no marker
    (b"<ack xmlns='urn:jrouter:peer:0' n='1'/>", "unsupported-stanza-type"),       # unknown element
    (b"<hello xmlns='urn:jrouter:peer:0' node='a' revision='1'/>", "unsupported-stanza-type"),
    (b"<f xmlns='urn:jrouter:peer:0' h='1' m='x' n='1'/><route></rout>", "xml-not-well-formed"),
])
def test_garbage_on_an_open_link_is_a_stream_error(garbage, condition):
    """Malformed markers, a route without its marker, unknown elements, bad XML: the link ends with a stream error."""
    d, a = open_pair()
    error = raise_from(a, garbage)
    assert error.condition == condition
    assert stream_error(a.data_to_send())[0] == condition


def test_packets_before_garbage_are_handed_over_with_the_error():
    """The error carries the packets completed before it (the shell delivers them first)."""
    d, a = open_pair()
    d.forward(ROUTE_250, "m", 1)
    data = d.data_to_send()
    error = raise_from(a, data + b"<junk/>")
    assert [e.route.raw for e in error.events] == [ROUTE_250]


def test_an_element_limit_after_sasl_applies_to_routes():
    """max_element_size bounds a route once open (policy-violation)."""
    d, a = open_pair(acceptor={"max_element_size": 1000})
    d.forward(b"<route>" + b"x" * 2000 + b"</route>", "m", 1)
    with pytest.raises(PeerProtocolError) as caught:
        pump(d, a)
    assert caught.value.condition == "policy-violation"


# -- keepalive, closing, unsent packets ---------------------------------------------------------


def test_the_keepalive_is_one_space_and_means_nothing_to_the_other_end():
    """ping() on an open link queues b' '; the receiver stays open with no event; before OPEN it queues nothing."""
    d = dialer()
    d.data_to_send()
    d.ping()
    assert d.data_to_send() == b""
    d, a = open_pair()
    for _ in range(3):
        d.ping()
    assert d.data_to_send() == b"   "
    assert a.receive_data(b"   ") == [] and a.open
    d.forward(ROUTE_250, "m", 1)
    assert [e.route.raw for e in a.receive_data(b" \n\t" + d.data_to_send())] == [ROUTE_250]


def test_a_closing_end_still_receives_packets_until_the_other_close():
    """After close(), packets the other end sent before it saw our close still arrive; forward is refused."""
    d, a = open_pair()
    a.forward(ROUTE_250, "m", 1)
    d.close()
    with pytest.raises(PeerStateError):
        d.forward(ROUTE_250, "m", 1)
    got = pump(a, d)
    assert [type(e) for e in got] == [Forwarded]
    pump(d, a)
    assert [type(e) for e in pump(a, d)] == [PeerClosed] and d.state is State.CLOSED


def test_the_other_ends_stream_error_closes_without_a_word():
    """<stream:error/> from the other node: PeerClosed(condition, text), CLOSED, nothing queued."""
    d, a = open_pair()
    (event,) = a.receive_data(b"<stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
                              b"<text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>replaced</text></stream:error>")
    assert (event.condition, event.text) == ("conflict", "replaced")
    assert a.state is State.CLOSED and a.data_to_send() == b""


def test_a_stream_error_during_negotiation_closes_quietly_too():
    """The acceptor's stream error while the dialer waits for features: PeerClosed, no error raised."""
    d, a = dialer(), acceptor()
    pump(d, a)
    a.data_to_send()
    (event,) = d.receive_data(b"<stream:stream xmlns:stream='%s' xmlns='%s' version='1.0'>"
                              b"<stream:error><host-unknown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
                              b"</stream:error>" % (STREAMS.encode(), NS_COMPONENT.encode()))
    assert isinstance(event, PeerClosed) and event.condition == "host-unknown"
    assert d.state is State.CLOSED


def test_take_unsent_returns_every_packet_the_other_node_has_not_said_it_read_with_tags():
    """Four packets written in full, the other node reads only the first two (it says so with <a n='2'/>):
    the third and fourth come back, in order, with their tags, though the socket took them."""
    d, a = open_pair()
    d.forward(b"<route n='0'/>", "m3", 2, tag=0)
    d.forward(b"<route n='1'/>", "m3", 2, tag=1)
    d.broadcast(b"<route n='2'/>", 1, tag=2)
    d.forward(b"<route n='3'/>", "m3", 2, tag=3)
    data = d.data_to_send()
    d.sent(len(data))
    cut = data.index(b"<b xmlns=")
    assert len(a.receive_data(data[:cut])) == 2
    assert a.data_to_send() == b"<a xmlns='urn:jrouter:peer:0' n='2'/>"
    assert d.receive_data(b"<a xmlns='urn:jrouter:peer:0' n='2'/>") == []
    assert d.buffered == 0 and d.unread == len(data) - cut
    assert d.take_unsent() == [Unsent(b"<route n='2'/>", None, 1, 2, 3), Unsent(b"<route n='3'/>", "m3", 2, 3, 4)]
    assert d.state is State.CLOSED and d.data_to_send() == b""


def test_nothing_is_unsent_once_the_other_node_said_it_read_everything():
    """Every packet read and acknowledged (one <a/> per read, the running count): take_unsent is empty."""
    d, a = open_pair()
    for i in range(100):
        d.forward(ROUTE_250, "m", 1, tag=i)
    converse(d, a, chunk=1000)
    assert d.buffered == 0 and d.unread == 0 and d.take_unsent() == []


def test_a_written_packet_not_yet_acknowledged_is_unsent():
    """The socket took it, the other node never said it read it (it died): it comes back."""
    d, _a = open_pair()
    d.forward(ROUTE_250, "m", 1, tag="w")
    d.sent(len(d.data_to_send()))
    assert d.buffered == 0 and [u.tag for u in d.take_unsent()] == ["w"]


@pytest.mark.parametrize("ack", [b"<a xmlns='urn:jrouter:peer:0' n='2'/>", b"<a xmlns='urn:jrouter:peer:0'/>",
                                 b"<a xmlns='urn:jrouter:peer:0' n='-1'/>"])
def test_an_acknowledgement_of_more_than_was_sent_or_without_a_count_breaks_the_link(ack):
    d, _a = open_pair()
    d.forward(ROUTE_250, "m", 1)
    error = raise_from(d, ack)
    assert error.condition == "bad-format"


def test_queued_and_not_handed_over_counts_as_unsent():
    """Packets still in the buffer (data_to_send not called) come back too."""
    d, _a = open_pair()
    d.forward(ROUTE_250, "m", 1, tag="x")
    assert [u.tag for u in d.take_unsent()] == ["x"]


# -- every chunking -------------------------------------------------------------------------------


def record(offer_tls=False):
    """(dialer's bytes, acceptor's bytes): the whole of each direction, from a live run."""
    d, a = dialer(), acceptor(offer_tls=offer_tls)
    sent_d, sent_a = [], []

    def exchange():
        for _ in range(12):
            for src, dst, log in ((d, a, sent_d), (a, d, sent_a)):
                data = src.data_to_send()
                src.sent(len(data))
                log.append(data)
                piece = data
                while piece:
                    dst.receive_data(piece)
                    piece = dst.tls_started() if dst.starting_tls else b""
                if src.starting_tls:
                    src.tls_started()

    exchange()
    for i, raw in enumerate(ODD_ROUTES):
        d.forward(raw, f"m{i}", 1 + i % 2)
        a.forward(raw, f"n{i}", 1)
    d.broadcast(ROUTE_250, 1)
    d.close()
    exchange()
    assert d.state is a.state is State.CLOSED
    return b"".join(sent_d), b"".join(sent_a)


def replay(make, data, cuts):
    """Feed data to a fresh end in pieces cut at `cuts`; returns (its events as tuples, its output)."""
    stream = make()
    out = [stream.data_to_send()]
    events = []
    bounds = [0] + sorted(set(c for c in cuts if 0 < c < len(data))) + [len(data)]
    for start, end in zip(bounds, bounds[1:]):
        piece = data[start:end]
        while piece:
            events += stream.receive_data(piece)
            piece = b""
            if stream.starting_tls:
                out.append(stream.data_to_send())
                piece = stream.tls_started()
        out.append(stream.data_to_send())
    # One <a n/> per read that brought routes while the stream is open: how
    # many there are depends on the cuts (their counts are tested elsewhere).
    output = re.sub(rb"<a xmlns='urn:jrouter:peer:0' n='\d+'/>", b"", b"".join(out))
    return [_describe(e) for e in events], output, stream.state


def _describe(event):
    if isinstance(event, (Forwarded, Broadcast)):
        return (type(event).__name__, event.route.raw, getattr(event, "member", None), event.hops)
    if isinstance(event, PeerReady):
        return ("ready", event.node, event.revision)
    return ("closed", event.condition)


@pytest.mark.parametrize("offer_tls", [False, True])
def test_the_acceptor_reads_the_dialers_stream_cut_at_every_offset(offer_tls):
    """The dialer's whole stream (negotiation, packets, close) cut once at every byte: same events, same answers."""
    to_acceptor, _ = record(offer_tls)
    make = lambda: acceptor(offer_tls=offer_tls)
    whole = replay(make, to_acceptor, [])
    assert [e[0] for e in whole[0]].count("Forwarded") == len(ODD_ROUTES)
    assert whole[2] is State.CLOSED
    for cut in range(1, len(to_acceptor)):
        assert replay(make, to_acceptor, [cut]) == whole, cut


@pytest.mark.parametrize("offer_tls", [False, True])
def test_the_dialer_reads_the_acceptors_stream_cut_at_every_offset(offer_tls):
    """The acceptor's whole stream cut once at every byte: the dialer's events and answers do not change."""
    _, to_dialer = record(offer_tls)
    whole = replay(dialer, to_dialer, [])
    assert ("ready", "b", 0) in whole[0]
    for cut in range(1, len(to_dialer)):
        assert replay(dialer, to_dialer, [cut]) == whole, cut


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=4000), max_size=40), st.booleans())
def test_any_chunking_of_either_direction_gives_the_same_events(cuts, offer_tls):
    """Hypothesis: any set of cuts, either direction, with or without TLS: the same events and output."""
    to_acceptor, to_dialer = record(offer_tls)
    make = lambda: acceptor(offer_tls=offer_tls)
    assert replay(make, to_acceptor, cuts) == replay(make, to_acceptor, [])
    assert replay(dialer, to_dialer, cuts) == replay(dialer, to_dialer, [])


@pytest.mark.parametrize("chunk", [None, 7])
def test_routes_wrapped_as_sent_get_an_x_marker_and_arrive_flagged(chunk):
    """A route wrapped from an XEP-0114 stanza that declared nothing goes behind <x/>, its own run;
    the receiver flags those routes (and only those) as_sent, in any chunking."""
    d, a = open_pair()
    d.forward(b"<route/>", "m1", 1)
    d.forward(b"<route/>", "m1", 1, as_sent=True)
    d.forward(b"<route/>", "m1", 1, as_sent=True)
    d.forward(b"<route/>", "m1", 1)
    data = d.data_to_send()
    assert data.count(b"<x xmlns='urn:jrouter:peer:0' h='1' m='m1' n='00002'/>") == 1
    assert data.count(b"<f xmlns=") == 2
    if chunk is None:
        events = a.receive_data(data)
    else:
        events = [e for i in range(0, len(data), chunk) for e in a.receive_data(data[i:i + chunk])]
    assert [(type(e).__name__, e.member, e.as_sent) for e in events] == [
        ("Forwarded", "m1", False), ("Forwarded", "m1", True), ("Forwarded", "m1", True),
        ("Forwarded", "m1", False)]
