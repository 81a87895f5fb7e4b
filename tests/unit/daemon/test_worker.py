"""daemon.worker without Kafka: rings in, completions out.

A real client segment and a real Worker (tests/worker_harness.py); the sender is not started:
the test plays its part by taking sealed batches from the accumulator and calling the
worker's completion callback, so the chunk bookkeeping (COMPLETION frames in
order, CHUNK_DONE only for complete prefixes, resume after a restart, detach, drop) is checked
frame by frame.
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

from daemon import channel as ch
from daemon.protocol import errors as ec
from shm.frames import CHUNK_DONE_TOPIC, encode_record_body, iter_completions, put_record
from shm.partitioner import owner
from shm.segment import Segment
from worker_harness import (
    PARTITIONS,
    SEED,
    TOPIC,
    WORKERS,
    Harness,
    adopted,
    close_worker,
    new_worker,
    per_partition,
    run,
    worker_config,
)


def test_completions_per_batch_then_chunk_done(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    print("seed", SEED)

    def body(h: Harness) -> None:
        h.write(40, rng)
        assert h.worker.drain()
        assert h.worker.counters.records_in == 40
        batches = h.seal()
        assert sum(b.record_count for b in batches) == 40
        # Nothing is written until every record of the chunk has its outcome.
        for b in batches[:-1]:
            h.complete(b, base=1000 + b.partition)
        h.worker.emit()
        assert h.completions() == []
        h.complete(batches[-1], base=1000 + batches[-1].partition)
        h.worker.emit()
        got = h.completions()
        assert got[-1][0] == CHUNK_DONE_TOPIC and got[-1][3] == h.req.head
        per_part = {p: c for (_t, _e, p, _b, c) in got[:-1]}
        assert per_part == {p: len(v) for p, v in h.sent.items() if v}
        assert all(base == 1000 + p for (_t, err, p, base, _c) in got[:-1] if err == 0)
        # The request ring is not freed by the worker: the client frees it on CHUNK_DONE.
        assert h.req.tail == 0

    run(body, tmp_path)


def test_later_chunk_waits_for_earlier_one(tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)

    def body(h: Harness) -> None:
        h.write(5, rng)
        h.worker.drain()
        first = h.seal()
        end1 = h.req.head
        h.write(7, rng)
        h.worker.drain()
        second = h.seal()
        end2 = h.req.head
        for b in second:
            h.complete(b)
        h.worker.emit()
        assert h.completions() == []  # chunk 2 is done, chunk 1 is not: nothing may be freed
        for b in first:
            h.complete(b, error=ec.MESSAGE_TOO_LARGE)
        h.worker.emit()
        got = h.completions()
        dones = [base for (tid, _e, _p, base, _c) in got if tid == CHUNK_DONE_TOPIC]
        assert dones == [end1, end2]
        # Chunk 1's records failed, chunk 2's succeeded; counts add up per chunk.
        cut = next(i for i, f in enumerate(got) if f[0] == CHUNK_DONE_TOPIC)
        assert sum(c for (_t, err, _p, _b, c) in got[:cut]) == 5
        assert all(err == ec.MESSAGE_TOO_LARGE and base == -1 for (_t, err, _p, base, _c) in got[:cut])
        assert sum(c for (t, err, _p, _b, c) in got[cut + 1 :] if t != CHUNK_DONE_TOPIC and err == 0) == 7
        assert h.worker.counters.records_failed == 5
        assert h.worker.counters.records_out == 7

    run(body, tmp_path)


def test_restarted_worker_resumes_after_last_unread_chunk_done(tmp_path: Path) -> None:
    rng = random.Random(SEED + 2)

    async def main() -> None:
        h = Harness(tmp_path)
        w2 = None
        try:
            h.write(10, rng)
            h.worker.drain()
            for b in h.seal():
                h.complete(b)
            h.worker.emit()
            done_at = h.req.head
            h.write(4, rng)  # read by the first worker, never completed
            h.worker.drain()
            assert h.worker.counters.records_in == 14
            # The worker dies here; the client has not read the CHUNK_DONE yet (tail is 0).
            assert h.req.tail == 0
            # A restarted worker over the same segment re-reads only the 4 incomplete records.
            w2, sup2 = new_worker(h.config, h.segment)
            assert w2.clients[7].req.cursor == done_at
            assert w2.drain()
            assert w2.counters.records_in == 4
        finally:
            if w2 is not None:
                close_worker(w2, sup2)
            h.close()

    asyncio.run(main())


def test_corrupt_frame_drops_the_client_only(tmp_path: Path) -> None:
    rng = random.Random(SEED + 3)

    def body(h: Harness) -> None:
        h.write(3, rng)
        # A RECORD frame naming a topic id the worker never heard of.
        put_record(h.req, 42, h.owned[0], 0, encode_record_body(None, b"x", None))
        h.req.publish_head()
        h.worker.drain()
        msgs = h.messages()
        dropped = [m for m in msgs if isinstance(m, ch.ClientDropped)]
        assert len(dropped) == 1 and dropped[0].client_id == 7
        assert "invalid frame" in dropped[0].reason
        assert h.worker.clients[7].dead
        assert h.worker.counters.dropped_clients == 1
        # The 3 good records before it still complete, then the client is detached.
        for b in h.seal():
            h.complete(b)
        h.worker.emit()
        assert sum(c for (t, _e, _p, _b, c) in h.completions() if t != CHUNK_DONE_TOPIC) == 3
        assert 7 not in h.worker.clients
        assert any(isinstance(m, ch.ClientDetached) and m.client_id == 7 for m in h.messages())

    run(body, tmp_path)


def test_removed_client_detaches_once_drained_and_complete(tmp_path: Path) -> None:
    rng = random.Random(SEED + 4)

    def body(h: Harness) -> None:
        h.write(6, rng)
        h.worker._handle(ch.RemoveClient(client_id=7), [])
        h.worker.emit()
        assert 7 in h.worker.clients  # committed records are still to be read
        h.worker.drain()
        h.worker.emit()
        assert 7 in h.worker.clients  # read, but not complete
        assert not [m for m in h.messages() if isinstance(m, ch.ClientDetached)]
        for b in h.seal():
            h.complete(b)
        h.worker.emit()
        assert 7 not in h.worker.clients
        assert [m.client_id for m in h.messages() if isinstance(m, ch.ClientDetached)] == [7]

    run(body, tmp_path)


def test_snapshot_counts(tmp_path: Path) -> None:
    rng = random.Random(SEED + 5)

    def body(h: Harness) -> None:
        h.write(9, rng)
        h.worker.drain()
        snap = h.worker.snapshot()
        assert snap["records_in"] == 9 and snap["records_out"] == 0
        assert snap["clients"] == 1 and snap["pid"] == os.getpid()
        assert 0 < snap["ring_fill"] < 1
        for b in h.seal():
            h.complete(b)
        snap = h.worker.snapshot()
        assert snap["records_out"] == 9 and snap["records_failed"] == 0
        assert snap["failed"] == {} and snap["errors"] == {}

    run(body, tmp_path)


def test_failed_records_reach_the_exposition_by_topic(tmp_path: Path) -> None:
    """What a real worker's snapshot says about failures is what /metrics exposes: the
    supervisor's stats keep each worker's snapshot as it came (daemon/workers.py)."""
    from prometheus_client.parser import text_string_to_metric_families

    from daemon import metrics

    rng = random.Random(SEED + 6)
    print("seed", SEED + 6)

    def body(h: Harness) -> None:
        h.write(30, rng)
        h.worker.drain()
        batches = h.seal()
        assert len(batches) >= 2
        failed = 0
        for i, b in enumerate(batches):
            if i % 2 == 0:
                h.complete(b, error=ec.MESSAGE_TOO_LARGE)
                failed += b.record_count
            else:
                h.complete(b)
        snap = h.worker.snapshot()
        assert snap["failed"] == {TOPIC: failed}
        assert snap["errors"] == {"MESSAGE_TOO_LARGE": failed} and snap["records_failed"] == failed
        assert snap["records_out"] == 30 - failed
        text = metrics.render({"workers": {"0": snap}}).decode()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert samples[("sluice_records_failed_total", (("topic", TOPIC), ("worker", "0")))] == failed
        assert samples[("sluice_errors_total", (("error", "MESSAGE_TOO_LARGE"), ("worker", "0")))] == failed
        assert samples[("sluice_records_out_total", (("worker", "0"),))] == 30 - failed

    run(body, tmp_path)


# --- record bodies a hostile client may write ----------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from frames_oracle import record_body_valid  # noqa: E402

from daemon.drain import first_bad_body  # noqa: E402
from shm.frames import RECORD_HEADER  # noqa: E402


def _frame(body: bytes) -> bytes:
    f = (16 + len(body)).to_bytes(4, "little") + (1).to_bytes(4, "little") + RECORD_HEADER.pack(0, 0, 0, 0) + body
    return f + bytes(-len(f) & 7)


_bodies = st.one_of(
    st.binary(max_size=24),
    st.builds(
        encode_record_body,
        st.none() | st.binary(max_size=300),
        st.none() | st.binary(max_size=9000),
        st.none() | st.lists(st.tuples(st.text(max_size=5), st.none() | st.binary(max_size=200)), max_size=3),
    ),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.data_too_large, HealthCheck.too_slow])
@given(st.lists(_bodies, min_size=1, max_size=8), st.data())
def test_first_bad_body_agrees_with_record_body_valid(bodies: list[bytes], data: st.DataObject) -> None:
    # Sometimes flip one byte of one body: the fast table path and the general validator must agree.
    if data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(bodies) - 1))
        if bodies[i]:
            b = bytearray(bodies[i])
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
            bodies[i] = bytes(b)
    frames = [_frame(b) for b in bodies]
    region = b"".join(frames)
    want, at = -1, 0
    for body, f in zip(bodies, frames):
        if not record_body_valid(memoryview(f), 24, 24 + len(body)):
            want = at
            break
        at += len(f)
    assert first_bad_body(region, len(region), False) == want


def test_malformed_body_drops_the_client_and_never_reaches_a_batch(tmp_path: Path) -> None:
    rng = random.Random(SEED + 11)

    def body(h: Harness) -> None:
        h.write(3, rng)
        # Key length 10 with 3 bytes after it: Kafka refuses the whole batch holding it.
        put_record(h.req, 0, h.owned[0], 0, b"\x14abc\x02x\x00")
        h.req.publish_head()
        h.worker.drain()
        dropped = [m for m in h.messages() if isinstance(m, ch.ClientDropped)]
        assert len(dropped) == 1 and "malformed record body" in dropped[0].reason
        batches = h.seal()
        assert sum(b.record_count for b in batches) == 3
        for b in batches:
            assert b"abc" not in bytes(b.payload())
            h.complete(b)
        h.worker.emit()
        assert sum(c for (t, _e, _p, _b, c) in h.completions() if t != CHUNK_DONE_TOPIC) == 3

    run(body, tmp_path)


def test_topic_announced_late_keeps_the_earlier_records_own_chunk(tmp_path: Path) -> None:
    # Records of a known topic, then of a topic whose AddTopic is still in the channel: the
    # worker re-reads its channel and appends the rest as a second chunk. Both chunks complete.
    rng = random.Random(SEED + 12)

    def body(h: Harness) -> None:
        h.write(4, rng)
        late = "late-topic"
        h.sup.send(ch.AddTopic(topic_id=1, name=late, partitions=PARTITIONS))
        h.sup.flush()
        p = next(q for q in range(PARTITIONS) if owner(late, q, WORKERS) == 0)
        for i in range(3):
            assert put_record(h.req, 1, p, 1_700_000_000_000, encode_record_body(None, b"late%d" % i, None))
        h.req.publish_head()
        h.worker.drain()
        assert not any(isinstance(m, ch.ClientDropped) for m in h.messages())
        for b in h.seal():
            h.complete(b)
        h.worker.emit()
        got = []
        start, end = h.cmp.region()
        for _fend, tid, _err, _part, base, _ts, count in iter_completions(h.cmp, start, end, [PARTITIONS, PARTITIONS]):
            got.append((tid, 0, 0, base, count))
        h.cmp.consume(end - start)
        assert sum(c for (t, _e, _p, _b, c) in got if t != CHUNK_DONE_TOPIC) == 7
        assert [b for (t, _e, _p, b, _c) in got if t == CHUNK_DONE_TOPIC][-1] == h.req.head
        assert not h.worker.clients[7].chunks

    run(body, tmp_path)


def test_corrupt_completion_tail_drops_the_client_not_the_worker(tmp_path: Path) -> None:
    # The client stores the tail of its completion rings; a wild one must not crash the worker
    # when it writes completions (the ring's claim() checks the tail once the ring looks full).
    rng = random.Random(SEED + 13)

    async def main() -> None:
        cfg = worker_config(tmp_path)
        seg = Segment.create(WORKERS, cfg.daemon.request_ring_bytes, 4096)
        h = Harness(tmp_path, segment=seg)
        try:
            h.cmp._words[h.cmp._tail_i] = 3  # unaligned: no reader could have stored it
            for _ in range(120):  # 120 chunks of completions: more than 4 KiB
                h.write(1, rng)
                h.worker.drain()
                for b in h.seal():
                    h.complete(b)
                h.worker.emit()
            dropped = [m for m in h.messages() if isinstance(m, ch.ClientDropped)]
            assert len(dropped) == 1 and "tail" in dropped[0].reason
            assert 7 not in h.worker.clients  # every chunk was complete: detached at once
        finally:
            h.close()

    asyncio.run(main())


def test_padding_short_of_the_wrap_drops_the_client(tmp_path: Path) -> None:
    # Padding only fills the ring up to its end; one in the middle would make the worker skip
    # the records after it without ever completing them.
    rng = random.Random(SEED + 14)

    def body(h: Harness) -> None:
        h.write(2, rng)
        assert h.req.claim(0, 56) >= 0  # a 64-byte PADDING frame, far from the wrap
        h.write(2, rng)
        h.worker.drain()
        dropped = [m for m in h.messages() if isinstance(m, ch.ClientDropped)]
        assert len(dropped) == 1 and "padding" in dropped[0].reason
        assert sum(b.record_count for b in h.seal()) == 2

    run(body, tmp_path)


# --- crash recovery ----------------------------------------------------------------------------

from daemon.accumulator import ORDINAL_STRIDE  # noqa: E402
from daemon.arena import STATE_DONE, STATE_STAMPED  # noqa: E402


def test_restarted_worker_resends_stamped_batches_and_skips_their_records(tmp_path: Path) -> None:
    """A worker dies with batches in every state: DONE (answered, chunk not yet reported),
    STAMPED (maybe at the broker), SEALED and OPEN. Its successor re-sends exactly the STAMPED
    ones byte for byte, reads only the records of SEALED/OPEN batches again, and reports every
    record's outcome once, in order, with the offsets the first worker got."""
    rng = random.Random(SEED + 20)
    print("seed", SEED + 20)

    def body(h: Harness) -> None:
        h.write(30, rng)
        h.worker.drain()
        done_end = h.req.head
        first = h.seal()  # one batch per partition
        assert len(first) >= 3
        # The last one stays SEALED: its records, interleaved in the ring with the others',
        # are read again and appended between skipped ones.
        done, stamped = first[0], first[1:-1]
        for i, b in enumerate(first[:-1]):
            b.stamp(4242, 0, 10 * i)
        stamped_bytes = {(b.partition, bytes(b.payload())) for b in stamped}
        h.complete(done, base=5000)  # answered: DONE, its chunk is not reported yet
        assert [h.worker.arena.read_slot(s)["state"] for s in h.worker.holds.held()] == [STATE_DONE]
        assert all(h.worker.arena.read_slot(b.slot)["state"] == STATE_STAMPED for b in stamped)
        h.write(20, rng)
        h.worker.drain()
        h.seal()  # SEALED, never stamped: its records are read again
        h.write(10, rng)
        h.worker.drain()  # OPEN
        total = sum(len(v) for v in h.sent.values())
        assert total == 60
        # The worker dies here (nothing more runs). A successor over the same arena file:
        w2 = h.successor()
        resent = adopted(w2)
        assert {(b.partition, bytes(b.payload())) for b in resent} == stamped_bytes
        assert all(b.producer_id == 4242 and b.attempts == 0 for b in resent)
        assert w2.drain()
        covered = done.record_count + sum(b.record_count for b in stamped)
        assert w2.counters.records_in == total - covered  # skipped what the arena holds
        new = w2.acc.ready(1e18) if not w2.acc.flush() else []
        assert sum(b.record_count for b in new) == total - covered
        assert min(b.ordinal for b in new) > max(b.ordinal for b in resent)
        # Answers: the re-sent batches get their offsets, new batches theirs.
        for b in resent:
            w2.completions.on_complete(b, 0, 7000 + 100 * b.partition, -1)
            w2.acc.release(b)
        w2.emit()
        got = h.completions()
        # One recovery chunk (every record up to the last one the arena held): it waits for
        # the new batches holding the SEALED batch's records too.
        assert got == []
        for b in new:
            w2.completions.on_complete(b, 0, 9000 + 100 * b.partition, -1)
            w2.acc.release(b)
        w2.emit()
        got += h.completions()
        dones = [base for (tid, _e, _p, base, _c) in got if tid == CHUNK_DONE_TOPIC]
        assert dones[0] <= done_end and dones[-1] == h.req.head
        per = per_partition(got)
        assert {p: sum(c for _e, _b, c in v) for p, v in per.items()} == {
            p: len(v) for p, v in h.sent.items() if v
        }
        # In each partition: the old batch's records first (its offsets), then the new ones.
        expect_first = {done.partition: 5000, **{b.partition: 7000 + 100 * b.partition for b in stamped}}
        for p, v in per.items():
            if p in expect_first:
                assert v[0][1] == expect_first[p]
        # Every kept slot is freed once its records were reported.
        assert w2.holds.held() == {}
        assert w2.arena.used_bytes == 0

    run(body, tmp_path)


def test_second_crash_during_recovery_still_reports_every_record_once(tmp_path: Path) -> None:
    """The successor dies too, after re-sending some batches and stamping new ones; a third
    worker re-sends what is stamped, reads nothing twice, and every record is reported once."""
    rng = random.Random(SEED + 21)
    print("seed", SEED + 21)

    def body(h: Harness) -> None:
        h.write(30, rng)
        h.worker.drain()
        first = h.seal()
        assert len(first) >= 3
        for i, b in enumerate(first[:-1]):
            b.stamp(4242, 0, 10 * i)
        h.complete(first[0], base=5000)
        h.write(12, rng)
        h.worker.drain()  # OPEN when the first worker dies
        total = sum(len(v) for v in h.sent.values())
        w2 = h.successor()
        w2.drain()
        w2.acc.flush()
        new2 = w2.acc.ready(1e18)
        for i, b in enumerate(new2):
            b.stamp(4343, 0, 100 * i)  # sent under the successor's producer id
        adopted2 = adopted(w2)
        w2.completions.on_complete(adopted2[0], 0, 6000, -1)  # one re-send answered: DONE
        w2.emit()
        # w2 dies: its recovery chunk was never reported.
        w3 = h.successor()
        adopted3 = adopted(w3)
        assert {(b.producer_id, b.base_sequence) for b in adopted3} == (
            {(b.producer_id, b.base_sequence) for b in adopted2[1:]} | {(4343, 100 * i) for i in range(len(new2))}
        )
        # Renumbered 1..n (times the stride that leaves room for parts) in creation order:
        # the DONE batches are older than those re-sent.
        kept = len(w3.arena.recovered)
        assert sorted(b.ordinal for b in adopted3) == [
            k * ORDINAL_STRIDE for k in range(kept - len(adopted3) + 1, kept + 1)]
        assert [b.producer_id for b in sorted(adopted3, key=lambda b: b.ordinal)][-len(new2):] == [4343] * len(new2)
        w3.drain()
        assert w3.counters.records_in == 0  # every record sits in a kept batch
        for b in adopted3:
            w3.completions.on_complete(b, 0, 8000 + 100 * b.partition, -1)
        w3.emit()
        got = h.completions()
        per = per_partition(got)
        assert {p: sum(c for _e, _b, c in v) for p, v in per.items()} == {p: len(v) for p, v in h.sent.items() if v}
        assert [base for (tid, _e, _p, base, _c) in got if tid == CHUNK_DONE_TOPIC][-1] == h.req.head
        assert sum(c for _t, _e, _p, _b, c in got if _t != CHUNK_DONE_TOPIC) == total
        assert w3.holds.held() == {} and w3.arena.used_bytes == 0

    run(body, tmp_path)
