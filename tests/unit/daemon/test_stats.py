"""daemon.stats: ``aggregate`` and ``format_table`` over snapshots from real workers.

Each snapshot is made by a real :class:`daemon.worker.Worker` (tests/worker_harness.py) that
took records from a real ring and had batches completed, and it reaches ``aggregate`` the way
the supervisor gets it: sent over the worker's channel and decoded. So a counter renamed or
dropped on the worker's side, or one that does not survive the channel, fails here.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from daemon import channel as ch
from daemon.protocol import errors as ec
from daemon.stats import SUMMED, Counters, LatencyHistogram, aggregate, format_table
from worker_harness import SEED, Harness, run


def _received_snapshot(h: Harness) -> dict[str, Any]:
    """The worker's snapshot as the supervisor receives it (sent and decoded over the channel)."""
    h.worker.chan.send(ch.Stats(worker=h.worker.index, snapshot=h.worker.snapshot()))
    stats = [m for m in h.messages() if isinstance(m, ch.Stats)]
    assert len(stats) == 1
    return stats[0].snapshot


def _two_workers(tmp_path: Path, check: Any) -> None:
    """Worker "0" delivers 9 records; worker "1" has 5 refused (MESSAGE_TOO_LARGE) and 4 more
    taken from its ring but not yet answered. ``check(snapshots)`` runs on what they report."""
    rng = random.Random(SEED + 100)
    print("seed", SEED + 100)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()

    def first(h0: Harness) -> None:
        h0.write(9, rng)
        assert h0.worker.drain()
        for b in h0.seal():
            h0.complete(b)
        snap0 = _received_snapshot(h0)

        h1 = Harness(tmp_path / "b")
        try:
            h1.write(5, rng)
            h1.worker.drain()
            for b in h1.seal():
                h1.complete(b, error=ec.MESSAGE_TOO_LARGE)
            h1.write(4, rng)
            h1.worker.drain()
            check({"0": snap0, "1": _received_snapshot(h1)})
        finally:
            h1.close()

    run(first, tmp_path / "a")


def test_aggregate_sums_what_real_workers_report(tmp_path: Path) -> None:
    def check(snaps: dict[str, dict[str, Any]]) -> None:
        # Every summed counter is one the worker reports: a renamed one would sum to 0 unseen.
        for s in snaps.values():
            assert set(SUMMED) <= s.keys(), set(SUMMED) - s.keys()
        t = aggregate(snaps)
        assert (t["records_in"], t["records_out"], t["records_failed"]) == (18, 9, 5)
        assert t["errors"] == {"MESSAGE_TOO_LARGE": 5}
        assert t["clients"] == 2
        for k in SUMMED:
            assert t[k] == snaps["0"][k] + snaps["1"][k], k
        assert t["bytes_in"] > 0
        assert t["ring_fill"] == max(s["ring_fill"] for s in snaps.values()) > 0
        assert t["arena_fill"] == max(s["arena_fill"] for s in snaps.values())
        # The worst worker's percentiles, never an average that hides the slow one.
        for q in ("p50", "p99", "p999"):
            assert t["latency_ms"][q] == max(s["latency_ms"][q] for s in snaps.values())
        assert t["latency_ms"]["p50"] > 0  # both workers answered records
        # No sender ran, so no batch was sent: the average is 0, not a division by zero.
        assert t["batches"] == 0 and t["avg_batch_records"] == 0.0
        sent = {k: dict(s, batches=2) for k, s in snaps.items()}
        assert aggregate(sent)["avg_batch_records"] == round(9 / 4, 1)

    _two_workers(tmp_path, check)


def test_aggregate_of_no_workers_is_all_zero() -> None:
    t = aggregate({})
    assert all(t[k] == 0 for k in SUMMED)
    assert t["errors"] == {} and t["avg_batch_records"] == 0.0


def test_aggregate_merges_error_maps_from_counters() -> None:
    """Counters.count_error is what the worker's completions call; the names it records merge
    across workers."""
    a, b = Counters(), Counters()
    a.count_error(ec.MESSAGE_TOO_LARGE, 3, "t")
    b.count_error(ec.MESSAGE_TOO_LARGE, 2, "t")
    b.count_error(ec.UNKNOWN_TOPIC_OR_PARTITION, 1, "u")
    snaps = {
        str(i): {"records_failed": c.records_failed, "errors": dict(c.errors), "failed": dict(c.failed)}
        for i, c in enumerate((a, b))
    }
    t = aggregate(snaps)
    assert t["records_failed"] == 6
    assert t["errors"] == {"MESSAGE_TOO_LARGE": 5, "UNKNOWN_TOPIC_OR_PARTITION": 1}
    assert t["failed"] == {"t": 5, "u": 1}


def test_latency_histogram_percentiles_bound_the_samples() -> None:
    h = LatencyHistogram()
    for ms in range(1, 1001):
        h.add(float(ms))
    p = h.percentiles()
    # Each percentile is its bucket's upper bound: at or above the exact value, at most ~26 % over.
    for q, exact in (("p50", 500), ("p90", 900), ("p99", 990), ("p999", 999)):
        assert exact <= p[q] <= exact * 1.26, (q, p[q])
    merged = LatencyHistogram()
    merged.merge(h.counts)
    assert merged.total == 1000 and merged.percentiles() == p


def test_format_table_shows_each_worker_and_the_totals(tmp_path: Path) -> None:
    def check(snaps: dict[str, dict[str, Any]]) -> None:
        snaps["1"]["alive"] = False  # as the pool marks a worker whose heartbeat is stale
        stats = {"workers": snaps, "totals": aggregate(snaps), "clients": 2, "restarts": 1, "uptime_s": 3.5,
                 "drops": {"clicks": 7}}
        table = format_table(stats).splitlines()
        header = table[0].split()
        assert header[:4] == ["worker", "rec", "in", "rec"]
        rows = {line.split()[0]: line.split() for line in table[1:4]}
        assert set(rows) == {"0", "1!", "total"}  # "!": not alive
        # worker, records in, records out, failed
        assert rows["0"][1:4] == ["9", "9", "0"]
        assert rows["1!"][1:4] == ["9", "0", "5"]
        assert rows["total"][1:4] == ["18", "9", "5"]
        assert "errors: MESSAGE_TOO_LARGE=5" in table
        assert "drops (client side): clicks=7" in table
        assert {"clients: 2", "restarts: 1", "uptime_s: 3.5"} <= set(table)

    _two_workers(tmp_path, check)
