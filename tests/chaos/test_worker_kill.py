"""Worker crash recovery (issue 8.1): SIGKILL a worker 20 times at random moments while a client
streams sequence-numbered records with an idempotent acks=all profile; every future succeeds
and an independent reader (confluent-kafka) sees every sequence number exactly once.

A restarted worker re-sends its predecessor's stamped batches from the arena byte for byte
(same producer id, epoch, sequences) and skips their records when it reads the rings again
(docs/ARCHITECTURE.md, "Worker crashes"). Without that, records of batches the dead worker had
sent are written twice.

This test runs against the suite's shared broker (nothing here needs the chaos
broker's fault proxy); it never stops it.
"""

from __future__ import annotations

import mmap
import os
import random
import re
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from chaos_util import SendLoop, check_exactly_once, seq_of
from helpers import wait_until
# The kill tests need no faults: they use the suite's shared broker, not the directory's own.
from chaos_util import shared_kafka_admin as kafka_admin  # noqa: F401
from chaos_util import shared_kafka_bootstrap as kafka_bootstrap  # noqa: F401

from daemon.arena import HEADER, SLOT_SIZE, STATE_DONE, STATE_STAMPED
from shm import Producer

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.slow]

KILLS = int(os.environ.get("SLUICE_CHAOS_KILLS", "20"))
WORKERS = 4  # kills are spread so no worker's restart backoff (0.1 s doubling) grows past ~1.6 s
RATE = 5000.0  # records per second
# Against a local broker a worker has a batch in flight only a small part of the time, so
# purely random kills rarely hit one. Half the kills wait (briefly) for the victim's arena to
# show a batch in flight or answered-but-unreported, then kill at once.
AIMED = 0.5
# Lingering batches take records from several ring drains (chunks), so runs of one batch span
# chunks that are reported at different times.
LINGER_MS = int(os.environ.get("SLUICE_CHAOS_LINGER_MS", "15"))

PROFILES = {"default": {"acks": -1, "enable_idempotence": True, "linger_ms": LINGER_MS, "delivery_timeout_ms": 120000}}


@pytest.fixture
def killer_rng() -> Iterator[random.Random]:
    seed = int(os.environ.get("SLUICE_CHAOS_SEED", "81"))
    print(f"kill seed {seed}")
    yield random.Random(seed)


def _workers(d: Any) -> dict[int, dict[str, Any]]:
    return {int(k): v for k, v in d.stats()["workers"].items()}


def _wait_for_live_batch(path: str, timeout: float) -> bool:
    """Poll a worker's arena file until a slot is STAMPED or DONE; False after ``timeout``."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        fields = HEADER.unpack_from(mm, 0)
        n_chunks, slots_offset = fields[3], fields[6]
        # Each slot's state word (the slot table's first field), read in place.
        words = memoryview(mm)[slots_offset : slots_offset + n_chunks * SLOT_SIZE].cast("I")
        states = words[:: SLOT_SIZE // 4]
        live = {STATE_STAMPED, STATE_DONE}
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not live.isdisjoint(states.tolist()):
                    return True
                time.sleep(0.0005)
            return False
        finally:
            states.release()
            words.release()


def test_worker_sigkill_20_times_loses_and_duplicates_nothing(start_sluice, topic, read_topic, killer_rng) -> None:
    rng = killer_rng
    name = topic("kill", partitions=8)
    d = start_sluice(workers=WORKERS, profiles=PROFILES, daemon={"shutdown_timeout_ms": 20_000})
    t0 = time.monotonic()
    restarts: dict[int, int] = {i: 0 for i in range(WORKERS)}
    aimed = 0
    with Producer(d.socket_path, client_name="kill-test") as p:
        loop = SendLoop(p, name, rate=RATE, keys=64).start()
        try:
            wait_until(lambda: loop.sent > 500, 15, "the first records sent")
            for k in range(KILLS):
                # The least restarted worker (ties at random): restart backoffs stay short.
                low = min(restarts.values())
                victim = rng.choice([i for i, r in restarts.items() if r == low])
                time.sleep(rng.uniform(0.05, 0.5))  # a random moment of the stream
                pid = int(_workers(d)[victim]["pid"])
                if rng.random() < AIMED:
                    aimed += _wait_for_live_batch(os.path.join(d.workdir, f"arena-{victim}"), 2.0)
                os.kill(pid, signal.SIGKILL)
                restarts[victim] += 1

                def restarted(v: int = victim, old: int = pid) -> bool:
                    w = _workers(d).get(v, {})
                    return bool(w.get("alive")) and int(w.get("pid", old)) != old and w.get("restarts", 0) >= restarts[v]

                wait_until(restarted, 30, f"worker {victim} restarted after kill {k + 1}", interval=0.05)
                assert loop.error is None, loop.error
        finally:
            loop.stop()
        sent = loop.sent
        assert p.flush(90) == 0, "records still pending 90 s after the last kill"
        ok, failed, pending = loop.outcomes()
    log = d.log()
    recovered = [tuple(int(x) for x in m) for m in re.findall(
        r"recovered (\d+) batches from the arena \((\d+) to re-send, (\d+) records\)", log)]
    records = read_topic(name, sent, timeout=60)
    seqs = [seq_of(r.value) for r in records]
    lost = len(set(range(sent)) - set(seqs))
    duplicated = len(seqs) - len(set(seqs))
    print(
        f"worker kill test: {sent} records, {KILLS} kills ({aimed} at a batch in flight or unreported), "
        f"{len(recovered)} recoveries "
        f"({sum(r[0] for r in recovered)} batches kept, {sum(r[1] for r in recovered)} re-sent with "
        f"{sum(r[2] for r in recovered)} records), lost {lost}, duplicated {duplicated}, "
        f"{time.monotonic() - t0:.1f} s"
    )
    assert (ok, dict(failed), pending) == (sent, {}, 0)
    check_exactly_once((r.value for r in records), sent)
    stats = d.stats()
    assert stats["restarts"] == KILLS
    # The kills came under load: some restarted worker found stamped batches to re-send.
    assert sum(r[1] for r in recovered) > 0, "no kill left a batch to re-send: recovery untested"
