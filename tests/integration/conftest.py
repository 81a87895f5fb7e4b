"""Fixtures for the daemon end to end: a real ``sluice run`` and a spawn multiprocessing context.

``sluice_daemon`` yields a :class:`daemon_fixture.SluiceDaemon` (``socket_path``, ``proc``,
``log()``, ``stats()``...) with two workers against the test broker; its teardown sends SIGTERM and
fails the test unless the daemon exits 0 in time. ``start_sluice(**kw)`` starts more (or
differently configured) daemons with the same teardown.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any

import daemon_fixture  # on sys.path by tests/conftest.py, for spawned processes too
import pytest


@pytest.fixture
def sluice_daemon(start_sluice: Callable[..., daemon_fixture.SluiceDaemon]) -> daemon_fixture.SluiceDaemon:
    return start_sluice()


@pytest.fixture(scope="session")
def spawn() -> Any:
    """A multiprocessing context that spawns (no fork of a process with threads)."""
    return multiprocessing.get_context("spawn")
