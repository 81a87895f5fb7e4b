"""``python -m bench.ingest_cpu``: the socket ingest's own CPU per record, apart from the workers'.

``python -m bench`` reports a Sluice case's daemon CPU as one figure (the supervisor and its
workers together). Socket ingest runs in the supervisor, so this starts a daemon with one worker
(bench/sluice_daemon.py) against the broker, creates a fresh topic of 12 partitions, and sends
``--records`` records over one socket connection as the bench's socket runner frames them
(Produce frames of 128 records, every 8th acknowledged; 100-byte values, 16-byte keys with
``--keyed``), encoded before timing. It prints records/s and the CPU per record of the
supervisor process and of the workers (psutil, 10 ms resolution: use 1M records or more), and
reads the topic back (confluent-kafka) to check every record arrived; exit status 1 if not.

``--attach 'CMD {pid}'`` runs a profiler on the supervisor for the timed part, e.g.
``--attach 'perf record -g -p {pid} -o /tmp/ingest.perf'`` (it is sent SIGINT at the end).
Short runs only on a shared machine: 1-3M records take a few seconds.
"""

from __future__ import annotations

import argparse
import random
import shlex
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

__all__ = ["main"]

FRAME = 128  # records per Produce, as bench/sluice_socket.py
ACK_EVERY = 8
PARTITIONS = 12
_ATTACH_SETTLE_S = 1.5  # a profiler attaching before the timed part starts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ingest_cpu", description=__doc__.splitlines()[0])
    p.add_argument("--bootstrap", default="127.0.0.1:9092")
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--keyed", action="store_true", help="16-byte keys (65,536 distinct)")
    p.add_argument("--seed", type=int, default=20240601)
    p.add_argument("--attach", metavar="CMD", help="a profiler command run on the supervisor, {pid} replaced")
    args = p.parse_args(argv)

    import psutil

    from bench.scenarios import Delivery
    from bench.sluice_daemon import SluiceDaemon
    from bench.verify import Topics, count_topic
    from shm import control
    from shm.connection import Connection, hello_for

    topics = Topics(args.bootstrap)
    topic = topics.create("ingest-cpu", "socket", PARTITIONS)
    daemon = SluiceDaemon(Path(tempfile.mkdtemp(prefix="sl-ic-", dir="/tmp")), workers=1, bootstrap=args.bootstrap,
                          delivery=Delivery(), topic=topic).start()
    try:
        rng = random.Random(args.seed)
        values = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz0123456789", k=100)) for _ in range(4096)]
        keys = [rng.randbytes(16) for _ in range(65536)] if args.keyed else None
        n = args.records
        frames = []
        for no, start in enumerate(range(0, n, FRAME), 1):
            recs = [control.Rec(key=keys[i % len(keys)] if keys else None, value=values[i % len(values)])
                    for i in range(start, min(start + FRAME, n))]
            frames.append(control.encode(control.Produce(topic=topic, records=recs, ack=no % ACK_EVERY == 0, seq=no)))
        conn = Connection(daemon.socket_path, hello=hello_for("bench-ingest-cpu"), timeout=None)
        conn.request(control.TopicLookup(topic=topic), control.TopicInfo)
        done = threading.Event()
        failed = [0]

        def replies() -> None:
            while not done.is_set():
                for msg in conn.recv_available():
                    if isinstance(msg, control.FlushDone):
                        failed[0] = msg.failed
                        done.set()

        threading.Thread(target=replies, daemon=True).start()
        supervisor = psutil.Process(daemon.pid)
        workers = supervisor.children(recursive=True)

        def cpu(procs: list[psutil.Process]) -> float:
            return sum(t.user + t.system for t in (q.cpu_times() for q in procs))

        profiler = None
        if args.attach:
            profiler = subprocess.Popen(shlex.split(args.attach.format(pid=daemon.pid)))
            time.sleep(_ATTACH_SETTLE_S)
        s0, w0, t0 = cpu([supervisor]), cpu(workers), time.monotonic()
        for frame in frames:
            conn.send_raw(frame)
        conn.send(control.Flush(timeout_ms=120_000))
        if not done.wait(130):
            print("no FlushDone")
            return 1
        t1, s1, w1 = time.monotonic(), cpu([supervisor]), cpu(workers)
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(30)
        conn.close()
        back = count_topic(args.bootstrap, topic)
        print(f"{'keyed' if keys else 'unkeyed'}, {n:,} records: {n / (t1 - t0):,.0f} records/s; supervisor "
              f"{1e9 * (s1 - s0) / n:.0f} ns/record, workers {1e9 * (w1 - w0) / n:.0f} ns/record; failed {failed[0]}, "
              f"read back {back.records:,}")
        return 0 if failed[0] == 0 and back.records == n else 1
    finally:
        daemon.stop()
        topics.delete(topic)


if __name__ == "__main__":
    raise SystemExit(main())
