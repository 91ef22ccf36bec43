"""Our sections of router.xml, which jabberd2 ignores: ``<status>`` and ``<clustering>``.

Owns: reading each section into its settings (``StatusSettings``; a
``policy.PolicyTable`` of ``policy.ClusterPolicy``) with the one grammar of
``grammar.py``, every problem named by file, line and element.
Must not know: what the status endpoint serves or how a policy places a
packet (status.py and policy.py); only which values are legal.

Both sections are read from their element (not from router_xml's key
table), so ``jrouter-status`` can read ``<status>`` without the rest.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from lxml import etree

from jrouter.routing.policy import (ADDRESSES, AFFINITY, ALGORITHMS, DEAD, KEYS, NODELESS, REPLACE,
                                    ClusterPolicy, PolicyError, PolicyTable, match_name)

from . import grammar
from .grammar import Problems
from .xmlfile import children, element_text

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
