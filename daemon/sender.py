"""The sender: takes sealed batches from the accumulator and produces them to Kafka.

asyncio (runs on uvloop). It owns the per-partition queues, the in-flight windows, dispatch and
every retry decision; the accumulator knows none of it. The queues and the life of each batch in
them (enqueue, retry, expire, the one completion) are :class:`_Queues`; :class:`Sender` runs the
loop, dispatches and reads the answers. It builds on three modules, each of which states its own
policy:

* :mod:`daemon.connection`: one connection per broker, correlation ids, reconnect backoff; the
  sender is its :class:`~daemon.connection.ConnectionListener`;
* :mod:`daemon.metadata`: leaders per partition, refreshed on demand, on leader errors and on a
  timer;
* :mod:`daemon.idempotence`: the producer id, stamping, the sequence chains and the
  out-of-order policy.

Dispatch
    Requests to one broker are pipelined up to ``max_in_flight_requests_per_connection``.
    A request's deadline is the batch profile's ``request_timeout_ms`` after it is written (plus
    a second, so the broker's own timeout answers first). Batches of different acks (or request
    timeouts) never share a request, and a request stays within ``max_request_size``.

Ordering and retries
    Each partition has a queue of batches in creation order; retried batches go back to their
    place in it, so a partition never sends a later batch before an earlier one. Without
    idempotence at most one batch per partition is in flight. Retriable errors retry after
    ``retry_backoff_ms`` doubling to ``retry_backoff_max_ms`` (+-20 % jitter) until
    ``created_ms + delivery_timeout_ms``, then fail with REQUEST_TIMED_OUT (with
    UNKNOWN_TOPIC_OR_PARTITION when that was the broker's last answer: a topic deleted under its
    records says so, not "timed out"; with SASL_AUTHENTICATION_FAILED when the partition's leader
    is a broker given up on after an authentication failure); other errors fail the
    batch at once. A batch waiting for a leader or a connection expires the same way.
    acks=0 batches get no response: they complete (base offset -1) once the transport has
    written them out. DUPLICATE_SEQUENCE_NUMBER counts as success.

Batches too large for the topic
    A batch of several records refused with MESSAGE_TOO_LARGE or RECORD_LIST_TOO_LARGE is cut
    in two halves (:meth:`Accumulator.split <daemon.accumulator.Accumulator.split>`) that take
    its place in the partition's queue and go at once, halves of halves if need be, as the Java
    producer does. A stamped batch was refused, so its sequence numbers were not used: the
    halves take them (the first half its base sequence, the second the rest), so the chain has
    no gap and later batches answered OUT_OF_ORDER meanwhile are retried behind them. Only a
    single record larger than the limit fails (or a batch the accumulator cannot split).
    The smallest refused size is remembered per topic for ``metadata_max_age_ms``: a new batch
    that large is split before its first send, so in steady state only the first batch of a
    topic is refused, and few oversized stamped batches are in flight when a worker dies. A
    batch recovered from a dead worker's arena is split the same way (:mod:`daemon.recovery`);
    when a run it cuts lies where its client's ring has not been read again yet
    (:class:`~daemon.accumulator.SplitDeferred`), it is retried after the usual backoff and
    split then.

Leader changes
    A retry goes to the partition's leader as metadata knows it when the batch leaves. When that
    leader differs from the broker that refused the batch (a CurrentLeader in the response, or a
    metadata refresh since), the backoff is skipped: the new leader has no reason to refuse it.
    Leadership older than the one known (by leader epoch) never replaces it
    (:mod:`daemon.metadata`). A partition without a leader holds its batches until one is
    elected or their delivery timeout passes.

Throttling
    A Produce response with ``throttle_time_ms > 0`` (a quota was exceeded; the broker mutes the
    connection for that long) stops new requests to that broker until the time has passed, as
    KIP-219 asks of clients; requests already written still answer. Counted in
    ``throttle_ms`` (exported as ``sluice_produce_throttle_seconds_total``).

``on_complete(batch, error_code, base_offset, log_append_time_ms)`` is called exactly once per
batch, then ``accumulator.release(batch)``. Every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from daemon.accumulator import SplitDeferred
from daemon.config import KafkaSettings, Profile
from daemon.connection import Connection, ConnectionPool
from daemon.idempotence import MAX_IN_FLIGHT, SEQUENCE_ERRORS, SEQUENCE_MODULUS, Chain, Idempotence, Verdict
from daemon.metadata import Metadata
from daemon.protocol import errors as ec
from daemon.protocol import messages as m
from daemon.security import BrokerAuthError
from shm.errors import ProtocolError

__all__ = ["Sender"]

log = logging.getLogger(__name__)

# Longest the main loop sleeps without a reason; a safety net, not a poll: every event that
# matters (new batch, response, connection change) wakes it directly.
_MAX_IDLE_MS = 200.0
_EXPIRY_SCAN_INTERVAL_MS = 20.0
# The broker times a Produce out after timeout_ms; wait this much longer so its answer wins.
_REQUEST_GRACE_MS = 1000.0
# Without idempotence a retried batch could be written behind a later one: one at a time.
_PLAIN_MAX_IN_FLIGHT = 1

# Refusals of a batch too large for the topic: split it, unless it is a single record.
_SPLIT_CODES = frozenset({ec.MESSAGE_TOO_LARGE, ec.RECORD_LIST_TOO_LARGE})

# Errors after which the cached leader is suspect.
_REFRESH_CODES = frozenset(
    {
        ec.NOT_LEADER_OR_FOLLOWER,
        ec.LEADER_NOT_AVAILABLE,
        ec.UNKNOWN_TOPIC_OR_PARTITION,
        ec.FENCED_LEADER_EPOCH,
        ec.UNKNOWN_LEADER_EPOCH,
        ec.KAFKA_STORAGE_ERROR,
        ec.NETWORK_EXCEPTION,
        ec.REQUEST_TIMED_OUT,
        ec.UNKNOWN_TOPIC_ID,
    }
)


def _now_ms() -> float:
    return time.monotonic() * 1000.0


class _Entry:
    """Sender-side state of one batch."""

    __slots__ = ("batch", "order", "span", "part", "idempotent", "needs_stamp", "in_flight", "done",
                 "not_before_ms", "deadline_ms", "retries")

    def __init__(self, batch: Any, order: float, part: _Partition, idempotent: bool, deadline_ms: float,
                 span: float = 1.0) -> None:
        self.batch = batch
        self.order = order
        # Orders order .. order + span belong to this batch: the halves of a split share them.
        self.span = span
        self.part = part
        self.idempotent = idempotent
        self.needs_stamp = idempotent
        self.in_flight = False
        self.done = False
        self.not_before_ms = 0.0
        self.deadline_ms = deadline_ms
        self.retries = 0

    def took_off(self) -> None:
        """Its request is answered or lost: it is no longer in flight."""
        self.in_flight = False
        try:
            self.part.in_flight.remove(self)
        except ValueError:
            pass


class _Partition:
    """Per-partition queue, in-flight list and idempotent sequence chain."""

    __slots__ = ("topic", "partition", "queue", "in_flight", "node", "chain", "gone")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition
        self.queue: list[_Entry] = []  # sorted by _Entry.order
        self.in_flight: list[_Entry] = []
        self.node = -1
        self.chain = Chain()
        # The broker's last answer for this partition was UNKNOWN_TOPIC_OR_PARTITION (the
        # topic was deleted, say): batches that expire say that instead of REQUEST_TIMED_OUT.
        self.gone = False

    def requeue(self, entry: _Entry) -> None:
        q = self.queue
        i = len(q)
        while i > 0 and q[i - 1].order > entry.order:
            i -= 1
        q.insert(i, entry)


class _ProduceRequest:
    """One Produce request: its entries by (topic, partition)."""

    __slots__ = ("entries", "acks", "node")

    def __init__(self, entries: dict[tuple[str, int], _Entry], acks: int, node: int) -> None:
        self.entries = entries
        self.acks = acks
        self.node = node


class _Queues:
    """Every batch the sender holds, per partition in creation order, until its one completion.

    A retried batch goes back to its place in its partition's queue after a backoff, until its
    delivery timeout; ``on_complete`` is called once per batch, then ``accumulator.release``.
    """

    def __init__(self, accumulator: Any, profile_for: Callable[[str], Profile],
                 on_complete: Callable[[Any, int, int, int], None], stats: dict[str, Any], metadata: Metadata,
                 auth_failed: Callable[[int], bool] = lambda node: False) -> None:
        self.accumulator = accumulator
        # Whether a broker was given up on after an authentication failure (the pool's fatal).
        self._auth_failed = auth_failed
        self.profile_for = profile_for
        self.on_complete = on_complete
        self.stats = stats
        self._metadata = metadata
        self.parts: dict[tuple[str, int], _Partition] = {}
        # Partitions whose queue may hold batches (emptied ones are dropped lazily).
        self.queued: set[_Partition] = set()
        # Batches enqueued and not completed yet.
        self.outstanding = 0
        # Set on every completion, for flush() to wait on.
        self.progress = asyncio.Event()
        self._order = 0
        self._stopped = False

    def stop(self) -> None:
        """From now on a retry fails its batch (REQUEST_TIMED_OUT) instead of requeueing it."""
        self._stopped = True

    def profile(self, batch: Any) -> Profile:
        """The batch's profile (a batch without one gets its topic's)."""
        profile = getattr(batch, "profile", None)
        return profile if profile is not None else self.profile_for(batch.topic)

    def enqueue(self, batch: Any, now: float) -> _Entry:
        """Queue a new batch behind its partition's others."""
        profile = self.profile(batch)
        key = (batch.topic, batch.partition)
        part = self.parts.get(key)
        if part is None:
            part = self.parts[key] = _Partition(batch.topic, batch.partition)
        idem = profile.enable_idempotence and profile.acks == -1
        self._order += 1
        deadline = batch.created_ms + profile.delivery_timeout_ms
        entry = _Entry(batch, self._order, part, idem, deadline)
        self.outstanding += 1
        part.queue.append(entry)
        self.queued.add(part)
        self._metadata.need(batch.topic)
        return entry

    def complete_batch(self, batch: Any, code: int, base_offset: int, log_append_time_ms: int) -> None:
        """Count the outcome, call on_complete, release the batch."""
        st = self.stats
        if code == 0:
            st["batches"] += 1
            st["records"] += batch.record_count
            st["bytes"] += batch.size
        else:
            st["failed_batches"] += 1
            name = ec.error_name(code)
            st["errors"][name] = st["errors"].get(name, 0) + 1
        try:
            self.on_complete(batch, code, base_offset, log_append_time_ms)
        except Exception:  # noqa: BLE001 - a faulty callback must not stop the sender
            log.exception("on_complete raised for %s[%s]", batch.topic, batch.partition)
        finally:
            self.accumulator.release(batch)
            self.progress.set()

    def replace(self, e: _Entry, halves: list[Any]) -> None:
        """Put the halves of a split batch in its place, first in line, to go at once; a stamped
        batch's sequence range passes to them. ``e`` is done without a completion (its halves
        complete its records)."""
        if e.done:
            return
        e.done = True
        part = e.part
        stamped = e.idempotent and not e.needs_stamp
        seq = e.batch.base_sequence
        span = e.span / len(halves)
        for i, half in enumerate(halves):
            if stamped:
                half.stamp(e.batch.producer_id, e.batch.producer_epoch, seq)
                seq = (seq + half.record_count) % SEQUENCE_MODULUS
            h = _Entry(half, e.order + i * span, part, e.idempotent, e.deadline_ms, span)
            h.needs_stamp = e.needs_stamp
            h.retries = e.retries
            self.outstanding += 1
            part.requeue(h)
        self.outstanding -= 1
        self.queued.add(part)

    def finish(self, e: _Entry, code: int, base_offset: int, log_append_time_ms: int) -> None:
        """Complete a queued batch (once; later calls do nothing)."""
        if e.done:
            return
        e.done = True
        self.outstanding -= 1
        self.complete_batch(e.batch, code, base_offset, log_append_time_ms)

    def fail(self, e: _Entry, code: int) -> None:
        """Complete a queued batch with error ``code``."""
        if e.done:
            return
        if e.idempotent and not e.needs_stamp:
            # The chain of this producer id on this partition may now have a gap: later batches
            # answered OUT_OF_ORDER get re-stamped under a new id instead of failing too.
            e.part.chain.break_at(e.batch)
        self.finish(e, code, -1, -1)

    def retry(self, e: _Entry, code: int, now: float, backoff: bool = True) -> None:
        """Requeue a batch in its place, after a backoff; fail it past its delivery timeout."""
        if e.done:
            return
        if now >= e.deadline_ms or self._stopped:
            log.debug("batch %s[%s] expired after %s", e.part.topic, e.part.partition, ec.error_name(code))
            self.fail(e, ec.UNKNOWN_TOPIC_OR_PARTITION if e.part.gone else ec.REQUEST_TIMED_OUT)
            return
        e.retries += 1
        self.stats["retries"] += 1
        if backoff:
            profile = self.profile(e.batch)
            base = profile.retry_backoff_ms * (2 ** min(e.retries - 1, 20))
            delay = min(base, profile.retry_backoff_max_ms) * random.uniform(0.8, 1.2)
            e.not_before_ms = now + min(delay, profile.retry_backoff_max_ms)
        else:
            e.not_before_ms = 0.0
        e.part.requeue(e)
        self.queued.add(e.part)

    def expire(self, now: float) -> None:
        """Fail the queued batches past their delivery timeout."""
        for part in list(self.queued):
            if not part.queue:
                self.queued.discard(part)
                continue
            keep = []
            for e in part.queue:
                if now >= e.deadline_ms:
                    # Say why it never left, when metadata knows (the topic is gone, say).
                    topic_code = self._metadata.error_code(part.topic)
                    code = ec.UNKNOWN_TOPIC_OR_PARTITION if part.gone else ec.REQUEST_TIMED_OUT
                    if topic_code and topic_code != ec.LEADER_NOT_AVAILABLE:
                        code = topic_code
                    elif code == ec.REQUEST_TIMED_OUT and self._auth_failed(self._metadata.leader(part.topic, part.partition)):
                        # Its leader refused our credentials or certificate: say so, not a timeout.
                        code = BrokerAuthError.code
                    self.fail(e, code)
                else:
                    keep.append(e)
            part.queue = keep
            if not keep:
                self.queued.discard(part)

    def fail_all(self, code: int) -> None:
        """Fail every queued batch (not those in flight)."""
        for part in list(self.parts.values()):
            for e in list(part.queue):
                self.fail(e, code)
            part.queue.clear()
        self.queued.clear()

    def fail_topic(self, topic: str, code: int) -> None:
        """Fail the topic's queued batches."""
        for part in list(self.queued):
            if part.topic == topic:
                for e in part.queue:
                    self.fail(e, code)
                part.queue = []
                self.queued.discard(part)

    def next_wake(self, now: float, wake: float) -> float:
        """``wake``, or earlier if a queue's head may go (or expire) sooner."""
        for part in self.queued:
            if part.queue:
                head = part.queue[0]
                if head.not_before_ms > now:
                    wake = min(wake, head.not_before_ms)
                wake = min(wake, head.deadline_ms)
        return wake


class Sender:
    """Produces the accumulator's sealed batches to Kafka (see the module docstring).

    Args:
        settings: connection-level settings.
        accumulator: the batch source (``ready``, ``next_deadline``, ``flush``, ``release``,
            ``split``).
        profile_for: topic -> Profile (used when a batch carries no profile).
        on_complete: ``(batch, error_code, base_offset, log_append_time_ms)``, once per batch.
        on_partition_count: optional ``(topic, count)`` callback when a topic's partition count
            is first learnt or changes.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        accumulator: Any,
        profile_for: Callable[[str], Profile],
        on_complete: Callable[[Any, int, int, int], None],
        *,
        on_partition_count: Callable[[str, int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.accumulator = accumulator
        # Shared with the connections, metadata, idempotence and queues, each counting its own keys.
        self.stats: dict[str, Any] = {
            "requests": 0,
            "batches": 0,
            "records": 0,
            "bytes": 0,
            "retries": 0,
            "failed_batches": 0,
            "errors": {},
            "in_flight": 0,
            "metadata_requests": 0,
            "reconnects": 0,
            "producer_id_requests": 0,
            "protocol_errors": 0,
            "throttle_ms": 0,
            "splits": 0,
            "stale_leaders": 0,
            "brokers_auth_failed": 0,
        }
        self._connections = ConnectionPool(settings, self.stats, listener=self, wakeup=self.wakeup)
        self._metadata = Metadata(settings, self._connections, stats=self.stats, on_partition_count=on_partition_count,
                                  on_topic_error=self._on_topic_error, wakeup=self.wakeup)
        self._idempotence = Idempotence(settings, self._connections, stats=self.stats, wakeup=self.wakeup)
        self._queues = _Queues(accumulator, profile_for, on_complete, self.stats, self._metadata,
                               auth_failed=lambda node: node in self._connections.fatal)
        self._wake_fut: asyncio.Future[None] | None = None
        self._closing = False
        self._stopped = False
        self._last_expiry_scan = 0.0
        self._too_large_warned: set[str] = set()
        # topic -> (the smallest batch size refused as too large, until when it is believed)
        self._too_large: dict[str, tuple[int, float]] = {}

    # --- public API -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to a bootstrap server, run ApiVersions and fetch the broker list.

        The producer id (InitProducerId) is fetched when the first idempotent batch needs it,
        so a sender whose profiles are all non-idempotent never asks for one.
        """
        await self._metadata.start()

    async def partitions_for(self, topic: str, timeout: float = 5.0) -> int:
        """The topic's partition count (see :meth:`daemon.metadata.Metadata.partitions_for`)."""
        return await self._metadata.partitions_for(topic, timeout)

    def wakeup(self) -> None:
        """New records were appended: re-check ``accumulator.ready()`` soon."""
        fut = self._wake_fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def run(self) -> None:
        """The main loop, until :meth:`close`."""
        loop = asyncio.get_running_loop()
        try:
            while not self._stopped:
                now = _now_ms()
                try:
                    self._step(now)
                except Exception:  # noqa: BLE001 - a bug must be loud, but must not hang producers
                    log.exception("sender step failed")
                    await asyncio.sleep(0.05)
                delay = self._next_wake_ms(now) - _now_ms()
                if delay <= 0:
                    await asyncio.sleep(0)
                    continue
                fut = loop.create_future()
                self._wake_fut = fut
                handle = loop.call_later(delay / 1000.0, _resolve, fut)
                try:
                    await fut
                finally:
                    handle.cancel()
                    self._wake_fut = None
        finally:
            self._stop()

    async def flush(self, timeout: float) -> bool:
        """Seal every open batch and wait until all batches are completed. False on timeout."""
        self.accumulator.flush()
        self.wakeup()
        progress = self._queues.progress
        deadline = time.monotonic() + timeout
        while not self._idle():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            progress.clear()
            try:
                await asyncio.wait_for(progress.wait(), min(remaining, 0.05))
            except asyncio.TimeoutError:
                pass
            self.wakeup()
        return True

    async def close(self, timeout: float) -> None:
        """Flush for up to ``timeout`` seconds, fail what is left, close every connection.

        Batches still undelivered at the deadline complete with REQUEST_TIMED_OUT.
        """
        if self._closing:
            return
        self._closing = True
        try:
            await self.flush(timeout)
        finally:
            self._stop()
            self.wakeup()
            now = _now_ms()
            queues = self._queues
            self.accumulator.flush()
            for batch in self.accumulator.ready(now + 1e12):
                queues.complete_batch(batch, ec.REQUEST_TIMED_OUT, -1, -1)
            queues.fail_all(ec.REQUEST_TIMED_OUT)
            self._connections.close(ec.REQUEST_TIMED_OUT)
            # The requests failed by that close requeue nothing (the queues are stopped, so a
            # retry fails its batch); fail the queues again all the same, so that no batch can
            # be left without its on_complete.
            queues.fail_all(ec.REQUEST_TIMED_OUT)
            self._metadata.close()
            self._idempotence.close()

    def adopt(self, batches: list[Any]) -> None:
        """Queue a dead worker's stamped batches to be sent again, byte for byte.

        Call before :meth:`run` with the batches in creation order: each goes first in its
        partition's queue with its own producer id, epoch and sequence, so the broker writes it
        once (DUPLICATE_SEQUENCE_NUMBER, or the original offset, if it already had it). New
        batches of that partition are stamped under this sender's producer id only after these
        have answered (:meth:`daemon.idempotence.Idempotence.may_send`). An
        OUT_OF_ORDER_SEQUENCE_NUMBER or UNKNOWN_PRODUCER_ID answer proves the broker did not
        write one (its chain is not ours to repair), so it is re-stamped under the new id.
        """
        now = _now_ms()
        for batch in batches:
            e = self._queues.enqueue(batch, now)
            stamped = batch.producer_id >= 0
            e.idempotent = stamped
            e.needs_stamp = False
            if stamped:
                e.part.chain.break_at(batch)

    # --- ConnectionListener -----------------------------------------------------------------

    def on_response(self, conn: Connection, context: Any, body: memoryview) -> None:
        """A Produce response: complete, retry or fail each of its batches."""
        preq: _ProduceRequest = context
        try:
            resp = m.decode_produce_response(body, conn.versions[m.PRODUCE])
        except ProtocolError:
            self.stats["protocol_errors"] += 1
            self.on_request_failed(preq, ec.NETWORK_EXCEPTION)
            raise
        now = _now_ms()
        pool = self._connections
        if resp.throttle_time_ms > 0:
            conn.throttle(now, resp.throttle_time_ms)
            self.stats["throttle_ms"] += resp.throttle_time_ms
        for ep in resp.node_endpoints:
            pool.add_broker(ep.node_id, ep.host, ep.port)
        seen: set[tuple[str, int]] = set()
        for t in resp.topics:
            for p in t.partitions:
                key = (t.name, p.index)
                e = preq.entries.get(key)
                if e is None or key in seen:
                    continue
                seen.add(key)
                e.took_off()
                if p.current_leader_id >= 0 and pool.knows(p.current_leader_id):
                    self._metadata.adopt_leader(t.name, p.index, p.current_leader_id, p.current_leader_epoch)
                self._on_partition_result(e, p.error_code, p.base_offset, p.log_append_time_ms, now, p.error_message)
        for key, e in preq.entries.items():
            if key not in seen:
                e.took_off()
                self._queues.fail(e, ec.UNKNOWN_SERVER_ERROR)
        self.wakeup()

    def on_request_failed(self, context: Any, code: int) -> None:
        """A Produce request will not be answered: its batches retry (they may have been written)."""
        preq: _ProduceRequest = context
        now = _now_ms()
        for (topic, _), e in preq.entries.items():
            e.took_off()
            self._metadata.want(topic)
            self._queues.retry(e, code, now)
        self.wakeup()

    def on_connection_lost(self, conn: Connection) -> None:
        """A connection closed: dispatch again (the pool reconnects after its backoff)."""
        self.wakeup()

    # --- the loop step ----------------------------------------------------------------------

    def _stop(self) -> None:
        self._stopped = True
        self._queues.stop()
        self._connections.stop()
        self._metadata.stop()
        self._idempotence.stop()

    def _on_topic_error(self, topic: str, code: int) -> None:
        # Metadata says the topic's error is not retriable: its waiting batches fail now.
        self._queues.fail_topic(topic, code)

    def _idle(self) -> bool:
        acc = self.accumulator
        return (
            self._queues.outstanding == 0
            and getattr(acc, "open_batches", 0) == 0
            and getattr(acc, "buffered_bytes", 0) == 0
        )

    def _step(self, now: float) -> None:
        queues = self._queues
        for batch in self.accumulator.ready(now):
            queues.enqueue(batch, now)
        if now - self._last_expiry_scan >= _EXPIRY_SCAN_INTERVAL_MS:
            self._last_expiry_scan = now
            queues.expire(now)
            self._connections.expire_requests(now)
        self._check_unflushed()
        self._metadata.poll(now)
        while self._dispatch(now):
            pass

    def _next_wake_ms(self, now: float) -> float:
        wake = now + _MAX_IDLE_MS
        acc_deadline = self.accumulator.next_deadline()
        if acc_deadline is not None:
            wake = min(wake, acc_deadline)
        wake = self._queues.next_wake(now, wake)
        if self._queues.queued or self.stats["in_flight"] or any(c.unflushed for c in self._connections.connections()):
            wake = min(wake, now + _EXPIRY_SCAN_INTERVAL_MS)
        for conn in self._connections.connections():
            if conn.throttled_until_ms > now:
                wake = min(wake, conn.throttled_until_ms)
        return wake

    # --- dispatch ---------------------------------------------------------------------------

    def _connection(self, node: int, now: float) -> Connection | None:
        conn = self._connections.ready(node)
        if conn is None and not self._connections.connect(node, now):
            self._metadata.want_brokers()
        return conn

    def _dispatch(self, now: float) -> bool:
        """One round: at most one batch per partition, grouped per broker and acks.

        Returns True if a request was sent (another round may send more).
        """
        groups: dict[tuple[int, int, int], tuple[Connection, dict[tuple[str, int], _Entry], list[int]]] = {}
        max_in_flight = self.settings.max_in_flight_requests_per_connection
        idempotence = self._idempotence
        queues = self._queues
        queued = queues.queued
        planned: dict[int, int] = {}
        for part in list(queued):
            if not part.queue:
                queued.discard(part)
                continue
            e = part.queue[0]
            if e.batch.attempts == 0 and e.batch.record_count > 1 and self._known_too_large(e, now):
                try:
                    halves = self.accumulator.split(e.batch)
                except SplitDeferred:
                    halves = None  # sent as it is: a refusal splits it (or retries) later
                if halves:
                    self.stats["splits"] += 1
                    part.queue.pop(0)
                    queues.replace(e, halves)
                    e = part.queue[0]
            leader = self._metadata.leader(part.topic, part.partition)
            if leader < 0:
                continue
            if e.not_before_ms > now and leader == part.node:
                continue  # backing off, and the broker that refused it still leads
            conn = self._connection(leader, now)
            if conn is None or conn.throttled_until_ms > now:
                continue
            limit = MAX_IN_FLIGHT if e.idempotent else _PLAIN_MAX_IN_FLIGHT
            if len(part.in_flight) >= limit:
                continue
            if part.in_flight and part.node != leader:
                continue
            if e.idempotent and not idempotence.may_send(part.chain, e, part.in_flight):
                continue
            profile = queues.profile(e.batch)
            key = (leader, profile.acks, profile.request_timeout_ms)
            group = groups.get(key)
            if group is None:
                if len(conn.outstanding) + planned.get(leader, 0) >= max_in_flight:
                    continue
                planned[leader] = planned.get(leader, 0) + 1
                group = groups[key] = (conn, {}, [0, profile.max_request_size])
            size_info = group[2]
            if group[1] and size_info[0] + e.batch.size > size_info[1]:
                continue
            if e.idempotent and e.needs_stamp:
                idempotence.stamp(part.chain, e.batch)
                e.needs_stamp = False
            part.queue.pop(0)
            size_info[0] += e.batch.size
            group[1][(part.topic, part.partition)] = e
        for (node, acks, timeout_ms), (conn, entries, _) in groups.items():
            self._send_produce(conn, node, acks, timeout_ms, entries, now)
        return bool(groups)

    def _send_produce(self, conn: Connection, node: int, acks: int, timeout_ms: int,
                      entries: dict[tuple[str, int], _Entry], now: float) -> None:
        by_topic: dict[str, list[tuple[int, memoryview]]] = {}
        for (topic, partition), e in entries.items():
            by_topic.setdefault(topic, []).append((partition, e.batch.payload()))
            e.in_flight = True
            e.batch.attempts += 1
            e.part.in_flight.append(e)
            e.part.node = node
        version = conn.versions[m.PRODUCE]
        cid = conn.next_correlation_id()
        buffers = m.encode_produce_request(
            version, cid, self.settings.client_id, acks, timeout_ms, list(by_topic.items())
        )
        preq = _ProduceRequest(entries, acks, node)
        self.stats["requests"] += 1
        if acks == 0:
            conn.send_unanswered(buffers, preq)
            self._check_unflushed()
        else:
            # The request timeout counts from the write; give the broker its own timeout first.
            conn.send(buffers, cid, m.PRODUCE, now + timeout_ms + _REQUEST_GRACE_MS, preq)

    def _check_unflushed(self) -> None:
        for conn in self._connections.connections():
            for preq in conn.take_written():
                for e in preq.entries.values():
                    e.took_off()
                    self._queues.finish(e, 0, -1, -1)

    def _known_too_large(self, e: _Entry, now: float) -> bool:
        """Whether a batch of this size was refused as too large for its topic lately."""
        known = self._too_large.get(e.part.topic)
        return known is not None and e.batch.size >= known[0] and now < known[1]

    # --- responses --------------------------------------------------------------------------

    def _on_partition_result(self, e: _Entry, code: int, base_offset: int, log_append_time_ms: int,
                             now: float, message: str | None) -> None:
        part = e.part
        queues = self._queues
        part.gone = code == ec.UNKNOWN_TOPIC_OR_PARTITION
        if code == 0 or code == ec.DUPLICATE_SEQUENCE_NUMBER:
            queues.finish(e, 0, base_offset, log_append_time_ms)
            return
        name = ec.error_name(code)
        if message:
            log.debug("%s[%s]: %s (%s)", part.topic, part.partition, name, message)
        if e.idempotent and code in SEQUENCE_ERRORS:
            verdict = self._idempotence.on_sequence_error(part.chain, e, code, part.in_flight, part.queue)
            if verdict is Verdict.FAIL:
                queues.fail(e, code)
                return
            if verdict is Verdict.RESTAMP:
                e.needs_stamp = True
            queues.retry(e, code, now, backoff=False)
            return
        if code in _REFRESH_CODES:
            self._metadata.want(part.topic)
        if code in _SPLIT_CODES and e.batch.record_count > 1 and not self._stopped:
            known = self._too_large.get(part.topic)
            if known is None or known[1] < now or e.batch.size < known[0]:
                self._too_large[part.topic] = (e.batch.size, now + self.settings.metadata_max_age_ms)
            try:
                halves = self.accumulator.split(e.batch)
            except SplitDeferred as exc:
                log.debug("%s", exc)
                queues.retry(e, code, now)
                return
            if halves:
                self.stats["splits"] += 1
                queues.replace(e, halves)
                return
        if code == ec.MESSAGE_TOO_LARGE and e.batch.record_count > 1 and part.topic not in self._too_large_warned:
            # Each record fit max_request_size, so the topic's limit is below the batch: say
            # which setting to change (once per topic; the records fail either way).
            self._too_large_warned.add(part.topic)
            log.warning("%s[%s]: a batch of %d records (%d bytes) was refused as MESSAGE_TOO_LARGE and could "
                        "not be split; the topic's max.message.bytes is below this profile's batch_size (%d): "
                        "lower batch_size for this topic or raise max.message.bytes", part.topic, part.partition,
                        e.batch.record_count, e.batch.size, queues.profile(e.batch).batch_size)
        if ec.is_retriable(code):
            queues.retry(e, code, now)
        else:
            queues.fail(e, code)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
