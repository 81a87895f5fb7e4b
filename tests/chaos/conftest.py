"""Fixtures for the chaos tests: a broker of their own behind a fault-injecting proxy.

The suite's shared broker (9092 by default) is used by other tests and must never be stopped or
disturbed, so these tests start their own with ``scripts/kafka.sh`` (``KAFKA_PORT`` 19292, its
own state directory) whose advertised listener is the port of :class:`proxy.FaultProxy`
(19294): every connection to it, from the daemon and from the independent reader, goes through
the proxy.
``chaos_broker.stop()`` / ``start()`` take the broker down and bring it back *with its data*
(``kafka.sh stop`` / ``start``).

This directory overrides ``kafka_bootstrap`` and ``kafka_admin`` (session scope), so the root
conftest's ``new_topic`` and ``read_topic`` work against the chaos broker. ``start_sluice(**kw)``
starts a real ``sluice run`` against it (same teardown rules as tests/integration: SIGTERM must
exit 0).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))  # chaos_util and proxy; tests/conftest.py adds the others

from proxy import FaultProxy  # noqa: E402

ROOT = _HERE.parents[1]
KAFKA_SH = ROOT / "scripts" / "kafka.sh"
BROKER_PORT = int(os.environ.get("SLUICE_CHAOS_KAFKA_PORT", "19292"))
CONTROLLER_PORT = BROKER_PORT + 1
PROXY_PORT = BROKER_PORT + 2
STATE_DIR = ROOT / ".run" / f"kafka-chaos-{BROKER_PORT}"


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class ChaosBroker:
    """The chaos tests' own broker and the proxy in front of it."""

    bootstrap: str
    proxy: FaultProxy
    env: dict[str, str]

    def _run(self, cmd: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([str(KAFKA_SH), cmd], env=self.env, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise AssertionError(f"kafka.sh {cmd} failed ({res.returncode}):\n{res.stderr[-4000:]}")
        return res

    def stop(self) -> None:
        """Stop the broker, keeping its data (an outage)."""
        self._run("stop")

    def start(self) -> None:
        """Start it again with the data it had; returns once it answers."""
        self._run("start")

    def clear_faults(self) -> None:
        p = self.proxy
        p.set_latency(0)
        p.resume()
        p._mid_request = 0
        p._after_request = 0


@pytest.fixture(scope="session")
def chaos_broker() -> Iterator[ChaosBroker]:
    for port in (BROKER_PORT, CONTROLLER_PORT, PROXY_PORT):
        if _port_busy(port):
            pytest.fail(f"port {port} is taken: the chaos tests need 127.0.0.1:{BROKER_PORT}..{PROXY_PORT}", pytrace=False)
    env = dict(os.environ)
    env.update(
        PYTHON=sys.executable,
        KAFKA_PORT=str(BROKER_PORT),
        KAFKA_CONTROLLER_PORT=str(CONTROLLER_PORT),
        KAFKA_ADVERTISED_PORT=str(PROXY_PORT),
        KAFKA_STATE_DIR=str(STATE_DIR),
        KAFKA_HEAP="512m",
    )
    proxy = FaultProxy(PROXY_PORT, BROKER_PORT).start()
    broker = ChaosBroker(f"127.0.0.1:{PROXY_PORT}", proxy, env)
    try:
        res = subprocess.run([str(KAFKA_SH), "up"], env=env, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            pytest.fail(f"could not start the chaos broker:\n{res.stderr[-4000:]}", pytrace=False)
        yield broker
    finally:
        proxy.close()
        subprocess.run([str(KAFKA_SH), "down"], env=env, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def kafka_bootstrap(chaos_broker: ChaosBroker) -> str:
    """Overrides the root fixture: the chaos broker, through the proxy."""
    return chaos_broker.bootstrap


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str) -> Any:
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": kafka_bootstrap})


@pytest.fixture
def broker(chaos_broker: ChaosBroker) -> Iterator[ChaosBroker]:
    """The chaos broker, with every proxy fault cleared before and after the test (and the
    broker running again if the test stopped it)."""
    chaos_broker.clear_faults()
    yield chaos_broker
    chaos_broker.clear_faults()
    if subprocess.run([str(KAFKA_SH), "status"], env=chaos_broker.env, capture_output=True).returncode != 0:
        chaos_broker.start()


@pytest.fixture
def topic(new_topic: Callable[..., str]) -> Callable[..., str]:
    """``topic(prefix, partitions=3) -> name``: the root ``new_topic`` on this directory's
    ``kafka_admin``, named ``prefix-<random>`` so config rules can match the prefix."""
    return lambda prefix, partitions=3: new_topic(partitions, prefix=prefix)


@pytest.fixture(scope="session")
def spawn_ctx() -> Any:
    """A multiprocessing context that spawns (no fork of a process with threads)."""
    import multiprocessing

    return multiprocessing.get_context("spawn")
