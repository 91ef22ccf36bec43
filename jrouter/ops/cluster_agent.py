"""A node's agent in the cluster (issue 13): its lease, its keys in etcd, and
its mirror of the whole table, kept by gevent greenlets.

Owns: the node's lease (granted on joining, refreshed every TTL/3, revoked on
leaving); ``nodes/<node>`` under it; the watch that feeds a
``cluster.mirror.TableMirror`` and hands each watch batch's changes to the
router in one call; re-snapshots after a compaction; retries with a bounded
backoff while etcd is away; the router's writes (members, unique names, the
default route, log sinks), every one under the current lease; and fencing.
Must not know: connections, packets, routing, placement. It talks to the
router through ``ClusterHooks`` only, and every hook runs in one of the
agent's greenlets, never in the greenlet of a router call.

The fencing rule
----------------
A node whose lease may be gone acts dead: "a node that loses its lease acts
dead, then rejoins, so no user is ever served by two sm" (issue 13;
docs/spec scaleout.md, "Things that bite"). The agent counts its lease gone
TTL seconds after the *sending* of the last keepalive etcd answered, on the
monotonic clock, so it never counts on more time than etcd gives (etcd
counts from when the keepalive arrived) and a process paused past the TTL
(SIGSTOP, a stalled VM) sees on waking that the lease is surely gone. It also
fences at once when etcd says the lease is gone (a keepalive's TTL 0, a write
refused with "lease not found", its own node key deleted or taken over).

Fencing ends the term (one lease's life): the watch is closed, the mirror
forgotten (``mirror`` is empty while fenced), pending deletes dropped (the
lease's keys go with it), writes refused with ``Fenced``, and
``on_fenced()`` runs. When etcd answers again the agent revokes the old
lease (if etcd still holds it, its keys vanish now, in one revision), grants
a new one, puts ``nodes/<node>`` again, re-creates what ``held_keys()``
returns, reads a fresh snapshot, calls ``on_rejoined(lost)`` and hands the
snapshot over as changes. Other nodes thus see at most one leave and one
join for it.

Short of the TTL, an outage costs nothing: the mirror stays as it is (routing
goes on from it), keepalives and the watch are retried, and the watch resumes
from the last applied revision + 1, so nothing is missed or seen twice. A new
etcd leader extends every lease on promotion, so a restart within the TTL
does not expire the lease.

Greenlets: ``_run`` (joins, waits for the term to end, calls ``on_fenced``,
rejoins), per term ``_keepalive`` and ``_watch``, and ``_drain`` (deletes
the router asked for, retried until done). Hooks are serialised by one lock,
so ``on_fenced`` never runs beside ``on_changes``; etcd writes by another
lock, so a rejoin never interleaves with a write of the old term.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Protocol, Sequence, TypeVar, Union

import gevent
import gevent.event
import gevent.lock

from jrouter import __version__
from jrouter.cluster.keys import (
    DefaultKey, DefaultValue, Key, Layout, LayoutError, LogKey, LogValue, MemberKey, MemberValue, NodeKey,
    NodeValue, OwnerValue, SlotKey, SlotValue, UniqueKey, Value, encode_value)
from jrouter.cluster.mirror import Batch, Change, Delete, Put, TableMirror
from jrouter.errors import JrouterError
from jrouter.ops.etcd_client import (
    NOT_FOUND, EtcdClient, EtcdError, EtcdFailure, EtcdUnavailable, EventKind, KeyValue, Watch,
    WatchBatch, WatchCompacted)

__all__ = ["ClusterAgent", "ClusterHooks", "AgentState", "ClusterUnavailable", "Fenced"]

_T = TypeVar("_T")


class ClusterUnavailable(JrouterError):
    """A write the cluster could not take: etcd did not answer within bind_wait,
    or refused it. The router answers the bind with an error."""


class Fenced(ClusterUnavailable):
    """The node is not in the cluster now (fenced, joining or stopped): writes are refused."""


class AgentState(enum.Enum):
    JOINING = "joining"     # before the first join
    JOINED = "joined"
    FENCED = "fenced"       # acting dead until a rejoin
    STOPPED = "stopped"


class ClusterHooks(Protocol):
    """The router's side. Each runs in an agent greenlet, one at a time."""

    def on_changes(self, changes: list[Change], revision: int) -> None:
        """One watch batch's (or one snapshot's) changes, through ``revision``."""

    def on_fenced(self) -> None:
        """The lease may be gone: act dead now (close peer links and components)."""

    def on_rejoined(self, lost: list[Key]) -> None:
        """Back under a new lease; ``lost``: held keys someone else took meanwhile."""

    def held_keys(self) -> Iterable[tuple[Key, Value]]:
        """What this node still holds and must re-create under the new lease."""


class _Log(Protocol):
    def notice(self, message: str) -> None: ...
    def warning(self, message: str) -> None: ...


class _Silent:
    def notice(self, message: str) -> None:
        pass

    def warning(self, message: str) -> None:
        pass


class _Late(Exception):
    """A call outlived the time left to it (the lease's, or bind_wait)."""


@dataclass(eq=False)
class _Term:
    """One lease's life: it ends when the node is fenced or stops."""

    lease: int
    ttl: int
    deadline: float                    # monotonic: the lease is surely gone after it
    mirror: TableMirror
    ended: gevent.event.Event = field(default_factory=gevent.event.Event)
    watch: Optional[Watch] = None      # the open watch, if any


class ClusterAgent:
    """Node `node` of cluster `cluster`, its peer link at `address`, in etcd at
    `endpoints`. `timeout` bounds every etcd call, `ttl` is the lease's (s),
    `bind_wait` how long a write waits for etcd before ``ClusterUnavailable``."""

    #: Retries while etcd is away wait this long at first, doubling up to `backoff_most`.
    backoff_first = 0.05
    backoff_most = 1.0

    def __init__(self, cluster: str, node: str, address: str, endpoints: Sequence[str],
                 hooks: ClusterHooks, *, timeout: float = 1.0, ttl: int = 10,
                 bind_wait: float = 5.0, log: Optional[_Log] = None) -> None:
        self.layout = Layout(cluster)
        self.node = node
        self.address = address
        self.hooks = hooks
        self.ttl = ttl
        self.bind_wait = bind_wait
        self.log: _Log = log or _Silent()
        self.client = EtcdClient(endpoints, timeout)
        self.started = time.time()
        self._node_key = self.layout.key(NodeKey(node))
        self._state = AgentState.JOINING
        self._term: Optional[_Term] = None
        self._lease = 0                          # the newest lease granted, until revoked
        self._empty = TableMirror(self.layout)   # what a node out of the cluster sees
        self._joined = gevent.event.Event()
        self._stopping = gevent.event.Event()
        self._hooks_lock = gevent.lock.Semaphore()
        self._writes = gevent.lock.Semaphore()
        # Deletes asked for, oldest first: key -> the value it must still have
        # under our lease (shared keys), or None (keys only this node writes).
        # One entry per key, so no more than the keys the router wrote.
        # Deletes are taken while fenced too: the rejoin re-creates what
        # held_keys() says, and a later ask to delete must still win.
        self._pending: dict[bytes, Optional[bytes]] = {}
        self._pending_ready = gevent.event.Event()
        self._drained = gevent.event.Event()
        self._drained.set()
        self._greenlets: list[gevent.Greenlet] = []

    # -- what the router reads ------------------------------------------------

    @property
    def state(self) -> AgentState:
        return self._state

    @property
    def lease(self) -> int:
        """The current lease's id (0 when not joined)."""
        return self._term.lease if self._term is not None else 0

    @property
    def mirror(self) -> TableMirror:
        """The table as of the last batch (empty when not joined): read it
        through this property each time, a rejoin brings a new one."""
        return self._term.mirror if self._term is not None else self._empty

    # -- life -------------------------------------------------------------------

    def start(self) -> None:
        """Join in the background (retried until etcd answers); see ``wait_joined``."""
        self._spawn(self._run)
        self._spawn(self._drain)

    def wait_joined(self, timeout: Optional[float] = None) -> bool:
        """Wait (bounded) until the node is in the cluster: its keys written, its mirror loaded."""
        return self._joined.wait(timeout)

    def stop(self, timeout: float = 5.0, revoke: bool = True) -> None:
        """Leave: end the greenlets, then revoke the lease, so every key of the
        node vanishes in one revision. With ``revoke=False`` the keys are left
        to expire after the TTL, as a crashed node's would. Bounded by
        `timeout` plus one etcd call."""
        if self._state is AgentState.STOPPED:
            return
        self._state = AgentState.STOPPED
        self._stopping.set()
        self._pending_ready.set()
        term, self._term = self._term, None
        self._joined.clear()
        if term is not None:
            self._end(term)
        gevent.killall([g for g in self._greenlets if g is not gevent.getcurrent()], timeout=timeout)
        if revoke and self._lease:
            try:
                self.client.revoke(self._lease)
                self.log.notice(f"cluster: node {self.node} left (lease {self._lease:x} revoked)")
            except EtcdFailure as exc:
                self.log.warning(f"cluster: node {self.node} could not revoke its lease: {exc}")
        self._lease = 0
        self.client.close()

    # -- writes for the router ------------------------------------------------------

    def register_member(self, key: MemberKey, value: MemberValue) -> None:
        """Put a member key under the lease; ClusterUnavailable after bind_wait."""
        self._put(self._own(key), encode_value(value))

    def unregister_member(self, key: MemberKey) -> None:
        """Delete a member key (in the background, retried until done)."""
        self._forget(self._own(key), None)

    def claim_unique(self, name: str, member: str) -> bool:
        """``unique/<name>`` for our `member`, if no one holds it: True if ours now.
        ClusterUnavailable when etcd did not answer within bind_wait."""
        return self._claim(UniqueKey(name), OwnerValue(self.node, member))

    def release_unique(self, name: str, member: str) -> None:
        """Delete ``unique/<name>`` if our `member` still holds it (in the background)."""
        self._forget(self.layout.key(UniqueKey(name)), encode_value(OwnerValue(self.node, member)))

    def claim_default(self, name: str, member: str) -> bool:
        """The default route for our `member` bound as `name`, if there is none."""
        return self._claim(DefaultKey(), DefaultValue(name, self.node, member))

    def release_default(self, name: str, member: str) -> None:
        """Delete the default route if our `member` bound as `name` still holds it (in the background)."""
        self._forget(self.layout.key(DefaultKey()), encode_value(DefaultValue(name, self.node, member)))

    def claim_slot(self, key: SlotKey, value: SlotValue, mod_revision: int,
                   member: MemberKey, member_value: MemberValue) -> tuple[bool, int]:
        """Take a slot for our member and put its member key, in one txn, if
        the slot key is still at ``mod_revision`` (0: absent): (taken, the
        store's revision: when not taken, the mirror knows why once it is
        there). ClusterUnavailable when etcd did not answer within bind_wait."""
        raw, data = self.layout.key(key), encode_value(value)
        own, member_data = self._own(member), encode_value(member_value)

        def attempt(term: _Term) -> tuple[bool, int]:
            return self.client.put_if_unchanged(raw, mod_revision,
                                                [(raw, data, 0), (own, member_data, term.lease)])
        return self._write(own, attempt)

    def register_log_sink(self, key: LogKey, value: LogValue) -> None:
        """Put a log sink key under the lease; ClusterUnavailable after bind_wait."""
        self._put(self._own(key), encode_value(value))

    def unregister_log_sink(self, key: LogKey) -> None:
        """Delete a log sink key (in the background, retried until done)."""
        self._forget(self._own(key), None)

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until the deletes asked for are done (a fence drops those asked
        before it; those asked while fenced are done after the rejoin)."""
        return self._drained.wait(timeout)

    def _own(self, key: Union[MemberKey, LogKey]) -> bytes:
        if key.node != self.node:
            raise ValueError(f"node {self.node} cannot write a key of node {key.node}: {key}")
        return self.layout.key(key)

    def _put(self, raw: bytes, data: bytes) -> None:
        self._write(raw, lambda term: self.client.put(raw, data, term.lease))

    def _claim(self, key: Union[UniqueKey, DefaultKey], value: Value) -> bool:
        raw, data = self.layout.key(key), encode_value(value)

        def attempt(term: _Term) -> bool:
            created, _, holder = self.client.create_if_absent(raw, data, term.lease)
            # Not created, yet ours: an earlier attempt's answer was lost.
            return created or _ours(holder, term, data)
        return self._write(raw, attempt)

    def _write(self, raw: bytes, attempt: Callable[[_Term], _T]) -> _T:
        """`attempt(term)` under the current lease, retried while etcd is away,
        for bind_wait at most; a delete still pending for `raw` goes first."""
        give_up = time.monotonic() + self.bind_wait
        self._current()                 # a fenced node refuses at once
        if not self._writes.acquire(timeout=self.bind_wait):
            raise ClusterUnavailable(f"etcd writes did not get through within {self.bind_wait:g}s")
        try:
            delay = self.backoff_first
            while True:
                term = self._current()
                try:
                    with gevent.Timeout(max(give_up - time.monotonic(), 0.001), _Late):
                        if raw in self._pending:
                            self._delete_now(raw, self._pending[raw], term)
                            self._pending.pop(raw, None)
                        return attempt(term)
                except (EtcdUnavailable, _Late) as exc:
                    left = give_up - time.monotonic()
                    if left <= 0:
                        raise ClusterUnavailable(
                            f"etcd did not answer within {self.bind_wait:g}s ({_why(exc)})") from None
                    term.ended.wait(min(delay, left))
                    delay = min(2 * delay, self.backoff_most)
                except EtcdError as exc:
                    if exc.code == NOT_FOUND:
                        self._fence(term, f"etcd no longer knows lease {term.lease:x} ({exc.message})")
                        raise Fenced(f"node {self.node} is fenced") from None
                    raise ClusterUnavailable(str(exc)) from None
        finally:
            self._writes.release()

    def _current(self) -> _Term:
        term = self._term
        if term is None or not self._live(term):
            raise Fenced(f"node {self.node} is not in the cluster ({self._state.value})")
        return term

    def _forget(self, raw: bytes, expected: Optional[bytes]) -> None:
        if self._state is AgentState.STOPPED:
            return
        self._pending.pop(raw, None)        # moved to the end: the newest ask
        self._pending[raw] = expected
        self._drained.clear()
        self._pending_ready.set()

    def _delete_now(self, raw: bytes, expected: Optional[bytes], term: _Term) -> None:
        """Delete `raw`; a shared key only if we hold it still. The read and the
        delete are two calls: EtcdClient has no compare-and-delete."""
        if expected is not None:
            _, kvs = self.client.range(raw)
            if not kvs or not _ours(kvs[0], term, expected):
                return
        self.client.delete(raw)

    # -- the greenlets ------------------------------------------------------------------

    def _spawn(self, function: Callable[..., None], *args: Any) -> None:
        self._greenlets = [g for g in self._greenlets if not g.dead]
        self._greenlets.append(gevent.spawn(function, *args))

    def _run(self) -> None:
        """Join; when the term ends, act dead and join again; until stopped."""
        rejoin = False
        while True:
            term = self._join(rejoin)
            if term is None:
                return
            term.ended.wait()
            if self._stopping.is_set():
                return
            with self._hooks_lock:
                self._hook("on_fenced", self.hooks.on_fenced)
            rejoin = True

    def _join(self, rejoin: bool) -> Optional[_Term]:
        """A new term, retried with backoff until etcd answers (None: stopped)."""
        delay, complained = self.backoff_first, False
        while not self._stopping.is_set():
            try:
                with self._writes:
                    term, changes, revision, lost = self._enter(rejoin)
                break
            except (EtcdFailure, _Late) as exc:
                if not complained:
                    self.log.warning(f"cluster: node {self.node} cannot join yet: {_why(exc)}")
                    complained = True
            self._stopping.wait(delay)
            delay = min(2 * delay, self.backoff_most)
        else:
            return None
        self._term, self._state = term, AgentState.JOINED
        self._joined.set()
        self.log.notice(f"cluster: node {self.node} {'re' if rejoin else ''}joined cluster "
                        f"{self.layout.cluster} (lease {term.lease:x}, ttl {term.ttl}s, revision {revision})")
        self._spawn(self._keepalive, term)
        with self._hooks_lock:
            if rejoin:
                self._hook("on_rejoined", self.hooks.on_rejoined, lost)
            if changes and self._live(term):
                self._hook("on_changes", self.hooks.on_changes, changes, revision)
        self._spawn(self._watch, term)
        if self._pending:
            self._pending_ready.set()
        return term

    def _enter(self, rejoin: bool) -> tuple[_Term, list[Change], int, list[Key]]:
        """One try at joining: the old lease revoked, a new one, the node key,
        the held keys again, a snapshot, the watch from just after it."""
        if self._lease:
            self.client.revoke(self._lease)
            self._lease = 0
        sent = time.monotonic()
        granted = self.client.grant(self.ttl)
        self._lease = granted.id
        ttl = granted.ttl or self.ttl
        term = _Term(granted.id, ttl, sent + ttl, TableMirror(self.layout))
        value = NodeValue(self.address, self.started, __version__)
        self.client.put(self._node_key, encode_value(value), term.lease)
        lost = self._recreate(term) if rejoin else []
        revision, kvs = self.client.range(self.layout.prefix, prefix=True)
        changes = term.mirror.load_snapshot(revision, [_put(kv) for kv in kvs])
        # Opened here, from a revision not yet written, etcd counts the watch
        # in step at once; one opened later would catch up on etcd's 100 ms sync.
        term.watch = self.client.watch(self.layout.prefix, revision + 1)
        if time.monotonic() >= term.deadline:
            term.watch.close()
            raise _Late("joining took longer than the lease")
        return term, changes, revision, lost

    def _recreate(self, term: _Term) -> list[Key]:
        """Put the router's held keys under the new lease; the ones it lost."""
        lost: list[Key] = []
        held = self._hook("held_keys", self.hooks.held_keys) or ()
        for key, value in held:
            try:
                raw, data = self.layout.key(key), encode_value(value)
            except LayoutError as exc:
                self.log.warning(f"cluster: node {self.node} cannot hold {key}: {exc}")
                lost.append(key)
                continue
            if isinstance(key, (UniqueKey, DefaultKey)):
                created, _, holder = self.client.create_if_absent(raw, data, term.lease)
                if not created and not _ours(holder, term, data):
                    lost.append(key)
            elif isinstance(key, (MemberKey, LogKey)) and key.node == self.node:
                self.client.put(raw, data, term.lease)
            else:
                self.log.warning(f"cluster: node {self.node} cannot hold {key}")
                lost.append(key)
        return lost

    def _keepalive(self, term: _Term) -> None:
        """Refresh the lease every TTL/3; fence when it is surely gone."""
        delay, due, away = self.backoff_first, term.deadline - term.ttl * 2 / 3, False
        while self._live(term):
            wait = min(due, term.deadline) - time.monotonic()
            if wait > 0:
                term.ended.wait(wait)
                continue
            sent = time.monotonic()
            try:
                with gevent.Timeout(max(term.deadline - sent, 0.001), _Late):
                    ttl = self.client.keepalive(term.lease)
            except (EtcdFailure, _Late) as exc:
                if not away:
                    self.log.warning(f"cluster: node {self.node} cannot refresh its lease "
                                     f"({_why(exc)}): routing from the table as it is")
                    away = True
                due, delay = time.monotonic() + delay, min(2 * delay, self.backoff_most)
                continue
            if ttl <= 0:
                self._fence(term, f"etcd says lease {term.lease:x} is gone")
                return
            if away:
                self.log.notice(f"cluster: node {self.node} refreshed its lease again")
                away = False
            term.deadline, due, delay = sent + ttl, sent + ttl / 3, self.backoff_first

    def _watch(self, term: _Term) -> None:
        """Feed the mirror from a watch resumed after the last applied revision."""
        delay, snapshot = self.backoff_first, False
        while self._live(term):
            try:
                if snapshot:
                    revision, kvs = self.client.range(self.layout.prefix, prefix=True)
                    puts = [_put(kv) for kv in kvs]
                    if not self._deliver(term, lambda mirror: mirror.load_snapshot(revision, puts)):
                        return
                    snapshot = False
                watch = term.watch or self.client.watch(self.layout.prefix, term.mirror.revision + 1)
                term.watch = watch
                if term.ended.is_set():
                    watch.close()
                    return
                delay = self.backoff_first
                for batch in watch:
                    if not self._deliver(term, _applier(batch)):
                        break
            except WatchCompacted as exc:
                self.log.notice(f"cluster: watch compacted past {exc.compact_revision}: "
                                "reading the table again")
                snapshot = True
                continue
            except EtcdUnavailable:
                pass
            except (EtcdError, ValueError) as exc:
                self.log.warning(f"cluster: watch failed ({exc}): reading the table again")
                snapshot = True
            finally:
                if term.watch is not None:
                    term.watch.close()
                    term.watch = None
            term.ended.wait(delay)
            delay = min(2 * delay, self.backoff_most)

    def _deliver(self, term: _Term, update: Callable[[TableMirror], list[Change]]) -> bool:
        """Update the term's mirror and hand its changes over (once per batch),
        unless the lease is gone; False when the term is over."""
        with self._hooks_lock:
            if not self._live(term):
                return False
            changes = update(term.mirror)
            own = term.mirror.nodes().get(self.node)
            if own is None or own.lease != term.lease:
                self._fence(term, "etcd no longer holds this node's key under its lease")
                return False
            if changes:
                self._hook("on_changes", self.hooks.on_changes, changes, term.mirror.revision)
        return True

    def _drain(self) -> None:
        """Do the deletes asked for, oldest first, retried while etcd is away."""
        delay = self.backoff_first
        while True:
            self._pending_ready.wait()
            if self._stopping.is_set():
                return
            if self._drain_once():
                delay = self.backoff_first
            else:
                self._stopping.wait(delay)
                delay = min(2 * delay, self.backoff_most)

    def _drain_once(self) -> bool:
        """False if etcd did not answer (try again later)."""
        with self._writes:
            self._pending_ready.clear()
            while self._pending:
                term = self._term
                if term is None or not self._live(term):
                    return True          # the join sets _pending_ready again
                raw, expected = next(iter(self._pending.items()))
                try:
                    self._delete_now(raw, expected, term)
                except EtcdUnavailable:
                    self._pending_ready.set()
                    return False
                except EtcdError as exc:
                    self.log.warning(f"cluster: delete of {raw!r} refused: {exc}")
                if self._pending.get(raw, b"") == expected:   # not asked again meanwhile
                    del self._pending[raw]
            self._drained.set()
        return True

    # -- the term's end -------------------------------------------------------------------

    def _live(self, term: _Term) -> bool:
        """Whether `term` goes on; fences it once its lease is surely gone."""
        if term.ended.is_set():
            return False
        if time.monotonic() >= term.deadline:
            self._fence(term, f"lease {term.lease:x} not refreshed for {term.ttl}s")
            return False
        return True

    def _fence(self, term: _Term, reason: str) -> None:
        """Act dead (the fencing rule above); ``_run`` calls on_fenced and rejoins."""
        if term.ended.is_set():
            return
        self.log.warning(f"cluster: node {self.node} fenced: {reason}; acting dead until etcd answers")
        if self._term is term:
            self._term, self._state = None, AgentState.FENCED
            self._joined.clear()
            self._pending.clear()
            self._drained.set()
        self._end(term)

    @staticmethod
    def _end(term: _Term) -> None:
        term.ended.set()
        if term.watch is not None:
            term.watch.close()          # wakes the watch greenlet

    def _hook(self, name: str, function: Callable[..., _T], *args: Any) -> Optional[_T]:
        """A router hook; what it raises is logged, never the agent's end."""
        try:
            return function(*args)
        except Exception as exc:
            self.log.warning(f"cluster: {name} failed: {exc!r}")
            return None


def _why(exc: BaseException) -> str:
    return str(exc) or "no answer in time"


def _ours(kv: KeyValue, term: _Term, data: bytes) -> bool:
    return kv.lease == term.lease and kv.value == data


def _put(kv: KeyValue) -> Put:
    return Put(kv.key, kv.value, kv.lease, kv.create_revision, kv.mod_revision)


def _applier(batch: WatchBatch) -> Callable[[TableMirror], list[Change]]:
    events = [_put(e.kv) if e.kind is EventKind.PUT else Delete(e.kv.key, e.kv.mod_revision)
              for e in batch.events]
    return lambda mirror: mirror.apply(Batch(batch.revision, events))
