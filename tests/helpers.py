"""Small helpers every test directory shares (one copy each): a ring over private memory, a
bounded wait for a condition and for a forked child.

``tests/conftest.py`` puts this directory on ``sys.path``, so tests import it as ``helpers``.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from shm.layout import RING_HEADER_BYTES, RING_REQUEST
from shm.ring import SpscRing

__all__ = ["make_ring", "wait_child", "wait_until"]


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
