"""jrouter as a process: flags, exit codes, pidfile, log lines, signals.

Where jabberd2's router behaves the same, the test runs against both
routers (the ``router_kind`` fixture): that proves the test as well.
"""

import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.support.peer import Peer, header
from tests.support.ports import free_port
from tests.support.routers import REPO_ROOT, router_argv, write_router_config


def run_argv(argv, timeout=10):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
                          stdin=subprocess.DEVNULL)


def jrouter(*args):
    return [sys.executable, "-m", "jrouter", *args]


def test_help_prints_usage_on_stdout_and_exits_1():
    """-h prints the usage on stdout and exits 1, as jabberd2's router."""
    result = run_argv(jrouter("-h"))
    assert result.returncode == 1
    assert "Usage:" in result.stdout and "-c CONFIG" in result.stdout


def test_unknown_option_exits_1():
    """An unknown option is a usage error (exit 1)."""
    assert run_argv(jrouter("-V")).returncode == 1


def test_version_exits_0():
    """--version prints the version and exits 0."""
    result = run_argv(jrouter("--version"))
    assert result.returncode == 0 and result.stdout.startswith("jrouter ")


def test_usage_matches_the_man_page_synopsis():
    """The docopt usage lines and the rendered man page SYNOPSIS say the same thing."""
    from jrouter.ops.cli import USAGE

    rendered = run_argv(["man", "-l", str(REPO_ROOT / "man" / "jrouter.8")],).stdout
    synopsis = rendered[rendered.index("SYNOPSIS"):rendered.index("DESCRIPTION")]
    synopsis = " ".join(synopsis.split())
    usage_lines = [" ".join(line.split()) for line in USAGE.splitlines()[1:4]]
    assert usage_lines == ["jrouter [-D] [-c CONFIG] [-i ID]", "jrouter -h | --help",
                           "jrouter --version"]
    for line in usage_lines:
        assert line in synopsis, (line, synopsis)


@pytest.mark.parametrize("kind", ["jabberd2", "jrouter"])
def test_missing_config_exits_2(kind, tmp_path):
    """A config file that cannot be read ends the process with exit code 2."""
    result = run_argv(router_argv(kind, tmp_path / "nope.xml"))
    assert result.returncode == 2
    assert "couldn't" in result.stderr


def test_config_errors_name_file_line_and_element(tmp_path):
    """Every config problem is reported at once, with file, line and element."""
    config = tmp_path / "router.xml"
    config.write_text("<router>\n<local>\n<port>notaport</port>\n<ip>nowhere</ip>\n</local>\n</router>\n")
    result = run_argv(jrouter("-c", str(config)))
    assert result.returncode == 2
    assert f"{config}:3" in result.stderr and "local.port" in result.stderr
    assert f"{config}:4" in result.stderr and "local.ip" in result.stderr


def test_a_peer_cafile_that_cannot_be_loaded_exits_1_naming_it(tmp_path):
    """<cluster><peer><cafile> that is no PEM: jrouter logs which file and why, and exits 1 before
    it listens (no etcd is needed to find out)."""
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    cluster = ("<cluster><node>a</node><peer><ip>127.0.0.1</ip><port>%d</port>"
               "<secret>0123456789abcdef-secret</secret><cafile>%s</cafile></peer>"
               "<etcd><endpoint>http://127.0.0.1:%d</endpoint></etcd></cluster>"
               % (free_port(), bad, free_port()))
    files = write_router_config(tmp_path / "router", free_port(), extra=cluster)
    result = run_argv(jrouter("-c", str(files.config)), timeout=30)
    assert result.returncode == 1
    log = files.log.read_text()
    assert f"cluster.peer.cafile {bad}: cannot load CA certificates" in log, log


@pytest.mark.parametrize("kind", ["jabberd2", "jrouter"])
def test_empty_filter_file_exits_1(kind, tmp_path):
    """An empty router-filter.xml is fatal with exit code 1, as jabberd2."""
    files = write_router_config(tmp_path, free_port())
    files.filter_file.write_text("")
    result = run_argv(router_argv(kind, files.config))
    assert result.returncode == 1
    assert "empty filter file" in files.log.read_text()


@pytest.mark.parametrize("kind", ["jabberd2", "jrouter"])
def test_port_in_use_exits_1(kind, tmp_path):
    """A port that is taken: 'unable to listen' and exit code 1."""
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    files = write_router_config(tmp_path, blocker.getsockname()[1])
    try:
        result = run_argv(router_argv(kind, files.config))
    finally:
        blocker.close()
    assert result.returncode == 1
    assert "unable to listen" in files.log.read_text()


def test_startup_log_and_pidfile(router):
    """Startup writes jabberd2's log lines and a pidfile without a newline."""
    log = router.wait_for_log("listening for incoming connections")
    assert "starting up" in log and "loaded user table (1 users)" in log
    assert f"[127.0.0.1, port={router.port}] listening for incoming connections" in log
    assert router.files.pidfile.read_text() == str(router.pid)


def test_connect_authenticate_bind_and_disconnect_are_logged(router):
    """An operator's grep lines: connect, authenticated as, online, offline, disconnect."""
    peer = Peer(router.ip, router.port).authenticate().bind("sm")
    peer.send("</stream:stream>")
    peer.read_until_eof()
    peer.close()
    log = router.wait_for_log("disconnect")
    for line in ("] connect", "authenticated as jabberd@", "[sm] online (bound to 127.0.0.1, port",
                 "[sm] offline"):
        assert line in log


def test_sighup_reloads_users(router):
    """SIGHUP reopens the log and reloads the users file (a new user can log in)."""
    router.files.users_file.write_text(
        "<users><user><name>jabberd</name><secret>secret</secret></user>"
        "<user><name>newbie</name><secret>pw</secret></user></users>")
    router.send_signal(signal.SIGHUP)
    router.wait_for_log("loaded user table (2 users)")
    log = router.log_text
    order = ["reopening log ...", "log started", "reloading filter ...", "reloading users ...",
             "loaded user table (2 users)"]
    positions = [log.rindex(line) for line in order]
    assert positions == sorted(positions)
    Peer(router.ip, router.port).authenticate("newbie", "pw").close()


def test_sigterm_closes_streams_and_exits_0(router_factory):
    """SIGTERM: every peer gets </stream:stream> without having to speak first
    (jabberd2 waits for the peer, protocol §1.5), then the router exits 0."""
    router = router_factory("jrouter")
    peer = Peer(router.ip, router.port).authenticate().bind("sm")
    router.send_signal(signal.SIGTERM)
    events = peer.read_until_eof(timeout=10)
    peer.close()
    assert any(type(e).__name__ == "StreamClose" for e in events)
    assert router.stop(timeout=10) == 0


def test_malformed_user_entry_is_skipped_once(router_factory):
    """A user entry without a secret is skipped with one log line; others still work."""
    router = router_factory("jrouter", start=False,
                            users={"jabberd": "secret"})
    router.files.users_file.write_text(
        "<users><user><name>broken</name></user>"
        "<user><name>jabberd</name><secret>secret</secret></user></users>")
    router.start()
    log = router.wait_for_log("listening for incoming connections")
    assert log.count("malformed user entry") == 1
    Peer(router.ip, router.port).authenticate().close()


def test_oversize_stanza_ends_only_that_stream(router_factory):
    """A stanza over <stanzasize> gets policy-violation; other peers are untouched."""
    router = router_factory(
        "jrouter", extra="<io><limits><stanzasize>4096</stanzasize></limits></io>")
    sm = Peer(router.ip, router.port).authenticate().bind("sm")
    c2s = Peer(router.ip, router.port).authenticate().bind("c2s")
    big = Peer(router.ip, router.port).authenticate().bind("big")
    sm.drain(), c2s.drain()
    big.send("<route to='sm' from='big'><message><body>" + "x" * 8000 + "</body></message></route>")
    events = big.read_until_eof()
    errors = [e for e in events if getattr(e, "tag", "").endswith("}error")]
    assert errors and errors[0][0].tag.endswith("policy-violation")
    c2s.send("<route to='sm' from='c2s'><message id='after'/></route>")
    assert sm.route()[0].get("id") == "after"


def test_peer_vanishing_mid_stanza_disturbs_nobody(router):
    """A peer that dies halfway through a stanza is cleaned up; others keep routing."""
    sm = Peer(router.ip, router.port).authenticate().bind("sm")
    c2s = Peer(router.ip, router.port).authenticate().bind("c2s")
    dying = Peer(router.ip, router.port).authenticate().bind("dying")
    dying.send("<route to='sm' from='dying'><message><body>half")
    dying.close()
    sm.drain(0.5), c2s.drain()
    c2s.send("<route to='sm' from='c2s'><message id='ok'/></route>")
    assert sm.route()[0].get("id") == "ok"
    assert "[dying] offline" in router.wait_for_log("[dying] offline")


def test_usr2_and_usr1_toggle_debug_output(router_factory):
    """SIGUSR2 turns debug lines on, SIGUSR1 off; neither ends the process."""
    router = router_factory("jrouter")
    peer = Peer(router.ip, router.port).authenticate().bind("sm")
    router.send_signal(signal.SIGUSR2)
    router.wait_for_log("debug output on")
    peer.send("<route type='bogus' from='sm' to='sm'><message/></route>")
    router.wait_for_log("unknown route type 'bogus'")
    router.send_signal(signal.SIGUSR1)
    router.wait_for_log("debug output off")
    peer.send("<route type='second' from='sm' to='sm'><message/></route>")
    peer.send("<route to='sm' from='sm'><message id='echo'/></route>")
    assert peer.route()[0].get("id") == "echo"      # processed after the bogus one
    assert "unknown route type 'second'" not in router.log_text
    assert router.running()


def test_debug_flag_enables_debug_output(router_factory):
    """-D starts the router with debug lines on."""
    router = router_factory("jrouter", args=["-D"])
    peer = Peer(router.ip, router.port).authenticate().bind("sm")
    peer.send("<route type='bogus' from='sm' to='sm'><message/></route>")
    router.wait_for_log("unknown route type 'bogus'")


def test_debug_lines_go_to_the_log_debug_file(router_factory, tmp_path):
    """<log><debug>FILE</debug> receives the debug lines; the main log keeps the others."""
    debug_log = tmp_path / "debug.log"
    router = router_factory("jrouter", args=["-D"], debug_log=debug_log)
    peer = Peer(router.ip, router.port).authenticate().bind("sm")
    peer.send("<route type='bogus' from='sm' to='sm'><message/></route>")
    peer.send("<route to='sm' from='sm'><message id='echo'/></route>")
    assert peer.route()[0].get("id") == "echo"
    assert "unknown route type 'bogus'" in debug_log.read_text()
    assert "unknown route type 'bogus'" not in router.log_text
    assert "[sm] online" in router.log_text


def test_keepalive_sends_a_single_space_to_idle_peers(router_factory):
    """<check><keepalive> sends one space to a peer idle for longer than it."""
    router = router_factory("jrouter", extra="<check><interval>1</interval><keepalive>1</keepalive></check>")
    peer = Peer(router.ip, router.port)
    peer.send(header())
    peer.next(), peer.stanza()              # header and features
    peer.sock.settimeout(5)
    started = time.monotonic()
    assert peer.sock.recv(10) == b" "
    assert time.monotonic() - started >= 0.9
