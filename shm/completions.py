"""The producer's completion thread: reads the completion rings and settles the futures.

Each COMPLETION frame resolves the next ``count`` pending records of one partition, in order
(as :func:`shm.futures.settle_fifo` does); each CHUNK_DONE frame frees the worker's request ring
up to the position it names (see :mod:`daemon.worker` for why the ring is freed only then).

Policies:

- One compiled call per ring region (``shm._client.read_completions``): it checks every frame
  as :func:`shm.frames.iter_completions` does and settles the COMPLETIONs, so no Python runs per
  frame (keyed records make a COMPLETION per batch per partition). Python keeps what is per
  region: the positions, the request ring's tail, the callbacks.
- The request ring is freed once per region, to the last CHUNK_DONE's position: a worker's
  positions only grow, so that is where freeing to each in turn would end.
- A corrupt frame (a broken or hostile worker) ends the thread through ``on_error`` with a
  :class:`~shm.errors.CorruptFrameError` naming the ring and the frame; the records settled
  before it are reported (``on_completed``) and the space before it freed first.

Idle: the thread arms every completion ring (the worker rings the doorbell only when armed)
and sleeps in poll() on the doorbells and the control socket, at most
``_COMPLETION_POLL_MS`` so a lost wake-up costs a bounded delay. The daemon closing the socket
shows as POLLHUP. The socket is readable when the daemon pushed something unasked (a
TopicChanged) or a reply came: the thread then reads what is there without blocking
(``read_control``, :meth:`shm.connection.ProducerConnection.read_notices`), which hands the
unsolicited messages on and leaves replies for the request that waits for them. While a
request holds the connection (it reads the socket itself) the thread watches only for the
hang-up until its next pass, so it does not spin. Busy with completions, it still reads the
socket every ``_CONTROL_READ_S``.

The thread talks back to its producer only through the callables it is given: records
completed, ring space freed, the daemon hung up, the rings are unreadable.
"""

from __future__ import annotations

import select
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from shm._client import read_completions
from shm.errors import CorruptFrameError, KafkaError
from shm.futures import DeliveryTally, PendingRun
from shm.ring import SpscRing
from shm.segment import Segment

__all__ = ["CompletionReader"]

_COMPLETION_POLL_MS = 20
_HEARTBEAT_S = 1.0
# How often a thread that never gets to idle still reads the control socket (a TopicChanged
# waits at most this long behind a stream of completions).
_CONTROL_READ_S = 0.05
_HANGUP = select.POLLHUP | select.POLLERR | select.POLLNVAL
_for_code = KafkaError.for_code


class CompletionReader:
    """The thread that reads one segment's completion rings.

    Args:
        segment: the client's segment (doorbells, the client heartbeat).
        request_rings, completion_rings: one of each per worker, by worker index.
        pending: topic id -> one pending FIFO per partition (the producer adds topics to this
            dict as it learns them; the thread only reads it).
        limits: topic id -> partition count, for validating completions (also grown by the
            producer).
        control_fd: the control socket, watched for the daemon hanging up and for messages.
        read_control: reads what the control socket holds now, without blocking; False when
            a request is reading it (then the thread leaves it alone until its next pass).
        on_completed: ``count`` records got their outcome.
        on_freed: request-ring space was freed (senders waiting for room may go on).
        on_hangup: the daemon closed the connection (its last completions were read first).
            Returns the fd of the new control socket to watch, or None to end the thread.
        on_error: the completion rings are unreadable (a corrupt peer); the thread ends.
        name: the thread's name.
    """

    def __init__(
        self,
        segment: Segment,
        request_rings: Sequence[SpscRing],
        completion_rings: Sequence[SpscRing],
        pending: dict[int, list[deque[Any]]],
        limits: list[int],
        control_fd: int,
        *,
        read_control: Callable[[], bool],
        on_completed: Callable[[int], None],
        on_freed: Callable[[], None],
        on_hangup: Callable[[], int | None],
        on_error: Callable[[Exception], None],
        name: str,
    ) -> None:
        self._segment = segment
        self._req = list(request_rings)
        self._cmp = list(completion_rings)
        self._pending = pending
        self._limits = limits
        self._control_fd = control_fd
        self._read_control = read_control
        self._on_completed = on_completed
        self._on_freed = on_freed
        self._on_hangup = on_hangup
        self._on_error = on_error
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None) -> None:
        """Ask the thread to end (within one poll interval) and wait up to ``timeout``."""
        self._stopped = True
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        poll = select.poll()
        bells = []
        for w in range(len(self._cmp)):
            bell = self._segment.completion_doorbell(w)
            if bell is not None:
                poll.register(bell.fd, select.POLLIN)
                bells.append(bell)
        rings = self._cmp
        sock_fd = self._control_fd
        poll.register(sock_fd, select.POLLIN)
        watching = select.POLLIN  # the socket's events in the poll set
        last_beat = last_read = 0.0
        try:
            while not self._stopped:
                took = False
                for w, ring in enumerate(rings):
                    if self.read_ring(w, ring):
                        took = True
                now = time.monotonic()
                if now - last_beat > _HEARTBEAT_S:
                    self._segment.beat_client()
                    last_beat = now
                if took:
                    if now - last_read > _CONTROL_READ_S:
                        self._read_control()
                        last_read = now
                    continue
                if not watching:
                    poll.modify(sock_fd, select.POLLIN)
                    watching = select.POLLIN
                armed = all(ring.arm() for ring in rings)
                hangup = readable = False
                if armed:
                    for fd, ev in poll.poll(_COMPLETION_POLL_MS):
                        if fd == sock_fd:
                            hangup = bool(ev & _HANGUP)
                            readable = bool(ev & select.POLLIN)
                    for bell in bells:
                        bell.drain()
                for ring in rings:
                    ring.disarm()
                if readable and not hangup:
                    last_read = time.monotonic()
                    if not self._read_control():
                        # A request reads the socket: only the hang-up until the next pass.
                        poll.modify(sock_fd, 0)
                        watching = 0
                if hangup and not self._stopped:
                    # The daemon wrote its last completions before closing: take them first.
                    for w, ring in enumerate(rings):
                        self.read_ring(w, ring)
                    new_fd = self._on_hangup()
                    if new_fd is None:
                        return
                    poll.unregister(sock_fd)
                    sock_fd = new_fd
                    poll.register(sock_fd, select.POLLIN)
                    watching = select.POLLIN
        except Exception as exc:  # noqa: BLE001 - corrupt completions: the producer fails everything loudly
            self._on_error(exc)

    def read_ring(self, w: int, ring: SpscRing) -> bool:
        """Settle what completion ring ``ring`` (worker ``w``'s) holds now; True if it held
        anything. The thread's step; callable without the thread (tests, bench micro).

        Raises:
            CorruptFrameError: a frame is corrupt (what came before it is settled and counted).
        """
        took = freed = False
        resolved = 0
        pending = self._pending
        limits = self._limits
        try:
            while True:
                start, end = ring.region()
                if start == end:
                    break
                took = True
                # The whole region in one compiled call: frames checked, COMPLETIONs settled.
                free_to, n, bad = read_completions(
                    ring.view, ring.data_start, ring.data_end, start, end, limits, pending,
                    _for_code, PendingRun, DeliveryTally,
                )
                resolved += n
                if free_to >= 0:
                    self._req[w].free_to(free_to)
                    freed = True
                if bad is not None:
                    raise CorruptFrameError(f"{ring.name}: {bad}")
                ring.consume(end - start)
        finally:
            # Records settled before a corrupt frame are counted all the same.
            if resolved:
                self._on_completed(resolved)
            if freed:
                self._on_freed()
        return took
