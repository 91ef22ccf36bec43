"""Stateful fuzzing of both protocols' sans-IO layers (issue 10, item 6).

Hypothesis drives up to three "subject" connections of either protocol
through one in-memory router (``harness.Network``), with valid steps (stream
header, SASL DIGEST-MD5, handshake, bind, unbind, routes, stanzas, throttle,
close) and hostile ones (random bytes, XML-ish junk, truncated, oversize and
deep elements, wrong secrets, steps out of order, stream restarts, other
encodings), each cut into random chunks, while the clock moves. Two
bystanders, an sm (jabberd2 protocol) and an XEP-0114 component, route to each
other throughout. After every step:

* ``Connection.receive`` raised nothing but ``ConnectionClosed``;
* a stream that ended says goodbye: its output ends with ``</stream:stream>``,
  after a stream error carrying the condition when it was a protocol error
  (a peer that sent ``<stream:error/>`` itself is closed without a word,
  protocol §3.3);
* the bystanders still route both ways, and everything the router sent them
  is well-formed and parses with lxml;
* nothing outlives a disconnect: ``router.connections``, route members and
  log sinks are live connections only, and the context-key cache grows only
  with authenticated subjects; at the end the subjects' connections are
  garbage once disconnected.

Bounded for CI: a few seconds (``FUZZ_SETTINGS``). Names over 50,000
characters (what lxml's default parser refuses) are left to
test_deep_nesting.py: generating them here would make every example slow.
"""

import base64
import gc
import hashlib
import os
import re
import sys
import weakref

import pytest

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from jrouter.errors import ConnectionClosed
from jrouter.testing.sasl_client import DigestMD5Client
from jrouter.wire.xmlstream import MAX_DEPTH, STREAMS_NS, Element, StreamReader
from jrouter.wire.xmlwrite import STREAM_CLOSE, quoteattr

from .harness import NS_ACCEPT, NS_C, NS_SASL, Network, header

# Every test here once with each framer (tests/unit/conftest.py).
pytestmark = pytest.mark.usefixtures("framer")

NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"
STANZA_LIMIT = 8192
SUBJECT_NAMES = ("s1.example.com", "s2.example.com", "lalias.example.com", "legacy.example.com")
ADDRESSES = SUBJECT_NAMES + ("example.com", "other.example.com", "u@example.com/r",
                             "nowhere.example.net", "", "a@b@c", "x" * 40)
# JROUTER_FUZZ_EXAMPLES=2000 runs longer, by hand.
FUZZ_SETTINGS = settings(max_examples=int(os.environ.get("JROUTER_FUZZ_EXAMPLES", 30)),
                         stateful_step_count=25, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- what a subject may send -------------------------------------------------------

def attributes(pairs):
    return b"".join(b" %s=%s" % (name.encode(), quoteattr(value).encode()) for name, value in pairs)


ATTRIBUTES = st.lists(st.tuples(
    st.sampled_from(["to", "from", "type", "id", "name", "multi", "error", "xmlns", "xmlns:c", "c:a"]),
    st.sampled_from(ADDRESSES + ("jabber:client", NS_ACCEPT, NS_C, "broadcast", "error", "a'b\"<&>"))),
    max_size=4, unique_by=lambda pair: pair[0]).map(attributes)
LEAVES = st.sampled_from([b"", b"text", b"&amp;&lt;", b"&#x263A;", "caf\u00e9".encode(), b"<!-- c -->",
                          b"<![CDATA[<x/>]]>", b"<?pi data?>", b"<d/>", b"  \n"])
TAGS = st.sampled_from([b"stream:error", b"message", b"iq", b"presence", b"body", b"x", b"c:message", b"query", b"d",
                        b"error", b"handshake", b"bind", b"route", b"default", b"log"])


def _element(parts):
    tag, attrs, children = parts
    return b"<%s%s>%s</%s>" % (tag, attrs, b"".join(children), tag) if children else b"<%s%s/>" % (tag, attrs)


FRAGMENTS = st.recursive(LEAVES, lambda kids: st.tuples(TAGS, ATTRIBUTES, st.lists(kids, max_size=3))
                         .map(_element), max_leaves=8)
JUNK = st.one_of(st.binary(max_size=48),
                 st.text(alphabet="<>/='\"! ?:&;#x1abcdsmxln-[]\u00e9\x00", max_size=60).map(str.encode))


def nest(levels, leaf=b""):
    return b"<d>" * levels + leaf + b"</d>" * levels


def deep(levels):
    return st.sampled_from([b"<bind name='s1.example.com'>%s</bind>",
                            b"<route to='example.com' from='s1.example.com'>%s</route>",
                            b"<message to='u@example.com' from='b@legacy.example.com'>%s</message>",
                            b"<message xmlns='jabber:component:accept' to='u@example.com' "
                            b"from='b@legacy.example.com'>%s</message>",
                            b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>%s</auth>",
                            b"<handshake>%s</handshake>"]).map(lambda outer: outer % nest(levels))


def split(data, cuts):
    """``data`` in pieces, cut where ``cuts`` say (any integers)."""
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:]) if b > a]


CUTS = st.lists(st.integers(0, 1 << 20), max_size=4)
SUBJECT = st.integers(0, 2)


# -- one fuzzed connection -----------------------------------------------------------

class Subject:
    """A connection the fuzzer writes for, and everything the router told it."""

    def __init__(self, net, protocol, name):
        self.net = net
        self.protocol = protocol
        self.name = name
        self.connection = net.router.connect("127.0.0.1", next(net._ports))
        self.connection.connected_at = net.now
        self.output = bytearray()
        self.ended = False
        self.condition = None        # of the ConnectionClosed, when it had one
        self.sasl = None
        self.sasl_mark = 0           # where in output the SASL exchange began
        self.was_authenticated = False
        # How the stream ended first, if not by a protocol error (Connection.fail).
        self.ended_by = []
        for way in ("peer_stream_error", "close", "kick"):
            self._watch(way)

    def _watch(self, way):
        original = getattr(self.connection, way)

        def watched(*args):
            self.ended_by.append(way)
            return original(*args)

        setattr(self.connection, way, watched)

    def send(self, data, cuts):
        """Feed ``data`` in pieces, as reads from a socket; the shell's part
        (take the output, route again what the dead left) after each."""
        for piece in split(data, cuts):
            if self.ended:
                return                  # the shell has closed the socket
            try:
                self.connection.receive(piece, self.net.now)
            except ConnectionClosed as exc:   # anything else fails the test
                self.ended = True
                self.condition = exc.args[0] if exc.args else None
            self.collect()

    def collect(self):
        connection = self.connection
        data = connection.data_to_send()
        connection.outbox.sent(len(data))
        self.output += data
        self.was_authenticated |= connection.authenticated
        if connection.closing:
            self.ended = True
        self.net.settle()

    def goodbye_said(self):
        """The stream ended the way house rule 3 says."""
        first = self.ended_by[0] if self.ended_by else None
        if first == "peer_stream_error":
            return True                 # closed without a word (protocol §3.3)
        output = bytes(self.output)
        assert output.endswith(STREAM_CLOSE), output[-300:]
        # After our </stream:stream> (a close, a kick) nothing more can be said.
        if self.condition is not None and first is None:
            error = output[output.rfind(b"<stream:error"):]
            assert b"<%s xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" % self.condition.encode() in error, \
                (self.condition, output[-300:])
        return True

    def output_parses(self):
        """Everything the router sent is well-formed XML that lxml parses, stream
        by stream (a new one begins after SASL's <success/>)."""
        for stream in bytes(self.output).split(b"</success>"):
            reader = StreamReader(max_depth=MAX_DEPTH + 1)
            for event in reader.feed(stream):
                if isinstance(event, Element):
                    event.tree()
        return True

    # -- the valid steps' bytes -------------------------------------------------

    def opening(self, version, extra):
        if self.protocol == "jabberd2":
            opening = header(NS_C, version=version)
        else:
            opening = header(NS_ACCEPT, version=version, to=self.name)
        return opening[:-1] + extra + b">"

    def auth(self, user, password):
        self.sasl = DigestMD5Client(user, password, cnonce="0123456789abcdef")
        self.sasl_mark = len(self.output)
        return b"<auth xmlns='%s' mechanism='DIGEST-MD5'/>" % NS_SASL.encode()

    def response(self):
        """The answer to the last challenge: the digest, or nothing after rspauth."""
        challenge = self.challenge()
        answer = b""
        if self.sasl is not None and challenge is not None and b"rspauth=" not in challenge:
            answer = base64.b64encode(self.sasl.respond(challenge))
        return b"<response xmlns='%s'>%s</response>" % (NS_SASL.encode(), answer)

    def handshake(self, secret):
        digest = hashlib.sha1(((self.connection.stream_id or "") + secret).encode()).hexdigest()
        return b"<handshake>%s</handshake>" % (digest.encode() if secret else b"short")

    def challenge(self):
        """The payload of the last SASL challenge since the exchange began."""
        found = re.findall(rb"<challenge xmlns='%s'>([^<]*)</challenge>" % NS_SASL.encode(),
                           bytes(self.output[self.sasl_mark:]))
        return base64.b64decode(found[-1]) if found else None


class Bystander:
    """A peer that must keep working, and a reader for all the router sends it."""

    def __init__(self, peer, default_ns):
        self.peer = peer
        # The router wraps an XEP-0114 stanza into a <route/>: one level more
        # than its reader takes (MAX_DEPTH).
        self.reader = StreamReader(max_depth=MAX_DEPTH + 1)
        self.reader.feed(b"<stream:stream xmlns:stream='%s' xmlns='%s'>" % (STREAMS_NS.encode(),
                                                                             default_ns.encode()))

    def received(self):
        """What arrived since the last look, as elements: well-formed, and each
        parses with lxml (its tree)."""
        elements = [e for e in self.reader.feed(self.peer.raw()) if isinstance(e, Element)]
        for element in elements:
            element.tree()
        return elements


# -- the machine -------------------------------------------------------------------------

class ConnectionFuzzer(RuleBasedStateMachine):
    """Both protocols, valid and hostile steps, random chunks; the invariants above."""

    check_garbage = True    # teardown collects garbage (scripts/jrouter-fuzz: now and then)

    def __init__(self):
        super().__init__()
        self.net = Network(stanza_size_limit=STANZA_LIMIT)
        sm = self.net.component("example.com")
        other = self.net.legacy("other.example.com")
        self.sm = Bystander(sm, NS_C)
        self.other = Bystander(other, NS_ACCEPT)
        self.sm.received()
        self.subjects = []           # live ones
        self.gone = []               # weak references to disconnected subjects' connections
        self.authenticated_ever = 0
        self.probes = 0

    def pick(self, index):
        return self.subjects[index % len(self.subjects)]

    def send(self, index, data, cuts):
        self.step(self.pick(index), data, cuts)

    def step(self, subject, data, cuts):
        if not subject.ended:
            subject.send(data, cuts)
            self.settle(subject)

    def settle(self, subject):
        if subject.ended:
            assert subject.goodbye_said() and subject.output_parses()
            self.net.router.disconnect(subject.connection, self.net.now)
            self.net.settle()
            self.subjects.remove(subject)
            self.authenticated_ever += subject.was_authenticated
            self.gone.append(weakref.ref(subject.connection))

    # -- valid steps ------------------------------------------------------------

    @precondition(lambda self: len(self.subjects) < 3)
    @rule(protocol=st.sampled_from(["jabberd2", "xep0114"]), name=st.sampled_from(SUBJECT_NAMES),
          start=st.sampled_from(["fresh", "opened", "authenticated", "authenticated", "bound"]),
          cuts=CUTS)
    def connect(self, protocol, name, start, cuts):
        """A new subject, taken through the valid steps as far as ``start`` says
        (most hostile steps end a stream that is not open yet)."""
        subject = Subject(self.net, protocol, name)
        self.subjects.append(subject)
        if start != "fresh":
            self.step(subject, subject.opening(True, b""), cuts)
        if start in ("authenticated", "bound"):
            if protocol == "xep0114":
                self.step(subject, subject.handshake("secret"), cuts)
            else:
                self.step(subject, subject.auth("jabberd", "secret"), cuts)
                self.step(subject, subject.response(), cuts)     # the digest
                if b"<success" not in subject.output[subject.sasl_mark:]:
                    self.step(subject, subject.response(), cuts)  # rspauth came as a challenge
                self.step(subject, subject.opening(True, b""), cuts)
                assert subject.ended or subject.connection.authenticated
        if start == "bound" and protocol == "jabberd2":
            self.step(subject, b"<bind name='%s'/>" % name.encode(), cuts)

    @precondition(lambda self: self.subjects)
    @rule(index=SUBJECT, cuts=CUTS, version=st.booleans(), extra=st.sampled_from(
        [b"", b" xmlns:ack='http://x/ack'", b" xmlns:c='jabber:client'", b" from='i1'"]))
    def stream_header(self, index, cuts, version, extra):
        subject = self.pick(index)
        self.send(index, subject.opening(version, extra), cuts)

    @precondition(lambda self: self.subjects)
    @rule(index=SUBJECT, cuts=CUTS, password=st.sampled_from(["secret", "wrong"]),
          user=st.sampled_from(["jabberd", "logger", "nobody"]))
    def sasl_auth(self, index, cuts, password, user):
        self.send(index, self.pick(index).auth(user, password), cuts)

    @precondition(lambda self: self.subjects)
    @rule(index=SUBJECT, cuts=CUTS)
    def sasl_response(self, index, cuts):
        self.send(index, self.pick(index).response(), cuts)

    @precondition(lambda self: self.subjects)
    @rule(index=SUBJECT, cuts=CUTS, secret=st.sampled_from(["secret", "secret", "wrong", ""]))
    def handshake(self, index, cuts, secret):
        self.send(index, self.pick(index).handshake(secret), cuts)

    @precondition(lambda self: self.subjects)
    @rule(index=SUBJECT, cuts=CUTS, verb=st.sampled_from([b"bind", b"unbind"]),
          name=st.sampled_from(SUBJECT_NAMES + ("example.com", "", "a@b@c")),
          inner=st.sampled_from([b"", b"<default/>", b"<log/>", b"<default/><log/>"]),
          multi=st.booleans())
    def bind(self, index, cuts, verb, name, inner, multi):
        attrs = attributes([("name", name)] + ([("multi", "")] if multi else []))
        self.send(index, b"<%s%s>%s</%s>" % (verb, attrs, inner, verb), cuts)

    @precondition(lambda self: self.subjects)
    @rule(index=SUBJECT, cuts=CUTS, to=st.sampled_from(ADDRESSES), from_=st.sampled_from(ADDRESSES),
          kind=st.sampled_from([None, "broadcast", "other"]), payload=FRAGMENTS)
    def route(self, index, cuts, to, from_, kind, payload):
        attrs = attributes([("to", to), ("from", from_)] + ([("type", kind)] if kind else []))
        self.send(index, b"<route%s>%s</route>" % (attrs, payload), cuts)

    @precondition(lambda self: self.subjects)
    @rule(index=SUBJECT, cuts=CUTS, tag=st.sampled_from([b"message", b"iq", b"presence", b"c:message"]),
          to=st.sampled_from(ADDRESSES), from_=st.sampled_from(ADDRESSES), attrs=ATTRIBUTES,
          payload=FRAGMENTS)
    def stanza(self, index, cuts, tag, to, from_, attrs, payload):
        head = attributes([("to", to), ("from", from_)]) + attrs
        self.send(index, b"<%s%s>%s</%s>" % (tag, head, payload, tag), cuts)

    @precondition(lambda self: self.subjects)
    @rule(index=SUBJECT, cuts=CUTS, data=st.sampled_from([
        b"<throttle/>", STREAM_CLOSE, b"<starttls xmlns='%s'/>" % NS_TLS.encode(),
        b"<abort xmlns='%s'/>" % NS_SASL.encode(), b" ",
        b"<stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>"]))
    def control(self, index, cuts, data):
        self.send(index, data, cuts)

    @rule(seconds=st.sampled_from([1, 10, 31, 120]))
    def clock(self, seconds):
        net = self.net
        net.now += seconds
        net.router.tick(net.now)
        net.router.expire(net.now)
        for subject in list(self.subjects):
            subject.collect()
            self.settle(subject)

    # -- hostile steps ------------------------------------------------------------

    @precondition(lambda self: self.subjects)
    @rule(index=SUBJECT, cuts=CUTS, data=st.one_of(JUNK, FRAGMENTS))
    def junk(self, index, cuts, data):
        self.send(index, data, cuts)

    @precondition(lambda self: self.subjects)
    @rule(index=SUBJECT, cuts=CUTS, data=FRAGMENTS, keep=st.integers(0, 1 << 16))
    def truncated(self, index, cuts, data, keep):
        self.send(index, data[:keep % (len(data) + 1)], cuts)

    @precondition(lambda self: self.subjects)
    @rule(index=SUBJECT, cuts=CUTS, data=st.one_of(deep(MAX_DEPTH), deep(MAX_DEPTH - 1), deep(300)))
    def deep(self, index, cuts, data):
        self.send(index, data, cuts)

    @precondition(lambda self: self.subjects)
    @rule(index=SUBJECT, cuts=CUTS, size=st.sampled_from([STANZA_LIMIT - 200, STANZA_LIMIT + 1, 20000]),
          closed=st.booleans())
    def oversize(self, index, cuts, size, closed):
        body = b"<message to='u@example.com' from='b@s1.example.com'><body>" + b"x" * size
        self.send(index, body + (b"</body></message>" if closed else b""), cuts)

    @precondition(lambda self: self.subjects)
    @rule(index=SUBJECT, cuts=CUTS, data=st.sampled_from([
        b"<?xml version='1.0' encoding='ISO-8859-1'?>", "<?xml version='1.0'?><s>".encode("utf-16"),
        b"<!DOCTYPE x [<!ENTITY a 'b'>]>", b"<stream:stream xmlns:stream='%s'>" % STREAMS_NS.encode(),
        b"<x xmlns:p=''/>", b"<p:x/>", b"\xef\xbb\xbf", b"&#0;", b"\xff\xfe<\x00"]))
    def hostile_prologue(self, index, cuts, data):
        self.send(index, data, cuts)

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def bystanders_route_both_ways(self):
        self.probes += 1
        probe = b"p%d" % self.probes
        self.other.peer.send(b"<message to='u@example.com' from='bot@other.example.com' id='%s'/>" % probe)
        assert [e for e in self.sm.received() if e.child_attrs and e.child_attrs.get("id") == probe.decode()]
        self.sm.peer.send(b"<route to='other.example.com' from='example.com'><message xmlns='jabber:client' "
                          b"to='bot@other.example.com' from='u@example.com' id='%s'/></route>" % probe)
        assert [e for e in self.other.received() if e.attrs.get("id") == probe.decode()]
        for bystander in (self.sm, self.other):
            assert not bystander.peer.closed and bystander.peer.connection.authenticated

    @invariant()
    def nothing_outlives_a_disconnect(self):
        router = self.net.router
        live = {self.sm.peer.connection, self.other.peer.connection} | {s.connection for s in self.subjects}
        assert set(router.connections) == live
        for route in router.table.routes.values():
            assert all(member in live for member in route.members), route
        assert all(sink in live for sink in router.table.log_sinks.values())
        authenticated = self.authenticated_ever + sum(s.was_authenticated for s in self.subjects)
        assert len(router._context_keys) <= 4 + 2 * authenticated
        assert len(router.guard.failures) <= 2

    def hang_up(self, subject):
        self.net.router.disconnect(subject.connection, self.net.now)
        return weakref.ref(subject.connection)

    def teardown(self):
        while self.subjects:                 # the sockets go: the shell disconnects them
            assert self.subjects[-1].output_parses()
            self.gone.append(self.hang_up(self.subjects.pop()))
        self.net.settle()
        if self.check_garbage and sys.exc_info()[0] is None:   # a failing step's traceback holds its frames
            gc.collect()
            assert [ref for ref in self.gone if ref() is not None] == []


def test_connection_fuzzer(framer):
    """The machine, once with each framer (the module's pytestmark)."""
    run_state_machine_as_test(ConnectionFuzzer, settings=FUZZ_SETTINGS)


# -- defects the fuzzer found, as plain tests ------------------------------------------------

def test_a_name_bound_again_with_multi_is_gone_when_its_peer_is():
    """Found by ConnectionFuzzer: <bind name='x'/> then <bind name='x' multi=''/> on one
    connection; after it disconnects, the route still lists the dead connection, and
    packets for x vanish (neither delivered nor bounced)."""
    net = Network()
    component = net.component("s1.example.com")
    component.send(b"<bind name='s1.example.com' multi=''/>")
    component.take()
    component.hang_up()
    route = net.router.table.routes.get("s1.example.com")
    assert route is None or component.connection not in route.members
    sm = net.component("example.com")
    sm.send(b"<route to='s1.example.com' from='example.com'><message xmlns='jabber:client'/></route>")
    (bounce,) = [s for s in sm.stanzas() if s.tag == "{%s}route" % NS_C]
    assert bounce.get("error") == "404"
