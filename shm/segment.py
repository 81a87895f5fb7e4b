"""``Segment``: one client's shared memory (a sealed memfd) with a ring pair per worker.

The client creates it (:meth:`Segment.create`), passes it to the daemon over the Unix
socket (:meth:`Segment.send`: the memfd plus one eventfd doorbell per ring, by SCM_RIGHTS),
and the daemon adopts it (:meth:`Segment.receive` or :meth:`Segment.attach`), which refuses
anything that could hurt it: an fd that is not a memfd, a memfd not sealed against shrinking
and growing (a client that shrinks a mapping would make the daemon die of SIGBUS), a size
that differs from what the header implies, a bad header or ring header, and doorbells that
are not eventfds. No name ever exists in /dev/shm, so nothing leaks and no other user can
open it. The byte layout is in :mod:`shm.layout`.

The daemon keeps its mapping after the client is gone, so records the client committed are
still read and delivered.
"""

from __future__ import annotations

import array
import fcntl
import mmap
import os
import socket
import stat
import struct
import time
from collections.abc import Sequence
from types import TracebackType

from shm.doorbell import Doorbell
from shm.errors import SegmentError
from shm.layout import (
    DROP_COUNTERS_BYTES,
    LAYOUT_VERSION,
    MAX_RING_BYTES,
    MAX_WORKERS,
    MIN_RING_BYTES,
    RING_COMPLETION,
    RING_REQUEST,
    SEGMENT_HEADER_BYTES,
    SEGMENT_MAGIC,
    SEGMENT_OFFSETS,
    drop_counters_offset,
    ring_offsets,
    segment_bytes,
)
from shm.ring import SpscRing

__all__ = ["Segment", "REQUIRED_SEALS", "send_fds", "recv_fds", "fds_of"]

REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
"""Seals a segment must carry: its size can never change, and no seal can be added later."""

# magic, layout_version, workers, request_ring_bytes, completion_ring_bytes, segment_bytes,
# client_pid: the first, write-once line of the segment header.
_HEADER = struct.Struct("<QIIQQQI")
_U64 = struct.Struct("<Q")
_MAX_FDS = 1 + 2 * MAX_WORKERS


def send_fds(sock: socket.socket, data: bytes, fds: Sequence[int]) -> None:
    """Send ``data`` with ``fds`` attached (SCM_RIGHTS) on a Unix socket; ``data`` not empty."""
    if not data:
        raise ValueError("SCM_RIGHTS needs at least one byte of data")
    sent = socket.send_fds(sock, [data], list(fds))
    if sent != len(data):
        # Ancillary data rides on the first byte; send the rest of the message plainly.
        sock.sendall(data[sent:])


def fds_of(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds of a ``recvmsg`` ancillary list (SCM_RIGHTS), for readers that call ``recvmsg``
    themselves (non-blocking loops); the caller owns them."""
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    return fds


def recv_fds(sock: socket.socket, bufsize: int, maxfds: int) -> tuple[bytes, list[int]]:
    """Receive up to ``bufsize`` bytes and up to ``maxfds`` fds (the caller owns the fds).

    Raises:
        SegmentError: the sender attached more fds than ``maxfds`` (those received are closed).
    """
    data, fds, flags, _ = socket.recv_fds(sock, bufsize, maxfds)
    if flags & (socket.MSG_CTRUNC | getattr(socket, "MSG_TRUNC", 0)):
        for fd in fds:
            os.close(fd)
        raise SegmentError(f"fd message truncated (more than {maxfds} fds or {bufsize} bytes)")
    return data, list(fds)


def _seals(fd: int) -> int:
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        raise SegmentError(f"segment fd {fd} is not a sealable memfd ({exc.strerror})") from None


def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


class Segment:
    """A mapped segment. Build one with :meth:`create` (client) or :meth:`attach` /
    :meth:`receive` (daemon); it owns its memfd and doorbell fds and closes them in
    :meth:`close`.

    Attributes:
        fd: the memfd.
        size: total bytes.
        workers: number of ring pairs.
        request_ring_bytes / completion_ring_bytes: data capacity of each ring.
        client_pid: the pid the creator wrote into the header (informational; trust
            SO_PEERCRED for identity).
        drop_counts: the drop counters, a ``'Q'`` memoryview indexed by topic id (the
            client adds to them, the daemon reads them; see :mod:`shm.layout`). Released by
            :meth:`close`.
    """

    def __init__(
        self,
        fd: int,
        mapping: mmap.mmap,
        workers: int,
        request_ring_bytes: int,
        completion_ring_bytes: int,
        client_pid: int,
        doorbells: Sequence[Doorbell],
        create: bool,
    ) -> None:
        # Private: use create() / attach(). Builds (create) or validates (attach) every ring.
        self.fd = fd
        self.size = len(mapping)
        self.workers = workers
        self.request_ring_bytes = request_ring_bytes
        self.completion_ring_bytes = completion_ring_bytes
        self.client_pid = client_pid
        self._map: mmap.mmap | None = mapping
        self._doorbells = list(doorbells)
        self._requests: list[SpscRing] = []
        self._completions: list[SpscRing] = []
        at = drop_counters_offset(workers, request_ring_bytes, completion_ring_bytes)
        self.drop_counts = memoryview(mapping)[at : at + DROP_COUNTERS_BYTES].cast("Q")
        try:
            for w in range(workers):
                req_off, comp_off = ring_offsets(w, request_ring_bytes, completion_ring_bytes)
                bells = self._doorbells[2 * w : 2 * w + 2] if self._doorbells else (None, None)
                self._requests.append(
                    SpscRing(
                        mapping,
                        req_off,
                        request_ring_bytes,
                        kind=RING_REQUEST,
                        create=create,
                        doorbell=bells[0],
                        name=f"request ring {w}",
                    )
                )
                self._completions.append(
                    SpscRing(
                        mapping,
                        comp_off,
                        completion_ring_bytes,
                        kind=RING_COMPLETION,
                        create=create,
                        doorbell=bells[1],
                        name=f"completion ring {w}",
                    )
                )
        except BaseException:
            self._release_rings()
            raise

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        workers: int,
        request_ring_bytes: int,
        completion_ring_bytes: int,
        *,
        doorbells: bool = True,
    ) -> Segment:
        """Client side: a new sealed memfd segment with empty rings and fresh doorbells.

        Args:
            workers: number of daemon workers (1 to :data:`~shm.layout.MAX_WORKERS`).
            request_ring_bytes / completion_ring_bytes: ring capacities, powers of two.
            doorbells: create one eventfd per ring (normal); False only for tests.

        Raises:
            ValueError: a size or count out of range.
        """
        _check_shape(workers, request_ring_bytes, completion_ring_bytes, ValueError)
        size = segment_bytes(workers, request_ring_bytes, completion_ring_bytes)
        fd = os.memfd_create("sluice-segment", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        bells: list[Doorbell] = []
        mapping: mmap.mmap | None = None
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            _HEADER.pack_into(
                mapping,
                SEGMENT_OFFSETS["magic"],
                SEGMENT_MAGIC,
                LAYOUT_VERSION,
                workers,
                request_ring_bytes,
                completion_ring_bytes,
                size,
                os.getpid(),
            )
            if doorbells:
                bells = [Doorbell() for _ in range(2 * workers)]
            seg = cls(
                fd,
                mapping,
                workers,
                request_ring_bytes,
                completion_ring_bytes,
                os.getpid(),
                bells,
                create=True,
            )
        except BaseException:
            for bell in bells:
                bell.close()
            if mapping is not None:
                mapping.close()
            os.close(fd)
            raise
        seg.beat_client()
        return seg

    @classmethod
    def attach(cls, fd: int, doorbell_fds: Sequence[int] = ()) -> Segment:
        """Daemon side: validate and map a segment received from a client.

        On success the segment owns ``fd`` and ``doorbell_fds``; on failure the caller still
        owns them.

        Args:
            fd: the memfd.
            doorbell_fds: ``2 * workers`` eventfds in the order request ring 0, completion
                ring 0, request ring 1, ...; or none (readers then poll with timeouts).

        Raises:
            SegmentError: not a memfd, missing seals, wrong size, bad header, bad ring header,
                wrong number of doorbells or a doorbell that is not an eventfd.
            CorruptFrameError: a ring's stored positions are inconsistent.
        """
        seals = _seals(fd)
        if seals & REQUIRED_SEALS != REQUIRED_SEALS:
            raise SegmentError(
                f"segment is not sealed: seals {seals:#x}, need F_SEAL_SHRINK|F_SEAL_GROW|"
                f"F_SEAL_SEAL ({REQUIRED_SEALS:#x})"
            )
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SegmentError("segment fd is not a regular memfd")
        if st.st_size < SEGMENT_HEADER_BYTES:
            raise SegmentError(
                f"segment is {st.st_size} bytes, smaller than its {SEGMENT_HEADER_BYTES}-byte header"
            )
        try:
            mapping = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise SegmentError(f"cannot map segment ({exc.strerror})") from None
        try:
            magic, version, workers, req, comp, size, pid = _HEADER.unpack_from(
                mapping, SEGMENT_OFFSETS["magic"]
            )
            if magic != SEGMENT_MAGIC:
                raise SegmentError(f"bad segment magic {magic:#x}")
            if version != LAYOUT_VERSION:
                raise SegmentError(f"segment layout version {version}, expected {LAYOUT_VERSION}")
            _check_shape(workers, req, comp, SegmentError)
            expected = segment_bytes(workers, req, comp)
            if size != expected or st.st_size != expected:
                raise SegmentError(
                    f"segment size {st.st_size} (header says {size}) does not match its shape: "
                    f"{workers} workers x ({req} + {comp}) ring bytes need {expected}"
                )
            if doorbell_fds and len(doorbell_fds) != 2 * workers:
                raise SegmentError(
                    f"{len(doorbell_fds)} doorbell fds for {workers} workers, expected {2 * workers}"
                )
            for dfd in doorbell_fds:
                if not _is_eventfd(dfd):
                    raise SegmentError(f"doorbell fd {dfd} is not an eventfd")
            bells = [Doorbell(dfd) for dfd in doorbell_fds]
            return cls(fd, mapping, workers, req, comp, pid, bells, create=False)
        except BaseException:
            mapping.close()
            raise

    # ------------------------------------------------------------------ passing

    def fds(self) -> list[int]:
        """The fds to pass: the memfd, then request and completion doorbell of each worker."""
        return [self.fd] + [bell.fd for bell in self._doorbells]

    def send(self, sock: socket.socket, data: bytes = b"SEG") -> None:
        """Pass this segment over a connected Unix socket (SCM_RIGHTS) with ``data``."""
        send_fds(sock, data, self.fds())

    @classmethod
    def receive(cls, sock: socket.socket, bufsize: int = 4096) -> tuple[Segment, bytes]:
        """Receive a segment sent with :meth:`send` and :meth:`attach` it.

        Returns the segment and the data that came with it. Every received fd is closed if
        the segment is refused.

        Raises:
            SegmentError: no fd arrived, too many arrived, or :meth:`attach` refused it.
        """
        data, fds = recv_fds(sock, bufsize, _MAX_FDS)
        if not fds:
            raise SegmentError("no segment fd received")
        try:
            return cls.attach(fds[0], fds[1:]), data
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    # ------------------------------------------------------------------ use

    def request_ring(self, worker: int) -> SpscRing:
        """Worker ``worker``'s request ring (client writes RECORD frames)."""
        return self._requests[worker]

    def completion_ring(self, worker: int) -> SpscRing:
        """Worker ``worker``'s completion ring (the worker writes COMPLETION frames)."""
        return self._completions[worker]

    def request_doorbell(self, worker: int) -> Doorbell | None:
        """The eventfd worker ``worker`` sleeps on (None if the segment has no doorbells)."""
        return self._doorbells[2 * worker] if self._doorbells else None

    def completion_doorbell(self, worker: int) -> Doorbell | None:
        """The eventfd the client sleeps on for worker ``worker``'s completions."""
        return self._doorbells[2 * worker + 1] if self._doorbells else None

    def beat_client(self) -> None:
        """Client: store ``time.monotonic_ns()`` as its heartbeat."""
        _U64.pack_into(self._mapped(), SEGMENT_OFFSETS["client_heartbeat_ns"], time.monotonic_ns())

    def beat_daemon(self) -> None:
        """Daemon: store ``time.monotonic_ns()`` as its heartbeat."""
        _U64.pack_into(self._mapped(), SEGMENT_OFFSETS["daemon_heartbeat_ns"], time.monotonic_ns())

    @property
    def client_heartbeat_ns(self) -> int:
        """The client's last heartbeat (``time.monotonic_ns()`` clock)."""
        return _U64.unpack_from(self._mapped(), SEGMENT_OFFSETS["client_heartbeat_ns"])[0]

    @property
    def daemon_heartbeat_ns(self) -> int:
        """The daemon's last heartbeat (0 before the first)."""
        return _U64.unpack_from(self._mapped(), SEGMENT_OFFSETS["daemon_heartbeat_ns"])[0]

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._map is None

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            raise SegmentError("segment is closed")
        return self._map

    def _release_rings(self) -> None:
        for ring in self._requests + self._completions:
            ring.release()
        self._requests.clear()
        self._completions.clear()
        self.drop_counts.release()

    def close(self) -> None:
        """Unmap and close the memfd and the doorbells (idempotent).

        Raises:
            BufferError: memoryviews into the segment (record bodies) are still alive.
        """
        if self._map is None:
            return
        self._release_rings()
        self._map.close()
        self._map = None
        for bell in self._doorbells:
            bell.close()
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> Segment:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Segment(fd={self.fd}, workers={self.workers}, request_ring_bytes="
            f"{self.request_ring_bytes}, completion_ring_bytes={self.completion_ring_bytes})"
        )


def _check_shape(workers: int, req: int, comp: int, error: type[Exception]) -> None:
    if not 1 <= workers <= MAX_WORKERS:
        raise error(f"workers {workers} outside [1, {MAX_WORKERS}]")
    for what, n in (("request_ring_bytes", req), ("completion_ring_bytes", comp)):
        if n < MIN_RING_BYTES or n > MAX_RING_BYTES or n & (n - 1):
            raise error(f"{what} {n} is not a power of two in [{MIN_RING_BYTES}, {MAX_RING_BYTES}]")
