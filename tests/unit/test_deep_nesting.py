"""What lxml could not parse never gets past the stream reader (issue 10, finding 6).

The reader (expat) keeps raw bytes; lxml parses them later, on cold paths (an
XEP-0114 stanza that declares its own namespace, its bounce, a ``<bind/>``, a
prefixed payload for an XEP-0114 component). Whatever lxml would refuse there
(too deep, a name too long, bytes that are not UTF-8, a namespace name that is
not a URI) must end the sender's stream with a stream error at the reader, not
raise out of the router; and the router goes on serving everyone else. The
the bounce of an XEP-0114 stanza is parsed with the reader's own lxml parser.
"""

import pytest
from lxml import etree

from jrouter.wire.xmlstream import MAX_DEPTH, StreamClose, StreamError, StreamOpen, StreamReader

from jrouter.wire.xmlwrite import quoteattr

from .harness import NS_ACCEPT, NS_C, STREAMS, Network, header

# Every test here once with each framer (tests/unit/conftest.py).
pytestmark = pytest.mark.usefixtures("framer")

def nest(levels, leaf=b"x"):
    """``levels`` nested ``<d>`` elements (``levels`` levels) around ``leaf``."""
    return b"<d>" * levels + leaf + b"</d>" * levels


def stream_error(events):
    """The condition of the one stream error among the events."""
    (error,) = [e for e in events if not isinstance(e, (StreamOpen, StreamClose))
                and e.tag == "{%s}error" % STREAMS]
    return error[0].tag.rpartition("}")[2]


def ended_with(peer, condition):
    events = peer.take()
    assert peer.closed and isinstance(events[-1], StreamClose)
    assert stream_error(events) == condition
    return True


@pytest.fixture
def net():
    return Network()


@pytest.fixture
def bystanders(net):
    """An sm and an XEP-0114 component that route to each other throughout."""
    sm = net.component("example.com")
    other = net.legacy("other.example.com")
    sm.take()
    return sm, other


def routes(sm):
    """The routes the sm got (it also hears of names coming and going)."""
    return [s for s in sm.stanzas() if s.tag == "{%s}route" % NS_C]


def still_routing(bystanders):
    sm, other = bystanders
    other.send(b"<message to='u@example.com' from='bot@other.example.com'><body>hi</body></message>")
    (route,) = routes(sm)
    assert route[0].tag == "{jabber:client}message" and route[0][0].text == "hi"
    sm.send(b"<route to='other.example.com' from='example.com'><message xmlns='jabber:client' "
            b"to='bot@other.example.com' from='u@example.com'/></route>")
    (message,) = other.stanzas()
    assert message.tag == "{%s}message" % NS_ACCEPT
    return True


# -- the four lxml paths that raised past 256 levels -------------------------------

def test_deep_xep0114_stanza_declaring_its_namespace_ends_its_stream(net, bystanders):
    """An XEP-0114 stanza with its own xmlns is parsed to be wrapped: too deep, a stream error."""
    legacy = net.legacy("legacy.example.com")
    legacy.send(b"<message xmlns='jabber:component:accept' to='u@example.com' "
                b"from='bot@legacy.example.com'>" + nest(300) + b"</message>")
    assert ended_with(legacy, "policy-violation")
    assert still_routing(bystanders)


def test_deep_unroutable_xep0114_stanza_ends_its_stream_instead_of_a_bounce(net, bystanders):
    """Its bounce parses the stanza: too deep, the stream ends instead."""
    legacy = net.legacy("legacy.example.com")
    legacy.send(b"<message to='u@nowhere.example.net' from='bot@legacy.example.com'>"
                + nest(300) + b"</message>")
    assert ended_with(legacy, "policy-violation")
    assert still_routing(bystanders)


def test_deep_bind_ends_the_jabberd2_stream(net, bystanders):
    """<bind/> is parsed to be answered: too deep, a stream error, no traceback."""
    sm2 = net.component()
    sm2.send(b"<bind name='sm2.example.com'>" + nest(300) + b"</bind>")
    assert ended_with(sm2, "policy-violation")
    assert "sm2.example.com" not in net.router.table.routes
    assert still_routing(bystanders)


def test_deep_prefixed_payload_for_an_xep0114_component_ends_the_senders_stream(net, bystanders):
    """A prefixed payload is rebuilt for the component: too deep, the sender's stream ends."""
    sender = net.component("sender.example.com")
    legacy = net.legacy("legacy.example.com")
    sender.send(b"<route to='legacy.example.com' from='sender.example.com'><c:message "
                b"xmlns:c='jabber:client' to='bot@legacy.example.com'>" + nest(300) + b"</c:message></route>")
    assert ended_with(sender, "policy-violation")
    assert legacy.stanzas() == [] and not legacy.closed
    assert still_routing(bystanders)


# -- the limit itself ----------------------------------------------------------------

def test_the_deepest_allowed_stanza_is_routed_wrapped_and_bounced(net, bystanders):
    """At MAX_DEPTH levels every path parses: an XEP-0114 stanza wrapped into a
    route (one level more, parsed here by lxml's default parser) and bounced
    back as a stanza error; a route whose payload is rebuilt for XEP-0114."""
    sm, other = bystanders
    deep = nest(MAX_DEPTH - 1)          # inside a stanza, which is level 1
    other.send(b"<message xmlns='jabber:component:accept' to='u@example.com' "
               b"from='bot@other.example.com'>" + deep + b"</message>")
    route = etree.fromstring(sm.raw())
    assert route.tag == "{%s}route" % NS_C and route[0].tag == "{jabber:client}message"
    assert len(list(route.iter("{*}d"))) == MAX_DEPTH - 1
    other.send(b"<message to='u@nowhere.example.net' from='bot@other.example.com'>" + deep + b"</message>")
    (bounce,) = other.stanzas()
    assert bounce.get("type") == "error" and not other.closed
    payload = nest(MAX_DEPTH - 2).replace(b"d>", b"c:d>")     # in a route, in a stanza
    sm.send(b"<route to='other.example.com' from='example.com'><c:message xmlns:c='jabber:client' "
            b"to='bot@other.example.com'>" + payload + b"</c:message></route>")
    (message,) = other.stanzas()
    assert len(list(message.iter("{%s}d" % NS_ACCEPT))) == MAX_DEPTH - 2
    assert still_routing(bystanders)


def test_one_level_more_is_refused_by_the_reader_with_its_text():
    """MAX_DEPTH + 1 levels: policy-violation, saying what the limit is."""
    reader = StreamReader()
    reader.feed(header())
    assert len(reader.feed(b"<route>" + nest(MAX_DEPTH - 1) + b"</route>")) == 1
    with pytest.raises(StreamError) as caught:
        reader.feed(b"<route>" + nest(MAX_DEPTH) + b"</route>")
    assert caught.value.condition == "policy-violation"
    assert caught.value.text == f"stanza nested too deeply (limit {MAX_DEPTH} levels)"


@pytest.mark.parametrize("protocol", ["jabberd2", "xep0114"])
def test_deep_element_before_authentication_ends_the_stream_the_same_way(net, bystanders, protocol):
    """Before SASL or the handshake, too deep ends the stream with the same error."""
    peer = net.peer()
    peer.send(header(NS_C) if protocol == "jabberd2"
              else header(NS_ACCEPT, version=False, to="x.example.com"))
    peer.take()
    peer.send(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>" + nest(MAX_DEPTH) + b"</auth>"
              if protocol == "jabberd2" else b"<handshake>" + nest(MAX_DEPTH) + b"</handshake>")
    assert ended_with(peer, "policy-violation")
    assert net.logged("error: Stream error (stanza nested too deeply")
    assert still_routing(bystanders)


def test_deep_element_split_byte_by_byte_is_refused_as_it_arrives():
    """The limit holds in any chunking, before the element completes."""
    reader = StreamReader()
    reader.feed(header())
    data = b"<route>" + b"<d>" * (MAX_DEPTH + 5)
    with pytest.raises(StreamError) as caught:
        for at in range(len(data)):
            reader.feed(data[at:at + 1])
    assert caught.value.condition == "policy-violation"
    assert at < len(data) - 1 - 4 * 3


# -- the other things lxml refuses and expat takes ---------------------------------

def test_a_very_long_element_name_in_a_bind_is_answered(net):
    """A name over lxml's 50,000 characters (its default limit) parses: the bind is answered."""
    sm = net.component()
    sm.send(b"<bind name='long.example.com'><" + b"n" * 60000 + b"/></bind>")
    (reply,) = sm.stanzas()
    assert reply.get("error") is None and not sm.closed
    assert "long.example.com" in net.router.table.routes


def test_a_very_long_element_name_in_an_unroutable_xep0114_stanza_is_bounced(net):
    """Its bounce parses the stanza alone: it must come back as a stanza error."""
    legacy = net.legacy("legacy.example.com")
    legacy.send(b"<message to='u@nowhere.example.net' from='bot@legacy.example.com'><"
                + b"n" * 60000 + b"/></message>")
    (bounce,) = legacy.stanzas()
    assert bounce.get("type") == "error" and not legacy.closed


def test_latin1_declared_stream_is_refused_before_its_bytes_are_forwarded(net, bystanders):
    """Raw bytes are forwarded and parsed as UTF-8: another declared encoding is
    unsupported-encoding (RFC 6120 11.6), not a crash at the first parse."""
    legacy = net.peer()
    legacy.send(b"<?xml version='1.0' encoding='ISO-8859-1'?>" + header(
        NS_ACCEPT, version=False, to="legacy.example.com").split(b"?>", 1)[1])
    assert ended_with(legacy, "unsupported-encoding")
    assert still_routing(bystanders)


def test_latin1_bytes_without_a_declaration_are_not_well_formed(net, bystanders):
    """A byte that is not UTF-8 is malformed XML, whatever follows."""
    legacy = net.legacy("legacy.example.com")
    legacy.send(b"<message xmlns='jabber:component:accept' to='u@example.com' "
                b"from='bot@legacy.example.com'><body>caf\xe9</body></message>")
    assert ended_with(legacy, "xml-not-well-formed")
    assert still_routing(bystanders)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_utf16_stream_is_unsupported_encoding(net, bystanders, encoding):
    """UTF-16 (expat detects it with or without a byte order mark) ends with
    unsupported-encoding, before any raw byte is cut (it raised ValueError)."""
    peer = net.peer()
    peer.send((header(NS_C).decode() + "<bind name='x.example.com'/>").encode(encoding))
    assert ended_with(peer, "unsupported-encoding")
    assert still_routing(bystanders)


def test_utf8_declarations_are_accepted():
    """encoding='UTF-8' in any case is the one encoding a stream may declare."""
    for name in (b"UTF-8", b"utf-8", b"utf8"):
        reader = StreamReader()
        declaration = b"<?xml version='1.0' encoding='" + name + b"'?>"
        (opened,) = reader.feed(declaration + header().split(b"?>", 1)[1])
        assert isinstance(opened, StreamOpen)


def test_an_element_beyond_lxmls_huge_limits_is_refused_at_arrival():
    """Without a size limit, an element so large that lxml would refuse it later
    (here: a name over its 10,000,000 characters) is a stream error at the reader."""
    reader = StreamReader(max_element_size=0)
    reader.feed(header())
    with pytest.raises(StreamError) as caught:
        reader.feed(b"<bind><" + b"n" * 10_000_001 + b"/></bind>")
    assert caught.value.condition == "policy-violation"
    assert "parser's limits" in caught.value.text


def test_an_unroutable_xep0114_stanza_using_the_stream_prefix_is_bounced(net, bystanders):
    """A stanza may use the stream: prefix its stream header declares; its bounce must parse it."""
    legacy = net.legacy("legacy.example.com")
    legacy.send(b"<message to='u@nowhere.example.net' from='bot@legacy.example.com'>"
                b"<stream:error/></message>")
    (bounce,) = legacy.stanzas()
    assert bounce.get("type") == "error" and not legacy.closed
    assert still_routing(bystanders)


@pytest.mark.parametrize("uri", ["a{b}", "caf\u00e9", "http://h:99999999999/", "%zz", "a<b"])
def test_a_namespace_name_lxml_refuses_ends_the_stream(net, bystanders, uri):
    """expat takes any string as a namespace name, libxml2 only a URI: one it
    refuses ends the stream at the reader (it raised from the bind's parse)."""
    sm2 = net.component()
    sm2.send(b"<bind name='sm2.example.com'><x xmlns=%s/></bind>" % quoteattr(uri).encode())
    assert ended_with(sm2, "xml-not-well-formed")
    assert net.logged("error: XML parse error (namespace name is not a URI)")
    legacy = net.legacy("legacy.example.com")
    legacy.send(b"<message to='u@nowhere.example.net' from='bot@legacy.example.com'>"
                b"<x xmlns=%s/></message>" % quoteattr(uri).encode())
    assert ended_with(legacy, "xml-not-well-formed")
    assert still_routing(bystanders)


def test_a_namespace_name_on_the_stream_header_is_vetted_too(net):
    """The header's declarations become every element's context (parsing the
    SASL <auth/> raised): the same check."""
    peer = net.peer()
    peer.send(header(NS_C).replace(b"<stream:stream ", b"<stream:stream xmlns:p='a{b}' ") +
              b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='DIGEST-MD5'>=</auth>")
    assert ended_with(peer, "xml-not-well-formed")


def test_a_size_limit_changed_mid_stream_applies_to_the_next_element():
    """Connection raises the limit when the peer authenticates: the reader follows."""
    reader = StreamReader(max_element_size=100)
    reader.feed(header())
    big = b"<route>" + b"x" * 200 + b"</route>"
    reader.max_element_size = 1000
    assert len(reader.feed(big)) == 1
    reader.max_element_size = 100
    with pytest.raises(StreamError) as caught:
        reader.feed(big)
    assert caught.value.text == "stanza too large (limit 100 bytes)"
