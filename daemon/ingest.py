"""Socket ingest: the Produce frames of socket clients (any language, ``sluice send``).

The records go through an ordinary :class:`shm.Producer` that the supervisor holds, connected
to the daemon's own socket, so socket ingest has exactly the semantics of a shared-memory
client: the same partitioner, rings, workers, delivery profiles and completions.

Policies:

- ``on_full = "block"``: a full ring is retried every ``_FULL_RETRY_S`` until the topic's
  ``max_block_ms``, on the event loop (never blocking it). ``"drop"`` answers BUFFER_FULL at
  once and the producer counts the drop (in its segment, as every client does).
- ``Produce(ack=True)``: one ProduceAck per frame, once every record has its outcome, in the
  records' order. Without ack, errors known before the ring (unknown topic) are answered with a
  non-fatal ErrorReply, and the outcomes are only awaited by Flush and Goodbye (``pending``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from shm import control
from shm._client import ack_results, tails
from shm.errors import BufferFullError, KafkaError

__all__ = ["INGEST_CLIENT_NAME", "Reply", "SocketIngest"]

INGEST_CLIENT_NAME = "sluice-socket-ingest"
# How often a Produce retries a full ring under on_full = "block": short next to any
# max_block_ms, long enough that a waiting Produce costs the loop nothing noticeable.
_FULL_RETRY_S = 0.002

Reply = Callable[[Any], Awaitable[None]]  # sends one message to the client that sent the Produce


class SocketIngest:
    """The socket clients' way into the rings: one shared-memory producer, used from the loop."""

    def __init__(self) -> None:
        self._producer: Any = None
        # The socket answers before the producer is attached (it connects to that very socket),
        # so a Produce that arrives in between waits for it.
        self._ready = asyncio.Event()
        # TopicInfo of every topic the producer has looked up: a lookup blocks on the daemon's
        # answer, so it runs in a thread, and only for a topic not seen before.
        self._infos: dict[str, control.TopicInfo] = {}

    async def start(self, socket_path: str) -> None:
        """Connect the producer to the daemon's socket (already accepting)."""
        from shm import Producer  # the client side: only the daemon's ingest needs it

        # The daemon's own producer must never block its loop: a full ring is retried in
        # produce() instead.
        producer = await asyncio.to_thread(
            Producer, socket_path, client_name=INGEST_CLIENT_NAME, reconnect_timeout_s=0.0, never_block=True
        )
        self.attach(producer)

    def attach(self, producer: Any) -> None:
        """Use ``producer`` (a connected :class:`shm.Producer` made with ``never_block=True``)
        from now on; Produce stops waiting."""
        self._producer = producer
        self._ready.set()

    async def flush(self, timeout: float) -> None:
        """Wait (off the loop) up to ``timeout`` seconds for the records sent so far."""
        if self._producer is not None:
            await asyncio.to_thread(self._producer.flush, timeout)

    def close(self, timeout: float) -> None:
        """Close the producer; called once the workers are gone, so nothing is left to lose."""
        if self._producer is None:
            return
        try:
            self._producer.close(timeout=timeout)
        except Exception:  # noqa: BLE001 - the workers are gone; nothing left to lose here
            pass

    async def produce(self, msg: control.Produce, reply: Reply, pending: set[asyncio.Future[Any]]) -> None:
        """Put the records of ``msg`` into the rings; the outcomes go to ``reply`` or ``pending``.

        ``pending`` is the sending client's set of outstanding work: a future is added until
        its records have their outcomes (Flush and Goodbye wait for it).
        """
        if self._producer is None:
            await self._ready.wait()
        producer = self._producer
        # Per record: its future once sent, or (partition, error_code, error_name) if refused.
        results: list[Any] = [None] * len(msg.records)
        futures: list[tuple[int, list[Any]]] = []  # (index of the first record, their futures)
        info = self._infos.get(msg.topic)
        if info is None:
            try:
                info = await asyncio.to_thread(producer.lookup, msg.topic)
            except KafkaError as exc:
                _fail_all(results, exc.code, exc.name)
                if msg.ack:
                    await reply(control.ProduceAck(seq=msg.seq, results=msgspec.Raw(ack_results(results, _describe)[0])))  # type: ignore[arg-type]
                else:
                    await reply(control.ErrorReply(code=exc.code, name=exc.name, message=str(exc), fatal=False))
                return
            self._infos[msg.topic] = info
        records = msg.records
        n = len(records)
        i = 0
        while i < n:
            # The records the compiled path takes, in one call; then the one it stopped at (if
            # any) through send(), which raises what is wrong or finds the ring full.
            i, futs = producer.send_records(msg.topic, records, i)
            if futs:
                futures.append((i - len(futs), futs))
            if i == n:
                break
            rec = records[i]
            deadline = time.monotonic() + info.max_block_ms / 1000.0
            while True:
                try:
                    fut = producer.send(
                        msg.topic, rec.value, rec.key, partition=rec.partition, headers=rec.headers, timestamp=rec.timestamp
                    )
                except BufferFullError as exc:
                    if info.on_full == "block" and time.monotonic() < deadline:
                        await asyncio.sleep(_FULL_RETRY_S)
                        continue
                    results[i] = _result(-1, control.ERR_BUFFER_FULL, str(exc))
                    break
                except KafkaError as exc:
                    results[i] = _result(-1, exc.code, exc.name)
                    break
                futures.append((i, [fut]))
                break
            i += 1
        if not msg.ack:
            if futures:
                waiter = _all_done(asyncio.get_running_loop(), futures)
                pending.add(waiter)
                waiter.add_done_callback(pending.discard)
            return
        waiter = asyncio.ensure_future(self._ack(reply, msg.seq, results, futures))
        pending.add(waiter)
        waiter.add_done_callback(pending.discard)

    @staticmethod
    async def _ack(reply: Reply, seq: int, results: list[Any], futures: list[tuple[int, list[Any]]]) -> None:
        if futures:
            await _all_done(asyncio.get_running_loop(), futures)
        for first, futs in futures:
            results[first : first + len(futs)] = futs
        # Compiled: each settled future (or refusal tuple) straight into the ack's msgpack.
        body = msgspec.Raw(ack_results(results, _describe)[0])
        try:
            await reply(control.ProduceAck(seq=seq, results=body))  # type: ignore[arg-type]
        except OSError:
            pass  # the client went away: nobody is left to tell


def _describe(exc: BaseException) -> tuple[int, str]:
    """A failed record's error code and name in its RecordResult."""
    if isinstance(exc, KafkaError):
        return exc.code, exc.name
    return control.ERR_SHUTTING_DOWN, type(exc).__name__


def _result(partition: int, code: int, name: str) -> tuple[int, int, str]:
    """A record refused before it reached a ring, as :func:`shm._client.ack_results` takes it."""
    return (partition, code, name)


def _fail_all(results: list[Any], code: int, name: str) -> None:
    for i in range(len(results)):
        results[i] = _result(-1, code, name)


def _all_done(loop: asyncio.AbstractEventLoop, runs: list[tuple[int, list[Any]]]) -> asyncio.Future[None]:
    """One asyncio future that completes when every DeliveryFuture in ``runs`` (``(first
    index, futures)`` pairs) has its outcome.

    The records' outcomes arrive on the ingest producer's completion thread; counting them
    down there and waking the loop once per Produce costs far less than awaiting each one
    (an asyncio future and a thread-safe call per record: socket ingest ran at ~150k records/s
    with seconds of p99 latency that way). Only the last future of each partition is watched:
    a partition's futures get their outcomes in the order they were sent (the completion
    thread settles each partition's FIFO in order), so its last one is done last.
    """
    done: asyncio.Future[None] = loop.create_future()
    futs = tails(runs[0][1]) if len(runs) == 1 else tails([f for _first, fs in runs for f in fs])
    if not futs:
        done.set_result(None)
        return done
    left = [len(futs)]
    lock = threading.Lock()

    def one(_f: Any) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            loop.call_soon_threadsafe(_finish, done)

    for f in futs:
        f.add_done_callback(one)
    return done


def _finish(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
