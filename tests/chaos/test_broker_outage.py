"""Broker outage: the chaos broker is stopped for OUTAGE_S while clients keep sending, then
started again with its data.

- payments (acks=all, idempotent, on_full=block): the client sees back-pressure only (send()
  blocks, then BufferFullError after max_block_ms), never a delivery error, as long as
  delivery_timeout_ms (120 s) is not exceeded; after the restart every record held back
  arrives exactly once (sequence numbers in the values, counted by confluent-kafka).
- clicks (acks=1, on_full=drop): send() never blocks; records that find no room are dropped
  and counted in Producer.drops; every record whose future succeeded is in Kafka and no
  dropped one is.
"""

from __future__ import annotations

import os
import time
from collections import Counter

import pytest
from chaos_util import SendLoop, check_exactly_once, seq_of
from helpers import wait_until

from shm import Producer

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.slow]

OUTAGE_S = float(os.environ.get("SLUICE_CHAOS_OUTAGE_S", "30"))
MAX_BLOCK_MS = 2000
DELIVERY_TIMEOUT_MS = 120_000

PROFILES = {
    "default": {"max_request_size": 60000},
    "payments": {"max_request_size": 60000, "max_block_ms": MAX_BLOCK_MS, "delivery_timeout_ms": DELIVERY_TIMEOUT_MS},
    "clicks": {"max_request_size": 60000, "linger_ms": 5, "delivery_timeout_ms": DELIVERY_TIMEOUT_MS},
}
TOPICS = {"pay-*": "payments", "click-*": "clicks"}


def test_broker_outage_back_pressure_then_exactly_once(broker, start_sluice, topic, read_topic) -> None:
    pay = topic("pay", partitions=3)
    click = topic("click", partitions=3)
    # One worker and the smallest request ring (64 KiB, a few hundred records), so the outage
    # fills the ring within a fraction of a second and back-pressure reaches send().
    d = start_sluice(
        workers=1,
        daemon={"request_ring_bytes": 65536, "completion_ring_bytes": 16384},
        kafka={"reconnect_backoff_max_ms": 500},
        profiles=PROFILES,
        topics=TOPICS,
    )
    with Producer(d.socket_path, client_name="chaos-payments") as pp, Producer(
        d.socket_path, client_name="chaos-clicks"
    ) as cp:
        assert pp.lookup(pay).profile == "payments" and pp.lookup(pay).on_full == "block"
        assert cp.lookup(click).profile == "clicks" and cp.lookup(click).on_full == "drop"
        payments = SendLoop(pp, pay, rate=2000).start()
        clicks = SendLoop(cp, click, rate=2000).start()
        try:
            wait_until(lambda: len(payments.done_at) > 500 and len(clicks.done_at) > 500, 20, "records flowing")
            assert payments.full_errors == 0
            drops_before = cp.drops.get(click, 0)  # a slow first InitProducerId may fill the ring

            t_down = time.monotonic()
            broker.stop()
            # While the broker is away: the payments client is held back, nothing fails.
            wait_until(lambda: payments.full_errors >= 2, OUTAGE_S, "BufferFullError from a blocked send()")
            sent_during = payments.sent
            remaining = OUTAGE_S - (time.monotonic() - t_down)
            if remaining > 0:
                time.sleep(remaining)
            ok, failed, pending = payments.outcomes()
            assert not failed, f"payments records failed during the outage: {failed}"
            assert pending > 0
            # Held back: hardly anything was accepted since the ring filled.
            assert payments.sent - sent_during < 2000
            broker.start()
            outage_s = time.monotonic() - t_down
            t_up = time.monotonic()
            # After the restart the backlog (everything sent before it) completes and sending
            # goes on at full pace.
            backlog = payments.sent
            wait_until(lambda: all(f.done() for f in payments.futures[:backlog]), 60, "the backlog completed")
            drained_s = time.monotonic() - t_up
            wait_until(lambda: payments.sent > backlog + 2000, 30, "sending resumed")
        finally:
            payments.stop()
            clicks.stop()
        assert pp.flush(60) == 0 and cp.flush(60) == 0

    # payments: back-pressure, never a delivery error, every record exactly once.
    ok, failed, pending = payments.outcomes()
    assert (ok, dict(failed), pending) == (payments.sent, {}, 0)
    assert payments.full_errors >= 2
    # A blocked send() waited max_block_ms before raising (the block really happened).
    assert payments.longest_send_s >= MAX_BLOCK_MS / 1000 * 0.9
    assert payments.longest_outcome_s() < DELIVERY_TIMEOUT_MS / 1000
    records = read_topic(pay, payments.sent, timeout=60)
    check_exactly_once((r.value for r in records), payments.sent)

    # clicks: dropped and counted, never blocked, the rest delivered.
    ok, failed, pending = clicks.outcomes()
    drops = cp.drops.get(click, 0)
    assert drops > drops_before and pending == 0
    assert dict(failed) == {"BufferFullError": drops}
    assert ok + drops == clicks.sent
    assert clicks.full_errors == 0
    assert clicks.longest_send_s < MAX_BLOCK_MS / 1000 / 4, clicks.longest_send_s
    delivered_ok = {i for i, f in enumerate(clicks.futures) if f.exception() is None}
    seen = Counter(seq_of(r.value) for r in read_topic(click, len(delivered_ok), timeout=60))
    assert delivered_ok <= set(seen), f"{len(delivered_ok - set(seen))} acknowledged clicks missing"
    assert set(seen) <= delivered_ok, f"{len(set(seen) - delivered_ok)} dropped or failed clicks in Kafka"

    print(
        f"outage {outage_s:.1f}s (broker stop to answering again), backlog drained {drained_s:.1f}s after; "
        f"payments: {payments.sent} sent, {payments.full_errors} BufferFullError, blocked {payments.blocked_s:.1f}s, "
        f"longest send() {payments.longest_send_s:.2f}s, longest send->outcome {payments.longest_outcome_s():.1f}s; "
        f"clicks: {clicks.sent} sent, {drops} dropped ({drops - drops_before} in the outage), longest send() {clicks.longest_send_s * 1000:.1f}ms, "
        f"duplicates {sum(c - 1 for c in seen.values())}"
    )
