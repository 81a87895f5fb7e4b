"""The three-broker cluster as the tests see it: node control and metadata checks.

Shared by tests/cluster/conftest.py (the fixtures) and the test modules.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CLUSTER_PORT", "KAFKA_SH", "NODES", "STATE_DIR", "Cluster", "await_served", "leaders"]

ROOT = Path(__file__).resolve().parents[2]
KAFKA_SH = ROOT / "scripts" / "kafka.sh"
NODES = 3
CLUSTER_PORT = 19092
STATE_DIR = ROOT / ".run" / f"kafka-cluster-{CLUSTER_PORT}"


@dataclass
class Cluster:
    """The three-broker cluster and, when this checkout started it, control of its nodes."""

    bootstrap: str
    env: dict[str, str]
    controllable: bool
    started_here: bool = False
    events: list[str] = field(default_factory=list)

    def _sh(self, *args: str, timeout: float = 120.0) -> str:
        res = subprocess.run([str(KAFKA_SH), *args], env=self.env, capture_output=True, text=True,
                             check=False, timeout=timeout)
        if res.returncode != 0:
            raise AssertionError(f"kafka.sh {' '.join(args)} failed ({res.returncode}):\n{res.stderr[-4000:]}")
        return res.stdout

    def kill(self, node: int) -> None:
        """SIGKILL the node (its data stays)."""
        self.events.append(f"{time.monotonic():.3f} kill {node}")
        self._sh("kill", str(node))

    def stop(self, node: int) -> None:
        """SIGTERM the node (a controlled shutdown; its data stays)."""
        self.events.append(f"{time.monotonic():.3f} stop {node}")
        self._sh("stop", str(node))

    def start(self, node: int) -> None:
        """Start the node again with its data; returns once it answers and lists every node."""
        self.events.append(f"{time.monotonic():.3f} start {node}")
        self._sh("start", str(node))

    def pause(self, node: int) -> None:
        """SIGSTOP the node: a stall (a frozen VM, a long GC pause) with its connections open."""
        self.events.append(f"{time.monotonic():.3f} pause {node}")
        os.kill(self._pid(node), signal.SIGSTOP)

    def resume(self, node: int) -> None:
        """SIGCONT a paused node."""
        self.events.append(f"{time.monotonic():.3f} resume {node}")
        os.kill(self._pid(node), signal.SIGCONT)

    def _pid(self, node: int) -> int:
        pid = self.pid(node)
        if pid is None:
            raise AssertionError(f"node {node} has no pid file")
        return pid

    def pid(self, node: int) -> int | None:
        try:
            return int((STATE_DIR / f"node{node}" / "pid").read_text())
        except (OSError, ValueError):
            return None

    def ensure_all_up(self) -> None:
        """Start whichever node a test left stopped."""
        for node in range(1, NODES + 1):
            if subprocess.run([str(KAFKA_SH), "start", str(node)], env=self.env, capture_output=True,
                              check=False, timeout=120).returncode != 0:
                raise AssertionError(f"node {node} did not come back")


def await_served(admin: Any, topic: str, partitions: int, timeout: float = 30.0) -> None:
    """Every partition has a leader, a full ISR, and answers ListOffsets."""
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import OffsetSpec

    deadline = time.monotonic() + timeout
    while True:
        md = admin.list_topics(topic=topic, timeout=5).topics.get(topic)
        if md is not None and md.error is None and len(md.partitions) == partitions and all(
                p.leader >= 0 and len(p.isrs) == NODES for p in md.partitions.values()):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"topic {topic}: partitions not all led with a full ISR after {timeout}s")
        time.sleep(0.1)
    wanted = {TopicPartition(topic, p): OffsetSpec.latest() for p in range(partitions)}
    # A client's view of the leaders lags the cluster's a little: this phase gets its own time.
    deadline = max(deadline, time.monotonic() + 20.0)
    while True:
        try:
            for fut in admin.list_offsets(wanted, request_timeout=5).values():
                fut.result()
            return
        except Exception:  # noqa: BLE001 - NOT_LEADER_OR_FOLLOWER and kin until it is served
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def leaders(admin: Any, topic: str) -> dict[int, int]:
    """partition -> leader node id (-1 when none), from the cluster's metadata."""
    md = admin.list_topics(topic=topic, timeout=5).topics[topic]
    return {p: m.leader for p, m in md.partitions.items()}
