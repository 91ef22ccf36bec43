"""Several jrouter nodes as one router, for the benchmark: one etcd and k nodes.

Owns: a throwaway single-member etcd on loopback (Debian's /usr/bin/etcd,
its data dir on /dev/shm when there is one), k jrouter nodes n1..nk, each
with its own directory, component port, peer port and status port and the
same `<cluster>` but for `<node>` and `<peer>` (conf/router.xml.dist,
"Several jrouter nodes as one router"); waiting, bounded, until every node
has joined and every pair of nodes is linked; reading a node's /status;
stopping everything by PID.  Knows nothing about the wire protocols.

Readiness is read from each node's own /status (docs/cluster.md §8,
"Status"): the node's agent says `joined`, its node list holds all k ids,
and each other node is `linked`.  That is the same fact as the log line
"peer link with node 'X' up" at both ends, without parsing logs.  Whether a
name bound on one node is in every node's table is the `names` of each
/status (`missing_names`): the load generator asks that after its binds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from typing import Any, Dict, List, Optional, Sequence

from . import routers

ETCD = "/usr/bin/etcd"
CLUSTER = "bench"
PEER_SECRET = "bench-peer-secret-0123456789"  # >= 16 characters (config.sections._secret)
READY_TIMEOUT = 30.0  # s from the nodes' start until all are joined and linked
ETCD_TIMEOUT = 15.0  # s until etcd reports a leader

CLUSTER_XML = """\
  <status>
    <ip>127.0.0.1</ip>
    <port>{status_port}</port>
  </status>
  <cluster>
    <name>{cluster}</name>
    <node>{node}</node>
    <peer>
      <ip>127.0.0.1</ip>
      <port>{peer_port}</port>
      <secret>{secret}</secret>
    </peer>
    <etcd>
      <endpoint>{endpoint}</endpoint>
    </etcd>
  </cluster>
"""


class ClusterError(routers.RouterError):
    """etcd or a node did not start, or the nodes did not form one router."""


def node_ids(k: int) -> List[str]:
    return [f"n{j + 1}" for j in range(k)]


def _get(url: str, timeout: float = 2.0) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    with opener.open(url, timeout=timeout) as response:
        return response.read()


def status(port: int, timeout: float = 5.0) -> Dict[str, Any]:
    """A node's /status as JSON (docs: jrouter/ops/status.py)."""
    return json.loads(_get(f"http://127.0.0.1:{port}/status", timeout))


def missing_names(status_ports: Sequence[int], names: Sequence[str]) -> List[str]:
    """Per node that lacks some of `names` in its table (a name with no
    member counts as missing): "node on status port P lacks [...]"."""
    out = []
    for port in status_ports:
        try:
            known = {e["name"] for e in status(port)["names"] if e["members"]}
        except (OSError, ValueError, KeyError) as e:
            out.append(f"node with status port {port}: no /status ({e})")
            continue
        lacking = [n for n in names if n not in known]
        if lacking:
            out.append(f"node with status port {port} lacks {lacking[:3]}"
                       + (f" and {len(lacking) - 3} more" if len(lacking) > 3 else ""))
    return out


def link_figures(st: Dict[str, Any]) -> Dict[str, int]:
    """What one node's /status says about the traffic across nodes: routes
    other nodes forwarded here, packets sent and received over its links,
    and what it dropped or bounced for a full hold."""
    c = st.get("cluster") or {}
    nodes = [n for n in c.get("nodes", []) if not n.get("self")]
    return {"forwarded_in": int(c.get("forwarded_in", 0)),
            "link_packets_out": sum(int(n.get("packets_out", 0)) for n in nodes),
            "link_packets_in": sum(int(n.get("packets_in", 0)) for n in nodes),
            "dropped": int(c.get("dropped", 0)),
            "bounced_held_full": int(c.get("bounced_held_full", 0))}


class Etcd:
    """One etcd member on 127.0.0.1 with free ports; stopped by its PID."""

    def __init__(self, workdir: str) -> None:
        self.client_port, self.peer_port, self.metrics_port = routers.free_ports(3)
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.data_dir = tempfile.mkdtemp(prefix="jrouter-bench-etcd-", dir=shm or workdir)
        self.logpath = os.path.join(workdir, "etcd.log")
        self.proc: Optional[subprocess.Popen] = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def argv(self) -> List[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        # --election-timeout/--heartbeat-interval: a single member on loopback
        # elects itself in a moment instead of ~1 s (tests/support/etcd.py).
        return [ETCD, "--name", "bench", "--data-dir", self.data_dir,
                "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", "bench=" + peer,
                "--listen-metrics-urls", f"http://127.0.0.1:{self.metrics_port}",
                "--election-timeout", "250", "--heartbeat-interval", "50"]

    def start(self, timeout: float = ETCD_TIMEOUT) -> None:
        with open(self.logpath, "wb") as log:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT,
                                         preexec_fn=routers.child_setup(None))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ClusterError(f"etcd exited with status {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                if b'"true"' in _get(self.endpoint + "/health", 1.0):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise ClusterError(f"etcd did not report a leader within {timeout:.0f} s:\n"
                           f"{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM, SIGKILL after routers.STOP_TIMEOUT; remove the data dir."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(routers.STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(routers.STOP_TIMEOUT)
        finally:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.logpath, "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except OSError as e:
            return f"(no log: {e})"
        return "\n".join("    " + line for line in text.splitlines()[-lines:])


class Cluster:
    """etcd and k jrouter nodes under `workdir`; node j runs on `cpus[j]`
    (None: wherever the kernel puts it)."""

    def __init__(self, k: int, workdir: str, python: str, repo: str,
                 cpus: Sequence[Optional[Sequence[int]]]) -> None:
        self.workdir = workdir
        self.etcd = Etcd(workdir)
        self.ids = node_ids(k)
        ports = routers.free_ports(3 * k)
        self.ports, self.peer_ports, self.status_ports = ports[:k], ports[k:2 * k], ports[2 * k:]
        self.nodes: List[routers.Router] = []
        self.ready_s = 0.0  # s from the start until the nodes formed one router
        for j, node in enumerate(self.ids):
            directory = os.path.join(workdir, node)
            os.mkdir(directory)
            extra = CLUSTER_XML.format(status_port=self.status_ports[j], cluster=CLUSTER,
                                       node=node, peer_port=self.peer_ports[j],
                                       secret=PEER_SECRET, endpoint=self.etcd.endpoint)
            config = routers.write_config(directory, self.ports[j], extra)
            argv = routers.command("jrouter", config, python)
            self.nodes.append(routers.Router(f"jrouter node {node}", argv, repo,
                                             os.path.join(directory, "router.log"),
                                             self.ports[j], cpus[j]))

    @property
    def pids(self) -> List[int]:
        return [n.pid for n in self.nodes]

    def start(self, timeout: float = READY_TIMEOUT) -> None:
        """etcd, then every node at once; wait until all have joined and
        every pair is linked.  ClusterError (with the logs) if not."""
        t0 = time.monotonic()
        self.etcd.start()
        for node in self.nodes:
            node.spawn()
        deadline = time.monotonic() + timeout
        for node in self.nodes:  # a node opens its component port once it has joined
            node.wait_listening(max(0.1, deadline - time.monotonic()))
        while True:
            waiting = self.not_ready()
            if not waiting:
                self.ready_s = time.monotonic() - t0
                return
            dead = self.dead()
            if dead:
                raise ClusterError(dead)
            if time.monotonic() >= deadline:
                raise ClusterError(f"the {len(self.nodes)} nodes did not form one router "
                                   f"within {timeout:.0f} s: " + "; ".join(waiting)
                                   + "\n" + self.logs())
            time.sleep(0.05)

    def not_ready(self) -> List[str]:
        """What keeps the cluster from being one router, per node ([] when ready)."""
        out = []
        for node, port in zip(self.ids, self.status_ports):
            try:
                c = status(port)["cluster"] or {}
            except (OSError, ValueError, KeyError) as e:
                out.append(f"{node}: no /status ({e})")
                continue
            seen = {n["id"]: n for n in c.get("nodes", [])}
            unlinked = [o for o in self.ids if o != node and not seen.get(o, {}).get("linked")]
            if c.get("state") != "joined" or unlinked:
                out.append(f"{node}: {c.get('state')}, not linked to {unlinked}")
        return out

    def dead(self) -> str:
        """'' if every node and etcd run; else which died, with its log."""
        out = []
        if self.etcd.proc is not None and self.etcd.proc.poll() is not None:
            out.append(f"etcd died (status {self.etcd.proc.returncode}):\n{self.etcd.log_tail()}")
        for node in self.nodes:
            if node.proc is not None and not node.alive():
                out.append(f"{node.name} died (status {node.proc.returncode}):\n"
                           f"{node.log_tail()}")
        return "\n".join(out)

    def logs(self, lines: int = 15) -> str:
        """The tail of every node's log (and etcd's), for a failure report."""
        parts = [f"  {node.name} log ({node.logpath}):\n{node.log_tail(lines)}"
                 for node in self.nodes]
        return "\n".join(parts + [f"  etcd log:\n{self.etcd.log_tail(lines)}"])

    def stop(self) -> None:
        """Every node (SIGTERM, then SIGKILL), then etcd; each by its PID."""
        try:
            for node in self.nodes:
                if node.proc is not None and node.proc.poll() is None:
                    node.proc.send_signal(signal.SIGTERM)  # all at once: they leave together
            for node in self.nodes:
                node.stop()
        finally:
            self.etcd.stop()


def probe() -> Optional[str]:
    """None if a cluster can run here; else why not."""
    if not os.access(ETCD, os.X_OK):
        return f"{ETCD} is not installed (apt-get install etcd-server)"
    return None
