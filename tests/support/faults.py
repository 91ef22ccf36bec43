"""Faults for end-to-end tests: components that die badly, bystanders that keep time.

Owns: a jabberd2-protocol component run as a child process so that a test can
SIGKILL it at a chosen moment (`FaultComponent`), the bystander pair whose
round trips say whether the router still serves the others (`Bystanders`,
`Prober`), and reading a process's memory from /proc (`rss_kib`).
Must not know: which router kind runs, or what a test concludes.

The component speaks through `tests.support.peer.Peer` (SASL DIGEST-MD5,
`<bind/>`). It writes one line per event to its log, flushed at once, so the
test can tell when it has reached the point where it is to be killed:

    connected port=41236         (its local port: the router logs it as [127.0.0.1, port=41236])
    bound victim
    sent half                    (half mode: half a <route> is on the wire)
    ready                        (the mode's setup is done)
    echoed 1234                  (echo mode, about once a second: routes passed on so far)

Modes:
    half TARGET   bind NAME, send half a <route> to TARGET, then sleep forever
    stuck         bind NAME with multi='to', shrink the receive buffer, then
                  never read again (traffic for it queues in the router)
    echo TARGET   bind NAME; every <route> that arrives goes on to TARGET, from
                  NAME, with the same payload (two of these make a route loop)

Run as a program (what FaultComponent does); the router user's password is
in the environment, so that it shows in no command line::

    FAULT_PASSWORD=secret python -m tests.support.faults MODE HOST PORT NAME LOGFILE [TARGET]
"""

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from .peer import Peer
from .ports import connect_address, tcp_sockets
from .process import ManagedProcess
from .routers import REPO_ROOT

NS_COMPONENT = "http://jabberd.jabberstudio.org/ns/component/1.0"
ROUTE = NS_COMPONENT + " route"       # an Element's expanded name


# -- the component itself (runs in the child process) ---------------------------


def _payload(element):
    """The bytes inside a <route>'s start and end tags."""
    raw = element.raw
    start = raw.index(b">") + 1
    return raw[start:raw.rindex(b"</")]


def _half(peer, name, target, log):
    peer.drain(0.2)
    peer.send("<route to='%s' from='%s'><message id='half'><body>never fin" % (target, name))
    log("sent half")
    log("ready")
    while True:
        time.sleep(60)


def _stuck(peer, name, target, log):
    peer.drain(0.2)      # the advertisements of what is bound already
    log("ready")
    while True:          # never read: the window closes, the router queues
        time.sleep(60)


def _echo(peer, name, target, log):
    log("ready")
    head = ("<route to='%s' from='%s'>" % (target, name)).encode()
    echoed, next_report = 0, time.monotonic() + 1.0
    peer.sock.settimeout(None)
    while True:
        data = peer.sock.recv(65536)
        if not data:
            log("router closed the connection")
            return
        out = [head + _payload(e) + b"</route>"
               for e in peer.client.receive(data)
               if getattr(e, "name", None) == ROUTE and "error" not in e.attrs]
        if out:
            peer.send(b"".join(out))
            echoed += len(out)
        if time.monotonic() >= next_report:
            log("echoed %d" % echoed)
            next_report = time.monotonic() + 1.0


_MODES = {"half": _half, "stuck": _stuck, "echo": _echo}


def main(argv):
    mode, host, port, name, log_path, *rest = argv
    target = rest[0] if rest else None
    password = os.environ.get("FAULT_PASSWORD", "secret")
    user = os.environ.get("FAULT_USER", "jabberd")
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    with open(log_path, "a", encoding="utf-8") as log_file:
        def log(text):
            log_file.write(text + "\n")
            log_file.flush()

        peer = Peer(host, int(port), timeout=10.0)
        if mode == "stuck":
            # Set before anything is read, so the window stays small: the
            # kernel then holds little, and what the router cannot send
            # stays in the router.
            peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        log("connected port=%d" % peer.sock.getsockname()[1])
        peer.authenticate(user, password)
        peer.bind(name, extra=" multi='to'" if mode == "stuck" else "")
        log("bound %s" % name)
        _MODES[mode](peer, name, target, log)
    return 0


# -- the test side --------------------------------------------------------------


class FaultComponent(ManagedProcess):
    """One fault component (see the modes above) as a child process.

    `start` waits (bounded) until its log says `ready`; `kill` is SIGKILL,
    so the router sees the connection drop with no goodbye, as after a crash.
    """

    def __init__(self, directory, router, mode, name, target=None, *, label=None,
                 user="jabberd", password="secret"):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        label = label or "%s-%s" % (mode, name)
        log = directory / ("%s.log" % label)
        argv = [sys.executable, "-m", "tests.support.faults", mode,
                connect_address(router.ip), str(router.port), name, str(log)]
        if target is not None:
            argv.append(target)
        env = dict(os.environ, PYTHONUNBUFFERED="1", FAULT_USER=user, FAULT_PASSWORD=password)
        super().__init__(label, argv, directory, cwd=REPO_ROOT, env=env, log_path=log)
        self.mode, self.component_name = mode, name

    def start(self, timeout=10.0):
        return self.spawn_until(timeout, log="ready")

    def kill(self, timeout=5.0):
        """SIGKILL and reap; return the exit code (-9)."""
        self.send_signal(signal.SIGKILL)
        return self.stop(timeout)

    @property
    def local_port(self):
        """The component's own port, as the router's log lines show it."""
        for line in self.log_text.splitlines():
            if line.startswith("connected port="):
                return int(line.split("=", 1)[1])
        return None

    def echoed(self):
        """How many routes an echo component passed on, by its last report (0 if none)."""
        counts = [int(line.split()[1]) for line in self.log_text.splitlines()
                  if line.startswith("echoed ")]
        return counts[-1] if counts else 0


def rss_kib(pid):
    """The resident set size of process `pid` in KiB (VmRSS in /proc/PID/status)."""
    with open("/proc/%d/status" % pid, encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise ValueError("no VmRSS for pid %d" % pid)


def tcp_queues(local_port, remote_port):
    """(tx_queue, rx_queue) in bytes of the loopback TCP connection from
    `local_port` to `remote_port`, from /proc/net/tcp (tx: written and not yet
    acknowledged by the other end; rx: arrived and not yet read); None if none."""
    for fields in tcp_sockets():
        local, remote = fields[1].rsplit(":", 1)[1], fields[2].rsplit(":", 1)[1]
        if int(local, 16) == local_port and int(remote, 16) == remote_port:
            tx, rx = fields[4].split(":")
            return int(tx, 16), int(rx, 16)
    return None


def connect(router, name, extra="", timeout=5.0):
    """A Peer authenticated as Debian's component user and bound to `name`, drained."""
    peer = Peer(connect_address(router.ip), router.port, timeout=timeout)
    peer.authenticate().bind(name, extra=extra)
    peer.drain(0.1)
    return peer


def route(to, sender, payload):
    return "<route to='%s' from='%s'>%s</route>" % (to, sender, payload)


class Bystanders:
    """Two components, `ping` and `pong`, that have nothing to do with the fault.

    `round_trip()` sends a route ping -> pong and pong's answer back, and
    returns the seconds that took; anything else pong or ping receives (a
    stray route) is kept in `strays`. Used from one thread at a time.
    """

    def __init__(self, router, ping="ping", pong="pong", timeout=5.0):
        self.ping_name, self.pong_name = ping, pong
        self.ping = connect(router, ping, timeout=timeout)
        self.pong = connect(router, pong, timeout=timeout)
        self.timeout = timeout
        self.count = 0
        self.strays = []

    def _take(self, peer, wanted_id, deadline):
        while True:
            got = peer.route(timeout=max(0.01, deadline - time.monotonic()))
            if len(got) and got[0].get("id") == wanted_id:
                return got
            self.strays.append(got)

    def round_trip(self, timeout=None):
        """Seconds for one ping -> pong -> ping exchange; TimeoutError if it takes longer than `timeout`."""
        self.count += 1
        ask, answer = "ask-%d" % self.count, "answer-%d" % self.count
        started = time.monotonic()
        deadline = started + (timeout or self.timeout)
        self.ping.send(route(self.pong_name, self.ping_name, "<message id='%s'/>" % ask))
        self._take(self.pong, ask, deadline)
        self.pong.send(route(self.ping_name, self.pong_name, "<message id='%s'/>" % answer))
        self._take(self.ping, answer, deadline)
        return time.monotonic() - started

    def close(self):
        self.ping.close()
        self.pong.close()


class Prober:
    """Round trips of a Bystanders pair, one after another, in a thread.

        with Prober(bystanders) as probe:
            ...the fault...
        assert probe.worst() < 1.0 and not probe.failures

    `samples`: (time.monotonic() at the start, seconds) of every round trip;
    `failures`: (start, exception text) of those that failed or timed out.
    `pause`: seconds between round trips.
    """

    def __init__(self, bystanders, pause=0.02, timeout=5.0):
        self.bystanders, self.pause, self.timeout = bystanders, pause, timeout
        self.samples, self.failures = [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prober", daemon=True)

    def _run(self):
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.samples.append((started, self.bystanders.round_trip(self.timeout)))
            except Exception as exc:  # noqa: BLE001 - every failure is a finding to report
                self.failures.append((started, "%s: %s" % (type(exc).__name__, exc)))
                return  # the pair's streams are in an unknown state now
            self._stop.wait(self.pause)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(self.timeout + 1.0)
        return self

    def worst(self, since=None):
        """The longest round trip (since `since`, a time.monotonic() value), or None."""
        times = [s for t, s in self.samples if since is None or t >= since]
        return max(times) if times else None

    def summary(self):
        times = sorted(s for _t, s in self.samples)
        if not times:
            return "no round trips, failures: %s" % self.failures
        return "%d round trips, median %.1f ms, worst %.1f ms, failures: %s" % (
            len(times), 1000 * times[len(times) // 2], 1000 * times[-1], self.failures)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
