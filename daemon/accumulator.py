"""The accumulator: one open RecordBatch v2 per partition, built in place in the worker arena.

Records enter either one at a time (:meth:`Accumulator.append`, socket ingest) or in bulk straight
from a region of a client's request ring (:meth:`Accumulator.append_region`, the shared-memory
path). Either way each record is copied once into the arena, behind the 61-byte header space of
its partition's open batch. A batch is closed when the next record does not fit its reservation
(``profile.batch_size``, or one record's size when that is larger), when it reaches
``VARINT_TABLE_SIZE`` records, after ``profile.linger_ms`` since its first record, or on
:meth:`Accumulator.flush`. :meth:`Accumulator.ready` finishes closed batches (compression, header,
CRC32C) and hands them to the sender; :meth:`Accumulator.release` frees their chunks afterwards.

Back-pressure: when the arena (``buffer_memory``) cannot hold a new batch, appends return
APPEND_FULL; the worker stops draining rings until batches are released.

It knows no asyncio: the sender asks :meth:`ready` what is ready now and :meth:`next_deadline`
when to ask again. Clock: ``time.monotonic() * 1000`` (``now_ms``) everywhere.

Hot path. ``append_region`` walks ring frames with one ``struct.unpack_from`` per record, takes
the record prefix (length, attributes, timestamp delta, offset delta) from precomputed tables,
and appends the four pieces to the batch's pending list; the pending pieces of every touched
batch are joined and written into the arena once per call. No object is created per record
except the body's memoryview slice and the tuple of pieces. A run of at least 32 frames with
identical 24-byte headers (what ``send_many`` writes for fixed-size values: one partition,
one timestamp, one length) skips the loop: numpy builds all its records at once
(:func:`_run_records`, about 0.2 instead of 0.45 us a record including sealing).
"""

from __future__ import annotations

import heapq
import struct
from typing import Any, Callable, Sequence

from daemon.arena import RUN, RUNS_HEADER, STATE_DONE, STATE_STAMPED, Arena, RecoveredSlot
from daemon.config import Profile
from daemon.protocol.records import (
    ATTR_TS,
    ATTR_TS_LEN,
    CODECS,
    HEADER_SIZE,
    TS_TABLE_SIZE,
    VARINT,
    VARINT_LEN,
    VARINT_TABLE_SIZE,
    finish_batch,
    record_prefix,
    stamp_batch,
)

__all__ = [
    "APPEND_OK",
    "APPEND_FULL",
    "APPEND_TOO_LARGE",
    "APPEND_INVALID",
    "FRAME_RECORD",
    "FRAME_PADDING",
    "Batch",
    "RecoveredBatch",
    "Accumulator",
]

APPEND_OK, APPEND_FULL, APPEND_TOO_LARGE, APPEND_INVALID = 0, 1, 2, 3

# Ring frame: the 8-byte frame header <II (payload_length, frame_type) followed by the RECORD
# payload header <HHiq (topic_id, flags, partition, timestamp_ms); the record body follows.
_FRAME = struct.Struct("<IIH2xiq")  # flags (reserved, 0) skipped
_FRAME_HEADER_SIZE = 8
_RECORD_HEADER_SIZE = _FRAME.size - _FRAME_HEADER_SIZE  # 16
FRAME_PADDING, FRAME_RECORD = 0, 1
_FRAME_TYPE = struct.Struct("<4xI")  # the type word of a frame header

_MAX_RECORDS = VARINT_TABLE_SIZE  # offset deltas stay inside the varint table
# The fast path covers at most _FAST_SPAN bytes of frames per load, so a record's length stays
# inside the varint table; every frame is at least 24 bytes, so a load adds fewer than
# _FAST_SPAN // 24 records and a batch below _FAST_MAX_COUNT stays below _MAX_RECORDS.
_FAST_SPAN = VARINT_TABLE_SIZE - 8
_FAST_MAX_COUNT = _MAX_RECORDS - _FAST_SPAN // 24 - 2
_RUN_MIN = 32  # shorter runs of identical frame headers go through the per-record loop
# Bytes a batch keeps free behind its records for its runs table (daemon/arena.py): alignment
# padding, the header, the first run and one spare run. Each later run (another client) takes
# the spare and reserves a new one (the spare covers a run that starts after the records of the
# call were admitted), so the table always fits the reservation.
_RUN_SIZE = RUN.size
_TABLE_RESERVE = 7 + RUNS_HEADER.size + 2 * _RUN_SIZE


class Batch:
    """One partition's batch. Open while records are appended; immutable bytes once finished.

    Public fields follow the Accumulator/Batch interface shared with the sender; fields starting
    with an underscore are the accumulator's building state.
    """

    __slots__ = (
        "topic",
        "partition",
        "profile",
        "record_count",
        "runs",
        "created_ms",
        "producer_id",
        "producer_epoch",
        "base_sequence",
        "attempts",
        "ordinal",
        "size",
        "codec",
        "slot",
        "offset",
        "capacity",
        "_limit",
        "_arena",
        "_room",
        "_written",
        "_pend",
        "_dirty",
        "_n0",
        "_p0",
        "_tr",
        "_base_ts",
        "_dmax",
        "_deadline",
        "_closed",
    )

    def __init__(
        self,
        arena: Arena,
        slot: int,
        topic: str,
        partition: int,
        profile: Profile,
        limit: int,
        base_ts: int,
        now_ms: float,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.profile = profile
        self.record_count = 0
        self.runs: list[tuple[int, int]] = []
        self.created_ms = now_ms
        self.producer_id = -1
        self.producer_epoch = -1
        self.base_sequence = -1
        self.attempts = 0
        self.ordinal = 0  # creation order in its accumulator: a partition's batches ascend
        self.size = 0
        self.codec = CODECS[profile.compression_type]
        self.slot = slot
        self.offset = arena.offset(slot)
        self.capacity = arena.capacity(slot)
        # Bytes the finished batch may take (uncompressed): batch_size, or one large record's
        # size, less the runs table reserve; the reservation rounds it up to whole chunks, which
        # must not loosen the bound.
        self._limit = limit - _TABLE_RESERVE
        self._arena = arena
        self._room = self._limit - HEADER_SIZE
        self._written = 0
        self._pend: list[bytes | memoryview] = []
        self._dirty = False
        self._n0 = 0
        self._p0 = -1  # position (call-relative) of the first record taken in this call
        self._tr: list[int] = []  # the runs table, flat: owner, first position, count, ...
        self._base_ts = base_ts
        self._dmax = 0
        self._deadline = now_ms + profile.linger_ms
        self._closed = False

    @property
    def records_len(self) -> int:
        """Bytes of (uncompressed) records appended so far."""
        return self._limit - HEADER_SIZE - self._room

    @property
    def sealed(self) -> bool:
        """True once the batch is finished (header, CRC, compression written)."""
        return self.size > 0

    def payload(self) -> memoryview:
        """The whole RecordBatch v2, ready for a Produce request (a view into the arena)."""
        return self._arena.buf[self.offset : self.offset + self.size]

    def stamp(self, producer_id: int, producer_epoch: int, base_sequence: int) -> None:
        """Write producer id, epoch and base sequence into the batch and recompute its CRC32C.

        The slot becomes STAMPED: from now on a re-send must use exactly these bytes.
        """
        if not self.size:
            raise RuntimeError("stamp() on a batch that is not finished")
        stamp_batch(self._arena.buf, self.offset, self.size, producer_id, producer_epoch, base_sequence)
        self.producer_id = producer_id
        self.producer_epoch = producer_epoch
        self.base_sequence = base_sequence
        self._arena.set_state(self.slot, STATE_STAMPED)

    def __repr__(self) -> str:
        return (
            f"Batch({self.topic!r}, {self.partition}, records={self.record_count}, size={self.size}, "
            f"runs={self.runs})"
        )


def _flush_pending(buf: memoryview, b: Batch) -> None:
    """Copy a batch's pending pieces into its arena region in one slice assignment.

    Also makes ``_room`` exact again (the bulk loop keeps a conservative estimate).
    """
    data = b"".join(b._pend)
    b._pend.clear()
    at = b.offset + HEADER_SIZE + b._written
    buf[at : at + len(data)] = data
    b._written += len(data)
    b._room = b._limit - HEADER_SIZE - b._written


_np: Any = None
_VARINT_ROWS: list[Any] = []  # per varint length 1-3: the VARINT table rows of that length


def _numpy() -> Any:
    """numpy, imported on first use; None when it is not installed."""
    global _np
    if _np is None:
        try:
            import numpy
        except ImportError:
            numpy = False
        _np = numpy
        if numpy is not False:
            for lo, hi in ((0, 64), (64, 8192), (8192, VARINT_TABLE_SIZE)):
                _VARINT_ROWS.append(numpy.frombuffer(b"".join(VARINT[lo:hi]), numpy.uint8).reshape(hi - lo, -1))
    return _np or None


def _run_records(data: bytes, pos: int, kmax: int, step: int, blen: int, d: int, n0: int) -> tuple[int, bytes]:
    """The Kafka records of the frames at ``data[pos:]`` whose 24 header bytes equal the first
    one's (at most ``kmax`` frames, ``step`` bytes apart, bodies of ``blen`` bytes), built with
    numpy: ``(count, records)``; ``(0, b"")`` when fewer than _RUN_MIN frames match or numpy is
    missing.

    Identical headers mean the same length, type, topic, partition and timestamp, so every
    record has the same timestamp delta ``d`` and body length; offset deltas run from ``n0``.
    Per record: varint(length) | attributes 0 | varint(d) | varint(offset delta) | body.
    """
    np = _numpy()
    if np is None:
        return 0, b""
    u8 = np.uint8
    frames = np.frombuffer(data, u8, kmax * step, pos).reshape(kmax, step)
    heads = frames[:, :24]
    same = (heads == heads[0]).all(axis=1)
    k = kmax if same.all() else int(same.argmin())
    if k < _RUN_MIN:
        return 0, b""
    bodies = frames[:k, 24 : 24 + blen]
    ats = ATTR_TS[d]
    pieces = []
    i = 0
    while i < k:
        # Split where the offset delta's varint grows (64, 8192): rows of one width.
        n = n0 + i
        cls, lo, hi = (0, 0, 64) if n < 64 else ((1, 64, 8192) if n < 8192 else (2, 8192, VARINT_TABLE_SIZE))
        m = min(k - i, hi - n)
        vn = cls + 1
        head = VARINT[blen + len(ats) + vn] + ats
        h = len(head)
        out = np.empty((m, h + vn + blen), u8)
        out[:, :h] = np.frombuffer(head, u8)
        out[:, h : h + vn] = _VARINT_ROWS[cls][n - lo : n - lo + m]
        out[:, h + vn :] = bodies[i : i + m]
        pieces.append(out.tobytes())
        i += m
    return k, pieces[0] if len(pieces) == 1 else b"".join(pieces)


class Accumulator:
    """Per-partition batching into the worker arena. See the module docstring.

    Args:
        buffer_memory: bound on the bytes of batches held (the arena's data area when the
            accumulator creates its own arena).
        profile_for: the delivery profile of a topic; called once per new batch.
        arena: the worker's arena (supervisor-owned); an anonymous one of ``buffer_memory``
            bytes when None.
        chunk_size: allocation unit of the arena created when ``arena`` is None.
    """

    def __init__(
        self,
        *,
        buffer_memory: int,
        profile_for: Callable[[str], Profile],
        arena: Arena | None = None,
        chunk_size: int = 4096,
    ) -> None:
        if arena is None:
            arena = Arena(buffer_memory, chunk_size=chunk_size)
        self._arena = arena
        self._buf = arena.buf
        self._limit = min(buffer_memory, arena.size)
        self._profile_for = profile_for
        self._open: dict[tuple[str, int], Batch] = {}
        self._closed: list[Batch] = []  # closed because full: ready at the next ready()
        self._deadlines: list[tuple[float, int, Batch]] = []  # linger heap, stale entries skipped
        self._seq = 0
        self._flush_requested = False
        self._dirty: list[Batch] = []  # batches with pending pieces during an append call
        self._cid = 0  # the client of the append call in progress
        self._owner = 0  # the owner (runs table client id) of the append call in progress
        self._base = 0  # ring position of the call's first byte
        self._pos = -1  # call-relative position of the record _append_one is given (-1: none)
        self._taken = 0  # records taken by the append_region call in progress (its count)
        _numpy()  # import it now (about 50 ms), not on the first run of records

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

    # -- appending -----------------------------------------------------------------------------

    def append(
        self, topic: str, partition: int, timestamp_ms: int, body: bytes | memoryview, client_id: int, now_ms: float
    ) -> int:
        """Append one record body (see COMMON wire facts) to the partition's open batch.

        Returns APPEND_OK, APPEND_FULL (the arena is full: retry after releases) or
        APPEND_TOO_LARGE (the record alone exceeds ``max_request_size``).
        """
        self._cid = client_id
        self._owner = client_id
        self._pos = -1  # not from a ring: recovery cannot match these records
        code = self._append_one(topic, partition, timestamp_ms, body, now_ms)
        self._flush_dirty()
        return code

    def append_region(
        self,
        data: memoryview | bytes,
        start: int,
        end: int,
        topics: Sequence[str | None],
        partition_counts: Sequence[int],
        chunk_key: int,
        owner: int,
        position_base: int,
        now_ms: float,
    ) -> tuple[int, int, int]:
        """Append every RECORD frame of ``data[start:end]`` (whole ring frames, 8-byte aligned).

        Args:
            data: the ring's data area (or any buffer holding the frames).
            start, end: the region to consume; ``start`` is a frame start.
            topics: the client's topic table, topic_id -> topic name (None = not registered).
            partition_counts: topic_id -> partition count, for validating frames.
            chunk_key: the key of the records' chunk (for ``Batch.runs``).
            owner: the client whose ring this is (for the runs tables, crash recovery).
            position_base: the ring position of ``data[start]`` (for the runs tables).
            now_ms: the monotonic clock in ms.

        Returns:
            ``(code, pos, count)``: ``count`` records were taken by this call; ``pos`` is where
            consumption stopped (the ring may free up to it);
            ``code`` is APPEND_OK when everything up to ``end`` was consumed (a PADDING frame
            consumes the rest of the region), else the code of the frame at ``pos``:
            APPEND_FULL (retry later), APPEND_TOO_LARGE (the caller fails that record and
            continues after it) or APPEND_INVALID (malformed frame: disconnect the client).
        """
        if end > len(data) or start < 0 or start & 7:
            raise ValueError("region outside the buffer or not 8-byte aligned")
        # One copy of the region into bytes: unpacking and slicing bytes cost about 60 % of doing
        # the same on a memoryview of shared memory, which more than pays for the memcpy. It also
        # means nothing below holds a view of the ring.
        shift = start
        data = bytes(data[start:end])
        end -= start
        start = 0
        unpack = _FRAME.unpack_from
        VAR = VARINT
        VLEN = VARINT_LEN
        ATS = ATTR_TS
        ALEN = ATTR_TS_LEN
        NT = TS_TABLE_SIZE
        openb = self._open
        dirty = self._dirty
        buf = self._buf
        self._cid = chunk_key
        self._owner = owner
        self._base = position_base
        self._taken = 0
        seen: dict[int, Batch] = {}  # (topic_id << 32) + partition -> batch, validated this call
        cur: Batch | None = None
        ctid = cpart = -1  # the key of the fast path; -1 = none loaded
        pend: list = []
        n = room = base = dmax = 0
        pos0 = lim = nload = 0
        interleaved = False  # the last load took at most one record
        code = APPEND_OK
        pos = start
        while pos < end:
            if pos + 24 > end:
                # Only a padding frame (at the wrap) may be shorter than a RECORD's 24 bytes.
                if pos + 8 <= end and _FRAME_TYPE.unpack_from(data, pos)[0] == FRAME_PADDING:
                    pos = end
                else:
                    code = APPEND_INVALID
                break
            plen, ftype, tid, part, ts = unpack(data, pos)
            be = pos + 8 + plen  # end of the body
            # lim (set when the batch was loaded) bounds the frames that surely fit: their record
            # bytes never exceed their frame bytes, so no per-record room, count or table checks.
            if tid == ctid and part == cpart and ftype == 1 and pos + 24 <= be <= lim:
                d = ts - base
                if 0 <= d < NT:
                    size = be - pos - 24 + ALEN[d] + VLEN[n]  # record bytes after its length varint
                    pend += (VAR[size], ATS[d], VAR[n], data[pos + 24 : be])
                    n += 1
                    if d > dmax:
                        dmax = d
                    pos = (be + 7) & -8
                    continue
            # Everything else: a new key, the end of lim, a frame to validate, a far timestamp.
            if cur is not None:
                interleaved = n - nload <= 1
                cur.record_count = n
                cur._dmax = dmax
                # Conservative until the pending pieces are flushed (frame bytes >= record bytes).
                cur._room = room - (pos - pos0)
                cur = None
                ctid = -1
            if ftype != 1 or not pos + 24 <= be <= end:
                if ftype == FRAME_PADDING:
                    pos = end
                else:
                    code = APPEND_INVALID
                break
            b = seen.get((tid << 32) + part)
            if b is None or b._closed:
                if tid >= len(topics) or not 0 <= part < partition_counts[tid] or topics[tid] is None:
                    code = APPEND_INVALID
                    break
                b = openb.get((topics[tid], part))
                if b is not None:
                    seen[(tid << 32) + part] = b
            if b is not None:
                if b._pend and be > pos + b._room:
                    _flush_pending(buf, b)  # makes _room exact before judging the fit
                if be <= pos + b._room and b.record_count < _FAST_MAX_COUNT and 0 <= ts - b._base_ts < NT:
                    # Load b for the fast path.
                    cur = b
                    ctid = tid
                    cpart = part
                    pend = b._pend
                    n = b.record_count
                    if not b._dirty:
                        b._dirty = True
                        b._n0 = n
                        b._p0 = pos
                        dirty.append(b)
                    room = b._room
                    base = b._base_ts
                    dmax = b._dmax
                    pos0 = pos
                    nload = n
                    lim = pos + room
                    if lim > end:
                        lim = end
                    if lim > pos + _FAST_SPAN:
                        lim = pos + _FAST_SPAN
                    # A run of frames with identical headers (a send_many of fixed-size values)
                    # becomes records in one vectorised pass; the loop goes on after it. Not
                    # tried right after a load that took a single record (interleaved
                    # partitions, where loads come every record), and only when the 2nd and
                    # the 32nd frame repeat the header and the first 32 agree on partition and
                    # timestamp (strided slices): a failed try costs a few compares, not numpy.
                    if not interleaved:
                        step = (plen + 15) & -8
                        last = pos + (_RUN_MIN - 1) * step
                        if (
                            last + step <= end
                            and step <= _FAST_SPAN
                            and data[pos : pos + 24] == data[last : last + 24]
                            and data[pos : pos + 24] == data[pos + step : pos + step + 24]
                            # and all 32 frames agree on the low bytes of partition and ts
                            and data[pos + 12 : last + 13 : step] == data[pos + 12 : pos + 13] * _RUN_MIN
                            and data[pos + 16 : last + 17 : step] == data[pos + 16 : pos + 17] * _RUN_MIN
                        ):
                            kmax = min((min(pos + room, end) - pos) // step, _FAST_MAX_COUNT - n)
                            if kmax >= _RUN_MIN:
                                k, recs = _run_records(data, pos, kmax, step, plen - 16, ts - base, n)
                                if k:
                                    pend.append(recs)
                                    n += k
                                    if ts - base > dmax:
                                        dmax = ts - base
                                    pos += k * step
                    continue
            self._pos = pos
            code = self._append_one(topics[tid], part, ts, data[pos + 24 : be], now_ms)
            if code != APPEND_OK:
                break
            pos = (be + 7) & -8
        if cur is not None:
            cur.record_count = n
            cur._dmax = dmax
            cur._room = room - (pos - pos0)
        self._flush_dirty()
        return code, pos + shift, self._taken

    def _flush_dirty(self) -> None:
        """End of an append call: write pending pieces into the arena, settle Batch.runs."""
        buf = self._buf
        for b in self._dirty:
            if b._pend:
                _flush_pending(buf, b)
            self._settle_runs(b)
            b._dirty = False
        self._dirty.clear()

    def _settle_runs(self, b: Batch) -> None:
        # One append call carries one client's records, so the records a batch gained during
        # the call extend (or start) one run.
        k = b.record_count - b._n0
        if k:
            self._taken += k
            b._n0 = b.record_count
            cid = self._cid
            runs = b.runs
            tr = b._tr
            # The runs table follows Batch.runs one to one. It must not merge calls of one
            # client: the worker gives each ring drain (chunk) its own key, and a run that
            # spanned two chunks could be cut by the resume position of a restarted worker.
            if runs and runs[-1][0] == cid:
                runs[-1] = (cid, runs[-1][1] + k)
                tr[-1] += k
            else:
                runs.append((cid, k))
                if tr:  # a second or later run takes the spare: reserve another
                    b._limit -= _RUN_SIZE
                    b._room -= _RUN_SIZE
                p = b._p0
                tr += (self._owner, p + self._base if p >= 0 else -1, k)

    def _append_one(self, topic: str, partition: int, ts: int, body: bytes | memoryview, now_ms: float) -> int:
        """The general path: any delta, any size; opens and closes batches as needed."""
        key = (topic, partition)
        b = self._open.get(key)
        blen = len(body)
        if b is not None:
            if b._pend:
                _flush_pending(self._buf, b)  # exact _room
            n = b.record_count
            if n < _MAX_RECORDS:
                d = ts - b._base_ts
                prefix = record_prefix(blen, d, n)
                total = len(prefix) + blen
                if total <= b._room:
                    self._add(b, prefix, body, total, d)
                    return APPEND_OK
            # Full: close it; the record starts a new batch.
            self._close_full(b)
        profile = self._profile_for(topic)
        prefix = record_prefix(blen, 0, 0)
        need = HEADER_SIZE + len(prefix) + blen
        if need > profile.max_request_size:
            return APPEND_TOO_LARGE
        b = self._new_batch(topic, partition, profile, need + _TABLE_RESERVE, ts, now_ms)
        if b is None:
            return APPEND_FULL
        self._add(b, prefix, body, need - HEADER_SIZE, 0)
        return APPEND_OK

    def _add(self, b: Batch, prefix: bytes, body: bytes | memoryview, total: int, d: int) -> None:
        b._pend.append(prefix)
        b._pend.append(body)
        if not b._dirty:
            b._dirty = True
            b._n0 = b.record_count
            b._p0 = self._pos
            self._dirty.append(b)
        b._room -= total
        b.record_count += 1
        if d > b._dmax:
            b._dmax = d

    def _new_batch(
        self, topic: str, partition: int, profile: Profile, need: int, ts: int, now_ms: float
    ) -> Batch | None:
        arena = self._arena
        # A batch may not exceed what one Produce request may carry.
        want = max(min(profile.batch_size, profile.max_request_size), need)
        slot = -1
        if arena.used_bytes + arena.chunks_for(want) * arena.chunk_size <= self._limit:
            slot = arena.alloc(want)
        if slot < 0 and arena.used_bytes + arena.chunks_for(need) * arena.chunk_size <= self._limit:
            # Nearly full: a batch just big enough for this record still makes progress.
            want = need
            slot = arena.alloc(need)
        if slot < 0:
            return None
        arena.open_slot(slot, arena.topic_index(topic), partition)
        b = Batch(arena, slot, topic, partition, profile, want, ts, now_ms)
        self._open[(topic, partition)] = b
        self._seq += 1
        b.ordinal = self._seq
        heapq.heappush(self._deadlines, (b._deadline, self._seq, b))
        return b

    def _close_full(self, b: Batch) -> None:
        if b._pend:
            _flush_pending(self._buf, b)
        self._settle_runs(b)
        del self._open[(b.topic, b.partition)]
        b._closed = True
        self._closed.append(b)

    # -- sealing and hand-over -------------------------------------------------------------

    def _finish(self, b: Batch) -> None:
        """Compress, write header and CRC, shrink the reservation, publish the slot as SEALED."""
        if b._pend:
            _flush_pending(self._buf, b)
        arena = self._arena
        size, codec = finish_batch(
            self._buf,
            b.offset,
            b.records_len,
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
        records go to a new batch; returns the largest ordinal given so far."""
        b = self._open.get((topic, partition))
        if b is not None:
            self._close_full(b)
        return self._seq

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

        They get ordinals 1..n (written back to their slots, so a later recovery orders them
        the same way) and every batch made from now on a larger one. ``created_ms`` is
        ``now_ms``: the delivery timeout starts again.
        """
        out = []
        arena = self._arena
        for i, rs in enumerate(sorted(slots, key=lambda r: r.ordinal), 1):
            arena.set_ordinal(rs.slot, i)
            out.append(RecoveredBatch(arena, rs, i, self._profile_for(rs.topic), now_ms))
        self._seq = max(self._seq, len(out))
        return out


class RecoveredBatch(Batch):
    """A batch a dead worker left STAMPED or DONE in the arena (see :meth:`Accumulator.recover`).

    It behaves as a sealed :class:`Batch` for the sender (same bytes, producer id, epoch and
    sequence); ``runs`` starts empty (its records' chunks are found when the rings are read
    again). ``table`` is the runs table ``[(client_id, first_position, count)]``; ``result`` is
    ``(error_code, base_offset, log_append_ms)`` once known (at once for a DONE slot).
    ``pieces`` and ``home`` (the slot, kept after :meth:`Accumulator.retire`) belong to the
    worker.
    """

    __slots__ = ("table", "result", "pieces", "home")

    def __init__(self, arena: Arena, rs: RecoveredSlot, ordinal: int, profile: Profile, now_ms: float) -> None:
        self.topic = rs.topic
        self.partition = rs.partition
        self.profile = profile
        self.record_count = rs.record_count
        self.runs = []
        self.created_ms = now_ms
        self.producer_id = rs.producer_id
        self.producer_epoch = rs.producer_epoch
        self.base_sequence = rs.base_sequence
        self.attempts = 0
        self.ordinal = ordinal
        self.size = rs.length
        self.codec = 0
        self.slot = rs.slot
        self.offset = rs.offset
        self.capacity = rs.capacity
        self._arena = arena
        self._closed = True
        self._pend = []
        self._tr = []
        self.table = list(rs.runs)
        self.result: tuple[int, int, int] | None = (
            (rs.error_code, rs.base_offset, rs.log_append_ms) if rs.state == STATE_DONE else None
        )
        self.pieces: list[tuple[Any, ...]] = []
        self.home = rs.slot
