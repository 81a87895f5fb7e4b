"""Accumulator: sealing rules, back-pressure, runs, release, and the bulk ring-region path."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.accumulator import APPEND_FULL, APPEND_INVALID, APPEND_OK, APPEND_TOO_LARGE, Accumulator
from daemon.batch import Batch
from daemon.arena import STATE_FREE, STATE_SEALED, STATE_STAMPED, Arena
from daemon.config import Profile
from helpers import ref_record_body
from daemon.protocol.records import CODECS, HEADER_SIZE, decode_batches

T0 = 1_700_000_000_000


def frame(topic_id: int, partition: int, ts: int, rec_body: bytes, ftype: int = 1) -> bytes:
    """One ring frame as shm/layout.py and shm/frames.py specify: <II header, <HHiq record header,
    body, pad to 8."""
    payload = struct.pack("<HHiq", topic_id, 0, partition, ts) + rec_body
    f = struct.pack("<II", len(payload), ftype) + payload
    return f + b"\0" * (-len(f) % 8)


def make(profile: Profile | None = None, buffer_memory: int = 1 << 20, chunk_size: int = 1024, **kw) -> Accumulator:
    prof = profile or Profile(**kw)
    return Accumulator(buffer_memory=buffer_memory, profile_for=lambda topic: prof,
                       arena=Arena(buffer_memory, chunk_size=chunk_size))


def values_of(batches: list[Batch]) -> list[bytes | None]:
    return [rec.value for b in batches for rec in decode_batches(b.payload())[0].records]


def test_linger_seals_and_next_deadline() -> None:
    acc = make(linger_ms=5)
    assert acc.next_deadline() is None
    assert acc.append("t", 0, T0, ref_record_body(None, b"a"), 1, 100.0) == APPEND_OK
    assert acc.append("t", 0, T0 + 1, ref_record_body(None, b"b"), 1, 102.0) == APPEND_OK
    assert acc.open_batches == 1
    assert acc.next_deadline() == 105.0
    assert acc.ready(104.9) == []
    (b,) = acc.ready(105.0)
    assert b.sealed and b.record_count == 2 and b.created_ms == 100.0
    assert acc.open_batches == 0 and acc.next_deadline() is None
    (dec,) = decode_batches(b.payload())
    assert [(r.offset_delta, r.timestamp, r.value) for r in dec.records] == [(0, T0, b"a"), (1, T0 + 1, b"b")]
    assert dec.max_timestamp == T0 + 1 and b.size == len(b.payload())


def test_batch_size_closes_the_batch_without_waiting_for_linger() -> None:
    acc = make(batch_size=1000, linger_ms=10_000)
    rec = ref_record_body(None, b"x" * 90)  # ~100 bytes per record
    for i in range(25):
        assert acc.append("t", 0, T0, rec, 1, 0.0) == APPEND_OK
    ready = acc.ready(1.0)  # long before linger
    assert len(ready) >= 2
    assert all(b.size <= 1000 for b in ready)
    assert acc.next_deadline() == 10_000.0
    acc.flush()
    assert acc.next_deadline() == 0.0
    ready += acc.ready(2.0)
    assert sum(b.record_count for b in ready) == 25 and values_of(ready) == [b"x" * 90] * 25


def test_flush_seals_everything_and_record_larger_than_batch_size_gets_its_own_batch() -> None:
    acc = make(batch_size=500, linger_ms=60_000)
    assert acc.append("t", 0, T0, ref_record_body(None, b"s"), 1, 0.0) == APPEND_OK
    assert acc.append("t", 0, T0, ref_record_body(None, b"L" * 3000), 1, 0.0) == APPEND_OK
    assert acc.append("t", 1, T0, ref_record_body(None, b"p1"), 1, 0.0) == APPEND_OK
    acc.flush()
    out = acc.ready(0.0)
    assert sorted((b.partition, b.record_count) for b in out) == [(0, 1), (0, 1), (1, 1)]
    big = [b for b in out if b.size > 3000]
    assert len(big) == 1 and values_of(big) == [b"L" * 3000]
    assert acc.open_batches == 0


def test_too_large_against_max_request_size() -> None:
    acc = make(max_request_size=2000)
    assert acc.append("t", 0, T0, ref_record_body(None, b"z" * 1900), 1, 0.0) == APPEND_OK
    assert acc.append("t", 0, T0, ref_record_body(None, b"z" * 2000), 1, 0.0) == APPEND_TOO_LARGE
    acc.flush()
    (b,) = acc.ready(0.0)
    assert b.size <= 2000 and b.record_count == 1


def test_buffer_memory_bound_gives_full_and_release_frees() -> None:
    acc = make(buffer_memory=16 * 1024, chunk_size=1024, batch_size=4096, linger_ms=0)
    codes = [acc.append("t", p, T0, ref_record_body(None, b"v" * 50), 1, 0.0) for p in range(6)]
    assert codes == [APPEND_OK] * 4 + [APPEND_FULL] * 2  # 4 x 4 KiB reservations fill 16 KiB
    assert acc.buffered_bytes == 16 * 1024
    out = acc.ready(0.0)
    assert len(out) == 4
    assert acc.buffered_bytes == 4 * 1024  # finished batches shrink to one chunk each
    # Shrinking made room, but no 4 KiB run is free: no batch is opened smaller than a normal
    # one (one-chunk batches fragmented the arena until no normal batch fitted again).
    assert acc.append("t", 4, T0, ref_record_body(None, b"v" * 50), 1, 0.0) == APPEND_FULL
    assert acc.buffered_bytes == 4 * 1024
    assert not acc.has_room()  # 12 KiB of 16 free, but not in runs: stay stopped (hysteresis)
    slots = [b.slot for b in out]
    for b in out:
        acc.release(b)
    assert acc.buffered_bytes == 0 and acc.has_room()
    assert all(acc.arena.read_slot(s)["state"] == STATE_FREE for s in slots)
    assert acc.append("t", 4, T0, ref_record_body(None, b"v" * 50), 1, 0.0) == APPEND_OK
    assert acc.buffered_bytes == 4096


def test_release_frees_the_slot() -> None:
    acc = make(linger_ms=0)
    acc.append("t", 0, T0, ref_record_body(None, b"v"), 1, 0.0)
    (b,) = acc.ready(0.0)
    slot = b.slot
    assert acc.arena.read_slot(slot)["state"] == STATE_SEALED
    assert acc.arena.read_slot(slot)["length"] == b.size
    acc.release(b)
    assert acc.arena.read_slot(slot)["state"] == STATE_FREE
    assert acc.buffered_bytes == 0


def test_runs_follow_record_order_across_clients() -> None:
    acc = make(linger_ms=0)
    for cid, n in ((1, 2), (2, 3), (1, 1), (1, 1)):
        for _ in range(n):
            assert acc.append("t", 0, T0, ref_record_body(None, b"v"), cid, 0.0) == APPEND_OK
    (b,) = acc.ready(0.0)
    assert b.runs == [(1, 2), (2, 3), (1, 2)]
    assert sum(c for _, c in b.runs) == b.record_count == 7


def test_stamp_changes_producer_fields_keeps_crc_valid() -> None:
    acc = make(linger_ms=0, compression_type="zstd")
    for i in range(50):
        acc.append("t", 0, T0 + i, ref_record_body(b"k", b"value" * 10), 1, 0.0)
    (b,) = acc.ready(0.0)
    assert (b.producer_id, b.producer_epoch, b.base_sequence) == (-1, -1, -1)
    b.stamp(77, 3, 1000)
    (dec,) = decode_batches(b.payload())
    assert (dec.producer_id, dec.producer_epoch, dec.base_sequence) == (77, 3, 1000)
    assert dec.codec == CODECS["zstd"] and len(dec.records) == 50
    assert acc.arena.read_slot(b.slot)["state"] == STATE_STAMPED


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_each_codec_at_sealing(codec: str) -> None:
    acc = make(linger_ms=0, compression_type=codec, batch_size=64 * 1024, buffer_memory=1 << 20)
    vals = [b"value-%05d-" % i * 5 for i in range(300)]
    for v in vals:
        assert acc.append("t", 0, T0, ref_record_body(None, v), 1, 0.0) == APPEND_OK
    out = acc.ready(0.0)
    assert values_of(out) == vals
    (dec,) = decode_batches(out[0].payload())
    assert dec.codec == CODECS[codec]


def test_timestamps_outside_the_tables_and_before_the_first() -> None:
    acc = make(linger_ms=0)
    tss = [T0, T0 - 5, T0 + 100_000, T0 + 3]
    data = b"".join(frame(0, 0, ts, ref_record_body(None, b"%d" % i)) for i, ts in enumerate(tss))
    assert acc.append_region(data, 0, len(data), ["t"], [1], 9, 9, 0, 0.0)[:2] == (APPEND_OK, len(data))
    (b,) = acc.ready(0.0)
    (dec,) = decode_batches(b.payload())
    assert [r.timestamp for r in dec.records] == tss
    assert dec.max_timestamp == T0 + 100_000 and dec.base_timestamp == T0


def test_region_matches_single_appends_byte_for_byte() -> None:
    rnd = random.Random(1234)
    recs = [(rnd.randrange(3), T0 + rnd.randrange(50), ref_record_body(rnd.choice([None, b"key"]), rnd.randbytes(rnd.randrange(200))))
            for _ in range(400)]
    a = make(batch_size=4096, linger_ms=0)
    b = make(batch_size=4096, linger_ms=0)
    for p, ts, bd in recs:
        assert a.append("t", p, ts, bd, 5, 0.0) == APPEND_OK
    data = memoryview(bytearray(b"".join(frame(0, p, ts, bd) for p, ts, bd in recs)))
    assert b.append_region(data, 0, len(data), ["t"], [3], 5, 5, 0, 0.0)[:2] == (APPEND_OK, len(data))
    pa, pb = a.ready(0.0), b.ready(0.0)
    assert [bytes(x.payload()) for x in pa] == [bytes(x.payload()) for x in pb]
    assert [x.runs for x in pa] == [x.runs for x in pb]


def test_region_padding_and_invalid_frames() -> None:
    acc = make(linger_ms=0)
    good = frame(0, 0, T0, ref_record_body(None, b"a"))
    pad = struct.pack("<II", 24, 0) + b"\0" * 24
    data = good + pad
    assert acc.append_region(data, 0, len(data), ["t"], [1], 1, 1, 0, 0.0)[:2] == (APPEND_OK, len(data))
    for bad in (
        frame(0, 0, T0, ref_record_body(None, b"a"), ftype=2),  # completion frame in a request ring
        frame(2, 0, T0, ref_record_body(None, b"a")),  # topic id beyond the client's table
        frame(0, 5, T0, ref_record_body(None, b"a")),  # partition out of range
        frame(0, -1, T0, ref_record_body(None, b"a")),
        frame(1, 0, T0, ref_record_body(None, b"a")),  # topic id not registered (None)
        struct.pack("<II", 9, 1) + b"\0" * 16,  # payload shorter than the record header
        struct.pack("<II", 4000, 1) + struct.pack("<HHiq", 0, 0, 0, T0) + b"\0" * 8,  # runs past the end
    ):
        data = good + bad
        code, pos = acc.append_region(data, 0, len(data), ["t", None], [1, 1], 1, 1, 0, 0.0)[:2]
        assert (code, pos) == (APPEND_INVALID, len(good))
    out = acc.ready(0.0)
    assert values_of(out) == [b"a"] * 8  # the good frame of every call, nothing else


def test_region_full_stops_and_resumes_without_duplicates() -> None:
    acc = make(buffer_memory=8 * 1024, chunk_size=1024, batch_size=2048, linger_ms=0)
    frames = [frame(0, i % 8, T0, ref_record_body(None, b"%03d" % i + b"." * 300)) for i in range(40)]
    data = b"".join(frames)
    code, pos = acc.append_region(data, 0, len(data), ["t"], [8], 1, 1, 0, 0.0)[:2]
    assert code == APPEND_FULL and 0 < pos < len(data)
    got: list[bytes | None] = []
    for _ in range(100):
        batches = acc.ready(0.0)
        got += values_of(batches)  # read before release: released chunks are reused
        for b in batches:
            acc.release(b)
        if code == APPEND_OK:
            break
        code, pos = acc.append_region(data, pos, len(data), ["t"], [8], 1, 1, 0, 0.0)[:2]
    acc.flush()
    got += values_of(acc.ready(0.0))
    assert sorted(got) == sorted(b"%03d" % i + b"." * 300 for i in range(40))


def test_region_returns_too_large_at_the_frame() -> None:
    acc = make(max_request_size=1000, linger_ms=0)
    ok = frame(0, 0, T0, ref_record_body(None, b"a"))
    big = frame(0, 0, T0, ref_record_body(None, b"b" * 2000))
    data = ok + big + ok
    code, pos = acc.append_region(data, 0, len(data), ["t"], [1], 1, 1, 0, 0.0)[:2]
    assert (code, pos) == (APPEND_TOO_LARGE, len(ok))
    assert acc.append_region(data, len(ok) + len(big), len(data), ["t"], [1], 1, 1, 0, 0.0)[:2] == (APPEND_OK, len(data))
    assert values_of(acc.ready(0.0)) == [b"a", b"a"]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 3),  # partition
            st.integers(-3, 40),  # timestamp offset
            st.one_of(st.none(), st.binary(max_size=12)),
            st.one_of(st.none(), st.binary(max_size=700)),
            st.lists(st.tuples(st.text(max_size=4), st.one_of(st.none(), st.binary(max_size=4))), max_size=2),
        ),
        min_size=1,
        max_size=150,
    ),
    st.sampled_from([300, 2048, 16384]),
    st.sampled_from(sorted(CODECS)),
    st.integers(1, 6),
)
def test_region_round_trip_random(recs: list, batch_size: int, codec: str, chunks: int) -> None:
    acc = make(batch_size=batch_size, compression_type=codec, linger_ms=0, buffer_memory=4 << 20)
    frames = [frame(0, p, T0 + dt, ref_record_body(k, v, tuple(h))) for p, dt, k, v, h in recs]
    # Split the frames into several ring reads, as a worker would see them.
    cuts = sorted({0, len(frames)} | {len(frames) * i // chunks for i in range(chunks)})
    data = b"".join(frames)
    offs = [0]
    for f in frames:
        offs.append(offs[-1] + len(f))
    for a, b in zip(cuts, cuts[1:]):
        assert acc.append_region(data, offs[a], offs[b], ["topic"], [4], 3, 3, 0, 0.0)[:2] == (APPEND_OK, offs[b])
    out = acc.ready(0.0)
    per_part: dict[int, list] = {}
    for b in out:
        (dec,) = decode_batches(b.payload())
        assert b.runs == [(3, b.record_count)]
        if b.record_count > 1:  # only a lone record may exceed batch_size
            assert HEADER_SIZE + sum(len(r.value or b"") for r in dec.records) <= batch_size
            if codec == "none":
                assert b.size <= batch_size
        per_part.setdefault(b.partition, []).extend(
            (r.timestamp, r.key, r.value, r.headers) for r in dec.records)
    expected: dict[int, list] = {}
    for p, dt, k, v, h in recs:
        expected.setdefault(p, []).append((T0 + dt, k, v, list(h)))
    assert per_part == expected
    for b in out:
        acc.release(b)
    assert acc.buffered_bytes == 0


@pytest.mark.parametrize("pad_payload", [0, 8])
def test_region_ending_in_a_short_padding_frame(pad_payload: int) -> None:
    # At the wrap the writer may leave 8 or 16 bytes: a padding frame shorter than a RECORD
    # header. It must be consumed, not taken for a corrupt frame (seen with keyed traffic).
    acc = make(linger_ms=0)
    good = frame(0, 0, T0, ref_record_body(b"k", b"a"))
    data = good + struct.pack("<II", pad_payload, 0) + b"\0" * pad_payload
    assert acc.append_region(data, 0, len(data), ["t"], [1], 1, 1, 0, 0.0)[:2] == (APPEND_OK, len(data))
    assert values_of(acc.ready(0.0)) == [b"a"]


def test_runs_table_always_fits_however_many_clients_share_a_batch() -> None:
    """Each append call of another client starts a run of the batch's runs table; the batch keeps
    room for it (the record room shrinks by one run), so no table is ever RUNS_UNKNOWN, and the
    table says who wrote every record."""
    from daemon.arena import RUN, RUNS_HEADER, RUNS_UNKNOWN

    rnd = random.Random(77)
    print("seed", 77)
    for batch_size in (300, 1024, 4096):
        acc = make(batch_size=batch_size, linger_ms=60_000, chunk_size=256)
        sent = 0
        starts: dict[int, list[int]] = {}  # call -> ring position of each of its records
        for call in range(300):
            recs = [frame(0, 0, T0 + call, ref_record_body(None, rnd.randbytes(rnd.randrange(1, 60))))
                    for _ in range(rnd.randrange(1, 4))]
            data = b"".join(recs)
            starts[call] = [10_000 * call + sum(len(r) for r in recs[:i]) for i in range(len(recs))]
            assert acc.append_region(data, 0, len(data), ["t"], [1], call, 100 + call % 7, 10_000 * call, 0.0)[:2] == (APPEND_OK, len(data))
            sent += len(recs)
        acc.flush()
        batches = acc.ready(0.0)
        assert sum(b.record_count for b in batches) == sent
        buf = acc.arena.buf
        for b in batches:
            at = b.offset + ((b.size + 7) & -8)
            n_runs = RUNS_HEADER.unpack_from(buf, at)[0]
            assert n_runs != RUNS_UNKNOWN and n_runs == len(b.runs) >= 1
            runs = [RUN.unpack_from(buf, at + RUNS_HEADER.size + i * RUN.size) for i in range(n_runs)]
            assert [(cid - 100, count) for cid, _pos, count, _r in runs] == [(k % 7, c) for k, c in b.runs]
            # A run starts at the first record of its call that this batch took.
            assert all(pos in starts[k] for (_c, pos, _n, _r), (k, _) in zip(runs, b.runs))
            assert b.size <= batch_size or b.record_count == 1


def test_runs_table_keeps_one_clients_calls_apart() -> None:
    """Two ring drains (keys) of the same client are two runs: a restarted worker's resume
    position (a chunk end) may fall between them."""
    from daemon.arena import RUN, RUNS_HEADER

    acc = make(batch_size=4096, linger_ms=60_000)
    for call, base in ((1, 800), (2, 2_000)):
        data = frame(0, 0, T0, ref_record_body(None, b"a")) + frame(0, 0, T0, ref_record_body(None, b"b"))
        assert acc.append_region(data, 0, len(data), ["t"], [1], call, 5, base, 0.0)[:2] == (APPEND_OK, len(data))
    acc.flush()
    (b,) = acc.ready(0.0)
    at = b.offset + ((b.size + 7) & -8)
    assert RUNS_HEADER.unpack_from(acc.arena.buf, at)[0] == 2
    runs = [RUN.unpack_from(acc.arena.buf, at + RUNS_HEADER.size + i * RUN.size)[:3] for i in range(2)]
    assert runs == [(5, 800, 2), (5, 2_000, 2)] and b.runs == [(1, 2), (2, 2)]


def test_a_topic_that_grows_keeps_its_open_batches_and_takes_the_new_partitions() -> None:
    # The worker hears of more partitions between two drains: the state table moves the
    # topic's open batches to a larger range, and records to the new partitions are taken.
    acc = make(linger_ms=1000)
    first = b"".join(frame(0, p, T0, ref_record_body(None, b"a%d" % p)) for p in range(2))
    assert acc.append_region(first, 0, len(first), ["t"], [2], 1, 1, 0, 0.0) == (APPEND_OK, len(first), 2)
    more = b"".join(frame(0, p, T0, ref_record_body(None, b"b%d" % p)) for p in range(4))
    assert acc.append_region(more, 0, len(more), ["t"], [4], 2, 1, 0, 0.0) == (APPEND_OK, len(more), 4)
    acc.flush()
    out = {b.partition: b for b in acc.ready(0.0)}
    assert sorted(out) == [0, 1, 2, 3]
    assert values_of([out[0]]) == [b"a0", b"b0"] and values_of([out[1]]) == [b"a1", b"b1"]
    assert values_of([out[2]]) == [b"b2"] and values_of([out[3]]) == [b"b3"]
    assert [out[p].runs for p in range(4)] == [[(1, 1), (2, 1)], [(1, 1), (2, 1)], [(2, 1)], [(2, 1)]]
