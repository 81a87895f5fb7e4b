"""SpscRing: wrap-around at every position, property tests against a model, full-ring
behaviour, position validation, and a two-process stream with checksums."""

from __future__ import annotations

import os
import random
import struct
import time
import zlib
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from frames_oracle import iter_frames
from helpers import make_ring, wait_child

from shm.errors import CorruptFrameError, SegmentError
from shm.layout import (
    FRAME_COMPLETION,
    FRAME_RECORD,
    RING_COMPLETION,
    RING_HEADER_BYTES,
    RING_OFFSETS,
    WAKE_TIMEOUT_S,
    align8,
)
from shm.ring import SpscRing
from shm.segment import Segment


def payload_for(seq: int, n: int) -> bytes:
    return (seq.to_bytes(8, "little") * (n // 8 + 1))[:n]


def read_all(ring: SpscRing) -> list[bytes]:
    """Everything committed, in order, consuming it."""
    out = []
    while True:
        start, end = ring.region()
        if start == end:
            return out
        for _, _, ps, pe in iter_frames(ring, start, end):
            out.append(bytes(ring.view[ps:pe]))
        ring.consume(end - start)


def test_wrap_at_every_position_and_every_size() -> None:
    cap = 128
    max_payload = cap // 2 - 8
    for start in range(0, cap, 8):
        for size in range(max_payload + 1):
            ring = make_ring(cap)
            if start:
                # Move both positions to `start` with empty (8-byte) frames.
                assert ring.write_many(FRAME_RECORD, [b""] * (start // 8)) == start // 8
                assert read_all(ring) == [b""] * (start // 8)
            for seq in range(3):  # three frames: at least one of them wraps for most sizes
                data = payload_for(seq + size, size)
                assert ring.write(FRAME_RECORD, data), (start, size, seq)
                assert read_all(ring) == [data], (start, size, seq)
            frame = align8(8 + size)
            off = start
            expected = start
            for _ in range(3):
                if cap - off < frame:
                    expected += cap - off
                    off = 0
                expected += frame
                off = (off + frame) % cap
            assert ring.head == ring.tail == expected


def test_oversized_frame_is_refused_not_queued() -> None:
    ring = make_ring(256)
    assert ring.max_frame == 128
    assert ring.write(FRAME_RECORD, bytes(120))  # 128-byte frame: the largest
    with pytest.raises(ValueError, match="exceeds the largest frame"):
        ring.write(FRAME_RECORD, bytes(121))
    assert read_all(ring) == [bytes(120)]


def test_full_ring_returns_false_and_counts() -> None:
    ring = make_ring(256)
    n = 0
    while ring.write(FRAME_RECORD, payload_for(n, 24)):  # 32-byte frames
        n += 1
    assert n == 8
    assert ring.used() == 256 and ring.free() == 0
    assert ring.full_count == 1
    assert not ring.write(FRAME_RECORD, b"")
    assert ring.full_count == 2
    assert read_all(ring) == [payload_for(i, 24) for i in range(8)]
    assert ring.write(FRAME_RECORD, b"x")
    assert ring.free() == 256 - 16


def test_write_many_publishes_once_and_stops_when_full() -> None:
    ring = make_ring(256)
    payloads = [payload_for(i, 40) for i in range(10)]  # 48-byte frames: 5 fit
    assert ring.write_many(FRAME_RECORD, payloads) == 5
    assert ring.unpublished == 0
    assert ring.head == 5 * 48
    assert read_all(ring) == payloads[:5]


def test_claimed_frames_are_invisible_until_published() -> None:
    ring = make_ring(256)
    pos = ring.claim(FRAME_RECORD, 4)
    ring.view[pos : pos + 4] = b"abcd"
    assert ring.region()[0] == ring.region()[1]
    assert ring.readable() == 0
    ring.publish_head()
    assert read_all(ring) == [b"abcd"]
    ring.claim(FRAME_RECORD, 4)
    ring.rollback()
    ring.publish_head()
    assert ring.readable() == 0


@st.composite
def operations(draw: st.DrawFn) -> list[tuple[str, list[int] | int]]:
    ops: list[tuple[str, list[int] | int]] = []
    for _ in range(draw(st.integers(1, 60))):
        if draw(st.booleans()):
            ops.append(("w", draw(st.lists(st.integers(0, 56), min_size=1, max_size=8))))
        else:
            ops.append(("r", draw(st.integers(0, 10))))
    return ops


@settings(max_examples=300, deadline=None)
@given(capacity=st.sampled_from([128, 256, 512]), ops=operations())
def test_ring_matches_a_fifo_model(capacity: int, ops: list[tuple[str, list[int] | int]]) -> None:
    """Random frame sizes, interleaved bulk writes and partial reads, wraps anywhere."""
    ring = make_ring(capacity)
    model: deque[bytes] = deque()
    seq = 0
    for op, arg in ops:
        if op == "w":
            assert isinstance(arg, list)
            payloads = [payload_for(seq + i, n) for i, n in enumerate(arg)]
            seq += len(payloads)
            written = ring.write_many(FRAME_RECORD, payloads)
            model.extend(payloads[:written])
            if written < len(payloads):
                # Refused only when the next frame (plus padding at the wrap) truly lacks room.
                head, tail = ring.head, ring.tail
                frame = align8(8 + len(payloads[written]))
                room_to_end = capacity - (head % capacity)
                need = frame if frame <= room_to_end else frame + room_to_end
                assert need > capacity - (head - tail)
        else:
            assert isinstance(arg, int)
            start, end = ring.region()
            taken = 0
            done = start  # consumed up to here
            for frame_end, ftype, ps, pe in iter_frames(ring, start, end):
                if taken == arg:
                    break
                assert ftype == FRAME_RECORD
                assert bytes(ring.view[ps:pe]) == model.popleft()
                taken += 1
                ring.consume(frame_end - done)
                done = frame_end
            else:
                ring.consume(end - done)  # includes a trailing padding frame
        assert 0 <= ring.head - ring.tail <= capacity
    assert read_all(ring) == list(model)


def test_reader_rejects_head_too_far_ahead() -> None:
    ring = make_ring(256)
    struct.pack_into("<Q", ring.view, RING_OFFSETS["head"], 264)
    with pytest.raises(CorruptFrameError, match="head 264 is invalid"):
        ring.region()


def test_reader_rejects_head_moving_backwards_or_unaligned() -> None:
    ring = make_ring(256)
    assert ring.write(FRAME_RECORD, bytes(8))
    assert ring.region()[1] - ring.region()[0] == 16
    struct.pack_into("<Q", ring.view, RING_OFFSETS["head"], 8)
    with pytest.raises(CorruptFrameError, match="last head 16"):
        ring.region()
    struct.pack_into("<Q", ring.view, RING_OFFSETS["head"], 20)
    with pytest.raises(CorruptFrameError, match="head 20 is invalid"):
        ring.readable()


def test_writer_rejects_tail_beyond_published_head() -> None:
    ring = make_ring(128)
    while ring.write(FRAME_RECORD, bytes(8)):
        pass
    struct.pack_into("<Q", ring.view, RING_OFFSETS["tail"], 4096)
    with pytest.raises(CorruptFrameError, match="reader's tail 4096"):
        ring.write(FRAME_RECORD, bytes(8))


def test_attach_validates_header_and_positions() -> None:
    buf = bytearray(RING_HEADER_BYTES + 256)
    SpscRing(buf, 0, 256, create=True)
    assert SpscRing(buf, 0).capacity == 256
    with pytest.raises(SegmentError, match="capacity 256, expected 512"):
        SpscRing(buf, 0, 512)
    with pytest.raises(SegmentError, match="ring kind 1, expected 2"):
        SpscRing(buf, 0, kind=RING_COMPLETION)
    struct.pack_into("<QQ", buf, RING_OFFSETS["head"], 0, 0)
    struct.pack_into("<Q", buf, RING_OFFSETS["tail"], 8)
    with pytest.raises(CorruptFrameError, match="inconsistent positions"):
        SpscRing(buf, 0)
    struct.pack_into("<I", buf, RING_OFFSETS["ring_magic"], 0)
    with pytest.raises(SegmentError, match="bad ring magic"):
        SpscRing(buf, 0)
    with pytest.raises(SegmentError, match="power of two"):
        SpscRing(bytearray(RING_HEADER_BYTES + 384), 0, 384, create=True)


def test_consume_refuses_more_than_committed() -> None:
    ring = make_ring(128)
    ring.write(FRAME_RECORD, b"abc")
    ring.region()
    with pytest.raises(ValueError):
        ring.consume(24)
    with pytest.raises(ValueError):
        ring.consume(4)


def test_two_processes_stream_200k_frames_with_checksums() -> None:
    """A forked writer streams 200,000 frames of random sizes; the reader checks each one."""
    seed = random.randrange(1 << 30)
    print("seed", seed)
    total = 200_000
    seg = Segment.create(1, 1 << 16, 4096)
    ring = seg.request_ring(0)
    pid = os.fork()
    if pid == 0:  # writer
        code = 1
        try:
            rng = random.Random(seed)
            blob = rng.randbytes(4096)
            seq = 0
            while seq < total:
                batch = []
                for i in range(seq, min(seq + 64, total)):
                    n = rng.randrange(0, 300)
                    start = (i * 7) % 3000
                    data = blob[start : start + n]
                    batch.append(struct.pack("<QI", i, zlib.crc32(data)) + data)
                sent = 0
                while sent < len(batch):
                    k = ring.write_many(FRAME_RECORD, batch[sent:])
                    sent += k
                    if not k:
                        time.sleep(0.0002)  # full: let the reader catch up
                seq += len(batch)
            code = 0
        finally:
            os._exit(code)
    try:
        seen = 0
        bad = 0
        deadline = time.monotonic() + 60
        view = ring.view
        while seen < total and time.monotonic() < deadline:
            start, end = ring.region()
            if start == end:
                ring.wait(WAKE_TIMEOUT_S)
                continue
            for _, _, ps, pe in iter_frames(ring, start, end):
                i, crc = struct.unpack_from("<QI", view, ps)
                if i != seen or zlib.crc32(view[ps + 12 : pe]) != crc:
                    bad += 1
                seen += 1
            ring.consume(end - start)
        assert wait_child(pid, 30) == 0
        assert (seen, bad) == (total, 0)
        assert ring.readable() == 0
    finally:
        seg.close()


def test_frame_type_is_carried() -> None:
    ring = make_ring(128)
    ring.write(FRAME_COMPLETION, bytes(32))
    start, end = ring.region()
    assert [f[1] for f in iter_frames(ring, start, end)] == [FRAME_COMPLETION]
