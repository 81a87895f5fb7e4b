"""Pure-Python frame code that only tests use: the oracles the compiled code is checked against
and a reader and writer that stand in for the other side of a ring.

- :func:`record_body_valid`: the record-body validator, written from the Kafka record format.
  ``daemon._batcher.body_valid`` and ``first_bad_body`` (the product's) must agree with it.
- :func:`iter_frames`, :func:`iter_records`: walk and validate a request ring's frames as the
  worker's compiled reader does, for tests that check what a client wrote.
- :func:`put_completion`: one COMPLETION frame, as a worker would write it, for client tests.

``tests/conftest.py`` puts this directory on ``sys.path``, so tests import it as
``frames_oracle``. The frame layout is :mod:`shm.frames`'s and :mod:`shm.layout`'s.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence

from shm.errors import CorruptFrameError
from shm.frames import COMPLETION, RECORD_HEADER
from shm.layout import FRAME_CHUNK_DONE, FRAME_COMPLETION, FRAME_HEADER, FRAME_PADDING, FRAME_RECORD
from shm.ring import SpscRing

__all__ = ["record_body_valid", "iter_frames", "iter_records", "put_completion"]


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    """(zig-zag decoded value, next position); next position -1 if malformed or past end."""
    shift = 0
    acc = 0
    while pos < end and shift < 35:  # Kafka's record varints are int32: at most 5 bytes
        b = buf[pos]
        pos += 1
        acc |= (b & 0x7F) << shift
        if b < 0x80:
            return (acc >> 1) ^ -(acc & 1), pos
        shift += 7
    return 0, -1


def record_body_valid(buf: memoryview, pos: int, end: int) -> bool:
    """True when ``buf[pos:end]`` is exactly one well-formed record body.

    Checks every varint, that lengths are >= -1 (>= 0 where null is not allowed) and that the
    fields end exactly at ``end``. Kafka would reject a batch holding a malformed record as a
    whole, so one client's bad body must not reach a batch shared with others.
    """
    for _ in (0, 1):  # key, value
        n, pos = _read_varint(buf, pos, end)
        if pos < 0 or n < -1:
            return False
        if n > 0:
            pos += n
    count, pos = _read_varint(buf, pos, end)
    if pos < 0 or count < 0:
        return False
    for _ in range(count):
        n, pos = _read_varint(buf, pos, end)
        if pos < 0 or n < 0:
            return False
        pos += n
        n, pos = _read_varint(buf, pos, end)
        if pos < 0 or n < -1:
            return False
        if n > 0:
            pos += n
    return pos == end


def _frame_error(ring: SpscRing, pos: int, what: str) -> CorruptFrameError:
    return CorruptFrameError(f"{ring.name}: frame at data offset {pos - ring.data_start}: {what}")


_KNOWN = (FRAME_RECORD, FRAME_COMPLETION, FRAME_CHUNK_DONE)


def iter_frames(
    ring: SpscRing, start: int, end: int, types: Sequence[int] = _KNOWN, where: str | None = None
) -> Iterator[tuple[int, int, int, int]]:
    """Walk the frames of ``ring.view[start:end]``, skipping padding.

    Yields ``(frame_end, frame_type, payload_start, payload_end)`` (offsets into
    ``ring.view``); ``frame_end - start`` is what to consume after handling frames up to that
    one.

    Raises:
        CorruptFrameError: a header past ``end``, a length past ``end``, a frame type not in
            ``types`` ("in a ``where``" when given, else "unknown"), or a padding frame that
            does not end at the end of the data area.
    """
    view = ring.view
    pos = start
    while pos < end:
        if end - pos < 8:
            raise _frame_error(ring, pos, f"frame header past the end ({end - pos} bytes left)")
        plen, ftype = FRAME_HEADER.unpack_from(view, pos)
        fend = pos + ((plen + 15) & -8)
        if fend > end:
            raise _frame_error(ring, pos, f"payload length {plen} runs past the committed end")
        if ftype == FRAME_PADDING:
            if fend != ring.data_end:
                raise _frame_error(ring, pos, "padding frame does not end at the wrap")
        elif ftype in types:
            yield fend, ftype, pos + 8, pos + 8 + plen
        else:
            raise _frame_error(ring, pos, f"frame type {ftype} in a {where}" if where else f"unknown frame type {ftype}")
        pos = fend


def iter_records(
    ring: SpscRing,
    start: int,
    end: int,
    partition_limits: Sequence[int],
    check_body: bool = True,
) -> Iterator[tuple[int, int, int, int, memoryview]]:
    """Walk and validate the RECORD frames of ``ring.view[start:end]`` (a request ring region).

    Args:
        partition_limits: for each topic id the client may use, its partition count; a
            topic id ``>= len(partition_limits)`` or a partition outside ``[0, limit)`` is
            corrupt.
        check_body: also check each body with :func:`record_body_valid`.

    Yields:
        ``(frame_end, topic_id, partition, timestamp_ms, body)``: ``body`` is a memoryview
        into the ring (drop it before the ring's memory goes away).

    Raises:
        CorruptFrameError: on any bad frame, with what was wrong (the frames before it were
            yielded and are good).
    """
    view = ring.view
    ntopics = len(partition_limits)
    for fend, _, bstart, bend in iter_frames(ring, start, end, (FRAME_RECORD,), "request ring"):
        pos = bstart - 8
        if bend - bstart < RECORD_HEADER.size:
            raise _frame_error(ring, pos, f"RECORD payload of {bend - bstart} bytes is shorter than 16")
        topic_id, flags, partition, ts = RECORD_HEADER.unpack_from(view, bstart)
        if topic_id >= ntopics:
            raise _frame_error(ring, pos, f"topic id {topic_id} unknown ({ntopics} topics)")
        if partition < 0 or partition >= partition_limits[topic_id]:
            raise _frame_error(
                ring, pos, f"partition {partition} of topic id {topic_id} outside [0, {partition_limits[topic_id]})"
            )
        if flags:
            raise _frame_error(ring, pos, f"unknown RECORD flags {flags:#x}")
        bstart += RECORD_HEADER.size
        if check_body and not record_body_valid(view, bstart, bend):
            raise _frame_error(ring, pos, "malformed record body")
        yield fend, topic_id, partition, ts, view[bstart:bend]


def put_completion(
    ring: SpscRing,
    topic_id: int,
    error_code: int,
    partition: int,
    base_offset: int,
    timestamp_ms: int,
    count: int,
) -> bool:
    """Pack one COMPLETION frame into ``ring``; False when full. Commit with
    ``ring.publish_head()``."""
    pos = ring.claim(FRAME_COMPLETION, COMPLETION.size)
    if pos < 0:
        return False
    try:
        COMPLETION.pack_into(ring.view, pos, topic_id, error_code, partition, base_offset, timestamp_ms, count, 0)
    except struct.error:
        ring.rollback()
        raise
    return True
