"""Two (or more) complete jabberd2 servers on loopback, federated over s2s.

Owns: a private DNS server (dnsmasq) that publishes each test domain's
`_xmpp-server._tcp` SRV record, writing s2s.xml (format of Debian's
/etc/jabberd2/s2s.xml, jabberd2 2.7), running Debian's `jabberd2-s2s`
against a router so that it resolves through that DNS server only, and
putting one domain's router, sm/c2s stack and s2s together.
Must not know: which router kind runs, or what the test then sends.

How s2s finds the other server, and why it is done this way:
* jabberd2's s2s resolves with udns, not the libc resolver. udns reads
  /etc/resolv.conf and then the environment: `NSCACHEIP` (or
  `NAMESERVERS`) replaces the list of name servers, and `RES_OPTIONS` is
  parsed like resolv.conf's `options` line, where `port:N` sets the port
  every server is asked on (udns_init.c, dns_init_resolvconf; udns's
  option table has `port`). So each s2s runs with
  `NSCACHEIP=127.0.0.1 RES_OPTIONS=port:N` and sees our dnsmasq only.
* s2s asks `_SRV._tcp.DOMAIN` for every `<lookup><srv>` in s2s.xml, then
  the A record of each target (AAAA only with `<resolve-ipv6/>`); without
  SRV it falls back to DOMAIN:5269, which these tests must not use. Its
  queries carry DNS_NOSRCH, so resolv.conf's search list does not apply.
  s2s.xml asks for `xmpp-server` only, and dnsmasq answers
  `_xmpp-server._tcp.DOMAIN SRV 0 0 PORT s2s.DOMAIN` and
  `s2s.DOMAIN A 127.0.0.1`; every other name under `.test` gets NXDOMAIN
  at once (`--local=/test/`), nothing is forwarded (`--no-resolv`).
* Dialback (XEP-0220) needs both directions: the receiving server checks
  the key by connecting back to the sending domain, so every domain of a
  federation has its records, whoever sends first.
* No TLS between the servers: s2s offers STARTTLS only with a pemfile,
  and `<security><require_tls/>` is left out, so dialback runs in clear.
* s2s binds to the router as the default route (`<bind name='s2s'>` with
  `<default/>`): the router sends it whatever is addressed to a domain no
  component serves, e.g. the other server's users.

Every process's files live in the federation's directory: `dns.*` for
dnsmasq (queries are logged to its stderr), and per domain `s2s-DOMAIN.*`.
"""

import os
import random
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from .jabberd2 import RouterAddress, router_section
from .ports import free_port
from .process import ManagedProcess

JABBERD2_S2S = "/usr/sbin/jabberd2-s2s"
DNSMASQ = "/usr/sbin/dnsmasq"
LOOPBACK = "127.0.0.1"


def free_dns_port(host=LOOPBACK):
    """A port free for both UDP and TCP on `host` (dnsmasq listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no port free for UDP and TCP on %s after 50 tries" % host)


# -- DNS ---------------------------------------------------------------------

def srv_name(domain):
    """The name s2s asks for a server of `domain` (RFC 6120 §3.2.1)."""
    return "_xmpp-server._tcp.%s" % domain


def s2s_host(domain):
    """The target host named in `domain`'s SRV record."""
    return "s2s.%s" % domain


def _encode_name(name):
    return b"".join(bytes([len(label)]) + label.encode("ascii")
                    for label in name.rstrip(".").split(".")) + b"\0"


def _read_name(packet, offset):
    """Decode a (possibly compressed, RFC 1035 §4.1.4) name; return (name, next offset)."""
    labels, end, jumps = [], None, 0
    while True:
        length = packet[offset]
        if length & 0xC0 == 0xC0:
            if jumps > 20:
                raise ValueError("DNS name pointer loop")
            jumps += 1
            end = offset + 2 if end is None else end
            offset = struct.unpack_from("!H", packet, offset)[0] & 0x3FFF
        elif length == 0:
            return ".".join(labels), (offset + 1 if end is None else end)
        else:
            labels.append(packet[offset + 1:offset + 1 + length].decode("ascii"))
            offset += 1 + length


SRV, IN = 33, 1


def query_srv(server, port, name, timeout=1.0):
    """Ask `server`:`port` over UDP for SRV `name`; return [(prio, weight, port, target)].

    Just enough DNS (RFC 1035 §4, RFC 2782) to check what dnsmasq serves.
    """
    ident = random.getrandbits(16)
    query = struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + _encode_name(name) + \
        struct.pack("!HH", SRV, IN)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(query, (server, port))
        packet, _ = sock.recvfrom(4096)
    got_id, flags, qdcount, ancount, _, _ = struct.unpack_from("!HHHHHH", packet)
    if got_id != ident:
        raise ValueError("DNS reply with id %d, not %d" % (got_id, ident))
    if flags & 0x000F:
        raise LookupError("DNS rcode %d for SRV %s" % (flags & 0x000F, name))
    offset = 12
    for _ in range(qdcount):
        offset = _read_name(packet, offset)[1] + 4
    records = []
    for _ in range(ancount):
        offset = _read_name(packet, offset)[1]
        rtype, _, _, rdlength = struct.unpack_from("!HHIH", packet, offset)
        offset += 10
        if rtype == SRV:
            prio, weight, srv_port = struct.unpack_from("!HHH", packet, offset)
            records.append((prio, weight, srv_port, _read_name(packet, offset + 6)[0]))
        offset += rdlength
    return records


class DnsServer(ManagedProcess):
    """dnsmasq on 127.0.0.1:`port`, authoritative for `.test`, serving `servers`.

    servers: {domain: s2s port}. No system configuration is read
    (`--conf-file=/dev/null`, `--no-hosts`, `--no-resolv`); it runs in the
    foreground and logs every query to its stderr (`dns.stderr`).
    """

    def __init__(self, directory, servers, port=None):
        self.port = port or free_dns_port()
        self.servers = dict(servers)
        argv = [DNSMASQ, "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                "--port=%d" % self.port, "--listen-address=" + LOOPBACK, "--bind-interfaces",
                "--pid-file=%s" % (Path(directory) / "dns.pid"), "--log-facility=-",
                "--log-queries", "--local=/test/"]
        for domain, s2s_port in self.servers.items():
            argv += ["--srv-host=%s,%s,%d,0,0" % (srv_name(domain), s2s_host(domain), s2s_port),
                     "--host-record=%s,%s" % (s2s_host(domain), LOOPBACK)]
        super().__init__("dns", argv, directory)

    def serves(self, domain):
        """True once the SRV record of `domain` is answered as configured."""
        try:
            return query_srv(LOOPBACK, self.port, srv_name(domain)) == [
                (0, 0, self.servers[domain], s2s_host(domain))]
        except (OSError, ValueError, LookupError):
            return False

    def start(self, timeout=10.0):
        return self.spawn_until(timeout, ready=lambda: all(map(self.serves, self.servers)),
                                what="answering SRV for %s" % ", ".join(self.servers))

    def resolver_env(self):
        """Environment that points udns (and so jabberd2's s2s) at this server only."""
        return {"NSCACHEIP": LOOPBACK, "RES_OPTIONS": "port:%d" % self.port}


# -- s2s ---------------------------------------------------------------------

def write_s2s_config(path, router, *, s2s_id="s2s", ip=LOOPBACK, port, secret, log_path,
                     pidfile, retry=(3, 3, 1), check_interval=5, queue_timeout=30, extra=""):
    """Write an s2s.xml listening on ip:port, dialback only; return its path.

    router: a RouterAddress. secret: the dialback key secret. No pemfile,
    so no STARTTLS either way; SRV lookups ask for `xmpp-server` only.
    check_interval / queue_timeout: <check><interval> and <queue> (seconds):
    how often s2s expires DNS lookups and queues, and how long a queue of
    stanzas for a route that is not yet valid waits before it is bounced.
    `extra`: XML inside <s2s>.
    """
    config = (
        "<s2s>\n"
        "  <id>%(id)s</id>\n"
        "  <pidfile>%(pidfile)s</pidfile>\n"
        "%(router)s"
        "  <log type='file'>\n    <file>%(log)s</file>\n  </log>\n"
        "  <local>\n"
        "    <ip>%(ip)s</ip>\n"
        "    <port>%(port)d</port>\n"
        "    <secret>%(secret)s</secret>\n"
        "  </local>\n"
        "  <io>\n    <max_fds>256</max_fds>\n"
        "    <limits><stanzasize>65535</stanzasize></limits>\n  </io>\n"
        "  <check>\n"
        "    <interval>%(interval)d</interval>\n    <queue>%(queue)d</queue>\n"
        "    <retry>%(queue)d</retry>\n    <idle>86400</idle>\n"
        "    <keepalive>0</keepalive>\n    <dnscache>300</dnscache>\n"
        "  </check>\n"
        "  <lookup>\n"
        "    <srv>xmpp-server</srv>\n"
        "    <min-ttl>30</min-ttl>\n    <max-ttl>86400</max-ttl>\n"
        "    <bad-host-timeout>1</bad-host-timeout>\n"
        "  </lookup>\n"
        "%(extra)s"
        "</s2s>\n") % {
            "id": escape(s2s_id), "pidfile": escape(str(pidfile)),
            "router": router_section(router, retry), "log": escape(str(log_path)),
            "ip": escape(ip), "port": int(port), "secret": escape(secret),
            "interval": check_interval, "queue": queue_timeout,
            "extra": extra + "\n" if extra else ""}
    Path(path).write_text(config, encoding="utf-8")
    return Path(path)


class S2sProcess(ManagedProcess):
    """One jabberd2-s2s; `start` waits until the router answered its bind and it listens.

    env: extra environment (DnsServer.resolver_env()) on top of ours.
    """

    def __init__(self, config_path, workdir, name, log_path, port, env=None):
        full_env = dict(os.environ)
        full_env.update(env or {})
        super().__init__(name, [JABBERD2_S2S, "-c", str(config_path)], workdir,
                         env=full_env, log_path=log_path)
        self.port = port

    def start(self, timeout=20.0):
        return self.spawn_until(timeout, log="ready for connections", port=self.port)


# -- a federation --------------------------------------------------------------

@dataclass
class Server:
    """One domain's complete jabberd2 server: its router, sm/c2s stack and s2s."""

    domain: str
    router: object       # RouterProcess (started by the caller)
    stack: object        # Jabberd2Stack for `domain` (started by the caller)
    s2s_port: int
    s2s: S2sProcess = None  # set by Federation.start


class Federation:
    """The servers of one test and the DNS server that lets their s2s find each other.

        fed = Federation(tmp_path / "federation")
        fed.add("one.test", router_one, stack_one)
        fed.add("two.test", router_two, stack_two)
        fed.start()        # dnsmasq, then each s2s
        ...
        fed.stop()         # each s2s, then dnsmasq (before the routers stop)

    Routers and stacks belong to the caller (conftest's factories start and
    stop them); the federation owns dnsmasq and the s2s processes only.
    """

    name = "federation"

    def __init__(self, directory):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.servers = {}
        self.dns = None

    def add(self, domain, router, stack, s2s_port=None):
        if domain in self.servers:
            raise ValueError("domain %r already added" % domain)
        port = s2s_port or free_port(LOOPBACK)
        self.servers[domain] = Server(domain, router, stack, port)
        return self.servers[domain]

    def _make_s2s(self, server, index):
        d, tag = self.directory, "s2s-%s" % server.domain
        log, pidfile = d / (tag + ".log"), d / (tag + ".pid")
        config = write_s2s_config(d / (tag + ".xml"), RouterAddress.of(server.router),
                                  port=server.s2s_port, secret="dialback-secret-%d" % index,
                                  log_path=log, pidfile=pidfile)
        return S2sProcess(config, d, tag, log, server.s2s_port, env=self.dns.resolver_env())

    @property
    def processes(self):
        made = [s.s2s for s in self.servers.values() if s.s2s is not None]
        return made + ([self.dns] if self.dns is not None else [])

    def start(self, timeout=20.0):
        """Start dnsmasq with every domain's records, then one s2s per domain."""
        try:
            self.dns = DnsServer(self.directory, {
                s.domain: s.s2s_port for s in self.servers.values()}).start(timeout)
            for index, server in enumerate(self.servers.values(), 1):
                server.s2s = self._make_s2s(server, index).start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout=5.0):
        """SIGTERM each s2s, then dnsmasq (SIGKILL after `timeout`); return exit codes."""
        return {p.name: p.stop(timeout) for p in self.processes}

    def s2s_log(self, domain):
        return self.servers[domain].s2s.log_text

    def describe(self):
        """Logs and output of dnsmasq and every s2s, for failure messages."""
        return "\n".join(p.describe() for p in self.processes)

