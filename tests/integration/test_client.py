"""shm.Producer against a real daemon and broker, read back with confluent-kafka.

Several client processes at once, keys/values/headers/timestamps, Kafka's partitioner, offsets
equal to the RecordMetadata returned, per-partition order; errors the client raises before a
record enters shared memory and errors the broker returns; acks=0; serializers; asyncio.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict

import msgspec
import pytest
from daemon_fixture import HEADER_NULL, produce_keyed, record_of

from shm import Producer
from shm.errors import MessageTooLargeError, UnknownTopicOrPartitionError  # type: ignore[attr-defined]
from shm.partitioner import murmur2, partition_for_key, to_positive

pytestmark = pytest.mark.integration


def _join(procs, queue, timeout: float) -> dict[int, list[tuple]]:
    results: dict[int, list[tuple]] = {}
    deadline = time.monotonic() + timeout
    try:
        for _ in procs:
            client, status, payload = queue.get(timeout=max(0.1, deadline - time.monotonic()))
            assert status == "ok", f"client {client} failed: {payload}"
            results[client] = payload
    finally:
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return results


def test_many_clients_exactly_once_with_offsets(sluice_daemon, new_topic, read_topic, spawn) -> None:
    topic = new_topic(partitions=4)
    clients, n = 3, 400
    queue = spawn.Queue()
    procs = [spawn.Process(target=produce_keyed, args=(sluice_daemon.socket_path, topic, c, n, queue)) for c in range(clients)]
    for p in procs:
        p.start()
    results = _join(procs, queue, timeout=40)

    records = read_topic(topic, clients * n, timeout=20)
    assert len(records) == clients * n
    by_pos = {(r.partition, r.offset): r for r in records}
    assert len(by_pos) == len(records)
    seen: set[tuple[int, int]] = set()
    for c, metas in results.items():
        assert len(metas) == n
        last_offset: dict[int, int] = {}
        for i, (mtopic, partition, offset, ts) in enumerate(metas):
            key, value, headers, stamp = record_of(c, i)
            assert mtopic == topic
            # Kafka's default partitioner: toPositive(murmur2(key)) % partitions.
            assert partition == to_positive(murmur2(key)) % 4 == partition_for_key(key, 4)
            assert ts == stamp  # CreateTime topic: the record's own timestamp
            r = by_pos.get((partition, offset))
            assert r is not None, f"client {c} record {i}: no record at p{partition}@{offset}"
            assert (r.key, r.value, r.timestamp) == (key, value, stamp)
            assert r.headers == headers
            # Order per partition per client is the send order.
            assert offset > last_offset.get(partition, -1)
            last_offset[partition] = offset
            seen.add((c, i))
    assert len(seen) == clients * n
    # Every record read back is one of ours (no duplicates, no strays).
    values = [r.value for r in records]
    assert len(set(values)) == len(values)


def test_client_side_errors_and_broker_limits(sluice_daemon, new_topic, read_topic) -> None:
    topic = new_topic(partitions=2)
    # max.message.bytes 2000: the client cannot know it, the broker refuses the batch.
    small = new_topic(partitions=1, config={"max.message.bytes": "2000"})
    with Producer(sluice_daemon.socket_path, client_name="test-errors") as p:
        info = p.lookup(topic)
        # Unknown topic: raised by send(), nothing enters the ring.
        t0 = time.monotonic()
        with pytest.raises(UnknownTopicOrPartitionError):
            p.send("no-such-topic-" + topic, b"x")
        assert time.monotonic() - t0 < 10
        # Larger than max_request_size: raised by send() before the ring.
        with pytest.raises(MessageTooLargeError):
            p.send(topic, b"x" * (info.max_request_size + 1))
        assert p.pending == 0
        # Partition out of range.
        with pytest.raises(UnknownTopicOrPartitionError):
            p.send(topic, b"x", partition=2)
        with pytest.raises(UnknownTopicOrPartitionError):
            p.send(topic, b"x", partition=-1)

        # The broker's limit: fails promptly (not retried until delivery_timeout_ms, 120 s).
        # (A batch that holds it fails whole: the sender does not split batches as Java's
        # producer does, so the records that should flow are sent after its outcome.)
        t0 = time.monotonic()
        big = p.send(small, b"y" * 5000, partition=0)
        with pytest.raises(MessageTooLargeError):
            big.result(timeout=10)
        assert time.monotonic() - t0 < 5
        fine = [p.send(small, b"ok-%d" % i, partition=0) for i in range(5)]
        other = [p.send(topic, b"other-%d" % i, partition=i % 2) for i in range(10)]
        metas = [f.result(timeout=10) for f in fine + other]
        assert all(m.offset >= 0 for m in metas)
        assert p.flush(10) == 0
    small_records = read_topic(small, 5, timeout=15)
    assert [r.value for r in small_records] == [b"ok-%d" % i for i in range(5)]
    assert [r.offset for r in small_records] == [m.offset for m in metas[:5]]
    other_records = read_topic(topic, 10, timeout=15)
    assert sorted(r.value for r in other_records) == sorted(b"other-%d" % i for i in range(10))


def test_acks0_profile(start_sluice, new_topic, read_topic) -> None:
    d = start_sluice(
        profiles={"fast": {"acks": 0, "enable_idempotence": False}}, topics={"*acks0*": "fast"}
    )
    topic = new_topic(partitions=2)
    assert "acks0" in topic
    with Producer(d.socket_path, client_name="test-acks0") as p:
        assert p.lookup(topic).profile == "fast"
        futs = [p.send(topic, b"a0-%d" % i, b"k%d" % i) for i in range(200)]
        metas = [f.result(timeout=15) for f in futs]
    assert all(m.offset == -1 for m in metas)
    assert all(m.partition == partition_for_key(b"k%d" % i, 2) for i, m in enumerate(metas))
    records = read_topic(topic, 200, timeout=20)
    assert sorted(r.value for r in records) == sorted(b"a0-%d" % i for i in range(200))


def test_serializers_and_asyncio(sluice_daemon, new_topic, read_topic) -> None:
    jt = new_topic(partitions=1)
    mt = new_topic(partitions=1)
    docs = [{"n": i, "name": f"doc-{i}", "tags": ["a", None, 1.5]} for i in range(20)]
    with Producer(sluice_daemon.socket_path, value_serializer="json", key_serializer="str") as pj:
        futs = [pj.send(jt, doc, key=f"key-{doc['n']}") for doc in docs]
        assert [f.result(timeout=10).offset for f in futs] == list(range(20))
    with Producer(sluice_daemon.socket_path, value_serializer="msgpack", key_serializer="msgpack") as pm:

        async def main() -> list:
            metas = []
            for doc in docs:
                metas.append(await pm.send(mt, doc, key=doc["n"]))
            # Several awaited at once, and an error surfaces as the exception.
            metas += await asyncio.gather(*(pm.send(mt, d) for d in docs[:5]))
            with pytest.raises(UnknownTopicOrPartitionError):
                await pm.send(mt, docs[0], partition=7)
            return metas

        metas = asyncio.run(asyncio.wait_for(main(), 20))
    assert [m.offset for m in metas] == list(range(25))
    jrec = read_topic(jt, 20, timeout=15)
    assert [json.loads(r.value) for r in jrec] == docs
    assert [r.key for r in jrec] == [f"key-{i}".encode() for i in range(20)]
    mrec = read_topic(mt, 25, timeout=15)
    assert [msgspec.msgpack.decode(r.value) for r in mrec] == docs + docs[:5]
    assert [msgspec.msgpack.decode(r.key) for r in mrec[:20]] == list(range(20))
    assert all(r.key is None for r in mrec[20:])


def test_headers_and_null_values_roundtrip(sluice_daemon, new_topic, read_topic) -> None:
    topic = new_topic(partitions=1)
    with Producer(sluice_daemon.socket_path) as p:
        a = p.send(topic, None, b"tombstone", headers=[(HEADER_NULL, None), ("e", b"")])
        b = p.send(topic, b"", None, headers=[("utf8-\u00e9", b"\x00\xff")])
        ma, mb = a.result(timeout=10), b.result(timeout=10)
    recs = read_topic(topic, 2, timeout=15)
    assert [(r.offset, r.key, r.value) for r in recs] == [(ma.offset, b"tombstone", None), (mb.offset, None, b"")]
    assert recs[0].headers == [(HEADER_NULL, None), ("e", b"")]
    assert recs[1].headers == [("utf8-\u00e9", b"\x00\xff")]
    by_partition: dict[int, int] = defaultdict(int)
    for r in recs:
        by_partition[r.partition] += 1
    assert by_partition == {0: 2}


def test_partitions_agree_with_librdkafka_murmur2(sluice_daemon, new_topic, kafka_bootstrap) -> None:
    """The same keys through Sluice and through librdkafka's Java-compatible partitioner land on
    the same partitions (an independent check of murmur2, not our own formula)."""
    from confluent_kafka import Producer as RdProducer

    ours, theirs = new_topic(partitions=7), new_topic(partitions=7)
    keys = [b"", b"a", b"user-42", b"\xff\x00\x80", "\u00e9t\u00e9".encode()] + [b"key-%d" % i for i in range(40)]
    with Producer(sluice_daemon.socket_path) as p:
        sluice_parts = [p.send(ours, b"v", k).result(timeout=10).partition for k in keys]
    rd = RdProducer({"bootstrap.servers": kafka_bootstrap, "partitioner": "murmur2_random"})
    rd_parts: dict[bytes, int] = {}

    def report(err, msg) -> None:
        assert err is None, err
        rd_parts[msg.key()] = msg.partition()

    for k in keys:
        rd.produce(theirs, b"v", key=k, on_delivery=report)
    assert rd.flush(15) == 0
    assert sluice_parts == [rd_parts[k] for k in keys]
