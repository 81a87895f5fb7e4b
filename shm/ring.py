"""``SpscRing``: a lock-free single-producer single-consumer ring of frames in shared memory.

The byte layout, the frame format and the ordering argument (which store commits a frame,
what x86-64 guarantees, what a reader sees when a writer dies) are in :mod:`shm.layout`.

One process writes, another reads; each maps the same memory and builds its own
``SpscRing`` over it, then uses only the writer half (:meth:`SpscRing.claim`,
:meth:`SpscRing.publish_head`, :meth:`SpscRing.write`, :meth:`SpscRing.write_many`) or only
the reader half (:meth:`SpscRing.region`, :meth:`SpscRing.consume`, :meth:`SpscRing.wait`).
Each half caches the other side's position and reloads it only when it must, so the writer
does not touch the reader's cache line while there is room, and the reader does not touch the
writer's line while it has frames left.

Hot-path methods return codes (``-1``, ``False``, a count); exceptions are for misuse
(``ValueError``) and for a peer that broke the ring (:class:`~shm.errors.CorruptFrameError`),
after which the ring must be abandoned.

Writer, one frame at a time::

    pos = ring.claim(FRAME_RECORD, len(payload))   # -1: full, try later
    ring.view[pos:pos + len(payload)] = payload
    ring.publish_head()                            # commit (and ring the doorbell if needed)

Reader::

    start, end = ring.region()            # contiguous committed bytes (start == end: none)
    ... walk frames in ring.view[start:end] (see shm.frames) ...
    ring.consume(end - start)              # frees the space for the writer
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable

from shm._client import CLAIM_TOO_BIG, RingWriter
from shm.doorbell import Doorbell
from shm.errors import CorruptFrameError, SegmentError
from shm.layout import (
    MAX_RING_BYTES,
    MIN_RING_BYTES,
    RING_HEADER_BYTES,
    RING_MAGIC,
    RING_OFFSETS,
    RING_REQUEST,
    WAKE_TIMEOUT_S,
    max_frame_bytes,
)

__all__ = ["SpscRing"]

_U64 = struct.Struct("<Q")
_HEADER_CONST = struct.Struct("<IIQ")  # ring_magic, ring_kind, capacity
_pack_u64 = _U64.pack_into
_unpack_u64 = _U64.unpack_from


class SpscRing:
    """A ring over ``buffer[offset : offset + RING_HEADER_BYTES + capacity]``.

    Args:
        buffer: a writable buffer, normally the segment's ``mmap``; tests may use a bytearray.
        offset: byte offset of the ring header in ``buffer`` (a multiple of 8).
        capacity: size of the data area, a power of two. With ``create`` it is written to the
            header; otherwise it is checked against the header (``None`` accepts the header's).
        kind: :data:`~shm.layout.RING_REQUEST` or :data:`~shm.layout.RING_COMPLETION`; written
            with ``create``, checked otherwise.
        create: initialise the header (magic, kind, capacity, zero positions). Only the
            segment's creator does this, before any other process sees the memory.
        doorbell: the eventfd the writer rings and the reader waits on; ``None``: the reader
            polls with :data:`~shm.layout.WAKE_TIMEOUT_S` sleeps.
        name: used in error messages ("request ring 3").

    Raises:
        SegmentError: bad header (magic, kind, capacity) or the ring does not fit ``buffer``.
        CorruptFrameError: the stored head and tail are inconsistent.
    """

    __slots__ = (
        "view",
        "capacity",
        "kind",
        "max_frame",
        "data_start",
        "data_end",
        "doorbell",
        "name",
        "_mask",
        "_head_off",
        "_tail_off",
        "_full_off",
        "_flag_off",
        "_w",
        "_tail",
        "_head_seen",
        "_words",
        "_head_i",
        "_tail_i",
        "_full_i",
    )

    def __init__(
        self,
        buffer: object,
        offset: int,
        capacity: int | None = None,
        *,
        kind: int = RING_REQUEST,
        create: bool = False,
        doorbell: Doorbell | None = None,
        name: str = "ring",
    ) -> None:
        view = memoryview(buffer)  # type: ignore[arg-type]
        try:
            self._setup(view, offset, capacity, kind, create, doorbell, name)
        except BaseException:
            # A refused ring must not pin the mapping (mmap.close() fails while views exist).
            view.release()
            raise

    def _setup(
        self,
        view: memoryview,
        offset: int,
        capacity: int | None,
        kind: int,
        create: bool,
        doorbell: Doorbell | None,
        name: str,
    ) -> None:
        if view.format != "B" or view.ndim != 1:
            raise SegmentError(f"{name}: buffer must be a flat byte buffer (mmap, bytearray)")
        if view.readonly:
            raise SegmentError(f"{name}: buffer is read-only")
        if offset < 0 or offset & 7:
            raise SegmentError(f"{name}: ring offset {offset} is not 8-byte aligned")
        if offset + RING_HEADER_BYTES > len(view):
            raise SegmentError(f"{name}: ring header at {offset} is past the buffer's end")
        self.name = name
        if create:
            if capacity is None:
                raise ValueError("create=True needs a capacity")
            _check_capacity(capacity, name)
            if offset + RING_HEADER_BYTES + capacity > len(view):
                raise SegmentError(f"{name}: {capacity}-byte ring at {offset} does not fit")
            view[offset : offset + RING_HEADER_BYTES] = bytes(RING_HEADER_BYTES)
            _HEADER_CONST.pack_into(view, offset + RING_OFFSETS["ring_magic"], RING_MAGIC, kind, capacity)
        else:
            magic, stored_kind, stored_cap = _HEADER_CONST.unpack_from(
                view, offset + RING_OFFSETS["ring_magic"]
            )
            if magic != RING_MAGIC:
                raise SegmentError(f"{name}: bad ring magic {magic:#x}")
            if stored_kind != kind:
                raise SegmentError(f"{name}: ring kind {stored_kind}, expected {kind}")
            if capacity is not None and stored_cap != capacity:
                raise SegmentError(f"{name}: ring capacity {stored_cap}, expected {capacity}")
            capacity = stored_cap
            _check_capacity(capacity, name)
            if offset + RING_HEADER_BYTES + capacity > len(view):
                raise SegmentError(f"{name}: {capacity}-byte ring at {offset} does not fit")

        self.view = view
        self.capacity: int = capacity
        self.kind = kind
        self.max_frame = max_frame_bytes(capacity)
        self.data_start = offset + RING_HEADER_BYTES
        self.data_end = self.data_start + capacity
        self.doorbell = doorbell
        self._mask = capacity - 1
        self._head_off = offset + RING_OFFSETS["head"]
        self._tail_off = offset + RING_OFFSETS["tail"]
        self._full_off = offset + RING_OFFSETS["full_count"]
        self._flag_off = offset + RING_OFFSETS["reader_sleeping"]
        # The tail (the head is RingWriter's) is stored through a 'Q'-typed memoryview: item
        # assignment is one aligned 8-byte memcpy. struct.pack_into is NOT safe here: CPython
        # zeroes the destination before packing into it, so a concurrent reader could see a
        # transient 0 (we saw it happen).
        self._words = view[offset : offset + RING_HEADER_BYTES].cast("Q")
        self._head_i = RING_OFFSETS["head"] // 8
        self._tail_i = RING_OFFSETS["tail"] // 8
        self._full_i = RING_OFFSETS["full_count"] // 8

        head = self._words[self._head_i]
        tail = self._words[self._tail_i]
        if tail > head or head - tail > capacity or head & 7 or tail & 7:
            # Release our views, or the caller could never close the mapping.
            self._words.release()
            view.release()
            raise CorruptFrameError(f"{name}: inconsistent positions head={head} tail={tail}")
        # Writer half: compiled (shm._client.RingWriter), so that the compiled send() and the
        # Python writers share one claim state.
        self._w = RingWriter(
            view,
            offset,
            self.data_start,
            capacity,
            head,
            tail,
            self._words[self._full_i],
            doorbell.fd if doorbell is not None else -1,
        )
        # Reader half.
        self._tail = tail
        self._head_seen = head

    # ------------------------------------------------------------------ writer half

    def claim(self, frame_type: int, payload_length: int) -> int:
        """Reserve a frame and write its header; returns where its payload goes in ``view``.

        The frame is not visible to the reader until :meth:`publish_head`. Several claims may
        precede one publish. Returns -1 when the ring has no room now (back-pressure). A frame
        that does not fit before the end of the data area is preceded by a padding frame to
        the end, and starts over at 0.

        Raises:
            ValueError: the frame is larger than :attr:`max_frame` (it could never fit).
            CorruptFrameError: the reader's tail moved backwards, past the published head, or
                is unaligned.
        """
        pos = self._w.claim(frame_type, payload_length)
        if pos >= -1:
            return pos
        if pos == CLAIM_TOO_BIG:
            raise ValueError(
                f"{self.name}: {payload_length}-byte payload exceeds the largest frame "
                f"({self.max_frame - 8} bytes of payload)"
            )
        w = self._w
        raise CorruptFrameError(
            f"{self.name}: reader's tail {self._words[self._tail_i]} is outside "
            f"[{w.tail_cache}, {w.published}] or unaligned"
        )

    def publish_head(self) -> None:
        """Commit every claimed frame: one aligned 8-byte store of the head (see layout).

        Rings the doorbell if the reader said it is going to sleep.
        """
        self._w.publish()

    def rollback(self) -> None:
        """Forget frames claimed since the last :meth:`publish_head` (their bytes stay unread)."""
        self._w.rollback()

    @property
    def writer(self) -> RingWriter:
        """The compiled writer state (for the compiled send())."""
        return self._w

    def write(self, frame_type: int, payload: bytes | bytearray | memoryview) -> bool:
        """Write and publish one frame; False (nothing written) when the ring is full."""
        n = len(payload)
        pos = self.claim(frame_type, n)
        if pos < 0:
            return False
        self.view[pos : pos + n] = payload
        self.publish_head()
        return True

    def write_many(
        self, frame_type: int, payloads: Iterable[bytes | bytearray | memoryview]
    ) -> int:
        """Write frames in order until one does not fit; publish once. Returns how many."""
        view = self.view
        claim = self.claim
        count = 0
        for payload in payloads:
            n = len(payload)
            pos = claim(frame_type, n)
            if pos < 0:
                break
            view[pos : pos + n] = payload
            count += 1
        if count:
            self.publish_head()
        return count

    @property
    def unpublished(self) -> int:
        """Bytes claimed by the writer and not yet published."""
        w = self._w
        return w.pending - w.published

    @property
    def full_count(self) -> int:
        """How often the writer found the ring too full (from shared memory)."""
        return self._words[self._full_i]

    # ------------------------------------------------------------------ reader half

    def region(self) -> tuple[int, int]:
        """The committed, unconsumed bytes that lie contiguously from the tail: ``(start, end)``.

        Offsets index :attr:`view`. ``start == end`` when there is nothing to read. When the
        committed bytes wrap, this returns the part before the end of the data area (ending
        with a padding frame); call again after :meth:`consume` for the rest.

        Raises:
            CorruptFrameError: the writer's head moved backwards, ran more than ``capacity``
                ahead of the tail, or is unaligned.
        """
        head = self._words[self._head_i]
        tail = self._tail
        if head != self._head_seen:
            if head < self._head_seen or head - tail > self.capacity or head & 7:
                raise CorruptFrameError(
                    f"{self.name}: head {head} is invalid (last head {self._head_seen}, "
                    f"tail {tail}, capacity {self.capacity})"
                )
            self._head_seen = head
        off = tail & self._mask
        start = self.data_start + off
        n = head - tail
        room = self.capacity - off
        return start, start + (n if n < room else room)

    def consume(self, nbytes: int) -> None:
        """Give ``nbytes`` (whole frames, from the tail) back to the writer: stores the tail.

        Raises:
            ValueError: ``nbytes`` is negative, unaligned or more than was committed.
        """
        tail = self._tail + nbytes
        if nbytes < 0 or nbytes & 7 or tail > self._head_seen:
            raise ValueError(f"{self.name}: cannot consume {nbytes} bytes")
        self._tail = tail
        self._words[self._tail_i] = tail

    # Deferred release. A request ring's reader (the worker) reads with a private cursor and
    # does not free what it read; the *writer* (the client) frees space once the worker has
    # reported the records' outcome (a CHUNK_DONE frame). So the ring always holds every record
    # whose outcome its writer has not seen, and a restarted reader can read it again.

    def advance(self, nbytes: int) -> None:
        """Move the private read cursor past ``nbytes`` of whole frames without freeing them.

        Raises:
            ValueError: ``nbytes`` is negative, unaligned or more than was committed.
        """
        tail = self._tail + nbytes
        if nbytes < 0 or nbytes & 7 or tail > self._head_seen:
            raise ValueError(f"{self.name}: cannot advance {nbytes} bytes")
        self._tail = tail

    def seek(self, position: int) -> None:
        """Start reading at ``position`` (between the stored tail and the published head).

        Raises:
            CorruptFrameError: ``position`` is outside ``[tail, head]`` or unaligned.
        """
        tail = self._words[self._tail_i]
        head = self._words[self._head_i]
        if position & 7 or not tail <= position <= head or head - tail > self.capacity:
            raise CorruptFrameError(
                f"{self.name}: cannot resume at {position} (tail {tail}, head {head})"
            )
        self._tail = position
        self._head_seen = head

    @property
    def cursor(self) -> int:
        """The reader's private position (what :meth:`region` reads from)."""
        return self._tail

    def position_after(self, nbytes: int) -> int:
        """The ring position ``nbytes`` past the private cursor."""
        return self._tail + nbytes

    def free_to(self, position: int) -> bool:
        """Writer side, deferred release: store the tail at ``position`` (monotonic).

        Returns False (and stores nothing) when ``position`` is behind the stored tail or past
        what this writer published: a peer reporting such a position is broken.
        """
        tail = self._words[self._tail_i]
        if position < tail or position > self._w.published or position & 7:
            return False
        self._words[self._tail_i] = position
        return True

    def readable(self) -> int:
        """Committed bytes not yet consumed (validated like :meth:`region`)."""
        self.region()
        return self._head_seen - self._tail

    def arm(self) -> bool:
        """Announce sleep: set ``reader_sleeping``, then re-check the ring.

        Returns True when the ring is still empty and the caller may sleep on the doorbell
        (for at most :data:`~shm.layout.WAKE_TIMEOUT_S`, see layout's ordering section);
        False when frames arrived meanwhile (the flag is cleared again, do not sleep).
        """
        self.view[self._flag_off] = 1
        if self.readable():
            self.view[self._flag_off] = 0
            return False
        return True

    def disarm(self) -> None:
        """Clear ``reader_sleeping`` after waking, so a busy reader is not rung."""
        self.view[self._flag_off] = 0

    def wait(self, timeout: float = WAKE_TIMEOUT_S) -> bool:
        """Block until frames are readable or ``timeout`` passed; True if readable.

        Uses the doorbell protocol, so an idle reader uses no CPU. Keep ``timeout`` at
        :data:`~shm.layout.WAKE_TIMEOUT_S` (the default) or below and call again in a loop:
        the timeout is what bounds the cost of a lost wake-up.
        """
        if self.arm():
            bell = self.doorbell
            if bell is not None:
                bell.wait(timeout)
            else:
                time.sleep(timeout)
            self.disarm()
        return self.readable() > 0

    # ------------------------------------------------------------------ both / stats

    def used(self) -> int:
        """Bytes written and not yet consumed, as both positions in shared memory say now."""
        tail = self._words[self._tail_i]
        head = self._words[self._head_i]
        return max(0, head - tail)

    def free(self) -> int:
        """Bytes the writer could still use (ignoring padding at the wrap)."""
        return self.capacity - min(self.capacity, self.used())

    @property
    def head(self) -> int:
        """The published head position (from shared memory)."""
        return self._words[self._head_i]

    @property
    def tail(self) -> int:
        """The stored tail position (from shared memory)."""
        return self._words[self._tail_i]

    def release(self) -> None:
        """Drop this ring's views of the buffer (needed before the mmap can be closed)."""
        self._w.release()
        self._words.release()
        self.view.release()

    def __repr__(self) -> str:
        return f"SpscRing({self.name}, capacity={self.capacity}, used={self.used()})"


def _check_capacity(capacity: int, name: str) -> None:
    if (
        capacity < MIN_RING_BYTES
        or capacity > MAX_RING_BYTES
        or capacity & (capacity - 1)
    ):
        raise SegmentError(
            f"{name}: capacity {capacity} is not a power of two in "
            f"[{MIN_RING_BYTES}, {MAX_RING_BYTES}]"
        )
