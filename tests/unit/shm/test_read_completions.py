"""shm._client.read_completions (the completion thread's ring walk) against a pure-Python oracle.

The oracle is what the completion thread did before the walk was compiled: shm.frames
iter_completions (which checks each frame) with shm.futures.settle_fifo per COMPLETION and
SpscRing.free_to per CHUNK_DONE. Hypothesis builds pending FIFOs (DeliveryFutures with a
done-callback, DeliveryGroup runs, the topic's produce() tally) for several topics and
partitions, and regions of COMPLETION, CHUNK_DONE and padding frames anywhere in a ring's data
area, ending at the wrap or not. Valid regions must settle the same futures, free the request
ring to the same position and count the same records; corrupted ones (cut short, a bad type, a
bad length, an unknown topic id, a partition out of range, count 0, padding before the wrap,
random bytes) must stop at the same frame with the same message, having settled the same
frames. Under ``make sanitize`` this is the compiled walk's fuzz target.

The last tests drive shm.completions.CompletionReader over a real ring that wraps.
"""

from __future__ import annotations

import re
import struct
from collections import deque
from typing import Any

import pytest
from helpers import make_ring
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from frames_oracle import put_completion
from shm._client import read_completions
from shm.completions import CompletionReader
from shm.errors import CorruptFrameError, KafkaError
from shm.frames import CHUNK_DONE_TOPIC, iter_completions
from shm.futures import DeliveryFuture, DeliveryGroup, DeliveryTally, PendingRun, settle_fifo
from shm.layout import FRAME_CHUNK_DONE, FRAME_COMPLETION, FRAME_PADDING, FRAME_RECORD, RING_COMPLETION
from shm.ring import SpscRing

CAPACITY = 2048
PUBLISHED = 1024  # how far the request rings' writer has published: CHUNK_DONE positions stay below
_COMPLETION_FRAME = struct.Struct("<IIHhiqqII")
_CHUNK_DONE_FRAME = struct.Struct("<IIQ")
_HEADER = struct.Struct("<II")

# -- pending FIFOs, built twice from one plan ----------------------------------------------

# plan[tid][part] = entries of that partition's FIFO: ("future", 1), ("tally", n), ("run", n)
Plan = list[list[list[tuple[str, int]]]]


def build(plan: Plan) -> tuple[dict[int, list[deque[Any]]], list[Any]]:
    """The pending dict the producer keeps (topic id -> one FIFO per partition) and every
    future, group and tally in it, in a fixed order for comparison."""
    pending: dict[int, list[deque[Any]]] = {}
    objs: list[Any] = []
    for tid, parts in enumerate(plan):
        tally = DeliveryTally(f"t{tid}")
        runs = sum(n for entries in parts for kind, n in entries if kind == "run")
        group = DeliveryGroup(f"t{tid}", runs, 1000)
        objs += [tally, group]
        fifos = []
        for part, entries in enumerate(parts):
            dq: deque[Any] = deque()
            for kind, n in entries:
                if kind == "future":
                    f = DeliveryFuture(f"t{tid}", part, 1000, on_delivery=lambda f: None)
                    dq.append(f)
                    objs.append(f)
                elif kind == "tally":
                    dq.extend([tally] * n)
                else:
                    dq.append(PendingRun(group, n))
            fifos.append(dq)
        pending[tid] = fifos
    return pending, objs


def records_in(plan: Plan, tid: int, part: int) -> int:
    return sum(n for _, n in plan[tid][part])


def state(o: Any) -> Any:
    def name(e: BaseException | None) -> str | None:
        return None if e is None else type(e).__name__

    if isinstance(o, DeliveryTally):
        return ("tally", o.delivered, o.failed, dict(o.errors))
    if isinstance(o, DeliveryGroup):
        return ("group", o.done(), o.failed, [(p, b, c, t, name(e)) for p, b, c, t, e in o._runs])
    out = o._outcome
    return ("future", o.timestamp, name(out) if isinstance(out, BaseException) else out)


# -- regions --------------------------------------------------------------------------------


def completion_frame(tid: int, err: int, part: int, base: int, ts: int, count: int) -> bytes:
    return _COMPLETION_FRAME.pack(32, FRAME_COMPLETION, tid, err, part, base, ts, count, 0)


def chunk_done_frame(position: int) -> bytes:
    return _CHUNK_DONE_FRAME.pack(8, FRAME_CHUNK_DONE, position)


def padding_frame(size: int) -> bytes:
    return _HEADER.pack(size - 8, FRAME_PADDING) + bytes(size - 8)


@st.composite
def plans(draw: Any) -> Plan:
    topics = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))  # partitions per topic
    entry = st.tuples(st.sampled_from(["future", "tally", "run"]), st.integers(1, 4)).map(
        lambda e: ("future", 1) if e[0] == "future" else e
    )
    return [[draw(st.lists(entry, max_size=5)) for _ in range(n)] for n in topics]


@st.composite
def regions(draw: Any) -> tuple[Plan, list[int], bytes, list[int]]:
    """A plan, its limits, the frames a correct worker could write for it (never naming more
    records than pending) and each frame's offset in the bytes."""
    plan = draw(plans())
    limits = [len(parts) for parts in plan]
    left = {(t, p): records_in(plan, t, p) for t in range(len(plan)) for p in range(limits[t])}
    frames: list[bytes] = []
    position = 0
    for _ in range(draw(st.integers(0, 12))):
        open_ = [k for k, n in left.items() if n]
        if open_ and draw(st.integers(0, 3)):
            t, p = draw(st.sampled_from(open_))
            count = draw(st.integers(1, left[(t, p)]))
            left[(t, p)] -= count
            err = draw(st.sampled_from([0, 0, 0, 6, 10]))
            base = draw(st.sampled_from([-1, 0, 5000, 2**40]))
            ts = draw(st.sampled_from([-1, 1_700_000_000_000]))
            frames.append(completion_frame(t, err, p, base, ts, count))
        else:
            position = draw(st.integers(position // 8, PUBLISHED // 8)) * 8  # a worker's never go back
            frames.append(chunk_done_frame(position))
    offsets = []
    at = 0
    for f in frames:
        offsets.append(at)
        at += len(f)
    return plan, limits, b"".join(frames), offsets


def place(data: bytes, where: Any) -> tuple[SpscRing, int, int]:
    """A completion ring holding ``data`` somewhere in its data area: ending just before a
    padding frame that ends at the wrap, or anywhere else. Returns the ring and the region."""
    ring = make_ring(CAPACITY, RING_COMPLETION)
    ring.view[ring.data_start : ring.data_end] = b"\xa5" * CAPACITY  # whatever was there before
    if where.draw(st.booleans(), label="ends at the wrap"):
        pad = where.draw(st.integers(1, 8), label="padding frame size / 8") * 8
        data += padding_frame(pad)
        start = ring.data_end - len(data)
    else:
        start = ring.data_start + where.draw(st.integers(0, (CAPACITY - len(data)) // 8), label="start / 8") * 8
    ring.view[start : start + len(data)] = data
    return ring, start, start + len(data)


def request_ring() -> SpscRing:
    """A request ring whose writer has published PUBLISHED bytes (what CHUNK_DONE may free)."""
    req = make_ring(CAPACITY)
    assert req.claim(FRAME_RECORD, PUBLISHED - 8) >= 0
    req.publish_head()
    return req


# -- the two readers ------------------------------------------------------------------------


def oracle(ring: SpscRing, start: int, end: int, limits: list[int], pending: dict[int, list[deque[Any]]],
           req: SpscRing) -> tuple[int, int, str | None, type[BaseException] | None]:
    """The Python walk: (last CHUNK_DONE position or -1, records settled, corrupt-frame
    message, class of any other error raised)."""
    last, records = -1, 0
    try:
        for _fend, tid, err, part, base, ts, count in iter_completions(ring, start, end, limits):
            if tid == CHUNK_DONE_TOPIC:
                req.free_to(base)
                last = base
                continue
            settle_fifo(pending[tid][part], part, err, base, ts, count)
            records += count
    except CorruptFrameError as exc:
        return last, records, str(exc), None
    except Exception as exc:  # noqa: BLE001 - compared with the compiled walk's
        return last, records, None, type(exc)
    return last, records, None, None


def compiled(ring: SpscRing, start: int, end: int, limits: list[int], pending: dict[int, list[deque[Any]]],
             req: SpscRing) -> tuple[int, int, str | None, type[BaseException] | None]:
    try:
        free_to, records, bad = read_completions(
            ring.view, ring.data_start, ring.data_end, start, end, limits, pending,
            KafkaError.for_code, PendingRun, DeliveryTally,
        )
    except Exception as exc:  # noqa: BLE001 - compared with the oracle's
        return -2, -2, None, type(exc)
    if free_to >= 0:
        req.free_to(free_to)
    return free_to, records, None if bad is None else f"{ring.name}: {bad}", None


def both(plan: Plan, limits: list[int], ring: SpscRing, start: int, end: int, *, tails: bool) -> tuple[Any, Any]:
    """Run both walks over the region, each on its own copy of the FIFOs and its own request
    ring; the futures, groups and tallies must end the same. ``tails``: the request rings too
    (when the CHUNK_DONE positions are a worker's, increasing)."""
    pending_a, objs_a = build(plan)
    pending_b, objs_b = build(plan)
    req_a, req_b = request_ring(), request_ring()
    a = oracle(ring, start, end, limits, pending_a, req_a)
    b = compiled(ring, start, end, limits, pending_b, req_b)
    assert [state(o) for o in objs_b] == [state(o) for o in objs_a]
    assert [len(dq) for fifos in pending_b.values() for dq in fifos] == [
        len(dq) for fifos in pending_a.values() for dq in fifos
    ]
    if tails:
        assert req_b.tail == req_a.tail
    return a, b


# -- valid regions ----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(regions(), st.data())
def test_valid_regions_settle_as_the_python_walk(region: Any, where: Any) -> None:
    plan, limits, data, _ = region
    ring, start, end = place(data, where)
    a, b = both(plan, limits, ring, start, end, tails=True)
    assert a == b
    assert b[2] is None and b[3] is None


def test_a_region_of_many_completions_crosses_batches() -> None:
    # More completions than the compiled walk copies out at a time (64): one record each.
    plan: Plan = [[[("future", 1)] * 200]]
    data = b"".join(completion_frame(0, 0, 0, i, -1, 1) for i in range(200)) + chunk_done_frame(PUBLISHED)
    ring = make_ring(16384, RING_COMPLETION)
    start = ring.data_start
    ring.view[start : start + len(data)] = data
    pending, objs = build(plan)
    free_to, records, bad = read_completions(
        ring.view, ring.data_start, ring.data_end, start, start + len(data), [1], pending,
        KafkaError.for_code, PendingRun, DeliveryTally,
    )
    assert (free_to, records, bad) == (PUBLISHED, 200, None)
    assert [o._outcome for o in objs if isinstance(o, DeliveryFuture)] == list(range(200))


# -- corrupted regions ------------------------------------------------------------------------

MUTATIONS = ["cut", "type", "length", "topic", "partition", "count0", "padding", "bytes"]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(regions(), st.sampled_from(MUTATIONS), st.data())
def test_corrupt_regions_fail_as_the_python_walk(region: Any, mutation: str, draw: Any) -> None:
    plan, limits, data, offsets = region
    buf = bytearray(data)
    if not offsets:
        buf += b"\x00" * draw.draw(st.integers(1, 7), label="stray bytes")  # a header cut short
    elif mutation == "cut":
        buf = buf[: draw.draw(st.integers(0, len(buf) - 1), label="cut at")]
    elif mutation in ("type", "length", "padding"):
        at = draw.draw(st.sampled_from(offsets), label="frame")
        if mutation == "type":
            value = draw.draw(st.sampled_from([FRAME_RECORD, 4, 7, 0xFFFF_FFFF]), label="type")
            struct.pack_into("<I", buf, at + 4, value)
        elif mutation == "length":
            value = draw.draw(st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)), label="length")
            struct.pack_into("<I", buf, at, value)
        else:
            struct.pack_into("<I", buf, at + 4, FRAME_PADDING)
    elif mutation == "bytes":
        for _ in range(draw.draw(st.integers(1, 4), label="bytes changed")):
            i = draw.draw(st.integers(0, len(buf) - 1), label="at")
            buf[i] = draw.draw(st.integers(0, 255), label="byte")
    else:
        completions = [at for at in offsets if struct.unpack_from("<I", buf, at + 4)[0] == FRAME_COMPLETION]
        if not completions:
            buf = buf[:-1]
        else:
            at = draw.draw(st.sampled_from(completions), label="completion")
            tid = struct.unpack_from("<H", buf, at + 8)[0]
            if mutation == "topic":
                struct.pack_into("<H", buf, at + 8, draw.draw(st.integers(len(limits), 0xFFFF), label="topic id"))
            elif mutation == "partition":
                bad = st.one_of(st.integers(-(2**31), -1), st.integers(limits[tid], 2**31 - 1))
                struct.pack_into("<i", buf, at + 12, draw.draw(bad, label="partition"))
            else:
                struct.pack_into("<I", buf, at + 32, 0)
    ring, start, end = place(bytes(buf), draw)
    a, b = both(plan, limits, ring, start, end, tails=False)  # a changed byte may move a position back
    if a[3] is not None:  # settling raised (a changed count names more records than pending)
        assert b[3] is a[3]
    else:
        assert a == b


@pytest.mark.parametrize(
    ("frame", "limits", "message"),
    [
        (_HEADER.pack(31, FRAME_COMPLETION) + bytes(32), [1], "frame at data offset 40: COMPLETION payload of 31 bytes"),
        (completion_frame(2, 0, 0, 1, -1, 1), [1, 1], "frame at data offset 40: topic id 2 unknown \\(2 topics\\)"),
        (completion_frame(0, 0, 3, 1, -1, 1), [3], "partition 3 of topic id 0 outside \\[0, 3\\)"),
        (completion_frame(0, 0, 0, 1, -1, 0), [1], "frame at data offset 40: COMPLETION with count 0"),
        (_HEADER.pack(16, FRAME_CHUNK_DONE) + bytes(16), [1], "CHUNK_DONE payload of 16 bytes, expected 8"),
        (_HEADER.pack(900, FRAME_COMPLETION), [1], "payload length 900 runs past the committed end"),
        (padding_frame(16), [1], "padding frame does not end at the wrap"),
        (_HEADER.pack(8, 9) + bytes(8), [1], "frame type 9 in a completion ring"),
        (b"\x20\x00\x00", [1], "frame header past the end \\(3 bytes left\\)"),
    ],
    ids=["completion size", "topic id", "partition", "count 0", "chunk-done size", "length", "padding", "type",
         "header cut"],
)
def test_each_corruption_names_itself_after_settling_what_came_before(frame: bytes, limits: list[int],
                                                                       message: str) -> None:
    ring = make_ring(256, RING_COMPLETION)
    data = completion_frame(0, 0, 0, 7, -1, 1) + frame
    start = ring.data_start
    ring.view[start : start + len(data)] = data
    fut = DeliveryFuture("t", 0, 1000)
    pending = {t: [deque([fut] if t == 0 and p == 0 else []) for p in range(n)] for t, n in enumerate(limits)}
    free_to, records, bad = read_completions(
        ring.view, ring.data_start, ring.data_end, start, start + len(data), limits, pending,
        KafkaError.for_code, PendingRun, DeliveryTally,
    )
    assert (free_to, records, fut._outcome) == (-1, 1, 7)
    assert bad is not None and re.search(message, bad), bad


@pytest.mark.parametrize(("start", "end"), [(0, 8), (264, 256), (256, 256 + 264), (256, 256 + 256 + 8)])
def test_a_region_outside_the_data_area_is_refused(start: int, end: int) -> None:
    ring = make_ring(256, RING_COMPLETION)  # data area [256, 512) of a 512-byte buffer
    with pytest.raises(ValueError, match="outside the data area"):
        read_completions(ring.view, ring.data_start, ring.data_end, start, end, [1], {0: [deque()]},
                         KafkaError.for_code, PendingRun, DeliveryTally)
    with pytest.raises(ValueError, match="past the buffer"):
        read_completions(ring.view, ring.data_start, ring.data_end + 8, 256, 256, [1], {0: [deque()]},
                         KafkaError.for_code, PendingRun, DeliveryTally)


# -- the completion thread's use of it -------------------------------------------------------


class _Calls:
    def __init__(self) -> None:
        self.completed = 0
        self.freed = 0
        self.errors: list[Exception] = []

    def reader(self, req: SpscRing, cmp: SpscRing, pending: dict[int, list[deque[Any]]], limits: list[int]) -> Any:
        def completed(n: int) -> None:
            self.completed += n

        def freed() -> None:
            self.freed += 1

        return CompletionReader(
            None, [req], [cmp], pending, limits, -1,  # type: ignore[arg-type] - no segment: the thread is not started
            read_control=lambda: True, on_completed=completed, on_freed=freed,
            on_hangup=lambda: None, on_error=self.errors.append, name="test",
        )


def test_the_completion_thread_reads_a_wrapping_ring() -> None:
    req = make_ring(4096)
    cmp = make_ring(256, RING_COMPLETION)  # 40-byte completions: the ring wraps every few passes
    futs = [DeliveryFuture("t", 1, 1000) for _ in range(300)]
    pending = {0: [deque(), deque(futs)]}
    calls = _Calls()
    reader = calls.reader(req, cmp, pending, [2])
    sent = 0
    for _ in range(100):
        for _ in range(3):
            assert put_completion(cmp, 0, 0, 1, sent, -1, 1)
            sent += 1
        assert req.claim(FRAME_RECORD, 8) >= 0
        req.publish_head()
        pos = cmp.claim(FRAME_CHUNK_DONE, 8)
        struct.pack_into("<Q", cmp.view, pos, req.head)
        cmp.publish_head()
        assert reader.read_ring(0, cmp)
        assert req.tail == req.head
    assert not reader.read_ring(0, cmp)
    assert [f._outcome for f in futs] == list(range(300))
    assert (calls.completed, calls.freed) == (300, 100)


def test_the_completion_thread_counts_what_came_before_a_corrupt_frame() -> None:
    req = make_ring(4096)
    assert req.claim(FRAME_RECORD, 8) >= 0
    req.publish_head()
    cmp = make_ring(256, RING_COMPLETION)
    fut = DeliveryFuture("t", 0, 1000)
    calls = _Calls()
    reader = calls.reader(req, cmp, {0: [deque([fut])]}, [1])
    assert put_completion(cmp, 0, 0, 0, 41, -1, 1)
    pos = cmp.claim(FRAME_CHUNK_DONE, 8)
    struct.pack_into("<Q", cmp.view, pos, 16)
    assert put_completion(cmp, 0, 0, 5, 42, -1, 1)  # partition 5 of a 1-partition topic
    cmp.publish_head()
    with pytest.raises(CorruptFrameError, match=r"^ring: frame at data offset 56: partition 5 of topic id 0"):
        reader.read_ring(0, cmp)
    assert fut._outcome == 41
    assert (calls.completed, calls.freed, req.tail) == (1, 1, 16)
