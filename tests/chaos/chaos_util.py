"""Helpers shared by the chaos tests: sequence-numbered records, a paced sending thread that
measures back-pressure, and the exactly-once check on what an independent reader saw."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest

from shm import Producer
from shm.errors import BufferFullError

__all__ = ["seq_value", "seq_of", "SendLoop", "check_exactly_once"]

_PAD = b"." * 64


def seq_value(seq: int) -> bytes:
    """The value of record ``seq``: its sequence number first, so the reader can count it."""
    return b"%010d|" % seq + _PAD


def seq_of(value: bytes | None) -> int:
    if value is None or len(value) != 11 + len(_PAD) or value[10:11] != b"|" or value[11:] != _PAD:
        raise AssertionError(f"a record that no test client wrote: {value!r}")
    return int(value[:10])


def check_exactly_once(values: Iterable[bytes | None], sent: int) -> None:
    """Every sequence number 0..sent-1 exactly once: no gap, no duplicate, nothing else."""
    counts = Counter(seq_of(v) for v in values)
    dups = {s: c for s, c in counts.items() if c > 1}
    missing = [s for s in range(sent) if s not in counts]
    extra = [s for s in counts if not 0 <= s < sent]
    assert not dups and not missing and not extra, (
        f"of {sent} sent: {len(missing)} missing (first {missing[:10]}), {len(dups)} duplicated "
        f"(first {sorted(dups.items())[:10]}), {len(extra)} never sent (first {extra[:10]})"
    )


@dataclass
class SendLoop:
    """A thread sending sequence-numbered records to ``topic`` at about ``rate`` per second.

    ``send()`` that raises BufferFullError (on_full=block, max_block_ms ran out) is the
    back-pressure an application sees: the loop counts it and sends the same sequence number
    again, so sequence numbers stay dense. With on_full=drop a dropped record's future fails
    at once with BufferFullError; it is remembered in ``dropped``.
    """

    producer: Producer
    topic: str
    rate: float = 2000.0
    keys: int = 16
    sent: int = 0  # sequence numbers handed to send() successfully (0..sent-1)
    full_errors: int = 0  # BufferFullError raised by send()
    longest_send_s: float = 0.0  # the longest single send() call
    blocked_s: float = 0.0  # time spent in send() calls that took over 50 ms
    futures: list[Any] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)
    done_at: dict[int, float] = field(default_factory=dict)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"send-{self.topic}", daemon=True)

    def start(self) -> SendLoop:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"the sending thread of {self.topic} did not stop within {timeout}s")
        if self.error is not None:
            raise AssertionError(f"sending to {self.topic} failed: {self.error!r}") from self.error

    def _on_delivery(self, seq: int) -> Callable[[Any], None]:
        def done(_f: Any) -> None:
            self.done_at[seq] = time.monotonic()

        return done

    def _run(self) -> None:
        p = self.producer
        burst = max(1, int(self.rate / 100))  # bursts every 10 ms
        try:
            next_burst = time.monotonic()
            while not self._stop.is_set():
                for _ in range(burst):
                    seq = self.sent
                    t0 = time.monotonic()
                    try:
                        fut = p.send(self.topic, seq_value(seq), b"k%d" % (seq % self.keys),
                                     on_delivery=self._on_delivery(seq))
                    except BufferFullError:
                        self.full_errors += 1
                        fut = None
                    dt = time.monotonic() - t0
                    if dt > self.longest_send_s:
                        self.longest_send_s = dt
                    if dt > 0.05:
                        self.blocked_s += dt
                    if fut is None:
                        break
                    self.futures.append(fut)
                    self.sent_at.append(t0)
                    self.sent += 1
                next_burst += 0.01
                pause = next_burst - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                else:
                    next_burst = time.monotonic()
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def outcomes(self) -> tuple[int, Counter[str], int]:
        """(succeeded, failures by error name, still pending)."""
        ok = 0
        failed: Counter[str] = Counter()
        pending = 0
        for f in self.futures:
            if not f.done():
                pending += 1
                continue
            exc = f.exception()
            if exc is None:
                ok += 1
            else:
                failed[type(exc).__name__] += 1
        return ok, failed, pending

    def longest_outcome_s(self) -> float:
        """The longest time from send() to the record's outcome, over resolved records."""
        return max((self.done_at[s] - self.sent_at[s] for s in self.done_at if s < len(self.sent_at)), default=0.0)


# --- client programs run in spawned processes (killed by the tests) ---------------------------


def die_mid_frame(socket_path: str, topic: str, n: int, out: Any) -> None:
    """Send ``n`` records (committed), then leave frames claimed but never published: several
    whole ones and a last one written only halfway. Report, then wait to be SIGKILLed."""
    from shm.frames import RECORD_HEADER, encode_record_body, put_record
    from shm.layout import FRAME_RECORD

    p = Producer(socket_path, client_name="doomed-mid-frame")
    futs = [p.send(topic, b"committed-%d" % i, b"k%d" % i) for i in range(n)]
    t = p._topics[topic]
    ts = int(time.time() * 1000)
    for part in range(t.partitions):
        ring = p._req[t.owners[part]]
        for i in range(5):  # whole frames, claimed, never published
            assert put_record(ring, t.id, part, ts, encode_record_body(b"k", b"unpublished-%d" % i, None))
        body = encode_record_body(b"k", b"half-written-" + b"x" * 200, None)
        frame = RECORD_HEADER.pack(t.id, 0, part, ts) + body
        pos = ring.claim(FRAME_RECORD, len(frame))
        ring.view[pos : pos + len(frame) // 2] = frame[: len(frame) // 2]
    out.put(("ready", p.client_id, sum(f.done() for f in futs)))
    time.sleep(120)


def block_until_killed(socket_path: str, topic: str, out: Any) -> None:
    """Send sequence-numbered records until send() blocks on a full ring, reporting how many
    send() accepted every 50; the test SIGKILLs this process while it is blocked."""
    p = Producer(socket_path, client_name="doomed-blocked")
    out.put(("client", p.client_id))
    i = 0
    while True:
        p.send(topic, b"blocked-%d" % i, b"k%d" % (i % 7))
        i += 1
        if i % 50 == 0:
            out.put(("sent", i))


@pytest.fixture(scope="session")
def shared_kafka_bootstrap(suite_kafka_bootstrap: str) -> str:
    """The suite's shared broker; a test module imports it as ``kafka_bootstrap`` to use it
    instead of the chaos directory's own (fault-injectable) broker."""
    return suite_kafka_bootstrap


@pytest.fixture(scope="session")
def shared_kafka_admin(kafka_bootstrap: str) -> Any:
    """An AdminClient on whichever ``kafka_bootstrap`` the importing module resolves."""
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": kafka_bootstrap})
