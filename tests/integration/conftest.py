"""Fixtures for the daemon end to end: a real ``sluice run`` and a spawn multiprocessing context.

``sluice_daemon`` yields a :class:`daemon_fixture.SluiceDaemon` (unpacks as socket path,
process, config path) with two workers against the test broker; its teardown sends SIGTERM and
fails the test unless the daemon exits 0 in time. ``start_sluice(**kw)`` starts more (or
differently configured) daemons with the same teardown.
"""

from __future__ import annotations

import multiprocessing
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# The client programs live in daemon_fixture; spawned processes import it by this path.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import daemon_fixture  # noqa: E402


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    # Remembered so the daemon fixture can show the daemon's log when the test failed.
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


@pytest.fixture
def start_sluice(kafka_bootstrap: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., daemon_fixture.SluiceDaemon]]:
    started: list[daemon_fixture.SluiceDaemon] = []

    def start(**kw: Any) -> daemon_fixture.SluiceDaemon:
        d = daemon_fixture.start_daemon(kafka_bootstrap, **kw)
        started.append(d)
        return d

    yield start
    call = getattr(request.node, "rep_call", None)
    if call is not None and call.failed:
        for d in started:
            print(f"--- log of sluice at {d.socket_path} ---\n{d.log()[-20000:]}", file=sys.stderr)
    problems = []
    for d in started:
        try:
            code = d.stop()
        except AssertionError as exc:
            problems.append(str(exc))
            continue
        if code != 0:
            problems.append(f"sluice exited with {code}; log:\n{d.log()[-6000:]}")
        else:
            shutil.rmtree(d.workdir, ignore_errors=True)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def sluice_daemon(start_sluice: Callable[..., daemon_fixture.SluiceDaemon]) -> daemon_fixture.SluiceDaemon:
    return start_sluice()


@pytest.fixture(scope="session")
def spawn() -> Any:
    """A multiprocessing context that spawns (no fork of a process with threads)."""
    return multiprocessing.get_context("spawn")
