"""confluent-kafka (librdkafka) as a peer: a ``produce()`` loop, as an application writes it.

Latency: every CHUNK-th record carries a delivery callback that reads librdkafka's own
``msg.latency()`` (produce() call to delivery report); the others carry none, as a
fire-and-forget application's would. Produce requests: librdkafka statistics
(``brokers.*.req.Produce``), from the last statistics report after ``flush()``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from bench.client import CHUNK, ClientResult, ClientSpec, Pacer, make_keys, make_values, report, timed_section, wait_for_start
from bench.scenarios import Delivery, librdkafka_security

__all__ = ["NAME", "settings_for", "run_client"]

NAME = "confluent"
STATS_INTERVAL_MS = 500


def settings_for(delivery: Delivery, bootstrap: str) -> dict[str, Any]:
    """librdkafka properties equivalent to ``delivery``."""
    return {
        "bootstrap.servers": bootstrap,
        "acks": "all" if delivery.acks == -1 else str(delivery.acks),
        "enable.idempotence": delivery.idempotent,
        "linger.ms": delivery.linger_ms,
        "batch.size": delivery.batch_size,
        "compression.type": delivery.compression,
        # Kafka's (Java's, Sluice's) partitioner for keyed records; librdkafka's default is CRC32.
        "partitioner": "murmur2_random",
        # The Java client's default; librdkafka's own is 100,000 messages.
        "queue.buffering.max.kbytes": 32 * 1024,
        "statistics.interval.ms": STATS_INTERVAL_MS,
        # The tls scenario: the same security settings as the Sluice daemon's [kafka] section.
        **librdkafka_security(delivery.security),
    }


def _produce_requests(stats_json: str | None) -> int | None:
    if not stats_json:
        return None
    stats = json.loads(stats_json)
    total = 0
    for broker in stats.get("brokers", {}).values():
        total += int(broker.get("req", {}).get("Produce", 0))
    return total


def _await_producer_id(poll: Any, last_stats: list[str], timeout: float = 20.0) -> None:
    """Idempotent: wait (outside timing) until librdkafka holds its producer id, as the other
    runners do in their start-up (aiokafka's start(), the daemon's InitProducerId)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        poll(0.05)
        if last_stats and json.loads(last_stats[-1]).get("eos", {}).get("idemp_state") == "Assigned":
            return
    raise TimeoutError("librdkafka did not get a producer id")


def run_client(spec: ClientSpec, conn: Any, start: Any, counters: Any) -> None:
    """One producer process (see bench/client.py for the protocol with the harness)."""
    from confluent_kafka import Producer

    values = make_values(spec)
    keys = make_keys(spec)
    last_stats: list[str] = []
    latencies: list[float] = []
    errors: list[str] = []

    def on_stats(text: str) -> None:
        last_stats.append(text)
        del last_stats[:-1]

    def on_sample(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))
        else:
            latencies.append(msg.latency() * 1000.0)

    conf = dict(spec.settings)
    conf["stats_cb"] = on_stats
    producer = Producer(conf)
    produce, poll = producer.produce, producer.poll
    producer.list_topics(spec.topic, timeout=30)  # metadata before timing
    if spec.settings.get("enable.idempotence"):
        _await_producer_id(poll, last_stats)
    topic = spec.topic
    n = spec.records
    pacer = Pacer(counters, spec.index, spec.rate, spec.deadline_s)
    result = ClientResult(index=spec.index, latency_method=f"librdkafka msg.latency() of every {CHUNK}th record")
    wait_for_start(conn, start)

    sent = 0
    with timed_section() as cpu:
        t0 = time.monotonic()
        pacer.start(t0)
        while sent < n:
            end = min(sent + CHUNK, n)
            # One sampled record per chunk, then the rest without a callback.
            while True:
                try:
                    if keys is None:
                        produce(topic, values[sent], on_delivery=on_sample)
                    else:
                        produce(topic, values[sent], keys[sent], on_delivery=on_sample)
                    break
                except BufferError:
                    poll(0.005)
            i = sent + 1
            while i < end:
                try:
                    if keys is None:
                        for i in range(i, end):
                            produce(topic, values[i])
                    else:
                        for i in range(i, end):
                            produce(topic, values[i], keys[i])
                    i = end
                except BufferError:
                    poll(0.005)
            poll(0)
            sent = end
            go, nap = pacer.after(sent)
            if nap:
                time.sleep(nap)
            if not go:
                break
        left = producer.flush(300)
        t1 = time.monotonic()
    counters[spec.index] = sent
    # One more statistics report, so the Produce count covers the whole run.
    seen = len(last_stats) and last_stats[-1]
    deadline = time.monotonic() + 3 * STATS_INTERVAL_MS / 1000
    while time.monotonic() < deadline and (not last_stats or last_stats[-1] is seen):
        poll(0.05)
    result.sent = sent
    result.payload_bytes = sent * spec.value_size + (sent * spec.key_size if keys else 0)
    result.t_start, result.t_end, result.cpu_s = t0, t1, cpu.cpu
    result.latencies_ms = latencies
    result.errors = len(errors) + left
    result.first_error = errors[0] if errors else (f"{left} records not delivered at flush" if left else "")
    result.produce_requests = _produce_requests(last_stats[-1] if last_stats else None)
    result.produce_requests_source = "librdkafka statistics brokers.*.req.Produce"
    report(conn, result)
