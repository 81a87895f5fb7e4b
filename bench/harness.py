"""The benchmark harness: runs every (scenario, runner[, workers]) case and reports the results.

Per case: a fresh topic; for Sluice runners a fresh daemon with the case's worker count; the
client processes (``spawn``-ed Python processes, or JVMs for the Java peer) build their seeded
data, connect, and wait at a start barrier; then they send while the harness shows progress and
samples RSS; then the topic is read back and counted by an independent consumer. A result is
*valid* only if the count equals what the clients sent and no client saw an error; otherwise it
is *invalid* (or *failed* when the runner crashed, *unavailable* when it cannot run here), and
only valid results are plotted as values.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import scenarios as sc
from bench.client import ClientResult, ClientSpec, client_entry
from bench.measure import RssSampler, broker_cpu_seconds, host_info, machine_busy_seconds, percentiles, versions
from bench.progress import Progress

__all__ = ["main", "parse_args", "RUNNERS", "PEERS", "SLUICE_RUNNERS", "evaluate_targets"]

ROOT = Path(__file__).resolve().parent.parent
SLUICE_RUNNERS = ("sluice-shm", "sluice-socket", "sluice-go")
PEERS = ("confluent", "aiokafka", "java")
RUNNERS = SLUICE_RUNNERS + PEERS
DEFAULT_SEED = 20_240_601
BASELINE = "confluent"
STATS_SETTLE_S = 1.5

VALID, INVALID, FAILED, UNAVAILABLE = "valid", "invalid", "failed", "unavailable"


@dataclass(frozen=True, slots=True)
class Case:
    scenario: sc.Scenario
    runner: str
    workers: int | None  # Sluice daemon workers; None for peers

    @property
    def name(self) -> str:
        w = f"@w{self.workers}" if self.workers is not None else ""
        return f"{self.scenario.label} / {self.runner}{w}"


def _split(values: list[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out.extend(x.strip() for x in v.split(",") if x.strip())
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see bench/README.md)."""
    p = argparse.ArgumentParser(prog="python -m bench", description="Sluice against its peers, on a real Kafka.")
    p.add_argument("--bootstrap", default=os.environ.get("SLUICE_BENCH_BOOTSTRAP", "127.0.0.1:9092"),
                   help="Kafka bootstrap servers (default 127.0.0.1:9092, `make kafka-up`)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {sc.QUICK_RECORDS:,} records per case and at most {sc.QUICK_DEADLINE_S:g} s of sending")
    p.add_argument("--scenario", action="append", metavar="NAME",
                   help=f"repeatable or comma list; default all: {','.join(sc.SCENARIO_NAMES)}")
    p.add_argument("--records", type=int, help=f"records of a single-client case (default {sc.DEFAULT_RECORDS:,})")
    p.add_argument("--workers", default=None, help="Sluice daemon worker counts to sweep, e.g. 1,2,4 (default: usable CPUs)")
    p.add_argument("--peers", default=",".join(PEERS), help="peers to run: any of confluent,aiokafka,java, or none")
    p.add_argument("--sluice", default="shm,socket", help="Sluice runners: any of shm,socket,go, or none")
    p.add_argument("--sluice-api", choices=("send", "produce", "many"), default="send",
                   help="shm runner: send() per record (default), produce() per record (fire and forget), "
                        "or send_many() in chunks")
    p.add_argument("--buffer-memory", type=int, default=None, metavar="BYTES",
                   help="Sluice workers' arena size (buffer_memory; default: the daemon's, 32 MiB)")
    p.add_argument("--fleet-rate", type=float, default=sc.FLEET_RATE, help="records/s offered by each fleet client")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="data seed (same data for every runner)")
    p.add_argument("--json", type=Path, help="also write the results to this file")
    p.add_argument("--plot", type=Path, help="write a PNG plot here")
    p.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results",
                   help="where the dated results JSON goes (default bench/results)")
    p.add_argument("--case-timeout", type=float, default=None, help="seconds before a case is killed and failed")
    p.add_argument("--keep-topics", action="store_true", help="do not delete the cases' topics")
    p.add_argument("--daemon-cmd", default=None,
                   help="run this instead of `sluice` as the daemon (it gets `run --config FILE`); for testing the harness")
    args = p.parse_args(argv)
    names = _split(args.scenario) or list(sc.SCENARIO_NAMES)
    unknown = [n for n in names if n not in sc.SCENARIO_NAMES]
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(sc.SCENARIO_NAMES)}")
    args.scenarios = names
    peers = [] if args.peers.strip() == "none" else _split([args.peers])
    bad = [x for x in peers if x not in PEERS]
    if bad:
        p.error(f"unknown peer(s) {', '.join(bad)}; choose from {', '.join(PEERS)}")
    args.peer_list = peers
    sluice = [] if args.sluice.strip() == "none" else _split([args.sluice])
    bad = [x for x in sluice if x not in ("shm", "socket", "go")]
    if bad:
        p.error(f"unknown Sluice runner(s) {', '.join(bad)}; choose from shm, socket, go")
    args.sluice_list = [f"sluice-{x}" for x in sluice]
    if args.workers:
        try:
            args.worker_list = [int(x) for x in _split([args.workers])]
        except ValueError:
            p.error("--workers takes a comma list of integers")
        if any(w < 1 for w in args.worker_list):
            p.error("--workers must be >= 1")
    else:
        try:
            args.worker_list = [len(os.sched_getaffinity(0))]
        except AttributeError:
            args.worker_list = [os.cpu_count() or 1]
    if args.records is not None and args.records < 1:
        p.error("--records must be >= 1")
    return args


# --- runners -------------------------------------------------------------------------------------


def _settings_for(runner: str, delivery: sc.Delivery, bootstrap: str) -> dict[str, Any]:
    if runner == "confluent":
        from bench.peers import confluent as m
    elif runner == "aiokafka":
        from bench.peers import aiokafka_peer as m  # type: ignore[no-redef]
    elif runner == "java":
        from bench.peers import java as m  # type: ignore[no-redef]
    elif runner == "sluice-shm":
        from bench import sluice_shm as m  # type: ignore[no-redef]
    elif runner == "sluice-go":
        from bench import sluice_go as m  # type: ignore[no-redef]
    else:
        from bench import sluice_socket as m  # type: ignore[no-redef]
    return m.settings_for(delivery, bootstrap)


class Availability:
    """Why a runner cannot run (None = it can), checked once per invocation."""

    def __init__(self, own_daemon: bool = True) -> None:
        self._cache: dict[str, str | None] = {}
        self._own_daemon = own_daemon

    def reason(self, runner: str, scenario: sc.Scenario) -> str | None:
        if scenario.name == "tls" and (tls := sc.tls_unavailable_reason(runner)):
            return tls
        if runner == "java":
            from bench.peers import java

            return java.unavailable_reason(ROOT, scenario.key_size)
        if runner not in self._cache:
            self._cache[runner] = self._check(runner)
        return self._cache[runner]

    def _check(self, runner: str) -> str | None:
        import importlib.util

        if runner == "aiokafka":
            return None if importlib.util.find_spec("aiokafka") else "aiokafka not installed (pip install aiokafka)"
        if runner == "confluent":
            return None
        if runner == "sluice-go":
            from bench.sluice_go import unavailable_reason

            return unavailable_reason(own_daemon=self._own_daemon)
        from bench.sluice_daemon import sluice_unavailable_reason

        reason = sluice_unavailable_reason(runner, own_daemon=self._own_daemon)
        return None if reason is None else f"Sluice client or daemon not available: {reason}"


# --- one case ------------------------------------------------------------------------------------


class CaseError(Exception):
    """The runner failed (status failed)."""


class CaseUnavailable(Exception):
    """The runner cannot run here (status unavailable)."""


def _specs(case: Case, topic: str, args: argparse.Namespace, settings: dict[str, Any],
           socket_path: str | None) -> list[ClientSpec]:
    s = case.scenario
    per, rem = divmod(s.records, s.clients)
    return [
        ClientSpec(runner=case.runner, label=s.label, topic=topic, bootstrap=args.bootstrap, index=i,
                   clients=s.clients, records=per + (rem if i == 0 else 0), value_size=s.value_size,
                   key_size=s.key_size, compressible=s.compressible, seed=args.seed, rate=s.rate,
                   deadline_s=s.deadline_s, settings=settings, socket_path=socket_path, api=args.sluice_api)
        for i in range(s.clients)
    ]


def _case_timeout(case: Case, args: argparse.Namespace) -> float:
    if args.case_timeout:
        return args.case_timeout
    s = case.scenario
    sending = s.deadline_s or s.records / 5_000
    if s.rate:
        sending = max(sending, 1.5 * s.per_client / s.rate)
    return 120.0 + sending


def _run_python_clients(case: Case, specs: list[ClientSpec], daemon: Any, progress: Progress,
                        timeout: float, rss: list[int]) -> tuple[list[ClientResult], dict[str, Any]]:
    """Spawn one process per spec, release them together, collect their results."""
    ctx = multiprocessing.get_context("spawn")
    n = len(specs)
    counters = ctx.RawArray("q", n)
    start = ctx.Event()
    procs, conns = [], []
    extra: dict[str, Any] = {}
    try:
        for spec in specs:
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=client_entry, args=(spec, writer, start, counters), name=f"bench-{spec.index}")
            proc.start()
            writer.close()
            procs.append(proc)
            conns.append(reader)
            rss.append(proc.pid)
        progress.stage(f"{n} client process(es) preparing data")
        ready = 0
        results: dict[int, ClientResult] = {}
        pending = dict(zip(conns, range(n)))
        deadline = time.monotonic() + 180.0

        def receive(timeout_s: float) -> None:
            nonlocal ready
            for conn in multiprocessing.connection.wait(list(pending), timeout_s):
                idx = pending[conn]
                try:
                    kind, payload = conn.recv()
                except EOFError:
                    del pending[conn]
                    if idx not in results:
                        raise CaseError(f"client {idx} exited without a result (exit code {procs[idx].exitcode})") from None
                    continue
                if kind == "ready":
                    ready += 1
                elif kind == "result":
                    results[idx] = ClientResult(**payload)
                    del pending[conn]
                else:
                    raise CaseError(f"client {idx} failed:\n{payload}")

        while ready < n:
            if time.monotonic() > deadline:
                raise CaseError("clients were not ready within 180 s")
            receive(0.5)
        if daemon is not None:
            extra["stats_before"] = _stats(daemon)
            extra["daemon_cpu_before"] = daemon.cpu_seconds()
        extra["broker_cpu_before"] = broker_cpu_seconds(specs[0].bootstrap)
        extra["machine_busy_before"] = machine_busy_seconds()
        sending_since = time.monotonic()
        extra["machine_wall_before"] = sending_since
        start.set()
        deadline = sending_since + timeout
        while pending:
            if time.monotonic() > deadline:
                raise CaseError(f"case did not finish within {timeout:.0f} s")
            receive(0.2)
            progress.update(sum(counters), sending_since)
        progress.update(sum(counters), sending_since)
        extra["machine_busy_after"] = machine_busy_seconds()
        extra["machine_wall_after"] = time.monotonic()
        extra["broker_cpu_after"] = broker_cpu_seconds(specs[0].bootstrap)
        if daemon is not None:
            extra["daemon_cpu_after"] = daemon.cpu_seconds()
            # Workers report their counters to the supervisor about once a second.
            time.sleep(STATS_SETTLE_S)
            extra["stats_after"] = _stats(daemon)
        for proc in procs:
            proc.join(30)
        return [results[i] for i in range(n)], extra
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in conns:
            conn.close()


def _stats(daemon: Any) -> dict[str, Any] | None:
    try:
        return daemon.stats()
    except Exception:  # noqa: BLE001 - a missing stats answer makes the count n/a, not the case fail
        return None


def _run_java(case: Case, specs: list[ClientSpec], workdir: Path, progress: Progress, timeout: float,
              rss: list[int]) -> list[ClientResult]:
    from bench.peers import java

    progress.stage(f"{len(specs)} JVM(s) starting")
    since: list[float] = []

    def on_start(pids: list[int]) -> None:
        rss.extend(pids)
        since.append(time.monotonic())

    def tick(records: int) -> None:
        progress.update(records, since[0] if since else None)

    try:
        return java.run_clients(specs, ROOT, workdir, on_start=on_start, tick=tick, timeout=timeout)
    except (RuntimeError, TimeoutError) as e:
        raise CaseError(str(e)) from None


def run_case(case: Case, args: argparse.Namespace, topics: Any, availability: Availability,
             progress: Progress, workroot: Path) -> dict[str, Any]:
    """Run one case and return its result record (never raises for a runner's failure)."""
    s = case.scenario
    settings = _settings_for(case.runner, s.delivery, args.bootstrap)
    out: dict[str, Any] = {
        "scenario": s.name, "label": s.label, "runner": case.runner, "workers": case.workers,
        "status": None, "reason": "", "clients": s.clients, "records_target": s.records,
        "value_size": s.value_size, "key_size": s.key_size, "compressible": s.compressible,
        "rate_per_client": s.rate or None, "deadline_s": s.deadline_s or None,
        "delivery": {"acks": s.delivery.acks, "idempotent": s.delivery.idempotent, "linger_ms": s.delivery.linger_ms,
                     "batch_size": s.delivery.batch_size, "compression": s.delivery.compression},
        "settings": settings, "scenario_note": s.note, "notes": [],
    }
    progress.begin(case.name, s.records)
    reason = availability.reason(case.runner, s)
    if reason:
        out.update(status=UNAVAILABLE, reason=reason)
        progress.end(f"unavailable: {reason}")
        return out
    workdir = Path(tempfile.mkdtemp(prefix="c-", dir=workroot))
    daemon = None
    topic = None
    rss_roots: list[int] = []
    try:
        progress.stage("creating topic")
        topic = topics.create(s.label, case.runner, sc.PARTITIONS)
        out["topic"] = topic
        out["partitions"] = sc.PARTITIONS
        socket_path = None
        if case.runner in SLUICE_RUNNERS:
            from bench.sluice_daemon import DaemonUnavailable, SluiceDaemon

            progress.stage(f"starting daemon ({case.workers} workers)")
            daemon = SluiceDaemon(workdir, workers=case.workers or 1, bootstrap=args.bootstrap,
                                  delivery=s.delivery, topic=topic, buffer_memory=args.buffer_memory,
                                  command=shlex.split(args.daemon_cmd) if args.daemon_cmd else None)
            try:
                daemon.start()
            except DaemonUnavailable as e:
                raise CaseUnavailable(f"daemon cannot start: {e}") from None
            socket_path = daemon.socket_path
            out["daemon_config"] = Path(daemon.config_path).read_text()
        specs = _specs(case, topic, args, settings, socket_path)
        timeout = _case_timeout(case, args)

        def roots() -> list[int]:
            return rss_roots + ([daemon.proc.pid] if daemon is not None and daemon.proc is not None else [])

        extra: dict[str, Any] = {}
        with RssSampler(roots) as sampler:
            if case.runner == "java":
                results = _run_java(case, specs, workdir, progress, timeout, rss_roots)
            else:
                results, extra = _run_python_clients(case, specs, daemon, progress, timeout, rss_roots)
        _summarise(out, results, extra, daemon, sampler)
        if daemon is not None:
            daemon.stop()
        progress.stage("reading the topic back")
        from bench.verify import count_topic

        sent = out["records_sent"]
        back = count_topic(args.bootstrap, topic, timeout=max(60.0, sent / 20_000))
        out["records_read"] = back.records
        out["watermark_records"] = back.watermark_records
        out["readback_s"] = round(back.seconds, 2)
        problems = []
        if back.records != sent:
            problems.append(f"read back {back.records:,} records, clients sent {sent:,}")
        if not back.complete:
            problems.append("the reader did not reach the end of every partition")
        if out["errors"]:
            problems.append(f"{out['errors']} client-side errors (first: {out['first_error']})")
        if sent == 0:
            problems.append("nothing was sent")
        out["status"] = INVALID if problems else VALID
        out["reason"] = "; ".join(problems)
    except CaseUnavailable as e:
        out.update(status=UNAVAILABLE, reason=str(e))
    except CaseError as e:
        out.update(status=FAILED, reason=str(e)[-2000:])
    except Exception:  # noqa: BLE001 - one broken case must not stop the others
        out.update(status=FAILED, reason=traceback.format_exc()[-2000:])
    finally:
        if daemon is not None:
            try:
                daemon.stop()
            except Exception:  # noqa: BLE001
                pass
            if out["status"] != VALID:
                out["daemon_log_tail"] = daemon.log_tail(20)
        if topic is not None and not args.keep_topics:
            topics.delete(topic)
        shutil.rmtree(workdir, ignore_errors=True)
    progress.end(_one_line(out))
    return out


def _summarise(out: dict[str, Any], results: list[ClientResult], extra: dict[str, Any], daemon: Any,
               sampler: RssSampler) -> None:
    sent = sum(r.sent for r in results)
    payload = sum(r.payload_bytes for r in results)
    t0 = min(r.t_start for r in results)
    t1 = max(r.t_end for r in results)
    elapsed = max(t1 - t0, 1e-9)
    client_cpu = sum(r.cpu_s for r in results)
    daemon_cpu = None
    if daemon is not None and "daemon_cpu_after" in extra:
        daemon_cpu = extra["daemon_cpu_after"] - extra["daemon_cpu_before"]
    cpu = client_cpu + (daemon_cpu or 0.0)
    # What bounds a CPU-bound case on a small host: the broker's share of the same cores, and
    # how many of them were busy at all (for every process, over the whole sending time).
    broker_cpu = busy = None
    if extra.get("broker_cpu_before") is not None and extra.get("broker_cpu_after") is not None:
        broker_cpu = extra["broker_cpu_after"] - extra["broker_cpu_before"]
    if "machine_busy_after" in extra:
        wall = max(extra["machine_wall_after"] - extra["machine_wall_before"], 1e-9)
        busy = (extra["machine_busy_after"] - extra["machine_busy_before"]) / wall
    out.update(
        records_sent=sent,
        payload_bytes=payload,
        elapsed_s=round(elapsed, 4),
        records_per_s=round(sent / elapsed, 1),
        mb_per_s=round(payload / elapsed / 1e6, 3),
        cpu_s={"total": round(cpu, 3), "clients": round(client_cpu, 3),
               "daemon": None if daemon_cpu is None else round(daemon_cpu, 3),
               "broker": None if broker_cpu is None else round(broker_cpu, 3)},
        cpu_s_per_million=round(cpu / sent * 1e6, 3) if sent else None,
        broker_cpu_s_per_million=round(broker_cpu / sent * 1e6, 3) if sent and broker_cpu is not None else None,
        # The application's own cost per record (its process, with Sluice's completion thread).
        client_cpu_ns_per_record=round(client_cpu / sent * 1e9) if sent else None,
        machine_busy_cores=None if busy is None else round(busy, 2),
        peak_rss_mb=round(sampler.peak_bytes / 2**20, 1),
        rss_samples=sampler.samples,
        errors=sum(r.errors for r in results),
        first_error=next((r.first_error for r in results if r.first_error), ""),
    )
    for r in results:
        out["notes"].extend(n for n in r.notes if n not in out["notes"])
    out["latency_method"] = results[0].latency_method
    reported = [r.reported_percentiles_ms for r in results if r.reported_percentiles_ms]
    samples = [x for r in results for x in r.latencies_ms]
    if reported:
        worst = [max(p[i] for p in reported) for i in range(3)]
        out["latency_ms"] = dict(zip(("p50", "p99", "p999"), worst))
        out["latency_samples"] = None
    elif samples:
        pct = percentiles(samples)
        out["latency_ms"] = {k: round(v, 3) for k, v in zip(("p50", "p99", "p999"), pct or [])}
        out["latency_samples"] = len(samples)
        if len(samples) < 1000:
            out["notes"].append(f"only {len(samples)} latency samples: p99.9 is not meaningful")
    else:
        out["latency_ms"] = None
        out["latency_samples"] = 0
    if daemon is not None:
        from bench.sluice_daemon import produce_requests_from_stats

        before = produce_requests_from_stats(extra.get("stats_before"))
        after = produce_requests_from_stats(extra.get("stats_after"))
        if after is not None:
            out["produce_requests"] = after[0] - (before[0] if before else 0)
            out["produce_requests_source"] = after[1] + " (after - before)"
        else:
            out["produce_requests"] = None
            out["produce_requests_source"] = "n/a: no Produce request counter found in the daemon's stats"
        out["daemon_stats_after"] = extra.get("stats_after")
    else:
        counts = [r.produce_requests for r in results]
        out["produce_requests"] = sum(counts) if counts and all(c is not None for c in counts) else None  # type: ignore[misc]
        out["produce_requests_source"] = results[0].produce_requests_source
    if sent < out["records_target"]:
        out["notes"].append(f"stopped by the deadline after {sent:,} of {out['records_target']:,} records")


def _fmt(x: Any, spec: str = ",.0f") -> str:
    return "n/a" if x is None else format(x, spec)


def _one_line(r: dict[str, Any]) -> str:
    if r["status"] in (UNAVAILABLE, FAILED):
        return f"{r['status'].upper()}: {r['reason'].strip().splitlines()[-1] if r['reason'] else ''}"
    lat = r.get("latency_ms") or {}
    return (f"{r['status']}: {_fmt(r.get('records_per_s'))} rec/s, {_fmt(r.get('mb_per_s'), '.1f')} MB/s, "
            f"{_fmt(r.get('cpu_s_per_million'), '.2f')} CPU s/M (client {_fmt(r.get('client_cpu_ns_per_record'))} ns/record, "
            f"broker {_fmt(r.get('broker_cpu_s_per_million'), '.2f')} s/M), "
            f"{_fmt(r.get('machine_busy_cores'), '.2f')} cores busy, p99 {_fmt(lat.get('p99'), '.1f')} ms"
            + (f" ({r['reason']})" if r["reason"] else ""))


# --- targets, table, files -----------------------------------------------------------------------

TARGETS = (
    ("single", "records/s >= 1.5x confluent-kafka", 1.5, None),
    ("fleet", "records/s >= 2x confluent-kafka at <= 0.5x its CPU per record", 2.0, 0.5),
    ("keyed", "records/s >= 1.5x confluent-kafka", 1.5, None),
    ("durable", "records/s >= 1.5x confluent-kafka (idempotent)", 1.5, None),
)
LATENCY_TARGET_MS = 25.0


def evaluate_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each Sluice result against the issue's targets (reported, never asserted)."""
    out: list[dict[str, Any]] = []
    base = {r["label"]: r for r in results if r["runner"] == BASELINE}
    for label, text, ratio_min, cpu_max in TARGETS:
        for r in results:
            if r["label"] != label or r["runner"] not in SLUICE_RUNNERS:
                continue
            row: dict[str, Any] = {"scenario": label, "target": text, "runner": r["runner"], "workers": r["workers"]}
            b = base.get(label)
            if r["status"] != VALID or b is None or b["status"] != VALID:
                row.update(status="n/a", why="Sluice or confluent-kafka result missing or not valid")
            else:
                ratio = r["records_per_s"] / b["records_per_s"]
                row["ratio"] = round(ratio, 3)
                ok = ratio >= ratio_min
                if cpu_max is not None and r.get("cpu_s_per_million") and b.get("cpu_s_per_million"):
                    cpu_ratio = r["cpu_s_per_million"] / b["cpu_s_per_million"]
                    row["cpu_ratio"] = round(cpu_ratio, 3)
                    ok = ok and cpu_ratio <= cpu_max
                row["status"] = "met" if ok else "not met"
            out.append(row)
    for r in results:
        if r["label"] != "latency" or r["runner"] not in SLUICE_RUNNERS:
            continue
        row = {"scenario": "latency", "target": f"p99 <= {LATENCY_TARGET_MS:g} ms at half of peak, linger 5 ms",
               "runner": r["runner"], "workers": r["workers"]}
        lat = r.get("latency_ms")
        if r["status"] != VALID or not lat:
            row.update(status="n/a", why="result missing, not valid, or without latency samples")
        else:
            row["p99_ms"] = lat["p99"]
            row["status"] = "met" if lat["p99"] <= LATENCY_TARGET_MS else "not met"
            if not r.get("rate_from_single"):
                row["why"] = "rate was the default, not half of a measured single peak"
        out.append(row)
    return out


def _table(results: list[dict[str, Any]]) -> str:
    base = {r["label"]: r for r in results if r["runner"] == BASELINE and r["status"] == VALID}
    head = ("case", "status", "rec/s", "MB/s", "vs ck", "CPU s/M", "Produce reqs", "p50 ms", "p99 ms", "p99.9 ms", "RSS MB")
    rows = [head]
    for r in results:
        w = f"@w{r['workers']}" if r["workers"] is not None else ""
        name = f"{r['label']} / {r['runner']}{w}"
        if r["status"] in (UNAVAILABLE, FAILED):
            rows.append((name, r["status"], *["-"] * (len(head) - 2)))
            continue
        lat = r.get("latency_ms") or {}
        b = base.get(r["label"])
        ratio = f"{r['records_per_s'] / b['records_per_s']:.2f}x" if b and r["status"] == VALID else "-"
        rows.append((name, r["status"], _fmt(r["records_per_s"]), _fmt(r["mb_per_s"], ".1f"), ratio,
                     _fmt(r["cpu_s_per_million"], ".2f"), _fmt(r.get("produce_requests")),
                     _fmt(lat.get("p50"), ".2f"), _fmt(lat.get("p99"), ".2f"), _fmt(lat.get("p999"), ".2f"),
                     _fmt(r.get("peak_rss_mb"), ".0f")))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _results_name(started: dt.datetime, host: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", host)[:60]
    return f"{started.strftime('%Y%m%d-%H%M%S')}-{safe}.json"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return 0 if every case ran (valid or unavailable), 1 otherwise."""
    args = parse_args(argv)
    from bench.verify import Topics

    topics = Topics(args.bootstrap)
    try:
        topics.check()
    except Exception as e:  # noqa: BLE001
        print(f"no Kafka broker answers at {args.bootstrap} ({e}); start one with `make kafka-up`", file=sys.stderr)
        return 2
    started = dt.datetime.now(dt.timezone.utc)
    scen = sc.scenarios_for(args.scenarios, records=args.records, quick=args.quick, fleet_rate=args.fleet_rate)
    runners = args.sluice_list + args.peer_list
    cases: list[Case] = []
    for s in scen:
        for runner in runners:
            if runner in SLUICE_RUNNERS:
                cases.extend(Case(s, runner, w) for w in args.worker_list)
            else:
                cases.append(Case(s, runner, None))
    print(f"bench: {len(cases)} cases, seed {args.seed}, bootstrap {args.bootstrap}"
          + (" (quick)" if args.quick else ""), file=sys.stderr)
    host = host_info()
    doc: dict[str, Any] = {
        "schema": 1,
        "started": started.isoformat(timespec="seconds"),
        "host": host,
        "versions": versions(ROOT),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "method": {
            "timing": "first send to last ack (flush returned), monotonic clock; several clients: earliest start to latest end",
            "cpu": "user+system CPU seconds of every producer-side process over the timed section: the client"
                   " processes (their own measurement) plus, for Sluice, the daemon and its workers (psutil before/after);"
                   " Java: the whole JVM (wait4), start-up included; the broker's CPU (psutil, the processes"
                   " listening on the bootstrap ports) and the host's busy cores are reported beside it, not in it",
            "rss": "psutil rss summed over the case's processes, sampled every 0.1 s, peak; shared pages count once per process",
            "validation": "the case's fresh topic read back with confluent-kafka and counted; a mismatch or a"
                          " client-side error makes the result invalid",
            "data": "seeded, generated before timing; values cycle through 4,096 distinct ones per client; gc frozen and"
                    " disabled during timing",
            "mb": "10^6 bytes of keys + values",
        },
        "results": [],
    }
    availability = Availability(own_daemon=args.daemon_cmd is None)
    progress = Progress(len(cases))
    workroot = Path(tempfile.mkdtemp(prefix="sluice-bench-", dir="/tmp"))
    results: list[dict[str, Any]] = doc["results"]
    try:
        for case in cases:
            if case.scenario.name == "latency":
                case = _latency_case(case, results, args)
            results.append(run_case(case, args, topics, availability, progress, workroot))
            if case.scenario.name == "latency":
                results[-1]["rate_from_single"] = case.scenario.rate != sc.LATENCY_DEFAULT_RATE
    except KeyboardInterrupt:
        print("\ninterrupted; writing what ran", file=sys.stderr)
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
    doc["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    doc["targets"] = evaluate_targets(results)
    text = json.dumps(doc, indent=2, default=str)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / _results_name(started, host["hostname"])
    path.write_text(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    print(_table(results))
    for t in doc["targets"]:
        w = f"@w{t['workers']}" if t["workers"] is not None else ""
        detail = ", ".join(f"{k}={t[k]}" for k in ("ratio", "cpu_ratio", "p99_ms", "why") if k in t)
        print(f"target {t['scenario']} / {t['runner']}{w}: {t['status']} ({t['target']}{'; ' + detail if detail else ''})")
    print(f"results: {path}" + (f" and {args.json}" if args.json else ""))
    if args.plot:
        from bench.plot import plot

        plot(doc, args.plot)
        print(f"plot: {args.plot}")
    return 0 if all(r["status"] in (VALID, UNAVAILABLE) for r in results) else 1


def _latency_case(case: Case, results: list[dict[str, Any]], args: argparse.Namespace) -> Case:
    """The latency case runs at half of the same runner's single peak, when that is known."""
    for r in results:
        if (r["label"] == "single" and r["runner"] == case.runner and r["workers"] == case.workers
                and r["status"] == VALID):
            rate = max(1.0, r["records_per_s"] / 2)
            secs = 5.0 if args.quick else sc.LATENCY_SECONDS
            s = case.scenario.with_(rate=rate, records=max(1, int(rate * secs)),
                                    note=f"one client at {rate:,.0f} records/s, half of its single peak")
            return Case(s, case.runner, case.workers)
    return case
