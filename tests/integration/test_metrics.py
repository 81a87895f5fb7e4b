"""/metrics of a real daemon tells what its clients saw, scraped over HTTP.

* failures: records larger than their topic's ``max.message.bytes`` pass the client's check
  (the profile's ``max_request_size`` is larger) and are refused by the real broker with
  MESSAGE_TOO_LARGE; ``sluice_records_failed_total{topic}``, summed over the workers, equals the
  futures that failed, and a topic whose records were delivered has no failures;
* drops: a client process writes to an ``on_full = "drop"`` topic while the workers are stopped
  (SIGSTOP), so its rings fill and it drops; ``sluice_drops_total{topic}`` equals the futures
  that failed with BufferFullError, while the client lives and after it was SIGKILLed and its
  segment released.

The scrape is parsed here, line by line, independently of the code that writes it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from shm import Producer
from shm.errors import KafkaError

pytestmark = pytest.mark.integration

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)",?')
_ROOT = Path(__file__).resolve().parents[2]
# Workers report once a second; a scrape shows a count within a few reports.
_REPORT_WAIT_S = 10.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of one scrape: (name, labels, value)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        body = resp.read().decode("utf-8")
    out = []
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        labels = {k: v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
                  for k, v in _LABEL.findall(m[2] or "")}
        out.append((m[1], labels, float(m[3])))
    return out


def _total(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The sum of ``name`` over the samples whose labels include ``labels`` (so over workers)."""
    return sum(v for n, lab, v in samples if n == name and labels.items() <= lab.items())


def _wait_for(port: int, pred: Callable[[list[tuple[str, dict[str, str], float]]], bool],
              what: str, timeout: float = _REPORT_WAIT_S) -> list[tuple[str, dict[str, str], float]]:
    deadline = time.monotonic() + timeout
    while True:
        samples = _scrape(port)
        if pred(samples):
            return samples
        if time.monotonic() > deadline:
            relevant = [s for s in samples if "failed" in s[0] or "drops" in s[0] or "clients" in s[0]]
            raise AssertionError(f"{what} not seen in {timeout}s; last scrape: {relevant}")
        time.sleep(0.2)


def test_records_refused_by_kafka_are_counted_by_topic(start_sluice, new_topic) -> None:
    port = _free_port()
    d = start_sluice(daemon={"metrics_port": port})
    small = new_topic(partitions=2, config={"max.message.bytes": "2000"})
    fine = new_topic(partitions=2)
    n = 10
    with Producer(d.socket_path, client_name="test-metrics-failed") as p:
        # 5,000-byte records: under max_request_size (1 MiB), so only the broker refuses them.
        refused = [p.send(small, b"x" * 5000, b"k%d" % i) for i in range(n)]
        delivered = [p.send(fine, b"ok%d" % i, b"k%d" % i) for i in range(n)]
        assert p.flush(30) == 0
    errors = [f.exception(0) for f in refused]
    failed = sum(1 for e in errors if isinstance(e, KafkaError) and e.name == "MESSAGE_TOO_LARGE")
    assert failed == n, f"expected every record to be refused with MESSAGE_TOO_LARGE: {errors}"
    assert all(f.exception(0) is None for f in delivered)

    samples = _wait_for(port, lambda s: _total(s, "sluice_records_failed_total", topic=small) >= n,
                        f"{n} failed records of {small}")
    assert _total(samples, "sluice_records_failed_total", topic=small) == failed
    assert _total(samples, "sluice_records_failed_total", topic=fine) == 0
    assert _total(samples, "sluice_records_failed_total") == failed
    assert _total(samples, "sluice_errors_total", error="MESSAGE_TOO_LARGE") == failed
    # Each sample names the worker that failed it, and only workers that did appear.
    assert all("worker" in lab for n_, lab, _ in samples if n_ == "sluice_records_failed_total")
    samples = _wait_for(port, lambda s: _total(s, "sluice_records_out_total") >= n, f"{n} records out")
    assert _total(samples, "sluice_records_out_total") == n
    assert _total(samples, "sluice_drops_total") == 0


_DROPPER = """
import json, sys, time
from shm import Producer
from shm.errors import BufferFullError

socket_path, topic, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
p = Producer(socket_path, client_name="test-metrics-dropper", reconnect_timeout_s=0)
futures = [p.send(topic, b"x" * 10_000, b"k%d" % (i % 7)) for i in range(n)]
dropped = sum(1 for f in futures if f.done() and isinstance(f.exception(0), BufferFullError))
print(json.dumps({"dropped": dropped, "drops": p.drops}), flush=True)
time.sleep(120)  # the test SIGKILLs this process
"""


def test_drops_are_counted_while_the_client_lives_and_after_it_died(start_sluice, new_topic) -> None:
    port = _free_port()
    d = start_sluice(
        daemon={"metrics_port": port},
        topics={"mdrop-*": "clicks"},  # clicks: on_full = "drop"
    )
    topic = new_topic(partitions=2, prefix="mdrop")
    clients_before = _total(_scrape(port), "sluice_clients_connected")
    workers = d.worker_pids()
    # Stopped workers drain nothing: the client's two 4 MiB request rings hold about 800 of
    # these records, and it drops the rest.
    n = 2000
    child: subprocess.Popen[str] | None = None
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", _DROPPER, d.socket_path, topic, str(n)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=_ROOT,
        )
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line, f"the client died ({child.wait(10)}): {child.communicate(timeout=10)[1]}"
        report = json.loads(line)
        dropped = report["dropped"]
        assert 0 < dropped < n and report["drops"] == {topic: dropped}

        samples = _wait_for(port, lambda s: _total(s, "sluice_drops_total", topic=topic) >= dropped,
                            f"{dropped} drops of {topic}")
        assert _total(samples, "sluice_drops_total", topic=topic) == dropped
        assert _total(samples, "sluice_drops_total") == dropped
        assert all("worker" not in lab for n_, lab, _ in samples if n_ == "sluice_drops_total")

        child.kill()
        child.wait(10)
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        if child is not None:
            child.kill()
            child.communicate(timeout=10)  # reaps it and closes the pipes
    # The workers deliver what the dead client had committed, then let go of its segment.
    samples = _wait_for(port, lambda s: _total(s, "sluice_clients_connected") == clients_before,
                        "the dead client's segment released", timeout=30)
    assert _total(samples, "sluice_drops_total", topic=topic) == dropped
    samples = _wait_for(port, lambda s: _total(s, "sluice_records_out_total") >= n - dropped,
                        f"{n - dropped} records out", timeout=30)
    assert _total(samples, "sluice_records_out_total") == n - dropped
    assert _total(samples, "sluice_records_failed_total") == 0
