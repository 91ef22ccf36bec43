"""Limits before authentication on a real jrouter process (protocol §3.10).

jabberd2's router has none of these limits, so these tests run against
jrouter only. Every loop is bounded and every socket is loopback.
"""

import selectors
import socket
import time

from jrouter.testing.component_client import AuthFailed
from tests.support.peer import Peer

BLOCK_LINE = ("[127.0.0.1] too many failed authentications (10 in 60 s), "
              "refusing connections for 300 s")


def read_until_closed(sockets, seconds):
    """What each socket received until the router closed it, for those it
    closed within ``seconds`` (the others stay out of the result)."""
    received = {sock: b"" for sock in sockets}
    closed = {}
    with selectors.DefaultSelector() as selector:
        for sock in sockets:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + seconds
        while len(closed) < len(sockets) and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=max(0.01, deadline - time.monotonic())):
                try:
                    data = key.fileobj.recv(65536)
                except ConnectionResetError:
                    data = b""
                if data:
                    received[key.fileobj] += data
                else:
                    closed[key.fileobj] = received[key.fileobj]
                    selector.unregister(key.fileobj)
    return closed


def refused_without_a_byte(router):
    """A new connection is closed at once, before the router says anything."""
    with socket.create_connection((router.ip, router.port), timeout=5) as sock:
        try:
            return sock.recv(1) == b""
        except ConnectionResetError:
            return True


def test_silent_connections_cannot_lock_out_a_component(router_factory):
    """48 silent sockets against max_fds 32 and a cap of 8: a component still authenticates and binds."""
    router = router_factory("jrouter", extra=(
        "<io><max_fds>32</max_fds>"
        "<limits><unauthenticated>8</unauthenticated></limits></io>"))
    silent = [socket.create_connection((router.ip, router.port), timeout=5) for _ in range(48)]
    try:
        sm = Peer(router.ip, router.port).authenticate().bind("sm")
        c2s = Peer(router.ip, router.port).authenticate().bind("c2s")
        sm.drain()
        c2s.send("<route to='sm' from='c2s'><message id='through'/></route>")
        assert sm.route()[0].get("id") == "through"
        closed = read_until_closed(silent, 3.0)
        assert len(closed) >= 48 - 8
        assert all(b"resource-constraint" in data for data in closed.values())
        assert "closed to make room: 8 unauthenticated connections already" in router.log_text
        sm.close(), c2s.close()
    finally:
        for sock in silent:
            sock.close()


def test_a_silent_connection_is_closed_after_authtimeout(router_factory):
    """With <authtimeout>1</authtimeout> a socket that says nothing gets connection-timeout."""
    router = router_factory("jrouter", extra="<io><limits><authtimeout>1</authtimeout></limits></io>")
    sock = socket.create_connection((router.ip, router.port), timeout=5)
    try:
        closed = read_until_closed([sock], 5.0)
        assert b"connection-timeout" in closed[sock]
        assert "not authenticated within 1 s, closing" in router.wait_for_log("not authenticated")
    finally:
        sock.close()


def fail_until_closed(peer, most=5):
    """Wrong passwords until the router ends the stream (at most ``most``):
    how many <failure/>s came, and the condition of the stream error."""
    peer._open()
    for failed in range(1, most + 1):
        peer.client.authenticate("jabberd", "wrong")
        peer._flush()
        peer._outcome(AuthFailed)
        peer.drain(0.3)             # a stream error follows the failure that ends the stream
        if peer.client.stream_error is not None:
            return failed, peer.client.stream_error[0]
    return most, None


def test_a_wrong_password_loop_is_cut_off_and_the_address_refused(router_factory):
    """3 failures end a connection, the 10th blocks 127.0.0.1 with one log line; a component already online stays."""
    router = router_factory("jrouter")
    sm = Peer(router.ip, router.port).authenticate().bind("sm")
    tries = [fail_until_closed(Peer(router.ip, router.port)) for _ in range(4)]
    assert tries == [(3, "policy-violation")] * 3 + [(1, "policy-violation")]
    log = router.wait_for_log(BLOCK_LINE)
    assert log.count(BLOCK_LINE) == 1
    assert log.count("too many failed authentications on one connection (3), closing") == 3
    assert refused_without_a_byte(router)
    assert "] [127.0.0.1] refused: too many failed authentications" in router.wait_for_log(
        "refused: too many")
    assert sm.quiet(0.3) and not sm.eof
    sm.close()
