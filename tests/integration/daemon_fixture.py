"""A real ``sluice run`` daemon for integration tests, a socket-protocol connection, and the
client programs that tests start in separate processes (multiprocessing, spawn).

Everything here is bounded in time: a daemon that does not answer, a client that does not
finish or a shutdown that does not end fails the test instead of hanging it.

This module is imported by ``tests/integration/conftest.py`` (which puts this directory on
``sys.path``), so the spawned client processes can import it too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shm import control
from shm.connection import Connection, hello_for
from shm.errors import SluiceError

__all__ = [
    "ROOT",
    "SLUICE",
    "SluiceDaemon",
    "connect",
    "start_daemon",
    "record_of",
    "HEADER_NULL",
    "produce_keyed",
    "send_and_hang",
    "stream_counting",
]

ROOT = Path(__file__).resolve().parents[2]
SLUICE = str(Path(sys.executable).with_name("sluice"))
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 25.0
HEADER_NULL = "nothing"
"""A header every test record carries with a null value (null header values must survive)."""


def connect(path: str, *, name: str = "raw-test-client", timeout: float = 15.0) -> Connection:
    """A socket-protocol connection that has said Hello (``welcome`` holds the reply): the
    client library's :class:`shm.connection.Connection`, which shares only :mod:`shm.control`
    (the message Structs and framing) with the daemon, as a non-Python client would."""
    return Connection(path, hello=hello_for(name), timeout=timeout)


@dataclass
class SluiceDaemon:
    """A running ``sluice run --config FILE`` (its own process group: the daemon and workers)."""

    socket_path: str
    proc: subprocess.Popen[bytes]
    config_path: str
    log_path: str
    workdir: str
    stopped: bool = field(default=False)

    def __iter__(self):  # noqa: ANN204 - (socket path, process, config path), as tests unpack it
        return iter((self.socket_path, self.proc, self.config_path))

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def stats(self) -> dict[str, Any]:
        with connect(self.socket_path, name="test-stats") as c:
            return c.request(control.StatsRequest(), control.StatsReply).stats

    def worker_pids(self) -> list[int]:
        workers = self.stats()["workers"]
        return [int(workers[k]["pid"]) for k in sorted(workers, key=int)]

    def wait_stats(self, pred: Any, timeout: float = 10.0, what: str = "condition") -> dict[str, Any]:
        """Poll stats until ``pred(stats)`` holds; fails with the last stats after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if pred(s):
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not reached in {timeout}s; stats: {json.dumps(s)[:2000]}")
            time.sleep(0.1)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait up to ``timeout``; on timeout kill the group and raise."""
        if self.stopped:
            return self.proc.returncode
        self.stopped = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"daemon did not exit within {timeout}s of SIGTERM; log:\n{self.log()[-6000:]}") from None

    def kill(self) -> None:
        """SIGKILL this daemon's process group (the daemon and its workers, nothing else)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def start_daemon(bootstrap: str, *, workers: int = 2, extra: str = "", daemon_extra: str = "",
                 shutdown_timeout_ms: int = 10_000) -> SluiceDaemon:
    """Write a config in a short temp dir, start ``sluice run``, wait until it answers."""
    workdir = tempfile.mkdtemp(prefix="sl-", dir="/tmp")
    sock = os.path.join(workdir, "s.sock")
    config = os.path.join(workdir, "sluice.toml")
    Path(config).write_text(
        "[daemon]\n"
        f'socket_path = "{sock}"\n'
        f"workers = {workers}\n"
        f"shutdown_timeout_ms = {shutdown_timeout_ms}\n"
        f"{daemon_extra}\n"
        "[kafka]\n"
        f'bootstrap_servers = "{bootstrap}"\n'
        f"{extra}\n"
    )
    log_path = os.path.join(workdir, "daemon.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [SLUICE, "run", "--config", config],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    d = SluiceDaemon(sock, proc, config, log_path, workdir)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"sluice run exited with {proc.returncode} at start:\n{d.log()[-6000:]}")
        try:
            with connect(sock, name="test-probe", timeout=2.0):
                break
        except (OSError, SluiceError):
            pass
        if time.monotonic() > deadline:
            d.kill()
            raise AssertionError(f"sluice did not answer on {sock} within {START_TIMEOUT_S}s:\n{d.log()[-6000:]}")
        time.sleep(0.05)
    return d


# --- client programs (run in spawned processes) ---------------------------------------------


def record_of(client: int, i: int) -> tuple[bytes, bytes, list[tuple[str, bytes | None]], int]:
    """The i-th record of a client: key, value, headers and timestamp, all recognisable."""
    key = b"c%d-k%d" % (client, i % 23)
    value = b"c%d-v%d-" % (client, i) + b"x" * (i % 50)
    headers: list[tuple[str, bytes | None]] = [("client", b"%d" % client), ("seq", b"%d" % i), (HEADER_NULL, None)]
    return key, value, headers, 1_700_000_000_000 + client * 1_000_000 + i


def produce_keyed(socket_path: str, topic: str, client: int, n: int, out: Any) -> None:
    """Send ``n`` keyed records with headers, wait for all, report their RecordMetadata."""
    from shm import Producer

    try:
        with Producer(socket_path, client_name=f"test-client-{client}") as p:
            futs = []
            for i in range(n):
                key, value, headers, ts = record_of(client, i)
                futs.append(p.send(topic, value, key, headers=headers, timestamp=ts))
            metas = [tuple(f.result(timeout=20)) for f in futs]
        out.put((client, "ok", metas))
    except BaseException as exc:  # noqa: BLE001 - reported to the test, which fails on it
        out.put((client, "error", repr(exc)))


def send_and_hang(socket_path: str, topic: str, n: int, out: Any) -> None:
    """Send ``n`` records without flushing, report that they are committed, then sleep (the
    test SIGKILLs this process)."""
    from shm import Producer

    p = Producer(socket_path, client_name="test-doomed")
    for i in range(n):
        key, value, headers, ts = record_of(9, i)
        p.send(topic, value, key, headers=headers, timestamp=ts)
    out.put(("sent", n, p.client_id))
    time.sleep(60)


def stream_counting(socket_path: str, topic: str, n: int, pause_every: int, out: Any) -> None:
    """Send ``n`` records slowly (a short pause every ``pause_every``), count on_delivery
    outcomes, then report (ok, failed, error names)."""
    from shm import Producer

    ok = 0
    failed: dict[str, int] = {}

    def on_delivery(f: Any) -> None:
        nonlocal ok
        exc = f.exception()
        if exc is None:
            ok += 1
        else:
            failed[type(exc).__name__] = failed.get(type(exc).__name__, 0) + 1

    try:
        with Producer(socket_path, client_name="test-stream") as p:
            out.put(("started",))
            futs = []
            for i in range(n):
                futs.append(p.send(topic, b"s-%d" % i, b"k%d" % (i % 11), on_delivery=on_delivery))
                if i % pause_every == pause_every - 1:
                    time.sleep(0.01)
            left = p.flush(30)
            done = sum(1 for f in futs if f.done())
        out.put(("done", ok, failed, left, done))
    except BaseException as exc:  # noqa: BLE001
        out.put(("error", repr(exc)))
