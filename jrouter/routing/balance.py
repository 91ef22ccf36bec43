"""Choosing one member of a cluster (several connections bound to one name).

Owns: the placement algorithms as small pure functions, and the small state
kept per clustered name (pure classes, time passed in as `now`):

  jabberd2_index(n, bare_jid) -> index       jabberd2 2.7's hash modulo n, bit for bit (protocol §6.3)
  rendezvous_pick(key, slot_ids) -> slot id  consistent (HRW) over stable slot ids
  rendezvous_order(key, slot_ids) -> [ids]   the same, every choice in order (failover)
  fixed_slot(key, slots) -> slot             a configured slot count (SAPO)
  node_less_key(jid, raw, full) -> key       a deterministic key instead of rand()
  SlotTable      stable slot ids: a returning instance gets its slot back
  IqTracker      which member sent an IQ request, so the reply goes back to it
  HoldQueue      packets held for a dead slot during a grace period

Must not know: connections, route entries, XML, where the key came from
(which attribute is the key, `to`/`target`/`from`, is the caller's business:
protocol §6.3; policy.py decides it), the clock or randomness: `now` and a
random function are handed in.  Which policy applies to a name is policy.py's.
"""

from __future__ import annotations

import struct
from collections import OrderedDict, deque
from functools import lru_cache
from types import MappingProxyType
from typing import Hashable, Iterable, Mapping, Optional, Sequence

from jrouter.errors import MembershipError
from jrouter.wire.jid import JID

# CPython's own SHA-1 and BLAKE2, the same digests bit for bit: importing
# hashlib loads OpenSSL's libcrypto, 3.4 MiB resident for the process's life,
# and this module is imported at startup, TLS or not (an idle router: 30.2 ->
# 26.6 MiB). hashlib.blake2b is _blake2's anyway; the builtin SHA-1 of a bare
# JID takes ~20 ns more than OpenSSL's (~0.45 us).
try:
    from _blake2 import blake2b as _blake2b  # 64-byte digests by default
    from _sha1 import sha1 as _sha1  # type: ignore[import-not-found]  # no stub in typeshed
except ImportError:     # an interpreter built without them
    from hashlib import blake2b as _blake2b, sha1 as _sha1

__all__ = ["jabberd2_hash", "jabberd2_index",
           "rendezvous_pick", "rendezvous_order", "fixed_slot", "node_less_key",
           "MAX_SLOT_ID", "SlotTable", "SlotBusy", "SlotsFull", "IqTracker", "HoldQueue"]

_WORDS = struct.Struct("<5I")  # SHA-1 as five 32-bit words, little-endian (Debian amd64)


def jabberd2_hash(bare_jid: str) -> int:
    """jabberd2's cluster hash of a prepped bare JID "node@domain".

    SHA-1 of the UTF-8 bytes, read as five little-endian 32-bit words; the C
    loop ends up XOR-ing only words 1, 2 and 3 (word 0 cancels itself, word 4
    is never read), then shifts right by 2.
    """
    _w0, w1, w2, w3, _w4 = _WORDS.unpack(_sha1(bare_jid.encode("utf-8")).digest())
    return (w1 ^ w2 ^ w3) >> 2


def jabberd2_index(member_count: int, bare_jid: str) -> int:
    """The member a bare JID maps to among `member_count` (plain modulo)."""
    return jabberd2_hash(bare_jid) % member_count


# ---------------------------------------------------------------------------
# Consistent placement: rendezvous (highest random weight) hashing.
#
# Every (slot id, key) pair gets a 64-bit score and the key goes to the live
# slot with the highest score.  When a slot leaves, only the keys it won move
# (each to its own second choice, so they spread evenly over the survivors);
# when it returns, exactly those keys come back and nobody else moves.  The
# score must not depend on which other slots exist, so scores are indexed by
# slot id, never by position in a list.
#
# Speed: one BLAKE2b-512 call yields the scores of eight slot ids at once
# (block j covers ids 8j..8j+7: the digest of b"hrw<j>:" + the UTF-8 key),
# so a pick among the usual handful of members costs one hash call, not one
# per member.  Slot ids are small because SlotTable hands out the lowest free
# id; the cost grows with the largest id / 8.  Picks are cached per (key,
# slot set), bounded: a user's burst of packets costs one hash, and a change
# of members simply misses the cache.

MAX_SLOT_ID = 1023
RENDEZVOUS_CACHE = 16384  # (key, slot set) pairs; about 200 bytes each
_SCORES_PER_BLOCK = 8
_PREFIXES = tuple(b"hrw%d:" % block for block in range(MAX_SLOT_ID // _SCORES_PER_BLOCK + 1))
_UNPACK = tuple(struct.Struct(">%dQ" % (_SCORES_PER_BLOCK * blocks)).unpack
                for blocks in range(len(_PREFIXES) + 1))


def _scores(key: str, slot_ids: Sequence[int]) -> tuple[int, ...]:
    """The scores of slot ids 0..max(slot_ids) for `key`, indexable by slot id."""
    if not slot_ids:
        raise ValueError("no slots to pick from")
    top = max(slot_ids)
    if top > MAX_SLOT_ID or min(slot_ids) < 0:
        raise ValueError(f"slot ids must be in 0..{MAX_SLOT_ID}")
    data = key.encode("utf-8", "surrogatepass")  # never raise on odd input
    if top < _SCORES_PER_BLOCK:  # the usual case: one hash call
        return _UNPACK[1](_blake2b(_PREFIXES[0] + data).digest())
    blocks = top // _SCORES_PER_BLOCK + 1
    return _UNPACK[blocks](b"".join([_blake2b(_PREFIXES[block] + data).digest() for block in range(blocks)]))


def rendezvous_pick(key: str, slot_ids: Sequence[int]) -> int:
    """The slot id in `slot_ids` with the highest score for `key`.

    Order of `slot_ids` does not matter, except that a tie (two equal 64-bit
    scores, chance 2**-64 per pair) goes to the one listed first; pass ids in
    ascending order (SlotTable.live() does) to make even that reproducible.
    """
    return _cached_pick(key, tuple(slot_ids))


@lru_cache(maxsize=RENDEZVOUS_CACHE)
def _cached_pick(key: str, slot_ids: tuple[int, ...]) -> int:
    return max(slot_ids, key=_scores(key, slot_ids).__getitem__)


def rendezvous_order(key: str, slot_ids: Sequence[int]) -> list[int]:
    """All of `slot_ids`, best choice first: the failover order for `key`."""
    return sorted(slot_ids, key=_scores(key, slot_ids).__getitem__, reverse=True)


# ---------------------------------------------------------------------------
# Fixed slot count (SAPO's balancer, ejabberd's component_number).


def fixed_slot(key: str, slots: int) -> int:
    """The slot `key` belongs to among a configured count, whoever is connected.

    jabberd2's own hash modulo `slots`: stable and uniform, and with every
    slot connected in slot order it places a bare JID exactly where jabberd2
    would with the same number of members bound in that order, so an operator
    can move from one to the other without moving users.
    """
    if slots < 1:
        raise ValueError("the slot count must be at least 1")
    return jabberd2_hash(key) % slots


def node_less_key(jid: Optional[JID], raw: str, full: bool = False) -> str:
    """A deterministic key for an address without a node (jabberd2: random).

    The domain (the full JID when `full`, e.g. 'muc.example.com/x'), or, for
    an address that is not a JID at all, its raw text: the same address then
    always reaches the same member, never a crash.
    """
    if jid is None:
        return raw
    return jid.full if full else jid.bare


# ---------------------------------------------------------------------------
# Stable instance identity.


class SlotBusy(MembershipError, ValueError):
    """The identity's slot is held by a live connection (a second copy, or a half-open old one)."""

    def __init__(self, identity: str, slot: int) -> None:
        super().__init__(f"{identity!r} already holds slot {slot} on a live connection")
        self.identity = identity
        self.slot = slot


class SlotsFull(MembershipError, ValueError):
    """Every slot is held by a live connection."""


DEFAULT_CAPACITY = 256  # slot ids when no count is configured; far above any real cluster


class SlotTable:
    """Slot ids of one clustered name's members, stable across reconnections.

    An instance's identity (see policy.py for how the router derives it) is
    remembered with its slot after it leaves, so when it comes back it gets
    the same slot, whatever order the instances reconnect in, and placement
    after a watchdog restart equals placement before it.  A new identity takes
    the lowest slot never reserved.  An identity-less member (biboumi sends
    no stream 'from') cannot be told from another one: its slot stays
    reserved for "some identity-less member" after it leaves, so that
    dead='hold' and 'bounce' apply to it, and the next identity-less member
    takes the lowest such slot first, else the lowest slot neither live nor
    reserved.  When all `limit` slots are reserved, a newcomer takes the
    lowest one whose owner is absent (that owner is forgotten); when all are
    live, `claim` raises SlotsFull.

    The memory lives as long as this object: to keep it over a router
    restart, save `snapshot()` and pass it back as `remembered`.
    """

    def __init__(self, slots: Optional[int] = None,
                 remembered: Mapping[str, int] = MappingProxyType({})) -> None:
        self.limit = slots if slots is not None else DEFAULT_CAPACITY
        if not 1 <= self.limit <= MAX_SLOT_ID + 1:
            raise ValueError(f"the slot count must be in 1..{MAX_SLOT_ID + 1}")
        self._slot_of: dict[str, int] = {}   # identity -> reserved slot (kept after release)
        self._owner: dict[int, str] = {}     # reserved slot -> identity
        self._live: tuple[int, ...] = ()     # ascending, read on every packet
        self._known: tuple[int, ...] = ()    # live or reserved, ascending, read on every packet
        self._anonymous: set[int] = set()    # reserved for an absent identity-less member
        for identity, slot in remembered.items():
            if 0 <= slot < self.limit and slot not in self._owner:
                self._reserve(identity, slot)
        self._update()

    def claim(self, identity: Optional[str] = None) -> int:
        """Give a connecting member a slot id; SlotBusy / SlotsFull say why not."""
        slot = self.choose(identity)
        self.take(slot, identity)
        return slot

    def choose(self, identity: Optional[str] = None) -> int:
        """The slot ``claim`` would give, without taking it (a node of a
        cluster claims it in etcd first: docs/cluster.md §8)."""
        if identity is not None and identity in self._slot_of:
            slot = self._slot_of[identity]
            if slot in self._live:
                raise SlotBusy(identity, slot)
            return slot
        if identity is None and self._anonymous:
            return min(self._anonymous)
        return self._free_slot()

    def take(self, slot: int, identity: Optional[str] = None) -> None:
        """``slot`` is live now, held by ``identity`` (a slot ``choose`` gave,
        or one another node of the cluster took): whoever else it was
        reserved for loses it."""
        if not 0 <= slot < self.limit:
            raise SlotsFull(f"slot {slot} is not one of the {self.limit} slots")
        self._anonymous.discard(slot)
        owner = self._owner.get(slot)
        if owner is not None and owner != identity:
            del self._slot_of[owner]
            del self._owner[slot]
        if identity is not None:
            previous = self._slot_of.get(identity)
            if previous is not None and previous != slot:
                del self._owner[previous]
            self._reserve(identity, slot)
        self._update(self._live + (slot,) if slot not in self._live else None)

    def reset(self, reserved: Mapping[int, Optional[str]], live: Iterable[int]) -> None:
        """The whole state from the cluster's table: ``reserved`` slot ->
        identity (None: kept for some identity-less member), ``live`` the
        slots with a member now."""
        self._slot_of.clear()
        self._owner.clear()
        self._anonymous.clear()
        for slot, identity in reserved.items():
            if not 0 <= slot < self.limit:
                continue
            if identity is None:
                self._anonymous.add(slot)
            elif identity not in self._slot_of:
                self._reserve(identity, slot)
        live_slots = tuple(slot for slot in live if 0 <= slot < self.limit)
        self._anonymous.difference_update(live_slots)
        self._update(live_slots)

    def release(self, slot: int) -> None:
        """The member in `slot` left; the slot stays reserved for its identity
        (or for the next identity-less member)."""
        if slot in self._live and slot not in self._owner:
            self._anonymous.add(slot)
        self._update(tuple(s for s in self._live if s != slot))

    def forget(self, identity: str) -> None:
        """Drop a remembered identity (operator removed an instance for good)."""
        slot = self._slot_of.pop(identity, None)
        if slot is not None:
            del self._owner[slot]
            self._update()

    def live(self) -> tuple[int, ...]:
        """The slot ids with a connected member, ascending."""
        return self._live

    def known(self) -> tuple[int, ...]:
        """Live slots plus those reserved for absent identities, ascending."""
        return self._known

    def slot_of(self, identity: str) -> Optional[int]:
        """The slot reserved for `identity`, if any."""
        return self._slot_of.get(identity)

    def snapshot(self) -> dict[str, int]:
        """Identity -> slot, to persist and hand back as `remembered`."""
        return dict(self._slot_of)

    def _reserve(self, identity: str, slot: int) -> None:
        self._slot_of[identity] = slot
        self._owner[slot] = identity

    def _update(self, live: Optional[tuple[int, ...]] = None) -> None:
        """Recompute the ascending tuples the per-packet path reads."""
        if live is not None:
            self._live = tuple(sorted(live))
        self._known = tuple(sorted(set(self._live).union(self._owner, self._anonymous)))

    def _free_slot(self) -> int:
        live = set(self._live)
        for slot in range(self.limit):
            if slot not in live and slot not in self._owner and slot not in self._anonymous:
                return slot
        if self._anonymous:  # reserved for an absent identity-less member: take it over
            return min(self._anonymous)
        for slot in range(self.limit):
            if slot not in live:  # reserved by an absent identity: take() forgets it
                return slot
        raise SlotsFull(f"all {self.limit} slots are held by connected members")


# ---------------------------------------------------------------------------
# IQ replies back to the member that sent the request.


class IqTracker:
    """Which member sent an IQ get/set, so its result or error goes back to it.

    Key: (stanza id, requester address, responder address), i.e. the
    request's (id, from, to) and the reply's (id, to, from); the caller
    normalises addresses the same way both times (prepped full JIDs).  The
    value is an opaque member token.  Entries last `timeout` seconds; at most
    `limit` are kept, the oldest dropped first, so a flood of unanswered
    requests costs bounded memory.  `now` is any monotonic clock, in seconds.
    """

    def __init__(self, timeout: float = 60.0, limit: int = 65536) -> None:
        self.timeout = timeout
        self.limit = limit
        self._entries: OrderedDict[tuple, tuple[float, object]] = OrderedDict()  # oldest first

    def remember(self, stanza_id: str, requester: str, responder: str,
                 token: object, now: float) -> None:
        """Note that `token`'s member sent request `stanza_id` from `requester` to `responder`."""
        self.expire(now)
        key = (stanza_id, requester, responder)
        self._entries.pop(key, None)  # a reused id starts a new lifetime, at the end
        self._entries[key] = (now + self.timeout, token)
        while len(self._entries) > self.limit:
            self._entries.popitem(last=False)

    def take(self, stanza_id: str, requester: str, responder: str, now: float) -> Optional[object]:
        """The token of the member awaiting this reply (forgotten once taken), or None."""
        entry = self._entries.pop((stanza_id, requester, responder), None)
        if entry is None or entry[0] <= now:
            return None
        return entry[1]

    def expire(self, now: float) -> int:
        """Forget requests older than the timeout; returns how many."""
        dropped = 0
        entries = self._entries
        while entries and next(iter(entries.values()))[0] <= now:
            entries.popitem(last=False)
            dropped += 1
        return dropped

    def __len__(self) -> int:
        return len(self._entries)


# ---------------------------------------------------------------------------
# Holding packets for a dead slot.


class _Held:
    __slots__ = ("deadline", "packets", "sizes", "size")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.packets: deque = deque()
        self.sizes: deque[int] = deque()   # each packet's, as given to hold
        self.size = 0                      # their sum


class HoldQueue:
    """Packets for a dead slot, kept for a grace period, then bounced.

    The grace period of a (name, slot) starts when the router reports the
    member gone (`down`), or else at the first packet held for it, and lasts
    `seconds`.  When the instance returns in time, `release` hands the packets
    back in arrival order; a watchdog restart loses nothing.  After the
    period, `expired` hands them over for bouncing and the slot is *gone*:
    further packets bounce at once (`hold` returns them) until the instance
    returns, so clients are not kept waiting for an instance that is not
    coming back.  At most `limit` packets and `limit_bytes` bytes per slot
    (0: no byte bound): when full, the oldest are bounced to make room, the
    newest always kept.  Packets are opaque; their size comes with them.
    """

    def __init__(self, seconds: float = 30.0, limit: int = 10000, limit_bytes: int = 0) -> None:
        self.seconds = seconds
        self.limit = limit
        self.limit_bytes = limit_bytes
        self._held: dict[tuple[Hashable, int], _Held] = {}
        self._gone: set[tuple[Hashable, int]] = set()

    def down(self, name: Hashable, slot: int, now: float, seconds: Optional[float] = None) -> None:
        """The member in `slot` left: its grace period starts now (not extended if running)."""
        key = (name, slot)
        if key not in self._held:
            self._gone.discard(key)
            self._held[key] = _Held(now + (self.seconds if seconds is None else seconds))

    def hold(self, name: Hashable, slot: int, packet: object, now: float,
             seconds: Optional[float] = None, size: int = 0) -> list:
        """Keep `packet` (`size` bytes) for the slot; returns the packets to
        bounce now (usually none).

        That is the oldest held packets when the slot's queue is full, or
        `packet` itself when the slot's grace period is over.
        """
        key = (name, slot)
        if key in self._gone:
            return [packet]
        if key not in self._held:
            self.down(name, slot, now, seconds)
        held = self._held[key]
        held.packets.append(packet)
        held.sizes.append(size)
        held.size += size
        out = []
        while len(held.packets) > 1 and (len(held.packets) > self.limit or
                                         0 < self.limit_bytes < held.size):
            out.append(held.packets.popleft())
            held.size -= held.sizes.popleft()
        return out

    def release(self, name: Hashable, slot: int) -> list:
        """The instance is back: its held packets, oldest first, to deliver."""
        key = (name, slot)
        self._gone.discard(key)
        held = self._held.pop(key, None)
        return list(held.packets) if held is not None else []

    def expired(self, now: float) -> list[tuple[Hashable, int, list]]:
        """(name, slot, packets) whose grace period is over: bounce them all."""
        over = [key for key, held in self._held.items() if held.deadline <= now]
        out = []
        for key in over:
            out.append((key[0], key[1], list(self._held.pop(key).packets)))
            self._gone.add(key)
        return out

    def __len__(self) -> int:
        """Packets held, all slots together."""
        return sum(len(held.packets) for held in self._held.values())

    def size(self) -> int:
        """Bytes held, all slots together."""
        return sum(held.size for held in self._held.values())
