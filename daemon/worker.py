"""A worker process: drains its request ring of every client, batches, sends, completes.

Each worker owns the partitions that :func:`shm.partitioner.owner` gives it, so one
partition's records and idempotent sequence numbers stay with one process.

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
ones byte for byte and skips their records in the rings (see "crash recovery" below and
docs/ARCHITECTURE.md, "Worker crashes"), so with idempotence nothing is lost or duplicated.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections import deque
from typing import Any

from daemon import channel as ch
from daemon.accumulator import (
    APPEND_FULL,
    APPEND_INVALID,
    APPEND_OK,
    APPEND_TOO_LARGE,
    Accumulator,
    Batch,
    RecoveredBatch,
)
from daemon.arena import Arena
from daemon.config import Config, loads
from daemon.protocol import errors as ec
from daemon.sender import Sender
from daemon.stats import LatencyHistogram
from shm.errors import CorruptFrameError, SegmentError
from shm.frames import COMPLETION, LENGTH_SKIP1, LENGTH_SKIP2, chunk_done_end, record_body_valid
from shm.layout import FRAME_CHUNK_DONE, FRAME_COMPLETION, FRAME_RECORD
from shm.segment import Segment

__all__ = ["Worker", "main"]

log = logging.getLogger("sluice.worker")

_STATS_INTERVAL_S = 1.0
_LINGER_POLL_S = 0.001  # how often rings are polled while batches linger (doorbells unarmed)
_RECORD_PREFIX = struct.Struct("<IIHHiq")  # frame header + RECORD prefix
_CHUNK_DONE = struct.Struct("<Q")
_pack_completion = COMPLETION.pack_into
_pack_chunk_done = _CHUNK_DONE.pack_into


class _Chunk:
    """One drain of one client's ring; complete when ``pending`` reaches zero."""

    __slots__ = ("end", "pending", "results", "slots", "keys")

    def __init__(self, end: int, pending: int) -> None:
        self.end = end
        self.pending = pending
        # (order, topic_id, error_code, partition, base_offset, timestamp, count)
        self.results: list[tuple[int, int, int, int, int, int, int]] = []
        # Arena slots of finished batches holding records of this chunk: kept (state DONE)
        # until the chunk's CHUNK_DONE is published, so a restarted worker neither re-sends
        # nor re-reads those records.
        self.slots: list[int] = []
        self.keys: list[int] | None = None  # a recovery chunk's run keys (it has several)


class _Client:
    __slots__ = (
        "client_id",
        "name",
        "segment",
        "req",
        "cmp",
        "bell",
        "chunks",
        "removing",
        "dead",
        "blocked",
        "cmp_broken",
        "skips",
        "rchunk",
        "rpieces",
    )

    def __init__(self, client_id: int, name: str, segment: Segment, worker: int) -> None:
        self.client_id = client_id
        self.name = name
        self.segment = segment
        self.req = segment.request_ring(worker)
        self.cmp = segment.completion_ring(worker)
        self.bell = segment.request_doorbell(worker)
        self.chunks: deque[_Chunk] = deque()
        self.removing = False  # the client is gone: drain what it committed, then detach
        self.dead = False  # its ring was corrupt: read nothing more
        self.blocked = False  # the completion ring was full at the last emit
        self.cmp_broken = False  # its completion ring's tail was corrupt: write nothing more
        # After a crash: the dead worker's recovered runs of this client not yet met in the ring,
        # (topic_id << 32) + partition -> [[first_position, remaining, batch, index, count], ...]
        # by position; the recovery chunk being built; its pieces per recovered batch.
        self.skips: dict[int, list[list[Any]]] | None = None
        self.rchunk: _Chunk | None = None
        self.rpieces: dict[RecoveredBatch, list[list[int]]] = {}


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
        self.clients: dict[int, _Client] = {}
        self.topic_names: list[str | None] = []
        self.topic_ids: dict[str, int] = {}
        self.partition_counts: list[int] = []
        self._chunk_seq = 0
        self._chunks: dict[int, tuple[_Client, _Chunk]] = {}
        self._dirty: set[_Client] = set()
        self._removing: set[_Client] = set()  # gone clients still being drained
        self._arena_full = False
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._shutdown_timeout_ms = 0
        self.latency = LatencyHistogram()
        self.counters: dict[str, Any] = {
            "records_in": 0,
            "bytes_in": 0,
            "records_out": 0,
            "records_failed": 0,
            "chunks": 0,
            "errors": {},
            "dropped_clients": 0,
            "reloads_applied": 0,
        }
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
        )
        self.sender = Sender(
            config.kafka,
            self.acc,
            self._profile_for,
            self._on_complete,
            on_partition_count=self._on_partition_count,
        )
        # Arena slots of finished batches -> how many things still need them (chunks not yet
        # reported, recovered runs not yet met in the rings, a recovered batch's answer).
        self._holds: dict[int, int] = {}
        # Recovered runs per client id: [batch, first_position, count, index in the batch].
        self._rec_runs: dict[int, list[list[Any]]] = {}
        if self.arena.recovered:
            self._recover(set(clients or ()))
        elif recover:
            log.info("worker %d: nothing to recover in the arena %s", index, arena_path)

    def _profile_for(self, topic: str):  # noqa: ANN202 - Profile
        return self.config.profile_for(topic)

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
                while len(self.topic_names) <= tid:
                    self.topic_names.append(None)
                    self.partition_counts.append(0)
                self.topic_names[tid] = name
                self.partition_counts[tid] = parts
                self.topic_ids[name] = tid
            case ch.AddClient(client_id=cid, name=name):
                self._add_client(cid, name, fds)
            case ch.RemoveClient(client_id=cid):
                client = self.clients.get(cid)
                if client is not None:
                    client.removing = True
                    self._removing.add(client)
                else:
                    # A client of a dead daemon that never reconnected: its recovered runs
                    # will not be met in any ring, so their batches' slots may go.
                    self._orphan_runs(cid)
            case ch.Reload(config_text=text, config_source=source):
                try:
                    self.config = loads(text, source=source)
                except Exception as exc:  # noqa: BLE001 - the supervisor validated it already
                    log.error("worker %d: reload refused: %s", self.index, exc)
                else:
                    # The supervisor holds READY=1 until every worker reports this count.
                    self.counters["reloads_applied"] += 1
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
            self._orphan_runs(cid)
            self.chan.send(ch.ClientDropped(client_id=cid, reason=str(exc)))
            return
        client = _Client(cid, name, segment, self.index)
        try:
            start = _resume_position(client)
        except CorruptFrameError as exc:
            segment.close()
            self._orphan_runs(cid)
            self.chan.send(ch.ClientDropped(client_id=cid, reason=str(exc)))
            return
        client.req.seek(start)
        self.clients[cid] = client
        runs = self._rec_runs.pop(cid, None)
        if runs:
            self._arm_skips(client, runs, start)
        if client.bell is not None:
            asyncio.get_running_loop().add_reader(client.bell.fd, self._on_bell, client)

    def _on_bell(self, client: _Client) -> None:
        if client.bell is not None:
            client.bell.drain()
        self._poke()

    def _on_partition_count(self, topic: str, count: int) -> None:
        self.chan.send(ch.PartitionCount(topic=topic, partitions=count))

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # --- draining -------------------------------------------------------------------------

    def drain(self) -> bool:
        """One pass over every client's request ring; True if any record was taken."""
        if self._arena_full:
            return False
        took = False
        now = time.monotonic() * 1000.0
        for client in list(self.clients.values()):
            if client.dead:
                continue
            try:
                if self._drain_client(client, now):
                    took = True
            except CorruptFrameError as exc:
                self._drop(client, str(exc))
            if self._arena_full:
                break
        if took:
            self.sender.wakeup()
        return took

    def _drain_client(self, client: _Client, now: float) -> bool:
        if client.skips is not None:
            return self._drain_recovering(client, now)
        ring = client.req
        took = False
        while True:
            start, end = ring.region()
            if start == end:
                return took
            # One private copy of the region, validated and appended from the same bytes: the
            # client can rewrite its ring at any moment, even frames it already published.
            data = bytes(ring.view[start:end])
            # A malformed record body would make Kafka refuse (or, for some, store) the whole
            # batch it shares with other clients' records: stop before it, drop its client.
            bad = _first_bad_body(data, end - start, end == ring.data_end)
            stop = end - start if bad < 0 else bad
            self._chunk_seq += 1
            key = self._chunk_seq
            acc = self.acc
            code, pos, count = acc.append_region(
                data, 0, stop, self.topic_names, self.partition_counts, key, client.client_id, ring.cursor, now
            )
            if count:
                chunk = _Chunk(ring.position_after(pos), count)
                client.chunks.append(chunk)
                self._chunks[key] = (client, chunk)
                self.counters["records_in"] += count
                self.counters["bytes_in"] += pos
                took = True
            if pos > 0:
                ring.advance(pos)
            if code == APPEND_OK:
                if bad >= 0 and pos == bad:
                    what = "malformed record body" if data[bad + 4] else "padding frame short of the wrap"
                    raise CorruptFrameError(
                        f"client {client.client_id} ({client.name}): {what} at ring position {ring.cursor}"
                    )
                continue
            if code == APPEND_FULL:
                self._arena_full = True
                return took
            if code == APPEND_TOO_LARGE:
                self._fail_frame(client, ring, start + pos, ec.MESSAGE_TOO_LARGE)
                took = True
                continue
            if code == APPEND_INVALID:
                # Let a topic announced a moment ago land before judging the frame.
                self._on_control()
                # A chunk of its own: the records taken above are the chunk ``key``.
                self._chunk_seq += 1
                key2 = self._chunk_seq
                code2, pos2, count2 = acc.append_region(
                    data, pos, stop, self.topic_names, self.partition_counts, key2, client.client_id, ring.cursor, now
                )
                if code2 == APPEND_INVALID and pos2 == pos:
                    raise CorruptFrameError(
                        f"client {client.client_id} ({client.name}): invalid frame at ring "
                        f"position {ring.cursor}"
                    )
                # The topic was only late: account for what was taken and go on.
                if count2:
                    chunk = _Chunk(ring.position_after(pos2 - pos), count2)
                    client.chunks.append(chunk)
                    self._chunks[key2] = (client, chunk)
                    self.counters["records_in"] += count2
                    self.counters["bytes_in"] += pos2 - pos
                if pos2 > pos:
                    ring.advance(pos2 - pos)
                took = True
                continue
            return took

    def _fail_frame(self, client: _Client, ring: Any, pos: int, code: int) -> None:
        """Complete the record frame at ``pos`` with ``code`` (it never enters a batch)."""
        plen, _ftype, tid, _flags, part, _ts = _RECORD_PREFIX.unpack_from(ring.view, pos)
        size = (plen + 15) & -8
        chunk = _Chunk(ring.position_after(size), 0)
        chunk.results.append((0, tid, code, part, -1, -1, 1))
        ring.advance(size)
        client.chunks.append(chunk)
        self._count_error(code, 1)
        self._dirty.add(client)

    def _drop(self, client: _Client, reason: str) -> None:
        log.error("worker %d: dropping client %d (%s): %s", self.index, client.client_id, client.name, reason)
        if client.skips is not None:
            self._end_recovery(client, client.req.cursor)
        client.dead = True
        self._removing.add(client)
        self.counters["dropped_clients"] += 1
        self.chan.send(ch.ClientDropped(client_id=client.client_id, reason=reason))

    # --- crash recovery -------------------------------------------------------------------
    #
    # A restarted worker finds its predecessor's STAMPED and DONE batches in the arena, each
    # with a runs table: which client's ring records it holds (first ring position, count).
    # STAMPED batches go to the sender as they are (Sender.adopt: same producer id, epoch and
    # sequences, so the broker writes each once); DONE ones already have their outcome. When a
    # client's ring is read again from the resume position, the records of those runs are
    # skipped (their outcome comes from the recovered batch) and the others are appended as
    # usual. Everything read until the last recovered run of the client is exhausted forms ONE
    # chunk, so the next resume position is either before all of it or after all of it, and a
    # second crash finds the runs tables still true.

    def _recover(self, coming: set[int]) -> None:
        now = time.monotonic() * 1000.0
        batches = self.acc.recover(self.arena.recovered, now)
        adopt = []
        kept = 0
        for rb in batches:
            holds = 0 if rb.result is not None else 1  # the answer to the re-send
            index = 0
            for cid, first, count in rb.table:
                if cid in coming:
                    self._rec_runs.setdefault(cid, []).append([rb, first, count, index])
                    holds += 1
                index += count
            if rb.result is None:
                adopt.append(rb)
            if holds:
                self._holds[rb.slot] = holds
                rb.pieces = []
                kept += 1
            else:
                self.arena.free(rb.slot)
            rb.home = rb.slot
        if adopt:
            self.sender.adopt(adopt)
        log.warning(
            "worker %d: recovered %d batches from the arena (%d to re-send, %d records), %d kept",
            self.index, len(batches), len(adopt), sum(b.record_count for b in adopt), kept,
        )

    def _arm_skips(self, client: _Client, runs: list[list[Any]], start: int) -> None:
        """Set up skipping for a client's recovered runs from its resume position ``start``."""
        skips: dict[int, list[list[Any]]] = {}
        for rb, first, count, index in runs:
            tid = self.topic_ids.get(rb.topic)
            if tid is None or first < start:
                # Before the resume position: the client was told already (a run lies within
                # one chunk, and the resume position is a chunk end).
                self._unhold(rb.home)
                continue
            skips.setdefault((tid << 32) + rb.partition, []).append([first, count, rb, index, count])
        if skips:
            for q in skips.values():
                q.sort(key=lambda s: s[0])
            client.skips = skips

    def _orphan_runs(self, cid: int) -> None:
        for rb, _first, _count, _index in self._rec_runs.pop(cid, ()):
            self._unhold(rb.home)

    def _drain_recovering(self, client: _Client, now: float) -> bool:
        """One region of a client's ring while recovered runs of it remain to be met."""
        ring = client.req
        start, end = ring.region()
        if start == end:
            return False
        data = bytes(ring.view[start:end])
        n = end - start
        bad = _first_bad_body(data, n, end == ring.data_end)
        stop = n if bad < 0 else bad
        r0 = ring.cursor
        chunk = client.rchunk
        if chunk is None:
            # One pending record more than counted until the walk ends, so the chunk cannot
            # complete (and be reported) before its end is known.
            chunk = client.rchunk = _Chunk(r0, 1)
            chunk.keys = []
            client.chunks.append(chunk)
        skips = client.skips
        pieces = client.rpieces
        unpack = _RECORD_PREFIX.unpack_from
        pos = seg = 0  # seg: start of the records not yet taken (the ring cursor is there)
        corrupt = bad >= 0
        while pos < stop and skips:
            if stop - pos < 24:
                break
            plen, ftype, tid, _flags, part, _ts = unpack(data, pos)
            fend = pos + ((plen + 15) & -8)
            if ftype != FRAME_RECORD or plen < 16 or fend > stop:
                break
            q = skips.get((tid << 32) + part)
            if q is None or q[0][0] > r0 + pos:
                pos = fend
                continue
            if pos > seg:
                if not self._walk_append(client, chunk, data, start, seg, pos, r0, now):
                    self._flush_pieces(client)
                    return True
            s = q[0]
            rb = s[2]
            idx = s[3]
            s[3] = idx + 1
            s[1] -= 1
            plist = pieces.get(rb)
            if plist is not None and plist[-1][0] + plist[-1][1] == idx and plist[-1][2] == tid:
                plist[-1][1] += 1
            elif plist is not None:
                plist.append([idx, 1, tid])
            else:
                pieces[rb] = [[idx, 1, tid]]
                # The chunk holds the batch's slot until it is reported (taken before the run's
                # own hold can be released just below).
                self._holds[rb.home] += 1
                chunk.slots.append(rb.home)
            if s[1] == 0:
                del q[0]
                if not q:
                    del skips[(tid << 32) + part]
                self._unhold(rb.home)
            chunk.pending += 1
            ring.advance(fend - pos)
            chunk.end = ring.cursor
            pos = seg = fend
        if not skips:
            # Every recovered run of this client met: close the recovery chunk here; the rest is
            # read as usual.
            self._end_recovery(client, r0 + seg)
            return self._drain_client(client, now) or True
        if pos > seg and not self._walk_append(client, chunk, data, start, seg, pos, r0, now):
            self._flush_pieces(client)
            return True
        self._flush_pieces(client)
        self._forget_passed_runs(client, r0 + pos)
        if pos < n:
            if not corrupt and n - pos >= 8 and _FRAME_WORDS.unpack_from(data, pos)[1] == 0:
                ring.advance(n - pos)  # the padding frame at the wrap
                chunk.end = ring.cursor
                return True
            raise CorruptFrameError(
                f"client {client.client_id} ({client.name}): invalid frame at ring position {ring.cursor}"
            )
        return True

    def _forget_passed_runs(self, client: _Client, at: int) -> None:
        """Runs whose first record the walk passed without meeting it are not this ring's
        records (a damaged table): forget them rather than hold the client's chunk forever."""
        skips = client.skips
        if not skips:
            return
        for key in list(skips):
            q = skips[key]
            while q and q[0][0] < at and q[0][1] == q[0][4]:
                s = q.pop(0)
                log.warning("worker %d: client %d: recovered run at %d not found in its ring",
                            self.index, client.client_id, s[0])
                self._unhold(s[2].home)
            if not q:
                del skips[key]

    def _walk_append(
        self, client: _Client, chunk: _Chunk, data: bytes, start: int, a: int, b: int, r0: int, now: float
    ) -> bool:
        """Append ``data[a:b]`` (records no recovered run holds) into the recovery chunk.

        False when the arena is full (the walk resumes at the cursor later).
        """
        ring = client.req
        acc = self.acc
        late_topic_at = -1
        while a < b:
            self._chunk_seq += 1
            key = self._chunk_seq
            code, pos, count = acc.append_region(
                data, a, b, self.topic_names, self.partition_counts, key, client.client_id, r0 + a, now
            )
            if count:
                self._chunks[key] = (client, chunk)
                chunk.keys.append(key)
                chunk.pending += count
                self.counters["records_in"] += count
                self.counters["bytes_in"] += pos - a
            if pos > a:
                ring.advance(pos - a)
            chunk.end = ring.cursor
            a = pos
            if code == APPEND_OK:
                return True
            if code == APPEND_FULL:
                self._arena_full = True
                return False
            if code == APPEND_TOO_LARGE:
                plen, _ftype, tid, _flags, part, _ts = _RECORD_PREFIX.unpack_from(data, a)
                # Its outcome sorts after every earlier record of its partition in this chunk
                # (their batches have ordinals up to the current one) and before later ones
                # (new batches): close the partition's open batch first.
                order = acc.close_partition(self.topic_names[tid] or "", part)
                chunk.results.append((order, tid, ec.MESSAGE_TOO_LARGE, part, -1, -1, 1))
                self._count_error(ec.MESSAGE_TOO_LARGE, 1)
                size = (plen + 15) & -8
                ring.advance(size)
                chunk.end = ring.cursor
                a += size
                continue
            if late_topic_at != a:
                # Let a topic announced a moment ago land before judging the frame.
                late_topic_at = a
                self._on_control()
                continue
            raise CorruptFrameError(
                f"client {client.client_id} ({client.name}): invalid frame at ring position {ring.cursor}"
            )
        return True

    def _flush_pieces(self, client: _Client) -> None:
        """Hand the skipped records' pieces of the recovery chunk to their batches."""
        chunk = client.rchunk
        if chunk is None or not client.rpieces:
            return
        for rb, plist in client.rpieces.items():
            for idx, count, tid in plist:
                if rb.result is not None:
                    self._piece_result(chunk, rb, idx, count, tid)
                else:
                    rb.pieces.append((client, chunk, idx, count, tid))
        client.rpieces = {}
        if chunk.pending <= 0:
            self._dirty.add(client)

    def _piece_result(self, chunk: _Chunk, rb: RecoveredBatch, idx: int, count: int, tid: int) -> None:
        err, base, ts = rb.result  # type: ignore[misc]
        chunk.results.append((rb.ordinal, tid, err, rb.partition, base + idx if err == 0 and base >= 0 else -1, ts, count))
        chunk.pending -= count

    def _end_recovery(self, client: _Client, end: int) -> None:
        """Close the client's recovery chunk at ring position ``end``; forget runs not met."""
        self._flush_pieces(client)
        chunk = client.rchunk
        if chunk is not None:
            chunk.end = max(chunk.end, end)
            chunk.pending -= 1
            if chunk.pending <= 0:
                self._dirty.add(client)
            client.rchunk = None
        for q in (client.skips or {}).values():
            for s in q:
                log.warning("worker %d: client %d: recovered run at %d (%d records left) not met in its ring",
                            self.index, client.client_id, s[0], s[1])
                self._unhold(s[2].home)
        client.skips = None

    def _recovered_done(self, rb: RecoveredBatch, error_code: int, base_offset: int, log_append_ms: int) -> None:
        """A re-sent batch was answered: its skipped records' pieces get their outcome."""
        rb.result = (error_code, base_offset, log_append_ms)
        for client, chunk, idx, count, tid in rb.pieces:
            self._piece_result(chunk, rb, idx, count, tid)
            if chunk.pending <= 0:
                self._dirty.add(client)
        rb.pieces = []
        self._unhold(rb.home)

    def _chunk_reported(self, chunk: _Chunk) -> None:
        """A chunk's CHUNK_DONE is published: release what only it needed."""
        for slot in chunk.slots:
            self._unhold(slot)
        chunk.slots = []
        if chunk.keys:
            for key in chunk.keys:
                self._chunks.pop(key, None)
            chunk.keys = None

    def _unhold(self, slot: int) -> None:
        left = self._holds.get(slot, 0) - 1
        if left > 0:
            self._holds[slot] = left
        elif left == 0:
            del self._holds[slot]
            self.arena.free(slot)

    # --- completions ----------------------------------------------------------------------

    def _on_complete(self, batch: Batch, error_code: int, base_offset: int, log_append_ms: int) -> None:
        # The slot stays (DONE, with this outcome) until the records' chunks are reported.
        slot = self.acc.retire(batch, error_code, base_offset, log_append_ms)
        if isinstance(batch, RecoveredBatch):
            # Its slot's life is counted in _holds; its records' chunks are its pieces.
            self._recovered_done(batch, error_code, base_offset, log_append_ms)
            if error_code:
                self._count_error(error_code, batch.record_count)
            else:
                self.counters["records_out"] += batch.record_count
            self._arena_full = False
            self._poke()
            return
        tid = self.topic_ids.get(batch.topic, -1)
        offset = base_offset
        order = batch.ordinal
        chunks = self._chunks
        holds = 0
        for key, count in batch.runs:
            entry = chunks.get(key)
            if entry is not None:
                client, chunk = entry
                chunk.results.append(
                    (order, tid, error_code, batch.partition, offset if error_code == 0 else -1, log_append_ms, count)
                )
                chunk.pending -= count
                if chunk.pending <= 0:
                    del chunks[key]
                    self._dirty.add(client)
                if slot >= 0 and not client.cmp_broken and (not chunk.slots or chunk.slots[-1] != slot):
                    chunk.slots.append(slot)
                    holds += 1
            if offset >= 0:
                offset += count
        if slot >= 0:
            if holds:
                self._holds[slot] = holds
            else:
                self.arena.free(slot)
        if error_code:
            self._count_error(error_code, batch.record_count)
        else:
            self.counters["records_out"] += batch.record_count
            self.latency.add(time.monotonic() * 1000.0 - batch.created_ms)
        if self._arena_full:
            self._arena_full = False
        self._poke()

    def _count_error(self, code: int, records: int) -> None:
        name = ec.error_name(code)
        errs = self.counters["errors"]
        errs[name] = errs.get(name, 0) + records
        self.counters["records_failed"] += records

    def emit(self) -> None:
        """Write the completions of every finished chunk, in chunk order, per client."""
        if self._removing:
            for client in list(self._removing):
                self._maybe_detach(client)
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        for client in dirty:
            if not self._emit_client(client):
                self._dirty.add(client)

    def _emit_client(self, client: _Client) -> bool:
        try:
            return self._write_completions(client)
        except CorruptFrameError as exc:
            # The client wrote a tail into its completion ring that no reader could have
            # stored (claim() checks it): drop it; nothing more is written there.
            client.cmp.rollback()
            client.cmp_broken = True
            if not client.dead:
                self._drop(client, str(exc))
            return self._write_completions(client)

    def _write_completions(self, client: _Client) -> bool:
        chunks = client.chunks
        if client.cmp_broken:
            # Outcomes nobody can be told of: forget completed chunks so the client detaches.
            while chunks and chunks[0].pending <= 0:
                self._chunk_reported(chunks.popleft())
            self._maybe_detach(client)
            return True
        ring = client.cmp
        view = ring.view
        ok = True
        while chunks and chunks[0].pending <= 0:
            chunk = chunks[0]
            results = chunk.results
            if len(results) > 1:
                results.sort()
            claimed = 0
            for _order, tid, err, part, base, ts, count in results:
                pos = ring.claim(FRAME_COMPLETION, 32)
                if pos < 0:
                    break
                _pack_completion(view, pos, tid, err, part, base, ts, count, 0)
                claimed += 1
            if claimed == len(results):
                pos = ring.claim(FRAME_CHUNK_DONE, 8)
            else:
                pos = -1
            if pos < 0:
                # Completion ring full: publish nothing of this chunk, retry after the client reads.
                ring.rollback()
                ok = False
                break
            _pack_chunk_done(view, pos, chunk.end)
            chunks.popleft()
            self.counters["chunks"] += 1
            # Publish per chunk, so a later full ring never holds back a complete one.
            ring.publish_head()
            if chunk.slots or chunk.keys:
                self._chunk_reported(chunk)
        if client.dead or client.removing:
            self._maybe_detach(client)
        return ok

    def _maybe_detach(self, client: _Client) -> None:
        if client.chunks:
            return
        if not client.dead:
            try:
                if client.req.readable():
                    return
            except CorruptFrameError:
                pass  # a gone client whose head makes no sense: nothing more will be read
        if client.client_id not in self.clients:
            return
        del self.clients[client.client_id]
        self._removing.discard(client)
        self._dirty.discard(client)
        if client.bell is not None:
            asyncio.get_running_loop().remove_reader(client.bell.fd)
        for ring in (client.req, client.cmp):
            ring.release()
        client.segment.close()
        self.chan.send(ch.ClientDetached(client_id=client.client_id))

    # --- main loop ------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        s = self.sender.stats
        arena = self.arena
        ring_fill = 0.0
        for client in self.clients.values():
            ring_fill = max(ring_fill, client.req.used() / client.req.capacity)
        c = self.counters
        return {
            "records_in": c["records_in"],
            "bytes_in": c["bytes_in"],
            "records_out": c["records_out"],
            "records_failed": c["records_failed"],
            "bytes_out": s["bytes"],
            "batches": s["batches"],
            "requests": s["requests"],
            "in_flight": s["in_flight"],
            "retries": s["retries"],
            "errors": dict(c["errors"]),
            "clients": len(self.clients),
            "dropped_clients": c["dropped_clients"],
            "ring_fill": ring_fill,
            "arena_fill": arena.used_bytes / arena.size if arena.size else 0.0,
            "open_batches": self.acc.open_batches,
            "latency_ms": self.latency.percentiles(),
            "latency_count": self.latency.total,
            "reloads_applied": c["reloads_applied"],
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
                if not self.chan.flush():
                    pass
                if took:
                    await asyncio.sleep(0)
                    continue
                if self.acc.open_batches:
                    # Records are lingering anyway: poll the rings every _LINGER_POLL_S without
                    # arming the doorbells. A doorbell costs the client an eventfd_write that
                    # wakes us (measured 10-30 us each on this VM); armed on every drain, a busy
                    # client paid it every few records. Now it pays at most once per idle spell.
                    await self._sleep(_LINGER_POLL_S)
                elif self._arm_all():
                    await self._sleep(0.02)
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
        if self._dirty or self._arena_full:
            return not self._dirty
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
            if not took and not self._arena_full:
                break
            if all(c.dead or c.req.cursor >= head for c, head in targets):
                break
            await asyncio.sleep(0.001 if not took else 0)
        remaining = max(0.0, deadline - time.monotonic())
        # Keep reporting while the sender flushes: a finished batch's arena slot is held until
        # its records' completions are written, and the sender is idle only once it is freed.
        closing = asyncio.ensure_future(self.sender.close(remaining))
        while not closing.done():
            self.emit()
            await asyncio.wait({closing}, timeout=0.005)
        closing.result()
        self.emit()
        try:
            await asyncio.wait_for(sender_task, 1.0)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001
            sender_task.cancel()
        undelivered = sum(c.pending for _, c in self._chunks.values())
        self.chan.send(ch.Bye(worker=self.index, undelivered=undelivered))
        self.chan.flush()


# Record body validation (see _first_bad_body); the length tables are shm.frames'.
_FRAME_WORDS = struct.Struct("<II")
_U16 = struct.Struct("<H")


def _first_bad_body(data: bytes, end: int, wraps: bool) -> int:
    """Offset of the first RECORD frame in ``data[:end]`` whose body is not exactly one
    well-formed Kafka record body (see shm.frames.record_body_valid), or of a PADDING frame
    that does not end exactly at the wrap (``wraps``: ``end`` is the end of the ring's data
    area); -1 when there is none.

    Stops (returning -1) at a frame the accumulator judges itself: another frame type, or a
    length past ``end``. The usual shape (key and value lengths as short varints, no headers)
    is checked with two table lookups, about 0.25 us per record; anything else goes to
    record_body_valid.
    """
    unpack = _FRAME_WORDS.unpack_from
    u16 = _U16.unpack_from
    skip1 = LENGTH_SKIP1
    skip2 = LENGTH_SKIP2
    pos = 0
    while pos + 24 <= end:
        plen, ftype = unpack(data, pos)
        be = pos + 8 + plen
        if ftype != 1 or be > end:
            # Padding is only written to fill the ring up to its end: anything else would make
            # the reader skip (and never complete) the records after it.
            return pos if ftype == 0 and not (wraps and be == end) else -1
        b = pos + 24
        if b + 3 <= be:
            s = skip1[data[b]]
            if s:
                b += s
                if b + 2 <= be:
                    s = skip2[u16(data, b)[0]]
                    if s:
                        b += s
                        if b + 1 == be and data[b] == 0:
                            pos = (be + 7) & -8
                            continue
        if not record_body_valid(data, pos + 24, be):
            return pos
        pos = (be + 7) & -8
    return -1


def _resume_position(client: _Client) -> int:
    """Where to start reading: past the last chunk whose CHUNK_DONE the client has not read."""
    start = client.req.tail
    end = chunk_done_end(client.cmp)
    if end is not None and end > start:
        start = end
    return start


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
    sock.settimeout(30.0)
    data, anc, _, _ = sock.recvmsg(ch.MAX_MESSAGE)
    sock.setblocking(False)
    import msgspec

    start = msgspec.msgpack.decode(data, type=ch.ToWorker)
    if not isinstance(start, ch.Start):
        print("worker: first message was not Start", file=sys.stderr)
        return 2
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
