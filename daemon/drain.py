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

from daemon import _batcher
from daemon.accumulator import APPEND_FULL, APPEND_INVALID, APPEND_MALFORMED, APPEND_OK, APPEND_TOO_LARGE, Accumulator
from daemon.protocol import errors as ec
from daemon.stats import Counters
from shm.errors import CorruptFrameError
from shm.frames import FRAME_AND_RECORD, chunk_done_end
from shm.layout import FRAME_HEADER, FRAME_RECORD, frame_size
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
    "CLIENT_PASS_BYTES",
    "PASS_BYTES",
    "resume_position",
]

# What Recovery.drain did with one region of a recovering client's ring.
RECOVERY_EMPTY = 0  # nothing to read
RECOVERY_TOOK = 1  # read some; recovered runs of the client remain to be met
RECOVERY_FULL = 2  # stopped on a full arena (resumes at the cursor later)
RECOVERY_OVER = 3  # every recovered run met: the rest of the ring is read as usual

# A pass takes at most this much of one client's ring, and of all rings together (about 2,000
# and 8,000 records of 100 bytes): long enough to fill batches, short enough that completions
# and the sender run every few milliseconds under any number of clients (a pass over 16 full
# rings used to run 0.24-0.35 s).
CLIENT_PASS_BYTES = 256 * 1024
PASS_BYTES = 1024 * 1024


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
        self._pass_seq = 0  # rotates the first client of a pass
        self.pass_bytes = 0  # ring bytes the last pass consumed

    @property
    def full(self) -> bool:
        """The arena was full at the last append: no ring is read until it has room again."""
        return self._full

    def resume(self) -> None:
        """Arena space was freed (a batch finished): read the rings again once the accumulator
        says a good part of the arena is free (:meth:`Accumulator.has_room`)."""
        if self._full and self._acc.has_room():
            self._full = False

    def drain(self) -> bool:
        """One bounded pass over the clients' request rings; True if any record was taken.

        A pass takes one region (two at the wrap) of each client's ring, at most
        CLIENT_PASS_BYTES of it and PASS_BYTES in all, and starts one client further each time,
        so the sender and the completions run between passes however many clients write. After
        APPEND_FULL nothing is read (nor copied, nor validated) until the arena has room again:
        resuming at the first freed chunk refilled the arena at once with batches that could
        not grow, and a full client's whole region was copied and validated for nothing.
        """
        self.pass_bytes = 0
        if self._full:
            self.resume()
            if self._full:
                return False
        took = False
        now = time.monotonic() * 1000.0
        # A copy: a late topic's control read may add clients.
        clients = list(self._clients.values())
        n = len(clients)
        self._pass_seq += 1
        budget = PASS_BYTES
        for i in range(n):
            client = clients[(self._pass_seq + i) % n]
            if client.dead:
                continue
            try:
                nbytes = self._drain_client(client, now, min(budget, CLIENT_PASS_BYTES))
            except CorruptFrameError as exc:
                self._drop(client, str(exc))
                continue
            if nbytes:
                took = True
                budget -= nbytes
                self.pass_bytes += nbytes
            if self._full or budget <= 0:
                break
        return took

    def _drain_client(self, client: Client, now: float, budget: int) -> int:
        """Ring bytes taken from the client (a recovery region counts as a whole budget)."""
        if client.recovery is not None:
            code = self._recovery.drain(client, now)
            if code == RECOVERY_FULL:
                self._full = True
                return budget
            if code != RECOVERY_OVER:
                return budget if code == RECOVERY_TOOK else 0
            self._drain_ring(client, now, budget)
            return budget
        return self._drain_ring(client, now, budget)

    def _drain_ring(self, client: Client, now: float, budget: int) -> int:
        """Take one region of the client's ring (two at the wrap), up to about ``budget``
        bytes of whole frames (at least one); returns the bytes consumed.

        One region a pass: re-reading at once chased a busy writer a few records at a time,
        each a chunk with its own completions (79,437 chunks for 1,000,000 send() records).
        """
        ring = client.req
        acc = self._acc
        topics = self._topics
        table = self._table
        cid = client.client_id
        took = 0
        while took < budget:
            start, end = ring.region()
            if start == end:
                return took
            # At most the budget, but always the whole first frame (its length here is only a
            # size hint: the copy is bounded by the committed end whatever it says).
            cut = end
            if end - start > budget - took:
                first = frame_size(_unpack_frame_header(ring.view, start)[0])
                cut = min(end, start + max(budget - took, first))
            # One private copy of the region, validated and appended from the same bytes: the
            # client can rewrite its ring at any moment, even frames it already published.
            data = bytes(ring.view[start:cut])
            stop = cut - start
            wraps = cut == ring.data_end
            partial = cut < end
            key = table.next_key()
            # The compiled walk validates every frame and body as it appends: it stops at a
            # malformed record body (APPEND_MALFORMED), which would make Kafka refuse (or, for
            # some, store) the whole batch it shares with other clients' records.
            code, pos, count = acc.append_region(
                data, 0, stop, topics.names, topics.partition_counts, key, cid, ring.cursor, now,
                wraps=wraps, partial=partial,
            )
            if count:
                self._open_chunk(client, key, ring.position_after(pos), count, pos)
            if pos > 0:
                ring.advance(pos)
                took += pos
            if code == APPEND_OK:
                if partial and pos < stop:
                    return took  # the budget cut a frame: it is read whole next pass
                if wraps:
                    continue  # the region ended at the wrap: the rest starts at the beginning
                return took
            if code == APPEND_MALFORMED:
                bad_type = _unpack_frame_header(data, pos)[1]
                what = "malformed record body" if bad_type == FRAME_RECORD else "padding frame short of the wrap"
                raise CorruptFrameError(f"client {cid} ({client.name}): {what} at ring position {ring.cursor}")
            if code == APPEND_FULL:
                self._full = True
                return took
            if code == APPEND_TOO_LARGE:
                took += self._fail_frame(client, ring, start + pos, ec.MESSAGE_TOO_LARGE)
                continue
            if code == APPEND_INVALID:
                # Let a topic announced a moment ago land before judging the frame.
                self._refresh_topics()
                # A chunk of its own: the records taken above are the chunk ``key``.
                key2 = table.next_key()
                code2, pos2, count2 = acc.append_region(
                    data, pos, stop, topics.names, topics.partition_counts, key2, cid, ring.cursor, now,
                    wraps=wraps, partial=partial,
                )
                if code2 in (APPEND_INVALID, APPEND_MALFORMED) and pos2 == pos:
                    raise CorruptFrameError(
                        f"client {cid} ({client.name}): invalid frame at ring position {ring.cursor}"
                    )
                # The topic was only late: account for what was taken and go on.
                if count2:
                    self._open_chunk(client, key2, ring.position_after(pos2 - pos), count2, pos2 - pos)
                if pos2 > pos:
                    ring.advance(pos2 - pos)
                    took += pos2 - pos
                continue
            return took
        return took

    def _open_chunk(self, client: Client, key: int, end: int, count: int, nbytes: int) -> None:
        chunk = Chunk(end, count)
        client.chunks.append(chunk)
        self._table.by_key[key] = (client, chunk)
        self._counters.records_in += count
        self._counters.bytes_in += nbytes

    def _fail_frame(self, client: Client, ring: SpscRing, pos: int, code: int) -> int:
        """Complete the record frame at ``pos`` with ``code`` (it never enters a batch);
        returns its size."""
        plen, _ftype, tid, _flags, part, _ts = FRAME_AND_RECORD.unpack_from(ring.view, pos)
        size = frame_size(plen)
        chunk = Chunk(ring.position_after(size), 0)
        chunk.outcomes.append(Outcome(0, tid, code, part, -1, -1, 1))
        ring.advance(size)
        client.chunks.append(chunk)
        # The frame was validated before it was refused for its size: its topic id is known.
        self._counters.count_error(code, 1, self._topics.names[tid] or "")
        self._table.ready.add(client)
        return size


_unpack_frame_header = FRAME_HEADER.unpack_from


first_bad_body = _batcher.first_bad_body
"""``first_bad_body(data, end, wraps)``: offset of the first RECORD frame in ``data[:end]`` whose
body is not exactly one well-formed Kafka record body, or of a PADDING frame that does not end
exactly at the wrap (``wraps``: ``end`` is the end of the ring's data area); -1 when there is
none. It stops (-1) at any other frame type or a frame past ``end``: the accumulator judges
those. Compiled (daemon/_batcher.c), about 10 ns a record."""


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
