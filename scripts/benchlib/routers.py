"""The routers under test: one config for both, process start/stop, /proc figures.

Owns: router.xml / router-users.xml / router-filter.xml for a benchmark run,
the command line of each router, starting a router and waiting until it
listens, stopping it (SIGTERM, then SIGKILL), and reading its CPU time and
memory from /proc.  Knows nothing about the wire protocols.

Besides the two named routers, any jrouter source tree (a git worktree of
another commit, say) can be a router of its own: `Tree`, run as
`PYTHONPATH=DIR python -m jrouter` from DIR with the same interpreter, and
checked to import jrouter from DIR (`tree_module`) before it is measured.

Both routers get the very same files (jrouter is a drop-in replacement):
XEP-0114 secret, one user in ACL `all` so it may bind any name (protocol §2.4,
§4.2 step 2), no limits, no keepalive, and a filter of the kind an operator
keeps (issue 12 measures "with a filter loaded"): an alias, a blocked domain,
a gateway's registration refused. No rule matches the benchmark's traffic,
so every packet is checked against all of them and delivered.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

USER = "bench"
PASSWORD = "bench-password"
SECRET = "bench-secret"  # XEP-0114 shared secret (local.secret)

C_ROUTER = "/usr/sbin/jabberd2-router"
NAMES = ("jabberd2", "jrouter")

ROUTER_XML = """\
<router>
  <id>router</id>
  <log type='stdout'/>
  <local>
    <ip>127.0.0.1</ip>
    <port>{port}</port>
    <users>{dir}/router-users.xml</users>
    <secret>{secret}</secret>
  </local>
  <check>
    <interval>60</interval>
    <keepalive>0</keepalive>
  </check>
  <io>
    <max_fds>4096</max_fds>
  </io>
  <aci>
    <acl type='all'><user>{user}</user></acl>
    <filter>{dir}/router-filter.xml</filter>
  </aci>
</router>
"""

USERS_XML = "<users><user><name>{user}</name><secret>{password}</secret></user></users>\n"
FILTER_XML = """\
<filter>
  <rule from="*" to="god@example.org" redirect="admin@example.org"/>
  <rule from="*@spam.example.net" error="forbidden" log="yes"/>
  <rule to="*@spam.example.net" error="forbidden"/>
  <rule to="msn.example.org" what="iq/query?xmlns=jabber:iq:register" error="not-allowed"/>
</filter>
"""

START_TIMEOUT = 20.0  # s until the router must listen (jrouter imports gevent + lxml)
STOP_TIMEOUT = 5.0  # s between SIGTERM and SIGKILL
_PR_SET_PDEATHSIG = 1


class RouterError(Exception):
    """The router did not start, or died."""


def write_config(directory: str, port: int, extra: str = "") -> str:
    """Write the three config files into `directory`; return router.xml's path.
    `extra` (sections of router.xml, such as a node's `<cluster>`) goes last
    in `<router>`."""
    text = ROUTER_XML.format(port=port, dir=directory, secret=SECRET, user=USER)
    if extra:
        text = text.replace("</router>\n", extra.rstrip("\n") + "\n</router>\n")
    files = {
        "router.xml": text,
        "router-users.xml": USERS_XML.format(user=USER, password=PASSWORD),
        "router-filter.xml": FILTER_XML,
    }
    for name, text in files.items():
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            f.write(text)
    return os.path.join(directory, "router.xml")


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(count: int) -> List[int]:
    """`count` distinct loopback TCP ports nobody listens on right now (all
    bound at once, so the kernel cannot hand out one of them twice)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def command(name: str, config: str, python: str) -> List[str]:
    """The command line that starts router `name` with `config`."""
    if name == "jabberd2":
        return [C_ROUTER, "-c", config]
    if name == "jrouter":
        return [python, "-m", "jrouter", "-c", config]
    raise ValueError(f"unknown router {name!r} (known: {', '.join(NAMES)})")


@dataclass(frozen=True)
class Tree:
    """A jrouter source tree run as a router of its own, named `name`."""
    name: str
    path: str  # absolute; holds jrouter/__main__.py

    def env(self) -> Dict[str, str]:
        """The environment of its processes: DIR first on the module path
        (the venv's editable install of the main tree comes after it)."""
        old = os.environ.get("PYTHONPATH")
        return dict(os.environ, PYTHONPATH=self.path + (os.pathsep + old if old else ""))


def launch(name: str, config: str, python: str, cwd: str,
           trees: Sequence[Tree] = ()) -> Tuple[List[str], str, Optional[Dict[str, str]]]:
    """(argv, cwd, env or None for ours) that start router `name` with `config`:
    a tree's `python -m jrouter` runs from the tree with it on PYTHONPATH."""
    for tree in trees:
        if tree.name == name:
            return [python, "-m", "jrouter", "-c", config], tree.path, tree.env()
    return command(name, config, python), cwd, None


def tree_module(tree: Tree, python: str) -> str:
    """The file `import jrouter` loads for `tree` (same interpreter, cwd and
    environment as its router); RouterError unless it lies inside the tree."""
    code = "import jrouter, os; print(os.path.realpath(jrouter.__file__))"
    try:
        done = subprocess.run([python, "-c", code], cwd=tree.path, env=tree.env(),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=START_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RouterError(f"cannot import jrouter from {tree.path}: {e}") from None
    where = done.stdout.strip()
    if done.returncode != 0 or not where:
        tail = "\n    ".join(done.stderr.strip().splitlines()[-8:])
        raise RouterError(f"`import jrouter` failed in {tree.path} (status "
                          f"{done.returncode}):\n    {tail}")
    root = os.path.realpath(tree.path)
    if os.path.commonpath([root, where]) != root:
        raise RouterError(f"`import jrouter` from {tree.path} loads {where} instead")
    return where


def tree_commit(tree: Tree) -> str:
    """The tree's git commit (with "+dirty" if its files differ), or "" outside git."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", tree.path, *args], capture_output=True,
                                  text=True, timeout=30, stdin=subprocess.DEVNULL).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    commit = git("rev-parse", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return commit


def child_setup(cpus: Optional[Sequence[int]]):
    """preexec_fn: die with the parent (so an orchestrator killed by SIGKILL
    leaves no router behind), and run on `cpus` if given."""

    def setup() -> None:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
        if cpus:
            os.sched_setaffinity(0, set(cpus))

    return setup


class Router:
    """One router process on 127.0.0.1:port, logging into `logpath`."""

    def __init__(self, name: str, argv: List[str], cwd: str, logpath: str, port: int,
                 cpus: Optional[Sequence[int]] = None,
                 env: Optional[Mapping[str, str]] = None) -> None:
        self.name, self.argv, self.cwd = name, argv, cwd
        self.logpath, self.port, self.cpus = logpath, port, cpus
        self.env = dict(os.environ if env is None else env)
        self.proc: Optional[subprocess.Popen] = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start and wait until the port accepts connections; RouterError if not."""
        self.spawn()
        self.wait_listening(timeout)

    def spawn(self) -> None:
        """Start the process (several can then start at once; see wait_listening)."""
        env = dict(self.env, PYTHONUNBUFFERED="1")
        with open(self.logpath, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, preexec_fn=child_setup(self.cpus))

    def wait_listening(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until the spawned process's port accepts connections; RouterError if not."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RouterError(f"{self.name} exited with status {self.proc.returncode} "
                                  f"before listening:\n{self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RouterError(f"{self.name} did not listen on 127.0.0.1:{self.port} "
                          f"within {timeout:.0f} s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> Optional[int]:
        """SIGTERM, wait STOP_TIMEOUT, then SIGKILL. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        return self.proc.returncode

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.logpath, "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except OSError as e:
            return f"(no log: {e})"
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    def __enter__(self) -> "Router":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------
# /proc readers, shared with the load generator (which samples the router's
# CPU time exactly when its clock starts and stops).

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (all its threads), in seconds; proc(5)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2:].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # fields 14 and 15 of proc(5)


def memory_kb(pid: int) -> Dict[str, int]:
    """Current (VmRSS) and peak (VmHWM) resident set of `pid`, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith((b"VmRSS:", b"VmHWM:")):
                key = "rss_kb" if line.startswith(b"VmRSS") else "hwm_kb"
                out[key] = int(line.split()[1])
    return out


def busy_seconds() -> float:
    """CPU time the whole machine spent busy (all cpus, all processes); proc(5)."""
    with open("/proc/stat", "rb") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def default_python(repo: str) -> str:
    """The interpreter for `python -m jrouter`: the repo's venv if there is one."""
    venv = os.path.join(repo, ".venv", "bin", "python")
    return venv if os.access(venv, os.X_OK) else sys.executable
