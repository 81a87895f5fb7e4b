"""The end-to-end demo behind ``make demo``.

With a Kafka broker already answering at $SLUICE_BOOTSTRAP (make demo starts one), it:
creates a fresh topic, starts the daemon, sends records from several client processes over
shared memory and through the Unix socket (``sluice send``), prints returned offsets and the
daemon's stats, reads the topic back with confluent-kafka (an independent client) and checks
the counts match, then stops the daemon with SIGTERM (graceful drain) and checks it exited 0.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not installed

from bench.daemon_process import SLUICE, DaemonError, DaemonProcess, short_tmpdir  # noqa: E402

CLIENTS = 4
PER_CLIENT = 50_000
SOCKET_LINES = 2_000
PARTITIONS = 6


def say(msg: str) -> None:
    print(f"\033[1m==> {msg}\033[0m", flush=True)


def client(socket_path: str, topic: str, index: int, count: int, out: mp.Queue) -> None:
    from shm import Producer

    t0 = time.perf_counter()
    with Producer(socket_path, client_name=f"demo-client-{index}") as producer:
        values = [f"client {index} record {i}".encode() for i in range(count)]
        keys = [f"user-{(index * 7919 + i) % 1000}".encode() for i in range(count)]
        futures = producer.send_many(topic, values, keys)
        left = producer.flush(60)
        elapsed = time.perf_counter() - t0
        first, last = futures[0].result(1), futures[-1].result(1)
        failed = sum(1 for f in futures if f.exception(0) is not None)
    out.put((index, count, failed, left, elapsed, first, last))


def read_back(bootstrap: str, topic: str, expected: int, timeout: float = 60.0) -> dict[int, int]:
    from confluent_kafka import Consumer, KafkaError

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"demo-reader-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    consumer.subscribe([topic])
    counts: dict[int, int] = {}
    total = 0
    deadline = time.monotonic() + timeout
    settle: float | None = None
    try:
        while time.monotonic() < deadline:
            if settle is None and total >= expected:
                settle = time.monotonic() + 1.0  # linger a moment to catch any extra record
            if settle is not None and time.monotonic() > settle:
                break
            for msg in consumer.consume(10_000, 0.2):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise SystemExit(f"reader error: {err}")
                counts[msg.partition()] = counts.get(msg.partition(), 0) + 1
                total += 1
    finally:
        consumer.close()
    return counts


def main() -> int:
    bootstrap = os.environ.get("SLUICE_BOOTSTRAP", "127.0.0.1:9092")
    sluice = SLUICE
    topic = f"sluice-demo-{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:4]}"

    from confluent_kafka.admin import AdminClient, NewTopic

    say(f"creating topic {topic} ({PARTITIONS} partitions) on {bootstrap}")
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result(30)

    daemon = DaemonProcess(short_tmpdir("sluice-demo-"), socket_name="sluice.sock")
    # The built-in payments profile: acks=all, idempotent, block when full.
    daemon.configure(bootstrap, workers=2, daemon={"log_level": "info"}, topics={"sluice-demo-*": "payments"})
    sock_path = daemon.socket_path
    say(f"starting the daemon: sluice run --config {daemon.config_path}  (log: {daemon.log_path})")
    ok = False
    try:
        try:
            daemon.start(timeout=60)
        except DaemonError as exc:
            raise SystemExit(f"the daemon did not start: {exc}") from None

        say(f"{CLIENTS} client processes send {PER_CLIENT:,} keyed records each over shared memory")
        ctx = mp.get_context("spawn")
        out: mp.Queue = ctx.Queue()
        procs = [ctx.Process(target=client, args=(sock_path, topic, i, PER_CLIENT, out)) for i in range(CLIENTS)]
        t0 = time.perf_counter()
        for p in procs:
            p.start()
        results = [out.get(timeout=180) for _ in procs]
        for p in procs:
            p.join(30)
        wall = time.perf_counter() - t0
        shm_ok = 0
        for index, count, failed, left, elapsed, first, last in sorted(results):
            shm_ok += count - failed
            print(
                f"   client {index}: {count:,} sent, {failed} failed, {left} pending, {elapsed:.2f}s"
                f" | first -> partition {first.partition} offset {first.offset}"
                f" | last -> partition {last.partition} offset {last.offset}"
            )
        print(f"   {CLIENTS * PER_CLIENT:,} records in {wall:.2f}s wall, including process start-up")

        say(f"{SOCKET_LINES:,} lines through the Unix socket: sluice send -t {topic} -K : --acks")
        lines = "".join(f"socket-key-{i % 50}:line {i}\n" for i in range(SOCKET_LINES)).encode()
        send = subprocess.run(
            [sluice, "send", "-t", topic, "-K", ":", "--acks", "--socket", sock_path],
            input=lines,
            capture_output=True,
            timeout=120,
        )
        print("   " + send.stderr.decode().strip().replace("\n", "\n   "))
        if send.returncode != 0:
            raise SystemExit("sluice send failed")

        time.sleep(1.2)  # one heartbeat, so the stats include the last acks
        say("sluice stats")
        subprocess.run([sluice, "stats", "--socket", sock_path], timeout=30, check=True)

        expected = shm_ok + SOCKET_LINES
        say(f"reading {topic} back with confluent-kafka (an independent client)")
        counts = read_back(bootstrap, topic, expected)
        total = sum(counts.values())
        for p in sorted(counts):
            print(f"   partition {p}: {counts[p]:,} records")
        print(f"   read {total:,} records; expected {expected:,} ({shm_ok:,} over shared memory + {SOCKET_LINES:,} over the socket)")
        ok = total == expected
        print(f"\033[1m   {'MATCH' if ok else 'MISMATCH'}\033[0m")
    finally:
        say("stopping the daemon with SIGTERM (graceful drain)")
        try:
            code = daemon.stop(60)
        except DaemonError:
            code = "killed: no exit within 60 s of SIGTERM"
        print(f"   daemon exited with status {code}")
        ok = ok and code == 0
        if not ok:
            print(f"--- last lines of {daemon.log_path}:")
            print(daemon.log_tail(30))
        try:
            admin.delete_topics([topic])[topic].result(30)
        except Exception:  # noqa: BLE001 - the demo's verdict is already known
            pass
        daemon.remove()
    say("demo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
