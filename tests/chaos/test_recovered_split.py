"""A worker dies with batches in flight that are too large for their topic (issue 14, item 5:
crash recovery stays intact when batches are split).

The worker has not learnt the topic's ``max.message.bytes`` yet (nothing was refused so far), so
its first batches are larger than the limit. The fault proxy stalls the broker connection while
they are stamped and written, and the worker is SIGKILLed before any answer comes. Its successor
finds them STAMPED in the arena and re-sends them byte for byte; the broker refuses them as too
large, which proves it never wrote them, and they must be split (their parts taking over their
sequence ranges) and delivered, not failed. Every future succeeds and confluent-kafka reads every
record exactly once.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter
from typing import Any

import pytest
from chaos_util import check_exactly_once, seq_value
from helpers import wait_until

from shm import Producer

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

LIMIT = 1024  # the topic's max.message.bytes; SendLoop's records are about 90 bytes
RECORDS = 600
PROFILES = {"default": {"acks": -1, "enable_idempotence": True, "linger_ms": 20, "delivery_timeout_ms": 60_000}}


def _worker(d: Any) -> dict[str, Any]:
    return d.stats()["workers"]["0"]


def test_batches_recovered_after_a_kill_are_split_not_failed(broker, start_sluice, new_topic, read_topic) -> None:
    proxy = broker.proxy
    topic = new_topic(2, config={"max.message.bytes": str(LIMIT)}, prefix="rsplit")
    d = start_sluice(workers=1, profiles=PROFILES, daemon={"shutdown_timeout_ms": 20_000})
    with Producer(d.socket_path, client_name="recovered-split") as p:
        # Connected, with metadata and a producer id, but no refusal seen yet.
        p.send(topic, b"warm-up", partition=0).result(30)
        proxy.stall()
        try:
            futures = [p.send(topic, seq_value(i), b"k%d" % (i % 16)) for i in range(RECORDS)]
            # Stamped and written into the stalled connection.
            wait_until(lambda: _worker(d)["in_flight"] > 0, 20, "Produce requests in flight")
            time.sleep(0.3)
            pid = int(_worker(d)["pid"])
            os.kill(pid, signal.SIGKILL)
            # Restarted (it reports alive only once it reached the broker: after the resume).
            wait_until(lambda: _worker(d).get("restarts", 0) >= 1, 30, "worker 0 restarted", interval=0.05)
        finally:
            proxy.resume()
        wait_until(lambda: _worker(d).get("alive") and int(_worker(d)["pid"]) != pid, 30, "worker 0 alive again")
        assert p.flush(60) == 0
    failed = Counter(type(f.exception(0)).__name__ for f in futures if f.exception(0) is not None)
    # The worker's counters reach the supervisor with its next stats report.
    stats_at = time.monotonic()
    while time.monotonic() - stats_at < 5 and not _worker(d)["recovered_splits"]:
        time.sleep(0.1)
    w = _worker(d)
    recovered = re.findall(r"recovered (\d+) batches from the arena \((\d+) to re-send", d.log())
    print(f"recovered split: {RECORDS} records, recoveries {recovered}, {w['recovered_splits']} recovered "
          f"batches split, {w['splits']} splits in all by the successor")
    assert dict(failed) == {}
    assert recovered and w["recovered_splits"] > 0, "no recovered batch was split: the test tested nothing"
    records = [r for r in read_topic(topic, RECORDS + 1, timeout=60) if r.value != b"warm-up"]
    check_exactly_once((r.value for r in records), RECORDS)
