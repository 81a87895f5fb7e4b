"""Worker kills while batches are being split (issue 14: crash recovery stays intact).

Records stream (idempotent, acks=all) into a topic whose ``max.message.bytes`` is 1024 while
the profile lingers 50 ms, so most batches are refused as too large and cut in halves, some
twice. Workers are SIGKILLed at random moments meanwhile: one that dies between a split and the
stamping of the halves leaves them SEALED (discarded; their records are read from the rings
again), one that dies later leaves stamped halves, each with exact runs, that its successor
re-sends byte for byte. Every future must resolve, and confluent-kafka must read every record
whose future succeeded exactly once and no other.

A batch the dead worker stamped before it learnt the topic's limit is refused again after the
restart; its successor splits it too (tests/chaos/test_recovered_split.py makes that case
deterministic). So no record may fail. Single-broker behaviour; it runs on the cluster because
its topics are replicated (acks=all waits for two replicas, so more batches are in flight at a
kill).
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
from chaos_util import SendLoop, seq_of
from helpers import wait_until

from shm import Producer

pytestmark = [pytest.mark.cluster, pytest.mark.chaos, pytest.mark.integration, pytest.mark.slow]

KILLS = int(os.environ.get("SLUICE_CHAOS_KILLS", "8"))
WORKERS = 2
LIMIT = 1024  # SendLoop's records are about 90 bytes
SEED = int(os.environ.get("SLUICE_CHAOS_SEED", "14"))


def test_worker_kills_while_batches_are_split_lose_and_duplicate_nothing(cluster_topic, start_sluice,
                                                                         read_topic) -> None:
    rng = random.Random(SEED)
    print(f"kill seed {SEED}")
    topic = cluster_topic("split", 4, {"max.message.bytes": str(LIMIT)})
    d = start_sluice(workers=WORKERS, profiles={"default": {"linger_ms": 50, "delivery_timeout_ms": 120_000}},
                     daemon={"shutdown_timeout_ms": 20_000})
    splits = recovered_splits = 0

    def worker(i: int) -> dict:
        return d.stats()["workers"][str(i)]

    with Producer(d.socket_path, client_name="split-kill") as p:
        loop = SendLoop(p, topic, rate=4000, keys=64).start()
        try:
            wait_until(lambda: len(loop.done_at) > 500, 20, "records flowing")
            for k in range(KILLS):
                victim = k % WORKERS
                time.sleep(rng.uniform(0.1, 0.6))
                w = worker(victim)
                splits += w["splits"]  # what this worker split before it dies
                recovered_splits += w["recovered_splits"]
                pid = int(w["pid"])
                os.kill(pid, signal.SIGKILL)
                wait_until(lambda v=victim, old=pid: worker(v).get("alive") and int(worker(v)["pid"]) != old,
                           30, f"worker {victim} restarted after kill {k + 1}", interval=0.05)
        finally:
            loop.stop()
        assert p.flush(90) == 0
    _ok, failed, pending = loop.outcomes()
    assert (pending, dict(failed)) == (0, {})
    delivered = [seq for seq, f in enumerate(loop.futures) if f.exception() is None]
    records = read_topic(topic, len(delivered), timeout=60)
    seen = [seq_of(r.value) for r in records]
    assert sorted(seen) == delivered, (
        f"{len(set(delivered) - set(seen))} acknowledged records missing, {len(seen) - len(set(seen))} duplicated, "
        f"{len(set(seen) - set(delivered))} failed records in Kafka")
    recovered_splits += sum(worker(i)["recovered_splits"] for i in range(WORKERS))
    print(f"split-kill: {loop.sent} records, {KILLS} kills, {splits} splits before the kills, {recovered_splits} "
          f"recovered batches split (stats as last reported); every record delivered once")
    assert splits > KILLS, "hardly any batch was split: the test did not test splitting"
