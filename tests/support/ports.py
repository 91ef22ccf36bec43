"""Free loopback TCP ports, and waiting for a process to listen on one.

Owns: picking ports for test servers and telling when a server is ready.
Must not know: which server runs on the port.

Readiness is read from the kernel's socket tables (``/proc/net/tcp*``), not by
connecting: a probe connection would show up in the server's log and in its
connection counts, which tests of the router itself assert on.
"""

import os
import socket
import time

# Ports handed out by this process. The kernel may give a port back once its
# probe socket is closed; remembering them keeps two servers of one test apart.
_handed_out = set()

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's "st" column


def connect_address(ip):
    """Where to connect to reach a server bound to `ip` (wildcards -> loopback)."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(ip, ip)


def free_port(host="127.0.0.1"):
    """Return a TCP port on `host` that nothing listens on right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port found on %s after 50 tries" % host)


def free_ports(count, host="127.0.0.1"):
    """Return `count` distinct free ports on `host`."""
    return [free_port(host) for _ in range(count)]


def tcp_sockets():
    """The fields of every row of /proc/net/tcp and /proc/net/tcp6 (IPv4 and IPv6 sockets)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            yield line.split()


def _listening_inodes(port):
    """Socket inodes of every TCP socket listening on `port` (any address)."""
    return {fields[9] for fields in tcp_sockets()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == _LISTEN}


def _socket_inodes(pid):
    """Socket inodes among the open file descriptors of process `pid`."""
    inodes = set()
    fd_dir = "/proc/%d/fd" % pid
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def is_listening(port, pid=None):
    """True if something (process `pid`, when given) listens on TCP `port`."""
    listening = _listening_inodes(port)
    if pid is None or not listening:
        return bool(listening)
    return bool(listening & _socket_inodes(pid))


def can_connect(host, port, timeout=0.5):
    """True if a TCP connection to (host, port) succeeds (then closes it)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(predicate, timeout, what, interval=0.05, alive=None):
    """Poll `predicate()` until true; raise TimeoutError naming `what`.

    `alive`, if given, is called each round and may raise (e.g. when the
    process we wait for has died) so a dead server fails fast.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if alive is not None:
            alive()
        if time.monotonic() >= deadline:
            raise TimeoutError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)
