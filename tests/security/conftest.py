"""Fixtures for the security tests: a real Kafka node with TLS and SASL listeners.

``secure_kafka`` is the node ``KAFKA_SECURITY=1 scripts/kafka.sh up`` runs on its own ports
(29092..29096, state in ``.run/kafka-secure-29092``, see the script's "The secure node"): reused
when one answers, else started for the session (about 5 s, with SASL sessions of
:data:`REAUTH_MS` so re-authentication happens within a test) and stopped at the end. The
suite's shared broker is never touched. Its ``secure.json`` says where each listener is and
which certificates, users and passwords the clients use.

``secure_reader`` reads a topic back with confluent-kafka (librdkafka: an independent client)
using the same security settings as the daemon under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
KAFKA_SH = ROOT / "scripts" / "kafka.sh"
SECURE_PORT = int(os.environ.get("KAFKA_SECURE_PORT", "29092"))
STATE = ROOT / ".run" / f"kafka-secure-{SECURE_PORT}"
# SASL sessions of a node this fixture starts: short, so a test of a few seconds more sees one end.
REAUTH_MS = 6000


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHON=sys.executable, KAFKA_SECURITY="1", KAFKA_SECURE_PORT=str(SECURE_PORT),
               KAFKA_REAUTH_MS=str(REAUTH_MS))
    for key in ("KAFKA_STATE_DIR", "KAFKA_NODES", "KAFKA_CONTROLLER_PORT", "KAFKA_ADVERTISED_PORT"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="session")
def secure_kafka() -> Iterator[dict[str, Any]]:
    """``secure.json`` of a running secure node (started here if none answers)."""
    env = _env()
    status = subprocess.run([str(KAFKA_SH), "status"], env=env, capture_output=True, text=True, check=False,
                            timeout=30)
    started = False
    if status.returncode != 0:
        up = subprocess.run([str(KAFKA_SH), "up"], env=env, capture_output=True, text=True, check=False,
                            timeout=600)
        if up.returncode != 0:
            pytest.fail(f"could not start the secure Kafka node:\n{up.stderr}", pytrace=False)
        started = True
    if not (STATE / "secure.json").exists():
        pytest.fail(f"a secure Kafka node answers on port {SECURE_PORT}, but not one this checkout started "
                    f"({STATE}/secure.json is missing); stop it or set KAFKA_SECURE_PORT", pytrace=False)
    try:
        yield json.loads((STATE / "secure.json").read_text())
    finally:
        if started:
            subprocess.run([str(KAFKA_SH), "down"], env=env, capture_output=True, check=False, timeout=60)


@pytest.fixture
def secure_topic(secure_kafka: dict[str, Any], request: pytest.FixtureRequest) -> Iterator[Callable[[], str]]:
    """A factory of fresh 2-partition topics on the secure node (created over its PLAINTEXT port)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": secure_kafka["plaintext"]})
    made: list[str] = []

    def make() -> str:
        name = f"sec-{request.node.name[:60].replace('[', '-').replace(']', '')}-{uuid.uuid4().hex[:8]}"
        admin.create_topics([NewTopic(name, num_partitions=2, replication_factor=1)])[name].result(timeout=30)
        deadline = time.monotonic() + 30
        while True:
            md = admin.list_topics(name, timeout=10).topics.get(name)
            if md is not None and md.error is None and len(md.partitions) == 2 and all(
                    p.leader >= 0 for p in md.partitions.values()):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"topic {name} has no leaders after 30 s")
            time.sleep(0.1)
        made.append(name)
        return name

    yield make
    if made:
        for fut in admin.delete_topics(made, operation_timeout=30).values():
            try:
                fut.result(timeout=30)
            except Exception:  # noqa: BLE001 - a leftover topic on a test node is harmless
                pass


def librdkafka_settings(kafka: dict[str, Any]) -> dict[str, Any]:
    """A Sluice ``[kafka]`` table as librdkafka properties (the same security settings)."""
    names = {
        "bootstrap_servers": "bootstrap.servers",
        "security_protocol": "security.protocol",
        "ssl_ca_location": "ssl.ca.location",
        "ssl_certificate_location": "ssl.certificate.location",
        "ssl_key_location": "ssl.key.location",
        "ssl_key_password": "ssl.key.password",
        "ssl_endpoint_identification_algorithm": "ssl.endpoint.identification.algorithm",
        "sasl_mechanism": "sasl.mechanism",
        "sasl_username": "sasl.username",
        "sasl_password": "sasl.password",
    }
    conf: dict[str, Any] = {}
    for key, value in kafka.items():
        if key in names:
            conf[names[key]] = value
        elif key in ("sasl_password_file", "ssl_key_password_file"):
            conf[names[key.removesuffix("_file")]] = Path(value).read_text().rstrip("\n")
    if kafka.get("sasl_mechanism") == "OAUTHBEARER":
        # librdkafka's own unsecured JWS tokens, accepted by the broker's unsecured validator.
        conf["enable.sasl.oauthbearer.unsecure.jwt"] = True
        conf["sasl.oauthbearer.config"] = "principal=reader"
    return conf


@pytest.fixture
def secure_reader() -> Callable[..., list[Any]]:
    """``secure_reader(kafka_table, topic, expected, timeout=30) -> [Message]`` sorted by
    (partition, offset), read from the beginning until ``expected`` and a second more."""
    from helpers import read_back

    def read(kafka: dict[str, Any], topic: str, expected: int, timeout: float = 30.0) -> list[Any]:
        return read_back(librdkafka_settings(kafka), topic, expected, timeout)

    return read
