"""Sluice over shared memory: ``shm.Producer.send()`` per record (or ``send_many`` in bulk).

Written against the client API of the daemon issue::

    with shm.Producer(socket_path=...) as p:
        fut = p.send(topic, value, key, on_delivery=cb)   # fut.result(timeout) -> RecordMetadata
        p.send_many(topic, values, keys)                  # bulk
        p.flush(timeout)

Latency: every CHUNK-th record carries ``on_delivery``; the callback stamps the monotonic clock
(send() call to callback). The client calls ``poll(0)`` once per chunk when the Producer has
one, so callbacks that run from ``poll`` are not delayed to the final flush. With
``--sluice-api many`` records go in ``send_many`` chunks and latency is not sampled.
CPU here is the client process; the harness adds the daemon's (all its workers).
"""

from __future__ import annotations

import time
from typing import Any

from bench.client import CHUNK, ClientResult, ClientSpec, Pacer, make_keys, make_values, report, timed_section, wait_for_start
from bench.scenarios import Delivery

__all__ = ["NAME", "settings_for", "run_client", "BULK_CHUNK"]

NAME = "sluice-shm"
BULK_CHUNK = 1024
"""Records per ``send_many`` call in bulk mode."""


def settings_for(delivery: Delivery, bootstrap: str) -> dict[str, Any]:
    """The daemon profile keys for ``delivery`` (written into the case's config)."""
    return {
        "acks": "all" if delivery.acks == -1 else delivery.acks,
        "enable_idempotence": delivery.idempotent,
        "linger_ms": delivery.linger_ms,
        "batch_size": delivery.batch_size,
        "compression_type": delivery.compression,
        "bootstrap_servers": bootstrap,
        **dict(delivery.security),  # the tls scenario's [kafka] security keys
    }


class _Sample:
    """One sampled record's send time; called back (with whatever arguments) on delivery."""

    __slots__ = ("t0", "t1", "err")

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.t1 = 0.0
        self.err: str = ""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.t1 = time.monotonic()
        for a in (*args, *kwargs.values()):
            if isinstance(a, BaseException):
                self.err = repr(a)


def run_client(spec: ClientSpec, conn: Any, start: Any, counters: Any) -> None:
    """One application process (see bench/client.py for the protocol with the harness)."""
    import shm.producer

    values = make_values(spec)
    keys = make_keys(spec)
    topic = spec.topic
    n = spec.records
    pacer = Pacer(counters, spec.index, spec.rate, spec.deadline_s)
    bulk = spec.api == "many"
    result = ClientResult(
        index=spec.index,
        latency_method="n/a with send_many" if bulk else f"send() to on_delivery, every {CHUNK}th record",
    )
    samples: list[tuple[_Sample, Any]] = []
    with shm.producer.Producer(socket_path=spec.socket_path) as producer:
        send = producer.send
        # --sluice-api produce: fire and forget, except the sampled record of each chunk.
        rest = producer.produce if spec.api == "produce" else send
        poll = getattr(producer, "poll", None)
        # Metadata before timing, where the API offers a way.
        warm = getattr(producer, "partitions_for", None)
        if warm is not None:
            warm(topic)
        wait_for_start(conn, start)
        sent = 0
        monotonic = time.monotonic
        with timed_section() as cpu:
            t0 = monotonic()
            pacer.start(t0)
            if bulk:
                send_many = producer.send_many
                while sent < n:
                    end = min(sent + BULK_CHUNK, n)
                    send_many(topic, values[sent:end], keys[sent:end] if keys is not None else None)
                    sent = end
                    go, nap = pacer.after(sent)
                    if nap:
                        time.sleep(nap)
                    if not go:
                        break
            else:
                while sent < n:
                    end = min(sent + CHUNK, n)
                    s = _Sample(monotonic())
                    if keys is None:
                        samples.append((s, send(topic, values[sent], on_delivery=s)))
                        for i in range(sent + 1, end):
                            rest(topic, values[i])
                    else:
                        samples.append((s, send(topic, values[sent], keys[sent], on_delivery=s)))
                        for i in range(sent + 1, end):
                            rest(topic, values[i], keys[i])
                    if poll is not None:
                        poll(0)
                    sent = end
                    go, nap = pacer.after(sent)
                    if nap:
                        time.sleep(nap)
                    if not go:
                        break
            left = producer.flush(300)
            t1 = monotonic()
    counters[spec.index] = sent
    errors: list[str] = []
    for s, fut in samples:
        if s.err:
            errors.append(s.err)
            continue
        try:
            fut.result(0)
        except Exception as e:  # noqa: BLE001 - any failure of a sampled record is reported
            errors.append(repr(e))
    for topic_errors in getattr(producer, "delivery_errors", {}).values():
        errors += [f"produce(): {n} x {name}" for name, n in topic_errors.items()]
    if left is False or (type(left) is int and left > 0):
        # flush() reports what it could not complete (False, or a count of pending records).
        errors.append(f"flush left {left!r}")
    result.sent = sent
    result.payload_bytes = sent * spec.value_size + (sent * spec.key_size if keys else 0)
    result.t_start, result.t_end, result.cpu_s = t0, t1, cpu.cpu
    result.latencies_ms = [(s.t1 - s.t0) * 1000.0 for s, _ in samples if s.t1]
    result.errors = len(errors)
    result.first_error = errors[0] if errors else ""
    report(conn, result)
