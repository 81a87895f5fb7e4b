"""``shm.Producer``: the client library. ``send()`` is a copy into shared memory.

Usage::

    from shm import Producer

    with Producer() as p:                       # $SLUICE_SOCKET or /run/sluice/sluice.sock
        fut = p.send("payments", b"...", key=b"user-42")
        meta = fut.result(timeout=5)            # RecordMetadata(topic, partition, offset, timestamp)

How it works: the constructor connects to the daemon's Unix socket, says Hello, creates a
sealed memfd segment with a request and a completion ring per worker and passes it over the
socket (SCM_RIGHTS). ``send()`` serializes, picks the partition (explicit, murmur2 of the
key, or sticky for null keys, as Kafka's default partitioner), finds the worker that owns it
(:func:`shm.partitioner.owner`) and writes one RECORD frame into that worker's request ring.
A background thread reads the completion rings: each COMPLETION frame resolves the next
``count`` pending records of one partition, in order, and each CHUNK_DONE frame frees the
request ring up to the position it names (see :mod:`daemon.worker` for why the ring is freed
only then).

Bulk: ``send_many()`` returns one :class:`DeliveryGroup` for all its records. It encodes the
records bound for one partition together, copies them into the ring with one claim, and
registers them as one run in the partition's pending FIFO, so the completion thread settles
a whole run with one call. The per-record costs left are a few C-level list operations.

Thread safety: ``send()`` may be called from several threads (a lock keeps each ring single-
producer). Futures are resolved on the completion thread; ``on_delivery`` callbacks run there
too and must be quick.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import msgspec

from shm import control
from shm.errors import BufferFullError, KafkaError, ProtocolError, SluiceError
from shm.frames import (
    CHUNK_DONE_TOPIC,
    RECORD_HEADER,
    ZIGZAG,
    encode_headers,
    encode_record_body,
    encode_record_frames,
    iter_completions,
    put_frames,
    put_record,
)
from shm.layout import FRAME_HEADER, FRAME_RECORD
from shm.partitioner import KeyHashCache, StickyPartitioner, owner, partitions_many
from shm.segment import Segment, send_fds

log = logging.getLogger("sluice.client")

__all__ = [
    "Producer",
    "RecordMetadata",
    "DeliveryFuture",
    "DeliveryGroup",
    "DEFAULT_SOCKET",
    "ProducerClosedError",
]

DEFAULT_SOCKET = "/run/sluice/sluice.sock"
# How long a client waits for a restarted daemon to take its segment back (a systemd restart
# takes well under a second; a crash restart waits RestartSec).
DEFAULT_RECONNECT_TIMEOUT_S = 60.0
_COMPLETION_POLL_MS = 20
_UNKNOWN_TOPIC = 3
_MESSAGE_TOO_LARGE = 10
_BATCH_OVERHEAD = 90  # batch header and record prefix beyond the body, for the size check
_BULK = 4096  # send_many encodes and copies at most this many records at a time
_REC_PREFIX = RECORD_HEADER.size
_ZZ = ZIGZAG
_ZZ_MAX = len(ZIGZAG) - 1
_time = time.time
_pack_record = RECORD_HEADER.pack_into
_unpack_frame = FRAME_HEADER.unpack_from


class ProducerClosedError(SluiceError):
    """The producer was closed (or its daemon went away) before the record's outcome came."""


class RecordMetadata(NamedTuple):
    """Where a record landed. ``offset`` is -1 under acks=0."""

    topic: str
    partition: int
    offset: int
    timestamp: int


# Waiters (threading.Event) and done-callbacks of futures and groups are registered and run
# under this lock: registration is rare, and the lock guarantees a callback runs exactly once
# however a registration races with the completion thread's resolution.
_wake_lock = threading.Lock()


def _run_callbacks(obj: Any, waiters: list[Any]) -> None:
    for w in waiters:
        if type(w) is threading.Event:
            w.set()
            continue
        try:
            w(obj)
        except Exception:  # noqa: BLE001 - a user callback must not kill the completion thread
            pass


class _Awaitable:
    """``await`` support shared by DeliveryFuture and DeliveryGroup (outcome relayed to the
    loop by a done-callback)."""

    __slots__ = ()

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        """Call ``fn(self)`` once the outcome is known (at once if it is). Callbacks run on the
        completion thread: keep them quick."""
        with _wake_lock:
            if self._outcome is None:  # type: ignore[attr-defined]
                if self._waiters is None:  # type: ignore[attr-defined]
                    self._waiters = []  # type: ignore[attr-defined]
                self._waiters.append(fn)  # type: ignore[attr-defined]
                return
        fn(self)

    def _wake(self) -> None:
        """Run the waiters once, after ``_outcome`` was set (by the resolving thread)."""
        with _wake_lock:
            waiters = self._waiters  # type: ignore[attr-defined]
            self._waiters = None  # type: ignore[attr-defined]
        if waiters:
            _run_callbacks(self, waiters)

    def _wait(self, timeout: float | None) -> None:
        if self._outcome is not None:  # type: ignore[attr-defined]
            return
        ev = threading.Event()
        self.add_done_callback(lambda _: ev.set())
        if not ev.wait(timeout) and self._outcome is None:  # type: ignore[attr-defined]
            raise TimeoutError(f"no outcome for {self!r} within {timeout}s")

    def __await__(self):  # noqa: ANN204
        loop = asyncio.get_running_loop()
        afut: asyncio.Future[Any] = loop.create_future()

        def relay(f: Any) -> None:
            loop.call_soon_threadsafe(_settle, afut, f)

        self.add_done_callback(relay)
        return afut.__await__()


def _settle(afut: asyncio.Future[Any], f: Any) -> None:
    if afut.done():
        return
    try:
        afut.set_result(f.result(0))
    except BaseException as exc:  # noqa: BLE001 - relayed to the awaiting task
        afut.set_exception(exc)


class DeliveryFuture(_Awaitable):
    """The outcome of one ``send()``: ``result(timeout)`` returns RecordMetadata or raises.

    Lighter than ``concurrent.futures.Future``: five slots, no lock or event unless someone
    waits; the completion thread resolves it with one store (the offset, or the exception).
    Awaitable from asyncio code (``meta = await producer.send(...)``).
    """

    __slots__ = ("topic", "partition", "timestamp", "_outcome", "_waiters")

    def __init__(self, topic: str, partition: int, timestamp: int) -> None:
        self.topic = topic
        self.partition = partition
        self.timestamp = timestamp
        # None while pending; the offset (int) on success; the exception on failure.
        self._outcome: int | BaseException | None = None
        self._waiters: list[Any] | None = None

    def done(self) -> bool:
        return self._outcome is not None

    def result(self, timeout: float | None = None) -> RecordMetadata:
        """Block until the outcome; raise its error (a KafkaError subclass) or TimeoutError."""
        o = self._outcome
        if o is None:
            self._wait(timeout)
            o = self._outcome
        if type(o) is int:
            return RecordMetadata(self.topic, self.partition, o, self.timestamp)
        raise o  # type: ignore[misc]

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._outcome is None:
            self._wait(timeout)
        o = self._outcome
        return None if type(o) is int else o  # type: ignore[return-value]

    def _resolve(self, outcome: int | BaseException) -> None:
        self._outcome = outcome
        if self._waiters is not None:
            self._wake()

    def __repr__(self) -> str:
        return f"DeliveryFuture({self.topic!r}, partition={self.partition}, outcome={self._outcome!r})"


class DeliveryGroup(_Awaitable):
    """The outcome of one ``send_many()``: one object for all its records.

    The completion thread settles it a run at a time (one operation per completion, not per
    record), so bulk senders pay nothing per record for outcomes.

    - ``result(timeout)`` -> the number of records (all delivered); raises the first error if
      any record failed (``errors`` lists them all), TimeoutError if not done in time.
    - ``done()``, ``exception(timeout)``, ``add_done_callback(fn)``, ``await group``.
    - ``offsets``: partition -> list of ``(base_offset, count)`` ranges of delivered records,
      in send order within the partition (base -1 under acks=0).
    - ``errors``: list of ``(partition, count, exception)``; ``failed``: how many failed.
    - Compatibility: it is also a sequence of DeliveryFuture in send order (``group[i]``,
      iteration, :meth:`futures`), built only when asked for.
    """

    __slots__ = (
        "topic",
        "count",
        "timestamp",
        "failed",
        "_first_error",
        "_runs",
        "_left",
        "_lock",
        "_order",
        "_outcome",
        "_waiters",
    )

    def __init__(self, topic: str, count: int, timestamp: int) -> None:
        self.topic = topic
        self.count = count
        self.timestamp = timestamp
        self.failed = 0
        self._first_error: BaseException | None = None
        # (partition, base_offset, count, log_append_time, exception or None) in the order
        # outcomes came, which within one partition is the send order.
        self._runs: list[tuple[int, int, int, int, BaseException | None]] = []
        self._left = count
        self._lock = threading.Lock()
        # Send order, for the per-record view: runs (partition, count), or for keyed
        # records the list of each record's partition.
        self._order: list[tuple[int, int] | list[int]] = []
        self._outcome: int | BaseException | None = None if count else 0
        self._waiters: list[Any] | None = None

    def __len__(self) -> int:
        return self.count

    def done(self) -> bool:
        return self._outcome is not None

    def result(self, timeout: float | None = None) -> int:
        """Block until every record has its outcome; the number of records, or raise the first
        error (a KafkaError subclass, BufferFullError, ProducerClosedError) or TimeoutError."""
        if self._outcome is None:
            self._wait(timeout)
        o = self._outcome
        if type(o) is int:
            return o
        raise o  # type: ignore[misc]

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._outcome is None:
            self._wait(timeout)
        o = self._outcome
        return None if type(o) is int else o  # type: ignore[return-value]

    @property
    def offsets(self) -> dict[int, list[tuple[int, int]]]:
        """partition -> ``(base_offset, count)`` ranges of the records delivered so far."""
        out: dict[int, list[tuple[int, int]]] = {}
        for p, base, k, _ts, exc in list(self._runs):
            if exc is not None:
                continue
            ranges = out.setdefault(p, [])
            if ranges and base >= 0 and ranges[-1][0] + ranges[-1][1] == base:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + k)  # contiguous: one range
            else:
                ranges.append((base, k))
        return out

    @property
    def errors(self) -> list[tuple[int, int, BaseException]]:
        """``(partition, count, exception)`` of every failed run so far."""
        return [(p, k, exc) for p, _b, k, _ts, exc in list(self._runs) if exc is not None]

    def _settle(self, partition: int, base: int, count: int, ts: int, exc: BaseException | None) -> None:
        """``count`` records to ``partition`` have their outcome (offsets from ``base``)."""
        with self._lock:
            self._runs.append((partition, base, count, ts, exc))
            if exc is not None:
                self.failed += count
                if self._first_error is None:
                    self._first_error = exc
            self._left -= count
            if self._left:
                return
        self._outcome = self._first_error if self._first_error is not None else self.count
        if self._waiters is not None:
            self._wake()

    # --- the per-record view (compatibility; costs per record only when used) -------------

    def __getitem__(self, i: int) -> DeliveryFuture:
        return self.futures()[i]

    def __iter__(self) -> Iterator[DeliveryFuture]:
        return iter(self.futures())

    def futures(self) -> list[DeliveryFuture]:
        """One DeliveryFuture per record, in send order (resolved once the group is done)."""
        topic, ts = self.topic, self.timestamp
        futs = []
        for entry in self._order:
            if type(entry) is tuple:  # (partition, count): a run in send order
                p, k = entry
                futs += [DeliveryFuture(topic, p, ts) for _ in range(k)]
            else:  # keyed: each record's partition
                futs += [DeliveryFuture(topic, p, ts) for p in entry]
        if self._outcome is None:
            self.add_done_callback(lambda g: g._fill(futs))
        else:
            self._fill(futs)
        return futs

    def _fill(self, futs: list[DeliveryFuture]) -> None:
        outs: dict[int, list[tuple[int | BaseException, int]]] = {}
        for p, base, k, ts, exc in self._runs:
            lst = outs.setdefault(p, [])
            if exc is not None:
                lst.extend([(exc, ts)] * k)
            elif base >= 0:
                lst.extend((o, ts) for o in range(base, base + k))
            else:
                lst.extend([(-1, ts)] * k)
        cursor: dict[int, int] = {}
        for f in futs:
            p = f.partition
            i = cursor.get(p, 0)
            cursor[p] = i + 1
            o, ts = outs[p][i]
            if ts >= 0:
                f.timestamp = ts
            f._resolve(o)

    def __repr__(self) -> str:
        return f"DeliveryGroup({self.topic!r}, count={self.count}, left={self._left}, failed={self.failed})"


class _Run:
    """A pending-FIFO entry standing for ``left`` consecutive records of one DeliveryGroup."""

    __slots__ = ("group", "left")

    def __init__(self, group: DeliveryGroup, left: int) -> None:
        self.group = group
        self.left = left


class _Topic:
    __slots__ = (
        "name",
        "id",
        "partitions",
        "owners",
        "pending",
        "info",
        "sticky",
        "batch",
        "sticky_p",
        "sticky_left",
        "max_body",
    )

    def __init__(self, info: control.TopicInfo, workers: int) -> None:
        self.name = info.topic
        self.id = info.topic_id
        self.partitions = info.partitions
        self.owners = [owner(info.topic, p, workers) for p in range(info.partitions)]
        # One FIFO per partition, resolved in order by completions: DeliveryFutures (send)
        # and _Runs (send_many: many records of one DeliveryGroup as one entry).
        self.pending: list[deque[DeliveryFuture | _Run]] = [deque() for _ in range(info.partitions)]
        self.info = info
        self.batch = max(1, info.batch_size)
        self.sticky = StickyPartitioner(self.batch)
        self.sticky_p = 0  # keyless records go here until sticky_left bytes are used up
        self.sticky_left = 0
        self.max_body = info.max_request_size - _BATCH_OVERHEAD


Serializer = Callable[[Any], bytes]


def _serializer(spec: str | Serializer | None) -> Serializer | None:
    if spec is None or spec == "bytes":
        return None
    if callable(spec):
        return spec
    if spec == "str":
        return lambda v: v.encode()
    if spec == "json":
        return msgspec.json.encode
    if spec == "msgpack":
        return msgspec.msgpack.encode
    raise ValueError(f"unknown serializer {spec!r}: use 'bytes', 'str', 'json', 'msgpack' or a callable")


def _as_bytes(v: Any) -> bytes | bytearray | memoryview | None:
    if v is None or isinstance(v, (bytes, bytearray, memoryview)):
        return v
    if isinstance(v, str):
        return v.encode()
    raise TypeError(
        f"cannot send {type(v).__name__} as bytes: pass bytes or str, or give the Producer a "
        "serializer ('json', 'msgpack' or a callable)"
    )


def _resolve_fifo(dq: deque[Any], part: int, err: int, base: int, ts: int, count: int) -> None:
    """One COMPLETION: the next ``count`` records pending for partition ``part`` have their
    outcome. FIFO entries are DeliveryFutures (one record) or _Runs (a DeliveryGroup's
    consecutive records, settled with one call however many there are).

    Raises:
        IndexError: fewer records pending than the completion names (a broken peer).
    """
    popleft = dq.popleft
    exc = KafkaError.for_code(err) if err else None
    step = 1 if base >= 0 and exc is None else 0
    off = base if step else -1
    i = 0
    while i < count:
        e = popleft()
        if type(e) is _Run:
            m = count - i
            if e.left > m:
                e.left -= m
                dq.appendleft(e)  # the rest of the run waits for the next completion
            else:
                m = e.left
            e.group._settle(part, off, m, ts, exc)
            off += m * step
            i += m
            continue
        if exc is None:
            if ts >= 0:
                e.timestamp = ts  # LogAppendTime topic: the broker's time
            e._outcome = off
            off += step
        else:
            e._outcome = exc
        if e._waiters is not None:
            e._wake()
        i += 1


def _stick(t: _Topic) -> None:
    """Move a topic's keyless records on to the sticky partitioner's next partition. The
    partitioner is charged batch_size bytes at once (so its next call moves on); the bytes
    actually sent count down in ``sticky_left``."""
    t.sticky_p = t.sticky.partition(t.name, t.partitions, t.batch)
    t.sticky_left = t.batch


_ONLY_BYTES = {bytes}
_BYTES_LIKE = {bytes, bytearray, memoryview, type(None)}


def _bytes_list(items: list[Any], ser: Serializer | None) -> list[Any]:
    """``items`` serialized (bytes-like or None each); the list itself when nothing to do."""
    if ser is None:
        if set(map(type, items)) <= _BYTES_LIKE:
            return items
        return [_as_bytes(x) for x in items]
    return [None if x is None else ser(x) for x in items]


def _max_len(items: list[Any]) -> int:
    try:
        return max(map(len, items), default=0)
    except TypeError:  # None among them
        return max((len(x) for x in items if x is not None), default=0)


def _check_sizes(t: _Topic, vals: list[Any], ks: list[Any] | None, headers: Any, tail: int) -> None:
    """MessageTooLargeError for the first record larger than the topic allows (exact check
    only when the largest key and value together could be too large)."""
    limit = t.max_body
    if _max_len(vals) + (_max_len(ks) if ks is not None else 0) + tail + 10 <= limit:
        return
    for i, v in enumerate(vals):
        size = len(encode_record_body(None if ks is None else ks[i], v, headers))
        if size > limit:
            raise KafkaError.for_code(
                _MESSAGE_TOO_LARGE,
                f"record {i} of about {size + _BATCH_OVERHEAD} bytes is larger than max_request_size "
                f"{t.info.max_request_size} of topic {t.name!r}",
            )


class Producer:
    """A Sluice client over shared memory.

    Args:
        socket_path: the daemon's socket; default ``$SLUICE_SOCKET``, else
            ``/run/sluice/sluice.sock``.
        client_name: shown in the daemon's logs and stats (default: the program and pid).
        value_serializer, key_serializer: ``None``/``"bytes"`` (bytes as they are, str as
            UTF-8), ``"str"``, ``"json"``, ``"msgpack"`` or a callable returning bytes.
        connect_timeout: seconds for the connection and handshake.
        reconnect_timeout_s: when the daemon hangs up (it crashed, or was restarted), keep
            the pending records and reconnect for up to this many seconds (default 60),
            offering the same segment under the same client token: the new daemon completes
            what the old one had taken (exactly once with idempotent profiles) and reads on
            from the rings. ``send()`` keeps writing into the rings meanwhile (blocking or
            dropping per the profile when they fill). Past the timeout every pending record
            fails with ProducerClosedError, as does ``send()``. 0: fail them at the hang-up. A
            fatal ErrorReply (the daemon dropped this client) is never retried; neither is a
            daemon whose topic ids or segment layout differ (its records could not be
            matched).

    Raises:
        SluiceError: the daemon refused the connection or the segment (the message says why).
        OSError: the socket could not be reached.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        client_name: str | None = None,
        value_serializer: str | Serializer | None = None,
        key_serializer: str | Serializer | None = None,
        connect_timeout: float = 10.0,
        reconnect_timeout_s: float = DEFAULT_RECONNECT_TIMEOUT_S,
    ) -> None:
        self.socket_path = socket_path or os.environ.get("SLUICE_SOCKET") or DEFAULT_SOCKET
        self._vser = _serializer(value_serializer)
        self._kser = _serializer(key_serializer)
        self._closed = False
        self._gone = False  # the daemon closed the connection: nothing sent now can be delivered
        self._ctl_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._space = threading.Condition(threading.Lock())
        self._idle = threading.Condition(threading.Lock())
        self._topics: dict[str, _Topic] = {}
        self._by_id: dict[int, _Topic] = {}
        self._limits: list[int] = []
        self._keys = KeyHashCache()
        self.drops: dict[str, int] = {}
        self._reader = control.FrameReader(control.DaemonMessage)
        self._inbox: deque[Any] = deque()
        self._never_block = False  # the daemon's own socket-ingest producer must not block its loop
        name = client_name or f"{os.path.basename(os.sys.argv[0] or 'python')}[{os.getpid()}]"
        self._name = name
        self._connect_timeout = connect_timeout
        self._reconnect_s = max(0.0, float(reconnect_timeout_s))
        # The identity a restarted daemon knows this segment by (0: never reconnects).
        self._token = (int.from_bytes(os.urandom(8), "little") | 1) if self._reconnect_s else 0
        self.reconnects = 0

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(connect_timeout)
        try:
            sock.connect(self.socket_path)
            self._sock = sock
            welcome = self._request(self._hello(), control.Welcome)
            self.workers = welcome.workers
            self.client_id = welcome.client_id
            seg = Segment.create(welcome.workers, welcome.request_ring_bytes, welcome.completion_ring_bytes)
            self._segment = seg
            fds = seg.fds()
            offer = control.SegmentOffer(segment_bytes=seg.size, workers=welcome.workers, fd_count=len(fds))
            with self._ctl_lock:
                send_fds(sock, control.encode(offer), fds)
                self._expect(control.SegmentAccepted)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        self._req = [seg.request_ring(w) for w in range(self.workers)]
        self._cmp = [seg.completion_ring(w) for w in range(self.workers)]
        self._pending_total = 0
        self._thread = threading.Thread(target=self._completions, name=f"sluice-completions-{self.client_id}", daemon=True)
        self._thread.start()

    def _hello(self) -> control.Hello:
        return control.Hello(
            version=control.PROTOCOL_VERSION, client_name=self._name, pid=os.getpid(), wants_segment=True, token=self._token
        )

    # --- control requests -----------------------------------------------------------------

    def _recv(self) -> Any:
        while not self._inbox:
            data = self._sock.recv(65536)
            if not data:
                raise ProducerClosedError("the daemon closed the connection")
            self._inbox.extend(self._reader.feed(data))
        return self._inbox.popleft()

    def _expect(self, kind: type) -> Any:
        msg = self._recv()
        if isinstance(msg, control.ErrorReply):
            if msg.code < 1000 and msg.code != 0:
                raise KafkaError.for_code(msg.code, msg.message)
            raise SluiceError(f"{msg.name}: {msg.message}")
        if not isinstance(msg, kind):
            raise ProtocolError(f"expected {kind.__name__}, got {type(msg).__name__}")
        return msg

    def _request(self, msg: Any, kind: type) -> Any:
        with self._ctl_lock:
            self._sock.sendall(control.encode(msg))
            return self._expect(kind)

    def lookup(self, topic: str) -> control.TopicInfo:
        """The topic's id, partition count and delivery profile (cached after the first call).

        Raises:
            KafkaError: e.g. UnknownTopicOrPartitionError for a topic that does not exist.
        """
        t = self._topics.get(topic)
        if t is None:
            t = self._add_topic(topic)
        return t.info

    def _add_topic(self, topic: str) -> _Topic:
        self._check_open()
        info = self._request(control.TopicLookup(topic=topic), control.TopicInfo)
        t = _Topic(info, self.workers)
        while len(self._limits) <= t.id:
            self._limits.append(0)
        self._limits[t.id] = t.partitions
        self._by_id[t.id] = t
        self._topics[topic] = t
        return t

    def partitions_for(self, topic: str) -> int:
        """The topic's partition count as the daemon reported it."""
        return self.lookup(topic).partitions

    # --- sending --------------------------------------------------------------------------

    def send(
        self,
        topic: str,
        value: Any,
        key: Any = None,
        *,
        partition: int | None = None,
        headers: Sequence[tuple[str | bytes, bytes | None]] | None = None,
        timestamp: int | None = None,
        on_delivery: Callable[[DeliveryFuture], None] | None = None,
    ) -> DeliveryFuture:
        """Queue one record; returns its DeliveryFuture.

        Raises at once, before the record enters shared memory, what the client can know:
        MessageTooLargeError (larger than the profile's max_request_size),
        UnknownTopicOrPartitionError (unknown topic or partition out of range),
        BufferFullError (on_full=block and no room within max_block_ms), TypeError (a value
        the serializer cannot take), ProducerClosedError. With on_full=drop a record that
        finds no room is counted in ``drops`` and its future fails with BufferFullError.
        """
        # The per-record path: every attribute lookup and call here costs about as much as
        # the ring transfer itself (PERF-NOTES), so the common case is written out inline.
        t = self._topics.get(topic)
        if t is None:
            t = self._add_topic(topic)
        ser = self._vser
        if ser is None:
            if type(value) is not bytes:
                value = _as_bytes(value)
        elif value is not None:
            value = ser(value)
        if key is not None:
            ser = self._kser
            if ser is None:
                if type(key) is not bytes:
                    key = _as_bytes(key)
            else:
                key = ser(key)
        # encode_record_body, inlined for the usual shape (no headers, short key and value).
        if headers or value is None or len(value) >= _ZZ_MAX:
            body = encode_record_body(key, value, headers)
        elif key is None:
            body = b"".join((b"\x01", _ZZ[len(value) + 1], value, b"\x00"))
        elif len(key) < _ZZ_MAX:
            body = b"".join((_ZZ[len(key) + 1], key, _ZZ[len(value) + 1], value, b"\x00"))
        else:
            body = encode_record_body(key, value, headers)
        size = len(body)
        if size > t.max_body:
            raise KafkaError.for_code(
                _MESSAGE_TOO_LARGE,
                f"record of about {size + _BATCH_OVERHEAD} bytes is larger than max_request_size "
                f"{t.info.max_request_size} of topic {topic!r}",
            )
        if partition is None:
            if key is None:
                if t.sticky_left <= 0:
                    _stick(t)
                partition = t.sticky_p
                t.sticky_left -= size
            else:
                partition = self._keys.partition(key if type(key) is bytes else bytes(key), t.partitions)
        elif not 0 <= partition < t.partitions:
            raise KafkaError.for_code(_UNKNOWN_TOPIC, f"partition {partition} of {topic!r} (it has {t.partitions})")
        ts = timestamp if timestamp is not None else int(_time() * 1000)
        fut = DeliveryFuture(topic, partition, ts)
        if on_delivery is not None:
            fut._waiters = [on_delivery]
        ring = self._req[t.owners[partition]]
        with self._send_lock:
            if self._closed or self._gone:
                self._check_open()
            pos = ring.claim(FRAME_RECORD, _REC_PREFIX + size)
            if pos >= 0:
                view = ring.view
                try:
                    _pack_record(view, pos, t.id, 0, partition, ts)
                except struct.error:
                    ring.rollback()
                    raise
                view[pos + _REC_PREFIX : pos + _REC_PREFIX + size] = body
                # Pending before publish: the outcome may come back right after it.
                t.pending[partition].append(fut)
                self._pending_total += 1
                ring.publish_head()
                return fut
        self._enqueue(t, partition, ts, body, fut)  # no room: wait or drop
        return fut

    def send_many(
        self,
        topic: str,
        values: Iterable[Any],
        keys: Iterable[Any] | None = None,
        *,
        partition: int | None = None,
        headers: Sequence[tuple[str | bytes, bytes | None]] | None = None,
        on_delivery: Callable[[DeliveryGroup], None] | None = None,
    ) -> DeliveryGroup:
        """Send many records to one topic; returns one :class:`DeliveryGroup` for them all.

        Much cheaper per record than ``send()``: the records bound for one partition are
        encoded together (:func:`shm.frames.encode_record_frames`), copied into the ring with
        one claim and one head publish, and wait for their outcome as one pending entry
        (the completion thread settles a whole run at once). Records without a key stick to
        a partition for about ``batch_size`` bytes, as with ``send()``; keyed records use
        Kafka's partitioner. Records to different partitions may enter the ring in another
        order than given; each partition keeps the given order, which is all Kafka orders.

        Args:
            values: the values (serialized like ``send()``'s; None = tombstone).
            keys: one key per value, or None.
            partition: send every record to this partition.
            headers: the same headers on every record.
            on_delivery: called once with the group when every record has its outcome.

        Raises:
            As ``send()``. Size, type and partition errors come before any record enters
            shared memory. BufferFullError (on_full=block, no room within max_block_ms) and
            ProducerClosedError may come after some records went in: those are delivered as
            usual; the rest fail in the group (which the caller does not get).
        """
        t = self._topics.get(topic)
        if t is None:
            t = self._add_topic(topic)
        vals = _bytes_list(values if type(values) is list else list(values), self._vser)
        ks: list[Any] | None = None
        if keys is not None:
            ks = _bytes_list(keys if type(keys) is list else list(keys), self._kser)
            if len(ks) != len(vals):
                raise ValueError(f"send_many got {len(ks)} keys for {len(vals)} values")
            if ks.count(None) == len(ks):
                ks = None
        n = t.partitions
        if partition is not None and not 0 <= partition < n:
            raise KafkaError.for_code(_UNKNOWN_TOPIC, f"partition {partition} of {topic!r} (it has {n})")
        tail = encode_headers(headers)
        _check_sizes(t, vals, ks, headers, len(tail))
        ts = int(time.time() * 1000)
        group = DeliveryGroup(topic, len(vals), ts)
        if on_delivery is not None:
            group.add_done_callback(on_delivery)
        if not vals:
            return group
        plan = self._plan(t, vals, ks, partition, len(tail), group)
        tid = t.id
        i = 0
        try:
            for i, (p, vs, kk) in enumerate(plan):  # noqa: B007 - i is read after a raise
                frames = encode_record_frames(tid, p, ts, vs, kk, headers)
                self._put_run(t, group, p, frames, len(vs))
        except BaseException as exc:
            for p, vs, _kk in plan[i + 1 :]:
                group._settle(p, -1, len(vs), -1, exc)
            raise
        return group

    def _plan(
        self, t: _Topic, vals: list[Any], ks: list[Any] | None, partition: int | None, tail: int, group: DeliveryGroup
    ) -> list[tuple[int, list[Any], list[Any] | None]]:
        """Split a send_many into runs ``(partition, values, keys)`` of at most _BULK records,
        and record the send order in ``group``."""
        total = len(vals)
        plan: list[tuple[int, list[Any], list[Any] | None]] = []
        if partition is not None or ks is None:
            if partition is not None:
                spans = [(partition, i, min(i + _BULK, total)) for i in range(0, total, _BULK)]
            else:
                # Sticky spans: a partition takes records until about batch_size bytes went
                # to it, the same rule as send(), judged on the call's mean record size.
                try:
                    vbytes = sum(map(len, vals))
                except TypeError:  # tombstones
                    vbytes = sum(len(v) for v in vals if v is not None)
                rec = vbytes // total + 3 + tail
                spans = []
                i = 0
                while i < total:
                    if t.sticky_left <= 0:
                        _stick(t)
                    k = min(-(-t.sticky_left // rec), total - i, _BULK)
                    t.sticky_left -= k * rec
                    spans.append((t.sticky_p, i, i + k))
                    i += k
            for p, a, b in spans:
                plan.append((p, vals[a:b], None if ks is None else ks[a:b]))
                group._order.append((p, b - a))
            return plan
        n = t.partitions
        if None in ks:
            # Some null keys among keyed records: those go sticky, record by record.
            parts = []
            kpart = self._keys.partition
            for k, v in zip(ks, vals):
                if k is None:
                    if t.sticky_left <= 0:
                        _stick(t)
                    parts.append(t.sticky_p)
                    t.sticky_left -= (len(v) if v is not None else 0) + 3 + tail
                else:
                    parts.append(kpart(k if type(k) is bytes else bytes(k), n))
        else:
            hk = ks if set(map(type, ks)) == _ONLY_BYTES else [bytes(k) for k in ks]
            # Keys of one length: murmur2 of all of them in one numpy pass; else per key
            # through the cache.
            parts = partitions_many(hk, n)
            if parts is None:
                parts = self._keys.partitions(hk, n)
        group._order.append(parts)  # type: ignore[arg-type]
        by_part: dict[int, tuple[list[Any], list[Any]]]
        if parts.count(parts[0]) == total:
            by_part = {parts[0]: (vals, ks)}
        elif n <= total:
            bv: list[list[Any]] = [[] for _ in range(n)]
            bk: list[list[Any]] = [[] for _ in range(n)]
            for p, k, v in zip(parts, ks, vals):
                bv[p].append(v)
                bk[p].append(k)
            by_part = {p: (bv[p], bk[p]) for p in range(n) if bv[p]}
        else:
            by_part = {}
            for p, k, v in zip(parts, ks, vals):
                entry = by_part.get(p)
                if entry is None:
                    entry = by_part[p] = ([], [])
                entry[0].append(v)
                entry[1].append(k)
        for p, (vs, kk) in by_part.items():
            for i in range(0, len(vs), _BULK):
                plan.append((p, vs[i : i + _BULK], kk[i : i + _BULK]))
        return plan

    def _put_run(self, t: _Topic, group: DeliveryGroup, p: int, frames: bytes, count: int) -> None:
        """Copy ``count`` frames of partition ``p`` into its ring as one pending run (more than
        one when the ring fills up); wait or drop by the topic's on_full policy."""
        ring = self._req[t.owners[p]]
        dq = t.pending[p]
        at = 0
        left = count
        deadline = None
        try:
            while left:
                with self._send_lock:
                    if self._closed or self._gone:
                        self._check_open()
                    at, m = put_frames(ring, frames, at, left)
                    if m:
                        dq.append(_Run(group, m))
                        self._pending_total += m
                        ring.publish_head()
                        left -= m
                        continue
                # The ring is full.
                if t.info.on_full == "drop":
                    at += (_unpack_frame(frames, at)[0] + 15) & -8
                    left -= 1
                    self.drops[t.name] = self.drops.get(t.name, 0) + 1
                    group._settle(p, -1, 1, -1, BufferFullError(f"ring full: record to {t.name!r} dropped (on_full=drop)"))
                    continue
                deadline = self._block(t, deadline)
        except BaseException as exc:
            if left:
                group._settle(p, -1, left, -1, exc)
            raise

    def _enqueue(self, t: _Topic, partition: int, ts: int, body: bytes, fut: DeliveryFuture) -> None:
        ring = self._req[t.owners[partition]]
        dq = t.pending[partition]
        deadline = None
        while True:
            with self._send_lock:
                self._check_open()
                # Pending first: the outcome may come back before put_record returns.
                dq.append(fut)
                if put_record(ring, t.id, partition, ts, body):
                    ring.publish_head()
                    self._pending_total += 1
                    return
                dq.pop()
            deadline = self._wait_for_room(t, ring, deadline, fut)
            if deadline is None:
                return

    def _wait_for_room(self, t: _Topic, ring: Any, deadline: float | None, fut: DeliveryFuture) -> float | None:
        """The ring is full: wait (block policy) or drop. Returns the deadline, None if dropped."""
        info = t.info
        if info.on_full == "drop":
            self.drops[t.name] = self.drops.get(t.name, 0) + 1
            fut._resolve(BufferFullError(f"ring full: record to {t.name!r} dropped (on_full=drop)"))
            return None
        return self._block(t, deadline)

    def _block(self, t: _Topic, deadline: float | None) -> float:
        """Wait a little for ring space (on_full=block); BufferFullError past max_block_ms."""
        info = t.info
        now = time.monotonic()
        if deadline is None:
            deadline = now + info.max_block_ms / 1000.0
        if self._never_block or now >= deadline:
            raise BufferFullError(
                f"no room in the ring for {t.name!r} within max_block_ms={info.max_block_ms}"
            )
        with self._space:
            self._space.wait(min(0.01, deadline - now))
        return deadline

    def _check_open(self) -> None:
        if self._closed or self._gone:
            raise ProducerClosedError("the producer is closed" if self._closed else "the daemon closed the connection")

    # --- completions ----------------------------------------------------------------------

    def _completions(self) -> None:
        poll = select.poll()
        bells = []
        for w in range(self.workers):
            bell = self._segment.completion_doorbell(w)
            if bell is not None:
                poll.register(bell.fd, select.POLLIN)
                bells.append(bell)
        rings = self._cmp
        # The daemon closing the connection (it stopped, or dropped this client) shows as
        # POLLHUP on the socket; no POLLIN, so replies stay for the control requests.
        sock_fd = self._sock.fileno()
        poll.register(sock_fd, 0)
        last_beat = 0.0
        try:
            while not self._closed:
                took = False
                for w, ring in enumerate(rings):
                    if self._read_ring(w, ring):
                        took = True
                now = time.monotonic()
                if now - last_beat > 1.0:
                    self._segment.beat_client()
                    last_beat = now
                if took:
                    continue
                armed = all(ring.arm() for ring in rings)
                hangup = False
                if armed:
                    for fd, ev in poll.poll(_COMPLETION_POLL_MS):
                        if fd == sock_fd and ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                            hangup = True
                    for bell in bells:
                        bell.drain()
                for ring in rings:
                    ring.disarm()
                if hangup and not self._closed:
                    # The daemon wrote its last completions before closing: take them first.
                    for w, ring in enumerate(rings):
                        self._read_ring(w, ring)
                    if self._reconnect_s and not self._dropped() and self._reconnect():
                        poll.unregister(sock_fd)
                        sock_fd = self._sock.fileno()
                        poll.register(sock_fd, 0)
                        continue
                    self._daemon_gone()
                    return
        except Exception as exc:  # noqa: BLE001 - corrupt completions: fail everything loudly
            self._fail_all(ProtocolError(f"completion ring unreadable: {exc}"))

    def _dropped(self) -> bool:
        """After a hang-up: did the daemon say why (a fatal ErrorReply)? Then it meant it."""
        with self._ctl_lock:
            sock = self._sock
            try:
                sock.setblocking(False)
                while True:
                    data = sock.recv(65536)
                    if not data:
                        break
                    self._inbox.extend(self._reader.feed(data))
            except (BlockingIOError, InterruptedError):
                pass
            except (OSError, SluiceError):
                return False
            return any(isinstance(m, control.ErrorReply) and m.fatal for m in self._inbox)

    def _reconnect(self) -> bool:
        """The daemon hung up: connect to its successor and offer the same segment under the
        same token, for up to ``reconnect_timeout_s``. True when the new daemon took it."""
        deadline = time.monotonic() + self._reconnect_s
        delay = 0.05
        seg = self._segment
        log.warning("sluice: the daemon hung up; reconnecting for up to %.0fs", self._reconnect_s)
        while not self._closed:
            left = deadline - time.monotonic()
            if left <= 0:
                log.error("sluice: no daemon took the segment back within %.0fs", self._reconnect_s)
                return False
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(max(0.1, min(self._connect_timeout, left)))
            with self._ctl_lock:
                old_sock, old_reader = self._sock, self._reader
                self._sock, self._reader = sock, control.FrameReader(control.DaemonMessage)
                self._inbox.clear()
                try:
                    sock.connect(self.socket_path)
                    sock.sendall(control.encode(self._hello()))
                    welcome = self._expect(control.Welcome)
                    if (
                        welcome.workers != self.workers
                        or welcome.request_ring_bytes != seg.request_ring_bytes
                        or welcome.completion_ring_bytes != seg.completion_ring_bytes
                    ):
                        log.error("sluice: the restarted daemon wants another segment layout; giving up")
                        sock.close()
                        return False
                    fds = seg.fds()
                    offer = control.SegmentOffer(segment_bytes=seg.size, workers=self.workers, fd_count=len(fds))
                    send_fds(sock, control.encode(offer), fds)
                    self._expect(control.SegmentAccepted)
                    # Ring frames carry topic ids: the new daemon must know them by the same ids.
                    for name, t in list(self._topics.items()):
                        sock.sendall(control.encode(control.TopicLookup(topic=name)))
                        info = self._expect(control.TopicInfo)
                        if info.topic_id != t.id:
                            log.error("sluice: topic %r has id %d in the restarted daemon, not %d; giving up",
                                      name, info.topic_id, t.id)
                            sock.close()
                            return False
                except (OSError, SluiceError) as exc:
                    sock.close()
                    self._sock, self._reader = old_sock, old_reader
                    log.debug("sluice: reconnect attempt failed: %s", exc)
                else:
                    sock.settimeout(None)
                    try:
                        old_sock.close()
                    except OSError:
                        pass
                    self.client_id = welcome.client_id
                    self.reconnects += 1
                    log.warning("sluice: reconnected as client %d; %d records pending", self.client_id, self._pending_total)
                    return True
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.5)
        return False

    def _read_ring(self, w: int, ring: Any) -> bool:
        took = False
        freed = False
        resolved = 0
        by_id = self._by_id
        while True:
            start, end = ring.region()
            if start == end:
                break
            took = True
            for _fend, tid, err, part, base, ts, count in iter_completions(ring, start, end, self._limits):
                if tid == CHUNK_DONE_TOPIC:
                    self._req[w].free_to(base)
                    freed = True
                    continue
                _resolve_fifo(by_id[tid].pending[part], part, err, base, ts, count)
                resolved += count
            ring.consume(end - start)
        if resolved:
            with self._send_lock:
                self._pending_total -= resolved
            if self._pending_total <= 0:
                with self._idle:
                    self._idle.notify_all()
        if freed:
            with self._space:
                self._space.notify_all()
        return took

    def _daemon_gone(self) -> None:
        """Fail every pending record: its outcome can no longer come (the daemon's mapping of
        the segment is gone with the connection). Later sends raise ProducerClosedError."""
        with self._send_lock:
            self._gone = True
            self._fail_all(ProducerClosedError("the daemon closed the connection before the outcome came"))
            self._pending_total = 0
        with self._idle:
            self._idle.notify_all()
        with self._space:
            self._space.notify_all()

    def _fail_all(self, exc: BaseException) -> None:
        for t in self._topics.values():
            for part, dq in enumerate(t.pending):
                while dq:
                    e = dq.popleft()
                    if type(e) is _Run:
                        e.group._settle(part, -1, e.left, -1, exc)
                    else:
                        e._resolve(exc)
        with self._idle:
            self._idle.notify_all()

    # --- flush and close ------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Records sent whose outcome has not come back yet."""
        return self._pending_total

    def flush(self, timeout: float | None = None) -> int:
        """Wait until every record sent so far has its outcome; returns how many are still
        pending (0 = all done) when ``timeout`` runs out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._pending_total > 0 and self._thread.is_alive():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._idle.wait(0.05 if remaining is None else min(0.05, remaining))
        return max(0, self._pending_total)

    def close(self, timeout: float | None = 30.0) -> None:
        """Flush (up to ``timeout``), say Goodbye and release everything.

        Records still pending after the timeout stay in shared memory and the daemon still
        delivers them; their futures here fail with ProducerClosedError.
        """
        if self._closed:
            return
        try:
            self.flush(timeout)
        finally:
            self._closed = True
            try:
                with self._ctl_lock:
                    self._sock.sendall(control.encode(control.Goodbye()))
            except OSError:
                pass
            self._thread.join(timeout=1.0)
            self._fail_all(ProducerClosedError("the producer was closed before the outcome came"))
            self._sock.close()
            for ring in self._req + self._cmp:
                ring.release()
            self._segment.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Producer({self.socket_path!r}, client_id={getattr(self, 'client_id', None)}, pending={self.pending})"
