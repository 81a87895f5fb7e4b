"""Partition growth and topic deletion reach connected clients, against the real broker.

A topic grows from 3 to 6 partitions (confluent-kafka's AdminClient) while a shm.Producer and
a socket client are connected to a real daemon with a short ``metadata_max_age_ms``. Within a
bounded time the SAME producer's keyed records go to murmur2 modulo 6 (so some land on
partitions 3-5), and so do the socket client's (the daemon's ingest producer follows); a
connection that asked for topic updates gets the TopicChanged. Every record is read back with
an independent confluent-kafka consumer, where its RecordMetadata says.

Deleting a topic while a producer writes to it and to another topic: the deleted topic's
records fail with a clear Kafka error within the profile's ``delivery_timeout_ms``, and the
other topic's records, through the same producer, keep being delivered.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from confluent_kafka.admin import NewPartitions

from shm import Producer, control
from shm.connection import Connection, hello_for
from shm.errors import KafkaError
from shm.partitioner import partition_for_key

pytestmark = pytest.mark.integration

BEFORE, AFTER = 3, 6
METADATA_MAX_AGE_MS = 1000
# The growth must reach a connected client within a few metadata refreshes (the worker that
# refreshes, the supervisor's table, the push); this bounds the wait generously on a busy host.
GROWTH_WITHIN_S = 20.0
KEYS = [b"user-%d" % i for i in range(120)]


def _grow(admin: Any, topic: str, partitions: int) -> None:
    admin.create_partitions([NewPartitions(topic, partitions)])[topic].result(timeout=30)


def _socket_produce(conn: Connection, topic: str, values: list[bytes], seq: int) -> list[control.RecordResult]:
    recs = [control.Rec(key=k, value=v) for k, v in zip(KEYS, values)]
    ack = conn.request(control.Produce(topic=topic, records=recs, ack=True, seq=seq), control.ProduceAck)
    assert ack.seq == seq
    return ack.results


def test_growth_reaches_a_connected_producer_and_socket_clients(new_topic, kafka_admin, start_sluice,
                                                               read_topic) -> None:
    topic = new_topic(BEFORE)
    d = start_sluice(workers=2, kafka={"metadata_max_age_ms": METADATA_MAX_AGE_MS})
    notices: list[control.TopicChanged] = []
    raw_notices: list[control.TopicChanged] = []  # a client that did not ask (as the Go client)
    sent: dict[bytes, Any] = {}  # value -> future (shm) or RecordResult (socket)
    with Producer(d.socket_path, client_name="grow-before") as p, \
            Connection(d.socket_path, hello=hello_for("grow-raw"), on_notice=raw_notices.append) as raw, \
            Connection(d.socket_path, hello=hello_for("grow-watcher", topic_updates=True),
                       on_notice=notices.append) as watcher:
        assert p.lookup(topic).partitions == BEFORE
        assert watcher.request(control.TopicLookup(topic=topic), control.TopicInfo).partitions == BEFORE
        for i, k in enumerate(KEYS):
            sent[b"shm-before-%d" % i] = p.send(topic, b"shm-before-%d" % i, k)
        for i, r in enumerate(_socket_produce(raw, topic, [b"sock-before-%d" % i for i in range(len(KEYS))], 1)):
            assert r.error_code == 0 and r.partition == partition_for_key(KEYS[i], BEFORE)
            sent[b"sock-before-%d" % i] = r
        assert p.flush(30) == 0

        _grow(kafka_admin, topic, AFTER)
        grown_at = time.monotonic()
        # The same producer, never looked up again: it hears of the growth from the daemon.
        while p.partitions_for(topic) != AFTER:
            assert time.monotonic() - grown_at < GROWTH_WITHIN_S, "the connected producer never heard of the growth"
            time.sleep(0.05)
        heard_s = time.monotonic() - grown_at
        for i, k in enumerate(KEYS):
            sent[b"shm-after-%d" % i] = p.send(topic, b"shm-after-%d" % i, k)
        after = _socket_produce(raw, topic, [b"sock-after-%d" % i for i in range(len(KEYS))], 2)
        for i, r in enumerate(after):
            assert r.error_code == 0, r
            assert r.partition == partition_for_key(KEYS[i], AFTER), (KEYS[i], r)
            sent[b"sock-after-%d" % i] = r
        assert p.flush(30) == 0
        # The watcher's TopicChanged was queued when the daemon's table grew, before this reply.
        watcher.request(control.StatsRequest(), control.StatsReply)
        assert [(n.topic, n.partitions) for n in notices] == [(topic, AFTER)]
        raw.request(control.StatsRequest(), control.StatsReply)
        assert raw_notices == [], "a client whose Hello did not ask never gets a TopicChanged"
        assert notices[0].topic_id == p.lookup(topic).topic_id

    results: dict[bytes, tuple[int, int]] = {}
    for value, out in sent.items():
        if isinstance(out, control.RecordResult):
            results[value] = (out.partition, out.offset)
        else:
            md = out.result(0)
            results[value] = (md.partition, md.offset)
    for i, k in enumerate(KEYS):
        assert results[b"shm-after-%d" % i][0] == partition_for_key(k, AFTER)
        assert results[b"shm-before-%d" % i][0] == partition_for_key(k, BEFORE)
    assert {part for part, _ in results.values()} == set(range(AFTER)), "partitions 3-5 got records"
    records = read_topic(topic, len(sent), timeout=30)
    where = {r.value: (r.partition, r.offset) for r in records}
    assert len(records) == len(where) == len(sent), "every record exactly once"
    assert where == results
    print(f"growth heard by the connected producer {heard_s:.2f}s after create_partitions returned")


DELETE_PROFILE = {"request_timeout_ms": 2000, "delivery_timeout_ms": 8000, "linger_ms": 5}


def test_deleting_a_topic_fails_its_records_and_spares_the_others(new_topic, kafka_admin, start_sluice,
                                                                  read_topic) -> None:
    doomed, kept = new_topic(3), new_topic(3)
    timeout_s = DELETE_PROFILE["delivery_timeout_ms"] / 1000
    d = start_sluice(workers=2, kafka={"metadata_max_age_ms": METADATA_MAX_AGE_MS},
                     profiles={"default": DELETE_PROFILE})
    kept_futs: list[Any] = []
    doomed_futs: list[Any] = []
    with Producer(d.socket_path, client_name="delete-test") as p:
        for i in range(50):
            doomed_futs.append(p.send(doomed, b"d-%d" % i, b"k%d" % i))
            kept_futs.append(p.send(kept, b"k-%d" % i, b"k%d" % i))
        assert p.flush(30) == 0
        assert all(f.exception() is None for f in doomed_futs + kept_futs)
        kafka_admin.delete_topics([doomed])[doomed].result(timeout=30)
        deleted_at = time.monotonic()
        refused: list[KafkaError] = []
        later: list[tuple[float, Any]] = []  # (sent at, future) of the doomed topic's records
        took: list[float] = []  # seconds from send to failure
        i = 50
        # Write to both for longer than delivery_timeout_ms: the doomed topic's records must fail.
        while time.monotonic() - deleted_at < timeout_s + 4:
            try:
                at = time.monotonic()
                f = p.send(doomed, b"d-%d" % i, b"k%d" % i)
                f.add_done_callback(lambda f, at=at: f.exception() and took.append(time.monotonic() - at))
                later.append((at, f))
            except KafkaError as exc:  # refused before the ring: also a clear answer
                refused.append(exc)
            kept_futs.append(p.send(kept, b"k-%d" % i, b"k%d" % i))
            i += 1
            time.sleep(0.02)
        assert p.flush(timeout_s + 10) == 0, "every record got an outcome"
    errors = [exc for _, f in later if (exc := f.exception(0)) is not None] + refused
    assert len(errors) == len(later) + len(refused), "every record to the deleted topic failed"
    names = {e.name for e in errors if isinstance(e, KafkaError)}
    assert names == {"UNKNOWN_TOPIC_OR_PARTITION"}, ({type(e).__name__ for e in errors}, names)
    # Within the delivery timeout (and the expiry scan and a completion's way back).
    assert max(took) < timeout_s + 3, max(took)
    print(f"{len(errors)} records to the deleted topic failed, at most {max(took):.1f}s after send()")
    # The other topic on the same producer: every record delivered, read back exactly once.
    assert all(f.exception(0) is None for f in kept_futs), [f.exception(0) for f in kept_futs if f.exception(0)][:3]
    records = read_topic(kept, len(kept_futs), timeout=30)
    assert sorted(r.value for r in records) == sorted(b"k-%d" % j for j in range(len(kept_futs)))
