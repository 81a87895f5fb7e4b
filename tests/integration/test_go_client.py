"""The Go client (clients/go) against a real daemon and a real broker.

The Go command ``sluice-go-produce`` is built into a temporary directory and run as a
separate process; what it reports (its JSON summary and one line per record: index,
partition, offset, timestamp, outcome) is checked against what an independent reader
(confluent-kafka) finds in the topic. Partitions are chosen by the daemon; they are checked
against librdkafka's own murmur2 partitioner, not against Sluice's code.

The Go unit tests (codec, conformance vectors, the Producer against an in-memory daemon) run
here too, so the README's single test command covers them, and so does one quick benchmark
case with the Go client as the runner. Everything is skipped, with the
reason, only when the Go toolchain is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_fixture import ROOT

CLIENT_DIR = ROOT / "clients" / "go"
_GO_INSTALL = "/usr/local/go/bin/go"  # the official tarball's place, when not on PATH
GO = shutil.which("go") or (_GO_INSTALL if os.access(_GO_INSTALL, os.X_OK) else None)

pytestmark = pytest.mark.skipif(GO is None, reason="the Go toolchain (`go`) is not installed: the Go client cannot be built")

GO_BUILD_TIMEOUT_S = 300
RUN_TIMEOUT_S = 120
RECORDS = 20_000
PARTITIONS = 6
KEYS = 1000


def _go(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    # -buildvcs=false: a worktree or a CI checkout need not be a complete git repository.
    env = {**os.environ, "GOFLAGS": (os.environ.get("GOFLAGS", "") + " -buildvcs=false").strip()}
    return subprocess.run([GO or "go", *args], cwd=CLIENT_DIR, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def go_produce(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The sluice-go-produce command, built from clients/go."""
    out = tmp_path_factory.mktemp("go-bin") / "sluice-go-produce"
    built = _go("build", "-o", str(out), "./cmd/sluice-go-produce", timeout=GO_BUILD_TIMEOUT_S)
    assert built.returncode == 0, f"go build failed:\n{built.stdout}\n{built.stderr}"
    return str(out)


def _summary(stdout: str) -> dict[str, Any]:
    lines = [ln for ln in stdout.strip().splitlines() if ln.startswith("{")]
    assert lines, f"no JSON summary in the output:\n{stdout}"
    return json.loads(lines[-1])


def _results(path: Path) -> list[tuple[int, int, int, str]]:
    """(partition, offset, timestamp, outcome) by record index."""
    out = []
    for n, line in enumerate(path.read_text().splitlines()):
        i, part, off, ts, name = line.split()
        assert int(i) == n
        out.append((int(part), int(off), int(ts), name))
    return out


def _index(value: bytes, run: str) -> int:
    prefix, i, _ = value.split(b"-", 2)
    assert prefix == run.encode(), value[:40]
    return int(i)


def _key(i: int, key_size: int = 16) -> bytes:
    """The key the Go command gives record i with -keyed (see its package comment)."""
    return (b"k%d" % (i % KEYS)).ljust(key_size, b".")


def _librdkafka_partitions(bootstrap: str, topic: str, keys: list[bytes]) -> dict[bytes, int]:
    """Where librdkafka's Java-compatible partitioner puts each key in ``topic``."""
    from confluent_kafka import Producer as RdProducer

    rd = RdProducer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random"})
    parts: dict[bytes, int] = {}

    def report(err: Any, msg: Any) -> None:
        assert err is None, err
        parts[msg.key()] = msg.partition()

    for k in keys:
        rd.produce(topic, b"", key=k, on_delivery=report)
    assert rd.flush(30) == 0
    return parts


def test_go_unit_tests() -> None:
    """`go test ./...` in clients/go: codec, conformance vectors, the Producer's policies."""
    ran = _go("test", "-count=1", "./...", timeout=GO_BUILD_TIMEOUT_S)
    assert ran.returncode == 0, f"go test failed:\n{ran.stdout}\n{ran.stderr}"


@pytest.mark.integration
def test_keyed_records_with_headers_arrive_once_where_the_acks_say(
    sluice_daemon, new_topic, read_topic, kafka_bootstrap, go_produce, tmp_path
) -> None:
    topic = new_topic(partitions=PARTITIONS)
    results = tmp_path / "results.txt"
    ran = subprocess.run(
        [go_produce, "-socket", sluice_daemon.socket_path, "-topic", topic, "-count", str(RECORDS),
         "-keyed", "-keys", str(KEYS), "-headers", "-value-size", "64", "-frame-records", "500",
         "-results", str(results)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    assert ran.returncode == 0, f"{ran.stdout}\n{ran.stderr}"
    summary = _summary(ran.stdout)
    assert (summary["sent"], summary["acked"], summary["failed"], summary["refused"]) == (RECORDS, RECORDS, 0, 0), summary
    assert summary["latency_ms"]["p50"] > 0
    acks = _results(results)
    assert all(name == "NONE" and off >= 0 for _p, off, _t, name in acks)

    got = read_topic(topic, RECORDS)
    assert len(got) == RECORDS, f"read {len(got)} records, sent {RECORDS}"
    seen: set[int] = set()
    last_offset: dict[int, int] = {}
    last_index: dict[int, int] = {}
    for r in got:
        i = _index(r.value, summary["run"])
        assert i not in seen, f"record {i} arrived twice"
        seen.add(i)
        assert r.key == _key(i)
        assert r.headers == [("i", b"%d" % i), ("run", summary["run"].encode()), ("nothing", None)]
        assert (r.partition, r.offset) == acks[i][:2], f"record {i}: in Kafka at {(r.partition, r.offset)}, acked {acks[i][:2]}"
        # Send's order is kept per partition.
        assert r.offset > last_offset.get(r.partition, -1) and i > last_index.get(r.partition, -1)
        last_offset[r.partition], last_index[r.partition] = r.offset, i
    assert seen == set(range(RECORDS))

    # The daemon chose each key's partition as Kafka's own producers do.
    keys = sorted({_key(i) for i in range(RECORDS)})
    theirs = _librdkafka_partitions(kafka_bootstrap, new_topic(partitions=PARTITIONS), keys)
    ours = {_key(i): acks[i][0] for i in range(RECORDS)}
    assert ours == theirs


@pytest.mark.integration
def test_fire_and_forget_records_arrive_once(sluice_daemon, new_topic, read_topic, go_produce) -> None:
    """Produce with ack=false: no ProduceAck, the Flush asks the daemon (FlushDone), and every
    record is in Kafka once."""
    topic = new_topic(partitions=3)
    n = 5000
    ran = subprocess.run(
        [go_produce, "-socket", sluice_daemon.socket_path, "-topic", topic, "-count", str(n), "-no-ack", "-keyed"],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    assert ran.returncode == 0, f"{ran.stdout}\n{ran.stderr}"
    summary = _summary(ran.stdout)
    assert (summary["sent"], summary["acked"], summary["failed"]) == (n, n, 0), summary
    got = read_topic(topic, n)
    assert sorted(_index(r.value, summary["run"]) for r in got) == list(range(n))


@pytest.mark.integration
def test_every_nth_frame_acknowledged_the_others_fire_and_forget(sluice_daemon, new_topic, read_topic, go_produce) -> None:
    """-ack-every 4: one frame in four is acknowledged (its records' latency), the others go
    ack=false; the FlushDone accounts for all of them, and every record is in Kafka once."""
    topic = new_topic(partitions=3)
    n = 5000
    ran = subprocess.run(
        [go_produce, "-socket", sluice_daemon.socket_path, "-topic", topic, "-count", str(n), "-keyed",
         "-frame-records", "100", "-ack-every", "4", "-distinct-values", "0"],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    assert ran.returncode == 0, f"{ran.stdout}\n{ran.stderr}"
    summary = _summary(ran.stdout)
    assert (summary["sent"], summary["acked"], summary["failed"], summary["pending"]) == (n, n, 0, 0), summary
    assert summary["latency_ms"]["p50"] > 0
    got = read_topic(topic, n)
    assert sorted(_index(r.value, summary["run"]) for r in got) == list(range(n))


@pytest.mark.integration
def test_reconnects_across_a_daemon_restart(start_sluice, new_topic, read_topic, go_produce, tmp_path) -> None:
    """The daemon restarts while the client sends: the client connects again and goes on.
    Every acknowledged record is in Kafka once, where its ack said; records whose frame was
    written before the drop fail with CONNECTION_LOST and arrive at most once; none is sent
    twice, and the records sent after the restart are acknowledged."""
    daemon = start_sluice()
    topic = new_topic(partitions=3)
    results = tmp_path / "results.txt"
    n, rate = 12_000, 3_000  # four seconds of sending; the restart comes after about one
    proc = subprocess.Popen(
        [go_produce, "-socket", daemon.socket_path, "-topic", topic, "-count", str(n), "-rate", str(rate),
         "-keyed", "-reconnect-timeout", "30s", "-results", str(results)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(1.0)
        assert proc.poll() is None, "the client finished before the restart"
        assert daemon.stop() == 0
        daemon.start()
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    summary = _summary(out)
    assert summary["reconnects"] >= 1, (summary, err)
    assert len(summary["disconnects"]) == summary["reconnects"], summary  # each drop, then a new connection
    assert summary["sent"] == n and summary["refused"] == 0 and summary["pending"] == 0, summary
    assert set(summary["errors"]) <= {"CONNECTION_LOST"}, summary
    assert summary["acked"] + summary["failed"] == n
    acks = _results(results)
    acked = {i for i, a in enumerate(acks) if a[3] == "NONE"}
    lost = {i for i, a in enumerate(acks) if a[3] == "CONNECTION_LOST"}
    assert len(acked) == summary["acked"] and len(lost) == summary["failed"]
    # Sent after the restart (the last quarter, a second of sending): acknowledged.
    assert set(range(n * 3 // 4, n)) <= acked

    got = read_topic(topic, len(acked))
    by_index: dict[int, tuple[int, int]] = {}
    for r in got:
        i = _index(r.value, summary["run"])
        assert i not in by_index, f"record {i} arrived twice"
        by_index[i] = (r.partition, r.offset)
    assert acked <= set(by_index), f"{len(acked - set(by_index))} acknowledged records missing"
    for i in acked:
        assert by_index[i] == acks[i][:2]
    assert set(by_index) <= acked | lost, "a record neither acknowledged nor lost arrived"


@pytest.mark.integration
def test_context_timeouts(sluice_daemon, new_topic, go_produce) -> None:
    """A daemon that stops answering (SIGSTOP) bounds the client by its contexts: the
    handshake fails after -connect-timeout, and an already connected client gives up on its
    acknowledgements after -timeout. Once the daemon continues, it serves again."""
    topic = new_topic(partitions=2)
    pid = sluice_daemon.pid  # the supervisor: it serves the socket
    # Connected and ready before the daemon stops.
    proc = subprocess.Popen(
        [go_produce, "-socket", sluice_daemon.socket_path, "-topic", topic, "-count", "2000",
         "-wait-start", "-timeout", "2s"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    stopped = False
    try:
        assert proc.stdout is not None and proc.stdin is not None
        ready = json.loads(proc.stdout.readline())
        assert ready["ready"] is True
        os.kill(pid, signal.SIGSTOP)
        stopped = True
        t0 = time.monotonic()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=30)
        waited = time.monotonic() - t0
        assert proc.returncode == 3, f"{out}\n{err}"
        summary = _summary(out)
        assert summary["timed_out"] is True and summary["acked"] == 0 and summary["pending"] == summary["sent"] > 0, summary
        assert 1.9 <= waited < 8, waited

        # Not connected yet: the handshake itself times out.
        t0 = time.monotonic()
        late = subprocess.run(
            [go_produce, "-socket", sluice_daemon.socket_path, "-topic", topic, "-count", "1", "-connect-timeout", "1s"],
            capture_output=True, text=True, timeout=30,
        )
        waited = time.monotonic() - t0
        assert late.returncode == 2 and "deadline exceeded" in _summary(late.stdout)["error"], late.stdout + late.stderr
        assert 0.9 <= waited < 10, waited
    finally:
        if stopped:
            os.kill(pid, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    again = subprocess.run(
        [go_produce, "-socket", sluice_daemon.socket_path, "-topic", topic, "-count", "100"],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert _summary(again.stdout)["acked"] == 100


@pytest.mark.integration
@pytest.mark.parametrize("ack_every", ["", "1"], ids=["socket-runner-framing", "every-frame-acked"])
def test_bench_runs_the_go_client(kafka_bootstrap, tmp_path, ack_every: str) -> None:
    """`python -m bench --sluice go`: one quick case, valid and counted by the harness's reader,
    with the socket runner's framing (every 8th frame acknowledged) and with every frame
    acknowledged."""
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--scenario", "single", "--peers", "none", "--sluice", "go",
         "--workers", "1", "--records", "5000", "--bootstrap", kafka_bootstrap,
         "--results-dir", str(tmp_path / "results"), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
        env={**os.environ, "SLUICE_BENCH_GO_ACK_EVERY": ack_every},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (r,) = json.loads(out.read_text())["results"]
    assert (r["runner"], r["status"]) == ("sluice-go", "valid"), r["reason"]
    assert r["records_sent"] == r["records_read"] == 5000
    assert r["cpu_s"]["clients"] > 0 and r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
    assert ("every frame" in r["latency_method"]) == (ack_every == "1"), r["latency_method"]
