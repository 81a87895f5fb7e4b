"""The sender against the real Kafka broker, read back with confluent-kafka.

Real Accumulator + Sender + shm.frames.encode_record_body; no mocked Kafka.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from typing import Any

import pytest
import uvloop

from daemon.accumulator import APPEND_OK, Accumulator
from daemon.config import KafkaSettings, Profile
from daemon.protocol import errors as ec
from daemon.sender import Sender
from shm.errors import UnknownTopicOrPartitionError  # type: ignore[attr-defined]
from shm.frames import encode_record_body

pytestmark = pytest.mark.integration

SEED = 20240611


class _Recorder:
    """Wraps the accumulator to learn which records each batch holds (seal order per partition)."""

    def __init__(self, acc: Accumulator) -> None:
        self.acc = acc
        self.appended: dict[int, list[int]] = defaultdict(list)  # partition -> record ids in order
        self.taken: dict[int, int] = defaultdict(int)
        self.records_of: dict[int, list[int]] = {}  # id(batch) -> record ids
        self.keep: list[Any] = []  # batches stay alive so their ids are never reused

    def ready(self, now_ms: float):
        out = self.acc.ready(now_ms)
        for b in out:
            start = self.taken[b.partition]
            self.records_of[id(b)] = self.appended[b.partition][start : start + b.record_count]
            self.taken[b.partition] = start + b.record_count
            self.keep.append(b)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.acc, name)


def _record(i: int) -> tuple[bytes, bytes, list[tuple[str, bytes | None]], int]:
    key = b"key-%d" % i
    value = (b"value-%d-" % i) * (1 + i % 7)
    headers: list[tuple[str, bytes | None]] = [("n", str(i).encode()), ("empty", None if i % 2 else b"")]
    return key, value, headers, 1_700_000_000_000 + i


async def _produce(bootstrap: str, topic: str, profile: Profile, n: int, partitions: int,
                   kill_after: int | None = None) -> tuple[dict[int, tuple[int, int, int]], Sender, _Recorder]:
    """Produce n records; returns {record id: (partition, error, offset)}."""
    acc = _Recorder(Accumulator(buffer_memory=32 << 20, profile_for=lambda t: profile))
    results: dict[int, tuple[int, int, int]] = {}
    calls: list[int] = []

    def on_complete(batch, code: int, base_offset: int, ts: int) -> None:
        calls.append(id(batch))
        for k, rid in enumerate(acc.records_of[id(batch)]):
            assert rid not in results, "a record was completed twice"
            results[rid] = (batch.partition, code, base_offset + k if base_offset >= 0 else -1)

    sender = Sender(KafkaSettings(bootstrap_servers=bootstrap), acc, lambda t: profile, on_complete)
    killed = False
    if kill_after is not None:
        # Drop the broker connection just after a Produce request carrying record kill_after (or
        # later) has been written: the broker gets the request, the answer is lost. Hooked into
        # the sender so it happens on every run, however fast the broker answers.
        send_produce = sender._send_produce
        sent = [0]

        def send_then_kill(conn, node, acks, timeout_ms, entries, now) -> None:
            nonlocal killed
            send_produce(conn, node, acks, timeout_ms, entries, now)
            sent[0] += sum(e.batch.record_count for e in entries.values())
            if not killed and sent[0] > kill_after:
                killed = True
                asyncio.get_running_loop().call_soon(conn.transport.abort)

        sender._send_produce = send_then_kill  # type: ignore[method-assign]
    await asyncio.wait_for(sender.start(), 15)
    assert await sender.partitions_for(topic) == partitions
    runner = asyncio.get_running_loop().create_task(sender.run())
    for i in range(n):
        key, value, headers, ts = _record(i)
        partition = i % partitions
        code = acc.acc.append(topic, partition, ts, encode_record_body(key, value, headers), 1, time.monotonic() * 1000)
        assert code == APPEND_OK
        acc.appended[partition].append(i)
        if i % 250 == 249:
            sender.wakeup()
            await asyncio.sleep(0.002)
    assert await sender.flush(60), f"flush timed out: {sender.stats}"
    await sender.close(5)
    await asyncio.wait_for(runner, 5)
    assert len(calls) == len(set(calls)), "on_complete called twice for a batch"
    if kill_after is not None:
        assert killed, "no Produce request carried the record to kill after"
    return results, sender, acc


def _check_delivery(read_topic, topic: str, n: int, results, with_offsets: bool) -> None:
    assert len(results) == n
    assert all(code == 0 for _, code, _ in results.values()), {c for _, c, _ in results.values()}
    got = read_topic(topic, n, timeout=60)
    assert len(got) == n, f"expected {n} records exactly once, read {len(got)}"
    seen = set()
    for rec in got:
        rid = int(rec.key.split(b"-")[1])
        assert rid not in seen, f"duplicate record {rid}"
        seen.add(rid)
        key, value, headers, ts = _record(rid)
        assert (rec.key, rec.value, rec.partition, rec.timestamp) == (key, value, rid % 3, ts)
        assert rec.headers == headers
        if with_offsets:
            assert results[rid] == (rec.partition, 0, rec.offset)
        else:
            assert results[rid][2] == -1
    # per-partition order: record ids ascend with offsets
    by_part = defaultdict(list)
    for rec in got:
        by_part[rec.partition].append(int(rec.key.split(b"-")[1]))
    for ids in by_part.values():
        assert ids == sorted(ids)


@pytest.mark.parametrize(
    "profile",
    [
        Profile(acks=-1, enable_idempotence=True, linger_ms=5),
        Profile(acks=1, enable_idempotence=False, linger_ms=5, batch_size=4096),
        Profile(acks=0, enable_idempotence=False, linger_ms=5),
    ],
    ids=["acks-all-idempotent", "acks-1", "acks-0"],
)
def test_every_record_arrives_once_with_its_offset(kafka_bootstrap, new_topic, read_topic, profile: Profile) -> None:
    random.seed(SEED)
    topic = new_topic(partitions=3)
    n = 5000
    results, sender, _ = uvloop.run(_produce(kafka_bootstrap, topic, profile, n, 3))
    assert sender.stats["records"] == n and sender.stats["failed_batches"] == 0
    assert sender.stats["in_flight"] == 0
    _check_delivery(read_topic, topic, n, results, with_offsets=profile.acks != 0)


def test_reconnect_after_connection_killed_delivers_everything_once(kafka_bootstrap, new_topic, read_topic) -> None:
    topic = new_topic(partitions=3)
    n = 5000
    profile = Profile(acks=-1, enable_idempotence=True, linger_ms=1, batch_size=2048)
    results, sender, _ = uvloop.run(_produce(kafka_bootstrap, topic, profile, n, 3, kill_after=2000))
    assert sender.stats["reconnects"] >= 1
    assert sender.stats["errors"] == {}
    _check_delivery(read_topic, topic, n, results, with_offsets=True)


def test_oversized_batch_fails_at_once_with_message_too_large(kafka_bootstrap, new_topic) -> None:
    topic = new_topic(partitions=1, config={"max.message.bytes": "1000"})
    profile = Profile(acks=-1, enable_idempotence=True, linger_ms=0, retry_backoff_ms=200)

    async def main() -> tuple[list[tuple[int, int]], float, Sender]:
        acc = Accumulator(buffer_memory=8 << 20, profile_for=lambda t: profile)
        done: list[tuple[int, int]] = []
        sender = Sender(KafkaSettings(bootstrap_servers=kafka_bootstrap), acc, lambda t: profile,
                        lambda b, code, off, ts: done.append((code, b.attempts)))
        await asyncio.wait_for(sender.start(), 15)
        runner = asyncio.get_running_loop().create_task(sender.run())
        t0 = time.monotonic()
        body = encode_record_body(b"k", b"x" * 5000, None)
        assert acc.append(topic, 0, int(time.time() * 1000), body, 1, time.monotonic() * 1000) == APPEND_OK
        sender.wakeup()
        assert await sender.flush(20)
        elapsed = time.monotonic() - t0
        # the partition keeps working for records that fit (the sequence gap is repaired)
        small = encode_record_body(b"k", b"ok", None)
        assert acc.append(topic, 0, int(time.time() * 1000), small, 1, time.monotonic() * 1000) == APPEND_OK
        assert await sender.flush(20)
        await sender.close(5)
        await asyncio.wait_for(runner, 5)
        return done, elapsed, sender

    done, elapsed, sender = uvloop.run(main())
    assert done[0] == (ec.MESSAGE_TOO_LARGE, 1), "failed on the first attempt, no retries"
    assert done[1] == (0, 1)
    assert elapsed < 3.0
    assert sender.stats["retries"] == 0
    assert sender.stats["producer_id_requests"] == 2, "the sequence gap was repaired with a new producer id"


def test_unknown_topic_raises_within_bounded_time(kafka_bootstrap) -> None:
    async def main() -> float:
        profile = Profile()
        acc = Accumulator(buffer_memory=4 << 20, profile_for=lambda t: profile)
        sender = Sender(KafkaSettings(bootstrap_servers=kafka_bootstrap), acc, lambda t: profile, lambda *a: None)
        await asyncio.wait_for(sender.start(), 15)
        t0 = time.monotonic()
        try:
            with pytest.raises(UnknownTopicOrPartitionError):
                await sender.partitions_for(f"no-such-topic-{random.getrandbits(32):08x}", timeout=2.0)
            return time.monotonic() - t0
        finally:
            await sender.close(1)

    elapsed = uvloop.run(main())
    assert elapsed < 5.0
