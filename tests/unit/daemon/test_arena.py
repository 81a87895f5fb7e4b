"""The worker arena: layout table against the code, allocator under random alloc/free/shrink."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon import arena as arena_mod
from daemon.arena import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    SLOT_SIZE,
    STATE_FREE,
    STATE_OPEN,
    STATE_SEALED,
    STATE_STAMPED,
    Arena,
    RUN,
    RUNS_HEADER,
    header_field_offsets,
    run_field_offsets,
    runs_header_field_offsets,
    slot_field_offsets,
)


def _doc_tables() -> list[dict[str, tuple[int, int]]]:
    """Every `| offset | size | field | writer | reader |` table of the module docstring."""
    tables: list[dict[str, tuple[int, int]]] = []
    current: dict[str, tuple[int, int]] | None = None
    for line in (arena_mod.__doc__ or "").splitlines():
        line = line.strip()
        if line.startswith("| offset | size | field | writer | reader |"):
            current = {}
            tables.append(current)
            continue
        if current is not None and line.startswith("|"):
            m = re.match(r"\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\w+)\s*\|", line)
            if m:
                current[m.group(3)] = (int(m.group(1)), int(m.group(2)))
            continue
        current = None
    return tables


def test_layout_tables_match_the_code() -> None:
    header_doc, slot_doc, runs_doc, run_doc = _doc_tables()
    assert header_doc == header_field_offsets()
    assert slot_doc == slot_field_offsets()
    assert runs_doc == runs_header_field_offsets()
    assert run_doc == run_field_offsets()
    assert sum(size for _, size in header_doc.values()) == HEADER_SIZE
    assert sum(size for _, size in slot_doc.values()) == SLOT_SIZE
    assert sum(size for _, size in runs_doc.values()) == RUNS_HEADER.size
    assert sum(size for _, size in run_doc.values()) == RUN.size


def test_file_backed_arena_writes_a_readable_header(tmp_path) -> None:
    path = tmp_path / "arena-0"
    a = Arena(1 << 20, path=str(path), chunk_size=4096, max_topics=8)
    try:
        raw = path.read_bytes()
        assert len(raw) == a.total_size
        fields = dict(zip(header_field_offsets(), HEADER.unpack_from(raw, 0)))
        assert fields["magic"] == MAGIC and raw[:8] == b"SLUICEAR"
        assert fields["chunk_size"] == 4096
        assert fields["n_chunks"] == 256
        assert fields["data_offset"] == a.data_offset and a.data_offset % 4096 == 0
        assert fields["slots_offset"] >= fields["topics_offset"] + 8 * 256
        # A sealed slot is visible through the file, as a restarted worker would see it.
        slot = a.alloc(10_000)
        a.open_slot(slot, a.topic_index("payments"), 3)
        a.seal_slot(slot, 9_000, 42)
        data = path.read_bytes()
        at = fields["slots_offset"] + slot * SLOT_SIZE
        state, topic_index, partition, count, offset, length, capacity = arena_mod.SLOT.unpack_from(data, at)
        assert (state, partition, count, length) == (STATE_SEALED, 3, 42, 9_000)
        assert offset == a.data_offset + slot * 4096 and capacity == 3 * 4096
        assert a.topic_name(topic_index) == "payments"
    finally:
        a.close()


def test_slot_states_and_topic_table() -> None:
    a = Arena(64 * 1024, chunk_size=1024, max_topics=2)
    s = a.alloc(100)
    assert a.topic_index("a") == 0 and a.topic_index("b") == 1 and a.topic_index("a") == 0
    with pytest.raises(ValueError, match="full"):
        a.topic_index("c")
    a.open_slot(s, 1, 7)
    assert a.read_slot(s)["state"] == STATE_OPEN
    a.seal_slot(s, 80, 1)
    a.set_state(s, STATE_STAMPED)
    assert a.read_slot(s)["state"] == STATE_STAMPED
    a.free(s)
    assert a.read_slot(s)["state"] == STATE_FREE
    assert a.topic_name(1) == "b"
    a.close()


def test_alloc_returns_minus_one_when_full_and_coalesces() -> None:
    a = Arena(8 * 1024, chunk_size=1024)
    slots = [a.alloc(1024) for _ in range(8)]
    assert slots == list(range(8))
    assert a.alloc(1) == -1
    a.free(3)
    a.free(5)
    assert a.alloc(2048) == -1  # two free chunks, not contiguous
    a.free(4)
    assert a.free_extents() == [(3, 3)]
    assert a.alloc(3000) == 3
    assert a.used_bytes == 8 * 1024
    a.close()


def _check(a: Arena) -> None:
    allocs = a.allocations()
    free = a.free_extents()
    covered = sorted([(s, n) for s, n in allocs.items()] + free)
    pos = 0
    for start, n in covered:  # allocations and free extents tile the arena exactly
        assert start == pos and n > 0
        pos += n
    assert pos == a.n_chunks
    for (s1, n1), (s2, _) in zip(free, free[1:]):
        assert s1 + n1 < s2  # coalesced: no two free extents touch
    assert a.used_bytes == sum(allocs.values()) * a.chunk_size


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "shrink"]), st.integers(1, 9000), st.integers(0, 50)),
                max_size=120))
def test_allocator_random_operations(ops: list[tuple[str, int, int]]) -> None:
    a = Arena(32 * 1024, chunk_size=1024)
    live: dict[int, int] = {}
    try:
        for op, nbytes, pick in ops:
            if op == "alloc":
                free_before = a.free_extents()
                s = a.alloc(nbytes)
                need = a.chunks_for(nbytes)
                if s < 0:
                    assert all(n < need for _, n in free_before)
                else:
                    assert s not in live and a.capacity(s) >= nbytes
                    # first fit: the lowest extent that is large enough
                    assert s == min(st_ for st_, n in free_before if n >= need)
                    live[s] = nbytes
            elif live:
                s = sorted(live)[pick % len(live)]
                if op == "free":
                    a.free(s)
                    del live[s]
                else:
                    before = a.capacity(s)
                    a.shrink(s, max(1, nbytes // 4))
                    assert a.capacity(s) == min(before, a.chunks_for(max(1, nbytes // 4)) * 1024)
            _check(a)
        for s in list(live):
            a.free(s)
        assert a.free_extents() == [(0, a.n_chunks)] and a.used_bytes == 0
    finally:
        a.close()


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        Arena(100, chunk_size=4096)
    with pytest.raises(ValueError):
        Arena(1 << 20, chunk_size=1001)


# --- runs tables and recovery ------------------------------------------------------------------

import struct  # noqa: E402

from daemon.accumulator import Accumulator  # noqa: E402
from daemon.arena import RUNS_UNKNOWN, STATE_DONE  # noqa: E402
from daemon.config import Profile  # noqa: E402
from daemon.protocol.records import OFFSET_PRODUCER_ID  # noqa: E402
from shm.frames import encode_record_body  # noqa: E402

T0 = 1_700_000_000_000


def _frames(parts: list[int]) -> tuple[bytes, list[int]]:
    """RECORD frames (topic id 0) for the given partitions; and each frame's offset."""
    out, at = bytearray(), []
    for i, p in enumerate(parts):
        payload = struct.pack("<HHiq", 0, 0, p, T0 + i) + encode_record_body(b"k", b"v%d" % i, None)
        at.append(len(out))
        f = struct.pack("<II", len(payload), 1) + payload
        out += f + bytes(-len(f) % 8)
    return bytes(out), at


def test_runs_table_round_trip_and_recovery(tmp_path) -> None:
    """Sealed batches carry (owner, ring position of the first record, count) per append call;
    a reopened arena keeps exactly the STAMPED (CRC intact) and DONE slots, with their runs."""
    path = str(tmp_path / "arena-3")
    a = Arena(1 << 20, path=path, chunk_size=4096, max_topics=8)
    acc = Accumulator(buffer_memory=1 << 20, profile_for=lambda t: Profile(linger_ms=0), arena=a)
    data, at = _frames([0, 1, 2, 0, 1, 2, 0])
    assert acc.append_region(data, 0, at[3], ["t"], [4], 1, 7, 1_000_000, 0.0)[0] == 0
    # another client's ring (and another call)
    assert acc.append_region(data, at[3], len(data), ["t"], [4], 2, 9, 5_000_000, 0.0)[0] == 0
    b0, b1, b2 = sorted(acc.ready(1e18), key=lambda b: b.partition)
    assert [b.runs for b in (b0, b1, b2)] == [[(1, 1), (2, 2)], [(1, 1), (2, 1)], [(1, 1), (2, 1)]]
    b0.stamp(555, 2, 40)
    b1.stamp(555, 2, 60)
    slot1 = b1.slot
    assert acc.retire(b1, 0, 12345, 777) == slot1 and b1.slot == -1
    assert a.read_slot(slot1)["state"] == STATE_DONE
    acc.release(b1)  # the sender's release after retire: nothing (the slot is the caller's now)
    assert a.read_slot(slot1)["state"] == STATE_DONE
    # b2 stays SEALED; one more record stays OPEN.
    assert acc.append("t", 3, T0, encode_record_body(None, b"x", None), 7, 0.0) == 0
    a2 = Arena(1 << 20, path=path, chunk_size=4096, max_topics=8, recover=True)
    try:
        rec = {r.partition: r for r in a2.recovered}
        assert sorted(rec) == [0, 1]
        r0, r1 = rec[0], rec[1]
        assert (r0.state, r0.topic, r0.record_count) == (STATE_STAMPED, "t", 3)
        assert (r0.producer_id, r0.producer_epoch, r0.base_sequence) == (555, 2, 40)
        assert r0.runs == [(7, 1_000_000 + at[0], 1), (9, 5_000_000, 2)]
        assert bytes(a2.buf[r0.offset : r0.offset + r0.length]) == bytes(b0.payload())
        assert (r1.state, r1.error_code, r1.base_offset, r1.log_append_ms) == (STATE_DONE, 0, 12345, 777)
        assert r1.runs == [(7, 1_000_000 + at[1], 1), (9, 5_000_000 + at[4] - at[3], 1)]
        assert (r0.ordinal, r1.ordinal) == (b0.ordinal, b1.ordinal)
        # Only the kept slots are allocated; the SEALED and OPEN ones are free again.
        assert sorted(a2.allocations()) == sorted(r.slot for r in a2.recovered)
        assert a2.used_bytes == sum(r.capacity for r in a2.recovered)
        assert a2.topic_index("t") == 0 and a2.topic_index("u") == 1
        for slot in a2.allocations():
            a2.free(slot)
        assert a2.used_bytes == 0
    finally:
        a2.close()
        b0 = b1 = b2 = None
        acc = None
        a.close()


def test_recovery_drops_a_torn_restamp_and_unknown_runs_and_other_layouts(tmp_path) -> None:
    path = str(tmp_path / "arena-0")
    a = Arena(256 * 1024, path=path, chunk_size=4096, max_topics=8)
    acc = Accumulator(buffer_memory=256 * 1024, profile_for=lambda t: Profile(linger_ms=0), arena=a)
    data, _ = _frames([0, 1, 2])
    acc.append_region(data, 0, len(data), ["t"], [3], 1, 7, 0, 0.0)
    b0, b1, b2 = sorted(acc.ready(1e18), key=lambda b: b.partition)
    for b in (b0, b1, b2):
        b.stamp(9, 0, 0)
    # b0: a re-stamp torn by the crash (producer id written, CRC not): never sent in that form.
    struct.pack_into(">q", a.buf, b0.offset + OFFSET_PRODUCER_ID, 10)
    # b1: its runs table said "unknown".
    struct.pack_into("<I", a.buf, b1.offset + ((b1.size + 7) & -8), RUNS_UNKNOWN)
    a2 = Arena(256 * 1024, path=path, chunk_size=4096, max_topics=8, recover=True)
    try:
        assert [r.partition for r in a2.recovered] == [2]
    finally:
        a2.close()
    # Another geometry: a fresh arena, nothing recovered.
    a3 = Arena(512 * 1024, path=str(tmp_path / "arena-0b"), chunk_size=4096, recover=True)
    a4 = Arena(128 * 1024, path=path, chunk_size=4096, max_topics=8, recover=True)
    try:
        assert a3.recovered == [] and a4.recovered == [] and a4.used_bytes == 0
    finally:
        a3.close()
        a4.close()
        b0 = b1 = b2 = None
        acc = None
        a.close()
