"""The producer's session with the daemon, as its completion thread reports on it.

The completion thread (:class:`shm.completions.CompletionReader`) talks back through
callables; :class:`Session` answers three of them (the fourth, ring space freed, goes to
:meth:`shm.backpressure.Backpressure.wake`):

- records completed: the pending count goes down, and :meth:`Session.wait` (``flush()``)
  wakes when it reaches 0;
- the daemon hung up: reconnect to its successor, offering the same segment under the same
  token, for up to ``reconnect_s`` (:meth:`shm.connection.ProducerConnection.reconnect`);
  never when the producer is closing (its own Goodbye), when ``reconnect_s`` is 0, or when
  the daemon said why it dropped this client (a fatal ErrorReply). Else the session ends:
  every pending record fails with ProducerClosedError, since its outcome can no longer come,
  and :attr:`Session.gone` makes every later send raise it too;
- the completion rings are unreadable (a corrupt peer): every pending record fails with
  ProtocolError.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from shm._client import SendCore
from shm.connection import ProducerConnection
from shm.errors import ProducerClosedError, ProtocolError
from shm.futures import fail_fifo
from shm.segment import Segment
from shm.topic import TopicState

__all__ = ["Session"]

log = logging.getLogger("sluice.client")


class Session:
    """One producer's session with the daemon (and with the daemons that restart in its place).

    Args:
        connection: the producer's control connection (handshake done, segment offered).
        segment: the segment offered again on a reconnect.
        core: the producer's compiled send core: its pending count, and ``enabled``, cleared
            when the session ends.
        topics: the producer's topic table (name -> state); read for the topic ids a
            reconnect checks and the pending FIFOs to fail.
        send_lock: the producer's send lock; held while the session ends, so no record is
            written after its FIFO was failed.
        reconnect_s: how long to try to reconnect after a hang-up (0: never).
        closed: True once the producer is closing (the hang-up is then its own Goodbye).
        wake_writers: wakes senders waiting for ring space (they then see :attr:`gone`).

    Attributes:
        gone: the daemon closed the connection for good: nothing sent now can be delivered.
        client_id: the id the daemon gave this client (a new one after each reconnect).
        reconnects: how many times a restarted daemon took the segment back.
    """

    def __init__(
        self,
        connection: ProducerConnection,
        segment: Segment,
        core: SendCore,
        topics: dict[str, TopicState],
        send_lock: threading.Lock,
        *,
        reconnect_s: float,
        closed: Callable[[], bool],
        wake_writers: Callable[[], None],
    ) -> None:
        self._ctl = connection
        self._segment = segment
        self._core = core
        self._topics = topics
        self._send_lock = send_lock
        self._reconnect_s = reconnect_s
        self._closed = closed
        self._wake_writers = wake_writers
        self._idle = threading.Condition(threading.Lock())
        self.gone = False
        self.client_id: int = connection.welcome.client_id
        self.reconnects = 0

    def completed(self, count: int) -> None:
        """``count`` records got their outcome (the completion thread's ``on_completed``)."""
        if self._core.add_pending(-count) <= 0:
            with self._idle:
                self._idle.notify_all()

    def unreadable(self, exc: Exception) -> None:
        """The completion rings cannot be read (the completion thread's ``on_error``)."""
        self.fail_all(ProtocolError(f"completion ring unreadable: {exc}"))

    def hung_up(self) -> int | None:
        """The daemon closed the connection: reconnect if allowed (returns the new socket's fd
        for the completion thread to watch), else fail what is pending (returns None)."""
        if self._closed():
            return None  # our own Goodbye: close() is finishing
        if self._reconnect_s and not self._ctl.dropped():
            log.warning("sluice: the daemon hung up; reconnecting for up to %.0fs", self._reconnect_s)
            if self._ctl.reconnect(
                self._segment,
                lambda: {name: t.id for name, t in list(self._topics.items())},
                within_s=self._reconnect_s,
                stopped=self._closed,
            ):
                self.client_id = self._ctl.welcome.client_id
                self.reconnects += 1
                log.warning("sluice: reconnected as client %d; %d records pending", self.client_id, self._core.pending)
                return self._ctl.fileno()
        self._end()
        return None

    def _end(self) -> None:
        """Fail every pending record: its outcome can no longer come (the daemon's mapping of
        the segment is gone with the connection). Later sends raise ProducerClosedError."""
        with self._send_lock:
            self.gone = True
            self._core.enabled = 0
            self.fail_all(ProducerClosedError("the daemon closed the connection before the outcome came"))
            self._core.pending = 0
        with self._idle:
            self._idle.notify_all()
        self._wake_writers()

    def fail_all(self, exc: BaseException) -> None:
        """Fail every pending record of every topic with ``exc``."""
        for t in self._topics.values():
            for part, dq in enumerate(t.pending):
                fail_fifo(dq, part, exc)
        with self._idle:
            self._idle.notify_all()

    def wait(self, timeout: float | None, alive: Callable[[], bool]) -> int:
        """Wait until no record is pending, while ``alive()`` (the completion thread runs);
        returns how many still are when ``timeout`` runs out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._core.pending > 0 and alive():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._idle.wait(0.05 if remaining is None else min(0.05, remaining))
        return max(0, self._core.pending)
