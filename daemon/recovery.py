"""Crash recovery: a restarted worker re-sends what its predecessor stamped and skips it in the rings.

A restarted worker finds its predecessor's STAMPED and DONE batches in the arena, each with a
runs table: which client's ring records it holds (first ring position, count). STAMPED batches
go to the sender as they are (``Sender.adopt``: same producer id, epoch and sequences, so the
broker writes each once); DONE ones already have their outcome. When a client's ring is read
again from the resume position, the records of those runs are skipped (their outcome comes
from the recovered batch) and the others are appended as usual. Everything read until the last
recovered run of the client is exhausted forms ONE chunk (the *recovery chunk*), so the next
resume position is either before all of it or after all of it, and a second crash finds the
runs tables still true.

The skipped records' outcomes reach the recovery chunk as *pieces*: consecutive records of one
recovered batch, resolved when that batch's outcome is known (at once for a DONE batch, on the
re-send's answer for a STAMPED one). Each recovered batch's arena slot is held (see
:class:`daemon.completions.SlotHolds`) until its answer is in, every run of it was met in the
rings, and the chunks holding its records were reported.

A re-sent batch the broker refuses as too large (the dead worker built it before it learnt the
topic's limit) is split like any other (:meth:`Accumulator.split
<daemon.accumulator.Accumulator.split>`); the refusal proves the broker never wrote it. Its parts
take over its sequence range and are written to new slots with their own runs tables, and
:meth:`Recovery.split` demotes the batch's own slot to SEALED before the parts are stamped, so a
worker that dies next finds either the batch (parts not stamped yet: discarded) or its parts,
never both. The demoted slot stays allocated as the key of the batch's holds, and the parts'
slots are freed with it. Runs and pieces keep counting in the batch's record indexes; each part
answers for its range (``RecoveredBatch.outcomes``), and the pieces resolve once every part
has answered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec

from daemon.accumulator import APPEND_FULL, APPEND_OK, APPEND_TOO_LARGE, Accumulator
from daemon.batch import RecoveredBatch
from daemon.arena import STATE_SEALED, Arena
from daemon.drain import (
    RECOVERY_EMPTY,
    RECOVERY_FULL,
    RECOVERY_OVER,
    RECOVERY_TOOK,
    Chunk,
    ChunkTable,
    Client,
    Outcome,
    TopicTable,
    first_bad_body,
)
from daemon.protocol import errors as ec
from daemon.stats import Counters
from shm.errors import CorruptFrameError
from shm.frames import FRAME_AND_RECORD, RECORD_HEADER
from shm.layout import FRAME_HEADER, FRAME_PADDING, FRAME_RECORD, frame_size

if TYPE_CHECKING:
    from daemon.completions import SlotHolds

__all__ = ["Run", "Piece", "ClientRecovery", "Recovery"]

log = logging.getLogger("sluice.worker")

_RECORD_FRAME_BYTES = FRAME_AND_RECORD.size  # a RECORD frame's header and prefix: its minimum
_unpack_record = FRAME_AND_RECORD.unpack_from
_unpack_frame_header = FRAME_HEADER.unpack_from


class Run(msgspec.Struct):
    """A run of a recovered batch's runs table: ``count`` records of one client's ring, the
    first at ring position ``first`` (the others follow it in ring order, interleaved with
    other partitions' records), records ``index .. index + count - 1`` of the batch."""

    batch: RecoveredBatch
    first: int  # ring position of the run's first record
    count: int
    index: int  # index in the batch of the next record of the run to meet in the ring
    remaining: int  # records of the run not met in the ring yet


class Piece(msgspec.Struct):
    """Consecutive skipped records of one recovered batch in one client's recovery chunk; they
    take the batch's outcome when it is known."""

    client: Client
    chunk: Chunk
    index: int  # index in the batch of the piece's first record
    count: int
    topic_id: int


class ClientRecovery:
    """A client's recovery state while recovered runs of it remain to be met in its ring."""

    __slots__ = ("skips", "chunk", "pieces")

    def __init__(self, skips: dict[int, list[Run]]) -> None:
        # (topic_id << 32) + partition -> the runs not yet met, by ring position.
        self.skips = skips
        self.chunk: Chunk | None = None  # the recovery chunk, created by the first read
        # Skipped records of the current read per recovered batch, not yet handed over.
        self.pieces: dict[RecoveredBatch, list[Piece]] = {}


class Recovery:
    """Finds a dead worker's batches in the arena and skips their records in the rings.

    Args:
        acc: the worker's accumulator.
        arena: the worker's arena, reopened with ``recover=True`` after a crash.
        holds: the arena slots of finished batches still needed.
        topics: the topic table (recovered batches name their topic; frames carry its id).
        table: where the recovery chunk's keys are registered.
        counters: the worker's counters.
        refresh_topics: reads the control channel now (a topic announced a moment ago).
        worker: this worker's index, for the logs.
    """

    def __init__(
        self,
        *,
        acc: Accumulator,
        arena: Arena,
        holds: SlotHolds,
        topics: TopicTable,
        table: ChunkTable,
        counters: Counters,
        refresh_topics: Callable[[], None],
        worker: int,
    ) -> None:
        self._acc = acc
        self._arena = arena
        self._holds = holds
        self._topics = topics
        self._table = table
        self._counters = counters
        self._refresh_topics = refresh_topics
        self._worker = worker
        self._runs: dict[int, list[Run]] = {}  # client id -> its recovered runs, until it attaches
        # Clients whose recovered runs will never be met: they are not coming back.
        self._absent: set[int] = set()
        # Pieces of re-sent batches not answered yet (a DONE batch's pieces resolve at once).
        self._waiting: dict[RecoveredBatch, list[Piece]] = {}
        self.splits = 0  # recovered batches (and parts of them) split
        acc.on_recovered_split = self.split

    def start(self, coming: set[int]) -> list[RecoveredBatch]:
        """Take the arena's recovered batches; returns the STAMPED ones, for the sender to re-send.

        ``coming``: the clients the supervisor will attach again; other clients' runs will not
        be met in any ring.
        """
        now = time.monotonic() * 1000.0
        batches = self._acc.recover(self._arena.recovered, now)
        adopt = []
        kept = 0
        for rb in batches:
            holds = 0 if rb.result is not None else 1  # the answer to the re-send
            index = 0
            for cid, first, count in rb.table:
                if cid in coming:
                    self._runs.setdefault(cid, []).append(Run(rb, first, count, index, count))
                    holds += 1
                else:
                    self._absent.add(cid)
                index += count
            if rb.result is None:
                adopt.append(rb)
                self._waiting[rb] = []
            if holds:
                kept += 1
            self._holds.keep(rb.home, holds)
        log.warning(
            "worker %d: recovered %d batches from the arena (%d to re-send, %d records), %d kept",
            self._worker, len(batches), len(adopt), sum(b.record_count for b in adopt), kept,
        )
        return adopt

    def attach(self, client: Client, start: int) -> None:
        """Set up skipping for the client's recovered runs from its resume position ``start``."""
        runs = self._runs.pop(client.client_id, None)
        if not runs:
            return
        skips: dict[int, list[Run]] = {}
        for run in runs:
            tid = self._topics.ids.get(run.batch.topic)
            if tid is None or run.first < start:
                # Before the resume position: the client was told already (a run lies within
                # one chunk, and the resume position is a chunk end).
                self._holds.release(run.batch.home)
                continue
            skips.setdefault((tid << 32) + run.batch.partition, []).append(run)
        if skips:
            for q in skips.values():
                q.sort(key=lambda r: r.first)
            client.recovery = ClientRecovery(skips)

    def orphan(self, client_id: int) -> None:
        """A client of the dead worker that will not attach: its runs will not be met."""
        self._absent.add(client_id)
        for run in self._runs.pop(client_id, ()):
            self._holds.release(run.batch.home)

    def absent_position(self, client_id: int, first: int) -> int:
        """For splitting a recovered batch: the position to give the second part of a run of a
        client that is not attached. A client that will never attach keeps ``first`` (its
        runs are never met, the position is never read); -1 otherwise (it is about to attach,
        or unknown)."""
        return first if client_id in self._absent and client_id not in self._runs else -1

    def split(self, batch: RecoveredBatch, parts: list[RecoveredBatch]) -> None:
        """``batch`` (a recovered batch, or a part of one) was split into ``parts``: take over
        its slot. Called before the parts are stamped (see the module docstring)."""
        root = batch.root
        holds = self._holds
        if batch is root:
            # Demoted, not freed: it stays the key of the batch's holds until they let go.
            self._arena.set_state(batch.home, STATE_SEALED)
        else:
            holds.drop_part(root.home, batch.slot)
            self._arena.free(batch.slot)
        batch.slot = -1
        holds.add_parts(root.home, [p.slot for p in parts])
        self.splits += 1

    def drain(self, client: Client, now: float) -> int:
        """One region of a recovering client's ring; a RECOVERY_* code (see daemon.drain).

        Raises:
            CorruptFrameError: the region holds a frame that does not validate.
        """
        state = client.recovery
        if state is None:
            return RECOVERY_OVER  # not (or no longer) recovering: read as usual
        ring = client.req
        start, end = ring.region()
        if start == end:
            return RECOVERY_EMPTY
        data = bytes(ring.view[start:end])
        n = end - start
        bad = first_bad_body(data, n, end == ring.data_end)
        stop = n if bad < 0 else bad
        r0 = ring.cursor
        chunk = state.chunk
        if chunk is None:
            # One pending record more than counted until the walk ends, so the chunk cannot
            # complete (and be reported) before its end is known.
            chunk = state.chunk = Chunk(r0, 1)
            chunk.keys = []
            client.chunks.append(chunk)
        skips = state.skips
        pieces = state.pieces
        holds = self._holds
        pos = seg = 0  # seg: start of the records not yet taken (the ring cursor is there)
        corrupt = bad >= 0
        while pos < stop and skips:
            if stop - pos < _RECORD_FRAME_BYTES:
                break
            plen, ftype, tid, _flags, part, _ts = _unpack_record(data, pos)
            fend = pos + frame_size(plen)
            if ftype != FRAME_RECORD or plen < RECORD_HEADER.size or fend > stop:
                break
            q = skips.get((tid << 32) + part)
            if q is None or q[0].first > r0 + pos:
                pos = fend
                continue
            if pos > seg:
                if not self._walk_append(client, chunk, data, seg, pos, r0, now):
                    self._flush_pieces(client, state)
                    return RECOVERY_FULL
            run = q[0]
            rb = run.batch
            idx = run.index
            run.index = idx + 1
            run.remaining -= 1
            plist = pieces.get(rb)
            if plist is not None and plist[-1].index + plist[-1].count == idx and plist[-1].topic_id == tid:
                plist[-1].count += 1
            elif plist is not None:
                plist.append(Piece(client, chunk, idx, 1, tid))
            else:
                pieces[rb] = [Piece(client, chunk, idx, 1, tid)]
                # The chunk holds the batch's slot until it is reported (taken before the run's
                # own hold can be released just below).
                holds.add(rb.home)
                chunk.slots.append(rb.home)
            if run.remaining == 0:
                del q[0]
                if not q:
                    del skips[(tid << 32) + part]
                holds.release(rb.home)
            chunk.pending += 1
            ring.advance(fend - pos)
            chunk.end = ring.cursor
            pos = seg = fend
        if not skips:
            # Every recovered run of this client met: close the recovery chunk here; the rest is
            # read as usual.
            self.end(client, r0 + seg)
            return RECOVERY_OVER
        if pos > seg and not self._walk_append(client, chunk, data, seg, pos, r0, now):
            self._flush_pieces(client, state)
            return RECOVERY_FULL
        self._flush_pieces(client, state)
        self._forget_passed_runs(client, state, r0 + pos)
        if pos < n:
            if not corrupt and n - pos >= FRAME_HEADER.size and _unpack_frame_header(data, pos)[1] == FRAME_PADDING:
                ring.advance(n - pos)  # the padding frame at the wrap
                chunk.end = ring.cursor
                return RECOVERY_TOOK
            raise CorruptFrameError(
                f"client {client.client_id} ({client.name}): invalid frame at ring position {ring.cursor}"
            )
        return RECOVERY_TOOK

    def _forget_passed_runs(self, client: Client, state: ClientRecovery, at: int) -> None:
        """Runs whose first record the walk passed without meeting it are not this ring's
        records (a damaged table): forget them rather than hold the client's chunk forever."""
        skips = state.skips
        if not skips:
            return
        for key in list(skips):
            q = skips[key]
            while q and q[0].first < at and q[0].remaining == q[0].count:
                run = q.pop(0)
                log.warning("worker %d: client %d: recovered run at %d not found in its ring",
                            self._worker, client.client_id, run.first)
                self._holds.release(run.batch.home)
            if not q:
                del skips[key]

    def _walk_append(
        self, client: Client, chunk: Chunk, data: bytes, a: int, b: int, r0: int, now: float
    ) -> bool:
        """Append ``data[a:b]`` (records no recovered run holds) into the recovery chunk.

        False when the arena is full (the walk resumes at the cursor later).
        """
        ring = client.req
        acc = self._acc
        topics = self._topics
        table = self._table
        counters = self._counters
        late_topic_at = -1
        while a < b:
            key = table.next_key()
            code, pos, count = acc.append_region(
                data, a, b, topics.names, topics.partition_counts, key, client.client_id, r0 + a, now
            )
            if count:
                table.by_key[key] = (client, chunk)
                chunk.keys.append(key)  # type: ignore[union-attr] - a recovery chunk has a list
                chunk.pending += count
                counters.records_in += count
                counters.bytes_in += pos - a
            if pos > a:
                ring.advance(pos - a)
            chunk.end = ring.cursor
            a = pos
            if code == APPEND_OK:
                return True
            if code == APPEND_FULL:
                return False
            if code == APPEND_TOO_LARGE:
                plen, _ftype, tid, _flags, part, _ts = _unpack_record(data, a)
                # Its outcome sorts after every earlier record of its partition in this chunk
                # (their batches have ordinals up to the current one) and before later ones
                # (new batches): close the partition's open batch first.
                topic = topics.names[tid] or ""
                order = acc.close_partition(topic, part)
                chunk.outcomes.append(Outcome(order, tid, ec.MESSAGE_TOO_LARGE, part, -1, -1, 1))
                counters.count_error(ec.MESSAGE_TOO_LARGE, 1, topic)
                size = frame_size(plen)
                ring.advance(size)
                chunk.end = ring.cursor
                a += size
                continue
            if late_topic_at != a:
                # Let a topic announced a moment ago land before judging the frame.
                late_topic_at = a
                self._refresh_topics()
                continue
            raise CorruptFrameError(
                f"client {client.client_id} ({client.name}): invalid frame at ring position {ring.cursor}"
            )
        return True

    def _flush_pieces(self, client: Client, state: ClientRecovery) -> None:
        """Hand the skipped records' pieces of the recovery chunk to their batches."""
        chunk = state.chunk
        if chunk is None or not state.pieces:
            return
        for rb, plist in state.pieces.items():
            if rb.result is not None or (rb.outcomes and not rb.unanswered):
                for piece in plist:
                    _resolve(rb, piece)
            else:
                self._waiting[rb].extend(plist)
        state.pieces = {}
        if chunk.pending <= 0:
            self._table.ready.add(client)

    def end(self, client: Client, at: int) -> None:
        """Close the client's recovery chunk at ring position ``at``; forget runs not met."""
        state = client.recovery
        if state is None:
            return
        self._flush_pieces(client, state)
        chunk = state.chunk
        if chunk is not None:
            chunk.end = max(chunk.end, at)
            chunk.pending -= 1
            if chunk.pending <= 0:
                self._table.ready.add(client)
            state.chunk = None
        for q in state.skips.values():
            for run in q:
                log.warning("worker %d: client %d: recovered run at %d (%d records left) not met in its ring",
                            self._worker, client.client_id, run.first, run.remaining)
                self._holds.release(run.batch.home)
        client.recovery = None

    def answered(self, part: RecoveredBatch, error_code: int, base_offset: int, log_append_ms: int) -> None:
        """A re-sent batch (or a part of one) was answered: once every part of it has, its
        skipped records' pieces get their outcome."""
        rb = part.root
        if part is rb:
            rb.result = (error_code, base_offset, log_append_ms)
        else:
            rb.outcomes.append((part.index, part.record_count, part.ordinal, error_code, base_offset, log_append_ms))
            rb.unanswered -= part.record_count
            if rb.unanswered:
                return
            rb.outcomes.sort()
        ready = self._table.ready
        for piece in self._waiting.pop(rb, ()):
            _resolve(rb, piece)
            if piece.chunk.pending <= 0:
                ready.add(piece.client)
        self._holds.release(rb.home)


def _resolve(rb: RecoveredBatch, piece: Piece) -> None:
    """The piece's records take the outcome of their recovered batch (of its parts, by record
    index, when it was split)."""
    chunk = piece.chunk
    if rb.result is not None:
        err, base, ts = rb.result
        offset = base + piece.index if err == 0 and base >= 0 else -1
        chunk.outcomes.append(Outcome(rb.ordinal, piece.topic_id, err, rb.partition, offset, ts, piece.count))
    else:
        lo, hi = piece.index, piece.index + piece.count
        for first, count, ordinal, err, base, ts in rb.outcomes:
            a, b = max(lo, first), min(hi, first + count)
            if a < b:
                offset = base + a - first if err == 0 and base >= 0 else -1
                chunk.outcomes.append(Outcome(ordinal, piece.topic_id, err, rb.partition, offset, ts, b - a))
    chunk.pending -= piece.count
