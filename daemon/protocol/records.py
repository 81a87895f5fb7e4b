"""Kafka RecordBatch v2 (magic 2): building batches in place, stamping, compressing, decoding.

A batch is built in a caller-owned buffer (a region of the worker arena): the records are copied
into ``buf[start + HEADER_SIZE:]`` by the compiled ``daemon._batcher.append_region`` (driven by
the accumulator), then :func:`finish_batch` compresses them in place (when that saves space),
writes the 61-byte header and the CRC32C. :func:`stamp_batch` later writes the producer id,
epoch and base sequence and recomputes the CRC, which covers them.

Batch header, big-endian (``BATCH_HEADER`` below; offsets come from ``struct.calcsize``)::

    baseOffset            int64   0 from a producer; the broker assigns offsets
    batchLength           int32   bytes after this field (partitionLeaderEpoch .. end)
    partitionLeaderEpoch  int32   -1 from a producer
    magic                 int8    2
    crc                   uint32  CRC32C (Castagnoli) of attributes .. end of the batch
    attributes            int16   bits 0-2 codec, 3 timestamp type, 4 transactional, 5 control
    lastOffsetDelta       int32   offset delta of the last record (record_count - 1)
    baseTimestamp         int64   timestamp of the first record
    maxTimestamp          int64   largest record timestamp
    producerId            int64   -1 until stamped
    producerEpoch         int16   -1 until stamped
    baseSequence          int32   -1 until stamped
    recordCount           int32   number of records
    records               bytes   the records, compressed as one block when attributes say so

Record (all varints are Kafka's zig-zag varints)::

    length          varint  bytes after this field
    attributes      int8    0
    timestampDelta  varint  timestamp - baseTimestamp
    offsetDelta     varint  index of the record in the batch
    keyLength       varint  -1 = null key          \\
    key             bytes                            |  the *body*: encoded by the client
    valueLength     varint  -1 = null value          |  (shm.frames.encode_record_body) and
    value           bytes                            |  copied verbatim from the ring
    headerCount     varint                           |
    headers         per header: varint keyLength, key (utf-8), varint valueLength, value  /

Compression framing is what the Java producer writes, so every consumer can read it:

- gzip: a gzip member (RFC 1952).
- snappy: xerial ``SnappyOutputStream`` framing (Kafka's producer uses it; librdkafka and the
  Java consumer read it): the 16-byte header ``\\x82SNAPPY\\x00`` + int32 version 1 + int32
  compatible version 1, then per block of up to 32 KiB of input an int32 big-endian compressed
  length followed by a raw snappy block.
- lz4: an LZ4 frame with *independent* blocks (Kafka's ``Lz4BlockInputStream`` refuses dependent
  blocks; cramjam's one-shot ``lz4.compress`` links them, so the streaming compressor is used
  with ``block_linked=False``) and no content checksum, as Kafka writes it.
- zstd: a zstd frame, level 3 (Kafka's default level).
"""

from __future__ import annotations

import struct
from typing import Iterable, NamedTuple, Sequence

import cramjam
from crc32c import crc32c

from shm.errors import ProtocolError
from shm.frames import zigzag_varint

__all__ = [
    "BATCH_HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "OFFSET_BATCH_LENGTH",
    "OFFSET_CRC",
    "OFFSET_ATTRIBUTES",
    "OFFSET_PRODUCER_ID",
    "OFFSET_RECORD_COUNT",
    "CODEC_NONE",
    "CODEC_GZIP",
    "CODEC_SNAPPY",
    "CODEC_LZ4",
    "CODEC_ZSTD",
    "CODECS",
    "record_bodies",
    "ATTR_CODEC_MASK",
    "ATTR_TIMESTAMP_TYPE",
    "ATTR_TRANSACTIONAL",
    "ATTR_CONTROL",
    "encode_varint",
    "record_prefix",
    "encode_records",
    "finish_batch",
    "stamp_batch",
    "build_batch",
    "compress",
    "decompress",
    "DecodedRecord",
    "DecodedBatch",
    "decode_batches",
]

# -- the batch header ---------------------------------------------------------------------------

# One format character per field of the header, in wire order (see the module docstring).
_HEADER_FIELDS = (
    ("base_offset", "q"),
    ("batch_length", "i"),
    ("partition_leader_epoch", "i"),
    ("magic", "b"),
    ("crc", "I"),
    ("attributes", "h"),
    ("last_offset_delta", "i"),
    ("base_timestamp", "q"),
    ("max_timestamp", "q"),
    ("producer_id", "q"),
    ("producer_epoch", "h"),
    ("base_sequence", "i"),
    ("record_count", "i"),
)


def _offset_of(name: str) -> int:
    """Byte offset of a header field, derived from the sizes of the fields before it."""
    fmt = ">"
    for field, code in _HEADER_FIELDS:
        if field == name:
            return struct.calcsize(fmt)
        fmt += code
    raise KeyError(name)


BATCH_HEADER = struct.Struct(">" + "".join(code for _, code in _HEADER_FIELDS))
HEADER_SIZE = BATCH_HEADER.size  # 61
MAGIC = 2
OFFSET_BATCH_LENGTH = _offset_of("batch_length")
OFFSET_CRC = _offset_of("crc")
OFFSET_ATTRIBUTES = _offset_of("attributes")
OFFSET_PRODUCER_ID = _offset_of("producer_id")
OFFSET_RECORD_COUNT = _offset_of("record_count")
# batchLength counts the bytes after itself.
_LENGTH_BASE = OFFSET_BATCH_LENGTH + 4

# attributes .. recordCount, packed together after the CRC is known to be pending.
_AFTER_CRC = struct.Struct(">hiqqqhii")
# producerId, producerEpoch, baseSequence: the three fields stamp_batch() rewrites.
_PRODUCER = struct.Struct(">qhi")
_PREFIX = struct.Struct(">qiib")  # baseOffset, batchLength, partitionLeaderEpoch, magic
_CRC = struct.Struct(">I")

CODEC_NONE, CODEC_GZIP, CODEC_SNAPPY, CODEC_LZ4, CODEC_ZSTD = 0, 1, 2, 3, 4
CODECS: dict[str, int] = {
    "none": CODEC_NONE,
    "gzip": CODEC_GZIP,
    "snappy": CODEC_SNAPPY,
    "lz4": CODEC_LZ4,
    "zstd": CODEC_ZSTD,
}
ATTR_CODEC_MASK = 0x07
ATTR_TIMESTAMP_TYPE = 0x08  # set = LogAppendTime (brokers set it; producers send CreateTime)
ATTR_TRANSACTIONAL = 0x10
ATTR_CONTROL = 0x20

# -- varints --------------------------------------------------------------------------------------


# The record-level zig-zag varint encoder is shm.frames.zigzag_varint (one encoder for the
# project; the compiled one is shm/_record.h sl_put_varint, held to it by the tests).
encode_varint = zigzag_varint


def _read_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Decode one zig-zag varint at ``pos``; returns (value, next position). Decoder only."""
    shift = 0
    raw = 0
    while True:
        if pos >= len(data):
            raise ProtocolError("truncated varint")
        b = data[pos]
        pos += 1
        raw |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
        if shift > 63:
            raise ProtocolError("varint longer than 10 bytes")
    return (raw >> 1) ^ -(raw & 1), pos


def record_prefix(body_len: int, timestamp_delta: int, offset_delta: int) -> bytes:
    """The bytes that precede a body to make a record: length, attributes, both deltas.

    The Python encoder (build_batch, tests); the worker's is daemon._batcher.append_region.
    """
    tail = b"\x00" + encode_varint(timestamp_delta) + encode_varint(offset_delta)
    return encode_varint(len(tail) + body_len) + tail


def encode_records(
    records: Iterable[tuple[int, bytes | memoryview]], base_timestamp: int, first_offset_delta: int = 0
) -> tuple[bytes, int, int]:
    """Encode ``(timestamp_ms, body)`` pairs as consecutive records.

    Returns ``(records_bytes, count, max_timestamp)``. A convenience for the non-bulk paths and tests;
    max_timestamp is ``base_timestamp`` when there are no records.
    """
    parts: list[bytes | memoryview] = []
    n = first_offset_delta
    max_ts = base_timestamp
    for ts, body in records:
        parts.append(record_prefix(len(body), ts - base_timestamp, n))
        parts.append(body)
        n += 1
        if ts > max_ts:
            max_ts = ts
    return b"".join(parts), n - first_offset_delta, max_ts


# -- compression ------------------------------------------------------------------------------

_XERIAL_HEADER = b"\x82SNAPPY\x00" + struct.pack(">ii", 1, 1)
_XERIAL_BLOCK = 32 * 1024  # snappy-java's default block size
_BE_INT = struct.Struct(">i")
_ZSTD_LEVEL = 3


def _snappy_xerial(data: bytes | memoryview) -> bytes:
    parts = [_XERIAL_HEADER]
    view = memoryview(data)
    for i in range(0, len(view), _XERIAL_BLOCK):
        block = bytes(cramjam.snappy.compress_raw(view[i : i + _XERIAL_BLOCK]))
        parts.append(_BE_INT.pack(len(block)))
        parts.append(block)
    return b"".join(parts)


def _unsnappy(data: bytes | memoryview) -> bytes:
    # Accept both the xerial framing (Java producers, us) and a bare raw block (librdkafka).
    view = memoryview(data)
    if bytes(view[:8]) != _XERIAL_HEADER[:8]:
        return bytes(cramjam.snappy.decompress_raw(view))
    parts = []
    pos = len(_XERIAL_HEADER)
    while pos < len(view):
        if pos + 4 > len(view):
            raise ProtocolError("truncated xerial snappy block length")
        (n,) = _BE_INT.unpack_from(view, pos)
        pos += 4
        if n < 0 or pos + n > len(view):
            raise ProtocolError("truncated xerial snappy block")
        parts.append(bytes(cramjam.snappy.decompress_raw(view[pos : pos + n])))
        pos += n
    return b"".join(parts)


def _lz4_frame(data: bytes | memoryview) -> bytes:
    c = cramjam.lz4.Compressor(content_checksum=False, block_linked=False)
    # The streaming compressor takes only bytes; one copy is cheap next to the compression.
    c.compress(data if isinstance(data, bytes) else bytes(data))
    return bytes(c.finish())


def compress(codec: int, data: bytes | memoryview) -> bytes:
    """Compress a records block with Kafka's framing for ``codec`` (a CODEC_* value)."""
    if codec == CODEC_GZIP:
        return bytes(cramjam.gzip.compress(data))
    if codec == CODEC_SNAPPY:
        return _snappy_xerial(data)
    if codec == CODEC_LZ4:
        return _lz4_frame(data)
    if codec == CODEC_ZSTD:
        return bytes(cramjam.zstd.compress(data, level=_ZSTD_LEVEL))
    if codec == CODEC_NONE:
        return bytes(data)
    raise ValueError(f"unknown compression codec {codec}")


def decompress(codec: int, data: bytes | memoryview) -> bytes:
    """Inverse of :func:`compress`; raises ProtocolError on data the codec refuses."""
    try:
        if codec == CODEC_NONE:
            return bytes(data)
        if codec == CODEC_GZIP:
            return bytes(cramjam.gzip.decompress(data))
        if codec == CODEC_SNAPPY:
            return _unsnappy(data)
        if codec == CODEC_LZ4:
            return bytes(cramjam.lz4.decompress(data))
        if codec == CODEC_ZSTD:
            return bytes(cramjam.zstd.decompress(data))
    except cramjam.DecompressionError as exc:
        raise ProtocolError(f"cannot decompress codec {codec}: {exc}") from exc
    raise ProtocolError(f"unknown compression codec {codec}")


# -- building -------------------------------------------------------------------------------------


def finish_batch(
    buf: bytearray | memoryview,
    start: int,
    records_len: int,
    record_count: int,
    base_timestamp: int,
    max_timestamp: int,
    codec: int = CODEC_NONE,
    producer_id: int = -1,
    producer_epoch: int = -1,
    base_sequence: int = -1,
) -> tuple[int, int]:
    """Seal a batch whose records already sit at ``buf[start + HEADER_SIZE:][:records_len]``.

    Compresses the records in place when ``codec`` asks for it *and* the result is smaller (a
    batch that does not shrink is left uncompressed, codec none, which every reader accepts), then
    writes the header and the CRC. Returns ``(batch_length_in_bytes, codec_used)``.
    """
    body = start + HEADER_SIZE
    if codec != CODEC_NONE:
        packed = compress(codec, buf[body : body + records_len])
        if len(packed) < records_len:
            buf[body : body + len(packed)] = packed
            records_len = len(packed)
        else:
            codec = CODEC_NONE
    total = HEADER_SIZE + records_len
    _PREFIX.pack_into(buf, start, 0, total - _LENGTH_BASE, -1, MAGIC)
    _AFTER_CRC.pack_into(
        buf,
        start + OFFSET_ATTRIBUTES,
        codec,
        record_count - 1,
        base_timestamp,
        max_timestamp,
        producer_id,
        producer_epoch,
        base_sequence,
        record_count,
    )
    _CRC.pack_into(buf, start + OFFSET_CRC, crc32c(buf[start + OFFSET_ATTRIBUTES : start + total]))
    return total, codec


def stamp_batch(
    buf: bytearray | memoryview, start: int, length: int, producer_id: int, producer_epoch: int, base_sequence: int
) -> None:
    """Write producerId, producerEpoch and baseSequence into a finished batch; recompute the CRC."""
    _PRODUCER.pack_into(buf, start + OFFSET_PRODUCER_ID, producer_id, producer_epoch, base_sequence)
    _CRC.pack_into(buf, start + OFFSET_CRC, crc32c(buf[start + OFFSET_ATTRIBUTES : start + length]))


def build_batch(
    records: Sequence[tuple[int, bytes | memoryview]],
    codec: int = CODEC_NONE,
    producer_id: int = -1,
    producer_epoch: int = -1,
    base_sequence: int = -1,
) -> bytes:
    """A whole RecordBatch v2 as bytes from ``(timestamp_ms, body)`` pairs (tests, slow paths)."""
    if not records:
        raise ValueError("a RecordBatch needs at least one record")
    base_ts = records[0][0]
    data, count, max_ts = encode_records(records, base_ts)
    buf = bytearray(HEADER_SIZE + len(data))
    buf[HEADER_SIZE:] = data
    total, _ = finish_batch(
        buf, 0, len(data), count, base_ts, max_ts, codec, producer_id, producer_epoch, base_sequence
    )
    return bytes(buf[:total])


# -- splitting (a batch the broker refused as too large; never on the hot path) ---------------


def record_bodies(batch: bytes | memoryview) -> tuple[int, list[tuple[int, bytes]]]:
    """One RecordBatch v2's records as ``(timestamp_ms, body)`` pairs, in order, and its codec.

    ``body`` is a record's bytes after its offset delta (key, value, headers: what
    :func:`encode_records` takes back), so a part of the records can be encoded again as a
    batch of its own. The CRC is not checked: the batch comes from this process's own arena.

    Returns:
        ``(codec, [(timestamp_ms, body), ...])``.

    Raises:
        ProtocolError: the batch or its records are malformed.
    """
    view = memoryview(batch)
    if len(view) < HEADER_SIZE:
        raise ProtocolError("truncated RecordBatch header")
    (_base_offset, length, _epoch, magic, _crc, attributes, _last, base_ts, _max_ts, _pid, _pepoch, _seq,
     count) = BATCH_HEADER.unpack_from(view, 0)
    if magic != MAGIC or _LENGTH_BASE + length > len(view):
        raise ProtocolError("not one whole RecordBatch v2")
    codec = attributes & ATTR_CODEC_MASK
    data = decompress(codec, view[HEADER_SIZE : _LENGTH_BASE + length])
    out: list[tuple[int, bytes]] = []
    pos = 0
    for _ in range(count):
        size, pos = _read_varint(data, pos)
        end = pos + size
        if size < 1 or end > len(data):
            raise ProtocolError("record length runs past the batch")
        ts_delta, at = _read_varint(data, pos + 1)  # after the attributes byte
        _offset_delta, at = _read_varint(data, at)
        if at > end:
            raise ProtocolError("record header runs past the record")
        out.append((base_ts + ts_delta, bytes(data[at:end])))
        pos = end
    if pos != len(data):
        raise ProtocolError("bytes left after the last record")
    return codec, out


# -- decoding (tests and diagnostics; never on the hot path) ----------------------------------


class DecodedRecord(NamedTuple):
    """One record of a decoded batch. ``timestamp`` is absolute (base + delta)."""

    offset_delta: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]


class DecodedBatch(NamedTuple):
    """One decoded RecordBatch v2 with its header fields and records."""

    base_offset: int
    partition_leader_epoch: int
    crc: int
    attributes: int
    last_offset_delta: int
    base_timestamp: int
    max_timestamp: int
    producer_id: int
    producer_epoch: int
    base_sequence: int
    records: list[DecodedRecord]

    @property
    def codec(self) -> int:
        return self.attributes & ATTR_CODEC_MASK


def _read_bytes(data: bytes, pos: int) -> tuple[bytes | None, int]:
    n, pos = _read_varint(data, pos)
    if n < 0:
        return None, pos
    if pos + n > len(data):
        raise ProtocolError("record field runs past the record")
    return data[pos : pos + n], pos + n


def _decode_records(data: bytes, count: int, base_ts: int) -> list[DecodedRecord]:
    out: list[DecodedRecord] = []
    pos = 0
    for _ in range(count):
        length, pos = _read_varint(data, pos)
        end = pos + length
        if length < 1 or end > len(data):
            raise ProtocolError("record length runs past the batch")
        rec = data[:end]
        pos += 1  # attributes
        ts_delta, pos = _read_varint(rec, pos)
        offset_delta, pos = _read_varint(rec, pos)
        key, pos = _read_bytes(rec, pos)
        value, pos = _read_bytes(rec, pos)
        n_headers, pos = _read_varint(rec, pos)
        if n_headers < 0:
            raise ProtocolError("negative header count")
        headers: list[tuple[str, bytes | None]] = []
        for _ in range(n_headers):
            hkey, pos = _read_bytes(rec, pos)
            if hkey is None:
                raise ProtocolError("null header key")
            hval, pos = _read_bytes(rec, pos)
            headers.append((hkey.decode("utf-8"), hval))
        if pos != end:
            raise ProtocolError("record length does not match its fields")
        out.append(DecodedRecord(offset_delta, base_ts + ts_delta, key, value, headers))
    if pos != len(data):
        raise ProtocolError("bytes left after the last record")
    return out


def decode_batches(data: bytes | memoryview) -> list[DecodedBatch]:
    """Decode consecutive RecordBatch v2 structures, verifying each CRC32C.

    Raises ProtocolError on a wrong magic, a CRC mismatch, a truncated batch or malformed records.
    """
    view = memoryview(data)
    batches: list[DecodedBatch] = []
    pos = 0
    while pos < len(view):
        if pos + HEADER_SIZE > len(view):
            raise ProtocolError("truncated RecordBatch header")
        (base_offset, length, leader_epoch, magic, crc, attributes, last_delta, base_ts, max_ts, pid, epoch,
         base_seq, count) = BATCH_HEADER.unpack_from(view, pos)
        if magic != MAGIC:
            raise ProtocolError(f"RecordBatch magic {magic}, expected {MAGIC}")
        end = pos + _LENGTH_BASE + length
        if length < HEADER_SIZE - _LENGTH_BASE or end > len(view):
            raise ProtocolError("RecordBatch length runs past the data")
        actual = crc32c(view[pos + OFFSET_ATTRIBUTES : end])
        if actual != crc:
            raise ProtocolError(f"RecordBatch CRC mismatch: header {crc:#010x}, computed {actual:#010x}")
        raw = decompress(attributes & ATTR_CODEC_MASK, view[pos + HEADER_SIZE : end])
        records = _decode_records(raw, count, base_ts)
        batches.append(
            DecodedBatch(base_offset, leader_epoch, crc, attributes, last_delta, base_ts, max_ts, pid, epoch,
                         base_seq, records)
        )
        pos = end
    return batches
