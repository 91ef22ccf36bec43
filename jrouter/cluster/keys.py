"""The cluster table's layout in etcd: every key and every value, in one place.

Owns the key layout, the value format, and turning both into bytes and back.
Must not know: etcd's API (compares, leases, watches are the I/O side's),
the clock (times are handed in, seconds since the epoch), routing (beyond
the names of its route kinds).

Under ``/jrouter/<cluster>/``::

    key                              value (a JSON object)          written
    nodes/<node>                     address, started, version      at start, under the node's lease
    members/<name>/<node>/<member>   kind, identity, bound          on bind, under the node's lease
    unique/<name>                    node, member                   on a bind without multi, only if
                                                                    absent, under the node's lease
    default                          name, node, member             on <bind><default/>, only if
                                                                    absent, under the node's lease
    logs/<name>/<node>/<member>      bound                          on <bind><log/>, under the lease
    slots/<name>/<slot>              identity, node, member         when a member of a name under a
                                                                    slot policy takes the slot; no
                                                                    lease: it outlives the member

``<name>`` is a bound name (a prepped domain), ``<node>`` the operator's
node id, ``<member>`` the node's id for one connection. ``address`` is the
node's peer link (host:port); ``kind`` is the route kind of table.py
(``single``, ``multi-to`` for jabberd2 ``multi``, ``multi-from`` for
XEP-0114); ``identity`` is the member's stable slot identity (an sm's
``<id>``, an XEP-0114 copy's stream ``from``) or null.

A bind without multi is one txn: its member key and ``unique/<name>``, on
condition that ``unique/<name>`` is absent and nothing is under
``members_prefix(name)`` (the name served anywhere: 409, protocol §4.2
step 3). A multi bind puts its member key alone. An unbind deletes its
keys in one txn, so every mirror sees it as one revision.

A slot key says which member holds the slot (the member is live while its
member key exists) and which identity it is kept for after that member
leaves (null: for the next identity-less member), so that an instance
coming back on any node gets its slot again and every node numbers members
alike (docs/cluster.md §8). It is written in one txn with the member key,
on condition that its mod_revision is what the writer read: two nodes
giving one slot away at once get one success. ``<slot>`` is its decimal
number, 0 to 1023.

Why log sinks carry the name: a connection may be the log sink of several
names, and a later sink of a name replaces the earlier one (protocol §4.7),
which the mirror can only tell per name.

Segments (cluster, name, node, member) are percent-encoded UTF-8: every
byte but ASCII letters, digits and ``-._~@:`` becomes ``%XX`` (upper-case
hex), so no segment contains '/' and every '%' starts an escape. Decoding
is strict, accepting only the one spelling encoding gives (never ``%2f``,
nor ``%41`` for 'A'), so keys and their parts correspond one to one: two
nodes can never write one member under two keys. Values are compact JSON
with sorted fields; readers ignore fields they do not know (a newer
version may add some) and refuse a value whose known fields are missing or
of the wrong type.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Optional, Union, overload
from urllib.parse import quote, unquote

from jrouter.errors import JrouterError
from jrouter.routing.table import MULTI_FROM, MULTI_TO, SINGLE

if TYPE_CHECKING:
    from typing import TypeAlias

__all__ = ["ROOT", "LayoutError", "Layout", "prefix_end",
           "NodeKey", "MemberKey", "UniqueKey", "DefaultKey", "LogKey", "SlotKey", "Key",
           "NodeValue", "MemberValue", "OwnerValue", "DefaultValue", "LogValue", "SlotValue", "Value",
           "KINDS", "encode_value", "decode_value"]

ROOT = "/jrouter/"
_SAFE = "@:"    # besides letters, digits and '_.-~', which quote() never escapes
KINDS = (SINGLE, MULTI_TO, MULTI_FROM)
MAX_SLOT = 1023         # balance.MAX_SLOT_ID (not imported: keys.py must not know placement)


class LayoutError(JrouterError, ValueError):
    """A key or value that is not in this layout (written by someone else, or corrupt)."""


# -- keys --------------------------------------------------------------------


@dataclass(frozen=True)
class NodeKey:
    node: str


@dataclass(frozen=True)
class MemberKey:
    name: str
    node: str
    member: str


@dataclass(frozen=True)
class UniqueKey:
    name: str


@dataclass(frozen=True)
class DefaultKey:
    pass


@dataclass(frozen=True)
class LogKey:
    name: str
    node: str
    member: str


@dataclass(frozen=True)
class SlotKey:
    name: str
    slot: int


Key: TypeAlias = Union[NodeKey, MemberKey, UniqueKey, DefaultKey, LogKey, SlotKey]

# key class <-> first segment; the other segments are the class's fields, in order.
_SECTION: dict[type, str] = {NodeKey: "nodes", MemberKey: "members", UniqueKey: "unique",
                             DefaultKey: "default", LogKey: "logs", SlotKey: "slots"}
_CLASS = {section: cls for cls, section in _SECTION.items()}
_ARITY = {cls: len(fields(cls)) for cls in _SECTION}


def _segment(text: str) -> str:
    """One path segment, percent-encoded."""
    if not isinstance(text, str) or not text:
        raise LayoutError(f"a key segment must be a non-empty string, got {text!r}")
    try:
        return quote(text, safe=_SAFE)
    except UnicodeEncodeError as exc:      # a lone surrogate
        raise LayoutError(f"a key segment must be valid Unicode: {exc}") from None


def _unsegment(segment: str) -> str:
    """The text of a segment, if ``segment`` is exactly how _segment spells it."""
    try:
        text = unquote(segment, errors="strict")
    except UnicodeDecodeError:
        raise LayoutError(f"segment {segment[:60]!r} is not UTF-8") from None
    if not text or quote(text, safe=_SAFE) != segment:
        raise LayoutError(f"segment {segment[:60]!r} is empty or not in canonical percent-encoding")
    return text


class Layout:
    """The keys of one cluster: ``/jrouter/<cluster>/...``."""

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster
        #: every key of this cluster and of no other starts with it (watch and snapshot this)
        self.prefix = (ROOT + _segment(cluster) + "/").encode("ascii")

    def key(self, key: Key) -> bytes:
        """The etcd key of ``key``."""
        parts = [_SECTION[type(key)]] + [_segment(_text_of(getattr(key, f.name))) for f in fields(key)]
        return self.prefix + "/".join(parts).encode("ascii")

    def parse(self, raw: bytes) -> Key:
        """The key ``raw`` stands for; LayoutError says why it is not one of ours."""
        if not raw.startswith(self.prefix):
            raise LayoutError(f"{_shown(raw)} is not under {self.prefix!r}")
        try:
            section, *parts = raw[len(self.prefix):].decode("ascii").split("/")
        except UnicodeDecodeError:
            raise LayoutError(f"{_shown(raw)} is not ASCII") from None
        cls = _CLASS.get(section)
        if cls is None or len(parts) != _ARITY[cls]:
            raise LayoutError(f"{_shown(raw)} is not a key of this layout")
        texts = list(map(_unsegment, parts))
        if cls is SlotKey:
            return SlotKey(texts[0], _slot_number(texts[1]))
        key: Key = cls(*texts)
        return key

    def members_prefix(self, name: str) -> bytes:
        """Every member key of ``name`` and no other's (for a compare over the range)."""
        return self.prefix + f"{_SECTION[MemberKey]}/{_segment(name)}/".encode("ascii")


def _text_of(part: object) -> str:
    """A key's field as the text of its segment (a slot number in decimal)."""
    if isinstance(part, int) and not isinstance(part, bool):
        if not 0 <= part <= MAX_SLOT:
            raise LayoutError(f"a slot must be in 0..{MAX_SLOT}, got {part}")
        return str(part)
    if not isinstance(part, str):
        raise LayoutError(f"a key segment must be a non-empty string, got {part!r}")
    return part


def _slot_number(text: str) -> int:
    """A slot segment: decimal, no sign or leading zero, 0..MAX_SLOT."""
    if not text.isascii() or not text.isdigit() or (len(text) > 1 and text[0] == "0") \
            or int(text) > MAX_SLOT:
        raise LayoutError(f"slot {text[:20]!r} is not a number in 0..{MAX_SLOT}")
    return int(text)


def _shown(raw: bytes) -> str:
    """A key for an error message: a stored key may be long."""
    return repr(raw[:100]) + ("..." if len(raw) > 100 else "")


def prefix_end(prefix: bytes) -> bytes:
    """etcd's range_end for "every key starting with ``prefix``"."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"                       # etcd: every key
    return stripped[:-1] + bytes([stripped[-1] + 1])


# -- values ------------------------------------------------------------------

Kind: TypeAlias = str        # one of KINDS


@dataclass(frozen=True)
class NodeValue:
    """nodes/<node>: where its peer link listens, since when, which jrouter."""

    address: str             # host:port
    started: float           # seconds since the epoch
    version: str             # jrouter.__version__

    def __post_init__(self) -> None:
        _check(self)


@dataclass(frozen=True)
class MemberValue:
    """members/<name>/<node>/<member>: how it bound."""

    kind: Kind               # table.SINGLE, MULTI_TO or MULTI_FROM
    identity: Optional[str]  # stable slot identity (protocol §6.5), or None
    bound: float             # seconds since the epoch

    def __post_init__(self) -> None:
        _check(self)


@dataclass(frozen=True)
class OwnerValue:
    """unique/<name>: the one member that bound it without multi."""

    node: str
    member: str

    def __post_init__(self) -> None:
        _check(self)


@dataclass(frozen=True)
class DefaultValue:
    """default: the name bound with <default/>, and its member."""

    name: str
    node: str
    member: str

    def __post_init__(self) -> None:
        _check(self)


@dataclass(frozen=True)
class LogValue:
    """logs/<name>/<node>/<member>: when it became the name's log sink."""

    bound: float

    def __post_init__(self) -> None:
        _check(self)


@dataclass(frozen=True)
class SlotValue:
    """slots/<name>/<slot>: the member that took it last, and the identity it is kept for."""

    identity: Optional[str]  # null: kept for the next identity-less member
    node: str
    member: str

    def __post_init__(self) -> None:
        _check(self)


Value: TypeAlias = Union[NodeValue, MemberValue, OwnerValue, DefaultValue, LogValue, SlotValue]
_VALUE_OF: dict[type, type] = {NodeKey: NodeValue, MemberKey: MemberValue, UniqueKey: OwnerValue,
                               DefaultKey: DefaultValue, LogKey: LogValue, SlotKey: SlotValue}


def _finite(v: object) -> bool:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:        # an integer too large for a float
        return False


def _text(v: object) -> bool:
    return isinstance(v, str) and v != ""


# One grammar for every value field, by its annotation.
_FIELD_CHECKS: dict[str, tuple[Callable[[object], bool], str]] = {
    "str": (_text, "a non-empty string"),
    "Optional[str]": (lambda v: v is None or _text(v), "null or a non-empty string"),
    "float": (_finite, "a finite number"),
    "Kind": (lambda v: v in KINDS, "one of " + ", ".join(KINDS)),
}


def _check(value: Value) -> None:
    for f in fields(value):
        ok, expected = _FIELD_CHECKS[str(f.type)]
        if not ok(getattr(value, f.name)):
            raise LayoutError(f"{type(value).__name__}.{f.name} must be {expected}, "
                              f"got {repr(getattr(value, f.name))[:40]}")


def encode_value(value: Value) -> bytes:
    """The bytes to store for ``value`` (ASCII JSON, fields sorted)."""
    return json.dumps(asdict(value), sort_keys=True, separators=(",", ":"),
                      allow_nan=False).encode("ascii")


@overload
def decode_value(key: NodeKey, raw: bytes) -> NodeValue: ...
@overload
def decode_value(key: MemberKey, raw: bytes) -> MemberValue: ...
@overload
def decode_value(key: UniqueKey, raw: bytes) -> OwnerValue: ...
@overload
def decode_value(key: DefaultKey, raw: bytes) -> DefaultValue: ...
@overload
def decode_value(key: LogKey, raw: bytes) -> LogValue: ...
@overload
def decode_value(key: SlotKey, raw: bytes) -> SlotValue: ...


def decode_value(key: Key, raw: bytes) -> Value:
    """The value stored under ``key``; LayoutError says what is wrong with it."""
    cls = _VALUE_OF[type(key)]
    try:
        obj = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:   # UnicodeDecodeError is a ValueError
        raise LayoutError(f"value is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise LayoutError("value is not a JSON object")
    args: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in obj:
            raise LayoutError(f"value has no {f.name!r}")
        item = obj[f.name]
        args[f.name] = float(item) if f.type == "float" and _finite(item) else item
    value: Value = cls(**args)
    return value


def _no_constant(name: str) -> None:
    raise LayoutError(f"value contains {name}")
