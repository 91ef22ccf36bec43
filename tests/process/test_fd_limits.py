"""File descriptors on a real jrouter process (docs/jabberd2-router.md §3.1):
the open-file limit raised to what io.max_fds needs, and running out of
descriptors costs one log line and a pause, never a traceback or a spin.

Loopback only; every loop is bounded; the router is stopped by its PID.
"""

import socket
import time

from tests.support.peer import Peer


def limited(router_factory, soft, hard, extra=""):
    """A jrouter started under ``prlimit --nofile=soft:hard`` (prlimit execs it: same PID)."""
    router = router_factory("jrouter", start=False, extra=extra)
    router.argv = ["prlimit", f"--nofile={soft}:{hard}", "--"] + router.argv
    return router.start()


def open_files_limit(pid):
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                return int(line.split()[3]), int(line.split()[4])
    raise AssertionError("no open-files line")


def test_soft_limit_raised_to_what_max_fds_needs(router_factory):
    """ulimit -n 1024 (systemd's default) and io.max_fds 1024: the router
    raises its soft limit to 1024 + 64 spare, within the hard limit."""
    router = limited(router_factory, 1024, 4096)
    assert open_files_limit(router.popen.pid) == (1088, 4096)
    assert "open file limit" not in router.log_text


def test_out_of_descriptors_is_one_line_and_the_router_recovers(router_factory):
    """A hard limit of 128 under io.max_fds 1024: a warning at startup; 200
    silent connections run the router out of descriptors, which it logs
    once, without a traceback or a busy loop; once they go, a component
    connects, authenticates and routes."""
    router = limited(router_factory, 128, 128, extra=(
        "<io><limits><unauthenticated>1000</unauthenticated></limits></io>"))
    assert "open file limit is 128: io.max_fds 1024 needs 1088" in router.log_text
    silent = []
    try:
        for _ in range(200):
            silent.append(socket.create_connection((router.ip, router.port), timeout=5))
        router.wait_for_log("cannot accept connections: Too many open files")
        started = _cpu_seconds(router.popen.pid)
        time.sleep(2.0)
        assert _cpu_seconds(router.popen.pid) - started < 0.5      # paused, not spinning
    finally:
        for sock in silent:
            sock.close()
    sm = Peer(router.ip, router.port, timeout=10).authenticate().bind("sm")
    c2s = Peer(router.ip, router.port).authenticate().bind("c2s")
    sm.drain()
    c2s.send("<route to='sm' from='c2s'><message id='after'/></route>")
    assert sm.route()[0].get("id") == "after"
    sm.close(), c2s.close()
    log = router.log_text
    assert log.count("cannot accept connections") == 1
    assert "Traceback" not in log and "Traceback" not in router.stderr_text


def _cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0
