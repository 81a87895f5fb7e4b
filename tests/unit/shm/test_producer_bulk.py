"""send_many and DeliveryGroup against the stand-in daemon of test_producer.py: runs in the
pending FIFOs (one entry for many records), partial and mixed completions, errors, drops."""

from __future__ import annotations

import asyncio
import importlib.util
import time
from pathlib import Path
from typing import Any

import pytest

from shm.errors import BufferFullError, MessageTooLargeError  # type: ignore[attr-defined]
from shm.frames import encode_record_body
from shm.partitioner import owner, partition_for_key
from shm.producer import DeliveryFuture, DeliveryGroup, Producer, ProducerClosedError, RecordMetadata

_spec = importlib.util.spec_from_file_location("_producer_standin", Path(__file__).with_name("test_producer.py"))
_standin = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(_standin)  # type: ignore[union-attr]
StandIn = _standin.StandIn
WORKERS = _standin.WORKERS
sock_path = _standin.sock_path  # fixtures
standin = _standin.standin


def _take_all(s: Any) -> list[tuple[int, int, int, bytes]]:
    return [r for w in range(WORKERS) for r in s.take(w)]


def test_keyless_send_many_is_one_run_settled_by_partial_completions(standin: Any) -> None:
    with Producer(standin.path) as p:
        values = [b"v%03d" % i for i in range(300)]
        g = p.send_many("u", values, headers=[("h", b"x")])
        assert isinstance(g, DeliveryGroup) and len(g) == 300 and p.pending == 300
        recs = _take_all(standin)
        assert [r[3] for r in recs] == [encode_record_body(None, v, [("h", b"x")]) for v in values]
        t = p._topics["u"]
        assert len(t.pending[0]) == 1  # one FIFO entry for 300 records
        w = owner("u", 0, WORKERS)
        standin.complete(w, 1, 0, 1000, 120)  # splits the run
        time.sleep(0.05)
        assert not g.done() and len(t.pending[0]) == 1
        standin.complete(w, 1, 0, 5000, 180)
        assert g.result(timeout=5) == 300
        assert g.offsets == {0: [(1000, 120), (5000, 180)]} and g.errors == [] and g.failed == 0
        metas = [f.result(0) for f in g]
        assert metas[0] == RecordMetadata("u", 0, 1000, g.timestamp)
        assert [m.offset for m in metas] == list(range(1000, 1120)) + list(range(5000, 5180))
        assert p.flush(1) == 0


def test_keyed_send_many_mixes_with_send_in_one_fifo(standin: Any) -> None:
    with Producer(standin.path) as p:
        keys = [b"key-%d" % i for i in range(200)]
        values = [b"val-%d" % i for i in range(200)]
        g1 = p.send_many("t", values[:100], keys[:100])
        single = p.send("t", b"single", keys[0])
        g2 = p.send_many("t", values[100:], keys[100:])
        want_parts = [partition_for_key(k, 4) for k in keys]
        recs = _take_all(standin)
        by_part: dict[int, list[bytes]] = {}
        for _tid, part, _ts, body in recs:
            by_part.setdefault(part, []).append(body)
        for part in range(4):
            idx = [i for i in range(200) if want_parts[i] == part]
            want = [encode_record_body(keys[i], values[i], None) for i in idx if i < 100]
            if part == want_parts[0]:
                want.append(encode_record_body(keys[0], b"single", None))
            want += [encode_record_body(keys[i], values[i], None) for i in idx if i >= 100]
            assert by_part.get(part, []) == want  # per-partition send order, across calls
        # One completion per partition covers run, future and run.
        for part, bodies in by_part.items():
            standin.complete(owner("t", part, WORKERS), 0, part, 10 * 1000 * (part + 1), len(bodies))
        assert g1.result(timeout=5) == 100 and g2.result(timeout=5) == 100
        p0 = want_parts[0]
        n_before = sum(1 for i in range(100) if want_parts[i] == p0)
        assert single.result(timeout=5).offset == 10 * 1000 * (p0 + 1) + n_before
        futs = g2.futures()
        for i, f in enumerate(futs):
            assert f.partition == want_parts[100 + i]
        assert sum(k for r in g1.offsets.values() for _b, k in r) == 100


def test_error_completion_fails_the_group_and_callbacks_run_once(standin: Any) -> None:
    seen: list[Any] = []
    with Producer(standin.path) as p:
        g = p.send_many("u", [b"a", b"b", b"c"], on_delivery=seen.append)
        w = owner("u", 0, WORKERS)
        standin.take(w)
        standin.complete(w, 1, 0, 7, 1)
        standin.complete(w, 1, 0, -1, 2, err=10)
        with pytest.raises(MessageTooLargeError):
            g.result(timeout=5)
        assert g.failed == 2 and [(pt, k) for pt, k, _e in g.errors] == [(0, 2)]
        assert isinstance(g.exception(0), MessageTooLargeError)
        assert g.offsets == {0: [(7, 1)]}
        futs = list(g)
        assert futs[0].result(0).offset == 7
        assert all(isinstance(f.exception(0), MessageTooLargeError) for f in futs[1:])
        assert seen == [g]
        assert p.flush(1) == 0


def test_tombstones_null_keys_empty_and_await(standin: Any) -> None:
    with Producer(standin.path) as p:
        empty = p.send_many("u", [])
        assert empty.done() and empty.result(0) == 0
        g = p.send_many("u", [b"x", None, b"z"], [None, b"k", None])
        recs = standin.take(owner("u", 0, WORKERS))
        assert [r[3] for r in recs] == [
            encode_record_body(None, b"x"),
            encode_record_body(b"k", None),
            encode_record_body(None, b"z"),
        ]

        async def main() -> int:
            standin.complete(owner("u", 0, WORKERS), 1, 0, 0, 3, ts=55)
            return await g

        assert asyncio.run(asyncio.wait_for(main(), 5)) == 3
        assert [f.result(0).timestamp for f in g] == [55, 55, 55]  # log-append time


def test_too_large_in_send_many_sends_nothing(standin: Any) -> None:
    with Producer(standin.path) as p:
        with pytest.raises(MessageTooLargeError):
            p.send_many("u", [b"ok", b"x" * 4096])
        with pytest.raises(ValueError):
            p.send_many("u", [b"a"], [b"k1", b"k2"])
        assert p.pending == 0 and [standin.segment.request_ring(w).head for w in range(WORKERS)] == [0, 0]


def test_send_many_drop_policy_fails_only_the_dropped(sock_path: str) -> None:
    s = StandIn(sock_path, request_ring_bytes=1024, on_full="drop", max_request_size=400)
    try:
        with Producer(sock_path) as p:
            g = p.send_many("u", [b"x" * 200] * 20)
            kept = len(s.take(owner("u", 0, WORKERS)))
            assert 0 < kept < 20 and p.drops == {"u": 20 - kept} and g.failed == 20 - kept
            assert s.segment.drop_counts[1] == 20 - kept  # "u" is topic id 1: what the daemon reads
            s.complete(owner("u", 0, WORKERS), 1, 0, 0, kept)
            with pytest.raises(BufferFullError):
                g.result(timeout=5)
            assert g.offsets == {0: [(0, kept)]}
            assert p.flush(5) == 0
    finally:
        s.close()


def test_send_many_block_policy_raises_and_settles_the_rest(sock_path: str) -> None:
    s = StandIn(sock_path, request_ring_bytes=1024, on_full="block", max_block_ms=100, max_request_size=400)
    try:
        with Producer(sock_path) as p:
            t0 = time.monotonic()
            with pytest.raises(BufferFullError):
                p.send_many("u", [b"x" * 200] * 20)
            assert 0.09 < time.monotonic() - t0 < 2
            kept = len(s.take(owner("u", 0, WORKERS)))
            assert 0 < kept < 20 and p.pending == kept
            s.complete(owner("u", 0, WORKERS), 1, 0, 0, kept)
            assert p.flush(5) == 0
    finally:
        s.close()


def test_hang_up_fails_pending_groups(standin: Any) -> None:
    p = Producer(standin.path, reconnect_timeout_s=0)
    try:
        g = p.send_many("t", [b"v%d" % i for i in range(50)], [b"k%d" % i for i in range(50)])
        f = p.send("t", b"one", b"k1")
        standin.hang_up()
        with pytest.raises(ProducerClosedError):
            g.result(timeout=5)
        assert g.failed == 50
        assert isinstance(f, DeliveryFuture) and isinstance(f.exception(5), ProducerClosedError)
    finally:
        p.close(timeout=1)
