"""A peer that stops reading, with a router process on loopback (issue 10,
findings 1 and 2): it is cut off at its queue bound, everybody else keeps
being served, memory stays bounded, and every packet is accounted for.

jrouter only: jabberd2's C router queues for such a peer without bound (it
grew by 107 MiB per 100 MiB sent in the issue's measurement), so there is
no bound to test it against.
"""

import socket
import threading
import time

from tests.support.peer import Peer, PeerClosed

MESSAGES = 30000
BODY = "x" * 900


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def message(i):
    return (f"<route to='stuck' from='sender'><message xmlns='jabber:client' to='u@stuck' "
            f"from='s@sender' id='m{i}'><body>{BODY}</body></message></route>")


class Bounces(threading.Thread):
    """Reads the sender's stream: every bounce, by message id and error code."""

    def __init__(self, peer):
        super().__init__(daemon=True)
        self.peer = peer
        self.got = {}
        self.stop = False

    def run(self):
        while not self.stop:
            try:
                route = self.peer.route(timeout=0.2)
            except TimeoutError:
                continue
            except PeerClosed:
                return
            if route.get("error") and len(route):
                self.got[route[0].get("id")] = route.get("error")


def ping(a, b, i):
    """Seconds for one packet from a to b."""
    started = time.monotonic()
    a.send(f"<route to='b' from='a'><message id='p{i}'/></route>")
    while b.route(timeout=5)[0].get("id") != f"p{i}":
        pass
    return time.monotonic() - started


def delivered_to(stuck):
    """The message ids a cut-off peer finds in its socket once the router is done with it."""
    stuck.sock.settimeout(10)
    ids = set()
    try:
        while True:
            event = stuck.next(timeout=10)
            if getattr(event, "tag", "").endswith("}route") and len(event):
                ids.add(event[0].get("id"))
    except (PeerClosed, TimeoutError, socket.timeout):
        return ids


def test_a_peer_that_stops_reading_is_cut_off_and_nothing_is_lost(router_factory):
    """Up to 30 MB for a peer that never reads: past 1 MiB queued it gets a stream error,
    bystanders' pings stay prompt, RSS stays bounded, and every message either
    reached the peer's socket or went back to its sender, never both."""
    router = router_factory("jrouter", extra="<io><limits><queue>1048576</queue></limits></io>")
    stuck = Peer(router.ip, router.port).authenticate().bind("stuck")
    a = Peer(router.ip, router.port).authenticate().bind("a")
    b = Peer(router.ip, router.port).authenticate().bind("b")
    sender = Peer(router.ip, router.port).authenticate().bind("sender")
    for peer in (a, b, sender):
        peer.drain()
    baseline = rss_mib(router.pid)
    bounces = Bounces(sender)
    bounces.start()
    pings, peak, sent = [], baseline, 0
    # Up to 30 MB, stopping soon after the cut-off: the sender reads its
    # bounces on a thread, and must not fall behind by its own queue bound.
    while sent < MESSAGES and "is not reading" not in router.log_text:
        sender.send("".join(message(i) for i in range(sent, sent + 200)))
        if sent % 2000 == 0:
            pings.append(ping(a, b, sent))
            peak = max(peak, rss_mib(router.pid))
        sent += 200
        time.sleep(0.005)
    assert "is not reading" in router.wait_for_log("is not reading", timeout=20)
    reached = delivered_to(stuck)
    deadline = time.monotonic() + 30
    while len(reached) + len(bounces.got) < sent and time.monotonic() < deadline:
        time.sleep(0.1)
    bounces.stop = True
    bounced = set(bounces.got)
    assert not reached & bounced
    assert reached | bounced == {f"m{i}" for i in range(sent)}
    assert set(bounces.got.values()) <= {"503", "404"} and "503" in bounces.got.values()
    assert max(pings) < 1.0, pings
    assert peak - baseline < 64, (baseline, peak)
    assert "queued packets:" in router.wait_for_log("queued packets:")
