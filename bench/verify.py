"""Fresh topics per case and the read-back count that validates every result.

The reader is confluent-kafka (librdkafka), independent of Sluice's own code. It reads every
partition from the beginning until each reports end-of-partition; since the producers have all
been acknowledged (or given up) by then, that is everything the topic will hold.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

__all__ = ["Topics", "ReadBack", "count_topic"]


@dataclass(frozen=True, slots=True)
class ReadBack:
    """What the reader found: records consumed, and the watermarks' view for cross-checking."""

    records: int
    watermark_records: int
    complete: bool  # every partition reached its end before the timeout
    seconds: float


class Topics:
    """Creates and deletes the benchmark's topics (AdminClient)."""

    def __init__(self, bootstrap: str) -> None:
        from confluent_kafka.admin import AdminClient

        self._bootstrap = bootstrap
        self._admin = AdminClient({"bootstrap.servers": bootstrap})

    def check(self, timeout: float = 10.0) -> None:
        """Raise if no broker answers."""
        self._admin.list_topics(timeout=timeout)

    def create(self, label: str, runner: str, partitions: int, timeout: float = 30.0) -> str:
        """A new topic named after the case, with leaders for every partition."""
        from confluent_kafka.admin import NewTopic

        name = f"bench-{label}-{runner}-{uuid.uuid4().hex[:8]}"
        fut = self._admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)],
                                        operation_timeout=timeout)[name]
        fut.result(timeout=timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            md = self._admin.list_topics(topic=name, timeout=5).topics.get(name)
            if (md is not None and md.error is None and len(md.partitions) == partitions
                    and all(p.leader >= 0 for p in md.partitions.values())):
                return name
            time.sleep(0.1)
        raise TimeoutError(f"topic {name} has no leaders after {timeout} s")

    def delete(self, name: str) -> None:
        """Delete a topic; failures are ignored (cleanup must not hide a result)."""
        try:
            for fut in self._admin.delete_topics([name], operation_timeout=30).values():
                fut.result(timeout=30)
        except Exception:  # noqa: BLE001
            pass


def count_topic(bootstrap: str, topic: str, timeout: float = 120.0) -> ReadBack:
    """Consume ``topic`` from the beginning and count its records."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    t0 = time.monotonic()
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"bench-reader-{uuid.uuid4().hex}",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
        "check.crcs": True,
        "fetch.max.bytes": 64 * 1024 * 1024,
    })
    try:
        md = consumer.list_topics(topic, timeout=10).topics[topic]
        parts = sorted(md.partitions)
        watermark = 0
        for p in parts:
            lo, hi = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            watermark += hi - lo
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        at_end: set[int] = set()
        count = 0
        deadline = t0 + timeout
        while len(at_end) < len(parts) and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=10_000, timeout=0.5):
                err = msg.error()
                if err is None:
                    count += 1
                    at_end.discard(msg.partition())
                elif err.code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition())
                else:
                    raise RuntimeError(f"reader error: {err}")
        return ReadBack(count, watermark, len(at_end) == len(parts), time.monotonic() - t0)
    finally:
        consumer.close()
