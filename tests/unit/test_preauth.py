"""Limits before authentication (protocol §3.10), on the in-memory router.

Most tests use the defaults (30 s, 16384 bytes, 64 connections, 3 failures
per connection, 10 per address in 60 s blocking it for 300 s), so they run
unchanged against a router without these limits and fail there.
"""

import hashlib

from jrouter.wire.xmlstream import StreamClose, StreamOpen

from .harness import NS_ACCEPT, NS_SASL, STREAMS, Network, header, stream_events

BLOCK_LINE = ("[127.0.0.1] too many failed authentications (10 in 60 s), "
              "refusing connections for 300 s")


def stream_error(events):
    """The condition and text of the stream error among ``events``, else None."""
    errors = [e for e in events if not isinstance(e, (StreamOpen, StreamClose))
              and e.tag == "{%s}error" % STREAMS]
    if not errors:
        return None
    (error,) = errors
    return error[0].tag.rpartition("}")[2], [c.text for c in error[1:]]


def opened(net):
    """A peer whose stream is open, negotiating (its features taken)."""
    peer = net.peer()
    peer.client.open()
    peer.converse()
    return peer


def wrong_password(peer):
    """One failed SASL exchange; every event that came back."""
    peer.client.authenticate("jabberd", "wrong", cnonce="0123456789abcdef")
    return stream_events(peer.converse())


def failures(events):
    return [e for e in events if getattr(e, "tag", None) == "{%s}failure" % NS_SASL]


def bad_handshake(net):
    peer = net.peer()
    peer.send(header(NS_ACCEPT, version=False, to="legacy.example.com"))
    peer.take()
    peer.send(f"<handshake>{'0' * 40}</handshake>")
    return peer


# -- the deadline ------------------------------------------------------------------

def test_a_connection_not_authenticated_in_30_s_gets_connection_timeout():
    """expire() ends a connection still unauthenticated 30 s after it arrived."""
    net = Network()
    component = net.component("sm")
    silent, negotiating = net.peer(), opened(net)
    net.router.expire(29.5)
    assert silent.raw() == b"" and negotiating.raw() == b""
    net.router.expire(30.0)
    for peer in (silent, negotiating):
        assert stream_error(peer.take()) == ("connection-timeout", ["not authenticated within 30 s"])
        assert peer.connection.closing
    assert not component.connection.closing and component.raw() == b""
    assert len(net.logged("not authenticated within 30 s, closing")) == 2


def test_the_deadline_counts_from_each_connections_own_arrival():
    """A peer that arrived at 20 s is still given until 50 s."""
    net = Network()
    net.now = 20.0
    late = net.peer()
    net.router.expire(49.0)
    assert not late.connection.closing
    net.router.expire(50.0)
    assert late.connection.closing


def test_authtimeout_zero_means_no_deadline():
    """With <authtimeout>0</authtimeout> an unauthenticated peer may wait forever."""
    from jrouter.routing.guard import AuthLimits

    net = Network(auth_limits=AuthLimits(timeout=0))
    silent = net.peer()
    net.router.expire(10_000.0)
    assert not silent.connection.closing


# -- element size ------------------------------------------------------------------

def test_elements_are_held_to_16384_bytes_until_sasl_then_to_stanzasize():
    """Before SASL a 17 kB element ends the stream; after it a 100 kB route is routed."""
    net = Network()
    peer = opened(net)
    peer.send(f"<junk>{'x' * 17000}</junk>")
    assert stream_error(peer.take()) == ("policy-violation", ["stanza too large (limit 16384 bytes)"])
    assert peer.closed
    sm, c2s = net.component("sm"), net.component("c2s")
    sm.take()
    body = "x" * 100_000
    c2s.send(f"<route to='sm' from='c2s'><message><body>{body}</body></message></route>")
    assert not c2s.closed
    (route,) = sm.stanzas()
    assert route[0][0].text == body


def test_a_big_route_pipelined_behind_the_sasl_response_is_read_with_stanzasize():
    """Bytes sent in one write with the winning <response/> belong to the authenticated stream."""
    net = Network()
    peer = opened(net)
    peer.client.authenticate("jabberd", "secret", cnonce="0123456789abcdef")
    peer.send(peer.client.data_to_send())             # <auth/>
    peer.client.receive(peer.raw())                   # the challenge: the response is queued
    big = f"<route to='nowhere' from='sm'><message><body>{'x' * 20000}</body></message></route>"
    peer.send(peer.client.data_to_send() + header() + big.encode())
    assert not peer.closed and peer.connection.authenticated
    assert net.logged("authenticated as jabberd@")


def test_elements_are_held_to_16384_bytes_until_the_handshake_then_to_stanzasize():
    """Before the XEP-0114 handshake a 17 kB element ends the stream; after it a 100 kB stanza is routed."""
    net = Network()
    early = net.peer()
    early.send(header(NS_ACCEPT, version=False, to="legacy.example.com"))
    early.send(f"<message>{'x' * 17000}</message>")
    assert stream_error(early.take()) == ("policy-violation", ["stanza too large (limit 16384 bytes)"])
    sm = net.component("sm")
    legacy = net.legacy("legacy.example.com")
    sm.take()
    body = "x" * 100_000
    legacy.send(f"<message to='u@sm' from='x@legacy.example.com'><body>{body}</body></message>")
    assert not legacy.closed
    assert [r[0][0].text for r in sm.stanzas() if r.tag.endswith("route")] == [body]


def test_authstanzasize_never_exceeds_stanzasize():
    """A pre-authentication limit larger than <stanzasize> is held to <stanzasize>."""
    from jrouter.routing.guard import AuthLimits

    net = Network(auth_limits=AuthLimits(stanza_size=50_000), stanza_size_limit=1000)
    peer = opened(net)
    peer.send(f"<junk>{'x' * 1200}</junk>")
    assert stream_error(peer.take()) == ("policy-violation", ["stanza too large (limit 1000 bytes)"])


# -- the cap on unauthenticated connections ---------------------------------------

def test_at_64_unauthenticated_the_oldest_silent_one_makes_room():
    """The 65th unauthenticated connection closes the oldest silent one (resource-constraint)."""
    net = Network()
    component = net.component("sm")
    silent = [net.peer() for _ in range(64)]
    assert not any(p.connection.closing for p in silent)
    newcomer = net.peer()
    assert silent[0].connection.closing and not newcomer.connection.closing
    assert stream_error(silent[0].take()) == ("resource-constraint",
                                              ["too many unauthenticated connections"])
    assert not any(p.connection.closing for p in silent[1:])
    assert not component.connection.closing
    assert net.logged(f"port={silent[0].connection.port}] closed to make room: "
                      "64 unauthenticated connections already (io.limits.unauthenticated)")


def test_a_negotiating_component_outlasts_a_flood_of_silent_connections():
    """Silent connections go before one that has opened its stream, so it authenticates and binds."""
    net = Network()
    first = [net.peer() for _ in range(64)]
    real = opened(net)                   # the 65th: the first silent one goes
    flood = [net.peer() for _ in range(200)]
    assert not real.connection.closing
    open_unauthenticated = [p for p in first + flood + [real]
                            if not p.connection.closing and not p.connection.authenticated]
    assert len(open_unauthenticated) == 64
    real.authenticate(opened=True)
    real.bind("sm")
    (reply,) = real.stanzas()
    assert reply.tag.endswith("}bind") and reply.get("error") is None and "sm" in real.connection.names


def test_when_all_are_negotiating_the_oldest_goes():
    """Among connections that all opened a stream, the oldest makes room."""
    from jrouter.routing.guard import AuthLimits

    net = Network(auth_limits=AuthLimits(unauthenticated=2))
    a, b = opened(net), opened(net)
    c = opened(net)
    assert a.connection.closing and not b.connection.closing and not c.connection.closing


def test_max_fds_room_is_taken_from_unauthenticated_connections_only():
    """At io.max_fds an unauthenticated connection makes room; with none, the newcomer is refused."""
    net = Network()
    component = net.component("sm")
    silent = net.peer()
    guard = net.router.guard
    assert guard.make_room(net.router.connections, 2) is True
    assert silent.connection.closing and not component.connection.closing
    assert net.logged("closed to make room: 2 connections already (io.max_fds)")
    assert guard.make_room(net.router.connections, 2) is False


# -- failed authentications --------------------------------------------------------

def test_the_third_failed_sasl_exchange_on_one_connection_ends_the_stream():
    """Two failures leave the stream open; the third is answered, then policy-violation."""
    net = Network()
    peer = opened(net)
    for _ in range(2):
        assert len(failures(wrong_password(peer))) == 1 and not peer.closed
    events = wrong_password(peer)
    assert len(failures(events)) == 1
    assert stream_error(events) == ("policy-violation", ["too many failed authentications"])
    assert peer.closed
    assert net.logged("too many failed authentications on one connection (3), closing")


def test_ten_failures_from_one_address_block_it_with_one_log_line():
    """The 10th failure within 60 s logs the fail2ban line; the address is refused for 300 s."""
    net = Network()
    guard = net.router.guard
    peers = [opened(net) for _ in range(4)]
    for peer in peers[:3]:
        for _ in range(3):
            wrong_password(peer)
    assert not guard.refuses("127.0.0.1", net.now) and not net.logged("refusing connections")
    events = wrong_password(peers[3])    # the 10th: it ends its connection at once
    assert stream_error(events) == ("policy-violation", ["too many failed authentications"])
    assert net.logged(BLOCK_LINE) == [BLOCK_LINE]
    assert guard.refuses("127.0.0.1", 299.0) and not guard.refuses("10.0.0.1", 299.0)
    assert not guard.refuses("127.0.0.1", 300.0)


def test_failed_handshakes_count_against_the_address():
    """Ten wrong XEP-0114 handshakes block the address as failed SASL does."""
    net = Network()
    for _ in range(10):
        assert bad_handshake(net).closed
    assert net.logged(BLOCK_LINE) == [BLOCK_LINE]
    assert net.router.guard.refuses("127.0.0.1", 1.0)


def test_failures_older_than_the_window_are_forgotten():
    """Nine failures, 60 s pass, nine more: no block (the window reset)."""
    net = Network()
    for round_start in (0.0, 60.0):
        net.now = round_start
        for _ in range(9):
            bad_handshake(net)
    assert not net.router.guard.refuses("127.0.0.1", 61.0) and not net.logged("refusing")


def test_a_blocked_address_loses_its_other_connections_at_their_next_failure():
    """Once the address is blocked, one more failure on an open connection ends it."""
    net = Network()
    waiting = opened(net)
    for _ in range(10):
        bad_handshake(net)
    events = wrong_password(waiting)
    assert stream_error(events) == ("policy-violation", ["too many failed authentications"])


def test_an_authenticated_component_is_not_touched_by_its_address_being_blocked():
    """A component online before its address is blocked keeps routing."""
    net = Network()
    sm, c2s = net.component("sm"), net.component("c2s")
    sm.take()
    for _ in range(10):
        bad_handshake(net)
    assert net.router.guard.refuses("127.0.0.1", 1.0)
    net.router.expire(100.0)
    c2s.send("<route to='sm' from='c2s'><message id='still'/></route>")
    (route,) = sm.stanzas()
    assert route[0].get("id") == "still"


def test_a_good_handshake_after_nine_failures_works_and_the_tenth_failure_blocks():
    """Nine failures, then the right secret: authenticated; one more failure blocks the address."""
    net = Network()
    for _ in range(9):
        bad_handshake(net)
    legacy = net.peer()
    legacy.send(header(NS_ACCEPT, version=False, to="legacy.example.com"))
    legacy.take()
    digest = hashlib.sha1((legacy.stream_id + "secret").encode()).hexdigest()
    legacy.send(f"<handshake>{digest}</handshake>")
    assert legacy.connection.authenticated and not net.logged("refusing")
    bad_handshake(net)
    assert net.logged(BLOCK_LINE) == [BLOCK_LINE]
