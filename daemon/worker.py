"""A worker process: drains its request ring of every client, batches, sends, completes.

Each worker owns the partitions that :func:`shm.partitioner.owner` gives it, so one
partition's records and idempotent sequence numbers stay with one process.

This module holds the process: its main loop and the control messages from the supervisor.
The work is done by parts it wires together, each given what it needs in its constructor:

- :mod:`daemon.drain`: reads the request rings into the accumulator, one chunk per region;
- :mod:`daemon.accumulator` and :mod:`daemon.sender`: batches, and their trips to Kafka;
- :mod:`daemon.completions`: outcomes to chunks, completion frames, arena slot holds, detach;
- :mod:`daemon.recovery`: after a crash, re-sends the dead worker's stamped batches and skips
  their records in the rings.

Ring space and completions (why nothing is lost when a worker dies)
--------------------------------------------------------------------
The worker reads a request ring with a private cursor and does *not* free what it read. Each
drain of a ring is a *chunk* ``[start, end)``; the chunk's records go into batches whose
``runs`` name the chunk. When every record of a chunk has its outcome (offset or error), and
every earlier chunk of that ring is complete too, the worker writes the chunk's COMPLETION
frames and then one CHUNK_DONE frame carrying ``end`` into the client's completion ring, all
published with one head store. The client resolves the records, then stores the request
ring's tail at ``end``: only then is the space reused.

So a request ring holds every record that is not yet complete. A restarted worker starts its
cursor at the larger of the request ring's tail and the last CHUNK_DONE still unread in the
completion ring, and re-reads exactly the records whose outcome the client has not been
told. Records the dead worker had already put into stamped or answered batches are not
appended again: the restarted worker finds those batches in its arena, re-sends the stamped
ones byte for byte and skips their records in the rings (see :mod:`daemon.recovery` and
docs/ARCHITECTURE.md, "Worker crashes"), so with idempotence nothing is lost or duplicated.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

import msgspec

from daemon import channel as ch
from daemon.accumulator import Accumulator
from daemon.arena import Arena
from daemon.completions import Completions, SlotHolds
from daemon.config import Config, Profile, loads
from daemon.drain import ChunkTable, Client, Drainer, TopicTable, resume_position
from daemon.recovery import Recovery
from daemon.ringscan import nth_record_position
from daemon.sender import Sender
from daemon.stats import Counters, LatencyHistogram
from shm.errors import CorruptFrameError, SegmentError
from shm.layout import WAKE_TIMEOUT_S
from shm.segment import Segment

__all__ = ["Worker", "main"]

log = logging.getLogger("sluice.worker")

_STATS_INTERVAL_S = 1.0
_LINGER_POLL_S = 0.001  # how often rings are polled while batches linger (doorbells unarmed)
# A pass that consumed at least this much is followed by another at once; a smaller one by a
# poll after _LINGER_POLL_S, so that records arrive in chunks worth their per-chunk work.
_BUSY_PASS_BYTES = 64 * 1024
_STOP_POLL_S = 0.001  # pause between drains at shutdown while the arena is full
_CLOSE_POLL_S = 0.005  # how often completions are written while the sender flushes at shutdown
_SENDER_EXIT_S = 1.0  # how long the sender's task may take to end after close()
_START_TIMEOUT_S = 30.0  # how long a new worker waits for the supervisor's Start message
_EXIT_BAD_START = 2  # exit status when the first control message is not Start


class Worker:
    """The worker's state and its asyncio main loop."""

    def __init__(
        self,
        index: int,
        workers: int,
        config: Config,
        chan: ch.Channel,
        *,
        recover: bool = False,
        clients: list[int] | None = None,
    ) -> None:
        self.index = index
        self.workers = workers
        self.config = config
        self.chan = chan
        self.clients: dict[int, Client] = {}
        self.topics = TopicTable()
        self.table = ChunkTable()
        self.counters = Counters()
        self.latency = LatencyHistogram()
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._shutdown_timeout_ms = 0
        runtime = config.daemon.runtime_path()
        arena_path = os.path.join(runtime, f"arena-{index}") if runtime else None
        try:
            self.arena = Arena(config.kafka.buffer_memory, path=arena_path, recover=recover)
        except OSError:
            log.warning("cannot create arena file %s; using anonymous memory", arena_path)
            self.arena = Arena(config.kafka.buffer_memory)
        self.acc = Accumulator(
            buffer_memory=config.kafka.buffer_memory,
            profile_for=self._profile_for,
            arena=self.arena,
            locate=self._locate_record,
        )
        self.holds = SlotHolds(self.arena)
        self.recovery = Recovery(
            acc=self.acc,
            arena=self.arena,
            holds=self.holds,
            topics=self.topics,
            table=self.table,
            counters=self.counters,
            refresh_topics=self._on_control,
            worker=index,
        )
        self.completions = Completions(
            acc=self.acc,
            holds=self.holds,
            table=self.table,
            topics=self.topics,
            counters=self.counters,
            latency=self.latency,
            clients=self.clients,
            recovered=self.recovery.answered,
            resume=self._on_space,
            drop=self._drop,
            unwatch=self._unwatch,
            detached=self._detached,
        )
        self.drainer = Drainer(
            acc=self.acc,
            clients=self.clients,
            topics=self.topics,
            table=self.table,
            counters=self.counters,
            recovery=self.recovery,
            drop=self._drop,
            refresh_topics=self._on_control,
        )
        self.sender = Sender(
            config.kafka,
            self.acc,
            self._profile_for,
            self.completions.on_complete,
            on_partition_count=self._on_partition_count,
        )
        if self.arena.recovered:
            adopt = self.recovery.start(set(clients or ()))
            if adopt:
                self.sender.adopt(adopt)
        elif recover:
            log.info("worker %d: nothing to recover in the arena %s", index, arena_path)

    def _profile_for(self, topic: str) -> Profile:
        return self.config.profile_for(topic)

    def _locate_record(self, client_id: int, first: int, topic: str, partition: int, k: int) -> int:
        # For Accumulator.split: a run's record k in its client's ring (-1: not found).
        client = self.clients.get(client_id)
        tid = self.topics.ids.get(topic)
        if tid is None:
            return -1
        if client is None:
            # A recovered batch's run of a client that is not attached (see Recovery).
            return self.recovery.absent_position(client_id, first)
        return nth_record_position(client.req, first, tid, partition, k)

    # --- control channel ------------------------------------------------------------------

    def _on_control(self) -> None:
        try:
            msgs = self.chan.receive()
        except EOFError:
            log.warning("worker %d: supervisor is gone; shutting down", self.index)
            self._begin_shutdown(self.config.daemon.shutdown_timeout_ms)
            return
        for msg, fds in msgs:
            self._handle(msg, fds)
        self._poke()

    def _handle(self, msg: Any, fds: list[int]) -> None:
        match msg:
            case ch.AddTopic(topic_id=tid, name=name, partitions=parts):
                self.topics.add(tid, name, parts)
            case ch.AddClient(client_id=cid, name=name):
                self._add_client(cid, name, fds)
            case ch.RemoveClient(client_id=cid):
                client = self.clients.get(cid)
                if client is not None:
                    client.removing = True
                    self.completions.remove(client)
                else:
                    # A client of a dead daemon that never reconnected: its recovered runs
                    # will not be met in any ring, so their batches' slots may go.
                    self.recovery.orphan(cid)
            case ch.Reload(config_text=text, config_source=source):
                try:
                    self.config = loads(text, source=source)
                except Exception as exc:  # noqa: BLE001 - the supervisor validated it already
                    log.error("worker %d: reload refused: %s", self.index, exc)
                else:
                    # The supervisor holds READY=1 until every worker reports this count.
                    self.counters.reloads_applied += 1
                    self.chan.send(ch.Stats(worker=self.index, snapshot=self.snapshot()))
            case ch.Shutdown(timeout_ms=ms):
                self._begin_shutdown(ms)
            case _:
                for fd in fds:
                    os.close(fd)
                log.error("worker %d: unexpected control message %r", self.index, msg)

    def _add_client(self, cid: int, name: str, fds: list[int]) -> None:
        if not fds:
            log.error("worker %d: client %d came without its segment", self.index, cid)
            return
        try:
            segment = Segment.attach(fds[0], fds[1:])
        except SegmentError as exc:
            for fd in fds:
                os.close(fd)
            self.recovery.orphan(cid)
            self.chan.send(ch.ClientDropped(client_id=cid, reason=str(exc)))
            return
        client = Client(cid, name, segment, self.index)
        try:
            start = resume_position(client)
        except CorruptFrameError as exc:
            segment.close()
            self.recovery.orphan(cid)
            self.chan.send(ch.ClientDropped(client_id=cid, reason=str(exc)))
            return
        client.req.seek(start)
        self.clients[cid] = client
        self.recovery.attach(client, start)
        if client.bell is not None:
            asyncio.get_running_loop().add_reader(client.bell.fd, self._on_bell, client)

    def _on_bell(self, client: Client) -> None:
        if client.bell is not None:
            client.bell.drain()
        self._poke()

    def _unwatch(self, client: Client) -> None:
        if client.bell is not None:
            asyncio.get_running_loop().remove_reader(client.bell.fd)

    def _detached(self, client_id: int) -> None:
        self.chan.send(ch.ClientDetached(client_id=client_id))

    def _drop(self, client: Client, reason: str) -> None:
        log.error("worker %d: dropping client %d (%s): %s", self.index, client.client_id, client.name, reason)
        self.recovery.end(client, client.req.cursor)
        client.dead = True
        self.completions.remove(client)
        self.counters.dropped_clients += 1
        self.chan.send(ch.ClientDropped(client_id=client.client_id, reason=reason))

    def _on_partition_count(self, topic: str, count: int) -> None:
        self.chan.send(ch.PartitionCount(topic=topic, partitions=count))

    def _on_space(self) -> None:
        """A batch finished: its arena space is free (or will be once its chunks are reported)."""
        self.drainer.resume()
        self._poke()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # --- one pass -------------------------------------------------------------------------

    def drain(self) -> bool:
        """One pass over every client's request ring; True if any record was taken."""
        took = self.drainer.drain()
        if took:
            self.sender.wakeup()
        return took

    def emit(self) -> None:
        """Write the completions of every finished chunk, in chunk order, per client."""
        self.completions.emit()

    # --- main loop ------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        s = self.sender.stats
        arena = self.arena
        ring_fill = 0.0
        for client in self.clients.values():
            ring_fill = max(ring_fill, client.req.used() / client.req.capacity)
        c = self.counters
        return {
            "records_in": c.records_in,
            "bytes_in": c.bytes_in,
            "records_out": c.records_out,
            "records_failed": c.records_failed,
            "bytes_out": s["bytes"],
            "batches": s["batches"],
            "requests": s["requests"],
            "in_flight": s["in_flight"],
            "retries": s["retries"],
            "throttle_s": s["throttle_ms"] / 1000.0,
            "splits": s["splits"],
            "recovered_splits": self.recovery.splits,
            "brokers_auth_failed": s["brokers_auth_failed"],
            "errors": dict(c.errors),
            "failed": dict(c.failed),
            "clients": len(self.clients),
            "dropped_clients": c.dropped_clients,
            "ring_fill": ring_fill,
            "arena_fill": arena.used_bytes / arena.size if arena.size else 0.0,
            "open_batches": self.acc.open_batches,
            "latency_ms": self.latency.percentiles(),
            "latency_count": self.latency.total,
            "reloads_applied": c.reloads_applied,
            "chunks": c.chunks,
            "latency_sum_ms": self.latency.sum_ms,
            "alive": True,
            "pid": os.getpid(),
        }

    def _send_stats(self) -> None:
        for client in self.clients.values():
            client.segment.beat_daemon()
        self.chan.send(ch.Stats(worker=self.index, snapshot=self.snapshot()))
        if not self._stopping:
            asyncio.get_running_loop().call_later(_STATS_INTERVAL_S, self._send_stats)

    def _begin_shutdown(self, timeout_ms: int) -> None:
        self._stopping = True
        self._shutdown_timeout_ms = timeout_ms
        self._poke()

    async def main_loop(self) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        loop.add_reader(self.chan.fileno(), self._on_control)
        await self.sender.start()
        sender_task = asyncio.create_task(self.sender.run(), name=f"sender-{self.index}")
        self.chan.send(ch.Ready(worker=self.index))
        self._send_stats()
        try:
            while not self._stopping:
                took = self.drain()
                self.emit()
                self.chan.flush()  # what send() could not write at once (the socket was full)
                if took and self.drainer.pass_bytes >= _BUSY_PASS_BYTES:
                    # The rings hold plenty: go on at once (after the loop's other callbacks).
                    await asyncio.sleep(0)
                    continue
                if took or self.acc.open_batches:
                    # Records are lingering anyway: poll the rings every _LINGER_POLL_S without
                    # arming the doorbells. A doorbell costs the client an eventfd_write that
                    # wakes us (measured 10-30 us each on this VM); armed on every drain, a busy
                    # client paid it every few records. Now it pays at most once per idle spell.
                    # Draining again at once after a small pass read a few records a pass, and
                    # per-chunk work (a chunk, its completions) then cost more than the records.
                    await self._sleep(_LINGER_POLL_S)
                elif self._arm_all():
                    await self._sleep(WAKE_TIMEOUT_S)  # the bound on a lost doorbell
                    self._disarm_all()
            await self._drain_and_stop(sender_task)
        finally:
            loop.remove_reader(self.chan.fileno())

    async def _sleep(self, seconds: float) -> None:
        """Sleep until poked (doorbell, control message, completion) or ``seconds`` pass."""
        wake = self._wake
        wake.clear()
        handle = asyncio.get_running_loop().call_later(seconds, wake.set)
        try:
            await wake.wait()
        finally:
            handle.cancel()

    def _arm_all(self) -> bool:
        """Tell every writer we sleep; False when some ring has data after all."""
        ready = self.table.ready
        if ready or self.drainer.full:
            return not ready
        for client in self.clients.values():
            try:
                if client.dead or client.req.arm():
                    continue
            except CorruptFrameError as exc:  # the head changed since drain() looked
                self._drop(client, str(exc))
            self._disarm_all()
            return False
        return True

    def _disarm_all(self) -> None:
        for client in self.clients.values():
            if not client.dead:
                client.req.disarm()

    async def _drain_and_stop(self, sender_task: asyncio.Task[None]) -> None:
        deadline = time.monotonic() + self._shutdown_timeout_ms / 1000.0
        # Take in what clients had committed when the stop began (and what arrives while that
        # is read), as the arena allows, but not what they go on writing: a busy client would
        # hold every stop until its deadline. Later frames stay in the rings; a client that
        # reconnects hands them to the next daemon, one that does not fails them at the hang-up.
        targets = [(c, c.req.head) for c in self.clients.values() if not c.dead]
        while time.monotonic() < deadline:
            took = self.drain()
            self.emit()
            if not took and not self.drainer.full:
                break
            if all(c.dead or c.req.cursor >= head for c, head in targets):
                break
            await asyncio.sleep(_STOP_POLL_S if not took else 0)
        remaining = max(0.0, deadline - time.monotonic())
        # Keep reporting while the sender flushes: a finished batch's arena slot is held until
        # its records' completions are written, and the sender is idle only once it is freed.
        closing = asyncio.ensure_future(self.sender.close(remaining))
        while not closing.done():
            self.emit()
            await asyncio.wait({closing}, timeout=_CLOSE_POLL_S)
        closing.result()
        self.emit()
        try:
            await asyncio.wait_for(sender_task, _SENDER_EXIT_S)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001
            sender_task.cancel()
        undelivered = self.table.undelivered()
        self.chan.send(ch.Bye(worker=self.index, undelivered=undelivered))
        self.chan.flush()


async def _run(
    index: int, workers: int, chan: ch.Channel, config: Config, recover: bool = False, clients: list[int] | None = None
) -> None:
    worker = Worker(index, workers, config, chan, recover=recover, clients=clients)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # The supervisor decides when workers stop; a terminal's Ctrl-C reaches it too.
        loop.add_signal_handler(sig, lambda: None)
    await worker.main_loop()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m daemon.worker FD``: the fd is this worker's channel end."""
    argv = sys.argv[1:] if argv is None else argv
    # A hung worker (the watchdog stops) can be inspected with kill -ABRT/-SEGV: stacks to stderr.
    faulthandler.enable()
    fd = int(argv[0])
    sock = socket.socket(fileno=fd)
    chan = ch.Channel(sock, ch.ToWorker)
    # Wait (blocking, bounded) for Start.
    sock.setblocking(True)
    sock.settimeout(_START_TIMEOUT_S)
    data, _anc, _, _ = sock.recvmsg(ch.MAX_MESSAGE)
    sock.setblocking(False)
    start = msgspec.msgpack.decode(data, type=ch.ToWorker)
    if not isinstance(start, ch.Start):
        print("worker: first message was not Start", file=sys.stderr)
        return _EXIT_BAD_START
    config = loads(start.config_text, source=start.config_source)
    logging.basicConfig(
        level=config.daemon.log_level.upper(),
        format=f"%(asctime)s %(levelname)s worker-{start.worker} %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        import uvloop

        uvloop.run(_run(start.worker, start.workers, chan, config, start.recover, start.clients))
    except KeyboardInterrupt:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
