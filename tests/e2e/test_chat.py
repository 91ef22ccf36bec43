"""End to end: real XMPP clients chat through jabberd2's c2s and sm, over the router.

Every test runs once per router kind (`router_kind` in conftest): Debian's C
router, then jrouter, with the same sm/c2s binaries and configs. c2s talks to
sm only through the router (`<route/>` with session control and client
stanzas, domain advertisements), so each passing test is routing evidence.
"""

from tests.support.xmpp import Clients, run

DOMAIN = "example.test"
USERS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}
RESOURCES = {"alice": "home", "bob": "work", "carol": "phone"}


def bare(user):
    return "%s@%s" % (user, DOMAIN)


def full(user):
    return "%s/%s" % (bare(user), RESOURCES[user])


async def register_all(clients, users=USERS):
    for user in users:
        await clients.register(bare(user), USERS[user])


async def login(clients, user, resource=None):
    """Log `user` in and send initial presence (needed for delivery and offline messages)."""
    client = await clients.login("%s/%s" % (bare(user), resource or RESOURCES[user]),
                                 USERS[user])
    client.send_presence()
    return client


def presence(kind, sender):
    """Matcher: presence of type `kind` from exactly `sender` (a JID string)."""
    return lambda p: p["type"] == kind and str(p["from"]) == sender


def message_from(sender):
    return lambda m: str(m["from"]) == sender


async def subscribe(a, b):
    """a asks b for a presence subscription and b approves (RFC 6121 §3.1)."""
    a.send_presence_subscription(pto=b.boundjid.bare, ptype="subscribe")
    await b.wait_for("presence", presence("subscribe", a.boundjid.bare))
    b.send_presence_subscription(pto=a.boundjid.bare, ptype="subscribed")
    await a.wait_for("presence", presence("subscribed", b.boundjid.bare))
    # The sm then sends b's current presence to a, from b's full JID.
    await a.wait_for("presence", presence("available", str(b.boundjid)))


async def barrier(sender, receiver):
    """Wait until everything `sender` sent so far has reached `receiver`.

    A marker message takes the same path (c2s -> router -> sm -> router -> c2s)
    as the stanzas before it, so once it arrives the earlier ones have too.
    """
    body = "barrier from %s" % sender.boundjid
    sender.send_message(mto=receiver.boundjid, mbody=body, mtype="chat")
    await receiver.wait_for("message", lambda m: m["body"] == body)


def test_register_and_login(jabberd2_stack):
    """Three users register in-band (XEP-0077), log in, get their requested full JIDs and empty rosters."""
    async def scenario():
        async with Clients(jabberd2_stack.c2s_ip, jabberd2_stack.c2s_port) as clients:
            await register_all(clients)
            for user in USERS:
                client = await clients.login(full(user), USERS[user])
                assert str(client.boundjid) == full(user)
                assert await client.fetch_roster() == {}
    run(scenario())


def test_subscriptions_and_presence(jabberd2_stack):
    """Three users subscribe to each other: rosters reach 'both', presence comes from the right full JIDs, unsubscribed users see none."""
    async def scenario():
        async with Clients(jabberd2_stack.c2s_ip, jabberd2_stack.c2s_port) as clients:
            await register_all(clients)
            alice, bob, carol = [await login(clients, u) for u in ("alice", "bob", "carol")]

            await subscribe(alice, bob)
            assert (await alice.fetch_roster())[bare("bob")]["subscription"] == "to"
            assert (await bob.fetch_roster())[bare("alice")]["subscription"] == "from"
            await subscribe(bob, alice)
            await subscribe(alice, carol)
            await subscribe(carol, alice)

            assert {j: i["subscription"] for j, i in (await alice.fetch_roster()).items()} == {
                bare("bob"): "both", bare("carol"): "both"}
            assert {j: i["subscription"] for j, i in (await bob.fetch_roster()).items()} == {
                bare("alice"): "both"}
            assert {j: i["subscription"] for j, i in (await carol.fetch_roster()).items()} == {
                bare("alice"): "both"}

            # A status change reaches alice (subscribed to bob) but not carol.
            bob.send_presence(pshow="away", pstatus="in a meeting")
            changed = await alice.wait_for("presence", presence("away", full("bob")))
            assert changed["status"] == "in a meeting"
            await barrier(bob, carol)
            assert not [p for p in carol.pending("presence") if p["from"].bare == bare("bob")]

            # Going offline is announced with the full JID that went away.
            await bob.logout()
            await alice.wait_for("presence", presence("unavailable", full("bob")))
    run(scenario())


def test_messages(jabberd2_stack):
    """Messages between three users arrive once, in order, with exact bodies, types and sender full JIDs."""
    async def scenario():
        async with Clients(jabberd2_stack.c2s_ip, jabberd2_stack.c2s_port) as clients:
            await register_all(clients)
            alice, bob, carol = [await login(clients, u) for u in ("alice", "bob", "carol")]

            text = "Grüße, Bob & <friends> ✓"
            alice.send_message(mto=full("bob"), mbody=text, mtype="chat")
            got = await bob.wait_for("message", message_from(full("alice")))
            assert (got["body"], got["type"], str(got["to"])) == (text, "chat", full("bob"))

            bob.send_message(mto=bare("carol"), mbody="to your bare JID", mtype="normal")
            got = await carol.wait_for("message", message_from(full("bob")))
            assert (got["body"], got["type"]) == ("to your bare JID", "normal")

            carol.send_message(mto=full("alice"), mbody="back to you", mtype="chat")
            got = await alice.wait_for("message", message_from(full("carol")))
            assert got["body"] == "back to you"

            bodies = ["burst %02d" % i for i in range(30)]
            for body in bodies:
                alice.send_message(mto=full("bob"), mbody=body, mtype="chat")
            received = [(await bob.wait_for("message", message_from(full("alice"))))["body"]
                        for _ in bodies]
            assert received == bodies

            await barrier(alice, bob)
            await barrier(carol, bob)
            assert bob.pending("message") == []
            assert carol.pending("message") == []
            assert alice.pending("message") == []
    run(scenario())


def test_offline_message(jabberd2_stack):
    """Messages to a user who is offline are stored by sm and delivered, in order and stamped, at her next login."""
    async def scenario():
        async with Clients(jabberd2_stack.c2s_ip, jabberd2_stack.c2s_port) as clients:
            await register_all(clients)
            alice = await login(clients, "alice")
            bodies = ["are you there?", "call me when you are back"]
            for body in bodies:
                alice.send_message(mto=bare("carol"), mbody=body, mtype="chat")
            # An iq to alice's sm returns after the sm handled the messages before it.
            await alice.fetch_roster()

            carol = await login(clients, "carol")
            got = [await carol.wait_for("message", message_from(full("alice"))) for _ in bodies]
            assert [m["body"] for m in got] == bodies
            for m in got:
                assert m.xml.find("{urn:xmpp:delay}delay") is not None, m
    run(scenario())
