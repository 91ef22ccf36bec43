"""The Debian package: built by scripts/build-deb, installed, run, purged.

The .deb is installed with apt on this machine (so the test needs root, and
fails without it rather than skip: CI runs as root and must not pass
vacuously). Its /usr/sbin/jrouter then routes for Debian's real jabberd2 sm
and c2s, with a router.xml of its own on a free loopback port, while slixmpp
users chat; no systemd unit is started. Purging must leave the machine as
before: no file of the package, and jabberd2's files as they were (checksums,
`dpkg -V jabberd2`, diversions).

The installed commands run with a minimal environment from `/`, so that they
can import only what the package and Debian's python3-* packages put there,
never the source tree or the venv.
"""

import glob
import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.support.jabberd2 import Jabberd2Stack, RouterAddress
from tests.support.ports import free_port, is_listening
from tests.support.process import ManagedProcess
from tests.support.routers import REPO_ROOT, write_router_config
from tests.support.xmpp import Clients, run

pytestmark = pytest.mark.timeout(420)      # a build (~15 s), apt twice, one chat

PACKAGE = "jrouter"
DROP_IN = "/lib/systemd/system/jabberd-router.service.d/jrouter.conf"
# Where the package puts things (debian/README.Debian), and what each must be.
INSTALLED = {
    "/usr/sbin/jrouter": "executable",
    "/usr/bin/jrouter-status": "executable",
    "/usr/share/man/man8/jrouter.8.gz": "file",
    "/usr/share/man/man1/jrouter-status.1.gz": "file",
    DROP_IN: "file",
    "/usr/share/doc/jrouter/README.Debian": "file",
    "/etc/logrotate.d/jabberd-router": "file",
    "/usr/lib/python3/dist-packages/jrouter/ops/cli.py": "file",
}
# jabberd2's own files, which installing and purging jrouter must not touch.
JABBERD2_GLOBS = ["/lib/systemd/system/jabberd*.service", "/etc/init.d/jabberd2",
                  "/etc/default/jabberd2", "/etc/logrotate.d/jabberd2",
                  "/etc/jabberd2/*.xml", "/etc/jabberd2/component.d/*",
                  "/usr/sbin/jabberd2-*"]
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
             "PYTHONUNBUFFERED": "1"}
APT_ENV = dict(CLEAN_ENV, DEBIAN_FRONTEND="noninteractive")


def sh(*argv, timeout=60, check=True, env=None):
    """Run a command; return its CompletedProcess (stdout and stderr as text)."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL, env=env, cwd="/")
    if check and result.returncode != 0:
        raise AssertionError("%s exited %d\n--- stdout\n%s\n--- stderr\n%s" % (
            " ".join(argv), result.returncode, result.stdout[-4000:], result.stderr[-4000:]))
    return result


def installed(package):
    result = sh("dpkg-query", "-W", "-f=${Status}", package, check=False)
    return result.returncode == 0 and result.stdout.endswith(" installed")


def jabberd2_state():
    """What must be the same before and after: checksums, dpkg -V, diversions."""
    sums = {}
    for pattern in JABBERD2_GLOBS:
        for path in sorted(glob.glob(pattern)):
            sums[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return {"sha256": sums,
            "dpkg -V": sh("dpkg", "-V", "jabberd2", check=False).stdout,
            "diversions": sh("dpkg-divert", "--list").stdout}


def build(outdir):
    """scripts/build-deb (which fails on lintian errors); the .deb's path."""
    result = sh(str(REPO_ROOT / "scripts" / "build-deb"), str(outdir), timeout=240,
                env=dict(os.environ))
    deb = Path(result.stdout.strip().splitlines()[-1])
    arch = sh("dpkg", "--print-architecture").stdout.strip()
    assert deb.name.startswith("jrouter_") and deb.name.endswith("_%s.deb" % arch), result.stdout
    assert deb.is_file(), deb
    return deb


def check_files():
    for path, kind in INSTALLED.items():
        assert os.path.isfile(path), path
        if kind == "executable":
            assert os.access(path, os.X_OK), path
    owned = sh("dpkg", "-L", PACKAGE).stdout.split()
    assert [p for p in owned if p.startswith(("/etc/", "/usr/local/"))
            and not os.path.isdir(p)] == ["/etc/logrotate.d/jabberd-router"], owned
    # logrotate reads both files without a duplicate-entry error; router.log is ours.
    rotate = sh("logrotate", "--debug", "--state", "/dev/null", "/etc/logrotate.d/jabberd-router",
                "/etc/logrotate.d/jabberd2", check=False)
    assert rotate.returncode == 0 and "error" not in rotate.stderr.lower(), rotate.stderr
    ours = rotate.stderr.split("rotating pattern: /var/log/jabberd2/*.log")[0]
    assert "rotating pattern: /var/log/jabberd2/router.log" in ours, rotate.stderr
    drop_in = Path(DROP_IN).read_text()
    assert "ExecStart=\nExecStart=/usr/sbin/jrouter -c /etc/jabberd2/router.xml\n" in drop_in
    where = sh("python3", "-c", "import jrouter; print(jrouter.__file__)", env=CLEAN_ENV)
    assert where.stdout.strip() == "/usr/lib/python3/dist-packages/jrouter/__init__.py"
    # The packet path is compiled (setup.py's COMPILED); the rest stays Python.
    files = sh("python3", "-c", "import jrouter.wire.xmlstream as x, jrouter.ops.cli as c; "
               "print(x.__file__); print(c.__file__)", env=CLEAN_ENV).stdout.split()
    assert files[0].startswith(
        "/usr/lib/python3/dist-packages/jrouter/wire/xmlstream.cpython-3") and files[0].endswith(".so")
    assert files[1] == "/usr/lib/python3/dist-packages/jrouter/ops/cli.py", files
    # The command line with Debian's docopt 0.6.2: jabberd2's exit codes.
    version = sh("/usr/sbin/jrouter", "--version", env=CLEAN_ENV)
    assert version.stdout.startswith("jrouter "), version.stdout
    assert sh("/usr/sbin/jrouter", "-h", env=CLEAN_ENV, check=False).returncode == 1
    assert sh("/usr/sbin/jrouter", "-V", env=CLEAN_ENV, check=False).returncode == 1
    assert sh("/usr/sbin/jrouter", "-c", "/nonexistent.xml", env=CLEAN_ENV,
              check=False).returncode == 2
    # systemd's own reading of jabberd2's unit plus the drop-in (no systemd needs to run).
    # It checks that ExecStart's program and the Documentation= man page exist.
    verify = sh("systemd-analyze", "verify", "jabberd-router.service", check=False)
    assert verify.returncode == 0 and "jrouter" not in verify.stderr, verify.stderr


def start_router(directory, status_port):
    files = write_router_config(
        directory, free_port(),
        extra="<status><ip>127.0.0.1</ip><port>%d</port></status>" % status_port)
    router = ManagedProcess("router", ["/usr/sbin/jrouter", "-c", str(files.config)],
                            directory, cwd="/", env=CLEAN_ENV, log_path=files.log)
    router.spawn()
    router.wait_for(lambda: is_listening(files.port, router.pid), 20.0,
                    "listening on port %d" % files.port)
    return router, files


async def chat(stack):
    """alice and bob register, log in and exchange one message each way."""
    users = {"alice": "alice-pw", "bob": "bob-pw"}
    async with Clients(stack.c2s_ip, stack.c2s_port) as clients:
        for user, password in users.items():
            await clients.register("%s@%s" % (user, stack.domain), password)
        alice, bob = [await clients.login("%s@%s/pkg" % (u, stack.domain), p)
                      for u, p in users.items()]
        for client in (alice, bob):
            client.send_presence()
        for sender, receiver in ((alice, bob), (bob, alice)):
            body = "from %s through the packaged jrouter" % sender.boundjid.user
            sender.send_message(mto=receiver.boundjid, mbody=body, mtype="chat")
            got = await receiver.wait_for("message", lambda m: m["body"] == body)
            assert str(got["from"]) == str(sender.boundjid)


def run_stack(workdir):
    """The installed jrouter under Debian's sm and c2s, with two users chatting."""
    status_port = free_port()
    router, files = start_router(workdir / "router", status_port)
    stack = Jabberd2Stack(workdir / "jabberd2", RouterAddress.of(files))
    try:
        stack.start()
        run(chat(stack))
        status = sh("/usr/bin/jrouter-status", "--json", "--url",
                    "http://127.0.0.1:%d" % status_port, env=CLEAN_ENV)
        names = {entry["name"] for entry in json.loads(status.stdout)["names"]}
        assert {"sm", "c2s", stack.domain} <= names, names
        assert "/usr/sbin/jrouter" in Path("/proc/%d/cmdline" % router.pid).read_text()
    except BaseException as exc:
        raise AssertionError("%s\n%s\n%s" % (exc, router.describe(), stack.describe())) from exc
    finally:
        stack.stop()
        code = router.stop(timeout=10)
    assert code == 0, router.describe()


def test_package_builds_installs_routes_real_jabberd2_and_purges_cleanly():
    """The .deb builds lint-free, installs its files, /usr/sbin/jrouter carries a chat
    between jabberd2's sm and c2s, and a purge leaves no trace and jabberd2 untouched."""
    if os.geteuid() != 0:
        pytest.fail("this test installs the package with apt: run it as root (CI does)")
    assert not installed(PACKAGE), "jrouter is already installed; this test would purge it"
    before = jabberd2_state()
    drop_in_dir_existed = os.path.isdir(os.path.dirname(DROP_IN))
    with tempfile.TemporaryDirectory(prefix="jrouter-package-") as tmp:
        tmp = Path(tmp)
        deb = build(tmp / "out")
        try:
            sh("apt-get", "install", "-y", "--no-install-recommends", str(deb),
               timeout=180, env=APT_ENV)
            assert installed(PACKAGE)
            check_files()
            run_stack(tmp)
        finally:
            sh("apt-get", "purge", "-y", PACKAGE, timeout=180, env=APT_ENV)
    assert not installed(PACKAGE)
    assert sh("dpkg-query", "-W", PACKAGE, check=False).returncode != 0   # not even config-files
    for path in INSTALLED:
        assert not os.path.exists(path), path
    assert os.path.isdir(os.path.dirname(DROP_IN)) == drop_in_dir_existed
    assert jabberd2_state() == before
