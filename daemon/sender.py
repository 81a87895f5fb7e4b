"""The sender: takes sealed batches from the accumulator and produces them to Kafka.

asyncio (runs on uvloop). It owns the broker connections, correlation ids, the in-flight windows,
metadata, the idempotent producer id and every retry decision; the accumulator knows none of it.

Connections
    One per broker (node id), opened on demand, each starting with ApiVersions; one version per
    API is pinned per connection (:func:`daemon.protocol.messages.pick_versions`). Requests are
    pipelined up to ``max_in_flight_requests_per_connection``; Kafka answers a connection's
    requests in order, so each response must carry the correlation id of the oldest request
    outstanding (anything else closes the connection). A connection that drops, or a request
    older than the batch profile's ``request_timeout_ms``, fails every request outstanding on it
    as retriable (NETWORK_EXCEPTION / REQUEST_TIMED_OUT) and the broker is reconnected after
    ``reconnect_backoff_ms`` doubling to ``reconnect_backoff_max_ms`` (with jitter).

Metadata
    Leaders per partition come from Metadata requests (never auto-creating topics): for a topic
    the first time a batch or ``partitions_for`` needs it, after leader errors
    (NOT_LEADER_OR_FOLLOWER, LEADER_NOT_AVAILABLE, FENCED_LEADER_EPOCH, ...), and every
    ``metadata_max_age_ms`` for all known topics. A topic that gains partitions is reported to
    ``on_partition_count``. Produce responses v10+ name the new leader (CurrentLeader); the sender
    adopts it at once instead of waiting for the refresh.

Ordering and retries
    Each partition has a queue of batches in creation order; retried batches go back to their
    place in it, so a partition never sends a later batch before an earlier one. Without
    idempotence at most one batch per partition is in flight. Retriable errors retry after
    ``retry_backoff_ms`` doubling to ``retry_backoff_max_ms`` (+-20 % jitter) until
    ``created_ms + delivery_timeout_ms``, then fail with REQUEST_TIMED_OUT; other errors fail the
    batch at once. A batch waiting for a leader or a connection expires the same way.
    acks=0 batches get no response: they complete (base offset -1) once the transport has
    written them out. Batches of different acks (or request timeouts) never share a request.

Idempotence (profiles with ``enable_idempotence`` and ``acks=-1``)
    One InitProducerId gives the producer id and epoch. A batch is stamped (producer id, epoch,
    base sequence) with :meth:`Batch.stamp` the first time it is sent; the partition's next
    sequence advances by its record count. Retries resend the same stamped bytes. Up to 5 batches
    per partition are in flight, except that a batch at sequence 0 (the first of a producer id
    on the partition) is sent alone and must be answered before the next: a broker that has no
    state for the producer accepts any first sequence, so a later batch sent beside a refused
    first one (NOT_LEADER_OR_FOLLOWER on a new partition, say) would be written ahead of it and
    the retry of the first would then be OUT_OF_ORDER. DUPLICATE_SEQUENCE_NUMBER counts as
    success.

    OUT_OF_ORDER_SEQUENCE_NUMBER (the broker expected a lower sequence), the policy chosen here:

    * an earlier batch of the same partition and producer id is still in flight or waiting to
      be retried: the broker is just missing it; retry this one (same bytes) after it;
    * the partition's sequence chain is known to be broken (an earlier stamped batch failed for
      good, or the broker lost the producer's state, UNKNOWN_PRODUCER_ID): an OOO answer proves
      the batch was not written, so it is re-stamped under a fresh producer id/epoch and resent;
    * otherwise (the broker lost state we cannot explain) the batch fails with
      OUT_OF_ORDER_SEQUENCE_NUMBER and the chain is marked broken.

    A broken chain is repaired by InitProducerId with the current id and epoch (a "bump"; for a
    non-transactional producer Kafka hands out a fresh id). Every partition then restarts its
    sequences at 0 under the new id, but only after its in-flight batches of the old id have
    answered, so two producer ids never race on one partition.

``on_complete(batch, error_code, base_offset, log_append_time_ms)`` is called exactly once per
batch, then ``accumulator.release(batch)``. Every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from daemon.config import KafkaSettings, Profile
from daemon.protocol import errors as ec
from daemon.protocol import messages as m
from shm.errors import KafkaError, ProtocolError

__all__ = ["Sender"]

log = logging.getLogger(__name__)

_CLIENT_SOFTWARE = ("sluice", "0.1.0")
# Kafka's own limit for idempotent producers: the broker caches the last 5 batches per producer
# and partition, which is what makes a resend of any of them a detectable duplicate.
_IDEMPOTENT_MAX_IN_FLIGHT = 5
_METADATA_MIN_INTERVAL_MS = 100.0
_CONTROL_TIMEOUT_S = 10.0
_MAX_RESPONSE_BYTES = 128 * 1024 * 1024
# Longest the main loop sleeps without a reason; a safety net, not a poll: every event that
# matters (new batch, response, connection change) wakes it directly.
_MAX_IDLE_MS = 200.0
_EXPIRY_SCAN_INTERVAL_MS = 20.0
_SEQ_MODULUS = 2**31

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


# ----------------------------------------------------------------------------------------------
# Connection
# ----------------------------------------------------------------------------------------------


class _Outstanding:
    """A request written to a connection and not answered yet."""

    __slots__ = ("correlation_id", "api_key", "version", "deadline_ms", "future", "produce")

    def __init__(self, correlation_id: int, api_key: int, version: int, deadline_ms: float,
                 future: asyncio.Future[memoryview] | None, produce: _ProduceRequest | None) -> None:
        self.correlation_id = correlation_id
        self.api_key = api_key
        self.version = version
        self.deadline_ms = deadline_ms
        self.future = future
        self.produce = produce


class _Connection(asyncio.Protocol):
    """One TCP connection to one broker: framing, correlation ids, the in-flight list."""

    def __init__(self, sender: Sender, node_id: int, host: str, port: int) -> None:
        self.sender = sender
        self.node_id = node_id
        self.host = host
        self.port = port
        self.transport: asyncio.Transport | None = None
        self.versions: dict[int, int] = {}
        self.ready = False
        self.closed = False
        self.outstanding: deque[_Outstanding] = deque()
        # acks=0 produce requests written but maybe still in the transport's buffer.
        self.unflushed: list[_ProduceRequest] = []
        self._buf = bytearray()
        self._next_correlation_id = 0
        self._lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # noqa: D102
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:  # noqa: D102
        buf = self._buf
        buf += data
        start = 0
        n = len(buf)
        try:
            while n - start >= 4:
                size = int.from_bytes(buf[start : start + 4], "big", signed=True)
                if size < 4 or size > _MAX_RESPONSE_BYTES:
                    raise ProtocolError(f"bad response size {size} from broker {self.node_id}")
                if n - start - 4 < size:
                    break
                frame_bytes = bytes(buf[start + 4 : start + 4 + size])
                start += 4 + size
                self._on_frame(frame_bytes)
        except ProtocolError as exc:
            log.warning("closing connection to broker %s (%s:%s): %s", self.node_id, self.host, self.port, exc)
            self.sender.stats["protocol_errors"] += 1
            self.close(ec.NETWORK_EXCEPTION)
            return
        if start:
            del buf[:start]

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        self._fail_all(ec.NETWORK_EXCEPTION)

    # ------------------------------------------------------------------------------------------

    def _on_frame(self, frame_bytes: bytes) -> None:
        if not self.outstanding:
            raise ProtocolError(f"unsolicited response from broker {self.node_id}")
        req = self.outstanding[0]
        header = m.decode_response_header(frame_bytes, m.response_header_version(req.api_key))
        if header.correlation_id != req.correlation_id:
            # Left in ``outstanding`` so the close that follows fails it like the others.
            raise ProtocolError(
                f"correlation id {header.correlation_id} from broker {self.node_id}, expected {req.correlation_id}"
            )
        self.outstanding.popleft()
        body = memoryview(frame_bytes)[header.body_offset :]
        self.sender.stats["in_flight"] -= 1
        if req.future is not None:
            if not req.future.done():
                req.future.set_result(body)
        elif req.produce is not None:
            self.sender._on_produce_response(self, req.produce, body)

    def _fail_all(self, code: int) -> None:
        if self.closed:
            return
        self.closed = True
        self.ready = False
        outstanding, self.outstanding = self.outstanding, deque()
        unflushed, self.unflushed = self.unflushed, []
        self.sender.stats["in_flight"] -= len(outstanding)
        for req in outstanding:
            if req.future is not None:
                if not req.future.done():
                    req.future.set_exception(KafkaError.for_code(code, f"connection to broker {self.node_id} lost"))
            elif req.produce is not None:
                self.sender._on_produce_failed(req.produce, code)
        for preq in unflushed:
            self.sender._on_produce_failed(preq, code)
        if not self._lost.done():
            self._lost.set_result(None)
        self.sender._on_connection_lost(self)

    def close(self, code: int = ec.NETWORK_EXCEPTION) -> None:
        """Abort the transport and fail what is outstanding with ``code``."""
        if self.transport is not None:
            self.transport.abort()
        self._fail_all(code)

    def next_correlation_id(self) -> int:
        """A fresh correlation id (wraps within INT32)."""
        cid = self._next_correlation_id
        self._next_correlation_id = (cid + 1) & 0x7FFFFFFF
        return cid

    def send(self, buffers: list[bytes | memoryview], outstanding: _Outstanding | None) -> None:
        """Write one framed request; ``outstanding`` is None when no response will come."""
        if self.transport is None or self.closed:
            raise KafkaError.for_code(ec.NETWORK_EXCEPTION, f"connection to broker {self.node_id} is closed")
        if outstanding is not None:
            self.outstanding.append(outstanding)
            self.sender.stats["in_flight"] += 1
        self.transport.writelines(buffers)

    async def request(self, api_key: int, encode: Callable[[int, int], bytes], timeout_s: float) -> tuple[int, memoryview]:
        """Send a control request and await its body. Returns (version used, body)."""
        version = self.versions[api_key] if api_key != m.API_VERSIONS else self.versions.get(api_key, 4)
        cid = self.next_correlation_id()
        fut: asyncio.Future[memoryview] = asyncio.get_running_loop().create_future()
        deadline = _now_ms() + timeout_s * 1000.0
        self.send([encode(version, cid)], _Outstanding(cid, api_key, version, deadline, fut, None))
        try:
            body = await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            self.close(ec.REQUEST_TIMED_OUT)
            raise KafkaError.for_code(
                ec.REQUEST_TIMED_OUT, f"{m.API_NAMES[api_key]} to broker {self.node_id} timed out after {timeout_s}s"
            ) from None
        return version, body

    async def handshake(self, timeout_s: float) -> None:
        """ApiVersions, then pin one version per API."""
        client_id = self.sender.settings.client_id
        req = m.ApiVersionsRequest(*_CLIENT_SOFTWARE)
        version = m.SUPPORTED_VERSIONS[m.API_VERSIONS][1]
        for _ in range(2):
            self.versions[m.API_VERSIONS] = version
            _, body = await self.request(
                m.API_VERSIONS, lambda v, cid: m.encode_api_versions_request(v, cid, client_id, req), timeout_s
            )
            resp = m.decode_api_versions_response(body, version)
            if resp.error_code == 35:
                # The broker answered in v0 with the ApiVersions range it serves: retry once lower.
                ours = m.pick_versions(resp.api_keys, [m.API_VERSIONS])
                version = ours[m.API_VERSIONS]
                continue
            if resp.error_code:
                raise KafkaError.for_code(resp.error_code, f"ApiVersions refused by broker {self.node_id}")
            self.versions = m.pick_versions(resp.api_keys)
            self.ready = True
            return
        raise m.UnsupportedVersionError(f"broker {self.node_id} refused every ApiVersions version we offered")


# ----------------------------------------------------------------------------------------------
# Batches and partitions
# ----------------------------------------------------------------------------------------------


class _Entry:
    """Sender-side state of one batch."""

    __slots__ = ("batch", "order", "part", "idempotent", "needs_stamp", "in_flight", "done",
                 "not_before_ms", "deadline_ms", "retries")

    def __init__(self, batch: Any, order: int, part: _Partition, idempotent: bool, deadline_ms: float) -> None:
        self.batch = batch
        self.order = order
        self.part = part
        self.idempotent = idempotent
        self.needs_stamp = idempotent
        self.in_flight = False
        self.done = False
        self.not_before_ms = 0.0
        self.deadline_ms = deadline_ms
        self.retries = 0


class _Partition:
    """Per-partition queue, in-flight list and idempotent sequence state."""

    __slots__ = ("topic", "partition", "queue", "in_flight", "node", "seq_pid", "seq_epoch", "next_seq", "broken")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition
        self.queue: list[_Entry] = []  # sorted by _Entry.order
        self.in_flight: list[_Entry] = []
        self.node = -1
        self.seq_pid = -1
        self.seq_epoch = -1
        self.next_seq = 0
        # (producer id, epoch) pairs whose sequence chain on this partition has a gap: an
        # OUT_OF_ORDER answer to a batch stamped with one of them means "re-stamp", not "fail".
        self.broken: set[tuple[int, int]] = set()

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


class _TopicMeta:
    __slots__ = ("leaders", "error_code")

    def __init__(self, leaders: list[int], error_code: int) -> None:
        self.leaders = leaders
        self.error_code = error_code


# ----------------------------------------------------------------------------------------------
# Sender
# ----------------------------------------------------------------------------------------------


class Sender:
    """Produces the accumulator's sealed batches to Kafka (see the module docstring).

    Args:
        settings: connection-level settings.
        accumulator: the batch source (``ready``, ``next_deadline``, ``flush``, ``release``).
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
        self.profile_for = profile_for
        self.on_complete = on_complete
        self.on_partition_count = on_partition_count
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
        }
        self._bootstrap = [_parse_hostport(s) for s in settings.bootstrap_servers.split(",") if s.strip()]
        if not self._bootstrap:
            raise ValueError("bootstrap_servers is empty")
        self._brokers: dict[int, tuple[str, int]] = {}
        self._conns: dict[int, _Connection] = {}
        self._connecting: dict[int, asyncio.Task[None]] = {}
        self._reconnect_at: dict[int, float] = {}
        self._reconnect_backoff: dict[int, float] = {}
        self._bootstrap_conn: _Connection | None = None
        self._topics: dict[str, _TopicMeta] = {}
        self._metadata_wanted: set[str] = set()
        self._metadata_task: asyncio.Task[None] | None = None
        self._last_metadata_ms = -1e18
        self._last_full_refresh_ms = 0.0
        self._parts: dict[tuple[str, int], _Partition] = {}
        self._queued: set[_Partition] = set()
        self._order = 0
        self._outstanding_batches = 0
        self._pid = -1
        self._epoch = -1
        self._pid_task: asyncio.Task[None] | None = None
        self._pid_bump_wanted = False
        self._wake_fut: asyncio.Future[None] | None = None
        self._progress = asyncio.Event()
        self._closing = False
        self._stopped = False
        self._last_expiry_scan = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._too_large_warned: set[str] = set()

    # --- public API -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to a bootstrap server, run ApiVersions and fetch the broker list.

        The producer id (InitProducerId) is fetched when the first idempotent batch needs it,
        so a sender whose profiles are all non-idempotent never asks for one.
        """
        await self._refresh_metadata([])
        self._last_full_refresh_ms = _now_ms()

    async def partitions_for(self, topic: str, timeout: float = 5.0) -> int:
        """The topic's partition count, from metadata (fetched if not cached).

        Raises:
            KafkaError: the topic's error (UnknownTopicOrPartitionError when it does not exist)
                once ``timeout`` seconds of retries have passed, or at once if not retriable.
        """
        meta = self._topics.get(topic)
        if meta is not None and meta.error_code == 0 and meta.leaders:
            return len(meta.leaders)
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            remaining = deadline - time.monotonic()
            await asyncio.wait_for(self._refresh_metadata([topic]), max(remaining, 0.5) + _CONTROL_TIMEOUT_S)
            meta = self._topics.get(topic)
            code = meta.error_code if meta is not None else ec.UNKNOWN_TOPIC_OR_PARTITION
            if code == 0 and meta is not None and meta.leaders:
                return len(meta.leaders)
            if code == 0:
                code = ec.LEADER_NOT_AVAILABLE
            if not ec.is_retriable(code) or time.monotonic() + delay >= deadline:
                raise KafkaError.for_code(code, f"topic {topic!r}: {ec.error_name(code)}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

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
            self._stopped = True

    async def flush(self, timeout: float) -> bool:
        """Seal every open batch and wait until all batches are completed. False on timeout."""
        self.accumulator.flush()
        self.wakeup()
        deadline = time.monotonic() + timeout
        while not self._idle():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), min(remaining, 0.05))
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
            self._stopped = True
            self.wakeup()
            now = _now_ms()
            self.accumulator.flush()
            for batch in self.accumulator.ready(now + 1e12):
                self._complete_batch(batch, ec.REQUEST_TIMED_OUT, -1, -1)
            for part in list(self._parts.values()):
                for e in list(part.queue):
                    self._fail(e, ec.REQUEST_TIMED_OUT)
                part.queue.clear()
            self._queued.clear()
            for conn in list(self._conns.values()):
                conn.close(ec.REQUEST_TIMED_OUT)
            if self._bootstrap_conn is not None:
                self._bootstrap_conn.close(ec.REQUEST_TIMED_OUT)
            # Requests failed by the closes above requeue nothing (the sender is stopping).
            for part in list(self._parts.values()):
                for e in list(part.queue):
                    self._fail(e, ec.REQUEST_TIMED_OUT)
                part.queue.clear()
            for task in list(self._tasks) + list(self._connecting.values()):
                task.cancel()
            for task in [self._metadata_task, self._pid_task]:
                if task is not None:
                    task.cancel()

    # --- the loop step ----------------------------------------------------------------------

    def _idle(self) -> bool:
        acc = self.accumulator
        return (
            self._outstanding_batches == 0
            and getattr(acc, "open_batches", 0) == 0
            and getattr(acc, "buffered_bytes", 0) == 0
        )

    def _step(self, now: float) -> None:
        for batch in self.accumulator.ready(now):
            self._enqueue(batch, now)
        if now - self._last_full_refresh_ms >= self.settings.metadata_max_age_ms and self._topics:
            self._last_full_refresh_ms = now
            self._metadata_wanted.update(self._topics)
        if now - self._last_expiry_scan >= _EXPIRY_SCAN_INTERVAL_MS:
            self._last_expiry_scan = now
            self._expire(now)
            self._check_request_timeouts(now)
        self._check_unflushed()
        self._maybe_fetch_metadata(now)
        while self._dispatch(now):
            pass

    def _next_wake_ms(self, now: float) -> float:
        wake = now + _MAX_IDLE_MS
        acc_deadline = self.accumulator.next_deadline()
        if acc_deadline is not None:
            wake = min(wake, acc_deadline)
        for part in self._queued:
            if part.queue:
                head = part.queue[0]
                if head.not_before_ms > now:
                    wake = min(wake, head.not_before_ms)
                wake = min(wake, head.deadline_ms)
        if self._queued or self.stats["in_flight"] or any(c.unflushed for c in self._conns.values()):
            wake = min(wake, now + _EXPIRY_SCAN_INTERVAL_MS)
        return wake

    # --- batches ----------------------------------------------------------------------------

    def _profile(self, batch: Any) -> Profile:
        profile = getattr(batch, "profile", None)
        return profile if profile is not None else self.profile_for(batch.topic)

    def _enqueue(self, batch: Any, now: float) -> None:
        profile = self._profile(batch)
        key = (batch.topic, batch.partition)
        part = self._parts.get(key)
        if part is None:
            part = self._parts[key] = _Partition(batch.topic, batch.partition)
        idem = profile.enable_idempotence and profile.acks == -1
        self._order += 1
        deadline = batch.created_ms + profile.delivery_timeout_ms
        entry = _Entry(batch, self._order, part, idem, deadline)
        self._outstanding_batches += 1
        part.queue.append(entry)
        self._queued.add(part)
        if batch.topic not in self._topics:
            self._metadata_wanted.add(batch.topic)

    def adopt(self, batches: list[Any]) -> None:
        """Queue a dead worker's stamped batches to be sent again, byte for byte.

        Call before :meth:`run` with the batches in creation order: each goes first in its
        partition's queue with its own producer id, epoch and sequence, so the broker writes it
        once (DUPLICATE_SEQUENCE_NUMBER, or the original offset, if it already had it). New
        batches of that partition are stamped under this sender's producer id only after these
        have answered (:meth:`_can_stamp`). An OUT_OF_ORDER_SEQUENCE_NUMBER or
        UNKNOWN_PRODUCER_ID answer proves the broker did not write one (its chain is not ours
        to repair), so it is re-stamped under the new id.
        """
        now = _now_ms()
        for batch in batches:
            self._enqueue(batch, now)
            part = self._parts[(batch.topic, batch.partition)]
            e = part.queue[-1]
            stamped = batch.producer_id >= 0
            e.idempotent = stamped
            e.needs_stamp = False
            if stamped:
                part.broken.add((batch.producer_id, batch.producer_epoch))

    def _complete_batch(self, batch: Any, code: int, base_offset: int, log_append_time_ms: int) -> None:
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
            self._progress.set()

    def _finish(self, e: _Entry, code: int, base_offset: int, log_append_time_ms: int) -> None:
        if e.done:
            return
        e.done = True
        self._outstanding_batches -= 1
        self._complete_batch(e.batch, code, base_offset, log_append_time_ms)

    def _fail(self, e: _Entry, code: int) -> None:
        if e.done:
            return
        if e.idempotent and not e.needs_stamp:
            # The chain of this producer id on this partition may now have a gap: later batches
            # answered OUT_OF_ORDER get re-stamped under a new id instead of failing too.
            e.part.broken.add((e.batch.producer_id, e.batch.producer_epoch))
        self._finish(e, code, -1, -1)

    def _retry(self, e: _Entry, code: int, now: float, backoff: bool = True) -> None:
        if e.done:
            return
        if now >= e.deadline_ms or self._stopped:
            log.debug("batch %s[%s] expired after %s", e.part.topic, e.part.partition, ec.error_name(code))
            self._fail(e, ec.REQUEST_TIMED_OUT)
            return
        e.retries += 1
        self.stats["retries"] += 1
        if backoff:
            profile = self._profile(e.batch)
            base = profile.retry_backoff_ms * (2 ** min(e.retries - 1, 20))
            delay = min(base, profile.retry_backoff_max_ms) * random.uniform(0.8, 1.2)
            e.not_before_ms = now + min(delay, profile.retry_backoff_max_ms)
        else:
            e.not_before_ms = 0.0
        e.part.requeue(e)
        self._queued.add(e.part)

    def _expire(self, now: float) -> None:
        for part in list(self._queued):
            if not part.queue:
                self._queued.discard(part)
                continue
            keep = []
            for e in part.queue:
                if now >= e.deadline_ms:
                    meta = self._topics.get(part.topic)
                    code = ec.REQUEST_TIMED_OUT
                    if meta is not None and meta.error_code and meta.error_code != ec.LEADER_NOT_AVAILABLE:
                        code = meta.error_code
                    self._fail(e, code)
                else:
                    keep.append(e)
            part.queue = keep
            if not keep:
                self._queued.discard(part)

    # --- dispatch ---------------------------------------------------------------------------

    def _leader(self, topic: str, partition: int) -> int:
        meta = self._topics.get(topic)
        if meta is None or partition >= len(meta.leaders):
            self._metadata_wanted.add(topic)
            return -1
        leader = meta.leaders[partition]
        if leader < 0:
            self._metadata_wanted.add(topic)
        return leader

    def _connection(self, node: int, now: float) -> _Connection | None:
        conn = self._conns.get(node)
        if conn is not None and conn.ready and not conn.closed:
            return conn
        if node not in self._connecting and now >= self._reconnect_at.get(node, 0.0) and not self._stopped:
            addr = self._brokers.get(node)
            if addr is None:
                self._metadata_wanted.add("")
                return None
            task = asyncio.get_running_loop().create_task(self._connect(node, addr))
            self._connecting[node] = task
        return None

    def _dispatch(self, now: float) -> bool:
        """One round: at most one batch per partition, grouped per broker and acks.

        Returns True if a request was sent (another round may send more).
        """
        groups: dict[tuple[int, int, int], tuple[_Connection, dict[tuple[str, int], _Entry], list[int]]] = {}
        max_in_flight = self.settings.max_in_flight_requests_per_connection
        planned: dict[int, int] = {}
        for part in list(self._queued):
            if not part.queue:
                self._queued.discard(part)
                continue
            e = part.queue[0]
            if e.not_before_ms > now:
                continue
            leader = self._leader(part.topic, part.partition)
            if leader < 0:
                continue
            conn = self._connection(leader, now)
            if conn is None:
                continue
            limit = _IDEMPOTENT_MAX_IN_FLIGHT if e.idempotent else 1
            if len(part.in_flight) >= limit:
                continue
            if part.in_flight and part.node != leader:
                continue
            if e.idempotent and part.in_flight and part.in_flight[0].batch.base_sequence == 0:
                # The first batch of a producer id on a partition travels alone: a broker that
                # does not know the producer yet accepts any sequence, so a later batch sent
                # beside a refused (retriable) first one would be written before it.
                continue
            if e.idempotent and not self._can_stamp(part, e):
                continue
            profile = self._profile(e.batch)
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
                self._stamp(part, e)
            part.queue.pop(0)
            size_info[0] += e.batch.size
            group[1][(part.topic, part.partition)] = e
        for (node, acks, timeout_ms), (conn, entries, _) in groups.items():
            self._send_produce(conn, node, acks, timeout_ms, entries, now)
        return bool(groups)

    def _can_stamp(self, part: _Partition, e: _Entry) -> bool:
        """Whether an idempotent batch may be sent now (producer id known, no id mixing)."""
        if e.needs_stamp:
            if self._pid < 0:
                self._want_producer_id(bump=False)
                return False
            if (self._pid, self._epoch) in part.broken:
                self._want_producer_id(bump=True)
                return False
            if (part.seq_pid, part.seq_epoch) != (self._pid, self._epoch) and part.in_flight:
                return False  # the old id's batches must answer before the new id starts at 0
            if part.in_flight and (part.in_flight[-1].batch.producer_id, part.in_flight[-1].batch.producer_epoch) != (
                self._pid,
                self._epoch,
            ):
                return False
            return True
        if part.in_flight:
            last = part.in_flight[-1].batch
            if (last.producer_id, last.producer_epoch) != (e.batch.producer_id, e.batch.producer_epoch):
                return False
        return True

    def _stamp(self, part: _Partition, e: _Entry) -> None:
        if (part.seq_pid, part.seq_epoch) != (self._pid, self._epoch):
            part.seq_pid, part.seq_epoch, part.next_seq = self._pid, self._epoch, 0
        e.batch.stamp(self._pid, self._epoch, part.next_seq)
        part.next_seq = (part.next_seq + e.batch.record_count) % _SEQ_MODULUS
        e.needs_stamp = False

    def _send_produce(self, conn: _Connection, node: int, acks: int, timeout_ms: int,
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
            conn.send(buffers, None)
            conn.unflushed.append(preq)
            self._check_unflushed()
        else:
            # The request timeout counts from the write; give the broker its own timeout first.
            deadline = now + timeout_ms + 1000.0
            conn.send(buffers, _Outstanding(cid, m.PRODUCE, version, deadline, None, preq))

    def _check_unflushed(self) -> None:
        for conn in list(self._conns.values()):
            if conn.unflushed and conn.transport is not None and conn.transport.get_write_buffer_size() == 0:
                done, conn.unflushed = conn.unflushed, []
                for preq in done:
                    for e in preq.entries.values():
                        self._took_off(e)
                        self._finish(e, 0, -1, -1)

    def _check_request_timeouts(self, now: float) -> None:
        for conn in list(self._conns.values()):
            if conn.outstanding and conn.outstanding[0].deadline_ms <= now:
                log.warning("request to broker %s timed out; reconnecting", conn.node_id)
                conn.close(ec.REQUEST_TIMED_OUT)

    # --- responses --------------------------------------------------------------------------

    def _took_off(self, e: _Entry) -> None:
        e.in_flight = False
        try:
            e.part.in_flight.remove(e)
        except ValueError:
            pass

    def _on_produce_failed(self, preq: _ProduceRequest, code: int) -> None:
        now = _now_ms()
        for (topic, _), e in preq.entries.items():
            self._took_off(e)
            self._metadata_wanted.add(topic)
            self._retry(e, code, now)
        self.wakeup()

    def _on_produce_response(self, conn: _Connection, preq: _ProduceRequest, body: memoryview) -> None:
        try:
            resp = m.decode_produce_response(body, conn.versions[m.PRODUCE])
        except ProtocolError:
            self.stats["protocol_errors"] += 1
            self._on_produce_failed(preq, ec.NETWORK_EXCEPTION)
            raise
        now = _now_ms()
        for ep in resp.node_endpoints:
            self._brokers[ep.node_id] = (ep.host, ep.port)
        seen: set[tuple[str, int]] = set()
        for t in resp.topics:
            for p in t.partitions:
                key = (t.name, p.index)
                e = preq.entries.get(key)
                if e is None or key in seen:
                    continue
                seen.add(key)
                self._took_off(e)
                if p.current_leader_id >= 0 and p.current_leader_id in self._brokers:
                    meta = self._topics.get(t.name)
                    if meta is not None and p.index < len(meta.leaders):
                        meta.leaders[p.index] = p.current_leader_id
                self._on_partition_result(e, p.error_code, p.base_offset, p.log_append_time_ms, now, p.error_message)
        for key, e in preq.entries.items():
            if key not in seen:
                self._took_off(e)
                self._fail(e, ec.UNKNOWN_SERVER_ERROR)
        self.wakeup()

    def _on_partition_result(self, e: _Entry, code: int, base_offset: int, log_append_time_ms: int,
                             now: float, message: str | None) -> None:
        part = e.part
        if code == 0 or code == ec.DUPLICATE_SEQUENCE_NUMBER:
            self._finish(e, 0, base_offset, log_append_time_ms)
            return
        name = ec.error_name(code)
        if message:
            log.debug("%s[%s]: %s (%s)", part.topic, part.partition, name, message)
        if e.idempotent and code in (ec.OUT_OF_ORDER_SEQUENCE_NUMBER, ec.UNKNOWN_PRODUCER_ID):
            stamp = (e.batch.producer_id, e.batch.producer_epoch)
            if code == ec.UNKNOWN_PRODUCER_ID:
                # The broker no longer knows this producer on this partition (its records were
                # deleted, say). The batch was rejected, so it is safe to re-stamp it.
                part.broken.add(stamp)
            if stamp in part.broken:
                e.needs_stamp = True
                self._retry(e, code, now, backoff=False)
                return
            if self._earlier_pending(e):
                self._retry(e, code, now, backoff=False)
                return
            log.warning("%s[%s]: OUT_OF_ORDER_SEQUENCE_NUMBER with nothing earlier pending; failing the batch "
                        "and resetting the producer id", part.topic, part.partition)
            self._fail(e, code)
            return
        if code in _REFRESH_CODES:
            self._metadata_wanted.add(part.topic)
        if code == ec.MESSAGE_TOO_LARGE and e.batch.record_count > 1 and part.topic not in self._too_large_warned:
            # Each record fit max_request_size, so the topic's limit is below the batch: say
            # which setting to change (once per topic; the records fail either way).
            self._too_large_warned.add(part.topic)
            log.warning("%s[%s]: a batch of %d records (%d bytes) was refused as MESSAGE_TOO_LARGE; the "
                        "topic's max.message.bytes is below this profile's batch_size (%d): lower batch_size "
                        "for this topic or raise max.message.bytes", part.topic, part.partition,
                        e.batch.record_count, e.batch.size, self._profile(e.batch).batch_size)
        if ec.is_retriable(code):
            self._retry(e, code, now)
        else:
            self._fail(e, code)

    def _earlier_pending(self, e: _Entry) -> bool:
        stamp = (e.batch.producer_id, e.batch.producer_epoch)
        for other in e.part.in_flight:
            if other.order < e.order and (other.batch.producer_id, other.batch.producer_epoch) == stamp:
                return True
        for other in e.part.queue:
            if other.order < e.order and not other.needs_stamp and (
                other.batch.producer_id, other.batch.producer_epoch) == stamp:
                return True
        return False

    # --- connections ------------------------------------------------------------------------

    async def _open(self, node: int, host: str, port: int) -> _Connection:
        loop = asyncio.get_running_loop()
        timeout = self.settings.socket_connection_setup_timeout_ms / 1000.0
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self, node, host, port), host, port), timeout
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise KafkaError.for_code(ec.NETWORK_EXCEPTION, f"cannot connect to {host}:{port}: {exc!r}") from None
        try:
            await conn.handshake(timeout)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _connect(self, node: int, addr: tuple[str, int]) -> None:
        try:
            conn = await self._open(node, *addr)
        except KafkaError as exc:
            backoff = self._reconnect_backoff.get(node, float(self.settings.reconnect_backoff_ms))
            self._reconnect_at[node] = _now_ms() + backoff * random.uniform(0.8, 1.2)
            self._reconnect_backoff[node] = min(max(backoff * 2, 1.0), float(self.settings.reconnect_backoff_max_ms))
            log.warning("broker %s (%s:%s): %s", node, addr[0], addr[1], exc)
        else:
            if self._stopped:
                conn.close()
            else:
                self._conns[node] = conn
                self._reconnect_backoff.pop(node, None)
        finally:
            self._connecting.pop(node, None)
            self.wakeup()

    def _on_connection_lost(self, conn: _Connection) -> None:
        if self._conns.get(conn.node_id) is conn:
            del self._conns[conn.node_id]
            self.stats["reconnects"] += 1
            backoff = self._reconnect_backoff.get(conn.node_id, float(self.settings.reconnect_backoff_ms))
            self._reconnect_at[conn.node_id] = _now_ms() + backoff * random.uniform(0.8, 1.2)
            self._reconnect_backoff[conn.node_id] = min(
                max(backoff * 2, 1.0), float(self.settings.reconnect_backoff_max_ms)
            )
        if self._bootstrap_conn is conn:
            self._bootstrap_conn = None
        self.wakeup()

    async def _any_connection(self) -> _Connection:
        """A ready connection for control requests: the least busy broker, else bootstrap."""
        ready = [c for c in self._conns.values() if c.ready and not c.closed]
        if ready:
            return min(ready, key=lambda c: len(c.outstanding))
        if self._bootstrap_conn is not None and self._bootstrap_conn.ready and not self._bootstrap_conn.closed:
            return self._bootstrap_conn
        last: Exception | None = None
        for host, port in self._bootstrap:
            try:
                self._bootstrap_conn = await self._open(-1, host, port)
                return self._bootstrap_conn
            except m.UnsupportedVersionError:
                raise  # not a reachability problem: another bootstrap server will not differ
            except KafkaError as exc:
                last = exc
        raise KafkaError.for_code(ec.NETWORK_EXCEPTION, f"no bootstrap server reachable: {last}")

    # --- metadata ---------------------------------------------------------------------------

    def _maybe_fetch_metadata(self, now: float) -> None:
        if not self._metadata_wanted or self._metadata_task is not None or self._stopped:
            return
        if now - self._last_metadata_ms < _METADATA_MIN_INTERVAL_MS:
            return
        topics = sorted(t for t in self._metadata_wanted if t)
        self._metadata_wanted.clear()
        self._metadata_task = asyncio.get_running_loop().create_task(self._metadata_job(topics))

    async def _metadata_job(self, topics: list[str]) -> None:
        try:
            await self._refresh_metadata(topics)
        except (KafkaError, ProtocolError) as exc:
            log.warning("metadata refresh failed: %s", exc)
            self._metadata_wanted.update(topics or [""])
        finally:
            self._metadata_task = None
            self.wakeup()

    async def _refresh_metadata(self, topics: list[str]) -> None:
        """Fetch metadata for ``topics`` (none: just the broker list) and apply it."""
        self._last_metadata_ms = _now_ms()
        conn = await self._any_connection()
        self.stats["metadata_requests"] += 1
        req = m.MetadataRequest(topics, allow_auto_topic_creation=False)
        client_id = self.settings.client_id
        version, body = await conn.request(
            m.METADATA, lambda v, cid: m.encode_metadata_request(v, cid, client_id, req), _CONTROL_TIMEOUT_S
        )
        resp = m.decode_metadata_response(body, version)
        self._apply_metadata(resp)

    def _apply_metadata(self, resp: m.MetadataResponse) -> None:
        if resp.brokers:
            self._brokers = {b.node_id: (b.host, b.port) for b in resp.brokers}
            if self._bootstrap_conn is not None and self._conns:
                # Broker connections exist now; the bootstrap one is no longer needed.
                self._bootstrap_conn.close()
                self._bootstrap_conn = None
        for t in resp.topics:
            if t.name is None:
                continue
            if t.error_code and not t.partitions:
                old = self._topics.get(t.name)
                if old is not None and old.leaders and ec.is_retriable(t.error_code):
                    old.error_code = 0
                    continue
                self._topics[t.name] = _TopicMeta([], t.error_code)
                if not ec.is_retriable(t.error_code):
                    self._fail_topic(t.name, t.error_code)
                continue
            count = max((p.partition_index for p in t.partitions), default=-1) + 1
            leaders = [-1] * count
            for p in t.partitions:
                leaders[p.partition_index] = p.leader_id if p.error_code in (0, ec.REPLICA_NOT_AVAILABLE) else -1
            old = self._topics.get(t.name)
            self._topics[t.name] = _TopicMeta(leaders, 0)
            if (old is None or len(old.leaders) != count) and self.on_partition_count is not None:
                try:
                    self.on_partition_count(t.name, count)
                except Exception:  # noqa: BLE001
                    log.exception("on_partition_count raised")

    def _fail_topic(self, topic: str, code: int) -> None:
        for part in list(self._queued):
            if part.topic == topic:
                for e in part.queue:
                    self._fail(e, code)
                part.queue = []
                self._queued.discard(part)

    # --- producer id ------------------------------------------------------------------------

    def _want_producer_id(self, bump: bool) -> None:
        if self._pid_task is not None or self._stopped:
            if bump:
                self._pid_bump_wanted = True
            return
        self._pid_task = asyncio.get_running_loop().create_task(self._producer_id_job(bump))

    async def _producer_id_job(self, bump: bool) -> None:
        delay = 0.05
        try:
            while not self._stopped:
                try:
                    conn = await self._any_connection()
                    self.stats["producer_id_requests"] += 1
                    req = m.InitProducerIdRequest(
                        None, 60_000, self._pid if bump else -1, self._epoch if bump else -1
                    )
                    client_id = self.settings.client_id
                    version, body = await conn.request(
                        m.INIT_PRODUCER_ID,
                        lambda v, cid: m.encode_init_producer_id_request(v, cid, client_id, req),
                        _CONTROL_TIMEOUT_S,
                    )
                    resp = m.decode_init_producer_id_response(body, version)
                    if resp.error_code == 0:
                        log.info("producer id %s epoch %s", resp.producer_id, resp.producer_epoch)
                        self._pid, self._epoch = resp.producer_id, resp.producer_epoch
                        return
                    err = KafkaError.for_code(resp.error_code, f"InitProducerId: {ec.error_name(resp.error_code)}")
                    if bump and resp.error_code in (ec.INVALID_PRODUCER_EPOCH, ec.PRODUCER_FENCED,
                                                    ec.CODE_BY_NAME["INVALID_PRODUCER_ID_MAPPING"]):
                        bump = False  # ask for a brand-new id instead
                    log.warning("InitProducerId failed: %s", err)
                except (KafkaError, ProtocolError) as exc:
                    log.warning("InitProducerId failed: %s", exc)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.settings.reconnect_backoff_max_ms / 1000.0 or 1.0)
        finally:
            self._pid_task = None
            if self._pid_bump_wanted:
                self._pid_bump_wanted = False
            self.wakeup()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _parse_hostport(s: str) -> tuple[str, int]:
    s = s.strip()
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"bootstrap server {s!r} is not host:port")
    return host.strip("[]"), int(port)
