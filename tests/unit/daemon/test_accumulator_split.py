"""Accumulator.split: a sealed batch cut in halves with their records, runs tables and ordinals,
and the ring walk that finds where a cut run's second part starts (daemon.ringscan)."""

from __future__ import annotations

from daemon.accumulator import APPEND_OK, ORDINAL_STRIDE, Accumulator
from daemon.arena import SLOT, SLOT_SIZE, STATE_SEALED, Arena
from daemon.config import Profile
from daemon.protocol.records import decode_batches
from daemon.ringscan import nth_record_position
from shm.frames import encode_record_frames, put_frames
from shm.layout import FRAME_RECORD, RING_HEADER_BYTES
from shm.ring import SpscRing

T0 = 1_700_000_000_000
BASE = 4096  # the ring position of the region's first byte
CHUNK_KEY, OWNER = 7, 5


def _interleaved(n: int) -> tuple[bytes, list[int]]:
    """``n`` records of partition 0 alternating with records of partition 1 (values of
    different sizes, so frame sizes differ); returns the frames and the ring positions of
    partition 0's records."""
    parts, positions, at = [], [], 0
    for i in range(n):
        for p in (0, 1):
            frame = encode_record_frames(0, p, T0 + i, [b"p%d-v%d-" % (p, i) + b"x" * (i * 7 % 40)], [b"k%d" % i])
            if p == 0:
                positions.append(BASE + at)
            parts.append(frame)
            at += len(frame)
    return b"".join(parts), positions


def _sealed(n: int, locate=None, compression: str = "none"):
    prof = Profile(batch_size=1 << 20, linger_ms=0, compression_type=compression)
    arena = Arena(8 << 20, chunk_size=4096)
    acc = Accumulator(buffer_memory=8 << 20, profile_for=lambda t: prof, arena=arena, locate=locate)
    data, positions = _interleaved(n)
    code, _pos, count = acc.append_region(data, 0, len(data), ["t"], [2], CHUNK_KEY, OWNER, BASE, 0.0)
    assert (code, count) == (APPEND_OK, 2 * n)
    acc.flush()
    (batch,) = [b for b in acc.ready(0.0) if b.partition == 0]
    return acc, arena, batch, positions


def _state(arena: Arena, slot: int) -> int:
    """A slot's state as recovery would read it from the mapping."""
    return SLOT.unpack_from(arena.buf, arena.slots_offset + slot * SLOT_SIZE)[0]


def _values(batch) -> list[bytes]:
    (decoded,) = decode_batches(bytes(batch.payload()))
    assert decoded.last_offset_delta == batch.record_count - 1
    assert [r.offset_delta for r in decoded.records] == list(range(batch.record_count))
    return [r.value for r in decoded.records]


def test_halves_hold_the_records_in_order_with_exact_runs_and_ordinals_between() -> None:
    calls = []

    def locate(owner: int, first: int, topic: str, partition: int, k: int) -> int:
        calls.append((owner, first, topic, partition, k))
        return positions[k]

    acc, arena, batch, positions = _sealed(9, locate, compression="gzip")
    values = _values(batch)
    parent_slot, ordinal = batch.slot, batch.ordinal
    assert batch.runs == [(CHUNK_KEY, 9)] and batch._tr == [OWNER, positions[0], 9]

    first, second = acc.split(batch)
    assert calls == [(OWNER, positions[0], "t", 0, 5)]
    assert _values(first) + _values(second) == values
    assert (first.record_count, second.record_count) == (5, 4)
    assert first.runs == [(CHUNK_KEY, 5)] and second.runs == [(CHUNK_KEY, 4)]
    assert first._tr == [OWNER, positions[0], 5] and second._tr == [OWNER, positions[5], 4]
    assert first.ordinal == ordinal < second.ordinal < ordinal + ORDINAL_STRIDE
    assert first.created_ms == second.created_ms == batch.created_ms
    # The batch's slot is free; the halves are SEALED (a crash now reads their records again).
    assert batch.slot == -1 and parent_slot not in arena.allocations()
    assert {_state(arena, first.slot), _state(arena, second.slot)} == {STATE_SEALED}

    # Halves split again, down to single records, keep ascending ordinals below the next batch.
    a, b = acc.split(second)
    c, d = acc.split(a)
    assert _values(c) + _values(d) + _values(b) == values[5:]
    assert first.ordinal < c.ordinal < d.ordinal < b.ordinal < ordinal + ORDINAL_STRIDE
    assert acc.split(c) is None  # a single record


def test_a_cut_at_a_run_boundary_needs_no_ring_position() -> None:
    acc, _arena, batch, positions = _sealed(4, locate=None)
    # Two runs of 2 records each (two append calls of different chunks).
    batch.runs = [(CHUNK_KEY, 2), (CHUNK_KEY + 1, 2)]
    batch._tr = [OWNER, positions[0], 2, OWNER, positions[2], 2]
    first, second = acc.split(batch)
    assert first._tr == [OWNER, positions[0], 2] and second._tr == [OWNER, positions[2], 2]
    assert first.runs == [(CHUNK_KEY, 2)] and second.runs == [(CHUNK_KEY + 1, 2)]


def test_no_split_when_the_cut_runs_position_is_unknown() -> None:
    acc, arena, batch, _ = _sealed(6, locate=lambda *a: -1)
    before = arena.allocations()
    assert acc.split(batch) is None
    assert arena.allocations() == before and batch.slot in before


def test_the_ring_walk_finds_a_partitions_kth_record_across_the_wrap() -> None:
    cap = 1024
    ring = SpscRing(bytearray(RING_HEADER_BYTES + cap), 0, cap, create=True)
    # Move the positions near the end of the data area, so the frames below wrap.
    filler = encode_record_frames(0, 1, T0, [b"f" * 300])
    put_frames(ring, filler + filler, 0, 2)
    ring.publish_head()
    start, end = ring.region()
    ring.consume(end - start)
    frames, positions, at = [], [], ring.cursor
    for i in range(8):
        for p in (0, 1):
            f = encode_record_frames(0, p, T0 + i, [b"v%d" % i * 9])
            frames.append(f)
    # Written one at a time so the ring inserts its padding frame at the wrap.
    for f in frames:
        put_frames(ring, f, 0, 1)
    ring.publish_head()
    while True:
        start, end = ring.region()
        if start == end:
            break
        view = ring.view
        pos = ring.cursor
        off = start
        while off < end:
            plen, ftype = int.from_bytes(view[off:off + 4], "little"), int.from_bytes(view[off + 4:off + 8], "little")
            size = (plen + 15) & -8
            if ftype == FRAME_RECORD and int.from_bytes(view[off + 12:off + 16], "little", signed=True) == 0:
                positions.append(pos + off - start)
            if ftype != FRAME_RECORD:
                size = end - off
            off += size
        ring.advance(end - start)
    assert len(positions) == 8 and positions[-1] - at > cap - at % cap, "the frames wrap"
    for k in range(8):
        assert nth_record_position(ring, positions[0], 0, 0, k) == positions[k]
    assert nth_record_position(ring, positions[0], 0, 0, 8) == -1  # not before the cursor
    assert nth_record_position(ring, positions[0], 0, 2, 0) == -1  # no such partition
