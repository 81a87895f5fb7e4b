"""aiokafka as a peer: ``await producer.send()`` per record (its ordinary API), one event loop.

``send()`` returns a future per record; the loop keeps only every CHUNK-th (the latency sample,
send() call to the future's completion). aiokafka exposes no request counters: Produce requests
are reported as n/a. (Named ``aiokafka_peer`` so it never shadows the ``aiokafka`` package.)
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.client import CHUNK, ClientResult, ClientSpec, Pacer, make_keys, make_values, report, timed_section, wait_for_start
from bench.scenarios import Delivery

__all__ = ["NAME", "settings_for", "run_client"]

NAME = "aiokafka"


def settings_for(delivery: Delivery, bootstrap: str) -> dict[str, Any]:
    """AIOKafkaProducer keyword arguments equivalent to ``delivery``."""
    return {
        "bootstrap_servers": bootstrap,
        "acks": "all" if delivery.acks == -1 else delivery.acks,
        "enable_idempotence": delivery.idempotent,
        "linger_ms": delivery.linger_ms,
        "max_batch_size": delivery.batch_size,
        "compression_type": None if delivery.compression == "none" else delivery.compression,
    }


async def _run(spec: ClientSpec, conn: Any, start: Any, counters: Any) -> ClientResult:
    from aiokafka import AIOKafkaProducer

    values = make_values(spec)
    keys = make_keys(spec)
    producer = AIOKafkaProducer(**spec.settings)
    await producer.start()
    result = ClientResult(index=spec.index, latency_method=f"send() to future done, every {CHUNK}th record")
    try:
        await producer.partitions_for(spec.topic)  # metadata before timing
        send = producer.send
        topic = spec.topic
        n = spec.records
        pacer = Pacer(counters, spec.index, spec.rate, spec.deadline_s)
        samples: list[tuple[float, asyncio.Future[Any]]] = []
        done_at: dict[int, float] = {}
        monotonic = time.monotonic

        def on_done(fut: asyncio.Future[Any]) -> None:
            done_at[id(fut)] = monotonic()

        # The start barrier blocks the loop; nothing is in flight yet, so nothing waits on it.
        wait_for_start(conn, start)
        sent = 0
        with timed_section() as cpu:
            t0 = monotonic()
            pacer.start(t0)
            while sent < n:
                end = min(sent + CHUNK, n)
                ts = monotonic()
                fut = await (send(topic, values[sent]) if keys is None else send(topic, values[sent], keys[sent]))
                fut.add_done_callback(on_done)
                samples.append((ts, fut))
                if keys is None:
                    for i in range(sent + 1, end):
                        await send(topic, values[i])
                else:
                    for i in range(sent + 1, end):
                        await send(topic, values[i], keys[i])
                sent = end
                go, nap = pacer.after(sent)
                if nap:
                    await asyncio.sleep(nap)
                if not go:
                    break
            await producer.flush()
            t1 = monotonic()
        counters[spec.index] = sent
        errors = [f.exception() for _, f in samples if f.done() and f.exception() is not None]
        result.sent = sent
        result.payload_bytes = sent * spec.value_size + (sent * spec.key_size if keys else 0)
        result.t_start, result.t_end, result.cpu_s = t0, t1, cpu.cpu
        result.latencies_ms = [(done_at[id(f)] - ts) * 1000.0 for ts, f in samples if id(f) in done_at]
        result.errors = len(errors)
        result.first_error = repr(errors[0]) if errors else ""
        result.produce_requests_source = "n/a: aiokafka exposes no request counters"
    finally:
        await producer.stop()
    return result


def run_client(spec: ClientSpec, conn: Any, start: Any, counters: Any) -> None:
    """One producer process (see bench/client.py for the protocol with the harness)."""
    report(conn, asyncio.run(_run(spec, conn, start, counters)))
