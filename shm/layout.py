"""The shared-memory segment's byte layout: one place for every offset, size and magic number.

A segment is one ``memfd`` created by a client, sealed against shrinking and growing, and
mapped by the client and by the daemon. It holds a header and, for each daemon worker, a
request ring (client writes records, worker reads) and a completion ring (worker writes
completions, client reads). Everything is little-endian (the platform is x86-64).

Segment
-------
::

    +-------------------------------+  0
    | segment header (192 bytes)    |
    +-------------------------------+  SEGMENT_HEADER_BYTES
    | worker 0 request ring         |  ring header (256 bytes) + request_ring_bytes of data
    +-------------------------------+
    | worker 0 completion ring      |  ring header (256 bytes) + completion_ring_bytes of data
    +-------------------------------+
    | worker 1 request ring         |
    +-------------------------------+
    | ...                           |
    +-------------------------------+  drop_counters_offset(workers, request, completion)
    | drop counters (512 KiB)       |  one u64 per topic id
    +-------------------------------+  segment_bytes(workers, request, completion)

Segment header (``client`` is the process that created the segment, ``daemon`` the process
that attached it; ``-`` is nobody):

| offset | size | field | writer | reader |
|--------|------|-------|--------|--------|
| 0 | 8 | magic | client | daemon |
| 8 | 4 | layout_version | client | daemon |
| 12 | 4 | workers | client | daemon |
| 16 | 8 | request_ring_bytes | client | daemon |
| 24 | 8 | completion_ring_bytes | client | daemon |
| 32 | 8 | segment_bytes | client | daemon |
| 40 | 4 | client_pid | client | daemon |
| 44 | 20 | reserved0 | - | - |
| 64 | 8 | client_heartbeat_ns | client | daemon |
| 72 | 56 | reserved1 | - | - |
| 128 | 8 | daemon_heartbeat_ns | daemon | client |
| 136 | 56 | reserved2 | - | - |

The fields of the first line are written once, before the segment is passed to the daemon.
Each heartbeat (``time.monotonic_ns()``, system-wide on Linux) has its own cache line because
it is the only header field written repeatedly, each by a different process.

Drop counters
-------------
After the last ring: :data:`DROP_COUNTERS` little-endian u64s, indexed by topic id (ring frames
carry a u16 topic id, so every id has its slot). Slot ``t`` counts the records to topic ``t``
that the client dropped because a request ring was full under ``on_full = "drop"``. The client
is the only writer: it adds 1 per drop and stores the sum with one aligned 8-byte store (item
assignment into a ``'Q'``-typed memoryview, as for the tails below), so a reader never sees a
torn count. The daemon only reads them, for
``sluice_drops_total``. They live in the segment rather than in a message so that they
survive the client: the daemon keeps its mapping after a client dies, so every drop a client
made, up to its last instruction, is still counted, and a restarted daemon reads them again
from the same segment. Only the pages of counters that are touched take memory (a 4 KiB page
holds the counters of 512 topic ids); the rest of the table is address space. A hostile
client can write any number here: it can only falsify its own drop counts.

Ring
----
::

    +----------------------------------------------+  0
    | line 0: ring_magic, ring_kind, capacity      |  constant after creation
    +----------------------------------------------+  64
    | line 1: head, full_count                     |  writer-owned
    +----------------------------------------------+  128
    | line 2: tail                                 |  reader-owned
    +----------------------------------------------+  192
    | line 3: reader_sleeping                      |  doorbell flag (reader sets, writer clears)
    +----------------------------------------------+  RING_HEADER_BYTES = 256
    | data area: capacity bytes (a power of two)   |
    | frames, 8-byte aligned, padding at the wrap  |
    +----------------------------------------------+  256 + capacity

Ring header (``writer`` is the ring's producer: the client for a request ring, the worker for
a completion ring; ``reader`` its consumer; ``creator`` the client that created the segment):

| offset | size | field | writer | reader |
|--------|------|-------|--------|--------|
| 0 | 4 | ring_magic | creator | both |
| 4 | 4 | ring_kind | creator | both |
| 8 | 8 | capacity | creator | both |
| 16 | 48 | reserved0 | - | - |
| 64 | 8 | head | writer | reader |
| 72 | 8 | full_count | writer | stats |
| 80 | 48 | reserved1 | - | - |
| 128 | 8 | tail | reader | writer |
| 136 | 56 | reserved2 | - | - |
| 192 | 1 | reader_sleeping | both | writer |
| 193 | 63 | reserved3 | - | - |

``head`` and ``tail`` are 64-bit monotonic byte positions; the byte offset of position ``p``
in the data area is ``p & (capacity - 1)``. ``head - tail`` is the number of bytes written and
not yet consumed, and is never more than ``capacity``. ``full_count`` counts the times the
writer found the ring too full for a frame (back-pressure statistics). ``reader_sleeping`` is
the doorbell flag: 1 while the reader is (about to be) asleep on its eventfd.

Frames
------
Each frame starts at an 8-byte-aligned position with an 8-byte header ``<II`` =
(payload_length, frame_type) followed by the payload; the next frame starts at
``pos + align8(8 + payload_length)``. Frame types: 0 PADDING (fills the data area to its end,
the next frame is at the start of the data area), 1 RECORD, 2 COMPLETION, 3 CHUNK_DONE
(payloads in :mod:`shm.frames`; CHUNK_DONE ends a worker's completions for one drained chunk
and carries the request-ring position up to which the client may free its ring). A frame never wraps: when it does not fit before the end of the data area,
the writer fills the rest with one padding frame (the rest is always >= 8 bytes, because
positions and the capacity are multiples of 8) and puts the frame at the start. The largest
frame is ``capacity // 2`` bytes, so a frame always fits into an empty ring, padding included.

Ordering
--------
- **Which store commits.** The writer writes the frame (its header, its payload, and any
  padding frame before it) and then *publishes the head*: one aligned 8-byte store of the new
  head position. Every ring's writer half is compiled (``shm._client.RingWriter``; its
  ``rw_publish`` is a release store, ``__atomic_store_n(head, __ATOMIC_RELEASE)``), which on
  x86-64 is a single 8-byte ``mov``; an aligned 8-byte store is atomic on x86-64, so a reader
  never sees a torn head. Bulk writes publish once. The tail (the reader's, and the client's
  deferred release of a request ring, see :meth:`shm.ring.SpscRing.free_to`) is stored from
  Python, by item assignment into a ``'Q'``-typed memoryview of the ring header
  (``words[tail_index] = tail``): CPython implements that as a ``memcpy`` of one
  ``unsigned long long`` into an 8-aligned address, which the C compiler emits as a single
  8-byte ``mov``. Positions must never be stored with ``struct.pack_into``: CPython zeroes the
  destination before packing, so a concurrent reader can load a transient 0 (seen in testing:
  a worker read head 0 between the memset and the memcpy).
- **Platform assumption: x86-64 TSO.** Stores become visible to other cores in program order,
  and loads are not reordered with older loads. So a reader that loads a head value also sees
  every frame byte stored before that head was published; and a writer that loads a tail sees
  that the reader finished reading the bytes before it (the reader's loads of a frame precede
  its tail store). The compiler cannot reorder them either: the head store is a release store
  (the compiled send() writes its frame in the same C function), the writer loads the tail with
  an acquire load, and each Python store is a separate C call. Other architectures (ARM) would
  also need acquire loads and release stores on the Python side (the reader's head loads, the
  tail stores), which Python cannot issue; Sluice's shared-memory transport supports x86-64
  only.
- **Writer dies mid-frame.** The reader never reads past the last published head: a
  half-written frame (or a padding frame whose successor was not finished) is invisible. What
  the reader gets is exactly the frames committed before the crash, each complete.
- **Reader state.** A completion ring's reader stores the tail after it has copied a frame
  out. A request ring's reader (the worker) reads with a private cursor and the *writer*
  stores the tail once the worker has reported the records' outcomes (CHUNK_DONE); a restarted
  reader resumes from the stored tail (frames after it are read again, never skipped).
- **The doorbell race.** The reader stores ``reader_sleeping = 1`` and then re-loads the head;
  the writer stores the head and then loads ``reader_sleeping``. x86-64 may reorder a store
  with a *later load* (store buffer), and neither side issues a full fence (the Python reader
  cannot; the writer's release store is not one), so both may see the old value:
  the reader sleeps with a frame waiting and the writer does not ring. The reader therefore
  never sleeps longer than :data:`WAKE_TIMEOUT_S` (20 ms); a lost wake-up costs at most that
  delay, and an idle reader wakes 50 times a second (about 0.1 % of a core).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

__all__ = [
    "CACHE_LINE",
    "Field",
    "SEGMENT_MAGIC",
    "LAYOUT_VERSION",
    "RING_MAGIC",
    "RING_REQUEST",
    "RING_COMPLETION",
    "SEGMENT_HEADER_FIELDS",
    "SEGMENT_OFFSETS",
    "SEGMENT_HEADER_BYTES",
    "RING_HEADER_FIELDS",
    "RING_OFFSETS",
    "RING_HEADER_BYTES",
    "FRAME_HEADER",
    "FRAME_HEADER_BYTES",
    "FRAME_ALIGN",
    "frame_size",
    "FRAME_PADDING",
    "FRAME_RECORD",
    "FRAME_COMPLETION",
    "FRAME_CHUNK_DONE",
    "DROP_COUNTERS",
    "DROP_COUNTERS_BYTES",
    "drop_counters_offset",
    "MIN_RING_BYTES",
    "MAX_RING_BYTES",
    "MAX_WORKERS",
    "WAKE_TIMEOUT_S",
    "align8",
    "max_frame_bytes",
    "ring_region_bytes",
    "segment_bytes",
    "ring_offsets",
]

CACHE_LINE = 64
"""Bytes per cache line on x86-64; fields written by different processes sit on different lines."""


class Field(NamedTuple):
    """One header field: its name, size in bytes, and which side writes and reads it."""

    name: str
    size: int
    writer: str
    reader: str


def _offsets(fields: tuple[Field, ...]) -> tuple[dict[str, int], int]:
    """Offsets from the field sizes, laid end to end; the single place offsets are computed."""
    offsets: dict[str, int] = {}
    pos = 0
    for f in fields:
        offsets[f.name] = pos
        pos += f.size
    return offsets, pos


SEGMENT_MAGIC = int.from_bytes(b"SLUICESG", "little")
LAYOUT_VERSION = 2
"""2: the drop counters follow the rings."""
RING_MAGIC = int.from_bytes(b"SLRG", "little")
RING_REQUEST = 1
"""``ring_kind`` of a request ring (client writes RECORD frames, a worker reads)."""
RING_COMPLETION = 2
"""``ring_kind`` of a completion ring (a worker writes COMPLETION frames, the client reads)."""

SEGMENT_HEADER_FIELDS: tuple[Field, ...] = (
    Field("magic", 8, "client", "daemon"),
    Field("layout_version", 4, "client", "daemon"),
    Field("workers", 4, "client", "daemon"),
    Field("request_ring_bytes", 8, "client", "daemon"),
    Field("completion_ring_bytes", 8, "client", "daemon"),
    Field("segment_bytes", 8, "client", "daemon"),
    Field("client_pid", 4, "client", "daemon"),
    Field("reserved0", 20, "-", "-"),
    Field("client_heartbeat_ns", 8, "client", "daemon"),
    Field("reserved1", 56, "-", "-"),
    Field("daemon_heartbeat_ns", 8, "daemon", "client"),
    Field("reserved2", 56, "-", "-"),
)
SEGMENT_OFFSETS, SEGMENT_HEADER_BYTES = _offsets(SEGMENT_HEADER_FIELDS)

RING_HEADER_FIELDS: tuple[Field, ...] = (
    Field("ring_magic", 4, "creator", "both"),
    Field("ring_kind", 4, "creator", "both"),
    Field("capacity", 8, "creator", "both"),
    Field("reserved0", 48, "-", "-"),
    Field("head", 8, "writer", "reader"),
    Field("full_count", 8, "writer", "stats"),
    Field("reserved1", 48, "-", "-"),
    Field("tail", 8, "reader", "writer"),
    Field("reserved2", 56, "-", "-"),
    Field("reader_sleeping", 1, "both", "writer"),
    Field("reserved3", 63, "-", "-"),
)
RING_OFFSETS, RING_HEADER_BYTES = _offsets(RING_HEADER_FIELDS)

FRAME_HEADER = struct.Struct("<II")
"""Frame header: (payload_length u32, frame_type u32)."""
FRAME_HEADER_BYTES = FRAME_HEADER.size
FRAME_ALIGN = 8
FRAME_PADDING = 0
FRAME_RECORD = 1
FRAME_COMPLETION = 2
FRAME_CHUNK_DONE = 3

DROP_COUNTERS = 1 << 16
"""Drop counters in a segment: one per possible u16 topic id."""
DROP_COUNTERS_BYTES = 8 * DROP_COUNTERS

MIN_RING_BYTES = 64
"""Smallest ring data area (tests use tiny rings to wrap often; real clients use far more)."""
MAX_RING_BYTES = 1 << 30
MAX_WORKERS = 126
"""At most this many workers per segment: the segment fd and two eventfds per worker travel in
one SCM_RIGHTS message, and Linux carries at most 253 fds in one (SCM_MAX_FD)."""

WAKE_TIMEOUT_S = 0.020
"""Longest a sleeping ring reader waits without a doorbell: the bound on a lost wake-up."""


def align8(n: int) -> int:
    """``n`` rounded up to a multiple of 8."""
    return (n + 7) & ~7


def frame_size(payload_length: int) -> int:
    """Bytes a frame of ``payload_length`` takes in a ring: the 8-byte header and the payload,
    rounded up to :data:`FRAME_ALIGN`. The next frame starts this far after the frame's start."""
    return (payload_length + 15) & -8


def max_frame_bytes(capacity: int) -> int:
    """The largest frame (header + payload, aligned) a ring of ``capacity`` bytes accepts."""
    return capacity // 2


def ring_region_bytes(capacity: int) -> int:
    """Bytes one ring occupies in the segment: its header plus its data area."""
    return RING_HEADER_BYTES + capacity


def drop_counters_offset(workers: int, request_ring_bytes: int, completion_ring_bytes: int) -> int:
    """Byte offset of the drop counters: right after the last ring (always 8-byte aligned)."""
    return SEGMENT_HEADER_BYTES + workers * (
        ring_region_bytes(request_ring_bytes) + ring_region_bytes(completion_ring_bytes)
    )


def segment_bytes(workers: int, request_ring_bytes: int, completion_ring_bytes: int) -> int:
    """Total size of a segment with this shape."""
    return drop_counters_offset(workers, request_ring_bytes, completion_ring_bytes) + DROP_COUNTERS_BYTES


def ring_offsets(
    worker: int, request_ring_bytes: int, completion_ring_bytes: int
) -> tuple[int, int]:
    """Byte offsets in the segment of worker ``worker``'s request ring and completion ring."""
    per_worker = ring_region_bytes(request_ring_bytes) + ring_region_bytes(completion_ring_bytes)
    request = SEGMENT_HEADER_BYTES + worker * per_worker
    return request, request + ring_region_bytes(request_ring_bytes)
