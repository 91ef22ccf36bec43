"""Our sections of router.xml, which jabberd2 ignores: ``<status>``, ``<clustering>``, ``<cluster>``.

Owns: reading each section into its settings (``StatusSettings``; a
``policy.PolicyTable`` of ``policy.ClusterPolicy``; ``ClusterSettings``) with
the one grammar of ``grammar.py``, every problem named by file, line and
element.
Must not know: what the status endpoint serves, how a policy places a
packet, or how nodes talk to etcd and to each other (status.py, policy.py,
jrouter/cluster); only which values are legal.

The sections are read from their element (not from router_xml's key
table), so ``jrouter-status`` can read ``<status>`` without the rest.  That
also means ``${key}`` is not expanded inside them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

from lxml import etree

from jrouter.routing.policy import (ADDRESSES, AFFINITY, ALGORITHMS, DEAD, KEYS, NODELESS, REPLACE,
                                    ClusterPolicy, PolicyError, PolicyTable, match_name)

from . import grammar
from .grammar import Problems
from .xmlfile import children, element_text, xml_name

# ---------------------------------------------------------------------------
# <status>: the operator's HTTP endpoint (protocol §7.2).


@dataclass(frozen=True)
class StatusSettings:
    """``<status>``: where the status endpoint listens. Port 0 means off."""

    ip: str = "127.0.0.1"
    port: int = 0
    public: bool = False        # <status public='yes'>: a non-loopback ip is meant

    @property
    def enabled(self) -> bool:
        return self.port != 0


def _status_port(value: str) -> int:
    number = grammar.integer(value)
    if not 0 <= number <= 65535:
        raise ValueError(f"port must be between 0 (off) and 65535, got {number}")
    return number


def parse_status(element: Optional[etree._Element], path: str
                 ) -> tuple[Optional[StatusSettings], list[str]]:
    """Read ``<status>`` (None when absent): ``(settings, problems)``.

    Settings are None when the endpoint is off (no element, or port 0) or
    when there are problems.
    """
    problems = Problems(path)
    if element is None:
        return None, problems
    public = bool(problems.read(element.sourceline or 0, "status@public", element.get("public", "no"),
                                grammar.boolean, False))
    port_el = _first(element, "port")
    port = 0
    if port_el is None:
        problems.add(element.sourceline or 0, "status.port", "missing: say which port to listen on "
                     "(<port>5380</port>), or 0 to turn the endpoint off")
    else:
        port = int(problems.read(port_el.sourceline or 0, "status.port", element_text(port_el),
                                 _status_port, 0))
    ip_el = _first(element, "ip")
    ip = StatusSettings.ip
    if ip_el is not None:
        ip = str(problems.read(ip_el.sourceline or 0, "status.ip", element_text(ip_el).strip(),
                               grammar.ip_literal, ""))
        if ip and not public and not _is_loopback(ipaddress.ip_address(ip)):
            problems.add(ip_el.sourceline or 0, "status.ip", f"{ip} is not a loopback address; "
                         "the status endpoint has no authentication, so it listens on loopback "
                         "only unless <status public='yes'> says otherwise")
    if problems or port == 0:
        return None, problems
    return StatusSettings(ip=ip, port=port, public=public), problems


def _is_loopback(address: Union[ipaddress.IPv4Address, ipaddress.IPv6Address]) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _first(element: etree._Element, name: str) -> Optional[etree._Element]:
    """The first child element called ``name`` (jabberd2 uses the first)."""
    found = children(element, name)
    return found[0] if found else None


# ---------------------------------------------------------------------------
# <clustering>: per-name placement policies (protocol §6.4).


# attribute -> (ClusterPolicy field, reader)
_POLICY_ATTRIBUTES: dict[str, tuple[str, Callable[[str], object]]] = {
    "name": ("match", match_name),
    "key": ("key", grammar.choice(KEYS)),
    "address": ("address", grammar.choice(ADDRESSES)),
    "algorithm": ("algorithm", grammar.choice(ALGORITHMS)),
    "slots": ("slots", grammar.non_negative),
    "dead": ("dead", grammar.choice(DEAD)),
    "hold": ("hold_seconds", grammar.non_negative),
    "nodeless": ("nodeless", grammar.choice(NODELESS)),
    "track-iq": ("track_iq", grammar.boolean),
    "replace": ("replace", grammar.choice(REPLACE)),
    "affinity": ("affinity", grammar.choice(AFFINITY)),
    "affinity-idle": ("affinity_idle", grammar.non_negative),
    "affinity-max": ("affinity_max", grammar.non_negative),
}


def parse_clustering(element: Optional[etree._Element], path: str,
                     key: str = "clustering") -> tuple[PolicyTable, list[str]]:
    """Read ``<clustering>`` (None: no section): ``(table, problems)``; the
    table then holds the valid policies only."""
    problems = Problems(path)
    if element is None:
        return PolicyTable(), problems
    for attr in element.attrib:
        if attr not in _CLUSTERING_ATTRIBUTES:
            problems.add(element.sourceline or 0, key, f"unknown attribute {attr!r}")
    policies: dict[str, tuple[ClusterPolicy, int]] = {}
    for child in element.iterchildren(etree.Element):
        line = child.sourceline or 0
        if etree.QName(child).localname != "policy":
            problems.add(line, key, f"unknown element <{etree.QName(child).localname}>, expected <policy>")
            continue
        policy = _policy(child, problems, key + ".policy")
        if policy is None:
            continue
        if policy.match in policies:
            problems.add(line, key + ".policy@name", f"{policy.match!r} already has a policy, "
                         f"on line {policies[policy.match][1]}")
            continue
        policies[policy.match] = (policy, line)
    return PolicyTable(p for p, _line in policies.values()), problems


#: <clustering>'s own attributes (clustering_state_dir reads them).
_CLUSTERING_ATTRIBUTES = ("state-dir",)


def clustering_state_dir(element: etree._Element, path: str,
                         key: str = "clustering") -> tuple[Optional[str], list[str]]:
    """``<clustering state-dir='DIR'>``: where placement's state is kept
    over a restart (protocol §6.10); ``(None, [])`` when not set."""
    problems = Problems(path)
    value = element.get("state-dir")
    if value is None:
        return None, problems
    value = value.strip()
    if not value.startswith("/"):
        problems.add(element.sourceline or 0, f"{key}@state-dir",
                     f"must be an absolute directory path, got {value!r}")
        return None, problems
    return value, problems


def _policy(el: etree._Element, problems: Problems, key: str) -> Optional[ClusterPolicy]:
    """One ``<policy>``, or None after adding all its problems."""
    before = len(problems)
    line = el.sourceline or 0
    values: dict[str, Any] = {}
    failed = set()
    for attr, raw in el.attrib.items():
        if attr not in _POLICY_ATTRIBUTES:
            problems.add(line, f"{key}@{attr}", f"unknown attribute (known: {', '.join(_POLICY_ATTRIBUTES)})")
            continue
        field, read = _POLICY_ATTRIBUTES[attr]
        try:
            values[field] = read(raw.strip())
        except ValueError as exc:
            problems.add(line, f"{key}@{attr}", str(exc))
            failed.add(attr)
    if "name" not in el.attrib:
        problems.add(line, key, "missing the name attribute")
    if "hold" in el.attrib and values.get("dead") != "hold":
        problems.add(line, f"{key}@hold", "is only used with dead='hold'")
    try:
        policy = ClusterPolicy(**values)
    except PolicyError as exc:
        # contradictions between the values that could be read (each said once)
        for attr, message in exc.problems:
            if attr not in failed:
                problems.add(line, f"{key}@{attr}", message)
        return None
    return policy if len(problems) == before else None


# ---------------------------------------------------------------------------
# <cluster>: several jrouter nodes as one router (issue 13).  Not to be
# confused with <clustering>, which places packets among the members of one
# name: <cluster> joins routers.  Absent, the router is the single router it
# always was and needs no etcd.


@dataclass(frozen=True)
class PeerSettings:
    """``<cluster><peer>``: the links the other nodes open to this one.

    Every node of a cluster has the same ``secret``; a node dialling another
    authenticates with SASL DIGEST-MD5 as its own ``<node>`` id with that
    secret.  Peer links are checked against this secret only, never against
    router-users.xml, so a component account cannot open a peer link and the
    peer secret cannot bind a name.
    """

    ip: str
    """The address this node listens on for peer links: an IPv4 or IPv6
    literal, as ``<local><ip>``."""
    port: int
    """The port it listens on for peer links (not ``<local><port>``)."""
    secret: str = field(repr=False)
    """The cluster's shared secret for peer links (16 characters or more),
    the same on every node."""
    advertise: Optional[str] = None
    """``host:port`` the other nodes dial when ``ip:port`` is not reachable
    from them (NAT, a virtual IP, a wildcard ``ip``); None: ``ip:port``."""
    pemfile: Optional[str] = None
    """Certificate chain and key (PEM) of this node's peer port, as
    ``<local><pemfile>``: when set, the peer port offers STARTTLS."""
    cafile: Optional[str] = None
    """CA certificates (PEM) the dialling node checks the dialled node's
    certificate against (its chain, not its name: nodes are dialled by
    address); None: not checked, TLS then keeps out a passive listener only."""
    tls: bool = False
    """Require TLS on every peer link, both ways (a dialled node that does
    not offer STARTTLS is not used); needs ``pemfile``.  When off, a link
    uses STARTTLS if the dialled node offers it."""

    @property
    def address(self) -> str:
        """Where the other nodes dial this node (``host:port``, an IPv6
        address in brackets): ``advertise``, else ``ip:port``."""
        if self.advertise is not None:
            return self.advertise
        return _join_host_port(self.ip, self.port)


@dataclass(frozen=True)
class EtcdSettings:
    """``<cluster><etcd>``: the etcd cluster that holds the route table of all nodes."""

    endpoints: tuple[str, ...]
    """The etcd members' client URLs (``http://host:port``), tried in order."""
    timeout: int = 2
    """Seconds one etcd call may take in all before that endpoint counts as
    down; less than ``lease_ttl``."""
    lease_ttl: int = 5
    """Seconds this node's lease lives without a keepalive: when the node
    dies, its routes leave the other nodes' tables this long after.  At
    least 2: etcd grants no shorter lease with its default flags."""
    bind_wait: int = 10
    """Seconds a bind that needs uniqueness across the cluster (a name
    without multi, a default route) waits for etcd during an outage before
    it fails; 0 fails it at once.  Routing goes on meanwhile."""


@dataclass(frozen=True)
class ClusterSettings:
    """``<cluster>``: this router is one node of several that share one route table in etcd."""

    node: str
    """This node's id, unique in the cluster: its key in etcd, its SASL name
    on peer links, its name in log lines."""
    peer: PeerSettings
    """The links between nodes, which carry the packets."""
    etcd: EtcdSettings
    """The store of the shared table."""
    name: str = "jrouter"
    """The cluster's name: its keys in etcd are under ``/jrouter/NAME/``, so
    several clusters can share one etcd."""
    hops: int = 2
    """How many nodes may forward one packet before it is bounced (1-8), so
    two tables briefly out of step cannot pass a packet back and forth."""


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _secret(value: str) -> str:
    # The messages never repeat the secret: they end up in logs.
    if value != value.strip():
        raise ValueError("must not begin or end with white space (it would be part of the secret)")
    if len(value) < 16:
        raise ValueError(f"is {len(value)} characters long; a peer secret needs at least 16")
    return value


def _advertise(value: str) -> str:
    return _join_host_port(*grammar.host_port(value))


def _file(value: str) -> str:
    if not value:
        raise ValueError("expected a file name")
    return value


def _endpoint(value: str) -> str:
    scheme, separator, authority = value.partition("://")
    if scheme.lower() == "https":
        raise ValueError(f"{value!r}: https is not supported; jrouter speaks plain HTTP to etcd's "
                         "JSON gateway, so keep etcd's client port on a trusted network")
    if not separator or scheme.lower() != "http":
        raise ValueError(f"expected http://host:port, got {value!r}")
    authority = authority[:-1] if authority.endswith("/") else authority
    if any(c in authority for c in "/?#@"):
        raise ValueError(f"expected http://host:port, with no user, path or query, got {value!r}")
    try:
        host, port = grammar.host_port(authority)
    except ValueError as exc:
        if str(exc).startswith("expected"):
            raise ValueError(f"expected http://host:port, got {value!r}") from None
        raise ValueError(f"{value!r}: {exc}") from None
    return "http://" + _join_host_port(host, port)


def _lease_ttl(value: str) -> int:
    seconds = grammar.integer(value)
    if seconds < 2:
        raise ValueError(f"must be at least 2 seconds, got {seconds}: etcd raises a shorter TTL to its "
                         "minimum, 2 s with its default flags (1.5 x --election-timeout, rounded up)")
    return seconds


_Readers = Mapping[str, Optional[Callable[[str], object]]]

# element -> reader; None: a subsection, read with its own table.
_CLUSTER: _Readers = {"name": grammar.token, "node": grammar.token, "peer": None, "etcd": None,
                      "hops": grammar.integer_from(1, 8)}
_PEER: _Readers = {"ip": grammar.ip_literal, "port": grammar.port, "advertise": _advertise,
                   "secret": _secret, "tls": grammar.boolean, "pemfile": _file,
                   "cafile": _file}
_ETCD: _Readers = {"endpoint": _endpoint, "timeout": grammar.positive, "lease-ttl": _lease_ttl,
                   "bind-wait": grammar.non_negative}
_REPEATABLE = ("cluster.etcd.endpoint",)
_LITERAL = ("cluster.peer.secret",)      # read as written; every other value is trimmed
_FAILED = object()                       # present, but its problem is already reported


class _Children:
    """The children of one element of ``<cluster>``, each read through its
    reader (a subsection's value is its element); unknown, repeated and
    misplaced things reported."""

    def __init__(self, el: etree._Element, key: str, readers: _Readers, problems: Problems) -> None:
        self.el, self.key, self.problems = el, key, problems
        self.values: dict[str, list[tuple[object, int]]] = {}  # name -> (value, line) in file order
        _refuse_attributes(el, key, problems)
        for child in el.iterchildren(etree.Element):
            self._read(child, readers)

    def _read(self, child: etree._Element, readers: _Readers) -> None:
        name, line = xml_name(child), child.sourceline or 0
        key = f"{self.key}.{name}"
        if name not in readers:
            known = ", ".join(f"<{n}>" for n in readers)
            self.problems.add(line, key, f"unknown element; <{xml_name(self.el)}> takes {known}")
            return
        if name in self.values and key not in _REPEATABLE:
            self.problems.add(line, key, f"given twice (first on line {self.values[name][0][1]})")
            return
        reader = readers[name]
        if reader is None:
            self.values[name] = [(child, line)]
            return
        _refuse_attributes(child, key, self.problems)
        for grandchild in child.iterchildren(etree.Element):
            self.problems.add(grandchild.sourceline or 0, f"{key}.{xml_name(grandchild)}",
                              "unknown element")
        text = element_text(child)
        value: object = _FAILED
        if "${" in text:
            self.problems.add(line, key, "${} is not expanded in <cluster> (jrouter reads this "
                              "section itself): write the value out")
        else:
            value = self.problems.read(line, key, text if key in _LITERAL else text.strip(), reader, _FAILED)
        self.values.setdefault(name, []).append((value, line))

    def get(self, name: str, default: Any) -> Any:
        """The value of child ``name``, or ``default`` if absent or wrong."""
        found = self.values.get(name)
        return default if not found or found[0][0] is _FAILED else found[0][0]

    def failed(self, *names: str) -> bool:
        """Whether any of ``names`` was given but could not be read."""
        return any(value is _FAILED for name in names for value, _line in self.values.get(name, []))

    def line(self, name: str) -> int:
        found = self.values.get(name)
        return found[0][1] if found else self.el.sourceline or 0

    def required(self, name: str, hint: str) -> Any:
        """The value of child ``name``; its absence is a problem (``hint`` says what to write)."""
        if name not in self.values:
            self.problems.add(self.el.sourceline or 0, f"{self.key}.{name}", f"missing: {hint}")
        return self.get(name, None)


def _refuse_attributes(el: etree._Element, key: str, problems: Problems) -> None:
    for attr in el.attrib:
        problems.add(el.sourceline or 0, f"{key}@{attr}", "unknown attribute (<cluster> takes none)")


def parse_cluster(element: Optional[etree._Element], path: str
                  ) -> tuple[Optional[ClusterSettings], list[str]]:
    """Read ``<cluster>`` (None when absent): ``(settings, problems)``;
    settings are None when there are problems."""
    problems = Problems(path)
    if element is None:
        return None, problems
    top = _Children(element, "cluster", _CLUSTER, problems)
    node = top.required("node", "say this node's id, unique in the cluster (<node>a</node>)")
    peer_el = top.required("peer", "say where this node listens for the other nodes (<peer><ip>..</ip>"
                           "<port>..</port><secret>..</secret></peer>)")
    etcd_el = top.required("etcd", "say where etcd is (<etcd><endpoint>http://host:2379</endpoint></etcd>)")
    peer = _peer(peer_el, problems) if peer_el is not None else None
    etcd = _etcd(etcd_el, problems) if etcd_el is not None else None
    if problems or peer is None or etcd is None:
        return None, problems
    return ClusterSettings(node=node, peer=peer, etcd=etcd, name=top.get("name", ClusterSettings.name),
                           hops=top.get("hops", ClusterSettings.hops)), problems


def _peer(el: etree._Element, problems: Problems) -> Optional[PeerSettings]:
    peer = _Children(el, "cluster.peer", _PEER, problems)
    ip = peer.required("ip", "the address to listen on for the other nodes' links (<ip>10.0.0.1</ip>)")
    port = peer.required("port", "the port to listen on for the other nodes' links (<port>5348</port>)")
    secret = peer.required("secret", "the cluster's shared secret for peer links, the same on every node")
    advertise, pemfile = peer.get("advertise", None), peer.get("pemfile", None)
    cafile = peer.get("cafile", None)
    tls = peer.get("tls", False)
    if ip is not None and ipaddress.ip_address(ip).is_unspecified and "advertise" not in peer.values:
        problems.add(peer.line("ip"), "cluster.peer.ip", f"{ip} listens on every address, so the other "
                     "nodes cannot dial it: say where they reach this node "
                     "(<advertise>host:port</advertise>)")
    if tls and "pemfile" not in peer.values:
        problems.add(peer.line("tls"), "cluster.peer.tls", "needs a <pemfile>: a node that requires TLS "
                     "must offer STARTTLS on its peer port")
    if ip is None or port is None or secret is None:
        return None
    return PeerSettings(ip=ip, port=port, secret=secret, advertise=advertise, pemfile=pemfile,
                        cafile=cafile, tls=tls)


def _etcd(el: etree._Element, problems: Problems) -> Optional[EtcdSettings]:
    etcd = _Children(el, "cluster.etcd", _ETCD, problems)
    etcd.required("endpoint", "at least one etcd client URL (<endpoint>http://10.0.0.9:2379</endpoint>)")
    endpoints: dict[str, int] = {}
    for endpoint, line in etcd.values.get("endpoint", []):
        if endpoint is _FAILED:
            continue
        assert isinstance(endpoint, str)
        if endpoint in endpoints:
            problems.add(line, "cluster.etcd.endpoint",
                         f"{endpoint} is already listed on line {endpoints[endpoint]}")
        endpoints.setdefault(endpoint, line)
    timeout = etcd.get("timeout", EtcdSettings.timeout)
    lease_ttl = etcd.get("lease-ttl", EtcdSettings.lease_ttl)
    if timeout >= lease_ttl and not etcd.failed("timeout", "lease-ttl"):
        given = "timeout" if "timeout" in etcd.values else "lease-ttl"
        problems.add(etcd.line(given), f"cluster.etcd.{given}", f"timeout ({timeout} s) must be less than "
                     f"lease-ttl ({lease_ttl} s): one slow etcd call must not outlast this node's lease")
    return EtcdSettings(endpoints=tuple(endpoints), timeout=timeout, lease_ttl=lease_ttl,
                        bind_wait=etcd.get("bind-wait", EtcdSettings.bind_wait))
