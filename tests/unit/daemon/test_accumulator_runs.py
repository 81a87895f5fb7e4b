"""append_region's vectorised path for runs of identical frame headers (send_many of
fixed-size values): the same batch bytes as one append() per record, with and without numpy."""

from __future__ import annotations

import random
import struct

import pytest

import daemon.accumulator as accmod
from daemon.accumulator import APPEND_OK
from daemon.arena import Arena
from daemon.config import Profile
from shm.frames import encode_record_body, encode_record_frames

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


@pytest.mark.parametrize("use_numpy", [True, False])
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_runs_match_single_appends_byte_for_byte(seed: int, use_numpy: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[int] = []
    if use_numpy:
        real = accmod._run_records

        def counting(*args: object) -> tuple[int, bytes]:
            k, out = real(*args)  # type: ignore[arg-type]
            taken.append(k)
            return k, out

        monkeypatch.setattr(accmod, "_run_records", counting)
    else:
        monkeypatch.setattr(accmod, "_np", False)
    data, recs = _region(seed)
    a = _make(batch_size=256 << 10, linger_ms=0)
    b = _make(batch_size=256 << 10, linger_ms=0)
    for p, ts, bd in recs:
        assert a.append("t", p, ts, bd, 5, 0.0) == APPEND_OK
    # In a few ring drains, each ending on a frame boundary after about 200 KB.
    pos, cuts = 0, []
    while pos < len(data):
        pos += (struct.unpack_from("<I", data, pos)[0] + 15) & -8
        if pos == len(data) or pos - (cuts[-1] if cuts else 0) > 200_000:
            cuts.append(pos)
    view = memoryview(bytearray(data))
    start = taken_total = 0
    for end in cuts:
        code, at, count = b.append_region(view, start, end, ["t"], [3], 5, 5, start, 0.0)
        assert code == APPEND_OK
        start = at
        taken_total += count
    assert start == len(data) and taken_total == len(recs)
    a.flush()
    b.flush()
    pa, pb = a.ready(0.0), b.ready(0.0)
    assert [bytes(x.payload()) for x in pa] == [bytes(x.payload()) for x in pb]
    assert [x.runs for x in pa] == [x.runs for x in pb]
    assert sum(x.record_count for x in pb) == len(recs)
    if use_numpy:
        assert sum(taken) >= 32  # the vectorised path did part of the work


def test_run_path_builds_many_records_per_call() -> None:
    values = [bytes([i % 256]) * 100 for i in range(1000)]
    data = encode_record_frames(0, 1, T0, values)
    (k, recs) = accmod._run_records(data, 0, 1000, 128, 103, 0, 0)
    assert k == 1000
    # A different timestamp in frame 500 ends the run there.
    data2 = data[: 500 * 128] + encode_record_frames(0, 1, T0 + 1, values[500:])
    assert accmod._run_records(data2, 0, 1000, 128, 103, 0, 0)[0] == 500
    assert recs[:1] != b""
