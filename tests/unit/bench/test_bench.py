"""The benchmark harness's pure parts: parsing, percentiles, counters, targets, data."""

from __future__ import annotations

import pytest

from bench.client import ClientSpec, make_keys, make_values
from bench.harness import evaluate_targets, parse_args
from bench.measure import percentiles
from bench.peers.java import parse_summary
from bench.scenarios import scenarios_for
from bench.sluice_daemon import config_text, produce_requests_from_stats
from bench.scenarios import Delivery


def test_java_summary_line_is_parsed():
    line = ("20000 records sent, 43859.6 records/sec (4.18 MB/sec), 79.60 ms avg latency, 244.00 ms max latency, "
            "76 ms 50th, 112 ms 95th, 124 ms 99th, 130 ms 99.9th.\n")
    got = parse_summary(line)
    assert got == {"n": 20000, "rps": 43859.6, "avg": 79.6, "max": 244.0, "p50": 76, "p95": 112, "p99": 124,
                   "p999": 130}
    # An interval line is not the summary.
    assert parse_summary("5000 records sent, 999.8 records/sec (0.10 MB/sec), 1.0 ms avg latency, 3.0 ms max latency.") is None


def test_percentiles_are_nearest_rank():
    assert percentiles([]) is None
    samples = list(range(1, 1001))  # 1..1000
    assert percentiles(samples) == [500, 990, 999]
    assert percentiles([7.0]) == [7.0, 7.0, 7.0]


def test_produce_requests_prefer_the_total_over_per_worker_counts():
    stats = {"produce_requests": 10, "workers": [{"produce_requests": 4}, {"produce_requests": 6}]}
    assert produce_requests_from_stats(stats)[0] == 10
    per_worker = {"workers": [{"sender": {"requests": 3}}, {"sender": {"requests": 5}}], "clients": {"requests": 99}}
    value, source = produce_requests_from_stats(per_worker)
    assert value == 8 and "sender" in source
    totals = {"total": {"requests": 12, "metadata_requests": 3}, "workers": {"0": {"requests": 5}, "1": {"requests": 7}}}
    assert produce_requests_from_stats(totals)[0] == 12
    assert produce_requests_from_stats({"uptime": 3}) is None
    assert produce_requests_from_stats(None) is None


def test_daemon_config_is_accepted_by_the_config_loader():
    loads = pytest.importorskip("daemon.config").loads
    text = config_text(socket_path="/tmp/x/sluice.sock", runtime_dir="/tmp/x", workers=3, bootstrap="127.0.0.1:9092",
                       delivery=Delivery(acks=-1, idempotent=True, compression="zstd"), topic="bench-t-1")
    cfg = loads(text)
    profile = cfg.profile_for("bench-t-1") if hasattr(cfg, "profile_for") else None
    assert cfg.daemon.workers == 3
    if profile is not None:
        assert profile.acks == -1 and profile.enable_idempotence and profile.compression_type == "zstd"


def test_targets_compare_against_confluent_only_when_both_are_valid():
    def row(runner, rps, cpu=1.0, status="valid", label="single", workers=None):
        return {"label": label, "runner": runner, "workers": workers, "status": status, "records_per_s": rps,
                "cpu_s_per_million": cpu, "latency_ms": None}

    results = [row("confluent", 100.0), row("sluice-shm", 160.0, workers=2), row("sluice-socket", 120.0, workers=2),
               row("confluent", 100.0, cpu=2.0, label="fleet"), row("sluice-shm", 250.0, cpu=1.5, label="fleet", workers=2),
               row("confluent", 100.0, label="keyed"), row("sluice-shm", 0.0, status="invalid", label="keyed", workers=2)]
    got = {(t["scenario"], t["runner"]): t for t in evaluate_targets(results)}
    assert got[("single", "sluice-shm")]["status"] == "met"
    assert got[("single", "sluice-socket")]["status"] == "not met"
    # 2.5x the records/s but 0.75x the CPU per record: the fleet target needs both.
    assert got[("fleet", "sluice-shm")]["status"] == "not met"
    assert got[("keyed", "sluice-shm")]["status"] == "n/a"


def test_data_is_seeded_sized_and_newline_free():
    spec = ClientSpec(runner="confluent", label="x", topic="t", bootstrap="b", index=0, clients=1, records=5000,
                      value_size=100, key_size=16, compressible=True, seed=1, rate=0, deadline_s=0, settings={})
    values, keys = make_values(spec), make_keys(spec)
    assert len(values) == len(keys) == 5000
    assert {len(v) for v in values} == {100} and {len(k) for k in keys} == {16}
    assert not any(b"\n" in v for v in values)
    assert make_values(spec) == values  # seeded
    assert make_values(ClientSpec(**{**{f: getattr(spec, f) for f in spec.__dataclass_fields__}, "index": 1})) != values


def test_arguments_and_quick_sizes():
    args = parse_args(["--quick", "--scenario", "single,compressed", "--scenario", "fleet", "--workers", "1,2",
                       "--peers", "none", "--sluice", "shm"])
    assert args.scenarios == ["single", "compressed", "fleet"]
    assert args.worker_list == [1, 2] and args.peer_list == [] and args.sluice_list == ["sluice-shm"]
    scen = scenarios_for(args.scenarios, records=None, quick=True)
    assert [s.label for s in scen] == ["single", "fleet", "compressed-lz4", "compressed-zstd"]
    assert all(s.deadline_s > 0 for s in scen)
    fleet = scen[1]
    assert fleet.clients == 16 and fleet.records % 16 == 0
    with pytest.raises(SystemExit):
        parse_args(["--scenario", "nope"])
