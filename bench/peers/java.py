"""Kafka's own ProducerPerformance (the Java producer) as a peer, one JVM per client.

Run as ``java -cp 'kafka/.jars/*' org.apache.kafka.tools.ProducerPerformance`` from the pinned
kafka-tools jar. Values come from a ``--payload-file`` holding this client's seeded values, one
per line, so the Java producer sends the same bytes as the others (it picks a line at random per
record). What is measured and how:

- records/s and latency: the tool's own summary line. It times from just before its send loop to
  after its final flush, and measures latency per record in the send callback, keeping every
  ``ceil(N/500000)``-th sample. For several JVMs the case's span is reconstructed as
  [summary time - own elapsed, summary time] per JVM, and the case's percentiles are the worst
  JVM's (percentiles cannot be merged from summaries).
- CPU: the JVM's whole rusage from ``wait4``, so it includes JVM start-up and JIT (about 1 to 2
  CPU seconds, which dominates short runs).
- Produce requests: an estimate, ``record-send-total / records-per-request-avg`` from
  ``--print-metrics`` (the client's own metrics; no JMX). Not an exact count.
- Keys: the tool sends no keys, so keyed cases are unavailable for it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.client import POOL, ClientResult, ClientSpec, make_values
from bench.scenarios import Delivery

__all__ = ["NAME", "JAVA_CLASS", "settings_for", "unavailable_reason", "run_clients", "parse_summary"]

NAME = "java"
JAVA_CLASS = "org.apache.kafka.tools.ProducerPerformance"
HEAP = "-Xmx512m"

_SUMMARY = re.compile(
    r"^(?P<n>\d+) records sent, (?P<rps>[\d.]+) records/sec \([\d.]+ MB/sec\), "
    r"(?P<avg>[\d.]+) ms avg latency, (?P<max>[\d.]+) ms max latency, "
    r"(?P<p50>\d+) ms 50th, (?P<p95>\d+) ms 95th, (?P<p99>\d+) ms 99th, (?P<p999>\d+) ms 99\.9th\."
)
_INTERVAL = re.compile(r"^(?P<n>\d+) records sent, [\d.]+ records/sec")
_METRIC = re.compile(r"^producer-metrics:(?P<name>[\w-]+):\{[^}]*\}\s*:\s*(?P<value>[-\d.NaEinf]+)")


def settings_for(delivery: Delivery, bootstrap: str) -> dict[str, Any]:
    """Java producer properties equivalent to ``delivery`` (passed as --producer-props)."""
    return {
        "bootstrap.servers": bootstrap,
        "acks": "all" if delivery.acks == -1 else str(delivery.acks),
        # Java 3+ turns idempotence on by default; it must be off explicitly for acks=1.
        "enable.idempotence": "true" if delivery.idempotent else "false",
        "linger.ms": str(delivery.linger_ms),
        "batch.size": str(delivery.batch_size),
        "compression.type": delivery.compression,
    }


def unavailable_reason(root: Path, key_size: int) -> str | None:
    """Why this peer cannot run a case, or None."""
    if key_size:
        return "ProducerPerformance sends no keys"
    jars = root / "kafka" / ".jars"
    if not any(jars.glob("kafka-tools-*.jar")):
        return f"no kafka-tools jar in {jars} (make kafka-up fetches it)"
    if subprocess.run(["sh", "-c", "command -v java"], capture_output=True).returncode != 0:
        return "java not found"
    return None


def parse_summary(line: str) -> dict[str, float] | None:
    """The numbers of ProducerPerformance's final summary line, or None if it is not one."""
    m = _SUMMARY.match(line.strip())
    if m is None:
        return None
    return {k: float(v) for k, v in m.groupdict().items()}


class _Client:
    def __init__(self, spec: ClientSpec, proc: subprocess.Popen[str]) -> None:
        self.spec = spec
        self.proc = proc
        self.progress = 0
        self.summary: dict[str, float] | None = None
        self.summary_at = 0.0
        self.metrics: dict[str, float] = {}
        self.tail: list[str] = []
        self.rusage: Any = None
        self.status: int | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        if self.proc.stdout is None:
            return
        for line in self.proc.stdout:
            summary = parse_summary(line)
            if summary is not None:
                self.summary, self.summary_at = summary, time.monotonic()
                self.progress = int(summary["n"])
                continue
            m = _INTERVAL.match(line)
            if m is not None:
                self.progress += int(m["n"])
                continue
            m = _METRIC.match(line)
            if m is not None:
                try:
                    self.metrics[m["name"]] = float(m["value"])
                except ValueError:
                    pass
                continue
            self.tail.append(line.rstrip())
            del self.tail[:-20]

    def poll(self) -> bool:
        """Reap the JVM if it has exited (keeping its rusage); True once it has."""
        if self.status is not None:
            return True
        pid, status, rusage = os.wait4(self.proc.pid, os.WNOHANG)
        if pid == 0:
            return False
        self.status, self.rusage = os.waitstatus_to_exitcode(status), rusage
        self.proc.returncode = self.status
        self.thread.join(5)
        return True


def run_clients(
    specs: list[ClientSpec],
    root: Path,
    workdir: Path,
    *,
    on_start: Callable[[list[int]], None],
    tick: Callable[[int], None],
    timeout: float,
) -> list[ClientResult]:
    """Run one JVM per spec at once; return their results.

    Args:
        specs: one per client (records, rate and settings already set).
        root: the repository root (the jars are in kafka/.jars).
        workdir: where the payload files go.
        on_start: called with the JVM pids once they are started (for RSS sampling).
        tick: called about every 0.2 s with the records sent so far (progress display).
        timeout: seconds before the JVMs are killed and the case fails.
    """
    clients: list[_Client] = []
    for spec in specs:
        payload = workdir / f"java-payload-{spec.index}.txt"
        pool = make_values(dataclasses.replace(spec, records=min(spec.records, POOL)))
        payload.write_bytes(b"\n".join(pool) + b"\n")
        props = [f"{k}={v}" for k, v in spec.settings.items()]
        cmd = [
            "java", HEAP, "-cp", str(root / "kafka" / ".jars" / "*"), JAVA_CLASS,
            "--topic", spec.topic,
            "--num-records", str(spec.records),
            "--throughput", str(int(spec.rate)) if spec.rate else "-1",
            "--payload-file", str(payload),
            "--print-metrics",
            "--producer-props", *props,
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root)
        clients.append(_Client(spec, proc))
    on_start([c.proc.pid for c in clients])
    deadline = time.monotonic() + timeout
    try:
        while not all(c.poll() for c in clients):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ProducerPerformance did not finish within {timeout:.0f} s")
            tick(sum(c.progress for c in clients))
            time.sleep(0.2)
    finally:
        for c in clients:
            if c.status is None:
                c.proc.kill()
                c.poll() or c.proc.wait()
    tick(sum(c.progress for c in clients))
    results = []
    for c in clients:
        if c.status != 0 or c.summary is None:
            raise RuntimeError(
                f"ProducerPerformance (client {c.spec.index}) exited with {c.status}:\n" + "\n".join(c.tail)
            )
        s = c.summary
        elapsed = s["n"] / s["rps"] if s["rps"] else 0.0
        r = ClientResult(index=c.spec.index)
        r.sent = int(s["n"])
        r.payload_bytes = r.sent * c.spec.value_size
        r.t_end = c.summary_at
        r.t_start = c.summary_at - elapsed
        r.cpu_s = c.rusage.ru_utime + c.rusage.ru_stime
        r.latency_method = (
            f"ProducerPerformance per-record callback latency, every {math.ceil(r.sent / min(r.sent, 500_000))}th"
            " record (summary percentiles, integer ms; several JVMs: the worst JVM's)"
        )
        r.latencies_ms = []
        r.notes.append(f"java summary: p50={s['p50']:g} p99={s['p99']:g} p99.9={s['p999']:g} ms")
        r.notes.append("CPU includes JVM start-up and JIT")
        sends, per_req = c.metrics.get("record-send-total"), c.metrics.get("records-per-request-avg")
        if sends and per_req and per_req > 0 and math.isfinite(per_req):
            r.produce_requests = round(sends / per_req)
            r.produce_requests_source = "estimate: record-send-total / records-per-request-avg (--print-metrics)"
        else:
            r.produce_requests_source = "n/a: --print-metrics gave no records-per-request-avg"
        r.reported_percentiles_ms = [s["p50"], s["p99"], s["p999"]]
        results.append(r)
    return results
