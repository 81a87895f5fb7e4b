"""The Unix-socket control protocol: message Structs, framing, and a streaming frame reader.

Shared by the client library, the ``sluice send`` CLI and the daemon. ``docs/PROTOCOL.md``
is the language-neutral specification; this module is its reference implementation.

Framing::

    +----------------------+----------------------------------------------+
    | length: u32, big end | msgpack map of one message, "type" key first |
    +----------------------+----------------------------------------------+
      4 bytes                length bytes, 1 <= length <= MAX_FRAME_BYTES

Each message is a msgpack map whose ``"type"`` entry names it (a tagged union). Receivers
ignore keys they do not know, so later versions may add optional fields; an unknown
``"type"`` is a protocol error. Requests (client -> daemon) may leave out any field that has
a default; replies (daemon -> client) always carry every field.

Ordering: Hello comes first, once. Replies to non-Produce requests come in request order. A
``ProduceAck`` comes when its records are complete, possibly after later replies, and is
matched by ``seq``. A Produce with ``ack = False`` is never answered (its failures are counted,
and reported by the next FlushDone's ``failed``). A fatal ``ErrorReply`` may come at any time
and is the last frame; the daemon closes the connection after it.

Unsolicited: a client whose Hello said ``topic_updates`` also gets a ``TopicChanged`` whenever a
topic gained partitions. It answers no request and may come at any time, between any two
replies; a reader sets it aside and keeps waiting for the reply it wanted. A client that did
not ask never gets one.

Field values: a ``Rec`` whose ``value`` is left out or nil is a tombstone (null value); an
empty bin is an empty value. The reference encoder leaves out only fields equal to their
default (None), so an empty value is always written.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Annotated, Any, Literal, TypeAlias

import msgspec

from shm.errors import ProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "MIN_PROTOCOL_VERSION",
    "MAX_FRAME_BYTES",
    "MAX_PRODUCE_RECORDS",
    "LENGTH_PREFIX",
    "ERR_UNSUPPORTED_PROTOCOL_VERSION",
    "ERR_BAD_FRAME",
    "ERR_UNEXPECTED_MESSAGE",
    "ERR_NOT_ALLOWED",
    "ERR_SEGMENT_REFUSED",
    "ERR_SHUTTING_DOWN",
    "ERR_BUFFER_FULL",
    "ERR_OUTCOME_UNKNOWN",
    "ERROR_NAMES",
    "Rec",
    "RecordResult",
    "Hello",
    "SegmentOffer",
    "TopicLookup",
    "Produce",
    "Flush",
    "StatsRequest",
    "Goodbye",
    "Welcome",
    "SegmentAccepted",
    "TopicInfo",
    "ProduceAck",
    "FlushDone",
    "StatsReply",
    "ErrorReply",
    "TopicChanged",
    "ClientMessage",
    "DaemonMessage",
    "Message",
    "encode",
    "error_reply",
    "FrameReader",
]

PROTOCOL_VERSION = 1
"""The protocol version this module speaks (sent in Hello, echoed in Welcome)."""
MIN_PROTOCOL_VERSION = 1
"""The oldest version a daemon built from this module accepts."""
MAX_FRAME_BYTES = 16 * 1024 * 1024
"""Largest msgpack body one frame may carry (the 4-byte prefix not counted)."""
MAX_PRODUCE_RECORDS = 65_536
"""Most records one Produce may carry: its ProduceAck (about 100 bytes a result) must fit in
one frame, and a frame of tiny records must not decode into millions of objects."""
LENGTH_PREFIX = struct.Struct(">I")
"""The frame's length prefix: u32, big-endian, counting the msgpack body only."""

# ErrorReply codes below 1000 are Kafka's error codes, with Kafka's names
# (3 UNKNOWN_TOPIC_OR_PARTITION, 10 MESSAGE_TOO_LARGE, 17 INVALID_TOPIC_EXCEPTION, ...).
# Sluice's own conditions use 1000 and up so the two never collide.
ERR_UNSUPPORTED_PROTOCOL_VERSION = 1001
ERR_BAD_FRAME = 1002
ERR_UNEXPECTED_MESSAGE = 1003
ERR_NOT_ALLOWED = 1004
ERR_SEGMENT_REFUSED = 1005
ERR_SHUTTING_DOWN = 1006
ERR_BUFFER_FULL = 1007
# A record result only: the daemon stopped (shutdown deadline) before the record's outcome came;
# it is in the daemon's rings or arena and may still be delivered (by the next start's recovery).
ERR_OUTCOME_UNKNOWN = 1008

ERROR_NAMES: dict[int, str] = {
    ERR_UNSUPPORTED_PROTOCOL_VERSION: "UNSUPPORTED_PROTOCOL_VERSION",
    ERR_BAD_FRAME: "BAD_FRAME",
    ERR_UNEXPECTED_MESSAGE: "UNEXPECTED_MESSAGE",
    ERR_NOT_ALLOWED: "NOT_ALLOWED",
    ERR_SEGMENT_REFUSED: "SEGMENT_REFUSED",
    ERR_SHUTTING_DOWN: "SHUTTING_DOWN",
    ERR_BUFFER_FULL: "BUFFER_FULL",
    ERR_OUTCOME_UNKNOWN: "OUTCOME_UNKNOWN",
}
"""Names of Sluice's own ErrorReply codes (1000 and up)."""

_I32 = msgspec.Meta(ge=-(2**31), le=2**31 - 1)
Uint: TypeAlias = Annotated[int, msgspec.Meta(ge=0)]
Header: TypeAlias = tuple[str, bytes | None]


# --- nested values (no "type" key) ---------------------------------------------------------


class Rec(msgspec.Struct, omit_defaults=True, gc=False):
    """One record of a Produce. Every field is optional on the wire.

    ``partition`` None: the daemon picks one (murmur2 of the key, sticky when keyless).
    ``timestamp`` None: the daemon stamps the time it receives the record (ms since epoch).
    """

    key: bytes | None = None
    value: bytes | None = None
    headers: list[Header] | None = None
    partition: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] | None = None
    timestamp: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | None = None


class RecordResult(msgspec.Struct, gc=False):
    """The outcome of one record of an acknowledged Produce, in the records' order.

    ``error_code`` 0 (``"NONE"``) is success; otherwise a Kafka error code (or a Sluice code
    of 1000 and up) and ``offset`` is -1. acks=0 profiles report offset -1 on success too.
    ``partition`` is the partition written; on failure the one the record asked for, else the
    one chosen, else -1. ``timestamp`` is the record's timestamp in Kafka as the Java producer's
    RecordMetadata has it (the broker's time on LogAppendTime topics, else the CreateTime the
    record was written with); -1 on failure.
    """

    partition: Annotated[int, _I32]
    offset: int
    timestamp: int
    error_code: int
    error_name: str


# --- messages --------------------------------------------------------------------------------


class _Request(msgspec.Struct, tag_field="type", omit_defaults=True):
    """Client -> daemon. Fields with defaults may be left out of the map."""


class _Reply(msgspec.Struct, tag_field="type"):
    """Daemon -> client. Every field is always present."""


class Hello(_Request, tag="Hello"):
    """The first message of every connection.

    ``version`` is the highest protocol version the client speaks. ``workers_expected`` is
    informational (the Welcome's ``workers`` is what counts). ``wants_segment`` asks for a
    shared-memory segment: the client will send a SegmentOffer after the Welcome.

    ``token`` (optional, 0 = none) is a random 64-bit number a shared-memory client draws once
    and keeps for the life of its segment. A client that reconnects after the daemon restarted
    sends the same token and offers the same segment: the daemon gives it back its old
    ``client_id``, so the records its predecessor had taken (runs tables in the worker arenas)
    are matched to it and completed exactly once.

    ``topic_updates`` (optional, added to version 1 after its first release): the client wants
    a TopicChanged whenever a topic gains partitions. A daemon that predates it ignores the key
    and never sends one.
    """

    version: Uint
    client_name: str = ""
    pid: Uint = 0
    workers_expected: Uint | None = None
    wants_segment: bool = False
    token: Uint = 0
    topic_updates: bool = False


class SegmentOffer(_Request, tag="SegmentOffer"):
    """The client's shared-memory segment; the same sendmsg() carries the fds (SCM_RIGHTS).

    The ancillary data holds ``fd_count`` descriptors: the sealed memfd first, then the
    eventfds in the order ``shm/segment.py`` defines. ``segment_bytes`` and ``workers``
    restate the layout the client built, so the daemon can refuse a mismatch.
    """

    segment_bytes: Uint
    workers: Uint
    fd_count: Uint


class TopicLookup(_Request, tag="TopicLookup"):
    """Ask for a topic's id, partition count and delivery profile (answered by TopicInfo)."""

    topic: str


class Produce(_Request, tag="Produce"):
    """Records for one topic. With ``ack`` the daemon answers with a ProduceAck carrying ``seq``."""

    topic: str
    records: Annotated[list[Rec], msgspec.Meta(max_length=MAX_PRODUCE_RECORDS)]
    ack: bool = False
    seq: Uint = 0


class Flush(_Request, tag="Flush"):
    """Wait until every record this connection sent before it is complete (or the timeout)."""

    timeout_ms: Uint


class StatsRequest(_Request, tag="StatsRequest"):
    """Ask for the daemon's counters (answered by StatsReply)."""


class Goodbye(_Request, tag="Goodbye"):
    """The client sends nothing more; the daemon sends the pending ProduceAcks, then closes."""


class Welcome(_Reply, tag="Welcome"):
    """The answer to Hello: the version both speak and the layout a segment must have."""

    version: Uint
    workers: Uint
    request_ring_bytes: Uint
    completion_ring_bytes: Uint
    client_id: Uint


class SegmentAccepted(_Reply, tag="SegmentAccepted"):
    """The daemon mapped the offered segment; the client may write its rings."""

    client_id: Uint


class TopicInfo(_Reply, tag="TopicInfo"):
    """The answer to TopicLookup. ``topic_id`` is the id ring frames carry for this topic."""

    topic: str
    topic_id: Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)]
    partitions: Uint
    profile: str
    max_request_size: Uint
    on_full: Literal["block", "drop"]
    max_block_ms: Uint
    batch_size: Uint
    linger_ms: Uint


class ProduceAck(_Reply, tag="ProduceAck"):
    """The outcome of an acknowledged Produce: one result per record, in order."""

    seq: Uint
    results: list[RecordResult]


class FlushDone(_Reply, tag="FlushDone"):
    """The answer to Flush. ``complete`` is False when the timeout came first.

    ``failed`` counts this connection's records that completed with an error (acknowledged or
    not, refused before a ring or failed by Kafka) since the previous FlushDone. It was added
    after the first release of version 1: a decoder of an older daemon's reply sees 0.
    """

    complete: bool
    pending: Uint
    failed: Uint = 0


class StatsReply(_Reply, tag="StatsReply"):
    """The daemon's counters as a nested map of names to numbers (and nested maps)."""

    stats: dict[str, Any]


class ErrorReply(_Reply, tag="ErrorReply"):
    """A refused request, or (``fatal``) the reason the daemon is closing the connection.

    ``code`` below 1000 is a Kafka error code with Kafka's ``name``; 1000 and up are
    Sluice's own (see ERROR_NAMES).
    """

    code: int
    name: str
    message: str
    fatal: bool


class TopicChanged(_Reply, tag="TopicChanged"):
    """Unsolicited, to clients whose Hello set ``topic_updates``: ``topic`` (ring frames carry
    ``topic_id``) has ``partitions`` partitions now. Counts only grow (Kafka cannot shrink a
    topic); keyed records go to murmur2 of the key modulo the new count from then on, as with
    Kafka's producer after its metadata refresh. Not a reply: it may come between any replies.
    """

    topic: str
    topic_id: Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)]
    partitions: Uint


ClientMessage: TypeAlias = Hello | SegmentOffer | TopicLookup | Produce | Flush | StatsRequest | Goodbye
"""Every message a client sends."""
DaemonMessage: TypeAlias = (
    Welcome | SegmentAccepted | TopicInfo | ProduceAck | FlushDone | StatsReply | ErrorReply | TopicChanged
)
"""Every message the daemon sends."""
Message: TypeAlias = ClientMessage | DaemonMessage
"""Any message of the protocol."""


def error_reply(code: int, message: str, *, fatal: bool = False, name: str | None = None) -> ErrorReply:
    """An ErrorReply for a Sluice code (its name from ERROR_NAMES) or a Kafka code with ``name``."""
    return ErrorReply(code=code, name=name or ERROR_NAMES.get(code, "UNKNOWN"), message=message, fatal=fatal)


# --- framing ---------------------------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()
_decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}


def encode(msg: Message) -> bytes:
    """One frame: the 4-byte big-endian length, then the msgpack of ``msg``.

    Raises:
        ProtocolError: the message is larger than MAX_FRAME_BYTES (split the Produce).
    """
    buf = bytearray(LENGTH_PREFIX.size)
    _encoder.encode_into(msg, buf, LENGTH_PREFIX.size)
    size = len(buf) - LENGTH_PREFIX.size
    if size > MAX_FRAME_BYTES:
        raise ProtocolError(f"{type(msg).__name__} frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
    LENGTH_PREFIX.pack_into(buf, 0, size)
    return bytes(buf)


def _decoder(kind: Any) -> msgspec.msgpack.Decoder[Any]:
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.msgpack.Decoder(kind)
    return decoder


class FrameReader:
    """Turns a byte stream into messages, whatever the chunking.

    ``feed(data)`` buffers ``data`` at once and returns an iterator over the messages that are
    complete so far (iterating the reader itself does the same). A bad length or a body that
    is not a valid message raises :class:`~shm.errors.ProtocolError`; the stream cannot be
    resynchronised after that, so every later call raises it again and the connection should
    be answered with a fatal ErrorReply (code ERR_BAD_FRAME) and closed.

    Args:
        kind: the union (or single Struct) to decode: ``ClientMessage`` in the daemon,
            ``DaemonMessage`` in a client, ``Message`` (default) for either.
        max_frame_bytes: the largest body accepted.
    """

    __slots__ = ("_buf", "_pos", "_decode", "_max", "_error")

    def __init__(self, kind: Any = Message, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._decode = _decoder(kind).decode
        self._max = max_frame_bytes
        self._error: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a message."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Any]:
        """Buffer ``data`` and return an iterator over the complete messages."""
        if self._error is not None:
            raise ProtocolError(self._error)
        if self._pos:
            # Compact before growing; only whole consumed frames are ever dropped.
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data
        return self._messages()

    def __iter__(self) -> Iterator[Any]:
        return self._messages()

    def _fail(self, reason: str) -> ProtocolError:
        self._error = reason
        self._buf = bytearray()
        self._pos = 0
        return ProtocolError(reason)

    def _messages(self) -> Iterator[Any]:
        prefix = LENGTH_PREFIX.size
        while True:
            if self._error is not None:
                raise ProtocolError(self._error)
            buf, pos = self._buf, self._pos
            if len(buf) - pos < prefix:
                return
            (size,) = LENGTH_PREFIX.unpack_from(buf, pos)
            if size == 0 or size > self._max:
                # Refused before the body arrives: a bad length must not make us buffer it.
                raise self._fail(f"frame length {size} is outside 1..{self._max}")
            end = pos + prefix + size
            if len(buf) < end:
                return
            # The views are released before the yield, so feed() may resize the buffer.
            with memoryview(buf) as view, view[pos + prefix : end] as body:
                try:
                    msg = self._decode(body)
                # ValidationError is a DecodeError; a str that is not UTF-8 raises
                # UnicodeDecodeError from msgspec, which is a bad frame all the same.
                except (msgspec.DecodeError, UnicodeDecodeError) as e:
                    raise self._fail(f"bad frame at byte {pos}: {e}") from None
            self._pos = end
            yield msg
