"""A real ``sluice run`` under a stand-in for systemd, for tests/integration/test_service.py.

:class:`NotifySocket` binds a real ``AF_UNIX`` ``SOCK_DGRAM`` socket, as systemd does for
``$NOTIFY_SOCKET``, and a thread records every datagram the daemon sends with its arrival time.
:class:`ServiceDaemon` writes a config into a short temporary directory (``/tmp/sd-XXXX``, so the
socket path stays far below the 107-byte limit), starts ``sluice run --config`` with that
environment and its stderr in a log file, and offers what a test needs to look at it: the log,
``sluice stats --json``, the worker pids, signals.

``WATCHDOG_PID`` must name the daemon's own pid, known only once the process exists. systemd
sets it in the child before exec; here ``/bin/sh -c 'WATCHDOG_PID=$$ exec ...'`` does the same
(``exec`` keeps the shell's pid, so ``$$`` is the daemon's).

Every wait is bounded: it fails with what was seen (datagrams, log tail) instead of hanging.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ROOT",
    "SLUICE",
    "Notification",
    "NotifySocket",
    "ServiceDaemon",
    "config_toml",
    "free_port",
    "short_tmpdir",
]

ROOT = Path(__file__).resolve().parents[2]
SLUICE = str(Path(sys.executable).with_name("sluice"))
_UCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }


@dataclass(frozen=True)
class Notification:
    """One sd_notify datagram: when it arrived (``time.monotonic()``), its fields, and the pid
    of the process that sent it (``SCM_CREDENTIALS``, as systemd checks ``NotifyAccess=main``)."""

    at: float
    fields: dict[str, str]
    raw: str
    pid: int

    def __contains__(self, key: str) -> bool:
        return key in self.fields


class NotifySocket:
    """A bound datagram socket standing in for systemd's notification socket.

    ``path`` is what goes into ``$NOTIFY_SOCKET``. Datagrams are parsed into
    :class:`Notification` by a reader thread as they arrive.
    """

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "notify.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # The kernel then attaches each sender's pid/uid/gid, as it does for systemd.
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.bind(self.path)
        self._sock.settimeout(0.1)
        self._lock = threading.Lock()
        self._items: list[Notification] = []
        self._closed = False
        self._thread = threading.Thread(target=self._read, name="notify-socket", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data, anc, _flags, _addr = self._sock.recvmsg(65536, socket.CMSG_SPACE(_UCRED.size))
            except TimeoutError:
                continue
            except OSError:
                return
            at = time.monotonic()
            pid = -1
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
                    pid = _UCRED.unpack_from(payload)[0]
            text = data.decode("utf-8", errors="replace")
            fields = dict(line.split("=", 1) for line in text.split("\n") if "=" in line)
            with self._lock:
                self._items.append(Notification(at, fields, text, pid))

    @property
    def messages(self) -> list[Notification]:
        """Every datagram so far, oldest first (a copy)."""
        with self._lock:
            return list(self._items)

    def count(self) -> int:
        with self._lock:
            return len(self._items)

    def wait_for(self, pred: Callable[[Notification], bool], *, after: int = 0, timeout: float,
                 what: str) -> int:
        """Index of the first datagram from index ``after`` on for which ``pred`` holds.

        Raises AssertionError after ``timeout`` seconds, listing what did arrive.
        """
        deadline = time.monotonic() + timeout
        while True:
            items = self.messages
            for i in range(after, len(items)):
                if pred(items[i]):
                    return i
            if time.monotonic() > deadline:
                seen = [m.raw.replace("\n", " | ") for m in items[after:]][-20:]
                raise AssertionError(f"no {what} within {timeout}s; last datagrams: {seen}")
            time.sleep(0.02)

    def close(self) -> None:
        self._closed = True
        self._thread.join(2.0)
        self._sock.close()


def short_tmpdir(prefix: str = "sd-") -> str:
    """A fresh directory ``/tmp/sd-XXXXXXXX``, traversable by other users (mode 0755)."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(path, 0o755)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def config_toml(socket_path: str, bootstrap: str, *, workers: int = 2,
                daemon: Mapping[str, Any] | None = None,
                profiles: Mapping[str, Mapping[str, Any]] | None = None,
                topics: Mapping[str, str] | None = None) -> str:
    """A config file's text: ``[daemon]`` with the socket and ``workers`` plus ``daemon``'s keys,
    ``[kafka]`` with ``bootstrap``, ``[profiles.NAME]`` sections and ``[[topics]]`` rules
    (``topics`` maps a match pattern to a profile name)."""
    lines = ["[daemon]", f"socket_path = {_toml_value(socket_path)}", f"workers = {workers}",
             "request_ring_bytes = 2097152", "shutdown_timeout_ms = 10000"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in (daemon or {}).items()]
    lines += ["", "[kafka]", f"bootstrap_servers = {_toml_value(bootstrap)}",
              "buffer_memory = 8388608"]
    for name, keys in (profiles or {}).items():
        lines += ["", f"[profiles.{name}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in keys.items()]
    for match, profile in (topics or {}).items():
        lines += ["", "[[topics]]", f"match = {_toml_value(match)}", f"profile = {_toml_value(profile)}"]
    return "\n".join(lines) + "\n"


class ServiceDaemon:
    """``sluice run --config DIR/sluice.toml`` in its own process group, stderr to DIR/daemon.log.

    Args:
        workdir: from :func:`short_tmpdir`; holds the config, the socket ``s.sock`` and the log.
        env: variables to add to (or, with value ``None``, remove from) this process's
            environment for the daemon.
        watchdog_pid: set ``$WATCHDOG_PID`` to the daemon's own pid, as systemd does.
    """

    def __init__(self, workdir: str, config_text: str, *, env: Mapping[str, str | None] | None = None,
                 watchdog_pid: bool = False) -> None:
        self.workdir = workdir
        self.socket_path = os.path.join(workdir, "s.sock")
        self.config_path = os.path.join(workdir, "sluice.toml")
        self.log_path = os.path.join(workdir, "daemon.log")
        Path(self.config_path).write_text(config_text)
        full = dict(os.environ)
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            full.pop(key, None)  # only what the test asks for
        for key, value in (env or {}).items():
            if value is None:
                full.pop(key, None)
            else:
                full[key] = value
        argv = [SLUICE, "run", "--config", self.config_path]
        if watchdog_pid:
            argv = ["/bin/sh", "-c", 'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$0" "$@"', *argv]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=str(ROOT), env=full, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid

    # --- looking at it --------------------------------------------------------------------

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def wait_log(self, text: str, *, timeout: float, after: int = 0) -> str:
        """The first log line containing ``text`` at or after character ``after`` of the log."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()[after:]
            for line in log.splitlines():
                if text in line:
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"log line with {text!r} not seen within {timeout}s; log tail:\n{log[-4000:]}")
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) before logging {text!r}:\n{log[-4000:]}")
            time.sleep(0.05)

    def stats(self, timeout: float = 15.0) -> dict[str, Any]:
        """``sluice stats --json --socket S``, parsed."""
        out = subprocess.run([SLUICE, "stats", "--json", "--socket", self.socket_path], cwd=str(ROOT),
                             capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise AssertionError(f"sluice stats failed ({out.returncode}): {out.stderr.strip()}")
        return json.loads(out.stdout)

    def worker_pids(self) -> list[int]:
        """The workers' pids, by index (from the stats they report)."""
        workers = self.stats()["workers"]
        return [int(workers[k]["pid"]) for k in sorted(workers, key=int)]

    def answers(self, timeout: float = 2.0) -> bool:
        """Whether the socket accepts a connection and replies Welcome to a Hello."""
        from shm.connection import Connection, hello_for
        from shm.errors import SluiceError

        try:
            with Connection(self.socket_path, hello=hello_for("test-probe"), timeout=timeout):
                return True
        except (OSError, SluiceError):
            return False

    # --- driving it -----------------------------------------------------------------------

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 25.0) -> int:
        """SIGTERM and wait; kills the process group and raises if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"daemon did not exit within {timeout}s of SIGTERM:\n{self.log()[-4000:]}") from None

    def kill(self) -> None:
        """SIGKILL the daemon's process group (the daemon and its workers only)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def cleanup(self) -> None:
        """Whatever the test left running is killed; the directory goes."""
        if self.proc.poll() is None:
            # A stopped worker would make SIGTERM wait for it: let everything run, then stop.
            try:
                os.killpg(self.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            try:
                self.stop(timeout=20.0)
            except AssertionError:
                pass
        shutil.rmtree(self.workdir, ignore_errors=True)
