"""Session affinity: which member holds a user's live session, per clustered name.

Owns: for one clustered name, the table key -> member that placement
consults before its hash (``placement.Placement.target``), so that a member
that returns, or a new one, gets only new users: a user whose session lives
elsewhere stays there until it ends (docs/jabberd2-router.md §6.9).

Must not know: sockets, XML, the clock (``now`` comes in), how a member is
chosen when the table has no answer.

Theory of operation
-------------------
A key is what placement hashes (``policy.placement_key``: a bare JID,
usually). An entry names the member (a connection) that holds the key's
session, and when it was last touched. Two ways to learn, by the policy's
``affinity``:

* ``session`` (jabberd2's sm): the sm's session-control replies tell the
  router where sessions live. ``started`` (with the user's ``target`` and
  the sm's session id, ``sc:sm``) counts a session in on the member that
  sent it; ``ended`` names only the session id, so the table remembers
  which key each (member, session id) belongs to, and counts it out; at 0
  sessions the entry goes. A user with sessions on two members (two
  resources placed before and after a change) keeps the entry of the
  latest start: both sessions stay up, and the other member's session
  still gets c2s's own packets by the sm's id.
* ``traffic`` (XEP-0114 gateways, which say nothing of sessions): every
  packet placed for a key touches its entry, made on the member the packet
  went to; a packet a member sends the user refreshes her entry there, or
  makes one when she has none, but never moves it from another member (a
  gateway may keep an old connection for her that still talks: biboumi's
  IRC connection left on a survivor would take her back, tests/e2e/
  test_biboumi_cluster.py); ``idle`` seconds without either, and the entry
  goes.

Several nodes (docs/cluster.md §8, Affinity): a ``traffic`` table made
with ``announce`` calls it with (key, member) when an entry is made or moves,
and again when one is touched half its ``idle`` after it was last said, so
that every node holds the entries any node made and keeps them alive while
traffic flows through one node only; what another node said comes in
through ``noticed``, which, like ``heard_from``, never moves an entry.

Never a gone member: ``member_left`` drops every entry of a member that
leaves, and ``lookup`` checks the member is still one of the name's
(``alive``) before it answers. Bounded: at most ``max_entries`` entries;
past it the least recently touched goes. ``idle`` bounds ``session``
entries too (a missed ``ended`` must not keep one forever): there it is the
age since the last start or end, a day by default.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Hashable, Optional

if TYPE_CHECKING:
    from jrouter.routing.member import RouteMember

SESSION = "session"
TRAFFIC = "traffic"
NONE = "none"
MODES = (NONE, SESSION, TRAFFIC)

#: Defaults of ``affinity-idle``: seconds of silence (traffic) or since the
#: last session start or end (session) after which an entry is dropped.
DEFAULT_IDLE = {TRAFFIC: 600, SESSION: 86400}
DEFAULT_MAX_ENTRIES = 100_000


class _Entry:
    __slots__ = ("member", "sessions", "touched", "said")

    def __init__(self, member: RouteMember, touched: float) -> None:
        self.member = member
        self.sessions: set[str] = set()   # the member's session ids (session mode)
        self.touched = touched
        self.said = touched               # when the other nodes last heard of it (announce)


class AffinityTable:
    """key -> member for one clustered name, least recently touched first."""

    def __init__(self, mode: str, idle: float, max_entries: int = DEFAULT_MAX_ENTRIES,
                 announce: Optional[Callable[[Hashable, RouteMember], None]] = None) -> None:
        if mode not in (SESSION, TRAFFIC):
            raise ValueError(f"affinity mode must be {SESSION!r} or {TRAFFIC!r}, got {mode!r}")
        self.mode = mode
        self.idle = idle
        self.max_entries = max_entries
        # traffic mode, several nodes: tell the others of an entry (see the module doc)
        self.announce = announce if mode == TRAFFIC else None
        self._say_again = idle / 2
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._by_member: dict[RouteMember, set[Hashable]] = {}
        self._session_key: dict[tuple[RouteMember, str], Hashable] = {}   # (member, id) -> key
        #: Counts for the operator: packets placed by an entry, entries moved
        #: to another member (a user's session moved), entries dropped because
        #: their member left, and dropped idle or to make room.
        self.placed_by_affinity = 0
        self.moves = 0
        self.dropped_left = 0
        self.dropped_idle = 0

    def __len__(self) -> int:
        return len(self._entries)

    # -- asking --------------------------------------------------------------

    def lookup(self, key: Hashable, now: float, alive: Callable[[RouteMember], bool]) -> Optional[RouteMember]:
        """The member holding ``key``'s session, if any and still ``alive``
        (a traffic entry is touched: the packet is going there)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now - entry.touched >= self.idle or not alive(entry.member):
            self._drop(key, entry)
            self.dropped_idle += 1
            return None
        if self.mode == TRAFFIC:
            self._traffic(key, entry, now)
        self.placed_by_affinity += 1
        return entry.member

    def member_of(self, key: Hashable) -> Optional[RouteMember]:
        """The entry's member, without touching it (for the operator)."""
        entry = self._entries.get(key)
        return None if entry is None else entry.member

    # -- learning ------------------------------------------------------------

    def placed(self, key: Hashable, member: RouteMember, now: float) -> None:
        """Traffic mode: a packet for ``key`` went to ``member`` by the hash."""
        if self.mode != TRAFFIC:
            return
        entry = self._entries.get(key)
        if entry is not None and entry.member is member:
            self._traffic(key, entry, now)
        else:
            self._made(key, member, now)        # made, or moved

    def heard_from(self, key: Hashable, member: RouteMember, now: float) -> None:
        """Traffic mode: ``member`` sent the user ``key`` a packet: her entry
        there is refreshed, or made if she has none; one elsewhere stays."""
        if self.mode != TRAFFIC:
            return
        entry = self._entries.get(key)
        if entry is None:
            self._made(key, member, now)
        elif entry.member is member:
            self._traffic(key, entry, now)

    def noticed(self, key: Hashable, member: RouteMember, now: float) -> None:
        """Traffic mode: another node says ``key``'s entry is on ``member``:
        made here if there is none, refreshed if it is the same, never moved
        (and not said again: that node told every node)."""
        if self.mode != TRAFFIC:
            return
        entry = self._entries.get(key)
        if entry is None:
            entry = self._set(key, member, now)
        elif entry.member is member:
            self._touch(key, entry, now)
        else:
            return
        entry.said = now

    def session_started(self, key: Hashable, member: RouteMember, session: str, now: float) -> None:
        """Session mode: ``member`` says its session ``session`` of ``key`` started."""
        if self.mode != SESSION:
            return
        entry = self._set(key, member, now)
        entry.sessions.add(session)
        self._session_key[(member, session)] = key

    def session_ended(self, member: RouteMember, session: str, now: float) -> None:
        """Session mode: ``member`` says its session ``session`` ended."""
        key = self._session_key.pop((member, session), None)
        entry = None if key is None else self._entries.get(key)
        if entry is None or entry.member is not member:
            return
        entry.sessions.discard(session)
        if not entry.sessions:
            self._drop(key, entry)
        else:
            self._touch(key, entry, now)

    def member_left(self, member: RouteMember) -> int:
        """``member`` is gone: every entry of its goes; how many."""
        keys = list(self._by_member.get(member, ()))
        for key in keys:
            self._drop(key, self._entries[key])
        self.dropped_left += len(keys)
        return len(keys)

    def expire(self, now: float) -> int:
        """Drop the entries idle for ``idle`` seconds; how many."""
        entries = self._entries
        dropped = 0
        while entries:
            key, entry = next(iter(entries.items()))
            if now - entry.touched < self.idle:
                break
            self._drop(key, entry)
            dropped += 1
        self.dropped_idle += dropped
        return dropped

    def counts(self) -> dict[RouteMember, int]:
        """Entries per member (for /status and metrics)."""
        return {member: len(keys) for member, keys in self._by_member.items()}

    # -- the table -------------------------------------------------------------

    def _set(self, key: Hashable, member: RouteMember, now: float) -> _Entry:
        entry = self._entries.get(key)
        if entry is not None and entry.member is not member:
            self._drop(key, entry)
            self.moves += 1
            entry = None
        if entry is None:
            entry = self._entries[key] = _Entry(member, now)
            self._by_member.setdefault(member, set()).add(key)
            if len(self._entries) > self.max_entries:
                oldest_key, oldest = next(iter(self._entries.items()))
                self._drop(oldest_key, oldest)
                self.dropped_idle += 1
        else:
            self._touch(key, entry, now)
        return entry

    def _made(self, key: Hashable, member: RouteMember, now: float) -> None:
        """Traffic mode: an entry made (or moved) here, told to the other nodes."""
        entry = self._set(key, member, now)
        if self.announce is not None:
            self._say(key, entry, now)

    def _traffic(self, key: Hashable, entry: _Entry, now: float) -> None:
        """Traffic mode: a packet for ``key`` went to, or came from, its entry's
        member: touched, and told again half its idle after it was last told."""
        self._touch(key, entry, now)
        if self.announce is not None and now - entry.said >= self._say_again:
            self._say(key, entry, now)

    def _say(self, key: Hashable, entry: _Entry, now: float) -> None:
        entry.said = now
        self.announce(key, entry.member)      # type: ignore[misc]  # checked by the callers

    def _touch(self, key: Hashable, entry: _Entry, now: float) -> None:
        entry.touched = now
        self._entries.move_to_end(key)

    def _drop(self, key: Hashable, entry: _Entry) -> None:
        del self._entries[key]
        for session in entry.sessions:
            self._session_key.pop((entry.member, session), None)
        keys = self._by_member.get(entry.member)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_member[entry.member]
