"""Placement's state over a restart (protocol §6.10): the slots instances
hold are saved atomically and handed back, whatever order they reconnect in;
a missing or bad file is a fresh start with one line, never a crash."""

import json
import os

from jrouter.ops.placement_state import FILE_NAME, PlacementState
from jrouter.routing.policy import ClusterPolicy, PolicyTable

from .harness import Network


def state(tmp_path):
    warnings = []
    return PlacementState(str(tmp_path), warnings.append), warnings


def test_round_trip_and_no_temporary_file_left(tmp_path):
    store, warnings = state(tmp_path)
    assert store.load() == {}                                   # first start
    assert store.save({"gw.example.com": {"copy2": 1, "copy1": 0}})
    assert store.load() == {"gw.example.com": {"copy1": 0, "copy2": 1}}
    assert os.listdir(tmp_path) == [FILE_NAME] and warnings == []


def test_bad_files_are_a_fresh_start_with_a_line(tmp_path):
    store, warnings = state(tmp_path)
    path = tmp_path / FILE_NAME
    for text in ("{not json", json.dumps({"version": 99, "slots": {}}),
                 json.dumps({"version": 1, "slots": {"a": {"x": -1}}}),
                 json.dumps({"version": 1, "slots": {"a": {"x": "0"}}}), json.dumps([1])):
        path.write_text(text)
        assert store.load() == {}
    assert len(warnings) == 5 and all("starting afresh" in w for w in warnings)


def test_an_unwritable_directory_is_a_line_not_a_crash(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = PlacementState(str(blocker / "sub"), [].append)
    warnings = []
    store.warn = warnings.append
    assert store.save({"a": {"x": 0}}) is False
    assert "cannot save placement state" in warnings[0]


def network():
    return Network(clustering=PolicyTable([ClusterPolicy(
        match="example.com", algorithm="slots", slots=3)]))


def join(net, instance):
    peer = net.component()
    peer.bind(instance)
    peer.bind("example.com", multi="to")
    peer.take()
    return peer


def slots(net):
    route = net.router.table.routes["example.com"]
    return {next(n for n in member.names if n.startswith("sm")): slot
            for slot, member in route.by_slot.items()}


def test_slots_come_back_in_any_reconnection_order(tmp_path):
    """sm0, sm1, sm2 connect in that order; the router restarts (a new
    router from the saved file); they reconnect sm2, sm1, sm0: same slots."""
    first = network()
    for instance in ("sm0", "sm1", "sm2"):
        join(first, instance)
    before = slots(first)
    assert before == {"sm0": 0, "sm1": 1, "sm2": 2}
    table = first.router.table
    assert table.remembered_changed
    store, _ = state(tmp_path)
    store.save(table.remembered)
    second = network()
    second.router.table.restore(store.load())
    for instance in ("sm2", "sm1", "sm0"):
        join(second, instance)
    assert slots(second) == before
    fresh = network()                      # without the file: connection order
    for instance in ("sm2", "sm1", "sm0"):
        join(fresh, instance)
    assert slots(fresh) == {"sm2": 0, "sm1": 1, "sm0": 2}


def test_slots_survive_the_route_going_away():
    """Every member leaves (the route goes, dead='failover') and they come
    back in another order: the table's memory keeps their slots."""
    net = network()
    peers = [join(net, instance) for instance in ("sm0", "sm1", "sm2")]
    for peer in peers:
        peer.hang_up()
    assert "example.com" not in net.router.table.routes
    for instance in ("sm2", "sm0", "sm1"):
        join(net, instance)
    assert slots(net) == {"sm0": 0, "sm1": 1, "sm2": 2}
