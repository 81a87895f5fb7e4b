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
        assert r["cpu_s"]["daemon"] is not None and r["cpu_s"]["daemon"] > 0
