"""One ``sluice run`` process for everything that is not the product: the tests' fixtures,
the benchmark and ``make demo``.

It owns two jobs, so that they are written once:

* :func:`config_toml`: the text of a ``sluice.toml`` for these settings (``[daemon]``,
  ``[kafka]``, ``[profiles.NAME]``, ``[[topics]]``), from plain mappings;
* :class:`DaemonProcess`: write that config into a working directory, start
  ``sluice run --config FILE`` in its own session (the daemon and its workers form one process
  group) with stdout and stderr appended to ``daemon.log``, wait until its socket answers a
  Hello with a Welcome, and stop it: SIGTERM, a bounded wait, then SIGKILL to the group.

Every wait is bounded and fails with :class:`DaemonError` carrying the log's tail, never hangs.
Starting again after the daemon exited (a restart on the same config, socket and runtime
directory) appends to the same log.

It lives in bench/ because bench/, tests/ and scripts/ can all import it from the repository
root, and it imports only the product's client side (:mod:`shm`), never test code.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ROOT",
    "SLUICE",
    "START_TIMEOUT_S",
    "STOP_TIMEOUT_S",
    "DaemonError",
    "DaemonProcess",
    "config_toml",
    "short_tmpdir",
]

ROOT = Path(__file__).resolve().parent.parent
SLUICE = str(Path(sys.executable).with_name("sluice"))
# The console script when this interpreter has one (an installed checkout), else the module.
_COMMAND = [SLUICE] if os.path.exists(SLUICE) else [sys.executable, "-m", "daemon"]
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 25.0
# What systemd sets for the service; a daemon started here gets only what its caller asks for.
_SYSTEMD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class DaemonError(Exception):
    """The daemon exited at start, did not answer, or did not stop in time; the message ends
    with the tail of its log."""


def short_tmpdir(prefix: str = "sl-") -> str:
    """A fresh ``/tmp/PREFIXXXXXXXXX``, short (a Unix socket path is limited to 107 bytes) and
    traversable by other users (mode 0755, for clients running as another uid)."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(path, 0o755)
    return path


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def _table(header: str, keys: Mapping[str, Any]) -> list[str]:
    return ["", header, *(f"{k} = {_toml_value(v)}" for k, v in keys.items())]


def config_toml(socket_path: str, bootstrap: str, *, workers: int = 2,
                daemon: Mapping[str, Any] | None = None,
                kafka: Mapping[str, Any] | None = None,
                profiles: Mapping[str, Mapping[str, Any]] | None = None,
                topics: Mapping[str, str] | None = None,
                comment: str = "") -> str:
    """A config file's text: ``[daemon]`` with the socket, ``workers`` and ``daemon``'s keys;
    ``[kafka]`` with ``bootstrap`` and ``kafka``'s keys; a ``[profiles.NAME]`` table per entry of
    ``profiles``; a ``[[topics]]`` rule per entry of ``topics`` (match pattern -> profile name),
    in order. Values are written as TOML (bool, int, float, str, lists of them)."""
    lines = [f"# {line}" for line in comment.splitlines()]
    lines += _table("[daemon]", {"socket_path": socket_path, "workers": workers, **(daemon or {})})
    lines += _table("[kafka]", {"bootstrap_servers": bootstrap, **(kafka or {})})
    for name, keys in (profiles or {}).items():
        lines += _table(f"[profiles.{name}]", keys)
    for match, profile in (topics or {}).items():
        lines += _table("[[topics]]", {"match": match, "profile": profile})
    return "\n".join(lines).lstrip("\n") + "\n"


class DaemonProcess:
    """``sluice run --config WORKDIR/sluice.toml``, its socket ``WORKDIR/SOCKET_NAME`` and its
    log ``WORKDIR/daemon.log``.

    Args:
        workdir: an existing directory (see :func:`short_tmpdir`); it holds the config, the
            socket, the log and, unless the config says otherwise, the workers' arenas.
        socket_name: the socket's file name in ``workdir``.
        command: the program to run instead of ``sluice``; it gets ``run --config FILE``
            appended (a wrapper such as ``/bin/sh -c '... exec "$0" "$@"' sluice`` works too).
        env: variables to set (or, with value None, remove) for the daemon, on top of this
            process's environment without systemd's ``NOTIFY_SOCKET`` and ``WATCHDOG_*``.
        cwd: the daemon's working directory (default: the repository root).
    """

    def __init__(self, workdir: str | Path, *, socket_name: str = "s.sock",
                 command: Sequence[str] | None = None, env: Mapping[str, str | None] | None = None,
                 cwd: str | Path | None = None) -> None:
        self.workdir = str(workdir)
        self.socket_path = os.path.join(self.workdir, socket_name)
        self.config_path = os.path.join(self.workdir, "sluice.toml")
        self.log_path = os.path.join(self.workdir, "daemon.log")
        self.command = list(command) if command else list(_COMMAND)
        self.cwd = str(cwd or ROOT)
        self.env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_ENV}
        for key, value in (env or {}).items():
            if value is None:
                self.env.pop(key, None)
            else:
                self.env[key] = value
        self.proc: subprocess.Popen[bytes] | None = None

    # --- the config -------------------------------------------------------------------------

    def write_config(self, text: str) -> None:
        """Replace the config file atomically (a reloading daemon never reads half a file)."""
        tmp = self.config_path + ".new"
        Path(tmp).write_text(text)
        os.replace(tmp, self.config_path)

    def configure(self, bootstrap: str, **settings: Any) -> DaemonProcess:
        """Write the config for these settings (:func:`config_toml`'s keywords) with this
        daemon's socket path."""
        self.write_config(config_toml(self.socket_path, bootstrap, **settings))
        return self

    # --- starting -------------------------------------------------------------------------

    def start(self, *, wait: bool = True, timeout: float = START_TIMEOUT_S) -> DaemonProcess:
        """Start the daemon (again, if it ran before and exited); with ``wait``, return once its
        socket answers (:meth:`wait_answers`)."""
        if self.proc is not None and self.proc.poll() is None:
            raise DaemonError(f"the daemon at {self.socket_path} is running already")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([*self.command, "run", "--config", self.config_path],
                                         cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            self.wait_answers(timeout)
        return self

    def answers(self, timeout: float = 2.0) -> bool:
        """Whether the socket accepts a connection and replies Welcome to a Hello."""
        from shm.connection import Connection, hello_for
        from shm.errors import SluiceError

        try:
            with Connection(self.socket_path, hello=hello_for("probe"), timeout=timeout):
                return True
        except (OSError, SluiceError):
            return False

    def wait_answers(self, timeout: float = START_TIMEOUT_S) -> None:
        """Poll :meth:`answers` until it holds. Raises DaemonError if the daemon exits first, or
        (after killing it) if it does not answer within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise DaemonError(f"sluice run exited with {code} at start:\n{self.log_tail()}")
            if os.path.exists(self.socket_path) and self.answers():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise DaemonError(f"sluice did not answer on {self.socket_path} within {timeout:.0f}s:\n"
                                  f"{self.log_tail()}")
            time.sleep(0.05)

    # --- looking at it ----------------------------------------------------------------------

    def _started(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise DaemonError(f"the daemon at {self.socket_path} was never started")
        return self.proc

    @property
    def pid(self) -> int:
        return self._started().pid

    @property
    def returncode(self) -> int | None:
        """None while it runs (or before it started), else its exit status."""
        return None if self.proc is None else self.proc.poll()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the log."""
        return "\n".join(self.log().splitlines()[-lines:])

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        """The daemon's counters, asked over its socket (StatsRequest, then Goodbye)."""
        from shm import control
        from shm.connection import Connection, hello_for

        with Connection(self.socket_path, hello=hello_for("stats"), timeout=timeout) as conn:
            stats = conn.request(control.StatsRequest(), control.StatsReply).stats
            try:
                conn.send(control.Goodbye())
            except OSError:
                pass
            return stats

    def worker_pids(self) -> list[int]:
        """The workers' pids, by index (from the stats they report)."""
        workers = self.stats()["workers"]
        return [int(workers[k]["pid"]) for k in sorted(workers, key=int)]

    # --- stopping ---------------------------------------------------------------------------

    def signal(self, sig: int) -> None:
        self._started().send_signal(sig)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (the graceful drain) and wait up to ``timeout`` seconds for the exit status.
        If it does not exit in time, SIGKILL the process group and raise DaemonError. Returns
        None if it was never started."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise DaemonError(f"the daemon did not exit within {timeout}s of SIGTERM:\n{self.log_tail()}") from None

    def kill(self) -> None:
        """SIGKILL this daemon's process group (the daemon and its workers, nothing else)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def remove(self) -> None:
        """Delete the working directory (after the daemon stopped)."""
        shutil.rmtree(self.workdir, ignore_errors=True)
