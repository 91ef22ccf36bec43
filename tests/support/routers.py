"""Router configs in jabberd2's format, and a router process of either kind.

Owns: writing router.xml, router-users.xml and router-filter.xml the way
jabberd2 2.7 reads them (protocol §2), and running `jabberd2-router` or jrouter
on them with the same command line (`-c FILE`).
Must not know: what the test then does with the router.

Everything lives in one temp dir: the three config files, the log
(`router.log`, `<log type='file'>`), the pidfile (`router.pid`) and the
captured stdout/stderr (`router.stdout`, `router.stderr`).
"""

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from .process import ManagedProcess

#: "jrouter-compiled" is jrouter with its packet path compiled by mypyc
#: (scripts/build-compiled): every test that compares the routers runs on it too.
ROUTER_KINDS = ("jabberd2", "jrouter", "jrouter-compiled")
#: Those that are jrouter: the tests of what only jrouter does run on both builds.
JROUTER_KINDS = tuple(kind for kind in ROUTER_KINDS if kind != "jabberd2")
JABBERD2_ROUTER = "/usr/sbin/jabberd2-router"
REPO_ROOT = Path(__file__).resolve().parents[2]
#: jrouter on Debian's pypy3: the venv scripts/bootstrap makes (tests/e2e/test_pypy.py)
PYPY = REPO_ROOT / ".venv-pypy" / "bin" / "python"
#: Where scripts/build-compiled builds the compiled tree for the tests.
COMPILED_TREE = REPO_ROOT / ".build" / "compiled"
_built = []


def compiled_tree():
    """The compiled tree, built (or found up to date) once per test run by
    scripts/build-compiled with the interpreter running the tests."""
    if not _built:
        done = subprocess.run([str(REPO_ROOT / "scripts" / "build-compiled"), str(COMPILED_TREE)],
                              env=dict(os.environ, PYTHON=sys.executable), capture_output=True,
                              text=True, timeout=600, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
        _built.append(Path(done.stdout.strip()))
    return _built[0]

# What Debian ships (protocol §2.6): one component user, allowed everything.
DEFAULT_USERS = {"jabberd": "secret"}
DEFAULT_ACLS = {"all": ["jabberd"]}


@dataclass(frozen=True)
class RouterFiles:
    """Paths and settings of one written router configuration."""

    directory: Path
    config: Path      # router.xml, what `-c` gets
    users_file: Path  # router-users.xml
    filter_file: Path  # router-filter.xml
    log: Path
    pidfile: Path
    ip: str
    port: int
    users: dict       # component user name -> secret
    secret: str       # XEP-0114 shared secret, or None when disabled


def _fragments(extra):
    """Accept one XML string or an iterable of them; return one string."""
    if not extra:
        return ""
    if isinstance(extra, str):
        return extra
    return "\n".join(extra)


def _pairs(mapping_or_pairs):
    if not mapping_or_pairs:
        return []
    if hasattr(mapping_or_pairs, "items"):
        return list(mapping_or_pairs.items())
    return list(mapping_or_pairs)


def _users_xml(users):
    entries = "".join(
        "  <user>\n    <name>%s</name>\n    <secret>%s</secret>\n  </user>\n"
        % (escape(name), escape(secret)) for name, secret in _pairs(users))
    return "<users>\n%s</users>\n" % entries


def _rule_xml(rule):
    if isinstance(rule, str):
        return "  %s\n" % rule
    attrs = " ".join("%s=%s" % (k, quoteattr(str(v))) for k, v in rule.items())
    return "  <rule %s/>\n" % attrs


def _filter_xml(rules):
    """`rules`: a whole file as a string, or dicts of <rule> attributes / raw <rule> strings."""
    if isinstance(rules, str):
        return rules
    return "<filter>\n%s</filter>\n" % "".join(_rule_xml(r) for r in rules or ())


def _acls_xml(acls):
    out = []
    for acl_type, members in _pairs(acls):
        users = "".join("      <user>%s</user>\n" % escape(u) for u in members)
        out.append("    <acl type=%s>\n%s    </acl>\n" % (quoteattr(acl_type), users))
    return "".join(out)


def _aliases_xml(aliases):
    pairs = _pairs(aliases)
    if not pairs:
        return ""
    items = "".join("    <alias name=%s target=%s/>\n" % (quoteattr(n), quoteattr(t))
                    for n, t in pairs)
    return "  <aliases>\n%s  </aliases>\n" % items


def write_router_config(directory, port, *, ip="127.0.0.1", users=None, secret="secret",
                        acls=None, aliases=None, filter_rules=None, extra="",
                        local_extra="", router_id="router", debug_log=None):
    """Write router.xml, router-users.xml and router-filter.xml into `directory`.

    users: {name: secret} for router-users.xml (default jabberd/secret).
    secret: XEP-0114 shared secret; None leaves it out (XEP-0114 disabled).
    acls: {type: [user, ...]} for <aci> (default all=jabberd).
    aliases: {name: target} or [(name, target), ...].
    filter_rules: [{attr: value}, ...] or raw '<rule .../>' strings, or the
        whole router-filter.xml as one string; default: no rules.
    extra: XML fragment(s) appended inside <router> (e.g. '<check>...</check>',
        '<io>...</io>', '<message_logging>...</message_logging>').
    local_extra: XML fragment(s) appended inside <local> (e.g. '<pemfile>').
    debug_log: a path for <log><debug> (where debug lines go), or None.
    Returns a RouterFiles.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    users = dict(DEFAULT_USERS) if users is None else dict(_pairs(users))
    acls = DEFAULT_ACLS if acls is None else acls
    files = RouterFiles(
        directory=directory, config=directory / "router.xml",
        users_file=directory / "router-users.xml",
        filter_file=directory / "router-filter.xml",
        log=directory / "router.log", pidfile=directory / "router.pid",
        ip=ip, port=int(port), users=users, secret=secret)
    secret_xml = "    <secret>%s</secret>\n" % escape(secret) if secret is not None else ""
    local_more = _fragments(local_extra)
    config = (
        "<router>\n"
        "  <id>%(id)s</id>\n"
        "  <pidfile>%(pidfile)s</pidfile>\n"
        "  <log type='file'>\n    <file>%(log)s</file>\n%(debug)s  </log>\n"
        "  <local>\n"
        "    <ip>%(ip)s</ip>\n"
        "    <port>%(port)d</port>\n"
        "    <users>%(users)s</users>\n"
        "%(secret)s%(local_extra)s"
        "  </local>\n"
        "%(aliases)s"
        "  <aci>\n%(acls)s    <filter>%(filter)s</filter>\n  </aci>\n"
        "%(extra)s"
        "</router>\n") % {
            "id": escape(router_id), "pidfile": escape(str(files.pidfile)),
            "log": escape(str(files.log)), "ip": escape(ip), "port": files.port,
            "debug": "    <debug>%s</debug>\n" % escape(str(debug_log)) if debug_log else "",
            "users": escape(str(files.users_file)), "secret": secret_xml,
            "local_extra": local_more + "\n" if local_more else "",
            "aliases": _aliases_xml(aliases), "acls": _acls_xml(acls),
            "filter": escape(str(files.filter_file)),
            "extra": _fragments(extra) + "\n" if extra else ""}
    files.config.write_text(config, encoding="utf-8")
    files.users_file.write_text(_users_xml(users), encoding="utf-8")
    files.filter_file.write_text(_filter_xml(filter_rules), encoding="utf-8")
    return files


def router_argv(kind, config_path, args=()):
    """The command line that runs router `kind` on `config_path`."""
    if kind == "jabberd2":
        return [JABBERD2_ROUTER, "-c", str(config_path), *args]
    if kind in ("jrouter", "jrouter-compiled"):     # the latter from its tree (router_cwd)
        return [sys.executable, "-m", "jrouter", "-c", str(config_path), *args]
    if kind == "jrouter-pypy":      # tests/e2e/test_pypy.py only: not one of ROUTER_KINDS
        return [str(PYPY), "-m", "jrouter", "-c", str(config_path), *args]
    raise ValueError("router kind must be one of %s, not %r" % (ROUTER_KINDS, kind))


def router_cwd(kind):
    """Where router `kind` runs: `python -m jrouter` imports the package from there."""
    return compiled_tree() if kind == "jrouter-compiled" else REPO_ROOT


class RouterProcess(ManagedProcess):
    """A running router of `kind` (one of ROUTER_KINDS) on a RouterFiles.

    Every kind gets the same files and flags; jrouter runs from the repo root
    (compiled: from its tree) with the interpreter running the tests. `args`
    adds flags (e.g. ['-i', 'x']).
    """

    def __init__(self, kind, files, *, args=(), env=None):
        env = dict(os.environ if env is None else env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        super().__init__("router", router_argv(kind, files.config, args), files.directory,
                         cwd=router_cwd(kind), env=env, log_path=files.log)
        self.kind = kind
        self.files = files

    @property
    def ip(self):
        return self.files.ip

    @property
    def port(self):
        return self.files.port

    def start(self, timeout=15.0):
        """Spawn and wait (bounded) until this process listens on its port."""
        return self.spawn_until(timeout, port=self.port)
