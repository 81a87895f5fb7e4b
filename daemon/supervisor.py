"""The supervisor: start-up, the main loop, reload and shutdown of one daemon.

It moves no records itself, and holds none of the daemon's jobs: it builds the parts and wires
them together.

- daemon/workers.py: the worker processes (spawn, pinning, restarts, heartbeats);
- daemon/topics.py: topic ids and Kafka metadata;
- daemon/state.py: what survives a daemon restart (topic ids, client tokens, clean stop);
- daemon/server.py: the control socket and the clients' segments;
- daemon/ingest.py: records that arrive over the socket (any language, ``sluice send``).

Lifecycle: :meth:`Supervisor.startup` (Kafka metadata, socket, saved state, workers, READY=1),
:meth:`Supervisor.main_loop` (serve until a signal asks to stop; SIGHUP reloads),
:meth:`Supervisor.shutdown` (stop accepting; stop reading every connection; socket clients get the
acks of what was read, then SHUTTING_DOWN; workers drain rings, flush and wait for acks up to
the deadline; shared-memory clients get SHUTTING_DOWN; exit 0). Signal handlers only enqueue; the loop dispatches.
"""

from __future__ import annotations

import asyncio
import faulthandler
import importlib.metadata
import logging
import os
import signal
import sys
import time
from typing import Any

from daemon import channel as ch
from daemon import systemd
from daemon.config import EXIT_CONFIG, Config, ConfigError, diff_live, loads
from daemon.ingest import SocketIngest
from daemon.lookups import TopicLookups
from daemon.metrics import start_metrics
from daemon.security import BrokerAuthError
from daemon.server import ControlServer
from daemon.state import StateDir, Tokens
from daemon.stats import aggregate
from daemon.tasks import TaskSet
from daemon.topics import Metadata, TopicTable, open_metadata, topic_info
from daemon.workers import WORKER_START_S, Introduction, WorkerPool
from shm import control
from shm.errors import SluiceError
from shm.layout import MAX_WORKERS

__all__ = ["EXIT_CONFIG", "Supervisor", "run"]

log = logging.getLogger("sluice.supervisor")

_KAFKA_CONNECT_S = 60.0  # start-up gives up on Kafka after this long
_KAFKA_ATTEMPT_S = 15.0  # one metadata connection attempt
_KAFKA_RETRY_FIRST_S = 0.2
_KAFKA_RETRY_MAX_S = 5.0
_MONITOR_EVERY_S = 1.0  # reap exited workers and update systemd's STATUS=
_RELOAD_APPLY_TIMEOUT_S = 5.0  # READY=1 after a reload waits this long at most for the workers
# Shutdown: the socket-ingest producer flushes for at most this long before the workers drain.
_INGEST_FLUSH_MAX_S = 10.0
_INGEST_CLOSE_S = 0.5  # the workers are gone by then: nothing left to wait for
_MONITOR_CANCEL_S = 2.0
# systemd's stop timeout: extended at the start by the drain deadline plus this slack, then by
# _EXTEND_BY_US every _EXTEND_EVERY_S while workers drain (each bounded by the drain deadline).
_STOP_SLACK_S = 10.0
_EXTEND_EVERY_S = 1.0
_EXTEND_BY_US = 5_000_000
# After a crash, how long the runs of a client that has not reconnected are kept (its records
# already sent are delivered either way; only its completions wait for it).
_RECONNECT_GRACE_S = 120.0


def _installed_version() -> str:
    try:
        return importlib.metadata.version("sluice")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


_VERSION = _installed_version()


class Supervisor:
    """One daemon. ``config_path`` is re-read on SIGHUP."""

    def __init__(self, config_path: str, config: Config, config_text: str) -> None:
        self.config_path = config_path
        self.config = config
        count = min(config.daemon.worker_count(), MAX_WORKERS)
        self.workers = WorkerPool(count, config, config_text, config_path, events=self)
        self.topics = TopicTable(on_change=self._topic_changed)
        self.tokens = Tokens()
        self.lookups = TopicLookups(self._lookup_topic, lambda: self.config.daemon.unknown_topic_cache_ms)
        self.ingest = SocketIngest(self.lookups.lookup)
        self.server = ControlServer(self, self.workers, self.tokens, self.ingest)
        self._state: StateDir | None = None  # None: no runtime directory, nothing is kept
        self._meta: Metadata | None = None
        self._events: asyncio.Queue[str] = asyncio.Queue()
        self._stopping = False
        self._started = time.monotonic()
        self._started_wall = time.time()
        self._startup_task: asyncio.Task[Any] | None = None
        self._watchdog: systemd.Watchdog | None = None
        self._metrics: Any = None
        self._tasks = TaskSet(log)

    # --- startup ---------------------------------------------------------------------------

    async def startup(self) -> None:
        loop = asyncio.get_running_loop()
        self._startup_task = asyncio.current_task()
        for sig, name in ((signal.SIGTERM, "stop"), (signal.SIGINT, "stop"), (signal.SIGHUP, "reload")):
            loop.add_signal_handler(sig, self._on_signal, name)
        cfg = self.config.daemon
        systemd.status("starting: connecting to Kafka")
        self._meta = open_metadata(self.config)
        await self._connect_kafka(self._meta)
        self.server.listen(cfg.socket_path, cfg.socket_mode)
        runtime = cfg.runtime_path()
        recover = False
        if runtime:
            os.makedirs(runtime, exist_ok=True)
            recover = self._load_state(StateDir(runtime))
        self.workers.start(recover)
        await self.workers.wait_ready(WORKER_START_S)
        self.server.start()
        self._tasks.spawn(self._monitor_workers(), "monitor")
        if self.tokens.awaited:
            loop.call_later(_RECONNECT_GRACE_S, self._forget_awaited)
        await self.ingest.start(cfg.socket_path)
        if cfg.metrics_port:
            self._metrics = await start_metrics(self.stats, cfg.metrics_port, host=cfg.metrics_address)
        self._watchdog = systemd.Watchdog(self.workers.healthy)
        if self._watchdog.period is not None:
            stale_s = self.workers.watch(self._watchdog.period)
            log.info(
                "systemd watchdog: a ping every %.1fs while every worker beat in the last %.1fs",
                self._watchdog.period,
                stale_s,
            )
        self._watchdog.start()
        self._startup_task = None
        systemd.ready(self._status_line())
        log.info(
            "ready: %d workers, socket %s, kafka %s",
            len(self.workers),
            cfg.socket_path,
            self.config.kafka.bootstrap_servers,
        )

    def _on_signal(self, name: str) -> None:
        # Handlers only enqueue; main_loop dispatches. The exception is a stop during start-up,
        # which may sit in a minute of Kafka retries: cancel start-up so SIGTERM acts at once.
        if name == "stop" and self._startup_task is not None:
            self._startup_task.cancel()
            self._startup_task = None
        self._events.put_nowait(name)

    async def _connect_kafka(self, meta: Metadata) -> None:
        delay = _KAFKA_RETRY_FIRST_S
        deadline = time.monotonic() + _KAFKA_CONNECT_S
        while True:
            try:
                await asyncio.wait_for(meta.start(), _KAFKA_ATTEMPT_S)
                return
            except BrokerAuthError:
                raise  # wrong credentials or certificates: retrying cannot help (daemon/security.py)
            except (OSError, asyncio.TimeoutError, SluiceError) as exc:
                if time.monotonic() > deadline:
                    raise SluiceError(f"cannot reach Kafka at {self.config.kafka.bootstrap_servers}: {exc}") from exc
                log.warning("Kafka not reachable yet (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _KAFKA_RETRY_MAX_S)

    def _load_state(self, state: StateDir) -> bool:
        """Take over what the previous daemon left in the runtime directory; True to recover.

        Topic ids are always taken over (ring frames of reconnecting clients carry them).
        Without the clean-shutdown marker the previous daemon died: the workers recover their
        arenas, and the clients it knew get their old ids back when they reconnect.
        """
        self._state = state
        clean = state.take_clean_marker()
        saved = state.read()
        if saved is None:
            return not clean
        self.tokens.restore_reserved(saved.client_ids_from)
        try:
            self.topics.restore(saved.topics)
        except ValueError as exc:
            log.warning("ignoring daemon state in %s: %s", state.directory, exc)
            return not clean
        if not clean:
            self.tokens.restore(saved.tokens)
            log.warning(
                "the previous daemon did not stop cleanly: recovering the arenas; %d client(s) may reconnect",
                len(self.tokens.awaited),
            )
        return not clean

    async def _monitor_workers(self) -> None:
        # Not while stopping: the drain reads each worker's Bye before its channel closes.
        while not self._stopping:
            await asyncio.sleep(_MONITOR_EVERY_S)
            self.workers.reap()
            systemd.status(self._status_line())

    # --- wiring: what the parts ask of each other ----------------------------------------------

    def state_changed(self) -> None:
        """Topics, tokens or the client id reservation changed: rewrite the saved state (when
        there is a runtime directory)."""
        if self._state is not None:
            self._state.write(self.topics.snapshot(), self.tokens.snapshot(), self.tokens.reserved)

    def _topic_changed(self, name: str, topic_id: int, partitions: int) -> None:
        """A topic was added (first lookup) or grew (:meth:`partitions_changed`)."""
        self.state_changed()
        # Every worker hears of the topic (or its new partitions) before any client can use
        # them: a frame naming a partition the worker has not heard of makes it read its
        # channel again before judging the frame (daemon/drain.py).
        self.workers.broadcast(ch.AddTopic(topic_id=topic_id, name=name, partitions=partitions))

    async def lookup_topic(self, name: str) -> control.TopicInfo:
        """The TopicLookup answer for ``name`` (registered with every worker on first use);
        concurrent lookups of a name share one, and unknown names are remembered a while
        (daemon/lookups.py)."""
        return await self.lookups.lookup(name)

    async def _lookup_topic(self, name: str) -> control.TopicInfo:
        if self._meta is None:
            raise SluiceError("not connected to Kafka yet")
        tid, parts = await self.topics.lookup(name, self._meta)
        return topic_info(self.config, name, tid, parts)

    def introduce(self, worker: int) -> Introduction:
        """What a worker just spawned must hear: the topics, then the segments it serves."""
        ids, client_msgs = self.server.introduce(worker)
        topics: list[tuple[Any, list[int]]] = [
            (ch.AddTopic(topic_id=tid, name=name, partitions=parts), []) for name, (tid, parts) in self.topics
        ]
        return Introduction(clients=ids + sorted(self.tokens.awaited), messages=topics + client_msgs)

    def partitions_changed(self, topic: str, partitions: int) -> None:
        """A worker's metadata says ``topic`` has ``partitions``. If that is growth of a topic
        the clients know (:meth:`TopicTable.grow` then ran :meth:`_topic_changed`: the workers
        accept the new partitions), the clients are told: the socket ingest's producer first,
        in this thread, so a socket client that hears of it can name the new partitions at
        once, then every connection that asked for topic updates."""
        if not self.topics.grow(topic, partitions):
            return
        known = self.topics.get(topic)
        if known is None:
            return
        tid, parts = known
        self.ingest.topic_changed(control.TopicChanged(topic=topic, topic_id=tid, partitions=parts))
        told = self.server.topic_changed(topic, tid, parts)
        log.debug("topic %s: %d partitions; told %d connection(s)", topic, parts, told)

    def client_dropped(self, client_id: int, reason: str) -> None:
        self.server.client_dropped(client_id, reason)

    def client_detached(self, client_id: int, worker: int) -> None:
        self.server.client_detached(client_id, worker)

    def _forget_awaited(self) -> None:
        """The grace for reconnecting ran out: the workers let go of those clients' runs."""
        for cid in self.tokens.expire(self.server.clients):
            log.warning("client %d of the previous daemon did not reconnect; forgetting it", cid)
            self.workers.broadcast(ch.RemoveClient(client_id=cid))
        self.state_changed()

    # --- stats -----------------------------------------------------------------------------

    @property
    def topic_id_bound(self) -> int:
        return self.topics.id_bound

    def drops(self) -> dict[str, int]:
        """Records the clients dropped under ``on_full = "drop"``, by topic (the socket
        ingest's producer is one of the clients)."""
        counts = self.server.drop_counts(self.topics.id_bound)
        return {name: counts[tid] for name, (tid, _) in self.topics if counts[tid]}

    def stats(self) -> dict[str, Any]:
        """The ``sluice stats`` / metrics snapshot (the keys are listed in daemon/metrics.py)."""
        workers = self.workers.stats()
        return {
            "workers": workers,
            "totals": aggregate(workers),
            "clients": self.server.segment_count(),
            "connections": self.server.connection_count(),
            "topics": len(self.topics),
            "restarts": self.workers.restarts,
            "reloads": self.workers.reloads,
            "uptime_s": round(time.monotonic() - self._started, 1),
            "start_time": self._started_wall,
            "version": _VERSION,
            "drops": self.drops(),
            "socket": {
                **self.server.socket_stats(),
                "refused": self.ingest.refused.snapshot(),
                "unknown_topics": len(self.lookups),
            },
        }

    def _status_line(self) -> str:
        t = aggregate(self.workers.snapshots())
        return (
            f"{len(self.workers)} workers, {self.server.connection_count()} connections, "
            f"{t['records_out']} records out, {t['records_failed']} failed, {t['in_flight']} in flight"
        )

    # --- main loop, reload, shutdown ---------------------------------------------------------

    async def main_loop(self) -> None:
        while True:
            event = await self._events.get()
            if event == "stop":
                return
            if event == "reload":
                await self.reload()

    async def reload(self) -> None:
        """SIGHUP: re-read the config file and apply it, or refuse it and change nothing.

        READY=1 follows RELOADING=1 either way (systemd waits for it); after an applied reload it
        is sent once every worker confirmed the new config, so "ready" means it is in force.
        """
        systemd.reloading("reloading configuration")
        try:
            with open(self.config_path, encoding="utf-8") as f:
                text = f.read()
            new = loads(text, source=self.config_path)
        except (OSError, ConfigError) as exc:
            log.error("reload refused, nothing changed: %s", exc)
            systemd.ready(self._status_line())
            return
        diff = diff_live(self.config, new)
        if diff.needs_restart:
            log.error(
                "reload refused, nothing changed: these keys need a restart: %s", ", ".join(diff.restart)
            )
            systemd.ready(self._status_line())
            return
        self.config = new
        logging.getLogger().setLevel(new.daemon.log_level.upper())
        self.workers.reload(new, text)
        await self.workers.wait_reload_applied(_RELOAD_APPLY_TIMEOUT_S)
        log.info("reloaded: %s", ", ".join(diff.live) or "no changes")
        systemd.ready(self._status_line())

    async def shutdown(self) -> None:
        self._stopping = True
        self.workers.stop_restarts()
        timeout_s = self.config.daemon.shutdown_timeout_ms / 1000.0
        systemd.stopping("draining")
        systemd.extend_timeout(int((timeout_s + _STOP_SLACK_S) * 1e6))
        log.info("stopping: draining rings and waiting for acks (up to %.0fs)", timeout_s)
        self.server.stop_listening(self.config.daemon.socket_path)
        # Socket clients: no more frames read; the records already read are delivered and
        # acknowledged (or refused) up to the deadline, then SHUTTING_DOWN and close.
        await self.server.finish_socket_clients(timeout_s)
        await self.ingest.flush(min(timeout_s, _INGEST_FLUSH_MAX_S))
        await self.workers.drain(timeout_s, lambda: systemd.extend_timeout(_EXTEND_BY_US), _EXTEND_EVERY_S)
        self.ingest.close(_INGEST_CLOSE_S)
        await self._tasks.cancel(_MONITOR_CANCEL_S)
        await self.server.close()
        if self._metrics is not None:
            await self._metrics.close()
        if self._meta is not None:
            self._meta.close()
        if self._state is not None and self.workers.drained:
            # Every worker drained and said so: the next start has nothing to recover.
            self._state.mark_clean()
        # Fed through the whole drain (a hung drain must still be caught); stopped last.
        if self._watchdog is not None:
            await self._watchdog.stop()
        log.info("stopped")


async def _amain(sup: Supervisor) -> int:
    try:
        await sup.startup()
    except asyncio.CancelledError:
        # SIGTERM during start-up (Supervisor._on_signal): not a failure, so exit 0.
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        log.info("stop requested during start-up")
        await sup.shutdown()
        return 0
    except (SluiceError, OSError) as exc:
        log.error("start-up failed: %s", exc)
        await sup.shutdown()
        return 1
    await sup.main_loop()
    await sup.shutdown()
    return 0


def run(config_path: str) -> int:
    """``sluice run --config FILE``: the daemon in the foreground. Returns the exit status."""
    faulthandler.enable()
    try:
        with open(config_path, encoding="utf-8") as f:
            text = f.read()
        config = loads(text, source=config_path)
    except (OSError, ConfigError) as exc:
        print(f"sluice: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(
        level=config.daemon.log_level.upper(),
        format="%(asctime)s %(levelname)s supervisor %(name)s: %(message)s",
        stream=sys.stderr,
    )
    import uvloop

    sup = Supervisor(config_path, config, text)
    return uvloop.run(_amain(sup))
