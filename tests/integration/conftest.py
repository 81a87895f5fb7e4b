"""Fixtures for the daemon end to end: a real ``sluice run`` and a spawn multiprocessing context.

``sluice_daemon`` yields a :class:`daemon_fixture.SluiceDaemon` (unpacks as socket path,
process, config path) with two workers against the test broker; its teardown sends SIGTERM and
fails the test unless the daemon exits 0 in time. ``start_sluice(**kw)`` starts more (or
differently configured) daemons with the same teardown.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# The client programs live in daemon_fixture; spawned processes import it by this path.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import daemon_fixture  # noqa: E402


@pytest.fixture
def sluice_daemon(start_sluice: Callable[..., daemon_fixture.SluiceDaemon]) -> daemon_fixture.SluiceDaemon:
    return start_sluice()


@pytest.fixture(scope="session")
def spawn() -> Any:
    """A multiprocessing context that spawns (no fork of a process with threads)."""
    return multiprocessing.get_context("spawn")
