"""The accumulator: one open RecordBatch v2 per partition, built in place in the worker arena.

Records enter either in bulk straight from a private copy of a client's request-ring region
(:meth:`Accumulator.append_region`, the shared-memory path) or one at a time
(:meth:`Accumulator.append`). Either way each record is validated and copied once into the
arena, behind the 61-byte header space of its partition's open batch, by the compiled core
:mod:`daemon._batcher`: Python runs per batch (open, close, seal), never per record.

A batch is closed when the next record does not fit its reservation (``profile.batch_size``, or
one record's size when that is larger), after ``profile.linger_ms`` since its first record, or
on :meth:`Accumulator.flush`. :meth:`Accumulator.ready` finishes closed batches (compression,
header, CRC32C, runs table) and hands them to the sender; :meth:`Accumulator.release` frees
their chunks afterwards.

Back-pressure: a batch is only ever opened at its full reservation. When the arena
(``buffer_memory``) cannot hold one, appends return APPEND_FULL and the worker stops draining
until a good part of the arena is free again (:meth:`Accumulator.has_room`, hysteresis). There
is no small "fallback" batch for a nearly full arena: such batches fragmented the arena until no
normal batch fitted again (issue 12, "the collapse").

Per-record state of the open batches lives in one table the compiled code reads and writes
(``state``, one row per (topic, partition); the row layout is ``daemon._batcher.S_*``); a
:class:`~daemon.batch.Batch` is synced from its row when it closes.

Splitting: a sealed batch the broker refuses as too large (MESSAGE_TOO_LARGE,
RECORD_LIST_TOO_LARGE) is cut in two halves by :meth:`Accumulator.split`, as the Java producer
splits such batches: each half is a sealed batch of its own in a new arena slot, with its part
of the records and of the runs table, and the old slot is freed *before* the sender stamps the
halves. A worker that dies in between finds the halves SEALED (discarded) and the records still
in the rings (read again); one that dies later finds the stamped halves, each a whole batch with
exact runs. Ordinals step by :data:`ORDINAL_STRIDE`, so the halves' ordinals fit between their
batch's and the next one's and completions keep each partition's record order. A run cut in the
middle needs the ring position of the first record of its second part: ``locate`` finds it.

A batch recovered from a dead worker's arena is split the same way once the worker's recovery
has installed :attr:`Accumulator.on_recovered_split` (:mod:`daemon.recovery`): its parts are
:class:`~daemon.batch.RecoveredBatch` parts of it, and the recovery, not the accumulator, decides
what becomes of the old slot. Its runs belong to clients of the dead worker: a cut run of a
client that is attached but whose ring the recovery has not read that far yet (or that is about
to attach) raises :class:`SplitDeferred` (try again shortly); one of a client that will never
attach keeps its position (nobody reads it).

It knows no asyncio: the sender asks :meth:`ready` what is ready now and :meth:`next_deadline`
when to ask again. Clock: ``time.monotonic() * 1000`` (``now_ms``) everywhere.
"""

from __future__ import annotations

import heapq
import struct
from array import array
from typing import Callable, Sequence

from daemon import _batcher as nat
from daemon.arena import RUN, RUNS_HEADER, Arena, RecoveredSlot, runs_table_size
from daemon.batch import Batch, RecoveredBatch
from daemon.config import Profile
from daemon.protocol.records import HEADER_SIZE, encode_records, finish_batch, record_bodies
from shm.frames import RECORD_HEADER
from shm.layout import FRAME_HEADER

__all__ = [
    "APPEND_OK",
    "APPEND_FULL",
    "APPEND_TOO_LARGE",
    "APPEND_INVALID",
    "APPEND_MALFORMED",
    "Accumulator",
    "Locate",
    "ORDINAL_STRIDE",
    "SplitDeferred",
]

APPEND_OK, APPEND_FULL, APPEND_TOO_LARGE, APPEND_INVALID, APPEND_MALFORMED = 0, 1, 2, 3, 4

# The frame header and RECORD prefix of the frame the compiled walk stopped at (per batch).
_FRAME_RECORD = struct.Struct("<" + FRAME_HEADER.format.lstrip("<") + RECORD_HEADER.format.lstrip("<"))
_RECORD_FRAME_BYTES = _FRAME_RECORD.size  # 24

# Bytes a batch keeps free behind its records for its runs table (daemon/arena.py): alignment
# padding, the header, the first run and one spare run. Each later run (another chunk) takes
# the spare and reserves a new one (the spare covers a run that starts after the records of the
# call were admitted), so the table always fits the reservation.
_RUN_SIZE = RUN.size
_TABLE_RESERVE = 7 + RUNS_HEADER.size + 2 * _RUN_SIZE

# New batches' ordinals step by this: a batch split in halves (and halves split again, down to
# single records) gives its parts ordinals between its own and the next batch's.
ORDINAL_STRIDE = 1 << 20

# (client id, ring position of a run's first record, topic, partition, k) -> the ring position
# of the run's record k (0 = the first), or -1 when it cannot be found.
Locate = Callable[[int, int, str, int, int], int]


class SplitDeferred(Exception):
    """A recovered batch cannot be split yet: a run it cuts lies where its client's ring has
    not been read again so far. Retry after a backoff (bounded by the delivery timeout)."""


# Draining resumes once this share of the arena is free again (and at least two full batches
# fit): resuming at the first free chunk refilled the arena at once and starved the sender.
RESUME_FREE_FRACTION = 0.25

_W = nat.STATE_WIDTH
_S_OPEN, _S_WRITE_AT, _S_ROOM, _S_COUNT = nat.S_OPEN, nat.S_WRITE_AT, nat.S_ROOM, nat.S_COUNT
_S_BASE_TS, _S_DMAX, _S_TOUCHED, _S_N0, _S_P0 = nat.S_BASE_TS, nat.S_DMAX, nat.S_TOUCHED, nat.S_N0, nat.S_P0
_RC_OK, _RC_NEED_BATCH, _RC_PARTIAL = nat.RC_OK, nat.RC_NEED_BATCH, nat.RC_PARTIAL
_RC_BAD_BODY, _RC_BAD_PADDING = nat.RC_BAD_BODY, nat.RC_BAD_PADDING
_append_region = nat.append_region
_append_record = nat.append_record


class Accumulator:
    """Per-partition batching into the worker arena. See the module docstring.

    Args:
        buffer_memory: bound on the bytes of batches held (the arena's data area when the
            accumulator creates its own arena).
        profile_for: the delivery profile of a topic; called once per new batch.
        arena: the worker's arena; an anonymous one of ``buffer_memory`` bytes when None.
        chunk_size: allocation unit of the arena created when ``arena`` is None.
        locate: finds a record's ring position when :meth:`split` cuts a run (without it, such
            a batch is not split).
    """

    def __init__(
        self,
        *,
        buffer_memory: int,
        profile_for: Callable[[str], Profile],
        arena: Arena | None = None,
        chunk_size: int = 4096,
        locate: Locate | None = None,
    ) -> None:
        if arena is None:
            arena = Arena(buffer_memory, chunk_size=chunk_size)
        self._arena = arena
        self._buf = arena.buf
        self._limit = min(buffer_memory, arena.size)
        self._profile_for = profile_for
        self._locate = locate
        self._open: dict[tuple[str, int], Batch] = {}
        self._closed: list[Batch] = []  # closed because full: ready at the next ready()
        self._deadlines: list[tuple[float, int, Batch]] = []  # linger heap, stale entries skipped
        self._seq = 0
        self._flush_requested = False
        # The state table: rows per topic name, contiguous per topic (its partitions in order).
        self._ranges: dict[str, tuple[int, int]] = {}  # topic -> (first row, partitions)
        self._nrows = 0
        self._state = bytearray(64 * _W * 8)
        self._st = memoryview(self._state).cast("q")
        self._rows: list[Batch | None] = [None] * 64
        self._touched = array("i", bytes(4 * 64))
        self._ntouched = 0
        # The compiled walk's topic table for the last topic list seen: (first row, partitions)
        # per topic id, first row -1 for an unregistered id.
        self._tnames: list[str | None] = []
        self._tcounts: list[int] = []
        self._topics = array("i")
        self._largest_batch = 0  # the largest reservation opened so far: the resume threshold
        self._call = (0, 0, 0)  # (chunk key, owner, position base) of the append call running
        # Set by the worker's recovery: takes over the old slot of a split recovered batch
        # (called with the batch and its parts, before the parts are stamped). Without it,
        # recovered batches are not split.
        self.on_recovered_split: Callable[[RecoveredBatch, list[RecoveredBatch]], None] | None = None

    # -- state ---------------------------------------------------------------------------------

    @property
    def arena(self) -> Arena:
        return self._arena

    @property
    def buffered_bytes(self) -> int:
        """Bytes reserved in the arena by open, ready and in-flight batches."""
        return self._arena.used_bytes

    @property
    def open_batches(self) -> int:
        return len(self._open)

    def has_room(self) -> bool:
        """True when draining may resume after APPEND_FULL: a quarter of ``buffer_memory`` (and
        room for two of the largest batches opened so far) is free, and the largest batch fits
        in one free extent."""
        free = self._limit - self._arena.used_bytes
        return (
            free >= self._limit * RESUME_FREE_FRACTION
            and free >= 2 * self._largest_batch
            and self._arena.largest_free_bytes() >= self._largest_batch
        )

    # -- the state table -----------------------------------------------------------------------

    def _rows_for(self, topic: str, partitions: int) -> int:
        """The first row of ``topic``'s range, grown to at least ``partitions`` rows."""
        rng = self._ranges.get(topic)
        if rng is not None and rng[1] >= partitions:
            return rng[0]
        first = self._nrows
        self._nrows += partitions
        if self._nrows > len(self._rows):
            self._grow(self._nrows)
        if rng is not None:
            # The topic grew: move its open batches' rows to the new range.
            st = self._st
            old, n = rng
            for p in range(n):
                b = self._rows[old + p]
                if b is not None:
                    st[(first + p) * _W : (first + p + 1) * _W] = st[(old + p) * _W : (old + p + 1) * _W]
                    st[(old + p) * _W : (old + p + 1) * _W] = array("q", bytes(8 * _W))
                    self._rows[first + p] = b
                    self._rows[old + p] = None
                    b._row = first + p
            # Touched rows are stored by number; topics change only between append calls.
            if self._ntouched:
                raise RuntimeError("a topic grew in the middle of an append call")
        self._ranges[topic] = (first, partitions)
        return first

    def _grow(self, rows: int) -> None:
        cap = max(rows, 2 * len(self._rows))
        state = bytearray(cap * _W * 8)
        state[: len(self._state)] = self._state
        self._st.release()
        self._state = state
        self._st = memoryview(state).cast("q")
        self._rows.extend([None] * (cap - len(self._rows)))
        touched = array("i", bytes(4 * cap))
        touched[: self._ntouched] = self._touched[: self._ntouched]
        self._touched = touched

    def _sync_topics(self, topics: Sequence[str | None], partition_counts: Sequence[int]) -> None:
        t = array("i")
        for name, parts in zip(topics, partition_counts):
            if name is None or parts <= 0:
                t += array("i", (-1, 0))
            else:
                t += array("i", (self._rows_for(name, parts), parts))
        self._topics = t
        self._tnames = list(topics)
        self._tcounts = list(partition_counts)

    # -- appending -----------------------------------------------------------------------------

    def append(
        self, topic: str, partition: int, timestamp_ms: int, body: bytes | memoryview, client_id: int, now_ms: float
    ) -> int:
        """Append one record body (see shm.frames) to the partition's open batch.

        Returns APPEND_OK, APPEND_FULL (the arena is full: retry after releases),
        APPEND_TOO_LARGE (the record alone exceeds ``max_request_size``) or APPEND_INVALID
        (the body is not one well-formed record body). Recovery cannot match these records
        to a ring position: their run starts at -1.
        """
        if not nat.body_valid(body, 0, len(body)):
            return APPEND_INVALID
        rng = self._ranges.get(topic)
        row = (rng[0] if rng is not None and partition < rng[1] else self._rows_for(topic, partition + 1)) + partition
        n0 = self._st[row * _W + _S_COUNT] if self._rows[row] is not None else 0
        self._call = (client_id, client_id, 0)
        code = _append_record(body, timestamp_ms, self._buf, self._state, row)
        if code == _RC_NEED_BATCH:
            code = self._open_batch(row, topic, partition, timestamp_ms, len(body), now_ms)
            if code != APPEND_OK:
                return code
            n0 = 0
            code = _append_record(body, timestamp_ms, self._buf, self._state, row)
        if code != _RC_OK:
            raise RuntimeError(f"accumulator state table broken (code {code})")
        b = self._rows[row]
        if b is None:
            raise RuntimeError("accumulator state table broken (an open row without its batch)")
        self._settle(b, row, self._st[row * _W + _S_COUNT] - n0, -1, client_id, client_id)
        return APPEND_OK

    def append_region(
        self,
        data: bytes,
        start: int,
        end: int,
        topics: Sequence[str | None],
        partition_counts: Sequence[int],
        chunk_key: int,
        owner: int,
        position_base: int,
        now_ms: float,
        wraps: bool = True,
        partial: bool = False,
    ) -> tuple[int, int, int]:
        """Append every RECORD frame of ``data[start:end]`` (whole ring frames, 8-byte aligned).

        Args:
            data: a private copy of ring frames (anything else is copied first: a client may
                rewrite its ring while it is read).
            start, end: the region to consume; ``start`` is a frame start.
            topics: the client's topic table, topic_id -> topic name (None = not registered).
            partition_counts: topic_id -> partition count, for validating frames.
            chunk_key: the worker's key for this drain (``Batch.runs`` names it).
            owner: the client whose ring this is (the runs tables' client id).
            position_base: the ring position of ``data[start]`` (the runs tables' positions).
            now_ms: the monotonic clock in ms.
            wraps: ``end`` is the end of the ring's data area (a padding frame may end there).
            partial: ``end`` cuts the committed frames (a drain budget): a frame running past it
                ends the call with APPEND_OK at its start instead of being invalid.

        Returns:
            ``(code, pos, count)``: ``pos`` is where consumption stopped (the ring may free up
            to it), ``count`` the records taken. ``code`` is APPEND_OK when everything up to
            ``end`` was consumed (a PADDING frame consumes the rest of the region), else the
            code of the frame at ``pos``: APPEND_FULL (retry later), APPEND_TOO_LARGE (the
            caller fails that record and continues after it), APPEND_MALFORMED (a RECORD whose
            body is not one well-formed record body, or a padding frame short of the wrap:
            disconnect the client) or APPEND_INVALID (a bad frame header, or a topic id or
            partition not known: disconnect the client unless a topic was announced late).
        """
        if type(data) is not bytes:
            data = bytes(data)
        if end > len(data) or start < 0 or start & 7 or end < start:
            raise ValueError("region outside the buffer or not 8-byte aligned")
        if topics != self._tnames or partition_counts != self._tcounts:
            self._sync_topics(topics, partition_counts)
        pos = start
        count = 0
        code = APPEND_OK
        self._call = (chunk_key, owner, position_base - start)
        while True:
            rc, pos, n, self._ntouched = _append_region(
                data, pos, end, wraps, self._buf, self._topics, self._state, self._touched, self._ntouched
            )
            count += n
            if rc == _RC_OK:
                break
            if rc != _RC_NEED_BATCH:
                if rc == _RC_BAD_BODY or rc == _RC_BAD_PADDING:
                    code = APPEND_MALFORMED
                elif not (partial and rc == _RC_PARTIAL):
                    code = APPEND_INVALID
                break
            if self._ntouched == len(self._touched):
                self._settle_touched(chunk_key, owner, position_base - start)
                continue
            plen, _ftype, tid, _flags, part, ts = _FRAME_RECORD.unpack_from(data, pos)
            topic = topics[tid]
            if topic is None:  # the compiled walk checked the topic id: a broken table
                raise RuntimeError(f"accumulator topic table broken (topic id {tid})")
            code = self._open_batch(self._topics[2 * tid] + part, topic, part, ts, plen - 16, now_ms)
            if code != APPEND_OK:
                break
        self._settle_touched(chunk_key, owner, position_base - start)
        return code, pos, count

    def _settle_touched(self, chunk_key: int = 0, owner: int = 0, base: int = 0) -> None:
        """End of an append call: the records each touched batch gained extend its runs."""
        st = self._st
        rows = self._rows
        touched = self._touched
        for i in range(self._ntouched):
            row = touched[i]
            at = row * _W
            if st[at + _S_TOUCHED]:
                st[at + _S_TOUCHED] = 0
                b = rows[row]
                if b is not None:
                    self._settle(b, row, st[at + _S_COUNT] - st[at + _S_N0], st[at + _S_P0] + base, chunk_key, owner)
        self._ntouched = 0

    def _settle(self, b: Batch, row: int, k: int, first: int, chunk_key: int, owner: int) -> None:
        # One append call carries one chunk's records, so the records a batch gained during the
        # call extend (or start) one run.
        if not k:
            return
        runs = b.runs
        tr = b._tr
        # The runs table follows Batch.runs one to one. It must not merge calls of different
        # chunks: a run that spanned two chunks could be cut by the resume position of a
        # restarted worker.
        if runs and runs[-1][0] == chunk_key:
            runs[-1] = (chunk_key, runs[-1][1] + k)
            tr[-1] += k
        else:
            runs.append((chunk_key, k))
            if tr:  # a second or later run takes the spare: reserve another
                b._limit -= _RUN_SIZE
                self._st[row * _W + _S_ROOM] -= _RUN_SIZE
            tr += (owner, first, k)

    def _open_batch(self, row: int, topic: str, partition: int, ts: int, blen: int, now_ms: float) -> int:
        """Make room in ``row`` for a record of ``blen`` body bytes: close the open batch
        (full) and open a new one. APPEND_OK, APPEND_FULL or APPEND_TOO_LARGE."""
        b = self._rows[row]
        if b is not None:
            self._close_full(b)
        profile = self._profile_for(topic)
        need = HEADER_SIZE + nat.record_size(blen, 0, 0)
        if need > profile.max_request_size:
            return APPEND_TOO_LARGE
        arena = self._arena
        # A batch may not exceed what one Produce request may carry; a record larger than
        # batch_size gets a batch of its own size. Never smaller: see the module docstring.
        want = max(min(profile.batch_size, profile.max_request_size), need + _TABLE_RESERVE)
        if arena.used_bytes + arena.chunks_for(want) * arena.chunk_size > self._limit:
            return APPEND_FULL
        slot = arena.alloc(want)
        if slot < 0:
            return APPEND_FULL
        if want > self._largest_batch:
            self._largest_batch = arena.chunks_for(want) * arena.chunk_size
        arena.open_slot(slot, arena.topic_index(topic), partition)
        b = Batch(arena, slot, topic, partition, profile, want - _TABLE_RESERVE, ts, now_ms)
        b._row = row
        self._rows[row] = b
        at = row * _W
        st = self._st
        st[at + _S_OPEN] = 1
        st[at + _S_WRITE_AT] = b.offset + HEADER_SIZE
        st[at + _S_ROOM] = b._limit - HEADER_SIZE
        st[at + _S_COUNT] = 0
        st[at + _S_BASE_TS] = ts
        st[at + _S_DMAX] = 0
        st[at + _S_TOUCHED] = 0
        self._open[(topic, partition)] = b
        self._seq += ORDINAL_STRIDE
        b.ordinal = self._seq
        b.span = ORDINAL_STRIDE
        heapq.heappush(self._deadlines, (b._deadline, self._seq, b))
        return APPEND_OK

    def _detach(self, b: Batch) -> None:
        """Take an open batch out of the state table: its records are final."""
        row = b._row
        if row < 0:
            return
        at = row * _W
        st = self._st
        if st[at + _S_TOUCHED]:
            # Closed in the middle of an append call: settle its runs now, while it is the
            # row's batch (the call's final settling sees the row's next batch).
            st[at + _S_TOUCHED] = 0
            chunk_key, owner, base = self._call
            self._settle(b, row, st[at + _S_COUNT] - st[at + _S_N0], st[at + _S_P0] + base, chunk_key, owner)
        b.record_count = st[at + _S_COUNT]
        b._dmax = st[at + _S_DMAX]
        b._records_len = st[at + _S_WRITE_AT] - b.offset - HEADER_SIZE
        st[at + _S_OPEN] = 0
        self._rows[row] = None
        b._row = -1

    def _close_full(self, b: Batch) -> None:
        self._detach(b)
        del self._open[(b.topic, b.partition)]
        b._closed = True
        self._closed.append(b)

    # -- sealing and hand-over -------------------------------------------------------------

    def _finish(self, b: Batch) -> None:
        """Compress, write header and CRC, shrink the reservation, publish the slot as SEALED."""
        self._detach(b)
        arena = self._arena
        size, codec = finish_batch(
            self._buf,
            b.offset,
            b._records_len,
            b.record_count,
            b._base_ts,
            b._base_ts + b._dmax,
            b.codec,
        )
        b.size = size
        b.codec = codec
        # The runs table goes behind the bytes before the slot says SEALED (recovery trusts it
        # from then on); the reservation shrinks to both.
        arena.shrink(b.slot, arena.write_runs(b.slot, size, b.ordinal, b._tr))
        b.capacity = arena.capacity(b.slot)
        arena.seal_slot(b.slot, size, b.record_count)

    def ready(self, now_ms: float) -> list[Batch]:
        """Batches to send now, finished (sealed) and removed from the open set.

        Full batches first, then those whose linger expired (or all open ones after flush()),
        so a partition's batches come out in record order.
        """
        out = self._closed
        self._closed = []
        heap = self._deadlines
        if self._flush_requested:
            self._flush_requested = False
            heap.clear()
            for b in self._open.values():
                b._closed = True
                out.append(b)
            self._open.clear()
        else:
            while heap and heap[0][0] <= now_ms:
                b = heapq.heappop(heap)[2]
                if not b._closed:
                    b._closed = True
                    del self._open[(b.topic, b.partition)]
                    out.append(b)
        for b in out:
            self._finish(b)
        return out

    def next_deadline(self) -> float | None:
        """When (ms, the now_ms clock) the next linger expires; 0.0 when batches are ready now;
        None when nothing is open."""
        if self._closed or (self._flush_requested and self._open):
            return 0.0
        heap = self._deadlines
        while heap and heap[0][2]._closed:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def flush(self) -> None:
        """Close every open batch at the next ready(), linger or not."""
        self._flush_requested = True

    def release(self, batch: Batch) -> None:
        """Free a batch's arena chunks after its final success or failure (nothing when
        :meth:`retire` took them over)."""
        if batch.slot >= 0:
            self._arena.free(batch.slot)
            batch.slot = -1

    def close_partition(self, topic: str, partition: int) -> int:
        """Close the partition's open batch (ready at the next :meth:`ready`), so its later
        records go to a new batch; returns the largest ordinal given so far (or that a split
        of the latest batch may give)."""
        b = self._open.get((topic, partition))
        if b is not None:
            self._close_full(b)
        return self._seq + ORDINAL_STRIDE - 1

    def split(self, batch: Batch) -> list[Batch] | None:
        """Cut a sealed batch the broker refused as too large into two sealed halves.

        The halves hold the first ``ceil(n/2)`` and the other records, in order, in new arena
        slots (SEALED, not stamped: the caller stamps them, with the batch's own sequence range
        when it was stamped), each with its runs, the batch's profile and ``created_ms``; the
        batch's slot is freed (a recovered batch's goes to :attr:`on_recovered_split`). Returns
        None, changing nothing, when the batch cannot be split: a single record, a recovered
        batch without :attr:`on_recovered_split`, no ordinals left between it and the next, a
        run it cuts whose ring position is unknown, or no room in the arena for the halves.

        Raises:
            SplitDeferred: a recovered batch's cut run is not where its client's ring was read
                again yet.
        """
        n = batch.record_count
        recovered = isinstance(batch, RecoveredBatch)
        if n < 2 or batch.span < 2 or batch.slot < 0 or (recovered and self.on_recovered_split is None):
            return None
        half = (n + 1) // 2
        if recovered:
            # Its chunks are the recovery's business: cut its runs table only.
            tr = [v for run in batch.table for v in run]  # type: ignore[union-attr]
            runs_cut = self._cut_table(batch, [(0, run[2]) for run in batch.table], tr, half,  # type: ignore[union-attr]
                                       deferred=True)
        else:
            runs_cut = self._cut_table(batch, batch.runs, batch._tr, half, deferred=False)
        if runs_cut is None:
            return None
        _codec, records = record_bodies(batch.payload())
        if len(records) != n:
            raise RuntimeError(f"a sealed batch holds {len(records)} records, its header says {n}")
        arena = self._arena
        parts = []
        for recs, (runs, tr) in zip((records[:half], records[half:]), runs_cut):
            base_ts = recs[0][0]
            data, count, max_ts = encode_records(recs, base_ts)
            want = HEADER_SIZE + len(data) + 8 + runs_table_size(len(tr) // 3)
            slot = arena.alloc(want)
            if slot < 0:
                for b in parts:
                    arena.free(b.slot)
                return None
            parts.append(self._sealed_part(batch, slot, want, data, count, base_ts, max_ts, runs, tr))
        parts[1].ordinal = batch.ordinal + batch.span // 2
        parts[0].span = batch.span // 2
        parts[1].span = batch.span - batch.span // 2
        for b in parts:
            self._finish(b)
        if recovered:
            rparts = [RecoveredBatch.part_of(batch, parts[0], 0),  # type: ignore[arg-type]
                      RecoveredBatch.part_of(batch, parts[1], half)]  # type: ignore[arg-type]
            self.on_recovered_split(batch, rparts)  # type: ignore[arg-type,misc]
            return rparts  # type: ignore[return-value]
        self.release(batch)
        return parts

    def _cut_table(self, batch: Batch, runs: list, tr: list, at: int,
                   deferred: bool) -> tuple[tuple[list, list], tuple[list, list]] | None:
        """``runs`` and the runs table ``tr`` cut before record ``at``: ``((runs, table), ...)``
        for each part, or None when the cut run's ring position cannot be found (``deferred``:
        raise :class:`SplitDeferred` instead)."""
        if len(tr) != 3 * len(runs):
            raise RuntimeError("a batch's runs and runs table differ")
        seen = 0
        for i, (key, count) in enumerate(runs):
            if seen + count <= at:
                seen += count
                continue
            k = at - seen
            if k == 0:
                return (runs[:i], tr[: 3 * i]), (runs[i:], tr[3 * i :])
            owner, first = tr[3 * i], tr[3 * i + 1]
            second = -1
            if first >= 0:
                second = self._locate(owner, first, batch.topic, batch.partition, k) if self._locate else -1
                if second < 0:
                    if deferred and self._locate is not None:
                        raise SplitDeferred(f"{batch.topic}[{batch.partition}]: record {k} of client {owner}'s "
                                            f"run at {first} not read again yet")
                    return None
            head = (runs[:i] + [(key, k)], tr[: 3 * i] + [owner, first, k])
            tail = ([(key, count - k)] + runs[i + 1 :], [owner, second, count - k] + tr[3 * i + 3 :])
            return head, tail
        raise RuntimeError(f"a batch of {batch.record_count} records has runs of {seen}")

    def _sealed_part(self, batch: Batch, slot: int, want: int, data: bytes, count: int, base_ts: int,
                     max_ts: int, runs: list, tr: list) -> Batch:
        arena = self._arena
        arena.open_slot(slot, arena.topic_index(batch.topic), batch.partition)
        b = Batch(arena, slot, batch.topic, batch.partition, batch.profile, want, base_ts, batch.created_ms)
        self._buf[b.offset + HEADER_SIZE : b.offset + HEADER_SIZE + len(data)] = data
        b.record_count = count
        b._records_len = len(data)
        b._dmax = max_ts - base_ts
        b.runs = runs
        b._tr = tr
        b.ordinal = batch.ordinal
        b._closed = True
        return b

    def retire(self, batch: Batch, error_code: int, base_offset: int, log_append_ms: int) -> int:
        """Record a finished batch's outcome in its slot (state DONE) and hand the slot over.

        The caller keeps the slot until the batch's records' outcomes have reached their
        clients, then frees it with ``arena.free(slot)``; :meth:`release` of the batch does
        nothing afterwards. Returns the slot, or -1 when there is nothing to keep (no runs
        table: the slot is freed now).
        """
        slot = batch.slot
        if slot < 0:
            return -1
        batch.slot = -1
        if self._arena.set_result(slot, error_code, base_offset, log_append_ms):
            return slot
        self._arena.free(slot)
        return -1

    def recover(self, slots: Sequence[RecoveredSlot], now_ms: float) -> list[RecoveredBatch]:
        """The batches of a dead worker's kept slots (``Arena.recovered``), in creation order.

        They get ordinals ``k * ORDINAL_STRIDE`` for k = 1..n (written back to their slots, so
        a later recovery orders them the same way; the stride leaves room for the parts of a
        split) and every batch made from now on a larger one. ``created_ms`` is ``now_ms``:
        the delivery timeout starts again.
        """
        out = []
        arena = self._arena
        for i, rs in enumerate(sorted(slots, key=lambda r: r.ordinal), 1):
            ordinal = i * ORDINAL_STRIDE
            arena.set_ordinal(rs.slot, ordinal)
            out.append(RecoveredBatch(arena, rs, ordinal, ORDINAL_STRIDE, self._profile_for(rs.topic), now_ms))
        self._seq = max(self._seq, len(out) * ORDINAL_STRIDE)
        return out
