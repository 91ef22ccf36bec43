"""router.xml: read once, validated in one place, frozen into a ``Config``.

Owns how jabberd2 reads its configuration (``util/config.c`` ``config_load``,
``router/main.c`` ``_router_config_expand``, ``router/aci.c``; protocol
§2.1-2.4) and every check we add on top, with the readers of grammar.py; our
own sections come from sections.py.  It must not know what the settings are
used for: it does not open sockets, log files or pidfiles.

Theory of operation
-------------------
1. The file is parsed with a hardened lxml parser (no DTD, no entities, no
   network).  Every element below the root becomes an entry under its dotted
   path (``<local><port>`` is ``local.port``); the root's name is ignored and
   repeated elements keep every occurrence.  An element's value is its own
   text, as expat hands it over (text before its first child element, comments
   skipped, nothing trimmed); an element without text has the value ``"1"``.
2. ``${key}`` in a value is replaced by the first value of ``key`` among the
   entries already read, in document order; ``-i`` is seeded as ``id`` before
   anything else, so it wins over ``<id>``.
3. ``_build`` reads each setting from the first occurrence of its key through
   the table ``_SETTINGS`` (key, default, validator) or a section builder
   (log, limits, access, aliases, components, ACLs, and sections.py's
   ``<status>``, ``<clustering>`` and ``<cluster>``).  Every problem is
   collected, named by file, line and element path, and reported together in
   one ``ConfigError``.
   Unknown elements are ignored so any router.xml written for jabberd2 loads.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Union

from lxml import etree

from jrouter.routing.access import ALLOW_DENY, DENY_ALLOW, AccessRule, AccessRules, RateLimit, parse_mask
from jrouter.errors import ConfigurationError
from jrouter.routing.guard import AuthLimits
from jrouter.routing.policy import PolicyTable

from . import grammar
from .grammar import D, Problems, T
from .sections import (ClusterSettings, StatusSettings, clustering_state_dir, parse_cluster,
                       parse_clustering, parse_status)
from .xmlfile import XMLProblem, children, element_text, parse_xml, xml_name

CONFIG_DIR = "/etc/jabberd2"  # Debian's; upstream's default is the configure prefix
DEFAULT_CONFIG_FILE = CONFIG_DIR + "/router.xml"
# sx/ssl.c: "!aNULL:!eNULL:!EXP:" SSL_DEFAULT_CIPHER_LIST; DEFAULT names that list.
DEFAULT_CIPHERS = "DEFAULT:!aNULL:!eNULL:!EXP"  # OpenSSL takes DEFAULT only first
DEFAULT_STANZA_SIZE = 1048576
# Bytes queued for one peer (output not yet taken by its socket, and what a
# throttle holds back) before it counts as not reading (docs/jabberd2-router.md §3.9).
DEFAULT_QUEUE_LIMIT = 16 * 1024 * 1024

# util/log.c _log_facilities; anything else, or none, means local7.
SYSLOG_FACILITIES = tuple(f"local{n}" for n in range(8)) + ("log_user",)


# ---------------------------------------------------------------------------
# The settings and their types.


class ConfigError(ConfigurationError):
    """The configuration cannot be used; ``problems`` lists every reason, one string each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class LogSettings:
    """``<log type=...>``: where log lines go (protocol §1.6)."""

    type: str = "stdout"  # 'stdout' | 'file' | 'syslog'
    ident: str = "jabberd/router"
    facility: str = "local7"  # one of SYSLOG_FACILITIES, lower case
    file: Optional[str] = None
    debug: Optional[str] = None  # log.debug: where debug lines go (jabberd2 debug builds only)


@dataclass(frozen=True)
class Alias:
    """``<alias name=... target=.../>``: route ``name`` to whoever bound ``target`` (protocol §4.11)."""

    name: str
    target: str


@dataclass(frozen=True)
class Config:
    """Everything the router takes from router.xml, validated.  Defaults are jabberd2's (protocol §2.2)."""

    source: str = DEFAULT_CONFIG_FILE
    id: str = "router"
    pidfile: Optional[str] = None
    log: LogSettings = field(default_factory=LogSettings)
    ip: str = "0.0.0.0"
    port: int = 5347
    users_file: str = CONFIG_DIR + "/router-users.xml"
    secret: Optional[str] = None
    pemfile: Optional[str] = None
    private_key_password: Optional[str] = None
    ciphers: str = DEFAULT_CIPHERS
    max_fds: int = 1024
    bytes_limit: RateLimit = field(default_factory=RateLimit)
    connects_limit: RateLimit = field(default_factory=RateLimit)
    auth_limits: AuthLimits = field(default_factory=AuthLimits)  # ours: <io><limits> before authentication
    stanza_size_limit: int = DEFAULT_STANZA_SIZE  # ours: <io><limits><stanzasize>, 0 = unlimited
    queue_limit: int = DEFAULT_QUEUE_LIMIT  # ours: <io><limits><queue>, bytes queued per peer, 0 = unlimited
    access: AccessRules = field(default_factory=AccessRules)
    check_interval: int = 60
    keepalive: int = 0
    aliases: tuple[Alias, ...] = ()
    acls: Mapping[str, frozenset[str]] = field(default_factory=lambda: MappingProxyType({}))
    filter_file: str = CONFIG_DIR + "/router-filter.xml"
    message_logging_enabled: bool = False
    message_logging_file: Optional[str] = None
    status: Optional[StatusSettings] = None  # ours: <status>, the operator's HTTP endpoint
    clustering: Optional[PolicyTable] = None  # ours: <clustering>, per-name balancing policies
    placement_state_dir: Optional[str] = None  # ours: <clustering state-dir>, slots kept over restarts
    cluster: Optional[ClusterSettings] = None  # ours: <cluster>, this router is one node of several (etcd)
    # ours: <components>, XEP-0114 names whose stanzas keep jabberd2's jabber:client
    component_namespaces: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def acl_allows(self, acl_type: Optional[str], username: str) -> bool:
        """``aci_check``: ``username`` is in ACL ``all`` or in ACL ``acl_type`` (exact match)."""
        if username in self.acls.get("all", ()):
            return True
        return acl_type is not None and username in self.acls.get(acl_type, ())

    @property
    def message_logging(self) -> bool:
        """Message logging needs both ``<enabled/>`` and ``<file>`` (protocol §7.1)."""
        return self.message_logging_enabled and self.message_logging_file is not None


# Plain settings: Config field, key, validator.  Defaults come from Config.
_SETTINGS: tuple[tuple[str, str, Callable[[str], object]], ...] = (
    ("id", "id", grammar.text),
    ("pidfile", "pidfile", grammar.text),
    ("ip", "local.ip", grammar.ip_literal),
    ("port", "local.port", grammar.port),
    ("users_file", "local.users", grammar.text),
    ("secret", "local.secret", grammar.text),
    ("pemfile", "local.pemfile", grammar.text),
    ("private_key_password", "local.private_key_password", grammar.text),
    ("ciphers", "local.ciphers", grammar.text),
    ("max_fds", "io.max_fds", grammar.positive),
    ("stanza_size_limit", "io.limits.stanzasize", grammar.non_negative),
    ("queue_limit", "io.limits.queue", grammar.non_negative),
    ("check_interval", "check.interval", grammar.non_negative),
    ("keepalive", "check.keepalive", grammar.non_negative),
    ("filter_file", "aci.filter", grammar.text),
    ("message_logging_enabled", "message_logging.enabled", grammar.jabberd2_flag),
    ("message_logging_file", "message_logging.file", grammar.text),
)


# ---------------------------------------------------------------------------
# Reading the key table (config_load_with_id).


@dataclass
class _Entry:
    value: str
    attrs: Mapping[str, str]
    line: int
    failed: bool = False  # its ${} expansion failed; already reported


class _Reader:
    """The key table of one file, plus the problems found so far."""

    def __init__(self, path: str, root: etree._Element, id_override: Optional[str]) -> None:
        self.path = path
        self.root = root
        self.problems = Problems(path)
        self.table: dict[str, list[_Entry]] = {}
        if id_override is not None:
            self.table["id"] = [_Entry(id_override, {}, 0)]
        self._walk(root, "")

    def problem(self, line: int, key: str, message: str) -> None:
        self.problems.add(line, key, message)

    def _walk(self, parent: etree._Element, prefix: str) -> None:
        for el in parent.iterchildren(etree.Element):
            key = prefix + xml_name(el)
            entry = _Entry("1", dict(el.attrib), el.sourceline or 0)
            text = element_text(el)
            if text:
                entry.value, entry.failed = self._expand(text, key, entry.line)
            self.table.setdefault(key, []).append(entry)
            self._walk(el, key + ".")

    def _expand(self, text: str, key: str, line: int) -> tuple[str, bool]:
        """Replace ``${var}`` as _config_expandx does: leftmost first, rescanning the result."""
        for _ in range(1000):
            start = text.find("${")
            if start < 0:
                return text, False
            end = text.find("}", start + 2)
            if end < 0:
                self.problem(line, key, "'${' without a closing '}'")
                return text, True
            var = text[start + 2:end]
            known = self.table.get(var)
            if not known:
                self.problem(line, key, f"${{{var}}} is not defined (no <{var}> element before this one)")
                return text, True
            if known[0].failed:
                return text, True
            text = text[:start] + known[0].value + text[end + 1:]
        self.problem(line, key, "${} expansion does not terminate")
        return text, True

    def first(self, key: str) -> Optional[_Entry]:
        entries = self.table.get(key)
        return entries[0] if entries else None

    def get(self, key: str, default: D, validate: Callable[[str], T]) -> Union[T, D]:
        entry = self.first(key)
        if entry is None or entry.failed:
            return default
        return self.check(entry.value, entry.line, key, default, validate)

    def check(self, value: str, line: int, key: str, default: D, validate: Callable[[str], T]) -> Union[T, D]:
        return self.problems.read(line, key, value, validate, default)


# ---------------------------------------------------------------------------
# Section builders: each reads what jabberd2 reads, the way it reads it.


def _log(r: _Reader) -> LogSettings:
    entry = r.first("log")
    kind = entry.attrs.get("type") if entry is not None else None
    kind = kind if kind in ("file", "syslog") else "stdout"  # jabberd2: anything else is stdout
    facility = r.get("log.facility", None, grammar.text)
    facility = facility.lower() if isinstance(facility, str) else None
    file = r.get("log.file", None, grammar.text)
    if entry is not None and kind == "file" and r.first("log.file") is None:
        r.problem(entry.line, "log@type", "type='file' needs a <file> element naming the log file")
    return LogSettings(
        type=kind,
        ident=r.get("log.ident", LogSettings.ident, grammar.text),
        facility=facility if facility in SYSLOG_FACILITIES else "local7",
        file=file,
        debug=r.get("log.debug", None, grammar.text),
    )


def _rate(r: _Reader, key: str, default: RateLimit = RateLimit()) -> RateLimit:
    """A ``<bytes>``-shaped limit: the count as text, ``seconds`` and
    ``throttle`` attributes; ``default`` when the element is absent."""
    entry = r.first(key)
    if entry is None or entry.failed:
        return default
    total = r.check(entry.value, entry.line, key, 0, grammar.non_negative)
    if total == 0:
        return RateLimit()  # jabberd2 does not even read the attributes then

    def attr(name: str) -> int:
        value = entry.attrs.get(name)
        fallback = getattr(default, name)
        return fallback if value is None else r.check(value, entry.line, f"{key}@{name}", fallback, grammar.non_negative)

    return RateLimit(total, attr("seconds"), attr("throttle"))


def _auth_limits(r: _Reader) -> AuthLimits:
    """Ours: the limits on peers that have not authenticated (protocol §3.10)."""
    def get(name: str, key: str) -> int:
        return r.get(f"io.limits.{key}", getattr(AuthLimits, name), grammar.non_negative)

    return AuthLimits(timeout=get("timeout", "authtimeout"),
                      stanza_size=get("stanza_size", "authstanzasize"),
                      unauthenticated=get("unauthenticated", "unauthenticated"),
                      attempts=get("attempts", "authattempts"),
                      failures=_rate(r, "io.limits.authfailures", AuthLimits().failures))


def _access(r: _Reader) -> AccessRules:
    entry = r.first("io.access.order")
    order = r.get("io.access.order", ALLOW_DENY, grammar.text).strip(" \t\r\n")
    if entry is not None and order not in (ALLOW_DENY, DENY_ALLOW):  # the default is valid
        # jabberd2 takes anything but "deny,allow" as allow,deny, so a typo
        # quietly opens the router; we refuse.
        r.problem(entry.line, "io.access.order", f"must be 'allow,deny' or 'deny,allow', got {order!r}")
        order = ALLOW_DENY
    return AccessRules(order, _access_rules(r, "io.access.allow"), _access_rules(r, "io.access.deny"))


def _access_rules(r: _Reader, key: str) -> tuple[AccessRule, ...]:
    rules = []
    for entry in r.table.get(key, []):
        ip, mask = entry.attrs.get("ip"), entry.attrs.get("mask")
        if ip is None:
            r.problem(entry.line, key, "missing the ip attribute")  # jabberd2 skips the rule
            continue
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            r.problem(entry.line, f"{key}@ip", f"{ip!r} is not an IPv4 or IPv6 address")
            continue
        try:
            rules.append(AccessRule(address, parse_mask(mask, address.version)))
        except ValueError as exc:
            r.problem(entry.line, f"{key}@mask", str(exc))
    return tuple(rules)


def _aliases(r: _Reader) -> tuple[Alias, ...]:
    aliases: dict[str, tuple[Alias, int]] = {}
    for entry in r.table.get("aliases.alias", []):
        names: dict[str, Optional[str]] = {}
        for attr in ("name", "target"):
            value = entry.attrs.get(attr)
            if value is None:
                r.problem(entry.line, "aliases.alias", f"missing the {attr} attribute")
            else:
                names[attr] = r.check(value, entry.line, f"aliases.alias@{attr}", None, grammar.domain)
        name, target = names.get("name"), names.get("target")
        if name is None or target is None:
            continue
        if name in aliases:
            seen = aliases[name][1]
            r.problem(entry.line, "aliases.alias@name", f"alias {name!r} is already defined on line {seen}")
            continue
        aliases[name] = (Alias(name, target), entry.line)
    return tuple(alias for alias, _line in aliases.values())


# What an XEP-0114 component may receive its stanzas in (docs: man page, COMPONENTS).
COMPONENT_NAMESPACES = ("jabber:component:accept", "jabber:client")


def _component_namespaces(r: _Reader) -> Mapping[str, str]:
    namespaces: dict[str, tuple[str, int]] = {}
    for entry in r.table.get("components.component", []):
        name = entry.attrs.get("name")
        namespace = entry.attrs.get("namespace")
        for attr, value in (("name", name), ("namespace", namespace)):
            if value is None:
                r.problem(entry.line, "components.component", f"missing the {attr} attribute")
        unknown = sorted(set(entry.attrs) - {"name", "namespace"})
        if unknown:
            r.problem(entry.line, "components.component", f"unknown attribute {unknown[0]!r}")
        if name is None or namespace is None:
            continue
        name = r.check(name, entry.line, "components.component@name", None, grammar.domain)
        if namespace not in COMPONENT_NAMESPACES:
            r.problem(entry.line, "components.component@namespace",
                      f"{namespace!r} is not one of {', '.join(COMPONENT_NAMESPACES)}")
            continue
        if name is None:
            continue
        if name in namespaces:
            r.problem(entry.line, "components.component@name",
                      f"component {name!r} is already listed on line {namespaces[name][1]}")
            continue
        namespaces[name] = (namespace, entry.line)
    return MappingProxyType({name: ns for name, (ns, _line) in namespaces.items()})


def _acls(root: etree._Element) -> Mapping[str, frozenset[str]]:
    """``aci_load``: read straight from the tree, so user names are raw text, never ${}-expanded."""
    acls: dict[str, frozenset[str]] = {}
    aci = children(root, "aci")
    for acl in children(aci[0], "acl") if aci else []:
        kind = acl.get("type")
        if kind is None:
            continue
        users = frozenset(t for t in (element_text(u) for u in children(acl, "user")) if t)
        if users:  # an <acl> with no users leaves an earlier one of its type alone
            acls[kind[:32]] = users
    return MappingProxyType(acls)


def _section(r: _Reader, name: str,
             parse: Callable[[etree._Element, str], tuple[T, list[str]]]) -> Optional[T]:
    """An optional section with a parser of its own (``parse(element, path)
    -> (value, problems)``); its problems join everyone else's. None when
    the section is absent."""
    found = children(r.root, name)
    if not found:
        return None
    value, problems = parse(found[0], r.path)
    r.problems.extend(problems)
    return value


def _build(r: _Reader, source: str) -> Config:
    values: dict[str, Any] = {name: r.get(key, getattr(Config, name, None), validate)
                              for name, key, validate in _SETTINGS}
    return Config(
        status=_section(r, "status", parse_status),
        clustering=_section(r, "clustering", parse_clustering),
        placement_state_dir=_section(r, "clustering", clustering_state_dir),
        cluster=_section(r, "cluster", parse_cluster),
        source=source,
        log=_log(r),
        bytes_limit=_rate(r, "io.limits.bytes"),
        connects_limit=_rate(r, "io.limits.connects"),
        auth_limits=_auth_limits(r),
        access=_access(r),
        aliases=_aliases(r),
        component_namespaces=_component_namespaces(r),
        acls=_acls(r.root),
        **values,
    )


def load_config(path: str, id_override: Optional[str] = None) -> Config:
    """Read and validate router.xml; ``id_override`` is ``-i``.  Raises ``ConfigError`` with every problem."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ConfigError([f"couldn't open {path} for reading: {exc.strerror}"]) from None
    try:
        root = parse_xml(data)
    except XMLProblem as exc:
        raise ConfigError([f"{path}:{exc.line}: parse error: {exc.message}"]) from None
    reader = _Reader(path, root, id_override)
    config = _build(reader, path)
    if reader.problems:
        raise ConfigError(reader.problems)
    return config


