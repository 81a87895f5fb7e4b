"""clients/conformance/protocol-v1.json replayed against a real daemon and broker: each vector on
a new connection, every daemon frame checked byte for byte by the file's rule
(tests/conformance_check.py), then the connection closed by the daemon or left open as the
vector says. Also what the bytes alone cannot show: an empty value and a nil value arrive in
Kafka as an empty value and a tombstone."""

from __future__ import annotations

import json
import socket
import struct
import time
from typing import Any

import pytest
from conformance_check import ConformanceError, check_frame
from daemon_fixture import connect

from shm import control
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

FILE = ROOT / "clients" / "conformance" / "protocol-v1.json"
_REPLY_TIMEOUT_S = 20.0  # the unknown-topic lookups wait for Kafka's metadata
_QUIET_S = 0.3  # an "open" vector: nothing more comes in this long


def _ensure_topics(admin: Any, topics: dict[str, int]) -> None:
    from confluent_kafka.admin import NewTopic

    futures = admin.create_topics([NewTopic(n, num_partitions=p, replication_factor=1) for n, p in topics.items()],
                                  operation_timeout=30)
    for name, fut in futures.items():
        try:
            fut.result(timeout=30)
        except Exception as exc:  # noqa: BLE001 - already there (an earlier run) is fine
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    meta = admin.list_topics(timeout=10)
    for name, parts in topics.items():
        assert len(meta.topics[name].partitions) == parts, f"{name} must have {parts} partitions"


def _read_frame(sock: socket.socket, buf: bytearray, deadline: float) -> bytes | None:
    """One whole frame from ``sock`` (None at EOF)."""
    while True:
        if len(buf) >= 4:
            (n,) = struct.unpack_from(">I", buf)
            if len(buf) >= 4 + n:
                frame = bytes(buf[: 4 + n])
                del buf[: 4 + n]
                return frame
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(1 << 16)
        except ConnectionResetError:
            return None
        if not data:
            return None
        buf += data


def replay(path: str, vector: dict[str, Any]) -> list[str]:
    """The problems of one vector against the daemon at ``path`` (empty: it conforms)."""
    problems: list[str] = []
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    buf = bytearray()
    try:
        sock.sendall(b"".join(bytes.fromhex(f) for f in vector["client"]))
        deadline = time.monotonic() + _REPLY_TIMEOUT_S
        for i, exp in enumerate(vector["daemon"]):
            try:
                frame = _read_frame(sock, buf, deadline)
            except TimeoutError:
                return [f"daemon frame {i}: none came in {_REPLY_TIMEOUT_S}s"]
            if frame is None:
                return problems + [f"daemon frame {i}: the daemon closed the connection instead"]
            try:
                check_frame(frame, exp)
            except ConformanceError as exc:
                problems.append(f"daemon frame {i}: {exc}")
        if vector["then"] == "closed":
            try:
                extra = _read_frame(sock, buf, time.monotonic() + 5.0)
            except TimeoutError:
                return problems + ["the daemon did not close the connection"]
            if extra is not None:
                problems.append(f"a frame after the last one: {extra.hex()}")
        else:
            try:
                extra = _read_frame(sock, buf, time.monotonic() + _QUIET_S)
            except TimeoutError:
                extra = b""
            if extra is None:
                problems.append("the daemon closed a connection that should stay open")
            elif extra:
                problems.append(f"a frame after the last one: {extra.hex()}")
    finally:
        sock.close()
    return problems


def test_vectors_replay_against_the_daemon(sluice_daemon, kafka_admin) -> None:
    doc = json.loads(FILE.read_text(encoding="utf-8"))
    _ensure_topics(kafka_admin, doc["setup"]["topics"])
    failures = {}
    for vector in doc["vectors"]:
        problems = replay(sluice_daemon.socket_path, vector)
        if problems:
            failures[vector["name"]] = problems
    assert not failures, json.dumps(failures, indent=1)
    assert len(doc["vectors"]) >= 25


def test_empty_value_and_tombstone_arrive_as_such(sluice_daemon, new_topic, read_topic) -> None:
    topic = new_topic(partitions=1)
    with connect(sluice_daemon.socket_path) as c:
        c.send(control.Produce(topic=topic, records=[control.Rec(key=b"e", value=b""), control.Rec(key=b"t"),
                                                     control.Rec(value=b"", headers=[("h", b"")])], ack=True, seq=1))
        ack = c.expect(control.ProduceAck)
        assert [r.error_code for r in ack.results] == [0, 0, 0]
    got = read_topic(topic, 3, timeout=20)
    assert [(r.key, r.value, r.headers) for r in got] == [(b"e", b"", []), (b"t", None, []), (None, b"", [("h", b"")])]
