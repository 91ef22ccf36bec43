"""The sans-IO stream reader: framing, raw bytes, namespaces, hardening."""

import pytest
from hypothesis import given, settings, strategies as st

from jrouter.wire.xmlstream import STREAMS_NS, Element, StreamClose, StreamError, StreamOpen, StreamReader

from jrouter.wire.xmlwrite import stream_error, stream_header

# Every test here once with each framer (tests/unit/conftest.py).
pytestmark = pytest.mark.usefixtures("framer")

NS_C = "http://jabberd.jabberstudio.org/ns/component/1.0"
HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='" + NS_C.encode() +
          b"' xmlns:stream='http://etherx.jabber.org/streams' to='foo' version='1.0'>")
BODY = (b"<route to='sm' from='c2s' note='a>b'/>"
        b"<route to='sm' from='c2s'><message xmlns='jabber:client' to='a@b'><body>x &amp; y</body>"
        b"</message><iq/></route  >\n "
        b"<bind name='x'>text</bind>")
STREAM = HEADER + BODY + b"</stream:stream>"


def feed_in_chunks(data, size, reader=None):
    reader = reader or StreamReader()
    events = []
    for at in range(0, len(data), size):
        events += reader.feed(data[at:at + size])
    return events


def elements(events):
    return [e for e in events if isinstance(e, Element)]


def test_header_event_carries_attributes_and_namespaces():
    """The header event names the root, its attributes and its declarations."""
    (opened,) = StreamReader().feed(HEADER)
    assert isinstance(opened, StreamOpen)
    assert opened.name == STREAMS_NS + " stream"
    assert opened.attrs == {"to": "foo", "version": "1.0"}
    assert opened.default_ns == NS_C
    assert opened.prefixes == {"stream": STREAMS_NS}


@pytest.mark.parametrize("size", range(1, len(STREAM) + 1))
def test_framing_is_the_same_at_every_chunk_size(size):
    """Split anywhere, the stream yields the same events and the exact bytes."""
    events = feed_in_chunks(STREAM, size)
    assert [type(e) for e in events] == [StreamOpen, Element, Element, Element, StreamClose]
    raws = [e.raw for e in elements(events)]
    assert raws == [b"<route to='sm' from='c2s' note='a>b'/>",
                    b"<route to='sm' from='c2s'><message xmlns='jabber:client' to='a@b'>"
                    b"<body>x &amp; y</body></message><iq/></route  >",
                    b"<bind name='x'>text</bind>"]


def test_element_exposes_names_attributes_and_first_child():
    """Routing sees the top element's and the first child's name and attributes."""
    empty, route, bind = elements(feed_in_chunks(STREAM, 7))
    assert empty.name == NS_C + " route" and empty.attrs["note"] == "a>b"
    assert empty.child_name is None and empty.first_child() == b""
    assert route.child_name == "jabber:client message"
    assert route.child_attrs == {"to": "a@b"}
    assert route.first_child() == (b"<message xmlns='jabber:client' to='a@b'>"
                                   b"<body>x &amp; y</body></message>")
    assert bind.local_name == "bind" and bind.namespace == NS_C


def test_attribute_is_spliced_in_first():
    """A bounce adds error='404' without touching the rest of the bytes."""
    _, route, _ = elements(feed_in_chunks(STREAM, 1000))
    assert route.with_attribute("error", "404").startswith(b"<route error='404' to='sm'")
    assert route.with_attribute("error", "404")[len(b"<route error='404'"):] == route.raw[6:]


@pytest.mark.parametrize("raw, name", [
    (b"<m/>", b"<m"), (b"<message>x</message>", b"<message"),
    (b"<message\tto='a b'/>", b"<message"), (b"<message\r\n to='a'><b/></message>", b"<message"),
    (b"<p:m xmlns:p='urn:x'/>", b"<p:m"), (b"<m\xc3\xa9 to='x'/>", b"<m\xc3\xa9"),
])
def test_name_end_is_where_the_tag_name_ends(raw, name):
    """Where an attribute is spliced in: after the name, whatever ends it."""
    (element,) = elements(StreamReader().feed(HEADER + raw))
    assert element.name_end == len(name)
    assert element.with_attribute("error", "404").startswith(name + b" error='404'")


def test_empty_first_child_followed_by_end_tag():
    """An empty first child right before the parent's end tag is cut exactly."""
    data = HEADER + b"<route><e a='/>'/></route><route><f></f><g/></route>"
    first, second = elements(feed_in_chunks(data, 3))
    assert first.first_child() == b"<e a='/>'/>"
    assert second.first_child() == b"<f></f>"


def test_tree_resolves_stream_namespaces():
    """tree() parses the raw element in the stream's namespace context."""
    _, route, _ = elements(feed_in_chunks(STREAM, 1000))
    tree = route.tree()
    assert tree.tag == "{%s}route" % NS_C
    assert tree[0].tag == "{jabber:client}message"
    assert tree[1].tag == "{%s}iq" % NS_C
    assert tree[0][0].text == "x & y"


def test_stream_close_event():
    """</stream:stream> is an event of its own."""
    assert isinstance(feed_in_chunks(STREAM, 1000)[-1], StreamClose)


@pytest.mark.parametrize("bad, text", [
    (b"<bind name='x'></foo>", "mismatched tag"),
    (b"<a:bind/>", "unbound prefix"),
    (b"<bind name='x' name='y'/>", "duplicate attribute"),
    (b"<bind>&unknown;</bind>", "undefined entity"),
])
def test_malformed_xml_is_a_stream_error_with_expats_message(bad, text):
    """Malformed input ends the stream with xml-not-well-formed and expat's text."""
    reader = StreamReader()
    reader.feed(HEADER)
    with pytest.raises(StreamError) as caught:
        reader.feed(bad)
    assert caught.value.condition == "xml-not-well-formed"
    assert caught.value.text == text


def test_doctype_is_refused_before_any_entity_is_defined():
    """A DTD (and so any entity expansion) is refused outright."""
    laughs = (b"<?xml version='1.0'?><!DOCTYPE s [<!ENTITY a 'aaaaaaaaaa'>"
              b"<!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;'>]><s>&b;</s>")
    with pytest.raises(StreamError) as caught:
        StreamReader().feed(laughs)
    assert caught.value.condition == "restricted-xml"


def test_oversize_element_is_a_policy_violation_even_before_it_ends():
    """An element growing past the limit ends the stream before it completes."""
    reader = StreamReader(max_element_size=1000)
    reader.feed(HEADER)
    reader.feed(b"<route><message><body>" + b"x" * 900)
    with pytest.raises(StreamError) as caught:
        reader.feed(b"x" * 200)
    assert caught.value.condition == "policy-violation"


def test_many_small_elements_never_hit_the_limit():
    """The limit is per element, not per stream."""
    reader = StreamReader(max_element_size=200)
    reader.feed(HEADER)
    stanza = b"<route to='a' from='b'><message><body>" + b"x" * 100 + b"</body></message></route>"
    total = sum(len(reader.feed(stanza * 10)) for _ in range(100))
    assert total == 1000


def test_oversize_start_tag_is_caught_while_incomplete():
    """A never-ending start tag cannot grow the buffer without bound."""
    reader = StreamReader(max_element_size=1000)
    reader.feed(HEADER)
    with pytest.raises(StreamError):
        for _ in range(20):
            reader.feed(b"<route " + b"a='b' " * 100)


def test_restart_returns_what_followed_the_element():
    """After SASL or STARTTLS the reader starts a new document."""
    reader = StreamReader()
    reader.feed(HEADER)
    (response,) = reader.feed(b"<response/>LEFTOVER")
    assert reader.restart(response.end) == b"LEFTOVER"
    (opened,) = reader.feed(HEADER)
    assert isinstance(opened, StreamOpen)


def test_writer_helpers_match_jabberd2_bytes():
    """Our header and stream errors are byte-for-byte what jabberd2 writes."""
    assert stream_header(NS_C, "abc", to="bar", from_="foo", version="1.0") == (
        b"<?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' "
        b"xmlns='" + NS_C.encode() + b"' to='bar' from='foo' version='1.0' id='abc'>")
    assert stream_error("bad-format", header_sent=False) == (
        b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
        b"<stream:error xmlns:stream='http://etherx.jabber.org/streams'>"
        b"<bad-format xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error></stream:stream>")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(STREAM)), min_size=1, max_size=30))
def test_any_chunking_gives_the_same_events(cuts):
    """Hypothesis: arbitrary cut points never change what is read."""
    reader = StreamReader()
    events = []
    points = sorted(set(cuts)) + [len(STREAM)]
    start = 0
    for point in points:
        events += reader.feed(STREAM[start:point])
        start = point
    assert [e.raw for e in elements(events)] == [e.raw for e in elements(feed_in_chunks(STREAM, 1000))]


def test_oversize_element_arriving_whole_is_a_policy_violation():
    """An element over the limit is refused even when it arrives in one read."""
    reader = StreamReader(max_element_size=1000)
    reader.feed(HEADER)
    with pytest.raises(StreamError) as caught:
        reader.feed(b"<route><body>" + b"x" * 2000 + b"</body></route>")
    assert caught.value.condition == "policy-violation"


def test_elements_before_an_error_are_kept_on_the_error():
    """What the peer completed before a fatal error is handed over with it."""
    reader = StreamReader(max_element_size=1000)
    reader.feed(HEADER)
    with pytest.raises(StreamError) as caught:
        reader.feed(b"<iq id='1'/><iq id='2'/></oops>")
    assert [e.attrs["id"] for e in caught.value.events] == ["1", "2"]


# -- renewing the parser: memory that stays with one stanza -------------------

def describe(events):
    """What the router sees of each event (offsets aside: they are the parser's)."""
    out = []
    for e in events:
        if isinstance(e, Element):
            out.append((e.name, e.attrs, e.raw, e.child_name, e.child_attrs, e.first_child(),
                        e.tree().tag))
        else:
            out.append(type(e).__name__)
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(STREAM)), min_size=1, max_size=30),
       st.integers(min_value=1, max_value=200))
def test_renewing_the_parser_anywhere_changes_no_event(cuts, renew_after):
    """Hypothesis: a parser renewed every few bytes, mid-element included,
    yields exactly the events of one that never is."""
    body = HEADER + BODY * 3 + b"<p:x xmlns:p='urn:p'><p:y/></p:x></stream:stream>"
    reader = StreamReader(renew_after=renew_after)
    events = []
    start = 0
    for point in sorted(set(c % len(body) for c in cuts)) + [len(body)]:
        events += reader.feed(body[start:point])
        start = point
    assert describe(events) == describe(feed_in_chunks(body, 10**6))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(STREAM)), min_size=1, max_size=30),
       st.lists(st.booleans(), min_size=30, max_size=30))
def test_resting_between_any_reads_changes_no_event(cuts, rests):
    """Hypothesis: an idle reader lets its parser go between reads (whatever
    was left unfinished, it is read again) and the events are the same."""
    body = HEADER + BODY * 3 + b"  <p:x xmlns:p='urn:p'><p:y/></p:x></stream:stream>"
    reader = StreamReader()
    events = []
    start = 0
    for n, point in enumerate(sorted(set(c % len(body) for c in cuts)) + [len(body)]):
        events += reader.feed(body[start:point])
        start = point
        if rests[n % len(rests)]:
            reader.rest()
    assert describe(events) == describe(feed_in_chunks(body, 10**6))


def test_a_resting_reader_holds_little():
    """Parsers of 1,000 idle streams: ~12 KiB each awake, under 2 KiB at rest."""
    import gc
    import tracemalloc

    tracemalloc.start()
    try:
        readers = []
        for _ in range(1000):
            reader = StreamReader()
            reader.feed(HEADER + b"<bind name='x'/> ")
            readers.append(reader)
        gc.collect()
        awake = tracemalloc.get_traced_memory()[0]
        assert all(reader.rest() for reader in readers)
        gc.collect()
        resting = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert (awake - resting) / 1000 > 8000 and resting / 1000 < 2048, (awake // 1000, resting // 1000)
    (element,) = readers[0].feed(b"<route to='a' from='b'/>")
    assert element.attrs == {"to": "a", "from": "b"}


def test_renewed_parser_still_checks_namespaces_and_limits():
    """After a renewal an unbound prefix is an error, and the size limit holds."""
    reader = StreamReader(max_element_size=1000, renew_after=10)
    reader.feed(HEADER)
    reader.feed(b"<route/>" * 5)
    with pytest.raises(StreamError) as caught:
        reader.feed(b"<q:route/>")
    assert caught.value.condition == "xml-not-well-formed"
    reader = StreamReader(max_element_size=1000, renew_after=10)
    reader.feed(HEADER)
    reader.feed(b"<route/>" * 5)
    with pytest.raises(StreamError) as caught:
        reader.feed(b"<route><body>" + b"x" * 2000 + b"</body></route>")
    assert caught.value.condition == "policy-violation"


def test_restart_after_a_renewal_returns_what_followed():
    """SASL's restart uses an element's end offset: right after a renewal too."""
    reader = StreamReader(renew_after=10)
    reader.feed(HEADER)
    reader.feed(b"<iq/>" * 5)
    (response,) = reader.feed(b"<response/>LEFTOVER")
    assert reader.restart(response.end) == b"LEFTOVER"


def test_names_never_repeated_do_not_grow_the_reader():
    """A peer sends stanzas whose attribute names it never repeats: expat
    would keep every name for the stream's life (~9 MiB per MiB); renewed,
    the reader holds about one renewal's worth, whatever the peer sends."""
    import gc
    import tracemalloc

    reader = StreamReader()
    reader.feed(HEADER)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        held = []
        for n in range(24):            # 24 stanzas of ~300 KB: 7 MiB in all
            attrs = b" ".join(b"n%d_%d='1'" % (n, i) for i in range(30000))
            (element,) = reader.feed(b"<route " + attrs + b"/>")
            del element
            gc.collect()
            held.append(tracemalloc.get_traced_memory()[0] - base)
    finally:
        tracemalloc.stop()
    # Renewed every 256 KiB: a few MiB throughout. Never renewed: 1.8 MiB more per
    # stanza, 42 MiB at the end.
    assert max(held) < 12 * 2**20, [h >> 20 for h in held]


def test_a_stanzas_attributes_go_with_it():
    """Once the element is handed over and dropped the reader keeps none of
    its attributes (it held the last stanza's, ~20 MiB for one with 70k)."""
    import gc
    import tracemalloc

    reader = StreamReader(renew_after=10**9)
    reader.feed(HEADER)
    attrs = b" ".join(b"a%d='value %d'" % (i, i) for i in range(30000))
    stanza = b"<route " + attrs + b"><x " + attrs + b"/></route>"
    reader.feed(stanza)                 # expat learns the names: kept till renewed
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        (element,) = reader.feed(stanza)
        assert len(element.attrs) == len(element.child_attrs) == 30000
        with_element = tracemalloc.get_traced_memory()[0] - base
        del element
        gc.collect()
        after = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert with_element > 4 * 2**20 and after < 2**20, (with_element >> 10, after >> 10)


# -- what lxml is shown of a stream's declarations ----------------------------

LONG = "urn:x:" + "y" * 2000


def test_long_unused_declarations_are_not_shown_to_lxml():
    """libxml2 keeps every namespace name it parses: a header's long names
    reach it only with an element that may use them."""
    from jrouter.wire.xmlstream import NamespaceContext

    context = NamespaceContext(LONG + "d", {"stream": STREAMS_NS, "p": LONG + "p"})
    sasl = b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AA==</auth>"
    assert LONG.encode() not in context._opening_for(sasl)
    assert context.parse(sasl).tag == "{urn:ietf:params:xml:ns:xmpp-sasl}auth"
    # what an element does use is declared, and means what it meant
    tree = context.parse(b"<route><p:x/></route>")
    assert tree.tag == "{%sd}route" % LONG and tree[0].tag == "{%sp}x" % LONG
    # an xmlns= inside an attribute value is not a declaration
    assert context.parse(b"<r a=' xmlns=\"q\"'/>").tag == "{%sd}r" % LONG


def test_unique_long_header_namespaces_do_not_grow_the_process():
    """2,000 streams, each a header with its own 15 KB namespace names and an
    element parsed with lxml (as SASL's <auth/> is): RSS stays flat."""
    from jrouter.wire.xmlstream import NamespaceContext

    def rss_kib():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))

    sasl = b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AA==</auth>"
    before = rss_kib()
    for n in range(2000):
        unique = "urn:u:%d:" % n + "z" * 15000
        NamespaceContext(unique, {"stream": STREAMS_NS, "q": unique + "q"}).parse(sasl)
    assert rss_kib() - before < 8 * 1024       # all shown to lxml: ~60 MiB
