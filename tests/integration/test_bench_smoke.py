"""Smoke test of the benchmark harness: one quick case per runner, against the real broker.

It checks that ``python -m bench`` produces a valid, correctly counted result for the
confluent-kafka peer, and for the Sluice runners once they can run (until then they must be
reported as unavailable, not as failed). No timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RECORDS = 20_000


def test_quick_single_case_is_valid_and_counted(kafka_bootstrap, tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--scenario", "single", "--peers", "confluent",
         "--workers", "1", "--records", str(RECORDS), "--bootstrap", kafka_bootstrap,
         "--results-dir", str(tmp_path / "results"), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    # The dated copy under --results-dir is the same document.
    saved = list((tmp_path / "results").glob("*.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text()) == doc
    assert doc["host"]["cpu_model"] and doc["versions"]["confluent-kafka"]

    by_runner = {r["runner"]: r for r in doc["results"]}
    assert set(by_runner) == {"sluice-shm", "sluice-socket", "confluent"}
    peer = by_runner["confluent"]
    assert peer["status"] == "valid", peer["reason"]
    assert peer["records_sent"] == peer["records_read"] == RECORDS
    assert peer["records_per_s"] > 0 and peer["cpu_s_per_million"] > 0
    assert peer["produce_requests"] and peer["produce_requests"] > 0
    assert peer["latency_ms"]["p50"] <= peer["latency_ms"]["p99"] <= peer["latency_ms"]["p999"]
    assert peer["settings"]["linger.ms"] == 5 and peer["settings"]["acks"] == "1"

    for name in ("sluice-shm", "sluice-socket"):
        r = by_runner[name]
        if r["status"] == "unavailable":
            assert r["reason"], f"{name} is unavailable without a reason"
            continue
        assert r["status"] == "valid", f"{name}: {r['reason']}\n{r.get('daemon_log_tail', '')}"
        assert r["records_sent"] == r["records_read"] == RECORDS
        assert r["workers"] == 1
        # The daemon's CPU is accounted (None would mean its processes were not found). It may
        # read 0.0: CPU times tick in 10 ms, and the daemon now takes these few records in less.
        assert r["cpu_s"]["daemon"] is not None and r["cpu_s"]["daemon"] >= 0


def _bench(tmp_path: Path, bootstrap: str, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--scenario", "single", "--records", str(RECORDS),
         "--bootstrap", bootstrap, "--results-dir", str(tmp_path / "results"), "--json", str(out), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    return proc, (json.loads(out.read_text()) if out.exists() else {})


def test_socket_runner_and_daemon_handling_with_a_stand_in_daemon(kafka_bootstrap, tmp_path):
    # The stand-in speaks the socket protocol and produces with librdkafka: this checks the
    # harness's side (config, start, stats, CPU, the socket runner, the count), not Sluice.
    standin = f"{sys.executable} {ROOT / 'tests' / 'integration' / 'bench_standin_daemon.py'}"
    proc, doc = _bench(tmp_path, kafka_bootstrap, "--peers", "none", "--sluice", "socket", "--workers", "2",
                       "--daemon-cmd", standin)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (r,) = doc["results"]
    assert r["runner"] == "sluice-socket" and r["workers"] == 2
    assert r["status"] == "valid", f"{r['reason']}\n{r.get('daemon_log_tail', '')}"
    assert r["records_sent"] == r["records_read"] == RECORDS
    assert r["cpu_s"]["daemon"] > 0 and r["cpu_s"]["total"] >= r["cpu_s"]["daemon"]
    assert r["produce_requests"] > 0 and "sender.requests" in r["produce_requests_source"]
    assert r["latency_samples"] > 0
    assert "workers = 2" in r["daemon_config"] and r["topic"] in r["daemon_config"]


def test_a_daemon_that_cannot_start_is_unavailable_not_failed(kafka_bootstrap, tmp_path):
    proc, doc = _bench(tmp_path, kafka_bootstrap, "--peers", "none", "--sluice", "socket", "--workers", "1",
                       "--daemon-cmd", "false")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (r,) = doc["results"]
    assert r["status"] == "unavailable"
    assert "daemon" in r["reason"]
    assert "records_per_s" not in r
