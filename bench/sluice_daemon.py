"""A Sluice daemon for one benchmark case: config, start, readiness, counters, CPU, stop.

The harness starts a fresh daemon per Sluice case (its worker count is what ``--workers``
sweeps), with one profile that holds the case's delivery settings and one topic rule for the
case's topic. While the daemon cannot be built or started, the case is *unavailable*: reported
as such, never as failed, and never plotted.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

from bench.daemon_process import ROOT, DaemonError, DaemonProcess, config_toml
from bench.scenarios import Delivery

__all__ = ["DaemonUnavailable", "SluiceDaemon", "sluice_unavailable_reason", "produce_requests_from_stats"]

_CHECK = """
import importlib, importlib.util, sys
need = sys.argv[1:]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit("not built yet: " + ", ".join(missing))
for m in need:
    importlib.import_module(m)
if "shm.producer" in need and not hasattr(sys.modules["shm.producer"], "Producer"):
    sys.exit("shm.producer has no Producer")
"""
_NEEDS = {
    "sluice-shm": ("shm.producer", "shm.control", "daemon.cli", "daemon.config"),
    "sluice-socket": ("shm.control", "shm.connection", "daemon.cli", "daemon.config"),
}


class DaemonUnavailable(Exception):
    """The Sluice client library or daemon cannot be used (yet); the message says why."""


def sluice_unavailable_reason(runner: str, *, own_daemon: bool = True) -> str | None:
    """Why a Sluice runner (``sluice-shm`` or ``sluice-socket``) cannot run here, or None.

    Imports in a child process, so a half-written module cannot disturb the harness.
    ``own_daemon`` False (``--daemon-cmd`` given): the daemon's CLI is not required.
    """
    needs = [m for m in _NEEDS[runner] if own_daemon or m != "daemon.cli"]
    proc = subprocess.run([sys.executable, "-c", _CHECK, *needs], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    if proc.returncode == 0:
        return None
    lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else f"import check exited with {proc.returncode}"


def config_text(*, socket_path: str, runtime_dir: str, workers: int, bootstrap: str,
                delivery: Delivery, topic: str, buffer_memory: int | None = None) -> str:
    """The daemon's TOML config for one case: one profile with the case's delivery settings and
    one topic rule for the case's topic; ``buffer_memory`` (bytes per worker) when given."""
    profile = {
        "acks": "all" if delivery.acks == -1 else delivery.acks,  # Kafka's spelling, as a user writes it
        "enable_idempotence": delivery.idempotent,
        "linger_ms": delivery.linger_ms,
        "batch_size": delivery.batch_size,
        "compression_type": delivery.compression,
    }
    # The tls scenario: the delivery's security keys, its secure listener as the bootstrap.
    kafka: dict[str, Any] = dict(delivery.security)
    bootstrap = kafka.pop("bootstrap_servers", bootstrap)
    if buffer_memory:
        kafka["buffer_memory"] = buffer_memory
    return config_toml(socket_path, bootstrap, workers=workers, kafka=kafka or None,
                       daemon={"runtime_dir": runtime_dir, "log_level": "warning", "shutdown_timeout_ms": 10000},
                       profiles={"bench": profile}, topics={topic: "bench"},
                       comment="Written by bench/sluice_daemon.py for one benchmark case.")


def _sum_leaves(stats: Any, names: tuple[str, ...], within: tuple[str, ...] = ()) -> tuple[int, list[str]] | None:
    """Sum the numeric leaves named one of ``names`` (under a path holding one of ``within``),
    taking only the shallowest ones, so a total is not added to the per-worker numbers it sums."""
    found: list[tuple[int, str, float]] = []

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, str(k)))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, (*path, str(i)))
        elif isinstance(node, (int, float)) and not isinstance(node, bool) and path and path[-1] in names:
            if not within or any(any(w in p for w in within) for p in path[:-1]):
                found.append((len(path), ".".join(path), float(node)))

    walk(stats, ())
    if not found:
        return None
    depth = min(d for d, _, _ in found)
    chosen = [(p, v) for d, p, v in found if d == depth]
    return int(sum(v for _, v in chosen)), [p for p, _ in chosen]


def produce_requests_from_stats(stats: dict[str, Any] | None) -> tuple[int, str] | None:
    """The Produce requests the daemon sent, from its stats, and the keys it came from."""
    if not stats:
        return None
    # The daemon's workers count Produce requests as ``requests`` (metadata and producer-id
    # requests have their own names); a total sits shallower than the per-worker numbers.
    hit = (_sum_leaves(stats, ("produce_requests",)) or _sum_leaves(stats, ("requests",), ("sender", "produce"))
           or _sum_leaves(stats, ("requests",)))
    if hit is None:
        return None
    value, paths = hit
    return value, "sluice stats: " + " + ".join(paths[:4]) + (" ..." if len(paths) > 4 else "")


class SluiceDaemon(DaemonProcess):
    """One daemon process and its workers, configured for one case
    (:class:`bench.daemon_process.DaemonProcess` with the case's config, CPU accounting, and
    failures to start reported as :class:`DaemonUnavailable`)."""

    def __init__(self, workdir: Path, *, workers: int, bootstrap: str, delivery: Delivery, topic: str,
                 command: list[str] | None = None, buffer_memory: int | None = None) -> None:
        """``command``: the program to run instead of ``sluice`` (it gets ``run --config FILE``);
        ``buffer_memory``: the workers' arena size (the daemon's default when None)."""
        super().__init__(workdir, socket_name="sluice.sock", command=command)
        self.write_config(config_text(
            socket_path=self.socket_path, runtime_dir=str(workdir), workers=workers,
            bootstrap=bootstrap, delivery=delivery, topic=topic, buffer_memory=buffer_memory))
        self._ps: psutil.Process | None = None

    def start(self, *, wait: bool = True, timeout: float = 30.0) -> SluiceDaemon:
        """Start the daemon and wait until it answers a handshake.

        Raises:
            DaemonUnavailable: the config is refused, the daemon exits, or it never answers.
        """
        check = subprocess.run(
            [sys.executable, "-c", "import sys, daemon.config as c; c.load(sys.argv[1])", self.config_path],
            capture_output=True, text=True, cwd=ROOT, timeout=60)
        if check.returncode != 0:
            raise DaemonUnavailable("config refused: " + _last_line(check.stderr))
        try:
            super().start(wait=False)
            self._ps = psutil.Process(self.pid)
            if wait:
                self.wait_answers(timeout)
        except DaemonError as exc:
            raise DaemonUnavailable(" | ".join(str(exc).strip().splitlines()[-6:])) from None
        return self

    def pids(self) -> list[int]:
        """The daemon and its children (the workers)."""
        if self._ps is None:
            return []
        try:
            return [self._ps.pid, *(c.pid for c in self._ps.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        """User+system CPU of the daemon, its live children and its reaped children."""
        if self._ps is None:
            return 0.0
        try:
            t = self._ps.cpu_times()
            total = t.user + t.system + t.children_user + t.children_system
            for child in self._ps.children(recursive=True):
                try:
                    ct = child.cpu_times()
                    total += ct.user + ct.system
                except psutil.NoSuchProcess:
                    pass
            return total
        except psutil.NoSuchProcess:
            return 0.0

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        """The daemon's counters, asked over its socket (StatsRequest)."""
        from shm.errors import SluiceError

        try:
            return super().stats(timeout)
        except SluiceError as exc:  # an ErrorReply, or the daemon hung up
            raise DaemonUnavailable(f"stats refused: {exc}") from exc

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL to the whole session after ``timeout``; a
        daemon that had to be killed is not the case's failure (the read-back judges it)."""
        try:
            return super().stop(timeout)
        except DaemonError:
            return None

def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"
