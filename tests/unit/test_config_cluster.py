"""Unit tests for router.xml's <cluster> section: several jrouter nodes as one router (issue 13)."""

import dataclasses
import re
from pathlib import Path

import pytest

from jrouter.config import (ClusterSettings, ConfigError, EtcdSettings, PeerSettings, load_config,
                            parse_cluster, parse_xml)

REPO = Path(__file__).resolve().parents[2]
DIST = REPO / "conf" / "router.xml.dist"
SECRET = "0123456789abcdef"

FULL = f"""<router>
  <local><port>5347</port></local>
  <cluster>
    <name>prod-eu.1</name>
    <node>node_a</node>
    <peer>
      <ip>0.0.0.0</ip>
      <port>5348</port>
      <advertise>Router-A.example.com:15348</advertise>
      <secret>{SECRET}</secret>
      <pemfile>/etc/jabberd2/peer.pem</pemfile>
      <cafile>/etc/jabberd2/peer-ca.pem</cafile>
      <tls>yes</tls>
    </peer>
    <etcd>
      <endpoint>http://10.0.0.11:2379</endpoint>
      <endpoint> http://etcd-2.example:2379/ </endpoint>
      <endpoint>http://[2001:db8::13]:2379</endpoint>
      <timeout>1</timeout>
      <lease-ttl>3</lease-ttl>
      <bind-wait>0</bind-wait>
    </etcd>
    <hops>8</hops>
  </cluster>
</router>
"""


def minimal(peer="", etcd="", top="", node="<node>a</node>"):
    """The smallest valid section, with extra children for each element."""
    return (f"<router>\n<cluster>\n{node}{top}\n"
            f"<peer><ip>10.0.0.1</ip><port>5348</port><secret>{SECRET}</secret>{peer}</peer>\n"
            f"<etcd><endpoint>http://10.0.0.9:2379</endpoint>{etcd}</etcd>\n"
            "</cluster>\n</router>\n")


def write(tmp_path, body):
    path = tmp_path / "router.xml"
    path.write_text(body, encoding="utf-8")
    return str(path)


def problems_of(tmp_path, body):
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return path, info.value.problems


# --- what is read ----------------------------------------------------------


def test_full_section_round_trip(tmp_path):
    """Every element of <cluster> lands in its field (values trimmed, host names lower-cased)."""
    cluster = load_config(write(tmp_path, FULL)).cluster
    assert cluster == ClusterSettings(
        name="prod-eu.1", node="node_a", hops=8,
        peer=PeerSettings(ip="0.0.0.0", port=5348, advertise="router-a.example.com:15348",
                          secret=SECRET, pemfile="/etc/jabberd2/peer.pem",
                          cafile="/etc/jabberd2/peer-ca.pem", tls=True),
        etcd=EtcdSettings(endpoints=("http://10.0.0.11:2379", "http://etcd-2.example:2379",
                                     "http://[2001:db8::13]:2379"),
                          timeout=1, lease_ttl=3, bind_wait=0))
    assert cluster.peer.address == "router-a.example.com:15348"


def test_defaults(tmp_path):
    """Left out: name jrouter, hops 2, no advertise, no TLS, etcd timeout 2, lease 5, bind-wait 10."""
    cluster = load_config(write(tmp_path, minimal())).cluster
    assert cluster == ClusterSettings(
        node="a", peer=PeerSettings(ip="10.0.0.1", port=5348, secret=SECRET),
        etcd=EtcdSettings(endpoints=("http://10.0.0.9:2379",)))
    assert (cluster.name, cluster.hops) == ("jrouter", 2)
    assert (cluster.peer.advertise, cluster.peer.pemfile, cluster.peer.cafile, cluster.peer.tls) == \
        (None, None, None, False)
    assert (cluster.etcd.timeout, cluster.etcd.lease_ttl, cluster.etcd.bind_wait) == (2, 5, 10)
    assert cluster.peer.address == "10.0.0.1:5348"


def test_ipv6_peer_address_in_brackets(tmp_path):
    """Other nodes dial an IPv6 peer ip as [ip]:port; an advertised IPv6 address keeps its brackets."""
    body = minimal().replace("10.0.0.1", "2001:db8::1")
    assert load_config(write(tmp_path, body)).cluster.peer.address == "[2001:db8::1]:5348"
    body = minimal(peer="<advertise>[2001:db8::2]:6000</advertise>")
    assert load_config(write(tmp_path, body)).cluster.peer.address == "[2001:db8::2]:6000"


def test_secret_is_literal_and_not_in_repr(tmp_path):
    """The secret is taken as written, and a Config printed in a log does not show it."""
    config = load_config(write(tmp_path, minimal().replace(SECRET, "a secret with  blanks, xyzzy")))
    assert config.cluster.peer.secret == "a secret with  blanks, xyzzy"
    assert "xyzzy" not in repr(config)


def test_absent_section_is_none_and_changes_nothing_else(tmp_path):
    """Without <cluster> the router is one router: cluster is None, every other setting as before."""
    section = FULL[FULL.index("  <cluster>"):FULL.index("</router>")]
    without = load_config(write(tmp_path, FULL.replace(section, "")))
    assert without.cluster is None
    with_cluster = load_config(write(tmp_path, FULL))
    assert dataclasses.replace(with_cluster, cluster=None) == without
    assert parse_cluster(None, "router.xml") == (None, [])


# --- problems: file, line, element path, all together ----------------------


@pytest.mark.parametrize("body, line, key, message", [
    (minimal(node=""), 2, "cluster.node", "missing: say this node's id"),
    (minimal().replace("<port>5348</port>", "<port>0</port>"), 4, "cluster.peer.port",
     "port must be between 1 and 65535, got 0"),
    (minimal().replace("<port>5348</port>", "<port>peer</port>"), 4, "cluster.peer.port",
     "expected an integer, got 'peer'"),
    (minimal(etcd="<endpoint>etcd:2379</endpoint>"), 5, "cluster.etcd.endpoint",
     "expected http://host:port, got 'etcd:2379'"),
    (minimal(etcd="<endpoint>http://etcd</endpoint>"), 5, "cluster.etcd.endpoint",
     "expected http://host:port, got 'http://etcd'"),
    (minimal(etcd="<endpoint>http://etcd:2379/v3</endpoint>"), 5, "cluster.etcd.endpoint",
     "expected http://host:port, with no user, path or query"),
    (minimal(etcd="<endpoint>https://etcd:2379</endpoint>"), 5, "cluster.etcd.endpoint",
     "https is not supported"),
    (minimal(etcd="<endpoint>http://etcd:99999</endpoint>"), 5, "cluster.etcd.endpoint",
     "'http://etcd:99999': port must be between 1 and 65535, got 99999"),
    (minimal(etcd="<endpoint>http://10.0.0.9:2379</endpoint>"), 5, "cluster.etcd.endpoint",
     "http://10.0.0.9:2379 is already listed on line 5"),
    (minimal().replace(SECRET, "tooshort"), 4, "cluster.peer.secret",
     "is 8 characters long; a peer secret needs at least 16"),
    (minimal().replace(SECRET, f" {SECRET}"), 4, "cluster.peer.secret",
     "must not begin or end with white space"),
    (minimal(etcd="<lease-ttl>1</lease-ttl>"), 5, "cluster.etcd.lease-ttl",
     "must be at least 2 seconds, got 1: etcd raises a shorter TTL to its minimum, 2 s"),
    (minimal(etcd="<timeout>0</timeout>"), 5, "cluster.etcd.timeout", "must be at least 1, got 0"),
    (minimal(etcd="<timeout>5</timeout>"), 5, "cluster.etcd.timeout",
     "timeout (5 s) must be less than lease-ttl (5 s)"),
    (minimal(etcd="<bind-wait>-1</bind-wait>"), 5, "cluster.etcd.bind-wait", "must not be negative, got -1"),
    (minimal(peer="<user>peer</user>"), 4, "cluster.peer.user",
     "unknown element; <peer> takes <ip>, <port>, <advertise>, <secret>, <tls>, <pemfile>, <cafile>"),
    (minimal(top="<lease-ttl>5</lease-ttl>"), 3, "cluster.lease-ttl", "unknown element; <cluster> takes"),
    (minimal(top="<node>b</node>"), 3, "cluster.node", "given twice (first on line 3)"),
    (minimal(top="<hops>9</hops>"), 3, "cluster.hops", "must be between 1 and 8, got 9"),
    (minimal(top="<hops>0</hops>"), 3, "cluster.hops", "must be between 1 and 8, got 0"),
    (minimal(node="<node>node/a</node>"), 3, "cluster.node", "'node/a' is not a name of 1 to 64 letters"),
    (minimal(top="<name></name>"), 3, "cluster.name", "'' is not a name"),
    (minimal().replace("10.0.0.1", "router-a"), 4, "cluster.peer.ip", "'router-a' is not an IPv4 or IPv6"),
    (minimal().replace("10.0.0.1", "::"), 4, "cluster.peer.ip", ":: listens on every address"),
    (minimal(peer="<advertise>router-a</advertise>"), 4, "cluster.peer.advertise",
     "expected host:port, got 'router-a'"),
    (minimal(peer="<tls>yes</tls>"), 4, "cluster.peer.tls", "needs a <pemfile>"),
    (minimal(peer="<tls>maybe</tls>"), 4, "cluster.peer.tls", "expected yes or no, got 'maybe'"),
    (minimal().replace("<cluster>", "<cluster enabled='yes'>"), 2, "cluster@enabled", "unknown attribute"),
    (minimal(node="<node>${id}</node>"), 3, "cluster.node", "${} is not expanded in <cluster>"),
])
def test_each_problem_names_file_line_and_element(tmp_path, body, line, key, message):
    """A wrong value, a missing or unknown element: FILE:LINE: cluster.path: message."""
    path, problems = problems_of(tmp_path, body)
    assert any(p.startswith(f"{path}:{line}: {key}: ") and message in p for p in problems), problems


def test_missing_subsections_and_leaves(tmp_path):
    """An empty <cluster/> names each required element; an empty <peer> and <etcd> name theirs."""
    path, problems = problems_of(tmp_path, "<router>\n<cluster/>\n</router>")
    assert [p.split(": ")[1] for p in problems] == ["cluster.node", "cluster.peer", "cluster.etcd"]
    assert all(p.startswith(f"{path}:2: ") for p in problems)
    _, problems = problems_of(tmp_path, "<router><cluster><node>a</node><peer/><etcd/></cluster></router>")
    assert [p.split(": ")[1] for p in problems] == ["cluster.peer.ip", "cluster.peer.port",
                                                    "cluster.peer.secret", "cluster.etcd.endpoint"]


def test_all_problems_reported_together(tmp_path):
    """Problems in <cluster> and elsewhere in the file come in one ConfigError, each on its own line."""
    body = ("<router>\n<local><port>x</port></local>\n<cluster>\n<node>a</node>\n"
            "<peer><ip>10.0.0.1</ip>\n<port>70000</port>\n<secret>short</secret></peer>\n"
            "<etcd><endpoint>ftp://e:1</endpoint>\n<lease-ttl>1</lease-ttl></etcd>\n<hops>9</hops>\n"
            "<colour/>\n</cluster>\n</router>")
    path, problems = problems_of(tmp_path, body)
    found = sorted((int(p.split(":")[1]), p.split(": ")[1]) for p in problems)
    assert found == [(2, "local.port"), (6, "cluster.peer.port"), (7, "cluster.peer.secret"),
                     (8, "cluster.etcd.endpoint"), (9, "cluster.etcd.lease-ttl"), (10, "cluster.hops"),
                     (11, "cluster.colour")]
    assert all(p.startswith(path + ":") for p in problems)


def test_problems_never_show_the_secret(tmp_path):
    """A secret that is refused is not repeated in the message (problems are logged)."""
    _, problems = problems_of(tmp_path, minimal().replace(SECRET, " my-pass"))
    assert problems and not any("my-pass" in p for p in problems)


def test_parse_cluster_reads_an_element():
    """parse_cluster reads the element alone: (settings, []) or (None, problems)."""
    root = parse_xml(minimal().encode())
    settings, problems = parse_cluster(root.find("cluster"), "router.xml")
    assert problems == [] and settings.node == "a"
    root = parse_xml(minimal(top="<hops>9</hops>").encode())
    assert parse_cluster(root.find("cluster"), "router.xml") == (
        None, ["router.xml:3: cluster.hops: must be between 1 and 8, got 9"])


# --- the shipped example ---------------------------------------------------


def test_dist_config_has_no_cluster():
    """conf/router.xml.dist loads as a single router: its <cluster> is a comment."""
    assert load_config(str(DIST)).cluster is None


def test_dist_example_uncommented_gives_the_documented_values(tmp_path):
    """The commented <cluster> example of conf/router.xml.dist, uncommented, reads as its comment says."""
    text = DIST.read_text()
    example = re.search(r"<!--\n(  <cluster>\n.*?  </cluster>\n)  -->\n", text, re.S)
    assert example is not None
    config = load_config(write(tmp_path, text.replace(example.group(0), example.group(1))))
    assert config.cluster == ClusterSettings(
        name="jrouter", node="node-a", hops=2,
        peer=PeerSettings(ip="10.0.0.1", port=5348, advertise="router-a.example.com:5348",
                          secret="change-this-to-a-long-random-secret", pemfile="/etc/jabberd2/peer.pem",
                          cafile="/etc/jabberd2/peer-ca.pem",
                          tls=True),
        etcd=EtcdSettings(endpoints=("http://10.0.0.11:2379", "http://10.0.0.12:2379",
                                     "http://10.0.0.13:2379"), timeout=2, lease_ttl=5, bind_wait=10))
    assert dataclasses.replace(config, cluster=None, source=str(DIST)) == load_config(str(DIST))
