"""Several jrouter nodes as one router, on loopback, with one etcd (issue 13).

Owns: one etcd (tests/support/etcd.py) and N jrouter nodes, each in its own
directory with a router.xml whose ``<cluster>`` section is the same on every
node but for ``<node>`` and ``<peer><ip>/<port>``; starting, stopping,
SIGKILLing, pausing and resuming a node, and restarting etcd, all by PID;
reading the cluster's keys from etcd (``jrouter.cluster.keys`` Layout) and
waiting, bounded, until every node is in etcd and every pair of nodes is
linked; a jabberd2-protocol / XEP-0114 peer that keeps what it read, so a
test can wait for one element by a condition and look at the others later;
a jabberd2 stack whose sm and c2s reach two different nodes.
Must not know: what the tests send, or what they conclude.

Each node's directory holds its router.xml, router-users.xml (Debian's one
user, jabberd/secret, allowed everything), its log ``router.log`` (every
run of the node appends to it; ``log_text_of_run`` is the newest run's
part) and the captured stdout/stderr of each run.

"Linked" is read from the logs of docs/cluster.md §5 (jrouter/ops/peer_links.py):
both ends of a link log ``[ip, port=N] peer link with node 'b' up`` and,
when it ends, ``... down``; a pair is linked when the last of these lines
about the other node, in the current run of each, says up.

Every wait is bounded and raises ``BedTimeout`` (an AssertionError, so
pytest shows it as the test's failed assertion) with what was seen instead.
"""

import re
import signal
import time
from pathlib import Path
from xml.sax.saxutils import escape

from jrouter.cluster.keys import (DefaultKey, Layout, LayoutError, NodeKey, UniqueKey,
                                  decode_value)
from jrouter.ops.etcd_client import EtcdClient, EtcdFailure
from jrouter.testing.component_client import BindRefused, Bound
from jrouter.wire.xmlstream import Element, StreamClose, StreamOpen

from .etcd import EtcdServer
from .jabberd2 import Jabberd2Stack, RouterAddress, write_c2s_config, C2sProcess
from .peer import Peer, PeerClosed, header
from .relay import MutingRelay
from .ports import free_ports, wait_until
from .routers import RouterProcess, write_router_config

CLUSTER = "bed"
PEER_SECRET = "bed-peer-secret-0123456789"   # >= 16 characters (config.sections._secret)
NS_COMPONENT = "http://jabberd.jabberstudio.org/ns/component/1.0"
NS_ACCEPT = "jabber:component:accept"
ROUTE = NS_COMPONENT + " route"
PRESENCE = NS_COMPONENT + " presence"    # a name advertisement (protocol §4.3)
_BIND = NS_COMPONENT + " bind"
_LINK = re.compile(r"peer link with node '([^']+)' (up|down)\b")


class BedTimeout(AssertionError):
    """A bounded wait of the bed ended without its condition."""


def cluster_section(node, peer_ip, peer_port, endpoints, *, name=CLUSTER, secret=PEER_SECRET,
                    timeout=1, lease_ttl=3, bind_wait=2, hops=2, advertise=None):
    """The ``<cluster>`` element of one node (conf/router.xml.dist)."""
    endpoint_xml = "".join("      <endpoint>%s</endpoint>\n" % escape(e) for e in endpoints)
    advertise_xml = ("      <advertise>%s</advertise>\n" % escape(advertise)) if advertise else ""
    return (
        "  <cluster>\n"
        "    <name>%s</name>\n"
        "    <node>%s</node>\n"
        "    <peer>\n      <ip>%s</ip>\n      <port>%d</port>\n      <secret>%s</secret>\n"
        + advertise_xml + "    </peer>\n"
        "    <etcd>\n%s      <timeout>%d</timeout>\n      <lease-ttl>%d</lease-ttl>\n"
        "      <bind-wait>%d</bind-wait>\n    </etcd>\n"
        "    <hops>%d</hops>\n"
        "  </cluster>") % (escape(name), escape(node), escape(peer_ip), peer_port, escape(secret),
                           endpoint_xml, timeout, lease_ttl, bind_wait, hops)


def answers_header(ip, port, timeout=3.0):
    """True if a stream header sent to (ip, port) gets a stream header back."""
    try:
        peer = Peer(ip, port, timeout=timeout)
    except OSError:
        return False
    try:
        peer.send(header())
        return isinstance(peer.next(timeout), StreamOpen)
    except (OSError, TimeoutError, PeerClosed):
        return False
    finally:
        peer.close()


class ClusterNode:
    """One jrouter node: its files and its runs (a RouterProcess each), newest last."""

    def __init__(self, node_id, directory, etcd_endpoint, clustering="", relayed=False,
                 router_kind="jrouter", **cluster):
        self.node_id = node_id
        self.router_kind = router_kind       # a jrouter kind of routers.ROUTER_KINDS
        self.ip = "127.0.0.1"
        self.port, self.peer_port = free_ports(2, self.ip)
        # relayed: the other nodes dial it through a MutingRelay (<advertise>), which
        # a test can mute one way or cut while both ends live
        self.relay = MutingRelay(self.ip, self.peer_port) if relayed else None
        if self.relay is not None:
            cluster["advertise"] = "%s:%d" % (self.ip, self.relay.port)
        self.files = write_router_config(
            directory, self.port, ip=self.ip,
            extra=cluster_section(node_id, self.ip, self.peer_port, [etcd_endpoint], **cluster)
            + clustering)
        self.runs = []
        self.wanted = False          # started by the test and not stopped or killed since
        self._log_start = 0          # where the newest run's part of the log begins

    @property
    def name(self):
        return "node-%s" % self.node_id

    @property
    def process(self):
        return self.runs[-1] if self.runs else None

    @property
    def pid(self):
        return self.process.pid if self.process is not None else None

    @property
    def address(self):
        """(ip, port) of its component port (<local>)."""
        return self.ip, self.port

    @property
    def peer_address(self):
        return self.ip, self.peer_port

    @property
    def log_path(self):
        return self.files.log

    @property
    def log_text(self):
        """The whole log, every run."""
        try:
            return self.files.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    @property
    def log_text_of_run(self):
        """The log written since the newest run started."""
        return self.log_text[self._log_start:]

    def running(self):
        return self.process is not None and self.process.running()

    def check_alive(self):
        """Raise ProcessDied (with its output) if a node the test wants up has exited."""
        if self.wanted and self.process is not None:
            self.process.check_alive()

    # -- lifecycle -------------------------------------------------------------

    def start(self, timeout=15.0):
        """A new run on the same files; wait (bounded) until its component
        port listens and answers a stream header."""
        if self.running():
            raise RuntimeError("%s already runs (pid %d)" % (self.name, self.pid))
        run = RouterProcess(self.router_kind, self.files)
        n = len(self.runs) + 1
        if n > 1:        # keep each run's stdout/stderr
            run.stdout_path = str(self.files.directory / ("router.%d.stdout" % n))
            run.stderr_path = str(self.files.directory / ("router.%d.stderr" % n))
        self._log_start = len(self.log_text)
        self.runs.append(run)
        self.wanted = True
        run.start(timeout)
        run.wait_for(lambda: answers_header(self.ip, self.port), timeout,
                     "component port %d answering a stream header" % self.port)
        return self

    def stop(self, timeout=5.0):
        """SIGCONT (it may be paused), SIGTERM, SIGKILL after `timeout`."""
        self.wanted = False
        run = self.process
        if run is None:
            return None
        run.send_signal(signal.SIGCONT)
        return run.stop(timeout)

    def kill(self):
        """SIGKILL, as a crash (no goodbye to anyone), and reap it."""
        self.wanted = False
        run = self.process
        if run is not None:
            run.send_signal(signal.SIGKILL)
            run.stop(5.0)

    def pause(self):
        """SIGSTOP: its sockets stay open, nothing answers."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self):
        self.process.send_signal(signal.SIGCONT)

    def log_mark(self):
        """Where the log ends now: give it to log_since(), linked_to(), wait_log()."""
        return len(self.log_text)

    def log_since(self, mark=None):
        """The log after `mark` (None: this run's part)."""
        return self.log_text_of_run if mark is None else self.log_text[mark:]

    def linked_to(self, since=None):
        """Ids of the nodes whose last link line in this run's log (or after
        log mark `since`) says up."""
        last = {}
        for node, state in _LINK.findall(self.log_since(since)):
            last[node] = state
        return {node for node, state in last.items() if state == "up"}

    def describe(self, tail=40):
        parts = ["%s: component port %d, peer port %d, %s" % (
            self.name, self.port, self.peer_port, self.files.directory)]
        parts += [run.describe(tail) for run in self.runs[-2:]]
        return "\n".join(parts)


class ClusterBed:
    """One etcd and nodes `node_ids` (each a ClusterNode), as one router.

    `lease_ttl`, `bind_wait`, `timeout` (per etcd call) and `hops` go into
    every node's ``<cluster>``; small by default so that a dead node's
    routes go within seconds. `clustering`: a ``<clustering>`` section
    (per-name policies) every node's router.xml gets too. `router_kind`:
    which build every node runs (routers.ROUTER_KINDS).
    """

    name = "cluster bed"

    def __init__(self, directory, node_ids=("a", "b", "c"), *, lease_ttl=3, bind_wait=2,
                 timeout=1, hops=2, cluster=CLUSTER, clustering="", relayed=(),
                 router_kind="jrouter"):
        self.directory = Path(directory)
        self.lease_ttl = lease_ttl
        self.layout = Layout(cluster)
        (self.directory / "etcd").mkdir(parents=True, exist_ok=True)
        self.etcd = EtcdServer(self.directory / "etcd")
        self.nodes = {
            node_id: ClusterNode(node_id, self.directory / ("node-%s" % node_id),
                                 self.etcd.endpoint, name=cluster, timeout=timeout,
                                 lease_ttl=lease_ttl, bind_wait=bind_wait, hops=hops,
                                 clustering=clustering, relayed=node_id in relayed,
                                 router_kind=router_kind)
            for node_id in node_ids}
        self._client = None

    def __getitem__(self, node_id):
        return self.nodes[node_id]

    # -- lifecycle -------------------------------------------------------------

    def start(self, timeout=15.0):
        """Start etcd, then every node; each node's component port answers.
        Joining and linking are not waited for here: see wait_ready()."""
        try:
            self.etcd.start(timeout)
            for node in self.nodes.values():
                node.start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout=5.0):
        """Stop every node (SIGCONT first), then etcd; remove etcd's data dir."""
        for node in self.nodes.values():
            node.stop(timeout)
            if node.relay is not None:
                node.relay.stop()
        if self._client is not None:
            self._client.close()
            self._client = None
        self.etcd.close()

    def start_node(self, node_id, timeout=15.0):
        return self.nodes[node_id].start(timeout)

    def stop_node(self, node_id, timeout=5.0):
        return self.nodes[node_id].stop(timeout)

    def kill_node(self, node_id):
        self.nodes[node_id].kill()

    def pause_node(self, node_id):
        self.nodes[node_id].pause()

    def resume_node(self, node_id):
        self.nodes[node_id].resume()

    def kill_etcd(self):
        self.etcd.kill()

    def start_etcd(self, timeout=15.0):
        """Start etcd again on the same data dir and ports."""
        self.etcd.start(timeout)

    def restart_etcd(self, timeout=15.0):
        """SIGKILL etcd, then start it again on the same data dir; the seconds it was away."""
        started = time.monotonic()
        self.etcd.kill()
        self.etcd.start(timeout)
        return time.monotonic() - started

    def address(self, node_id):
        """(ip, port) of node `node_id`'s component port."""
        return self.nodes[node_id].address

    def log_path(self, node_id):
        return self.nodes[node_id].log_path

    # -- the table in etcd -----------------------------------------------------

    @property
    def client(self):
        if self._client is None:
            self._client = EtcdClient([self.etcd.endpoint], 2.0)
        return self._client

    def keys(self):
        """{Key: (Value, etcd KeyValue)} of every key of the cluster (keys not
        of the layout are left out)."""
        _revision, kvs = self.client.range(self.layout.prefix, prefix=True)
        table = {}
        for kv in kvs:
            try:
                key = self.layout.parse(kv.key)
                table[key] = (decode_value(key, kv.value), kv)
            except LayoutError:
                continue
        return table

    def safe_keys(self):
        """keys(), or {} when etcd does not answer (for waits and messages)."""
        try:
            return self.keys()
        except EtcdFailure:
            return {}

    def nodes_in_etcd(self):
        """{node id: lease} of every nodes/<node> key."""
        return {k.node: kv.lease for k, (_v, kv) in self.keys().items() if isinstance(k, NodeKey)}

    def members(self, name):
        """[MemberKey] under Layout.members_prefix(name), in key order."""
        _revision, kvs = self.client.range(self.layout.members_prefix(name), prefix=True)
        return [self.layout.parse(kv.key) for kv in kvs]

    def owner(self, name):
        """The OwnerValue of unique/<name> (node, member), or None."""
        _revision, kvs = self.client.range(self.layout.key(UniqueKey(name)))
        return decode_value(UniqueKey(name), kvs[0].value) if kvs else None

    def default_route(self):
        """The DefaultValue of the default route (name, node, member), or None."""
        _revision, kvs = self.client.range(self.layout.key(DefaultKey()))
        return decode_value(DefaultKey(), kvs[0].value) if kvs else None

    def shown_keys(self):
        """The cluster's keys, one per line, for failure messages."""
        keys = self.safe_keys()
        return "\n".join("  %s lease=%x" % (k, kv.lease) for k, (_v, kv) in sorted(
            keys.items(), key=lambda item: item[1][1].key)) or "  (none)"

    # -- waits -----------------------------------------------------------------

    def _alive(self):
        for node in self.nodes.values():
            node.check_alive()

    def wait(self, predicate, timeout, what, detail=lambda: ""):
        """Poll `predicate()` (etcd failures count as false) until true, at
        most `timeout` s; a wanted node that exits fails at once."""
        def check():
            try:
                return predicate()
            except EtcdFailure:
                return False
        try:
            wait_until(check, timeout, what, interval=0.05, alive=self._alive)
        except TimeoutError as exc:
            raise BedTimeout("%s\n%s" % (exc, detail())) from None

    def _ids(self, node_ids):
        return [n for n in (node_ids or self.nodes) if self.nodes[n].wanted]

    def wait_joined(self, node_ids=None, timeout=6.0):
        """Wait until nodes/<node> of every running node (or of `node_ids`) is in etcd."""
        wanted = set(self._ids(node_ids))
        self.wait(lambda: wanted <= set(self.nodes_in_etcd()), timeout,
                  "nodes %s in etcd (%s)" % (sorted(wanted), self.layout.prefix.decode()),
                  lambda: "keys in etcd:\n" + self.shown_keys())

    def wait_linked(self, node_ids=None, timeout=6.0, since=None):
        """Wait until every running node (or each of `node_ids`) has an open
        peer link with every other running node, by both ends' logs (each
        node's current run, or its log after `since[node]`, a log mark)."""
        running = set(self._ids(None))
        wanted = set(self._ids(node_ids))
        since = since or {}

        def missing():
            return sorted((a, b) for a in running for b in running if a != b and (
                a in wanted or b in wanted) and b not in self.nodes[a].linked_to(since.get(a)))
        self.wait(lambda: not missing(), timeout, "peer links between nodes %s" % sorted(running),
                  lambda: "not linked (node, other): %s\n%s" % (missing(), "\n".join(
                      "node %s log: %s" % (n, _tail(self.nodes[n].log_since(since.get(n))))
                      for n in sorted(running))))

    def wait_ready(self, node_ids=None, timeout=6.0, since=None):
        """wait_joined, then wait_linked."""
        self.wait_joined(node_ids, timeout)
        self.wait_linked(node_ids, timeout, since)

    def wait_log(self, node_id, pattern, timeout, since=None):
        """Wait until regex `pattern` matches node `node_id`'s log (after log
        mark `since`, else in its current run); return the match."""
        node = self.nodes[node_id]
        found = []

        def seen():
            match = re.search(pattern, node.log_since(since))
            if match:
                found.append(match)
            return bool(match)
        self.wait(seen, timeout, "node %s logging %r" % (node_id, pattern),
                  lambda: "node %s log: %s" % (node_id, _tail(node.log_since(since), 15)))
        return found[-1]

    def wait_members(self, name, predicate, timeout, what):
        """Wait until `predicate([MemberKey of name])` holds."""
        self.wait(lambda: predicate(self.members(name)), timeout, "%s: %s" % (name, what),
                  lambda: "keys in etcd:\n" + self.shown_keys())

    def describe(self):
        return "\n".join([self.etcd.describe(), "cluster keys:\n" + self.shown_keys()] +
                         [node.describe() for node in self.nodes.values()])

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _tail(text, lines=8):
    return "\n    " + "\n    ".join(text.splitlines()[-lines:])


# -- components -------------------------------------------------------------------


class ComponentPeer(Peer):
    """A Peer (tests/support/peer.py) that keeps every top-level element it
    read and nobody took, as ``jrouter.wire.xmlstream.Element`` (``raw``:
    the exact bytes), so a test waits for one by a condition and can still
    look at the others (advertisements, bounces) afterwards."""

    def __init__(self, host, port, timeout=5.0, label=None):
        super().__init__(host, port, timeout)
        self.label = label or "component on port %d" % port
        self.kept = []          # Elements read and not taken, oldest first

    @classmethod
    def bound(cls, address, name, *, multi=None, label=None):
        """Authenticated (SASL, jabberd/secret) and bound to `name` on node `address`."""
        peer = cls(*address, label=label or "%s on port %d" % (name, address[1]))
        peer.authenticate()
        peer.ask_bind(name, multi=multi)
        answer = peer.bind_answer()
        if answer != (name, None):
            raise AssertionError("%s: bind %s answered %r" % (peer.label, name, answer))
        return peer

    @classmethod
    def accepted(cls, address, name, secret="secret", label=None, instance=None):
        """An XEP-0114 component of `name` on node `address`, handshake done
        (`instance`: its stream header's 'from')."""
        peer = cls(*address, label=label or "%s (XEP-0114) on port %d" % (name, address[1]))
        return peer.handshake(name, secret, instance)

    def _read(self, deadline):
        """Read once unless something is parsed already (waiting until
        `deadline` at most); keep the elements; return the client's events."""
        if not self.events and not self.eof and time.monotonic() < deadline:
            self._pump(deadline)
        events = []
        while self.events:
            event = self.events.pop(0)
            if isinstance(event, Element):
                if event.name != _BIND:
                    self.kept.append(event)
            elif not isinstance(event, (StreamOpen, StreamClose)):
                events.append(event)
        return events

    def find(self, match, timeout):
        """Remove and return the first kept or arriving Element with
        `match(element)`; None if none came within `timeout` or the stream ended."""
        deadline = time.monotonic() + timeout
        while True:
            for i, element in enumerate(self.kept):
                if match(element):
                    return self.kept.pop(i)
            if (self.eof and not self.events) or time.monotonic() >= deadline:
                return None
            self._read(deadline)

    def take(self, match, timeout=5.0, what="a matching element"):
        """find(), or an AssertionError that says what arrived instead."""
        element = self.find(match, timeout)
        if element is None:
            why = "closed by the router before" if self.eof and not self.events else "no"
            raise AssertionError("%s: %s %s within %.1fs; it got:\n%s"
                                 % (self.label, why, what, timeout, self.shown()))
        return element

    def forget(self, match):
        """Drop the kept elements with `match(element)` (probes, say); how many."""
        before = len(self.kept)
        self.kept = [e for e in self.kept if not match(e)]
        return before - len(self.kept)

    def collect(self, seconds):
        """Keep whatever arrives within `seconds`; return the kept elements."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (self.eof and not self.events):
            self._read(deadline)
        return list(self.kept)

    def closed_within(self, seconds):
        """True if the router closes this connection (EOF or reset) within `seconds`."""
        deadline = time.monotonic() + seconds
        while not self.eof and time.monotonic() < deadline:
            try:
                self._read(deadline)
            except OSError:
                return True
        return self.eof

    def ask_bind(self, name, multi=None, default=False, log=False):
        """Send a <bind/> (its answer: bind_answer)."""
        self.client.bind(name, multi=multi, default=default, log=log)
        self._flush()

    def bind_answer(self, timeout=5.0):
        """(name, error or None) of the next bind answer."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self._read(deadline):
                if isinstance(event, Bound):
                    return event.name, None
                if isinstance(event, BindRefused):
                    return event.name, event.error
            if self.eof and not self.events:
                raise AssertionError("%s: closed before a bind answer" % self.label)
            if time.monotonic() >= deadline:
                raise AssertionError("%s: no bind answer within %.1fs; it got:\n%s"
                                     % (self.label, timeout, self.shown()))

    def route(self, timeout=None):
        """The next <route/> taken from what arrives (kept elements first), as lxml."""
        return self.take(is_route, self.timeout if timeout is None else timeout, "route").tree()

    def shown(self, limit=20):
        lines = ["  %r" % e.raw[:300] for e in self.kept[-limit:]]
        return "\n".join(lines) or "  (nothing)"


def is_route(element):
    return element.name == ROUTE


def stanza_id(element):
    """The id of a route's payload (its first child), or of an XEP-0114 stanza."""
    if element.name == ROUTE:
        return (element.child_attrs or {}).get("id")
    return element.attrs.get("id")


def advertisement(element, name=None, available=None):
    """True if `element` is a name advertisement (of `name`; available or not)."""
    if element.name != PRESENCE or (name is not None and element.attrs.get("from") != name):
        return False
    gone = element.attrs.get("type") == "unavailable"
    return available is None or available != gone


def advertised(peer, name):
    """What the kept advertisements for `name` say, in order: [True (up) / False (gone)]."""
    return [element.attrs.get("type") != "unavailable" for element in peer.kept
            if advertisement(element, name)]


# -- jabberd2 across two nodes -------------------------------------------------------


class SplitStack(Jabberd2Stack):
    """A Jabberd2Stack whose sm(s) reach node `router` and whose c2s reaches
    node `c2s_router` (both anything with .ip and .port): the two daemons
    talk only through the cluster."""

    def __init__(self, directory, router, c2s_router, **kwargs):
        self.c2s_router = RouterAddress.of(c2s_router)
        super().__init__(directory, router, **kwargs)

    def _make_c2s(self, c2s_id, register):
        d = self.directory
        log, pidfile = d / ("c2s-%s.log" % c2s_id), d / ("c2s-%s.pid" % c2s_id)
        config = write_c2s_config(d / ("c2s-%s.xml" % c2s_id), self.c2s_router, c2s_id=c2s_id,
                                  domain=self.domain, ip=self.c2s_ip, port=self.c2s_port,
                                  db_path=self.db_path, log_path=log, pidfile=pidfile,
                                  register=register, retry=self.retry)
        return C2sProcess(config, d, c2s_id, log, self.c2s_ip, self.c2s_port, self.domain)

