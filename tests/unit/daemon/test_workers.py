"""daemon.workers: a real WorkerPool spawning real processes, with a stand-in worker program.

The stand-in speaks the real channel (daemon/channel.py) but needs no Kafka: it answers Start
with Ready, reports everything it received in its Stats snapshot (so the test reads what the
pool sent through ``pool.stats()``), confirms reloads, and says Bye on Shutdown. Its behaviour
is chosen with environment variables, which the pool passes on like any other.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon import channel as ch
from daemon.config import Config, loads
from daemon.workers import (
    HEARTBEAT_MIN_STALE_S,
    RESTART_BACKOFF_MAX_S,
    Introduction,
    WorkerPool,
    restart_delay,
)

STANDIN = r'''
import os, select, socket, sys
import msgspec
from daemon import channel as ch

mode = os.environ.get("STANDIN_MODE", "ok")
sock = socket.socket(fileno=int(sys.argv[1]))
chan = ch.Channel(sock, ch.ToWorker)
got, fds_got, start, reloads, index = [], 0, None, 0, -1

def stats():
    chan.send(ch.Stats(worker=index, snapshot={
        "pid": os.getpid(), "got": got, "fds": fds_got, "reloads_applied": reloads,
        "recover": start.recover, "clients": start.clients, "workers": start.workers,
        "config_text": start.config_text, "notify": os.environ.get("NOTIFY_SOCKET"),
    }))

while True:
    select.select([sock], [], [], 1.0)
    try:
        msgs = chan.receive()
    except EOFError:
        sys.exit(0)
    for msg, fds in msgs:
        for fd in fds:
            os.close(fd)
        fds_got += len(fds)
        if isinstance(msg, ch.Start):
            start, index = msg, msg.worker
            chan.send(ch.Ready(worker=index))
            if mode == "events":
                chan.send(ch.PartitionCount(topic="t", partitions=4))
                chan.send(ch.ClientDropped(client_id=9, reason="bad ring"))
                chan.send(ch.ClientDetached(client_id=9))
            marker = os.environ.get("STANDIN_MARKER", "") + str(index)
            if mode == "crash_once" and not os.path.exists(marker):
                open(marker, "w").close()
                sys.exit(3)
        elif isinstance(msg, ch.Reload):
            if mode != "deaf":
                reloads += 1
                start = msgspec.structs.replace(start, config_text=msg.config_text)
        elif isinstance(msg, ch.Shutdown):
            chan.send(ch.Bye(worker=index, undelivered=int(os.environ.get("STANDIN_UNDELIVERED", "0"))))
            sys.exit(0)
        got.append(type(msg).__name__)
    if start is not None:
        stats()
'''


class Recorder:
    """The WorkerEvents side: hands out an Introduction and records what the workers reported."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.introduced: list[int] = []
        self.events: list[tuple[Any, ...]] = []

    def introduce(self, worker: int) -> Introduction:
        self.introduced.append(worker)
        return Introduction(
            clients=[5],
            messages=[
                (ch.AddTopic(topic_id=0, name="t", partitions=3), []),
                (ch.AddClient(client_id=5, pid=1, name="c"), [self.fd]),
            ],
        )

    def partitions_changed(self, topic: str, partitions: int) -> None:
        self.events.append(("partitions", topic, partitions))

    def client_dropped(self, client_id: int, reason: str) -> None:
        self.events.append(("dropped", client_id, reason))

    def client_detached(self, client_id: int, worker: int) -> None:
        self.events.append(("detached", client_id, worker))


def _config(text: str = "") -> tuple[Config, str]:
    text = text or '[daemon]\nsocket_path = "/tmp/sluice-test-workers/s.sock"\nworkers = 2\n'
    return loads(text, source="test"), text


async def _until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def _pool(tmp_path: Path, count: int = 2) -> tuple[WorkerPool, Recorder, str]:
    script = tmp_path / "standin_worker.py"
    script.write_text(STANDIN)
    r, w = os.pipe()
    os.close(w)
    config, text = _config()
    rec = Recorder(r)
    pool = WorkerPool(count, config, text, "test.toml", rec, worker_argv=[sys.executable, str(script)])
    return pool, rec, text


async def _drain(pool: WorkerPool, rec: Recorder) -> list[float]:
    kept: list[float] = []
    await pool.drain(10.0, lambda: kept.append(time.monotonic()), 0.01)
    os.close(rec.fd)
    return kept


def test_restart_delay_doubles_from_a_tenth_up_to_the_maximum() -> None:
    assert [restart_delay(n) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.4, 0.8]
    assert restart_delay(8) == RESTART_BACKOFF_MAX_S  # 12.8 s capped
    assert restart_delay(1000) == RESTART_BACKOFF_MAX_S  # no overflow however long the loop


def test_start_introduces_each_worker_then_drains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "@not-for-workers")

    async def main() -> None:
        pool, rec, text = _pool(tmp_path)
        pool.start(recover=False)
        await pool.wait_ready(30.0)
        await _until(lambda: all(len(s.get("got", [])) == 3 for s in pool.stats().values()), what="stats")
        stats = pool.stats()
        assert sorted(rec.introduced) == [0, 1]
        for index in ("0", "1"):
            snap = stats[index]
            # Start first (answered before the loop records it), then the introduction in order.
            assert snap["got"] == ["Start", "AddTopic", "AddClient"]
            assert snap["fds"] == 1  # the AddClient's segment fd came along
            assert snap["clients"] == [5] and snap["workers"] == 2 and snap["recover"] is False
            assert snap["config_text"] == text
            assert snap["notify"] is None  # only the main process talks to systemd
            assert snap["alive"] is True and snap["restarts"] == 0
        assert pool.healthy()
        await _drain(pool, rec)
        assert pool.drained
        assert all(h.chan is None and h.proc is not None and h.proc.returncode == 0 for h in pool.handles)

    asyncio.run(main())


def test_worker_messages_reach_the_events(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STANDIN_MODE", "events")

    async def main() -> None:
        pool, rec, _ = _pool(tmp_path, count=1)
        pool.start(recover=True)
        await pool.wait_ready(30.0)
        await _until(lambda: len(rec.events) == 3, what="events")
        assert rec.events == [("partitions", "t", 4), ("dropped", 9, "bad ring"), ("detached", 9, 0)]
        await _until(lambda: "recover" in pool.stats()["0"], what="stats")
        assert pool.stats()["0"]["recover"] is True  # the previous daemon died: recover at start
        await _drain(pool, rec)

    asyncio.run(main())


def test_crashed_worker_is_restarted_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("STANDIN_MODE", "crash_once")
    monkeypatch.setenv("STANDIN_MARKER", str(tmp_path / "crashed-"))
    caplog.set_level(logging.INFO, logger="sluice.workers")

    async def main() -> None:
        pool, rec, _ = _pool(tmp_path, count=1)
        pool.start(recover=False)
        first = pool.handles[0].proc
        assert first is not None
        await _until(lambda: pool.handles[0].restarts == 1, what="the crash")
        # Between the crash and the restart the worker is the pool's to repair: still healthy.
        assert pool.healthy()
        await _until(lambda: pool.handles[0].proc is not first and pool.handles[0].ready, what="the restart")
        await _until(lambda: "recover" in pool.stats()["0"], what="stats")
        snap = pool.stats()["0"]
        assert snap["recover"] is True  # a restarted worker recovers its predecessor's arena
        assert snap["pid"] == pool.handles[0].proc.pid
        assert pool.restarts == 1
        assert sorted(rec.introduced) == [0, 0]  # the restarted one is introduced again
        await _drain(pool, rec)

    asyncio.run(main())
    assert "worker 0 died (exit 3); restarting in 0.1s" in caplog.text


def test_stale_heartbeat_is_unhealthy(tmp_path: Path) -> None:
    async def main() -> None:
        pool, rec, _ = _pool(tmp_path, count=1)
        assert pool.watch(0.5) == HEARTBEAT_MIN_STALE_S  # never judged faster than 3 beats
        assert pool.watch(7.0) == 7.0
        pool.start(recover=False)
        await pool.wait_ready(30.0)
        assert pool.healthy()
        pool.handles[0].last_beat -= 7.0  # as if it had hung for a watchdog period
        assert not pool.healthy()
        assert pool.stats()["0"]["alive"] is False
        await _drain(pool, rec)

    asyncio.run(main())


def test_reload_is_confirmed_by_every_worker(tmp_path: Path) -> None:
    async def main() -> None:
        pool, rec, _ = _pool(tmp_path)
        pool.start(recover=False)
        await pool.wait_ready(30.0)
        new, text = _config('[daemon]\nsocket_path = "/tmp/sluice-test-workers/s.sock"\nworkers = 2\nlog_level = "debug"\n')
        pool.reload(new, text)
        assert pool.reloads == 1
        assert await pool.wait_reload_applied(10.0)
        assert all(s["config_text"] == text for s in pool.stats().values())
        await _drain(pool, rec)

    asyncio.run(main())


def test_reload_not_confirmed_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STANDIN_MODE", "deaf")

    async def main() -> None:
        pool, rec, _ = _pool(tmp_path, count=1)
        pool.start(recover=False)
        await pool.wait_ready(30.0)
        new, text = _config()
        pool.reload(new, text)
        assert not await pool.wait_reload_applied(0.3)
        await _drain(pool, rec)

    asyncio.run(main())


def test_undelivered_at_bye_is_not_a_clean_drain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STANDIN_UNDELIVERED", "4")

    async def main() -> None:
        pool, rec, _ = _pool(tmp_path, count=1)
        pool.start(recover=False)
        await pool.wait_ready(30.0)
        await _drain(pool, rec)
        assert pool.handles[0].bye
        assert not pool.drained  # the next start must recover

    asyncio.run(main())


def test_exit_during_start_up_fails_wait_ready(tmp_path: Path) -> None:
    from shm.errors import SluiceError

    async def main() -> None:
        script = tmp_path / "dies.py"
        script.write_text("import sys\nsys.exit(5)\n")
        config, text = _config()
        r, w = os.pipe()
        os.close(w)
        pool = WorkerPool(1, config, text, "test.toml", Recorder(r), worker_argv=[sys.executable, str(script)])
        pool.stop_restarts()  # so the exit is seen by wait_ready, not repaired
        pool.start(recover=False)
        with pytest.raises(SluiceError, match="exited with 5 during start-up|did not become ready"):
            await pool.wait_ready(1.0)
        await pool.drain(1.0, lambda: None, 1.0)
        os.close(r)

    asyncio.run(main())
