"""daemon.idempotence: stamping and sequence chains on real batches, the send and out-of-order rules.

The InitProducerId exchange itself runs against the real broker in
tests/integration/test_metadata.py; here the producer id is one the broker handed out there
or, for the rules that do not need one, none at all.
"""

from __future__ import annotations

import time
from typing import Any

from daemon.accumulator import APPEND_OK, Accumulator
from daemon.config import KafkaSettings, Profile
from daemon.connection import ConnectionPool
from daemon.idempotence import MAX_IN_FLIGHT, SEQUENCE_ERRORS, Chain, Idempotence, Verdict
from daemon.protocol import errors as ec
from daemon.protocol.records import decode_batches
from shm.frames import encode_record_body


class _Pending:
    """The sender's view of one batch, as idempotence reads it (daemon.idempotence.Pending)."""

    def __init__(self, batch: Any, order: int, needs_stamp: bool = False) -> None:
        self.batch = batch
        self.order = order
        self.needs_stamp = needs_stamp


class _Stamp:
    """A batch already stamped (by this producer or a dead worker's)."""

    def __init__(self, producer_id: int, epoch: int, base_sequence: int, records: int = 1) -> None:
        self.topic, self.partition = "t", 0
        self.producer_id, self.producer_epoch, self.base_sequence = producer_id, epoch, base_sequence
        self.record_count = records


def _batches(counts: list[int]) -> list[Any]:
    """Real sealed batches of the given record counts, from the accumulator."""
    profile = Profile(acks=-1, enable_idempotence=True, linger_ms=0)
    acc = Accumulator(buffer_memory=4 << 20, profile_for=lambda t: profile)
    out = []
    for n in counts:
        for i in range(n):
            body = encode_record_body(b"k%d" % i, b"v", None)
            assert acc.append("t", 0, 1_700_000_000_000, body, 1, time.monotonic() * 1000) == APPEND_OK
        acc.flush()
        out += acc.ready(time.monotonic() * 1000 + 1e6)
    assert [b.record_count for b in out] == counts
    return out


def _idempotence() -> Idempotence:
    settings = KafkaSettings(bootstrap_servers="127.0.0.1:1")
    stats = {"producer_id_requests": 0}
    return Idempotence(settings, ConnectionPool(settings), stats=stats, wakeup=lambda: None)


def _with_producer_id(idem: Idempotence, producer_id: int, epoch: int) -> Idempotence:
    # What a successful InitProducerId leaves behind, without a broker.
    idem._pid, idem._epoch = producer_id, epoch  # noqa: SLF001 - the test plays the broker's part
    return idem


def test_stamps_run_a_chain_of_sequences_and_restart_at_zero_under_a_new_id() -> None:
    idem = _with_producer_id(_idempotence(), 7, 0)
    chain = Chain()
    a, b, c = _batches([3, 5, 2])
    idem.stamp(chain, a)
    idem.stamp(chain, b)
    assert [(x.producer_id, x.producer_epoch, x.base_sequence) for x in (a, b)] == [(7, 0, 0), (7, 0, 3)]
    assert chain.next_seq == 8
    # The stamp is in the bytes the broker will read.
    decoded = decode_batches(bytes(b.payload()))[0]
    assert (decoded.producer_id, decoded.producer_epoch, decoded.base_sequence) == (7, 0, 3)
    _with_producer_id(idem, 9, 1)
    idem.stamp(chain, c)
    assert (c.producer_id, c.producer_epoch, c.base_sequence) == (9, 1, 0)
    assert chain.next_seq == 2


def test_sequences_wrap_at_int32() -> None:
    idem = _with_producer_id(_idempotence(), 7, 0)
    chain = Chain()
    (a,) = _batches([4])
    idem.stamp(chain, a)
    chain.next_seq = 2**31 - 2
    (b,) = _batches([4])
    idem.stamp(chain, b)
    assert b.base_sequence == 2**31 - 2
    assert chain.next_seq == 2


def test_the_first_batch_of_a_producer_id_travels_alone() -> None:
    idem = _with_producer_id(_idempotence(), 7, 0)
    chain = Chain()
    first, second = _batches([1, 1])
    idem.stamp(chain, first)
    in_flight = [_Pending(first, 1)]
    assert not idem.may_send(chain, _Pending(second, 2, needs_stamp=True), in_flight)
    # Once the first is answered, the next goes; from then on up to MAX_IN_FLIGHT at once.
    assert idem.may_send(chain, _Pending(second, 2, needs_stamp=True), [])
    idem.stamp(chain, second)
    more = _batches([1] * MAX_IN_FLIGHT)
    assert idem.may_send(chain, _Pending(more[0], 3, needs_stamp=True), [_Pending(second, 2)])


def test_a_new_id_waits_for_the_old_ids_batches_to_answer() -> None:
    idem = _with_producer_id(_idempotence(), 7, 0)
    chain = Chain()
    first, second, new = _batches([1, 1, 1])
    idem.stamp(chain, first)
    idem.stamp(chain, second)
    _with_producer_id(idem, 8, 0)
    assert not idem.may_send(chain, _Pending(new, 3, needs_stamp=True), [_Pending(second, 2)])
    assert idem.may_send(chain, _Pending(new, 3, needs_stamp=True), [])


def test_an_adopted_batch_does_not_go_beside_another_producers_batches() -> None:
    idem = _idempotence()  # no producer id needed: adopted batches carry their own stamps
    chain = Chain()
    ours = _Pending(_Stamp(7, 0, 10), 1)
    adopted = _Pending(_Stamp(3, 0, 40), 2)
    assert not idem.may_send(chain, adopted, [ours])
    assert idem.may_send(chain, adopted, [])
    assert idem.may_send(chain, _Pending(_Stamp(3, 0, 41), 3), [adopted])


def test_out_of_order_behind_an_earlier_batch_of_the_same_id_is_retried() -> None:
    idem = _idempotence()
    chain = Chain()
    earlier = _Pending(_Stamp(7, 0, 10), 1)
    e = _Pending(_Stamp(7, 0, 11), 2)
    code = ec.OUT_OF_ORDER_SEQUENCE_NUMBER
    assert idem.on_sequence_error(chain, e, code, [earlier], []) is Verdict.RETRY
    assert idem.on_sequence_error(chain, e, code, [], [earlier]) is Verdict.RETRY
    # An earlier batch not stamped yet, or of another id, or later, cannot explain the gap.
    unstamped = _Pending(_Stamp(7, 0, 10), 1, needs_stamp=True)
    other_id = _Pending(_Stamp(8, 0, 10), 1)
    later = _Pending(_Stamp(7, 0, 12), 3)
    assert idem.on_sequence_error(chain, e, code, [other_id, later], [unstamped]) is Verdict.FAIL
    assert chain.broken == set()


def test_out_of_order_on_a_broken_chain_is_restamped() -> None:
    idem = _idempotence()
    chain = Chain()
    failed = _Stamp(7, 0, 10)
    chain.break_at(failed)
    e = _Pending(_Stamp(7, 0, 11), 2)
    assert idem.on_sequence_error(chain, e, ec.OUT_OF_ORDER_SEQUENCE_NUMBER, [], []) is Verdict.RESTAMP


def test_unknown_producer_id_breaks_the_chain_and_restamps() -> None:
    idem = _idempotence()
    chain = Chain()
    e = _Pending(_Stamp(7, 0, 11), 2)
    assert idem.on_sequence_error(chain, e, ec.UNKNOWN_PRODUCER_ID, [], []) is Verdict.RESTAMP
    assert chain.broken == {(7, 0)}
    # The later batches of that id are re-stamped too, not failed.
    e2 = _Pending(_Stamp(7, 0, 12), 3)
    assert idem.on_sequence_error(chain, e2, ec.OUT_OF_ORDER_SEQUENCE_NUMBER, [], []) is Verdict.RESTAMP


def test_sequence_errors_are_the_two_the_policy_covers() -> None:
    assert SEQUENCE_ERRORS == {ec.OUT_OF_ORDER_SEQUENCE_NUMBER, ec.UNKNOWN_PRODUCER_ID}
