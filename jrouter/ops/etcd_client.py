"""A small etcd v3 client for the gevent shell: etcd 3.4's HTTP/JSON gateway
over gevent sockets (issue 13, the route table of several nodes kept in etcd).

Owns: talking to etcd: HTTP/1.1 exchanges (``Content-Length`` and chunked
bodies), base64 keys and values, etcd's int64s written as JSON strings, which
endpoint is tried first, the one deadline that bounds every call, and watch
streams (newline-delimited JSON in a chunked body).
Must not know: what the keys mean (routes, nodes, slots), how often a lease is
kept alive, or what the router does while etcd is away: that is the caller's
policy.

Theory of operation
-------------------
Every call is one ``POST`` of a JSON body to one endpoint. A call is bounded by
``timeout`` in all (connecting, sending, reading, moving on), by one
``gevent.Timeout``: past it the call raises ``EtcdUnavailable``. Endpoints are
tried in order, starting with the last one that answered; one that fails is
passed over by the next call too, so a hung member costs one call its timeout,
not every call.

Moving on is safe only when the request cannot have taken effect: etcd's own
client retries a write only if it was never sent (clientv3 ``retry.go``,
"repeatable" reads vs "non-repeatable" writes). So a write moves on only when
its connection failed before the request went out; once it is sent, a broken
or missing answer raises ``EtcdUnavailable`` and the outcome is unknown (the
caller reads the key to learn it). Reads move on after any failure. An answer
with gRPC code 14 (UNAVAILABLE: "no leader", "request timed out") is a failure
of that endpoint, not an ``EtcdError``.

Idle connections are kept per endpoint (``max_idle``) and reused after a
non-blocking peek shows etcd has not closed them. A connection is used by one
greenlet at a time (house rule 5): concurrent calls each take their own. A
watch owns its connection until closed.

The gateway's JSON (etcd 3.4, grpc-gateway v1): zero values are left out
(``kvs`` absent when nothing matched, ``succeeded`` absent when false, a PUT
event has no ``type``); int64s are strings (``"revision": "9"``); unary errors
are ``{"error", "message", "code"}`` with a gRPC code; a stream wraps each
message as ``{"result": ...}`` or ``{"error": {"grpc_code", "message", ...}}``,
one per line, but a line may span HTTP chunks.
"""

from __future__ import annotations

import base64
import enum
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar
from urllib.parse import urlsplit

import gevent
from gevent import socket

Json = dict[str, Any]
_T = TypeVar("_T")

# gRPC status codes (google.golang.org/grpc/codes) that etcd answers with.
UNKNOWN = 2
NOT_FOUND = 5
UNAVAILABLE = 14


# ---------------------------------------------------------------------------
# What callers see


class EtcdFailure(Exception):
    """Base of the client's exceptions."""


class EtcdUnavailable(EtcdFailure):
    """No endpoint answered within the timeout, or the answer was lost: the
    outcome of a write is then unknown."""


class EtcdError(EtcdFailure):
    """etcd answered with an error: its gRPC ``code`` and ``message``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__("etcd error %d: %s" % (code, message))
        self.code = code
        self.message = message


class WatchCompacted(EtcdFailure):
    """A watch's start revision is compacted: read the table again, then
    watch from after that read."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__("watch start revision compacted (compacted up to %d)" % compact_revision)
        self.compact_revision = compact_revision


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


class EventKind(enum.Enum):
    PUT = "PUT"
    DELETE = "DELETE"


@dataclass(frozen=True)
class Event:
    kind: EventKind
    kv: KeyValue    # a DELETE's has only key and mod_revision (the deletion's)


@dataclass(frozen=True)
class WatchBatch:
    """One watch response as etcd sent it. `revision` is the store's revision
    when it was sent; a catch-up batch may hold events of many revisions. Resume
    a broken watch from ``events[-1].kv.mod_revision + 1``."""

    revision: int
    events: list[Event]


@dataclass(frozen=True)
class Lease:
    id: int
    ttl: int        # as granted: etcd may raise it to its minimum TTL


@dataclass(frozen=True)
class LeaseInfo:
    ttl: int        # seconds left
    granted_ttl: int
    keys: list[bytes]


# ---------------------------------------------------------------------------
# The client


class EtcdClient:
    """etcd v3 over its HTTP gateway. `endpoints` are ``http://host:port`` (or
    ``host:port``), tried in order; every call is bounded by `timeout` seconds."""

    #: Idle connections kept per endpoint; more are closed after use.
    max_idle = 4

    def __init__(self, endpoints: Sequence[str], timeout: float) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoint")
        self.endpoints = [_address(endpoint) for endpoint in endpoints]
        self.timeout = timeout
        self._first = 0
        self._idle: list[list[_Connection]] = [[] for _ in self.endpoints]

    # -- keys --------------------------------------------------------------

    def range(self, key: bytes, prefix: bool = False) -> tuple[int, list[KeyValue]]:
        """The store's revision and the key (or every key under the prefix), in key order."""
        answer = self._call("/v3/kv/range", _span(key, prefix), repeatable=True)
        return _revision(answer), [_key_value(kv) for kv in answer.get("kvs", [])]

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        """Set `key` (tied to `lease` if not 0); return the revision of the write."""
        return _revision(self._call("/v3/kv/put", _put(key, value, lease), repeatable=False))

    def delete(self, key: bytes, prefix: bool = False) -> int:
        """Delete the key (or every key under the prefix); return the store's revision."""
        return _revision(self._call("/v3/kv/deleterange", _span(key, prefix), repeatable=False))

    def create_if_absent(self, key: bytes, value: bytes, lease: int = 0) -> tuple[bool, int, KeyValue]:
        """Create `key` unless it exists, in one transaction: (created, revision,
        the key as it now is: ours if created, the holder's if not)."""
        request = {
            "compare": [{"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
            "success": [{"request_put": _put(key, value, lease)}],
            "failure": [{"request_range": {"key": _b64(key)}}],
        }
        answer = self._call("/v3/kv/txn", request, repeatable=False)
        revision = _revision(answer)
        if answer.get("succeeded"):
            return True, revision, KeyValue(key, value, revision, revision, lease)
        kvs = answer["responses"][0]["response_range"]["kvs"]
        return False, revision, _key_value(kvs[0])

    def put_if_unchanged(self, key: bytes, mod_revision: int, puts: Sequence[tuple[bytes, bytes, int]]
                         ) -> tuple[bool, int]:
        """In one transaction, if `key`'s mod_revision is still `mod_revision`
        (0: it is absent), put each (key, value, lease) of `puts`:
        (done, the store's revision)."""
        request = {
            "compare": [{"key": _b64(key), "target": "MOD", "result": "EQUAL",
                         "mod_revision": str(mod_revision)}],
            "success": [{"request_put": _put(k, v, lease)} for k, v, lease in puts],
        }
        answer = self._call("/v3/kv/txn", request, repeatable=False)
        return bool(answer.get("succeeded")), _revision(answer)

    def compact(self, revision: int) -> None:
        """Forget the history before `revision` (physically, before answering)."""
        self._call("/v3/kv/compaction", {"revision": str(revision), "physical": True}, repeatable=False)

    # -- leases ------------------------------------------------------------

    def grant(self, ttl: int) -> Lease:
        """A new lease of `ttl` seconds."""
        answer = self._call("/v3/lease/grant", {"TTL": str(ttl)}, repeatable=False)
        return Lease(int(answer["ID"]), int(answer.get("TTL", 0)))

    def keepalive(self, lease: int) -> int:
        """Refresh `lease` once; return its TTL again, or 0 if the lease is gone."""
        answer = self._call("/v3/lease/keepalive", {"ID": str(lease)}, repeatable=True, stream=True)
        return int(answer.get("TTL", 0))

    def revoke(self, lease: int) -> bool:
        """End `lease` and delete its keys now; False if it was already gone."""
        try:
            self._call("/v3/lease/revoke", {"ID": str(lease)}, repeatable=True)
        except EtcdError as exc:
            if exc.code == NOT_FOUND:
                return False
            raise
        return True

    def time_to_live(self, lease: int, keys: bool = False) -> Optional[LeaseInfo]:
        """What is left of `lease` (and its keys, if asked), or None if it is gone."""
        answer = self._call("/v3/lease/timetolive", {"ID": str(lease), "keys": keys}, repeatable=True)
        ttl = int(answer.get("TTL", 0))
        if ttl < 0:
            return None
        return LeaseInfo(ttl, int(answer.get("grantedTTL", 0)), [_unb64(k) for k in answer.get("keys", [])])

    # -- watches -----------------------------------------------------------

    def watch(self, prefix: bytes, start_revision: int) -> Watch:
        """Watch every key under `prefix` from `start_revision` (0: from now).
        Returns once etcd has created the watch (bounded by the timeout)."""
        request = {"create_request": {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix)),
                                      "start_revision": str(start_revision)}}
        body = json.dumps(request).encode()
        return self._attempt(lambda index: self._open_watch(index, body), repeatable=True)

    def _open_watch(self, index: int, body: bytes) -> Watch:
        connection = self._connect(index)
        try:
            connection.send(self._host(index), "/v3/watch", body)
            status, headers = connection.head()
            if status != 200 or headers.get("transfer-encoding") != "chunked":
                raise _answer_error(_parse(connection.body(headers), status))
            messages = _lines(connection.chunks())
            created = _result(next(messages))
            if not created.get("created"):
                raise EtcdError(UNKNOWN, "watch not created: %r" % created)
        except (OSError, _Broken, StopIteration) as exc:
            connection.close()
            raise _Failed(str(exc) or type(exc).__name__) from None
        except BaseException:
            connection.close()
            raise
        return Watch(connection, messages, _revision(created))

    # -- the exchange ------------------------------------------------------

    def close(self) -> None:
        """Close idle connections (watches close their own)."""
        for idle in self._idle:
            while idle:
                idle.pop().close()

    def _call(self, path: str, request: Json, *, repeatable: bool, stream: bool = False) -> Json:
        """POST `request`; etcd's answer (a stream's first message)."""
        body = json.dumps(request).encode()
        return self._attempt(lambda index: self._answer(index, path, body, stream), repeatable)

    def _attempt(self, attempt: Callable[[int], _T], repeatable: bool) -> _T:
        """`attempt(index)` on the endpoints in turn, until one succeeds, all
        failed, the timeout passed, or a non-repeatable request was lost."""
        timer = gevent.Timeout(self.timeout)
        timer.start()
        problems: list[str] = []
        try:
            for index in self._order():
                try:
                    result = attempt(index)
                except _Failed as exc:
                    self._passed(index, problems, exc)
                    if exc.sent and not repeatable:
                        break
                except gevent.Timeout as exc:
                    if exc is not timer:
                        raise
                    self._passed(index, problems, "no answer")
                    break
                else:
                    self._first = index
                    return result
        finally:
            timer.close()
        raise EtcdUnavailable("no etcd answer within %gs (%s)" % (self.timeout, "; ".join(problems)))

    def _answer(self, index: int, path: str, body: bytes, stream: bool) -> Json:
        status, data = self._exchange(index, path, body)
        answer = _parse(data, status)
        if stream:
            return _result(answer)
        if status != 200 or "code" in answer:
            raise _answer_error(answer)
        return answer

    def _exchange(self, index: int, path: str, body: bytes) -> tuple[int, bytes]:
        """One request and its whole answer on a connection to endpoint `index`."""
        connection = self._connection(index)
        try:
            try:
                connection.send(self._host(index), path, body)
            except OSError as exc:
                raise _Failed(str(exc)) from None
            try:
                status, headers = connection.head()
                data = connection.body(headers)
            except (OSError, _Broken) as exc:
                raise _Failed(str(exc) or type(exc).__name__, sent=True) from None
        except BaseException:
            connection.close()
            raise
        if headers.get("connection", "").lower() == "close" or len(self._idle[index]) >= self.max_idle:
            connection.close()
        else:
            self._idle[index].append(connection)
        return status, data

    def _connection(self, index: int) -> _Connection:
        """An idle connection etcd still holds open, or a new one."""
        idle = self._idle[index]
        while idle:
            connection = idle.pop()
            if connection.alive():
                return connection
            connection.close()
        return self._connect(index)

    def _connect(self, index: int) -> _Connection:
        try:
            sock = socket.create_connection(self.endpoints[index])
        except OSError as exc:
            raise _Failed("connect: %s" % exc) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Connection(sock)

    def _order(self) -> list[int]:
        """Endpoint indexes, starting with the one that answered last (a list:
        a failure moves ``_first`` while the caller goes through them)."""
        count = len(self.endpoints)
        return [(self._first + step) % count for step in range(count)]

    def _passed(self, index: int, problems: list[str], problem: object) -> None:
        """Endpoint `index` failed: note why, and let the next call start after it."""
        host, port = self.endpoints[index]
        problems.append("%s:%d: %s" % (host, port, problem))
        self._first = (index + 1) % len(self.endpoints)

    def _host(self, index: int) -> str:
        host, port = self.endpoints[index]
        return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


class Watch:
    """One watch stream: iterate it (from one greenlet) for ``WatchBatch``es.
    ``close()``, from any greenlet, ends the iteration quietly; a stream that
    breaks otherwise raises ``EtcdUnavailable``."""

    def __init__(self, connection: _Connection, messages: Iterator[Json], created_revision: int) -> None:
        self.created_revision = created_revision    # the store's revision when etcd created it
        self._connection = connection
        self._messages = messages
        self._closed = False
        self._batches = self._read()

    def __iter__(self) -> Iterator[WatchBatch]:
        return self._batches

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        self._connection.shutdown()     # wakes a reader waiting on the socket with EOF
        self._connection.close()

    def _read(self) -> Iterator[WatchBatch]:
        try:
            for message in self._messages:
                batch = _batch(_result(message))
                if batch is not None:
                    yield batch
            problem = "the watch stream ended"
        except (OSError, _Broken, _Failed) as exc:
            problem = "the watch stream broke: %s" % (exc or type(exc).__name__)
        finally:
            self._connection.close()
        if not self._closed:
            raise EtcdUnavailable(problem)


# ---------------------------------------------------------------------------
# HTTP/1.1, one request at a time


class _Broken(Exception):
    """The connection ended, or what came was not HTTP."""


class _Failed(Exception):
    """One endpoint failed a call; `sent` if the request had gone out."""

    def __init__(self, problem: str, sent: bool = False) -> None:
        super().__init__(problem)
        self.sent = sent


#: A status, header or chunk-size line longer than this is not etcd.
_MAX_LINE = 65536

#: Every read lands here first and is copied out before the reader yields
#: (one greenlet runs at a time), as in ops/server.py: no 64 KiB allocation
#: shrunk per read, no holes left in the heap.
_READ_BUFFER = bytearray(65536)
_READ_VIEW = memoryview(_READ_BUFFER)


class _Connection:
    """A client's end of one HTTP/1.1 connection, with what it has read but not used."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray()

    def send(self, host: str, path: str, body: bytes) -> None:
        head = ("POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                "Content-Length: %d\r\n\r\n" % (path, host, len(body)))
        self.sock.sendall(head.encode("ascii") + body)

    def head(self) -> tuple[int, dict[str, str]]:
        """The status code and the headers (names in lower case)."""
        parts = self._line().split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise _Broken("not an HTTP status line: %r" % parts)
        headers = {}
        while line := self._line():
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers

    def body(self, headers: dict[str, str]) -> bytes:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            return b"".join(self.chunks())
        if "content-length" in headers:
            return self._exact(int(headers["content-length"]))
        raise _Broken("a response without a length")

    def chunks(self) -> Iterator[bytes]:
        """A chunked body's chunks as they come; the trailers are read and dropped."""
        while True:
            try:
                size = int(self._line().split(b";", 1)[0], 16)
            except ValueError:
                raise _Broken("bad chunk size") from None
            if size == 0:
                while self._line():
                    pass
                return
            data = self._exact(size)
            if self._line():
                raise _Broken("chunk longer than its size")
            yield data

    def alive(self) -> bool:
        """True if the peer has neither closed nor sent anything while we were idle."""
        if self._buffer:
            return False
        self.sock.settimeout(0.0)
        try:
            self.sock.recv(1, socket.MSG_PEEK)
            return False
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            self.sock.settimeout(None)

    def shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()

    def _line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            if len(self._buffer) > _MAX_LINE:
                raise _Broken("line too long")
            self._fill()
        line = bytes(self._buffer[:end])
        del self._buffer[:end + 2]
        return line

    def _exact(self, size: int) -> bytes:
        while len(self._buffer) < size:
            self._fill()
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def _fill(self) -> None:
        received = self.sock.recv_into(_READ_BUFFER)
        if not received:
            raise _Broken("connection closed")
        self._buffer += _READ_VIEW[:received]


def _lines(chunks: Iterator[bytes]) -> Iterator[Json]:
    """The JSON messages of a stream: one per line, lines cut anywhere by chunks."""
    pending = bytearray()
    for chunk in chunks:
        pending += chunk
        while (end := pending.find(b"\n")) >= 0:
            line = bytes(pending[:end])
            del pending[:end + 1]
            if line.strip():
                yield _parse(line, 200)


# ---------------------------------------------------------------------------
# The gateway's JSON


def prefix_end(prefix: bytes) -> bytes:
    """The range end that makes [prefix, end) every key starting with `prefix`
    (clientv3's GetPrefixRangeEnd): the last byte below 0xff plus one."""
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"\0"        # with key "\0": every key
    end[-1] += 1
    return bytes(end)


def _address(endpoint: str) -> tuple[str, int]:
    parts = urlsplit(endpoint if "//" in endpoint else "http://" + endpoint)
    if parts.scheme != "http" or parts.hostname is None or parts.port is None:
        raise ValueError("etcd endpoint %r: expected http://host:port" % endpoint)
    return parts.hostname, parts.port


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _span(key: bytes, prefix: bool) -> Json:
    span = {"key": _b64(key)}
    if prefix:
        span["range_end"] = _b64(prefix_end(key))
    return span


def _put(key: bytes, value: bytes, lease: int) -> Json:
    put = {"key": _b64(key), "value": _b64(value)}
    if lease:
        put["lease"] = str(lease)
    return put


def _revision(answer: Json) -> int:
    return int(answer.get("header", {}).get("revision", 0))


def _key_value(raw: Json) -> KeyValue:
    return KeyValue(_unb64(raw.get("key", "")), _unb64(raw.get("value", "")),
                    int(raw.get("create_revision", 0)), int(raw.get("mod_revision", 0)),
                    int(raw.get("lease", 0)))


def _parse(data: bytes, status: int) -> Json:
    try:
        answer = json.loads(data)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise EtcdError(UNKNOWN, "HTTP %d: %r" % (status, data[:200]))
    return answer


def _answer_error(answer: Json) -> Exception:
    """The exception for an error answer: ``{"error": {...}}`` in a stream,
    ``{"error", "message", "code"}`` otherwise."""
    error = answer.get("error")
    if isinstance(error, dict):
        code, message = int(error.get("grpc_code", UNKNOWN)), str(error.get("message", ""))
    else:
        code, message = int(answer.get("code", UNKNOWN)), str(answer.get("message") or error)
    if code == UNAVAILABLE:
        return _Failed("etcd: %s" % message, sent=True)
    return EtcdError(code, message)


def _result(message: Json) -> Json:
    """A stream message's result, or its error raised."""
    if "result" not in message:
        raise _answer_error(message)
    result: Json = message["result"]
    return result


def _batch(result: Json) -> Optional[WatchBatch]:
    """A watch response's events (None for one without: created, progress)."""
    if int(result.get("compact_revision", 0)):
        raise WatchCompacted(int(result["compact_revision"]))
    if result.get("canceled"):
        raise EtcdError(UNKNOWN, "watch canceled: %s" % result.get("cancel_reason", ""))
    events = [Event(EventKind.DELETE if raw.get("type") == "DELETE" else EventKind.PUT,
                    _key_value(raw.get("kv", {})))
              for raw in result.get("events", [])]
    return WatchBatch(_revision(result), events) if events else None
