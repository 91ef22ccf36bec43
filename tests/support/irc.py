"""IRC for end-to-end tests: Debian's ngircd, copies of biboumi, and a raw IRC client.

Owns: a loopback address block for one test, ngircd configured and run in the
foreground on it, biboumi (the XMPP-IRC gateway, a real XEP-0114 component)
run as one or more copies behind the router, and a small asyncio IRC client
that speaks the protocol itself (NICK/USER/JOIN/PRIVMSG/PART, answers PING)
so a test sees exactly what the IRC side receives.
Must not know: which router runs, or what a test concludes.

Why a whole loopback block (127.A.B.0/24, chosen at random and checked free):
biboumi reaches an IRC server on its default ports only (TLS on 6697 and 6670,
then plain 6667); another port needs a per-user setting made through ad-hoc
commands. So ngircd listens on 6667 of an address of its own, where nothing
answers on 6697 or 6670 and biboumi falls back to plain IRC at once. Each
biboumi copy binds its IRC sockets to an address of its own in the block
(`outgoing_bind`); ngircd does no DNS lookups, so every IRC user's host *is*
that address, and the raw client tells which copy made an IRC connection from
the `nick!user@host` prefix of its JOIN. With `realname_from_jid=true`
biboumi sends the JID's node as the IRC user name, so the prefix also names
the XMPP user, whatever nick it got.

Every wait is bounded; processes are stopped by PID (ManagedProcess).
"""

import asyncio
import os
import random
import re
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .ports import connect_address
from .process import ManagedProcess, RestartableDaemon

NGIRCD = "/usr/sbin/ngircd"
BIBOUMI = "/usr/bin/biboumi"
IRC_PORT = 6667            # biboumi's plain port (it tries TLS on 6697, 6670 first)
TLS_PORTS = (6697, 6670)   # must stay closed on the server address
DEFAULT_TIMEOUT = 10.0


# -- addresses -------------------------------------------------------------------------


def _bindable(ip, port):
    with socket.socket() as sock:
        try:
            sock.bind((ip, port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class LoopbackBlock:
    """127.A.B.0/24 for one test: .1 is the IRC server, .10+i is biboumi copy i."""

    prefix: str  # '127.A.B'

    @classmethod
    def pick(cls, tries=50):
        """A block whose server address has nothing on the IRC ports yet."""
        rng = random.SystemRandom()
        for _ in range(tries):
            block = cls("127.%d.%d" % (rng.randint(100, 250), rng.randint(1, 250)))
            if all(_bindable(block.server, p) for p in (IRC_PORT, *TLS_PORTS)):
                return block
        raise RuntimeError("no free loopback block for IRC after %d tries" % tries)

    @property
    def server(self):
        return self.prefix + ".1"

    def copy_address(self, index):
        """The address biboumi copy number `index` (1, 2, ...) connects from."""
        return "%s.%d" % (self.prefix, 10 + index)


# -- ngircd ----------------------------------------------------------------------------


def write_ngircd_config(directory, ip, port=IRC_PORT, name="irc.test"):
    """A minimal ngircd.conf: one plain port on `ip`; no PAM, ident, DNS, includes,
    connection limits or flood penalties (biboumi copies make many connections
    from one address, and the raw client sends its commands in bursts)."""
    directory = Path(directory)
    (directory / "ngircd.conf.d").mkdir(parents=True, exist_ok=True)
    config = (
        "[Global]\n"
        "Name = %(name)s\n"
        "Info = jrouter test IRC server\n"
        "AdminInfo1 = jrouter tests\n"
        "AdminInfo2 = loopback\n"
        "AdminEMail = nobody@example.test\n"
        "Listen = %(ip)s\n"
        "Ports = %(port)d\n"
        "MotdPhrase = jrouter test server\n"
        "PidFile = \n"
        "[Limits]\n"
        "MaxConnections = 0\n"
        "MaxConnectionsIP = 0\n"
        "MaxJoins = 0\n"
        "MaxNickLength = 30\n"
        "MaxPenaltyTime = 0\n"
        "PingTimeout = 120\n"
        "PongTimeout = 60\n"
        "[Options]\n"
        "DNS = no\n"
        "Ident = no\n"
        "PAM = no\n"
        "IncludeDir = %(include)s\n"
        "[SSL]\n") % {"name": name, "ip": ip, "port": port,
                      "include": directory / "ngircd.conf.d"}
    path = directory / "ngircd.conf"
    path.write_text(config, encoding="utf-8")
    return path


_REGISTERED = re.compile(r'User "[^!"]+!~?([^@"]+)@([^"]+)" registered')


class NgircdProcess(ManagedProcess):
    """ngircd in the foreground (`-n`) on `block.server`, logging to its stdout
    (ngircd.stdout). Started as root, it drops to user nobody by itself."""

    def __init__(self, directory, block, port=IRC_PORT):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.block = block
        self.config = write_ngircd_config(directory, block.server, port)
        super().__init__("ngircd", [NGIRCD, "-n", "-f", str(self.config)], directory)
        self.log_path = self.stdout_path
        self.ip, self.port = block.server, port

    def registrations(self):
        """(IRC user name, host) of every client that registered, in order (ngircd's log)."""
        return _REGISTERED.findall(self.log_text)

    def configtest(self):
        """`ngircd --configtest` on our file: (exit code, output)."""
        done = subprocess.run([NGIRCD, "--configtest", "-f", str(self.config)],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=10)
        return done.returncode, done.stdout + done.stderr

    def start(self, timeout=10.0):
        return self.spawn_until(timeout, port=self.port)


# -- biboumi ---------------------------------------------------------------------------


def write_biboumi_config(path, *, hostname, router, secret, db, log, outgoing_bind,
                         policy_directory):
    """biboumi's option=value file (biboumi(1), "Options")."""
    options = {
        "hostname": hostname,
        "password": secret,
        "xmpp_server_ip": connect_address(router.ip),
        "port": router.port,
        "admin": "",
        "realname_customization": "true",
        "realname_from_jid": "true",    # IRC user name = the JID's node: the prefix names the user
        "log_file": log,
        "log_level": 0,                 # debug: every stanza received and sent
        "ca_file": "",
        "db_name": db,
        "policy_directory": policy_directory,  # empty: no Botan policy files of /etc/biboumi
        "outgoing_bind": outgoing_bind,
        "identd_port": 0,               # no identd (it would want port 113)
        "persistent_by_default": "false",
    }
    Path(path).write_text("".join("%s=%s\n" % kv for kv in options.items()), encoding="utf-8")
    return Path(path)


class BiboumiCopy(RestartableDaemon):
    """One copy of biboumi serving `hostname`, as a child process: start, kill, start again.

    Its IRC connections come from `outgoing_bind`. Each run gets its own
    config and log (`COPY.N.cfg`, `COPY.N.log`); the sqlite database
    (`COPY.sqlite`) is kept across runs, as a restarted daemon would.
    `kill()` sends SIGKILL: the router sees the stream drop without a
    goodbye, and ngircd sees the IRC connections drop.
    """

    def __init__(self, directory, hostname, copy_id, router, outgoing_bind, secret="secret"):
        if not os.access(BIBOUMI, os.X_OK):
            raise FileNotFoundError("%s is missing: install Debian's biboumi (scripts/bootstrap)"
                                    % BIBOUMI)
        self.directory = Path(directory) / copy_id
        (self.directory / "policy").mkdir(parents=True, exist_ok=True)
        self.hostname, self.copy_id, self.router = hostname, copy_id, router
        self.outgoing_bind, self.secret = outgoing_bind, secret
        super().__init__()   # stop(): SIGTERM (biboumi sends QUIT to IRC, ~2 s), then SIGKILL

    @property
    def name(self):
        return "biboumi-" + self.copy_id

    def start(self, timeout=10.0):
        """Start a new run; wait (bounded) until the router accepted its handshake."""
        n = len(self.runs) + 1
        log = self.directory / ("%s.%d.log" % (self.copy_id, n))
        config = write_biboumi_config(
            self.directory / ("%s.%d.cfg" % (self.copy_id, n)), hostname=self.hostname,
            router=self.router, secret=self.secret, db=self.directory / (self.copy_id + ".sqlite"),
            log=log, outgoing_bind=self.outgoing_bind, policy_directory=self.directory / "policy")
        run = ManagedProcess("%s.%d" % (self.copy_id, n), [BIBOUMI, str(config)], self.directory,
                             log_path=log)
        return self._launch(run, "Authenticated with the XMPP server", timeout)

    def log_text(self, run=None):
        """The log of every run, or of run number `run` (1-based)."""
        runs = self.runs if run is None else [self.runs[run - 1]]
        return "".join(r.log_text for r in runs)

    def describe(self):
        return "\n".join(r.describe() for r in self.runs) or "%s: never started" % self.name


# -- a raw IRC client ------------------------------------------------------------------


@dataclass(frozen=True)
class IrcMessage:
    """One line from the server: `:prefix COMMAND params... :trailing`."""

    prefix: str
    command: str
    params: tuple
    raw: str

    @property
    def nick(self):
        return self.prefix.split("!", 1)[0]

    @property
    def user(self):
        """The user part of `nick!user@host`, without ngircd's '~' (no ident)."""
        if "!" not in self.prefix:
            return ""
        return self.prefix.split("!", 1)[1].split("@", 1)[0].lstrip("~")

    @property
    def host(self):
        return self.prefix.rsplit("@", 1)[1] if "@" in self.prefix else ""

    @classmethod
    def parse(cls, line):
        rest, prefix = line, ""
        if rest.startswith(":"):
            prefix, _, rest = rest[1:].partition(" ")
        trailing = None
        if " :" in rest:
            rest, trailing = rest.split(" :", 1)
        elif rest.startswith(":"):
            rest, trailing = "", rest[1:]
        words = rest.split()
        params = words[1:] + ([trailing] if trailing is not None else [])
        return cls(prefix, words[0].upper() if words else "", tuple(params), line)


class IrcClient:
    """A plain IRC client (RFC 1459/2812 subset) that records every line it receives.

    Call from inside one asyncio loop:

        irc = await IrcClient.connect(ip, 6667, "watcher")
        await irc.join("#room")
        irc.privmsg("#room", "hello")
        got = await irc.wait_for(lambda m: m.command == "PRIVMSG")
    """

    def __init__(self, nick, reader, writer):
        self.nick = nick
        self.name = "irc-" + nick
        self.reader, self.writer = reader, writer
        self.received = []   # IrcMessage, arrival order, not yet taken
        self.transcript = []  # every line, sent ('> ') and received ('< ')
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(cls, host, port, nick, timeout=DEFAULT_TIMEOUT):
        """Connect, register as `nick` and wait for the welcome (001) and MOTD end."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        client = cls(nick, reader, writer)
        client.send("NICK %s" % nick)
        client.send("USER %s 0 * :raw IRC client of the jrouter tests" % nick)
        await client.wait_for(lambda m: m.command == "001", timeout)
        await client.wait_for(lambda m: m.command in ("376", "422"), timeout)
        return client

    def send(self, line):
        self.transcript.append("> " + line)
        self.writer.write(line.encode("utf-8") + b"\r\n")

    async def _read_loop(self):
        while True:
            line = await self.reader.readline()
            if not line:
                self.transcript.append("< (connection closed)")
                self._arrived.set()
                return
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            self.transcript.append("< " + text)
            msg = IrcMessage.parse(text)
            if msg.command == "PING":
                self.send("PONG :%s" % (msg.params[0] if msg.params else ""))
                continue
            self.received.append(msg)
            self._arrived.set()

    async def wait_for(self, match, timeout=DEFAULT_TIMEOUT, what="a matching line"):
        """Take (remove and return) the first received message that `match`es, waiting
        at most `timeout` seconds; raise TimeoutError with the recent transcript."""
        async def take():
            while True:
                for i, msg in enumerate(self.received):
                    if match(msg):
                        del self.received[i]
                        return msg
                if self._task.done():
                    raise ConnectionError("%s: IRC connection closed" % self.nick)
                self._arrived.clear()
                await self._arrived.wait()
        try:
            return await asyncio.wait_for(take(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError("IRC %s: no %s within %.1fs; last lines:\n%s" % (
                self.nick, what, timeout, "\n".join(self.transcript[-30:]))) from None

    async def join(self, channel, timeout=DEFAULT_TIMEOUT):
        """JOIN `channel`; return the nicks of its NAMES reply (prefixes like @ stripped)."""
        self.send("JOIN %s" % channel)
        await self.wait_for(lambda m: m.command == "JOIN" and m.nick == self.nick
                            and m.params[:1] == (channel,), timeout, "our JOIN of " + channel)
        names = []
        while True:
            msg = await self.wait_for(lambda m: m.command in ("353", "366") and any(
                p.lower() == channel.lower() for p in m.params), timeout, "NAMES of " + channel)
            if msg.command == "366":
                return names
            names.extend(n.lstrip("@+%&~") for n in msg.params[-1].split())

    def part(self, channel, reason="bye"):
        self.send("PART %s :%s" % (channel, reason))

    def privmsg(self, target, text):
        self.send("PRIVMSG %s :%s" % (target, text))

    def taken_all(self, match):
        """Take every received message that `match`es, without waiting."""
        taken = [m for m in self.received if match(m)]
        self.received = [m for m in self.received if not match(m)]
        return taken

    async def quit(self, reason="done"):
        """QUIT and close (bounded)."""
        try:
            self.send("QUIT :%s" % reason)
            await asyncio.wait_for(self.writer.drain(), 2.0)
        except (OSError, asyncio.TimeoutError, ConnectionError):
            pass
        self.writer.close()
        self._task.cancel()
        try:
            await asyncio.wait_for(self._task, 2.0)
        except (asyncio.CancelledError, asyncio.TimeoutError, OSError):
            pass

    def describe(self):
        return "IRC client %s transcript (last 60 lines):\n%s" % (
            self.nick, "\n".join(self.transcript[-60:]))
