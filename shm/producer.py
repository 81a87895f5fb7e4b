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

Thread safety: ``send()`` may be called from several threads (a lock keeps each ring single-
producer). Futures are resolved on the completion thread; ``on_delivery`` callbacks run there
too and must be quick.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import msgspec

from shm import control
from shm.errors import BufferFullError, KafkaError, ProtocolError, SluiceError
from shm.frames import CHUNK_DONE_TOPIC, encode_record_body, iter_completions, put_record
from shm.partitioner import KeyHashCache, StickyPartitioner, owner
from shm.segment import Segment, send_fds

__all__ = [
    "Producer",
    "RecordMetadata",
    "DeliveryFuture",
    "DEFAULT_SOCKET",
    "ProducerClosedError",
]

DEFAULT_SOCKET = "/run/sluice/sluice.sock"
_COMPLETION_POLL_MS = 20
_UNKNOWN_TOPIC = 3
_MESSAGE_TOO_LARGE = 10


class ProducerClosedError(SluiceError):
    """The producer was closed (or its daemon went away) before the record's outcome came."""


class RecordMetadata(NamedTuple):
    """Where a record landed. ``offset`` is -1 under acks=0."""

    topic: str
    partition: int
    offset: int
    timestamp: int


_PENDING, _OK, _FAILED = 0, 1, 2


class DeliveryFuture:
    """The outcome of one ``send()``: ``result(timeout)`` returns RecordMetadata or raises.

    Lighter than ``concurrent.futures.Future``: no lock or event unless someone waits.
    Awaitable from asyncio code (``meta = await producer.send(...)``).
    """

    __slots__ = ("topic", "partition", "timestamp", "_state", "_value", "_waiter", "_callbacks")

    def __init__(self, topic: str, partition: int, timestamp: int) -> None:
        self.topic = topic
        self.partition = partition
        self.timestamp = timestamp
        self._state = _PENDING
        self._value: Any = None
        self._waiter: threading.Event | None = None
        self._callbacks: list[Callable[[DeliveryFuture], None]] | None = None

    def done(self) -> bool:
        return self._state != _PENDING

    def result(self, timeout: float | None = None) -> RecordMetadata:
        """Block until the outcome; raise its error (a KafkaError subclass) or TimeoutError."""
        if self._state == _PENDING:
            self._wait(timeout)
        if self._state == _OK:
            return self._value
        raise self._value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == _PENDING:
            self._wait(timeout)
        return self._value if self._state == _FAILED else None

    def _wait(self, timeout: float | None) -> None:
        ev = self._waiter
        if ev is None:
            ev = threading.Event()
            self._waiter = ev
            if self._state != _PENDING:  # resolved while we made the event
                return
        if not ev.wait(timeout) and self._state == _PENDING:
            raise TimeoutError(f"no outcome for a record to {self.topic} within {timeout}s")

    def add_done_callback(self, fn: Callable[[DeliveryFuture], None]) -> None:
        if self._state != _PENDING:
            fn(self)
            return
        if self._callbacks is None:
            self._callbacks = []
        self._callbacks.append(fn)
        if self._state != _PENDING and self._callbacks:  # raced with resolution
            cbs, self._callbacks = self._callbacks, None
            for cb in cbs:
                cb(self)

    def _resolve(self, state: int, value: Any) -> None:
        self._value = value
        self._state = state
        ev = self._waiter
        if ev is not None:
            ev.set()
        cbs = self._callbacks
        if cbs:
            self._callbacks = None
            for cb in cbs:
                try:
                    cb(self)
                except Exception:  # noqa: BLE001 - a user callback must not kill the completion thread
                    pass

    def __await__(self):  # noqa: ANN204
        loop = asyncio.get_running_loop()
        afut: asyncio.Future[RecordMetadata] = loop.create_future()

        def relay(f: DeliveryFuture) -> None:
            loop.call_soon_threadsafe(_settle, afut, f)

        self.add_done_callback(relay)
        return afut.__await__()


def _settle(afut: asyncio.Future[RecordMetadata], f: DeliveryFuture) -> None:
    if afut.done():
        return
    if f._state == _OK:
        afut.set_result(f._value)
    else:
        afut.set_exception(f._value)


class _Topic:
    __slots__ = ("name", "id", "partitions", "owners", "pending", "info", "sticky")

    def __init__(self, info: control.TopicInfo, workers: int) -> None:
        self.name = info.topic
        self.id = info.topic_id
        self.partitions = info.partitions
        self.owners = [owner(info.topic, p, workers) for p in range(info.partitions)]
        # One FIFO of DeliveryFutures per partition, resolved in order by completions.
        self.pending: list[deque[DeliveryFuture]] = [deque() for _ in range(info.partitions)]
        self.info = info
        self.sticky = StickyPartitioner(max(1, info.batch_size))


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


class Producer:
    """A Sluice client over shared memory.

    Args:
        socket_path: the daemon's socket; default ``$SLUICE_SOCKET``, else
            ``/run/sluice/sluice.sock``.
        client_name: shown in the daemon's logs and stats (default: the program and pid).
        value_serializer, key_serializer: ``None``/``"bytes"`` (bytes as they are, str as
            UTF-8), ``"str"``, ``"json"``, ``"msgpack"`` or a callable returning bytes.
        connect_timeout: seconds for the connection and handshake.

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

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(connect_timeout)
        try:
            sock.connect(self.socket_path)
            self._sock = sock
            welcome = self._request(
                control.Hello(version=control.PROTOCOL_VERSION, client_name=name, pid=os.getpid(), wants_segment=True),
                control.Welcome,
            )
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
        t = self._topics.get(topic)
        if t is None:
            t = self._add_topic(topic)
        v = self._vser(value) if self._vser is not None and value is not None else _as_bytes(value)
        k = self._kser(key) if self._kser is not None and key is not None else _as_bytes(key)
        body = encode_record_body(k, v, headers)
        size = len(body)
        if size + 90 > t.info.max_request_size:
            raise KafkaError.for_code(
                _MESSAGE_TOO_LARGE,
                f"record of about {size + 90} bytes is larger than max_request_size "
                f"{t.info.max_request_size} of topic {topic!r}",
            )
        n = t.partitions
        if partition is None:
            partition = self._keys.partition(bytes(k), n) if k is not None else t.sticky.partition(topic, n, size)
        elif not 0 <= partition < n:
            raise KafkaError.for_code(_UNKNOWN_TOPIC, f"partition {partition} of {topic!r} (it has {n})")
        ts = timestamp if timestamp is not None else int(time.time() * 1000)
        fut = DeliveryFuture(topic, partition, ts)
        if on_delivery is not None:
            fut._callbacks = [on_delivery]
        self._enqueue(t, partition, ts, body, fut)
        return fut

    def send_many(
        self,
        topic: str,
        values: Iterable[Any],
        keys: Iterable[Any] | None = None,
        *,
        partition: int | None = None,
        headers: Sequence[tuple[str | bytes, bytes | None]] | None = None,
        on_delivery: Callable[[DeliveryFuture], None] | None = None,
    ) -> list[DeliveryFuture]:
        """``send()`` for many records of one topic; one head publish per ring per call."""
        t = self._topics.get(topic)
        if t is None:
            t = self._add_topic(topic)
        vser, kser = self._vser, self._kser
        n = t.partitions
        if partition is not None and not 0 <= partition < n:
            raise KafkaError.for_code(_UNKNOWN_TOPIC, f"partition {partition} of {topic!r} (it has {n})")
        limit = t.info.max_request_size - 90
        ts = int(time.time() * 1000)
        keyiter = iter(keys) if keys is not None else None
        by_worker: dict[int, list[tuple[int, bytes, DeliveryFuture]]] = {}
        futures: list[DeliveryFuture] = []
        kpart = self._keys.partition
        sticky = t.sticky.partition
        owners = t.owners
        for value in values:
            key = next(keyiter) if keyiter is not None else None
            v = vser(value) if vser is not None and value is not None else _as_bytes(value)
            k = kser(key) if kser is not None and key is not None else _as_bytes(key)
            body = encode_record_body(k, v, headers)
            if len(body) > limit:
                raise KafkaError.for_code(_MESSAGE_TOO_LARGE, f"record larger than max_request_size of {topic!r}")
            p = partition
            if p is None:
                p = kpart(bytes(k), n) if k is not None else sticky(topic, n, len(body))
            fut = DeliveryFuture(topic, p, ts)
            if on_delivery is not None:
                fut._callbacks = [on_delivery]
            by_worker.setdefault(owners[p], []).append((p, body, fut))
            futures.append(fut)
        for w, items in by_worker.items():
            self._enqueue_many(t, w, ts, items)
        return futures

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

    def _enqueue_many(self, t: _Topic, w: int, ts: int, items: list[tuple[int, bytes, DeliveryFuture]]) -> None:
        ring = self._req[w]
        pending = t.pending
        tid = t.id
        i = 0
        deadline = None
        while i < len(items):
            with self._send_lock:
                self._check_open()
                start = i
                while i < len(items):
                    p, body, fut = items[i]
                    pending[p].append(fut)
                    if not put_record(ring, tid, p, ts, body):
                        pending[p].pop()
                        break
                    i += 1
                if i > start:
                    ring.publish_head()
                    self._pending_total += i - start
            if i < len(items):
                deadline = self._wait_for_room(t, ring, deadline, items[i][2])
                if deadline is None:
                    i += 1  # dropped

    def _wait_for_room(self, t: _Topic, ring: Any, deadline: float | None, fut: DeliveryFuture) -> float | None:
        """The ring is full: wait (block policy) or drop. Returns the deadline, None if dropped."""
        info = t.info
        if info.on_full == "drop":
            self.drops[t.name] = self.drops.get(t.name, 0) + 1
            fut._resolve(_FAILED, BufferFullError(f"ring full: record to {t.name!r} dropped (on_full=drop)"))
            return None
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
                    self._daemon_gone()
                    return
        except Exception as exc:  # noqa: BLE001 - corrupt completions: fail everything loudly
            self._fail_all(ProtocolError(f"completion ring unreadable: {exc}"))

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
                t = by_id[tid]
                dq = t.pending[part]
                if err:
                    exc = KafkaError.for_code(err)
                    for _ in range(count):
                        dq.popleft()._resolve(_FAILED, exc)
                else:
                    name = t.name
                    for i in range(count):
                        f = dq.popleft()
                        f._resolve(
                            _OK,
                            RecordMetadata(name, part, base + i if base >= 0 else -1, ts if ts >= 0 else f.timestamp),
                        )
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
            for dq in t.pending:
                while dq:
                    dq.popleft()._resolve(_FAILED, exc)
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
