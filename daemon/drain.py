"""Draining: a worker's pass over every client's request ring, into the accumulator, in chunks.

Each drain of one ring is a *chunk* ``[start, end)`` of ring positions. Its records go into
batches whose ``runs`` carry the chunk's key, so that when a batch is answered the outcome
reaches the chunk (:mod:`daemon.completions`), and the client is told (COMPLETION frames, then
one CHUNK_DONE carrying ``end``) only once every record of the chunk has its outcome. The
worker never frees the request ring itself: the client does on CHUNK_DONE, so the ring holds
every record that is not yet complete (see :mod:`daemon.worker`, "Ring space and completions").

The worker never parses the live ring: each region is copied once into private bytes, then
validated and appended from that copy, since a hostile client can rewrite its ring at any
moment, even frames it already published. A frame that does not validate drops its client
(:class:`~shm.errors.CorruptFrameError`); the worker and the other clients carry on.

While a restarted worker still has recovered runs of a client to meet in its ring, that
client's regions go to :class:`daemon.recovery.Recovery` instead.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec

from daemon.accumulator import APPEND_FULL, APPEND_INVALID, APPEND_OK, APPEND_TOO_LARGE, Accumulator
from daemon.protocol import errors as ec
from daemon.stats import Counters
from shm.errors import CorruptFrameError
from shm.frames import (
    FRAME_AND_RECORD,
    LENGTH_SKIP1,
    LENGTH_SKIP2,
    LENGTH_SKIP2_INDEX,
    chunk_done_end,
    record_body_valid,
)
from shm.layout import FRAME_HEADER, FRAME_PADDING, FRAME_RECORD, frame_size
from shm.ring import SpscRing
from shm.segment import Segment

if TYPE_CHECKING:
    from daemon.recovery import ClientRecovery, Recovery

__all__ = [
    "Outcome",
    "Chunk",
    "Client",
    "ChunkTable",
    "TopicTable",
    "Drainer",
    "RECOVERY_EMPTY",
    "RECOVERY_TOOK",
    "RECOVERY_FULL",
    "RECOVERY_OVER",
    "first_bad_body",
    "resume_position",
]

# What Recovery.drain did with one region of a recovering client's ring.
RECOVERY_EMPTY = 0  # nothing to read
RECOVERY_TOOK = 1  # read some; recovered runs of the client remain to be met
RECOVERY_FULL = 2  # stopped on a full arena (resumes at the cursor later)
RECOVERY_OVER = 3  # every recovered run met: the rest of the ring is read as usual

_RECORD_FRAME_BYTES = FRAME_AND_RECORD.size  # a RECORD frame's header and prefix: its minimum
_FRAME_HEADER_BYTES = FRAME_HEADER.size


class Outcome(msgspec.Struct, order=True, gc=False):
    """One COMPLETION frame to write: ``count`` records of a partition and their outcome.

    Ordered as a tuple of its fields, so sorting a chunk's outcomes puts them in batch order
    (``order``, the batch's ordinal), which is each partition's record order.
    """

    order: int  # the batch's ordinal (creation order)
    topic_id: int
    error_code: int
    partition: int
    base_offset: int  # -1 on error or with acks=0
    timestamp_ms: int  # log-append time, or -1
    count: int


class Chunk:
    """One drain of one client's ring; complete when ``pending`` reaches zero."""

    __slots__ = ("end", "pending", "outcomes", "slots", "keys")

    def __init__(self, end: int, pending: int) -> None:
        self.end = end  # ring position the client may free up to once the chunk is reported
        self.pending = pending  # records whose outcome is not known yet
        self.outcomes: list[Outcome] = []
        # Arena slots of finished batches holding records of this chunk: kept (state DONE)
        # until the chunk's CHUNK_DONE is published, so a restarted worker neither re-sends
        # nor re-reads those records.
        self.slots: list[int] = []
        self.keys: list[int] | None = None  # a recovery chunk's run keys (it has several)


class Client:
    """A client's rings as this worker sees them, and its chunks not yet reported."""

    __slots__ = (
        "client_id",
        "name",
        "segment",
        "req",
        "cmp",
        "bell",
        "chunks",
        "removing",
        "dead",
        "cmp_broken",
        "recovery",
    )

    def __init__(self, client_id: int, name: str, segment: Segment, worker: int) -> None:
        self.client_id = client_id
        self.name = name
        self.segment = segment
        self.req = segment.request_ring(worker)
        self.cmp = segment.completion_ring(worker)
        self.bell = segment.request_doorbell(worker)
        self.chunks: deque[Chunk] = deque()
        self.removing = False  # the client is gone: drain what it committed, then detach
        self.dead = False  # its ring was corrupt: read nothing more
        self.cmp_broken = False  # its completion ring's tail was corrupt: write nothing more
        # After a crash, while recovered runs of this client remain to be met in its ring.
        self.recovery: ClientRecovery | None = None


class ChunkTable:
    """The chunks whose records are in batches, by the key their records carry in
    ``Batch.runs``, and the clients with a complete chunk to report."""

    __slots__ = ("_seq", "by_key", "ready")

    def __init__(self) -> None:
        self._seq = 0
        self.by_key: dict[int, tuple[Client, Chunk]] = {}
        self.ready: set[Client] = set()

    def next_key(self) -> int:
        self._seq += 1
        return self._seq

    def take_ready(self) -> set[Client]:
        """The clients with a complete chunk to report; the set starts empty again."""
        ready, self.ready = self.ready, set()
        return ready

    def undelivered(self) -> int:
        """Records in batches whose outcome is not known yet."""
        return sum(chunk.pending for _, chunk in self.by_key.values())


class TopicTable:
    """Topic ids as the supervisor announced them (AddTopic), shared by every client."""

    __slots__ = ("names", "partition_counts", "ids")

    def __init__(self) -> None:
        self.names: list[str | None] = []  # topic id -> name (None: not announced)
        self.partition_counts: list[int] = []  # topic id -> partitions, to validate frames
        self.ids: dict[str, int] = {}

    def add(self, topic_id: int, name: str, partitions: int) -> None:
        while len(self.names) <= topic_id:
            self.names.append(None)
            self.partition_counts.append(0)
        self.names[topic_id] = name
        self.partition_counts[topic_id] = partitions
        self.ids[name] = topic_id


class Drainer:
    """Reads the clients' request rings into the accumulator, one chunk per region.

    Args:
        acc: the worker's accumulator.
        clients: the worker's clients by id (the worker adds them, completions detach them).
        topics: the topic table frames are validated against.
        table: where new chunks are registered.
        counters: the worker's counters.
        recovery: the crash-recovery walk, for clients with recovered runs left.
        drop: called with a client and the reason when its ring is corrupt.
        refresh_topics: reads the control channel now, so that a topic announced a moment ago
            is known before a frame naming it is judged invalid.
    """

    def __init__(
        self,
        *,
        acc: Accumulator,
        clients: dict[int, Client],
        topics: TopicTable,
        table: ChunkTable,
        counters: Counters,
        recovery: Recovery,
        drop: Callable[[Client, str], None],
        refresh_topics: Callable[[], None],
    ) -> None:
        self._acc = acc
        self._clients = clients
        self._topics = topics
        self._table = table
        self._counters = counters
        self._recovery = recovery
        self._drop = drop
        self._refresh_topics = refresh_topics
        self._full = False

    @property
    def full(self) -> bool:
        """The arena was full at the last append: no ring is read until :meth:`resume`."""
        return self._full

    def resume(self) -> None:
        """Arena space was freed (a batch finished): read the rings again."""
        self._full = False

    def drain(self) -> bool:
        """One pass over every client's request ring; True if any record was taken."""
        if self._full:
            return False
        took = False
        now = time.monotonic() * 1000.0
        # A copy: a late topic's control read may add clients.
        for client in list(self._clients.values()):
            if client.dead:
                continue
            try:
                if self._drain_client(client, now):
                    took = True
            except CorruptFrameError as exc:
                self._drop(client, str(exc))
            if self._full:
                break
        return took

    def _drain_client(self, client: Client, now: float) -> bool:
        if client.recovery is not None:
            code = self._recovery.drain(client, now)
            if code == RECOVERY_FULL:
                self._full = True
                return True
            if code != RECOVERY_OVER:
                return code == RECOVERY_TOOK
            self._drain_ring(client, now)
            return True
        return self._drain_ring(client, now)

    def _drain_ring(self, client: Client, now: float) -> bool:
        ring = client.req
        acc = self._acc
        topics = self._topics
        table = self._table
        cid = client.client_id
        took = False
        while True:
            start, end = ring.region()
            if start == end:
                return took
            # One private copy of the region, validated and appended from the same bytes: the
            # client can rewrite its ring at any moment, even frames it already published.
            data = bytes(ring.view[start:end])
            # A malformed record body would make Kafka refuse (or, for some, store) the whole
            # batch it shares with other clients' records: stop before it, drop its client.
            bad = first_bad_body(data, end - start, end == ring.data_end)
            stop = end - start if bad < 0 else bad
            key = table.next_key()
            code, pos, count = acc.append_region(
                data, 0, stop, topics.names, topics.partition_counts, key, cid, ring.cursor, now
            )
            if count:
                self._open_chunk(client, key, ring.position_after(pos), count, pos)
                took = True
            if pos > 0:
                ring.advance(pos)
            if code == APPEND_OK:
                if bad >= 0 and pos == bad:
                    bad_type = _unpack_frame_header(data, bad)[1]
                    what = "malformed record body" if bad_type == FRAME_RECORD else "padding frame short of the wrap"
                    raise CorruptFrameError(f"client {cid} ({client.name}): {what} at ring position {ring.cursor}")
                continue
            if code == APPEND_FULL:
                self._full = True
                return took
            if code == APPEND_TOO_LARGE:
                self._fail_frame(client, ring, start + pos, ec.MESSAGE_TOO_LARGE)
                took = True
                continue
            if code == APPEND_INVALID:
                # Let a topic announced a moment ago land before judging the frame.
                self._refresh_topics()
                # A chunk of its own: the records taken above are the chunk ``key``.
                key2 = table.next_key()
                code2, pos2, count2 = acc.append_region(
                    data, pos, stop, topics.names, topics.partition_counts, key2, cid, ring.cursor, now
                )
                if code2 == APPEND_INVALID and pos2 == pos:
                    raise CorruptFrameError(
                        f"client {cid} ({client.name}): invalid frame at ring position {ring.cursor}"
                    )
                # The topic was only late: account for what was taken and go on.
                if count2:
                    self._open_chunk(client, key2, ring.position_after(pos2 - pos), count2, pos2 - pos)
                if pos2 > pos:
                    ring.advance(pos2 - pos)
                took = True
                continue
            return took

    def _open_chunk(self, client: Client, key: int, end: int, count: int, nbytes: int) -> None:
        chunk = Chunk(end, count)
        client.chunks.append(chunk)
        self._table.by_key[key] = (client, chunk)
        self._counters.records_in += count
        self._counters.bytes_in += nbytes

    def _fail_frame(self, client: Client, ring: SpscRing, pos: int, code: int) -> None:
        """Complete the record frame at ``pos`` with ``code`` (it never enters a batch)."""
        plen, _ftype, tid, _flags, part, _ts = FRAME_AND_RECORD.unpack_from(ring.view, pos)
        size = frame_size(plen)
        chunk = Chunk(ring.position_after(size), 0)
        chunk.outcomes.append(Outcome(0, tid, code, part, -1, -1, 1))
        ring.advance(size)
        client.chunks.append(chunk)
        self._counters.count_error(code, 1)
        self._table.ready.add(client)


_unpack_frame_header = FRAME_HEADER.unpack_from
_unpack_skip2_index = LENGTH_SKIP2_INDEX.unpack_from


def first_bad_body(data: bytes, end: int, wraps: bool) -> int:
    """Offset of the first RECORD frame in ``data[:end]`` whose body is not exactly one
    well-formed Kafka record body (see shm.frames.record_body_valid), or of a PADDING frame
    that does not end exactly at the wrap (``wraps``: ``end`` is the end of the ring's data
    area); -1 when there is none.

    Stops (returning -1) at a frame the accumulator judges itself: another frame type, or a
    length past ``end``. The usual shape (key and value lengths as short varints, no headers)
    is checked with two table lookups, about 0.25 us per record; anything else goes to
    record_body_valid.
    """
    unpack = _unpack_frame_header
    u16 = _unpack_skip2_index
    skip1 = LENGTH_SKIP1
    skip2 = LENGTH_SKIP2
    prefix = _RECORD_FRAME_BYTES
    header = _FRAME_HEADER_BYTES
    record = FRAME_RECORD
    padding = FRAME_PADDING
    pos = 0
    while pos + prefix <= end:
        plen, ftype = unpack(data, pos)
        be = pos + header + plen  # end of the body
        if ftype != record or be > end:
            # Padding is only written to fill the ring up to its end: anything else would make
            # the reader skip (and never complete) the records after it.
            return pos if ftype == padding and not (wraps and be == end) else -1
        b = pos + prefix
        if b + 3 <= be:
            s = skip1[data[b]]
            if s:
                b += s
                if b + 2 <= be:
                    s = skip2[u16(data, b)[0]]
                    if s:
                        b += s
                        if b + 1 == be and data[b] == 0:
                            pos = (be + 7) & -8  # the next frame (align8, inlined: per record)
                            continue
        if not record_body_valid(data, pos + prefix, be):
            return pos
        pos = (be + 7) & -8
    return -1


def resume_position(client: Client) -> int:
    """Where to start reading: past the last chunk whose CHUNK_DONE the client has not read.

    Raises:
        CorruptFrameError: the client's completion ring does not parse.
    """
    start = client.req.tail
    end = chunk_done_end(client.cmp)
    if end is not None and end > start:
        start = end
    return start
