"""The status endpoint over real HTTP on 127.0.0.1, and jrouter-status against it,
with the server in this process (gevent): the socket half of tests/unit/test_status.py."""

import json

import gevent
import pytest

from jrouter.config import StatusSettings
from jrouter.ops import status_cli
from jrouter.ops.status import StatusListenError, StatusServer
from tests.unit.harness import Network
from tests.unit.test_stats import FakeRouter
from tests.unit.test_status import busy_router, samples


@pytest.fixture
def served():
    """A StatusServer on 127.0.0.1 with an ephemeral port, around busy_router()."""
    router = busy_router()
    server = StatusServer(StatusSettings("127.0.0.1", 0), router, clock=lambda: 50.0).start()
    yield router, f"http://127.0.0.1:{server.address[1]}"
    server.stop()


def blocking(function, *args):
    """Run blocking client code in a native thread while the hub serves (bounded)."""
    with gevent.Timeout(10):
        return gevent.get_hub().threadpool.apply(function, args)


def http_get(url, method="GET"):
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, method=method), timeout=5) as response:
            return response.status, response.headers.get("Content-Type"), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type"), exc.read()


def test_http_endpoint_answers(served):
    """The endpoint serves /metrics, /status and /placement and 404s the rest."""
    router, url = served
    a = next(iter(router.connections))
    router.picks[("sm", "u@example.com")] = a
    code, content_type, body = blocking(http_get, url + "/metrics")
    assert code == 200 and content_type.startswith("text/plain")
    assert samples(body.decode())[("jrouter_connections", frozenset())] == 3
    code, _, body = blocking(http_get, url + "/status")
    assert code == 200 and json.loads(body)["totals"]["packets_in"] == 103
    code, _, body = blocking(http_get, url + "/placement?name=sm&jid=u@example.com")
    assert code == 200 and json.loads(body)["member"] == a.label
    assert blocking(http_get, url + "/admin")[0] == 404
    assert blocking(http_get, url + "/status", "POST")[0] == 405


def test_http_figures_change_as_packets_flow(served):
    """Figures served over HTTP follow the counters between two requests."""
    router, url = served
    b = list(router.connections)[1]
    before = json.loads(blocking(http_get, url + "/status")[2])
    b.counters.packets_out += 4
    b.counters.bytes_out += 400
    after = json.loads(blocking(http_get, url + "/status")[2])
    assert after["totals"]["packets_out"] - before["totals"]["packets_out"] == 4
    assert after["totals"]["bytes_out"] - before["totals"]["bytes_out"] == 400


def test_listen_error_says_where():
    """A port already taken gives a jabberd2-style line naming address and port."""
    first = StatusServer(StatusSettings("127.0.0.1", 0), FakeRouter()).start()
    try:
        with pytest.raises(StatusListenError, match=r"\[127\.0\.0\.1, port=\d+\] unable to listen"):
            StatusServer(StatusSettings("127.0.0.1", first.address[1]), FakeRouter()).start()
    finally:
        first.stop()


# -- jrouter-status ----------------------------------------------------------------


def run_cli(capsys, *argv):
    code = blocking(status_cli.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_tables(served, capsys):
    """jrouter-status prints totals, connections and names with cluster members."""
    _, url = served
    code, out, _ = run_cli(capsys, "--url", url)
    assert code == 0
    assert "3 connections, 3 names, default route: sm" in out
    assert "[127.0.0.1, port=1]  ONLINE" in out
    lines = out.splitlines()
    sm = next(line for line in lines if line.strip().startswith("sm "))
    assert "multi-to" in sm and "default" in sm
    assert "  0: [127.0.0.1, port=1]" in out and "  1: [127.0.0.1, port=2]" in out
    header = next(line for line in lines if "CONNECTION" in line)
    row = next(line for line in lines if line.startswith("  [127.0.0.1, port=1]"))
    assert row.index("ONLINE") == header.index("STATE")     # aligned columns


def test_cli_json_and_placement(served, capsys):
    """--json prints the snapshot; --placement names the member for a JID."""
    router, url = served
    code, out, _ = run_cli(capsys, "--url", url + "/status", "--json")
    assert code == 0 and json.loads(out)["connection_count"] == 3
    router.picks[("sm", "u@example.com")] = list(router.connections)[1]
    code, out, _ = run_cli(capsys, "--url", url, "--placement", "sm", "u@example.com")
    assert code == 0
    assert out.strip() == "u@example.com on sm is served by [127.0.0.1, port=2] (member 1 of 2)"
    code, out, _ = run_cli(capsys, "--url", url, "--placement", "nobody.test", "u@x")
    assert code == 0 and "nobody serves nobody.test" in out


def test_cli_reads_router_xml(served, capsys, tmp_path):
    """-c router.xml finds the endpoint from <status>."""
    _, url = served
    port = url.rsplit(":", 1)[1]
    config = tmp_path / "router.xml"
    config.write_text(f"<router><status><ip>127.0.0.1</ip><port>{port}</port></status></router>")
    code, out, _ = run_cli(capsys, "-c", str(config))
    assert code == 0 and "Connections" in out


def test_cli_endpoint_off_or_unreachable(capsys, tmp_path):
    """Exit 1 with a clear message when the endpoint is off or nobody answers."""
    config = tmp_path / "router.xml"
    config.write_text("<router><local><port>5347</port></local></router>")
    code, _, err = run_cli(capsys, "-c", str(config))
    assert code == 1 and "the status endpoint is off in" in err
    server = StatusServer(StatusSettings("127.0.0.1", 0), FakeRouter()).start()
    port = server.address[1]
    server.stop()
    code, _, err = run_cli(capsys, "--url", f"http://127.0.0.1:{port}")
    assert code == 1 and "cannot reach the status endpoint" in err
    code, _, err = run_cli(capsys, "-c", str(tmp_path / "missing.xml"))
    assert code == 1 and "couldn't open" in err


def test_endpoint_figures_agree_with_traffic_through_the_real_core():
    """Over HTTP, /metrics of a real core.Router rises by exactly what the test sent."""
    net = Network()
    a = net.component("a.example.com")
    b = net.component("b.example.com")
    server = StatusServer(StatusSettings("127.0.0.1", 0), net.router, clock=lambda: 0.0).start()
    url = f"http://127.0.0.1:{server.address[1]}/metrics"
    try:
        def figure(name, peer):
            got = samples(blocking(http_get, url)[2].decode())
            return got[(name, frozenset({("connection", peer.connection.label)}))]

        before = {(n, p): figure(n, p) for n in ("jrouter_connection_packets_in_total",
                                                  "jrouter_connection_bytes_in_total",
                                                  "jrouter_connection_bounces_total",
                                                  "jrouter_connection_packets_out_total")
                  for p in (a, b)}
        packet = b"<route to='b.example.com' from='a.example.com'><message/></route>"
        unroutable = b"<route to='nobody.example.com' from='a.example.com'><message/></route>"
        for _ in range(5):
            a.send(packet)
        a.send(unroutable)
        b.take()
        a.take()

        def delta(name, peer):
            return figure(name, peer) - before[(name, peer)]

        assert delta("jrouter_connection_packets_in_total", a) == 6
        assert delta("jrouter_connection_bytes_in_total", a) == 5 * len(packet) + len(unroutable)
        assert delta("jrouter_connection_bounces_total", a) == 1
        assert delta("jrouter_connection_packets_out_total", b) == 5
    finally:
        server.stop()
