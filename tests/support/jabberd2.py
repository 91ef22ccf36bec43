"""Debian's real jabberd2 `sm` and `c2s`, run against a router under test.

Owns: writing sm.xml and c2s.xml (format of /etc/jabberd2/*.xml, jabberd2
2.7), creating their sqlite database from the shipped schema, starting the
daemons and telling when clients can log in.
Must not know: which router kind runs; it only gets an address and port.

Everything lives in one directory: `sqlite.db` (shared by c2s's authreg and
every sm, as in Debian), `sm-ID.xml/.log/.pid`, `c2s-ID.xml/.log/.pid`, and
the captured stdout/stderr of each process.

Readiness, and why it is checked this way:
* sm logs `ID ready for sessions` when the router answers its first bind
  (its `<id>`); the domain bind (`multi='to'`) is sent right after it.
* c2s logs `ready for connections` when its bind is answered, but it only
  serves a domain once the router has *advertised* the sm's domain to it
  (`<presence from='DOMAIN'/>`), and it logs that at debug level only. Until
  then it answers client streams with `host-gone`. So `C2sProcess.start`
  opens a client stream and waits for stream features, not for a log line.
"""

import gzip
import glob
import os
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from .ports import connect_address, free_port
from .process import ManagedProcess

JABBERD2_SM = "/usr/sbin/jabberd2-sm"
JABBERD2_C2S = "/usr/sbin/jabberd2-c2s"
SQLITE_SCHEMA = "/usr/share/doc/jabberd2/db-setup.sqlite.gz"
DEFAULT_DOMAIN = "example.test"


def module_dir():
    """Where Debian put the sm modules and authreg/storage drivers (multiarch path)."""
    found = sorted(glob.glob("/usr/lib/*/jabberd2/mod_roster.so")) or sorted(
        glob.glob("/usr/lib*/jabberd2/mod_roster.so"))
    if not found:
        raise FileNotFoundError("jabberd2 modules not found (is the jabberd2 package installed?)")
    return os.path.dirname(found[0])


def create_database(path):
    """Create an empty jabberd2 sqlite database at `path` from Debian's schema."""
    if not os.path.exists(SQLITE_SCHEMA):
        raise FileNotFoundError(
            "%s is missing: install jabberd2 (scripts/bootstrap), and check that dpkg "
            "does not exclude /usr/share/doc (path-exclude in /etc/dpkg/dpkg.cfg.d)"
            % SQLITE_SCHEMA)
    with gzip.open(SQLITE_SCHEMA, "rt", encoding="utf-8") as f:
        schema = f.read()
    conn = sqlite3.connect(str(path))
    try:
        conn.executescript(schema)
    finally:
        conn.close()
    return Path(path)


@dataclass(frozen=True)
class RouterAddress:
    """How sm/c2s reach and authenticate to the router (router-users.xml entry)."""

    ip: str
    port: int
    user: str = "jabberd"
    password: str = "secret"
    pemfile: str = None     # set: sm/c2s use STARTTLS to the router with this certificate

    @classmethod
    def of(cls, router, user="jabberd", password="secret", pemfile=None):
        """From anything with .ip and .port (RouterProcess, RouterFiles)."""
        return cls(connect_address(router.ip), int(router.port), user, password,
                   None if pemfile is None else str(pemfile))


def router_section(router, retry):
    init, lost, sleep = retry
    return (
        "  <router>\n"
        "    <ip>%s</ip>\n    <port>%d</port>\n"
        "    <user>%s</user>\n    <pass>%s</pass>\n%s"
        "    <retry><init>%d</init><lost>%d</lost><sleep>%d</sleep></retry>\n"
        "  </router>\n") % (escape(router.ip), router.port, escape(router.user),
                            escape(router.password),
                            "    <pemfile>%s</pemfile>\n" % escape(router.pemfile)
                            if router.pemfile else "", init, lost, sleep)


# Debian's /etc/jabberd2/sm.xml module chains, verbatim minus the comments.
SM_MODULES = {
    "sess-start": ["status"],
    "sess-end": ["status", "iq-last"],
    "in-sess": ["validate", "status", "privacy", "roster", "vacation", "iq-vcard",
                "iq-ping", "iq-private", "disco", "amp", "offline", "announce",
                "presence", "deliver"],
    "out-sess": [],
    "in-router": ["session", "validate", "presence", "privacy"],
    "out-router": ["privacy"],
    "pkt-sm": ["iq-last", "iq-ping", "iq-time", "iq-version", "amp", "disco",
               "announce", "help", "echo", "status", "presence"],
    "pkt-user": ["roster", "presence", "disco", "iq-vcard", "amp", "deliver",
                 "vacation", "offline", "iq-last"],
    "pkt-router": ["session", "disco"],
    "user-load": ["active", "roster", "roster-publish", "privacy", "vacation"],
    "user-unload": [],
    "user-create": ["active", "template-roster"],
    "user-delete": ["active", "announce", "offline", "privacy", "roster", "vacation",
                    "status", "iq-last", "iq-private", "iq-vcard"],
    "disco-extend": ["iq-version", "help"],
}


def _modules_xml(libdir):
    chains = "".join(
        "    <chain id=%s>%s</chain>\n" % (
            quoteattr(chain), "".join("<module>%s</module>" % m for m in mods))
        for chain, mods in SM_MODULES.items())
    return "  <modules>\n    <path>%s</path>\n%s  </modules>\n" % (escape(libdir), chains)


def write_sm_config(path, router, *, sm_id="sm", domains=(DEFAULT_DOMAIN,), db_path,
                    log_path, pidfile, retry=(3, 3, 1), extra=""):
    """Write an sm.xml serving `domains` from sqlite `db_path`; return its path.

    `sm_id` is what the sm binds without `multi` (cluster members need
    different ids); each domain is bound with `multi='to'`.
    `retry` = (init, lost, sleep) of <router><retry>. `extra`: XML inside <sm>.
    """
    libdir = module_dir()
    local_ids = "".join("    <id>%s</id>\n" % escape(d) for d in domains)
    admin = "admin@%s" % domains[0]
    config = (
        "<sm>\n"
        "  <id>%(id)s</id>\n"
        "  <pidfile>%(pidfile)s</pidfile>\n"
        "%(router)s"
        "  <log type='file'>\n    <file>%(log)s</file>\n  </log>\n"
        "  <local>\n%(local_ids)s  </local>\n"
        "  <storage>\n"
        "    <path>%(libdir)s</path>\n"
        "    <driver>sqlite</driver>\n"
        "    <sqlite>\n"
        "      <dbname>%(db)s</dbname>\n"
        "      <busy-timeout>5000</busy-timeout>\n"
        "    </sqlite>\n"
        "  </storage>\n"
        "  <aci>\n    <acl type='all'><jid>%(admin)s</jid></acl>\n  </aci>\n"
        "%(modules)s"
        "  <discovery>\n"
        "    <identity><category>server</category><type>im</type>"
        "<name>jrouter test sm</name></identity>\n"
        "  </discovery>\n"
        "  <user><template/></user>\n"
        "%(extra)s"
        "</sm>\n") % {
            "id": escape(sm_id), "pidfile": escape(str(pidfile)),
            "router": router_section(router, retry), "log": escape(str(log_path)),
            "local_ids": local_ids, "libdir": escape(libdir), "db": escape(str(db_path)),
            "admin": escape(admin), "modules": _modules_xml(libdir),
            "extra": extra + "\n" if extra else ""}
    Path(path).write_text(config, encoding="utf-8")
    return Path(path)


def write_c2s_config(path, router, *, c2s_id="c2s", domain=DEFAULT_DOMAIN, ip="127.0.0.1",
                     port, db_path, log_path, pidfile, register=True, retry=(3, 3, 1),
                     extra=""):
    """Write a c2s.xml for `domain` on ip:port, authreg sqlite in `db_path`.

    Plain TCP only: no pemfile, so no STARTTLS is offered or required.
    `register` enables XEP-0077 in-band registration (register-enable).
    Offers SASL PLAIN and DIGEST-MD5 and the legacy jabber:iq:auth.
    `extra`: XML inside <c2s> (e.g. an <io> section).
    """
    reg = " register-enable='mu'" if register else ""
    config = (
        "<c2s>\n"
        "  <id>%(id)s</id>\n"
        "  <pidfile>%(pidfile)s</pidfile>\n"
        "%(router)s"
        "  <log type='file'>\n    <file>%(log)s</file>\n  </log>\n"
        "  <local>\n"
        "    <id%(reg)s>%(domain)s</id>\n"
        "    <ip>%(ip)s</ip>\n"
        "    <port>%(port)d</port>\n"
        "  </local>\n"
        "  <authreg>\n"
        "    <path>%(libdir)s</path>\n"
        "    <module>sqlite</module>\n"
        "    <mechanisms>\n"
        "      <traditional><plain/><digest/></traditional>\n"
        "      <sasl><plain/><digest-md5/></sasl>\n"
        "    </mechanisms>\n"
        "    <sqlite>\n"
        "      <dbname>%(db)s</dbname>\n"
        "      <busy-timeout>5000</busy-timeout>\n"
        "      <password_type><plaintext/></password_type>\n"
        "    </sqlite>\n"
        "  </authreg>\n"
        "%(extra)s"
        "</c2s>\n") % {
            "id": escape(c2s_id), "pidfile": escape(str(pidfile)),
            "router": router_section(router, retry), "log": escape(str(log_path)),
            "reg": reg, "domain": escape(domain), "ip": escape(ip), "port": int(port),
            "libdir": escape(module_dir()), "db": escape(str(db_path)),
            "extra": extra + "\n" if extra else ""}
    Path(path).write_text(config, encoding="utf-8")
    return Path(path)


class SmProcess(ManagedProcess):
    """One jabberd2-sm; `start` waits until the router accepted its binds."""

    log_noise = ("' added to chain '",)  # ~70 lines of module loading at startup

    def __init__(self, config_path, workdir, sm_id, log_path):
        super().__init__("sm-" + sm_id, [JABBERD2_SM, "-c", str(config_path)], workdir,
                         log_path=log_path)
        self.sm_id = sm_id

    def start(self, timeout=20.0):
        return self.spawn_until(timeout, log="%s ready for sessions" % self.sm_id)


def _stream_open(ip, port, domain, timeout):
    """Open a client stream to c2s; return the server's first reply bytes."""
    header = ("<?xml version='1.0'?><stream:stream to=%s xmlns='jabber:client' "
              "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
              % quoteattr(domain)).encode()
    data = b""
    with socket.create_connection((ip, port), timeout=timeout) as sock:
        sock.sendall(header)
        deadline = time.monotonic() + timeout
        while b"</stream:features>" not in data and b"</stream:error>" not in data:
            if time.monotonic() >= deadline:
                break
            try:
                chunk = sock.recv(4096)
            except socket.timeout:
                break
            if not chunk:
                break
            data += chunk
        try:
            sock.sendall(b"</stream:stream>")
        except OSError:
            pass
    return data


class C2sProcess(ManagedProcess):
    """One jabberd2-c2s; `start` waits until clients of `domain` can log in."""

    def __init__(self, config_path, workdir, c2s_id, log_path, ip, port, domain):
        super().__init__("c2s-" + c2s_id, [JABBERD2_C2S, "-c", str(config_path)], workdir,
                         log_path=log_path)
        self.c2s_id = c2s_id
        self.ip = ip
        self.port = port
        self.domain = domain

    def serves_domain(self, timeout=2.0):
        """True if a client stream to `domain` gets stream features (sm is known)."""
        try:
            reply = _stream_open(self.ip, self.port, self.domain, timeout)
        except OSError:
            return False
        return b"<stream:features" in reply

    def start(self, timeout=20.0):
        return self.spawn_until(timeout, log="ready for connections", port=self.port,
                                ready=self.serves_domain,
                                what="serving %s (sm advertised by the router)" % self.domain)


class Jabberd2Stack:
    """sm process(es) and one c2s for one domain, all files in `directory`.

    router: anything with .ip and .port (RouterProcess, RouterFiles) or a
        RouterAddress; user/password: its router-users.xml entry.
    sm_ids: one sm per id, all serving `domain` (several ids = an sm cluster).
    After start(): c2s_ip/c2s_port is where clients connect, without TLS.
    """

    name = "jabberd2"

    def __init__(self, directory, router, *, domain=DEFAULT_DOMAIN, sm_ids=("sm",),
                 c2s_id="c2s", c2s_port=None, user="jabberd", password="secret",
                 register=True, retry=(3, 3, 1)):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.router = router if isinstance(router, RouterAddress) else RouterAddress.of(
            router, user, password)
        self.domain = domain
        self.retry = retry
        self.db_path = self.directory / "sqlite.db"
        self.c2s_ip = "127.0.0.1"
        self.c2s_port = c2s_port or free_port(self.c2s_ip)
        self.sms = {}
        for sm_id in sm_ids:
            self.sms[sm_id] = self._make_sm(sm_id)
        self.c2s = self._make_c2s(c2s_id, register)

    def _make_sm(self, sm_id):
        d = self.directory
        log, pidfile = d / ("sm-%s.log" % sm_id), d / ("sm-%s.pid" % sm_id)
        config = write_sm_config(d / ("sm-%s.xml" % sm_id), self.router, sm_id=sm_id,
                                 domains=(self.domain,), db_path=self.db_path,
                                 log_path=log, pidfile=pidfile, retry=self.retry)
        return SmProcess(config, d, sm_id, log)

    def _make_c2s(self, c2s_id, register):
        d = self.directory
        log, pidfile = d / ("c2s-%s.log" % c2s_id), d / ("c2s-%s.pid" % c2s_id)
        config = write_c2s_config(d / ("c2s-%s.xml" % c2s_id), self.router, c2s_id=c2s_id,
                                  domain=self.domain, ip=self.c2s_ip, port=self.c2s_port,
                                  db_path=self.db_path, log_path=log, pidfile=pidfile,
                                  register=register, retry=self.retry)
        return C2sProcess(config, d, c2s_id, log, self.c2s_ip, self.c2s_port, self.domain)

    @property
    def processes(self):
        return [*self.sms.values(), self.c2s]

    def start(self, timeout=30.0):
        """Create the database, start every sm, then c2s; wait until clients can log in."""
        if not self.db_path.exists():
            create_database(self.db_path)
        try:
            for sm in self.sms.values():
                sm.start(timeout)
            self.c2s.start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def start_sm(self, sm_id, timeout=30.0):
        """Add and start one more sm (e.g. a cluster member) while the stack runs."""
        if sm_id in self.sms:
            raise ValueError("sm %r already exists" % sm_id)
        sm = self.sms[sm_id] = self._make_sm(sm_id)
        return sm.start(timeout)

    def stop(self, timeout=5.0):
        """SIGTERM c2s, then each sm (SIGKILL after `timeout`); return their exit codes."""
        return {p.name: p.stop(timeout) for p in reversed(self.processes)}

    def describe(self):
        """Logs and output of every process, for failure messages."""
        return "\n".join(p.describe() for p in self.processes)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
