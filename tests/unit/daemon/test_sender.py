"""Sender behaviour against an in-process broker double (retries, ordering, idempotence, timeouts).

Delivery itself is proven against real Kafka in tests/integration/test_sender.py; this double
exists to force the error paths a healthy broker never takes. It speaks the wire protocol through
the codec's request decoders and response encoders.
"""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import Callable
from typing import Any

import pytest

from daemon.config import KafkaSettings, Profile
from daemon.protocol import errors as ec
from daemon.protocol import messages as m
from daemon.sender import Sender

TOPIC = "t"


class FakeBatch:
    """Stand-in for accumulator.Batch: payload bytes whose first 8 bytes say which batch it is."""

    def __init__(self, n: int, partition: int, profile: Profile, records: int = 10) -> None:
        self.topic = TOPIC
        self.partition = partition
        self.profile = profile
        self.record_count = records
        self.runs = [(1, records)]
        self.created_ms = asyncio.get_running_loop().time() * 1000  # monotonic, like the sender
        self.producer_id = self.producer_epoch = self.base_sequence = -1
        self.attempts = 0
        self.n = n
        self._buf = bytearray(struct.pack(">qqhi", n, -1, -1, -1)) + b"x" * 50
        self.size = len(self._buf)

    def stamp(self, producer_id: int, producer_epoch: int, base_sequence: int) -> None:
        self.producer_id, self.producer_epoch, self.base_sequence = producer_id, producer_epoch, base_sequence
        struct.pack_into(">qhi", self._buf, 8, producer_id, producer_epoch, base_sequence)

    def payload(self) -> memoryview:
        return memoryview(self._buf)


class FakeAccumulator:
    def __init__(self) -> None:
        self.pending: list[FakeBatch] = []
        self.released: list[FakeBatch] = []
        self.outstanding = 0
        self.splittable = False  # split() cuts batches in halves (numbered from 1,000,000)
        self.halves: dict[int, tuple[int, int]] = {}  # batch number -> its halves' numbers
        self._next_n = 1_000_000

    def split(self, batch: FakeBatch) -> list[FakeBatch] | None:
        if not self.splittable or batch.record_count < 2:
            return None
        first = (batch.record_count + 1) // 2
        halves = [FakeBatch(self._next_n + i, batch.partition, batch.profile, records=r)
                  for i, r in enumerate((first, batch.record_count - first))]
        self._next_n += 2
        self.halves[batch.n] = (halves[0].n, halves[1].n)
        self.outstanding += 1  # two halves in, one batch out (released, never completed)
        self.released.append(batch)
        return halves

    def ready(self, now_ms: float) -> list[FakeBatch]:
        out, self.pending = self.pending, []
        return out

    def next_deadline(self) -> float | None:
        return 0.0 if self.pending else None

    def flush(self) -> None:
        pass

    def release(self, batch: FakeBatch) -> None:
        self.released.append(batch)
        self.outstanding -= 1

    @property
    def open_batches(self) -> int:
        return len(self.pending)

    @property
    def buffered_bytes(self) -> int:
        return 0

    def add(self, batch: FakeBatch) -> None:
        self.pending.append(batch)
        self.outstanding += 1


# produce handler: (batch number, pid, epoch, seq, attempt-of-this-batch) -> error code, or None
# to send no answer at all
Handler = Callable[[int, int, int, int, int], int | None]


class FakeBroker:
    """One-node cluster on 127.0.0.1 with a scripted Produce handler."""

    def __init__(self, handler: Handler, partitions: int = 2, versions: dict[int, tuple[int, int]] | None = None) -> None:
        self.handler = handler
        self.partitions = partitions
        self.versions = versions or {k: (0, v[1]) for k, v in m.SUPPORTED_VERSIONS.items()}
        self.port = 0
        self.log: dict[int, list[int]] = {p: [] for p in range(partitions)}  # partition -> batch numbers written
        self.attempts: dict[int, int] = {}
        self.produce_requests: list[tuple[int, list[tuple[int, int, int, int]]]] = []  # (acks, [(batch, pid, epoch, seq)])
        self.init_pid_requests = 0
        self.next_pid = 1000
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for w in self.writers:
            w.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        self.hung = False
        try:
            while True:
                size = struct.unpack(">i", await reader.readexactly(4))[0]
                data = await reader.readexactly(size)
                api_key = struct.unpack_from(">h", data)[0]
                out = self._answer(api_key, data)
                if out is not None and not self.hung:
                    writer.write(out)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _answer(self, api_key: int, data: bytes) -> bytes | None:
        if api_key == m.API_VERSIONS:
            hdr, _ = m.decode_api_versions_request(data)
            keys = [m.ApiVersionRange(k, lo, hi) for k, (lo, hi) in self.versions.items()]
            return m.encode_api_versions_response(hdr.correlation_id, hdr.api_version, m.ApiVersionsResponse(0, keys))
        if api_key == m.METADATA:
            hdr, req = m.decode_metadata_request(data)
            topics = []
            for name in req.topics or []:
                if name == TOPIC:
                    parts = [m.MetadataPartition(0, p, 1, 0, [1], [1], []) for p in range(self.partitions)]
                    topics.append(m.MetadataTopic(0, name, b"\x01" * 16, False, parts))
                else:
                    topics.append(m.MetadataTopic(ec.UNKNOWN_TOPIC_OR_PARTITION, name))
            resp = m.MetadataResponse(0, [m.MetadataBroker(1, "127.0.0.1", self.port)], "c", 1, topics)
            return m.encode_metadata_response(hdr.correlation_id, hdr.api_version, resp)
        if api_key == m.INIT_PRODUCER_ID:
            hdr, _ = m.decode_init_producer_id_request(data)
            self.init_pid_requests += 1
            self.next_pid += 1
            resp = m.InitProducerIdResponse(0, 0, self.next_pid, 0)
            return m.encode_init_producer_id_response(hdr.correlation_id, hdr.api_version, resp)
        if api_key == m.PRODUCE:
            hdr, req = m.decode_produce_request(data)
            results = []
            seen = []
            silent = False
            for t in req.topics:
                for p in t.partitions:
                    n, pid, epoch, seq = struct.unpack_from(">qqhi", p.records)
                    seen.append((n, pid, epoch, seq))
                    attempt = self.attempts.get(n, 0)
                    self.attempts[n] = attempt + 1
                    code = self.handler(n, pid, epoch, seq, attempt)
                    if code is None:
                        # A hung broker: this connection never answers anything again.
                        silent = True
                        self.hung = True
                        code = 0
                    if code == 0:
                        self.log[p.index].append(n)
                    results.append(m.ProducePartitionResponse(p.index, code, len(self.log[p.index]) - 1 if code == 0 else -1))
            self.produce_requests.append((req.acks, seen))
            if req.acks == 0 or silent:
                return None
            resp = m.ProduceResponse([m.ProduceTopicResponse(TOPIC, results)])
            return m.encode_produce_response(hdr.correlation_id, hdr.api_version, resp)
        raise AssertionError(f"unexpected api {api_key}")


def run(coro_fn: Callable[[], Any], timeout: float = 20.0) -> Any:
    async def guarded() -> Any:
        return await asyncio.wait_for(coro_fn(), timeout)

    return asyncio.run(guarded())


class Harness:
    def __init__(self, broker: FakeBroker, **settings: Any) -> None:
        self.broker = broker
        self.acc = FakeAccumulator()
        self.done: list[tuple[int, int, int]] = []  # (batch n, code, base offset)
        self.settings = KafkaSettings(bootstrap_servers=f"127.0.0.1:{broker.port}", reconnect_backoff_ms=10, **settings)
        self.sender = Sender(self.settings, self.acc, lambda t: Profile(), self._on_complete)
        self.task: asyncio.Task[None] | None = None

    def _on_complete(self, batch: FakeBatch, code: int, base_offset: int, ts: int) -> None:
        self.done.append((batch.n, code, base_offset))

    async def __aenter__(self) -> Harness:
        await self.sender.start()
        self.task = asyncio.get_running_loop().create_task(self.sender.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.sender.close(2)
        assert self.task is not None
        await asyncio.wait_for(self.task, 2)

    def send(self, batches: list[FakeBatch]) -> None:
        for b in batches:
            self.acc.add(b)
        self.sender.wakeup()


def fast_profile(**kw: Any) -> Profile:
    base = dict(acks=-1, enable_idempotence=True, retry_backoff_ms=5, retry_backoff_max_ms=20,
                delivery_timeout_ms=5_000, request_timeout_ms=5_000)
    base.update(kw)
    return Profile(**base)


def scenario(handler: Handler, body: Callable[[Harness], Any], **settings: Any) -> tuple[Harness, FakeBroker]:
    async def main() -> tuple[Harness, FakeBroker]:
        broker = FakeBroker(handler)
        await broker.start()
        try:
            async with Harness(broker, **settings) as hs:
                await body(hs)
            return hs, broker
        finally:
            await broker.stop()

    return run(main)


def test_retriable_error_is_retried_in_order_and_completed_once() -> None:
    # batch 0 gets NOT_LEADER_OR_FOLLOWER twice; later batches of the same partition must not overtake it
    def handler(n: int, pid: int, epoch: int, seq: int, attempt: int) -> int:
        if n == 0 and attempt < 2:
            return ec.NOT_LEADER_OR_FOLLOWER
        return 0

    async def body(hs: Harness) -> None:
        prof = fast_profile(acks=1, enable_idempotence=False)
        hs.send([FakeBatch(i, 0, prof) for i in range(4)])
        assert await hs.sender.flush(5)

    hs, broker = scenario(handler, body)
    assert broker.log[0] == [0, 1, 2, 3]
    assert sorted(hs.done) == [(0, 0, 0), (1, 0, 1), (2, 0, 2), (3, 0, 3)]
    assert hs.sender.stats["retries"] == 2
    assert len(hs.acc.released) == 4 and hs.acc.outstanding == 0


def test_non_retriable_error_fails_at_once() -> None:
    async def body(hs: Harness) -> None:
        hs.send([FakeBatch(7, 1, fast_profile(acks=1, enable_idempotence=False))])
        assert await hs.sender.flush(5)

    hs, broker = scenario(lambda *a: ec.CODE_BY_NAME["RECORD_LIST_TOO_LARGE"], body)
    assert hs.done == [(7, ec.CODE_BY_NAME["RECORD_LIST_TOO_LARGE"], -1)]
    assert broker.attempts[7] == 1
    assert hs.sender.stats["errors"] == {"RECORD_LIST_TOO_LARGE": 1}


def test_batch_too_large_for_the_topic_says_which_setting_to_change(caplog) -> None:
    async def body(hs: Harness) -> None:
        prof = fast_profile(acks=1, enable_idempotence=False, batch_size=4096)
        hs.send([FakeBatch(i, 0, prof, records=10) for i in range(3)] + [FakeBatch(9, 1, prof, records=1)])
        assert await hs.sender.flush(5)

    with caplog.at_level("WARNING", logger="daemon.sender"):
        hs, _ = scenario(lambda *a: ec.MESSAGE_TOO_LARGE, body)
    assert sorted(hs.done) == [(i, ec.MESSAGE_TOO_LARGE, -1) for i in (0, 1, 2, 9)]
    hints = [r.getMessage() for r in caplog.records if "max.message.bytes" in r.getMessage()]
    assert len(hints) == 1, "once per topic"
    assert "batch of 10 records" in hints[0] and "batch_size (4096)" in hints[0]


def test_retriable_errors_stop_at_the_delivery_timeout() -> None:
    async def body(hs: Harness) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        hs.send([FakeBatch(1, 0, fast_profile(delivery_timeout_ms=300))])
        assert await hs.sender.flush(5)
        assert 0.25 <= loop.time() - t0 < 2.0

    hs, broker = scenario(lambda *a: ec.CODE_BY_NAME["NOT_ENOUGH_REPLICAS"], body)
    assert hs.done == [(1, ec.REQUEST_TIMED_OUT, -1)]
    assert broker.attempts[1] > 3  # it did retry, with backoff, until the deadline


def test_records_for_a_broker_given_up_on_after_an_authentication_failure_say_so() -> None:
    async def body(hs: Harness) -> None:
        prof = fast_profile(acks=1, enable_idempotence=False, delivery_timeout_ms=300)
        hs.send([FakeBatch(1, 0, prof)])
        assert await hs.sender.flush(5)
        # The connection drops; reconnecting then fails authentication, and ConnectionPool._connect
        # gives the broker up (as on a BrokerAuthError).
        pool = hs.sender._connections
        node = hs.sender._metadata.leader(TOPIC, 0)
        for conn in pool.connections():
            conn.close()
        await asyncio.sleep(0.05)
        pool.fatal[node] = "broker 0: SASL SCRAM-SHA-512 authentication failed: wrong password"
        pool._reconnect_at[node] = math.inf
        hs.send([FakeBatch(2, 0, prof)])
        assert await hs.sender.flush(5)

    hs, _ = scenario(lambda *a: 0, body)
    assert hs.done == [(1, 0, 0), (2, ec.CODE_BY_NAME["SASL_AUTHENTICATION_FAILED"], -1)]


def test_idempotent_batches_are_stamped_once_and_resent_with_the_same_bytes() -> None:
    def handler(n: int, pid: int, epoch: int, seq: int, attempt: int) -> int:
        return ec.NOT_LEADER_OR_FOLLOWER if n == 1 and attempt == 0 else 0

    async def body(hs: Harness) -> None:
        hs.send([FakeBatch(i, 0, fast_profile(), records=10) for i in range(3)])
        assert await hs.sender.flush(5)

    hs, broker = scenario(handler, body)
    sent = [s for _, req in broker.produce_requests for s in req]
    stamps = {}
    for n, pid, epoch, seq in sent:
        stamps.setdefault(n, set()).add((pid, epoch, seq))
    assert stamps == {0: {(1001, 0, 0)}, 1: {(1001, 0, 10)}, 2: {(1001, 0, 20)}}
    assert broker.init_pid_requests == 1
    assert all(code == 0 for _, code, _ in hs.done) and len(hs.done) == 3


def test_out_of_order_behind_a_retried_batch_is_retried_not_failed() -> None:
    # batch 0 fails retriably once; batch 1 (sent behind it) sees OUT_OF_ORDER while 0 is pending
    def handler(n: int, pid: int, epoch: int, seq: int, attempt: int) -> int:
        if n == 0 and attempt == 0:
            return ec.NOT_LEADER_OR_FOLLOWER
        if n == 1 and attempt == 0:
            return ec.OUT_OF_ORDER_SEQUENCE_NUMBER
        return 0

    async def body(hs: Harness) -> None:
        # Batch 9 opens the producer's sequence on the partition (a first batch travels alone).
        hs.send([FakeBatch(9, 0, fast_profile())])
        assert await hs.sender.flush(5)
        hs.send([FakeBatch(0, 0, fast_profile()), FakeBatch(1, 0, fast_profile())])
        assert await hs.sender.flush(5)

    hs, broker = scenario(handler, body)
    assert sorted(c for _, c, _ in hs.done) == [0, 0, 0]
    assert broker.log[0] == [9, 0, 1]
    assert broker.attempts == {9: 1, 0: 2, 1: 2}, "batch 1 went beside batch 0 and was refused once"


def test_gap_after_a_failed_batch_restamps_the_next_under_a_new_producer_id() -> None:
    # batch 0 is refused for good; batch 1 (same partition) then sees OUT_OF_ORDER under the old id
    def handler(n: int, pid: int, epoch: int, seq: int, attempt: int) -> int:
        if n == 0:
            return ec.MESSAGE_TOO_LARGE
        if pid == 1001:
            return ec.OUT_OF_ORDER_SEQUENCE_NUMBER
        return 0

    async def body(hs: Harness) -> None:
        hs.send([FakeBatch(0, 0, fast_profile()), FakeBatch(1, 0, fast_profile())])
        assert await hs.sender.flush(5)

    hs, broker = scenario(handler, body)
    assert sorted(hs.done) == [(0, ec.MESSAGE_TOO_LARGE, -1), (1, 0, 0)]
    last = [s for _, req in broker.produce_requests for s in req if s[0] == 1][-1]
    assert last[1:] == (1002, 0, 0), "re-stamped at sequence 0 under the new producer id"
    assert broker.init_pid_requests == 2


class KafkaSequenceRules:
    """Produce handler that validates sequences the way a Kafka broker does (10 records a batch).

    A producer the partition has no state for is accepted at any first sequence (Kafka 2.5+,
    which lets a producer whose state expired go on); after that the next batch must start
    right after the last one, or it is a duplicate of a cached batch, or OUT_OF_ORDER. The
    partition is refused (NOT_LEADER_OR_FOLLOWER) for its first ``refusals`` requests, as a
    freshly created partition can be.
    """

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.last_seq: dict[int, int] = {}  # pid -> last sequence written
        self.written: dict[int, int] = {}  # batch number -> first sequence

    def __call__(self, n: int, pid: int, epoch: int, seq: int, attempt: int) -> int:
        if self.refusals:
            self.refusals -= 1
            return ec.NOT_LEADER_OR_FOLLOWER
        if self.written.get(n) == seq:
            return ec.DUPLICATE_SEQUENCE_NUMBER
        last = self.last_seq.get(pid)
        if last is not None and seq != last + 1:
            return ec.OUT_OF_ORDER_SEQUENCE_NUMBER
        self.last_seq[pid] = seq + 9
        self.written[n] = seq
        return 0


def test_first_batch_of_a_producer_travels_alone_so_a_refusal_cannot_reorder() -> None:
    # CI saw this on a new topic: batch 0 (sequence 0) refused with NOT_LEADER_OR_FOLLOWER while
    # batches 1-4 were in flight; the broker, not knowing the producer yet, wrote batch 1 at
    # sequence 10, and the retry of batch 0 then failed OUT_OF_ORDER: records lost, order broken.
    rules = KafkaSequenceRules(refusals=2)

    async def body(hs: Harness) -> None:
        hs.send([FakeBatch(i, 0, fast_profile()) for i in range(6)])
        assert await hs.sender.flush(5)

    hs, broker = scenario(rules, body)
    assert sorted(hs.done) == [(i, 0, i) for i in range(6)]
    assert broker.log[0] == [0, 1, 2, 3, 4, 5]
    assert hs.sender.stats["errors"] == {}
    # Nothing went out beside batch 0 until it was written; after that the pipeline opens up.
    order = [n for _, req in broker.produce_requests for n, *_ in req]
    assert order[:3] == [0, 0, 0]


def test_unexplained_out_of_order_fails_the_batch() -> None:
    async def body(hs: Harness) -> None:
        hs.send([FakeBatch(5, 1, fast_profile())])
        assert await hs.sender.flush(5)

    hs, _ = scenario(lambda n, pid, e, s, a: ec.OUT_OF_ORDER_SEQUENCE_NUMBER if a == 0 else 0, body)
    assert hs.done == [(5, ec.OUT_OF_ORDER_SEQUENCE_NUMBER, -1)]


def test_duplicate_sequence_counts_as_success() -> None:
    async def body(hs: Harness) -> None:
        hs.send([FakeBatch(3, 0, fast_profile())])
        assert await hs.sender.flush(5)

    hs, _ = scenario(lambda *a: ec.DUPLICATE_SEQUENCE_NUMBER, body)
    assert hs.done == [(3, 0, -1)]


def test_unanswered_request_times_out_and_is_retried_on_a_new_connection() -> None:
    def handler(n: int, pid: int, epoch: int, seq: int, attempt: int) -> int | None:
        return None if attempt == 0 else 0

    async def body(hs: Harness) -> None:
        # request_timeout 200 ms (+1 s grace for the broker's own timeout)
        hs.send([FakeBatch(9, 0, fast_profile(request_timeout_ms=200, delivery_timeout_ms=10_000))])
        assert await hs.sender.flush(8)

    hs, broker = scenario(handler, body)
    assert hs.done == [(9, 0, 1)]
    assert broker.connections >= 2 and hs.sender.stats["reconnects"] >= 1
    assert hs.sender.stats["errors"] == {} and hs.sender.stats["retries"] == 1
    assert broker.log[0] == [9, 9]  # written twice: the double does not deduplicate


def test_acks_zero_completes_without_a_response_and_separately_from_acks_one() -> None:
    async def body(hs: Harness) -> None:
        hs.send([FakeBatch(1, 0, fast_profile(acks=0, enable_idempotence=False)),
                 FakeBatch(2, 1, fast_profile(acks=1, enable_idempotence=False))])
        assert await hs.sender.flush(5)

    hs, broker = scenario(lambda *a: 0, body)
    assert sorted(hs.done) == [(1, 0, -1), (2, 0, 0)]
    assert sorted((acks, len(req)) for acks, req in broker.produce_requests) == [(0, 1), (1, 1)]


def test_dropped_connection_fails_in_flight_as_retriable_and_redelivers() -> None:
    async def body(hs: Harness) -> None:
        hs.sender.wakeup()
        hs.send([FakeBatch(i, i % 2, fast_profile()) for i in range(6)])
        await asyncio.sleep(0)
        for w in hs.broker.writers:
            w.transport.abort()
        assert await hs.sender.flush(8)

    hs, broker = scenario(lambda *a: 0, body)
    assert sorted(n for n, c, _ in hs.done if c == 0) == list(range(6))
    assert len(hs.done) == 6


def test_unknown_topic_raises_the_generated_error() -> None:
    async def body(hs: Harness) -> None:
        with pytest.raises(ec.KafkaError) as info:
            await hs.sender.partitions_for("nope", timeout=0.3)
        assert info.value.name == "UNKNOWN_TOPIC_OR_PARTITION"
        assert type(info.value).__name__ == "UnknownTopicOrPartitionError"
        assert await hs.sender.partitions_for(TOPIC) == 2

    scenario(lambda *a: 0, body)


def test_no_common_version_is_refused_clearly() -> None:
    async def main() -> None:
        broker = FakeBroker(lambda *a: 0, versions={**{k: (0, v[1]) for k, v in m.SUPPORTED_VERSIONS.items()}, m.PRODUCE: (3, 8)})
        await broker.start()
        try:
            hs = Harness(broker)
            with pytest.raises(m.UnsupportedVersionError, match="Produce"):
                await hs.sender.start()
            await hs.sender.close(0.1)
        finally:
            await broker.stop()

    run(main)


def _adopt_scenario(handler: Handler, old: int, new: int) -> tuple[Harness, FakeBroker]:
    """A dead worker's ``old`` stamped batches (producer 77, epoch 3, sequences 100, 105, ...)
    adopted before the sender runs, then ``new`` fresh batches of the same partition."""

    async def main() -> tuple[Harness, FakeBroker]:
        broker = FakeBroker(handler)
        await broker.start()
        try:
            hs = Harness(broker)
            prof = fast_profile()
            adopted = [FakeBatch(i, 0, prof, records=5) for i in range(old)]
            for i, b in enumerate(adopted):
                b.stamp(77, 3, 100 + 5 * i)
                hs.acc.outstanding += 1
            hs.sender.adopt(adopted)
            async with hs:
                hs.send([FakeBatch(10 + i, 0, prof, records=5) for i in range(new)])
                assert await hs.sender.flush(5)
            return hs, broker
        finally:
            await broker.stop()

    return run(main)


def test_adopted_batches_go_first_with_their_own_stamps_then_new_ones_under_a_new_id() -> None:
    hs, broker = _adopt_scenario(lambda *a: 0, old=3, new=2)
    sent = [s for _, req in broker.produce_requests for s in req]
    assert [s[0] for s in sent] == [0, 1, 2, 10, 11]
    assert sent[:3] == [(0, 77, 3, 100), (1, 77, 3, 105), (2, 77, 3, 110)]  # byte for byte
    assert [s[1:] for s in sent[3:]] == [(1001, 0, 0), (1001, 0, 5)]
    assert broker.log[0] == [0, 1, 2, 10, 11]
    assert sorted(n for n, code, _ in hs.done if code == 0) == [0, 1, 2, 10, 11]
    assert hs.acc.outstanding == 0


def test_adopted_batch_refused_out_of_order_is_restamped_under_the_new_id() -> None:
    # The broker never saw producer 77's earlier sequences: an OUT_OF_ORDER answer proves the
    # adopted batch was not written, so it goes again under this sender's own producer id.
    def handler(n: int, pid: int, epoch: int, seq: int, attempt: int) -> int:
        return ec.OUT_OF_ORDER_SEQUENCE_NUMBER if pid == 77 else 0

    hs, broker = _adopt_scenario(handler, old=2, new=1)
    assert broker.log[0] == [0, 1, 10]
    assert sorted(n for n, code, _ in hs.done if code == 0) == [0, 1, 10]
    last = {n: (pid, seq) for _, req in broker.produce_requests for n, pid, _e, seq in req}
    assert last == {0: (1001, 0), 1: (1001, 5), 10: (1001, 10)}


def test_a_batch_too_large_is_split_in_halves_that_take_its_sequences() -> None:
    # The broker takes at most 3 records a batch and applies Kafka's sequence rule; batches of
    # 10, 3 and 7 records go out together, so the second is in flight when the first is refused.
    counts: dict[int, int] = {}
    last_seq: dict[int, int] = {}
    written: list[int] = []

    def handler(n: int, pid: int, epoch: int, seq: int, attempt: int) -> int:
        if counts[n] > 3:
            return ec.MESSAGE_TOO_LARGE
        if pid in last_seq and seq != last_seq[pid]:
            return ec.OUT_OF_ORDER_SEQUENCE_NUMBER
        last_seq[pid] = seq + counts[n]
        written.append(n)
        return 0

    async def body(hs: Harness) -> None:
        hs.acc.splittable = True
        real_split = hs.acc.split

        def split(batch: FakeBatch) -> list[FakeBatch] | None:
            halves = real_split(batch)
            for h in halves or ():
                counts[h.n] = h.record_count
            return halves

        hs.acc.split = split  # type: ignore[method-assign]
        batches = [FakeBatch(n, 0, fast_profile(), records=r) for n, r in ((1, 10), (2, 3), (3, 7))]
        counts.update({b.n: b.record_count for b in batches})
        hs.send(batches)
        assert await hs.sender.flush(5)

    hs, broker = scenario(handler, body)

    def leaves(n: int) -> list[int]:
        return [leaf for h in hs.acc.halves[n] for leaf in leaves(h)] if n in hs.acc.halves else [n]

    expected = leaves(1) + leaves(2) + leaves(3)
    assert written == expected == broker.log[0]
    assert sum(counts[n] for n in written) == 20
    assert [n for n, code, _ in hs.done] == expected and all(code == 0 for _, code, _ in hs.done)
    assert hs.sender.stats["splits"] == len(hs.acc.halves) > 0
    assert hs.acc.outstanding == 0


def test_a_single_record_too_large_fails_and_the_rest_of_its_batch_is_delivered() -> None:
    big = 1_000_001  # the second half of batch 1: its single record is too large

    def handler(n: int, pid: int, epoch: int, seq: int, attempt: int) -> int:
        return ec.MESSAGE_TOO_LARGE if n in (1, big) else 0

    async def body(hs: Harness) -> None:
        hs.acc.splittable = True
        hs.send([FakeBatch(1, 0, fast_profile(), records=2)])
        assert await hs.sender.flush(5)

    hs, broker = scenario(handler, body)
    assert hs.done == [(1_000_000, 0, 0), (big, ec.MESSAGE_TOO_LARGE, -1)]
    assert broker.log[0] == [1_000_000]
