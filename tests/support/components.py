"""Real XEP-0114 components for clustering tests: copies of one transport, and Debian's MUC.

Owns: a slixmpp `ComponentXMPP` "transport" that answers every message sent
to its domain with the id of the copy that served it (so the *user* learns
where the router placed it), running as a child process that a test can
kill and start again (a crash and a watchdog restart); and Debian's
`mu-conference` (jabber-muc) configured as one copy of a MUC service.
Must not know: which router runs, or what a test concludes.

A copy says who it is in its stream header (`from='copy1'`): jabberd2
ignores the attribute, jrouter takes it as the instance's stable identity
for its slot policies (policy.py).  The transport writes one line per event
to its log, flushed at once, so a test can read what each copy served:

    copy2 connected as gw.example.test
    copy2 received {jabber:component:accept}message from=alice@example.test/home id=where-home
    copy2 served alice@example.test/home id=where-home body=where home
    copy2 disconnected

Run as a program (what TransportCopy does), the XEP-0114 secret in the
environment so that it shows in no command line::

    COMPONENT_SECRET=secret python -m tests.support.components DOMAIN COPY_ID HOST PORT LOGFILE
"""

import asyncio
import os
import re
import signal
import sys
from pathlib import Path
from xml.sax.saxutils import escape

from .ports import connect_address
from .process import ManagedProcess, RestartableDaemon
from .routers import REPO_ROOT

MU_CONFERENCE = "/usr/sbin/mu-conference"
_SERVED = re.compile(r"^(\S+) served (\S+) id=(\S*) body=(.*)$")
_RECEIVED = re.compile(r"^(\S+) received \{([^}]*)\}message from=(\S+) id=(\S*)$")


# -- the component itself (runs in the child process) ---------------------------


def _transport_class():
    """The slixmpp class, built on demand so that importing this module stays cheap."""
    import slixmpp

    class Transport(slixmpp.ComponentXMPP):
        """One copy of a transport: answers `<message>` with '<copy id> <body>'."""

        def __init__(self, domain, copy_id, secret, log):
            super().__init__(domain, secret)
            self.copy_id = copy_id
            self.log = log
            # The stream header names the copy: jrouter's stable instance identity.
            self.stream_header = (
                "<stream:stream xmlns='jabber:component:accept' xmlns:stream='%s' "
                "to='%s' from='%s'>" % (self.stream_ns, escape(domain), escape(copy_id)))
            self.done = asyncio.get_running_loop().create_future()
            self.add_event_handler("session_start", self._started)
            self.add_event_handler("message", self._answer)
            self.add_event_handler("disconnected", self._disconnected)

        def incoming_filter(self, xml):
            # Observation only: the stanza goes on unchanged. The log says what
            # namespace each message arrived in, also those no handler takes.
            if xml.tag.endswith("}message"):
                self.log("received %s from=%s id=%s" % (xml.tag, xml.get("from"), xml.get("id")))
            return xml

        def _started(self, _event):
            self.log("connected as %s" % self.boundjid.bare)

        def _answer(self, msg):
            if msg["type"] == "error":
                self.log("error from %s" % msg["from"])
                return
            # Nothing here repairs what the router delivers: a stanza outside
            # jabber:component:accept reaches slixmpp's handlers without its
            # <body> (as it reaches biboumi's), and the log shows an empty one.
            self.log("served %s id=%s body=%s" % (msg["from"], msg["id"], msg["body"]))
            reply = msg.reply("%s %s" % (self.copy_id, msg["body"]))
            reply["id"] = msg["id"]   # the user matches the answer by id, whatever the body
            reply["type"] = msg["type"] if msg["type"] in ("chat", "normal") else "chat"
            reply.send()

        def _disconnected(self, _event):
            self.log("disconnected")
            if not self.done.done():
                self.done.set_result(None)

    return Transport


async def _serve(domain, copy_id, host, port, secret, log_path):
    with open(log_path, "a", encoding="utf-8") as log_file:
        def log(text):
            log_file.write("%s %s\n" % (copy_id, text))
            log_file.flush()

        transport = _transport_class()(domain, copy_id, secret, log)
        transport.connect(host, int(port))
        await transport.done  # one connection: a dropped stream ends the copy (no reconnect)


def main(argv):
    """Run one transport copy until its stream ends; exit 0."""
    domain, copy_id, host, port, log_path = argv
    secret = os.environ["COMPONENT_SECRET"]
    if os.environ.get("COMPONENT_DEBUG"):  # slixmpp's wire log on stderr (COPY.N.stderr)
        import logging
        logging.basicConfig(level=logging.DEBUG)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # a crash, as far as the router sees
    asyncio.run(_serve(domain, copy_id, host, port, secret, log_path))
    return 0


# -- the test side --------------------------------------------------------------


class TransportCopy(RestartableDaemon):
    """One copy of a transport as a child process: start, kill, start again.

    Each run gets its own log (`COPY.N.log`); `served()` reads them all.
    `kill()` sends SIGKILL: the router sees the connection drop with no
    goodbye, as after a crash.
    """

    def __init__(self, directory, domain, copy_id, router, secret="secret"):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.domain, self.copy_id, self.secret = domain, copy_id, secret
        self.host, self.port = connect_address(router.ip), router.port
        super().__init__()

    @property
    def name(self):
        return "%s-%s" % (self.domain, self.copy_id)

    def start(self, timeout=10.0):
        """Start a new run and wait (bounded) until the router accepted its handshake."""
        n = len(self.runs) + 1
        log = self.directory / ("%s.%d.log" % (self.copy_id, n))
        argv = [sys.executable, "-m", "tests.support.components", self.domain, self.copy_id,
                self.host, str(self.port), str(log)]
        env = dict(os.environ, PYTHONUNBUFFERED="1", COMPONENT_SECRET=self.secret)
        run = ManagedProcess("%s.%d" % (self.copy_id, n), argv, self.directory, cwd=REPO_ROOT,
                             env=env, log_path=log)
        return self._launch(run, "%s connected" % self.copy_id, timeout)

    def served(self, run=None):
        """[(user full JID, stanza id, body)] this copy answered, in all runs or in run number `run`."""
        runs = self.runs if run is None else [self.runs[run - 1]]
        found = []
        for r in runs:
            for line in r.log_text.splitlines():
                m = _SERVED.match(line)
                if m:
                    found.append((m.group(2), m.group(3), m.group(4)))
        return found

    def received(self):
        """[(user full JID, stanza id, namespace)] of every message this copy's
        stream delivered, whether or not a handler took it, in all runs."""
        return [(m.group(3), m.group(4), m.group(2))
                for r in self.runs for m in map(_RECEIVED.match, r.log_text.splitlines()) if m]

    def describe(self):
        return "\n".join(r.describe() for r in self.runs) or "%s: never started" % self.name


# -- Debian's MUC (mu-conference) as one copy of a conference service ------------------


def write_muc_config(path, *, name, host, port, secret, spool, logdir, pidfile,
                     admin="admin@example.test"):
    """A mu-conference config (format of Debian's /etc/jabberd2/muc.xml) for one copy."""
    config = (
        "<jcr>\n"
        "  <name>%(name)s</name>\n"
        "  <host>%(name)s</host>\n"
        "  <ip>%(host)s</ip>\n"
        "  <port>%(port)d</port>\n"
        "  <secret>%(secret)s</secret>\n"
        "  <spool>%(spool)s/</spool>\n"
        "  <logdir>%(logdir)s/</logdir>\n"
        "  <pidfile>%(pidfile)s</pidfile>\n"
        "  <loglevel>255</loglevel>\n"
        "  <conference xmlns='jabber:config:conference'>\n"
        "    <public/>\n"
        "    <history>10</history>\n"
        "    <notice><join>has become available</join><leave>has left</leave>"
        "<rename>is now known as</rename></notice>\n"
        "    <sadmin><user>%(admin)s</user></sadmin>\n"
        "  </conference>\n"
        "</jcr>\n") % {
            "name": escape(name), "host": escape(host), "port": int(port),
            "secret": escape(secret), "spool": escape(str(spool)),
            "logdir": escape(str(logdir)), "pidfile": escape(str(pidfile)),
            "admin": escape(admin)}
    Path(path).write_text(config, encoding="utf-8")
    return Path(path)


class MucCopy(ManagedProcess):
    """One Debian `mu-conference` serving `name`, in the foreground, logging to a file.

    mu-conference writes `mu-conference.log` into its <logdir>; each copy
    gets its own directory. `start` waits until the router accepted it.
    """

    def __init__(self, directory, name, copy_id, router, secret="secret"):
        if not os.access(MU_CONFERENCE, os.X_OK):
            raise FileNotFoundError("%s is missing: install Debian's jabber-muc (scripts/bootstrap)"
                                    % MU_CONFERENCE)
        directory = Path(directory) / copy_id
        for sub in ("spool", "logs"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
        config = write_muc_config(
            directory / "muc.xml", name=name, host=connect_address(router.ip), port=router.port,
            secret=secret, spool=directory / "spool", logdir=directory / "logs",
            pidfile=directory / "muc.pid")
        super().__init__("muc-" + copy_id, [MU_CONFERENCE, "-c", str(config)], directory,
                         log_path=directory / "logs" / "mu-conference.log")
        self.copy_id = copy_id
        self.name_served = name

    def stop(self, timeout=5.0):
        """SIGKILL: a copy keeps no state worth a goodbye, and mu-conference's
        own shutdown waits ~2 s for its delivery thread."""
        self.send_signal(signal.SIGKILL)
        return super().stop(timeout)

    def start(self, timeout=10.0, connected=None):
        """Spawn; wait (bounded) until `connected()` (e.g. the router log's view),
        else until mu-conference logs that the router accepted its handshake."""
        if connected is not None:
            return self.spawn_until(timeout, ready=connected, what="connected to the router")
        return self.spawn_until(timeout, log="<handshake> received")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
