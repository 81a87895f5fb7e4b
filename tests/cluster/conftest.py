"""Fixtures for the cluster tests: a real three-broker KRaft cluster.

``SLUICE_TEST_CLUSTER=127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094`` names a running cluster
(``KAFKA_NODES=3 make kafka-up`` starts one); otherwise the session starts one with
``KAFKA_NODES=3 scripts/kafka.sh up`` (about 7 s), or reuses one this checkout already runs,
and stops only what it started. The suite's shared single broker is never touched.

Tests that kill, stop or restart brokers need the nodes' pid files, which only a cluster started
from this checkout has (``.run/kafka-cluster-19092``): :attr:`Cluster.controllable` says so and
those tests skip otherwise.

This directory overrides ``kafka_bootstrap`` and ``kafka_admin`` (session scope), so the root
conftest's ``read_topic`` and ``start_sluice`` work against the cluster; ``cluster_topic`` makes
topics replicated to every broker (RF 3, min.insync.replicas 2).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_HERE = Path(__file__).resolve().parent
for _path in (str(_HERE), str(_HERE.parent / "chaos")):
    if _path not in sys.path:
        sys.path.insert(0, _path)  # cluster_util; chaos_util's SendLoop and exactly-once check

from cluster_util import CLUSTER_PORT, KAFKA_SH, NODES, STATE_DIR, Cluster, await_served  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cluster: needs the three-broker cluster (tests/cluster)")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHON=sys.executable, KAFKA_NODES=str(NODES), KAFKA_CLUSTER_PORT=str(CLUSTER_PORT))
    env.pop("KAFKA_STATE_DIR", None)
    return env


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    env = _env()
    given = os.environ.get("SLUICE_TEST_CLUSTER")
    if given:
        yield Cluster(given, env, controllable=(STATE_DIR / "node1" / "pid").exists())
        return
    status = subprocess.run([str(KAFKA_SH), "status"], env=env, capture_output=True, text=True, check=False,
                            timeout=30)
    if status.returncode == 0:
        yield Cluster(status.stdout.strip(), env, controllable=(STATE_DIR / "node1" / "pid").exists())
        return
    up = subprocess.run([str(KAFKA_SH), "up"], env=env, capture_output=True, text=True, check=False, timeout=600)
    if up.returncode != 0:
        pytest.fail(f"could not start the cluster:\n{up.stderr[-4000:]}", pytrace=False)
    c = Cluster(up.stdout.strip().splitlines()[-1], env, controllable=True, started_here=True)
    try:
        yield c
    finally:
        subprocess.run([str(KAFKA_SH), "down"], env=env, capture_output=True, check=False, timeout=60)


@pytest.fixture(scope="session")
def kafka_bootstrap(cluster: Cluster) -> str:
    """Overrides the root fixture: the cluster."""
    return cluster.bootstrap


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str) -> Any:
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": kafka_bootstrap})


@pytest.fixture
def controlled(cluster: Cluster) -> Iterator[Cluster]:
    """The cluster for a test that kills or stops nodes: skipped unless this checkout runs it;
    every node runs again after the test."""
    if not cluster.controllable:
        pytest.skip("the cluster was not started from this checkout: its nodes cannot be stopped")
    cluster.ensure_all_up()
    yield cluster
    cluster.ensure_all_up()


@pytest.fixture
def cluster_topic(kafka_admin: Any, request: pytest.FixtureRequest) -> Iterator[Callable[..., str]]:
    """``cluster_topic(prefix, partitions=6, config=None) -> name``: a topic replicated to all
    three brokers with min.insync.replicas 2, every partition led and served; deleted after."""
    from confluent_kafka.admin import NewTopic

    made: list[str] = []

    def make(prefix: str, partitions: int = 6, config: dict[str, str] | None = None) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        conf = {"min.insync.replicas": "2", **(config or {})}
        fut = kafka_admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=NODES,
                                                  config=conf)], operation_timeout=30)[name]
        fut.result(timeout=30)
        await_served(kafka_admin, name, partitions)
        made.append(name)
        return name

    yield make
    if made:
        for fut in kafka_admin.delete_topics(made, operation_timeout=30).values():
            try:
                fut.result(timeout=30)
            except Exception:  # noqa: BLE001, S110 - cleanup must not mask the test's own result
                pass


