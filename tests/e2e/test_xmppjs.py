"""End to end: xmpp.js, an XEP-0114 component from another ecosystem, behind the router.

The component is tests/support/xmppjs/echo.mjs: `@xmpp/component` used as a
JavaScript application would, repairing nothing. It serves
`echo.example.test`; real slixmpp users reach it through Debian's c2s and sm,
so every stanza crosses the router twice. Each test runs once per router
kind and asserts what a correct router must deliver; where Debian's C router
does otherwise, the test asserts what it does instead and says that the
defect is jabberd2's, so a change in either router shows up here.

What xmpp.js 0.13.1 does, read in its source and seen on the wire:
* It opens `jabber:component:accept` with `version='1.0'`. After the
  router's stream header it sends `<handshake/>` and takes the *next*
  top-level element for the answer. jabberd2 offers `<stream:features>` with
  SASL DIGEST-MD5 to any stream that says version 1.0, XEP-0114 streams too;
  xmpp.js takes the features for the answer, reports "Unexpected server
  response" and never comes online (no JID of its own), although the router
  accepted the handshake that follows and routes to it.
* Its parser is not namespace-aware: 'stanza' is emitted for any top-level
  iq/message/presence whatever its namespace, `stanza.is('message')` matches,
  and the middleware and iq-callee dispatch by element name (and by the
  payload's own namespace), so stanzas in `jabber:client` are served
  as if they were in `jabber:component:accept`; only `stanza.getNS()` (and so
  `stanza.is('message', 'jabber:component:accept')`) tells them apart.
"""

import pytest
from slixmpp.exceptions import IqError

from tests.support.xmpp import Clients, run
from tests.support.xmppjs_component import XmppJsComponent

try:  # failure reports then show the component's log, like the routers' and jabberd2's
    from tests.conftest import _track
except ImportError:  # pragma: no cover - conftest imported under another name
    def _track(request, thing):
        pass

DOMAIN = "example.test"
ECHO = "echo." + DOMAIN
ACCEPT = "jabber:component:accept"
CLIENT = "jabber:client"
DISCO_INFO = "http://jabber.org/protocol/disco#info"
VERSION = "jabber:iq:version"
USERS = {"alice@%s/home" % DOMAIN: "alice-pw", "bob@%s/work" % DOMAIN: "bob-pw"}
ALICE, BOB = USERS


@pytest.fixture
def echo(request, tmp_path, router):
    """A started xmpp.js echo component serving ECHO on `router` (stopped before it)."""
    component = XmppJsComponent(tmp_path / "xmppjs", ECHO, router)
    _track(request, component)
    yield component.start()
    component.stop()


def delivered_in(router_kind):
    """The namespace a component must get its stanzas in.

    XEP-0114: the component's stream is `jabber:component:accept`. jabberd2
    writes the sm's `<message xmlns='jabber:client'>` onto it unchanged
    (jabberd2's defect, kept here as what the C router does).
    """
    return CLIENT if router_kind == "jabberd2" else ACCEPT


async def log_in(clients):
    """Register alice and bob, log them in and make them available: (alice, bob)."""
    for jid, password in USERS.items():
        await clients.register(jid.split("/")[0], password)
    alice, bob = [await clients.login(jid, pw) for jid, pw in USERS.items()]
    for client in (alice, bob):
        client.send_presence()
    return alice, bob


def body(text):
    return lambda m: m["body"] == text


async def echoed(client, text, sender=ECHO):
    """Wait for the component's echo of `text`, from `sender`."""
    reply = await client.wait_for("message", body("echo: " + text))
    assert str(reply["from"]) == sender, reply
    return reply


def test_handshake(router, router_kind, echo):
    """xmpp.js opens with version='1.0', gets no stream features, and comes online; the C router offers SASL and xmpp.js never does."""
    assert "[%s] online" % ECHO in router.log_text  # the router bound the name either way
    if router_kind == "jabberd2":
        # jabberd2's defect: SASL offered on an XEP-0114 stream; xmpp.js takes
        # the features for the handshake's answer and stays offline.
        assert echo.stream_header()["version"] == "1.0"
        assert echo.nonzas() == [
            "nonza stream:features ns=http://etherx.jabber.org/streams mechanisms=DIGEST-MD5",
            "nonza handshake ns=%s" % ACCEPT]
        assert echo.errors() == ["error Unexpected server response",
                                 "start failed: Unexpected server response"]
        assert not echo.online()
    else:
        echo.wait_for(echo.online, 5.0, "online")
        assert echo.nonzas() == ["nonza handshake ns=%s" % ACCEPT]
        assert echo.errors() == []


def test_messages_are_echoed(router_kind, jabberd2_stack, echo):
    """Users' messages to the component's domain and to a node at it arrive once, in the accept namespace, and are echoed with exact bodies and types."""
    texts = ["hello", "Grüße & <tags> ✓", "second line\nand a third"]

    async def scenario():
        async with Clients(jabberd2_stack.c2s_ip, jabberd2_stack.c2s_port) as clients:
            alice, bob = await log_in(clients)
            for text in texts:
                alice.send_message(mto=ECHO, mbody=text, mtype="chat")
            for text in texts:
                reply = await echoed(alice, text)
                assert (reply["type"], str(reply["to"])) == ("chat", ALICE)
            bob.send_message(mto="room@" + ECHO, mbody="to a node", mtype="normal")
            reply = await echoed(bob, "to a node", sender="room@" + ECHO)
            assert reply["type"] == "normal"
            assert alice.pending("message") == [] and bob.pending("message") == []
    run(scenario())

    assert echo.received() == [(ALICE, t) for t in texts] + [(BOB, "to a node")]
    ns = delivered_in(router_kind)
    # xmpp.js serves them alike: its parser and `is('message')` ignore the namespace.
    assert [(m["ns"], m["body_ns"]) for m in echo.stanzas("message")] == [(ns, ns)] * 4


def test_iq_round_trip(router_kind, jabberd2_stack, echo):
    """A user's disco#info reaches xmpp.js's iq-callee and its result comes back; an IQ it has no handler for gets service-unavailable."""
    async def scenario():
        async with Clients(jabberd2_stack.c2s_ip, jabberd2_stack.c2s_port) as clients:
            alice, _bob = await log_in(clients)
            result = await alice.make_iq_get(DISCO_INFO, ito=ECHO).send(timeout=10)
            assert (result["type"], str(result["from"])) == ("result", ECHO)
            identity = result.xml.find("{%s}query/{%s}identity" % (DISCO_INFO, DISCO_INFO))
            assert identity is not None, result
            assert (identity.get("category"), identity.get("type"), identity.get("name")) == (
                "gateway", "echo", "xmpp.js echo")

            with pytest.raises(IqError) as refused:
                await alice.make_iq_get(VERSION, ito=ECHO).send(timeout=10)
            error = refused.value.iq
            assert (str(error["from"]), error["error"]["condition"]) == (
                ECHO, "service-unavailable")
    run(scenario())

    assert "answered disco#info from %s" % ALICE in echo.events
    ns = delivered_in(router_kind)
    from_alice = [iq for iq in echo.stanzas("iq") if iq["from"] == ALICE]
    assert [(iq["ns"], iq["type"]) for iq in from_alice] == [(ns, "get"), (ns, "get")]


def test_component_originated(router_kind, jabberd2_stack, echo):
    """The component writes first: a message to a user who never wrote to it arrives, and its own disco#info to the users' server is answered through the router."""
    async def scenario():
        async with Clients(jabberd2_stack.c2s_ip, jabberd2_stack.c2s_port) as clients:
            alice, bob = await log_in(clients)
            alice.send_message(mto=ECHO, mbody="tell %s see you at 5" % BOB, mtype="chat")
            notice = await bob.wait_for("message", body("%s says see you at 5" % ALICE))
            assert (str(notice["from"]), str(notice["to"])) == (ECHO, BOB)
            await echoed(alice, "tell %s see you at 5" % BOB)

            alice.send_message(mto=ECHO, mbody="ask-server", mtype="chat")
            alice.send_message(mto=ECHO, mbody="after", mtype="chat")
            await echoed(alice, "after")  # the component handled ask-server before it
            return [m["body"] for m in alice.pending("message")]
    left = run(scenario())

    if router_kind == "jabberd2":
        # jabberd2's defect (test_handshake): xmpp.js never came online, so it
        # has no JID of its own to send an IQ from, and fails to send it.
        assert left == []
        assert [e for e in echo.errors() if "null" in e], echo.events
        assert not [line for line in echo.events if line.startswith("server ")]
    else:
        assert left == ["server identity: server/im jrouter test sm", "echo: ask-server"]
        assert "server %s identity=server/im jrouter test sm" % DOMAIN in echo.events
        assert [(iq["ns"], iq["type"]) for iq in echo.stanzas("iq") if iq["from"] == DOMAIN] == [
            (ACCEPT, "result")]
