"""Backpressure on its own: a real ring that is full, each on_full policy, the wake-up when
space is freed, and send_many's runs (partly written, partly dropped, failed on close)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from helpers import make_ring

from shm import control
from shm.backpressure import Backpressure
from shm.errors import BufferFullError, ProducerClosedError
from shm.frames import encode_record_body, put_record
from shm.futures import DeliveryFuture, DeliveryGroup, PendingRun
from shm.ring import SpscRing
from shm.topic import TopicState

BODY = encode_record_body(None, b"x" * 40, None)


def _topic(on_full: str, max_block_ms: int = 2000, topic_id: int = 3) -> TopicState:
    info = control.TopicInfo(
        topic="t", topic_id=topic_id, partitions=1, profile="p", max_request_size=1 << 20,
        on_full=on_full, max_block_ms=max_block_ms, batch_size=16384, linger_ms=0,  # type: ignore[arg-type]
    )
    return TopicState(info, 1)


class _Rig:
    def __init__(self, on_full: str, *, max_block_ms: int = 2000, never_block: bool = False) -> None:
        self.ring: SpscRing = make_ring(512)
        self.t = _topic(on_full, max_block_ms)
        self.pending = 0
        self.closed = False
        self.drop_counts = [0] * 8
        self.bp = Backpressure(
            [self.ring], threading.Lock(), self._check_open, self._add, self.drop_counts, never_block=never_block
        )

    def _check_open(self) -> None:
        if self.closed:
            raise ProducerClosedError("closed")

    def _add(self, n: int) -> int:
        self.pending += n
        return self.pending

    def fill(self) -> int:
        n = 0
        while put_record(self.ring, self.t.id, 0, 1, BODY):
            n += 1
        self.ring.publish_head()
        return n

    def free_all(self) -> None:
        assert self.ring.free_to(self.ring.head)
        self.bp.wake()


def _fut() -> DeliveryFuture:
    return DeliveryFuture("t", 0, 1, None)


def test_drop_counts_the_record_and_fails_its_future() -> None:
    rig = _Rig("drop")
    assert rig.fill() > 0
    fut = _fut()
    rig.bp.enqueue(rig.t, 0, 1, BODY, fut)
    assert isinstance(fut.exception(0), BufferFullError)
    assert rig.drop_counts[rig.t.id] == 1 and rig.bp.drops({"t": rig.t}) == {"t": 1}
    assert rig.pending == 0 and not rig.t.pending[0]


def test_never_block_raises_at_once() -> None:
    rig = _Rig("block", max_block_ms=60_000, never_block=True)
    rig.fill()
    t0 = time.monotonic()
    with pytest.raises(BufferFullError):
        rig.bp.enqueue(rig.t, 0, 1, BODY, _fut())
    assert time.monotonic() - t0 < 1.0
    assert rig.pending == 0 and not rig.t.pending[0] and rig.bp.drops({"t": rig.t}) == {}


def test_block_raises_after_max_block_ms() -> None:
    rig = _Rig("block", max_block_ms=100)
    rig.fill()
    t0 = time.monotonic()
    with pytest.raises(BufferFullError, match="max_block_ms=100"):
        rig.bp.enqueue(rig.t, 0, 1, BODY, _fut())
    assert 0.09 <= time.monotonic() - t0 < 2.0
    assert not rig.t.pending[0]


def test_block_writes_the_record_once_space_is_freed() -> None:
    rig = _Rig("block")
    rig.fill()
    head = rig.ring.head
    fut = _fut()
    timer = threading.Timer(0.1, rig.free_all)
    timer.start()
    rig.bp.enqueue(rig.t, 0, 1, BODY, fut)
    timer.join()
    assert rig.ring.head > head and rig.pending == 1
    assert list(rig.t.pending[0]) == [fut] and not fut.done()


def test_a_closed_producer_raises_while_waiting() -> None:
    rig = _Rig("block")
    rig.fill()

    def close() -> None:
        rig.closed = True
        rig.bp.wake()

    timer = threading.Timer(0.05, close)
    timer.start()
    with pytest.raises(ProducerClosedError):
        rig.bp.enqueue(rig.t, 0, 1, BODY, _fut())
    timer.join()
    assert not rig.t.pending[0]


def _group(n: int) -> DeliveryGroup:
    g = DeliveryGroup("t", n, 1)
    g.note_order((0, n))
    return g


def test_put_runs_drops_what_does_not_fit() -> None:
    rig = _Rig("drop")
    values: list[Any] = [b"x" * 40] * 30
    g = _group(30)
    rig.bp.put_runs(rig.t, g, [(0, values, None)], 1, None)
    written = rig.pending
    assert 0 < written < 30
    assert rig.drop_counts[rig.t.id] == 30 - written
    assert [type(e) for e in rig.t.pending[0]] == [PendingRun]
    assert g.failed == 30 - written and not g.done()


def test_put_runs_fails_the_runs_it_did_not_write() -> None:
    rig = _Rig("block")
    rig.closed = True
    g = _group(6)
    with pytest.raises(ProducerClosedError):
        rig.bp.put_runs(rig.t, g, [(0, [b"a"] * 3, None), (0, [b"b"] * 3, None)], 1, None)
    assert g.done() and g.failed == 6 and isinstance(g.exception(0), ProducerClosedError)
    assert rig.pending == 0 and not rig.t.pending[0]
