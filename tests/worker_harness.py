"""A real daemon.worker.Worker without Kafka, for the unit tests of the worker and of what reads
its output (the stats).

A real client segment (shm.Segment.create) and a real Worker with its accumulator; the sender
is not started: a test plays its part by taking sealed batches from the accumulator
(:meth:`Harness.seal`) and calling the worker's completion callback (:meth:`Harness.complete`).

``tests/conftest.py`` puts this directory on ``sys.path``: tests import it as ``worker_harness``.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon import channel as ch
from daemon.config import loads
from daemon.worker import Worker
from shm.frames import CHUNK_DONE_TOPIC, encode_record_body, iter_completions, put_record
from shm.partitioner import owner
from shm.segment import Segment

__all__ = [
    "SEED",
    "TOPIC",
    "PARTITIONS",
    "WORKERS",
    "Harness",
    "adopted",
    "close_worker",
    "new_worker",
    "per_partition",
    "run",
    "worker_config",
]

SEED = 1729
TOPIC = "orders"
PARTITIONS = 6
WORKERS = 2


def worker_config(tmp_path: Path) -> Any:
    return loads(
        f'[daemon]\nsocket_path = "{tmp_path}/s.sock"\nworkers = {WORKERS}\n'
        "[kafka]\nbuffer_memory = 1048576\n",
        source="test",
    )


def new_worker(config: Any, segment: Segment, recover: bool = False) -> tuple[Worker, ch.Channel]:
    """Worker 0 with client 7 (``segment``) attached; ``recover``: as the successor of a dead
    worker 0, over its arena file, client 7 coming back."""
    a, b = ch.Channel.pair()
    w = Worker(0, WORKERS, config, ch.Channel(a, ch.ToWorker), recover=recover, clients=[7] if recover else None)
    w._handle(ch.AddTopic(topic_id=0, name=TOPIC, partitions=PARTITIONS), [])
    w._handle(ch.AddClient(client_id=7, pid=os.getpid(), name="t"), [os.dup(fd) for fd in segment.fds()])
    return w, ch.Channel(b, ch.ToSupervisor)


def adopted(w: Worker) -> list[Any]:
    """The batches queued in the worker's sender (a successor's: the ones it re-sends)."""
    return [e.batch for part in w.sender._queues.parts.values() for e in part.queue]


def per_partition(got: list[tuple[int, int, int, int, int]]) -> dict[int, list[tuple[int, int, int]]]:
    """COMPLETION frames (not CHUNK_DONE) per partition, in order: (err, base, count)."""
    out: dict[int, list[tuple[int, int, int]]] = {}
    for tid, err, part, base, count in got:
        if tid != CHUNK_DONE_TOPIC:
            out.setdefault(part, []).append((err, base, count))
    return out


def close_worker(w: Worker, sup: ch.Channel) -> None:
    for c in list(w.clients.values()):
        if c.bell is not None:
            asyncio.get_running_loop().remove_reader(c.bell.fd)
        c.req.release()
        c.cmp.release()
        c.segment.close()
    w.arena.close()
    w.chan.close()
    sup.close()


class Harness:
    """One worker (index 0), one client segment, the supervisor's end of the channel."""

    def __init__(self, tmp_path: Path, segment: Segment | None = None) -> None:
        self.config = worker_config(tmp_path)
        self.segment = segment or Segment.create(
            WORKERS, self.config.daemon.request_ring_bytes, self.config.daemon.completion_ring_bytes
        )
        self.req = self.segment.request_ring(0)
        self.cmp = self.segment.completion_ring(0)
        self.worker, self.sup = new_worker(self.config, self.segment)
        self.owned = [p for p in range(PARTITIONS) if owner(TOPIC, p, WORKERS) == 0]
        self.sent: dict[int, list[bytes]] = {p: [] for p in self.owned}
        self._successors: list[tuple[Worker, ch.Channel]] = []

    def write(self, n: int, rng: random.Random, *, tid: int = 0) -> None:
        for _ in range(n):
            p = rng.choice(self.owned)
            value = b"v%d" % rng.randrange(10**9)
            if not put_record(self.req, tid, p, 1_700_000_000_000, encode_record_body(b"k", value, None)):
                raise AssertionError("request ring full")
            self.sent[p].append(value)
        self.req.publish_head()

    def seal(self) -> list[Any]:
        self.worker.acc.flush()
        return self.worker.acc.ready(time.monotonic() * 1000.0)

    def complete(self, batch: Any, error: int = 0, base: int = 100) -> None:
        self.worker.completions.on_complete(batch, error, base if not error else -1, -1)
        self.worker.acc.release(batch)

    def completions(self) -> list[tuple[int, int, int, int, int]]:
        """Everything in the completion ring now (consumed): (tid, err, part, base, count)."""
        out = []
        while True:
            start, end = self.cmp.region()
            if start == end:
                return out
            for _fend, tid, err, part, base, _ts, count in iter_completions(self.cmp, start, end, [PARTITIONS]):
                out.append((tid, err, part, base, count))
            self.cmp.consume(end - start)

    def messages(self) -> list[Any]:
        self.worker.chan.flush()
        return [m for m, _ in self.sup.receive()]

    def successor(self) -> Worker:
        """A worker started as after the last one's death (over the same arena file, client 7
        coming back); closed with the harness."""
        w, sup = new_worker(self.config, self.segment, recover=True)
        self._successors.append((w, sup))
        return w

    def close(self) -> None:
        close_worker(self.worker, self.sup)
        for w, sup in self._successors:
            close_worker(w, sup)
        self.segment.close()


def run(body: Callable[[Harness], None], tmp_path: Path) -> None:
    """``body(h)`` on a fresh :class:`Harness` inside a running event loop; closed after."""
    async def main() -> None:
        h = Harness(tmp_path)
        try:
            body(h)
        finally:
            h.close()

    asyncio.run(main())
