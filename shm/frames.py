"""Frame payloads carried by the rings: RECORD (client to worker) and COMPLETION (back).

Frame framing (8-byte header ``<II`` = payload_length, frame_type; 8-byte alignment; padding
at the wrap) is described in :mod:`shm.layout`. The payloads, little-endian::

    RECORD payload
      topic_id      u16   index into the client's topic table
      flags         u16   0 (no flag defined yet; anything else is refused)
      partition     i32
      timestamp_ms  i64
      body          the rest: the tail of a Kafka RecordBatch v2 record, as on the wire:
                    varint keyLength (-1 null) | key | varint valueLength (-1 null) | value |
                    varint headerCount | per header: varint keyLength | key (UTF-8) |
                    varint valueLength (-1 null) | value          (zig-zag varints)

    COMPLETION payload
      topic_id      u16
      error_code    i16   Kafka error code, 0 = success
      partition     i32
      base_offset   i64   offset of the first record resolved (-1 with acks=0)
      timestamp_ms  i64   log-append time, or -1 when the topic uses CreateTime
      count         u32   resolves the next ``count`` pending records of (topic, partition)
      reserved      u32   0

    CHUNK_DONE payload
      end           u64   request-ring position up to which every record's outcome was written

:func:`put_record` packs straight into the ring with ``struct.pack_into`` and leaves
the commit (``ring.publish_head()``) to the caller, so a burst of frames costs one head store.
The bulk path builds the frames of many records to one partition in one go
(:func:`encode_record_frames`: per distinct length one prebuilt prefix and suffix, interleaved
with the keys and values by slice assignment, then one ``b"".join``) and copies them into the
ring with one claim (:func:`put_frames`). :func:`iter_completions` walks a completion ring's region (from
:meth:`SpscRing.region <shm.ring.SpscRing.region>`) and validates every frame: a bad one raises
:class:`~shm.errors.CorruptFrameError` naming what was wrong. The client's completion thread
walks with its compiled twin instead (``shm._client.read_completions``: the same checks and
messages, and it settles the futures as it goes, :mod:`shm.completions`); this one is what
tests read completions with and the oracle the compiled walk is held to
(``tests/unit/shm/test_read_completions.py``). The worker reads RECORD frames with the compiled :mod:`daemon._batcher` instead, over a
private copy of each region; the pure-Python record-body validator and RECORD reader that tests
check it against live in ``tests/frames_oracle.py``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from typing import Any

from shm.errors import CorruptFrameError
from shm.layout import (
    FRAME_CHUNK_DONE,
    FRAME_COMPLETION,
    FRAME_HEADER,
    FRAME_PADDING,
    FRAME_RECORD,
)
from shm.ring import SpscRing

__all__ = [
    "CHUNK_DONE_TOPIC",
    "chunk_done_end",
    "FRAME_PADDING",
    "FRAME_RECORD",
    "FRAME_COMPLETION",
    "RECORD_HEADER",
    "FRAME_AND_RECORD",
    "COMPLETION",
    "CHUNK_DONE",
    "Headers",
    "zigzag_varint",
    "ZIGZAG",
    "encode_record_body",
    "put_record",
    "encode_headers",
    "encode_record_frames",
    "put_frames",
    "iter_completions",
]

RECORD_HEADER = struct.Struct("<HHiq")
"""RECORD payload prefix: topic_id, flags, partition, timestamp_ms (16 bytes)."""
COMPLETION = struct.Struct("<HhiqqII")
"""COMPLETION payload: topic_id, error_code, partition, base_offset, timestamp_ms, count,
reserved (32 bytes)."""
FRAME_AND_RECORD = struct.Struct("<IIHHiq")
"""A RECORD frame's first 24 bytes in one unpack: the frame header (payload_length,
frame_type) and the RECORD prefix (:data:`RECORD_HEADER`)."""
CHUNK_DONE = struct.Struct("<Q")
"""CHUNK_DONE payload: the request-ring position (end of the chunk) the client may free up to."""

Headers = Sequence[tuple[str | bytes, bytes | None]] | None
_Bytes = bytes | bytearray | memoryview

_FRAME_AND_RECORD = FRAME_AND_RECORD
_FRAME_AND_COMPLETION = struct.Struct("<IIHhiqqII")
_REC_PREFIX = RECORD_HEADER.size
_unpack_frame = FRAME_HEADER.unpack_from
_unpack_u64 = CHUNK_DONE.unpack_from
_unpack_frame_completion = _FRAME_AND_COMPLETION.unpack_from
_pack_record = RECORD_HEADER.pack_into


def zigzag_varint(value: int) -> bytes:
    """Kafka's zig-zag varint of a signed 64-bit ``value`` (as in record bodies)."""
    v = ((value << 1) ^ (value >> 63)) & 0xFFFF_FFFF_FFFF_FFFF
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


# Lengths below this come from a table instead of a loop: every 1- and 2-byte varint length.
_TABLE = 8192
_ZZ: tuple[bytes, ...] = tuple(zigzag_varint(n) for n in range(-1, _TABLE))  # index n + 1
_NULL = b"\x01"  # varint(-1)
ZIGZAG = _ZZ
"""``ZIGZAG[n + 1] == zigzag_varint(n)`` for ``-1 <= n < len(ZIGZAG) - 1`` (8191): record
length fields without a function call, for callers that inline the body encoding."""


def encode_record_body(key: _Bytes | None, value: _Bytes | None, headers: Headers = None) -> bytes:
    """The record body: key, value and headers as Kafka's RecordBatch v2 record has them.

    Args:
        key: bytes-like or None (null key).
        value: bytes-like or None (null value, a tombstone).
        headers: (key, value) pairs; keys str (encoded as UTF-8) or bytes, values bytes or
            None. ``None`` or empty: no headers.
    """
    zz = _ZZ
    if key is None:
        k = _NULL
        key = b""
    else:
        n = len(key)
        k = zz[n + 1] if n < _TABLE else zigzag_varint(n)
    if value is None:
        v = _NULL
        value = b""
    else:
        n = len(value)
        v = zz[n + 1] if n < _TABLE else zigzag_varint(n)
    if not headers:
        return b"".join((k, key, v, value, b"\x00"))
    n = len(headers)
    parts = [k, key, v, value, zz[n + 1] if n < _TABLE else zigzag_varint(n)]
    append = parts.append
    for hkey, hvalue in headers:
        if isinstance(hkey, str):
            hkey = hkey.encode("utf-8")
        n = len(hkey)
        append(zz[n + 1] if n < _TABLE else zigzag_varint(n))
        append(hkey)
        if hvalue is None:
            append(_NULL)
        else:
            n = len(hvalue)
            append(zz[n + 1] if n < _TABLE else zigzag_varint(n))
            append(hvalue)
    return b"".join(parts)


def put_record(ring: SpscRing, topic_id: int, partition: int, timestamp_ms: int, body: _Bytes) -> bool:
    """Pack one RECORD frame into ``ring``; False when full. Not committed until
    ``ring.publish_head()``.

    A field out of its type's range raises ``struct.error`` after rolling back every frame
    claimed since the last publish (callers that validate their input never see this).
    """
    n = len(body)
    pos = ring.claim(FRAME_RECORD, _REC_PREFIX + n)
    if pos < 0:
        return False
    view = ring.view
    try:
        _pack_record(view, pos, topic_id, 0, partition, timestamp_ms)
    except struct.error:
        ring.rollback()
        raise
    pos += _REC_PREFIX
    view[pos : pos + n] = body
    return True


def encode_headers(headers: Headers) -> bytes:
    """The headers part of a record body (``varint count`` then each header); ``b"\\x00"``
    (count 0) for ``None`` or no headers. See :func:`encode_record_body` for the types."""
    if not headers:
        return b"\x00"
    body = encode_record_body(None, None, headers)
    return body[2:]  # drop the null key and null value (one byte each)


_PADS = tuple(bytes(i) for i in range(8))


def _zz(n: int) -> bytes:
    return _ZZ[n + 1] if n < _TABLE else zigzag_varint(n)


def encode_record_frames(
    topic_id: int,
    partition: int,
    timestamp_ms: int,
    values: Sequence[_Bytes | None],
    keys: Sequence[_Bytes | None] | None = None,
    headers: Headers = None,
) -> bytes:
    """Consecutive RECORD frames (headers, payloads, padding), one per value, all to one
    partition, ready to be copied into a ring by :func:`put_frames`.

    The same bytes as a :func:`put_record` per record would write, built without a Python
    step per record: records of equal key and value lengths share one prebuilt prefix (frame
    header, RECORD header, key length) and one suffix (headers, padding), interleaved with
    the keys and values by slice assignment and joined once.

    Args:
        values: bytes-like or None (a tombstone) per record.
        keys: one per value (bytes-like or None), or None for no keys at all.
        headers: the same headers for every record (see :func:`encode_record_body`).

    Raises:
        ValueError: ``keys`` and ``values`` differ in length.
        struct.error: a field out of its type's range.
    """
    n = len(values)
    if not n:
        return b""
    tail = encode_headers(headers)
    hl = len(tail)
    try:
        vlens = list(map(len, values))
    except TypeError:  # tombstones: length -1, no bytes
        vlens = [-1 if v is None else len(v) for v in values]
        values = [b"" if v is None else v for v in values]
    pack = _FRAME_AND_RECORD.pack
    if keys is not None and len(keys) != n:
        raise ValueError(f"{len(keys)} keys for {n} values")
    if keys is None:
        # Per value length L: prefix = frame header, RECORD header, null key, varint L;
        # suffix = headers and padding.
        pre: dict[int, bytes] = {}
        post: dict[int, bytes] = {}
        for L in set(vlens):
            vz = _zz(L)
            plen = _REC_PREFIX + 1 + len(vz) + (L if L > 0 else 0) + hl
            pre[L] = pack(plen, FRAME_RECORD, topic_id, 0, partition, timestamp_ms) + _NULL + vz
            post[L] = tail + _PADS[-(plen + 8) & 7]
        parts: list[_Bytes] = [b""] * (3 * n)
        if len(pre) == 1:
            parts[0::3] = [pre[vlens[0]]] * n
            parts[2::3] = [post[vlens[0]]] * n
        else:
            parts[0::3] = list(map(pre.__getitem__, vlens))
            parts[2::3] = list(map(post.__getitem__, vlens))
        parts[1::3] = values
        return b"".join(parts)
    try:
        klens = list(map(len, keys))
    except TypeError:
        klens = [-1 if k is None else len(k) for k in keys]
        keys = [b"" if k is None else k for k in keys]
    # Per (key length K, value length L): prefix = frame header, RECORD header, varint K;
    # middle = varint L; suffix = headers and padding.
    kmin = min(klens)
    if kmin == max(klens):
        sizes: list[Any] = vlens
        combos = {(kmin, L): L for L in set(vlens)}
    else:
        sizes = list(zip(klens, vlens))
        combos = {c: c for c in set(sizes)}
    pre = {}
    mid: dict[Any, bytes] = {}
    post = {}
    for (K, L), c in combos.items():
        kz = _zz(K)
        vz = _zz(L)
        plen = _REC_PREFIX + len(kz) + (K if K > 0 else 0) + len(vz) + (L if L > 0 else 0) + hl
        pre[c] = pack(plen, FRAME_RECORD, topic_id, 0, partition, timestamp_ms) + kz
        mid[c] = vz
        post[c] = tail + _PADS[-(plen + 8) & 7]
    parts = [b""] * (5 * n)
    if len(pre) == 1:
        c = sizes[0]
        parts[0::5] = [pre[c]] * n
        parts[2::5] = [mid[c]] * n
        parts[4::5] = [post[c]] * n
    else:
        parts[0::5] = list(map(pre.__getitem__, sizes))
        parts[2::5] = list(map(mid.__getitem__, sizes))
        parts[4::5] = list(map(post.__getitem__, sizes))
    parts[1::5] = keys
    parts[3::5] = values
    return b"".join(parts)


def put_frames(ring: SpscRing, frames: bytes, start: int, count: int) -> tuple[int, int]:
    """Copy whole frames from ``frames[start:]`` (``count`` of them, e.g. from
    :func:`encode_record_frames`) into ``ring``. Not committed until ``ring.publish_head()``.

    Fast path: one :meth:`~shm.ring.SpscRing.claim` of the whole span as if it were one
    frame, whose header is then overwritten by the first real frame's: frames are 8-byte
    aligned and the span is their exact sum, so the ring holds the same frames as one claim
    per frame would have made (a span never straddles the wrap; ``claim`` pads before it).
    When the span does not fit (ring full, or larger than a frame may be) it copies frame
    by frame as far as there is room.

    Returns:
        ``(next_start, written)``: where the first frame not written starts in ``frames``
        and how many frames were written (0: the ring is full).
    """
    end = len(frames)
    nbytes = end - start
    if nbytes <= 0:
        return start, 0
    view = ring.view
    src = memoryview(frames)
    if nbytes <= ring.max_frame:
        pos = ring.claim(FRAME_RECORD, nbytes - 8)
        if pos >= 0:
            view[pos - 8 : pos - 8 + nbytes] = src[start:end]
            return end, count
    written = 0
    claim = ring.claim
    at = start
    while at < end:
        plen = _unpack_frame(frames, at)[0]
        pos = claim(FRAME_RECORD, plen)
        if pos < 0:
            break
        view[pos : pos + plen] = src[at + 8 : at + 8 + plen]
        at += (plen + 15) & -8
        written += 1
    return at, written


def _frame_error(ring: SpscRing, pos: int, what: str) -> CorruptFrameError:
    return CorruptFrameError(f"{ring.name}: frame at data offset {pos - ring.data_start}: {what}")


def iter_completions(
    ring: SpscRing, start: int, end: int, partition_limits: Sequence[int]
) -> Iterator[tuple[int, int, int, int, int, int, int]]:
    """Walk and validate the COMPLETION frames of ``ring.view[start:end]``.

    Args:
        partition_limits: for each topic id the client uses, its partition count; a topic id
            ``>= len(partition_limits)`` or a partition outside ``[0, limit)`` is corrupt.

    Yields:
        ``(frame_end, topic_id, error_code, partition, base_offset, timestamp_ms, count)``;
        a CHUNK_DONE frame yields ``topic_id == CHUNK_DONE_TOPIC`` (-1) with the request-ring
        position it releases in ``base_offset``.

    Raises:
        CorruptFrameError: on any bad frame (length, type, topic id, partition, count 0).
    """
    view = ring.view
    data_end = ring.data_end
    ntopics = len(partition_limits)
    pos = start
    while pos < end:
        if end - pos < 8:
            raise _frame_error(ring, pos, f"frame header past the end ({end - pos} bytes left)")
        plen, ftype = _unpack_frame(view, pos)
        fend = pos + ((plen + 15) & -8)
        if fend > end:
            raise _frame_error(ring, pos, f"payload length {plen} runs past the committed end")
        if ftype == FRAME_COMPLETION:
            if plen != 32:
                raise _frame_error(ring, pos, f"COMPLETION payload of {plen} bytes, expected 32")
            _, _, topic_id, error_code, partition, base_offset, ts, count, _ = (
                _unpack_frame_completion(view, pos)
            )
            if topic_id >= ntopics:
                raise _frame_error(ring, pos, f"topic id {topic_id} unknown ({ntopics} topics)")
            if partition < 0 or partition >= partition_limits[topic_id]:
                raise _frame_error(
                    ring,
                    pos,
                    f"partition {partition} of topic id {topic_id} outside "
                    f"[0, {partition_limits[topic_id]})",
                )
            if count == 0:
                raise _frame_error(ring, pos, "COMPLETION with count 0")
            yield fend, topic_id, error_code, partition, base_offset, ts, count
        elif ftype == FRAME_CHUNK_DONE:
            if plen != 8:
                raise _frame_error(ring, pos, f"CHUNK_DONE payload of {plen} bytes, expected 8")
            yield fend, CHUNK_DONE_TOPIC, 0, 0, _unpack_u64(view, pos + 8)[0], -1, 0
        elif ftype == FRAME_PADDING:
            if fend != data_end:
                raise _frame_error(ring, pos, "padding frame does not end at the wrap")
        else:
            raise _frame_error(ring, pos, f"frame type {ftype} in a completion ring")
        pos = fend


CHUNK_DONE_TOPIC = -1
"""The topic id :func:`iter_completions` reports for a CHUNK_DONE frame."""


def chunk_done_end(ring: SpscRing) -> int | None:
    """The largest position in a CHUNK_DONE frame the completion ring's reader has not consumed.

    Used by a restarted worker (the ring's *writer*) to learn how far the dead worker had
    completed: it reads the unconsumed frames between the stored tail and head without moving
    anything. None when there is no such frame.

    Raises:
        CorruptFrameError: the unconsumed frames do not parse.
    """
    view = ring.view
    tail, head = ring.tail, ring.head
    if tail > head or head - tail > ring.capacity or tail & 7 or head & 7:
        raise CorruptFrameError(f"{ring.name}: inconsistent positions head={head} tail={tail}")
    mask = ring.capacity - 1
    found: int | None = None
    pos = tail
    while pos < head:
        at = ring.data_start + (pos & mask)
        plen, ftype = _unpack_frame(view, at)
        size = (plen + 15) & -8
        if size > head - pos or at + size > ring.data_end:
            raise _frame_error(ring, at, f"payload length {plen} runs past the committed end")
        if ftype == FRAME_CHUNK_DONE and plen == 8:
            found = _unpack_u64(view, at + 8)[0]
        pos += size
    return found
