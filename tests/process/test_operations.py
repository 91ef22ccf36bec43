"""Operator settings with a router process on loopback: access, limits,
filters, aliases and reload. Where jabberd2's router behaves the same, the
test runs against both (``router_kind``)."""

import signal
import socket
import time

import pytest

from tests.support.peer import Peer, header


def closed_without_a_byte(router, timeout=5):
    sock = socket.create_connection((router.ip, router.port), timeout=timeout)
    try:
        sock.sendall(header())
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True
    finally:
        sock.close()


def test_access_deny_closes_without_a_byte(router_factory, router_kind):
    """A denied address is disconnected before anything is written."""
    router = router_factory(router_kind, extra=(
        "<io><access><order>allow,deny</order><deny ip='127.0.0.1'/></access></io>"))
    assert closed_without_a_byte(router)
    assert "access denied by configuration" in router.wait_for_log("access denied")


def test_access_allow_list_lets_matching_peers_in(router_factory, router_kind):
    """With deny,allow and an allow rule for 127.0.0.0/8, loopback peers work."""
    router = router_factory(router_kind, extra=(
        "<io><access><order>deny,allow</order><allow ip='127.0.0.0' mask='8'/></access></io>"))
    Peer(router.ip, router.port).authenticate().bind("sm").close()


def test_connect_rate_limit_refuses_the_fourth_connect(router_factory, router_kind):
    """<connects seconds='10' throttle='5'>3</connects>: the 4th connect within 10 s is closed."""
    router = router_factory(router_kind, extra=(
        "<io><limits><connects seconds='10' throttle='5'>3</connects></limits></io>"))
    peers = [Peer(router.ip, router.port) for _ in range(3)]
    for peer in peers:
        peer.send(header())
        peer.next()
    assert closed_without_a_byte(router)
    assert "is being rate limited" in router.wait_for_log("is being rate limited")


def test_byte_rate_limit_delays_but_loses_nothing(router_factory, router_kind):
    """<bytes> slows a fast sender down (logged once) and everything still arrives."""
    router = router_factory(router_kind, extra=(
        "<io><limits><bytes seconds='1' throttle='1'>2000</bytes></limits></io>"))
    sm = Peer(router.ip, router.port).authenticate().bind("sm")
    fast = Peer(router.ip, router.port).authenticate().bind("fast")
    sm.drain()
    started = time.monotonic()
    body = "x" * 400
    for n in range(20):
        fast.send(f"<route to='sm' from='fast'><message id='{n}'><body>{body}</body></message></route>")
    ids = [sm.route(timeout=20)[0].get("id") for _ in range(20)]
    assert ids == [str(n) for n in range(20)]
    assert time.monotonic() - started > 1.5
    assert "is being byte rate limited" in router.log_text


def test_max_fds_refuses_connections_beyond_it(router_factory):
    """<io><max_fds> is enforced: the connection beyond it is closed at once, the others serve."""
    router = router_factory("jrouter", extra="<io><max_fds>2</max_fds></io>")
    first = Peer(router.ip, router.port).authenticate().bind("sm")
    second = Peer(router.ip, router.port).authenticate().bind("c2s")
    assert closed_without_a_byte(router)
    assert "io.max_fds" in router.wait_for_log("max_fds")
    first.drain()
    second.send("<route to='sm' from='c2s'><message id='fine'/></route>")
    assert first.route()[0].get("id") == "fine"


FILTER = """<filter>
  <rule error="not-allowed" from="*" to="blocked@example.com" what="message" log="yes"/>
  <rule from="*" to="god@example.com" redirect="admin@other.example.com"/>
  <rule from="user@evil.example.com" to="*" dump="{dump}"/>
</filter>
"""


@pytest.fixture
def filtered(router_factory, router_kind, tmp_path):
    dump = tmp_path / "dump.xml"
    router = router_factory(router_kind, filter_rules=FILTER.format(dump=dump))
    sm = Peer(router.ip, router.port).authenticate().bind("example.com")
    other = Peer(router.ip, router.port).authenticate().bind("other.example.com")
    c2s = Peer(router.ip, router.port).authenticate().bind("c2s")
    sm.drain(), other.drain(), c2s.drain()
    return router, sm, other, c2s, dump


def test_filter_deny_bounces_405_and_logs(filtered):
    """A deny rule bounces the route with error='405' and logs the match."""
    router, sm, other, c2s, dump = filtered
    c2s.send("<route to='example.com' from='c2s'><message to='blocked@example.com' "
             "from='u@c2s'><body>hi</body></message></route>")
    bounce = c2s.route()
    assert bounce.get("error") == "405" and bounce.get("to") == "example.com"
    assert "filter: deny packet from=u@c2s to=blocked@example.com" in router.wait_for_log("filter: deny")
    assert sm.quiet()


def test_filter_redirect_rewrites_only_the_route_to(filtered):
    """A redirect rule sends the route to the new address; the stanza is untouched."""
    router, sm, other, c2s, dump = filtered
    c2s.send("<route to='example.com' from='c2s'><message to='god@example.com' "
             "from='u@c2s'><body>hi</body></message></route>")
    got = other.route()
    assert got.get("to") == "admin@other.example.com"
    assert got[0].get("to") == "god@example.com"
    assert sm.quiet()


def test_filter_dump_appends_the_packet(filtered):
    """A dump rule appends the matched packet to its file, and the packet is delivered."""
    router, sm, other, c2s, dump = filtered
    c2s.send("<route to='example.com' from='c2s'><message to='x@example.com' "
             "from='user@evil.example.com/r'><body>evil</body></message></route>")
    assert sm.route()[0][0].text == "evil"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (dump.exists() and b"evil" in dump.read_bytes()):
        time.sleep(0.05)
    dumped = dump.read_bytes()
    assert dumped.startswith(b"<message") and dumped.endswith(b"</message>\n")


def test_alias_of_an_xep0114_component(router_factory, router_kind):
    """<alias name='A' target='T'/>: routes to A reach the XEP-0114 component bound as T."""
    router = router_factory(router_kind, aliases={"alias.example.com": "legacy.example.com"})
    sm = Peer(router.ip, router.port).authenticate().bind("example.com")
    legacy = Peer(router.ip, router.port).handshake("legacy.example.com")
    sm.drain()
    sm.send("<route to='alias.example.com' from='example.com'><message xmlns='jabber:client' "
            "to='bot@alias.example.com' from='u@example.com'><body>via alias</body></message></route>")
    message = legacy.stanza()
    assert message.get("to") == "bot@alias.example.com" and message[0].text == "via alias"


def test_sighup_with_a_broken_users_file_keeps_the_old_table(router_factory):
    """A users file broken before SIGHUP: the old users still log in (jabberd2 would lock everyone out)."""
    router = router_factory("jrouter")
    router.files.users_file.write_text("<users><user>")
    router.send_signal(signal.SIGHUP)
    assert "keeping the previous table" in router.wait_for_log("keeping the previous table")
    Peer(router.ip, router.port).authenticate().close()


def test_sighup_with_a_broken_filter_keeps_the_old_rules(router_factory, tmp_path):
    """A filter file broken before SIGHUP: the old rules stay in force."""
    router = router_factory("jrouter", filter_rules=FILTER.format(dump=tmp_path / "d.xml"))
    router.files.filter_file.write_text("<filter><rule")
    router.send_signal(signal.SIGHUP)
    router.wait_for_log("keeping the old rules")
    sm = Peer(router.ip, router.port).authenticate().bind("example.com")
    c2s = Peer(router.ip, router.port).authenticate().bind("c2s")
    sm.drain()
    c2s.send("<route to='example.com' from='c2s'><message to='blocked@example.com' from='u@c2s'/></route>")
    assert c2s.route().get("error") == "405"


def test_sighup_reloads_acls_from_router_xml(router_factory):
    """SIGHUP re-reads router.xml's ACLs: a user granted 'bind' may then bind other names."""
    router = router_factory("jrouter", users={"jabberd": "secret", "comp": "pw"})
    peer = Peer(router.ip, router.port).authenticate("comp", "pw")
    peer.send("<bind name='other'/>")
    assert peer.stanza().get("error") == "403"
    text = router.files.config.read_text()
    router.files.config.write_text(text.replace(
        "<aci>", "<aci><acl type='bind'><user>comp</user></acl>"))
    router.send_signal(signal.SIGHUP)
    router.wait_for_log("reloaded ACLs")
    peer.send("<bind name='other'/>")
    assert peer.stanza().get("error") is None


def test_sighup_with_a_broken_router_xml_keeps_everything(router_factory):
    """A router.xml broken before SIGHUP: errors logged with file and line, old settings kept."""
    router = router_factory("jrouter")
    router.files.config.write_text("<router><local><port>x</port></local></router>")
    router.send_signal(signal.SIGHUP)
    log = router.wait_for_log("keeping the old settings")
    assert f"{router.files.config}:1" in log
    Peer(router.ip, router.port).authenticate().bind("sm").close()


def test_message_log_lines(router_factory, router_kind, tmp_path):
    """<message_logging>: one line per routed message with a body, jabberd2's format, header first."""
    path = tmp_path / "messages.log"
    router = router_factory(router_kind, extra=(
        f"<message_logging><enabled/><file>{path}</file></message_logging>"))
    sm = Peer(router.ip, router.port).authenticate().bind("example.com")
    other = Peer(router.ip, router.port).authenticate().bind("other.example.com")
    sm.drain()
    other.send("<route to='example.com' from='other.example.com'><message xmlns='jabber:client' "
               "to='Bob@Example.com/r' from='alice@other.example.com/a'><body>one\ntwo</body>"
               "</message></route>")
    other.send("<route to='example.com' from='other.example.com'><message xmlns='jabber:client' "
               "to='bob@example.com' from='alice@other.example.com/a'/></route>")
    sm.route(), sm.route()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not path.exists():
        time.sleep(0.05)
    lines = path.read_bytes().split(b"\n")
    assert lines[0] == b"# This message log is created by the jabberd router."
    assert len([line for line in lines if line and not line.startswith(b"#")]) == 1
    stamp, sender, receiver, body = lines[3].split(b" ", 3)
    assert (sender, receiver, body) == (b"alice@other.example.com/a", b"bob@example.com/r",
                                       b"one\x01two")
    assert path.stat().st_mode & 0o777 == 0o600


def test_unreadable_users_file_at_start_serves_with_no_users(router_factory, router_kind):
    """A missing users file is logged; the router serves, and no component can log in."""
    router = router_factory(router_kind, start=False)
    router.files.users_file.unlink()
    router.start()
    assert "couldn't open user table file" in router.wait_for_log("couldn't open user table file")
    with pytest.raises(AssertionError, match="SASL failed"):
        Peer(router.ip, router.port).authenticate()


def test_a_flooding_peer_does_not_slow_the_others(router_factory):
    """While one peer is held back by <bytes>, another peer's packets still flow at once."""
    router = router_factory("jrouter", extra=(
        "<io><limits><bytes seconds='1' throttle='3'>2000</bytes></limits></io>"))
    sm = Peer(router.ip, router.port).authenticate().bind("sm")
    flood = Peer(router.ip, router.port).authenticate().bind("flood")
    calm = Peer(router.ip, router.port).authenticate().bind("calm")
    sm.drain()
    flood.send("".join(f"<route to='sm' from='flood'><message id='f{n}'><body>{'x' * 500}</body>"
                       f"</message></route>" for n in range(40)))
    router.wait_for_log("is being byte rate limited")
    started = time.monotonic()
    calm.send("<route to='sm' from='calm'><message id='calm'/></route>")
    while True:
        got = sm.route(timeout=5)
        if got[0].get("id") == "calm":
            break
    assert time.monotonic() - started < 1.0


def test_ipv6_access_rules(router_factory, router_kind):
    """On an IPv6 address, a deny rule for ::1 closes the connection without a byte."""
    router = router_factory(router_kind, ip="::1", extra=(
        "<io><access><order>allow,deny</order><deny ip='::1' mask='128'/></access></io>"))
    sock = socket.create_connection(("::1", router.port), timeout=5)
    try:
        sock.sendall(header())
        assert sock.recv(100) == b""
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    assert "access denied by configuration" in router.wait_for_log("access denied")


def test_sighup_applies_new_clustering_policies_to_new_names(router_factory):
    """SIGHUP re-reads <clustering>: a name bound afterwards gets the new policy."""
    router = router_factory("jrouter")
    text = router.files.config.read_text()
    router.files.config.write_text(text.replace(
        "</router>", "<clustering><policy name='gw.example.com' algorithm='slots' slots='2'/>"
        "</clustering></router>"))
    router.send_signal(signal.SIGHUP)
    router.wait_for_log("reloaded ACLs")
    Peer(router.ip, router.port).handshake("gw.example.com")
    assert "[gw.example.com]:1 online" in router.wait_for_log("slot 0")
