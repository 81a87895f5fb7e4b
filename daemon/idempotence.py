"""The idempotent producer: producer id, per-partition sequence chains, the out-of-order policy.

asyncio (runs on uvloop). The sender asks this module whether an idempotent batch may be sent,
has it stamp the batch, and asks it what an OUT_OF_ORDER_SEQUENCE_NUMBER or UNKNOWN_PRODUCER_ID
answer means; the sender then sends, retries or fails the batch itself.

Policy (profiles with ``enable_idempotence`` and ``acks=-1``)
    One InitProducerId gives the producer id and epoch. A batch is stamped (producer id, epoch,
    base sequence) with :meth:`Batch.stamp <daemon.batch.Batch.stamp>` the first time it
    is sent; the partition's next sequence advances by its record count. Retries resend the same
    stamped bytes. Up to 5 batches per partition are in flight (:data:`MAX_IN_FLIGHT`), except
    that a batch at sequence 0 (the first of a producer id on the partition) is sent alone and
    must be answered before the next: a broker that has no state for the producer accepts any
    first sequence, so a later batch sent beside a refused first one (NOT_LEADER_OR_FOLLOWER on
    a new partition, say) would be written ahead of it and the retry of the first would then be
    OUT_OF_ORDER. DUPLICATE_SEQUENCE_NUMBER counts as success (the sender's business).

    OUT_OF_ORDER_SEQUENCE_NUMBER (the broker expected a lower sequence), the policy chosen here
    (:meth:`Idempotence.on_sequence_error`):

    * an earlier batch of the same partition and producer id is still in flight or waiting to
      be retried: the broker is just missing it; retry this one (same bytes) after it;
    * the partition's sequence chain is known to be broken (an earlier stamped batch failed for
      good, or the broker lost the producer's state, UNKNOWN_PRODUCER_ID): an OOO answer proves
      the batch was not written, so it is re-stamped under a fresh producer id/epoch and resent;
    * otherwise (the broker lost state we cannot explain) the batch fails with
      OUT_OF_ORDER_SEQUENCE_NUMBER and the chain is marked broken.

    A broken chain is repaired by InitProducerId with the current id and epoch (a "bump"; for a
    non-transactional producer Kafka hands out a fresh id). Every partition then restarts its
    sequences at 0 under the new id, but only after its in-flight batches of the old id have
    answered, so two producer ids never race on one partition.

Counters written into the shared ``stats`` dict: ``producer_id_requests``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from daemon.config import KafkaSettings
from daemon.connection import CONTROL_TIMEOUT_S, ConnectionPool
from daemon.protocol import errors as ec
from daemon.protocol import messages as m
from shm.errors import KafkaError, ProtocolError

__all__ = ["Chain", "Idempotence", "MAX_IN_FLIGHT", "Pending", "SEQUENCE_ERRORS", "SEQUENCE_MODULUS", "Verdict"]

log = logging.getLogger(__name__)

# Kafka's own limit for idempotent producers: the broker caches the last 5 batches per producer
# and partition, which is what makes a resend of any of them a detectable duplicate.
MAX_IN_FLIGHT = 5
# Sequence numbers are INT32 and wrap to 0 past the largest.
SEQUENCE_MODULUS = 2**31
# Required in InitProducerId; the broker ignores it without a transactional id.
_TRANSACTION_TIMEOUT_MS = 60_000
# A bump refused with one of these means the old id is gone: ask for a brand-new one instead.
_BUMP_REFUSED = frozenset({ec.INVALID_PRODUCER_EPOCH, ec.PRODUCER_FENCED, ec.INVALID_PRODUCER_ID_MAPPING})
# The answers on_sequence_error decides about.
SEQUENCE_ERRORS = frozenset({ec.OUT_OF_ORDER_SEQUENCE_NUMBER, ec.UNKNOWN_PRODUCER_ID})
_NO_ID = -1


class Verdict(enum.Enum):
    """What to do with a batch answered with one of :data:`SEQUENCE_ERRORS`."""

    RESTAMP = "restamp"  # not written: stamp it again under a fresh producer id, resend at once
    RETRY = "retry"  # an earlier batch is missing at the broker: resend the same bytes at once
    FAIL = "fail"  # unexplained: fail it with the broker's error


class Pending(Protocol):
    """The sender's state of one batch, as read here."""

    batch: Any  # daemon.accumulator.Batch: producer_id, producer_epoch, base_sequence, stamp()
    order: float  # creation order within the sender (the halves of a split batch: fractions)
    needs_stamp: bool  # not stamped yet (or to be stamped again)


class Chain:
    """One partition's sequence chain: the id it runs under, its next sequence, its gaps."""

    __slots__ = ("producer_id", "epoch", "next_seq", "broken")

    def __init__(self) -> None:
        self.producer_id = _NO_ID
        self.epoch = _NO_ID
        self.next_seq = 0
        # (producer id, epoch) pairs whose sequence chain on this partition has a gap: an
        # OUT_OF_ORDER answer to a batch stamped with one of them means "re-stamp", not "fail".
        self.broken: set[tuple[int, int]] = set()

    def break_at(self, batch: Any) -> None:
        """The chain of ``batch``'s stamp has a gap (the batch failed for good, or is adopted)."""
        self.broken.add((batch.producer_id, batch.producer_epoch))


class Idempotence:
    """The producer id and the rules for stamping and sending idempotent batches.

    Args:
        settings: ``client_id`` and ``reconnect_backoff_max_ms`` (bounds the InitProducerId
            retry delay).
        connections: the pool to send InitProducerId on.
        stats: the shared counters.
        wakeup: called when an InitProducerId job ends (batches may be sendable now).
    """

    def __init__(self, settings: KafkaSettings, connections: ConnectionPool, *, stats: dict[str, Any],
                 wakeup: Callable[[], None]) -> None:
        self.settings = settings
        self._pool = connections
        self.stats = stats
        self._wakeup = wakeup
        self._pid = _NO_ID
        self._epoch = _NO_ID
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def producer_id(self) -> tuple[int, int]:
        """(producer id, epoch); (-1, -1) until InitProducerId has answered."""
        return self._pid, self._epoch

    def may_send(self, chain: Chain, e: Pending, in_flight: Sequence[Pending]) -> bool:
        """Whether the idempotent batch ``e``, at the head of its partition's queue, may go now.

        May ask for a producer id (or a bump) in the background, when that is what it waits for.
        """
        if in_flight and in_flight[0].batch.base_sequence == 0:
            # The first batch of a producer id on a partition travels alone: a broker that does
            # not know the producer yet accepts any sequence, so a later batch sent beside a
            # refused (retriable) first one would be written before it.
            return False
        if e.needs_stamp:
            if self._pid < 0:
                self._want_producer_id(bump=False)
                return False
            if (self._pid, self._epoch) in chain.broken:
                self._want_producer_id(bump=True)
                return False
            if (chain.producer_id, chain.epoch) != (self._pid, self._epoch) and in_flight:
                return False  # the old id's batches must answer before the new id starts at 0
            if in_flight and (in_flight[-1].batch.producer_id, in_flight[-1].batch.producer_epoch) != (
                self._pid,
                self._epoch,
            ):
                return False
            return True
        if in_flight:
            last = in_flight[-1].batch
            if (last.producer_id, last.producer_epoch) != (e.batch.producer_id, e.batch.producer_epoch):
                return False
        return True

    def stamp(self, chain: Chain, batch: Any) -> None:
        """Stamp ``batch`` with the producer id and the chain's next sequence (after may_send)."""
        if (chain.producer_id, chain.epoch) != (self._pid, self._epoch):
            chain.producer_id, chain.epoch, chain.next_seq = self._pid, self._epoch, 0
        batch.stamp(self._pid, self._epoch, chain.next_seq)
        chain.next_seq = (chain.next_seq + batch.record_count) % SEQUENCE_MODULUS

    def on_sequence_error(self, chain: Chain, e: Pending, code: int, in_flight: Sequence[Pending],
                          queue: Sequence[Pending]) -> Verdict:
        """The policy for a stamped batch answered with ``code`` in :data:`SEQUENCE_ERRORS`.

        ``in_flight`` and ``queue`` are the partition's other batches (``e`` is in neither).
        """
        stamp = (e.batch.producer_id, e.batch.producer_epoch)
        if code == ec.UNKNOWN_PRODUCER_ID:
            # The broker no longer knows this producer on this partition (its records were
            # deleted, say). The batch was rejected, so it is safe to re-stamp it.
            chain.broken.add(stamp)
        if stamp in chain.broken:
            return Verdict.RESTAMP
        if _earlier_pending(e, in_flight, queue):
            return Verdict.RETRY
        log.warning("%s[%s]: OUT_OF_ORDER_SEQUENCE_NUMBER with nothing earlier pending; failing the batch "
                    "and resetting the producer id", e.batch.topic, e.batch.partition)
        return Verdict.FAIL

    def stop(self) -> None:
        """Ask for no more producer ids."""
        self._stopped = True

    def close(self) -> None:
        """Stop and cancel an InitProducerId under way."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()

    # ----------------------------------------------------------------------------------------

    def _want_producer_id(self, bump: bool) -> None:
        # A request already under way serves a bump too: if its id is broken on a partition,
        # the next may_send asks again.
        if self._task is not None or self._stopped:
            return
        self._task = asyncio.get_running_loop().create_task(self._producer_id_job(bump))

    async def _producer_id_job(self, bump: bool) -> None:
        delay = 0.05
        try:
            while not self._stopped:
                try:
                    conn = await self._pool.control_connection()
                    self.stats["producer_id_requests"] += 1
                    req = m.InitProducerIdRequest(
                        None, _TRANSACTION_TIMEOUT_MS, self._pid if bump else _NO_ID, self._epoch if bump else _NO_ID
                    )
                    client_id = self.settings.client_id
                    version, body = await conn.request(
                        m.INIT_PRODUCER_ID,
                        lambda v, cid: m.encode_init_producer_id_request(v, cid, client_id, req),
                        CONTROL_TIMEOUT_S,
                    )
                    resp = m.decode_init_producer_id_response(body, version)
                    if resp.error_code == 0:
                        log.info("producer id %s epoch %s", resp.producer_id, resp.producer_epoch)
                        self._pid, self._epoch = resp.producer_id, resp.producer_epoch
                        return
                    err = KafkaError.for_code(resp.error_code, f"InitProducerId: {ec.error_name(resp.error_code)}")
                    if bump and resp.error_code in _BUMP_REFUSED:
                        bump = False
                    log.warning("InitProducerId failed: %s", err)
                except (KafkaError, ProtocolError) as exc:
                    log.warning("InitProducerId failed: %s", exc)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.settings.reconnect_backoff_max_ms / 1000.0 or 1.0)
        finally:
            self._task = None
            self._wakeup()


def _earlier_pending(e: Pending, in_flight: Sequence[Pending], queue: Sequence[Pending]) -> bool:
    """Whether a batch created before ``e``, with its stamp, may still reach the broker."""
    stamp = (e.batch.producer_id, e.batch.producer_epoch)
    for other in in_flight:
        if other.order < e.order and (other.batch.producer_id, other.batch.producer_epoch) == stamp:
            return True
    for other in queue:
        if other.order < e.order and not other.needs_stamp and (
                other.batch.producer_id, other.batch.producer_epoch) == stamp:
            return True
    return False
