"""daemon._batcher, the worker's compiled per-record path, against independent Python oracles.

The oracles are frames_oracle.record_body_valid (body validation), a small frame walker written
here from shm/layout.py's rules, and daemon.protocol.records' pure-Python decoder. Hypothesis
feeds random and mutated frames; ``make sanitize`` runs this file under ASan and UBSan.
"""

from __future__ import annotations

import struct
from array import array

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from frames_oracle import record_body_valid

from daemon import _batcher as nat
from daemon.protocol.records import HEADER_SIZE, decode_batches, encode_records, finish_batch
from shm import layout
from shm.frames import COMPLETION, RECORD_HEADER, encode_record_body

W = nat.STATE_WIDTH
T0 = 1_700_000_000_000
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_layout_constants_match_shm_layout() -> None:
    assert nat.FRAME_HEADER_BYTES == layout.FRAME_HEADER_BYTES == layout.FRAME_HEADER.size
    assert nat.FRAME_ALIGN == layout.FRAME_ALIGN
    assert (nat.FRAME_PADDING, nat.FRAME_RECORD, nat.FRAME_COMPLETION, nat.FRAME_CHUNK_DONE) == (
        layout.FRAME_PADDING,
        layout.FRAME_RECORD,
        layout.FRAME_COMPLETION,
        layout.FRAME_CHUNK_DONE,
    )
    assert nat.RECORD_PREFIX_BYTES == RECORD_HEADER.size
    assert nat.COMPLETION_BYTES == COMPLETION.size
    assert nat.CHUNK_DONE_BYTES == 8


# -- bodies ----------------------------------------------------------------------------------

headers_st = st.lists(st.tuples(st.text(max_size=10), st.one_of(st.none(), st.binary(max_size=20))), max_size=4)
bodies_st = st.builds(
    encode_record_body,
    st.one_of(st.none(), st.binary(max_size=300)),
    st.one_of(st.none(), st.binary(max_size=300)),
    headers_st,
)


@SETTINGS
@given(bodies_st)
def test_valid_bodies_are_valid(body: bytes) -> None:
    assert nat.body_valid(body, 0, len(body)) is True


@SETTINGS
@given(bodies_st, st.data())
def test_mutated_bodies_agree_with_the_python_oracle(body: bytes, data: st.DataObject) -> None:
    b = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "grow"]))
        if op == "flip" and b:
            i = data.draw(st.integers(0, len(b) - 1))
            b[i] = data.draw(st.integers(0, 255))
        elif op == "cut" and b:
            del b[data.draw(st.integers(0, len(b) - 1)) :]
        else:
            b += data.draw(st.binary(min_size=1, max_size=6))
    raw = bytes(b)
    assert nat.body_valid(raw, 0, len(raw)) == record_body_valid(memoryview(raw), 0, len(raw))


@SETTINGS
@given(st.binary(max_size=64))
def test_random_bytes_agree_with_the_python_oracle(raw: bytes) -> None:
    assert nat.body_valid(raw, 0, len(raw)) == record_body_valid(memoryview(raw), 0, len(raw))


def test_body_valid_bounds() -> None:
    body = encode_record_body(b"k", b"v")
    assert nat.body_valid(body, 0, len(body) + 1) is False  # end past the buffer
    assert nat.body_valid(body, 2, 1) is False
    assert nat.body_valid(body, -1, 3) is False


# -- regions ---------------------------------------------------------------------------------

_FRAME = struct.Struct("<IIHHiq")


def frame(body: bytes, topic_id: int = 0, partition: int = 0, ts: int = T0, flags: int = 0, ftype: int = 1) -> bytes:
    plen = 16 + len(body)
    raw = _FRAME.pack(plen, ftype, topic_id, flags, partition, ts) + body
    return raw + bytes(layout.frame_size(plen) - len(raw))


class Table:
    """A state table with one open batch per partition of one topic, in a private arena."""

    def __init__(self, partitions: int, batch_bytes: int = 1 << 16) -> None:
        self.partitions = partitions
        self.batch_bytes = batch_bytes
        self.arena = bytearray(partitions * batch_bytes)
        self.state = array("q", bytes(8 * W * partitions))
        self.topics = array("i", [0, partitions])
        self.touched = array("i", bytes(4 * partitions))
        for p in range(partitions):
            self.open(p)

    def open(self, p: int, base_ts: int = T0) -> None:
        s = self.state
        s[p * W + nat.S_OPEN] = 1
        s[p * W + nat.S_WRITE_AT] = p * self.batch_bytes + HEADER_SIZE
        s[p * W + nat.S_ROOM] = self.batch_bytes - HEADER_SIZE
        s[p * W + nat.S_COUNT] = 0
        s[p * W + nat.S_BASE_TS] = base_ts

    def run(self, data: bytes, wraps: bool = True) -> tuple[int, int, int, int]:
        return nat.append_region(data, 0, len(data), wraps, self.arena, self.topics, self.state, self.touched, 0)

    def record_bytes(self, p: int) -> bytes:
        start = p * self.batch_bytes + HEADER_SIZE
        return bytes(self.arena[start : self.state[p * W + nat.S_WRITE_AT]])

    def records(self, p: int) -> list[tuple[int, bytes | None, bytes | None, list[tuple[str, bytes | None]]]]:
        """The records of partition p's batch, sealed and decoded by the Python decoder."""
        s = self.state
        count = s[p * W + nat.S_COUNT]
        if not count:
            return []
        start = p * self.batch_bytes
        records_len = s[p * W + nat.S_WRITE_AT] - start - HEADER_SIZE
        base = s[p * W + nat.S_BASE_TS]
        size, _ = finish_batch(self.arena, start, records_len, count, base, base + s[p * W + nat.S_DMAX])
        (batch,) = decode_batches(bytes(self.arena[start : start + size]))
        return [(r.timestamp, r.key, r.value, list(r.headers)) for r in batch.records]


def oracle(data: bytes, partitions: int, wraps: bool) -> tuple[int, list[tuple[int, int, bytes]]]:
    """(position of the first frame the walk must stop at or len(data), [(partition, ts, body)])."""
    pos = 0
    out = []
    while pos < len(data):
        plen, ftype = struct.unpack_from("<II", data, pos)
        size = layout.frame_size(plen)
        if size > len(data) - pos:
            return pos, out
        if ftype == layout.FRAME_PADDING:
            return (len(data) if wraps and size == len(data) - pos else pos), out
        if ftype != layout.FRAME_RECORD or plen < 16:
            return pos, out
        _, _, tid, flags, part, ts = _FRAME.unpack_from(data, pos)
        if flags or tid != 0 or not 0 <= part < partitions:
            return pos, out
        body = data[pos + 24 : pos + 8 + plen]
        if not record_body_valid(memoryview(body), 0, len(body)):
            return pos, out
        out.append((part, ts, body))
        pos += size
    return pos, out


records_st = st.lists(
    st.tuples(st.integers(0, 3), st.integers(-5000, 5000), bodies_st), min_size=1, max_size=40
)


@SETTINGS
@given(records_st)
def test_valid_regions_append_what_the_python_decoder_reads_back(recs: list[tuple[int, int, bytes]]) -> None:
    t = Table(4)
    data = b"".join(frame(body, partition=p, ts=T0 + d) for p, d, body in recs)
    code, pos, count, ntouched = t.run(data)
    assert (code, pos, count) == (nat.RC_OK, len(data), len(recs))
    assert sorted(t.touched[:ntouched]) == sorted({p for p, _, _ in recs})
    for p in range(4):
        want = [(T0 + d, body) for q, d, body in recs if q == p]
        got = t.records(p)
        assert [g[0] for g in got] == [w[0] for w in want]
        assert [encode_record_body(k, v, h) for _, k, v, h in got] == [w[1] for w in want]


@SETTINGS
@given(records_st, st.data())
def test_mutated_regions_stop_where_the_oracle_stops(recs: list[tuple[int, int, bytes]], data: st.DataObject) -> None:
    raw = bytearray(b"".join(frame(body, partition=p, ts=T0 + d) for p, d, body in recs))
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        del raw[data.draw(st.integers(0, len(raw) // 8)) * 8 :]
    region = bytes(raw)
    wraps = data.draw(st.booleans())
    t = Table(4)
    code, pos, count, _ = t.run(region, wraps)
    stop, good = oracle(region, 4, wraps)
    assert pos == stop
    assert count == len(good)
    assert (code == nat.RC_OK) == (stop == len(region))
    for p in range(4):
        # The record bytes the pure-Python encoder gives for the good records of p (header keys
        # may have become invalid UTF-8, which Kafka's decoder, not this check, would refuse).
        want = encode_records([(ts, body) for q, ts, body in good if q == p], T0)[0]
        assert t.record_bytes(p) == want


def test_need_batch_when_closed_or_full_and_touched_rows() -> None:
    t = Table(2, batch_bytes=HEADER_SIZE + 100)
    t.state[1 * W + nat.S_OPEN] = 0
    body = encode_record_body(None, b"x" * 40)
    data = frame(body, partition=0) + frame(body, partition=0) + frame(body, partition=1)
    code, pos, count, ntouched = t.run(data)
    # Two records of 46 bytes fit 100 bytes; partition 1 has no open batch.
    assert (code, count, ntouched) == (nat.RC_NEED_BATCH, 2, 1)
    assert pos == 2 * len(frame(body))
    assert t.state[nat.S_TOUCHED] == 1 and t.state[nat.S_N0] == 0 and t.state[nat.S_P0] == 0
    data = frame(body, partition=0)
    code, pos, count, _ = t.run(data)
    assert (code, pos, count) == (nat.RC_NEED_BATCH, 0, 0)  # full


def test_invalid_frames_each_stop_the_walk() -> None:
    body = encode_record_body(None, b"v")
    good = frame(body)
    cases = {
        "unknown topic id": frame(body, topic_id=1),
        "partition": frame(body, partition=4),
        "negative partition": frame(body, partition=-1),
        "flags": frame(body, flags=1),
        "frame type": frame(body, ftype=7),
        "bad body": frame(b"\x05ab"),
    }
    for what, bad in cases.items():
        t = Table(4)
        code, pos, count, _ = t.run(good + bad + good)
        assert (pos, count) == (len(good), 1), what
        assert code == (nat.RC_BAD_BODY if what == "bad body" else nat.RC_INVALID), what
    t = Table(4)
    pad = struct.pack("<II", 8, 0) + bytes(8)
    assert t.run(good + pad, wraps=True)[:3] == (nat.RC_OK, len(good) + 16, 1)
    assert t.run(good + pad + good, wraps=True)[:2] == (nat.RC_BAD_PADDING, len(good))
    assert t.run(good + pad, wraps=False)[:2] == (nat.RC_BAD_PADDING, len(good))
    assert t.run(good + good[:16])[:2] == (nat.RC_PARTIAL, len(good))


def test_arena_bounds_are_checked() -> None:
    t = Table(1, batch_bytes=HEADER_SIZE + 100)
    t.state[nat.S_WRITE_AT] = len(t.arena) - 10  # a broken table must not write past the arena
    code, pos, count, _ = t.run(frame(encode_record_body(None, b"x" * 40)))
    assert (code, pos, count) == (nat.RC_ARENA, 0, 0)


def test_first_bad_body() -> None:
    body = encode_record_body(None, b"v")
    good = frame(body)
    bad = frame(b"\x05ab")
    assert nat.first_bad_body(good * 3, 3 * len(good), False) == -1
    assert nat.first_bad_body(good + bad + good, 3 * len(good), False) == len(good)
    pad = struct.pack("<II", 16, 0) + bytes(16)  # shorter ones are append_region's to judge
    assert nat.first_bad_body(good + pad, len(good) + 24, True) == -1
    assert nat.first_bad_body(good + pad, len(good) + 24, False) == len(good)
    assert nat.first_bad_body(good + pad + good, 2 * len(good) + 24, True) == len(good)
    # A frame past the end is for the caller to judge (a budget may have cut it).
    assert nat.first_bad_body(good + good, len(good) + 8, False) == -1


def test_record_size_matches_the_encoder() -> None:
    from daemon.protocol.records import record_prefix

    for blen, d, n in [(0, 0, 0), (100, 5, 63), (100, -1, 64), (20000, 1 << 40, 70000)]:
        assert nat.record_size(blen, d, n) == len(record_prefix(blen, d, n)) + blen
