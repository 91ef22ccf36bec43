"""Hostile and stuck peers in the in-memory router (issue 10): bounded
queues, disconnects that cost no more than a slice, memory that is given back."""

import pytest

from jrouter.routing.policy import ClusterPolicy, PolicyTable

from .harness import NS_ACCEPT, Network, header

# Every test here once with each framer (tests/unit/conftest.py).
pytestmark = pytest.mark.usefixtures("framer")

STREAMS = "http://etherx.jabber.org/streams"


def message_route(i, to="slow.example.com", size=200):
    return (f"<route to='{to}' from='c2s'><message xmlns='jabber:client' to='u{i}@{to}' "
            f"from='x@c2s' id='m{i}'><body>{'x' * size}</body></message></route>")


def bounces(peer):
    return [s for s in peer.stanzas() if s.tag.endswith("}route") and s.get("error")]


def test_a_peer_that_stops_reading_is_cut_off_and_its_queue_bounces_to_the_senders():
    """Past <io><limits><queue> bytes a peer is ended with resource-constraint, and
    every packet queued for it goes back to its sender with error 503."""
    net = Network(queue_limit=20000)
    slow = net.component("slow.example.com")
    c2s = net.component("c2s")
    slow.take()
    sent = 0
    while not slow.connection.closing and sent < 1000:
        c2s.send(message_route(sent))
        sent += 1
    assert slow.connection.closing and sent < 1000
    assert b"<resource-constraint" in slow.raw()
    assert net.logged("is not reading: more than 20000 bytes queued")
    got = bounces(c2s)
    assert len(got) == sent and {b.get("error") for b in got} == {"503"}
    assert [b[0].get("id") for b in got] == [f"m{i}" for i in range(sent)]
    assert net.logged(f"had {sent} queued packets: 0 routed again, {sent} bounced, 0 lost")


def test_a_stuck_cluster_member_fails_over_what_was_queued_for_it():
    """A member of a clustered name that stops reading: its queue goes to the other member."""
    net = Network(queue_limit=20000,
                  clustering=PolicyTable([ClusterPolicy(match="sm", algorithm="consistent")]))
    members = []
    for instance in ("sm0", "sm1"):
        peer = net.component(instance)
        peer.bind("sm", multi="to")
        peer.take()
        members.append(peer)
    c2s = net.component("c2s")
    received = []
    for i in range(400):
        c2s.send(message_route(i, to="sm"))
        if not members[1].connection.closing:
            received += [s[0].get("id") for s in members[1].stanzas() if s.tag.endswith("}route")]
        if members[0].connection.closing:
            break
    assert members[0].connection.closing, "sm0 never read and should have been cut off"
    received += [s[0].get("id") for s in members[1].stanzas() if s.tag.endswith("}route")]
    assert bounces(c2s) == []
    assert sorted(received, key=lambda m: int(m[1:])) == [f"m{j}" for j in range(i + 1)]


def test_disconnecting_a_big_backlog_costs_one_slice_and_logs_one_line():
    """A dead peer's 5,000 queued packets are routed again in slices the shell asks
    for, other traffic flows in between, and the log says it in one line."""
    net = Network(queue_limit=0)
    slow = net.component("slow.example.com")
    c2s = net.component("c2s")
    a, b = net.component("a.example.com"), net.component("b.example.com")
    for peer in (slow, a, b):
        peer.take()
    for i in range(5000):
        c2s.connection.receive(message_route(i, size=10).encode(), 0.0)
    router = net.router
    router.disconnect(slow.connection, 1.0)
    assert router.redelivery.pending
    a.connection.receive(b"<route to='b.example.com' from='a.example.com'><message id='ping'/></route>", 1.0)
    routed = [s for s in b.stanzas() if s.tag.endswith("}route")]
    assert [r[0].get("id") for r in routed] == ["ping"]        # not stuck behind the backlog
    slices = 0
    while router.redeliver(1.0, budget=256):
        slices += 1
    assert slices == 5000 // 256
    assert len(bounces(c2s)) == 5000
    assert len(net.logged("queued packets")) == 1


def test_unauthenticated_stream_headers_leave_nothing_behind():
    """Stream headers with namespaces of their own, from peers that never
    authenticate, add nothing to the router's namespace keys."""
    net = Network()
    before = len(net.router._context_keys)
    for i in range(200):
        peer = net.peer()
        peer.send(f"<?xml version='1.0'?><stream:stream xmlns:stream='{STREAMS}' "
                  f"xmlns='urn:x:{i}' xmlns:p{i}='urn:p:{i}' version='1.0'>")
        peer.hang_up()
    net.peer().send(header(NS_ACCEPT, version=False, to="legacy.example.com"))
    assert len(net.router._context_keys) == before


def test_queued_bytes_are_counted_in_and_out():
    """The outbox counts what it holds: queued, throttled, taken by the shell."""
    net = Network()
    sm = net.component("sm")
    c2s = net.component("c2s")
    sm.take()
    outbox = sm.connection.outbox
    assert outbox.size == 0
    sm.send("<throttle/>")
    sm.take()
    c2s.send(message_route(1, to="sm", size=50))
    held = outbox.size
    assert held > 0 and outbox.queued_bytes() == 0
    sm.send("<throttle/>")            # unthrottled: the held packet joins the queue
    assert outbox.size == outbox.queued_bytes() > held
    sm.raw()
    assert outbox.size == 0


def test_packets_handed_to_the_shell_but_not_written_are_routed_again():
    """Routes the shell took but had not finished writing when its peer went away
    go back to their sender; the ones it wrote are not sent twice."""
    net = Network()
    slow = net.component("slow.example.com")
    c2s = net.component("c2s")
    slow.take()
    for i in range(3):
        c2s.connection.receive(message_route(i, size=10).encode(), 0.0)
    data = slow.connection.data_to_send()
    first_end = data.index(b"</route>") + len(b"</route>")
    slow.connection.outbox.sent(first_end + 5)        # m0 written, m1 cut mid-way
    slow.hang_up()
    assert [b[0].get("id") for b in bounces(c2s)] == ["m1", "m2"]
