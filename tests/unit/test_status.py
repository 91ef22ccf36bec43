"""jrouter.ops.status: <status> in router.xml, Prometheus and JSON output, and the
WSGI application, without a socket (the HTTP endpoint over loopback and jrouter-status
are tests/process/test_status_server.py)."""

import json

from lxml import etree
from prometheus_client.parser import text_string_to_metric_families

from jrouter.wire.counters import Counters
from jrouter.ops.stats import snapshot
from jrouter.config import StatusSettings, parse_status
from jrouter.ops.status import StatusApp, metric_families

from .test_stats import FakeRouter, conn

PATH = "/etc/jabberd2/router.xml"


def status_element(text):
    """The <status> element of a router.xml whose body is ``text`` (line 1 is <router>)."""
    root = etree.fromstring(f"<router>\n{text}\n</router>".encode())
    return root.find("status")


# -- router.xml ----------------------------------------------------------------


def test_no_status_element_means_off():
    """Without <status> there is no endpoint and nothing to complain about."""
    assert parse_status(None, PATH) == (None, [])


def test_status_settings_read():
    """<ip> and <port> are read; the ip defaults to 127.0.0.1."""
    settings, problems = parse_status(status_element(
        "<status><ip>127.0.0.1</ip><port>5380</port></status>"), PATH)
    assert problems == [] and settings == StatusSettings("127.0.0.1", 5380)
    assert settings.enabled
    settings, _ = parse_status(status_element("<status><port> 5380 </port></status>"), PATH)
    assert settings == StatusSettings("127.0.0.1", 5380)
    settings, _ = parse_status(status_element("<status><ip>::1</ip><port>5380</port></status>"), PATH)
    assert settings.ip == "::1"


def test_port_zero_turns_it_off():
    """<port>0</port> is the documented way to keep the section and turn the endpoint off."""
    assert parse_status(status_element("<status><port>0</port></status>"), PATH) == (None, [])
    assert not StatusSettings().enabled


def test_port_problems_name_file_line_and_key():
    """Bad or missing ports are reported as PATH:LINE: status.port: message."""
    _, problems = parse_status(status_element("<status>\n<port>http</port></status>"), PATH)
    assert problems == [f"{PATH}:3: status.port: expected an integer, got 'http'"]
    _, problems = parse_status(status_element("<status><port>70000</port></status>"), PATH)
    assert problems == [f"{PATH}:2: status.port: port must be between 0 (off) and 65535, got 70000"]
    settings, problems = parse_status(status_element("<status><ip>127.0.0.1</ip></status>"), PATH)
    assert settings is None
    assert problems[0].startswith(f"{PATH}:2: status.port: missing")


def test_non_loopback_ip_refused_unless_public():
    """A non-loopback address needs <status public='yes'>, and the message says why."""
    element = status_element("<status>\n\n<ip>0.0.0.0</ip><port>5380</port></status>")
    settings, problems = parse_status(element, PATH)
    assert settings is None
    assert problems == [f"{PATH}:4: status.ip: 0.0.0.0 is not a loopback address; the status "
                        "endpoint has no authentication, so it listens on loopback only unless "
                        "<status public='yes'> says otherwise"]
    settings, problems = parse_status(status_element(
        "<status public='yes'><ip>192.0.2.7</ip><port>5380</port></status>"), PATH)
    assert problems == [] and settings == StatusSettings("192.0.2.7", 5380, public=True)


def test_other_ip_and_public_problems():
    """Host names and public values outside the one yes/no grammar are refused."""
    _, problems = parse_status(status_element(
        "<status public='maybe'><ip>localhost</ip><port>1</port></status>"), PATH)
    assert problems == [
        f"{PATH}:2: status@public: expected yes or no, got 'maybe'",
        f"{PATH}:2: status.ip: 'localhost' is not an IPv4 or IPv6 address (host names are not allowed)",
    ]
    settings, problems = parse_status(status_element(
        "<status public='true'><ip>192.0.2.7</ip><port>1</port></status>"), PATH)
    assert problems == [] and settings.public     # the same words as clustering's track-iq
    settings, problems = parse_status(status_element(
        "<status><ip>::ffff:127.0.0.1</ip><port>1</port></status>"), PATH)
    assert problems == [] and settings.ip == "::ffff:127.0.0.1"


# -- Prometheus ----------------------------------------------------------------


def busy_router():
    """Two members of a cluster and a legacy component, with traffic."""
    a, b = conn(1, "sm", connected_at=10.0), conn(2, "sm", "log.test")
    legacy = conn(3, "legacy.test", legacy=True, user="legacy.test")
    a.counters.packets_in, a.counters.bytes_in, a.counters.bounces = 3, 300, 1
    b.counters.packets_out, b.counters.bytes_out = 2, 120
    legacy.counters.drops, legacy.counters.throttled = 4, 5
    a.outbox.out[:] = [b"12345"]
    router = FakeRouter(a, b, legacy)
    router.table.default_name = "sm"
    router.table.log_sinks["log.test"] = b
    router.closed_counters = Counters()
    router.closed_counters.packets_in = 100
    router.started_at = 2.0
    return router


def samples(text):
    """{(sample name, frozenset(labels)): value} of a Prometheus text exposition."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def render(router, accept="", now=50.0):
    app = StatusApp(router, clock=lambda: now)
    status, headers, body = call(app, "/metrics", accept=accept)
    assert status.startswith("200")
    return dict(headers)["Content-Type"], body.decode()


def test_metrics_parse_and_carry_the_figures():
    """/metrics is valid Prometheus text with totals, per-connection and per-name figures."""
    content_type, text = render(busy_router())
    assert content_type.startswith("text/plain")
    got = samples(text)
    a, b = "[127.0.0.1, port=1]", "[127.0.0.1, port=2]"
    assert got[("jrouter_up", frozenset())] == 1
    assert got[("jrouter_uptime_seconds", frozenset())] == 48
    assert got[("jrouter_connections", frozenset())] == 3
    assert got[("jrouter_names", frozenset())] == 3
    assert got[("jrouter_packets_in_total", frozenset())] == 103
    assert got[("jrouter_drops_total", frozenset())] == 4
    assert got[("jrouter_connection_packets_in_total", frozenset({("connection", a)}))] == 3
    assert got[("jrouter_connection_bytes_out_total", frozenset({("connection", b)}))] == 120
    assert got[("jrouter_connection_queued_bytes", frozenset({("connection", a)}))] == 5
    assert got[("jrouter_connection_connected_seconds", frozenset({("connection", a)}))] == 40
    assert got[("jrouter_cluster_members", frozenset({("name", "sm")}))] == 2
    assert got[("jrouter_cluster_member", frozenset({("name", "sm"), ("connection", b),
                                                     ("index", "1")}))] == 1
    assert got[("jrouter_name_packets_in", frozenset({("name", "sm")}))] == 3
    assert got[("jrouter_name_throttled", frozenset({("name", "legacy.test")}))] == 5
    assert got[("jrouter_name_info", frozenset({("name", "sm"), ("kind", "multi-to"), ("default", "yes"),
                                               ("log_sink", "no"), ("alias_of", "")}))] == 1
    assert got[("jrouter_connection_info", frozenset({
        ("connection", "[127.0.0.1, port=3]"), ("ip", "127.0.0.1"), ("port", "3"), ("state", "ONLINE"),
        ("user", "legacy.test"), ("legacy", "yes")}))] == 1
    assert any(name.startswith("process_") for name, _ in got)


def test_metrics_follow_the_figures_on_each_scrape():
    """Every scrape reads the router afresh: counters rise as packets flow."""
    router = busy_router()
    a = next(iter(router.connections))
    key = ("jrouter_connection_packets_in_total", frozenset({("connection", a.label)}))
    first = samples(render(router)[1])[key]
    a.counters.packets_in += 7
    assert samples(render(router)[1])[key] == first + 7


def test_metrics_openmetrics_when_asked():
    """A scraper that asks for OpenMetrics gets it (content negotiation by prometheus_client)."""
    content_type, text = render(busy_router(), accept="application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")


def test_metric_families_of_an_empty_router():
    """A router with nothing connected still yields valid families."""
    families = metric_families(snapshot(FakeRouter(), 0.0))
    assert {f.name for f in families} >= {"jrouter_up", "jrouter_connections", "jrouter_cluster_members"}


# -- the WSGI application, without a socket -------------------------------------


def call(app, path, method="GET", query="", accept=""):
    """Run one request through a WSGI app; return (status, headers, body)."""
    seen = {}

    def start_response(status, headers):
        seen["status"], seen["headers"] = status, headers

    body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": method, "QUERY_STRING": query,
                         "HTTP_ACCEPT": accept}, start_response))
    return seen["status"], seen["headers"], body


def test_status_is_the_json_snapshot():
    """/status answers the snapshot as JSON."""
    router = busy_router()
    status, headers, body = call(StatusApp(router, clock=lambda: 50.0), "/status")
    assert status == "200 OK" and dict(headers)["Content-Type"] == "application/json"
    assert json.loads(body) == snapshot(router, 50.0)


def test_placement_answers():
    """/placement asks the router's hook; bad input is a 400, an unserved name a 404."""
    router = busy_router()
    a = next(iter(router.connections))
    router.picks[("sm", "u@example.com")] = a
    app = StatusApp(router, clock=lambda: 0.0)
    status, _, body = call(app, "/placement", query="name=sm&jid=u%40example.com")
    assert status == "200 OK" and json.loads(body)["member"] == a.label
    assert call(app, "/placement", query="name=sm")[0].startswith("400")
    assert call(app, "/placement", query="name=sm&jid=%40bad")[0].startswith("400")
    assert call(app, "/placement", query="name=nobody.test&jid=u%40x")[0].startswith("404")


def test_read_only_and_nothing_else():
    """Other paths are 404; other methods on our paths are 405 with Allow."""
    app = StatusApp(busy_router())
    assert call(app, "/")[0].startswith("404")
    assert call(app, "/metrics/extra")[0].startswith("404")
    status, headers, _ = call(app, "/status", method="POST")
    assert status.startswith("405") and dict(headers)["Allow"] == "GET, HEAD"
    assert call(app, "/metrics", method="DELETE")[0].startswith("405")
    assert call(app, "/status", method="HEAD")[0] == "200 OK"


def test_a_broken_router_gives_500_not_an_exception():
    """A bug while reading the router answers 500 and is logged."""
    errors = []
    log = type("Log", (), {"error": lambda self, text: errors.append(text)})()
    app = StatusApp(object(), log=log)
    assert call(app, "/status")[0].startswith("500")
    assert errors and errors[0].startswith("status endpoint:")
