"""Segments: create and attach over a real socketpair with SCM_RIGHTS, and refusal of every
kind of bad segment with a SegmentError (or CorruptFrameError for broken positions)."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import tempfile

import pytest
from frames_oracle import iter_records, put_completion

from shm.errors import CorruptFrameError, SegmentError
from shm.frames import encode_record_body, iter_completions, put_record
from shm.layout import (
    RING_OFFSETS,
    SEGMENT_MAGIC,
    SEGMENT_OFFSETS,
    ring_offsets,
    segment_bytes,
)
from shm.segment import REQUIRED_SEALS, Segment, send_fds


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def memfd_with(content: bytes, seals: int, *, sealable: bool = True) -> int:
    flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0)
    fd = os.memfd_create("test-segment", flags)
    os.write(fd, content)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def segment_image(workers: int = 2, req: int = 4096, comp: int = 1024) -> bytes:
    with Segment.create(workers, req, comp) as seg:
        return os.pread(seg.fd, seg.size, 0)


def test_round_trip_over_socketpair(pair: tuple[socket.socket, socket.socket]) -> None:
    client_sock, daemon_sock = pair
    client = Segment.create(3, 4096, 1024)
    daemon, data = None, b""
    try:
        client.send(client_sock, b"hello")
        daemon, data = Segment.receive(daemon_sock)
        assert data == b"hello"
        assert (daemon.workers, daemon.request_ring_bytes, daemon.completion_ring_bytes) == (3, 4096, 1024)
        assert daemon.size == client.size == segment_bytes(3, 4096, 1024)
        assert daemon.client_pid == os.getpid()
        assert daemon.fd != client.fd
        assert daemon.client_heartbeat_ns == client.client_heartbeat_ns > 0
        daemon.beat_daemon()
        assert client.daemon_heartbeat_ns == daemon.daemon_heartbeat_ns > 0

        # Client -> worker 2 through the shared memory, and the worker's doorbell.
        assert daemon.request_ring(2).arm()
        body = encode_record_body(b"k", b"v", [("h", b"1")])
        assert put_record(client.request_ring(2), 0, 1, 123, body)
        client.request_ring(2).publish_head()
        bell = daemon.request_doorbell(2)
        assert bell is not None and bell.wait(1.0)
        ring = daemon.request_ring(2)
        start, end = ring.region()
        recs = [(t, p, ts, bytes(b)) for _, t, p, ts, b in iter_records(ring, start, end, [2])]
        assert recs == [(0, 1, 123, body)]
        ring.consume(end - start)
        assert client.request_ring(2).free() == 4096

        # Worker 2 -> client: completion ring and the client's doorbell.
        assert client.completion_ring(2).arm()
        assert put_completion(daemon.completion_ring(2), 0, 0, 1, 77, -1, 1)
        daemon.completion_ring(2).publish_head()
        cbell = client.completion_doorbell(2)
        assert cbell is not None and cbell.wait(1.0)
        cring = client.completion_ring(2)
        start, end = cring.region()
        assert [c[1:] for c in iter_completions(cring, start, end, [2])] == [(0, 0, 1, 77, -1, 1)]
        # Other workers' rings are untouched.
        assert all(daemon.request_ring(w).readable() == 0 for w in (0, 1))
    finally:
        client.close()
        if daemon is not None:
            daemon.close()
    assert client.closed


def test_daemon_keeps_reading_after_client_closes(pair: tuple[socket.socket, socket.socket]) -> None:
    client = Segment.create(1, 4096, 1024)
    client.send(pair[0])
    daemon, _ = Segment.receive(pair[1])
    assert put_record(client.request_ring(0), 0, 0, 5, b"\x01\x01\x00")
    client.request_ring(0).publish_head()
    client.close()
    with daemon:
        ring = daemon.request_ring(0)
        start, end = ring.region()
        assert [r[3] for r in iter_records(ring, start, end, [1])] == [5]


def test_unsealed_memfd_is_refused() -> None:
    fd = memfd_with(segment_image(), 0)
    try:
        with pytest.raises(SegmentError, match="not sealed"):
            Segment.attach(fd)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)  # half sealed: still refused
        with pytest.raises(SegmentError, match="not sealed"):
            Segment.attach(fd)
    finally:
        os.close(fd)
    fd = memfd_with(segment_image(), 0, sealable=False)
    try:
        with pytest.raises(SegmentError, match="not sealed"):
            Segment.attach(fd)
    finally:
        os.close(fd)


def test_wrongly_sized_memfd_is_refused() -> None:
    image = segment_image()
    for content in (image + bytes(4096), image[:-64], image[:100]):
        fd = memfd_with(content, REQUIRED_SEALS)
        try:
            with pytest.raises(SegmentError, match="size|smaller"):
                Segment.attach(fd)
        finally:
            os.close(fd)


def test_header_lies_are_refused() -> None:
    image = bytearray(segment_image(2, 4096, 1024))
    cases = [
        ("magic", "<Q", SEGMENT_MAGIC + 1, "bad segment magic"),
        ("layout_version", "<I", 9, "layout version 9"),
        ("workers", "<I", 0, "workers 0"),
        ("workers", "<I", 1, "does not match its shape: 1 workers"),  # size no longer matches
        ("segment_bytes", "<Q", 4096, "header says 4096"),
        ("request_ring_bytes", "<Q", 3000, "request_ring_bytes 3000"),
    ]
    for field, fmt, value, message in cases:
        bad = bytearray(image)
        struct.pack_into(fmt, bad, SEGMENT_OFFSETS[field], value)
        fd = memfd_with(bytes(bad), REQUIRED_SEALS)
        try:
            with pytest.raises(SegmentError, match=message):
                Segment.attach(fd)
        finally:
            os.close(fd)


def test_ring_header_and_position_lies_are_refused() -> None:
    image = bytearray(segment_image(2, 4096, 1024))
    _, comp1 = ring_offsets(1, 4096, 1024)
    bad = bytearray(image)
    struct.pack_into("<Q", bad, comp1 + RING_OFFSETS["capacity"], 2048)
    fd = memfd_with(bytes(bad), REQUIRED_SEALS)
    try:
        with pytest.raises(SegmentError, match="completion ring 1: ring capacity 2048"):
            Segment.attach(fd)
    finally:
        os.close(fd)
    bad = bytearray(image)
    struct.pack_into("<Q", bad, comp1 + RING_OFFSETS["head"], 8192)
    fd = memfd_with(bytes(bad), REQUIRED_SEALS)
    try:
        with pytest.raises(CorruptFrameError, match="completion ring 1: inconsistent positions"):
            Segment.attach(fd)
    finally:
        os.close(fd)


def test_non_memfd_is_refused() -> None:
    with tempfile.TemporaryFile() as f:
        f.write(segment_image())
        f.flush()
        with pytest.raises(SegmentError, match="not a sealable memfd"):
            Segment.attach(f.fileno())
    r, w = os.pipe()
    try:
        with pytest.raises(SegmentError):
            Segment.attach(r)
    finally:
        os.close(r)
        os.close(w)


def test_bad_doorbells_are_refused() -> None:
    fd = memfd_with(segment_image(1, 4096, 1024), REQUIRED_SEALS)
    r, w = os.pipe()
    try:
        with pytest.raises(SegmentError, match="1 doorbell fds for 1 workers, expected 2"):
            Segment.attach(fd, [r])
        with pytest.raises(SegmentError, match="is not an eventfd"):
            Segment.attach(fd, [r, w])
        with Segment.attach(fd, []) as seg:  # no doorbells: allowed, readers poll
            assert seg.request_doorbell(0) is None
            fd = -1  # owned and closed by the segment now
    finally:
        for x in (fd, r, w):
            if x >= 0:
                os.close(x)


def test_receive_closes_fds_of_a_refused_segment(pair: tuple[socket.socket, socket.socket]) -> None:
    fd = memfd_with(segment_image(1, 4096, 1024), 0)  # unsealed
    e1, e2 = os.eventfd(0), os.eventfd(0)
    send_fds(pair[0], b"SEG", [fd, e1, e2])
    for x in (fd, e1, e2):
        os.close(x)
    before = open_fds()
    with pytest.raises(SegmentError, match="not sealed"):
        Segment.receive(pair[1])
    assert open_fds() == before


def test_receive_without_fds_is_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    pair[0].sendall(b"SEG")
    with pytest.raises(SegmentError, match="no segment fd"):
        Segment.receive(pair[1])


def test_create_validates_shape() -> None:
    with pytest.raises(ValueError, match="workers 0"):
        Segment.create(0, 4096, 4096)
    with pytest.raises(ValueError, match="request_ring_bytes 5000"):
        Segment.create(1, 5000, 4096)
    with pytest.raises(ValueError, match="completion_ring_bytes 32"):
        Segment.create(1, 4096, 32)


def test_created_segment_is_sealed_and_closes_cleanly() -> None:
    before = open_fds()
    seg = Segment.create(2, 4096, 1024)
    assert fcntl.fcntl(seg.fd, fcntl.F_GET_SEALS) & REQUIRED_SEALS == REQUIRED_SEALS
    with pytest.raises(PermissionError):
        os.ftruncate(seg.fd, 64)
    assert len(seg.fds()) == 5
    seg.close()
    seg.close()
    assert open_fds() == before
    with pytest.raises(SegmentError, match="closed"):
        seg.beat_client()
