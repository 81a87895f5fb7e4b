"""append_region over ring regions (runs of send_many frames, keyed and with headers, interleaved
partitions): the same batch bytes as one append() per record, and the same record bytes as the
pure-Python encoder."""

from __future__ import annotations

import random
import struct

import pytest

import daemon.accumulator as accmod
from daemon.protocol.records import HEADER_SIZE, encode_records
from daemon.accumulator import APPEND_OK
from daemon.arena import Arena
from daemon.config import Profile
from shm.frames import encode_record_body, encode_record_frames
from shm.layout import frame_size

T0 = 1_700_000_000_000


def _make(**kw: object) -> accmod.Accumulator:
    prof = Profile(**kw)
    return accmod.Accumulator(buffer_memory=64 << 20, profile_for=lambda topic: prof, arena=Arena(64 << 20, chunk_size=4096))


def _region(seed: int) -> tuple[bytes, list[tuple[int, int, bytes]]]:
    """Runs of 1 to 3,000 records, each one partition and one timestamp, some keyed, some
    with headers, value sizes fixed within a run; interleaved partitions between runs."""
    rng = random.Random(seed)
    print("seed", seed)
    parts, recs = [], []
    for _ in range(12):
        p = rng.randrange(3)
        ts = T0 + rng.randrange(3000)
        k = rng.choice([1, 31, 32, 33, 200, 1500, 3000])
        size = rng.choice([0, 10, 100, 1000])
        values = [rng.randbytes(size) for _ in range(k)]
        keys = [rng.randbytes(16) for _ in range(k)] if rng.random() < 0.5 else None
        headers = [("h", b"v")] if rng.random() < 0.3 else None
        parts.append(encode_record_frames(0, p, ts, values, keys, headers))
        recs += [(p, ts, encode_record_body(None if keys is None else keys[i], values[i], headers)) for i in range(k)]
    return b"".join(parts), recs


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_region_matches_single_appends_and_the_python_encoder(seed: int) -> None:
    data, recs = _region(seed)
    a = _make(batch_size=256 << 10, linger_ms=0)
    b = _make(batch_size=256 << 10, linger_ms=0)
    for p, ts, bd in recs:
        assert a.append("t", p, ts, bd, 5, 0.0) == APPEND_OK
    # In a few ring drains, each ending on a frame boundary after about 200 KB.
    pos, cuts = 0, []
    while pos < len(data):
        pos += frame_size(struct.unpack_from("<I", data, pos)[0])
        if pos == len(data) or pos - (cuts[-1] if cuts else 0) > 200_000:
            cuts.append(pos)
    start = 0
    taken = 0
    for end in cuts:
        code, at, count = b.append_region(data, start, end, ["t"], [3], 5, 5, 0, 0.0)
        assert code == APPEND_OK
        taken += count
        start = at
    assert start == len(data) and taken == len(recs)
    a.flush()
    b.flush()
    pa, pb = a.ready(0.0), b.ready(0.0)
    assert [bytes(x.payload()) for x in pa] == [bytes(x.payload()) for x in pb]
    assert [x.runs for x in pa] == [x.runs for x in pb]
    # The independent oracle: each partition's batches, re-encoded by the pure-Python encoder of
    # daemon.protocol.records, give the same record bytes.
    per_part: dict[int, list[tuple[int, bytes]]] = {}
    for p, ts, bd in recs:
        per_part.setdefault(p, []).append((ts, bd))
    for p, items in per_part.items():
        got = b"".join(bytes(x.payload()[HEADER_SIZE:]) for x in pb if x.partition == p)
        want = b""
        i = 0
        for x in (x for x in pb if x.partition == p):
            chunk = items[i : i + x.record_count]
            want += encode_records(chunk, chunk[0][0])[0]
            i += x.record_count
        assert i == len(items)
        assert got == want
