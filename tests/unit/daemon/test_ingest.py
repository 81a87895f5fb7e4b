"""daemon.ingest: SocketIngest with a scripted producer whose outcomes arrive on another thread.

The producer stands in for shm.Producer (tests/integration/test_socket_ingest.py drives the
real one through a real daemon): lookups, a full ring, Kafka errors and delivery outcomes are
scripted, so the replies SocketIngest builds from them are checked exactly.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from daemon.ingest import FrameReader, PackedProduce, SocketIngest
from daemon.protocol.errors import MESSAGE_TOO_LARGE, UNKNOWN_TOPIC_OR_PARTITION
from shm import control
from shm.errors import BufferFullError, KafkaError, ProtocolError, SluiceError
from shm.futures import DeliveryFuture, DeliveryTally


class ProducerClosedError(SluiceError):
    """What the producer's futures fail with when it closes before their outcome."""


Outcome = DeliveryFuture  # the real future: acks are encoded from its slots in compiled code


class Producer:
    def __init__(self, on_full: str = "drop", max_block_ms: int = 60_000) -> None:
        self.on_full = on_full
        self.max_block_ms = max_block_ms
        self.lookups: list[str] = []
        self.full_for = 0  # the next this-many send() calls find the ring full
        self.refuse: dict[bytes, KafkaError] = {}  # value -> error raised before the ring
        self.sent: list[Outcome] = []

    def lookup(self, topic: str) -> control.TopicInfo:
        assert threading.current_thread() is not threading.main_thread()  # never on the loop
        self.lookups.append(topic)
        if topic == "nope":
            raise KafkaError.for_code(UNKNOWN_TOPIC_OR_PARTITION)
        return control.TopicInfo(
            topic=topic, topic_id=0, partitions=4, profile="p", max_request_size=1 << 20,
            on_full=self.on_full, max_block_ms=self.max_block_ms, batch_size=16384, linger_ms=5,
        )

    def send(self, topic: str, value: bytes, key: bytes | None, **kw: Any) -> Outcome:
        if self.full_for:
            self.full_for -= 1
            raise BufferFullError("ring full")
        if value in self.refuse:
            raise self.refuse[value]
        fut = Outcome(topic, kw["partition"] if kw["partition"] is not None else len(self.sent) % 4, 1_000 + len(self.sent))
        self.sent.append(fut)
        return fut

    def send_records(self, topic: str, records: list[Any], start: int,
                     tally: DeliveryTally | None = None) -> tuple[int, list[Outcome]]:
        """As shm.Producer.send_records: the records send() would take without raising, in
        one call; it stops before the first that would raise (the caller sends that one).
        With a tally, no futures come back and the tally counts the outcomes (here through
        the futures this stand-in keeps for complete())."""
        futs = []
        i = start
        while i < len(records) and not self.full_for and records[i].value not in self.refuse:
            r = records[i]
            futs.append(self.send(topic, r.value, r.key, partition=r.partition))
            i += 1
        if tally is not None:
            for f in futs:
                f.add_done_callback(tally.settle_future)
            return i, []
        return i, futs

    def send_packed(self, topic: str, body: Any, at: int, start: int, count: int,
                    tally: DeliveryTally | None = None) -> tuple[int, int, list[Outcome]]:
        """As shm.Producer.send_packed: send_records() of the part's records. Where it stops
        short, the offset is left as it was (ingest decodes the part then, and never uses it)."""
        nxt, futs = self.send_records(topic, PackedProduce.records_of(body), start, tally)
        return nxt, at if nxt < count else len(body), futs

    def complete(self, outcomes: Callable[[int, Outcome], None]) -> None:
        """Settle every sent record from another thread, as the completion thread does."""

        def run() -> None:
            for i, fut in enumerate(self.sent):
                outcomes(i, fut)

        t = threading.Thread(target=run)
        t.start()
        t.join()


def _delivered(i: int, fut: Outcome) -> None:
    fut.resolve(100 + i)


class Client:
    """The connection's side (daemon.ingest.Origin): what the server would write to it, and
    the outcomes it is told of."""

    def __init__(self) -> None:
        self.replies: list[Any] = []
        self.pending: set[asyncio.Future[Any]] = set()
        self.settled_records = 0
        self.failed = 0

    def reply(self, msg: Any) -> None:
        """As the wire has it: encoded, then decoded as a client does."""
        (got,) = control.FrameReader(control.DaemonMessage).feed(control.encode(msg))
        self.replies.append(got)

    def settled(self, records: int, failed: int) -> None:
        self.settled_records += records
        self.failed += failed

    def track(self, fut: asyncio.Future[Any] | None) -> None:
        if fut is not None:
            self.pending.add(fut)
            fut.add_done_callback(self.pending.discard)


async def _lookup(topic: str) -> control.TopicInfo:
    """The daemon's lookup (daemon/lookups.py): Kafka has every topic but "nope"."""
    if topic == "nope":
        raise KafkaError.for_code(UNKNOWN_TOPIC_OR_PARTITION)
    return control.TopicInfo(topic=topic, topic_id=0, partitions=4, profile="p", max_request_size=1 << 20,
                             on_full="block", max_block_ms=0, batch_size=16384, linger_ms=5)


def _recs(*values: bytes, partition: int | None = None) -> list[control.Rec]:
    return [control.Rec(value=v, partition=partition) for v in values]


@pytest.fixture(autouse=True, params=["decoded", "packed"])
def _form(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test runs with Produce frames as msgspec decodes them and as the daemon's reader
    hands over plain ones (packed: records still msgpack)."""
    global _PACKED
    _PACKED = request.param == "packed"
    yield
    _PACKED = False


_PACKED = False


async def _produce(ingest: SocketIngest, msg: control.Produce, origin: Any) -> asyncio.Future[None] | None:
    if _PACKED:
        (msg,) = FrameReader().feed(control.encode(msg))  # type: ignore[assignment]
        assert isinstance(msg, PackedProduce)
    return await ingest.produce(msg, origin)


def _ingest(producer: Producer) -> SocketIngest:
    ingest = SocketIngest(_lookup)
    ingest.attach(producer)
    return ingest


def test_acknowledged_produce_answers_every_record_in_order() -> None:
    async def main() -> None:
        p = Producer()
        p.refuse[b"big"] = KafkaError.for_code(MESSAGE_TOO_LARGE)
        ingest, c = _ingest(p), Client()
        c.track(await _produce(ingest, control.Produce(topic="t", records=_recs(b"a", b"big", b"c"), ack=True, seq=5), c))
        assert c.replies == [] and len(c.pending) == 1  # waiting for the outcomes
        p.complete(_delivered)
        await asyncio.wait_for(asyncio.gather(*c.pending), 5)
        (ack,) = c.replies
        assert ack.seq == 5
        r = ack.results
        assert (r[0].partition, r[0].offset, r[0].timestamp, r[0].error_code) == (0, 100, 1_000, 0)
        assert (r[1].offset, r[1].error_code, r[1].error_name) == (-1, MESSAGE_TOO_LARGE, "MESSAGE_TOO_LARGE")
        assert r[1].partition == -1  # none asked, none chosen
        assert (r[2].partition, r[2].offset, r[2].error_code) == (1, 101, 0)
        assert not c.pending
        assert (c.settled_records, c.failed) == (3, 1)
        assert ingest.refused.snapshot() == {"t": {"MESSAGE_TOO_LARGE": 1}}

    asyncio.run(main())


def test_failed_and_closed_outcomes_are_reported_per_record() -> None:
    async def main() -> None:
        p = Producer()
        ingest, c = _ingest(p), Client()
        c.track(await _produce(ingest, control.Produce(topic="t", records=_recs(b"a", b"b", partition=3), ack=True, seq=1), c))

        def outcomes(i: int, fut: Outcome) -> None:
            fut.resolve(KafkaError.for_code(MESSAGE_TOO_LARGE) if i == 0 else ProducerClosedError("closed"))

        p.complete(outcomes)
        await asyncio.wait_for(asyncio.gather(*c.pending), 5)
        (ack,) = c.replies
        assert [(x.partition, x.error_code) for x in ack.results] == [(3, MESSAGE_TOO_LARGE), (3, control.ERR_OUTCOME_UNKNOWN)]
        assert ack.results[1].error_name == "OUTCOME_UNKNOWN"
        assert (c.settled_records, c.failed) == (2, 2)
        assert ingest.refused.snapshot() == {}  # failed after the ring: the workers count those

    asyncio.run(main())


def test_unknown_topic_fails_the_whole_frame() -> None:
    async def main() -> None:
        ingest, c = _ingest(Producer()), Client()
        c.track(await _produce(ingest, control.Produce(topic="nope", records=_recs(b"a", b"b"), ack=True, seq=2), c))
        (ack,) = c.replies
        assert [(x.partition, x.error_code) for x in ack.results] == [(-1, UNKNOWN_TOPIC_OR_PARTITION)] * 2
        # Without ack nothing is answered, ever; the failure is counted for the connection
        # (FlushDone.failed) and per topic.
        c.track(await _produce(ingest, control.Produce(topic="nope", records=_recs(b"a")), c))
        assert len(c.replies) == 1 and not c.pending
        assert (c.settled_records, c.failed) == (3, 3)
        assert ingest.refused.snapshot() == {"nope": {"UNKNOWN_TOPIC_OR_PARTITION": 3}}

    asyncio.run(main())


def test_topic_is_looked_up_once() -> None:
    async def main() -> None:
        p = Producer()
        ingest, c = _ingest(p), Client()
        for _ in range(3):
            c.track(await _produce(ingest, control.Produce(topic="t", records=_recs(b"a")), c))
        assert p.lookups == ["t"]

    asyncio.run(main())


def test_full_ring_under_drop_answers_buffer_full() -> None:
    async def main() -> None:
        p = Producer(on_full="drop")
        p.full_for = 1
        ingest, c = _ingest(p), Client()
        c.track(await _produce(ingest, control.Produce(topic="t", records=_recs(b"a", b"b"), ack=True), c))
        p.complete(_delivered)
        await asyncio.wait_for(asyncio.gather(*c.pending), 5)
        (ack,) = c.replies
        assert [x.error_code for x in ack.results] == [control.ERR_BUFFER_FULL, 0]
        assert len(p.sent) == 1

    asyncio.run(main())


@pytest.mark.parametrize(("max_block_ms", "delivered"), [(60_000, 1), (0, 0)])
def test_full_ring_under_block_retries_until_max_block(max_block_ms: int, delivered: int) -> None:
    async def main() -> None:
        p = Producer(on_full="block", max_block_ms=max_block_ms)
        p.full_for = 3
        ingest, c = _ingest(p), Client()
        c.track(await _produce(ingest, control.Produce(topic="t", records=_recs(b"a"), ack=True), c))
        assert len(p.sent) == delivered
        p.complete(_delivered)
        await asyncio.wait_for(asyncio.gather(*c.pending), 5)
        (ack,) = c.replies
        assert ack.results[0].error_code == (0 if delivered else control.ERR_BUFFER_FULL)

    asyncio.run(main())


def test_unacknowledged_produce_is_pending_until_its_outcomes() -> None:
    async def main() -> None:
        p = Producer()
        ingest, c = _ingest(p), Client()
        c.track(await _produce(ingest, control.Produce(topic="t", records=_recs(b"a", b"b")), c))
        (waiter,) = c.pending
        await asyncio.sleep(0.01)
        assert not waiter.done()
        p.sent[0].resolve(1)
        await asyncio.sleep(0.01)
        assert not waiter.done()  # one record still out
        p.complete(lambda i, f: f.done() or _delivered(i, f))
        await asyncio.wait_for(waiter, 5)
        assert c.replies == [] and not c.pending

    asyncio.run(main())


def test_produce_before_the_producer_is_attached_waits_for_it() -> None:
    async def main() -> None:
        ingest, c = SocketIngest(_lookup), Client()
        task = asyncio.create_task(ingest.produce(control.Produce(topic="t", records=_recs(b"a")), c))
        await asyncio.sleep(0.02)
        assert not task.done()
        p = Producer()
        ingest.attach(p)
        await asyncio.wait_for(task, 5)
        assert len(p.sent) == 1

    asyncio.run(main())


def test_partition_out_of_range_names_the_partition_asked_for() -> None:
    async def main() -> None:
        p = Producer()
        p.refuse[b"bad"] = KafkaError.for_code(UNKNOWN_TOPIC_OR_PARTITION)
        ingest, c = _ingest(p), Client()
        recs = [control.Rec(value=b"bad", partition=7), control.Rec(value=b"ok", partition=1)]
        c.track(await _produce(ingest, control.Produce(topic="t", records=recs, ack=True, seq=3), c))
        p.complete(_delivered)
        await asyncio.wait_for(asyncio.gather(*c.pending), 5)
        (ack,) = c.replies
        assert [(x.partition, x.error_code) for x in ack.results] == [(7, UNKNOWN_TOPIC_OR_PARTITION), (1, 0)]

    asyncio.run(main())


def test_unacknowledged_failures_after_the_ring_are_counted() -> None:
    async def main() -> None:
        p = Producer()
        ingest, c = _ingest(p), Client()
        c.track(await _produce(ingest, control.Produce(topic="t", records=_recs(b"a", b"b", b"c")), c))
        p.complete(lambda i, f: f.resolve(KafkaError.for_code(MESSAGE_TOO_LARGE)) if i == 1 else _delivered(i, f))
        await asyncio.wait_for(asyncio.gather(*c.pending), 5)
        assert c.replies == [] and (c.settled_records, c.failed) == (3, 1)

    asyncio.run(main())


def test_stopping_refuses_records_waiting_for_room() -> None:
    async def main() -> None:
        p = Producer(on_full="block", max_block_ms=60_000)
        p.full_for = 10**9
        ingest, c = _ingest(p), Client()
        task = asyncio.create_task(ingest.produce(control.Produce(topic="t", records=_recs(b"a", b"b"), ack=True, seq=1), c))
        await asyncio.sleep(0.05)
        assert not task.done()  # waiting for room
        ingest.stop()
        assert await asyncio.wait_for(task, 5) is None
        (ack,) = c.replies
        assert [x.error_name for x in ack.results] == ["SHUTTING_DOWN"] * 2
        assert ingest.refused.snapshot() == {"t": {"SHUTTING_DOWN": 2}}

    asyncio.run(main())


def test_give_up_answers_unfinished_records_as_outcome_unknown() -> None:
    async def main() -> None:
        p = Producer()
        ingest, c = _ingest(p), Client()
        c.track(await _produce(ingest, control.Produce(topic="t", records=_recs(b"a", b"b", partition=2), ack=True, seq=8), c))
        p.sent[0].resolve(5)
        ingest.give_up()
        await asyncio.wait_for(asyncio.gather(*c.pending), 5)
        (ack,) = c.replies
        assert [(x.offset, x.error_name) for x in ack.results] == [(5, "NONE"), (-1, "OUTCOME_UNKNOWN")]
        assert (c.settled_records, c.failed) == (2, 1)

    asyncio.run(main())


def test_a_closed_producer_refuses_with_shutting_down() -> None:
    async def main() -> None:
        p = Producer()
        p.refuse[b"late"] = ProducerClosedError("the producer is closed")  # type: ignore[assignment]
        ingest, c = _ingest(p), Client()
        c.track(await _produce(ingest, control.Produce(topic="t", records=_recs(b"late"), ack=True, seq=4), c))
        (ack,) = c.replies
        assert [(x.error_code, x.error_name) for x in ack.results] == [(control.ERR_SHUTTING_DOWN, "SHUTTING_DOWN")]
        assert (c.settled_records, c.failed) == (1, 1)

    asyncio.run(main())


def test_give_up_counts_the_unfinished_records_of_a_frame_without_ack_as_failed() -> None:
    async def main() -> None:
        p = Producer()
        ingest, c = _ingest(p), Client()
        c.track(await _produce(ingest, control.Produce(topic="t", records=_recs(b"a", b"b", b"c")), c))
        p.sent[0].resolve(5)
        p.sent[1].resolve(KafkaError.for_code(MESSAGE_TOO_LARGE))
        await asyncio.sleep(0.01)
        assert c.pending and (c.settled_records, c.failed) == (0, 0)  # one record still out
        ingest.give_up()
        await asyncio.wait_for(asyncio.gather(*c.pending), 5)
        assert c.replies == [] and (c.settled_records, c.failed) == (3, 2)

    asyncio.run(main())


# --- the daemon's frame reader ---------------------------------------------------------------


def _stream(rnd: Any) -> tuple[bytes, list[Any]]:
    """Frames of every kind the reader tells apart, and the messages msgspec makes of them."""
    msgs: list[Any] = [control.Hello(version=1, client_name="x")]
    for i in range(60):
        kind = rnd.choice(["plain", "plain", "plain", "acked", "headers", "other-topic", "flush"])
        recs = [control.Rec(value=rnd.randbytes(rnd.choice([0, 10, 300])), key=rnd.choice([None, b"k"]))
                for _ in range(rnd.choice([0, 1, 3, 40]))]
        if kind == "headers" and recs:
            recs[0] = control.Rec(value=b"v", headers=[("h", b"1")])
        if kind == "flush":
            msgs.append(control.Flush(timeout_ms=i))
        else:
            msgs.append(control.Produce(topic="u" if kind == "other-topic" else "t", records=recs,
                                        ack=kind == "acked", seq=i))
    return b"".join(control.encode(m) for m in msgs), msgs


def _expected_runs(msgs: list[Any]) -> list[Any]:
    """What FrameReader yields, by msgspec: runs of plain Produces without ack to one topic
    joined; everything else as it is."""
    out: list[Any] = []
    for m in msgs:
        plain = isinstance(m, control.Produce) and all(r.headers is None for r in m.records)
        if plain and not m.ack and out and isinstance(out[-1], list) and out[-1][0].topic == m.topic:
            out[-1].append(m)
        else:
            out.append([m] if plain and not m.ack else m)
    return out


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_frame_reader_reads_what_msgspec_reads_in_any_chunking_and_joins_runs_without_ack(seed: int) -> None:
    import random

    rnd = random.Random(seed)
    print(f"seed {seed}")
    stream, msgs = _stream(rnd)
    cuts = sorted(rnd.sample(range(1, len(stream)), 40)) if rnd.random() < 0.5 else list(range(1, len(stream), 7))
    got: list[Any] = []
    reader = FrameReader()
    for a, b in zip([0, *cuts], [*cuts, len(stream)]):
        got += reader.feed(stream[a:b])
    # Within one read only: joined runs never span reads, so compare records, in order.
    flat_got = [r for m in got for r in (m.decode().records if isinstance(m, PackedProduce) else
                                         m.records if isinstance(m, control.Produce) else [m])]
    flat_want = [r for m in msgs for r in (m.records if isinstance(m, control.Produce) else [m])]
    assert flat_got == flat_want
    for m in got:
        if isinstance(m, PackedProduce) and m.ack:
            assert len(m.parts) == 1
    # In one read, the runs are exactly the consecutive plain frames without ack to a topic.
    runs = list(FrameReader().feed(stream))
    want = _expected_runs(msgs)
    assert len(runs) == len(want)
    for r, w in zip(runs, want):
        if isinstance(w, list):
            assert isinstance(r, PackedProduce) and not r.ack and len(r.parts) == len(w)
            assert r.decode().records == [x for m in w for x in m.records] and r.count == sum(len(m.records) for m in w)
        elif isinstance(w, control.Produce) and all(x.headers is None for x in w.records):
            assert isinstance(r, PackedProduce) and r.ack and r.decode() == w
        else:
            assert r == w


def test_frame_reader_serves_the_frames_before_a_bad_one_then_refuses_for_good() -> None:
    good = control.encode(control.Produce(topic="t", records=[control.Rec(value=b"a")]))
    bad = control.LENGTH_PREFIX.pack(3) + b"\xc1\xc1\xc1"  # 0xc1 is never used in msgpack
    reader, got = FrameReader(), []
    with pytest.raises(ProtocolError, match="bad frame"):
        for m in reader.feed(good + good + bad + good):
            got.append(m)
    assert len(got) == 1 and got[0].count == 2  # the two before it, joined
    with pytest.raises(ProtocolError):
        list(reader.feed(good))
    with pytest.raises(ProtocolError, match="frame length 0"):
        list(FrameReader().feed(control.LENGTH_PREFIX.pack(0)))
    too_long = FrameReader(max_frame_bytes=8)
    with pytest.raises(ProtocolError, match="outside 1..8"):
        list(too_long.feed(control.LENGTH_PREFIX.pack(9)))  # refused before its body comes


def test_a_joined_run_keeps_its_records_apart_per_frame_when_one_must_go_through_send() -> None:
    async def main() -> None:
        p = Producer(on_full="drop")
        p.refuse[b"big"] = KafkaError.for_code(MESSAGE_TOO_LARGE)
        frames = [control.Produce(topic="t", records=_recs(b"a", b"big")), control.Produce(topic="t", records=_recs(b"c"))]
        (run,) = FrameReader().feed(b"".join(control.encode(f) for f in frames))
        assert isinstance(run, PackedProduce) and len(run.parts) == 2
        ingest, c = _ingest(p), Client()
        c.track(await ingest.produce(run, c))
        assert [f.partition for f in p.sent] == [0, 1]  # a and c, big refused between them
        p.complete(_delivered)
        await asyncio.wait_for(asyncio.gather(*c.pending), 5)
        assert c.replies == [] and (c.settled_records, c.failed) == (3, 1)
        assert ingest.refused.snapshot() == {"t": {"MESSAGE_TOO_LARGE": 1}}

    asyncio.run(main())


def test_keep_copies_the_bodies_out_of_the_read_and_they_read_the_same() -> None:
    frames = [control.Produce(topic="t", records=_recs(b"a", b"b")), control.Produce(topic="t", records=_recs(b"c"))]
    data = b"".join(control.encode(f) for f in frames)
    (run,) = FrameReader().feed(data)
    assert all(isinstance(body, memoryview) and body.obj is data for body, _at, _n in run.parts)  # views: no copy
    before = run.decode()
    run.keep()  # as the server does before a frame waits for its topic's lookup
    assert all(type(body) is bytes for body, _at, _n in run.parts)
    assert run.decode() == before and before.records == frames[0].records + frames[1].records
