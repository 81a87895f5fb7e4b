"""Partition growth on a three-broker cluster: a topic that gains partitions while the daemon runs.

The workers' metadata refresh (``metadata_max_age_ms``) sees the new count; the supervisor's
topic table grows and every worker hears of it (AddTopic), so the new partitions get owners,
rows in the accumulator and leaders in the sender. A client that looks the topic up afterwards
is told the new count and can write to the new partitions; a client connected before hears of
it too (TopicChanged, docs/PROTOCOL.md) and writes to them as well
(tests/integration/test_partition_growth.py checks keyed records against murmur2 on the new
count). Checked with confluent-kafka: every record where its future says, exactly once.
"""

from __future__ import annotations

import pytest
from confluent_kafka.admin import NewPartitions
from helpers import wait_until

from shm import Producer

pytestmark = [pytest.mark.cluster, pytest.mark.integration]

BEFORE, AFTER = 2, 5
METADATA_MAX_AGE_MS = 500


def test_new_partitions_are_served_after_the_metadata_refresh(cluster_topic, kafka_admin, start_sluice,
                                                             read_topic) -> None:
    topic = cluster_topic("grow", BEFORE)
    d = start_sluice(workers=2, kafka={"metadata_max_age_ms": METADATA_MAX_AGE_MS})
    sent: list[tuple[bytes, object]] = []  # (value, future), in send order

    def send(p: Producer, prefix: bytes, i: int, partitions: int) -> None:
        value = b"%s-%d" % (prefix, i)
        sent.append((value, p.send(topic, value, partition=i % partitions)))

    with Producer(d.socket_path, client_name="before") as old:
        assert old.lookup(topic).partitions == BEFORE
        for i in range(20):
            send(old, b"old", i, BEFORE)
        assert old.flush(30) == 0
        kafka_admin.create_partitions([NewPartitions(topic, AFTER)])[topic].result(timeout=30)

        def fresh_count() -> int:
            with Producer(d.socket_path, client_name="probe") as probe:
                return probe.lookup(topic).partitions

        # A worker that holds the topic sees it grow at its next timed refresh.
        wait_until(lambda: fresh_count() == AFTER, 30, "the daemon's topic table grew", interval=0.3)
        with Producer(d.socket_path, client_name="after") as new:
            assert new.lookup(topic).partitions == AFTER
            for i in range(50):
                send(new, b"new", i, AFTER)
            # The client connected before the growth was told of it, and uses every partition.
            wait_until(lambda: old.partitions_for(topic) == AFTER, 10, "the connected client heard of the growth")
            for i in range(20, 40):
                send(old, b"old", i, AFTER)
            assert new.flush(30) == 0 and old.flush(30) == 0
    results = {value: fut.result(0) for value, fut in sent}
    assert {md.partition for md in results.values()} == set(range(AFTER))
    records = read_topic(topic, len(sent), timeout=30)
    where = {r.value: (r.partition, r.offset) for r in records}
    assert len(records) == len(where) == len(sent), "every record exactly once"
    for value, md in results.items():
        assert where[value] == (md.partition, md.offset), value
