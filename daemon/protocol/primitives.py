"""Kafka protocol primitive types: fixed-width integers, varints, strings, arrays, tagged fields.

Pure functions over bytes, no I/O. Encoders return ``bytes``; decoding goes through
:class:`Reader`, a cursor over a ``bytes``/``memoryview`` that raises :class:`ProtocolError` on
truncated or malformed input instead of ``IndexError``/``struct.error``.

Wire forms (all integers big-endian, see the Kafka protocol guide, "Protocol Primitive Types"):

    INT8/16/32/64          two's complement, 1/2/4/8 bytes
    UNSIGNED_VARINT        7 bits per byte, low group first, high bit = "more bytes follow"
    VARINT / VARLONG       zig-zag ((n << 1) ^ (n >> 63)) then UNSIGNED_VARINT
    STRING                 INT16 length N (-1 = null for NULLABLE_STRING), N bytes of UTF-8
    COMPACT_STRING         UNSIGNED_VARINT N+1 (0 = null for COMPACT_NULLABLE_STRING), N bytes
    COMPACT_BYTES          UNSIGNED_VARINT N+1 (0 = null), N bytes
    COMPACT_ARRAY          UNSIGNED_VARINT N+1 (0 = null), N elements
    UUID                   16 bytes
    BOOLEAN                INT8, 0 = false, anything else = true
    TAGGED_FIELDS          UNSIGNED_VARINT count, then per field: UNSIGNED_VARINT tag,
                           UNSIGNED_VARINT size, size bytes (tags ascending)
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from shm.errors import ProtocolError

__all__ = [
    "Reader",
    "EMPTY_TAGGED_FIELDS",
    "int8",
    "int16",
    "int32",
    "int64",
    "boolean",
    "uvarint",
    "varint",
    "string",
    "compact_string",
    "compact_bytes_header",
    "compact_bytes",
    "compact_array_len",
    "tagged_fields",
]

_I8 = struct.Struct(">b")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")

# A flexible structure with no tagged fields ends with this one byte (count 0).
EMPTY_TAGGED_FIELDS = b"\x00"

# Unsigned varints 0..127 are one byte; the table avoids a loop for the common small values
# (array lengths, string lengths, tag counts).
_SMALL_UVARINT = tuple(bytes((i,)) for i in range(128))


def int8(v: int) -> bytes:
    """INT8."""
    return _I8.pack(v)


def int16(v: int) -> bytes:
    """INT16, big-endian."""
    return _I16.pack(v)


def int32(v: int) -> bytes:
    """INT32, big-endian."""
    return _I32.pack(v)


def int64(v: int) -> bytes:
    """INT64, big-endian."""
    return _I64.pack(v)


def boolean(v: bool) -> bytes:
    """BOOLEAN as one byte."""
    return b"\x01" if v else b"\x00"


def uvarint(v: int) -> bytes:
    """UNSIGNED_VARINT (at most 32 bits in the header/body fields that use it)."""
    if 0 <= v < 128:
        return _SMALL_UVARINT[v]
    if v < 0:
        raise ValueError(f"unsigned varint cannot encode {v}")
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def varint(v: int) -> bytes:
    """Signed zig-zag VARINT/VARLONG (64-bit range)."""
    return uvarint(((v << 1) ^ (v >> 63)) & 0xFFFFFFFFFFFFFFFF)


def string(s: str | None) -> bytes:
    """NULLABLE_STRING with an INT16 length (the request header's client id uses this)."""
    if s is None:
        return b"\xff\xff"
    raw = s.encode()
    return _I16.pack(len(raw)) + raw


def compact_string(s: str | bytes | None) -> bytes:
    """COMPACT_(NULLABLE_)STRING: UNSIGNED_VARINT length+1, 0 for null."""
    if s is None:
        return b"\x00"
    raw = s.encode() if isinstance(s, str) else s
    return uvarint(len(raw) + 1) + raw


def compact_bytes_header(length: int | None) -> bytes:
    """The length prefix of COMPACT_(NULLABLE_)BYTES, for callers that send the data separately."""
    return b"\x00" if length is None else uvarint(length + 1)


def compact_bytes(b: bytes | memoryview | None) -> bytes:
    """COMPACT_(NULLABLE_)BYTES (copies; use :func:`compact_bytes_header` for large payloads)."""
    if b is None:
        return b"\x00"
    return uvarint(len(b) + 1) + bytes(b)


def compact_array_len(n: int | None) -> bytes:
    """The length prefix of a COMPACT_ARRAY: N+1, or 0 for a null array."""
    return b"\x00" if n is None else uvarint(n + 1)


def tagged_fields(fields: Iterable[tuple[int, bytes]] = ()) -> bytes:
    """TAGGED_FIELDS from (tag, already-encoded value) pairs; tags must ascend."""
    items = list(fields)
    if not items:
        return EMPTY_TAGGED_FIELDS
    out = [uvarint(len(items))]
    last = -1
    for tag, value in items:
        if tag <= last:
            raise ValueError("tagged fields must be written in ascending tag order")
        last = tag
        out.append(uvarint(tag))
        out.append(uvarint(len(value)))
        out.append(value)
    return b"".join(out)


class Reader:
    """A cursor over a Kafka message body. Every read checks bounds.

    Attributes:
        buf: the underlying memoryview.
        pos: the next byte to read.
    """

    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: bytes | bytearray | memoryview, pos: int = 0) -> None:
        self.buf = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf
        self.pos = pos
        self.end = len(self.buf)

    def _take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > self.end:
            raise ProtocolError(f"truncated Kafka message: need {n} bytes at offset {start}, have {self.end - start}")
        self.pos = start + n
        return start

    def remaining(self) -> int:
        """Bytes not read yet."""
        return self.end - self.pos

    def expect_end(self) -> None:
        """Raise ProtocolError if bytes are left over (a schema mismatch)."""
        if self.pos != self.end:
            raise ProtocolError(f"{self.end - self.pos} unexpected trailing bytes at offset {self.pos}")

    def int8(self) -> int:
        """Read an INT8."""
        return _I8.unpack_from(self.buf, self._take(1))[0]

    def int16(self) -> int:
        """Read an INT16."""
        return _I16.unpack_from(self.buf, self._take(2))[0]

    def int32(self) -> int:
        """Read an INT32."""
        return _I32.unpack_from(self.buf, self._take(4))[0]

    def int64(self) -> int:
        """Read an INT64."""
        return _I64.unpack_from(self.buf, self._take(8))[0]

    def boolean(self) -> bool:
        """Read a BOOLEAN."""
        return self.buf[self._take(1)] != 0

    def uvarint(self) -> int:
        """Read an UNSIGNED_VARINT (at most 10 bytes)."""
        buf, pos, end = self.buf, self.pos, self.end
        result = 0
        shift = 0
        while True:
            if pos >= end:
                raise ProtocolError(f"truncated varint at offset {self.pos}")
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
            if shift > 63:
                raise ProtocolError(f"varint longer than 10 bytes at offset {self.pos}")
        self.pos = pos
        return result

    def varint(self) -> int:
        """Read a zig-zag VARINT/VARLONG."""
        u = self.uvarint()
        return (u >> 1) ^ -(u & 1)

    def uuid(self) -> bytes:
        """Read a UUID as its 16 raw bytes."""
        start = self._take(16)
        return bytes(self.buf[start : start + 16])

    def raw(self, n: int) -> memoryview:
        """Read ``n`` raw bytes as a memoryview (no copy)."""
        start = self._take(n)
        return self.buf[start : start + n]

    def string(self) -> str | None:
        """Read a (NULLABLE_)STRING with an INT16 length."""
        n = self.int16()
        if n < 0:
            return None
        return self._utf8(n)

    def compact_string(self) -> str | None:
        """Read a COMPACT_(NULLABLE_)STRING (None for null)."""
        n = self.uvarint() - 1
        if n < 0:
            return None
        return self._utf8(n)

    def _utf8(self, n: int) -> str:
        start = self._take(n)
        try:
            return str(self.buf[start : start + n], "utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"invalid UTF-8 string at offset {start}") from exc

    def compact_bytes(self) -> memoryview | None:
        """Read COMPACT_(NULLABLE_)BYTES as a memoryview (None for null)."""
        n = self.uvarint() - 1
        if n < 0:
            return None
        return self.raw(n)

    def compact_array_len(self) -> int:
        """Read a COMPACT_ARRAY length: N, or -1 for a null array."""
        n = self.uvarint() - 1
        if n > self.end - self.pos:
            # Every element takes at least one byte: a larger count is corrupt, and refusing
            # it early stops a hostile length from driving a huge loop.
            raise ProtocolError(f"array length {n} exceeds the {self.end - self.pos} bytes left")
        return n

    def int32_compact_array(self) -> list[int]:
        """Read a COMPACT_ARRAY of INT32 (a null array reads as empty)."""
        n = self.compact_array_len()
        if n <= 0:
            return []
        start = self._take(4 * n)
        return list(struct.unpack_from(f">{n}i", self.buf, start))

    def tagged_fields(self) -> dict[int, memoryview]:
        """Read TAGGED_FIELDS into {tag: raw value}; unknown tags are kept for the caller."""
        count = self.uvarint()
        if count == 0:
            return {}
        out: dict[int, memoryview] = {}
        for _ in range(count):
            tag = self.uvarint()
            size = self.uvarint()
            out[tag] = self.raw(size)
        return out
