"""One topic as the producer sees it, and where a bulk send's records go.

:class:`TopicState` is an entry of the producer's topic table. :func:`plan_runs` splits a
``send_many()`` into per-partition runs (explicit partition, sticky spans for null keys, or
Kafka's murmur2 partitioner for keys); :func:`check_sizes` refuses records the topic's
``max_request_size`` cannot take before any of them enters shared memory.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import msgspec

from shm import control
from shm._client import TopicBase
from shm.errors import KafkaError
from shm.frames import encode_record_body
from shm.futures import DeliveryFuture, DeliveryGroup, DeliveryTally, PendingRun
from shm.partitioner import StickyPartitioner, owner, partition_for_key, partitions_for_keys

__all__ = [
    "TopicState",
    "refusal",
    "stick",
    "check_sizes",
    "plan_runs",
    "BATCH_OVERHEAD",
    "BULK",
    "UNKNOWN_TOPIC_OR_PARTITION",
    "MESSAGE_TOO_LARGE",
]

# Kafka error codes the client raises itself, before a record enters shared memory.
UNKNOWN_TOPIC_OR_PARTITION = 3
MESSAGE_TOO_LARGE = 10
BATCH_OVERHEAD = 90  # batch header and record prefix beyond the body, for the size check
BULK = 4096  # send_many encodes and copies at most this many records at a time



class TopicState(TopicBase):
    """One topic as this producer knows it: the daemon's TopicInfo, each partition's owner
    worker and pending FIFO, the sticky partitioner's state and the largest record body.
    Attributes are plain slots: ``send()`` reads them on its per-record path."""

    # name, id, partitions, sticky_p, sticky_left and max_body are TopicBase's slots, which
    # the compiled send() reads; _bind() hands it each partition's owner and pending FIFO.
    __slots__ = ("owners", "pending", "info", "sticky", "batch")

    def __init__(self, info: control.TopicInfo, workers: int) -> None:
        self.name = info.topic
        self.id = info.topic_id
        self.partitions = info.partitions
        self.owners = [owner(info.topic, p, workers) for p in range(info.partitions)]
        # One FIFO per partition, resolved in order by completions: DeliveryFutures (send)
        # and PendingRuns (send_many: many records of one DeliveryGroup as one entry).
        self.pending: list[deque[DeliveryFuture | PendingRun]] = [deque() for _ in range(info.partitions)]
        self.info = info
        self.batch = max(1, info.batch_size)
        self.sticky = StickyPartitioner(self.batch)
        self.sticky_p = 0  # keyless records go here until sticky_left bytes are used up
        self.sticky_left = 0
        self.max_body = info.max_request_size - BATCH_OVERHEAD
        self.tally = DeliveryTally(self.name)  # the outcomes of produce() records
        self._bind(self.owners, self.pending)

    def grow(self, partitions: int, workers: int) -> bool:
        """The topic has ``partitions`` now (the daemon said so); True if that is more.

        The new partitions get their owners and pending FIFOs first (the lists grow in place,
        so the completion thread's table, which holds the same FIFO list, sees them), then
        ``_bind`` hands the compiled send() the longer tables and the new count in one step.
        From then on keyed records go to murmur2 modulo the new count. Never shrinks.
        """
        old = self.partitions
        if partitions <= old:
            return False
        self.owners.extend(owner(self.name, p, workers) for p in range(old, partitions))
        self.pending.extend(deque() for _ in range(old, partitions))
        self._bind(self.owners, self.pending)
        self.info = msgspec.structs.replace(self.info, partitions=partitions)
        return True


def refusal(code: int, t: TopicState, n: int) -> KafkaError:
    """The error the compiled send() raises for a record ``t`` cannot take: MESSAGE_TOO_LARGE
    (``n``: the record body's size) or UNKNOWN_TOPIC_OR_PARTITION (``n``: the partition)."""
    if code == MESSAGE_TOO_LARGE:
        return KafkaError.for_code(
            code,
            f"record of about {n + BATCH_OVERHEAD} bytes is larger than max_request_size "
            f"{t.info.max_request_size} of topic {t.name!r}",
        )
    return KafkaError.for_code(code, f"partition {n} of {t.name!r} (it has {t.partitions})")


def stick(t: TopicState) -> None:
    """Move a topic's keyless records on to the sticky partitioner's next partition. The
    partitioner is charged batch_size bytes at once (so its next call moves on); the bytes
    actually sent count down in ``sticky_left``."""
    t.sticky_p = t.sticky.partition(t.name, t.partitions, t.batch)
    t.sticky_left = t.batch


def _max_len(items: list[Any]) -> int:
    try:
        return max(map(len, items), default=0)
    except TypeError:  # None among them
        return max((len(x) for x in items if x is not None), default=0)


def check_sizes(t: TopicState, vals: list[Any], ks: list[Any] | None, headers: Any, tail: int) -> None:
    """MessageTooLargeError for the first record larger than the topic allows (exact check
    only when the largest key and value together could be too large)."""
    limit = t.max_body
    if _max_len(vals) + (_max_len(ks) if ks is not None else 0) + tail + 10 <= limit:
        return
    for i, v in enumerate(vals):
        size = len(encode_record_body(None if ks is None else ks[i], v, headers))
        if size > limit:
            raise KafkaError.for_code(
                MESSAGE_TOO_LARGE,
                f"record {i} of about {size + BATCH_OVERHEAD} bytes is larger than max_request_size "
                f"{t.info.max_request_size} of topic {t.name!r}",
            )


def plan_runs(
    t: TopicState,
    vals: list[Any],
    ks: list[Any] | None,
    partition: int | None,
    tail: int,
    group: DeliveryGroup,
) -> list[tuple[int, list[Any], list[Any] | None]]:
    """Split a send_many into runs ``(partition, values, keys)`` of at most BULK records,
    and record the send order in ``group``. ``tail``: the encoded headers' size."""
    total = len(vals)
    plan: list[tuple[int, list[Any], list[Any] | None]] = []
    if partition is not None or ks is None:
        if partition is not None:
            spans = [(partition, i, min(i + BULK, total)) for i in range(0, total, BULK)]
        else:
            # Sticky spans: a partition takes records until about batch_size bytes went
            # to it, the same rule as send(), judged on the call's mean record size.
            try:
                vbytes = sum(map(len, vals))
            except TypeError:  # tombstones
                vbytes = sum(len(v) for v in vals if v is not None)
            rec = vbytes // total + 3 + tail
            spans = []
            i = 0
            while i < total:
                if t.sticky_left <= 0:
                    stick(t)
                k = min(-(-t.sticky_left // rec), total - i, BULK)
                t.sticky_left -= k * rec
                spans.append((t.sticky_p, i, i + k))
                i += k
        for p, a, b in spans:
            plan.append((p, vals[a:b], None if ks is None else ks[a:b]))
            group.note_order((p, b - a))
        return plan
    n = t.partitions
    if None in ks:
        # Some null keys among keyed records: those go sticky, record by record.
        parts = []
        for k, v in zip(ks, vals):
            if k is None:
                if t.sticky_left <= 0:
                    stick(t)
                parts.append(t.sticky_p)
                t.sticky_left -= (len(v) if v is not None else 0) + 3 + tail
            else:
                parts.append(partition_for_key(k, n))
    else:
        parts = partitions_for_keys(ks, n)  # every key hashed in one compiled call
    group.note_order(parts)  # type: ignore[arg-type]
    by_part: dict[int, tuple[list[Any], list[Any]]]
    if parts.count(parts[0]) == total:
        by_part = {parts[0]: (vals, ks)}
    elif n <= total:
        bv: list[list[Any]] = [[] for _ in range(n)]
        bk: list[list[Any]] = [[] for _ in range(n)]
        for p, k, v in zip(parts, ks, vals):
            bv[p].append(v)
            bk[p].append(k)
        by_part = {p: (bv[p], bk[p]) for p in range(n) if bv[p]}
    else:
        by_part = {}
        for p, k, v in zip(parts, ks, vals):
            entry = by_part.get(p)
            if entry is None:
                entry = by_part[p] = ([], [])
            entry[0].append(v)
            entry[1].append(k)
    for p, (vs, kk) in by_part.items():
        for i in range(0, len(vs), BULK):
            plan.append((p, vs[i : i + BULK], kk[i : i + BULK]))
    return plan
