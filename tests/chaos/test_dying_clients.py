"""Clients that die at the worst moments, SIGKILLed (no Goodbye, no flush, no cleanup):

- mid-frame: records committed, then frames claimed but never published, the last one only
  half written, and the completions of the committed ones still pending (a 300 ms linger):
  exactly the committed records are delivered, once each; nothing of the unpublished frames;
- blocked in send() on a full ring while the broker is unreachable (proxy stalled), so
  hundreds of completions are pending when it dies: after the broker is back, exactly the
  records send() accepted are delivered (a gap-free prefix of its sequence), once each.

Afterwards nothing leaks: ``sluice stats --json`` shows the client count back at its
baseline, the daemon logs each segment as released, the supervisor holds no more descriptors
than before, and no worker restarted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from typing import Any

import pytest
from daemon_fixture import SLUICE
from helpers import wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.integration]


def _stats_json(socket_path: str) -> dict[str, Any]:
    res = subprocess.run([SLUICE, "stats", "--json", "--socket", socket_path], capture_output=True, text=True, timeout=20)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _kill(proc: Any) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL


def test_clients_killed_mid_frame_or_blocked_lose_nothing_and_leak_nothing(broker, start_sluice, topic, read_topic, spawn_ctx) -> None:
    from chaos_util import block_until_killed, die_mid_frame

    name = topic("dying", partitions=3)
    d = start_sluice(
        workers=2,
        daemon={"request_ring_bytes": 65536},
        profiles={p: {"linger_ms": 300, "max_request_size": 60000} for p in ("default", "payments", "clicks")},
    )
    sup = d.proc.pid
    baseline = d.wait_stats(lambda s: s["clients"] >= 1, timeout=10, what="ingest attached")["clients"]
    assert _stats_json(d.socket_path)["clients"] == baseline
    fds_before = len(os.listdir(f"/proc/{sup}/fd"))
    # One queue per doomed process: a process killed right after a put() may die holding the
    # queue's shared write lock, which would silence every other writer of that queue.
    qa, qb = spawn_ctx.Queue(), spawn_ctx.Queue()
    procs = []
    try:
        # 1. Dies mid-frame with its completions pending.
        n = 300
        a = spawn_ctx.Process(target=die_mid_frame, args=(d.socket_path, name, n, qa))
        a.start()
        procs.append(a)
        kind, cid_a, done_at_kill = qa.get(timeout=30)
        _kill(a)
        assert kind == "ready" and done_at_kill < n, "the completions should still be pending at the kill"

        # 2. Dies blocked in send(): the broker is unreachable, so the 64 KiB ring fills up.
        broker.proxy.stall()
        b = spawn_ctx.Process(target=block_until_killed, args=(d.socket_path, name, qb))
        b.start()
        procs.append(b)
        kind, cid_b = qb.get(timeout=30)
        assert kind == "client"
        accepted = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until no progress for 1.5 s: blocked
            try:
                accepted = qb.get(timeout=1.5)[1]
            except Exception:  # noqa: BLE001 - queue.Empty: it stopped reporting
                break
        assert 100 <= accepted < 10_000, accepted  # two 64 KiB rings hold about 3,000
        time.sleep(0.3)
        _kill(b)
        pending_in_daemon = d.stats()["totals"]
        broker.proxy.resume()
    finally:
        broker.proxy.resume()
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)

    # Everything committed is delivered exactly once; nothing unpublished ever is.
    records = read_topic(name, n + accepted, timeout=60)
    values = Counter(r.value for r in records)
    assert max(values.values()) == 1, [v for v, c in values.items() if c > 1][:5]
    committed = {v for v in values if v.startswith(b"committed-")}
    assert committed == {b"committed-%d" % i for i in range(n)}
    blocked = sorted(int(v.split(b"-")[1]) for v in values if v.startswith(b"blocked-"))
    assert blocked == list(range(len(blocked))) and len(blocked) >= accepted, (len(blocked), accepted)
    assert set(values) == committed | {b"blocked-%d" % i for i in blocked}, "an unpublished or torn record was delivered"

    # Nothing leaks: both segments released, the client count and descriptors back to baseline.
    wait_until(lambda: _stats_json(d.socket_path)["clients"] == baseline, 15, "clients back to baseline")
    log = d.log()
    for cid in (cid_a, cid_b):
        assert re.search(rf"client {cid} \(doomed-[a-z-]+\): segment released", log), cid
    wait_until(lambda: len(os.listdir(f"/proc/{sup}/fd")) <= fds_before, 10, "supervisor descriptors back to baseline")
    stats = d.stats()
    assert stats["restarts"] == 0 and all(w["clients"] == baseline for w in stats["workers"].values())
    print(
        f"mid-frame client: {n} committed, {done_at_kill} complete at the kill; blocked client: "
        f"{accepted} reported accepted, {len(blocked)} delivered; records in the daemon when the "
        f"blocked one died: {pending_in_daemon['records_in'] - pending_in_daemon['records_out']}"
    )
