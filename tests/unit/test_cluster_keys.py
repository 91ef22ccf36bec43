"""jrouter.cluster.keys: the cluster table's keys and values in etcd, one spelling each."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jrouter.cluster.keys import (
    KINDS, DefaultKey, DefaultValue, Layout, LayoutError, LogKey, LogValue, MemberKey, MemberValue,
    NodeKey, NodeValue, OwnerValue, UniqueKey, decode_value, encode_value, prefix_end)

LAYOUT = Layout("prod")

# Any text but the empty string (Hypothesis leaves out lone surrogates, which are not Unicode).
TEXT = st.text(min_size=1, max_size=20)
# Text made mostly of the characters that need care.
TRICKY = st.text(alphabet=st.sampled_from("a.-_~@:/%+ é\u2603A%2F"), min_size=1, max_size=12)
SEGMENT = st.one_of(TEXT, TRICKY)
KEYS = st.one_of(
    st.builds(NodeKey, SEGMENT),
    st.builds(MemberKey, SEGMENT, SEGMENT, SEGMENT),
    st.builds(UniqueKey, SEGMENT),
    st.just(DefaultKey()),
    st.builds(LogKey, SEGMENT, SEGMENT, SEGMENT))
TIME = st.floats(allow_nan=False, allow_infinity=False)
VALUES = st.one_of(
    st.builds(NodeValue, TEXT, TIME, TEXT),
    st.builds(MemberValue, st.sampled_from(KINDS), st.none() | TEXT, TIME),
    st.builds(OwnerValue, TEXT, TEXT),
    st.builds(DefaultValue, TEXT, TEXT, TEXT),
    st.builds(LogValue, TIME))
KEY_OF = {NodeValue: NodeKey("n"), MemberValue: MemberKey("a", "n", "1"), OwnerValue: UniqueKey("a"),
          DefaultValue: DefaultKey(), LogValue: LogKey("a", "n", "1")}


# -- the layout ---------------------------------------------------------------

@pytest.mark.parametrize("key, raw", [
    (NodeKey("node1"), b"/jrouter/prod/nodes/node1"),
    (MemberKey("example.com", "node1", "c17"), b"/jrouter/prod/members/example.com/node1/c17"),
    (UniqueKey("sm"), b"/jrouter/prod/unique/sm"),
    (DefaultKey(), b"/jrouter/prod/default"),
    (LogKey("sm", "node2", "c3"), b"/jrouter/prod/logs/sm/node2/c3"),
    (NodeKey("rack/1 %x"), b"/jrouter/prod/nodes/rack%2F1%20%25x"),
    (NodeKey("Host:5347@dc"), b"/jrouter/prod/nodes/Host:5347@dc"),
    (UniqueKey("bücher.example"), b"/jrouter/prod/unique/b%C3%BCcher.example"),
])
def test_key_spelling(key, raw):
    """Each key type has the documented spelling; '/', '%', spaces and non-ASCII are escaped."""
    assert LAYOUT.key(key) == raw
    assert LAYOUT.parse(raw) == key


def test_cluster_name_is_escaped_too():
    """The cluster name is one segment, so 'a/b' cannot reach into cluster 'a'."""
    assert Layout("a/b").prefix == b"/jrouter/a%2Fb/"
    assert Layout("a").prefix == b"/jrouter/a/"


@pytest.mark.parametrize("raw", [
    b"/jrouter/prod/nodes/a%2fb",            # lower-case hex
    b"/jrouter/prod/nodes/%61",              # 'a' need not be escaped
    b"/jrouter/prod/nodes/a%2",              # cut escape
    b"/jrouter/prod/nodes/a%zz",
    b"/jrouter/prod/nodes/a b",              # a space must be %20
    b"/jrouter/prod/nodes/%FF",              # not UTF-8
    "/jrouter/prod/nodes/é".encode(),        # not ASCII
    b"/jrouter/prod/nodes/",                 # empty segment
    b"/jrouter/prod/nodes",
    b"/jrouter/prod/nodes/a/b",              # one segment too many
    b"/jrouter/prod/members/example.com/n",  # one too few
    b"/jrouter/prod/default/x",
    b"/jrouter/prod/routes/x",               # unknown section
    b"/jrouter/other/nodes/a",               # another cluster
    b"/jrouter/prodx/nodes/a",
])
def test_foreign_keys_refused(raw):
    """A key not spelled exactly as encoding spells it is refused, with a reason."""
    with pytest.raises(LayoutError):
        LAYOUT.parse(raw)


@pytest.mark.parametrize("key", [NodeKey(""), MemberKey("a", "", "1"), UniqueKey("\ud800")])
def test_unwritable_segments(key):
    """Empty segments and lone surrogates cannot be written."""
    with pytest.raises(LayoutError):
        LAYOUT.key(key)


@settings(max_examples=300)
@given(KEYS, SEGMENT)
def test_keys_round_trip(key, cluster):
    """parse(key(k)) == k for every key of every cluster, and keys stay ASCII."""
    layout = Layout(cluster)
    raw = layout.key(key)
    assert raw.startswith(layout.prefix)
    raw.decode("ascii")
    assert layout.parse(raw) == key


@settings(max_examples=300)
@given(st.binary(max_size=30) | st.text(alphabet="ab%2F/5Ac", max_size=12).map(str.encode),
       st.sampled_from(["nodes/", "members/a/", "unique/", "logs/x/y/", ""]))
def test_parse_accepts_only_canonical_keys(tail, section):
    """Whatever bytes parse as a key are exactly that key's spelling: one key, one spelling."""
    raw = LAYOUT.prefix + section.encode() + tail
    try:
        key = LAYOUT.parse(raw)
    except LayoutError:
        return
    assert LAYOUT.key(key) == raw


@settings(max_examples=200)
@given(KEYS, SEGMENT, SEGMENT)
def test_clusters_do_not_overlap(key, one, other):
    """No key of one cluster starts with another cluster's prefix (watches stay apart)."""
    if one != other:
        assert not Layout(other).key(key).startswith(Layout(one).prefix)


@settings(max_examples=200)
@given(SEGMENT, SEGMENT, SEGMENT, SEGMENT)
def test_members_prefix_covers_one_name(name, other, node, member):
    """members_prefix(name) covers name's member keys and no other name's (the uniqueness compare)."""
    assert LAYOUT.key(MemberKey(name, node, member)).startswith(LAYOUT.members_prefix(name))
    if other != name:
        assert not LAYOUT.key(MemberKey(other, node, member)).startswith(LAYOUT.members_prefix(name))


def test_prefix_end():
    """etcd's range end: the prefix with its last byte incremented (0xff carried)."""
    assert prefix_end(b"/jrouter/prod/") == b"/jrouter/prod0"
    assert prefix_end(b"a\xff\xff") == b"b"
    assert prefix_end(b"\xff") == b"\0"


# -- values -------------------------------------------------------------------

def test_value_spelling():
    """Values are compact JSON with sorted fields, ASCII only."""
    assert encode_value(NodeValue("10.0.0.1:5348", 1700000000.5, "0.1.0")) == \
        b'{"address":"10.0.0.1:5348","started":1700000000.5,"version":"0.1.0"}'
    assert encode_value(MemberValue("multi-to", None, 2.0)) == \
        b'{"bound":2.0,"identity":null,"kind":"multi-to"}'
    assert encode_value(OwnerValue("n\u00e9", "c1")) == b'{"member":"c1","node":"n\\u00e9"}'


@settings(max_examples=300)
@given(VALUES)
def test_values_round_trip(value):
    """decode(encode(v)) == v for every value type."""
    assert decode_value(KEY_OF[type(value)], encode_value(value)) == value


def test_unknown_fields_are_ignored():
    """A newer version's extra fields do not make a value unreadable."""
    raw = b'{"kind":"single","identity":"sm1","bound":5,"weight":3}'
    assert decode_value(MemberKey("a", "n", "1"), raw) == MemberValue("single", "sm1", 5.0)


@pytest.mark.parametrize("raw", [
    b"", b"not json", b"[]", b"null", b"\xff\xfe",
    b'{"kind":"single","identity":null}',                       # no bound
    b'{"kind":"multi","identity":null,"bound":1}',              # unknown kind
    b'{"kind":"single","identity":"","bound":1}',               # empty identity
    b'{"kind":"single","identity":7,"bound":1}',
    b'{"kind":"single","identity":null,"bound":true}',          # a bool is no time
    b'{"kind":"single","identity":null,"bound":"1"}',
    b'{"kind":"single","identity":null,"bound":NaN}',
    b'{"kind":"single","identity":null,"bound":1e400}',         # infinite
    b'{"kind":"single","identity":null,"bound":1' + b"0" * 400 + b"}",
    b"[" * 100000,
])
def test_bad_member_values_refused(raw):
    """A value with a missing, mistyped or out-of-range field is refused with a reason."""
    with pytest.raises(LayoutError):
        decode_value(MemberKey("a", "n", "1"), raw)


def test_values_validated_when_written():
    """A node cannot write what the others would refuse to read."""
    with pytest.raises(LayoutError):
        MemberValue("multi", None, 1.0)
    with pytest.raises(LayoutError):
        OwnerValue("", "c1")
    with pytest.raises(ValueError):
        encode_value(NodeValue("h:1", float("nan"), "1"))


def test_value_type_follows_key():
    """The same bytes read under another key type must have that type's fields."""
    raw = encode_value(OwnerValue("n", "c1"))
    assert decode_value(UniqueKey("sm"), raw) == OwnerValue("n", "c1")
    with pytest.raises(LayoutError):
        decode_value(DefaultKey(), raw)
    assert json.loads(encode_value(DefaultValue("s2s", "n", "c1"))) == \
        {"name": "s2s", "node": "n", "member": "c1"}
