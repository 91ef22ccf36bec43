"""The operator's status endpoint and jrouter-status, with jrouter as a process."""

import json
import subprocess
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.support.peer import Peer
from tests.support.ports import free_port


def fetch(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
        return reply.read().decode()


def metric(text, name, **labels):
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def test_status_figures_follow_the_traffic(router_factory):
    """/status and /metrics count exactly the packets the test routed and bounced."""
    port = free_port()
    router = router_factory("jrouter", extra=f"<status><ip>127.0.0.1</ip><port>{port}</port></status>")
    sm = Peer(router.ip, router.port).authenticate().bind("sm")
    c2s = Peer(router.ip, router.port).authenticate().bind("c2s")
    sm.drain()
    for n in range(5):
        c2s.send(f"<route to='sm' from='c2s'><message id='{n}'/></route>")
    c2s.send("<route to='nowhere' from='c2s'><message/></route>")
    for _ in range(5):
        sm.route()
    assert c2s.route().get("error") == "404"

    status = json.loads(fetch(port, "/status"))
    by_name = {n["name"]: n for n in status["names"]}
    assert by_name["sm"]["counters"]["packets_out"] == 5
    assert by_name["c2s"]["counters"]["packets_in"] == 7      # its <bind/> and 6 routes
    assert by_name["c2s"]["counters"]["bounces"] == 1

    text = fetch(port, "/metrics")
    c2s_label = next(c["label"] for c in status["connections"] if "c2s" in c["names"])
    assert metric(text, "jrouter_connection_packets_in_total", connection=c2s_label) == 7
    assert metric(text, "jrouter_bounces_total") == 1


def test_placement_and_the_cli(router_factory):
    """'Which instance serves this JID' over HTTP and through jrouter-status."""
    port = free_port()
    router = router_factory("jrouter", extra=f"<status><ip>127.0.0.1</ip><port>{port}</port></status>")
    members = [Peer(router.ip, router.port).authenticate().bind("example.com", " multi='to'")
               for _ in range(3)]
    answer = json.loads(fetch(port, "/placement?name=example.com&jid=user4@example.com"))
    labels = [c["label"] for c in json.loads(fetch(port, "/status"))["connections"]]
    assert answer["member"] == labels[2]         # jabberd2's hash: user4 -> index 2 of 3
    report = subprocess.run([sys.executable, "-m", "jrouter.ops.status_cli", "--url",
                             f"http://127.0.0.1:{port}"], capture_output=True, text=True, timeout=20)
    assert report.returncode == 0 and "example.com" in report.stdout
    for member in members:
        member.close()


def test_status_is_off_by_default_and_the_cli_says_so(router):
    """Without <status> nothing listens, and jrouter-status explains it (exit 1)."""
    port = free_port()
    report = subprocess.run([sys.executable, "-m", "jrouter.ops.status_cli", "--url",
                             f"http://127.0.0.1:{port}"], capture_output=True, text=True, timeout=20)
    assert report.returncode == 1 and report.stderr.strip()
