"""The supervisor: config, the Unix socket, worker lifecycle, topics, stats and systemd.

It moves no records itself. Shared-memory clients write straight into the rings the workers
drain; records that arrive over the socket (any language, ``sluice send``) go through an
ordinary :class:`shm.Producer` that the supervisor holds, connected to its own socket, so
socket ingest has exactly the semantics of a shared-memory client.

Lifecycle: :meth:`Supervisor.startup` (socket, workers, Kafka metadata, READY=1),
:meth:`Supervisor.main_loop` (serve until a signal asks to stop), :meth:`Supervisor.shutdown`
(stop accepting, workers drain rings, flush and wait for acks up to the deadline, exit 0).
Signal handlers only enqueue; the loop dispatches.
"""

from __future__ import annotations

import array
import asyncio
import faulthandler
import importlib.metadata
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import sys
import time
from typing import Any

import psutil

from daemon import channel as ch
from daemon import systemd
from daemon.config import Config, ConfigError, diff_live, loads
from daemon.metadata import Metadata
from daemon.metrics import start_metrics
from daemon.peercred import check_peer, peer_credentials
from daemon.stats import aggregate
from shm import control
from shm.errors import BufferFullError, KafkaError, SegmentError, SluiceError
from shm.layout import MAX_WORKERS
from shm.segment import Segment

__all__ = ["Supervisor", "run"]

log = logging.getLogger("sluice.supervisor")

EXIT_CONFIG = 78  # EX_CONFIG: the unit's RestartPreventExitStatus, so a bad config does not loop
# Workers send a Stats heartbeat every second (daemon/worker.py _STATS_INTERVAL_S). A worker is
# stale after missing a few of them, or after one systemd watchdog period when that is longer:
# judging faster than the pings go out would gain nothing, and three beats leave room for a
# loaded host. With WatchdogSec=10s that is 5 s; a test's WATCHDOG_USEC=2s gives 3 s.
_HEARTBEAT_S = 1.0
_HEARTBEAT_MIN_STALE_S = 3 * _HEARTBEAT_S
_HEARTBEAT_STALE_S = 5.0  # without a watchdog: only the stats' "alive" flag depends on it
_EXTEND_EVERY_S = 1.0  # EXTEND_TIMEOUT_USEC during the drain: once a second is plenty
_WORKER_START_S = 60.0  # spawn to Ready (the worker's own Kafka connection included)
_RELOAD_APPLY_TIMEOUT_S = 5.0  # READY=1 after a reload waits this long at most for the workers
_RESTART_BACKOFF_MAX_S = 10.0
_HEALTHY_SPELL_S = 30.0
_MAX_ANCILLARY = socket.CMSG_SPACE(253 * 4)
# How long a refused connection stays open for the client's Hello: closing before it arrives
# would hand the client EPIPE on its Hello instead of the NOT_ALLOWED reply.
_REFUSE_LINGER_S = 1.0
# Daemon restarts (docs/ARCHITECTURE.md, "Daemon crashes"): the runtime directory keeps the
# topic ids and the clients' tokens -> client ids; the marker says the last stop drained all.
_STATE_FILE = "sluice-state.json"
_CLEAN_MARKER = "clean-shutdown"
# After a crash, how long the runs of a client that has not reconnected are kept (its records
# already sent are delivered either way; only its completions wait for it).
_RECONNECT_GRACE_S = 120.0


def _installed_version() -> str:
    try:
        return importlib.metadata.version("sluice")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


_VERSION = _installed_version()


class _WorkerHandle:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.chan: ch.Channel | None = None
        self.ready = False
        self.last_beat = 0.0
        self.snapshot: dict[str, Any] = {}
        self.restarts = 0
        self.crash_streak = 0  # crashes without a healthy spell between them (sets the backoff)
        self.spawned_at = 0.0
        self.bye = False
        self.next_start = 0.0
        # Reloads done before this process started: its Start already carried their config.
        self.reloads_at_spawn = 0


class _Client:
    """A socket connection; with a segment when it is a shared-memory client."""

    def __init__(self, client_id: int, sock: socket.socket) -> None:
        self.client_id = client_id
        self.sock = sock
        self.token = 0  # Hello.token: the client keeps it across daemon restarts
        self.name = ""
        self.pid = 0
        self.segment: Segment | None = None
        self.detached: set[int] = set()
        self.pending: set[asyncio.Future[Any]] = set()
        self.gone = False  # its connection closed: workers drain its segment, then detach
        self.inbox: list[Any] = []
        # Replies come from several tasks (the serve loop, one per acknowledged Produce); a
        # large frame may go out in pieces, so one frame is written at a time.
        self.send_lock = asyncio.Lock()


class Supervisor:
    """One daemon. ``config_path`` is re-read on SIGHUP."""

    def __init__(self, config_path: str, config: Config, config_text: str) -> None:
        self.config_path = config_path
        self.config = config
        self.config_text = config_text
        self.workers = [_WorkerHandle(i) for i in range(min(config.daemon.worker_count(), MAX_WORKERS))]
        self.topics: dict[str, tuple[int, int]] = {}  # name -> (topic_id, partitions)
        self.clients: dict[int, _Client] = {}
        self._next_client = 1
        self._next_tid = 0
        # Persisted in the runtime directory (_STATE_FILE): client token -> client id.
        self._tokens: dict[int, int] = {}
        # After a crash: client ids of the previous daemon whose clients may still come back.
        self._awaited: set[int] = set()
        self._recover_at_start = False
        self._state_dir = ""
        self._undelivered = 0  # records the workers reported undelivered at their Bye
        self._listener: socket.socket | None = None
        self._events: asyncio.Queue[str] = asyncio.Queue()
        self._stopping = False
        self._started = time.monotonic()
        self._started_wall = time.time()
        self._reloads = 0
        self._stale_s = _HEARTBEAT_STALE_S
        self._startup_task: asyncio.Task[Any] | None = None
        self._meta: Metadata | None = None
        self._ingest: Any = None
        # The socket answers before the ingest producer is attached (it connects to that very
        # socket), so a Produce that arrives in between waits for it.
        self._ingest_ready = asyncio.Event()
        self._watchdog: systemd.Watchdog | None = None
        self._metrics: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lookup_locks: dict[str, asyncio.Lock] = {}

    # --- startup ---------------------------------------------------------------------------

    async def startup(self) -> None:
        loop = asyncio.get_running_loop()
        self._startup_task = asyncio.current_task()
        for sig, name in ((signal.SIGTERM, "stop"), (signal.SIGINT, "stop"), (signal.SIGHUP, "reload")):
            loop.add_signal_handler(sig, self._on_signal, name)
        cfg = self.config.daemon
        systemd.status("starting: connecting to Kafka")
        self._meta = Metadata(self.config.kafka)
        await self._connect_kafka()
        self._open_socket(cfg.socket_path, cfg.socket_mode)
        runtime = cfg.runtime_path()
        if runtime:
            os.makedirs(runtime, exist_ok=True)
            self._load_state(runtime)
        for handle in self.workers:
            self._spawn(handle)
        await self._await_workers_ready(_WORKER_START_S)
        self._serve_task = self._spawn_task(self._accept_loop(), "accept")
        self._spawn_task(self._monitor_workers(), "monitor")
        if self._awaited:
            loop.call_later(_RECONNECT_GRACE_S, self._forget_awaited)
        self._ingest = await self._start_ingest()
        self._ingest_ready.set()
        if cfg.metrics_port:
            self._metrics = await start_metrics(self.stats, cfg.metrics_port, host=cfg.metrics_address)
        self._watchdog = systemd.Watchdog(self._healthy)
        if self._watchdog.period is not None:
            self._stale_s = max(_HEARTBEAT_MIN_STALE_S, self._watchdog.period)
            log.info(
                "systemd watchdog: a ping every %.1fs while every worker beat in the last %.1fs",
                self._watchdog.period,
                self._stale_s,
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

    async def _connect_kafka(self) -> None:
        delay = 0.2
        deadline = time.monotonic() + 60.0
        while True:
            try:
                await asyncio.wait_for(self._meta.start(), 15.0)
                return
            except (OSError, asyncio.TimeoutError, SluiceError) as exc:
                if time.monotonic() > deadline:
                    raise SluiceError(f"cannot reach Kafka at {self.config.kafka.bootstrap_servers}: {exc}") from exc
                log.warning("Kafka not reachable yet (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _open_socket(self, path: str, mode: int) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale, from a daemon that died
            else:
                probe.close()
                raise SluiceError(f"another daemon is serving {path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(512)
        sock.setblocking(False)
        self._listener = sock

    def _spawn_task(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    # --- workers ---------------------------------------------------------------------------

    def _spawn(self, handle: _WorkerHandle) -> None:
        parent, child = ch.Channel.pair()
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        handle.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.worker", str(child.fileno())],
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
        handle.reloads_at_spawn = self._reloads
        self._pin(handle)
        chan = handle.chan
        chan.send(
            ch.Start(
                worker=handle.index,
                workers=len(self.workers),
                config_text=self.config_text,
                config_source=self.config_path,
                # A restarted worker re-sends its predecessor's stamped batches from the arena
                # and skips their records in the rings (exactly once with idempotence).
                # After a daemon crash the new workers recover too, for the clients of the
                # dead daemon that may reconnect (their old ids are given back to them).
                recover=handle.restarts > 0 or self._recover_at_start,
                clients=[
                    c.client_id
                    for c in self.clients.values()
                    if c.segment is not None and handle.index not in c.detached
                ]
                + sorted(self._awaited),
            )
        )
        for name, (tid, parts) in self.topics.items():
            chan.send(ch.AddTopic(topic_id=tid, name=name, partitions=parts))
        for client in self.clients.values():
            if client.segment is not None and handle.index not in client.detached:
                chan.send(ch.AddClient(client_id=client.client_id, pid=client.pid, name=client.name), client.segment.fds())
                if client.gone:
                    # The RemoveClient its predecessor got (or missed, being dead) dies with it.
                    chan.send(ch.RemoveClient(client_id=client.client_id))
        asyncio.get_running_loop().add_reader(chan.fileno(), self._on_worker, handle)
        log.info("worker %d started (pid %d)", handle.index, handle.proc.pid)

    def _pin(self, handle: _WorkerHandle) -> None:
        if not self.config.daemon.pin_workers or handle.proc is None:
            return
        try:
            cpus = psutil.Process().cpu_affinity()
            if len(cpus) > 1:
                psutil.Process(handle.proc.pid).cpu_affinity([cpus[handle.index % len(cpus)]])
        except (psutil.Error, OSError, AttributeError) as exc:
            log.warning("cannot pin worker %d: %s", handle.index, exc)

    def _on_worker(self, handle: _WorkerHandle) -> None:
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
                    self._partitions_changed(topic, parts)
                case ch.ClientDropped(client_id=cid, reason=reason):
                    self._drop_client(cid, reason)
                case ch.ClientDetached(client_id=cid):
                    self._client_detached(cid, handle.index)
                case ch.Bye(undelivered=n):
                    handle.bye = True
                    self._undelivered += n
                    if n:
                        log.warning("worker %d stopped with %d records undelivered", handle.index, n)

    def _worker_gone(self, handle: _WorkerHandle) -> None:
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
        # should wait up to _RESTART_BACKOFF_MAX_S.
        if time.monotonic() - handle.spawned_at > _HEALTHY_SPELL_S:
            handle.crash_streak = 0
        handle.crash_streak += 1
        delay = min(_RESTART_BACKOFF_MAX_S, 0.1 * 2 ** min(handle.crash_streak - 1, 7))
        handle.next_start = time.monotonic() + delay
        log.error("worker %d died (exit %s); restarting in %.1fs", handle.index, code, delay)
        loop.call_later(delay, self._respawn, handle)

    def _respawn(self, handle: _WorkerHandle) -> None:
        if not self._stopping and handle.chan is None:
            self._spawn(handle)

    async def _await_workers_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not all(h.ready for h in self.workers):
            if time.monotonic() > deadline:
                raise SluiceError("workers did not become ready in time")
            for h in self.workers:
                if h.proc is not None and h.proc.poll() is not None and h.chan is not None:
                    raise SluiceError(f"worker {h.index} exited with {h.proc.returncode} during start-up")
            await asyncio.sleep(0.02)

    async def _monitor_workers(self) -> None:
        while not self._stopping:
            await asyncio.sleep(1.0)
            for h in self.workers:
                if h.proc is not None and h.chan is not None and h.proc.poll() is not None:
                    self._worker_gone(h)
            systemd.status(self._status_line())

    def _reloads_in_force(self, h: _WorkerHandle) -> int:
        snap = h.snapshot
        current = h.proc is not None and snap.get("pid") == h.proc.pid
        return h.reloads_at_spawn + (snap.get("reloads_applied", 0) if current else 0)

    def _healthy(self) -> bool:
        """The watchdog's question: is every worker either beating or being repaired by us?

        A worker that crashed waits out its restart backoff, and a new one connects to Kafka
        before its first heartbeat: both are the supervisor's to fix, and withholding pings
        for them would let one worker crash take the whole daemon down via systemd. A worker
        that stops beating while its process lives (hung, stopped) is what systemd must see.
        """
        now = time.monotonic()
        for h in self.workers:
            if h.chan is None:
                continue  # crashed: _worker_gone scheduled its restart
            limit = self._stale_s if h.ready else _WORKER_START_S
            if now - h.last_beat >= limit:
                return False
        return True

    def _broadcast(self, msg: Any, fds: list[int] | None = None) -> None:
        for h in self.workers:
            if h.chan is not None:
                h.chan.send(msg, fds)

    # --- topics ----------------------------------------------------------------------------

    async def topic(self, name: str) -> tuple[int, int]:
        """The topic's (id, partitions), registering it with every worker on first use."""
        known = self.topics.get(name)
        if known is not None:
            return known
        # One metadata lookup per name at a time, but names do not wait for each other: an
        # unknown topic takes its whole timeout, and must not stall every other client's lookup.
        lock = self._lookup_locks.setdefault(name, asyncio.Lock())
        try:
            async with lock:
                known = self.topics.get(name)
                if known is not None:
                    return known
                parts = await self._meta.partitions_for(name, timeout=5.0)
                known = self.topics.get(name)
                if known is not None:
                    return known
                if len(self.topics) >= 0xFFFF:
                    raise SluiceError("too many topics (65535)")
                tid = self._next_tid
                self._next_tid += 1
                self.topics[name] = (tid, parts)
                self._save_state()
                # Every worker hears of the topic before any client can use its id.
                self._broadcast(ch.AddTopic(topic_id=tid, name=name, partitions=parts))
                return tid, parts
        finally:
            if not lock.locked():
                self._lookup_locks.pop(name, None)

    def _partitions_changed(self, name: str, parts: int) -> None:
        known = self.topics.get(name)
        if known is None or parts <= known[1]:
            return
        log.info("topic %s grew to %d partitions", name, parts)
        self.topics[name] = (known[0], parts)
        self._save_state()
        self._broadcast(ch.AddTopic(topic_id=known[0], name=name, partitions=parts))

    # --- state kept across daemon restarts ---------------------------------------------------

    def _load_state(self, runtime: str) -> None:
        """Read what the previous daemon left in the runtime directory.

        Topic ids are always taken over (ring frames of reconnecting clients carry them).
        Without the clean-shutdown marker the previous daemon died: the workers recover their
        arenas, and the clients it knew get their old ids back when they reconnect.
        """
        self._state_dir = runtime
        marker = os.path.join(runtime, _CLEAN_MARKER)
        clean = os.path.exists(marker)
        try:
            os.unlink(marker)
        except OSError:
            pass
        self._recover_at_start = not clean
        try:
            with open(os.path.join(runtime, _STATE_FILE), encoding="utf-8") as f:
                state = json.load(f)
            topics = {str(n): (int(v[0]), int(v[1])) for n, v in state.get("topics", {}).items()}
            tokens = {int(t, 16): int(c) for t, c in state.get("clients", {}).items()}
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, AttributeError, IndexError) as exc:
            log.warning("ignoring unreadable daemon state in %s: %s", runtime, exc)
            return
        ids = [tid for tid, _ in topics.values()]
        if len(set(ids)) != len(ids) or any(not 0 <= t < 0xFFFF for t in ids):
            log.warning("ignoring daemon state in %s: topic ids are not unique", runtime)
            return
        self.topics = topics
        self._next_tid = max(ids, default=-1) + 1
        if not clean:
            self._tokens = tokens
            self._awaited = set(tokens.values())
            self._next_client = max(self._awaited, default=0) + 1
            log.warning(
                "the previous daemon did not stop cleanly: recovering the arenas; %d client(s) may reconnect",
                len(self._awaited),
            )

    def _save_state(self) -> None:
        if not self._state_dir:
            return
        state = {
            "version": 1,
            "topics": {n: [tid, parts] for n, (tid, parts) in self.topics.items()},
            "clients": {f"{t:016x}": cid for t, cid in self._tokens.items()},
        }
        path = os.path.join(self._state_dir, _STATE_FILE)
        tmp = path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(state, f)
            os.replace(tmp, path)
        except OSError as exc:
            log.error("cannot save the daemon state to %s: %s", path, exc)

    def _claim_token(self, client: _Client, token: int) -> None:
        """A client's Hello carried ``token``: give it its old id, or remember the new one."""
        client.token = token
        old = self._tokens.get(token)
        if old is not None and old != client.client_id and old not in self.clients:
            del self.clients[client.client_id]
            client.client_id = old
            self.clients[old] = client
            self._awaited.discard(old)
            log.info("client %d (%s) reconnected under its previous id", old, client.name)
            return
        if old is not None and old != client.client_id:
            log.warning("client token of %d is in use by a live connection; new id %d", old, client.client_id)
        self._tokens[token] = client.client_id
        self._save_state()

    def _forget_token(self, client: _Client) -> None:
        if client.token and self._tokens.get(client.token) == client.client_id:
            del self._tokens[client.token]
            self._save_state()

    def _forget_awaited(self) -> None:
        """The grace for reconnecting ran out: the workers let go of those clients' runs."""
        for cid in sorted(self._awaited):
            if cid in self.clients:
                continue
            log.warning("client %d of the previous daemon did not reconnect; forgetting it", cid)
            self._broadcast(ch.RemoveClient(client_id=cid))
            for t, c in list(self._tokens.items()):
                if c == cid:
                    del self._tokens[t]
        self._awaited.clear()
        self._save_state()

    def topic_info(self, name: str, tid: int, parts: int) -> control.TopicInfo:
        profile = self.config.profile_for(name)
        return control.TopicInfo(
            topic=name,
            topic_id=tid,
            partitions=parts,
            profile=self.config.profile_name_for(name),
            max_request_size=profile.max_request_size,
            on_full=profile.on_full,
            max_block_ms=profile.max_block_ms,
            batch_size=profile.batch_size,
            linger_ms=profile.linger_ms,
        )

    # --- socket ----------------------------------------------------------------------------

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        listener = self._listener
        while not self._stopping and listener is not None:
            try:
                sock, _ = await loop.sock_accept(listener)
            except (OSError, asyncio.CancelledError):
                return
            sock.setblocking(False)
            cid = self._next_client
            self._next_client += 1
            client = _Client(cid, sock)
            self.clients[cid] = client
            self._spawn_task(self._serve(client), f"client-{cid}")

    async def _read(self, client: _Client, reader: control.FrameReader) -> Any:
        """The next message of ``client`` (fds that came with it in ``client.inbox`` fds)."""
        loop = asyncio.get_running_loop()
        while not client.inbox:
            fut = loop.create_future()
            fd = client.sock.fileno()
            loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
            try:
                await fut
            finally:
                loop.remove_reader(fd)
            try:
                data, anc, _flags, _ = client.sock.recvmsg(262144, _MAX_ANCILLARY)
            except (BlockingIOError, InterruptedError):
                continue
            fds = _fds_of(anc)
            if not data:
                for fd_ in fds:
                    os.close(fd_)
                return None
            msgs = list(reader.feed(data))
            if fds:
                if len(msgs) == 1 and isinstance(msgs[0], control.SegmentOffer):
                    client.inbox.append((msgs[0], fds))
                    continue
                for fd_ in fds:
                    os.close(fd_)
            client.inbox.extend((m, []) for m in msgs)
        return client.inbox.pop(0)

    async def _send(self, client: _Client, msg: Any) -> None:
        data = control.encode(msg)
        async with client.send_lock:
            await asyncio.get_running_loop().sock_sendall(client.sock, data)

    async def _serve(self, client: _Client) -> None:
        reader = control.FrameReader(control.ClientMessage)
        try:
            refused = self._check_peer(client)
            if refused:
                await self._send(client, control.error_reply(control.ERR_NOT_ALLOWED, refused, fatal=True))
                try:
                    item = await asyncio.wait_for(self._read(client, reader), _REFUSE_LINGER_S)
                except (asyncio.TimeoutError, SluiceError):
                    item = None
                for _msg, fds in ([item] if item else []) + client.inbox:
                    for fd in fds:  # a SegmentOffer sent ahead of the reply: not ours to keep
                        os.close(fd)
                client.inbox.clear()
                return
            while True:
                try:
                    item = await self._read(client, reader)
                except SluiceError as exc:  # ProtocolError: a malformed frame
                    log.warning("client %d (%s): bad frame: %s", client.client_id, client.name, exc)
                    await self._send(client, control.error_reply(control.ERR_BAD_FRAME, str(exc), fatal=True))
                    return
                if item is None:
                    return
                msg, fds = item
                if not await self._dispatch(client, msg, fds):
                    return
        except (ConnectionError, OSError) as exc:
            log.info("client %d (%s): connection lost: %s", client.client_id, client.name, exc)
        finally:
            await self._close_client(client)

    def _check_peer(self, client: _Client) -> str | None:
        """None when the peer may stay; else what to tell it (the log gets the details)."""
        cfg = self.config.daemon
        try:
            pid, uid, gid = peer_credentials(client.sock)
        except OSError:
            pid, uid, gid = 0, -1, -1  # check_peer refuses it whenever an allow-list is set
        client.pid = pid
        if pid == os.getpid():
            return None  # the supervisor's own socket-ingest producer, whatever the lists say
        reason = check_peer(client.sock, cfg.allowed_uids, cfg.allowed_gids)
        if reason is None:
            return None
        log.warning("client %d refused (allowed_uids/allowed_gids): %s", client.client_id, reason)
        # Not the lists themselves: a refused peer learns nothing about who is allowed.
        return f"access denied: uid {uid} gid {gid} is not allowed to use this daemon"

    async def _dispatch(self, client: _Client, msg: Any, fds: list[int]) -> bool:
        """Handle one message; False to close the connection."""
        match msg:
            case control.Hello(version=version, client_name=name, pid=pid, token=token, wants_segment=wants):
                if version < control.MIN_PROTOCOL_VERSION:
                    await self._send(
                        client,
                        control.error_reply(control.ERR_UNSUPPORTED_PROTOCOL_VERSION, f"version {version} < {control.MIN_PROTOCOL_VERSION}", fatal=True),
                    )
                    return False
                client.name = name or f"client-{client.client_id}"
                client.pid = client.pid or pid
                if token and wants and not client.token:
                    self._claim_token(client, token)
                cfg = self.config.daemon
                await self._send(
                    client,
                    control.Welcome(
                        version=min(version, control.PROTOCOL_VERSION),
                        workers=len(self.workers),
                        request_ring_bytes=cfg.request_ring_bytes,
                        completion_ring_bytes=cfg.completion_ring_bytes,
                        client_id=client.client_id,
                    ),
                )
            case control.SegmentOffer(workers=workers):
                return await self._adopt_segment(client, workers, fds)
            case control.TopicLookup(topic=name):
                try:
                    tid, parts = await self.topic(name)
                except KafkaError as exc:
                    await self._send(client, control.ErrorReply(code=exc.code, name=exc.name, message=str(exc), fatal=False))
                    return True
                except SluiceError as exc:
                    await self._send(client, control.error_reply(control.ERR_UNEXPECTED_MESSAGE, str(exc)))
                    return True
                await self._send(client, self.topic_info(name, tid, parts))
            case control.Produce():
                await self._produce(client, msg)
            case control.Flush(timeout_ms=ms):
                pending = list(client.pending)
                done = True
                if pending:
                    _, still = await asyncio.wait(pending, timeout=ms / 1000.0)
                    done = not still
                await self._send(client, control.FlushDone(complete=done, pending=sum(1 for f in pending if not f.done())))
            case control.StatsRequest():
                await self._send(client, control.StatsReply(stats=self.stats()))
            case control.Goodbye():
                if client.pending:
                    await asyncio.wait(list(client.pending), timeout=self.config.daemon.shutdown_timeout_ms / 1000.0)
                return False
            case _:
                await self._send(client, control.error_reply(control.ERR_UNEXPECTED_MESSAGE, type(msg).__name__))
        return True

    async def _adopt_segment(self, client: _Client, workers: int, fds: list[int]) -> bool:
        if client.segment is not None or not fds:
            for fd in fds:
                os.close(fd)
            await self._send(client, control.error_reply(control.ERR_SEGMENT_REFUSED, "no segment fds, or a second segment", fatal=True))
            return False
        try:
            if workers != len(self.workers):
                raise SegmentError(f"segment built for {workers} workers, the daemon runs {len(self.workers)}")
            segment = Segment.attach(fds[0], fds[1:])
            if segment.workers != len(self.workers) or not fds[1:]:
                segment.close()
                raise SegmentError("segment layout does not match the Welcome")
        except SluiceError as exc:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            log.warning("client %d (%s): segment refused: %s", client.client_id, client.name, exc)
            await self._send(client, control.error_reply(control.ERR_SEGMENT_REFUSED, str(exc), fatal=True))
            return False
        client.segment = segment
        msg = ch.AddClient(client_id=client.client_id, pid=client.pid, name=client.name)
        for h in self.workers:
            if h.chan is not None:
                h.chan.send(msg, segment.fds())
        log.info("client %d (%s, pid %d) attached its segment", client.client_id, client.name, client.pid)
        await self._send(client, control.SegmentAccepted(client_id=client.client_id))
        return True

    def _drop_client(self, cid: int, reason: str) -> None:
        client = self.clients.get(cid)
        log.error("client %d dropped: %s", cid, reason)
        if client is None:
            return
        try:
            client.sock.send(control.encode(control.error_reply(control.ERR_BAD_FRAME, reason, fatal=True)))
        except OSError:
            pass
        try:
            client.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    async def _close_client(self, client: _Client) -> None:
        try:
            client.sock.close()
        except OSError:
            pass
        client.gone = True
        if client.segment is None:
            self.clients.pop(client.client_id, None)
            self._forget_token(client)
            return
        # Workers drain what it committed, then detach; the segment goes when all have.
        self._broadcast(ch.RemoveClient(client_id=client.client_id))

    def _client_detached(self, cid: int, worker: int) -> None:
        client = self.clients.get(cid)
        if client is None:
            return
        client.detached.add(worker)
        if len(client.detached) >= len(self.workers) and client.segment is not None:
            client.segment.close()
            client.segment = None
            self.clients.pop(cid, None)
            self._forget_token(client)
            log.info("client %d (%s): segment released", cid, client.name)

    # --- socket ingest ---------------------------------------------------------------------

    async def _start_ingest(self) -> Any:
        from shm.producer import Producer

        producer = await asyncio.to_thread(
            Producer, self.config.daemon.socket_path, client_name="sluice-socket-ingest", reconnect_timeout_s=0.0
        )
        producer._never_block = True
        return producer

    async def _produce(self, client: _Client, msg: control.Produce) -> None:
        if self._ingest is None:
            await self._ingest_ready.wait()
        producer = self._ingest
        results: list[control.RecordResult | None] = [None] * len(msg.records)
        futures: list[tuple[int, Any]] = []
        try:
            if msg.topic not in producer._topics:
                await asyncio.to_thread(producer.lookup, msg.topic)
        except KafkaError as exc:
            self._fail_all(results, exc.code, exc.name)
            if msg.ack:
                await self._send(client, control.ProduceAck(seq=msg.seq, results=results))
            else:
                await self._send(client, control.ErrorReply(code=exc.code, name=exc.name, message=str(exc), fatal=False))
            return
        info = producer._topics[msg.topic].info
        for i, rec in enumerate(msg.records):
            deadline = time.monotonic() + info.max_block_ms / 1000.0
            while True:
                try:
                    fut = producer.send(
                        msg.topic, rec.value, rec.key, partition=rec.partition, headers=rec.headers, timestamp=rec.timestamp
                    )
                except BufferFullError as exc:
                    if info.on_full == "block" and time.monotonic() < deadline:
                        await asyncio.sleep(0.002)
                        continue
                    results[i] = _result(-1, control.ERR_BUFFER_FULL, str(exc))
                    break
                except KafkaError as exc:
                    results[i] = _result(-1, exc.code, exc.name)
                    break
                futures.append((i, fut))
                break
        if not msg.ack:
            if futures:
                waiter = _all_done(asyncio.get_running_loop(), [f for _, f in futures])
                client.pending.add(waiter)
                waiter.add_done_callback(client.pending.discard)
            return
        waiter = asyncio.ensure_future(self._ack(client, msg.seq, results, futures))
        client.pending.add(waiter)
        waiter.add_done_callback(client.pending.discard)

    async def _ack(self, client: _Client, seq: int, results: list[Any], futures: list[tuple[int, Any]]) -> None:
        if futures:
            await _all_done(asyncio.get_running_loop(), [f for _, f in futures])
        for i, fut in futures:
            try:
                meta = fut.result(0)
                results[i] = control.RecordResult(
                    partition=meta.partition, offset=meta.offset, timestamp=meta.timestamp, error_code=0, error_name="NONE"
                )
            except KafkaError as exc:
                results[i] = control.RecordResult(partition=fut.partition, offset=-1, timestamp=-1, error_code=exc.code, error_name=exc.name)
            except SluiceError as exc:
                results[i] = control.RecordResult(partition=fut.partition, offset=-1, timestamp=-1, error_code=control.ERR_SHUTTING_DOWN, error_name=type(exc).__name__)
        try:
            await self._send(client, control.ProduceAck(seq=seq, results=results))
        except OSError:
            pass

    @staticmethod
    def _fail_all(results: list[Any], code: int, name: str) -> None:
        for i in range(len(results)):
            results[i] = control.RecordResult(partition=-1, offset=-1, timestamp=-1, error_code=code, error_name=name)

    # --- stats -----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        workers: dict[str, Any] = {}
        for h in self.workers:
            snap = dict(h.snapshot)
            snap["alive"] = h.chan is not None and now - h.last_beat < self._stale_s
            snap["restarts"] = h.restarts
            workers[str(h.index)] = snap
        drops = dict(self._ingest.drops) if self._ingest is not None else {}
        return {
            "workers": workers,
            "totals": aggregate(workers),
            "clients": sum(1 for c in self.clients.values() if c.segment is not None),
            "connections": len(self.clients),
            "topics": len(self.topics),
            "restarts": sum(h.restarts for h in self.workers),
            "reloads": self._reloads,
            "uptime_s": round(now - self._started, 1),
            "start_time": self._started_wall,
            "version": _VERSION,
            "drops": drops,
        }

    def _status_line(self) -> str:
        t = aggregate({str(h.index): h.snapshot for h in self.workers})
        return (
            f"{len(self.workers)} workers, {len(self.clients)} connections, "
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
        self.config_text = text
        self._reloads += 1
        logging.getLogger().setLevel(new.daemon.log_level.upper())
        self._broadcast(ch.Reload(config_text=text, config_source=self.config_path))
        await self._await_reload_applied(_RELOAD_APPLY_TIMEOUT_S)
        log.info("reloaded: %s", ", ".join(diff.live) or "no changes")
        systemd.ready(self._status_line())

    async def _await_reload_applied(self, timeout: float) -> bool:
        # Each worker answers a Reload with a Stats whose reloads_applied counts it (a snapshot
        # left by a previous process of the same worker does not count: the pid tells).
        deadline = time.monotonic() + timeout
        while True:
            behind = [h.index for h in self.workers if h.chan is not None and self._reloads_in_force(h) < self._reloads]
            if not behind:
                return True
            if time.monotonic() > deadline:
                log.warning(
                    "worker(s) %s did not confirm the reload within %.0fs; they apply it when they catch up",
                    ", ".join(map(str, behind)),
                    timeout,
                )
                return False
            await asyncio.sleep(0.01)

    async def shutdown(self) -> None:
        self._stopping = True
        timeout_s = self.config.daemon.shutdown_timeout_ms / 1000.0
        systemd.stopping("draining")
        systemd.extend_timeout(int((timeout_s + 10) * 1e6))
        log.info("stopping: draining rings and waiting for acks (up to %.0fs)", timeout_s)
        if self._listener is not None:
            try:
                os.unlink(self.config.daemon.socket_path)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        if self._ingest is not None:
            await asyncio.to_thread(self._ingest.flush, min(timeout_s, 10.0))
        self._broadcast(ch.Shutdown(timeout_ms=int(timeout_s * 1000)))
        deadline = time.monotonic() + timeout_s + 5.0
        extended = time.monotonic()
        while any(h.proc is not None and h.proc.poll() is None for h in self.workers):
            now = time.monotonic()
            if now > deadline:
                for h in self.workers:
                    if h.proc is not None and h.proc.poll() is None:
                        log.error("worker %d did not stop in time; killing it", h.index)
                        h.proc.kill()
                break
            if now - extended >= _EXTEND_EVERY_S:
                # Bounded by the deadline above, so a drain that hangs is still killed.
                systemd.extend_timeout(5_000_000)
                extended = now
            await asyncio.sleep(0.05)
        for h in self.workers:
            if h.proc is not None:
                h.proc.wait()
            if h.chan is not None:
                asyncio.get_running_loop().remove_reader(h.chan.fileno())
                h.chan.close()
                h.chan = None
        if self._ingest is not None:
            try:
                self._ingest.close(timeout=0.5)
            except Exception:  # noqa: BLE001 - the workers are gone; nothing left to lose here
                pass
        # Stop the connection tasks before closing their sockets: closing an fd that still has
        # a reader registered makes uvloop abort the whole process (SIGABRT, exit -6).
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        for client in list(self.clients.values()):
            try:
                client.sock.close()
            except OSError:
                pass
            if client.segment is not None:
                client.segment.close()
        if self._metrics is not None:
            await self._metrics.close()
        if self._meta is not None:
            self._meta.close()
        if self._state_dir and self._undelivered == 0 and all(h.bye for h in self.workers):
            # Every worker drained and said so: the next start has nothing to recover.
            try:
                with open(os.path.join(self._state_dir, _CLEAN_MARKER), "w", encoding="utf-8") as f:
                    f.write("1\n")
            except OSError as exc:
                log.error("cannot write the clean-shutdown marker: %s", exc)
        # Fed through the whole drain (a hung drain must still be caught); stopped last.
        if self._watchdog is not None:
            await self._watchdog.stop()
        log.info("stopped")


def _result(partition: int, code: int, name: str) -> control.RecordResult:
    return control.RecordResult(partition=partition, offset=-1, timestamp=-1, error_code=code, error_name=name)


def _all_done(loop: asyncio.AbstractEventLoop, futs: list[Any]) -> asyncio.Future[None]:
    """One asyncio future that completes when every DeliveryFuture in ``futs`` has its outcome.

    The records' outcomes arrive on the ingest producer's completion thread; counting them
    down there and waking the loop once per Produce costs far less than awaiting each one
    (an asyncio future and a thread-safe call per record: socket ingest ran at ~150k records/s
    with seconds of p99 latency that way).
    """
    done: asyncio.Future[None] = loop.create_future()
    if not futs:
        done.set_result(None)
        return done
    left = [len(futs)]
    lock = threading.Lock()

    def one(_f: Any) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            loop.call_soon_threadsafe(_finish, done)

    for f in futs:
        f.add_done_callback(one)
    return done


def _finish(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _fds_of(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    return fds


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
