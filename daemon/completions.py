"""Completions: batch outcomes to chunks, chunks to the clients' completion rings, then detach.

The sender reports each finished batch (:meth:`Completions.on_complete`); its outcome goes to
every chunk holding records of it (``Batch.runs``: chunk key, count). A chunk whose records all
have their outcome is reported in chunk order per client (:meth:`Completions.emit`): its
COMPLETION frames, sorted by batch, then one CHUNK_DONE carrying the chunk's end, published with
one head store per chunk. The client frees its request ring up to that end only then.

A finished batch's arena slot stays (state DONE, with its outcome) until every chunk holding
its records is reported, so a worker that dies in between finds the outcome in its arena
instead of re-sending or re-reading the records (:class:`SlotHolds`, :mod:`daemon.recovery`).

A gone client (or one dropped for a corrupt ring) is detached once every record it committed
was read and reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from daemon.accumulator import Accumulator
from daemon.batch import Batch, RecoveredBatch
from daemon.arena import Arena
from daemon.drain import Chunk, ChunkTable, Client, Outcome, TopicTable
from daemon.stats import Counters, LatencyHistogram
from shm.errors import CorruptFrameError
from shm.frames import CHUNK_DONE, COMPLETION
from shm.layout import FRAME_CHUNK_DONE, FRAME_COMPLETION

__all__ = ["SlotHolds", "Completions"]

_pack_completion = COMPLETION.pack_into
_pack_chunk_done = CHUNK_DONE.pack_into
_COMPLETION_BYTES = COMPLETION.size
_CHUNK_DONE_BYTES = CHUNK_DONE.size
_RESERVED = 0  # COMPLETION's reserved field


class SlotHolds:
    """Arena slots of finished batches -> how many things still need them (chunks not yet
    reported, recovered runs not yet met in the rings, a recovered batch's answer). The slot
    is freed when the last one lets go.

    A recovered batch that was split keeps its slot (demoted, so a later recovery ignores it)
    as the key of its holds, and its parts' slots go with it: they are freed when the last
    hold on the batch lets go (:meth:`add_parts`, :meth:`drop_part`).
    """

    __slots__ = ("_arena", "_counts", "_parts")

    def __init__(self, arena: Arena) -> None:
        self._arena = arena
        self._counts: dict[int, int] = {}
        self._parts: dict[int, list[int]] = {}  # a split recovered batch's slot -> its parts' slots

    def keep(self, slot: int, count: int) -> None:
        """Hold ``slot`` for ``count`` things; free it now when ``count`` is 0."""
        if count:
            self._counts[slot] = count
        else:
            self._arena.free(slot)

    def add(self, slot: int) -> None:
        """One more thing needs ``slot`` (it is held already)."""
        self._counts[slot] += 1

    def release(self, slot: int) -> None:
        """One thing no longer needs ``slot``; the last frees it. A slot not held is ignored."""
        left = self._counts.get(slot, 0) - 1
        if left > 0:
            self._counts[slot] = left
        elif left == 0:
            del self._counts[slot]
            self._arena.free(slot)
            for part in self._parts.pop(slot, ()):
                self._arena.free(part)

    def add_parts(self, slot: int, parts: list[int]) -> None:
        """The slots of a split recovered batch's parts: freed with ``slot`` (held already)."""
        self._parts.setdefault(slot, []).extend(parts)

    def drop_part(self, slot: int, part: int) -> None:
        """A part's slot was freed already (the part was split again, say): not with ``slot``."""
        self._parts[slot].remove(part)

    def held(self) -> dict[int, int]:
        """A copy of the held slots and their counts (for tests and diagnostics)."""
        return dict(self._counts)

    def parts(self) -> dict[int, list[int]]:
        """A copy of the split recovered batches' parts' slots (for tests and diagnostics)."""
        return {slot: list(parts) for slot, parts in self._parts.items()}


class Completions:
    """Turns batch outcomes into completion frames, and detaches clients that are done.

    Args:
        acc: the worker's accumulator (it retires answered batches into DONE slots).
        holds: the arena slots of finished batches still needed.
        table: the open chunks and the clients with a complete chunk to report.
        topics: the topic table (completion frames carry topic ids).
        counters: the worker's counters.
        latency: the worker's latency histogram (record creation to answer).
        clients: the worker's clients by id; a detached client is removed from it.
        recovered: called when a batch a dead worker stamped is answered.
        resume: called when a batch finished (its arena space is free, or will be soon).
        drop: called with a client and the reason when its completion ring is corrupt.
        unwatch: called for a client being detached, before its rings and segment close
            (stop watching its doorbell).
        detached: called with a client's id once it is detached (tell the supervisor).
    """

    def __init__(
        self,
        *,
        acc: Accumulator,
        holds: SlotHolds,
        table: ChunkTable,
        topics: TopicTable,
        counters: Counters,
        latency: LatencyHistogram,
        clients: dict[int, Client],
        recovered: Callable[[RecoveredBatch, int, int, int], None],
        resume: Callable[[], None],
        drop: Callable[[Client, str], None],
        unwatch: Callable[[Client], None],
        detached: Callable[[int], None],
    ) -> None:
        self._acc = acc
        self._holds = holds
        self._table = table
        self._topics = topics
        self._counters = counters
        self._latency = latency
        self._clients = clients
        self._recovered = recovered
        self._resume = resume
        self._drop = drop
        self._unwatch = unwatch
        self._detached = detached
        self._removing: set[Client] = set()  # gone or dropped clients still being drained

    def remove(self, client: Client) -> None:
        """The client is gone or dropped: detach it once it has nothing left to report."""
        self._removing.add(client)

    def on_complete(self, batch: Batch, error_code: int, base_offset: int, log_append_ms: int) -> None:
        """The sender's report of a finished batch (acknowledged, or failed for good)."""
        # The slot stays (DONE, with this outcome) until the records' chunks are reported.
        own = batch.slot
        slot = self._acc.retire(batch, error_code, base_offset, log_append_ms)
        counters = self._counters
        if isinstance(batch, RecoveredBatch):
            if slot < 0 and batch.root is not batch and own >= 0:
                self._holds.drop_part(batch.home, own)  # retire freed it: no table to keep
            # Its slot's life is counted in the holds; its records' chunks are its pieces.
            self._recovered(batch, error_code, base_offset, log_append_ms)
            if error_code:
                counters.count_error(error_code, batch.record_count, batch.topic)
            else:
                counters.records_out += batch.record_count
            self._resume()
            return
        tid = self._topics.ids.get(batch.topic, -1)
        offset = base_offset
        order = batch.ordinal
        chunks = self._table.by_key
        ready = self._table.ready
        holds = 0
        for key, count in batch.runs:
            entry = chunks.get(key)
            if entry is not None:
                client, chunk = entry
                base = offset if error_code == 0 else -1
                chunk.outcomes.append(Outcome(order, tid, error_code, batch.partition, base, log_append_ms, count))
                chunk.pending -= count
                if chunk.pending <= 0:
                    del chunks[key]
                    ready.add(client)
                if slot >= 0 and not client.cmp_broken and (not chunk.slots or chunk.slots[-1] != slot):
                    chunk.slots.append(slot)
                    holds += 1
            if offset >= 0:
                offset += count
        if slot >= 0:
            self._holds.keep(slot, holds)
        if error_code:
            counters.count_error(error_code, batch.record_count, batch.topic)
        else:
            counters.records_out += batch.record_count
            self._latency.add(time.monotonic() * 1000.0 - batch.created_ms)
        self._resume()

    def emit(self) -> None:
        """Write the completions of every finished chunk, in chunk order, per client."""
        if self._removing:
            for client in list(self._removing):
                self._maybe_detach(client)
        table = self._table
        if not table.ready:
            return
        for client in table.take_ready():
            if not self._emit_client(client):
                table.ready.add(client)

    def _emit_client(self, client: Client) -> bool:
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

    def _write_completions(self, client: Client) -> bool:
        """Report the client's complete chunks in order; False when its ring filled up."""
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
            outcomes = chunk.outcomes
            if len(outcomes) > 1:
                outcomes.sort()
            claimed = 0
            for o in outcomes:
                pos = ring.claim(FRAME_COMPLETION, _COMPLETION_BYTES)
                if pos < 0:
                    break
                _pack_completion(
                    view, pos, o.topic_id, o.error_code, o.partition, o.base_offset, o.timestamp_ms, o.count, _RESERVED
                )
                claimed += 1
            if claimed == len(outcomes):
                pos = ring.claim(FRAME_CHUNK_DONE, _CHUNK_DONE_BYTES)
            else:
                pos = -1
            if pos < 0:
                # Completion ring full: publish nothing of this chunk, retry after the client reads.
                ring.rollback()
                ok = False
                break
            _pack_chunk_done(view, pos, chunk.end)
            chunks.popleft()
            self._counters.chunks += 1
            # Publish per chunk, so a later full ring never holds back a complete one.
            ring.publish_head()
            if chunk.slots or chunk.keys:
                self._chunk_reported(chunk)
        if client.dead or client.removing:
            self._maybe_detach(client)
        return ok

    def _chunk_reported(self, chunk: Chunk) -> None:
        """A chunk's CHUNK_DONE is published: release what only it needed."""
        for slot in chunk.slots:
            self._holds.release(slot)
        chunk.slots = []
        if chunk.keys:
            by_key = self._table.by_key
            for key in chunk.keys:
                by_key.pop(key, None)
            chunk.keys = None

    def _maybe_detach(self, client: Client) -> None:
        if client.chunks:
            return
        if not client.dead:
            try:
                if client.req.readable():
                    return
            except CorruptFrameError:
                pass  # a gone client whose head makes no sense: nothing more will be read
        if client.client_id not in self._clients:
            return
        del self._clients[client.client_id]
        self._removing.discard(client)
        self._table.ready.discard(client)
        self._unwatch(client)
        for ring in (client.req, client.cmp):
            ring.release()
        client.segment.close()
        self._detached(client.client_id)
