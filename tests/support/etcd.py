"""A real etcd on loopback for tests: started, faulted and restarted by PID.

Owns: one single-member etcd (Debian's ``etcd-server``, scripts/bootstrap)
with its client, peer and metrics ports picked free, its data dir (on
/dev/shm when there is one: half the put latency, docs/spec scaleout.md), and
the faults tests need: SIGKILL, SIGSTOP/SIGCONT, restart on the same data dir
and ports.
Must not know: what the tests store in it.

``--listen-metrics-urls`` is given so etcd opens no default metrics port, and
``--election-timeout 250 --heartbeat-interval 50`` so a 1 s lease is allowed
(with the defaults etcd raises every TTL to 2 s).
"""

import atexit
import os
import shutil
import signal
import tempfile
import urllib.request

from .ports import free_ports
from .process import ManagedProcess

ETCD = "/usr/bin/etcd"

_data_dirs = set()


@atexit.register
def _remove_leftovers():
    """/dev/shm is not pytest's tmp dir: remove what a crashed test left there."""
    for path in list(_data_dirs):
        shutil.rmtree(path, ignore_errors=True)


class EtcdServer:
    """One etcd member on 127.0.0.1; each start is a run (a ManagedProcess)
    with its output under `workdir`; the newest is `process`."""

    name = "etcd"

    def __init__(self, workdir):
        self.workdir = str(workdir)
        self.client_port, self.peer_port, self.metrics_port = free_ports(3)
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.data_dir = tempfile.mkdtemp(prefix="jrouter-etcd-", dir=shm or self.workdir)
        _data_dirs.add(self.data_dir)
        self.runs = []

    @property
    def endpoint(self):
        return "http://127.0.0.1:%d" % self.client_port

    @property
    def process(self):
        return self.runs[-1] if self.runs else None

    @property
    def pid(self):
        return self.process.pid if self.process is not None else None

    def argv(self):
        peer = "http://127.0.0.1:%d" % self.peer_port
        return [ETCD, "--name", "default", "--data-dir", self.data_dir,
                "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", "default=" + peer,
                "--listen-metrics-urls", "http://127.0.0.1:%d" % self.metrics_port,
                "--election-timeout", "250", "--heartbeat-interval", "50"]

    # -- lifecycle ---------------------------------------------------------

    def start(self, timeout=15.0):
        """Start a run and wait (bounded) until etcd answers with a leader."""
        if self.process is not None and self.process.running():
            raise RuntimeError("etcd already running (pid %d)" % self.pid)
        run = ManagedProcess("etcd" if not self.runs else "etcd-%d" % (len(self.runs) + 1),
                             self.argv(), self.workdir)
        self.runs.append(run)
        run.spawn_until(timeout, port=self.client_port, ready=self.healthy, what="healthy")
        return self

    def restart(self, timeout=15.0):
        """Stop the running run (if any), then start on the same data dir and ports."""
        self.stop()
        return self.start(timeout)

    def stop(self, timeout=5.0):
        """SIGTERM (after SIGCONT, in case it is paused), SIGKILL after `timeout`."""
        run = self.process
        if run is None:
            return None
        run.send_signal(signal.SIGCONT)
        return run.stop(timeout)

    def kill(self):
        """SIGKILL, as a crash, and reap it."""
        run = self.process
        if run is not None:
            run.send_signal(signal.SIGKILL)
            run.stop(5.0)

    def pause(self):
        """SIGSTOP: the kernel still accepts connections, nothing answers."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self):
        self.process.send_signal(signal.SIGCONT)

    def close(self):
        """Stop every run and remove the data dir."""
        for run in self.runs:
            run.send_signal(signal.SIGCONT)
            run.stop(5.0)
        shutil.rmtree(self.data_dir, ignore_errors=True)
        _data_dirs.discard(self.data_dir)

    # -- state -------------------------------------------------------------

    def healthy(self):
        """True if etcd's /health says so (it needs a leader)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(self.endpoint + "/health", timeout=1.0) as response:
                return b'"true"' in response.read()
        except OSError:
            return False

    def describe(self, tail=20):
        return "\n".join(run.describe(tail) for run in self.runs) or "etcd: never started"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
