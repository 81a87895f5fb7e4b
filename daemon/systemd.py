"""systemd service notification (``sd_notify``) and watchdog, without a dependency.

systemd's notification protocol is one datagram per state change, sent to the ``AF_UNIX``
``SOCK_DGRAM`` socket named by ``$NOTIFY_SOCKET``: newline-separated ``KEY=VALUE`` fields such as
``READY=1`` or ``STATUS=draining 3 workers``. A name starting with ``@`` is an abstract socket
(its first byte on the wire is NUL); anything else is a filesystem path. Outside systemd the
variable is unset and every call here is a cheap no-op that returns ``False``, so the daemon runs
the same under a terminal, a container or a test.

What Sluice sends, and when (the supervisor drives it):

==========================  ==================================================================
call                        when
==========================  ==================================================================
``ready(status)``           the control socket answers, every worker runs and Kafka's
                            metadata was fetched (never before: systemd starts dependents then)
``status(text)``            human-readable state for ``systemctl status`` (clients, drops, ...)
``reloading()``             SIGHUP received, before the new config is applied; ``ready()``
                            again when done (systemd keeps the unit in "reloading" until then)
``stopping()``              SIGTERM received, before the drain starts
``extend_timeout(usec)``    during a long drain, so ``TimeoutStopSec`` counts from the last call
``Watchdog``                ``WATCHDOG=1`` every half ``WatchdogSec``, only while healthy
==========================  ==================================================================

The unit uses ``NotifyAccess=main``: systemd drops datagrams from any other PID, so only the
supervisor (the main process) may call these. The supervisor starts its workers without
``NOTIFY_SOCKET`` and ``WATCHDOG_*`` in their environment, so that a worker's message cannot be
silently discarded and confused for a working notification (tests/integration/test_service.py
checks both the workers' environment and the sender of every datagram).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable

__all__ = [
    "notify",
    "ready",
    "status",
    "stopping",
    "reloading",
    "extend_timeout",
    "watchdog_ping",
    "watchdog_interval",
    "Watchdog",
]

log = logging.getLogger(__name__)


def _address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr[0] == "@":
        # Abstract namespace: the kernel's name starts with a NUL byte instead of the '@'.
        return "\0" + addr[1:]
    if addr[0] == "/":
        return addr
    # systemd >= 254 may also hand out "vsock:CID:PORT" (for VMs); Sluice does not run there.
    return None


def notify(*fields: str) -> bool:
    """Send one notification datagram made of ``fields`` (each ``"KEY=VALUE"``).

    Returns ``True`` when the datagram was handed to the kernel, ``False`` when
    ``$NOTIFY_SOCKET`` is unset or unusable, or the send failed. Never raises for I/O: a
    notification that cannot be sent must not take the daemon down.

    Raises:
        ValueError: a field contains a newline or lacks ``=`` (that would corrupt the message).
    """
    for field in fields:
        if "\n" in field or "=" not in field:
            raise ValueError(f"bad sd_notify field {field!r}: need KEY=VALUE without newlines")
    addr = _address()
    if addr is None:
        return False
    payload = "\n".join(fields).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # MSG_DONTWAIT: this runs on the event loop; if systemd's receive queue is ever
            # full, losing one notification beats stalling every client behind it.
            sock.sendto(payload, socket.MSG_DONTWAIT, addr)
    except OSError as exc:
        log.debug("sd_notify to %r failed: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def _status_field(text: str) -> str:
    # STATUS= is one line; keep whatever the caller wrote readable instead of refusing it.
    return "STATUS=" + " ".join(text.splitlines())


def ready(status: str | None = None) -> bool:
    """``READY=1`` (plus ``STATUS=``): startup or a reload finished."""
    if status is None:
        return notify("READY=1")
    return notify("READY=1", _status_field(status))


def status(text: str) -> bool:
    """``STATUS=text``, shown by ``systemctl status``. Newlines become spaces."""
    return notify(_status_field(text))


def stopping(status: str | None = None) -> bool:
    """``STOPPING=1``: graceful shutdown began (the drain runs after this)."""
    if status is None:
        return notify("STOPPING=1")
    return notify("STOPPING=1", _status_field(status))


def reloading(status: str | None = None) -> bool:
    """``RELOADING=1`` with ``MONOTONIC_USEC``: a reload began; call :func:`ready` when done.

    ``Type=notify-reload`` (systemd >= 253) requires ``MONOTONIC_USEC`` (CLOCK_MONOTONIC in
    microseconds, when the reload started) to match the reload to its request; older systemd
    ignores the extra field.
    """
    fields = ["RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"]
    if status is not None:
        fields.append(_status_field(status))
    return notify(*fields)


def extend_timeout(usec: int) -> bool:
    """``EXTEND_TIMEOUT_USEC=usec``: the current start/stop/reload may take ``usec`` more.

    systemd then waits at least that long from now (never less than the unit's own timeout), so
    a drain that still makes progress can keep extending; a hung one stops calling and is killed.
    """
    if usec <= 0:
        raise ValueError(f"extend_timeout needs a positive number of microseconds, got {usec}")
    return notify(f"EXTEND_TIMEOUT_USEC={int(usec)}")


def watchdog_ping() -> bool:
    """``WATCHDOG=1``: one keep-alive. Prefer :class:`Watchdog`, which checks health first."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between keep-alives, or ``None`` when systemd's watchdog is off for this process.

    This is half of ``$WATCHDOG_USEC`` (systemd's ``WatchdogSec``), the margin sd_watchdog_enabled(3)
    recommends. ``None`` when the variable is unset or not a positive integer, or when
    ``$WATCHDOG_PID`` names another process (a child that inherited the environment).
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return value / 2_000_000


class Watchdog:
    """Feeds systemd's watchdog from an asyncio task, only while ``healthy()`` says so.

    If any worker's heartbeat goes stale the supervisor's ``healthy()`` returns ``False``, the
    pings stop, and systemd restarts the whole unit after ``WatchdogSec`` (``Restart=on-failure``
    covers watchdog timeouts). The supervisor restarts a crashed worker itself well within that
    time, so only a hang it cannot repair reaches systemd.

    Args:
        healthy: called once per period on the event loop; must be cheap and non-blocking.
            An exception counts as unhealthy (and is logged).
        period: seconds between checks; default :func:`watchdog_interval`. When neither is
            available the watchdog is disabled and :meth:`start` does nothing.
    """

    def __init__(self, healthy: Callable[[], bool], period: float | None = None) -> None:
        self._healthy = healthy
        self.period: float | None = period if period is not None else watchdog_interval()
        if self.period is not None and self.period <= 0:
            raise ValueError(f"watchdog period must be positive, got {self.period}")
        self._task: asyncio.Task[None] | None = None
        self._was_healthy = True
        #: Keep-alives sent since start (for stats and tests).
        self.pings = 0
        #: Periods skipped because ``healthy()`` was false or raised.
        self.skipped = 0

    @property
    def enabled(self) -> bool:
        """Whether systemd (or the caller) asked for a watchdog at all."""
        return self.period is not None

    @property
    def running(self) -> bool:
        """Whether the feeding task is alive."""
        return self._task is not None and not self._task.done()

    def start(self) -> bool:
        """Start feeding on the running event loop. Returns ``False`` when disabled."""
        if self.period is None:
            return False
        if self.running:
            return True
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sluice-watchdog")
        return True

    async def stop(self) -> None:
        """Stop feeding (idempotent).

        Keep the watchdog running through a graceful drain (workers still heartbeat while they
        drain, and a drain that hangs should be caught) and stop it just before exiting.
        """
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    def _check(self) -> bool:
        try:
            ok = bool(self._healthy())
        except Exception:
            log.exception("watchdog health check raised; treating as unhealthy")
            ok = False
        if ok != self._was_healthy:
            # Log transitions only: one line when pings stop, one when they resume.
            if ok:
                log.warning("workers healthy again; resuming systemd watchdog pings")
            else:
                log.error("a worker is unhealthy; withholding systemd watchdog pings")
            self._was_healthy = ok
        return ok

    async def _run(self) -> None:
        period = self.period
        if period is None:
            return
        while True:
            if self._check():
                if watchdog_ping():
                    self.pings += 1
            else:
                self.skipped += 1
            await asyncio.sleep(period)
