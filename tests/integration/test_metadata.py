"""daemon.metadata, daemon.connection and daemon.idempotence against the real Kafka broker.

Metadata as the supervisor uses it (a pool of its own) and as the sender uses it (a shared pool,
refreshes from the loop's poll); the broker connections it opens; InitProducerId and its bump.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import uvloop

from daemon.config import KafkaSettings
from daemon.connection import ConnectionPool
from daemon.idempotence import Chain, Idempotence
from daemon.metadata import Metadata
from daemon.protocol import errors as ec
from shm.errors import KafkaError

pytestmark = pytest.mark.integration


def _now_ms() -> float:
    return time.monotonic() * 1000.0


async def _until(cond: Any, poll: Any = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        if poll is not None:
            poll()
        await asyncio.sleep(0.02)


def test_standalone_metadata_knows_partition_counts_and_leaders(kafka_bootstrap, new_topic) -> None:
    topic = new_topic(partitions=3)

    async def main() -> tuple[int, list[int], int]:
        meta = Metadata(KafkaSettings(bootstrap_servers=kafka_bootstrap))
        try:
            await asyncio.wait_for(meta.start(), 15)
            count = await meta.partitions_for(topic)
            leaders = [meta.leader(topic, p) for p in range(3)]
            return count, leaders, meta.leader(topic, 3)
        finally:
            meta.close()

    count, leaders, beyond = uvloop.run(main())
    assert count == 3
    assert all(leader >= 0 for leader in leaders)
    assert beyond == -1


def test_partition_growth_is_reported_and_an_invalid_topic_fails_its_batches(kafka_bootstrap, new_topic,
                                                                              kafka_admin) -> None:
    from confluent_kafka.admin import NewPartitions

    topic = new_topic(partitions=2)
    counts: list[tuple[str, int]] = []
    topic_errors: list[tuple[str, int]] = []
    wakeups = [0]

    async def main() -> None:
        settings = KafkaSettings(bootstrap_servers=kafka_bootstrap, metadata_max_age_ms=200)
        pool = ConnectionPool(settings)
        meta = Metadata(settings, pool, stats={"metadata_requests": 0},
                        on_partition_count=lambda t, n: counts.append((t, n)),
                        on_topic_error=lambda t, c: topic_errors.append((t, c)),
                        wakeup=lambda: wakeups.__setitem__(0, wakeups[0] + 1))
        try:
            await asyncio.wait_for(meta.start(), 15)
            assert meta.leader(topic, 0) == -1  # not known yet: asks for it
            await _until(lambda: (topic, 2) in counts, lambda: meta.poll(_now_ms()))
            assert meta.leader(topic, 1) >= 0
            fut = kafka_admin.create_partitions([NewPartitions(topic, 4)])[topic]
            await asyncio.to_thread(fut.result, 30)
            # The timer refresh (metadata_max_age_ms) finds the new partitions.
            await _until(lambda: (topic, 4) in counts, lambda: meta.poll(_now_ms()), timeout=30)
            meta.need("invalid topic name!")
            await _until(lambda: topic_errors, lambda: meta.poll(_now_ms()))
            assert meta.stats["metadata_requests"] >= 3
        finally:
            meta.close()
            pool.close(ec.REQUEST_TIMED_OUT)

    uvloop.run(main())
    assert counts[:2] == [(topic, 2), (topic, 4)]
    assert topic_errors == [("invalid topic name!", ec.INVALID_TOPIC_EXCEPTION)]
    assert wakeups[0] >= 3


def test_unknown_topic_is_refused_within_its_timeout(kafka_bootstrap) -> None:
    async def main() -> None:
        meta = Metadata(KafkaSettings(bootstrap_servers=kafka_bootstrap))
        try:
            await asyncio.wait_for(meta.start(), 15)
            with pytest.raises(KafkaError) as info:
                await meta.partitions_for("no-such-topic-metadata-test", timeout=1.0)
            assert info.value.code == ec.UNKNOWN_TOPIC_OR_PARTITION
        finally:
            meta.close()

    uvloop.run(main())


def test_broker_connections_open_on_demand_and_reconnect_after_a_loss(kafka_bootstrap, new_topic) -> None:
    topic = new_topic(partitions=1)

    async def main() -> dict[str, Any]:
        settings = KafkaSettings(bootstrap_servers=kafka_bootstrap, reconnect_backoff_ms=50)
        stats = {"in_flight": 0, "protocol_errors": 0, "reconnects": 0, "metadata_requests": 0}
        pool = ConnectionPool(settings, stats)
        meta = Metadata(settings, pool, stats=stats)
        try:
            await asyncio.wait_for(meta.start(), 15)
            await meta.partitions_for(topic)
            node = meta.leader(topic, 0)
            assert pool.knows(node) and pool.ready(node) is None
            await _until(lambda: pool.ready(node) is not None, lambda: pool.connect(node, _now_ms()))
            conn = pool.ready(node)
            assert conn is not None and conn.node_id == node and conn.versions
            assert pool.connections() == [conn]
            conn.close()
            assert pool.ready(node) is None and stats["reconnects"] == 1
            await _until(lambda: pool.ready(node) is not None, lambda: pool.connect(node, _now_ms()))
            assert pool.ready(node) is not conn
            return stats
        finally:
            meta.close()
            pool.close(ec.REQUEST_TIMED_OUT)

    stats = uvloop.run(main())
    assert stats["in_flight"] == 0 and stats["protocol_errors"] == 0


def test_init_producer_id_then_a_bump_for_a_broken_chain(kafka_bootstrap) -> None:
    class _Pending:
        def __init__(self) -> None:
            self.batch, self.order, self.needs_stamp = None, 1, True

    async def main() -> tuple[tuple[int, int], tuple[int, int], int]:
        settings = KafkaSettings(bootstrap_servers=kafka_bootstrap)
        stats = {"in_flight": 0, "protocol_errors": 0, "reconnects": 0, "producer_id_requests": 0}
        pool = ConnectionPool(settings, stats)
        idem = Idempotence(settings, pool, stats=stats, wakeup=lambda: None)
        chain = Chain()
        e = _Pending()
        try:
            # No producer id yet: the batch waits while one is fetched.
            assert not idem.may_send(chain, e, [])
            await _until(lambda: idem.may_send(chain, e, []))
            first = idem.producer_id

            class _Failed:
                producer_id, producer_epoch = first

            chain.break_at(_Failed())
            assert not idem.may_send(chain, e, [])  # the chain of this id is broken: bump
            await _until(lambda: idem.may_send(chain, e, []))
            return first, idem.producer_id, stats["producer_id_requests"]
        finally:
            idem.close()
            pool.close(ec.REQUEST_TIMED_OUT)

    first, second, requests = uvloop.run(main())
    assert first[0] >= 0 and second[0] >= 0
    assert second != first
    assert requests == 2
