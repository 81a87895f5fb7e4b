"""Shared fixtures: a real Kafka broker, fresh topics, and an independent reader.

The broker is the pinned Apache Kafka that scripts/kafka.sh runs. When SLUICE_TEST_BOOTSTRAP is
set (``make test`` sets it) that broker is used as it is; otherwise the session starts one on
KAFKA_PORT (default 9092), or reuses one already answering there, and stops only what it started.

The reader is confluent-kafka (librdkafka), never Sluice's own code, so a delivery test cannot be
fooled by a bug shared between the writer and the reader.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent

# Under `make sanitize` the compiled code runs several times slower: no per-example deadline.
settings.register_profile("sanitize", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
KAFKA_SH = ROOT / "scripts" / "kafka.sh"

# The daemon fixture and the client programs live in tests/integration/daemon_fixture.py, the
# helpers every directory shares in tests/helpers.py, the pure-Python frame oracles in
# tests/frames_oracle.py, the daemon runner they build on in
# bench/daemon_process.py (bench/ is not installed); spawned client processes import them by
# these paths too.
for _path in (str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "integration")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import daemon_fixture  # noqa: E402
from bench.daemon_process import DaemonError  # noqa: E402


@dataclass(frozen=True, slots=True)
class ReadRecord:
    """One record as an independent consumer saw it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    timestamp: int


def _kafka_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHON", sys.executable)
    return env


@pytest.fixture(scope="session")
def kafka_bootstrap(suite_kafka_bootstrap: str) -> str:
    """The bootstrap address of a running Kafka broker on 127.0.0.1 (tests/chaos overrides it
    with a broker of its own that it may stop)."""
    return suite_kafka_bootstrap


@pytest.fixture(scope="session")
def suite_kafka_bootstrap() -> Iterator[str]:
    """The suite's shared broker, never stopped by a test; under this name it is not overridden."""
    given = os.environ.get("SLUICE_TEST_BOOTSTRAP")
    if given:
        yield given
        return
    env = _kafka_env()
    running = subprocess.run([str(KAFKA_SH), "status"], env=env, capture_output=True, text=True)
    if running.returncode == 0:
        yield running.stdout.strip()
        return
    up = subprocess.run(
        [str(KAFKA_SH), "up"], env=env, capture_output=True, text=True, timeout=600
    )
    if up.returncode != 0:
        pytest.fail(f"could not start Kafka:\n{up.stderr}", pytrace=False)
    try:
        yield up.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run([str(KAFKA_SH), "down"], env=env, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str):
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": kafka_bootstrap})


@pytest.fixture
def new_topic(kafka_admin, request) -> Iterator[Callable[..., str]]:
    """A factory of fresh topics: ``new_topic(partitions=3, config=None, prefix=None) -> name``.

    The name is ``prefix-<random>`` when a prefix is given (so config rules can match it), else
    made from the test's name. Topics are deleted when the test ends.
    """
    from confluent_kafka.admin import NewTopic

    made: list[str] = []

    def make(partitions: int = 3, config: dict[str, str] | None = None, prefix: str | None = None) -> str:
        if prefix is None:
            prefix = "t-" + request.node.name.replace("[", "-").replace("]", "").replace("/", "-")[:150]
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        futures = kafka_admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})],
            operation_timeout=30,
        )
        futures[name].result(timeout=30)
        _await_leaders(kafka_admin, name, partitions)
        made.append(name)
        return name

    yield make
    if made:
        for fut in kafka_admin.delete_topics(made, operation_timeout=30).values():
            try:
                fut.result(timeout=30)
            except Exception:  # noqa: BLE001 - cleanup must not mask the test's own result
                pass


def _await_leaders(admin, topic: str, partitions: int, timeout: float = 30.0) -> None:
    """Wait until every partition has a leader that serves it.

    Metadata can name a leader before that broker hosts the partition: a Produce sent in that
    gap is refused with NOT_LEADER_OR_FOLLOWER, which an acks=0 producer never learns about (the
    broker just closes the connection). So after the leaders appear, each partition must also
    answer a ListOffsets request, which the leader serves from the same replica state as Produce.
    """
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import OffsetSpec

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        md = admin.list_topics(topic=topic, timeout=5).topics.get(topic)
        if (
            md is not None
            and md.error is None
            and len(md.partitions) == partitions
            and all(p.leader >= 0 for p in md.partitions.values())
        ):
            break
        time.sleep(0.1)
    else:
        raise TimeoutError(f"topic {topic} has no leaders after {timeout}s")
    wanted = {TopicPartition(topic, p): OffsetSpec.latest() for p in range(partitions)}
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            for fut in admin.list_offsets(wanted, request_timeout=5).values():
                fut.result()
            return
        except Exception as exc:  # noqa: BLE001 - NOT_LEADER_OR_FOLLOWER and kin until it is served
            last = exc
            time.sleep(0.05)
    raise TimeoutError(f"topic {topic}: partitions not served after {timeout}s: {last}")


@pytest.fixture
def read_topic(kafka_bootstrap: str) -> Callable[..., list[ReadRecord]]:
    """``read_topic(topic, expected, timeout=30.0) -> list[ReadRecord]``.

    Reads the topic from the beginning with confluent-kafka until ``expected`` records have been
    seen and then a little longer (so extra records, such as duplicates, are caught too), or until
    the timeout. Returns every record, sorted by (partition, offset).
    """
    from helpers import read_back

    def read(topic: str, expected: int, timeout: float = 30.0) -> list[ReadRecord]:
        msgs = read_back({"bootstrap.servers": kafka_bootstrap, "check.crcs": True}, topic, expected, timeout)
        return [
            ReadRecord(topic=msg.topic(), partition=msg.partition(), offset=msg.offset(), key=msg.key(),
                       value=msg.value(), headers=list(msg.headers() or []), timestamp=msg.timestamp()[1])
            for msg in msgs
        ]

    return read


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    # Remembered so the daemon fixture can show the daemon's log when the test failed.
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


@pytest.fixture
def start_sluice(kafka_bootstrap: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., daemon_fixture.SluiceDaemon]]:
    """``start_sluice(**kw) -> SluiceDaemon``: a real ``sluice run`` against ``kafka_bootstrap``
    (the chaos directory's own broker there), configured by :func:`daemon_fixture.start_daemon`'s
    keywords (``workers``, ``daemon``, ``kafka``, ``profiles``, ``topics``). Teardown sends
    SIGTERM and fails the test unless every daemon exits 0 in time; a failed test gets the
    daemons' logs printed."""
    started: list[daemon_fixture.SluiceDaemon] = []

    def start(**kw: Any) -> daemon_fixture.SluiceDaemon:
        d = daemon_fixture.start_daemon(kafka_bootstrap, **kw)
        started.append(d)
        return d

    yield start
    call = getattr(request.node, "rep_call", None)
    if call is not None and call.failed:
        for d in started:
            print(f"--- log of sluice at {d.socket_path} ---\n{d.log()[-20000:]}", file=sys.stderr)
    problems = []
    for d in started:
        try:
            code = d.stop()
        except DaemonError as exc:
            problems.append(str(exc))
            continue
        if code != 0:
            problems.append(f"sluice exited with {code}; log:\n{d.log()[-6000:]}")
        else:
            d.remove()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
