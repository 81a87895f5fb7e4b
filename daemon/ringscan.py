"""Where a partition's k-th record sits in a client's request ring, for splitting a batch.

A batch's runs table says whose records it holds as runs: a client's ring position of a run's
first record and a count, the run being the next ``count`` records of the batch's partition in
that ring from there (:mod:`daemon.arena`). When a batch the broker refused as too large is cut
in two (:meth:`daemon.accumulator.Accumulator.split`) inside a run, the second part's run needs
the ring position of its first record: :func:`nth_record_position` walks the ring from the run's
first record to find it.

The walk reads frames the worker has already read and validated, and the client cannot free
them yet (it frees ring space only after the CHUNK_DONE of the chunk holding them, which needs
the batch's outcome). Each frame header is copied before it is read; a client that rewrote its
frames since only gets a wrong or no position (-1), never a crash: with -1 the batch is not
split.
"""

from __future__ import annotations

from shm.frames import FRAME_AND_RECORD
from shm.layout import FRAME_PADDING, FRAME_RECORD, frame_size
from shm.ring import SpscRing

__all__ = ["nth_record_position"]

_HEAD = FRAME_AND_RECORD.size  # frame header and RECORD prefix: topic id and partition
_unpack = FRAME_AND_RECORD.unpack


def nth_record_position(ring: SpscRing, first: int, topic_id: int, partition: int, k: int) -> int:
    """The ring position of record ``k`` (0 = the one at ``first``) of ``(topic_id,
    partition)`` counted from ``first``, among the frames before the reader's cursor; -1 when
    the walk does not find it there."""
    view = ring.view
    cap = ring.capacity
    base = ring.data_start
    end = ring.cursor
    pos = first
    seen = 0
    while pos < end:
        off = pos % cap
        room = cap - off
        if room < 8:
            return -1
        head = bytes(view[base + off : base + off + min(room, _HEAD)])
        if len(head) < _HEAD:
            plen, ftype = int.from_bytes(head[:4], "little"), int.from_bytes(head[4:8], "little")
            if ftype != FRAME_PADDING:
                return -1
        else:
            plen, ftype, tid, _flags, part, _ts = _unpack(head)
            if ftype == FRAME_RECORD and tid == topic_id and part == partition:
                if seen == k:
                    return pos
                seen += 1
        if ftype == FRAME_PADDING:
            pos += room
            continue
        size = frame_size(plen)
        if size > room or size < 8:
            return -1
        pos += size
    return -1
