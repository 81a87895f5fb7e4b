"""The worker pool: one process per worker index, spawned, pinned, watched and restarted.

A worker is ``python -m daemon.worker FD``, talking to the supervisor over a channel
(daemon/channel.py). Its first message is Start (its index, the config, whether to recover its
arena); the topics and client segments the daemon already knows follow at once, so a restarted
worker picks up where its predecessor stopped.

Policies:

- Restart: a worker that dies is restarted after a backoff that doubles with each crash
  (0.1 s up to ``RESTART_BACKOFF_MAX_S``); a worker that ran ``HEALTHY_SPELL_S`` before dying
  starts the backoff over, so only a crash loop waits long.
- Heartbeats: each worker sends a Stats snapshot about once a second. It is stale after
  ``stale_s`` without one (:meth:`WorkerPool.watch` sets it from the systemd watchdog period);
  the watchdog is fed only while :meth:`WorkerPool.healthy`.
- Reloads: each worker confirms a Reload with a snapshot whose ``reloads_applied`` counts it.

The pool knows nothing of clients or topics: what a new worker must hear, and what to do with
the messages that concern them, belong to :class:`WorkerEvents`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import psutil

from daemon import channel as ch
from daemon.config import Config
from shm.errors import SluiceError

__all__ = [
    "HEARTBEAT_MIN_STALE_S",
    "HEARTBEAT_STALE_S",
    "WORKER_ARGV",
    "WORKER_START_S",
    "Introduction",
    "WorkerEvents",
    "WorkerHandle",
    "WorkerPool",
    "restart_delay",
]

log = logging.getLogger("sluice.workers")

# Workers send a Stats heartbeat every second (daemon/worker.py _STATS_INTERVAL_S). A worker is
# stale after missing a few of them, or after one systemd watchdog period when that is longer:
# judging faster than the pings go out would gain nothing, and three beats leave room for a
# loaded host. With WatchdogSec=10s that is 5 s; a test's WATCHDOG_USEC=2s gives 3 s.
_HEARTBEAT_S = 1.0
HEARTBEAT_MIN_STALE_S = 3 * _HEARTBEAT_S
HEARTBEAT_STALE_S = 5.0  # without a watchdog: only the stats' "alive" flag depends on it
WORKER_START_S = 60.0  # spawn to Ready (the worker's own Kafka connection included)
RESTART_BACKOFF_MAX_S = 10.0
_RESTART_BACKOFF_FIRST_S = 0.1
_RESTART_BACKOFF_DOUBLINGS = 7  # 0.1 s * 2**7 = 12.8 s: past the maximum, so never more
HEALTHY_SPELL_S = 30.0
# The Shutdown tells a worker how long it may drain; it is killed this much later than that.
_DRAIN_GRACE_S = 5.0
_DRAIN_POLL_S = 0.05
_READY_POLL_S = 0.02
_RELOAD_POLL_S = 0.01
# A worker process is this command plus its channel's fd.
WORKER_ARGV = (sys.executable, "-m", "daemon.worker")
# Environment a worker must not inherit: only the main process may talk to systemd.
_SYSTEMD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Introduction(NamedTuple):
    """What a freshly spawned worker must hear after its Start."""

    clients: list[int]  # Start.clients: ids whose recovered runs the worker keeps
    messages: list[tuple[Any, list[int]]]  # (channel message, fds), sent in this order


class WorkerEvents(Protocol):
    """The supervisor's side of the pool: what workers ask of the rest of the daemon."""

    def introduce(self, worker: int) -> Introduction: ...

    def partitions_changed(self, topic: str, partitions: int) -> None: ...

    def client_dropped(self, client_id: int, reason: str) -> None: ...

    def client_detached(self, client_id: int, worker: int) -> None: ...


class WorkerHandle:
    """One worker index: its current process (if any) and what outlives the process."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.chan: ch.Channel | None = None  # None while no process runs (or after shutdown)
        self.ready = False
        self.last_beat = 0.0
        self.snapshot: dict[str, Any] = {}
        self.restarts = 0
        self.crash_streak = 0  # crashes without a healthy spell between them (sets the backoff)
        self.spawned_at = 0.0
        self.bye = False
        # Reloads done before this process started: its Start already carried their config.
        self.reloads_at_spawn = 0


class WorkerPool:
    """``count`` workers of one daemon.

    Args:
        count: the number of workers (fixed for the daemon's life: segments are laid out for it).
        config, config_text, config_source: the config a worker starts with (see :meth:`reload`).
        events: where the messages about clients and topics go.
        worker_argv: the worker command, to which the channel's fd is appended (tests run a
            stand-in worker).
    """

    def __init__(
        self,
        count: int,
        config: Config,
        config_text: str,
        config_source: str,
        events: WorkerEvents,
        worker_argv: Sequence[str] = WORKER_ARGV,
    ) -> None:
        self.handles = [WorkerHandle(i) for i in range(count)]
        self._config = config
        self._config_text = config_text
        self._config_source = config_source
        self._events = events
        self._argv = list(worker_argv)
        self._recover_at_start = False
        self._stopping = False
        self._undelivered = 0  # records the workers reported undelivered at their Bye
        self.reloads = 0
        self.stale_s = HEARTBEAT_STALE_S

    def __len__(self) -> int:
        return len(self.handles)

    # --- lifecycle -------------------------------------------------------------------------

    def start(self, recover: bool) -> None:
        """Spawn every worker; ``recover``: the previous daemon died, so they recover too."""
        self._recover_at_start = recover
        for handle in self.handles:
            self._spawn(handle)

    async def wait_ready(self, timeout: float) -> None:
        """Until every worker said Ready.

        Raises:
            SluiceError: not all did within ``timeout`` seconds, or a worker exited first.
        """
        deadline = time.monotonic() + timeout
        while not all(h.ready for h in self.handles):
            if time.monotonic() > deadline:
                raise SluiceError("workers did not become ready in time")
            for h in self.handles:
                if h.proc is not None and h.proc.poll() is not None and h.chan is not None:
                    raise SluiceError(f"worker {h.index} exited with {h.proc.returncode} during start-up")
            await asyncio.sleep(_READY_POLL_S)

    def _spawn(self, handle: WorkerHandle) -> None:
        parent, child = ch.Channel.pair()
        env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_ENV}
        handle.proc = subprocess.Popen(
            [*self._argv, str(child.fileno())],
            pass_fds=[child.fileno()],
            env=env,
            stdin=subprocess.DEVNULL,
        )
        child.close()
        handle.spawned_at = time.monotonic()
        handle.chan = ch.Channel(parent, ch.ToSupervisor)
        handle.ready = False
        handle.bye = False
        handle.last_beat = time.monotonic()
        handle.reloads_at_spawn = self.reloads
        self._pin(handle)
        chan = handle.chan
        intro = self._events.introduce(handle.index)
        chan.send(
            ch.Start(
                worker=handle.index,
                workers=len(self.handles),
                config_text=self._config_text,
                config_source=self._config_source,
                # A restarted worker re-sends its predecessor's stamped batches from the arena
                # and skips their records in the rings (exactly once with idempotence).
                # After a daemon crash the new workers recover too, for the clients of the
                # dead daemon that may reconnect (their old ids are given back to them).
                recover=handle.restarts > 0 or self._recover_at_start,
                clients=intro.clients,
            )
        )
        for msg, fds in intro.messages:
            chan.send(msg, fds)
        asyncio.get_running_loop().add_reader(chan.fileno(), self._on_worker, handle)
        log.info("worker %d started (pid %d)", handle.index, handle.proc.pid)

    def _pin(self, handle: WorkerHandle) -> None:
        if not self._config.daemon.pin_workers or handle.proc is None:
            return
        try:
            cpus = psutil.Process().cpu_affinity()
            if len(cpus) > 1:
                psutil.Process(handle.proc.pid).cpu_affinity([cpus[handle.index % len(cpus)]])
        except (psutil.Error, OSError, AttributeError) as exc:
            log.warning("cannot pin worker %d: %s", handle.index, exc)

    def _on_worker(self, handle: WorkerHandle) -> None:
        chan = handle.chan
        if chan is None:
            return
        try:
            msgs = chan.receive()
        except (EOFError, OSError):
            self._worker_gone(handle)
            return
        for msg, fds in msgs:
            for fd in fds:
                os.close(fd)
            match msg:
                case ch.Ready():
                    handle.ready = True
                case ch.Stats(snapshot=snap):
                    handle.snapshot = snap
                    handle.last_beat = time.monotonic()
                case ch.PartitionCount(topic=topic, partitions=parts):
                    self._events.partitions_changed(topic, parts)
                case ch.ClientDropped(client_id=cid, reason=reason):
                    self._events.client_dropped(cid, reason)
                case ch.ClientDetached(client_id=cid):
                    self._events.client_detached(cid, handle.index)
                case ch.Bye(undelivered=n):
                    handle.bye = True
                    self._undelivered += n
                    if n:
                        log.warning("worker %d stopped with %d records undelivered", handle.index, n)

    def _worker_gone(self, handle: WorkerHandle) -> None:
        loop = asyncio.get_running_loop()
        if handle.chan is not None:
            loop.remove_reader(handle.chan.fileno())
            handle.chan.close()
            handle.chan = None
        code = handle.proc.wait() if handle.proc is not None else None
        if self._stopping:
            return
        handle.restarts += 1
        # A worker that ran healthily for a while starts the backoff over: only a crash loop
        # should wait up to RESTART_BACKOFF_MAX_S.
        if time.monotonic() - handle.spawned_at > HEALTHY_SPELL_S:
            handle.crash_streak = 0
        handle.crash_streak += 1
        delay = restart_delay(handle.crash_streak)
        log.error("worker %d died (exit %s); restarting in %.1fs", handle.index, code, delay)
        loop.call_later(delay, self._respawn, handle)

    def _respawn(self, handle: WorkerHandle) -> None:
        if not self._stopping and handle.chan is None:
            self._spawn(handle)

    def reap(self) -> None:
        """Notice workers that exited without their channel saying so (a missed EOF)."""
        for h in self.handles:
            if h.proc is not None and h.chan is not None and h.proc.poll() is not None:
                self._worker_gone(h)

    # --- messages --------------------------------------------------------------------------

    def broadcast(self, msg: Any, fds: list[int] | None = None) -> None:
        """Send ``msg`` to every running worker (a restarting one hears it from introduce())."""
        for h in self.handles:
            if h.chan is not None:
                h.chan.send(msg, fds)

    def reload(self, config: Config, config_text: str) -> None:
        """Hand every worker the new config; workers spawned from now on start with it."""
        self._config = config
        self._config_text = config_text
        self.reloads += 1
        self.broadcast(ch.Reload(config_text=config_text, config_source=self._config_source))

    async def wait_reload_applied(self, timeout: float) -> bool:
        """Until every running worker confirmed the last reload; False after ``timeout`` (logged)."""
        # A snapshot left by a previous process of the same worker does not count: the pid tells.
        deadline = time.monotonic() + timeout
        while True:
            behind = [h.index for h in self.handles if h.chan is not None and self._reloads_in_force(h) < self.reloads]
            if not behind:
                return True
            if time.monotonic() > deadline:
                log.warning(
                    "worker(s) %s did not confirm the reload within %.0fs; they apply it when they catch up",
                    ", ".join(map(str, behind)),
                    timeout,
                )
                return False
            await asyncio.sleep(_RELOAD_POLL_S)

    @staticmethod
    def _reloads_in_force(h: WorkerHandle) -> int:
        snap = h.snapshot
        current = h.proc is not None and snap.get("pid") == h.proc.pid
        return h.reloads_at_spawn + (snap.get("reloads_applied", 0) if current else 0)

    # --- health and stats ------------------------------------------------------------------

    def watch(self, watchdog_period: float) -> float:
        """A systemd watchdog pings every ``watchdog_period`` s: judge heartbeats by it. Returns stale_s."""
        self.stale_s = max(HEARTBEAT_MIN_STALE_S, watchdog_period)
        return self.stale_s

    def healthy(self) -> bool:
        """The watchdog's question: is every worker either beating or being repaired by us?

        A worker that crashed waits out its restart backoff, and a new one connects to Kafka
        before its first heartbeat: both are the pool's to fix, and withholding pings for them
        would let one worker crash take the whole daemon down via systemd. A worker that stops
        beating while its process lives (hung, stopped) is what systemd must see.
        """
        now = time.monotonic()
        for h in self.handles:
            if h.chan is None:
                continue  # crashed: _worker_gone scheduled its restart
            limit = self.stale_s if h.ready else WORKER_START_S
            if now - h.last_beat >= limit:
                return False
        return True

    def stats(self) -> dict[str, dict[str, Any]]:
        """Each worker's last snapshot, keyed by index, with ``alive`` and ``restarts`` added."""
        now = time.monotonic()
        workers: dict[str, Any] = {}
        for h in self.handles:
            snap = dict(h.snapshot)
            snap["alive"] = h.chan is not None and now - h.last_beat < self.stale_s
            snap["restarts"] = h.restarts
            workers[str(h.index)] = snap
        return workers

    def snapshots(self) -> dict[str, dict[str, Any]]:
        """Each worker's last snapshot as it came, keyed by index."""
        return {str(h.index): h.snapshot for h in self.handles}

    @property
    def restarts(self) -> int:
        return sum(h.restarts for h in self.handles)

    # --- shutdown --------------------------------------------------------------------------

    def stop_restarts(self) -> None:
        """From now on a worker that exits stays down."""
        self._stopping = True

    async def drain(self, timeout_s: float, keepalive: Callable[[], None], keepalive_every_s: float) -> None:
        """Tell every worker to drain and stop within ``timeout_s``; kill those that do not.

        ``keepalive`` is called every ``keepalive_every_s`` while waiting (systemd's stop
        timeout is extended by it); the wait itself is bounded, so a drain that hangs is still
        killed.
        """
        self.stop_restarts()
        self.broadcast(ch.Shutdown(timeout_ms=int(timeout_s * 1000)))
        deadline = time.monotonic() + timeout_s + _DRAIN_GRACE_S
        kept = time.monotonic()
        while any(h.proc is not None and h.proc.poll() is None for h in self.handles):
            now = time.monotonic()
            if now > deadline:
                for h in self.handles:
                    if h.proc is not None and h.proc.poll() is None:
                        log.error("worker %d did not stop in time; killing it", h.index)
                        h.proc.kill()
                break
            if now - kept >= keepalive_every_s:
                keepalive()
                kept = now
            await asyncio.sleep(_DRAIN_POLL_S)
        loop = asyncio.get_running_loop()
        for h in self.handles:
            if h.proc is not None:
                h.proc.wait()
            # The loop may not have read the worker's last messages (its Bye) when it saw the
            # process exit: read what is left before closing, or a clean drain looks unclean.
            if h.chan is not None:
                self._on_worker(h)  # reads every message left; at end of file it closes the channel
            if h.chan is not None:
                loop.remove_reader(h.chan.fileno())
                h.chan.close()
                h.chan = None

    @property
    def drained(self) -> bool:
        """Every worker said Bye with nothing undelivered: nothing is left to recover."""
        return self._undelivered == 0 and all(h.bye for h in self.handles)


def restart_delay(crash_streak: int) -> float:
    """Seconds before restarting a worker that crashed ``crash_streak`` times in a row (>= 1)."""
    return min(RESTART_BACKOFF_MAX_S, _RESTART_BACKOFF_FIRST_S * 2 ** min(crash_streak - 1, _RESTART_BACKOFF_DOUBLINGS))
