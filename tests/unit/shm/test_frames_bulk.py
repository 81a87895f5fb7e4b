"""Bulk RECORD frames: encode_record_frames + put_frames write what put_record would."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from frames_oracle import iter_records

from shm.frames import encode_headers, encode_record_body, encode_record_frames, put_frames, put_record
from shm.layout import RING_HEADER_BYTES
from shm.ring import SpscRing

_blob = st.one_of(st.none(), st.binary(max_size=300))


def _ring(capacity: int) -> tuple[SpscRing, SpscRing]:
    buf = bytearray(RING_HEADER_BYTES + capacity)
    return SpscRing(buf, 0, capacity, create=True), SpscRing(buf, 0)


def _drain(reader: SpscRing) -> list[tuple[int, int, int, bytes]]:
    out = []
    while True:
        start, end = reader.region()
        if start == end:
            return out
        for _fend, tid, part, ts, body in iter_records(reader, start, end, [0, 0, 0, 8]):
            out.append((tid, part, ts, bytes(body)))
        reader.consume(end - start)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(_blob, min_size=1, max_size=40),
    key_mode=st.sampled_from(["none", "fixed", "mixed"]),
    headers=st.sampled_from([None, [], [("h", b"1"), (b"k2", None)]]),
    skip=st.integers(0, 4000),
    seed=st.integers(0, 2**32 - 1),
)
def test_bulk_frames_equal_put_record_frames_across_the_wrap(values, key_mode, headers, skip, seed) -> None:
    rng = random.Random(seed)
    n = len(values)
    keys = None
    if key_mode == "fixed":
        keys = [rng.randbytes(16) for _ in range(n)]
    elif key_mode == "mixed":
        keys = [None if rng.random() < 0.3 else rng.randbytes(rng.randrange(40)) for _ in range(n)]
    writer, reader = _ring(8192)
    skip &= -8
    if skip:  # start somewhere inside the ring, so spans meet the wrap
        assert writer.claim(1, skip - 8) >= 0
        writer.publish_head()
        reader.consume(reader.region()[1] - reader.region()[0])
    blob = encode_record_frames(3, 2, 1_700_000_000_000, values, keys, headers)
    at, left, got = 0, n, []
    while left:
        at, m = put_frames(writer, blob, at, left)
        writer.publish_head()
        left -= m
        got += _drain(reader)
        assert m or got, "no progress on an empty ring"
    assert at == len(blob)
    want = [(3, 2, 1_700_000_000_000, encode_record_body(None if keys is None else keys[i], values[i], headers)) for i in range(n)]
    assert got == want
    # Byte for byte what put_record writes, padding included.
    w2, _r2 = _ring(8192)
    for i in range(n):
        assert put_record(w2, 3, 2, 1_700_000_000_000, want[i][3])
    assert bytes(w2.view[w2.data_start : w2.data_start + len(blob)]) == blob


def test_put_frames_stops_at_a_full_ring_on_a_frame_boundary() -> None:
    writer, reader = _ring(4096)
    blob = encode_record_frames(3, 0, 1, [b"x" * 100] * 100)
    at, m = put_frames(writer, blob, 0, 100)
    assert 0 < m < 100 and at == m * 128  # 8 + 16 + 1 + 1 + 100 + 1 = 127, padded to 128
    assert put_frames(writer, blob, at, 100 - m) == (at, 0)  # still full: nothing
    writer.publish_head()
    assert len(_drain(reader)) == m


def test_encode_headers_matches_the_body_tail() -> None:
    h = [("a", b"1"), (b"b", None)]
    assert encode_record_body(None, None, h) == b"\x01\x01" + encode_headers(h)
    assert encode_headers(None) == encode_headers([]) == b"\x00"
    with pytest.raises(ValueError):
        encode_record_frames(0, 0, 0, [b"a"], [b"k", b"k2"])
