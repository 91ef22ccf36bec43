"""Each node's copy of the cluster table, and what changed in it.

Owns ``TableMirror``: the table as etcd holds it (keys.py's layout), read by
routing on every packet without asking etcd, and the change values that
tell the router what to do when the table moves (re-place held packets,
advertise names, open or close peer links). Also the plain input values
the I/O side makes from etcd's answers: ``Put``, ``Delete``, ``Batch``.

Must not know: etcd's API or HTTP, sockets, gevent, the clock, routing's
connections (a member here is a name, a node id and a member id).

Theory of operation
-------------------
The state is a function of the key-value set alone, never of the way it
arrived: a mirror that applied every watch batch, one that got the same
events batched otherwise, and one that loaded a snapshot at the same
revision hold the same table, in the same member order.

The unit of change is a revision. etcd gives every event one (a delete's
is the revision that deleted the key), and every event of one txn, or of
one lease's expiry, has the same. ``apply`` takes a batch revision by
revision and compares the table before and after each: the changes say
what differs, never what happened in between, so a member replaced within
one txn is a MemberLeft and a MemberJoined with no NameDown/NameUp between,
and a dead node's hundred keys are one revision's worth of changes. The
router acts on one batch's changes at once (re-placing held packets once
per batch: scaleout notes, "process a watch response ..."). ``load_snapshot``
makes the same comparison between what the mirror held and the snapshot,
so after a compaction the router hears the net difference: nothing twice,
nothing missed. Batches at or below the applied revision change nothing.

One revision's changes come in this order, each group in key order:
NodeLeft, NodeJoined, NodeUpdated, MemberLeft, MemberJoined (in member
order), MemberUpdated, NameDown, NameUp, UniqueReleased, UniqueTaken,
DefaultChanged, LogSinkChanged, SlotsChanged, Unreadable. A key created again (a new
create_revision: a new bind, a node back under a new lease) leaves and
joins, it is not an update. NameUp is a name's first member anywhere,
NameDown its last gone: one router's ``type='unavailable'`` (protocol
§4.3). One router says available on every bind (§6.8), which is each
MemberJoined; NameUp is there for those who want the first only.

Member order, per name: by the member key's create_revision, then by key.
Every node computes it from the same revision, so it is the cluster's bind
order (jabberd2's placement, protocol §6.2-6.3, needs one); a leaver does
not swap the last member into its place as in one router.

Slots, per name under a slot policy: ``slots/<name>/<slot>`` names the
member that took the slot last and the identity it is kept for; the slot
is live while that member's key exists. A member's slot is the one whose
key names it (``slot_of``); a member no slot key names has none (an extra
member: slot placement never picks it). SlotsChanged(name) says some slot
key of the name changed in the revision.

A key or value that keys.py cannot read is left out of the table and
reported once as Unreadable, when it appears or changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Collection, Iterable, Mapping, NamedTuple, Optional, Sequence, TypeVar, Union

from jrouter.cluster.keys import (
    DefaultKey, Key, Layout, LayoutError, LogKey, MemberKey, NodeKey, SlotKey, UniqueKey, decode_value)

if TYPE_CHECKING:
    from typing import NoReturn, TypeAlias, assert_never
else:
    # typing has it from Python 3.11 on; Debian's pypy3 is 3.9 (docs/architecture.md, PyPy).
    def assert_never(value: object) -> NoReturn:
        raise AssertionError(f"unhandled: {value!r}")

__all__ = ["Put", "Delete", "Event", "Batch", "MemberRef", "Node", "Member", "DefaultRoute", "Slot",
           "NodeJoined", "NodeLeft", "NodeUpdated", "MemberJoined", "MemberLeft", "MemberUpdated",
           "NameUp", "NameDown", "UniqueTaken", "UniqueReleased", "DefaultChanged",
           "LogSinkChanged", "SlotsChanged", "Unreadable", "Change", "TableMirror"]


# -- what the I/O side hands in ------------------------------------------------


@dataclass(frozen=True)
class Put:
    """A key's value, as a watch event or as one entry of a snapshot."""

    key: bytes
    value: bytes
    lease: int                 # 0: none
    create_revision: int
    mod_revision: int


@dataclass(frozen=True)
class Delete:
    """A key gone; ``mod_revision`` is the revision that deleted it."""

    key: bytes
    mod_revision: int


Event: TypeAlias = Union[Put, Delete]


@dataclass(frozen=True)
class Batch:
    """One watch response: its header revision and its events, in revision order.

    The header revision vouches for completeness only when there are no
    events (a progress notice, which etcd sends only to a watcher that has
    caught up). A catch-up response of over 1,000 revisions carries the
    store's revision in its header but leaves the rest of the events to the
    next response (etcd's watchable_store.go, syncWatchers, ``moreRev``), so
    the mirror then counts itself at its last event's revision.
    """

    revision: int
    events: Sequence[Event]


# -- the table's entries -------------------------------------------------------


class MemberRef(NamedTuple):
    """One connection of the cluster: the node it is on, and the node's id for it."""

    node: str
    id: str


@dataclass(frozen=True)
class Node:
    """A jrouter node of the cluster (nodes/<node>)."""

    id: str
    address: str               # its peer link, host:port
    started: float
    version: str
    create_revision: int
    lease: int


@dataclass(frozen=True)
class Member:
    """One member of a name, on some node (members/<name>/<node>/<member>)."""

    name: str
    node: str
    id: str
    kind: str                  # table.SINGLE, MULTI_TO, MULTI_FROM
    identity: Optional[str]    # stable slot identity, or None
    bound: float
    create_revision: int
    lease: int

    @property
    def ref(self) -> MemberRef:
        return MemberRef(self.node, self.id)


@dataclass(frozen=True)
class DefaultRoute:
    """The one <default/> route: the name it was bound with, and its member."""

    name: str
    owner: MemberRef
    create_revision: int


@dataclass(frozen=True)
class Slot:
    """One slot of a name under a slot policy (slots/<name>/<slot>)."""

    name: str
    slot: int
    identity: Optional[str]    # the identity it is kept for; None: any identity-less member
    owner: MemberRef           # the member that took it last (live while its member key is)
    mod_revision: int          # what a txn taking it over compares


@dataclass(frozen=True)
class _Unique:
    name: str
    owner: MemberRef
    create_revision: int


@dataclass(frozen=True)
class _Sink:
    name: str
    owner: MemberRef
    create_revision: int


# -- change values ---------------------------------------------------------------


@dataclass(frozen=True)
class NodeJoined:
    node: Node


@dataclass(frozen=True)
class NodeLeft:
    node: Node


@dataclass(frozen=True)
class NodeUpdated:
    old: Node
    new: Node


@dataclass(frozen=True)
class MemberJoined:
    member: Member


@dataclass(frozen=True)
class MemberLeft:
    member: Member


@dataclass(frozen=True)
class MemberUpdated:
    old: Member
    new: Member


@dataclass(frozen=True)
class NameUp:
    """The name's first member anywhere: advertise it available."""

    name: str


@dataclass(frozen=True)
class NameDown:
    """The name's last member anywhere is gone: advertise it unavailable."""

    name: str


@dataclass(frozen=True)
class UniqueTaken:
    name: str
    owner: MemberRef


@dataclass(frozen=True)
class UniqueReleased:
    name: str
    owner: MemberRef


@dataclass(frozen=True)
class DefaultChanged:
    old: Optional[DefaultRoute]
    new: Optional[DefaultRoute]


@dataclass(frozen=True)
class LogSinkChanged:
    """The name's log sink (its latest) is now ``new`` (None: none)."""

    name: str
    old: Optional[MemberRef]
    new: Optional[MemberRef]


@dataclass(frozen=True)
class SlotsChanged:
    """Some slot key of ``name`` was written or deleted."""

    name: str


@dataclass(frozen=True)
class Unreadable:
    """A key under the prefix that keys.py cannot read; also kept as its record."""

    key: bytes
    reason: str


Change: TypeAlias = Union[NodeJoined, NodeLeft, NodeUpdated, MemberJoined, MemberLeft, MemberUpdated,
                          NameUp, NameDown, UniqueTaken, UniqueReleased, DefaultChanged,
                          LogSinkChanged, SlotsChanged, Unreadable]
_Record: TypeAlias = Union[Node, Member, _Unique, DefaultRoute, _Sink, Slot, Unreadable]
_Write: TypeAlias = "tuple[bytes, Optional[_Record]]"   # (key, its entry or None: deleted)
_K = TypeVar("_K")
_V = TypeVar("_V")


def _read(layout: Layout, kv: Put) -> _Record:
    """The table entry a stored key-value stands for."""
    try:
        key: Key = layout.parse(kv.key)
        # isinstance, not match: Debian's pypy3 is Python 3.9
        if isinstance(key, NodeKey):
            n = decode_value(key, kv.value)
            return Node(key.node, n.address, n.started, n.version, kv.create_revision, kv.lease)
        if isinstance(key, MemberKey):
            m = decode_value(key, kv.value)
            return Member(key.name, key.node, key.member, m.kind, m.identity, m.bound,
                          kv.create_revision, kv.lease)
        if isinstance(key, UniqueKey):
            u = decode_value(key, kv.value)
            return _Unique(key.name, MemberRef(u.node, u.member), kv.create_revision)
        if isinstance(key, DefaultKey):
            d = decode_value(key, kv.value)
            return DefaultRoute(d.name, MemberRef(d.node, d.member), kv.create_revision)
        if isinstance(key, LogKey):
            decode_value(key, kv.value)
            return _Sink(key.name, MemberRef(key.node, key.member), kv.create_revision)
        if isinstance(key, SlotKey):
            v = decode_value(key, kv.value)
            return Slot(key.name, key.slot, v.identity, MemberRef(v.node, v.member), kv.mod_revision)
        assert_never(key)
    except LayoutError as exc:
        return Unreadable(kv.key, str(exc))


def _sort_key(item: tuple[bytes, Member]) -> tuple[int, bytes]:
    return item[1].create_revision, item[0]


class TableMirror:
    """The cluster table of one etcd prefix, in memory, and its changes."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        #: the etcd revision through which the table has every event (0: nothing yet)
        self.revision = 0
        self._records: dict[bytes, _Record] = {}
        self._nodes: dict[str, Node] = {}
        self._by_name: dict[str, dict[bytes, Member]] = {}
        self._ordered: dict[str, tuple[Member, ...]] = {}      # names with members only
        self._unique: dict[str, _Unique] = {}
        self._default: Optional[DefaultRoute] = None
        self._sinks: dict[str, dict[bytes, _Sink]] = {}
        self._sink_of: dict[str, MemberRef] = {}                # name -> its latest sink
        self._slots: dict[str, dict[int, Slot]] = {}
        self._slot_held: dict[tuple[str, MemberRef], int] = {}  # (name, member) -> its slot

    # -- feeding ------------------------------------------------------------------

    def load_snapshot(self, revision: int, kvs: Iterable[Put]) -> list[Change]:
        """Replace the table by a range read at ``revision`` (at start, or after
        a compaction); returns what differs from what the mirror held."""
        if revision < self.revision:
            return []
        fresh = {kv.key: _read(self.layout, kv) for kv in kvs}
        writes: list[_Write] = [(key, None) for key in self._records if key not in fresh]
        writes.extend(fresh.items())
        changes = self._transition(writes)
        self.revision = revision
        return changes

    def apply(self, batch: Batch) -> list[Change]:
        """One watch response; returns its changes, revision by revision.

        Afterwards ``revision`` is the batch's last event's (or, without
        events, the batch's): resume a broken watch from ``revision + 1``."""
        if batch.revision <= self.revision:
            return []
        # Events at or below the applied revision were applied (an overlapping batch).
        events = [event for event in batch.events if event.mod_revision > self.revision]
        revisions = [event.mod_revision for event in events] + [batch.revision]
        if revisions != sorted(revisions):   # checked first: nothing half-applied
            raise ValueError(f"events out of revision order in a batch at {batch.revision}: "
                             f"{revisions[:-1]}")
        changes: list[Change] = []
        group: list[_Write] = []
        current = self.revision
        for event in events:
            if event.mod_revision != current and group:
                changes += self._transition(group)
                group = []
            current = event.mod_revision
            group.append((event.key, _read(self.layout, event) if isinstance(event, Put) else None))
        if group:
            changes += self._transition(group)
        self.revision = max(self.revision, batch.events[-1].mod_revision) if batch.events else batch.revision
        return changes

    # -- reading (per packet: no copies) ---------------------------------------------

    def members(self, name: str) -> tuple[Member, ...]:
        """``name``'s members anywhere, in the cluster's member order."""
        return self._ordered.get(name, ())

    def names(self) -> Collection[str]:
        """The names with at least one member."""
        return self._ordered.keys()

    def nodes(self) -> Mapping[str, Node]:
        return MappingProxyType(self._nodes)

    def node_of(self, member: Union[MemberRef, Member]) -> Optional[Node]:
        """The node a member is on (where its packets go), if it is registered."""
        return self._nodes.get(member.node)

    def owner_of_unique(self, name: str) -> Optional[MemberRef]:
        """Who bound ``name`` without multi, cluster-wide."""
        unique = self._unique.get(name)
        return unique.owner if unique is not None else None

    def default_route(self) -> Optional[DefaultRoute]:
        return self._default

    def log_sinks(self) -> Mapping[str, MemberRef]:
        """Name -> its log sink (the latest one bound)."""
        return MappingProxyType(self._sink_of)

    def slots(self, name: str) -> Mapping[int, Slot]:
        """``name``'s slot keys, by slot number."""
        return MappingProxyType(self._slots.get(name, {}))

    def slot_of(self, name: str, member: MemberRef) -> Optional[int]:
        """The slot of ``name`` whose key names ``member``, if one does."""
        return self._slot_held.get((name, member))

    # -- one revision (or a snapshot) -------------------------------------------------

    def _transition(self, writes: list[_Write]) -> list[Change]:
        """Store ``writes`` (key, entry or None to delete) as one step; what changed."""
        before: dict[bytes, Optional[_Record]] = {key: self._records.get(key) for key, _ in writes}
        touched = list(before.values()) + [record for _, record in writes]
        names = {r.name for r in touched if isinstance(r, Member)}
        sink_names = {r.name for r in touched if isinstance(r, _Sink)}
        slot_names = {r.name for r in touched if isinstance(r, Slot)}
        served = {name: name in self._ordered for name in names}
        sinks = {name: self._sink_of.get(name) for name in sink_names}
        default = self._default
        for key, record in writes:
            self._store(key, record)
        for name in names:
            self._reorder(name)
        for name in sink_names:
            self._pick_sink(name)
        return self._changes(before, served, sinks, default, slot_names)

    def _store(self, key: bytes, record: Optional[_Record]) -> None:
        old = self._records.pop(key, None)
        if old is not None:
            self._index(key, old, present=False)
        if record is not None:
            self._records[key] = record
            self._index(key, record, present=True)

    def _index(self, key: bytes, record: _Record, present: bool) -> None:
        if isinstance(record, Node):
            _set(self._nodes, record.id, record, present)
        elif isinstance(record, Member):
            _set(self._by_name.setdefault(record.name, {}), key, record, present)
        elif isinstance(record, _Unique):
            _set(self._unique, record.name, record, present)
        elif isinstance(record, DefaultRoute):
            self._default = record if present else None
        elif isinstance(record, _Sink):
            _set(self._sinks.setdefault(record.name, {}), key, record, present)
        elif isinstance(record, Slot):
            slots = self._slots.setdefault(record.name, {})
            _set(slots, record.slot, record, present)
            held = (record.name, record.owner)
            if present or self._slot_held.get(held) == record.slot:
                _set(self._slot_held, held, record.slot, present)
            if not slots:
                del self._slots[record.name]

    def _reorder(self, name: str) -> None:
        members = self._by_name.get(name)
        if members:
            self._ordered[name] = tuple(m for _, m in sorted(members.items(), key=_sort_key))
        else:
            self._by_name.pop(name, None)
            self._ordered.pop(name, None)

    def _pick_sink(self, name: str) -> None:
        sinks = self._sinks.get(name)
        if sinks:
            _, latest = max(sinks.items(), key=lambda item: (item[1].create_revision, item[0]))
            self._sink_of[name] = latest.owner
        else:
            self._sinks.pop(name, None)
            self._sink_of.pop(name, None)

    def _changes(self, before: dict[bytes, Optional[_Record]], served: dict[str, bool],
                 sinks: dict[str, Optional[MemberRef]], default: Optional[DefaultRoute],
                 slot_names: set[str]) -> list[Change]:
        """The change values between ``before`` (with the views saved beside it) and now."""
        gone: list[_Record] = []             # each list in key order
        came: list[_Record] = []
        updated: list[tuple[_Record, _Record]] = []
        unreadable: list[Change] = []
        for key in sorted(before):
            old, new = before[key], self._records.get(key)
            if old == new:
                continue
            if isinstance(new, Unreadable):
                unreadable.append(new)
                new = None
            if isinstance(old, Unreadable):
                old = None
            if old is not None and new is not None and _same_entry(old, new):
                updated.append((old, new))
            elif old != new:
                gone += [old] if old is not None else []
                came += [new] if new is not None else []
        members_came = sorted((r for r in came if isinstance(r, Member)), key=lambda m: m.create_revision)
        out: list[Change] = [NodeLeft(r) for r in gone if isinstance(r, Node)]
        out += [NodeJoined(r) for r in came if isinstance(r, Node)]
        out += [NodeUpdated(o, n) for o, n in updated if isinstance(o, Node) and isinstance(n, Node)]
        out += [MemberLeft(r) for r in gone if isinstance(r, Member)]
        out += [MemberJoined(r) for r in members_came]           # stable sort: member order
        out += [MemberUpdated(o, n) for o, n in updated if isinstance(o, Member) and isinstance(n, Member)]
        out += [NameDown(name) for name in sorted(served) if served[name] and name not in self._ordered]
        out += [NameUp(name) for name in sorted(served) if not served[name] and name in self._ordered]
        out += [UniqueReleased(r.name, r.owner) for r in gone if isinstance(r, _Unique)]
        out += [UniqueTaken(r.name, r.owner) for r in came if isinstance(r, _Unique)]
        if default != self._default:
            out.append(DefaultChanged(default, self._default))
        out += [LogSinkChanged(name, sinks[name], self._sink_of.get(name))
                for name in sorted(sinks) if sinks[name] != self._sink_of.get(name)]
        out += [SlotsChanged(name) for name in sorted(slot_names)]
        return out + unreadable


def _same_entry(old: _Record, new: _Record) -> bool:
    """Whether ``new`` updates ``old`` (the key was not created anew): a node's
    or member's value changed in place. Anything else leaves and joins."""
    return isinstance(old, (Node, Member)) and type(old) is type(new) \
        and old.create_revision == new.create_revision


def _set(table: dict[_K, _V], key: _K, value: _V, present: bool) -> None:
    if present:
        table[key] = value
    else:
        table.pop(key, None)
