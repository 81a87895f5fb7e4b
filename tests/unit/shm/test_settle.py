"""shm._client.settle (the completion thread's per-record work) against a pure-Python oracle.

The oracle is the Python settle_fifo the client used before it was compiled; hypothesis builds
pending FIFOs of DeliveryFutures, DeliveryGroup runs and produce() tallies, settles them with
random completions (success with offsets, acks=0, errors, LogAppendTime) through both, and the
futures, groups and tallies must end the same.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shm.errors import KafkaError
from shm.futures import DeliveryFuture, DeliveryGroup, DeliveryTally, PendingRun, settle_fifo


def oracle_settle(dq: deque[Any], part: int, err: int, base: int, ts: int, count: int) -> None:
    """The pure-Python settle_fifo (the reference)."""
    exc = KafkaError.for_code(err) if err else None
    step = 1 if base >= 0 and exc is None else 0
    off = base if step else -1
    i = 0
    while i < count:
        e = dq.popleft()
        if type(e) is PendingRun:
            m = count - i
            if e.left > m:
                e.left -= m
                dq.appendleft(e)
            else:
                m = e.left
            e.group.settle(part, off, m, ts, exc)
            off += m * step
            i += m
            continue
        if type(e) is DeliveryTally:
            e.settle(1, exc)
            off += step
            i += 1
            continue
        if exc is None:
            if ts >= 0:
                e.timestamp = ts
            e._outcome = off
            off += step
        else:
            e._outcome = exc
        if e._waiters is not None:
            e._wake()
        i += 1


def _fifo(kinds: list[tuple[str, int]]) -> tuple[deque[Any], list[Any], int]:
    """A FIFO of the given entries, the objects to compare afterwards, and its record count."""
    dq: deque[Any] = deque()
    objs: list[Any] = []
    tally = DeliveryTally("t")
    objs.append(tally)
    records = 0
    for kind, n in kinds:
        if kind == "future":
            f = DeliveryFuture("t", 0, 1000, on_delivery=lambda f: None)
            dq.append(f)
            objs.append(f)
            records += 1
        elif kind == "tally":
            for _ in range(n):
                dq.append(tally)
            records += n
        else:
            g = DeliveryGroup("t", n, 1000)
            dq.append(PendingRun(g, n))
            objs.append(g)
            records += n
    return dq, objs, records


def _state(o: Any) -> Any:
    if isinstance(o, DeliveryTally):
        return ("tally", o.delivered, o.failed, dict(o.errors))
    if isinstance(o, DeliveryFuture):
        out = o._outcome
        return ("future", o.timestamp, out if not isinstance(out, BaseException) else type(out).__name__)
    return ("group", getattr(o, "_left", None), getattr(o, "failed", None),
            [(p, b, c, t, type(e).__name__ if e else None) for p, b, c, t, e in getattr(o, "_runs", [])])


entries = st.lists(
    st.tuples(st.sampled_from(["future", "tally", "run"]), st.integers(1, 5)), min_size=1, max_size=12
)
completions = st.lists(
    st.tuples(st.sampled_from([0, 0, 0, 10, 6]), st.sampled_from([-1, 0, 100]), st.sampled_from([-1, 7777])),
    min_size=1,
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(entries, completions, st.data())
def test_compiled_settle_matches_the_python_oracle(kinds: list[tuple[str, int]], comps: list[Any], data: Any) -> None:
    a, objs_a, total = _fifo(kinds)
    b, objs_b, _ = _fifo(kinds)
    left = total
    for err, base, ts in comps:
        if not left:
            break
        count = data.draw(st.integers(1, left))
        settle_fifo(a, 0, err, base, ts, count)
        oracle_settle(b, 0, err, base, ts, count)
        left -= count
    assert len(a) == len(b)
    assert [_state(o) for o in objs_a] == [_state(o) for o in objs_b]


def test_more_records_named_than_pending_is_an_index_error() -> None:
    dq: deque[Any] = deque([DeliveryFuture("t", 0, 1)])
    with pytest.raises(IndexError):
        settle_fifo(dq, 0, 0, 5, -1, 2)


def test_futures_only_the_fifo_holds_still_take_their_offsets() -> None:
    # Futures whose caller dropped them are freed without an outcome (none could see it); the
    # offsets of the records after them must still count them.
    held = DeliveryFuture("t", 0, 1000)
    waited = DeliveryFuture("t", 0, 1000, on_delivery=lambda f: None)
    dq: deque[Any] = deque(DeliveryFuture("t", 0, 1000) for _ in range(100))
    dq.append(held)
    dq.extend(DeliveryFuture("t", 0, 1000) for _ in range(50))
    dq.append(waited)
    settle_fifo(dq, 0, 0, 7000, -1, 152)
    assert not dq
    assert (held._outcome, waited._outcome) == (7100, 7151)
