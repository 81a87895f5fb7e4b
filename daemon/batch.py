"""A batch: one partition's RecordBatch v2, built in a slot of the worker arena.

A :class:`Batch` is *open* while the accumulator appends records to it (the per-record state
then lives in the accumulator's compiled state table, see :mod:`daemon.accumulator`), and
*sealed* once :meth:`Accumulator.ready <daemon.accumulator.Accumulator.ready>` has written its
header, CRC32C and runs table: from then on its bytes are final. The sender stamps a sealed
batch (producer id, epoch, base sequence) before its first send and re-sends exactly those bytes.

A :class:`RecoveredBatch` is a batch a dead worker left STAMPED or DONE in the arena; it behaves
as a sealed batch for the sender.
"""

from __future__ import annotations

from daemon.arena import STATE_DONE, STATE_STAMPED, Arena, RecoveredSlot
from daemon.config import Profile
from daemon.protocol.records import CODECS, HEADER_SIZE, stamp_batch

__all__ = ["Batch", "RecoveredBatch"]


class Batch:
    """One partition's batch. Public fields are the interface the sender and the worker use;
    fields starting with an underscore belong to the accumulator that builds it."""

    __slots__ = (
        "topic",
        "partition",
        "profile",
        "record_count",
        "runs",
        "created_ms",
        "producer_id",
        "producer_epoch",
        "base_sequence",
        "attempts",
        "ordinal",
        "span",
        "size",
        "codec",
        "slot",
        "offset",
        "capacity",
        "_arena",
        "_row",
        "_limit",
        "_tr",
        "_base_ts",
        "_dmax",
        "_records_len",
        "_deadline",
        "_closed",
    )

    def __init__(
        self,
        arena: Arena,
        slot: int,
        topic: str,
        partition: int,
        profile: Profile,
        limit: int,
        base_ts: int,
        now_ms: float,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.profile = profile
        self.record_count = 0
        self.runs: list[tuple[int, int]] = []  # (chunk key, records), in record order
        self.created_ms = now_ms
        self.producer_id = -1
        self.producer_epoch = -1
        self.base_sequence = -1
        self.attempts = 0
        self.ordinal = 0  # creation order in its accumulator: a partition's batches ascend
        self.span = 0  # ordinals ordinal .. ordinal + span - 1 are this batch's (for its halves)
        self.size = 0
        self.codec = CODECS[profile.compression_type]
        self.slot = slot
        self.offset = arena.offset(slot)
        self.capacity = arena.capacity(slot)
        self._arena = arena
        self._row = -1  # the accumulator's state-table row while open
        self._limit = limit  # bytes the finished batch may take, header included
        self._tr: list[int] = []  # the runs table, flat: owner, first position, count, ...
        self._base_ts = base_ts
        self._dmax = 0
        self._records_len = 0
        self._deadline = now_ms + profile.linger_ms
        self._closed = False

    @property
    def records_len(self) -> int:
        """Bytes of (uncompressed) records, as of the last time the accumulator synced them."""
        return self._records_len

    @property
    def sealed(self) -> bool:
        """True once the batch is finished (header, CRC, compression written)."""
        return self.size > 0

    def payload(self) -> memoryview:
        """The whole RecordBatch v2, ready for a Produce request (a view into the arena)."""
        return self._arena.buf[self.offset : self.offset + self.size]

    def stamp(self, producer_id: int, producer_epoch: int, base_sequence: int) -> None:
        """Write producer id, epoch and base sequence into the batch and recompute its CRC32C.

        The slot becomes STAMPED: from now on a re-send must use exactly these bytes.
        """
        if not self.size:
            raise RuntimeError("stamp() on a batch that is not finished")
        stamp_batch(self._arena.buf, self.offset, self.size, producer_id, producer_epoch, base_sequence)
        self.producer_id = producer_id
        self.producer_epoch = producer_epoch
        self.base_sequence = base_sequence
        self._arena.set_state(self.slot, STATE_STAMPED)

    def __repr__(self) -> str:
        return (
            f"Batch({self.topic!r}, {self.partition}, records={self.record_count}, size={self.size}, "
            f"runs={self.runs})"
        )


class RecoveredBatch(Batch):
    """A batch a dead worker left STAMPED or DONE in the arena (see ``Accumulator.recover``),
    or a part of one that the broker refused as too large (see ``Accumulator.split``).

    It behaves as a sealed :class:`Batch` for the sender (same bytes, producer id, epoch and
    sequence); ``runs`` stays empty (its records' chunks are found when the rings are read
    again). ``table`` is the runs table ``[(client_id, first_position, count)]``; ``result`` is
    ``(error_code, base_offset, log_append_ms)`` once known (at once for a DONE slot).
    ``home`` (the slot, kept after ``Accumulator.retire``) belongs to the worker's recovery.

    Parts: ``root`` is the recovered batch a part was cut from (a batch that was never split
    is its own root) and ``index`` the root's index of the part's first record; a part shares
    its root's ``home``. A split root's records get their outcomes from its parts: ``outcomes``
    collects ``(index, count, ordinal, error_code, base_offset, log_append_ms)`` per answered
    part, and ``unanswered`` counts the records whose part has not answered yet.
    """

    __slots__ = ("table", "result", "home", "root", "index", "outcomes", "unanswered")

    def __init__(self, arena: Arena, rs: RecoveredSlot, ordinal: int, span: int, profile: Profile,
                 now_ms: float) -> None:
        self.topic = rs.topic
        self.partition = rs.partition
        self.profile = profile
        self.record_count = rs.record_count
        self.runs = []
        self.created_ms = now_ms
        self.producer_id = rs.producer_id
        self.producer_epoch = rs.producer_epoch
        self.base_sequence = rs.base_sequence
        self.attempts = 0
        self.ordinal = ordinal
        self.span = span
        self.size = rs.length
        self.codec = 0
        self.slot = rs.slot
        self.offset = rs.offset
        self.capacity = rs.capacity
        self._arena = arena
        self._row = -1
        self._limit = rs.capacity
        self._tr = []
        self._base_ts = 0
        self._dmax = 0
        self._records_len = rs.length - HEADER_SIZE
        self._deadline = now_ms
        self._closed = True
        self.table = list(rs.runs)
        self.result: tuple[int, int, int] | None = (
            (rs.error_code, rs.base_offset, rs.log_append_ms) if rs.state == STATE_DONE else None
        )
        self.home = rs.slot
        self.root = self
        self.index = 0
        self.outcomes: list[tuple[int, int, int, int, int, int]] = []
        self.unanswered = rs.record_count

    @classmethod
    def part_of(cls, parent: RecoveredBatch, half: Batch, index: int) -> RecoveredBatch:
        """``half`` (a sealed batch :meth:`Accumulator.split` cut from ``parent``, its runs
        table in ``half._tr``) as a part of ``parent``'s root, starting at the parent's record
        ``index``."""
        part = cls.__new__(cls)
        for name in Batch.__slots__:
            setattr(part, name, getattr(half, name))
        part.runs = []
        tr = half._tr
        part.table = [(tr[i], tr[i + 1], tr[i + 2]) for i in range(0, len(tr), 3)]
        part.result = None
        part.home = parent.home
        part.root = parent.root
        part.index = parent.index + index
        part.outcomes = []
        part.unanswered = half.record_count
        return part
