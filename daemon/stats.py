"""Counters the workers report and the supervisor sums: ``sluice stats`` and the metrics.

Each worker sends a snapshot (a plain dict, see :meth:`daemon.worker.Worker.snapshot`) every
second over its channel; that message doubles as its heartbeat. The supervisor keeps the last
one per worker and builds the view that ``sluice stats``, ``StatsReply`` and the Prometheus
endpoint (:mod:`daemon.metrics`) render.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from typing import Any

from shm.errors import error_name

__all__ = ["Counters", "LatencyHistogram", "aggregate", "format_table", "SUMMED"]

# Bucket upper bounds in ms: 0.1 ms to ~100 s, 10 per decade (about 26 % apart).
_BOUNDS = [0.1 * 10 ** (i / 10) for i in range(61)]

SUMMED = (
    "records_in",
    "bytes_in",
    "records_out",
    "records_failed",
    "bytes_out",
    "batches",
    "requests",
    "in_flight",
    "retries",
    "clients",
    "dropped_clients",
    "open_batches",
    "chunks",
)


class Counters:
    """One worker's running totals, reported in its snapshot. The worker's draining,
    completions and recovery each count into the one instance the worker gives them."""

    __slots__ = (
        "records_in",
        "bytes_in",
        "records_out",
        "records_failed",
        "chunks",
        "errors",
        "failed",
        "dropped_clients",
        "reloads_applied",
    )

    def __init__(self) -> None:
        self.records_in = 0  # records taken from the rings into batches
        self.bytes_in = 0  # ring bytes of those records (frames, as the clients wrote them)
        self.records_out = 0  # records Kafka accepted
        self.records_failed = 0  # records completed with an error
        self.chunks = 0  # chunks reported to clients (CHUNK_DONE frames written)
        self.errors: dict[str, int] = {}  # Kafka error name -> records failed with it
        self.failed: dict[str, int] = {}  # topic -> records failed (sluice_records_failed_total)
        self.dropped_clients = 0
        self.reloads_applied = 0

    def count_error(self, code: int, records: int, topic: str) -> None:
        """``records`` records of ``topic`` completed with Kafka error ``code``."""
        name = error_name(code)
        self.errors[name] = self.errors.get(name, 0) + records
        self.failed[topic] = self.failed.get(topic, 0) + records
        self.records_failed += records


class LatencyHistogram:
    """Log-bucketed latencies (ms) with bounded memory; percentiles read from the buckets.

    A percentile is reported as its bucket's upper bound, so it is at most ~26 % high.
    """

    __slots__ = ("counts", "total", "sum_ms")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BOUNDS) + 1)
        self.total = 0
        self.sum_ms = 0.0

    def add(self, ms: float) -> None:
        self.counts[bisect.bisect_left(_BOUNDS, ms)] += 1
        self.total += 1
        self.sum_ms += ms

    def merge(self, counts: list[int]) -> None:
        for i, c in enumerate(counts[: len(self.counts)]):
            self.counts[i] += c
            self.total += c

    def percentile(self, q: float) -> float:
        if not self.total:
            return 0.0
        rank = max(1, math.ceil(q * self.total))
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return round(_BOUNDS[i] if i < len(_BOUNDS) else _BOUNDS[-1], 3)
        return round(_BOUNDS[-1], 3)

    def percentiles(self) -> dict[str, float]:
        return {
            "p50": self.percentile(0.50),
            "p90": self.percentile(0.90),
            "p99": self.percentile(0.99),
            "p999": self.percentile(0.999),
        }


def aggregate(workers: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Totals over the workers' snapshots: sums of counters, merged error and per-topic
    failure maps, max fills. (Drops are the clients' count, not the workers': see
    :meth:`daemon.supervisor.Supervisor.drops`.)"""
    totals: dict[str, Any] = {k: 0 for k in SUMMED}
    errors: dict[str, int] = {}
    failed: dict[str, int] = {}
    ring = arena = 0.0
    worst = {"p50": 0.0, "p90": 0.0, "p99": 0.0, "p999": 0.0}
    for snap in workers.values():
        for k in SUMMED:
            totals[k] += snap.get(k, 0)
        for name, n in snap.get("errors", {}).items():
            errors[name] = errors.get(name, 0) + n
        for topic, n in snap.get("failed", {}).items():
            failed[topic] = failed.get(topic, 0) + n
        ring = max(ring, snap.get("ring_fill", 0.0))
        arena = max(arena, snap.get("arena_fill", 0.0))
        for q, v in snap.get("latency_ms", {}).items():
            if q in worst:
                worst[q] = max(worst[q], v)
    totals["errors"] = errors
    totals["failed"] = failed
    totals["ring_fill"] = ring
    totals["arena_fill"] = arena
    # The worst worker's percentiles: an upper bound of the daemon's, never an understatement.
    totals["latency_ms"] = worst
    totals["avg_batch_records"] = (
        round(totals["records_out"] / totals["batches"], 1) if totals["batches"] else 0.0
    )
    return totals


def format_table(stats: Mapping[str, Any]) -> str:
    """The human form of ``sluice stats``: one row per worker and a total row."""
    cols = [
        ("worker", 6),
        ("rec in", 12),
        ("rec out", 12),
        ("failed", 8),
        ("MB in", 9),
        ("MB out", 9),
        ("batches", 9),
        ("avg/b", 7),
        ("infl", 5),
        ("retries", 8),
        ("ring%", 6),
        ("arena%", 7),
        ("p50ms", 7),
        ("p99ms", 7),
        ("p999ms", 7),
    ]
    lines = [" ".join(name.rjust(w) for name, w in cols)]

    def row(label: str, s: Mapping[str, Any]) -> str:
        lat = s.get("latency_ms", {})
        batches = s.get("batches", 0)
        vals = [
            label,
            s.get("records_in", 0),
            s.get("records_out", 0),
            s.get("records_failed", 0),
            f"{s.get('bytes_in', 0) / 1e6:.1f}",
            f"{s.get('bytes_out', 0) / 1e6:.1f}",
            batches,
            f"{s.get('records_out', 0) / batches:.0f}" if batches else "-",
            s.get("in_flight", 0),
            s.get("retries", 0),
            f"{100 * s.get('ring_fill', 0.0):.0f}",
            f"{100 * s.get('arena_fill', 0.0):.0f}",
            lat.get("p50", 0.0),
            lat.get("p99", 0.0),
            lat.get("p999", 0.0),
        ]
        return " ".join(str(v).rjust(w) for v, (_, w) in zip(vals, cols))

    workers = stats.get("workers", {})
    for key in sorted(workers, key=lambda k: int(k)):
        snap = workers[key]
        label = key if snap.get("alive", True) else f"{key}!"
        lines.append(row(label, snap))
    totals = stats.get("totals", {})
    lines.append(row("total", totals))
    errors = totals.get("errors", {})
    if errors:
        lines.append("errors: " + ", ".join(f"{k}={v}" for k, v in sorted(errors.items())))
    failed = totals.get("failed", {})
    if failed:
        lines.append("failed by topic: " + ", ".join(f"{k}={v}" for k, v in sorted(failed.items())))
    refused = stats.get("socket", {}).get("refused", {})
    if refused:
        lines.append("refused (socket clients): " + ", ".join(
            f"{topic}:{err}={n}" for topic, errs in sorted(refused.items()) for err, n in sorted(errs.items())
        ))
    drops = stats.get("drops", {})
    if drops:
        lines.append("drops (client side): " + ", ".join(f"{k}={v}" for k, v in sorted(drops.items())))
    for key in ("clients", "restarts", "uptime_s"):
        if key in stats:
            lines.append(f"{key}: {stats[key]}")
    return "\n".join(lines)
