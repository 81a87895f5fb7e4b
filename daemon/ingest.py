"""Socket ingest: the Produce frames of socket clients (any language, ``sluice send``).

The records go through an ordinary :class:`shm.Producer` that the supervisor holds, connected
to the daemon's own socket, so socket ingest has exactly the semantics of a shared-memory
client: the same partitioner, rings, workers, delivery profiles and completions.

Policies:

- Topics: a topic this producer has not sent to yet is looked up first through the daemon's
  coalescing, failure-remembering lookup (daemon/lookups.py), so an unknown topic fails at once
  while it is remembered. The server runs a Produce that needs a lookup as its own task, so the
  connection's other frames do not wait behind it (daemon/server.py keeps per-topic order).
- ``on_full = "block"``: a full ring is retried every ``_FULL_RETRY_S`` until the topic's
  ``max_block_ms``, on the event loop (never blocking it); then the record fails with
  BUFFER_FULL. ``"drop"`` fails it at once and the producer counts the drop (in its segment,
  as every client does: stats ``drops``).
- Every failure is reported, whether the Produce asked for an ack or not: the connection hears
  how many records failed (:meth:`Origin.settled`, for FlushDone's ``failed``), and records
  refused before a ring (unknown topic, partition out of range, too large, BUFFER_FULL after
  ``max_block_ms``, the daemon stopping) are counted per topic and error in
  :attr:`SocketIngest.refused` (stats ``socket.refused``). Failures after the ring are counted
  by the workers (stats ``totals.failed``). A Produce with ``ack = false`` is never answered.
- ``Produce(ack=True)``: one ProduceAck per frame, once every record has its outcome, in the
  records' order; never an ErrorReply. A failed record's result names the partition it asked
  for (else the one chosen, else -1).
- Per record, no Python and no Python object: the daemon's :class:`FrameReader` hands a Produce
  in the plain shape (no headers, no unknown keys: ``shm._client.scan_produce``, held to
  msgspec by tests) over as a :class:`PackedProduce`, whose records ``send_packed`` (compiled)
  reads from the msgpack straight into the rings; any other Produce is decoded by msgspec and
  its records sent by ``send_records``. A packed frame is decoded only when one of its records
  must go through ``send()`` (a full ring, an error to report for that record alone). An
  acknowledged frame gets a future per record and its results are encoded from them by
  ``shm._client.ack_results`` (Python only for a failure's code and name, :func:`describe`),
  queued by the frame's waiter's own callback; a frame without ack gets no futures at all, one
  :class:`shm.futures.DeliveryTally` counts its outcomes.
- Per frame, little Python: consecutive packed frames without ack to the same topic that came
  in one read are one PackedProduce (one tally, one waiter, one pass through the server): no
  one is answered for them, and what the connection is told (records in flight, failures for
  FlushDone) and what stats count are the same totals.
- Stopping (:meth:`SocketIngest.stop`): a record still waiting for ring space is refused with
  SHUTTING_DOWN; :meth:`SocketIngest.give_up` (the shutdown deadline) answers the acks still
  waiting, their unfinished records with OUTCOME_UNKNOWN.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Protocol

import msgspec

from shm import control
from shm._client import ack_results, scan_produce, tails
from shm.errors import BufferFullError, KafkaError, ProtocolError, SluiceError
from shm.futures import DeliveryTally

__all__ = [
    "INGEST_CLIENT_NAME",
    "FrameReader",
    "Origin",
    "PackedProduce",
    "RefusalCounts",
    "SocketIngest",
    "describe",
    "record_count",
]

INGEST_CLIENT_NAME = "sluice-socket-ingest"
# How often a Produce retries a full ring under on_full = "block": short next to any
# max_block_ms, long enough that a waiting Produce costs the loop nothing noticeable.
_FULL_RETRY_S = 0.002
# Topics counted by name in RefusalCounts; the refusals of any further topic (a client inventing
# names) are counted under _OTHER_TOPICS, so the counters stay bounded.
_MAX_COUNTED_TOPICS = 1024
_OTHER_TOPICS = "(other topics)"
# Kafka's code for an error it cannot name; used when the daemon cannot look a topic up at all.
_UNKNOWN_SERVER_ERROR = (-1, "UNKNOWN_SERVER_ERROR")
_PREFIX = control.LENGTH_PREFIX.size
_decode_message = msgspec.msgpack.Decoder(control.ClientMessage).decode

Lookup = Callable[[str], Awaitable[control.TopicInfo]]


class PackedProduce:
    """Produce frames whose records are still msgpack: the plain shape that
    :func:`shm._client.scan_produce` accepts (no headers, no unknown keys; anything else is
    decoded by msgspec into a :class:`shm.control.Produce`). ``Producer.send_packed`` reads the
    records straight into the rings; they are decoded (:meth:`records_of`) only for the rare
    paths (a record send() must take: a full ring, a refusal; a topic that cannot be looked up).

    One frame, or a run of frames without ack to the same topic that came in one read
    (:class:`FrameReader` joins them): nobody is answered for those, so they can share one
    tally and one pass through the server and ingest. ``parts`` holds each frame's
    ``(body, offset of its first record, records)``.
    """

    __slots__ = ("topic", "ack", "seq", "count", "parts")

    def __init__(self, body: bytes | memoryview, topic: str, ack: bool, seq: int, count: int, at: int) -> None:
        self.topic = topic
        self.ack = ack
        self.seq = seq
        self.count = count  # records, in all parts
        # A body is a view into the read it came in until keep().
        self.parts: list[tuple[bytes | memoryview, int, int]] = [(body, at, count)]

    def add(self, body: bytes | memoryview, at: int, count: int) -> None:
        """The next frame of the run (without ack, to the same topic) as the next part."""
        self.parts.append((body, at, count))
        self.count += count

    @staticmethod
    def records_of(body: bytes | memoryview) -> list[control.Rec]:
        """The records of one part's body, as msgspec decodes them."""
        msg = _decode_message(body)
        if not isinstance(msg, control.Produce):  # scan_produce() accepted a Produce
            raise ProtocolError("a packed Produce decoded as something else")
        return msg.records

    def decode(self) -> control.Produce:
        """The Produce msgspec makes of it (a joined run as one Produce without ack)."""
        records = [r for body, _at, _n in self.parts for r in self.records_of(body)]
        return control.Produce(topic=self.topic, records=records, ack=self.ack, seq=self.seq)

    def keep(self) -> None:
        """Own copies of the bodies: the frames outlive the read they came in (they wait for a
        topic lookup), and a view would keep the whole read's buffer alive."""
        self.parts = [(body if isinstance(body, bytes) else bytes(body), at, n) for body, at, n in self.parts]


def record_count(msg: control.Produce | PackedProduce) -> int:
    """How many records a Produce carries, packed or decoded."""
    return msg.count if isinstance(msg, PackedProduce) else len(msg.records)


class FrameReader:
    """The daemon's :class:`shm.control.FrameReader`: the same frames, lengths and errors, but a
    Produce in the plain shape comes out as a :class:`PackedProduce` instead of being decoded,
    and consecutive ones without ack to the same topic in one read come out as one.

    A frame that lies within one read is a view of that read's bytes (no copy); only a frame
    split across reads is assembled. A bad length (refused as soon as the prefix arrives) or a
    body msgspec refuses raises :class:`~shm.errors.ProtocolError` after the frames before it
    were yielded, and every later ``feed`` raises it again: the stream cannot be resynchronised.
    """

    __slots__ = ("_head", "_max", "_error")

    def __init__(self, max_frame_bytes: int = control.MAX_FRAME_BYTES) -> None:
        self._head = bytearray()  # a frame begun in an earlier read: its prefix and body so far
        self._max = max_frame_bytes
        self._error: str | None = None

    def feed(self, data: bytes) -> Iterator[Any]:
        """The messages complete with ``data`` (the next bytes of the stream), in order; a run
        of packed Produce frames without ack to one topic comes out as one PackedProduce."""
        run: PackedProduce | None = None
        try:
            for body, pos in self._bodies(data):
                scanned = scan_produce(body, control.MAX_PRODUCE_RECORDS)
                if scanned is None:
                    msg = self._decode(body, pos)
                    if run is not None:
                        yield run
                        run = None
                    yield msg
                    continue
                topic, ack, seq, count, at = scanned
                if not ack and run is not None and run.topic == topic:
                    run.add(body, at, count)  # joined: no object of its own
                    continue
                if run is not None:
                    yield run
                    run = None
                msg = PackedProduce(body, topic, ack, seq, count, at)
                if ack:
                    yield msg
                else:
                    run = msg
        except ProtocolError:
            if run is not None:  # the frames before a bad one are served
                yield run
            raise
        if run is not None:
            yield run

    def _bodies(self, data: bytes) -> Iterator[tuple[bytes | memoryview, int]]:
        """Each complete frame's body, and where its frame starts in ``data``."""
        if self._error is not None:
            raise ProtocolError(self._error)
        view = memoryview(data)
        n = len(data)
        pos = 0
        head = self._head
        if head:
            if len(head) < _PREFIX:
                pos = min(_PREFIX - len(head), n)
                head += view[:pos]
                if len(head) < _PREFIX:
                    return
                self._size(head, 0)
            (size,) = control.LENGTH_PREFIX.unpack_from(head, 0)
            take = min(_PREFIX + size - len(head), n - pos)
            head += view[pos : pos + take]
            pos += take
            if len(head) < _PREFIX + size:
                return
            body = bytes(head[_PREFIX:])
            head.clear()
            yield body, 0
        while n - pos >= _PREFIX:
            end = pos + _PREFIX + self._size(data, pos)
            if end > n:
                break
            yield view[pos + _PREFIX : end], pos
            pos = end
        if pos < n:
            head += view[pos:]

    def _size(self, buf: bytes | bytearray, pos: int) -> int:
        (size,) = control.LENGTH_PREFIX.unpack_from(buf, pos)
        if size == 0 or size > self._max:
            # Refused before the body arrives: a bad length must not make us buffer it.
            raise self._fail(f"frame length {size} is outside 1..{self._max}")
        return size

    def _decode(self, body: bytes | memoryview, pos: int) -> Any:
        try:
            return _decode_message(body)
        # ValidationError is a DecodeError; a str that is not UTF-8 raises UnicodeDecodeError
        # from msgspec, which is a bad frame all the same.
        except (msgspec.DecodeError, UnicodeDecodeError) as e:
            raise self._fail(f"bad frame at byte {pos}: {e}") from None

    def _fail(self, reason: str) -> ProtocolError:
        self._error = reason
        self._head = bytearray()
        return ProtocolError(reason)


class Origin(Protocol):
    """The connection a Produce came from, as ingest sees it."""

    def reply(self, msg: Any) -> None:
        """Queue ``msg`` for the client (dropped when the client is gone)."""

    def settled(self, records: int, failed: int) -> None:
        """``records`` of its records have their outcome now; ``failed`` of them failed."""


class RefusalCounts:
    """Records refused before they reached a ring: topic -> error name -> records."""

    def __init__(self) -> None:
        self._counts: dict[str, dict[str, int]] = {}

    def add(self, topic: str, error: str, records: int) -> None:
        by_error = self._counts.get(topic)
        if by_error is None:
            if len(self._counts) >= _MAX_COUNTED_TOPICS:
                topic = _OTHER_TOPICS
            by_error = self._counts.setdefault(topic, {})
        by_error[error] = by_error.get(error, 0) + records

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {topic: dict(errors) for topic, errors in self._counts.items()}


class SocketIngest:
    """The socket clients' way into the rings: one shared-memory producer, used from the loop.

    Args:
        lookup: the daemon's topic lookup (coalesced, failures remembered).
    """

    def __init__(self, lookup: Lookup) -> None:
        self._lookup = lookup
        self._producer: Any = None
        # The socket answers before the producer is attached (it connects to that very socket),
        # so a Produce that arrives in between waits for it.
        self._ready = asyncio.Event()
        # TopicInfo of every topic the producer has registered (after a successful lookup);
        # its partition count follows the topic's growth (topic_changed).
        self._infos: dict[str, control.TopicInfo] = {}
        self._stopping = False
        # Completion waiters of the Produces whose outcomes have not all come (give_up ends them).
        self._waiters: set[asyncio.Future[None]] = set()
        self.refused = RefusalCounts()

    async def start(self, socket_path: str) -> None:
        """Connect the producer to the daemon's socket (already accepting)."""
        from shm import Producer  # the client side: only the daemon's ingest needs it

        # The daemon's own producer must never block its loop: a full ring is retried in
        # produce() instead.
        producer = await asyncio.to_thread(
            Producer, socket_path, client_name=INGEST_CLIENT_NAME, reconnect_timeout_s=0.0, never_block=True
        )
        self.attach(producer)

    def attach(self, producer: Any) -> None:
        """Use ``producer`` (a connected :class:`shm.Producer` made with ``never_block=True``)
        from now on; Produce stops waiting."""
        self._producer = producer
        self._ready.set()

    def known(self, topic: str) -> bool:
        """Whether a Produce to ``topic`` goes straight to the rings (no lookup to wait for)."""
        return topic in self._infos and self._producer is not None

    def topic_changed(self, msg: control.TopicChanged) -> None:
        """A topic grew (the supervisor, on the loop, before the connections hear of it): the
        producer's partitioner uses the new count from now on, so socket clients' keyed
        records spread over the new partitions and a named new partition is taken."""
        if self._producer is None:
            return
        self._producer.topic_changed(msg)
        info = self._producer.cached(msg.topic)
        if info is not None and msg.topic in self._infos:
            self._infos[msg.topic] = info

    def stop(self) -> None:
        """The daemon is stopping: records still waiting for ring space are refused."""
        self._stopping = True

    def give_up(self) -> None:
        """The shutdown deadline: acks still waiting go out now (unfinished records as
        OUTCOME_UNKNOWN)."""
        for waiter in list(self._waiters):
            _finish(waiter)

    async def flush(self, timeout: float) -> None:
        """Wait (off the loop) up to ``timeout`` seconds for the records sent so far."""
        if self._producer is not None:
            await asyncio.to_thread(self._producer.flush, timeout)

    def close(self, timeout: float) -> None:
        """Close the producer; called once the workers are gone, so nothing is left to lose."""
        if self._producer is None:
            return
        try:
            self._producer.close(timeout=timeout)
        except Exception:  # noqa: BLE001 - the workers are gone; nothing left to lose here
            pass

    async def produce(self, msg: control.Produce | PackedProduce, origin: Origin) -> asyncio.Future[None] | None:
        """Put the records of ``msg`` into the rings.

        Returns:
            None when every record's outcome is known already (and the ack, if asked, is
            queued); else a future that completes once they are all known, the ack queued.
        """
        if self._producer is None:
            await self._ready.wait()
        producer = self._producer
        topic = msg.topic
        ack = msg.ack
        # A packed Produce's records are read from its msgpack by send_packed(); a part's are
        # decoded only if one of them has to go through send().
        parts = msg.parts if isinstance(msg, PackedProduce) else [(None, 0, len(msg.records))]
        n = record_count(msg)
        # Per record, for the ack: its future once sent, or (partition, code, name) if refused.
        results: list[Any] = [None] * n if ack else []
        futures: list[Any] = []  # ack: every record's future, in order
        info = self._infos.get(topic)
        if info is None:
            try:
                await self._lookup(topic)
                # The daemon knows the topic now, so the producer's own lookup is answered at once.
                info = await asyncio.to_thread(producer.lookup, topic)
            except KafkaError as exc:
                return self._refuse_all(msg, origin, exc.code, exc.name)
            except SluiceError:  # not connected to Kafka, the topic table full, or stopping
                code, name = (control.ERR_SHUTTING_DOWN, "SHUTTING_DOWN") if self._stopping else _UNKNOWN_SERVER_ERROR
                return self._refuse_all(msg, origin, code, name)
            self._infos[topic] = info
        loop = asyncio.get_running_loop()
        # Without ack, no future per record: one tally counts this frame's outcomes (the
        # completion thread settles a run of them with one call) and says when they are in.
        waiter: asyncio.Future[None] = loop.create_future()
        tally = None if ack else DeliveryTally(topic, on_done=lambda _t: loop.call_soon_threadsafe(_finish, waiter))
        taken = refused = 0
        base = 0  # index in the whole message of the part's first record
        for part, at, count in parts:
            records = None if part is not None else msg.records  # type: ignore[union-attr]
            i = 0
            while i < count:
                # The records the compiled path takes, in one call; then the one it stopped at
                # (if any) through send(), which raises what is wrong or finds the ring full.
                start = i
                if records is None:
                    i, at, futs = producer.send_packed(topic, part, at, i, count, tally)
                else:
                    i, futs = producer.send_records(topic, records, i, tally)
                taken += i - start
                if futs:
                    futures += futs
                    results[base + start : base + i] = futs
                if i == count:
                    break
                if records is None:
                    records = PackedProduce.records_of(part)  # type: ignore[arg-type]
                rec = records[i]
                asked = -1 if rec.partition is None else rec.partition
                deadline = time.monotonic() + info.max_block_ms / 1000.0
                while True:
                    try:
                        fut = producer.send(
                            topic, rec.value, rec.key, partition=rec.partition, headers=rec.headers, timestamp=rec.timestamp
                        )
                    except BufferFullError:
                        if info.on_full == "block" and time.monotonic() < deadline and not self._stopping:
                            await asyncio.sleep(_FULL_RETRY_S)
                            continue
                        code = control.ERR_SHUTTING_DOWN if self._stopping else control.ERR_BUFFER_FULL
                        failure = (asked, code, control.ERROR_NAMES[code])
                    except KafkaError as exc:
                        failure = (asked, exc.code, exc.name)
                    except SluiceError:  # the producer is closed: the daemon is stopping
                        failure = (asked, control.ERR_SHUTTING_DOWN, "SHUTTING_DOWN")
                    else:
                        taken += 1
                        if ack:
                            futures.append(fut)
                            results[base + i] = fut
                        else:
                            fut.add_done_callback(tally.settle_future)  # type: ignore[union-attr]
                        break
                    if ack:
                        results[base + i] = failure
                    self.refused.add(topic, failure[2], 1)
                    refused += 1
                    break
                i += 1
            base += count
        if refused:
            origin.settled(refused, refused)
        if not taken:
            if ack:
                origin.reply(_ack_frame(msg.seq, results))
            return None
        self._waiters.add(waiter)
        waiter.add_done_callback(self._waiters.discard)
        if tally is not None:
            # No reply to build: the outcomes are only counted, when the tally has them all.
            waiter.add_done_callback(lambda _w: origin.settled(taken, taken - tally.delivered))
            tally.expect(taken)
            return waiter
        _watch(loop, waiter, futures)
        # The ack is encoded and queued by the waiter's own callback, before any later one
        # (a Flush waiting on the waiter answers after it): no task per frame.
        seq = msg.seq
        waiter.add_done_callback(lambda _w: _acknowledge(origin, seq, results, taken, refused))
        return waiter

    def _refuse_all(self, msg: control.Produce | PackedProduce, origin: Origin, code: int, name: str) -> None:
        n = record_count(msg)
        self.refused.add(msg.topic, name, n)
        origin.settled(n, n)
        if msg.ack:
            records = msg.decode().records if isinstance(msg, PackedProduce) else msg.records  # acked: one frame
            origin.reply(_ack_frame(msg.seq, [(-1 if r.partition is None else r.partition, code, name) for r in records]))


def _acknowledge(origin: Origin, seq: int, results: list[Any], taken: int, refused: int) -> None:
    """Every record of an acknowledged Produce has its outcome: count them, queue the ack."""
    body, failed = ack_results(results, describe)
    origin.settled(taken, failed - refused)  # the refused were settled when they were refused
    origin.reply(control.ProduceAck(seq=seq, results=msgspec.Raw(body)))  # type: ignore[arg-type]


def _ack_frame(seq: int, slots: list[Any]) -> control.ProduceAck:
    """A ProduceAck whose results are ``slots`` (futures, or (partition, code, name) for a
    record refused before a ring), encoded in compiled code."""
    return control.ProduceAck(seq=seq, results=msgspec.Raw(ack_results(slots, describe)[0]))  # type: ignore[arg-type]


def describe(exc: BaseException | None) -> tuple[int, str]:
    """A failed record's error code and name in its RecordResult (None: the record has no
    outcome yet, because the shutdown deadline came first). Called by
    :func:`shm._client.ack_results` for the failures only; successes never reach Python."""
    if exc is None:
        return control.ERR_OUTCOME_UNKNOWN, "OUTCOME_UNKNOWN"
    if isinstance(exc, KafkaError):
        return exc.code, exc.name
    if isinstance(exc, BufferFullError):  # dropped under on_full = "drop"
        return control.ERR_BUFFER_FULL, "BUFFER_FULL"
    return control.ERR_OUTCOME_UNKNOWN, "OUTCOME_UNKNOWN"  # the producer's session ended: stopping


def _watch(loop: asyncio.AbstractEventLoop, done: asyncio.Future[None], futures: list[Any]) -> None:
    """Complete ``done`` when every DeliveryFuture of ``futures`` has its outcome.

    The records' outcomes arrive on the ingest producer's completion thread; counting them
    down there and waking the loop once per Produce costs far less than awaiting each one
    (an asyncio future and a thread-safe call per record: socket ingest ran at ~150k records/s
    with seconds of p99 latency that way). Only the last future of each partition is watched
    (:func:`shm._client.tails`): a partition's futures get their outcomes in the order they
    were sent (the completion thread settles each partition's FIFO in order), so its last one
    is done last.
    """
    last = tails(futures)
    left = [len(last)]
    lock = threading.Lock()

    def one(_f: Any) -> None:
        with lock:
            left[0] -= 1
            all_in = left[0] == 0
        if all_in:
            loop.call_soon_threadsafe(_finish, done)

    for f in last:
        f.add_done_callback(one)


def _finish(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
