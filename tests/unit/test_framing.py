"""The two framers (jrouter/wire/framing.py) against each other, and the C one alone.

Every reader test runs on both (tests/unit/conftest.py). Here: the same
events and the same errors from the two for generated streams, cut
anywhere and damaged anywhere; what the C type does with calls no reader
makes; and memory that stays flat over many stanzas with it.
"""

import gc
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from jrouter.wire import framing
from jrouter.wire.lxml_side import KNOWN_URIS, uri_refused
from jrouter.wire.xmlstream import Element, StreamError, StreamReader

from .conftest import FRAMER_NAMES

HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' "
          b"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' to='c'>")


def c_framer():
    if "c" not in framing.FRAMERS:
        pytest.fail("the C framer is not built here (setup.py builds it for CPython)")
    return framing.FRAMERS["c"]


# -- generated streams ----------------------------------------------------------------------

NAMES = st.sampled_from(["message", "iq", "body", "x", "db:result", "p:q", "route", "a"])
VALUES = st.text(alphabet="ab <>&'\"\u00e9\U0001f600", max_size=6)


def _quote(value):
    escaped = value.replace("&", "&amp;").replace("<", "&lt;").replace("'", "&apos;")
    return "'" + escaped + "'"


@st.composite
def elements_text(draw, depth=0):
    name = draw(NAMES)
    attrs = draw(st.dictionaries(st.sampled_from(["to", "from", "id", "type", "xml:lang"]), VALUES, max_size=3))
    decls = ""
    if name.startswith("p:") or draw(st.booleans()) and depth > 0:
        decls = " xmlns:p=" + _quote(draw(st.sampled_from(["urn:p", "urn:q", "http://x/y"])))
    if draw(st.booleans()):
        decls += " xmlns=" + _quote(draw(st.sampled_from(["jabber:client", "urn:x", ""])))
    start = "<" + name + decls + "".join(f" {k}={_quote(v)}" for k, v in attrs.items())
    children = draw(st.lists(elements_text(depth + 1), max_size=3)) if depth < 4 else []
    text = draw(st.sampled_from(["", "hi", " x &amp; y ", "&lt;b&gt;", "a>b"]))
    if not children and not text and draw(st.booleans()):
        return start + draw(st.sampled_from(["/>", " />"]))
    end = "</" + name + draw(st.sampled_from(["", "  "])) + ">"
    return start + ">" + text + "".join(children) + end


STREAMS = st.lists(elements_text(), min_size=1, max_size=6).map(
    lambda stanzas: HEADER + " ".join(stanzas).encode() + b"</stream:stream>")


def outcome(framer, data, cuts, renew_after=1 << 18, max_element_size=0):
    """What a reader with ``framer`` makes of ``data`` fed in pieces cut at ``cuts``."""
    reader = StreamReader(max_element_size=max_element_size, renew_after=renew_after, framer=framer)
    seen = []
    start = 0
    try:
        for point in sorted(set(cut % (len(data) + 1) for cut in cuts)) + [len(data)]:
            seen += [describe(e) for e in reader.feed(data[start:point])]
            start = point
    except StreamError as exc:
        seen += [describe(e) for e in exc.events]
        seen.append(("error", exc.condition, exc.text))
    return seen


def describe(event):
    if isinstance(event, Element):
        return (event.name, event.attrs, event.raw, event.child_name, event.child_attrs,
                event.child_start, event.child_mark, event.first_child(), event.end)
    return (type(event).__name__, getattr(event, "attrs", None), getattr(event, "prefixes", None))


CASES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@CASES
@given(STREAMS, st.lists(st.integers(min_value=0, max_value=4000), max_size=12))
def test_both_framers_make_the_same_events(data, cuts):
    expected = outcome(framing.ExpatFramer, data, cuts)
    assert expected[-1][0] == "StreamClose", expected[-1]
    assert outcome(c_framer(), data, cuts) == expected


@CASES
@given(STREAMS, st.lists(st.integers(min_value=0, max_value=4000), max_size=8),
       st.integers(min_value=20, max_value=400))
def test_both_framers_make_the_same_events_when_renewed_and_limited(data, cuts, every):
    """Renewed every few bytes, with a size limit that some stanzas pass."""
    expected = outcome(framing.ExpatFramer, data, cuts, renew_after=every, max_element_size=every)
    assert outcome(c_framer(), data, cuts, renew_after=every, max_element_size=every) == expected


DAMAGE = st.lists(st.tuples(st.integers(min_value=0, max_value=4000),
                            st.sampled_from([b"<", b">", b"&", b"'", b"\x00", b"\xff", b"</a>", b"<!DOCTYPE a>",
                                             b"<x:y/>", b"<a xmlns='a{b}'/>", b"<?xml version='1.0'?>", b"]]>",
                                             b"<a b='1' b='2'/>", b"&#0;", b""])),
                  min_size=1, max_size=3)


@CASES
@given(STREAMS, DAMAGE, st.lists(st.integers(min_value=0, max_value=4000), max_size=8))
def test_both_framers_refuse_the_same_damage_the_same_way(data, damage, cuts):
    """Bytes inserted anywhere: the same events before the same stream error."""
    for at, what in damage:
        at %= len(data) + 1
        data = data[:at] + what + data[at:]
    assert outcome(c_framer(), data, cuts) == outcome(framing.ExpatFramer, data, cuts)


@pytest.mark.parametrize("name", FRAMER_NAMES)
def test_deep_unknown_and_refused_namespaces(name):
    """Declarations anywhere are vetted, the ones taken remembered; a refused
    name is refused wherever it comes (the C framer's cache holds only taken ones)."""
    for uri in ("urn:fresh:1", "urn:fresh:2"):
        KNOWN_URIS.discard(uri)
    framer = framing.FRAMERS[name]
    reader = StreamReader(framer=framer)
    reader.feed(HEADER)
    for _ in range(3):
        (element,) = reader.feed(b"<a><b><c xmlns='urn:fresh:1'><d xmlns:z='urn:fresh:2'/></c></b></a>")
        assert element.child_name == "jabber:component:accept b"
    assert {"urn:fresh:1", "urn:fresh:2"} <= KNOWN_URIS
    for _ in range(2):
        reader = StreamReader(framer=framer)
        reader.feed(HEADER + b"<a><b xmlns='urn:fresh:1'/></a>")
        with pytest.raises(StreamError) as caught:
            reader.feed(b"<a><b><c xmlns='a{b}'/></b></a>")
        assert (caught.value.condition, caught.value.text) == ("xml-not-well-formed", "namespace name is not a URI")
    assert not uri_refused("urn:fresh:1") and uri_refused("a{b}")


# -- the C type, called as no reader calls it --------------------------------------------

def test_the_c_framer_refuses_wrong_calls():
    framer_type = c_framer()
    framer = framer_type(128, KNOWN_URIS, uri_refused, StreamError)
    with pytest.raises(TypeError):
        framer.parse("text", b"", 0, [])
    with pytest.raises(TypeError):
        framer.parse(b"<a>", b"", 0, ())
    with pytest.raises(TypeError):
        framer.parse(b"<a>")
    with pytest.raises(TypeError):
        framer_type(128, list(KNOWN_URIS), uri_refused, StreamError)
    with pytest.raises(TypeError):
        framer.__init__(128, KNOWN_URIS, uri_refused, StreamError)     # made once
    with pytest.raises(TypeError):
        framer_type.__new__(framer_type).parse(b"<a>", b"", 0, [])     # never made
    framer.parse(b"<a><b", b"", 0, [])
    assert framer.depth == 1
    with pytest.raises(StreamError):
        framer.parse(b"</c>", b"", 0, [])
    with pytest.raises(ValueError):
        framer.parse(b"<b/>", b"", 0, [])          # after a failure: never read again


def test_the_c_framer_passes_on_what_its_callbacks_raise():
    """An exception from the namespace check (or the error class) ends the
    parse with that exception, and later handlers do nothing."""
    class Broken(Exception):
        pass

    def refused(uri):
        raise Broken(uri)

    framer = c_framer()(128, set(), refused, StreamError)
    frames = []
    with pytest.raises(Broken):
        framer.parse(b"<s xmlns='urn:s'><a/></s>", b"", 0, frames)
    assert frames == []
    framer = c_framer()(128, set(KNOWN_URIS), uri_refused, lambda c, t: Broken(c))
    with pytest.raises(Broken, match="restricted-xml"):
        framer.parse(b"<!DOCTYPE s><s/>", b"", 0, [])


def test_the_c_framer_frames_offsets_as_documented():
    frames = []
    framer = c_framer()(128, KNOWN_URIS, uri_refused, StreamError)
    data = b"<s xmlns='jabber:client' xmlns:p='urn:p'>  <a x='1'><b y='2'>t</b><c/></a ><e/></s>"
    framer.parse(data, b"", 0, frames)
    header, a, e, close = frames
    assert header == ("jabber:client s", {}, [(None, "jabber:client"), ("p", "urn:p")], 0)
    start, end = data.index(b"<a"), data.index(b"<e")
    assert a == (start, end, "jabber:client a", {"x": "1"}, "jabber:client b", {"y": "2"},
                 data.index(b"<b") - start, data.index(b"</b>") - start)
    assert e == (end, end + 4, "jabber:client e", {}, None, None, 0, 0)
    assert close is None


def test_memory_stays_flat_over_many_stanzas_with_the_c_framer():
    """Every name and attribute dict the C framer makes goes with its
    element: 60,000 stanzas, with renewals, leave nothing behind."""
    reader = StreamReader(framer=c_framer())
    reader.feed(HEADER)
    chunk = b"".join(b"<message to='u%d@c' from='v@d' id='%d'><body>hi</body><x xmlns='urn:x' a='b'/></message>"
                     % (i, i) for i in range(100))

    def run(rounds):
        for _ in range(rounds):
            assert len(reader.feed(chunk)) == 100

    run(50)                                   # warm: caches, the first renewals
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        run(600)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert after - before < 64 * 1024, after - before
