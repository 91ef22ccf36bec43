"""The status endpoint: the router's figures over read-only HTTP, for operators.

Owns: the WSGI application (``StatusApp``: ``/metrics`` in the
Prometheus text format, ``/status`` and ``/placement`` as JSON) and the gevent
server around it (``StatusServer``).

Must not know: how the router counts (``stats`` does that) or routes
(``/placement`` asks ``router.placement``). Nothing here changes the router.

jabberd2 has no such interface (protocol §7.2); it is ours, off unless router.xml
asks for it::

    <status><ip>127.0.0.1</ip><port>5380</port></status>

The endpoint has no authentication, so it listens on loopback only, unless
``<status public='yes'>`` says the operator means it.

Theory of operation
-------------------
Every request reads a fresh ``stats.snapshot()``: the router lives in the same
gevent hub and a snapshot never yields, so each answer is one consistent
picture taken between two packets. Requests run in a small pool of their own,
so a busy scraper can never take more than ``pool_size`` greenlets.

``prometheus_client`` and gevent's WSGI server are imported only when an
endpoint is served. The ``<status>`` section is read by config/sections.py.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional
from urllib.parse import parse_qs

from jrouter.ops import stats
from jrouter.config.sections import StatusSettings
from jrouter.errors import ListenError

if TYPE_CHECKING:
    from gevent.pywsgi import WSGIServer
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from jrouter.routing.router import Log, Router

#: Counter fields and the help text of their Prometheus metrics.
_COUNTER_HELP = {
    "packets_in": "Packets received from components",
    "packets_out": "Packets queued for components",
    "bytes_in": "Bytes read from components",
    "bytes_out": "Bytes written to components",
    "bounces": "Packets sent back to their sender with an error",
    "drops": "Packets dropped without an answer",
    "throttled": "Packets held back while the receiver throttled",
}


# ---------------------------------------------------------------------------
# Prometheus


class RouterCollector:
    """A prometheus_client collector that reads one snapshot per scrape."""

    def __init__(self, router: Router, clock: Callable[[], float]) -> None:
        self.router = router
        self.clock = clock

    def collect(self) -> Iterable[Metric]:
        return metric_families(stats.snapshot(self.router, self.clock()))


def metric_families(snap: dict[str, Any]) -> list[Metric]:
    """The Prometheus metric families of a ``stats.snapshot()``."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    families: list[Metric] = [GaugeMetricFamily("jrouter_up", "1 while the router answers", value=1)]
    if snap.get("uptime") is not None:
        families.append(GaugeMetricFamily("jrouter_uptime_seconds", "Seconds since the router started",
                                          value=snap["uptime"]))
    families.append(GaugeMetricFamily("jrouter_connections", "Open connections",
                                      value=snap["connection_count"]))
    families.append(GaugeMetricFamily("jrouter_names", "Bound names", value=snap["name_count"]))
    for field, text in _COUNTER_HELP.items():
        families.append(CounterMetricFamily(f"jrouter_{field}", f"{text} (all connections, "
                                            "closed ones included)", value=snap["totals"][field]))
    families.extend(_connection_families(snap["connections"]))
    families.extend(_name_families(snap["names"]))
    if snap.get("cluster"):
        families.extend(_cluster_families(snap["cluster"]))
    return families


def _cluster_families(cluster: dict[str, Any]) -> list[Metric]:
    """One node of several (<cluster>, issue 13): its place, the table, its links."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    families: list[Metric] = []
    info = GaugeMetricFamily("jrouter_node_info", "1: this router is node NODE of cluster CLUSTER, "
                             "in state STATE (joining, joined, fenced, stopped)",
                             labels=["cluster", "node", "state"])
    info.add_metric([cluster["cluster"], cluster["node"], cluster["state"]], 1)
    families.append(info)
    families.append(GaugeMetricFamily("jrouter_node_table_revision", "The etcd revision this "
                                      "node's copy of the table has reached", value=cluster["revision"]))
    families.append(GaugeMetricFamily("jrouter_node_peers", "Other nodes in the table",
                                      value=sum(1 for n in cluster["nodes"] if not n["self"])))
    families.append(GaugeMetricFamily("jrouter_node_remote_members", "Members bound on other "
                                      "nodes, in this node's table", value=cluster["remote_members"]))
    families.append(CounterMetricFamily("jrouter_node_forwarded_in", "Routes other nodes "
                                        "forwarded to this one", value=cluster["forwarded_in"]))
    families.append(CounterMetricFamily("jrouter_node_forward_drops", "Forwarded routes no member "
                                        "could take, or past <cluster><hops>", value=cluster["dropped"]))
    families.append(CounterMetricFamily("jrouter_node_not_resent", "Routes a lost link handed back "
                                        "that the node's next hello said it had read: not sent "
                                        "again", value=cluster.get("not_resent", 0)))
    held = GaugeMetricFamily("jrouter_node_held_packets", "Packets waiting for the link to a node",
                             labels=["peer"])
    for node, count in cluster["held_for_nodes"].items():
        held.add_metric([node], count)
    up = GaugeMetricFamily("jrouter_peer_link_up", "1 while the link to the node is open", labels=["peer"])
    link_counters = {field: CounterMetricFamily(f"jrouter_peer_link_{field}", f"{text} on the link "
                                                "to the node (this link's life)", labels=["peer"])
                     for field, text in (("packets_out", "Packets sent"), ("packets_in", "Packets received"),
                                         ("bytes_out", "Bytes sent"), ("bytes_in", "Bytes received"))}
    queued = GaugeMetricFamily("jrouter_peer_link_queued_bytes", "Bytes queued for the link",
                               labels=["peer"])
    for node in cluster["nodes"]:
        if node["self"]:
            continue
        up.add_metric([node["id"]], 1 if node["linked"] else 0)
        if "packets_out" in node:
            for field, family in link_counters.items():
                family.add_metric([node["id"]], node[field])
            queued.add_metric([node["id"]], node["queued_bytes"])
    return [*families, held, up, *link_counters.values(), queued]


def _connection_families(connections: list[dict[str, Any]]) -> list[Metric]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    info = GaugeMetricFamily("jrouter_connection_info", "One per connection: who it is",
                             labels=["connection", "ip", "port", "state", "user", "legacy"])
    counters = {field: CounterMetricFamily(f"jrouter_connection_{field}", f"{text}, per connection",
                                           labels=["connection"])
                for field, text in _COUNTER_HELP.items()}
    queued = GaugeMetricFamily("jrouter_connection_queued_bytes",
                               "Bytes queued for the connection's socket", labels=["connection"])
    held = GaugeMetricFamily("jrouter_connection_throttle_queue",
                             "Packets held back while the connection throttles", labels=["connection"])
    throttling = GaugeMetricFamily("jrouter_connection_throttling",
                                   "1 while the connection asked us to hold packets back",
                                   labels=["connection"])
    age = GaugeMetricFamily("jrouter_connection_connected_seconds",
                            "Seconds since the connection was accepted", labels=["connection"])
    for conn in connections:
        label = [conn["label"]]
        info.add_metric(label + [conn["ip"], str(conn["port"]), conn["state"], conn["user"] or "",
                                 "yes" if conn["legacy"] else "no"], 1)
        for field, family in counters.items():
            family.add_metric(label, conn["counters"][field])
        queued.add_metric(label, conn["queued_bytes"])
        held.add_metric(label, conn["throttle_queue"])
        throttling.add_metric(label, 1 if conn["throttling"] else 0)
        if conn["connected_for"] is not None:
            age.add_metric(label, conn["connected_for"])
    return [info, *counters.values(), queued, held, throttling, age]


def _name_families(names: list[dict[str, Any]]) -> list[Metric]:
    from prometheus_client.core import GaugeMetricFamily

    info = GaugeMetricFamily("jrouter_name_info", "One per bound name: its kind and role",
                             labels=["name", "kind", "default", "log_sink", "alias_of"])
    members = GaugeMetricFamily("jrouter_cluster_members", "Connections bound to the name",
                                labels=["name"])
    member = GaugeMetricFamily("jrouter_cluster_member", "One per member of a name, with its "
                               "slot (jabberd2 placement depends on it)",
                               labels=["name", "connection", "index"])
    # Gauges, not counters: a sum over the current members falls when one
    # leaves, which Prometheus would take for a counter reset.
    counters = {field: GaugeMetricFamily(f"jrouter_name_{field}", f"{text}, summed over the "
                                         "name's current members (falls when a member leaves)",
                                         labels=["name"])
                for field, text in _COUNTER_HELP.items()}
    affinity = GaugeMetricFamily("jrouter_affinity_entries", "Users the name's affinity table "
                                 "keeps on a member (policy affinity)", labels=["name", "connection"])
    affinity_events = {what: GaugeMetricFamily(f"jrouter_affinity_{what}", text, labels=["name"])
                       for what, text in (
                           ("placed", "Packets placed by affinity where the table had the user"),
                           ("moves", "Users whose session moved to another member"),
                           ("dropped_left", "Affinity entries dropped because their member left"),
                           ("dropped_idle", "Affinity entries dropped idle or to make room"))}
    for entry in names:
        name = [entry["name"]]
        if entry.get("affinity"):
            for label, count in entry["affinity"]["per_member"].items():
                affinity.add_metric(name + [label], count)
            for what, family in affinity_events.items():
                family.add_metric(name, entry["affinity"][what])
        info.add_metric(name + [entry["kind"], "yes" if entry["default"] else "no",
                                "yes" if entry["log_sink"] else "no", entry["alias_of"] or ""], 1)
        members.add_metric(name, len(entry["members"]))
        for index, label in enumerate(entry["members"]):
            member.add_metric(name + [label, str(index)], 1)
        for field, family in counters.items():
            family.add_metric(name, entry["counters"][field])
    return [info, members, member, *counters.values(), affinity, *affinity_events.values()]


# ---------------------------------------------------------------------------
# HTTP


class StatusApp:
    """The WSGI application: GET (or HEAD) /metrics, /status, /placement."""

    def __init__(self, router: Router, clock: Callable[[], float] = time.monotonic,
                 log: Optional[Log] = None) -> None:
        self.router = router
        self.clock = clock
        self.log = log
        self._registry: Optional[CollectorRegistry] = None
        self._routes = {"/metrics": self._metrics, "/status": self._status,
                        "/placement": self._placement}

    def __call__(self, environ: dict, start_response: Callable) -> list[bytes]:
        handler = self._routes.get(environ.get("PATH_INFO", ""))
        if handler is None:
            return _reply(start_response, "404 Not Found", _json({"error": "not found"}))
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _reply(start_response, "405 Method Not Allowed",
                          _json({"error": "read-only: GET or HEAD"}), allow="GET, HEAD")
        try:
            return handler(environ, start_response)
        except Exception as exc:        # a bug here must not take the router down
            if self.log is not None:
                self.log.error(f"status endpoint: {exc!r}")
            return _reply(start_response, "500 Internal Server Error",
                          _json({"error": "internal error"}))

    def _metrics(self, environ: dict, start_response: Callable) -> list[bytes]:
        from prometheus_client import exposition

        encoder, content_type = exposition.choose_encoder(environ.get("HTTP_ACCEPT", ""))
        return _reply(start_response, "200 OK", encoder(self.registry()), content_type)

    def registry(self) -> CollectorRegistry:
        """Our collector plus the process figures (CPU, memory, open files)."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

            registry = CollectorRegistry(auto_describe=False)
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            registry.register(RouterCollector(self.router, self.clock))
            self._registry = registry
        return self._registry

    def _status(self, environ: dict, start_response: Callable) -> list[bytes]:
        return _reply(start_response, "200 OK", _json(stats.snapshot(self.router, self.clock())))

    def _placement(self, environ: dict, start_response: Callable) -> list[bytes]:
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        name, jid = query.get("name", [""])[0], query.get("jid", [""])[0]
        if not name or not jid:
            return _reply(start_response, "400 Bad Request",
                          _json({"error": "usage: /placement?name=NAME&jid=JID"}))
        answer = stats.which_instance(self.router, name, jid)
        if "error" not in answer:
            status = "200 OK"
        elif answer["kind"] is None and answer["member"] is None and "not a valid" not in answer["error"]:
            status = "404 Not Found"
        else:
            status = "400 Bad Request"
        return _reply(start_response, status, _json(answer))


def _json(data: Any) -> bytes:
    return json.dumps(data, indent=1, sort_keys=False).encode("utf-8") + b"\n"


def _reply(start_response: Callable, status: str, body: bytes,
           content_type: str = "application/json", allow: Optional[str] = None) -> list[bytes]:
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body))),
               ("Cache-Control", "no-store")]
    if allow is not None:
        headers.append(("Allow", allow))
    start_response(status, headers)
    return [body]


class StatusListenError(ListenError):
    """The status endpoint's socket could not be opened."""


class StatusServer:
    """``StatusApp`` served on ``settings.ip``:``settings.port`` with gevent.

    It listens on the port it is given; 0 asks the kernel for one (tests).
    Whether to start it at all (``settings.enabled``) is the caller's call.
    """

    #: requests served at the same time; more wait for a free greenlet
    pool_size = 8
    #: seconds ``stop()`` gives requests under way
    stop_timeout = 1.0

    def __init__(self, settings: StatusSettings, router: Router,
                 clock: Callable[[], float] = time.monotonic, log: Optional[Log] = None) -> None:
        self.settings = settings
        self.app = StatusApp(router, clock, log)
        self.log = log
        self._server: Optional[WSGIServer] = None

    @property
    def address(self) -> Optional[tuple[str, int]]:
        return self._server.address if self._server is not None else None

    def start(self) -> "StatusServer":
        from gevent import socket
        from gevent.pool import Pool
        from gevent.pywsgi import WSGIServer

        ip, port = self.settings.ip, self.settings.port
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        try:
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((ip, port))
            listener.listen(64)
        except OSError as exc:
            raise StatusListenError(f"[{ip}, port={port}] unable to listen for status "
                                    f"requests ({exc.strerror})") from None
        self._server = WSGIServer(listener, self.app, spawn=Pool(self.pool_size),
                                  log=None, error_log=None)
        self._server.start()
        if self.log is not None:
            bound = self._server.address
            self.log.notice(f"[{ip}, port={bound[1]}] listening for status requests")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(timeout=self.stop_timeout)
            self._server = None
