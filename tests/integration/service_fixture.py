"""A real ``sluice run`` under a stand-in for systemd, for tests/integration/test_service.py.

:class:`NotifySocket` binds a real ``AF_UNIX`` ``SOCK_DGRAM`` socket, as systemd does for
``$NOTIFY_SOCKET``, and a thread records every datagram the daemon sends with its arrival time.
:class:`ServiceDaemon` is the shared runner (:class:`bench.daemon_process.DaemonProcess`: config,
start, log, stop) with what is specific to the service: the environment systemd gives it,
``WATCHDOG_PID``, a start that does not wait for the socket, log lines to wait for, and stats
through ``sluice stats --json``.

``WATCHDOG_PID`` must name the daemon's own pid, known only once the process exists. systemd
sets it in the child before exec; here ``/bin/sh -c 'WATCHDOG_PID=$$ exec ...'`` does the same
(``exec`` keeps the shell's pid, so ``$$`` is the daemon's).

Every wait is bounded: it fails with what was seen (datagrams, log tail) instead of hanging.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bench import daemon_process
from bench.daemon_process import ROOT, SLUICE, DaemonError, DaemonProcess, short_tmpdir

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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What a service test writes unless it says otherwise: small rings and buffers, a 10 s drain.
_DAEMON = {"request_ring_bytes": 2097152, "shutdown_timeout_ms": 10000}
_KAFKA = {"buffer_memory": 8388608}


def config_toml(socket_path: str, bootstrap: str, *, workers: int = 2,
                daemon: Mapping[str, Any] | None = None,
                profiles: Mapping[str, Mapping[str, Any]] | None = None,
                topics: Mapping[str, str] | None = None) -> str:
    """:func:`bench.daemon_process.config_toml` with the service tests' defaults."""
    return daemon_process.config_toml(socket_path, bootstrap, workers=workers, daemon={**_DAEMON, **(daemon or {})},
                                      kafka=_KAFKA, profiles=profiles, topics=topics)


class ServiceDaemon(DaemonProcess):
    """A :class:`bench.daemon_process.DaemonProcess` started the way systemd starts the unit.

    Args:
        workdir: from :func:`short_tmpdir`; holds the config, the socket ``s.sock`` and the log.
        env: variables to add to (or, with value ``None``, remove from) this process's
            environment for the daemon (``NOTIFY_SOCKET``, ``WATCHDOG_*`` only when given).
        watchdog_pid: set ``$WATCHDOG_PID`` to the daemon's own pid, as systemd does.

    Started at once, without waiting for the socket: a test waits for READY=1 (or for the exit
    of a daemon that must refuse its config).
    """

    def __init__(self, workdir: str, config_text: str, *, env: Mapping[str, str | None] | None = None,
                 watchdog_pid: bool = False) -> None:
        command = [SLUICE]
        if watchdog_pid:
            command = ["/bin/sh", "-c", 'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$0" "$@"', SLUICE]
        super().__init__(workdir, command=command, env=env)
        self.write_config(config_text)
        self.start(wait=False)

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
            if self.returncode is not None:
                raise AssertionError(f"daemon exited ({self.returncode}) before logging {text!r}:\n{log[-4000:]}")
            time.sleep(0.05)

    def stats(self, timeout: float = 15.0) -> dict[str, Any]:
        """``sluice stats --json --socket S``, parsed (the service's operators' way in)."""
        out = subprocess.run([SLUICE, "stats", "--json", "--socket", self.socket_path], cwd=str(ROOT),
                             capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise AssertionError(f"sluice stats failed ({out.returncode}): {out.stderr.strip()}")
        return json.loads(out.stdout)

    def cleanup(self) -> None:
        """Whatever the test left running is killed; the directory goes."""
        if self.running():
            # A stopped worker would make SIGTERM wait for it: let everything run, then stop.
            try:
                os.killpg(self.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            try:
                self.stop(timeout=20.0)
            except DaemonError:
                pass
        self.remove()
