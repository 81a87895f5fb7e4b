"""Network faults between the daemon and the broker, injected by tests/chaos/proxy.py while a
client sends at a steady pace to an idempotent (acks=all) topic: added latency, a stall longer
than request_timeout_ms (the daemon gives up on the connection; its old requests still reach
the broker late, after the retries), connections reset halfway through a request, connections
reset after the broker took a request but before its answer came back, and every connection
reset at once.

Promised, and checked with sequence numbers in the values read back by confluent-kafka:
nothing lost, nothing duplicated, nothing hangs (every future resolves, successfully, within
delivery_timeout_ms), and each record's RecordMetadata offset is where the reader found it.
"""

from __future__ import annotations

import time

import pytest
from chaos_util import SendLoop, check_exactly_once, seq_of
from helpers import wait_until

from shm import Producer

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.slow]

REQUEST_TIMEOUT_MS = 3000
DELIVERY_TIMEOUT_MS = 60_000

PAYMENTS = {
    "request_timeout_ms": REQUEST_TIMEOUT_MS,
    "delivery_timeout_ms": DELIVERY_TIMEOUT_MS,
    "retry_backoff_ms": 50,
    "retry_backoff_max_ms": 500,
}


def test_latency_stalls_and_resets_lose_and_duplicate_nothing(broker, start_sluice, topic, read_topic) -> None:
    proxy = broker.proxy
    name = topic("net", partitions=4)
    d = start_sluice(
        workers=2,
        kafka={"reconnect_backoff_ms": 20, "reconnect_backoff_max_ms": 200},
        profiles={"payments": PAYMENTS},
        topics={"net-*": "payments"},
    )
    resets0 = proxy.resets
    log: list[str] = []
    with Producer(d.socket_path, client_name="chaos-net") as p:
        info = p.lookup(name)
        assert (info.profile, info.on_full) == ("payments", "block")
        loop = SendLoop(p, name, rate=1500).start()
        try:
            wait_until(lambda: len(loop.done_at) > 300, 20, "records flowing")

            proxy.set_latency(200)
            time.sleep(3)
            proxy.set_latency(0)
            log.append(f"latency 200 ms for 3 s: {len(loop.done_at)} done")

            t0 = time.monotonic()
            proxy.stall()
            time.sleep(REQUEST_TIMEOUT_MS / 1000 + 2)  # past the request timeout
            proxy.resume()
            log.append(f"stalled {time.monotonic() - t0:.1f}s")

            for _ in range(5):
                proxy.reset_mid_request(1)
                time.sleep(0.6)
            for _ in range(5):
                proxy.reset_after_request(1)
                time.sleep(0.6)
            for _ in range(3):
                log.append(f"reset_all: {proxy.reset_all()} connections")
                time.sleep(0.5)
            mid_after_pending = proxy._mid_request + proxy._after_request
            broker.clear_faults()
            time.sleep(1.5)
        finally:
            loop.stop()
        t_flush = time.monotonic()
        left = p.flush(DELIVERY_TIMEOUT_MS / 1000)
        flush_s = time.monotonic() - t_flush
        assert left == 0, f"{left} records without an outcome after delivery_timeout_ms"
        stats = d.stats()["totals"]

    ok, failed, pending = loop.outcomes()
    assert (ok, dict(failed), pending) == (loop.sent, {}, 0)
    assert loop.longest_outcome_s() < DELIVERY_TIMEOUT_MS / 1000
    # The faults really happened: connections were reset and the daemon retried.
    assert proxy.resets - resets0 >= 5 and mid_after_pending < 10
    assert stats["retries"] > 0

    records = read_topic(name, loop.sent, timeout=60)
    check_exactly_once((r.value for r in records), loop.sent)
    where = {seq_of(r.value): (r.partition, r.offset) for r in records}
    wrong = [
        s for s, f in enumerate(loop.futures) if (f.result().partition, f.result().offset) != where[s]
    ]
    assert not wrong, f"{len(wrong)} RecordMetadata differ from where the reader found them (first {wrong[:5]})"
    print(
        f"network faults: {loop.sent} records, {proxy.resets - resets0} connections reset, "
        f"{stats['retries']} retries, longest send->outcome {loop.longest_outcome_s():.1f}s, "
        f"final flush {flush_s:.1f}s; " + "; ".join(log)
    )
