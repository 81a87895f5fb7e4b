"""Frame payloads: record bodies against an independent decoder, RECORD and COMPLETION round
trips through a ring, and every corrupt-frame case raising CorruptFrameError.

The test-side oracle (tests/frames_oracle.py: the body validator, the RECORD reader and the
COMPLETION writer) is checked here too, since the compiled code is checked against it."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from frames_oracle import iter_frames, iter_records, put_completion, record_body_valid
from helpers import make_ring

from shm.errors import CorruptFrameError
from shm.frames import CHUNK_DONE, FRAME_AND_RECORD, RECORD_HEADER, encode_record_body, iter_completions, put_record, zigzag_varint
from shm.layout import (
    FRAME_COMPLETION,
    FRAME_PADDING,
    FRAME_RECORD,
    RING_COMPLETION,
    RING_OFFSETS,
)
from shm.ring import SpscRing


# -- an independent reference decoder, written from the Kafka record format --------------


def ref_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            break
        shift += 7
    return (result >> 1) if not result & 1 else -((result + 1) >> 1), pos


def ref_decode(body: bytes) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]:
    pos = 0
    out: list[bytes | None] = []
    for _ in range(2):
        n, pos = ref_varint(body, pos)
        if n < 0:
            out.append(None)
        else:
            out.append(body[pos : pos + n])
            pos += n
    count, pos = ref_varint(body, pos)
    headers = []
    for _ in range(count):
        n, pos = ref_varint(body, pos)
        hk = body[pos : pos + n].decode()
        pos += n
        n, pos = ref_varint(body, pos)
        if n < 0:
            headers.append((hk, None))
        else:
            headers.append((hk, body[pos : pos + n]))
            pos += n
    assert pos == len(body)
    return out[0], out[1], headers


def test_zigzag_varint_known_values() -> None:
    assert zigzag_varint(0) == b"\x00"
    assert zigzag_varint(-1) == b"\x01"
    assert zigzag_varint(1) == b"\x02"
    assert zigzag_varint(63) == b"\x7e"
    assert zigzag_varint(64) == b"\x80\x01"
    assert zigzag_varint(-65) == b"\x81\x01"
    assert zigzag_varint(2**31 - 1) == b"\xfe\xff\xff\xff\x0f"


def test_body_of_a_plain_record() -> None:
    assert encode_record_body(None, None) == b"\x01\x01\x00"
    assert encode_record_body(b"k", b"value") == b"\x02k\x0avalue\x00"
    assert encode_record_body(b"", b"", [("h", None)]) == b"\x00\x00\x02\x02h\x01"


blobs = st.one_of(st.none(), st.binary(max_size=300), st.binary(min_size=8190, max_size=8500))
headers = st.one_of(
    st.none(),
    st.lists(st.tuples(st.text(max_size=20), st.one_of(st.none(), st.binary(max_size=50))), max_size=5),
)


# The 8 KiB blobs are on purpose (lengths past the 2-byte varint boundary): large inputs are
# expected, so hypothesis's size health check is not a signal here.
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.data_too_large, HealthCheck.too_slow])
@given(key=blobs, value=blobs, hdrs=headers)
def test_body_round_trips_through_reference_decoder(
    key: bytes | None, value: bytes | None, hdrs: list[tuple[str, bytes | None]] | None
) -> None:
    body = encode_record_body(key, value, hdrs)
    assert ref_decode(body) == (key, value, hdrs or [])
    view = memoryview(body)
    assert record_body_valid(view, 0, len(body))
    # Any strict prefix or extension of a body is not one body.
    for cut in {0, 1, len(body) // 2, len(body) - 1}:
        if cut < len(body):
            assert not record_body_valid(view, 0, cut)
    assert not record_body_valid(memoryview(body + b"\x00"), 0, len(body) + 1)


def test_header_keys_may_be_bytes() -> None:
    assert encode_record_body(None, b"v", [(b"k", b"1")]) == encode_record_body(None, b"v", [("k", b"1")])


def test_body_validator_rejects_bad_lengths() -> None:
    for bad in (b"\x03\x01\x00", b"\x01\x01\x01", b"\x01\x01\x02\x01\x01", b"\x01\x01\x02\x02h\x03", b"\x01\xff\xff\xff\xff\xff\x01"):
        assert not record_body_valid(memoryview(bad), 0, len(bad)), bad


def test_records_round_trip_through_ring() -> None:
    ring = make_ring(1024)
    bodies = [encode_record_body(b"k%d" % i, b"v" * i, [("i", b"%d" % i)]) for i in range(12)]
    for i, b in enumerate(bodies):
        assert put_record(ring, i % 3, i % 5, 1_700_000_000_000 + i, b)
    ring.publish_head()
    start, end = ring.region()
    got = [(t, p, ts, bytes(b)) for _, t, p, ts, b in iter_records(ring, start, end, [5, 5, 5])]
    assert got == [(i % 3, i % 5, 1_700_000_000_000 + i, b) for i, b in enumerate(bodies)]
    ring.consume(end - start)
    assert put_record(ring, 1, 2, -1, bodies[0])
    assert ring.readable() == 0  # put_record leaves the commit to the caller
    ring.publish_head()
    start, end = ring.region()
    [(frame_end, t, p, ts, body)] = list(iter_records(ring, start, end, [0, 3]))
    assert (frame_end, t, p, ts, bytes(body)) == (end, 1, 2, -1, bodies[0])
    del body


def test_records_survive_wrap_with_padding() -> None:
    ring = make_ring(256)
    body = encode_record_body(None, bytes(60))  # 16 + 63 -> 88-byte frames
    got = 0
    for i in range(20):
        assert put_record(ring, 0, 0, i, body)
        ring.publish_head()
        while True:
            start, end = ring.region()
            if start == end:
                break
            for _, _, _, ts, b in iter_records(ring, start, end, [1]):
                assert ts == got and bytes(b) == body
                got += 1
            ring.consume(end - start)
    assert got == 20


def test_put_record_writes_the_frame_layout() -> None:
    ring = make_ring()
    body = encode_record_body(b"key", b"value")
    assert put_record(ring, 7, 3, 42, body)
    ring.publish_head()
    start, end = ring.region()
    frame = struct.pack("<IIHHiq", 16 + len(body), FRAME_RECORD, 7, 0, 3, 42) + body
    assert bytes(ring.view[start:end]) == frame + bytes(-len(frame) & 7)


def test_put_record_rolls_back_on_bad_field() -> None:
    ring = make_ring()
    with pytest.raises(struct.error):
        put_record(ring, 70000, 0, 0, b"\x01\x01\x00")
    ring.publish_head()
    assert ring.readable() == 0


def test_completions_round_trip() -> None:
    ring = make_ring(512, RING_COMPLETION)
    assert put_completion(ring, 1, 0, 2, 1000, -1, 7)
    assert put_completion(ring, 0, 6, 0, -1, 1_700_000_000_000, 1)
    ring.publish_head()
    start, end = ring.region()
    got = [c[1:] for c in iter_completions(ring, start, end, [1, 3])]
    assert got == [(1, 0, 2, 1000, -1, 7), (0, 6, 0, -1, 1_700_000_000_000, 1)]


# -- corrupt frames ----------------------------------------------------------------------


def raw_frame(ring: SpscRing, ftype: int, payload: bytes, plen: int | None = None) -> tuple[int, int]:
    """Write a frame by hand (possibly lying about its length); return the region."""
    pos = ring.data_start + (ring.head % ring.capacity)
    n = len(payload) if plen is None else plen
    struct.pack_into("<II", ring.view, pos, n, ftype)
    ring.view[pos + 8 : pos + 8 + len(payload)] = payload
    size = (len(payload) + 15) & -8
    struct.pack_into("<Q", ring.view, RING_OFFSETS["head"], ring.head + size)
    return ring.region()


def record_payload(topic: int = 0, flags: int = 0, partition: int = 0, body: bytes = b"\x01\x01\x00") -> bytes:
    return struct.pack("<HHiq", topic, flags, partition, 0) + body


@pytest.mark.parametrize(
    ("ftype", "payload", "plen", "message"),
    [
        (FRAME_RECORD, record_payload(), 900, "payload length 900 runs past the committed end"),
        (7, record_payload(), None, "frame type 7 in a request ring"),
        (FRAME_COMPLETION, bytes(32), None, "frame type 2 in a request ring"),
        (FRAME_RECORD, record_payload(topic=3), None, "topic id 3 unknown"),
        (FRAME_RECORD, record_payload(partition=-1), None, "partition -1 of topic id 0 outside"),
        (FRAME_RECORD, record_payload(partition=4), None, "partition 4 of topic id 0 outside"),
        (FRAME_RECORD, record_payload(flags=1), None, "unknown RECORD flags"),
        (FRAME_RECORD, bytes(12), None, "shorter than 16"),
        (FRAME_RECORD, record_payload(body=b"\x05ab"), None, "malformed record body"),
        (FRAME_PADDING, bytes(8), None, "padding frame does not end at the wrap"),
    ],
)
def test_corrupt_record_frames(ftype: int, payload: bytes, plen: int | None, message: str) -> None:
    ring = make_ring(1024)
    assert put_record(ring, 0, 3, 0, b"\x01\x01\x00")  # one good frame first
    ring.publish_head()
    start, end = raw_frame(ring, ftype, payload, plen)
    it = iter_records(ring, start, end, [4, 4, 4])
    first = next(it)
    assert first[2] == 3
    with pytest.raises(CorruptFrameError, match=message):
        next(it)


def test_corrupt_body_passes_when_body_check_is_off() -> None:
    ring = make_ring()
    start, end = raw_frame(ring, FRAME_RECORD, record_payload(body=b"\x05ab"))
    assert [r[1:4] for r in iter_records(ring, start, end, [1], check_body=False)] == [(0, 0, 0)]


def test_frame_header_cut_by_region_end() -> None:
    ring = make_ring()
    start, end = raw_frame(ring, FRAME_RECORD, record_payload())
    with pytest.raises(CorruptFrameError, match="frame header past the end"):
        list(iter_records(ring, start, start + 4, [1]))
    with pytest.raises(CorruptFrameError, match="runs past the committed end"):
        list(iter_frames(ring, start, start + 16))


def test_head_tail_distance_beyond_capacity_is_corrupt() -> None:
    ring = make_ring(256)
    struct.pack_into("<Q", ring.view, RING_OFFSETS["head"], 512)
    with pytest.raises(CorruptFrameError, match="capacity 256"):
        ring.region()


@pytest.mark.parametrize(
    ("payload", "plen", "limits", "message"),
    [
        (struct.pack("<HhiqqII", 0, 0, 0, 1, -1, 1, 0), 31, [1], "COMPLETION payload of 31 bytes"),
        (struct.pack("<HhiqqII", 2, 0, 0, 1, -1, 1, 0), None, [1, 1], "topic id 2 unknown"),
        (struct.pack("<HhiqqII", 0, 0, -5, 1, -1, 1, 0), None, [1], "partition -5"),
        (struct.pack("<HhiqqII", 0, 0, 0, 1, -1, 0, 0), None, [1], "count 0"),
    ],
)
def test_corrupt_completion_frames(payload: bytes, plen: int | None, limits: list[int], message: str) -> None:
    ring = make_ring(256, RING_COMPLETION)
    start, end = raw_frame(ring, FRAME_COMPLETION, payload, plen)
    with pytest.raises(CorruptFrameError, match=message):
        list(iter_completions(ring, start, end, limits))


def test_record_frame_in_completion_ring_is_corrupt() -> None:
    ring = make_ring(256, RING_COMPLETION)
    start, end = raw_frame(ring, FRAME_RECORD, record_payload())
    with pytest.raises(CorruptFrameError, match="frame type 1 in a completion ring"):
        list(iter_completions(ring, start, end, [1]))


def test_combined_structs_are_the_frame_header_and_payload_structs_joined() -> None:
    # The worker unpacks a RECORD frame's header and prefix in one call; the two must not drift.
    from shm.layout import FRAME_HEADER

    assert FRAME_AND_RECORD.format == FRAME_HEADER.format + RECORD_HEADER.format[1:]
    assert FRAME_AND_RECORD.size == FRAME_HEADER.size + RECORD_HEADER.size
    assert CHUNK_DONE.size == 8
