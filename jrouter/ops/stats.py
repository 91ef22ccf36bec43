"""The operator's view of a running router: totals, connections, names, placement.

Owns: ``snapshot()`` (the whole router as plain JSON-ready data: totals,
connections, bound names) and ``which_instance()`` ("which member of this
clustered name serves that JID").

Must not know: HTTP, Prometheus, sockets, gevent or the clock. ``now`` is
handed in, and must come from the clock that stamped ``connected_at`` and
``last_activity`` (the shell's ``time.monotonic``). Everything here reads the
router and never changes it, so it may run at any time between two packets.

Theory of operation
-------------------
The core owns the figures (``wire/counters.py``); this module only adds them
up when somebody asks. Connections are read with ``getattr(conn, 'counters', None)``, so a connection the core has
not equipped yet shows zeros instead of breaking the status page.

Per-connection figures vanish when a connection closes. So that router-wide
totals never go backwards (Prometheus counters must not), the core folds a
closing connection's figures into ``router.closed_counters`` (``counters.fold``);
the totals are that plus every live connection.

A name's figures are the sums of its current members' figures. A connection
bound to two names counts in both, and a name that loses a member loses that
member's share: a name has no traffic of its own, only its members do.
"""

from __future__ import annotations

from typing import Any, Optional

from jrouter.wire.connection import XEP0114
from jrouter.wire.counters import FIELDS, Counters, fold
from jrouter.wire.jid import parse_jid

# ---------------------------------------------------------------------------
# The snapshot.


def snapshot(router: Any, now: float) -> dict[str, Any]:
    """Everything an operator may want to see, as JSON-ready data.

    ``router`` needs ``connections`` (iterable of connections) and ``table``
    (``routing.RouteTable``); ``started_at`` and ``closed_counters`` are used
    when present.
    """
    connections = [_connection(conn, now) for conn in router.connections]
    table = router.table
    affinities = getattr(getattr(router, "placement", None), "affinities", {})
    names = [_name(route, table, affinities.get(route.name)) for route in table.routes.values()]
    totals = fold(Counters(), getattr(router, "closed_counters", None)).as_dict()
    for conn in connections:
        for f in FIELDS:
            totals[f] += conn["counters"][f]
    started = getattr(router, "started_at", None)
    cluster = getattr(router, "cluster", None)
    return {
        "uptime": _seconds(now, started),
        "totals": totals,
        "connection_count": len(connections),
        "name_count": len(names),
        "default_route": table.default_name,
        "connections": connections,
        "names": names,
        # One node of several (<cluster>): the node set, the table's revision, the links.
        "cluster": cluster.status() if cluster is not None else None,
    }


def _connection(conn: Any, now: float) -> dict[str, Any]:
    state = conn.state
    outbox = conn.outbox
    held = outbox.held
    counters = getattr(conn, "counters", None)
    return {
        "label": conn.label,
        "ip": conn.ip,
        "port": conn.port,
        "state": getattr(state, "name", str(state)),
        "user": conn.user,
        "legacy": conn.protocol == XEP0114,
        "names": list(conn.names),
        "counters": counters.as_dict() if counters is not None else Counters().as_dict(),
        "queued_bytes": outbox.queued_bytes(),
        "throttling": held is not None,
        "throttle_queue": len(held) if held is not None else 0,
        "connected_for": _seconds(now, getattr(conn, "connected_at", None)),
        "idle_for": _seconds(now, getattr(conn, "last_activity", None)),
    }


def _name(route: Any, table: Any, affinity: Any = None) -> dict[str, Any]:
    summed = Counters()
    for member in route.members:
        fold(summed, getattr(member, "counters", None))
    entry = {
        "name": route.name,
        "kind": route.kind,
        "members": [member.label for member in route.members],
        "default": table.default_name == route.name,
        "log_sink": route.name in table.log_sinks,
        "alias_of": getattr(route, "alias_of", None),
        "counters": summed.as_dict(),
        "affinity": None,
    }
    if affinity is not None:
        per_member = affinity.counts()
        entry["affinity"] = {
            "mode": affinity.mode, "entries": len(affinity), "idle_seconds": affinity.idle,
            "per_member": {member.label: per_member.get(member, 0) for member in route.members},
            "placed": affinity.placed_by_affinity, "moves": affinity.moves,
            "dropped_left": affinity.dropped_left, "dropped_idle": affinity.dropped_idle}
    return entry


def _seconds(now: float, since: Optional[float]) -> Optional[float]:
    # 0.0 is the core's "the shell has not stamped it" (unit tests, or a
    # connection accepted a moment ago), never a real reading of the clock.
    if not isinstance(since, (int, float)) or isinstance(since, bool) or not since:
        return None
    return round(max(0.0, now - since), 3)


# ---------------------------------------------------------------------------
# Placement.


def which_instance(router: Any, name: str, jid: str) -> dict[str, Any]:
    """Which member of ``name`` a packet for ``jid`` goes to.

    Asks ``router.member_for(name, jid)`` (the core's own choice, so the
    answer cannot drift from what routing does) and describes the answer.
    ``member`` is None when nobody serves the name, or when the choice is
    not fixed (jabberd2 picks a random member for a JID without a node).
    """
    answer: dict[str, Any] = {"name": name, "jid": jid, "member": None, "index": None,
                              "kind": None, "members": []}
    parsed_name = parse_jid(name) if name else None
    if parsed_name is None:
        answer["error"] = f"{name!r} is not a valid name"
        return answer
    parsed_jid = parse_jid(jid) if jid else None
    if parsed_jid is None:
        answer["error"] = f"{jid!r} is not a valid JID"
        return answer
    answer["name"] = parsed_name.domain
    answer["jid"] = parsed_jid.full
    route = router.table.routes.get(parsed_name.domain)
    if route is not None:
        answer["kind"] = route.kind
        answer["members"] = [member.label for member in route.members]
    explain = getattr(router, "explain_placement", None)
    member_for = getattr(router, "member_for", None)
    if explain is not None:
        target, answer["reason"] = explain(parsed_name.domain, parsed_jid.full)
    elif member_for is not None:
        target = member_for(parsed_name.domain, parsed_jid.full)
    else:
        answer["error"] = "this router cannot tell placement"
        return answer
    if target is not None:
        answer["member"] = target.label
        if route is not None and target in route.members:
            answer["index"] = route.members.index(target)
        elif route is None:
            answer["default_route"] = router.table.default_name
    elif route is None:
        answer["error"] = f"nobody serves {parsed_name.domain}"
    else:
        answer["note"] = "no fixed member: each packet goes to a random one"
    return answer
