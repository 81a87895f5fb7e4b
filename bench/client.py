"""What every Python client process of a case shares: its spec, seeded data, pacing, reporting.

The harness starts each client with :func:`client_entry` in a ``spawn``-ed process. The client
builds its data (seeded, before timing), connects its producer, reports ``ready`` and waits for
the start signal, so every client of a case starts together and no setup is timed. It then
sends in chunks; after each chunk it publishes its count in a shared counter (the progress
display reads it) and sleeps if it is ahead of its rate. At the end it reports a
:class:`ClientResult` as a plain dict through its pipe.

Timing and CPU are measured inside the client, from just before its first send to just after
its last ack (``flush`` returned): ``time.monotonic()`` (system-wide on Linux, so the harness
can compare clients) and ``time.process_time()`` (every thread of the process).
"""

from __future__ import annotations

import gc
import importlib
import os
import random
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "ClientSpec",
    "ClientResult",
    "Pacer",
    "make_values",
    "make_keys",
    "timed_section",
    "client_entry",
    "wait_for_start",
    "report",
    "RUNNER_MODULES",
    "CHUNK",
    "POOL",
]

CHUNK = 64
"""Records between progress updates, pacing checks and latency samples (one sample per chunk)."""
POOL = 4096
"""Distinct values generated per client; records cycle through them (keeps RSS about the producer)."""
KEY_POOL = 65_536
"""Distinct keys for keyed cases."""


@dataclass(frozen=True, slots=True)
class ClientSpec:
    """Everything one client process needs; picklable, built by the harness."""

    runner: str
    label: str
    topic: str
    bootstrap: str
    index: int
    clients: int
    records: int
    value_size: int
    key_size: int
    compressible: bool
    seed: int
    rate: float
    deadline_s: float
    settings: dict[str, Any]
    socket_path: str | None = None
    api: str = "send"


@dataclass(slots=True)
class ClientResult:
    """What one client measured (sent to the harness as a dict)."""

    index: int
    sent: int = 0
    payload_bytes: int = 0
    t_start: float = 0.0
    t_end: float = 0.0
    cpu_s: float = 0.0
    errors: int = 0
    first_error: str = ""
    latencies_ms: list[float] = field(default_factory=list)
    latency_method: str = ""
    # p50, p99, p99.9 in ms when the runner reports percentiles rather than samples (Java).
    reported_percentiles_ms: list[float] | None = None
    produce_requests: int | None = None
    produce_requests_source: str = ""
    notes: list[str] = field(default_factory=list)


_TEXT_WORDS_SEED = 7


def make_values(spec: ClientSpec) -> list[bytes]:
    """``spec.records`` values of ``spec.value_size`` bytes, cycling through a seeded pool.

    Values hold no newline (the socket and Java runners take them one per line). Compressible
    values are words from a small fixed vocabulary; the others are random letters and digits.
    """
    rng = random.Random(spec.seed * 1_000_003 + spec.index)
    size = spec.value_size
    if spec.compressible:
        vocab_rng = random.Random(_TEXT_WORDS_SEED)
        letters = "abcdefghijklmnopqrstuvwxyz"
        vocab = ["".join(vocab_rng.choices(letters, k=vocab_rng.randint(2, 9))) for _ in range(512)]
        pool = []
        for _ in range(min(POOL, spec.records)):
            words: list[str] = []
            n = 0
            while n <= size:
                w = rng.choice(vocab)
                words.append(w)
                n += len(w) + 1
            pool.append(" ".join(words).encode()[:size])
    else:
        alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        pool = [bytes(rng.choices(alphabet, k=size)) for _ in range(min(POOL, spec.records))]
    mask = len(pool)
    return [pool[i % mask] for i in range(spec.records)]


def make_keys(spec: ClientSpec) -> list[bytes] | None:
    """``spec.records`` keys of ``spec.key_size`` bytes from a seeded pool, or None (no key)."""
    if not spec.key_size:
        return None
    rng = random.Random(spec.seed * 7_919 + spec.index)
    pool = [rng.randbytes(spec.key_size) for _ in range(min(KEY_POOL, spec.records))]
    n = len(pool)
    return [pool[i % n] for i in range(spec.records)]


class Pacer:
    """Per-chunk bookkeeping: the shared progress counter, the rate limit and the deadline.

    Called once per CHUNK records, never per record.
    """

    __slots__ = ("_counters", "_index", "_rate", "_t0", "_deadline")

    def __init__(self, counters: Any, index: int, rate: float, deadline_s: float) -> None:
        self._counters = counters
        self._index = index
        self._rate = rate
        self._t0 = 0.0
        self._deadline = deadline_s

    def start(self, t0: float) -> None:
        """Mark the first send."""
        self._t0 = t0
        if self._deadline:
            self._deadline = t0 + self._deadline

    def after(self, sent: int) -> tuple[bool, float]:
        """Publish ``sent``; return (go on, seconds to sleep first to keep to the rate)."""
        self._counters[self._index] = sent
        now = time.monotonic()
        if self._deadline and now >= self._deadline:
            return False, 0.0
        if self._rate:
            ahead = self._t0 + sent / self._rate - now
            if ahead > 0:
                return True, ahead
        return True, 0.0


class timed_section:
    """Context manager: GC collected, frozen and disabled inside; CPU and wall time recorded."""

    def __enter__(self) -> timed_section:
        gc.collect()
        gc.freeze()
        gc.disable()
        self.cpu0 = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu = time.process_time() - self.cpu0
        gc.enable()
        gc.unfreeze()


def client_entry(spec: ClientSpec, conn: Any, start: Any, counters: Any) -> None:
    """The spawned process's target: run ``spec.runner``'s client and report through ``conn``.

    Messages sent: ``("ready", pid)``, then ``("result", dict)`` or ``("error", text)``.
    """
    try:
        module = importlib.import_module(RUNNER_MODULES[spec.runner])
        module.run_client(spec, conn, start, counters)
    except BaseException:  # noqa: BLE001 - everything goes back to the harness as text
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
    finally:
        conn.close()


def wait_for_start(conn: Any, start: Any, timeout: float = 300.0) -> None:
    """Report ready and block until the harness releases every client of the case."""
    conn.send(("ready", os.getpid()))
    if not start.wait(timeout):
        raise TimeoutError("the harness never gave the start signal")


def report(conn: Any, result: ClientResult) -> None:
    """Send the result to the harness."""
    conn.send(("result", asdict(result)))


RUNNER_MODULES = {
    "confluent": "bench.peers.confluent",
    "aiokafka": "bench.peers.aiokafka_peer",
    "sluice-shm": "bench.sluice_shm",
    "sluice-socket": "bench.sluice_socket",
    "sluice-go": "bench.sluice_go",  # runs the Go client's command in its process
}
"""Python client runners by name (the Java peer runs its own processes: bench/peers/java.py)."""
