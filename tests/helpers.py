"""Small helpers every test directory shares (one copy each): a ring over private memory, a
bounded wait for a condition and for a forked child, and the independent reader's loop.

``tests/conftest.py`` puts this directory on ``sys.path``, so tests import it as ``helpers``.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from shm.layout import RING_HEADER_BYTES, RING_REQUEST
from shm.ring import SpscRing

__all__ = ["make_ring", "read_back", "ref_record_body", "ref_varint", "wait_child", "wait_until"]


def make_ring(capacity: int = 1024, kind: int = RING_REQUEST) -> SpscRing:
    """A fresh ring of ``capacity`` data bytes in a private buffer (no segment, no process)."""
    return SpscRing(bytearray(RING_HEADER_BYTES + capacity), 0, capacity, kind=kind, create=True)


def wait_until(pred: Callable[[], object], timeout: float = 5.0, what: str = "condition",
               interval: float = 0.01) -> None:
    """Poll ``pred`` until it holds; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(interval)


def wait_child(pid: int, timeout: float) -> int:
    """Exit code of forked child ``pid``; SIGKILLs it (and reports -9) after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def read_back(config: dict[str, Any], topic: str, expected: int, timeout: float = 30.0) -> list[Any]:
    """Every message of ``topic`` as confluent-kafka (the independent reader) reads it from the
    beginning with consumer ``config`` (the connection's settings; group and offsets are set
    here): until ``expected`` were seen and then a second longer, so extra records such as
    duplicates are caught too, or until ``timeout``. Sorted by (partition, offset)."""
    from confluent_kafka import Consumer, KafkaError

    consumer = Consumer({**config, "group.id": f"reader-{uuid.uuid4().hex}", "auto.offset.reset": "earliest",
                         "enable.auto.commit": False, "enable.partition.eof": True})
    out: list[Any] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + timeout
        grace_until: float | None = None
        while time.monotonic() < deadline:
            if grace_until is None and len(out) >= expected:
                grace_until = time.monotonic() + 1.0
            if grace_until is not None and time.monotonic() > grace_until:
                break
            for msg in consumer.consume(num_messages=10_000, timeout=0.2):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise RuntimeError(f"reader error: {err}")
                out.append(msg)
    finally:
        consumer.close()
    out.sort(key=lambda msg: (msg.partition(), msg.offset()))
    return out


# --- an independent reference encoder, written from the Kafka record format ---------------
# Tests of the daemon's codec compare against this, never against shm.frames (the code under test).


def ref_varint(value: int) -> bytes:
    """Kafka's zig-zag varint of a signed 64-bit ``value``."""
    v = ((value << 1) ^ (value >> 63)) & 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while v > 0x7F:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def ref_record_body(key: bytes | None, value: bytes | None,
                    headers: Sequence[tuple[str, bytes | None]] = ()) -> bytes:
    """A record body as the ring carries it: key, value, headers (null is length -1)."""
    out = [ref_varint(-1) if key is None else ref_varint(len(key)) + key]
    out.append(ref_varint(-1) if value is None else ref_varint(len(value)) + value)
    out.append(ref_varint(len(headers)))
    for hk, hv in headers:
        kb = hk.encode()
        out.append(ref_varint(len(kb)) + kb)
        out.append(ref_varint(-1) if hv is None else ref_varint(len(hv)) + hv)
    return b"".join(out)
