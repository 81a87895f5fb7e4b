"""The layout docstring's tables are the code's offsets, and the cache-line rules hold."""

from __future__ import annotations

import re

import shm.layout as layout
from shm.layout import (
    CACHE_LINE,
    DROP_COUNTERS,
    DROP_COUNTERS_BYTES,
    RING_HEADER_BYTES,
    RING_HEADER_FIELDS,
    RING_OFFSETS,
    SEGMENT_HEADER_BYTES,
    SEGMENT_HEADER_FIELDS,
    SEGMENT_OFFSETS,
    drop_counters_offset,
    ring_offsets,
    segment_bytes,
)

_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\w+)\s*\|\s*([\w-]+)\s*\|\s*([\w-]+)\s*\|$")


def doc_tables() -> list[list[tuple[int, int, str, str, str]]]:
    """Each `| offset | size | field | writer | reader |` table of the module docstring."""
    tables: list[list[tuple[int, int, str, str, str]]] = []
    current: list[tuple[int, int, str, str, str]] | None = None
    for line in (layout.__doc__ or "").splitlines():
        line = line.strip()
        if line.replace(" ", "") == "|offset|size|field|writer|reader|":
            current = []
            tables.append(current)
        elif current is not None and line.startswith("|--"):
            continue
        elif current is not None and (m := _ROW.match(line)):
            current.append((int(m[1]), int(m[2]), m[3], m[4], m[5]))
        else:
            current = None
    return tables


def code_table(fields: tuple[layout.Field, ...], offsets: dict[str, int]) -> list[tuple[int, int, str, str, str]]:
    return [(offsets[f.name], f.size, f.name, f.writer, f.reader) for f in fields]


def test_docstring_tables_match_code() -> None:
    segment, ring = doc_tables()
    assert segment == code_table(SEGMENT_HEADER_FIELDS, SEGMENT_OFFSETS)
    assert ring == code_table(RING_HEADER_FIELDS, RING_OFFSETS)


def test_tables_are_contiguous_and_line_sized() -> None:
    for table, total in ((doc_tables()[0], SEGMENT_HEADER_BYTES), (doc_tables()[1], RING_HEADER_BYTES)):
        pos = 0
        for offset, size, *_ in table:
            assert offset == pos
            pos += size
        assert pos == total
        assert total % CACHE_LINE == 0


def line(offset: int) -> int:
    return offset // CACHE_LINE


def test_fields_written_by_different_processes_sit_on_different_lines() -> None:
    head, tail, flag = RING_OFFSETS["head"], RING_OFFSETS["tail"], RING_OFFSETS["reader_sleeping"]
    assert len({line(head), line(tail), line(flag), line(RING_OFFSETS["capacity"])}) == 4
    assert line(RING_OFFSETS["full_count"]) == line(head)  # writer-owned, with the head
    assert line(SEGMENT_OFFSETS["client_heartbeat_ns"]) != line(SEGMENT_OFFSETS["daemon_heartbeat_ns"])
    assert line(SEGMENT_OFFSETS["client_heartbeat_ns"]) != line(SEGMENT_OFFSETS["magic"])
    # Positions are 8-byte aligned, so their stores are single aligned 8-byte stores.
    assert head % 8 == 0 and tail % 8 == 0


def test_rings_follow_the_header_and_each_other() -> None:
    req0, comp0 = ring_offsets(0, 4096, 1024)
    req1, comp1 = ring_offsets(1, 4096, 1024)
    assert req0 == SEGMENT_HEADER_BYTES
    assert comp0 == req0 + RING_HEADER_BYTES + 4096
    assert req1 == comp0 + RING_HEADER_BYTES + 1024
    drops = drop_counters_offset(2, 4096, 1024)
    assert drops == comp1 + RING_HEADER_BYTES + 1024
    assert segment_bytes(2, 4096, 1024) == drops + DROP_COUNTERS_BYTES
    assert all(x % CACHE_LINE == 0 for x in (req0, comp0, req1, comp1, drops))


def test_drop_counters_cover_every_topic_id() -> None:
    # Ring frames carry a u16 topic id; the counters are aligned u64s, one per id.
    assert DROP_COUNTERS == 1 << 16 and DROP_COUNTERS_BYTES == 8 * DROP_COUNTERS
    for shape in ((1, 64, 64), (3, 4096, 1024), (126, 1 << 20, 1 << 16)):
        assert drop_counters_offset(*shape) % 8 == 0
