"""Back-pressure under a burst: a small arena and many clients (issue 12, "the collapse").

One worker with a 3 MiB arena takes a burst from 12 client processes at once, over ten times
what the arena holds. The worker used to collapse under this: when the arena filled, the
accumulator opened one-record "fallback" batches, which fragmented the arena so that no normal
batch fitted again, and the worker kept copying and validating whole ring regions it could not
take. Throughput fell by an order of magnitude and records waited for seconds.

This test asserts, against a real broker read back with confluent-kafka:

- every record is delivered exactly once;
- batches stay normal-sized (the daemon's ``avg_batch_records``), not one record each;
- latency stays bounded: the clients' own p99 from send() to the delivery callback, and the
  worker's batch latency p99 (first record appended -> ack).

The clients are separate processes (``python THIS_FILE client ...``) sending with ``send()``
per record, keyed over all partitions, as fast as they can; each prints a JSON report.
"""

from __future__ import annotations

import json
import os
import random
import select
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLIENTS = 12
RECORDS_PER_CLIENT = 25_000
VALUE_BYTES = 100
PARTITIONS = 12
KEYS = 240  # keyed records spread every client over every partition
ARENA_BYTES = 3 * 1024 * 1024  # vs ~43 MB of ring frames offered: the arena fills ~13 times
BATCH_BYTES = 64 * 1024
RING_BYTES = 2 * 1024 * 1024  # per client: the clients block on full rings, as under a real burst
SAMPLE_EVERY = 25  # the clients time every 25th record (1,000 samples each)
CLIENT_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 30.0

# Thresholds, from runs on a 2-core machine that also runs the broker (see the commit message).
# "Collapsed" is the old accumulator put back: a one-record batch when a normal one does not fit,
# and draining again at the first free chunk (Accumulator.has_room always true).
#
# A 64 KiB batch holds about 470 of these records. While the rings are backlogged a drain pass
# (up to 1 MiB, ~7,000 records over 12 partitions) fills batches to the brim: the fixed worker
# measured 336-472 records per batch, collapsed 1.0-1.1. 50 is several times below the fixed
# worst and far above the collapse; a slower machine only backlogs the rings more.
MIN_AVG_BATCH_RECORDS = 50
# The clients' p99 from calling send() (blocking on a full ring counts) to the delivery
# callback: fixed 0.07-0.21 s (also with a CPU hog beside it), collapsed 7.3-9.0 s (25,000-29,000
# records/s behind 12 full 2 MiB rings). 2.5 s is over 10x the fixed worst and well under the
# collapsed best.
MAX_CLIENT_P99_S = 2.5
# The worker's own batch latency p99 (first record appended -> ack), a bound on batches that
# linger: fixed 63-158 ms (the histogram reports bucket upper bounds). It does not see this
# collapse (one-record batches go out fast while the records wait in the rings: 40-50 ms), which
# the two bounds above do.
MAX_BATCH_P99_MS = 1000.0


def _value(client: int, i: int, pad: bytes) -> bytes:
    head = b"c%02d-%07d-" % (client, i)
    return head + pad[: VALUE_BYTES - len(head)]


def _client(socket_path: str, topic: str, client: int, n: int, seed: int) -> dict[str, Any]:
    """Send ``n`` keyed records as fast as send() takes them; wait for all; report."""
    from shm import Producer

    rng = random.Random(seed * 1_000 + client)
    pad = rng.randbytes(VALUE_BYTES)
    keys = [b"k%d" % rng.randrange(10**9) for _ in range(KEYS)]
    latencies: list[float] = []
    mono = time.monotonic

    def timed(sent_at: float) -> Any:
        def on_delivery(fut: Any) -> None:
            if fut.exception() is None:
                latencies.append(mono() - sent_at)

        return on_delivery

    with Producer(socket_path, client_name=f"burst-{client}") as p:
        p.lookup(topic)
        # Ready; start together when the test says so, so that the burst is one burst.
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            raise SystemExit("no go")
        t0 = mono()
        futs = []
        for i in range(n):
            value = _value(client, i, pad)
            key = keys[rng.randrange(KEYS)]
            if i % SAMPLE_EVERY == 0:
                futs.append(p.send(topic, value, key, on_delivery=timed(mono())))
            else:
                futs.append(p.send(topic, value, key))
        sent_s = mono() - t0
        left = p.flush(CLIENT_TIMEOUT_S)
        errors = Counter(type(e).__name__ for f in futs if f.done() and (e := f.exception(0)) is not None)
        done = sum(1 for f in futs if f.done())
    return {
        "client": client,
        "sent": n,
        "done": done,
        "left": left,
        "errors": dict(errors),
        "sent_s": sent_s,
        "total_s": mono() - t0,
        "latencies": latencies,
    }


def _p(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def test_burst_into_small_arena_keeps_normal_batches_and_bounded_latency(start_sluice, new_topic, read_topic) -> None:
    seed = int(os.environ.get("SLUICE_TEST_SEED", random.randrange(2**31)))
    print(f"seed {seed} (set SLUICE_TEST_SEED to repeat)")
    topic = new_topic(partitions=PARTITIONS)
    d = start_sluice(
        workers=1,
        daemon={"request_ring_bytes": RING_BYTES},
        kafka={"buffer_memory": ARENA_BYTES},
        profiles={"default": {"acks": 1, "linger_ms": 5, "batch_size": BATCH_BYTES}},
    )
    total = CLIENTS * RECORDS_PER_CLIENT
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "client", d.socket_path, topic, str(c), str(RECORDS_PER_CLIENT), str(seed)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for c in range(CLIENTS)
    ]
    reports = []
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdin is not None
            ready, _, _ = select.select([proc.stdout], [], [], max(1.0, t0 + READY_TIMEOUT_S - time.monotonic()))
            line = proc.stdout.readline() if ready else b""
            if line != b"ready\n":
                try:
                    proc.wait(5)
                    why = proc.stderr.read().decode(errors="replace")[-3000:]
                except subprocess.TimeoutExpired:
                    why = "(still running)"
                pytest.fail(f"client not ready in time: {line!r}\n{why}")
        t0 = time.monotonic()
        for proc in procs:
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        for proc in procs:
            left = max(1.0, t0 + CLIENT_TIMEOUT_S + 20 - time.monotonic())
            out, err = proc.communicate(timeout=left)
            assert proc.returncode == 0, f"client exited with {proc.returncode}:\n{err.decode()[-3000:]}"
            reports.append(json.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    elapsed = time.monotonic() - t0

    # Every future completed, successfully.
    for r in reports:
        summary = {k: v for k, v in r.items() if k != "latencies"}
        assert (r["done"], r["left"], r["errors"]) == (r["sent"], 0, {}), summary
    # The worker's stats once its snapshot (sent every second) counts every record out.
    stats = d.wait_stats(lambda s: s["totals"]["records_out"] >= total, timeout=10, what="every record counted out")
    tot = stats["totals"]
    lat = stats["workers"]["0"]["latency_ms"]
    client_lat = [x for r in reports for x in r["latencies"]]
    client_p50, client_p99 = _p(client_lat, 0.50), _p(client_lat, 0.99)
    print(
        f"{total} records from {CLIENTS} clients in {elapsed:.1f} s ({total / elapsed:,.0f}/s); "
        f"{tot['batches']} batches, {tot['avg_batch_records']} records/batch; worker batch latency ms "
        f"p50 {lat['p50']} p99 {lat['p99']} p999 {lat['p999']}; client send-to-ack s p50 {client_p50:.3f} "
        f"p99 {client_p99:.3f}; slowest client {max(r['total_s'] for r in reports):.1f} s"
    )
    assert tot["records_out"] == total and tot["records_failed"] == 0, tot

    # Exactly once, read back independently.
    records = read_topic(topic, total, timeout=60)
    counts = Counter(r.value for r in records)
    dups = sum(c - 1 for c in counts.values() if c > 1)
    expected = set()
    for c in range(CLIENTS):
        pad = random.Random(seed * 1_000 + c).randbytes(VALUE_BYTES)
        expected.update(_value(c, i, pad) for i in range(RECORDS_PER_CLIENT))
    missing = len(expected - counts.keys())
    assert (len(records), missing, dups) == (total, 0, 0), f"{len(records)} read, {missing} missing, {dups} duplicates"
    assert counts.keys() == expected

    # Normal batches and bounded latency (see the thresholds' comments), all reported at once.
    assert len(client_lat) >= total // SAMPLE_EVERY
    problems = []
    if tot["avg_batch_records"] < MIN_AVG_BATCH_RECORDS:
        problems.append(f"{tot['avg_batch_records']} records per batch (< {MIN_AVG_BATCH_RECORDS})")
    if client_p99 > MAX_CLIENT_P99_S:
        problems.append(f"client send-to-ack p99 {client_p99:.3f} s (> {MAX_CLIENT_P99_S})")
    if lat["p99"] > MAX_BATCH_P99_MS:
        problems.append(f"worker batch latency p99 {lat['p99']} ms (> {MAX_BATCH_P99_MS})")
    assert not problems, "; ".join(problems)


if __name__ == "__main__" and sys.argv[1:2] == ["client"]:
    _socket, _topic, _c, _n, _seed = sys.argv[2:7]
    print(json.dumps(_client(_socket, _topic, int(_c), int(_n), int(_seed))))
