"""The benchmark scenarios: what is produced, by how many clients, with which delivery settings.

A :class:`Scenario` is runner-neutral. Each runner translates its :class:`Delivery` into its own
option names (``bench/peers/*.py``, ``bench/sluice_*.py``) and records the translation in the
results, so a reader can check that the peers were configured alike.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Delivery",
    "Scenario",
    "SCENARIO_NAMES",
    "DEFAULT_RECORDS",
    "QUICK_RECORDS",
    "QUICK_DEADLINE_S",
    "PARTITIONS",
    "BATCH_SIZE",
    "scenarios_for",
    "TLS_RUNNERS",
    "secure_node",
    "tls_unavailable_reason",
    "librdkafka_security",
]

DEFAULT_RECORDS = 1_000_000
"""Records of a full single-client case (``--records`` overrides)."""
QUICK_RECORDS = 50_000
"""Records of a ``--quick`` single-client case."""
QUICK_DEADLINE_S = 15.0
"""Under ``--quick`` clients stop sending after this long (the case then flushes and is checked)."""
PARTITIONS = 12
"""Partitions of every case's fresh topic: at least the worker counts one would sweep."""
BATCH_SIZE = 131_072
"""batch.size for every runner (librdkafka's own default is 1 MB, Java's 16 KiB: one value for all)."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """Producer settings every runner applies under its own option names."""

    acks: int = 1  # 0, 1 or -1 (= all)
    idempotent: bool = False
    linger_ms: int = 5
    batch_size: int = BATCH_SIZE
    compression: str = "none"  # none, lz4, zstd, ...
    # Security to the brokers as Sluice's [kafka] keys (bootstrap_servers included: the secure
    # listener); empty = PLAINTEXT to --bootstrap. Peers translate them (librdkafka_security).
    security: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class Scenario:
    """One benchmark case shape, before it is paired with a runner.

    Attributes:
        name: the scenario as ``--scenario`` names it (``compressed`` has two variants).
        label: name plus variant, unique in one invocation (``compressed-lz4``).
        clients: producer processes sending at once.
        records: records in total, over all clients.
        value_size: bytes of each value.
        key_size: bytes of each key; 0 = no key.
        compressible: values drawn from a small vocabulary (text-like) rather than random letters.
        rate: records/s per client, 0 = as fast as possible. The ``latency`` scenario sets it
            per runner from that runner's ``single`` result.
        delivery: the producer settings.
        deadline_s: clients stop sending after this long; 0 = no limit.
    """

    name: str
    label: str
    clients: int
    records: int
    value_size: int
    key_size: int
    compressible: bool
    rate: float
    delivery: Delivery
    deadline_s: float = 0.0
    note: str = ""

    def with_(self, **changes: object) -> Scenario:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def per_client(self) -> int:
        """Records each client sends (the remainder goes to client 0)."""
        return self.records // self.clients


SCENARIO_NAMES = ("single", "latency", "fleet", "keyed", "durable", "compressed", "large", "tls")
"""Every scenario, in the order they run (``latency`` after ``single``: it uses its peak)."""

FLEET_CLIENTS = 16
FLEET_RATE = 50_000.0
LATENCY_DEFAULT_RATE = 20_000.0
LATENCY_SECONDS = 10.0

# The tls scenario runs against the secure node of `KAFKA_SECURITY=1 scripts/kafka.sh up`, over
# its SASL_SSL listener with SCRAM-SHA-512; --bootstrap must be that node's PLAINTEXT listener
# (127.0.0.1:29092), where topics are made and read back, so `single` in the same invocation is
# the plaintext baseline on the same broker. Only runners that speak the same TLS and SASL run.
TLS_RUNNERS = ("confluent", "sluice-shm", "sluice-socket", "sluice-go")
_SECURE_PORT = os.environ.get("KAFKA_SECURE_PORT", "29092")
_SECURE_STATE = Path(__file__).resolve().parents[1] / ".run" / f"kafka-secure-{_SECURE_PORT}"
_TLS_MECHANISM = "SCRAM-SHA-512"


def secure_node() -> dict[str, Any] | None:
    """The running secure node's ``secure.json`` (scripts/kafka.sh), or None when none answers."""
    try:
        info = json.loads((_SECURE_STATE / "secure.json").read_text())
        host, port = info["sasl_ssl"].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=1.0):
            return info
    except (OSError, ValueError, KeyError):
        return None


def tls_unavailable_reason(runner: str) -> str | None:
    """Why ``runner`` cannot run the tls scenario here, or None."""
    if runner not in TLS_RUNNERS:
        return f"the tls scenario compares Sluice with confluent-kafka only (not {runner})"
    if secure_node() is None:
        return "no secure Kafka node answers (start one: KAFKA_SECURITY=1 scripts/kafka.sh up)"
    return None


def _tls_security() -> tuple[tuple[str, Any], ...]:
    info = secure_node()
    if info is None:
        return ()
    return (("bootstrap_servers", info["sasl_ssl"]), ("security_protocol", "SASL_SSL"),
            ("ssl_ca_location", info["ca"]), ("sasl_mechanism", _TLS_MECHANISM),
            ("sasl_username", info["username"]), ("sasl_password_file", info["password_file"]))


def librdkafka_security(security: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    """Sluice's [kafka] security keys as librdkafka properties (dots for underscores; a
    ``*_file`` secret is read, librdkafka has no such key)."""
    out: dict[str, Any] = {}
    for key, value in security:
        if key.endswith("_file"):
            out[key.removesuffix("_file").replace("_", ".")] = Path(value).read_text().rstrip("\n")
        else:
            out[key.replace("_", ".")] = value
    return out


def scenarios_for(
    names: list[str], *, records: int | None, quick: bool, fleet_rate: float = FLEET_RATE
) -> list[Scenario]:
    """The scenarios to run, in SCENARIO_NAMES order.

    Args:
        names: scenario names from ``--scenario`` (already split and validated).
        records: ``--records`` (records of a single-client case), or None for the default.
        quick: ``--quick``: small counts and a sending deadline per case.
        fleet_rate: records/s offered by each fleet client.
    """
    base = records if records is not None else (QUICK_RECORDS if quick else DEFAULT_RECORDS)
    deadline = QUICK_DEADLINE_S if quick else 0.0
    fast = Delivery(acks=1, idempotent=False, linger_ms=5)
    out: list[Scenario] = []
    for name in SCENARIO_NAMES:
        if name not in names:
            continue
        common = dict(deadline_s=deadline, compressible=False, key_size=0, rate=0.0, clients=1)
        if name == "single":
            out.append(Scenario(name, name, records=base, value_size=100, delivery=fast,
                                note="one client, no key, 100-byte values", **common))
        elif name == "latency":
            secs = 5.0 if quick else LATENCY_SECONDS
            common["rate"] = LATENCY_DEFAULT_RATE
            out.append(Scenario(name, name, records=int(LATENCY_DEFAULT_RATE * secs), value_size=100,
                                delivery=fast, note=f"one client at half of its single peak for ~{secs:g} s",
                                **common))
        elif name == "fleet":
            common["clients"] = FLEET_CLIENTS
            common["rate"] = fleet_rate
            total = max(FLEET_CLIENTS, base - base % FLEET_CLIENTS)
            out.append(Scenario(name, name, records=total, value_size=100, delivery=fast,
                                note=f"{FLEET_CLIENTS} client processes, each offering {fleet_rate:,.0f} records/s",
                                **common))
        elif name == "keyed":
            common["key_size"] = 16
            out.append(Scenario(name, name, records=base, value_size=100, delivery=fast,
                                note="16-byte keys (65,536 distinct, seeded), default partitioner", **common))
        elif name == "durable":
            out.append(Scenario(name, name, records=base, value_size=100,
                                delivery=Delivery(acks=-1, idempotent=True, linger_ms=5),
                                note="acks=all, idempotent", **common))
        elif name == "compressed":
            common["compressible"] = True
            for codec in ("lz4", "zstd"):
                out.append(Scenario(name, f"{name}-{codec}", records=base, value_size=100,
                                    delivery=Delivery(acks=1, linger_ms=5, compression=codec),
                                    note=f"{codec}, text-like values", **common))
        elif name == "tls":
            out.append(Scenario(name, name, records=base, value_size=100,
                                delivery=dataclasses.replace(fast, security=_tls_security()),
                                note=f"as single, over SASL_SSL ({_TLS_MECHANISM}) to the secure node", **common))
        elif name == "large":
            out.append(Scenario(name, name, records=max(100, base // 20), value_size=10_240,
                                delivery=fast, note="10 KiB values", **common))
    return out
