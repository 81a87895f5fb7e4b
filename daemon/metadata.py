"""Cluster metadata: the broker list, each topic's partition leaders, and when to refresh them.

asyncio (runs on uvloop). Used by each worker's sender (leaders for dispatch) and by the
supervisor (partition counts for clients' topic lookups).

Policy
    Leaders per partition come from Metadata requests (never auto-creating topics): for a topic
    the first time a batch or :meth:`Metadata.partitions_for` needs it, after leader errors
    (the sender asks with :meth:`Metadata.want` on NOT_LEADER_OR_FOLLOWER,
    LEADER_NOT_AVAILABLE, FENCED_LEADER_EPOCH, ...), and every ``metadata_max_age_ms`` for all
    known topics. Background refreshes run one at a time, at least 100 ms apart; the topics of
    a failed one are asked again. A topic that gains partitions is reported to
    ``on_partition_count``. Produce responses v10+ name the new leader (CurrentLeader); the
    sender adopts it at once (:meth:`Metadata.adopt_leader`) instead of waiting for the refresh.

Leader epochs
    Every leader is kept with its leader epoch, which the controller raises at each election.
    Leadership from a Metadata response or a CurrentLeader is taken only when its epoch is at
    least the one known (a metadata answer from a broker that has not heard of the election
    yet must not undo it). A partition without a leader (-1, at a known or newer epoch) is
    waited for: the sender keeps its batches until a leader appears or their delivery timeout
    passes, asking for metadata again at most every 100 ms meanwhile. A response without epochs
    (-1) is taken as it is, as before.
    A topic error that is not retriable (the topic does not exist, say) goes to
    ``on_topic_error`` so that the batches waiting for it fail at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from daemon.config import KafkaSettings
from daemon.connection import CONTROL_TIMEOUT_S, ConnectionPool
from daemon.protocol import errors as ec
from daemon.protocol import messages as m
from shm.errors import KafkaError, ProtocolError

__all__ = ["Metadata"]

log = logging.getLogger(__name__)

# Bounds the request rate when leader errors keep coming (a broker restarting, say).
_METADATA_MIN_INTERVAL_MS = 100.0
# An empty name in the wanted set asks for the broker list alone.
_BROKERS_ONLY = ""


def _now_ms() -> float:
    return time.monotonic() * 1000.0


class _TopicMeta:
    __slots__ = ("leaders", "epochs", "error_code")

    def __init__(self, leaders: list[int], epochs: list[int], error_code: int) -> None:
        self.leaders = leaders
        self.epochs = epochs  # leader epoch per partition, -1 when not known
        self.error_code = error_code


class Metadata:
    """The broker list and each topic's leaders, fetched on demand and on a timer.

    Args:
        settings: ``metadata_max_age_ms``, ``client_id`` and, for a pool of its own, the
            connection settings.
        connections: the pool to send Metadata requests on (its broker list is kept current).
            By default a pool of its own, closed by :meth:`close`.
        stats: the shared counters; ``metadata_requests`` is counted here.
        on_partition_count: ``(topic, count)`` when a topic's partition count is first learnt
            or changes.
        on_topic_error: ``(topic, code)`` when a topic's error is not retriable.
        wakeup: called when a background refresh ends (its result may unblock batches).
    """

    def __init__(
        self,
        settings: KafkaSettings,
        connections: ConnectionPool | None = None,
        *,
        stats: dict[str, Any] | None = None,
        on_partition_count: Callable[[str, int], None] | None = None,
        on_topic_error: Callable[[str, int], None] | None = None,
        wakeup: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self._own_pool = connections is None
        self._pool = connections if connections is not None else ConnectionPool(settings)
        self.stats: dict[str, Any] = stats if stats is not None else {"metadata_requests": 0}
        self._on_partition_count = on_partition_count
        self._on_topic_error = on_topic_error
        self._wakeup = wakeup
        self._topics: dict[str, _TopicMeta] = {}
        self._wanted: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._last_request_ms = -1e18
        self._last_full_refresh_ms = 0.0
        self._stopped = False

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to a bootstrap server (ApiVersions) and fetch the broker list."""
        await self._refresh([])
        self._last_full_refresh_ms = _now_ms()

    def stop(self) -> None:
        """Start no more refreshes."""
        self._stopped = True

    def close(self) -> None:
        """Stop, cancel a refresh under way, and close the pool if it is this object's own."""
        self.stop()
        if self._task is not None:
            self._task.cancel()
        if self._own_pool:
            self._pool.close(ec.REQUEST_TIMED_OUT)

    # --- lookups ----------------------------------------------------------------------------

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
            await asyncio.wait_for(self._refresh([topic]), max(remaining, 0.5) + CONTROL_TIMEOUT_S)
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

    def leader(self, topic: str, partition: int) -> int:
        """The partition's leader, or -1 (and a refresh is wanted) when not known."""
        meta = self._topics.get(topic)
        if meta is None or partition >= len(meta.leaders):
            self._wanted.add(topic)
            return -1
        leader = meta.leaders[partition]
        if leader < 0:
            self._wanted.add(topic)
        return leader

    def error_code(self, topic: str) -> int:
        """The topic's last error from metadata (0 when none or not known yet)."""
        meta = self._topics.get(topic)
        return meta.error_code if meta is not None else 0

    # --- what to refresh --------------------------------------------------------------------

    def need(self, topic: str) -> None:
        """Want the topic's metadata unless it is known already."""
        if topic not in self._topics:
            self._wanted.add(topic)

    def want(self, topic: str) -> None:
        """Refresh the topic's metadata (its leaders are suspect)."""
        self._wanted.add(topic)

    def want_brokers(self) -> None:
        """Refresh the broker list (a leader's address is not known)."""
        self._wanted.add(_BROKERS_ONLY)

    def adopt_leader(self, topic: str, partition: int, node: int, epoch: int) -> None:
        """Take a leader named in a Produce response (CurrentLeader) before the next refresh,
        unless its epoch is older than the one known."""
        meta = self._topics.get(topic)
        if meta is None or partition >= len(meta.leaders) or not _newer(epoch, meta.epochs[partition]):
            return
        meta.leaders[partition] = node
        meta.epochs[partition] = max(epoch, meta.epochs[partition])

    def poll(self, now: float) -> None:
        """Start a refresh in the background if one is due (called from the sender's loop)."""
        if now - self._last_full_refresh_ms >= self.settings.metadata_max_age_ms and self._topics:
            self._last_full_refresh_ms = now
            self._wanted.update(self._topics)
        if not self._wanted or self._task is not None or self._stopped:
            return
        if now - self._last_request_ms < _METADATA_MIN_INTERVAL_MS:
            return
        topics = sorted(t for t in self._wanted if t)
        self._wanted.clear()
        self._task = asyncio.get_running_loop().create_task(self._job(topics))

    # ----------------------------------------------------------------------------------------

    async def _job(self, topics: list[str]) -> None:
        try:
            await self._refresh(topics)
        except (KafkaError, ProtocolError) as exc:
            log.warning("metadata refresh failed: %s", exc)
            self._wanted.update(topics or [_BROKERS_ONLY])
        finally:
            self._task = None
            if self._wakeup is not None:
                self._wakeup()

    async def _refresh(self, topics: list[str]) -> None:
        """Fetch metadata for ``topics`` (none: just the broker list) and apply it."""
        self._last_request_ms = _now_ms()
        conn = await self._pool.control_connection()
        self.stats["metadata_requests"] += 1
        req = m.MetadataRequest(topics, allow_auto_topic_creation=False)
        client_id = self.settings.client_id
        version, body = await conn.request(
            m.METADATA, lambda v, cid: m.encode_metadata_request(v, cid, client_id, req), CONTROL_TIMEOUT_S
        )
        resp = m.decode_metadata_response(body, version)
        self._apply(resp)

    def _apply(self, resp: m.MetadataResponse) -> None:
        if resp.brokers:
            self._pool.set_brokers({b.node_id: (b.host, b.port) for b in resp.brokers})
        for t in resp.topics:
            if t.name is None:
                continue
            if t.error_code and not t.partitions:
                old = self._topics.get(t.name)
                if old is not None and old.leaders and ec.is_retriable(t.error_code):
                    # A passing error (a leader election, say): keep the leaders we have.
                    old.error_code = 0
                    continue
                self._topics[t.name] = _TopicMeta([], [], t.error_code)
                if not ec.is_retriable(t.error_code) and self._on_topic_error is not None:
                    self._on_topic_error(t.name, t.error_code)
                continue
            count = max((p.partition_index for p in t.partitions), default=-1) + 1
            old = self._topics.get(t.name)
            leaders = [-1] * count
            epochs = [-1] * count
            for p in t.partitions:
                i = p.partition_index
                leader = p.leader_id if p.error_code in (0, ec.REPLICA_NOT_AVAILABLE) else -1
                if old is not None and i < len(old.leaders) and not _newer(p.leader_epoch, old.epochs[i]):
                    # Stale: this broker has not heard of the election that gave us our leader.
                    self.stats["stale_leaders"] = self.stats.get("stale_leaders", 0) + 1  # for tests and stats
                    leaders[i], epochs[i] = old.leaders[i], old.epochs[i]
                    continue
                leaders[i], epochs[i] = leader, p.leader_epoch
            self._topics[t.name] = _TopicMeta(leaders, epochs, 0)
            if (old is None or len(old.leaders) != count) and self._on_partition_count is not None:
                try:
                    self._on_partition_count(t.name, count)
                except Exception:  # noqa: BLE001 - a faulty callback must not stop metadata
                    log.exception("on_partition_count raised")


def _newer(epoch: int, known: int) -> bool:
    """Whether leadership at ``epoch`` may replace leadership known at ``known``: not older
    (either unknown, -1, counts as not older)."""
    return epoch < 0 or known < 0 or epoch >= known
