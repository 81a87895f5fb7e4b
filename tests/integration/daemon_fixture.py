"""A real ``sluice run`` daemon for integration tests, a socket-protocol connection, and the
client programs that tests start in separate processes (multiprocessing, spawn).

Everything here is bounded in time: a daemon that does not answer, a client that does not
finish or a shutdown that does not end fails the test instead of hanging it.

This module is imported by ``tests/conftest.py`` (which puts this directory and the repository
root, for :mod:`bench.daemon_process`, on ``sys.path``), so the spawned client processes can
import it too.
"""

from __future__ import annotations

import json
import time
from typing import Any

from bench.daemon_process import ROOT, SLUICE, DaemonProcess, short_tmpdir

from shm.connection import Connection, hello_for

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

HEADER_NULL = "nothing"
"""A header every test record carries with a null value (null header values must survive)."""


def connect(path: str, *, name: str = "raw-test-client", timeout: float = 15.0) -> Connection:
    """A socket-protocol connection that has said Hello (``welcome`` holds the reply): the
    client library's :class:`shm.connection.Connection`, which shares only :mod:`shm.control`
    (the message Structs and framing) with the daemon, as a non-Python client would."""
    return Connection(path, hello=hello_for(name), timeout=timeout)


class SluiceDaemon(DaemonProcess):
    """A running ``sluice run`` (:class:`bench.daemon_process.DaemonProcess`: a failure to start
    or to stop in time raises its DaemonError) with a stats poll for tests."""

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


def start_daemon(bootstrap: str, *, workers: int = 2, daemon: dict[str, Any] | None = None,
                 **settings: Any) -> SluiceDaemon:
    """A config for these settings (:func:`bench.daemon_process.config_toml`'s keywords:
    ``kafka``, ``profiles``, ``topics``; ``daemon`` on top of a 10 s shutdown timeout) in a short
    temp dir, ``sluice run`` started, returned once it answers. The daemon runs in that
    directory, so its arenas are there too."""
    workdir = short_tmpdir()
    d = SluiceDaemon(workdir, cwd=workdir)
    d.configure(bootstrap, workers=workers, daemon={"shutdown_timeout_ms": 10_000, **(daemon or {})}, **settings)
    return d.start()


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
