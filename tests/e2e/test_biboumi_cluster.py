"""End to end: three biboumi copies behind one name, a copy returns (issue 11, traffic affinity).

The issue's gateway case with a real transport: three copies of Debian's
biboumi serve `irc.example.test` (each its own config, log, sqlite database
and loopback address towards IRC; same name and secret; biboumi sends no
stream `from`, so jrouter takes them for identity-less instances), Debian's
ngircd is the IRC server, and real users (slixmpp, through Debian's c2s and
sm) join IRC channels through the router and talk. The fixtures, the IRC
client and the per-phase bookkeeping are tests/e2e/test_biboumi.py's; where
a user's IRC connection lives is read on the IRC side: the host of her JOIN
is the copy's address, and the nick tells a new connection from an existing
one (a new connection takes the nick asked for in that phase, an existing
one keeps its own). ngircd's log of registrations must agree with that.

Scenario, per set-up (jabberd2's placement, `consistent`, `consistent` with
`affinity='traffic'`):

1. home: every user joins #home and says something there.
2. b2 is killed (SIGKILL); ngircd sees its users' connections go, while
   the users are told nothing (no presence: biboumi is dead and nobody
   speaks for it). Every other one of its users rejoins (lands on a
   survivor: a new IRC connection); the rest stay quiet. Everyone active
   (the survivors' users and the rejoined ones) joins #outage and talks; an
   IRC roll call there reaches them.
3. b2 is restarted. The active users talk in #outage again (the first
   packets they send after the return), then everyone joins #back and an
   IRC roll call in #back reaches everyone.
4. traffic affinity only: nobody sends anything for affinity-idle + 2 s,
   then everyone joins #idle. Then IRC talk in #outage, and b2's rejoined
   users (who now have two IRC connections) talk in #idle.

Asserted with `affinity='traffic'`: the return moves no user who has a live
session on a survivor (her message still reaches IRC from the same
connection, her #back JOIN comes from the same copy with the same nick, and
ngircd registers no new connection for her); the quiet ones go home to b2.
Without affinity (`consistent`) the active users of b2 move back to it: their
first message after the return is refused by b2 ("You are not a participant
in this room": it has no IRC connection for them) and their join makes a
second IRC connection, leaving the one on the survivor behind. The same
happens under traffic affinity once affinity-idle has passed: biboumi keeps
a user's IRC connection for as long as she is in a channel, idle or not, so
the expiry of her entry is not the end of her gateway session. The
connection left behind still talks to her, but a copy's packet to a user
never moves her entry (§6.9), so her next message to the new channel still
reaches IRC from b2.

Run with `-s` to see the figures (lines starting `AFFINITY biboumi`); they
are also attached to each test's report (`record_property`).
"""

import asyncio
import json
import re
import urllib.request
from collections import Counter
from dataclasses import dataclass

import pytest

from tests.e2e.test_biboumi import (COPIES, GATEWAY, LEAVER, copy_hosts, copy_ports,
                                    gateway_barrier, irc_users, kill_copy, log_in, node,
                                    phase, phase_nick, room_jid, watcher_in)
from tests.e2e import test_biboumi as _biboumi, test_cluster as _cluster
from tests.e2e.test_cluster import clustering
from tests.support.ports import free_port
from tests.support.xmpp import Clients, run

DOMAIN = "example.test"
USERS = ["bc%02d@%s" % (i, DOMAIN) for i in range(30)]
IDLE = 10              # affinity-idle of the traffic set-up, seconds
SETTLE = 0.5           # after a barrier, for ngircd to relay what biboumi wrote
ROLL_CALL = 15.0       # bound for an IRC message to reach every user
# Fixtures of the single-transport tests, bound here by assignment (pytest finds
# them by name; pyflakes sees no unused import).
gateway, irc_server = _biboumi.gateway, _biboumi.irc_server
cheap_clients = _cluster.cheap_clients      # autouse: slixmpp without the CA store
SURVIVORS = tuple(c for c in COPIES if c != LEAVER)
SETUPS = {
    "jabberd2-placement": None,
    "consistent": clustering(GATEWAY, algorithm="consistent"),
    "traffic-affinity": clustering(GATEWAY, algorithm="consistent", affinity="traffic",
                                   affinity_idle=IDLE),
}


# -- what the users say and hear --------------------------------------------------------


def body(tag, user):
    return "%s from %s" % (tag, node(user))


async def talk(irc, logged, block, channel, tag, hosts):
    """Every user of `logged` says `body(tag, user)` in `channel`. Returns
    (user -> copy whose IRC connection carried it, None if it reached no IRC;
    user -> the message errors the gateway answered her with)."""
    room = room_jid(block, channel)
    for user, client in logged.items():
        client.send_message(mto=room, mbody=body(tag, user), mtype="groupchat")
    # One ordered path router -> copy: once the copy answers the IQ it has
    # handled the message, and written it to IRC if it could.
    await asyncio.gather(*(gateway_barrier(c) for c in logged.values()))
    await asyncio.sleep(SETTLE)
    lines = irc.taken_all(lambda m: m.command == "PRIVMSG" and m.params[:1] == (channel,)
                          and m.params[-1].startswith(tag + " from "))
    said = {u: None for u in logged}
    for m in lines:
        user = "%s@%s" % (m.params[-1].split(" from ", 1)[1], DOMAIN)
        assert said.get(user) is None, "said twice on IRC: %s" % m.raw
        said[user] = hosts[m.host]
    errors = {}
    for user, client in logged.items():   # taken, so the next round counts its own
        if client.message_errors:
            errors[user] = list(client.message_errors)
            client.message_errors.clear()
    return said, errors


def keep_message_errors(client):
    """slixmpp gives a message of type error to 'message_error', not 'message'
    (which tests/support/xmpp.py records): keep them in `client.message_errors`."""
    client.message_errors = []
    client.add_event_handler("message_error", client.message_errors.append)


async def roll_call(irc, logged, channel):
    """An IRC message to `channel` reaches every user of `logged` (bounded)."""
    text = "roll call in %s" % channel
    irc.privmsg(channel, text)
    await asyncio.gather(*(c.wait_for("message", lambda m: m["body"] == text, timeout=ROLL_CALL)
                           for c in logged.values()))


async def joined(irc, logged, block, channel, hosts):
    """Every user of `logged` joins `channel`: user -> (copy, IRC nick) of the
    connection that made her JOIN, the nick being the one she got."""
    where, nicks = await phase(irc, logged, block, channel, hosts)
    return {u: (where[u], nicks[u]) for u in logged}


def new_connection(conn, user, channel):
    """Her JOIN of `channel` came from a connection made for it (the nick asked for then)."""
    return conn[user][1] == phase_nick(user, channel.lstrip("#"))


def placement(status_port, copies, router, users):
    """user -> (copy, reason) as jrouter's /placement answers now."""
    ports = copy_ports(copies, router)
    answer = {}
    for user in users:
        with urllib.request.urlopen("http://127.0.0.1:%d/placement?name=%s&jid=%s" % (
                status_port, GATEWAY, user), timeout=5) as reply:
            data = json.loads(reply.read())
        port = int(re.fullmatch(r"\[[^,]+, port=(\d+)\]", data["member"]).group(1))
        answer[user] = (ports[port], data.get("reason", ""))
    return answer


def affinity_table(status_port, copies, router):
    """The name's affinity figures from /status, members named by copy (None: no table)."""
    ports = copy_ports(copies, router)
    with urllib.request.urlopen("http://127.0.0.1:%d/status" % status_port, timeout=5) as reply:
        names = json.loads(reply.read())["names"]
    table = next(n for n in names if n["name"] == GATEWAY)["affinity"]
    if table is None:
        return None
    table = dict(table)
    table["per_member"] = {
        ports[int(re.fullmatch(r"\[[^,]+, port=(\d+)\]", label).group(1))]: count
        for label, count in table["per_member"].items()}
    return table


# -- the scenario --------------------------------------------------------------------------


@dataclass
class Run:
    home: dict           # user -> (copy, nick) of her #home JOIN
    outage: dict         # active users -> (copy, nick) of their #outage JOIN, b2 dead
    back: dict           # every user -> (copy, nick) of her #back JOIN, b2 back
    idle: dict           # every user -> (copy, nick) of her #idle JOIN (traffic only, else {})
    said_home: dict      # user -> copy that put her #home message on IRC
    said_outage: dict
    said_back: dict      # active users -> copy that put their first message after the
                         # return on IRC
    errors_back: dict    # active users -> message errors they got for it
    leavers: list        # users whose home was b2
    quiet: list          # ... of whom silent while b2 was away
    placement_back: dict  # user -> (copy, reason) from /placement after #back
    table_back: dict     # /status affinity figures after #back (None without a table)
    table_idle: dict     # ... after #idle
    connections: int     # IRC clients of the copies at the end (LUSERS, less the watcher)
    said_relay: dict     # b2's rejoined users -> copy that put their #idle message on IRC
                         # after IRC talk in #outage reached them (traffic only)
    errors_relay: dict
    placement_relay: dict   # ... -> (copy, reason) from /placement then
    told_left: list      # b2's users told by presence that they left #home when it was killed

    @property
    def active(self):
        return [u for u in self.home if u not in self.quiet]

    def copy(self, phase_, user):
        return getattr(self, phase_)[user][0]


def scenario(request, router, stack, copies, ngircd, status_port, idle_phase):
    block = ngircd.block
    hosts = copy_hosts(block)
    channels = ("#home", "#outage", "#back", "#idle")

    async def main():
        irc = await watcher_in(request, block, *channels)
        async with Clients(stack.c2s_ip, stack.c2s_port) as clients:
            logged = await log_in(clients, USERS)
            for client in logged.values():
                keep_message_errors(client)
            home = await joined(irc, logged, block, "#home", hosts)
            said_home, _ = await talk(irc, logged, block, "#home", "home", hosts)
            await kill_copy(router, copies, irc, {u: c for u, (c, _n) in home.items()})

            leavers = [u for u in USERS if home[u][0] == LEAVER]
            home_room = room_jid(block, "#home")
            await asyncio.sleep(SETTLE)
            told_left = [u for u in leavers if [
                p for p in logged[u].pending("presence") if p["from"].bare == home_room
                and p["type"] == "unavailable" and p["from"].resource == home[u][1]]]
            quiet = leavers[::2]
            active = {u: c for u, c in logged.items() if u not in quiet}
            outage = await joined(irc, active, block, "#outage", hosts)
            said_outage, _ = await talk(irc, active, block, "#outage", "outage", hosts)
            await roll_call(irc, active, "#outage")

            copies[LEAVER].start()
            said_back, errors_back = await talk(irc, active, block, "#outage", "back", hosts)
            back = await joined(irc, logged, block, "#back", hosts)
            await roll_call(irc, logged, "#back")
            placement_back = placement(status_port, copies, router, USERS)
            table_back = affinity_table(status_port, copies, router)

            idle, said_relay, errors_relay, placement_relay = {}, {}, {}, {}
            if idle_phase:
                await asyncio.sleep(IDLE + 2)     # nothing sent either way: entries expire
                idle = await joined(irc, logged, block, "#idle", hosts)
                await roll_call(irc, logged, "#idle")
                # Users with two IRC connections now (b2's rejoined ones: the
                # new one on b2 in #idle, the one they had on a survivor still
                # in #outage): IRC talk in #outage reaches them from the
                # survivor, then they talk in #idle.
                twice = {u: logged[u] for u in leavers if u not in quiet}
                await roll_call(irc, active, "#outage")
                said_relay, errors_relay = await talk(irc, twice, block, "#idle", "relay", hosts)
                placement_relay = placement(status_port, copies, router, twice)
            table_idle = affinity_table(status_port, copies, router)
            connections = await irc_users(irc) - 1
        await irc.quit()
        return Run(home, outage, back, idle, said_home, said_outage, said_back, errors_back,
                   leavers, quiet, placement_back, table_back, table_idle, connections,
                   said_relay, errors_relay, placement_relay, told_left)
    return run(main(), timeout=80)


def made_connections(r):
    """(user, copy) -> IRC connections the JOINs imply: one for each JOIN with
    the nick asked for in that phase (a connection made for it)."""
    made = Counter()
    for channel, where in (("#home", r.home), ("#outage", r.outage), ("#back", r.back),
                           ("#idle", r.idle)):
        for user, (copy, _nick) in where.items():
            if new_connection(where, user, channel):
                made[(node(user), copy)] += 1
    return made


@dataclass
class Figures:
    users: int
    leavers: int
    quiet: int
    active: int
    moved_on_kill: int          # users whose #outage JOIN came from another copy than
                                # their #home JOIN, b2's excluded
    moved_on_return: int        # active users whose #back JOIN came from another copy than #outage
    moved_needlessly: int       # ... of them not b2's users
    new_connections_on_return: int   # active users whose #back JOIN needed a new IRC connection
    broken_on_return: int       # active users whose first message after the return reached no IRC
    errors_on_return: int       # ... message errors the gateway answered them with
    quiet_home: int             # quiet users back on b2 after its return
    idle_home: int              # users on their home copy after affinity-idle (-1: not run)
    idle_new_connections: int   # new IRC connections the #idle joins made (-1: not run)
    ghosts: int                 # IRC connections left on a copy that no longer serves the user
    told_left: int              # b2's users told they left #home when it was killed
    relay_lost: int             # b2's rejoined users whose #idle message reached no IRC after
                                # their older connection relayed IRC talk to them (-1: not run)
    moves: int                  # the affinity table's moves at the end (-1: no table)

    @classmethod
    def of(cls, r):
        active = r.active
        moved_kill = [u for u in active
                      if u not in r.leavers and r.copy("outage", u) != r.copy("home", u)]
        moved_back = [u for u in active if r.copy("back", u) != r.copy("outage", u)]
        return cls(
            users=len(r.home), leavers=len(r.leavers), quiet=len(r.quiet), active=len(active),
            moved_on_kill=len(moved_kill), moved_on_return=len(moved_back),
            moved_needlessly=len([u for u in moved_back if u not in r.leavers]),
            new_connections_on_return=len([u for u in active
                                           if new_connection(r.back, u, "#back")]),
            broken_on_return=len([u for u in active if r.said_back[u] is None]),
            errors_on_return=sum(len(e) for e in r.errors_back.values()),
            quiet_home=len([u for u in r.quiet if r.copy("back", u) == LEAVER]),
            idle_home=sum(r.copy("idle", u) == r.copy("home", u) for u in r.idle) if r.idle else -1,
            idle_new_connections=len([u for u in r.idle if new_connection(r.idle, u, "#idle")])
            if r.idle else -1,
            ghosts=r.connections - len(r.home), told_left=len(r.told_left),
            relay_lost=len([u for u, c in r.said_relay.items() if c is None]) if r.idle else -1,
            moves=r.table_idle["moves"] if r.table_idle else -1)

    def line(self, label):
        text = ("%s: 3 biboumi copies, %d users, %d on %s (%d quiet while it is away) | %s "
                "killed: %d others moved, %d of its users told they left | it returns: %d of "
                "the %d active users moved (%d needlessly), %d new IRC connections for them, "
                "%d first messages lost (%d errors back), quiet ones home %d/%d" % (
                    label, self.users, self.leavers, LEAVER, self.quiet, LEAVER,
                    self.moved_on_kill, self.told_left, self.moved_on_return, self.active,
                    self.moved_needlessly, self.new_connections_on_return,
                    self.broken_on_return, self.errors_on_return, self.quiet_home, self.quiet))
        if self.idle_home >= 0:
            text += (" | after %d s idle: %d/%d home, %d new IRC connections; with IRC talk "
                     "relayed by the connection left behind, %d of %d messages in the new "
                     "channel lost (table moves %d)" % (
                         IDLE, self.idle_home, self.users, self.idle_new_connections,
                         self.relay_lost, self.leavers - self.quiet, self.moves))
        return text + " | at the end %d IRC connections left behind" % self.ghosts


def report(record_property, label, figures, r):
    line = figures.line(label)
    print("\nAFFINITY biboumi " + line)
    record_property("biboumi_affinity", line)
    for name, value in figures.__dict__.items():
        record_property(name, value)
    for when, table in (("after_return", r.table_back), ("at_end", r.table_idle)):
        if table is not None:
            text = ("entries %(entries)d per copy %(per_member)s, placed %(placed)d, moves "
                    "%(moves)d, dropped_left %(dropped_left)d, dropped_idle %(dropped_idle)d"
                    % table)
            print("AFFINITY biboumi %s: table %s: %s" % (label, when, text))
            record_property("affinity_table_" + when, text)


@pytest.mark.parametrize("setup", list(SETUPS))
def test_biboumi_copy_returns(router_factory, jabberd2_stack_factory, gateway, irc_server,
                              request, record_property, setup):
    """Three biboumi copies, b2 killed and restarted: with affinity='traffic' no user with a live IRC session on a survivor moves, loses a message or gets a new IRC connection on the return, and quiet ones go home; without affinity the active users of b2 move back, their first message is lost and a second IRC connection is made."""
    policy = SETUPS[setup]
    status_port = free_port()
    router = router_factory("jrouter", extra=[
        policy or "", "<status><ip>127.0.0.1</ip><port>%d</port></status>" % status_port])
    stack = jabberd2_stack_factory(router)
    copies = gateway(router, COPIES)
    traffic = "traffic" in (policy or "")
    r = scenario(request, router, stack, copies, irc_server, status_port, idle_phase=traffic)
    f = Figures.of(r)
    report(record_property, setup, f, r)
    hosts = copy_hosts(irc_server.block)

    # Whatever the placement: everyone was reached where she was, and ngircd
    # registered exactly the connections the JOINs show.
    registered = Counter((user, hosts[host]) for user, host in irc_server.registrations()
                         if host in hosts)
    assert registered == made_connections(r)
    assert {c for c, _n in r.home.values()} == set(COPIES)
    assert r.said_home == {u: c for u, (c, _n) in r.home.items()}
    assert r.said_outage == {u: c for u, (c, _n) in r.outage.items()}
    assert all(c in SURVIVORS for c, _n in r.outage.values())      # nobody sent to the dead copy
    assert r.leavers and r.quiet and len(r.quiet) < len(r.leavers)
    # SIGKILL: biboumi says nothing, and nobody else speaks for it: b2's users
    # still think they are in #home (they must rejoin on their own).
    assert r.told_left == []
    assert {u: c for u, (c, _r) in r.placement_back.items()} == {
        u: c for u, (c, _n) in r.back.items()}

    if policy is None:
        # jabberd2's hash modulo the live copies: users of the survivors move too.
        assert f.moved_on_kill > 0 and f.moved_needlessly > 0
        return

    # consistent, with or without affinity: the kill moves only b2's users.
    assert f.moved_on_kill == 0
    leavers = set(r.leavers)
    quiet = set(r.quiet)
    rejoined = leavers - quiet
    assert [u for u in r.quiet if r.copy("back", u) != LEAVER] == []   # no traffic elsewhere: home
    assert all(new_connection(r.back, u, "#back") for u in r.quiet)
    if not traffic:
        # The return takes b2's active users back: their message goes to b2,
        # which has no IRC connection for them, and their join makes one more.
        moved = {u for u in r.active if r.copy("back", u) != r.copy("outage", u)}
        assert moved == rejoined
        assert {r.copy("back", u) for u in moved} == {LEAVER}
        assert {u for u in r.active if r.said_back[u] is None} == rejoined
        # ... and b2 says so: "You are not a participant in this room."
        assert {u: [e["error"]["condition"] for e in es] for u, es in r.errors_back.items()} \
            == {u: ["not-acceptable"] for u in rejoined}
        assert {u for u in r.active if new_connection(r.back, u, "#back")} == rejoined
        assert f.ghosts == len(rejoined)
        return

    # Traffic affinity: nobody with a live session on a survivor is moved.
    moved = sorted(u for u in r.active if r.copy("back", u) != r.copy("outage", u))
    assert moved == [], "moved on the return: %s" % moved
    lost = sorted(u for u in r.active if r.said_back[u] != r.copy("outage", u))
    assert lost == [], "first message after the return not on IRC from her connection: %s" % lost
    assert r.errors_back == {}
    renewed = sorted(u for u in r.active if r.back[u][1] != r.outage[u][1])
    assert renewed == [], "a new IRC connection on the return: %s" % renewed
    assert {u for u in rejoined if "affinity" in r.placement_back[u][1]} == rejoined
    assert r.table_back["dropped_left"] >= len(r.leavers)
    # After affinity-idle the table has forgotten them: everyone is placed by
    # the hash, home, and b2's rejoined users get a second IRC connection there.
    assert {u: c for u, (c, _n) in r.idle.items()} == {u: c for u, (c, _n) in r.home.items()}
    assert {u for u in USERS if new_connection(r.idle, u, "#idle")} == rejoined
    assert f.ghosts == len(rejoined)
    # A copy's packet to a user refreshes her entry there but never moves it
    # (§6.9): IRC talk in #outage, relayed by the connection left behind on a
    # survivor, does not take her back, and her message to #idle, a channel
    # only her new connection on b2 is in, reaches IRC from b2.
    assert {u: c for u, (c, _why) in r.placement_relay.items()} == {
        u: r.idle[u][0] for u in rejoined}
    assert all("affinity" in why for _c, why in r.placement_relay.values())
    assert r.said_relay == {u: r.idle[u][0] for u in rejoined}
    assert r.errors_relay == {}
    assert r.table_idle["moves"] == 0
