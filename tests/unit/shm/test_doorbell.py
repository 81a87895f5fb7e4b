"""Doorbells: the writer rings only an armed reader; a sleeping reader in another process
uses (almost) no CPU and wakes promptly when rung."""

from __future__ import annotations

import json
import os
import struct
import time

from helpers import wait_child

from shm.doorbell import Doorbell
from shm.layout import FRAME_RECORD, RING_HEADER_BYTES, RING_OFFSETS, WAKE_TIMEOUT_S
from shm.ring import SpscRing
from shm.segment import Segment


def test_ring_and_drain() -> None:
    bell = Doorbell()
    try:
        assert bell.drain() == 0
        assert not bell.wait(0.0)
        bell.ring()
        bell.ring()
        assert bell.drain() == 2
        bell.ring()
        assert bell.wait(1.0)
        assert bell.drain() == 0
    finally:
        bell.close()
    assert bell.fd == -1
    bell.close()  # idempotent


def test_writer_rings_only_when_reader_armed() -> None:
    bell = Doorbell()
    ring = SpscRing(bytearray(RING_HEADER_BYTES + 256), 0, 256, create=True, doorbell=bell)
    try:
        assert ring.write(FRAME_RECORD, b"a")
        assert bell.drain() == 0  # reader busy: no syscall, no ring
        start, end = ring.region()
        ring.consume(end - start)
        assert ring.arm()  # empty: may sleep; flag set
        assert ring.view[RING_OFFSETS["reader_sleeping"]] == 1
        assert ring.write(FRAME_RECORD, b"b")
        assert bell.drain() == 1
        assert ring.view[RING_OFFSETS["reader_sleeping"]] == 0  # the writer cleared it
        assert ring.write(FRAME_RECORD, b"c")
        assert bell.drain() == 0
        assert not ring.arm()  # frames waiting: do not sleep, flag cleared again
        assert ring.view[RING_OFFSETS["reader_sleeping"]] == 0
    finally:
        bell.close()


def test_wait_times_out_without_doorbell_or_frames() -> None:
    ring = SpscRing(bytearray(RING_HEADER_BYTES + 128), 0, 128, create=True)
    t0 = time.monotonic()
    assert not ring.wait(0.03)
    assert time.monotonic() - t0 >= 0.025
    assert ring.view[RING_OFFSETS["reader_sleeping"]] == 0


def test_sleeping_reader_in_another_process_idles_and_wakes() -> None:
    """Child reader: idles about 1 s on WAKE_TIMEOUT_S waits, then waits with a long timeout
    that only the doorbell can cut short. Parent: writes a frame after 1 s and one after 0.3 s."""
    seg = Segment.create(1, 4096, 4096)
    ring = seg.request_ring(0)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # reader
        code = 1
        try:
            os.close(rfd)
            result = {}
            cpu0, t0 = time.process_time(), time.monotonic()
            waits = 0
            while not ring.wait(WAKE_TIMEOUT_S):
                waits += 1
            result["idle_s"] = time.monotonic() - t0
            result["idle_cpu_s"] = time.process_time() - cpu0
            result["idle_waits"] = waits
            start, end = ring.region()
            ring.consume(end - start)
            os.write(wfd, b"1")  # ready for phase 2
            long_waits = 0
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline:
                long_waits += 1
                if ring.wait(10.0):
                    break
            now = time.monotonic_ns()
            start, end = ring.region()
            (sent_ns,) = struct.unpack_from("<q", ring.view, start + 8)
            result["wake_latency_s"] = (now - sent_ns) / 1e9
            result["long_waits"] = long_waits
            os.write(wfd, json.dumps(result).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    try:
        time.sleep(1.0)
        assert ring.write(FRAME_RECORD, struct.pack("<q", time.monotonic_ns()))
        assert os.read(rfd, 1) == b"1"
        time.sleep(0.3)
        assert ring.write(FRAME_RECORD, struct.pack("<q", time.monotonic_ns()))
        data = b""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            chunk = os.read(rfd, 4096)
            if not chunk:
                break
            data += chunk
        result = json.loads(data)
        print(result)
        # Idle about 1 s: a reader waking every 20 ms uses well under 5 % of a core.
        assert result["idle_s"] >= 0.9
        assert result["idle_cpu_s"] < 0.05 * result["idle_s"]
        assert result["idle_waits"] <= result["idle_s"] / WAKE_TIMEOUT_S + 5
        # The 10 s wait ended because the doorbell rang, within a fraction of a second.
        assert result["wake_latency_s"] < 1.0
        assert result["long_waits"] <= 2
    finally:
        os.close(rfd)
        code = wait_child(pid, 10.0)
        seg.close()
    assert code == 0


