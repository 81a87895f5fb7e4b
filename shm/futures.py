"""Delivery outcomes: what ``send()`` and ``send_many()`` return, and how outcomes reach them.

- :class:`DeliveryFuture`: one record's outcome (``send()``).
- :class:`DeliveryGroup`: the outcome of a whole ``send_many()``, settled a run at a time.
- :class:`PendingRun`: a pending-FIFO entry standing for consecutive records of one group.
- :func:`settle_fifo` / :func:`fail_fifo`: how the completion thread (and the producer, when
  the daemon is gone) hands outcomes to a partition's pending FIFO, in send order.

Futures are resolved on the completion thread (:mod:`shm.completions`); done-callbacks run
there too. An exception raised by a callback is logged on ``sluice.client`` and does not stop
the thread or the other callbacks.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from shm._client import FutureBase
from shm._client import settle as _settle
from shm.errors import KafkaError

__all__ = [
    "RecordMetadata",
    "DeliveryFuture",
    "DeliveryGroup",
    "PendingRun",
    "DeliveryTally",
    "settle_fifo",
    "fail_fifo",
]

log = logging.getLogger("sluice.client")


class RecordMetadata(NamedTuple):
    """Where a record landed. ``offset`` is -1 under acks=0."""

    topic: str
    partition: int
    offset: int
    timestamp: int


# Waiters (threading.Event) and done-callbacks of futures and groups are registered and run
# under this lock: registration is rare, and the lock guarantees a callback runs exactly once
# however a registration races with the completion thread's resolution.
_wake_lock = threading.Lock()


def _run_callbacks(obj: Any, waiters: list[Any]) -> None:
    for w in waiters:
        if type(w) is threading.Event:
            w.set()
            continue
        try:
            w(obj)
        except Exception:  # noqa: BLE001 - a user callback must not kill the completion thread
            log.exception("sluice: done-callback %r of %r raised", w, obj)


class _Awaitable:
    """``await`` support shared by DeliveryFuture and DeliveryGroup (outcome relayed to the
    loop by a done-callback)."""

    __slots__ = ()

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        """Call ``fn(self)`` once the outcome is known (at once if it is). Callbacks run on the
        completion thread: keep them quick."""
        with _wake_lock:
            if self._outcome is None:  # type: ignore[attr-defined]
                if self._waiters is None:  # type: ignore[attr-defined]
                    self._waiters = []  # type: ignore[attr-defined]
                self._waiters.append(fn)  # type: ignore[attr-defined]
                return
        fn(self)

    def _wake(self) -> None:
        """Run the waiters once, after ``_outcome`` was set (by the resolving thread)."""
        with _wake_lock:
            waiters = self._waiters  # type: ignore[attr-defined]
            self._waiters = None  # type: ignore[attr-defined]
        if waiters:
            _run_callbacks(self, waiters)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Block until the outcome; the error, or None on success (or TimeoutError)."""
        if self._outcome is None:  # type: ignore[attr-defined]
            self._wait(timeout)
        o = self._outcome  # type: ignore[attr-defined]
        return None if type(o) is int else o

    def _wait(self, timeout: float | None) -> None:
        if self._outcome is not None:  # type: ignore[attr-defined]
            return
        ev = threading.Event()
        self.add_done_callback(lambda _: ev.set())
        if not ev.wait(timeout) and self._outcome is None:  # type: ignore[attr-defined]
            raise TimeoutError(f"no outcome for {self!r} within {timeout}s")

    def __await__(self):  # noqa: ANN204
        loop = asyncio.get_running_loop()
        afut: asyncio.Future[Any] = loop.create_future()

        def relay(f: Any) -> None:
            loop.call_soon_threadsafe(_relay_outcome, afut, f)

        self.add_done_callback(relay)
        return afut.__await__()


def _relay_outcome(afut: asyncio.Future[Any], f: Any) -> None:
    if afut.done():
        return
    try:
        afut.set_result(f.result(0))
    except BaseException as exc:  # noqa: BLE001 - relayed to the awaiting task
        afut.set_exception(exc)


class DeliveryFuture(FutureBase, _Awaitable):
    """The outcome of one ``send()``: ``result(timeout)`` returns RecordMetadata or raises.

    Lighter than ``concurrent.futures.Future``: five slots, no lock or event unless someone
    waits; the completion thread resolves it with one store (the offset, or the exception).
    Awaitable from asyncio code (``meta = await producer.send(...)``).

    ``on_delivery``, if given, is the first done-callback (registered without the lock: the
    future is not yet visible to the completion thread).
    """

    # The slots (topic, partition, timestamp, _outcome, _waiters) are FutureBase's, so that
    # the compiled send() makes a future without running __init__.
    __slots__ = ()

    def __init__(
        self, topic: str, partition: int, timestamp: int, on_delivery: Callable[[DeliveryFuture], None] | None = None
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.timestamp = timestamp
        # None while pending; the offset (int) on success; the exception on failure.
        self._outcome: int | BaseException | None = None
        self._waiters: list[Any] | None = None if on_delivery is None else [on_delivery]

    def done(self) -> bool:
        return self._outcome is not None

    def result(self, timeout: float | None = None) -> RecordMetadata:
        """Block until the outcome; raise its error (a KafkaError subclass) or TimeoutError."""
        o = self._outcome
        if o is None:
            self._wait(timeout)
            o = self._outcome
        if type(o) is int:
            return RecordMetadata(self.topic, self.partition, o, self.timestamp)
        raise o  # type: ignore[misc]

    def resolve(self, outcome: int | BaseException) -> None:
        """Set the outcome (the offset, or the exception) and run the waiters. For the
        producer's side (a dropped record, a daemon gone); applications do not call it."""
        self._outcome = outcome
        if self._waiters is not None:
            self._wake()

    def __repr__(self) -> str:
        return f"DeliveryFuture({self.topic!r}, partition={self.partition}, outcome={self._outcome!r})"


class DeliveryGroup(_Awaitable):
    """The outcome of one ``send_many()``: one object for all its records.

    The completion thread settles it a run at a time (one operation per completion, not per
    record), so bulk senders pay nothing per record for outcomes.

    - ``result(timeout)`` -> the number of records (all delivered); raises the first error if
      any record failed (``errors`` lists them all), TimeoutError if not done in time.
    - ``done()``, ``exception(timeout)``, ``add_done_callback(fn)``, ``await group``.
    - ``offsets``: partition -> list of ``(base_offset, count)`` ranges of delivered records,
      in send order within the partition (base -1 under acks=0).
    - ``errors``: list of ``(partition, count, exception)``; ``failed``: how many failed.
    - Compatibility: it is also a sequence of DeliveryFuture in send order (``group[i]``,
      iteration, :meth:`futures`), built only when asked for.
    """

    __slots__ = (
        "topic",
        "count",
        "timestamp",
        "failed",
        "_first_error",
        "_runs",
        "_left",
        "_lock",
        "_order",
        "_outcome",
        "_waiters",
    )

    def __init__(self, topic: str, count: int, timestamp: int) -> None:
        self.topic = topic
        self.count = count
        self.timestamp = timestamp
        self.failed = 0
        self._first_error: BaseException | None = None
        # (partition, base_offset, count, log_append_time, exception or None) in the order
        # outcomes came, which within one partition is the send order.
        self._runs: list[tuple[int, int, int, int, BaseException | None]] = []
        self._left = count
        self._lock = threading.Lock()
        # Send order, for the per-record view: runs (partition, count), or for keyed
        # records the list of each record's partition.
        self._order: list[tuple[int, int] | list[int]] = []
        self._outcome: int | BaseException | None = None if count else 0
        self._waiters: list[Any] | None = None

    def __len__(self) -> int:
        return self.count

    def done(self) -> bool:
        return self._outcome is not None

    def result(self, timeout: float | None = None) -> int:
        """Block until every record has its outcome; the number of records, or raise the first
        error (a KafkaError subclass, BufferFullError, ProducerClosedError) or TimeoutError."""
        if self._outcome is None:
            self._wait(timeout)
        o = self._outcome
        if type(o) is int:
            return o
        raise o  # type: ignore[misc]

    @property
    def offsets(self) -> dict[int, list[tuple[int, int]]]:
        """partition -> ``(base_offset, count)`` ranges of the records delivered so far."""
        out: dict[int, list[tuple[int, int]]] = {}
        for p, base, k, _ts, exc in list(self._runs):
            if exc is not None:
                continue
            ranges = out.setdefault(p, [])
            if ranges and base >= 0 and ranges[-1][0] + ranges[-1][1] == base:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + k)  # contiguous: one range
            else:
                ranges.append((base, k))
        return out

    @property
    def errors(self) -> list[tuple[int, int, BaseException]]:
        """``(partition, count, exception)`` of every failed run so far."""
        return [(p, k, exc) for p, _b, k, _ts, exc in list(self._runs) if exc is not None]

    def note_order(self, entry: tuple[int, int] | list[int]) -> None:
        """Record the send order for the per-record view: a run ``(partition, count)``, or the
        list of each keyed record's partition. Called by the producer while planning."""
        self._order.append(entry)

    def settle(self, partition: int, base: int, count: int, ts: int, exc: BaseException | None) -> None:
        """``count`` records to ``partition`` have their outcome (offsets from ``base``; -1
        under acks=0 or on failure). Called by the completion thread and the producer."""
        with self._lock:
            self._runs.append((partition, base, count, ts, exc))
            if exc is not None:
                self.failed += count
                if self._first_error is None:
                    self._first_error = exc
            self._left -= count
            if self._left:
                return
        self._outcome = self._first_error if self._first_error is not None else self.count
        if self._waiters is not None:
            self._wake()

    # --- the per-record view (compatibility; costs per record only when used) -------------

    def __getitem__(self, i: int) -> DeliveryFuture:
        return self.futures()[i]

    def __iter__(self) -> Iterator[DeliveryFuture]:
        return iter(self.futures())

    def futures(self) -> list[DeliveryFuture]:
        """One DeliveryFuture per record, in send order (resolved once the group is done)."""
        topic, ts = self.topic, self.timestamp
        futs = []
        for entry in self._order:
            if type(entry) is tuple:  # (partition, count): a run in send order
                p, k = entry
                futs += [DeliveryFuture(topic, p, ts) for _ in range(k)]
            else:  # keyed: each record's partition
                futs += [DeliveryFuture(topic, p, ts) for p in entry]
        if self._outcome is None:
            self.add_done_callback(lambda g: g._fill(futs))
        else:
            self._fill(futs)
        return futs

    def _fill(self, futs: list[DeliveryFuture]) -> None:
        outs: dict[int, list[tuple[int | BaseException, int]]] = {}
        for p, base, k, ts, exc in self._runs:
            lst = outs.setdefault(p, [])
            if exc is not None:
                lst.extend([(exc, ts)] * k)
            elif base >= 0:
                lst.extend((o, ts) for o in range(base, base + k))
            else:
                lst.extend([(-1, ts)] * k)
        cursor: dict[int, int] = {}
        for f in futs:
            p = f.partition
            i = cursor.get(p, 0)
            cursor[p] = i + 1
            o, ts = outs[p][i]
            if ts >= 0:
                f.timestamp = ts
            f.resolve(o)

    def __repr__(self) -> str:
        return f"DeliveryGroup({self.topic!r}, count={self.count}, left={self._left}, failed={self.failed})"


class PendingRun:
    """A pending-FIFO entry standing for ``left`` consecutive records of one DeliveryGroup."""

    __slots__ = ("group", "left")

    def __init__(self, group: DeliveryGroup, left: int) -> None:
        self.group = group
        self.left = left


class DeliveryTally:
    """The pending-FIFO entry of records sent without a future: every outcome is counted here.

    Two uses. The topic's tally of ``produce()`` (fire and forget): shared by the topic's
    records, it logs the first failure of each kind. A batch's tally (``watch=True``, socket
    ingest's Produce without ack): :meth:`expect` says how many records were sent with it, and
    ``on_done(tally)`` runs (on the completion thread) once that many have their outcome.

    Attributes:
        delivered: records Kafka accepted.
        failed: records that failed (Kafka refused them, the ring was full under
            ``on_full = "drop"``, or the producer closed before their outcome).
        errors: failure name (the exception's class name) -> records.
    """

    __slots__ = ("topic", "delivered", "failed", "errors", "expected", "on_done", "_log", "_lock")

    def __init__(self, topic: str, *, on_done: Callable[[DeliveryTally], None] | None = None) -> None:
        self.topic = topic
        self.delivered = 0
        self.failed = 0
        self.errors: dict[str, int] = {}
        self.expected = -1  # -1: not watched (or not known yet)
        self.on_done = on_done
        self._log = on_done is None
        self._lock = None if on_done is None else threading.Lock()

    def settle(self, count: int, exc: BaseException | None) -> None:
        """``count`` records have their outcome: delivered when ``exc`` is None."""
        if exc is None:
            self.delivered += count
        else:
            self.failed += count
            name = type(exc).__name__
            seen = self.errors.get(name, 0)
            self.errors[name] = seen + count
            if not seen and self._log:
                log.warning("sluice: produce() to %r: %d record(s) failed with %s: %s (the first of its kind; all "
                            "are counted in Producer.delivery_errors)", self.topic, count, name, exc)
        if self.on_done is not None and 0 <= self.expected <= self.delivered + self.failed:
            self._done()

    def expect(self, records: int) -> None:
        """``records`` were sent with this tally, all of them now: ``on_done`` runs once they
        all have their outcome (at once if they have already)."""
        self.expected = records
        if self.on_done is not None and records <= self.delivered + self.failed:
            self._done()

    def _done(self) -> None:
        # The completion thread and expect() may both see the count reached: one runs it.
        with self._lock:  # type: ignore[union-attr]
            done, self.on_done = self.on_done, None
        if done is not None:
            done(self)

    def resolve(self, exc: BaseException) -> None:
        """One record failed before it entered the ring (the DeliveryFuture protocol)."""
        self.settle(1, exc)

    def settle_future(self, fut: DeliveryFuture) -> None:
        """A done callback: count ``fut``'s outcome here (a record of the batch that had to be
        sent with a future)."""
        self.settle(1, fut.exception(0))

    def __repr__(self) -> str:
        return f"DeliveryTally({self.topic!r}, delivered={self.delivered}, failed={self.failed})"


def settle_fifo(dq: deque[Any], part: int, err: int, base: int, ts: int, count: int) -> None:
    """One COMPLETION: the next ``count`` records pending for partition ``part`` have their
    outcome. FIFO entries are DeliveryFutures (one record), PendingRuns (a DeliveryGroup's
    consecutive records, settled with one call however many there are) and the topic's
    DeliveryTally (one produce() record each). The completion thread's per-record path, so
    compiled (shm._client.settle); the exception is made once per completion, here.

    Raises:
        IndexError: fewer records pending than the completion names (a broken peer).
    """
    _settle(dq, part, KafkaError.for_code(err) if err else None, base, ts, count, PendingRun, DeliveryTally)


def fail_fifo(dq: deque[Any], part: int, exc: BaseException) -> None:
    """Fail every record pending in partition ``part``'s FIFO with ``exc`` (emptying it)."""
    while dq:
        e = dq.popleft()
        if type(e) is PendingRun:
            e.group.settle(part, -1, e.left, -1, exc)
        elif type(e) is DeliveryTally:
            e.settle(1, exc)
        else:
            e.resolve(exc)
