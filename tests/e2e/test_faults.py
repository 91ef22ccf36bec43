"""End to end: faults with the real stack, and what the router does about them.

Components die by SIGKILL halfway through a stanza or with traffic queued for
them; the router itself is SIGKILLed under Debian's real sm and c2s and
started again; SIGHUP arrives fifty times under traffic; two components route
everything back and forth forever. Each test asserts on what arrives, and that
a bystander pair of components (tests/support/faults.py `Bystanders`) keeps
getting its round trips answered promptly throughout.

Where both routers behave alike the test runs against both (`router_kind`):
jabberd2's C router is the reference that proves the test. Where they differ
on purpose (queued packets of a dead cluster member: protocol §4.10, §6.6)
each kind's own behaviour is asserted.
"""

import signal
import threading
import time

import pytest

from jrouter.routing.balance import jabberd2_index
from tests.support.faults import (NS_COMPONENT, Bystanders, FaultComponent, Prober, connect,
                                  route, rss_kib, tcp_queues)

try:  # failure reports then show the components' logs, like the routers'
    from tests.conftest import _track
except ImportError:  # pragma: no cover - conftest imported under another name
    def _track(request, thing):
        pass

PRESENCE_TAG = "{%s}presence" % NS_COMPONENT
PROMPT = 1.0          # seconds: the longest bystander round trip we call prompt


@pytest.fixture
def components(request, tmp_path):
    """make(router, mode, name, target=None, **kw) -> started FaultComponent; all
    stopped (by PID) at teardown, before the routers."""
    made = []

    def make(router, mode, name, target=None, **kwargs):
        component = FaultComponent(tmp_path / "components", router, mode, name, target, **kwargs)
        made.append(component)
        _track(request, component)
        return component.start()

    yield make
    for component in made:
        component.stop()


def wait_for_advertisement(peer, kind, name, timeout=10.0):
    """Read `peer`'s stream until `<presence type=kind from=name/>` (kind None: available)."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        try:
            stanza = peer.stanza(max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            break
        if stanza.tag == PRESENCE_TAG:
            seen.append((stanza.get("type"), stanza.get("from")))
            if seen[-1] == (kind, name):
                return
    raise AssertionError("no <presence type=%r from=%r/> within %.0fs; advertisements seen: %s"
                         % (kind, name, timeout, seen))


# -- 1. a component SIGKILLed halfway through a <route> ----------------------------------


def test_component_killed_mid_stanza(router, components):
    """A component SIGKILLed halfway through a <route>: disconnect and offline logged, the name advertised unavailable and free to bind again, the half stanza delivered to nobody, bystanders answered promptly."""
    bystanders = Bystanders(router)
    observer = connect(router, "observer")
    with Prober(bystanders) as probe:
        victim = components(router, "half", "victim", "pong")
        wait_for_advertisement(observer, None, "victim")
        router.wait_for_log("[victim] online", 5.0)
        time.sleep(0.3)                    # the half route has reached the router
        killed_at = time.monotonic()
        assert victim.kill() == -signal.SIGKILL

        wait_for_advertisement(observer, "unavailable", "victim")
        log = router.wait_for_log("[victim] offline", 5.0)
        assert "[127.0.0.1, port=%d] disconnect" % victim.local_port in log
        time.sleep(0.5)                    # round trips after the kill, too

    assert not probe.failures, probe.summary()
    assert probe.worst() < PROMPT, probe.summary()
    assert [s for s, _ in probe.samples if s > killed_at], "no round trip after the kill"
    assert [r for r in bystanders.strays if r.get("from") == "victim"] == []

    again = connect(router, "victim")      # no multi: the name is free again
    observer.send(route("victim", "observer", "<message id='welcome-back'/>"))
    assert again.route()[0].get("id") == "welcome-back"
    assert bystanders.round_trip() < PROMPT


# -- 2. a cluster member SIGKILLed with output queued for it -----------------------------

FLOOD = 6000          # packets for the member that stopped reading
BODY = "x" * 1000     # about 1 KB each: megabytes, more than the kernel's buffers hold
SLACK = 128 * 1024    # bytes: a write in progress (reads are 64 KiB), besides the kernel's buffers


def users_of(member, count=2, domain="gw"):
    """A user JID (`user@domain`) that jabberd2's hash places on member index `member` of `count`."""
    return next("user%d@%s" % (i, domain) for i in range(1000)
                if jabberd2_index(count, "user%d@%s" % (i, domain)) == member)


def flood_ids(routes):
    """The numbers of the flood packets among `routes` (ids 'q-N'), in arrival order."""
    ids = [r[0].get("id") for r in routes if len(r)]
    return [int(i[2:]) for i in ids if i and i.startswith("q-")]


def after_in(routes):
    return any(len(r) and r[0].get("id") == "after" for r in routes)


def test_member_killed_with_queued_output(router, router_kind, components, record_property):
    """A cluster member that stops reading, then is SIGKILLed: bystanders answered promptly throughout; jrouter hands the packets still queued for it to the surviving member, in order (a contiguous tail of the flood), the C router drops them; later packets reach the survivor on both."""
    bystanders = Bystanders(router)
    sender = connect(router, "sender")
    stuck = components(router, "stuck", "gw")                 # member 0
    survivor = connect(router, "gw", extra=" multi='to'")     # member 1
    to_stuck, to_survivor = users_of(0), users_of(1)

    # The placement this test relies on: member 1 gets its users' packets.
    sender.send(route("gw", "sender", "<message to='%s' id='placed'/>" % to_survivor))
    assert survivor.route()[0].get("id") == "placed"

    packets = [route("gw", "sender", "<message xmlns='jabber:client' to='%s' id='q-%d'>"
                     "<body>%s</body></message>" % (to_stuck, n, BODY)) for n in range(FLOOD)]
    with Prober(bystanders) as probe:
        for start in range(0, FLOOD, 200):
            sender.send("".join(packets[start:start + 200]))
        # The router reads one peer's input in order: once this comes back,
        # every flood packet has been routed (queued for the stuck member).
        sender.send(route("sender", "sender", "<message id='flooded'/>"))
        while sender.route(timeout=30)[0].get("id") != "flooded":
            pass
        flooded_at = time.monotonic()
        rss_before_kill = rss_kib(router.pid)
        time.sleep(0.5)                                       # the standoff, with bystanders
        # What the kernel holds on the way to the stuck member dies with it.
        sent_q, _ = tcp_queues(router.port, stuck.local_port)
        _, unread = tcp_queues(stuck.local_port, router.port)
        stuck.kill()
        router.wait_for_log("[gw] offline", 10.0)
        sender.send(route("gw", "sender", "<message to='%s' id='after'/>" % to_stuck))
        # jrouter routes a backlog again in slices between other traffic, so
        # 'after' may overtake part of it: read on until the survivor is quiet.
        arrived = []
        while True:
            try:
                arrived.append(survivor.route(timeout=1.0 if after_in(arrived) else 20.0))
            except TimeoutError:
                if after_in(arrived):
                    break
                raise

    got = flood_ids(arrived)
    lost = FLOOD - len(got)
    lost_bytes = sum(len(p.encode()) for p in packets[:lost])
    in_kernel = sent_q + unread
    figures = ("%s: %d of %d flood packets reached the survivor (from q-%s); %d lost = %d bytes, "
               "the kernel held %d (router Send-Q %d + member Recv-Q %d); router RSS %d KiB "
               "before the kill; bystanders: %s" % (
                   router_kind, len(got), FLOOD, got[0] if got else None, lost, lost_bytes,
                   in_kernel, sent_q, unread, rss_before_kill, probe.summary()))
    print("FAULTS", figures)
    record_property("queued_failover", figures)
    assert not probe.failures, figures
    assert probe.worst() < PROMPT, figures
    assert probe.worst(since=flooded_at) < PROMPT, figures
    if router_kind != "jabberd2":     # jrouter, interpreted or compiled
        # Protocol §4.10, §6.6: what the kernel had not taken yet is routed again,
        # to the survivor; what was in the socket buffers died with the member.
        assert got, figures
        assert got == list(range(got[0], FLOOD)), figures
        assert lost_bytes <= in_kernel + SLACK, figures
    else:
        assert got == [], figures     # jabberd2 frees the dead member's write queue


# -- 3. the router SIGKILLed and started again under the real sm and c2s ------------------

DOMAIN = "example.test"
PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw"}
RETRY = (3, 60, 1)    # sm/c2s <router><retry>: init, lost (tries after a loss), sleep seconds
RECOVERY = 60.0       # seconds the stack gets to come back


async def chat(a, b, text):
    """a sends b a chat message; wait (bounded) until b has it from a's full JID."""
    a.send_message(mto=b.boundjid, mbody=text, mtype="chat")
    got = await b.wait_for("message", lambda m: m["body"] == text)
    assert str(got["from"]) == str(a.boundjid), got


def test_router_killed_and_restarted_under_sm_and_c2s(router_factory, router_kind,
                                                      jabberd2_stack_factory, record_property):
    """The router SIGKILLed under the real sm and c2s while users chat, then started again on its port: both reconnect within 60 s (bound again in the new router's log), the users who stayed connected chat on, and new logins chat."""
    import asyncio

    from tests.support.xmpp import Clients, run

    router = router_factory(router_kind)
    stack = jabberd2_stack_factory(router, retry=RETRY)
    sm, c2s = stack.sms["sm"], stack.c2s
    figures = {}

    def crash_and_restart():
        router.send_signal(signal.SIGKILL)
        assert router.stop() == -signal.SIGKILL
        killed_at = time.monotonic()
        sm.wait_for_log("connection to router closed", 10.0)
        c2s.wait_for_log("connection to router closed", 10.0)
        # Both try at least once while nobody listens, and do not give up.
        sm.wait_for_log("attempting reconnect", 10.0)
        c2s.wait_for_log("attempting reconnect", 10.0)
        time.sleep(1.5)
        again = router_factory(router_kind, port=router.port)
        figures["down"] = time.monotonic() - killed_at
        left = lambda: RECOVERY - (time.monotonic() - killed_at)  # noqa: E731
        again.wait_for(lambda: all("[%s] online" % n in again.log_text
                                   for n in ("sm", "c2s", DOMAIN)), left(), "sm and c2s bound again")
        c2s.wait_for(c2s.serves_domain, left(), "serving %s again" % DOMAIN)
        figures["recovered"] = time.monotonic() - killed_at
        assert sm.running() and c2s.running()

    async def scenario():
        async with Clients(stack.c2s_ip, stack.c2s_port) as clients:
            for user, password in PASSWORDS.items():
                await clients.register("%s@%s" % (user, DOMAIN), password)
            alice = await clients.login("alice@%s/home" % DOMAIN, PASSWORDS["alice"])
            bob = await clients.login("bob@%s/work" % DOMAIN, PASSWORDS["bob"])
            await chat(alice, bob, "before the crash")
            await chat(bob, alice, "before the crash, back")

            await asyncio.to_thread(crash_and_restart)

            # Neither c2s nor sm ends its sessions when the router goes: the
            # users who stayed connected chat on.
            await chat(alice, bob, "old sessions after the restart")
            await chat(bob, alice, "old sessions after the restart, back")
            alice2 = await clients.login("alice@%s/home2" % DOMAIN, PASSWORDS["alice"])
            bob2 = await clients.login("bob@%s/work2" % DOMAIN, PASSWORDS["bob"])
            await chat(alice2, bob2, "after the restart")
            await chat(bob2, alice2, "after the restart, back")
    run(scenario(), timeout=120)
    summary = "%s: router down %.1f s, sm and c2s serving again %.1f s after the kill" % (
        router_kind, figures["down"], figures["recovered"])
    print("FAULTS", summary)
    record_property("recovery", summary)


# -- 4. SIGHUP storms under traffic ---------------------------------------------------------

SIGHUPS = 50
STORM = 5.0           # seconds the SIGHUPs are spread over
STREAM_GAP = 0.002    # seconds between two sequence-numbered messages


class Stream:
    """seq-a sends seq-b numbered messages, one every STREAM_GAP seconds, from a
    thread, until stopped; seq-b's thread records (id number, arrival time)."""

    def __init__(self, router):
        self.sender = connect(router, "seq-a")
        self.receiver = connect(router, "seq-b")
        self.sent = 0
        self.received = []
        self.errors = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._receive, daemon=True)]

    def _send(self):
        try:
            while not self._stop.is_set():
                self.sender.send(route("seq-b", "seq-a", "<message id='s-%d'/>" % self.sent))
                self.sent += 1
                time.sleep(STREAM_GAP)
            self.sender.send(route("seq-b", "seq-a", "<message id='end'/>"))
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.errors.append("sender: %r" % exc)

    def _receive(self):
        try:
            while True:
                got = self.receiver.route(timeout=10)
                if not len(got):
                    continue
                if got[0].get("id") == "end":
                    return
                self.received.append((int(got[0].get("id")[2:]), time.monotonic()))
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.errors.append("receiver: %r" % exc)

    def start(self):
        for thread in self._threads:
            thread.start()
        return self

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(15)
        return self

    def longest_gap(self):
        times = [t for _n, t in self.received]
        return max((b - a for a, b in zip(times, times[1:])), default=None)


def test_sighup_storm_under_traffic(router, router_kind, record_property):
    """Fifty SIGHUPs in five seconds while two components stream numbered messages: none lost or reordered, no stall, bystanders answered promptly, every reload in the log, and the last one took effect (a user added just before it logs in)."""
    from tests.support.peer import Peer

    bystanders = Bystanders(router)
    reloads = lambda: router.log_text.count("reloading users ...")  # noqa: E731
    before = reloads()
    stream = Stream(router).start()
    with Prober(bystanders) as probe:
        time.sleep(0.5)
        for n in range(SIGHUPS):
            if n == SIGHUPS - 1:
                router.files.users_file.write_text(
                    "<users><user><name>jabberd</name><secret>secret</secret></user>"
                    "<user><name>latecomer</name><secret>late-pw</secret></user></users>")
            router.send_signal(signal.SIGHUP)
            time.sleep(STORM / SIGHUPS)
        time.sleep(0.5)
        stream.stop()
    router.wait_for(lambda: "loaded user table (2 users)" in router.log_text, 10.0,
                    "the last reload")
    done = reloads() - before

    numbers = [n for n, _t in stream.received]
    figures = ("%s: %d messages sent, %d received, longest gap %.1f ms; %d of %d SIGHUPs "
               "logged as reloads; bystanders: %s" % (
                   router_kind, stream.sent, len(numbers), 1000 * (stream.longest_gap() or 0),
                   done, SIGHUPS, probe.summary()))
    print("FAULTS", figures)
    record_property("sighup_storm", figures)
    assert not stream.errors, (stream.errors, figures)
    assert numbers == list(range(stream.sent)), figures
    assert stream.longest_gap() < PROMPT, figures
    assert not probe.failures and probe.worst() < PROMPT, figures
    assert done == SIGHUPS, figures
    Peer(router.ip, router.port).authenticate("latecomer", "late-pw").close()
    assert router.running() and bystanders.round_trip() < PROMPT


# -- 5. a route loop between two components -------------------------------------------------

IN_FLIGHT = 50        # packets seeded into the loop, each going round forever
LOOP_TIME = 10.0      # seconds the loop runs while the router is watched
RSS_GROWTH = 20 * 1024  # KiB the router may grow by over LOOP_TIME


def test_route_loop_between_two_components(router, router_kind, components, record_property):
    """Two components that send everything they get on to each other, with 50 packets going round: the router keeps answering bystanders promptly and its memory stays bounded (neither router has loop protection beyond never bouncing a bounce)."""
    bystanders = Bystanders(router)
    a = components(router, "echo", "loop-a", "loop-b")
    b = components(router, "echo", "loop-b", "loop-a")
    seeder = connect(router, "seeder")
    seeder.send("".join(route("loop-a", "seeder", "<message xmlns='jabber:client' id='loop-%d'>"
                              "<body>round and round</body></message>" % n)
                        for n in range(IN_FLIGHT)))
    a.wait_for(lambda: a.echoed() > 0 and b.echoed() > 0, 10.0, "the loop going round")
    time.sleep(1.0)                        # past start-up allocations
    rss = [rss_kib(router.pid)]
    echoed_at_start = a.echoed() + b.echoed()
    started = time.monotonic()
    with Prober(bystanders, pause=0.05) as probe:
        while time.monotonic() - started < LOOP_TIME:
            time.sleep(1.0)
            rss.append(rss_kib(router.pid))
    elapsed = time.monotonic() - started
    rate = (a.echoed() + b.echoed() - echoed_at_start) / elapsed
    growth = max(rss) - rss[0]
    figures = ("%s: loop %.0f routes/s; router RSS %s KiB (growth %d KiB over %.0f s); "
               "bystanders: %s" % (router_kind, rate, rss, growth, elapsed, probe.summary()))
    print("FAULTS", figures)
    record_property("route_loop", figures)
    assert rate > 0, figures               # the loop did go round while we watched
    assert not probe.failures, figures
    assert probe.worst() < PROMPT, figures
    assert growth < RSS_GROWTH, figures
    assert router.running()
