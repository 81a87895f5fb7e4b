"""Batches larger than the topic allows are split and re-sent; only a record too large alone fails.

A topic with ``max.message.bytes`` = 4096 gets records streamed through a real daemon whose
profile batches up to 64 KiB: the broker refuses the big batches (MESSAGE_TOO_LARGE), the daemon
cuts them in halves until they fit, and confluent-kafka must find every record exactly once, in
send order per partition, at the offset its future reported. One record larger than 4096 bytes
fails with MessageTooLargeError; the records around it do not.
"""

from __future__ import annotations

import random

import pytest

from shm import Producer
from shm.errors import KafkaError

pytestmark = pytest.mark.integration

LIMIT = 4096
RECORDS = 1500
PARTITIONS = 2
SEED = 1414  # values are random bytes, so compression cannot bring a batch under the limit


@pytest.mark.parametrize("profile", [
    {"acks": -1, "enable_idempotence": True},
    {"acks": 1, "enable_idempotence": False, "compression_type": "gzip"},
], ids=["idempotent", "acks1-gzip"])
def test_batches_too_large_for_the_topic_are_split_and_delivered_once_in_order(
        new_topic, start_sluice, read_topic, profile) -> None:
    topic = new_topic(partitions=PARTITIONS, config={"max.message.bytes": str(LIMIT)})
    d = start_sluice(workers=2, profiles={"default": {"linger_ms": 100, "batch_size": 65536, **profile}})
    rng = random.Random(SEED)
    print("seed", SEED)
    sent: list[tuple[bytes, object]] = []
    with Producer(d.socket_path, client_name="oversized") as p:
        for i in range(RECORDS):
            value = b"%06d-" % i + rng.randbytes(100 + i % 150)
            sent.append((value, p.send(topic, value, key=b"k%d" % i, partition=i % PARTITIONS)))
            if i == RECORDS // 2:
                big = p.send(topic, rng.randbytes(LIMIT + 500), partition=0)
        assert p.flush(60) == 0
    with pytest.raises(KafkaError) as info:
        big.result(0)
    assert type(info.value).__name__ == "MessageTooLargeError"
    results = {value: fut.result(0) for value, fut in sent}
    records = read_topic(topic, len(sent), timeout=30)
    where = {r.value: (r.partition, r.offset) for r in records}
    assert len(records) == len(where) == len(sent), "every record exactly once, the big one not at all"
    for value, md in results.items():
        assert where[value] == (md.partition, md.offset), value
    for part in range(PARTITIONS):
        in_log = [r.value for r in records if r.partition == part]
        assert in_log == [v for i, (v, _) in enumerate(sent) if i % PARTITIONS == part], "send order kept"

