"""Soak: memory stays bounded at a fixed rate (issue 8, item 7).

``python -m bench.soak`` starts a Sluice daemon (W workers) against a real Kafka, creates a fresh
topic, and runs N client processes that each send at a fixed rate for ``--duration`` seconds:
keyed 100-byte records, alternating chunks of ``send()`` with futures and ``send_many()``. Every
``--interval`` seconds it samples the RSS (and USS) of the supervisor, each worker and each
client. At the end it reads the topic back with confluent-kafka and checks that the count
matches what the clients had acknowledged, writes ``bench/results/soak-<date>.json`` and a plot
``soak-<date>.png`` (RSS over time per process), and prints a flatness verdict: RSS growth per
process from minute 2 (after warm-up) to the end, in MB and %, and a fitted slope.

This is a long run on purpose; it belongs in bench/, never in CI. Everything is bounded: a hard
timeout (SIGALRM) and, whatever happens, the clients are killed and the daemon stopped.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import psutil

__all__ = ["main", "run_soak", "soak_client", "verdict"]

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 64
"""Records per pacing step; chunks alternate between send() per record and one send_many()."""
POOL = 4096
"""Distinct values and keys per client (records cycle through them, so RSS measures the producer)."""
KEY_SIZE = 16
WARMUP_S = 120.0
"""Growth is measured from the first sample at or after this time (allocators, caches, rings settle)."""
FLAT_MB = 5.0
FLAT_PCT = 5.0
"""A process is flat when it grew by at most FLAT_MB or at most FLAT_PCT after warm-up."""

# Per-client slots in the shared counters array.
_SENT, _ACKED, _ERRORS = 0, 1, 2
_SLOTS = 3


class _HardTimeout(Exception):
    pass


def _settle(window: deque[Any], counters: Any, base: int, wait: float) -> None:
    """Count the outcomes of the finished entries at the left of ``window`` (futures or groups).

    The window only holds what is in flight (about a linger's worth of records), so the client's
    own bookkeeping stays bounded too; ``wait`` > 0 waits for each (the final drain).
    """
    while window:
        kind, obj = window[0]
        if wait <= 0 and not obj.done():
            return
        window.popleft()
        if kind == 0:  # a chunk of DeliveryFutures
            ok = err = 0
            for fut in obj:
                try:
                    fut.result(wait if wait > 0 else 0)
                    ok += 1
                except Exception:  # noqa: BLE001 - any failed record counts as an error
                    err += 1
        else:  # a DeliveryGroup
            try:
                obj.result(wait if wait > 0 else 0)
            except Exception:  # noqa: BLE001 - the group's errors() says which failed
                pass
            err = len(obj.errors)
            ok = len(obj) - err
        counters[base + _ACKED] += ok
        counters[base + _ERRORS] += err


class _Chunk:
    """The futures of one send() chunk; done when its last future is (they resolve in order per
    partition, so 'all done' is checked only when the last is)."""

    __slots__ = ("futs",)

    def __init__(self, futs: list[Any]) -> None:
        self.futs = futs

    def done(self) -> bool:
        return all(f.done() for f in self.futs)

    def __iter__(self) -> Any:
        return iter(self.futs)


def soak_client(index: int, socket_path: str, topic: str, rate: float, duration: float, value_size: int,
                seed: int, conn: Any, start: Any, counters: Any) -> None:
    """One client process: paced sends until ``duration`` has passed, then flush and report.

    Reports ``("ready", pid)`` once connected, then ``("result", dict)`` or ``("error", text)``.
    """
    import traceback

    try:
        import shm.producer

        rng = random.Random(seed * 1_000_003 + index)
        alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        values = [bytes(rng.choices(alphabet, k=value_size)) for _ in range(POOL)]
        keys = [rng.randbytes(KEY_SIZE) for _ in range(POOL)]
        base = index * _SLOTS
        window: deque[Any] = deque()
        with shm.producer.Producer(socket_path=socket_path, client_name=f"soak-{index}") as producer:
            producer.partitions_for(topic)
            conn.send(("ready", os.getpid()))
            if not start.wait(120):
                raise TimeoutError("no start signal")
            send, send_many = producer.send, producer.send_many
            perf = time.perf_counter
            sent = 0
            i = 0  # position in the pools
            n_chunks = 0
            t0 = perf()
            end = t0 + duration
            while True:
                j = i + CHUNK
                if n_chunks & 1:
                    window.append((1, send_many(topic, values[i:j], keys[i:j])))
                else:
                    window.append((0, _Chunk([send(topic, values[k], keys[k]) for k in range(i, j)])))
                i = j if j < POOL else 0
                n_chunks += 1
                sent += CHUNK
                counters[base + _SENT] = sent
                _settle(window, counters, base, 0.0)
                now = perf()
                if now >= end:
                    break
                ahead = t0 + sent / rate - now
                if ahead > 0:
                    time.sleep(ahead)
            t_sent = perf()
            left = producer.flush(120)
            _settle(window, counters, base, 30.0)
            t_acked = perf()
        conn.send(("result", {
            "index": index, "sent": sent, "acked": counters[base + _ACKED], "errors": counters[base + _ERRORS],
            "flush_left": left, "send_seconds": t_sent - t0, "ack_seconds": t_acked - t0,
            "achieved_rate": sent / (t_sent - t0),
        }))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent as text
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
    finally:
        conn.close()


def _mem(pid: int) -> tuple[float, float] | None:
    """(RSS MB, USS MB) of ``pid``, or None when it is gone."""
    try:
        p = psutil.Process(pid)
        full = p.memory_full_info()
        return full.rss / 1e6, full.uss / 1e6
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def verdict(series: dict[str, list[tuple[float, float]]], warmup_s: float = WARMUP_S) -> dict[str, Any]:
    """Growth per process from the first sample at or after ``warmup_s`` to the last sample.

    ``series``: name -> [(seconds since start, RSS MB)]. Also a least-squares slope (MB/min)
    over the same span, which a single noisy end sample cannot fake.
    """
    out: dict[str, Any] = {}
    for name, pts in series.items():
        if not pts:
            continue
        after = [p for p in pts if p[0] >= warmup_s] or pts[-1:]
        t_w, r_w = after[0]
        t_e, r_e = pts[-1]
        growth = r_e - r_w
        pct = 100.0 * growth / r_w if r_w else 0.0
        slope = 0.0
        if len(after) >= 3:
            mt = sum(t for t, _ in after) / len(after)
            mr = sum(r for _, r in after) / len(after)
            den = sum((t - mt) ** 2 for t, _ in after)
            slope = 60.0 * sum((t - mt) * (r - mr) for t, r in after) / den if den else 0.0
        out[name] = {
            "rss_start_mb": round(pts[0][1], 2), "rss_warm_mb": round(r_w, 2), "rss_end_mb": round(r_e, 2),
            "rss_max_mb": round(max(r for _, r in pts), 2), "warm_at_s": round(t_w, 1), "end_at_s": round(t_e, 1),
            "growth_mb": round(growth, 2), "growth_pct": round(pct, 2), "slope_mb_per_min": round(slope, 3),
            "flat": growth <= FLAT_MB or pct <= FLAT_PCT,
        }
    return out


def _plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharex=True)
    for name, pts in doc["series"].items():
        ax = axes[1] if name.startswith("client") else axes[0]
        ax.plot([t / 60.0 for t, _r, _u in pts], [r for _t, r, _u in pts], label=name, marker=".", markersize=3)
    for ax, title in zip(axes, ("daemon (supervisor, workers)", "clients")):
        ax.axvline(WARMUP_S / 60.0, color="grey", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("minutes")
        ax.set_ylabel("RSS MB")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    cfg = doc["config"]
    fig.suptitle(f"Sluice soak: {cfg['clients']} clients x {cfg['rate'] / cfg['clients']:,.0f} rec/s, "
                 f"{cfg['workers']} workers, {cfg['duration_s']:.0f} s; achieved {doc['achieved_rate']:,.0f} rec/s; "
                 f"read back {'OK' if doc['readback_ok'] else 'MISMATCH'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_soak(args: argparse.Namespace) -> int:
    """Run one soak; returns the exit status (0 flat and verified, 1 not, 2 setup failure)."""
    from bench.measure import host_info
    from bench.scenarios import Delivery
    from bench.sluice_daemon import SluiceDaemon
    from bench.verify import Topics, count_topic

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    topics = Topics(args.bootstrap)
    try:
        topics.check()
    except Exception as e:  # noqa: BLE001
        print(f"no broker at {args.bootstrap}: {e}", file=sys.stderr)
        return 2
    topic = topics.create("soak", "sluice", args.partitions)
    workdir = Path(tempfile.mkdtemp(prefix="sluice-soak-"))
    daemon = SluiceDaemon(workdir, workers=args.workers, bootstrap=args.bootstrap, delivery=Delivery(), topic=topic)
    ctx = mp.get_context("spawn")
    procs: list[Any] = []
    conns: list[Any] = []
    counters = ctx.Array("q", args.clients * _SLOTS, lock=False)
    start = ctx.Event()
    samples: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    per_client = args.rate / args.clients

    def on_alarm(signum: int, frame: Any) -> None:
        raise _HardTimeout(f"hard timeout of {args.hard_timeout} s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(args.hard_timeout))
    t_start = time.monotonic()
    try:
        daemon.start()
        sup_pid = daemon.proc.pid if daemon.proc else 0
        for k in range(args.clients):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=soak_client, args=(k, daemon.socket_path, topic, per_client, args.duration,
                                                      args.value_size, args.seed, child, start, counters), daemon=True)
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
        for c in conns:
            if not c.poll(60):
                raise TimeoutError("a client did not connect within 60 s")
            kind, val = c.recv()
            if kind != "ready":
                raise RuntimeError(f"client failed before start: {val}")
        t_start = time.monotonic()
        start.set()
        print(f"soak: topic {topic}, {args.clients} clients x {per_client:,.0f} rec/s for {args.duration:.0f} s, "
              f"{args.workers} workers; sampling every {args.interval:.0f} s", flush=True)
        next_t = t_start
        while True:
            now = time.monotonic()
            if now >= next_t:
                elapsed = now - t_start
                row: dict[str, Any] = {"t": round(elapsed, 2), "mem": {}}
                named = [("supervisor", sup_pid)]
                try:
                    kids = psutil.Process(sup_pid).children(recursive=True)
                except psutil.NoSuchProcess:
                    kids = []
                named += [(f"worker{w}", c.pid) for w, c in enumerate(sorted(kids, key=lambda c: c.pid))]
                named += [(f"client{k}", p.pid) for k, p in enumerate(procs) if p.is_alive()]
                for name, pid in named:
                    m = _mem(pid)
                    if m is not None:
                        row["mem"][name] = [pid, round(m[0], 2), round(m[1], 2)]
                vals = list(counters)
                row["sent"] = sum(vals[_SENT::_SLOTS])
                row["acked"] = sum(vals[_ACKED::_SLOTS])
                samples.append(row)
                rss = " ".join(f"{n}={v[1]:.0f}" for n, v in row["mem"].items())
                print(f"  {elapsed:6.0f}s sent={row['sent']:>10,} acked={row['acked']:>10,}  RSS MB: {rss}", flush=True)
                next_t += args.interval
            if all(not p.is_alive() for p in procs) or elapsed > args.duration + 150:
                break
            if any(c.poll() for c in conns) and elapsed < args.duration - 1:
                # A client answering early means it failed; stop sampling a broken run.
                break
            time.sleep(min(0.5, max(0.0, next_t - time.monotonic())))
        for c in conns:
            if c.poll(150):
                kind, val = c.recv()
                (results if kind == "result" else errors).append(val)
            else:
                errors.append("a client never reported")
    except _HardTimeout as e:
        errors.append(str(e))
    except Exception as e:  # noqa: BLE001 - the run is reported, not crashed
        errors.append(f"{type(e).__name__}: {e}")
    finally:
        signal.alarm(0)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
        stats: dict[str, Any] | None = None
        try:
            stats = daemon.stats()
        except Exception:  # noqa: BLE001
            pass
        daemon.stop()
        log_tail = daemon.log_tail(10)
        shutil.rmtree(workdir, ignore_errors=True)

    sent = sum(r["sent"] for r in results)
    acked = sum(r["acked"] for r in results)
    client_errors = sum(r["errors"] for r in results)
    send_s = max((r["send_seconds"] for r in results), default=0.0)
    achieved = sent / send_s if send_s else 0.0
    readback = count_topic(args.bootstrap, topic, timeout=600) if results else None
    readback_ok = bool(readback and readback.complete and readback.records == acked and acked == sent
                       and not client_errors and not errors)
    if not args.keep_topic:
        topics.delete(topic)

    series: dict[str, list[tuple[float, float, float]]] = {}
    for row in samples:
        for name, (_pid, rss, uss) in row["mem"].items():
            series.setdefault(name, []).append((row["t"], rss, uss))
    v = verdict({n: [(t, r) for t, r, _u in pts] for n, pts in series.items()})
    v_uss = verdict({n: [(t, u) for t, _r, u in pts] for n, pts in series.items()})
    flat = bool(v) and all(x["flat"] for x in v.values())
    doc = {
        "kind": "soak",
        "date": stamp,
        "command": " ".join([Path(sys.executable).name, "-m", "bench.soak", *sys.argv[1:]]),
        "config": {"clients": args.clients, "rate": args.rate, "duration_s": args.duration, "workers": args.workers,
                   "partitions": args.partitions, "value_size": args.value_size, "key_size": KEY_SIZE,
                   "chunk": CHUNK, "api": "alternating chunks: send() per record with futures / send_many()",
                   "interval_s": args.interval, "warmup_s": WARMUP_S, "flat_if": f"<= {FLAT_MB} MB or <= {FLAT_PCT}%",
                   "delivery": "acks=1, linger 5 ms, batch 131072, no compression", "topic": topic,
                   "daemon_config": os.path.basename(daemon.config_path)},
        "note": args.note,
        "host": host_info(),
        "clients": results,
        "errors": errors,
        "sent": sent,
        "acked": acked,
        "client_errors": client_errors,
        "achieved_rate": achieved,
        "readback": None if readback is None else {"records": readback.records, "watermark_records": readback.watermark_records,
                                                   "complete": readback.complete, "seconds": round(readback.seconds, 1)},
        "readback_ok": readback_ok,
        "daemon_stats_end": stats,
        "daemon_log_tail": log_tail,
        "verdict_rss": v,
        "verdict_uss": v_uss,
        "flat": flat,
        "series": series,
        "samples": samples,
    }
    json_path = out_dir / f"soak-{stamp}.json"
    png_path = out_dir / f"soak-{stamp}.png"
    json_path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    if series:
        _plot(doc, png_path)

    print(f"\nsent {sent:,}, acked {acked:,}, client errors {client_errors}, achieved {achieved:,.0f} rec/s "
          f"(target {args.rate:,.0f}) over {send_s:.1f} s")
    if readback is not None:
        print(f"read back {readback.records:,} records (watermarks {readback.watermark_records:,}, "
              f"complete={readback.complete}) in {readback.seconds:.1f} s: {'OK' if readback_ok else 'MISMATCH'}")
    for e in errors:
        print(f"ERROR: {e}")
    print(f"\nRSS MB per process (growth from t>={WARMUP_S:.0f}s to the end; flat if <= {FLAT_MB} MB or <= {FLAT_PCT}%):")
    print(f"  {'process':<11} {'start':>8} {'@2min':>8} {'end':>8} {'max':>8} {'growth':>8} {'%':>7} {'MB/min':>8}  USS growth")
    for name, x in v.items():
        u = v_uss.get(name, {})
        print(f"  {name:<11} {x['rss_start_mb']:8.1f} {x['rss_warm_mb']:8.1f} {x['rss_end_mb']:8.1f} {x['rss_max_mb']:8.1f} "
              f"{x['growth_mb']:+8.2f} {x['growth_pct']:+6.1f}% {x['slope_mb_per_min']:+8.3f}  "
              f"{u.get('growth_mb', 0.0):+.2f}  {'flat' if x['flat'] else 'GROWS'}")
    print(f"\nverdict: {'FLAT' if flat else 'NOT FLAT'}; readback {'OK' if readback_ok else 'MISMATCH'}")
    print(f"wrote {json_path}" + (f" and {png_path}" if series else ""))
    return 0 if flat and readback_ok else 1


def main(argv: list[str] | None = None) -> int:
    """Command line entry: ``python -m bench.soak [options]``."""
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", default=os.environ.get("SLUICE_BENCH_BOOTSTRAP", "127.0.0.1:9092"))
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of sending (default 600)")
    ap.add_argument("--clients", type=int, default=4, help="client processes (default 4)")
    ap.add_argument("--rate", type=float, default=20_000.0, help="records/s in total over all clients (default 20,000)")
    ap.add_argument("--workers", type=int, default=2, help="daemon workers (default 2)")
    ap.add_argument("--partitions", type=int, default=12)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between RSS samples (default 5)")
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--results-dir", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--hard-timeout", type=float, default=0.0,
                    help="kill everything after this many seconds (default duration + 300)")
    ap.add_argument("--keep-topic", action="store_true")
    ap.add_argument("--note", default="", help="free text stored in the JSON (e.g. the commit measured)")
    args = ap.parse_args(argv)
    if args.hard_timeout <= 0:
        args.hard_timeout = args.duration + 300
    return run_soak(args)


if __name__ == "__main__":
    sys.exit(main())
