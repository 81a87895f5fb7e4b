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
- Stopping (:meth:`SocketIngest.stop`): a record still waiting for ring space is refused with
  SHUTTING_DOWN; :meth:`SocketIngest.give_up` (the shutdown deadline) answers the acks still
  waiting, their unfinished records with OUTCOME_UNKNOWN.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from shm import control
from shm.errors import BufferFullError, KafkaError, SluiceError

__all__ = ["INGEST_CLIENT_NAME", "Origin", "RefusalCounts", "SocketIngest", "record_results"]

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

Lookup = Callable[[str], Awaitable[control.TopicInfo]]


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
        # TopicInfo of every topic the producer has registered (after a successful lookup).
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

    async def produce(self, msg: control.Produce, origin: Origin) -> asyncio.Future[None] | None:
        """Put the records of ``msg`` into the rings.

        Returns:
            None when every record's outcome is known already (and the ack, if asked, is
            queued); else a future that completes once they are all known, the ack queued.
        """
        if self._producer is None:
            await self._ready.wait()
        producer = self._producer
        topic = msg.topic
        records = msg.records
        n = len(records)
        results: list[control.RecordResult | None] = [None] * n
        futures: list[tuple[int, list[Any]]] = []  # (index of the first record, their futures)
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
        refused = 0
        i = 0
        while i < n:
            # The records the compiled path takes, in one call; then the one it stopped at (if
            # any) through send(), which raises what is wrong or finds the ring full.
            i, futs = producer.send_records(topic, records, i)
            if futs:
                futures.append((i - len(futs), futs))
            if i == n:
                break
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
                    results[i] = _failure(asked, code, control.ERROR_NAMES[code])
                except KafkaError as exc:
                    results[i] = _failure(asked, exc.code, exc.name)
                except SluiceError:  # the producer is closed: the daemon is stopping
                    results[i] = _failure(asked, control.ERR_SHUTTING_DOWN, "SHUTTING_DOWN")
                else:
                    futures.append((i, [fut]))
                    break
                self.refused.add(topic, results[i].error_name, 1)  # type: ignore[union-attr]
                refused += 1
                break
            i += 1
        if refused:
            origin.settled(refused, refused)
        if not futures:
            if msg.ack:
                origin.reply(control.ProduceAck(seq=msg.seq, results=results))
            return None
        waiter = _all_done(asyncio.get_running_loop(), futures)
        self._waiters.add(waiter)
        waiter.add_done_callback(self._waiters.discard)
        taken = sum(len(futs) for _first, futs in futures)
        if not msg.ack:
            # No reply to build: the outcomes are only counted, from the waiter's callback
            # (a task per frame would cost more than the counting).
            waiter.add_done_callback(lambda _w: origin.settled(taken, record_results(None, futures)))
            return waiter
        return asyncio.ensure_future(_acknowledge(origin, msg.seq, results, futures, taken, waiter))

    def _refuse_all(self, msg: control.Produce, origin: Origin, code: int, name: str) -> None:
        n = len(msg.records)
        self.refused.add(msg.topic, name, n)
        origin.settled(n, n)
        if msg.ack:
            origin.reply(control.ProduceAck(
                seq=msg.seq, results=[_failure(-1 if r.partition is None else r.partition, code, name) for r in msg.records]
            ))


async def _acknowledge(
    origin: Origin, seq: int, results: list[Any], futures: list[tuple[int, list[Any]]], taken: int,
    waiter: asyncio.Future[None],
) -> None:
    await waiter
    origin.settled(taken, record_results(results, futures))
    origin.reply(control.ProduceAck(seq=seq, results=results))


def record_results(results: list[Any] | None, futures: list[tuple[int, list[Any]]]) -> int:
    """The per-record step of a ProduceAck: fill ``results`` from the records' DeliveryFutures,
    ``(first index, futures)`` runs; returns how many failed. With ``results`` None (an
    unacknowledged Produce) it only counts the failures.

    The one per-record loop of socket ingest's completion, kept apart so it can be compiled
    without touching its callers. A future not done (the shutdown deadline came first) is
    OUTCOME_UNKNOWN.
    """
    if results is None:
        return sum(1 for _first, futs in futures for fut in futs if not fut.done() or fut.exception(0) is not None)
    failed = 0
    for first, futs in futures:
        for k, fut in enumerate(futs):
            if not fut.done():
                failed += 1
                results[first + k] = _failure(fut.partition, control.ERR_OUTCOME_UNKNOWN, "OUTCOME_UNKNOWN")
                continue
            try:
                meta = fut.result(0)
            except KafkaError as exc:
                failed += 1
                results[first + k] = _failure(fut.partition, exc.code, exc.name)
                continue
            except BufferFullError:  # dropped under on_full = "drop"
                failed += 1
                results[first + k] = _failure(fut.partition, control.ERR_BUFFER_FULL, "BUFFER_FULL")
                continue
            except SluiceError:  # the producer's session ended: the daemon is stopping
                failed += 1
                results[first + k] = _failure(fut.partition, control.ERR_OUTCOME_UNKNOWN, "OUTCOME_UNKNOWN")
                continue
            results[first + k] = control.RecordResult(
                partition=meta.partition, offset=meta.offset, timestamp=meta.timestamp, error_code=0, error_name="NONE"
            )
    return failed


def _failure(partition: int, code: int, name: str) -> control.RecordResult:
    return control.RecordResult(partition=partition, offset=-1, timestamp=-1, error_code=code, error_name=name)


def _all_done(loop: asyncio.AbstractEventLoop, runs: list[tuple[int, list[Any]]]) -> asyncio.Future[None]:
    """One asyncio future that completes when every DeliveryFuture in ``runs`` (``(first
    index, futures)`` pairs) has its outcome.

    The records' outcomes arrive on the ingest producer's completion thread; counting them
    down there and waking the loop once per Produce costs far less than awaiting each one
    (an asyncio future and a thread-safe call per record: socket ingest ran at ~150k records/s
    with seconds of p99 latency that way). Only the last future of each partition is watched:
    a partition's futures get their outcomes in the order they were sent (the completion
    thread settles each partition's FIFO in order), so its last one is done last.
    """
    done: asyncio.Future[None] = loop.create_future()
    last: dict[int, Any] = {}
    for _first, futs in runs:
        for f in futs:
            last[f.partition] = f
    futs = list(last.values())
    if not futs:
        done.set_result(None)
        return done
    left = [len(futs)]
    lock = threading.Lock()

    def one(_f: Any) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            loop.call_soon_threadsafe(_finish, done)

    for f in futs:
        f.add_done_callback(one)
    return done


def _finish(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
