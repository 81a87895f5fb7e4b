"""Splitting a batch recovered from a dead worker's arena (issue 14: crash recovery stays intact).

A successor re-sends its predecessor's STAMPED batches; the broker may refuse one as too large
(the dead worker built it before it learnt the topic's limit). It is then split like any other,
its parts taking over its sequence range. These tests play the sender's part over a real worker
(tests/worker_harness.py): every record must be reported once, in order, with its part's offset,
and a worker that dies at any point after the split leaves an arena its successor reads right.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from daemon.accumulator import SplitDeferred
from daemon.arena import STATE_DONE, STATE_SEALED, STATE_STAMPED
from daemon.batch import RecoveredBatch
from daemon.protocol import errors as ec
from daemon.protocol.records import record_bodies
from daemon.worker import Worker
from shm.frames import CHUNK_DONE_TOPIC
from worker_harness import SEED, Harness, adopted, per_partition, run


def _stamped_then_dead(h: Harness, rng: random.Random) -> list[Any]:
    """Records in every owned partition, sealed and stamped; the worker dies. The batches."""
    h.write(40, rng)
    h.worker.drain()
    batches = h.seal()
    for i, b in enumerate(batches):
        b.stamp(4242, 0, 100 * i)
    return batches


def _scene(h: Harness, rng: random.Random) -> tuple[Worker, list[Any], Any, int]:
    """The first worker dies with stamped batches; its successor is to re-send them. Returns
    the successor, the batches it re-sends, the largest of them (the one the broker refuses
    as too large) and how many records were sent."""
    _stamped_then_dead(h, rng)
    w2 = h.successor()
    resent = adopted(w2)
    return w2, resent, max(resent, key=lambda b: b.record_count), sum(len(v) for v in h.sent.values())


def _stamp_like_the_sender(parent: Any, parts: list[Any]) -> None:
    """What Sender's replace() does with a stamped batch's parts: they take its sequences."""
    seq = parent.base_sequence
    for p in parts:
        p.stamp(parent.producer_id, parent.producer_epoch, seq)
        seq += p.record_count


def _answer(w: Worker, batch: Any, error: int, base: int) -> None:
    w.completions.on_complete(batch, error, base if not error else -1, -1)
    w.acc.release(batch)


def _values(batch: Any) -> list[bytes]:
    """The record bodies of a sealed batch, in order."""
    return [body for _ts, body in record_bodies(batch.payload())[1]]


def _offsets(outcomes: list[tuple[int, int, int]]) -> list[int]:
    """Per record, in order, the offset a partition's (err, base, count) completions give it."""
    return [base + i if not err else -1 for err, base, count in outcomes for i in range(count)]


def test_a_refused_recovered_batch_is_split_and_every_record_reported_once_in_order(tmp_path: Path) -> None:
    rng = random.Random(SEED + 40)

    def body(h: Harness) -> None:
        w2, resent, big, total = _scene(h, rng)
        n = big.record_count
        assert n >= 4
        values = _values(big)
        used = w2.arena.used_bytes
        # Its ring has not been read again yet: the cut run's second half has no position.
        with pytest.raises(SplitDeferred):
            w2.acc.split(big)
        assert w2.arena.used_bytes == used and w2.holds.parts() == {}
        assert w2.arena.read_slot(big.home)["state"] == STATE_STAMPED
        assert w2.drain()
        assert w2.counters.records_in == 0  # every record sits in a kept batch

        halves = w2.acc.split(big)
        assert halves is not None and all(isinstance(p, RecoveredBatch) and p.root is big for p in halves)
        assert [p.record_count for p in halves] == [(n + 1) // 2, n // 2]
        # Demoted before the parts are stamped: a successor never finds both.
        assert w2.arena.read_slot(big.home)["state"] == STATE_SEALED
        assert all(w2.arena.read_slot(p.slot)["state"] == STATE_SEALED for p in halves)
        _stamp_like_the_sender(big, halves)
        quarters = w2.acc.split(halves[1])  # the second half is refused too
        assert quarters is not None and [q.index for q in quarters] == [
            halves[1].index, halves[1].index + (halves[1].record_count + 1) // 2]
        _stamp_like_the_sender(halves[1], quarters)
        parts = [halves[0], *quarters]
        assert sum((_values(p) for p in parts), []) == values
        assert [p.base_sequence for p in parts] == [big.base_sequence + p.index for p in parts]
        assert parts == sorted(parts, key=lambda p: p.ordinal)
        assert w2.holds.parts() == {big.home: [p.slot for p in parts]}

        # The first quarter is a single record over the limit: it alone fails.
        outcomes = {id(halves[0]): (0, 7000), id(quarters[0]): (ec.MESSAGE_TOO_LARGE, -1),
                    id(quarters[1]): (0, 7100)}
        for b in resent:
            if b is not big:
                _answer(w2, b, 0, 8000 + 100 * b.partition)
        for p in parts[:-1]:
            _answer(w2, p, *outcomes[id(p)])
        w2.emit()
        assert h.completions() == []  # the recovery chunk waits for the last part
        _answer(w2, parts[-1], *outcomes[id(parts[-1])])
        w2.emit()
        got = h.completions()
        per = per_partition(got)
        assert per[big.partition] == [
            (0, 7000, halves[0].record_count),
            (ec.MESSAGE_TOO_LARGE, -1, quarters[0].record_count),
            (0, 7100, quarters[1].record_count),
        ]
        assert sum(c for t, _e, _p, _b, c in got if t != CHUNK_DONE_TOPIC) == total
        assert [b for (t, _e, _p, b, _c) in got if t == CHUNK_DONE_TOPIC][-1] == h.req.head
        assert w2.holds.held() == {} and w2.holds.parts() == {} and w2.arena.used_bytes == 0
        errors = w2.snapshot()["errors"]
        assert errors.get("MESSAGE_TOO_LARGE") == quarters[0].record_count

    run(body, tmp_path)


def test_a_second_crash_after_the_split_resends_the_parts_not_the_batch(tmp_path: Path) -> None:
    """The successor split a refused batch, one part was answered, the other is in flight when
    it dies too: the third worker finds the parts (one DONE, one STAMPED), not the batch."""
    rng = random.Random(SEED + 41)

    def body(h: Harness) -> None:
        w2, resent, big, total = _scene(h, rng)
        w2.drain()
        halves = w2.acc.split(big)
        assert halves is not None
        _stamp_like_the_sender(big, halves)
        _answer(w2, halves[0], 0, 7000)
        assert w2.arena.read_slot(halves[0].home)["state"] == STATE_SEALED
        w2.emit()
        assert h.completions() == []
        # w2 dies.
        w3 = h.successor()
        states = sorted((rs.state, rs.record_count) for rs in w3.arena.recovered)
        others = sorted((STATE_STAMPED, b.record_count) for b in resent if b is not big)
        assert states == sorted([*others, (STATE_DONE, halves[0].record_count),
                                 (STATE_STAMPED, halves[1].record_count)])
        again = adopted(w3)
        assert {(b.producer_id, b.base_sequence) for b in again} == (
            {(b.producer_id, b.base_sequence) for b in resent if b is not big} | {(4242, halves[1].base_sequence)})
        w3.drain()
        assert w3.counters.records_in == 0
        for b in again:
            _answer(w3, b, 0, 9000 + 100 * b.partition if b.partition != big.partition else 7500)
        w3.emit()
        got = h.completions()
        assert per_partition(got)[big.partition] == [(0, 7000, halves[0].record_count),
                                                    (0, 7500, halves[1].record_count)]
        assert sum(c for t, _e, _p, _b, c in got if t != CHUNK_DONE_TOPIC) == total
        assert w3.holds.held() == {} and w3.arena.used_bytes == 0

    run(body, tmp_path)


def test_a_crash_between_the_split_and_the_stamping_reads_the_records_again(tmp_path: Path) -> None:
    """Dead after the split, before the parts were stamped: the batch is demoted and its parts
    SEALED, so the third worker keeps neither and reads the records from the ring again (the
    broker refused the batch, so it never wrote them)."""
    rng = random.Random(SEED + 42)

    def body(h: Harness) -> None:
        w2, resent, big, total = _scene(h, rng)
        w2.drain()
        assert w2.acc.split(big) is not None
        # w2 dies before stamping them.
        w3 = h.successor()
        assert len(w3.arena.recovered) == len(resent) - 1
        w3.drain()
        assert w3.counters.records_in == big.record_count
        for b in adopted(w3):
            _answer(w3, b, 0, 9000 + 100 * b.partition)
        w3.acc.flush()
        new = w3.acc.ready(1e18)
        assert [(b.partition, b.record_count) for b in new] == [(big.partition, big.record_count)]
        _answer(w3, new[0], 0, 6000)
        w3.emit()
        got = h.completions()
        # Several COMPLETION frames (the records were read between skipped ones), one offset each.
        assert _offsets(per_partition(got)[big.partition]) == list(range(6000, 6000 + big.record_count))
        assert sum(c for t, _e, _p, _b, c in got if t != CHUNK_DONE_TOPIC) == total
        assert w3.holds.held() == {} and w3.arena.used_bytes == 0

    run(body, tmp_path)
