"""Placement that survives a router restart (protocol §6.10), on real jrouter
processes: three instances hold slots 0, 1, 2; the router is stopped and
started again on the same <clustering state-dir>; they reconnect in the
reverse order and get the same slots. Without the state file, a restarted
router hands slots out in reconnection order. Loopback only."""

import json
import re

from tests.support.peer import Peer

ONLINE = re.compile(r"\[example\.com\]:\d+ online \(bound to [^,]+, port (\d+), slot (\d+)\)")


def clustering(state_dir):
    where = f" state-dir='{state_dir}'" if state_dir else ""
    return (f"<clustering{where}><policy name='example.com' algorithm='slots' slots='3'/>"
            "</clustering>")


def connect(router, order):
    """Each instance authenticates, binds its id, then the domain; instance -> slot."""
    peers, by_port = {}, {}
    for instance in order:
        peer = Peer(router.ip, router.port).authenticate().bind(instance)
        peer.bind("example.com", extra=" multi='to'")
        peers[instance] = peer
        by_port[str(peer.sock.getsockname()[1])] = instance
    router.wait_for(lambda: len(ONLINE.findall(router.log_text)) >= len(order), 10, "online lines")
    slots = {by_port[port]: int(slot) for port, slot in ONLINE.findall(router.log_text)
             if port in by_port}
    return peers, slots


def restart_and_reverse(router_factory, state_dir):
    first = router_factory("jrouter", extra=clustering(state_dir))
    peers, before = connect(first, ["sm0", "sm1", "sm2"])
    for peer in peers.values():
        peer.close()
    assert first.stop() == 0
    second = router_factory("jrouter", port=first.port, extra=clustering(state_dir))
    peers, after = connect(second, ["sm2", "sm1", "sm0"])
    for peer in peers.values():
        peer.close()
    return before, after, second


def test_slots_kept_over_a_restart_in_any_reconnection_order(router_factory, tmp_path):
    state_dir = tmp_path / "state"
    before, after, _router = restart_and_reverse(router_factory, state_dir)
    assert before == {"sm0": 0, "sm1": 1, "sm2": 2}
    assert after == before
    saved = json.loads((state_dir / "placement.json").read_text())
    assert saved == {"version": 1, "slots": {"example.com": {"sm0": 0, "sm1": 1, "sm2": 2}}}


def test_without_a_state_dir_a_restart_hands_slots_out_in_connection_order(router_factory):
    before, after, _router = restart_and_reverse(router_factory, None)
    assert before == {"sm0": 0, "sm1": 1, "sm2": 2}
    assert after == {"sm2": 0, "sm1": 1, "sm0": 2}


def test_a_corrupt_state_file_is_one_line_and_a_fresh_start(router_factory, tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "placement.json").write_text("{half a file")
    router = router_factory("jrouter", extra=clustering(state_dir))
    assert "unreadable" in router.wait_for_log("placement state")
    peers, slots = connect(router, ["sm1", "sm0"])
    assert slots == {"sm1": 0, "sm0": 1}
    for peer in peers.values():
        peer.close()
