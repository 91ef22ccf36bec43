"""End to end: two complete jabberd2 servers federate over s2s, through the routers under test.

one.test and two.test each run their own router, sm, c2s and s2s (Debian's
binaries) on loopback; s2s finds the other server through a private
dnsmasq (tests/support/federation.py says how). Real slixmpp users on each
side exchange messages and presence subscriptions.

A stanza for the other domain leaves the sm for a domain its router does
not serve, so the router must hand it to s2s, the default route; s2s
delivers it to the other s2s (dialback, XEP-0220), whose router must send
it to its sm by domain. Each router pair below is checked: jabberd2's C
router on both sides proves the test itself.
"""

import pytest

from tests.support.federation import Federation
from tests.support.xmpp import Clients, run

try:  # failure reports then show dnsmasq's and the s2s logs, like the routers'
    from tests.conftest import _track
except ImportError:  # pragma: no cover - conftest imported under another name
    def _track(request, thing):
        pass

ONE, TWO = "one.test", "two.test"
ALICE, BOB = "alice@" + ONE, "bob@" + TWO
ALICE_FULL, BOB_FULL = ALICE + "/home", BOB + "/work"
PASSWORDS = {ALICE: "alice-pw", BOB: "bob-pw"}

# (one.test's router, two.test's router)
ROUTER_PAIRS = [("jabberd2", "jabberd2"), ("jrouter", "jrouter"),
                ("jrouter", "jabberd2"), ("jabberd2", "jrouter"),
                ("jrouter-compiled", "jabberd2")]       # compiled: scripts/build-compiled

# The first stanza for a domain waits for s2s: DNS, connect, dialback both ways.
FIRST_HOP = 20.0


@pytest.fixture(params=ROUTER_PAIRS, ids=["%s-%s" % p for p in ROUTER_PAIRS])
def federation(request, tmp_path, router_factory, jabberd2_stack_factory):
    """A started Federation of one.test and two.test, routers of the pair's kinds.

    Set up after the router and stack factories, so its s2s processes stop
    before the stacks and routers do.
    """
    fed = Federation(tmp_path / "federation")
    _track(request, fed)
    try:
        for domain, kind in zip((ONE, TWO), request.param):
            router = router_factory(kind)
            fed.add(domain, router, jabberd2_stack_factory(router, domain=domain))
        fed.start()
        yield fed
    finally:
        fed.stop()


def c2s(fed, domain):
    stack = fed.servers[domain].stack
    return stack.c2s_ip, stack.c2s_port


async def log_in(one_clients, two_clients):
    """Register alice@one.test and bob@two.test on their own servers, log both in."""
    await one_clients.register(ALICE, PASSWORDS[ALICE])
    await two_clients.register(BOB, PASSWORDS[BOB])
    alice = await one_clients.login(ALICE_FULL, PASSWORDS[ALICE])
    bob = await two_clients.login(BOB_FULL, PASSWORDS[BOB])
    alice.send_presence()
    bob.send_presence()
    return alice, bob


def presence(kind, sender):
    """Matcher: presence of type `kind` from exactly `sender` (a JID string)."""
    return lambda p: p["type"] == kind and str(p["from"]) == sender


def message_from(sender):
    return lambda m: str(m["from"]) == sender


def assert_dialback(fed, sender, receiver):
    """`sender`'s s2s validated its outgoing route to `receiver`, and `receiver`'s s2s the incoming one."""
    # jabberd2 names a route 'LOCAL/REMOTE' from each s2s's own side.
    outgoing = "outgoing route '%s/%s' is now valid" % (sender, receiver)
    incoming = "incoming route '%s/%s' is now valid" % (receiver, sender)
    assert outgoing in fed.s2s_log(sender), fed.servers[sender].s2s.describe()
    assert incoming in fed.s2s_log(receiver), fed.servers[receiver].s2s.describe()


def test_messages_both_ways(federation):
    """alice@one.test and bob@two.test chat across the servers: exact bodies, types, full from/to, in order, once."""
    fed = federation

    async def scenario():
        async with Clients(*c2s(fed, ONE)) as one, Clients(*c2s(fed, TWO)) as two:
            alice, bob = await log_in(one, two)

            text = "Grüße über s2s & <federation> ✓"
            alice.send_message(mto=BOB_FULL, mbody=text, mtype="chat")
            got = await bob.wait_for("message", message_from(ALICE_FULL), timeout=FIRST_HOP)
            assert (got["body"], got["type"], str(got["to"])) == (text, "chat", BOB_FULL)

            bob.send_message(mto=ALICE, mbody="back to your bare JID", mtype="normal")
            got = await alice.wait_for("message", message_from(BOB_FULL), timeout=FIRST_HOP)
            assert (got["body"], got["type"], str(got["to"])) == (
                "back to your bare JID", "normal", ALICE_FULL)

            bodies = ["burst %02d" % i for i in range(20)]
            for body in bodies:
                alice.send_message(mto=BOB_FULL, mbody=body, mtype="chat")
                bob.send_message(mto=ALICE_FULL, mbody=body, mtype="chat")
            to_bob = [(await bob.wait_for("message", message_from(ALICE_FULL)))["body"]
                      for _ in bodies]
            to_alice = [(await alice.wait_for("message", message_from(BOB_FULL)))["body"]
                        for _ in bodies]
            assert to_bob == bodies
            assert to_alice == bodies

            # A last marker each way: nothing else (no duplicate, no error) came first.
            alice.send_message(mto=BOB_FULL, mbody="end", mtype="chat")
            bob.send_message(mto=ALICE_FULL, mbody="end", mtype="chat")
            await bob.wait_for("message", lambda m: m["body"] == "end")
            await alice.wait_for("message", lambda m: m["body"] == "end")
            assert bob.pending("message") == []
            assert alice.pending("message") == []

    run(scenario())
    assert_dialback(fed, ONE, TWO)
    assert_dialback(fed, TWO, ONE)


def test_presence_subscriptions_both_ways(federation):
    """alice@one.test and bob@two.test subscribe to each other across the servers; rosters reach 'both' and presence changes cross."""
    fed = federation

    async def scenario():
        async with Clients(*c2s(fed, ONE)) as one, Clients(*c2s(fed, TWO)) as two:
            alice, bob = await log_in(one, two)

            # alice -> bob (RFC 6121 §3.1), over one.test's s2s to two.test.
            alice.send_presence_subscription(pto=BOB, ptype="subscribe")
            asked = await bob.wait_for("presence", presence("subscribe", ALICE),
                                       timeout=FIRST_HOP)
            assert asked["to"].bare == BOB  # bob's sm hands it to his available resource
            bob.send_presence_subscription(pto=ALICE, ptype="subscribed")
            await alice.wait_for("presence", presence("subscribed", BOB), timeout=FIRST_HOP)
            # bob's sm then sends bob's current presence, from his full JID.
            seen = await alice.wait_for("presence", presence("available", BOB_FULL))
            assert seen["to"].bare == ALICE
            assert (await alice.fetch_roster())[BOB]["subscription"] == "to"
            assert (await bob.fetch_roster())[ALICE]["subscription"] == "from"

            # bob -> alice, over two.test's s2s to one.test.
            bob.send_presence_subscription(pto=ALICE, ptype="subscribe")
            await alice.wait_for("presence", presence("subscribe", BOB))
            alice.send_presence_subscription(pto=BOB, ptype="subscribed")
            await bob.wait_for("presence", presence("subscribed", ALICE))
            await bob.wait_for("presence", presence("available", ALICE_FULL))
            assert {j: i["subscription"] for j, i in (await alice.fetch_roster()).items()} == {
                BOB: "both"}
            assert {j: i["subscription"] for j, i in (await bob.fetch_roster()).items()} == {
                ALICE: "both"}

            # A status change crosses each way, from the right full JID.
            bob.send_presence(pshow="away", pstatus="at the other server")
            changed = await alice.wait_for("presence", presence("away", BOB_FULL))
            assert changed["status"] == "at the other server"
            alice.send_presence(pshow="dnd", pstatus="busy on one.test")
            changed = await bob.wait_for("presence", presence("dnd", ALICE_FULL))
            assert changed["status"] == "busy on one.test"

            # Going offline is announced across, with the full JID that went away.
            await bob.logout()
            await alice.wait_for("presence", presence("unavailable", BOB_FULL))
            assert [p for p in alice.pending("presence") if p["type"] == "error"] == []

    run(scenario())
    assert_dialback(fed, ONE, TWO)
    assert_dialback(fed, TWO, ONE)
