"""The router without sockets: the 25 key behaviours, transcript by transcript.

``test_N_...`` checks key behaviour N of protocol §9 (docs/jabberd2-router.md),
which also names the section describing it; tests without a number check
behaviour beyond that list.
"""

import base64
import re

import pytest

from lxml import etree

from jrouter.wire.xmlstream import StreamClose, StreamOpen

from .harness import NS_ACCEPT, NS_C, NS_SASL, STREAMS, Network, header, same

STREAM_ERRORS = "urn:ietf:params:xml:ns:xmpp-streams"


@pytest.fixture
def net():
    return Network()


def stream_error_condition(events):
    (error,) = [e for e in events if not isinstance(e, (StreamOpen, StreamClose))
                and e.tag == "{%s}error" % STREAMS]
    return error[0].tag.rpartition("}")[2], [c.text for c in error[1:]]


# -- 1-4: the stream layer ---------------------------------------------------------

def test_1_header_is_echoed_without_version_or_features(net):
    """A header without version gets ours, to/from swapped, a 40-char id, no features."""
    peer = net.peer()
    peer.send(f"<stream:stream xmlns='{NS_C}' xmlns:stream='{STREAMS}' to='foo' from='bar'>")
    data = peer.raw()
    assert re.fullmatch(
        rb"<\?xml version='1.0'\?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' "
        rb"xmlns='http://jabberd.jabberstudio.org/ns/component/1.0' to='bar' from='foo' "
        rb"id='[0-9a-z]{40}'>", data)


def test_2_version_gets_features_with_digest_md5_only(net):
    """With version='1.0' the features offer exactly DIGEST-MD5 (no TLS configured)."""
    peer = net.peer()
    peer.send(header())
    opened, features = peer.take()
    assert opened.attrs["version"] == "1.0"
    assert same(features, f"<stream:features xmlns:stream='{STREAMS}'><mechanisms "
                          f"xmlns='{NS_SASL}'><mechanism>DIGEST-MD5</mechanism></mechanisms>"
                          "</stream:features>")


def test_2_tls_is_offered_first_when_configured(net):
    """With a pemfile loaded, <starttls/> precedes the mechanisms."""
    net.router.tls_available = True
    peer = net.peer()
    peer.send(header())
    _, features = peer.take()
    assert [c.tag for c in features] == ["{urn:ietf:params:xml:ns:xmpp-tls}starttls",
                                         "{%s}mechanisms" % NS_SASL]


@pytest.mark.parametrize("opening, condition", [
    ("<foo xmlns='bar'>", "bad-format"),
    (f"<stream:stream xmlns:stream='{STREAMS}' xmlns='{NS_C}' version='2.0'>", "unsupported-version"),
])
def test_3_bad_header_gets_a_minimal_header_and_a_stream_error(net, opening, condition):
    """A wrong root or version: minimal header, stream error, close."""
    peer = net.peer()
    peer.send(opening)
    data = peer.raw()
    assert data.startswith(f"<stream:stream xmlns:stream='{STREAMS}' version='1.0'><stream:error".encode())
    assert f"<{condition} xmlns='{STREAM_ERRORS}'/>".encode() in data
    assert data.endswith(b"</stream:stream>") and peer.closed


def test_4_malformed_xml_ends_the_stream_with_expats_text(net):
    """Not well-formed input: xml-not-well-formed with text, close, and a log line."""
    peer = net.peer()
    peer.send(header())
    peer.take()
    peer.send("<bind name='x'></foo>")
    events = peer.take()
    assert stream_error_condition(events) == ("xml-not-well-formed", ["mismatched tag"])
    assert isinstance(events[-1], StreamClose) and peer.closed
    assert net.logged("error: XML parse error (mismatched tag)")


# -- 5-7: SASL ---------------------------------------------------------------------

def test_5_sasl_success_restarts_with_new_id_and_empty_features(net):
    """DIGEST-MD5 succeeds; the new stream has a new id and empty features."""
    peer = net.peer()
    peer.send(header())
    first_id = peer.take()[0].attrs["id"]
    events = peer.authenticate(opened=True)
    opened, features = events
    assert opened.attrs["id"] != first_id
    assert len(features) == 0
    assert net.logged("authenticated as jabberd@")


def test_5_challenge_has_jabberd2_directives(net):
    """The challenge carries realm, qop, charset and algorithm as jabberd2's."""
    peer = net.peer()
    peer.send(header())
    peer.take()
    peer.send(f"<auth xmlns='{NS_SASL}' mechanism='DIGEST-MD5'/>")
    (challenge,) = peer.stanzas()
    decoded = base64.b64decode(challenge.text).decode()
    for directive in ('realm="jabberd-router"', 'qop="auth"', "charset=utf-8", "algorithm=md5-sess"):
        assert directive in decoded


@pytest.mark.parametrize("script, condition", [
    ([f"<auth xmlns='{NS_SASL}' mechanism='PLAIN'>AGEAYg==</auth>"], "invalid-mechanism"),
    ([f"<auth xmlns='{NS_SASL}' mechanism='DIGEST-MD5'/>", f"<abort xmlns='{NS_SASL}'/>"], "aborted"),
])
def test_6_sasl_failures_keep_the_stream_open(net, script, condition):
    """Refused SASL answers <failure> with the condition; the stream stays."""
    peer = net.peer()
    peer.send(header())
    peer.take()
    for line in script:
        peer.send(line)
    failure = peer.stanzas()[-1]
    assert failure.tag == "{%s}failure" % NS_SASL
    assert failure[0].tag == "{%s}%s" % (NS_SASL, condition)
    assert not peer.closed


def test_6_wrong_password_is_not_authorized_and_a_retry_works(net):
    """A wrong password fails with not-authorized; the right one then succeeds."""
    peer = net.peer()
    with pytest.raises(AssertionError):
        peer.authenticate("jabberd", "wrong")
    peer2 = net.peer()
    peer2.authenticate("jabberd", "secret")
    assert net.logged("authenticated as")


def test_7_packets_before_authentication_are_dropped(net):
    """<bind/> before SASL gets no answer at all."""
    peer = net.peer()
    peer.send(header())
    peer.take()
    peer.send("<bind name='x'/>")
    assert peer.raw() == b"" and not peer.closed


# -- 8-10: bind ----------------------------------------------------------------------

def test_8_bind_ok_strips_the_name(net):
    """<bind name='sm'/> is answered with <bind/>; multi is kept."""
    peer = net.component()
    peer.bind("sm")
    assert same(peer.stanzas()[0], "<bind/>")
    peer.bind("example.com", multi="to")
    assert same(peer.stanzas()[0], "<bind multi='to'/>")
    assert net.logged("[sm] online (bound to 127.0.0.1, port")


@pytest.mark.parametrize("request_, reply", [
    ("<bind/>", "<bind error='400'/>"),
    ("<bind name='@bad'/>", "<bind error='400' name='@bad'/>"),
    ("<bind name='SM'/>", "<bind error='409'/>"),
    ("<bind name='lalias.example.com'/>", "<bind error='409'/>"),
])
def test_9_bind_errors(net, request_, reply):
    """Missing/invalid names are 400, taken (case-folded) or aliased names 409."""
    net.component("sm")
    peer = net.component()
    peer.send(request_)
    assert same(peer.stanzas()[0], reply)


def test_9_bind_of_another_name_needs_the_acl(net):
    """A user not in the bind/all ACL may bind only its own name."""
    logger = net.component(user="logger", password="pwl")
    logger.bind("other")
    assert same(logger.stanzas()[0], "<bind error='403'/>")
    logger.bind("logger")
    assert same(logger.stanzas()[0], "<bind/>")


def test_10_one_default_route(net):
    """<default/> is granted once; a second one is 409 with <default/> kept."""
    first = net.component()
    first.bind("s2s", default=True)
    assert same(first.stanzas()[0], "<bind><default/></bind>")
    second = net.component()
    second.bind("s2s-b", default=True)
    assert same(second.stanzas()[0], "<bind error='409'><default/></bind>")


def test_10_default_and_log_checks_both_precede_the_commit(net):
    """A refused <log/> leaves no stale default route (jabberd2 bug fixed)."""
    net2 = Network(acls={"default-route": frozenset({"jabberd"})})
    peer = net2.component()
    peer.bind("jabberd", default=True, log=True)
    assert same(peer.stanzas()[0], "<bind error='403'><default/><log/></bind>")
    assert net2.router.table.default_name is None


# -- 11-12: advertisements -------------------------------------------------------------

def test_11_binds_are_advertised_both_ways(net):
    """A binder hears about existing names; others hear about the binder."""
    sm = net.component("sm")
    c2s = net.component()
    c2s.bind("c2s")
    bind, presence = c2s.stanzas()
    assert same(bind, "<bind/>") and same(presence, "<presence from='sm'/>")
    assert [same(p, "<presence from='c2s'/>") for p in sm.stanzas()] == [True]


def test_12_close_advertises_unavailable(net):
    """</stream:stream> is answered in kind and others see the name go."""
    sm = net.component("sm")
    c2s = net.component("c2s")
    sm.take()
    c2s.send("</stream:stream>")
    assert c2s.raw().endswith(b"</stream:stream>") and c2s.closed
    c2s.hang_up()
    assert same(sm.stanzas()[0], "<presence type='unavailable' from='c2s'/>")
    assert net.logged("[c2s] offline") and net.logged("disconnect")


# -- 13-17: routes -------------------------------------------------------------------------

def test_13_unicast_reaches_only_the_target(net):
    """A route to a bound name is delivered unchanged to it, nothing to the sender."""
    sm = net.component("sm")
    c2s = net.component("c2s")
    sm.take()
    c2s.send("<route to='sm' from='c2s'><iq type='get' id='1'/></route>")
    assert same(sm.stanzas()[0], "<route to='sm' from='c2s'><iq type='get' id='1'/></route>")
    assert c2s.raw() == b""


def test_14_unknown_destination_bounces_404_unswapped(net):
    """No route and no default: the same route comes back with error='404'."""
    sm = net.component("sm")
    sm.send("<route to='nowhere' from='sm'><message to='a@nowhere' from='b@sm'><body>hi</body></message></route>")
    assert same(sm.stanzas()[0], "<route error='404' to='nowhere' from='sm'><message to='a@nowhere' "
                                 "from='b@sm'><body>hi</body></message></route>")


@pytest.mark.parametrize("route, reply", [
    ("<route to='x' from='notmine'><message/></route>", "<route error='401' to='x' from='notmine'><message/></route>"),
    ("<route to='x'><message/></route>", "<route error='400' to='x'><message/></route>"),
    ("<route to='bar.com/' from='sm'><message/></route>", "<route error='400' to='bar.com/' from='sm'><message/></route>"),
])
def test_15_bounces_400_and_401(net, route, reply):
    """Bad or foreign addresses bounce with 400 or 401."""
    sm = net.component("sm")
    sm.send(route)
    assert same(sm.stanzas()[0], reply)


def test_15_routes_carrying_an_error_are_dropped(net):
    """An error is never bounced or delivered."""
    sm = net.component("sm")
    sm.send("<route error='503' to='sm' from='sm'><message/></route>")
    assert sm.raw() == b""


def test_16_default_route_forwards_and_stops_loops(net):
    """Unknown domains go to the default route; its own unknowns bounce 404."""
    s2s = net.component("s2s", default=True)
    c2s = net.component("c2s")
    s2s.take()
    c2s.send("<route to='remote.org' from='c2s'><message/></route>")
    assert same(s2s.stanzas()[0], "<route to='remote.org' from='c2s'><message/></route>")
    s2s.send("<route to='unknown.org' from='s2s'><message/></route>")
    assert same(s2s.stanzas()[0], "<route error='404' to='unknown.org' from='s2s'><message/></route>")


def test_17_broadcast_reaches_authenticated_peers_only(net):
    """A broadcast goes to every other authenticated peer; XEP-0114 gets the payload."""
    sm = net.component("sm")
    quiet = net.component()
    legacy = net.legacy("legacy.example.com")
    stranger = net.peer()
    stranger.send(header())
    stranger.take()
    c2s = net.component("c2s")
    for p in (sm, quiet, legacy):
        p.take()
    c2s.send("<route type='broadcast' from='c2s'><presence/></route>")
    expected = "<route type='broadcast' from='c2s'><presence/></route>"
    assert same(sm.stanzas()[0], expected) and same(quiet.stanzas()[0], expected)
    assert same(legacy.stanzas()[0], "<presence/>", NS_ACCEPT)
    assert stranger.raw() == b"" and c2s.raw() == b""


def test_17_broadcast_errors(net):
    """A broadcast without from bounces 400; an unknown type is dropped."""
    c2s = net.component("c2s")
    c2s.send("<route type='broadcast'><presence/></route>")
    assert same(c2s.stanzas()[0], "<route error='400' type='broadcast'><presence/></route>")
    c2s.send("<route type='bogus' from='c2s' to='c2s'><presence/></route>")
    assert c2s.raw() == b""


# -- 18-20: log sinks, throttle, unbind ---------------------------------------------------------

def test_18_log_sink_gets_a_typed_copy(net):
    """A log sink gets type='log' copies of unicast routes; the target the original."""
    logger = net.component("logger", user="logger", password="pwl", log=True)
    sm = net.component("sm")
    c2s = net.component("c2s")
    logger.take(), sm.take()
    c2s.send("<route to='sm' from='c2s'><iq type='get' id='1'/></route>")
    assert same(logger.stanzas()[0], "<route type='log' to='sm' from='c2s'><iq type='get' id='1'/></route>")
    assert same(sm.stanzas()[0], "<route to='sm' from='c2s'><iq type='get' id='1'/></route>")


def test_19_throttle_holds_packets_until_toggled(net):
    """<throttle/> holds routed packets; the second one releases them in order."""
    sm = net.component("sm")
    c2s = net.component("c2s")
    sm.take()
    sm.send("<throttle/>")
    assert same(sm.stanzas()[0], "<throttle/>")
    c2s.send("<route to='sm' from='c2s'><iq id='1'/></route><route to='sm' from='c2s'><iq id='2'/></route>")
    assert sm.raw() == b""
    sm.send("<throttle/>")
    echo, first, second = sm.stanzas()
    assert same(echo, "<throttle/>")
    assert first[0].get("id") == "1" and second[0].get("id") == "2"


def test_20_unbind(net):
    """Unbinding a foreign name is 404; unbinding one's own advertises unavailable."""
    sm = net.component("sm")
    c2s = net.component("c2s")
    sm.take()
    sm.send("<unbind name='nothere'/>")
    assert same(sm.stanzas()[0], "<unbind error='404'/>")
    sm.send("<unbind name='sm'/>")
    assert same(sm.stanzas()[0], "<unbind/>")
    assert same(c2s.stanzas()[0], "<presence type='unavailable' from='sm'/>")


# -- 21-23: XEP-0114 ---------------------------------------------------------------------------------

def test_21_handshake_binds_the_name_and_its_alias(net):
    """A good handshake is echoed empty; jabberd2 peers see the name and its alias."""
    sm = net.component("sm")
    legacy = net.peer()
    legacy.handshake("legacy.example.com")
    (reply,) = legacy.stanzas()
    assert same(reply, "<handshake/>", NS_ACCEPT)
    froms = sorted(p.get("from") for p in sm.stanzas())
    assert froms == ["lalias.example.com", "legacy.example.com"]


@pytest.mark.parametrize("digest, text", [
    ("0" * 40, "hash didn't match, auth failed"),
    ("0" * 39, "handshake isn't long enough to be a sha1 hash"),
])
def test_21_bad_handshakes_are_not_authorized(net, digest, text):
    """Wrong or short handshakes end the stream with not-authorized."""
    legacy = net.peer()
    legacy.send(header(NS_ACCEPT, version=False, to="legacy.example.com"))
    legacy.take()
    legacy.send(f"<handshake>{digest}</handshake>")
    assert stream_error_condition(legacy.take()) == ("not-authorized", [text])


def test_21_uppercase_hash_fails(net):
    """The hash is compared case-sensitively, as jabberd2 does."""
    import hashlib

    legacy = net.peer()
    legacy.send(header(NS_ACCEPT, version=False, to="legacy.example.com"))
    legacy.take()
    digest = hashlib.sha1((legacy.stream_id + "secret").encode()).hexdigest().upper()
    legacy.send(f"<handshake>{digest}</handshake>")
    assert legacy.closed


@pytest.mark.parametrize("settings, to, condition", [
    ({}, None, "host-unknown"),
    ({"secret": None}, "legacy.example.com", "invalid-namespace"),
    ({}, "lalias.example.com", "host-unknown"),
])
def test_21_legacy_stream_errors(settings, to, condition):
    """No 'to', no secret, or an aliased name: the stream ends with an error."""
    import hashlib

    net = Network(**settings)
    legacy = net.peer()
    legacy.send(header(NS_ACCEPT, version=False, to=to))
    if not legacy.closed:
        legacy.take()
        legacy.send("<handshake>%s</handshake>" %
                    hashlib.sha1((legacy.stream_id + "secret").encode()).hexdigest())
    assert stream_error_condition(legacy.take())[0] == condition
    assert legacy.closed


def test_21_handshake_after_the_secret_was_reloaded_away():
    """A SIGHUP that removes <secret> between a component's header and its
    handshake ends that stream with an error instead of raising."""
    import hashlib
    from dataclasses import replace

    net = Network()
    legacy = net.peer()
    legacy.send(header(NS_ACCEPT, version=False, to="legacy.example.com"))
    legacy.take()
    net.router.reconfigure(replace(net.config, secret=None))
    legacy.send("<handshake>%s</handshake>" %
                hashlib.sha1((legacy.stream_id + "secret").encode()).hexdigest())
    assert stream_error_condition(legacy.take())[0] == "not-authorized"
    assert legacy.closed


def test_21_peer_stream_error_with_a_comment_is_logged():
    """A peer's <stream:error/> with a comment among its children is logged
    with its text and ends the stream quietly (no exception)."""
    net = Network()
    peer = net.component("d.example.com")
    peer.send(f"<stream:error xmlns:stream='{STREAMS}'><!-- why --><conflict "
              "xmlns='urn:ietf:params:xml:ns:xmpp-streams'/><text "
              "xmlns='urn:ietf:params:xml:ns:xmpp-streams'>gone</text></stream:error>")
    assert peer.closed and not peer.connection.authenticated
    assert net.logged("error: Stream error (gone)")


def test_22_xep0114_wrap_and_unwrap(net):
    """Stanzas are wrapped into jabber:client routes and unwrapped into the
    component's own jabber:component:accept on the way back (XEP-0114 section 3)."""
    sm = net.component("example.com")
    legacy = net.legacy("legacy.example.com")
    sm.take()
    legacy.send("<message to='u@example.com/r' from='bot@legacy.example.com/x'><body>hello</body></message>")
    assert same(sm.stanzas()[0],
                "<route to='example.com' from='legacy.example.com'><message xmlns='jabber:client' "
                "to='u@example.com/r' from='bot@legacy.example.com/x'><body>hello</body></message></route>")
    sm.send("<route to='legacy.example.com' from='example.com'><message xmlns='jabber:client' "
            "to='bot@legacy.example.com' from='u@example.com/r'><body>yo</body></message></route>")
    assert same(legacy.stanzas()[0], "<message to='bot@legacy.example.com' "
                                     "from='u@example.com/r'><body>yo</body></message>", NS_ACCEPT)
    # The namespace is spliced, not re-serialised: the rest of the bytes are the sm's.
    sm.send("<route to='legacy.example.com' from='example.com'><message xmlns=\"jabber:client\" "
            "to='bot@legacy.example.com' from='u@example.com/r'  ><body>yo</body></message></route>")
    assert legacy.raw() == (b"<message xmlns='jabber:component:accept' to='bot@legacy.example.com' "
                            b"from='u@example.com/r'  ><body>yo</body></message>")


@pytest.mark.parametrize("stanza, spliced", [
    # Unprefixed, no declaration of its own ('xmlns' in a child's text is none).
    ("<message to='u@example.com' from='b@legacy.example.com'><body>xmlns='x'</body></message>",
     b"<message xmlns='jabber:client' to='u@example.com' from='b@legacy.example.com'>"
     b"<body>xmlns='x'</body></message>"),
    ("<message\tto='u@example.com' from='b@legacy.example.com'/>",
     b"<message xmlns='jabber:client'\tto='u@example.com' from='b@legacy.example.com'/>"),
    # A declaration of its own, or what may be one in a childless stanza's text.
    ("<message xmlns='jabber:component:accept' to='u@example.com' from='b@legacy.example.com'/>", None),
    ("<message to='u@example.com' from='b@legacy.example.com'>xmlns</message>", None),
])
def test_22_an_xep0114_stanza_is_wrapped_by_splicing_unless_it_may_declare_a_namespace(
        net, stanza, spliced):
    """The stanza moves into jabber:client either way: spliced where it
    inherits the stream's namespace, else re-serialised."""
    sm = net.component("example.com")
    legacy = net.legacy("legacy.example.com")
    sm.take()
    legacy.send(stanza)
    route = sm.raw()
    head = b"<route xmlns='%s' to='example.com' from='legacy.example.com'>" % NS_C.encode()
    assert route.startswith(head) and route.endswith(b"</route>")
    if spliced is not None:
        assert route[len(head):-len(b"</route>")] == spliced
    (payload,) = etree.fromstring(route)
    assert payload.tag == "{jabber:client}message"
    assert dict(payload.attrib) == {"to": "u@example.com", "from": "b@legacy.example.com"}
    assert payload.text == etree.fromstring(stanza).text


@pytest.mark.parametrize("separator", ["", " ", "<!-- between -->"])
def test_22_every_payload_of_a_route_reaches_an_xep0114_component(net, separator):
    """A route carrying several stanzas delivers each, in order, to an XEP-0114
    component, as jabberd2 does (not only the first)."""
    sm = net.component("example.com")
    legacy = net.legacy("legacy.example.com")
    sm.take()
    sm.send("<route to='legacy.example.com' from='example.com'>"
            "<message xmlns='jabber:client' to='bot@legacy.example.com' id='1'/>" + separator +
            "<presence xmlns='jabber:client' to='bot@legacy.example.com' id='2'/>"
            "<iq xmlns='jabber:client' type='get' to='bot@legacy.example.com' id='3'/></route>")
    got = legacy.stanzas()
    assert [(s.tag, s.get("id")) for s in got] == [
        ("{%s}message" % NS_ACCEPT, "1"), ("{%s}presence" % NS_ACCEPT, "2"), ("{%s}iq" % NS_ACCEPT, "3")]


@pytest.mark.parametrize("payload, expected", [
    # A forwarded message keeps the namespace it declares itself.
    ("<message xmlns='jabber:client' to='bot@legacy.example.com' from='u@example.com/r'>"
     "<forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client' to='x@y'><body>in</body>"
     "</message></forwarded></message>",
     "<message to='bot@legacy.example.com' from='u@example.com/r'>"
     "<forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client' to='x@y'><body>in</body>"
     "</message></forwarded></message>"),
    # A prefixed stanza is rebuilt (the raw form is checked below).
    ("<c:message xmlns:c='jabber:client' to='bot@legacy.example.com' from='u@example.com/r'>"
     "<c:body>hi</c:body><x xmlns='urn:x'><c:body>kept</c:body></x></c:message>",
     "<message to='bot@legacy.example.com' from='u@example.com/r'><body>hi</body>"
     "<x xmlns='urn:x'><body xmlns='jabber:client'>kept</body></x></message>"),
    # A from attribute that looks like a declaration is left alone.
    ("<message from=\"u@example.com/ xmlns='jabber:client'\" xmlns='jabber:client' "
     "to='bot@legacy.example.com'/>",
     "<message from=\"u@example.com/ xmlns='jabber:client'\" to='bot@legacy.example.com'/>"),
    # jabber:server payloads too.
    ("<presence xmlns='jabber:server' to='bot@legacy.example.com' from='u@example.com/r'/>",
     "<presence to='bot@legacy.example.com' from='u@example.com/r'/>"),
    # Anything else is handed over as it is.
    ("<x xmlns='urn:other' to='bot@legacy.example.com'/>", "<x xmlns='urn:other' to='bot@legacy.example.com'/>"),
])
def test_22_xep0114_payload_moves_into_the_component_namespace(net, payload, expected):
    """Only the stanza and what inherited its client namespace move into jabber:component:accept."""
    sm = net.component("example.com")
    legacy = net.legacy("legacy.example.com")
    sm.take()
    sm.send(f"<route to='legacy.example.com' from='example.com'>{payload}</route>")
    assert same(legacy.stanzas()[0], expected, NS_ACCEPT)


def test_22_prefixed_payload_reaches_the_component_unprefixed(net):
    """A stanza the sender wrote with a prefix arrives with none (xmpp.js ignores prefixed stanzas)."""
    sm = net.component("example.com")
    legacy = net.legacy("legacy.example.com")
    sm.take()
    sm.send("<route to='legacy.example.com' from='example.com'><c:message xmlns:c='jabber:client' "
            "to='bot@legacy.example.com'><c:body>hi</c:body></c:message></route>")
    assert legacy.raw() == (b'<message xmlns="jabber:component:accept" to="bot@legacy.example.com">'
                            b'<body>hi</body></message>')


def test_22_xep0114_payload_in_namespace_from_a_sender_with_extra_prefixes():
    """A packet using a prefix of the sender's stream header (real sm: xmlns:ack)
    is serialised and still arrives in jabber:component:accept, unprefixed."""
    net = Network()
    sm = net.peer()
    sm.authenticate(stream_header=header().replace(b"><stream:stream ", b"><stream:stream xmlns:ack='http://x/ack' "))
    sm.bind("example.com")
    legacy = net.legacy("legacy.example.com")
    sm.take()
    sm.send("<route to='legacy.example.com' from='example.com'><message xmlns='jabber:client' "
            "to='bot@legacy.example.com' from='u@example.com/r' ack:r='1'><body>yo</body></message></route>")
    raw = legacy.raw()
    assert raw.startswith(b"<message xmlns=") and b"ns0" not in raw
    assert same(etree.fromstring(raw), "<message xmlns:ack='http://x/ack' to='bot@legacy.example.com' "
                "from='u@example.com/r' ack:r='1'><body>yo</body></message>", NS_ACCEPT)


def test_22_per_name_setting_keeps_jabberd2_client_namespace():
    """<components><component namespace='jabber:client'/> hands that name the payload
    as jabberd2 does; other names still get jabber:component:accept."""
    net = Network(component_namespaces={"legacy.example.com": "jabber:client"})
    sm = net.component("example.com")
    old = net.legacy("legacy.example.com")
    new = net.legacy("new.example.com")
    sm.take()
    for name in ("legacy.example.com", "new.example.com"):
        sm.send(f"<route to='{name}' from='example.com'><message xmlns='jabber:client' "
                f"to='bot@{name}' from='u@example.com/r'><body>yo</body></message></route>")
    assert same(old.stanzas()[0], "<message xmlns='jabber:client' to='bot@legacy.example.com' "
                                  "from='u@example.com/r'><body>yo</body></message>", NS_ACCEPT)
    assert same(new.stanzas()[0], "<message to='bot@new.example.com' "
                                  "from='u@example.com/r'><body>yo</body></message>", NS_ACCEPT)


def test_21_xep0114_version_header_gets_no_features():
    """A component opening with version='1.0' gets a pre-1.0 answer and no
    stream features (as from Prosody and ejabberd), then its handshake works."""
    import hashlib

    net = Network()
    legacy = net.peer()
    legacy.send(header(NS_ACCEPT, version=True, to="legacy.example.com"))
    data = legacy.raw()
    assert data.startswith(b"<?xml version='1.0'?><stream:stream ")
    assert b"version=" not in data[21:] and b"features" not in data
    (opened,) = legacy.reader.feed(data)
    assert opened.attrs["from"] == "legacy.example.com" and "version" not in opened.attrs
    digest = hashlib.sha1((opened.attrs["id"] + "secret").encode()).hexdigest()
    legacy.send(f"<handshake>{digest}</handshake>")
    (handshake,) = legacy.reader.feed(legacy.raw())
    assert handshake.name == NS_ACCEPT + " handshake" and not legacy.closed


@pytest.mark.parametrize("sender", ["bot@legacy.example.com", "bot@notmine.com"])
def test_23_xep0114_errors_come_back_as_stanza_errors(net, sender):
    """Unroutable or foreign stanzas return as service-unavailable stanza errors."""
    legacy = net.legacy("legacy.example.com")
    legacy.send(f"<iq to='u@unknown.com' from='{sender}' type='get' id='7'>"
                "<query xmlns='jabber:iq:version'/></iq>")
    assert same(legacy.stanzas()[0],
                f"<iq type='error' id='7' to='u@unknown.com' from='{sender}'>"
                "<error type='cancel' code='503'><service-unavailable "
                "xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>"
                "<query xmlns='jabber:iq:version'/></iq>", NS_ACCEPT)


def test_23_xep0114_stanza_without_from_is_dropped(net):
    """A stanza without from is dropped silently."""
    legacy = net.legacy("legacy.example.com")
    legacy.send("<message to='u@example.com'/>")
    assert legacy.raw() == b"" and not legacy.closed


# -- 24-25: jabberd2 cluster placement ------------------------------------------------------------

def test_24_multi_to_cluster_follows_jabberd2_hash(net):
    """Members are picked by the jabberd2 hash of the stanza 'to', with swap-remove."""
    members = [net.component("example.com", multi="to") for _ in range(3)]
    c2s = net.component("c2s")
    for m in members:
        m.take()

    def receiver(to):
        c2s.send(f"<route to='example.com' from='c2s'><message to='{to}'/></route>")
        got = [i for i, m in enumerate(members) if m.stanzas()]
        return got

    assert receiver("user4@example.com") == [2]
    assert receiver("user1@example.com") == [0]
    assert receiver("User0@Example.COM/res") == [1]
    members[0].hang_up()
    assert receiver("user0@example.com") == [1]
    assert receiver("user1@example.com") == [2]


def test_24_invalid_address_in_a_cluster_does_not_crash(net):
    """An invalid stanza 'to' in a clustered route goes to one member (jabberd2 crashes)."""
    members = [net.component("example.com", multi="to") for _ in range(2)]
    c2s = net.component("c2s")
    for m in members:
        m.take()
    c2s.send("<route to='example.com' from='c2s'><message to='@bad'/></route>")
    assert sum(len(m.stanzas()) for m in members) == 1


def test_25_xep0114_cluster_hashes_from(net):
    """XEP-0114 members are picked by the stanza 'from'; unavailable only when the last goes."""
    sm = net.component("example.com")
    x = net.legacy("muc.example.com")
    y = net.legacy("muc.example.com")
    sm.take()
    sm.send("<route to='muc.example.com' from='example.com'><presence to='room@muc.example.com/nick' "
            "from='carol@example.com/r'/></route>")
    assert x.stanzas() and not y.stanzas()
    sm.send("<route to='muc.example.com' from='example.com'><presence to='room@muc.example.com/nick' "
            "from='alice@example.com/r'/></route>")
    assert y.stanzas() and not x.stanzas()
    x.hang_up()
    assert sm.raw() == b""
    y.hang_up()
    assert same(sm.stanzas()[0], "<presence type='unavailable' from='muc.example.com'/>")


def test_6_unknown_user_is_not_authorized(net):
    """A user missing from router-users.xml fails with not-authorized."""
    peer = net.peer()
    with pytest.raises(AssertionError, match="failure"):
        peer.authenticate("nobody", "secret")
    assert not peer.closed


def test_keepalive_goes_to_idle_streams_only(net):
    """tick() sends one space to streams idle longer than <keepalive>."""
    net2 = Network(keepalive=30)
    idle, busy = net2.component("sm"), net2.component("c2s")
    idle.take()
    idle.connection.last_activity = 100.0
    busy.connection.last_activity = 125.0
    net2.router.tick(131.0)
    assert idle.raw() == b" " and busy.raw() == b""


def test_aliases_of_a_jabberd2_component_are_routable(net):
    """An alias of a name bound over the jabberd2 protocol routes to that peer
    (jabberd2 registers the wrong name here, protocol §4.11)."""
    target = net.component("legacy.example.com")
    c2s = net.component("c2s")
    target.take()
    c2s.send("<route to='lalias.example.com' from='c2s'><message id='via-alias'/></route>")
    (got,) = target.stanzas()
    assert got.get("to") == "lalias.example.com" and got[0].get("id") == "via-alias"
    target.hang_up()
    unavailable = sorted(p.get("from") for p in c2s.stanzas())
    assert unavailable == ["lalias.example.com", "legacy.example.com"]


def test_pipelined_stream_after_sasl_success_is_read(net):
    """Bytes sent right behind the SASL response belong to the new stream."""
    import base64 as b64

    from jrouter.testing.sasl_client import DigestMD5Client

    peer = net.peer()
    peer.send(header())
    peer.take()
    peer.send(f"<auth xmlns='{NS_SASL}' mechanism='DIGEST-MD5'/>")
    (challenge,) = peer.stanzas()
    answer = DigestMD5Client("jabberd", "secret").respond(b64.b64decode(challenge.text))
    peer.send(f"<response xmlns='{NS_SASL}'>{b64.b64encode(answer).decode()}</response>".encode()
              + header() + b"<bind name='sm'/>")
    assert net.logged("[sm] online")


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 100000])
def test_whole_session_is_the_same_at_every_chunk_size(chunk):
    """A whole component session (SASL, bind, routes, close) fed in any chunk
    size gives the same replies and deliveries as fed at once."""
    import base64 as b64

    from jrouter.testing.sasl_client import DigestMD5Client

    def session(chunk):
        net = Network()
        sm = net.component("sm")
        sm.take()
        peer = net.peer()
        # The SASL exchange needs the challenge's nonce: do it with whole
        # messages, then feed the rest of the session in chunks.
        peer.send(header())
        peer.take()
        peer.send(f"<auth xmlns='{NS_SASL}' mechanism='DIGEST-MD5'/>")
        (challenge,) = peer.stanzas()
        answer = DigestMD5Client("jabberd", "secret", cnonce="fixed").respond(
            b64.b64decode(challenge.text))
        script = (f"<response xmlns='{NS_SASL}'>{b64.b64encode(answer).decode()}</response>".encode()
                  + header() + b"<bind name='c2s'/><bind name='x.example.com' multi='to'/>"
                  + b"<route to='sm' from='c2s'><iq type='get' id='1'><q xmlns='urn:x'>&amp;</q></iq></route>"
                  + b"<route to='nowhere' from='c2s'><message/></route><throttle/>"
                  + b"<route type='broadcast' from='c2s'><presence/></route></stream:stream>")
        for at in range(0, len(script), chunk):
            peer.send(script[at:at + chunk])
        return peer.raw(), sm.raw()

    whole = session(100000)
    assert session(chunk) == whole
    assert b"<route to='sm' from='c2s'><iq type='get' id='1'>" in whole[1]
    assert whole[0].endswith(b"</stream:stream>")


def test_extra_header_prefixes_keep_raw_forwarding_unless_used():
    """A sender whose header declares xmlns:ack (as jabberd2's sm and c2s do) still
    has its packets forwarded byte for byte; a packet using that prefix is rebuilt
    with the declaration it needs."""
    import base64 as b64

    from jrouter.testing.sasl_client import DigestMD5Client

    ack = "http://www.xmpp.org/extensions/xep-0198.html#ns"
    opening = (f"<?xml version='1.0'?><stream:stream xmlns:stream='{STREAMS}' xmlns:ack='{ack}' "
               f"xmlns='{NS_C}' version='1.0'>")
    net = Network()
    target = net.component("sm")
    target.take()
    peer = net.peer()
    peer.send(opening)
    peer.take()
    peer.send(f"<auth xmlns='{NS_SASL}' mechanism='DIGEST-MD5'/>")
    (challenge,) = peer.stanzas()
    answer = DigestMD5Client("jabberd", "secret").respond(b64.b64decode(challenge.text))
    peer.send(f"<response xmlns='{NS_SASL}'>{b64.b64encode(answer).decode()}</response>")
    peer.take()
    peer.restart_reader()
    peer.send(opening + "<bind name='c2s'/>")
    peer.take()
    target.take()
    plain = "<route to='sm' from='c2s'><message xmlns='jabber:client' to='a@sm'/></route>"
    peer.send(plain)
    assert target.raw() == plain.encode()
    peer.send("<route to='sm' from='c2s'><ack:r/></route>")
    (rebuilt,) = target.stanzas()
    assert rebuilt[0].tag == "{%s}r" % ack


# -- the connection state table ---------------------------------------------------------------

def test_an_illegal_move_is_a_protocol_error_not_a_crash(net):
    """A move the state table does not allow ends that stream with bad-format; the router goes on."""
    from jrouter.wire.connection import State
    from jrouter.errors import ConnectionClosed

    sm = net.component("example.com")
    with pytest.raises(ConnectionClosed):
        sm.connection._move(State.HEADER)         # ONLINE -> HEADER is not in _MOVES
    assert stream_error_condition(sm.take())[0] == "bad-format"
    assert sm.connection.state is State.CLOSED and sm.connection.closing
    other = net.component("other.example.com")
    assert net.logged("[other.example.com] online") and other.connection.authenticated


def test_every_way_a_stream_ends_reaches_closed_once(net):
    """fail, kick, close, the peer's stream error and a vanished socket all end in CLOSED,
    and a stream that ended says nothing more."""
    from jrouter.wire.connection import State

    closer = net.component("a.example.com")
    closer.connection.close()
    closer.connection.close()
    assert closer.raw().count(b"</stream:stream>") == 1
    kicked = net.component("b.example.com")
    kicked.connection.kick("conflict")
    gone = net.component("c.example.com")
    gone.hang_up()
    erring = net.component("d.example.com")
    erring.send(f"<stream:error xmlns:stream='{STREAMS}'><conflict "
                "xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>")
    for peer in (closer, kicked, gone, erring):
        assert peer.connection.state is State.CLOSED and peer.connection.closing
        assert not peer.connection.authenticated


def test_22_xep0114_to_xep0114_arrives_in_the_receivers_namespace(net):
    """A stanza from one XEP-0114 component to another arrives in jabber:component:accept,
    whatever it was wrapped in on the way through the router: as the bytes it was sent in
    when it inherited its stream's namespace, moved back when it declared one."""
    sender = net.legacy("legacy.example.com")
    receiver = net.legacy("other.example.com")
    sent = b"<message to='bot@other.example.com' from='me@legacy.example.com'><body>hi</body></message>"
    sender.send(sent)
    assert receiver.raw() == sent
    sender.send("<message to='bot@other.example.com' from='me@legacy.example.com'>"
                "<x xmlns='urn:x'/></message>".replace("<message ", "<message xmlns='jabber:component:accept' "))
    assert same(receiver.stanzas()[0], "<message to='bot@other.example.com' from='me@legacy.example.com'>"
                                       "<x xmlns='urn:x'/></message>", NS_ACCEPT)


def test_22_payload_prefixed_by_a_declaration_on_the_route_is_rebuilt(net):
    """A payload whose prefix is declared on the <route>, not on itself, reaches the component
    unprefixed and well-formed (its bytes alone could not be parsed)."""
    sm = net.component("example.com")
    legacy = net.legacy("legacy.example.com")
    sm.take()
    sm.send("<route xmlns:c='jabber:client' to='legacy.example.com' from='example.com'>"
            "<c:message to='bot@legacy.example.com'><c:body>hi</c:body></c:message></route>")
    assert legacy.raw() == (b'<message xmlns="jabber:component:accept" to="bot@legacy.example.com">'
                            b'<body>hi</body></message>')
    assert not legacy.closed and not sm.closed
