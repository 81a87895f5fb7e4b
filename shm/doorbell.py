"""Eventfd doorbells: how a ring's writer wakes a reader that went to sleep.

A reader with nothing to read sets the ring's ``reader_sleeping`` flag, re-checks the ring and
only then waits on the doorbell's eventfd; the writer, after publishing a head, rings only if
the flag is set (and clears it). An idle pair therefore costs no CPU and a busy pair no
syscalls. Why a wake-up can still be lost, and why that costs at most
:data:`shm.layout.WAKE_TIMEOUT_S`, is in :mod:`shm.layout` ("Ordering").

The eventfd is non-blocking, so an asyncio reader can use ``loop.add_reader(bell.fd, ...)``
(calling :meth:`Doorbell.drain` in the callback) together with a ``call_later`` timeout, and
a thread can use :meth:`Doorbell.wait`.
"""

from __future__ import annotations

import os
import select

__all__ = ["Doorbell"]


class Doorbell:
    """One eventfd. Created by the client (``Doorbell()``) or adopted from a received fd.

    Args:
        fd: an eventfd received over SCM_RIGHTS; the doorbell owns it from now on. ``None``
            creates a fresh non-blocking, close-on-exec eventfd.
    """

    __slots__ = ("fd", "_poll")

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:
            # A received fd may arrive blocking; drain() and ring() must never block.
            os.set_blocking(fd, False)
        self.fd: int = fd
        self._poll: select.poll | None = None

    def ring(self) -> None:
        """Wake the waiter (adds 1 to the eventfd counter; never blocks)."""
        try:
            os.eventfd_write(self.fd, 1)
        except BlockingIOError:
            # The counter is at its maximum: the waiter is certainly going to wake.
            pass

    def drain(self) -> int:
        """Reset the counter; returns how many rings it held (0 if none)."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def wait(self, timeout: float) -> bool:
        """Block until rung or ``timeout`` seconds passed; True if rung. Resets the counter."""
        poll = self._poll
        if poll is None:
            poll = self._poll = select.poll()
            poll.register(self.fd, select.POLLIN)
        if poll.poll(max(0, int(timeout * 1000.0 + 0.999))):
            return self.drain() > 0
        return False

    def close(self) -> None:
        """Close the eventfd (idempotent)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            self._poll = None
            os.close(fd)

    def __repr__(self) -> str:
        return f"Doorbell(fd={self.fd})"
