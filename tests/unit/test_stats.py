"""jrouter.ops.stats: counters, the router snapshot and "which member serves this JID"."""

import json
from types import SimpleNamespace

import pytest

from jrouter.wire.connection import JABBERD2, XEP0114, State
from jrouter.wire.outbox import Outbox
from jrouter.routing.table import MULTI_FROM, MULTI_TO, SINGLE, RouteTable
from jrouter.wire.counters import FIELDS, Counters, fold
from jrouter.ops.stats import snapshot, which_instance

from .harness import Network


class FakeConnection(SimpleNamespace):
    """Hashable by identity, as component.Connection is."""

    __hash__ = object.__hash__
    __eq__ = object.__eq__


def conn(port, *names, user="jabberd", state=State.ONLINE, legacy=False, counters=True, **extra):
    """A stand-in for component.Connection with the attributes stats reads."""
    c = FakeConnection(ip="127.0.0.1", port=port, label=f"[127.0.0.1, port={port}]", state=state,
                        user=user, protocol=XEP0114 if legacy else JABBERD2, legacy=legacy,
                        names=dict.fromkeys(names), outbox=Outbox(Counters()), last_activity=0.0,
                        **extra)
    if counters:
        c.counters = Counters()
    return c


class FakeRouter:
    """connections + table, like core.Router, and the placement hook."""

    def __init__(self, *connections, picks=None):
        self.connections = dict.fromkeys(connections)
        self.table = RouteTable()
        self.picks = picks or {}
        self.asked = []
        for c in connections:
            for name in c.names:
                self.table.add(name, c, MULTI_FROM if c.legacy else (MULTI_TO if name == "sm" else SINGLE))

    def member_for(self, name, jid):
        self.asked.append((name, jid))
        return self.picks.get((name, jid))


def test_counters_are_bare_slots():
    """Counters start at zero, are plain int attributes, and take nothing else."""
    c = Counters()
    assert c.as_dict() == dict.fromkeys(FIELDS, 0)
    c.packets_in += 1
    c.bytes_in += 10
    assert c.as_dict()["packets_in"] == 1 and c.bytes_in == 10
    with pytest.raises(AttributeError):
        c.packets = 1
    assert not hasattr(c, "__dict__")


def test_fold_adds_field_by_field():
    """fold() adds every field and ignores None."""
    a, b = Counters(), Counters()
    a.drops, b.drops, b.bytes_out = 2, 3, 7
    assert fold(a, b) is a
    assert (a.drops, a.bytes_out) == (5, 7)
    assert fold(a, None).drops == 5


def test_totals_sum_live_connections_and_closed_ones():
    """Router-wide totals are the closed connections' figures plus every live one."""
    a, b = conn(1, "a.test"), conn(2, "b.test")
    a.counters.packets_in, a.counters.bytes_in = 3, 300
    b.counters.packets_in, b.counters.bounces = 4, 1
    router = FakeRouter(a, b)
    router.closed_counters = Counters()
    router.closed_counters.packets_in = 10
    snap = snapshot(router, 100.0)
    assert snap["totals"]["packets_in"] == 17
    assert snap["totals"]["bytes_in"] == 300
    assert snap["totals"]["bounces"] == 1
    assert snap["connection_count"] == 2 and snap["name_count"] == 2


def test_connection_entry():
    """Each connection shows who it is, its counters, queue and age."""
    a = conn(5347, "sm", "example.com", connected_at=40.0)
    a.counters.packets_out = 9
    a.outbox.out[:] = [b"abc", b"de"]
    a.outbox.held = [b"x", b"y", b"z"]
    a.last_activity = 90.0
    (entry,) = snapshot(FakeRouter(a), 100.0)["connections"]
    assert entry == {
        "label": "[127.0.0.1, port=5347]", "ip": "127.0.0.1", "port": 5347, "state": "ONLINE",
        "user": "jabberd", "legacy": False, "names": ["sm", "example.com"],
        "counters": dict(dict.fromkeys(FIELDS, 0), packets_out=9),
        "queued_bytes": 5, "throttling": True, "throttle_queue": 3,
        "connected_for": 60.0, "idle_for": 10.0,
    }


def test_connection_without_counters_or_clock_shows_zeros():
    """Before the core attaches counters (or connected_at), the entry still works."""
    a = conn(1, counters=False, user=None, state=State.HEADER)
    b = conn(2, connected_at=0.0)               # the core's "not stamped yet"
    router = FakeRouter(a, b)
    router.started_at = 0.0
    snap = snapshot(router, 5.0)
    entry = snap["connections"][0]
    assert snap["uptime"] is None and snap["connections"][1]["connected_for"] is None
    assert entry["counters"] == dict.fromkeys(FIELDS, 0)
    assert entry["connected_for"] is None and entry["idle_for"] is None
    assert entry["state"] == "HEADER" and entry["names"] == []


def test_name_entries_sum_their_members():
    """A clustered name lists members in slot order and sums their counters."""
    a, b = conn(1, "sm"), conn(2, "sm", "log.test")
    a.counters.packets_in, b.counters.packets_in = 2, 5
    router = FakeRouter(a, b)
    router.table.default_name = "sm"
    router.table.log_sinks["log.test"] = b
    names = {n["name"]: n for n in snapshot(router, 0.0)["names"]}
    assert names["sm"]["members"] == [a.label, b.label]
    assert names["sm"]["kind"] == MULTI_TO
    assert names["sm"]["counters"]["packets_in"] == 7
    assert names["sm"]["default"] and not names["sm"]["log_sink"]
    assert names["log.test"]["log_sink"] and not names["log.test"]["default"]
    assert names["log.test"]["counters"]["packets_in"] == 5


def test_snapshot_is_json():
    """The snapshot survives json.dumps/loads unchanged."""
    a = conn(1, "a.test", connected_at=1.5)
    a.counters.bytes_out = 12
    snap = snapshot(FakeRouter(a), 2.0)
    assert json.loads(json.dumps(snap)) == snap


def test_snapshot_of_a_real_router():
    """snapshot() reads the real core.Router and its connections as they are today."""
    net = Network()
    net.component("sm.example.com")
    net.legacy("legacy.example.com")
    net.peer()                                  # connected, not authenticated
    snap = snapshot(net.router, 1.0)
    states = sorted(c["state"] for c in snap["connections"])
    assert states == ["HEADER", "LEGACY", "ONLINE"]
    names = {n["name"]: n for n in snap["names"]}
    assert names["legacy.example.com"]["kind"] == MULTI_FROM
    assert names["lalias.example.com"]["alias_of"] == "legacy.example.com"
    assert json.loads(json.dumps(snap)) == snap


def test_figures_follow_the_packets_sent():
    """With the core counting, the snapshot agrees with what the peers sent."""
    net = Network()
    a = net.component("a.example.com")
    b = net.component("b.example.com")
    before = snapshot(net.router, 0.0)
    packet = "<route to='b.example.com' from='a.example.com'><message/></route>"
    for _ in range(3):
        a.send(packet)
    a.send("<route to='nobody.example.com' from='a.example.com'><message/></route>")
    b.take()
    after = snapshot(net.router, 0.0)

    def figures(snap, label):
        return next(c["counters"] for c in snap["connections"] if c["label"] == label)

    sent = figures(after, a.connection.label)
    got = figures(after, b.connection.label)
    assert sent["packets_in"] - figures(before, a.connection.label)["packets_in"] == 4
    assert sent["bounces"] - figures(before, a.connection.label)["bounces"] == 1
    assert got["packets_out"] - figures(before, b.connection.label)["packets_out"] == 3


def test_which_instance_asks_the_router():
    """which_instance() reports the member the router's placement hook picks, with its slot."""
    a, b = conn(1, "sm"), conn(2, "sm")
    router = FakeRouter(a, b, picks={("sm", "user@example.com/Res"): b})
    answer = which_instance(router, "SM", "User@Example.com/Res")
    assert router.asked == [("sm", "user@example.com/Res")]
    assert answer["member"] == b.label and answer["index"] == 1
    assert answer["members"] == [a.label, b.label] and answer["kind"] == MULTI_TO
    assert "error" not in answer


def test_which_instance_without_a_fixed_member():
    """A bound name whose placement is not fixed says so instead of naming a member."""
    a, b = conn(1, "sm"), conn(2, "sm")
    answer = which_instance(FakeRouter(a, b), "sm", "example.com")
    assert answer["member"] is None and "random" in answer["note"]


def test_which_instance_unbound_and_invalid():
    """Unbound names, invalid input and a router without the hook give an error, not an exception."""
    router = FakeRouter(conn(1, "sm"))
    assert "nobody serves" in which_instance(router, "other", "u@other")["error"]
    assert "not a valid JID" in which_instance(router, "sm", "@bad")["error"]
    assert "not a valid name" in which_instance(router, "", "u@sm")["error"]
    hookless = SimpleNamespace(connections=router.connections, table=router.table)
    assert "cannot tell" in which_instance(hookless, "sm", "u@sm")["error"]


def test_which_instance_via_default_route():
    """A name served through the default route names the member and the default route."""
    d = conn(1, "default.test")
    router = FakeRouter(d, picks={("elsewhere.test", "u@elsewhere.test"): d})
    router.table.default_name = "default.test"
    answer = which_instance(router, "elsewhere.test", "u@elsewhere.test")
    assert answer["member"] == d.label and answer["default_route"] == "default.test"
