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
