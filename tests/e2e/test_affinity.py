"""End to end: clustering that breaks no live session (issue 11), with the real jabberd2 and real users.

* sm: three real `jabberd2-sm` (sm1, sm2, sm3) serve `example.test`, each
  reaching the router through its own wire tap (tests/support/sm_cluster.py),
  so the test sees which sm the router handed every message. 16 users and a
  `sender` log in through c2s; the sender sends each user a message to the
  bare JID and the test reads who got it in the live session within
  DELIVERY_BOUND seconds, which sm got it, and which were filed offline.
  sm1 stops (SIGTERM: it ends its sessions, c2s closes those users' streams),
  its users log in again on the survivors, sm1 comes back with the same id,
  then one of sm1's users logs out and in. Four router set-ups: jabberd2's C
  router, jrouter with jabberd2's placement (no <clustering>), `consistent`,
  and `consistent` with `affinity='session'`. Only the last promises that a
  return moves nobody; the others assert what they do today, measured.
* Gateways: three copies of one XEP-0114 transport (tests/support/components.py,
  keyed by `from`); a copy is killed and restarted; `affinity='traffic'`
  keeps every user who was active meanwhile on the copy that served them.
* Router restart under `algorithm='slots'`: the copies reconnect in reverse
  order; with `<clustering state-dir>` they get their slots back.
* The session-control packets themselves, as the real c2s and sm exchange
  them (what `affinity='session'` has to learn from).

Run with `-s` to see the figures (lines starting `AFFINITY`); they are also
attached to each test's report (`record_property`).
"""

import asyncio
import re
import socket
import struct
from dataclasses import asdict, dataclass, field

import pytest

from jrouter.routing.balance import jabberd2_index
from tests.e2e.test_cluster import (GW, PASSWORD, USERS as GW_USERS, bind_order, clustering,
                                    kill_member, limited, log_in_all, where)
from tests.e2e.test_cluster import cheap_clients, transport  # noqa: F401 - fixtures
from tests.support.sm_cluster import COMPONENT, SESSION, TappedSmStack
from tests.support.wiretap import UP, WireTap
from tests.support.xmpp import Clients, run

try:  # failure reports then show the processes' logs
    from tests.conftest import _track
except ImportError:  # pragma: no cover - conftest imported under another name
    def _track(request, thing):
        pass

DOMAIN = "example.test"
SM_IDS = ("sm1", "sm2", "sm3")
LEAVER = "sm1"
USERS = ["user%02d@%s" % (i, DOMAIN) for i in range(16)]
SENDER = "sender@" + DOMAIN
DELIVERY_BOUND = 3.0   # seconds a live session gets to receive a message
DOWN_BOUND = 10.0      # seconds for an sm to go, or to be bound again
RETRY = (3, 60, 1)     # sm/c2s <router><retry> for a router restart (as test_faults)
STRAY = 0.5            # seconds for c2s's stray second `end` of a session, and its answer

# label -> (router kind, <clustering> for example.test or None)
SM_SETUPS = {
    "jabberd2-router": ("jabberd2", None),
    "jabberd2-placement": ("jrouter", None),
    "consistent": ("jrouter", clustering(DOMAIN, algorithm="consistent")),
    "session-affinity": ("jrouter", clustering(DOMAIN, algorithm="consistent",
                                               affinity="session")),
}


@pytest.fixture
def sm_stack(request, tmp_path, router_factory):
    """make(router, **kwargs) -> started TappedSmStack on `router` (sm1, sm2, sm3
    by default); stopped at teardown, before the routers."""
    made = []

    def make(router, **kwargs):
        kwargs.setdefault("sm_ids", SM_IDS)
        stack = TappedSmStack(tmp_path / ("sms-%d" % (len(made) + 1)), router, **kwargs)
        made.append(stack)
        _track(request, stack)
        return stack.start()

    yield make
    for stack in reversed(made):
        stack.stop()


# -- users, sessions and deliveries -------------------------------------------------------


def gone(client):
    """True once the client's connection is closed (slixmpp drops its transport)."""
    return client.transport is None


async def until(predicate, timeout, what):
    """Poll `predicate()` every 50 ms for at most `timeout` seconds; raise naming `what`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("not within %.1fs: %s" % (timeout, what))
        await asyncio.sleep(0.05)


class People:
    """The users' current clients and where their sessions live (bare JID -> ...)."""

    def __init__(self, clients, stack):
        self.clients, self.stack = clients, stack
        self.client = {}

    async def log_in(self, jids, resource):
        async def one(jid):
            client = await self.clients.login("%s/%s" % (jid, resource), PASSWORD)
            client.send_presence()  # the sm hands bare-JID messages to available sessions only
            return client
        for jid, client in zip(jids, await limited(one(j) for j in jids)):
            self.client[jid] = client
        # The session start is logged before c2s answers the bind.
        for jid in jids:
            await until(lambda j=jid: self.session(j), DOWN_BOUND, "session of %s logged" % jid)

    def session(self, jid):
        """The sm holding `jid`'s current session (its resource is new each login)."""
        found = self.stack.session_sm(str(self.client[jid].boundjid))
        assert len(found) <= 1, (jid, found)
        return found[0] if found else None


@dataclass
class Check:
    """One round: the sender sent every user a message."""

    tag: str
    session: dict            # user -> sm of the user's latest session (ended if that sm is not up)
    live: set                # users who got it in that session within DELIVERY_BOUND
    placed: dict             # user -> the sm the router handed it (None: nobody)
    offline: set             # users for whom an sm filed it as offline
    up: set = field(default_factory=set)   # sms running

    @property
    def broken(self):
        """Users with a live session on a running sm who did not get the message."""
        return {u for u, sm in self.session.items() if sm in self.up and u not in self.live}


async def deliver(people, tag, users=USERS):
    """The sender messages every user (bare JID); who gets it live, where it went."""
    sender = people.client[SENDER]
    bodies = {u: "%s for %s" % (tag, u) for u in users}
    for user, body in bodies.items():
        sender.send_message(mto=user, mbody=body, mtype="chat")

    def live():
        return {u for u in users
                if any(m["body"] == bodies[u] for m in people.client[u].pending("message"))}
    try:
        await until(lambda: len(live()) == len(users), DELIVERY_BOUND, "")
    except TimeoutError:
        pass
    await asyncio.sleep(0.2)  # the sm that got one with no session has filed it by now
    stack = people.stack
    placed = stack.placed(bodies.values())
    for user, body in bodies.items():
        assert len(placed[body]) <= 1, (user, placed[body])  # one copy, to one sm
    filed = stack.offline(bodies.values())
    return Check(tag, session={u: people.session(u) for u in users}, live=live(),
                 placed={u: next(iter(placed[b]), None) for u, b in bodies.items()},
                 offline={u for u, b in bodies.items() if b in filed},
                 up={sm_id for sm_id, sm in stack.sms.items() if sm.running()})


def assert_consistent(check):
    """What the test bed must show whatever the router does: a message reaches the
    live session exactly when the router handed it to the sm holding that session,
    and every other one was filed offline by the sm that got it."""
    for user in check.session:
        placed, session = check.placed[user], check.session[user]
        assert placed is not None and placed in check.up, (check.tag, user, placed)
        assert (user in check.live) == (placed == session), (check.tag, user, placed, session)
        assert (user in check.offline) == (user not in check.live), (check.tag, user)


def moved(a, b, among=USERS):
    """Users of `among` whose messages went to another sm in check `b` than in `a`."""
    return {u for u in among if a.placed[u] != b.placed[u]}


def wait_offline(router, name, before, timeout=DOWN_BOUND):
    router.wait_for(lambda: router.log_text.count("[%s] offline" % name) > before, timeout,
                    "%s gone from the router" % name)


# -- the sm scenario -----------------------------------------------------------------------


@dataclass
class SmRun:
    home: Check
    down: Check          # sm1 stopped, its users not back yet
    leave: Check         # sm1's users logged in again on the survivors
    back: Check          # sm1 started again
    again: Check         # one of sm1's users logged out and in
    leavers: list        # users whose first session was on sm1
    returner: str        # the one who logged out and in
    returner_sm: str     # where its new session started
    members: dict        # check tag -> the domain's members in the router's order


_MEMBERSHIP = re.compile(r"\[([^\]]+)\](?::\d+)? online \(bound to [^,]+, port (\d+)\)"
                         r"|\[[^,\]]+, port=(\d+)\] disconnect")


def domain_members(router, stack):
    """The sms bound to the domain now, in the router's member order (§6.2: bind
    order; a leaver's place taken by the last member), read from the router log."""
    sm_of_port = {port: sm_id for sm_id in stack.sms for port in bind_order(router, sm_id)}
    ports = []
    for m in _MEMBERSHIP.finditer(router.log_text):
        name, bound, gone_port = m.groups()
        if name == DOMAIN:
            ports.append(int(bound))
        elif gone_port is not None and int(gone_port) in ports:
            i = ports.index(int(gone_port))
            ports[i] = ports[-1]
            ports.pop()
    return [sm_of_port[p] for p in ports]


def sm_scenario(router, stack):
    async def scenario():
        async with Clients(stack.c2s_ip, stack.c2s_port) as clients:
            people = People(clients, stack)
            everyone = USERS + [SENDER]
            await limited(clients.register(u, PASSWORD) for u in everyone)
            await people.log_in(everyone, "a")
            members = {"home": domain_members(router, stack)}
            home = await deliver(people, "home")
            leavers = [u for u in USERS if home.session[u] == LEAVER]
            displaced = [u for u in everyone if people.session(u) == LEAVER]

            # sm1 stops: it ends its sessions, and c2s closes their streams.
            before = router.log_text.count("[%s] offline" % LEAVER)
            stack.sms[LEAVER].stop()
            wait_offline(router, LEAVER, before)
            for user in displaced:
                await until(lambda u=user: gone(people.client[u]), DOWN_BOUND,
                            "c2s closed %s's stream" % user)
            if SENDER in displaced:
                await people.log_in([SENDER], "b")
            members["down"] = domain_members(router, stack)
            down = await deliver(people, "down")

            await people.log_in([u for u in displaced if u != SENDER], "b")
            members["leave"] = domain_members(router, stack)
            leave = await deliver(people, "leave")

            # sm1 comes back with the same id; wait until it is a member again.
            bound = len(bind_order(router, DOMAIN))
            stack.restart_sm(LEAVER)
            router.wait_for(lambda: len(bind_order(router, DOMAIN)) > bound, DOWN_BOUND,
                            "%s bound %s again" % (LEAVER, DOMAIN))
            members["back"] = domain_members(router, stack)
            back = await deliver(people, "back")

            # A new login of one of sm1's users: it logs out and in again.
            returner = leavers[0]
            jid = str(people.client[returner].boundjid)
            await people.client[returner].logout()
            await until(lambda: stack.session_ended(jid), DOWN_BOUND, "%s's session ended" % jid)
            await asyncio.sleep(STRAY)  # see _sc_scenario: no login on its descriptor before
            await people.log_in([returner], "d")
            members["again"] = domain_members(router, stack)
            again = await deliver(people, "again")
            return SmRun(home, down, leave, back, again, leavers, returner,
                         people.session(returner), members)
    return run(scenario(), timeout=120)


@dataclass
class SmFigures:
    leavers: int
    broken_down: int       # users with a live session on a survivor who missed a message while sm1 was down
    broken_leave: int
    moved_leave: int       # users whose messages went elsewhere than at home, sm1's own users excluded
    moved_back: int        # users whose messages went elsewhere on sm1's return than before it
    moved_back_needless: int  # ... of whom sm1 was never the first home
    moved_between_stayers: int  # ... moved from sm2 to sm3 or back
    broken_back: int       # users with a live session who missed the message after the return
    returner_sm: str

    @classmethod
    def of(cls, r):
        stayers = [u for u in USERS if u not in r.leavers]
        moved_back = moved(r.leave, r.back)
        return cls(
            leavers=len(r.leavers), broken_down=len(r.down.broken),
            broken_leave=len(r.leave.broken), moved_leave=len(moved(r.home, r.leave, stayers)),
            moved_back=len(moved_back),
            moved_back_needless=len([u for u in moved_back if u not in r.leavers]),
            moved_between_stayers=len([u for u in moved_back if {
                r.leave.placed[u], r.back.placed[u]} <= set(SM_IDS) - {LEAVER}]),
            broken_back=len(r.back.broken), returner_sm=r.returner_sm)

    def line(self, label):
        return ("%s: 3 sm, %d users, %d on %s | %s stops: %d broken before and %d after its "
                "users log in again, %d others moved | it returns: %d moved (%d needlessly, "
                "%d between sm2 and sm3), %d broken sessions | a re-login of its user lands "
                "on %s" % (label, len(USERS), self.leavers, LEAVER, LEAVER, self.broken_down,
                           self.broken_leave, self.moved_leave, self.moved_back,
                           self.moved_back_needless, self.moved_between_stayers,
                           self.broken_back, self.returner_sm))


def report(record_property, label, key, line):
    print("\nAFFINITY " + line)
    record_property(key, line)


def predicted(members):
    """jabberd2's placement (§6.3) over `members` in order."""
    return {u: members[jabberd2_index(len(members), u)] for u in USERS}


@pytest.mark.parametrize("setup", list(SM_SETUPS))
def test_sm_member_returns(router_factory, sm_stack, record_property, setup):
    """Three sm, sm1 stops and returns: with affinity='session' every user whose sm is up keeps receiving in the live session, nobody moves on the return, and a new login of sm1's user goes back to sm1; the other set-ups show their measured defect."""
    kind, policy = SM_SETUPS[setup]
    router = router_factory(kind, extra=policy or "")
    stack = sm_stack(router)
    r = sm_scenario(router, stack)
    figures = SmFigures.of(r)
    report(record_property, setup, "sm_affinity", figures.line(setup))
    for name, value in asdict(figures).items():
        record_property(name, value)

    for check in (r.home, r.down, r.leave, r.back, r.again):
        assert_consistent(check)
    assert r.home.live == set(USERS)                 # all up: everyone receives
    assert set(r.home.session.values()) == set(SM_IDS) and r.leavers
    stayers = [u for u in USERS if u not in r.leavers]

    if policy is None:
        # jabberd2's placement, whichever router: the hash modulo the live
        # members in the router's order, so the test reads the real thing.
        for check in (r.home, r.down, r.leave, r.back, r.again):
            assert check.placed == predicted(r.members[check.tag]), check.tag
        assert r.members["back"][-1] == LEAVER
        assert figures.moved_back > 0 and figures.broken_back > 0  # the complaint
        return

    # consistent, with or without affinity: a loss moves only the lost sm's users.
    assert figures.moved_leave == 0
    assert r.down.live == set(stayers) and r.leave.live == set(USERS)
    assert {r.down.placed[u] for u in r.leavers} <= set(SM_IDS) - {LEAVER}
    assert {r.leave.session[u] for u in r.leavers} <= set(SM_IDS) - {LEAVER}
    if setup == "consistent":
        # Today: on the return sm1's users' messages go back to sm1, which has
        # no session for them (filed offline); nobody else moves.
        assert moved(r.leave, r.back) == set(r.leavers)
        assert r.back.broken == set(r.leavers) and r.back.offline == set(r.leavers)
        assert figures.moved_between_stayers == 0
    else:
        # The promise: the return moves nobody, breaks no session.
        assert moved(r.leave, r.back) == set(), "moved on the return: %s" % sorted(
            moved(r.leave, r.back))
        assert r.back.broken == set() and r.back.live == set(USERS)
    # A new login of sm1's user goes back to sm1 and receives there; nobody else moves.
    assert r.returner_sm == LEAVER, "%s logged out and in: the new session started on %s" % (
        r.returner, r.returner_sm)
    assert r.returner in r.again.live
    assert moved(r.back, r.again, [u for u in USERS if u != r.returner]) == set()
    if setup == "consistent":
        assert r.again.broken == set(r.leavers) - {r.returner}
    else:
        assert r.again.live == set(USERS)


# -- XEP-0114 gateway copies: traffic affinity ------------------------------------------------

GW_LEAVER = "copy2"
GATEWAY_USERS = GW_USERS[:60]
IDLE = 6               # affinity-idle of the traffic variant, seconds
GW_SETUPS = {
    "jabberd2-placement": None,
    "consistent": clustering(GW, algorithm="consistent"),
    "traffic-affinity": clustering(GW, algorithm="consistent", affinity="traffic",
                                   affinity_idle=IDLE),
}


@pytest.mark.parametrize("setup", list(GW_SETUPS))
def test_gateway_copy_returns(router_factory, jabberd2_stack_factory, transport, record_property,
                              setup):
    """Three gateway copies, copy2 killed and restarted: with affinity='traffic' no user who was active meanwhile moves on its return, quiet ones go back home, and after affinity-idle everyone is home; without, the active ones move back."""
    policy = GW_SETUPS[setup]
    router = router_factory("jrouter", extra=policy or "")
    stack = jabberd2_stack_factory(router)
    copies = transport(router)

    async def scenario():
        async with Clients(stack.c2s_ip, stack.c2s_port) as clients:
            users = await log_in_all(clients, GATEWAY_USERS)
            home = await where(users, "home")
            leavers = [u for u in users if home[u] == GW_LEAVER]
            quiet = leavers[::2]                       # silent while copy2 is away
            active = {u: c for u, c in users.items() if u not in quiet}
            kill_member(router, copies[GW_LEAVER])
            outage = await where(active, "outage")
            copies[GW_LEAVER].start()
            back = await where(users, "back")
            idle = None
            if "traffic" in (policy or ""):
                await asyncio.sleep(IDLE + 2)          # no traffic: the entries expire
                idle = await where(users, "idle")
            return home, leavers, quiet, outage, back, idle
    home, leavers, quiet, outage, back, idle = run(scenario(), timeout=90)
    active = [u for u in GATEWAY_USERS if u not in quiet]
    moved_active = [u for u in active if back[u] != outage[u]]
    line = ("%s: 3 copies, %d users, %d on %s (%d quiet while it is away) | it returns: %d of "
            "the %d active users moved, %d of them needlessly (not its own), quiet ones home "
            "%d/%d%s" % (setup, len(GATEWAY_USERS), len(leavers), GW_LEAVER, len(quiet),
                         len(moved_active), len(active),
                         len([u for u in moved_active if u not in leavers]),
                         len([u for u in quiet if back[u] == GW_LEAVER]), len(quiet),
                         "" if idle is None else " | after %d s idle: %d of %d home" % (
                             IDLE, sum(idle[u] == home[u] for u in idle), len(idle))))
    report(record_property, setup, "gateway_affinity", line)

    assert leavers and quiet and len(quiet) < len(leavers)
    assert all(outage[u] != GW_LEAVER for u in outage)   # nobody sent to the dead copy
    if policy is None:
        assert moved_active                              # jabberd2's hash: many move
        return
    assert {u for u in active if outage[u] != home[u]} == set(leavers) - set(quiet)
    assert [u for u in quiet if back[u] != GW_LEAVER] == []  # no traffic elsewhere: home
    if idle is None:
        # Today: the active users of copy2 lose their new session on its return.
        assert sorted(moved_active) == sorted(set(leavers) - set(quiet))
    else:
        assert moved_active == [], "active users moved on the return: %s" % moved_active
        assert idle == home                              # affinity-idle passed: all home


# -- router restart: slots kept in state-dir, members back in reverse order --------------------

@pytest.mark.parametrize("keep", ["state-dir", "no-state"])
def test_router_restart_reverse_reconnect(router_factory, jabberd2_stack_factory, transport,
                                          tmp_path, record_property, keep):
    """algorithm='slots': the router restarts and the copies reconnect in reverse order; with <clustering state-dir> every user keeps its copy, without it slots go in connection order again."""
    state = tmp_path / "state"
    state.mkdir()
    attrs = " state-dir='%s'" % state if keep == "state-dir" else ""
    policy = "<clustering%s><policy name='%s' algorithm='slots' slots='3'/></clustering>" % (
        attrs, GW)
    router = router_factory("jrouter", extra=policy)
    stack = jabberd2_stack_factory(router, retry=RETRY)
    copies = transport(router)

    def restart():
        assert router.stop() == 0
        for copy in copies.values():
            copy.kill()                 # their stream ended; make sure the runs are gone
        again = router_factory("jrouter", port=router.port, extra=policy)
        again.wait_for(lambda: all("[%s] online" % n in again.log_text
                                   for n in ("sm", "c2s", DOMAIN)), 60.0, "sm and c2s bound again")
        stack.c2s.wait_for(stack.c2s.serves_domain, 30.0, "serving %s again" % DOMAIN)
        for copy_id in reversed(list(copies)):
            copies[copy_id].start()
        return again

    async def scenario():
        async with Clients(stack.c2s_ip, stack.c2s_port) as clients:
            users = await log_in_all(clients, GATEWAY_USERS)
            home = await where(users, "home")
            await asyncio.to_thread(restart)
            after = await where(users, "after")
            return home, after
    home, after = run(scenario(), timeout=120)
    changed = [u for u in home if after[u] != home[u]]
    line = "slots=3, %s: router restart, copies back as copy3, copy2, copy1: %d of %d users moved" % (
        keep, len(changed), len(home))
    report(record_property, keep, "restart_placement", line)
    assert set(home.values()) == set(copies)
    if keep == "state-dir":
        assert changed == [], "moved over the restart: %s" % changed
    else:
        # Slots in connection order again: copy3 takes slot 0, copy1 slot 2.
        swap = {"copy1": "copy3", "copy2": "copy2", "copy3": "copy1"}
        assert after == {u: swap[c] for u, c in home.items()}


# -- the session-control packets, as the real daemons exchange them ------------------------------


def session_packets(tap):
    """[(sender's name, route, sc:session)] of every session-control route a
    component sent through `tap`, in order per connection; the name is the one
    the connection bound without `multi` (c2s, or an sm's id)."""
    out = []
    for conn in tap.connections:
        sent = [el for _t, el in conn.elements(UP)]
        name = next((el.get("name") for el in sent
                     if el.tag == "{%s}bind" % COMPONENT and el.get("multi") is None), None)
        for route in sent:
            sc = route.find("{%s}session" % SESSION) if route.tag == "{%s}route" % COMPONENT else None
            if sc is not None:
                out.append((name, route, sc))
    return out


def addressed(packet):
    """(sender's name, route from, route to, action, target, sc:sm) of one packet."""
    name, route, sc = packet
    return (name, route.get("from"), route.get("to"), sc.get("action"), sc.get("target"),
            sc.get("{%s}sm" % SESSION))


@dataclass
class SessionTrace:
    """Every session-control packet of one session, as sent to the router."""

    start: tuple             # addressed(...) of c2s's start
    started: tuple           # ... of the sm's reply
    ends: list               # ... of c2s's ends of it
    ended: list              # ... of the sm's ended
    refused: list            # ... of an sm's `end sc:failed='1'` (a session it does not know)


def trace(packets, full_jid):
    """The SessionTrace of the session of `full_jid` (None while it has not started)."""
    mine = [p for p in packets if p[2].get("target") == full_jid]
    start = [p for p in mine if p[2].get("action") == "start"]
    started = [p for p in mine if p[2].get("action") == "started"]
    if not start or not started:
        return None
    sid = started[0][2].get("{%s}sm" % SESSION)
    same = [p for p in packets if p[2].get("{%s}sm" % SESSION) == sid]
    return SessionTrace(
        addressed(start[0]), addressed(started[0]),
        ends=[addressed(p) for p in same if p[0] == "c2s" and p[2].get("action") == "end"],
        ended=[addressed(p) for p in same if p[2].get("action") == "ended"],
        refused=[addressed(p) for p in same if p[0] != "c2s" and p[2].get("action") == "end"
                 and p[2].get("{%s}failed" % SESSION) == "1"])


@pytest.mark.parametrize("router_kind", ["jrouter", "jabberd2"])
def test_session_control_packets(router_factory, router_kind, jabberd2_stack_factory,
                                 record_property):
    """What c2s and sm say of sessions (affinity='session' learns from it): start goes to the domain with target, started comes from the sm's id with target and sc:sm; end (logout, TCP reset) goes to the sm's id and ended (also when an sm stops) comes back, both with sc:sm and no target."""
    router = router_factory(router_kind)
    tap = WireTap(router.ip, router.port)
    stack = None
    try:
        stack = jabberd2_stack_factory(tap, sm_ids=("sm1", "sm2"))
        traces, sigterm, relogin = run(_sc_scenario(stack, tap), timeout=60)
    finally:
        if stack is not None:
            stack.stop()
        tap.stop()
    for how, t in traces.items():
        full = t.start[4]
        sm = t.started[0]
        assert t.start == ("c2s", "c2s", DOMAIN, "start", full, None), how
        assert sm in ("sm1", "sm2") and t.started[1:5] == (sm, "c2s", "started", full), how
        sid = t.started[5]
        assert sid
        assert t.ended == [(sm, sm, "c2s", "ended", None, sid)], how   # no target
        if how == "sigterm":
            assert t.ends == [] and sm == "sm1"     # the sm ended it; c2s sent nothing
            continue
        # c2s ends a session at the sm's id, with no target. Sometimes a second
        # end follows (c2s 2.7 ends it again as the connection closes), addressed
        # to the domain or to '' (what is left of the sm's name): with no target
        # to place it by it reaches any sm, the one that just ended it too, and
        # that sm answers `end sc:failed='1'` from the domain (no such session).
        assert t.ends[0] == ("c2s", "c2s", sm, "end", None, sid), how
        assert len(t.ends) <= 2, (how, t)
        assert all(e[2] in (DOMAIN, "") and e[3:] == ("end", None, sid) for e in t.ends[1:]), (how, t)
        assert all(r[1:5] == (DOMAIN, "c2s", "end", None) for r in t.refused), (how, t)
        assert len(t.refused) <= len(t.ends) - 1, (how, t)
        record_property("%s_ends" % how, "%d end(s), %d refused" % (len(t.ends), len(t.refused)))
    assert sigterm and relogin == "sm2"


async def _sc_scenario(stack, tap):
    """alice logs out, bob's connection is reset, sm1 stops under carol, who logs in again.
    Returns ({'logout'|'reset'|'sigterm': SessionTrace}, c2s closed carol's stream,
    the sm of carol's new session)."""
    # carol: a user jabberd2's hash puts on sm1 (index 0 of [sm1, sm2]), so stopping sm1 ends her session
    carol = next("carol%d@%s" % (i, DOMAIN) for i in range(100)
                 if jabberd2_index(2, "carol%d@%s" % (i, DOMAIN)) == 0)
    users = {"logout": "alice@" + DOMAIN, "reset": "bob@" + DOMAIN, "sigterm": carol}
    async with Clients(stack.c2s_ip, stack.c2s_port) as clients:
        for jid in users.values():
            await clients.register(jid, PASSWORD)
        alice = await clients.login(users["logout"] + "/home", PASSWORD)
        await alice.logout()
        # c2s numbers sessions by file descriptor (sc:c2s), so the next login gets
        # alice's number; a late `end sc:failed` for hers could end it. Let it pass.
        await asyncio.sleep(STRAY)
        bob = await clients.login(users["reset"] + "/home", PASSWORD)
        bob.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        bob.transport.abort()           # an RST to c2s
        await asyncio.sleep(STRAY)
        c = await clients.login(carol + "/home", PASSWORD)
        stack.sms["sm1"].stop()         # SIGTERM
        await until(lambda: gone(c), DOWN_BOUND, "c2s closed carol's stream")
        again = await clients.login(carol + "/again", PASSWORD)

        def traces():
            packets = session_packets(tap)
            return {how: trace(packets, jid + "/home") for how, jid in users.items()}
        await until(lambda: all(t is not None and t.ended for t in traces().values()), 5.0,
                    "every session's start, started and ended")
        await asyncio.sleep(0.3)        # a second end, if any
        relogin = trace(session_packets(tap), str(again.boundjid))
        return traces(), gone(c), relogin.started[0] if relogin else None
