"""Measurements the harness takes around a case: RSS sampling, percentiles, host and versions."""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import re
import socket
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

__all__ = ["RssSampler", "percentiles", "host_info", "versions", "broker_cpu_seconds", "machine_busy_seconds"]


class RssSampler:
    """Samples the summed RSS of a changing set of process trees every ``interval`` seconds.

    ``roots`` is called at each sample and returns the pids whose trees (children included,
    recursively) are summed; the peak of those sums is kept. Sampling misses short spikes, and
    a sum of resident sets double-counts shared pages (the daemon's arena and the clients' rings
    are shared memory), so the figure is an upper bound of what the case held at once.
    """

    def __init__(self, roots: Callable[[], Sequence[int]], interval: float = 0.1) -> None:
        self._roots = roots
        self._interval = interval
        self._stop = threading.Event()
        self._procs: dict[int, psutil.Process] = {}
        self.peak_bytes = 0
        self.samples = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _proc(self, pid: int) -> psutil.Process:
        p = self._procs.get(pid)
        if p is None:
            p = self._procs[pid] = psutil.Process(pid)
        return p

    def sample(self) -> int:
        """One sample now: the summed RSS in bytes."""
        seen: set[int] = set()
        total = 0
        for pid in list(self._roots()):
            try:
                root = self._proc(pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for p in tree:
                if p.pid in seen:
                    continue
                seen.add(p.pid)
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        self.samples += 1
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()


def percentiles(samples: Sequence[float], qs: Sequence[float] = (50.0, 99.0, 99.9)) -> list[float] | None:
    """Nearest-rank percentiles of ``samples`` (None when there are none)."""
    if not samples:
        return None
    ordered = sorted(samples)
    n = len(ordered)
    # The epsilon keeps float noise (99.9 / 100 * 1000 = 999.0000000000001) from moving a rank.
    return [ordered[min(n - 1, max(0, math.ceil(q * n / 100.0 - 1e-9) - 1))] for q in qs]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_info() -> dict[str, Any]:
    """The machine: host name, CPU model, cores, memory, OS, Python."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return {
        "hostname": socket.gethostname(),
        "cpu_model": _cpu_model(),
        "cores_logical": psutil.cpu_count(logical=True),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_usable": usable,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
    }


def _dist(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions(root: Path) -> dict[str, Any]:
    """Versions of everything compared: Python packages, librdkafka, Java, Kafka."""
    out: dict[str, Any] = {
        name: _dist(name)
        for name in ("sluice", "confluent-kafka", "aiokafka", "msgspec", "uvloop", "psutil", "crc32c", "cramjam",
                     "matplotlib", "numpy")
    }
    try:
        import confluent_kafka

        out["librdkafka"] = confluent_kafka.libversion()[0]
    except ImportError:
        out["librdkafka"] = None
    try:
        java = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30)
        out["java"] = (java.stderr or java.stdout).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        out["java"] = None
    kafka = None
    for jar in sorted((root / "kafka" / ".jars").glob("kafka-clients-*.jar")):
        m = re.match(r"kafka-clients-(.+)\.jar$", jar.name)
        if m:
            kafka = m.group(1)
    out["kafka"] = kafka
    out["kafka_note"] = ("version of the pinned jars in kafka/.jars (scripts/kafka.sh runs the broker from them;"
                         " ProducerPerformance and the Java client are the same version)")
    try:
        out["sluice_git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           cwd=root, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["sluice_git"] = None
    return out


def broker_cpu_seconds(bootstrap: str) -> float | None:
    """User+system CPU seconds so far of the broker processes listening on ``bootstrap``'s
    127.0.0.1 ports (None when none is found: a remote broker, or no permission)."""
    ports = {int(hp.rsplit(":", 1)[1]) for hp in bootstrap.split(",") if ":" in hp}
    total, found = 0.0, False
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return None
    pids = {c.pid for c in conns if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port in ports and c.pid}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
        found = True
    return total if found else None


def machine_busy_seconds() -> float:
    """CPU seconds every core of the host spent busy so far (all processes: the broker, the
    daemon, the clients, anything else)."""
    t = psutil.cpu_times()
    # Linux counts guest time inside user (and guest_nice inside nice) already.
    not_busy = t.idle + getattr(t, "iowait", 0.0) + getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)
    return sum(t) - not_busy
