"""The per-worker batch arena: one shared mapping holding every batch a worker has in memory.

The mapping is a file in the runtime directory (anonymous memory in tests), so that a restarted
worker finds the batches its predecessor stamped and re-sends them byte for byte (the broker's
idempotence drops what was already written), and knows which ring records they hold so it does
not read those again (``Arena(..., recover=True)``, :attr:`Arena.recovered`). Every batch is
described by a slot in a fixed table, and a slot says which topic and partition the bytes belong
to and how far they got; a *runs table* after the batch bytes says whose records they are.

Layout (all integers little-endian; ``HEADER``, ``SLOT`` and ``TOPIC_ENTRY`` below are the structs
the offsets are derived from)::

    +-------------------+  0
    | arena header      |  HEADER_SIZE bytes
    +-------------------+  topics_offset
    | topic table       |  max_topics x TOPIC_ENTRY_SIZE
    +-------------------+  slots_offset
    | slot table        |  n_chunks x SLOT_SIZE (slot i describes the batch starting at chunk i)
    +-------------------+  data_offset (a multiple of chunk_size)
    | data: n_chunks x  |  a batch occupies contiguous chunks; its RecordBatch v2 bytes start
    | chunk_size        |  at the first one
    +-------------------+

Arena header:

| offset | size | field | writer | reader |
|---|---|---|---|---|
| 0 | 8 | magic | creator (worker) | recovery |
| 8 | 4 | version | creator (worker) | recovery |
| 12 | 4 | chunk_size | creator (worker) | recovery |
| 16 | 4 | n_chunks | creator (worker) | recovery |
| 20 | 4 | max_topics | creator (worker) | recovery |
| 24 | 8 | topics_offset | creator (worker) | recovery |
| 32 | 8 | slots_offset | creator (worker) | recovery |
| 40 | 8 | data_offset | creator (worker) | recovery |
| 48 | 16 | reserved | nobody | nobody |

Slot (one per chunk; only the slot of a batch's first chunk is used):

| offset | size | field | writer | reader |
|---|---|---|---|---|
| 0 | 4 | state | worker | recovery |
| 4 | 4 | topic_index | worker | recovery |
| 8 | 4 | partition | worker | recovery |
| 12 | 4 | record_count | worker | recovery |
| 16 | 8 | offset | worker | recovery |
| 24 | 4 | length | worker | recovery |
| 28 | 4 | capacity | worker | recovery |

``offset`` is the batch's byte offset from the start of the mapping, ``length`` the bytes of the
finished RecordBatch (0 while open), ``capacity`` the bytes reserved for it.

Topic table entry: a 2-byte name length (0 = unused) followed by the UTF-8 name (Kafka allows at
most 249 characters), TOPIC_ENTRY_SIZE bytes in all; entries are appended, never moved.

Runs table: written at sealing right after the batch bytes, at ``offset + align8(length)``,
inside the slot's reservation (``capacity`` covers it). A header, then ``n_runs`` runs:

| offset | size | field | writer | reader |
|---|---|---|---|---|
| 0 | 4 | n_runs | worker | recovery |
| 4 | 2 | error_code | worker | recovery |
| 6 | 2 | reserved | nobody | nobody |
| 8 | 8 | ordinal | worker | recovery |
| 16 | 8 | base_offset | worker | recovery |
| 24 | 8 | log_append_ms | worker | recovery |

Run (consecutive records of this batch from one client's request ring, in ring order):

| offset | size | field | writer | reader |
|---|---|---|---|---|
| 0 | 8 | client_id | worker | recovery |
| 8 | 8 | first_position | worker | recovery |
| 16 | 4 | count | worker | recovery |
| 20 | 4 | reserved | nobody | nobody |

``n_runs`` is RUNS_UNKNOWN (0xFFFFFFFF) when the runs did not fit: recovery then cannot tell whose
records the batch holds and leaves them to be read from the rings again (at least once).
``first_position`` is the 64-bit ring position of the run's first record (-1: not from a ring);
the run is the next ``count`` records of this batch's partition in that client's ring from
there. ``ordinal`` orders a partition's batches (creation order). ``error_code``, ``base_offset``
and ``log_append_ms`` are the batch's outcome, valid in state DONE.

Ordering: the worker writes a batch's bytes and the slot's other fields first and its ``state``
last, with one aligned 4-byte store (x86-64 does not reorder stores with other stores), so a
reader that sees SEALED or STAMPED also sees the finished bytes. States: FREE (0), OPEN (1,
being filled; its bytes are incomplete), SEALED (2, a finished batch and its runs table, not yet
given a producer id and sequence), STAMPED (3, producer id, epoch and base sequence written: it
may have reached the broker, so a re-send must use exactly these bytes), DONE (4, the outcome is
in the runs table; the slot is kept until the client has been told, i.e. until every chunk its
records belong to is complete, so a restarted worker neither re-sends nor re-reads its records).
A worker that dies leaves OPEN and SEALED slots, which recovery discards (their records were
never sent and are read from the rings again), and STAMPED and DONE slots, which it keeps.

The allocator (first fit over a sorted list of free extents, coalesced on free) lives in the
process, not in the mapping: recovery rebuilds it from the slots.
"""

from __future__ import annotations

import bisect
import logging
import mmap
import os
import struct
from typing import NamedTuple

from crc32c import crc32c

from daemon.protocol.records import OFFSET_ATTRIBUTES, OFFSET_CRC, OFFSET_PRODUCER_ID

__all__ = [
    "Arena",
    "HEADER",
    "HEADER_SIZE",
    "SLOT",
    "SLOT_SIZE",
    "TOPIC_ENTRY_SIZE",
    "MAX_TOPIC_NAME",
    "STATE_FREE",
    "STATE_OPEN",
    "STATE_SEALED",
    "STATE_STAMPED",
    "STATE_DONE",
    "RUNS_HEADER",
    "RUN",
    "RUNS_UNKNOWN",
    "RecoveredSlot",
    "MAGIC",
    "VERSION",
    "header_field_offsets",
    "slot_field_offsets",
    "runs_header_field_offsets",
    "run_field_offsets",
]

log = logging.getLogger("sluice.arena")

MAGIC = int.from_bytes(b"SLUICEAR", "little")  # the first 8 bytes read "SLUICEAR"
VERSION = 2  # 2: runs table after the batch bytes, state DONE

# Field name, struct code, in layout order. Offsets below derive from these with calcsize.
_HEADER_FIELDS = (
    ("magic", "Q"),
    ("version", "I"),
    ("chunk_size", "I"),
    ("n_chunks", "I"),
    ("max_topics", "I"),
    ("topics_offset", "Q"),
    ("slots_offset", "Q"),
    ("data_offset", "Q"),
    ("reserved", "16s"),
)
_SLOT_FIELDS = (
    ("state", "I"),
    ("topic_index", "I"),
    ("partition", "i"),
    ("record_count", "I"),
    ("offset", "Q"),
    ("length", "I"),
    ("capacity", "I"),
)
_RUNS_HEADER_FIELDS = (
    ("n_runs", "I"),
    ("error_code", "h"),
    ("reserved", "H"),
    ("ordinal", "q"),
    ("base_offset", "q"),
    ("log_append_ms", "q"),
)
_RUN_FIELDS = (
    ("client_id", "Q"),
    ("first_position", "q"),
    ("count", "I"),
    ("reserved", "I"),
)


def _offsets(fields: tuple[tuple[str, str], ...]) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    fmt = "<"
    for name, code in fields:
        out[name] = (struct.calcsize(fmt), struct.calcsize("<" + code))
        fmt += code
    return out


def header_field_offsets() -> dict[str, tuple[int, int]]:
    """``{field: (offset, size)}`` of the arena header, derived from the struct."""
    return _offsets(_HEADER_FIELDS)


def slot_field_offsets() -> dict[str, tuple[int, int]]:
    """``{field: (offset, size)}`` of a slot, derived from the struct."""
    return _offsets(_SLOT_FIELDS)


def runs_header_field_offsets() -> dict[str, tuple[int, int]]:
    """``{field: (offset, size)}`` of the runs table header, derived from the struct."""
    return _offsets(_RUNS_HEADER_FIELDS)


def run_field_offsets() -> dict[str, tuple[int, int]]:
    """``{field: (offset, size)}`` of one run of the runs table, derived from the struct."""
    return _offsets(_RUN_FIELDS)


HEADER = struct.Struct("<" + "".join(c for _, c in _HEADER_FIELDS))
HEADER_SIZE = HEADER.size
SLOT = struct.Struct("<" + "".join(c for _, c in _SLOT_FIELDS))
SLOT_SIZE = SLOT.size
_STATE = struct.Struct("<I")
_STATE_AT = slot_field_offsets()["state"][0]
# topic_index, partition, record_count, offset, length, capacity: everything after the state.
_SLOT_BODY = struct.Struct("<" + "".join(c for _, c in _SLOT_FIELDS[1:]))
_SLOT_BODY_AT = slot_field_offsets()["topic_index"][0]
_SLOT_COUNT_AT = slot_field_offsets()["record_count"][0]
_SLOT_LENGTH_AT = slot_field_offsets()["length"][0]
_SLOT_CAPACITY_AT = slot_field_offsets()["capacity"][0]
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
RUNS_HEADER = struct.Struct("<" + "".join(c for _, c in _RUNS_HEADER_FIELDS))
RUN = struct.Struct("<" + "".join(c for _, c in _RUN_FIELDS))
RUNS_UNKNOWN = 0xFFFFFFFF
_RESULT = struct.Struct("<h")  # error_code; base_offset and log_append_ms follow the ordinal
_RESULT_AT = runs_header_field_offsets()["error_code"][0]
_ORDINAL = struct.Struct("<qqq")  # ordinal, base_offset, log_append_ms
_ORDINAL_AT = runs_header_field_offsets()["ordinal"][0]
_PRODUCER = struct.Struct(">qhi")  # producer id, epoch, base sequence, as in the RecordBatch
_BE_U32 = struct.Struct(">I")

TOPIC_ENTRY_SIZE = 256
MAX_TOPIC_NAME = TOPIC_ENTRY_SIZE - _U16.size

STATE_FREE, STATE_OPEN, STATE_SEALED, STATE_STAMPED, STATE_DONE = 0, 1, 2, 3, 4


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def runs_table_size(n_runs: int) -> int:
    """Bytes of a runs table of ``n_runs`` runs."""
    return RUNS_HEADER.size + n_runs * RUN.size


class RecoveredSlot(NamedTuple):
    """A STAMPED or DONE slot found by ``Arena(..., recover=True)``.

    ``runs`` is ``[(client_id, first_position, count)]`` in the batch's record order, or None
    when the table said RUNS_UNKNOWN (then the slot is not kept: see :attr:`Arena.recovered`).
    ``producer_id``/``producer_epoch``/``base_sequence`` are read from the RecordBatch bytes;
    ``error_code``/``base_offset``/``log_append_ms`` are meaningful in state DONE only.
    """

    slot: int
    state: int
    topic: str
    partition: int
    offset: int
    length: int
    capacity: int
    record_count: int
    producer_id: int
    producer_epoch: int
    base_sequence: int
    ordinal: int
    error_code: int
    base_offset: int
    log_append_ms: int
    runs: list[tuple[int, int, int]]


class Arena:
    """A fixed-size mapping of ``n_chunks`` chunks with a slot table and a first-fit allocator.

    Args:
        size: bytes of the data area (rounded down to whole chunks; at least one chunk).
        path: a file to map (created or truncated, then sized); anonymous memory when None.
        chunk_size: allocation unit in bytes, a multiple of 8.
        max_topics: entries in the topic table.
        recover: reopen ``path`` as a dead worker left it, when it holds an arena of this
            version and geometry: keep its STAMPED and DONE slots (allocated, listed in
            :attr:`recovered`) and free everything else. Otherwise (no file, another layout)
            start fresh, as without it.

    ``buf`` is a writable memoryview of the whole mapping. An allocation is identified by its
    first chunk, which is also the index of its slot.
    """

    def __init__(
        self,
        size: int,
        *,
        path: str | None = None,
        chunk_size: int = 4096,
        max_topics: int = 1024,
        recover: bool = False,
    ) -> None:
        if chunk_size <= 0 or chunk_size % 8:
            raise ValueError(f"chunk_size must be a positive multiple of 8, not {chunk_size}")
        n_chunks = size // chunk_size
        if n_chunks < 1:
            raise ValueError(f"arena size {size} is smaller than one chunk ({chunk_size})")
        if max_topics < 1:
            raise ValueError("max_topics must be at least 1")
        self.chunk_size = chunk_size
        self.n_chunks = n_chunks
        self.max_topics = max_topics
        self.topics_offset = _align(HEADER_SIZE, 64)
        self.slots_offset = _align(self.topics_offset + max_topics * TOPIC_ENTRY_SIZE, 64)
        self.data_offset = _align(self.slots_offset + n_chunks * SLOT_SIZE, max(chunk_size, mmap.PAGESIZE))
        self.total_size = self.data_offset + n_chunks * chunk_size
        self.path = path
        # Free extents as parallel structures: sorted starts for first fit and coalescing by
        # bisect, and start -> length.
        self._free_starts: list[int] = [0]
        self._free_len: dict[int, int] = {0: n_chunks}
        self._alloc_len: dict[int, int] = {}
        self._used_chunks = 0
        self._topics: dict[str, int] = {}
        self.recovered: list[RecoveredSlot] = []
        """STAMPED and DONE slots kept by ``recover=True``, still allocated (free them with
        :meth:`free` when done). Empty otherwise."""
        self._mmap = self._reopen(path) if recover and path is not None else None
        if self._mmap is not None:
            self.buf = memoryview(self._mmap)
            self._recover()
            return
        if path is None:
            self._mmap = mmap.mmap(-1, self.total_size)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, self.total_size)
                self._mmap = mmap.mmap(fd, self.total_size)
            finally:
                os.close(fd)
        self.buf = memoryview(self._mmap)
        HEADER.pack_into(
            self.buf, 0, MAGIC, VERSION, chunk_size, n_chunks, max_topics,
            self.topics_offset, self.slots_offset, self.data_offset, b"",
        )

    # -- recovery ----------------------------------------------------------------------------

    def _reopen(self, path: str) -> mmap.mmap | None:
        """The existing file mapped as it is, if it holds an arena of exactly this layout."""
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return None
        try:
            if os.fstat(fd).st_size != self.total_size:
                return None
            mm = mmap.mmap(fd, self.total_size)
        finally:
            os.close(fd)
        want = (MAGIC, VERSION, self.chunk_size, self.n_chunks, self.max_topics,
                self.topics_offset, self.slots_offset, self.data_offset)
        if HEADER.unpack_from(mm, 0)[:8] != want:
            mm.close()
            return None
        return mm

    def _recover(self) -> None:
        """Rebuild the topic table and the allocator from a dead worker's mapping.

        Keeps STAMPED slots whose batch CRC checks (a re-stamp interrupted mid-write fails it;
        re-stamps only happen to batches the broker refused, so such a batch was never
        written and is read from the rings again) and DONE slots, both only with a runs table;
        frees every other slot.
        """
        buf = self.buf
        for idx in range(self.max_topics):
            at = self.topics_offset + idx * TOPIC_ENTRY_SIZE
            (n,) = _U16.unpack_from(buf, at)
            if n == 0 or n > MAX_TOPIC_NAME:
                break
            self._topics[bytes(buf[at + 2 : at + 2 + n]).decode("utf-8", "replace")] = idx
        names = {i: t for t, i in self._topics.items()}
        kept: list[tuple[int, int]] = []  # (slot, chunks)
        slot = 0
        n_chunks = self.n_chunks
        while slot < n_chunks:
            at = self._slot_at(slot)
            state, tindex, part, count, offset, length, cap = SLOT.unpack_from(buf, at)
            if state == STATE_FREE:
                slot += 1
                continue
            chunks = cap // self.chunk_size
            rec = None
            if (
                state in (STATE_STAMPED, STATE_DONE)
                and offset == self.offset(slot)
                and cap % self.chunk_size == 0
                and 0 < chunks <= n_chunks - slot
                and 0 < length
                and _align(length, 8) + RUNS_HEADER.size <= cap
                and tindex in names
            ):
                rec = self._read_recovered(slot, state, names[tindex], part, count, offset, length, cap)
            if rec is None:
                if state not in (STATE_OPEN, STATE_SEALED):
                    log.warning("arena %s: slot %d (state %d) not recoverable; its records are read again",
                                self.path, slot, state)
                _STATE.pack_into(buf, at + _STATE_AT, STATE_FREE)
                slot += 1
                continue
            self.recovered.append(rec)
            kept.append((slot, chunks))
            # Slots inside a kept allocation are stale (left by older batches): clear them.
            for inner in range(slot + 1, slot + chunks):
                _STATE.pack_into(buf, self._slot_at(inner) + _STATE_AT, STATE_FREE)
            slot += chunks
        # The allocator: everything free except the kept allocations.
        self._free_starts = []
        self._free_len = {}
        cur = 0
        for start, chunks in kept:
            if start > cur:
                self._free_starts.append(cur)
                self._free_len[cur] = start - cur
            self._alloc_len[start] = chunks
            self._used_chunks += chunks
            cur = start + chunks
        if cur < n_chunks:
            self._free_starts.append(cur)
            self._free_len[cur] = n_chunks - cur

    def _read_recovered(
        self, slot: int, state: int, topic: str, part: int, count: int, offset: int, length: int, cap: int
    ) -> RecoveredSlot | None:
        buf = self.buf
        tat = offset + _align(length, 8)
        n_runs, err, _r, ordinal, base, ts = RUNS_HEADER.unpack_from(buf, tat)
        if n_runs == RUNS_UNKNOWN or _align(length, 8) + runs_table_size(n_runs) > cap:
            return None
        runs = [RUN.unpack_from(buf, tat + RUNS_HEADER.size + i * RUN.size)[:3] for i in range(n_runs)]
        if sum(r[2] for r in runs) != count or any(r[1] < 0 for r in runs):
            return None
        if state == STATE_STAMPED:
            (crc,) = _BE_U32.unpack_from(buf, offset + OFFSET_CRC)
            if crc32c(buf[offset + OFFSET_ATTRIBUTES : offset + length]) != crc:
                return None
        pid, epoch, seq = _PRODUCER.unpack_from(buf, offset + OFFSET_PRODUCER_ID)
        return RecoveredSlot(slot, state, topic, part, offset, length, cap, count, pid, epoch, seq,
                             ordinal, err, base, ts, runs)

    # -- sizes -------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Bytes in the data area."""
        return self.n_chunks * self.chunk_size

    @property
    def used_bytes(self) -> int:
        """Bytes of the data area reserved by live allocations (whole chunks)."""
        return self._used_chunks * self.chunk_size

    @property
    def free_bytes(self) -> int:
        return (self.n_chunks - self._used_chunks) * self.chunk_size

    def chunks_for(self, nbytes: int) -> int:
        """Chunks an allocation of ``nbytes`` takes."""
        return max(1, -(-nbytes // self.chunk_size))

    # -- allocation --------------------------------------------------------------------------

    def alloc(self, nbytes: int) -> int:
        """Reserve contiguous chunks for ``nbytes``; returns the slot (first chunk) or -1 if no room."""
        need = self.chunks_for(nbytes)
        free_len = self._free_len
        for start in self._free_starts:
            length = free_len[start]
            if length >= need:
                break
        else:
            return -1
        del free_len[start]
        if length == need:
            self._free_starts.remove(start)
        else:
            # Keep the remainder where it is in the sorted list: replace the start in place.
            i = bisect.bisect_left(self._free_starts, start)
            self._free_starts[i] = start + need
            free_len[start + need] = length - need
        self._alloc_len[start] = need
        self._used_chunks += need
        return start

    def capacity(self, slot: int) -> int:
        """Bytes reserved for the allocation at ``slot``."""
        return self._alloc_len[slot] * self.chunk_size

    def offset(self, slot: int) -> int:
        """Byte offset in ``buf`` of the allocation at ``slot``."""
        return self.data_offset + slot * self.chunk_size

    def shrink(self, slot: int, nbytes: int) -> None:
        """Give back the chunks of an allocation beyond the first ``nbytes``."""
        have = self._alloc_len[slot]
        keep = self.chunks_for(nbytes)
        if keep >= have:
            return
        self._alloc_len[slot] = keep
        self._release(slot + keep, have - keep)

    def free(self, slot: int) -> None:
        """Release an allocation and mark its slot FREE."""
        length = self._alloc_len.pop(slot)
        self.set_state(slot, STATE_FREE)
        self._release(slot, length)

    def _release(self, start: int, length: int) -> None:
        self._used_chunks -= length
        starts = self._free_starts
        free_len = self._free_len
        i = bisect.bisect_left(starts, start)
        # Coalesce with the following extent.
        if i < len(starts) and starts[i] == start + length:
            length += free_len.pop(starts[i])
            del starts[i]
        # Coalesce with the preceding extent.
        if i > 0 and starts[i - 1] + free_len[starts[i - 1]] == start:
            free_len[starts[i - 1]] += length
        else:
            starts.insert(i, start)
            free_len[start] = length

    def largest_free_bytes(self) -> int:
        """Bytes of the largest free extent: the largest allocation that would succeed now."""
        return max(self._free_len.values(), default=0) * self.chunk_size

    def free_extents(self) -> list[tuple[int, int]]:
        """``[(first_chunk, n_chunks)]`` of the free space, in address order (tests, stats)."""
        return [(s, self._free_len[s]) for s in self._free_starts]

    def allocations(self) -> dict[int, int]:
        """``{slot: n_chunks}`` of the live allocations (tests, stats)."""
        return dict(self._alloc_len)

    # -- slot table and topic table --------------------------------------------------------

    def topic_index(self, topic: str) -> int:
        """The topic table index of ``topic``, adding it on first use."""
        idx = self._topics.get(topic)
        if idx is not None:
            return idx
        name = topic.encode("utf-8")
        if len(name) > MAX_TOPIC_NAME:
            raise ValueError(f"topic name longer than {MAX_TOPIC_NAME} bytes: {topic!r}")
        idx = len(self._topics)
        if idx >= self.max_topics:
            raise ValueError(f"arena topic table is full ({self.max_topics} topics)")
        at = self.topics_offset + idx * TOPIC_ENTRY_SIZE
        self.buf[at + _U16.size : at + _U16.size + len(name)] = name
        _U16.pack_into(self.buf, at, len(name))
        self._topics[topic] = idx
        return idx

    def topic_name(self, index: int) -> str:
        """The topic stored at ``index`` of the topic table (read back from the mapping)."""
        at = self.topics_offset + index * TOPIC_ENTRY_SIZE
        (n,) = _U16.unpack_from(self.buf, at)
        return bytes(self.buf[at + _U16.size : at + _U16.size + n]).decode("utf-8")

    def _slot_at(self, slot: int) -> int:
        return self.slots_offset + slot * SLOT_SIZE

    def open_slot(self, slot: int, topic_index: int, partition: int) -> None:
        """Describe a new batch at ``slot`` (state OPEN)."""
        at = self._slot_at(slot)
        _SLOT_BODY.pack_into(
            self.buf, at + _SLOT_BODY_AT, topic_index, partition, 0, self.offset(slot), 0, self.capacity(slot)
        )
        _STATE.pack_into(self.buf, at + _STATE_AT, STATE_OPEN)

    def seal_slot(self, slot: int, length: int, record_count: int) -> None:
        """Record a finished batch's length and count, then publish state SEALED (last store)."""
        at = self._slot_at(slot)
        _U32.pack_into(self.buf, at + _SLOT_COUNT_AT, record_count)
        _U32.pack_into(self.buf, at + _SLOT_LENGTH_AT, length)
        # capacity may have shrunk since open_slot.
        _U32.pack_into(self.buf, at + _SLOT_CAPACITY_AT, self.capacity(slot))
        _STATE.pack_into(self.buf, at + _STATE_AT, STATE_SEALED)

    def set_state(self, slot: int, state: int) -> None:
        """Publish a slot state with one aligned 4-byte store."""
        _STATE.pack_into(self.buf, self._slot_at(slot) + _STATE_AT, state)

    def write_runs(self, slot: int, length: int, ordinal: int, runs: list[int]) -> int:
        """Write the runs table of the batch at ``slot`` (``length`` bytes) after its bytes.

        ``runs`` is flat: ``[client_id, first_position, count, ...]``. Returns the bytes the
        slot needs from now on (batch, padding, table); when the table does not fit the
        reservation, writes RUNS_UNKNOWN instead (if even that header fits).
        """
        buf = self.buf
        at = self.offset(slot) + _align(length, 8)
        cap = self.capacity(slot)
        n = len(runs) // 3
        need = _align(length, 8) + runs_table_size(n)
        if need > cap:
            if _align(length, 8) + RUNS_HEADER.size > cap:
                return length
            RUNS_HEADER.pack_into(buf, at, RUNS_UNKNOWN, 0, 0, ordinal, -1, -1)
            return _align(length, 8) + RUNS_HEADER.size
        RUNS_HEADER.pack_into(buf, at, n, 0, 0, ordinal, -1, -1)
        p = at + RUNS_HEADER.size
        pack = RUN.pack_into
        for i in range(0, len(runs), 3):
            pack(buf, p, runs[i], runs[i + 1], runs[i + 2], 0)
            p += RUN.size
        return need

    def set_result(self, slot: int, error_code: int, base_offset: int, log_append_ms: int) -> bool:
        """Record a batch's outcome in its runs table, then publish state DONE (last store).

        Returns False (and changes nothing) when the slot has no runs table to hold it.
        """
        buf = self.buf
        _state, _t, _p, _c, offset, length, cap = SLOT.unpack_from(buf, self._slot_at(slot))
        at = offset + _align(length, 8)
        if length <= 0 or _align(length, 8) + RUNS_HEADER.size > cap:
            return False
        (n_runs,) = _U32.unpack_from(buf, at)
        if n_runs == RUNS_UNKNOWN:
            return False
        _RESULT.pack_into(buf, at + _RESULT_AT, error_code)
        ordinal = _ORDINAL.unpack_from(buf, at + _ORDINAL_AT)[0]
        _ORDINAL.pack_into(buf, at + _ORDINAL_AT, ordinal, base_offset, log_append_ms)
        self.set_state(slot, STATE_DONE)
        return True

    def set_ordinal(self, slot: int, ordinal: int) -> None:
        """Rewrite the ordinal of a kept slot (recovery renumbers them for the new worker)."""
        _state, _t, _p, _c, offset, length, _cap = SLOT.unpack_from(self.buf, self._slot_at(slot))
        at = offset + _align(length, 8) + _ORDINAL_AT
        _o, base, ts = _ORDINAL.unpack_from(self.buf, at)
        _ORDINAL.pack_into(self.buf, at, ordinal, base, ts)

    def read_slot(self, slot: int) -> dict[str, int]:
        """The slot's fields as stored in the mapping (tests, future recovery)."""
        values = SLOT.unpack_from(self.buf, self._slot_at(slot))
        return dict(zip((name for name, _ in _SLOT_FIELDS), values))

    def close(self) -> None:
        """Unmap. Views handed out (batch payloads) must have been released first."""
        self.buf.release()
        self._mmap.close()
