"""The test chain itself: a real broker, a topic per test, and the independent reader.

If this fails, nothing else in tests/integration can be trusted.
"""

from __future__ import annotations

import random

import pytest

pytestmark = pytest.mark.integration


def test_produce_and_read_back_every_field(kafka_bootstrap, new_topic, read_topic):
    from confluent_kafka import Producer

    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    topic = new_topic(partitions=3)
    sent: dict[bytes, tuple[bytes, list[tuple[str, bytes]], int]] = {}
    delivered: dict[bytes, tuple[int, int]] = {}
    errors: list[str] = []

    def on_delivery(err, msg):
        if err is not None:
            errors.append(str(err))
        else:
            delivered[msg.key()] = (msg.partition(), msg.offset())

    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 5})
    base_ts = 1_700_000_000_000
    for i in range(1000):
        key = f"key-{i:04d}".encode()
        value = rng.randbytes(rng.randrange(0, 200))
        headers = [("i", str(i).encode()), ("h", rng.randbytes(4))]
        ts = base_ts + i
        sent[key] = (value, headers, ts)
        producer.produce(topic, value=value, key=key, headers=headers, timestamp=ts,
                         on_delivery=on_delivery)
    assert producer.flush(30) == 0
    assert errors == []

    got = read_topic(topic, expected=1000)
    assert len(got) == 1000
    assert {r.partition for r in got} == {0, 1, 2}
    for rec in got:
        value, headers, ts = sent[rec.key]
        assert rec.value == value
        assert rec.headers == headers
        assert rec.timestamp == ts
        assert (rec.partition, rec.offset) == delivered[rec.key]
    # Offsets in each partition are dense from zero, so nothing was lost or repeated.
    for p in range(3):
        offsets = [r.offset for r in got if r.partition == p]
        assert offsets == list(range(len(offsets)))
