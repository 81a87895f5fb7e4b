"""Back-pressure: what the producer does when a request ring is full, and the Python writes of
``send_many()``'s runs.

The compiled ``send()`` (``shm._client.SendCore``) writes a record itself when its ring has
room; when the ring is full it hands the encoded body to :meth:`Backpressure.enqueue` (its
``full=`` callable), which applies the topic's ``on_full`` policy:

- ``on_full = "block"``: retry until the record fits, waiting on a condition that the
  completion thread signals when it frees ring space (:meth:`Backpressure.wake`), at most
  ``max_block_ms``; past that, ``BufferFullError``. With ``never_block`` the error comes at
  once, for a caller that must not block its thread (the daemon's socket ingest).
- ``on_full = "drop"``: count the record in the segment's drop counter of its topic (where
  the daemon reads ``sluice_drops_total``) and fail its future with ``BufferFullError``.

:meth:`Backpressure.put_runs` copies the per-partition runs of one ``send_many()`` into their
rings with one claim per run (more when the ring fills up) under the same policy.

None of this is on the per-record path: it runs once per full ring and once per run. Every
write here holds the producer's send lock from its claim to its publish, so each ring keeps
one writer (the compiled ``send()`` hands its record to the Python path while a Python writer
is between the two).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from shm.errors import BufferFullError
from shm.frames import encode_record_frames, put_frames, put_record
from shm.futures import DeliveryFuture, DeliveryGroup, PendingRun
from shm.layout import FRAME_HEADER
from shm.ring import SpscRing
from shm.topic import TopicState

__all__ = ["Backpressure"]

_unpack_frame = FRAME_HEADER.unpack_from
# While waiting for room, look again at least this often (a lost wake-up costs no more).
_WAIT_S = 0.01


class Backpressure:
    """The full-ring policy of one producer's request rings, and its Python ring writes.

    Args:
        request_rings: one per worker, by worker index (``TopicState.owners`` indexes them).
        send_lock: held by every Python writer of these rings from its claim to its publish.
        check_open: raises ProducerClosedError when the producer is closed or the daemon gone.
        add_pending: adds to the producer's count of records whose outcome has not come back
            (the compiled core's ``add_pending``); called after each publish.
        drop_counts: the segment's drop counter per topic id (one u64 each, see
            :mod:`shm.layout`): counted there, the daemon reads them for ``sluice_drops_total``,
            even after this process is gone.
        never_block: a full ring raises BufferFullError at once under ``on_full = "block"``.
    """

    def __init__(
        self,
        request_rings: Sequence[SpscRing],
        send_lock: threading.Lock,
        check_open: Callable[[], None],
        add_pending: Callable[[int], Any],
        drop_counts: Any,
        *,
        never_block: bool = False,
    ) -> None:
        self._req = list(request_rings)
        self._send_lock = send_lock
        self._check_open = check_open
        self._add_pending = add_pending
        self._drop_counts = drop_counts
        self._never_block = never_block
        self._space = threading.Condition(threading.Lock())

    def wake(self) -> None:
        """Ring space was freed, or the producer can no longer send: waiters look again."""
        with self._space:
            self._space.notify_all()

    def drops(self, topics: dict[str, TopicState]) -> dict[str, int]:
        """Records dropped so far, per topic of ``topics`` (name -> state; topics with none left out)."""
        counts = self._drop_counts
        return {name: counts[t.id] for name, t in list(topics.items()) if counts[t.id]}

    def enqueue(self, t: TopicState, partition: int, ts: int, body: bytes, fut: DeliveryFuture) -> None:
        """Write one record whose ring was full, waiting or dropping per the topic's
        ``on_full``; ``fut`` becomes pending once it is written, or fails if it is dropped.
        The compiled ``send()``'s ``full=`` callable: ``full(topic_state, partition, ts,
        body, future)``."""
        ring = self._req[t.owners[partition]]
        dq = t.pending[partition]
        deadline = None
        while True:
            with self._send_lock:
                self._check_open()
                # Pending first: the outcome may come back before put_record returns.
                dq.append(fut)
                if put_record(ring, t.id, partition, ts, body):
                    ring.publish_head()
                    self._add_pending(1)
                    return
                dq.pop()
            deadline = self._wait_for_room(t, deadline, fut)
            if deadline is None:
                return

    def put_runs(
        self,
        t: TopicState,
        group: DeliveryGroup,
        plan: list[tuple[int, list[Any], list[Any] | None]],
        ts: int,
        headers: Any,
    ) -> None:
        """Encode and write a ``send_many()``'s runs (:func:`shm.topic.plan_runs`), each as one
        pending run of ``group``. What is raised part way settles the runs not written with it."""
        tid = t.id
        i = 0
        try:
            for i, (p, vs, kk) in enumerate(plan):  # noqa: B007 - i is read after a raise
                frames = encode_record_frames(tid, p, ts, vs, kk, headers)
                self._put_run(t, group, p, frames, len(vs))
        except BaseException as exc:
            for p, vs, _kk in plan[i + 1 :]:
                group.settle(p, -1, len(vs), -1, exc)
            raise

    def _put_run(self, t: TopicState, group: DeliveryGroup, p: int, frames: bytes, count: int) -> None:
        """Copy ``count`` frames of partition ``p`` into its ring as one pending run (more than
        one when the ring fills up); wait or drop by the topic's on_full policy."""
        ring = self._req[t.owners[p]]
        dq = t.pending[p]
        at = 0
        left = count
        deadline = None
        try:
            while left:
                with self._send_lock:
                    self._check_open()
                    at, m = put_frames(ring, frames, at, left)
                    if m:
                        dq.append(PendingRun(group, m))
                        self._add_pending(m)
                        ring.publish_head()
                        left -= m
                        continue
                # The ring is full.
                if t.info.on_full == "drop":
                    at += (_unpack_frame(frames, at)[0] + 15) & -8
                    left -= 1
                    self._drop_counts[t.id] += 1
                    group.settle(p, -1, 1, -1, BufferFullError(f"ring full: record to {t.name!r} dropped (on_full=drop)"))
                    continue
                deadline = self._block(t, deadline)
        except BaseException as exc:
            if left:
                group.settle(p, -1, left, -1, exc)
            raise

    def _wait_for_room(self, t: TopicState, deadline: float | None, fut: DeliveryFuture) -> float | None:
        """The ring is full: wait (block policy) or drop. Returns the deadline, None if dropped."""
        if t.info.on_full == "drop":
            self._drop_counts[t.id] += 1
            fut.resolve(BufferFullError(f"ring full: record to {t.name!r} dropped (on_full=drop)"))
            return None
        return self._block(t, deadline)

    def _block(self, t: TopicState, deadline: float | None) -> float:
        """Wait a little for ring space (on_full=block); BufferFullError past max_block_ms."""
        info = t.info
        now = time.monotonic()
        if deadline is None:
            deadline = now + info.max_block_ms / 1000.0
        if self._never_block or now >= deadline:
            raise BufferFullError(
                f"no room in the ring for {t.name!r} within max_block_ms={info.max_block_ms}"
            )
        with self._space:
            self._space.wait(min(_WAIT_S, deadline - now))
        return deadline
