"""Broker deaths, stalls and leader changes on the three-broker cluster, with records streaming.

Every test streams sequence-numbered records through a real ``sluice run`` (two workers) to a
topic of 6 partitions replicated to all three brokers (min.insync.replicas 2) under the
payments profile (acks=all, idempotent), does something to the brokers, keeps streaming, and
then requires:

- every future resolved, none failed;
- 0 lost and 0 duplicated: confluent-kafka reads every sequence number exactly once;
- each future's (partition, offset) is where the reader found that record;
- the longest send-to-outcome time (the delivery stall the event caused) within a bound, and
  printed (``-s`` shows it; docs/GUARANTEES.md records what was measured).

Two of the events run again under an acks=1 profile without idempotence (the ``clicks``
delivery, with back-pressure instead of drops so every record is accounted for). Kafka's acks=1
lets a leader acknowledge a write its followers have not copied yet, and a retry after a lost
answer writes a record again, so what is promised, and required, is less:

- every future resolved, none failed, within the same stall bound;
- nothing in the topic that was not sent, and each partition's records in send order (at most
  one batch per partition is in flight without idempotence, so a retry never overtakes);
- a record whose future succeeded is in the topic at the offset its future gave, unless a
  failover lost it (counted: *lost*); copies written by retries are counted (*duplicated*).
  Both counts are printed; docs/GUARANTEES.md records what was measured.

The cluster fences a dead broker after broker.session.timeout.ms (3 s, scripts/kafka.sh), and a
SIGTERMed one hands its leadership over in a controlled shutdown, so the stalls are bounded by
seconds, not by the 120 s delivery timeout. A stalled broker (SIGSTOP: alive, connections open,
silent) is fenced the same way, but the requests already written to it are only given up after
``request_timeout_ms`` (10 s here, plus 1 s of grace), as in the Java producer: that is the
stall its test expects.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from chaos_util import SendLoop, check_exactly_once, seq_of
from cluster_util import Cluster, await_served, leaders
from helpers import wait_until

from shm import Producer

pytestmark = [pytest.mark.cluster, pytest.mark.integration, pytest.mark.slow]

PARTITIONS = 6
RATE = 800  # records/s: enough that every partition has batches in flight at any moment
DELIVERY_TIMEOUT_MS = 120_000
_TIMING = {
    "delivery_timeout_ms": DELIVERY_TIMEOUT_MS,
    "request_timeout_ms": 10_000,
    "retry_backoff_ms": 50,
    "retry_backoff_max_ms": 500,
}
PROFILES = {
    "payments": {"acks": -1, "enable_idempotence": True, **_TIMING},
    "clicks": {"acks": 1, "enable_idempotence": False, "on_full": "block", **_TIMING},
}
TOPICS = {"pay-*": "payments", "click-*": "clicks"}
KAFKA = {"reconnect_backoff_max_ms": 500, "metadata_max_age_ms": 5_000}
# A stall this long means the daemon waited out something it should not have (a backoff, a
# request timeout, the delivery timeout), not the cluster's own failover.
MAX_STALL_S = 20.0


def _stream_through(start_sluice: Callable[..., Any], topic: str, read_topic: Callable[..., Any],
                    event: Callable[[], None], name: str) -> float:
    """Stream records, run ``event`` in the middle, check everything; returns the longest stall."""
    d, loop, event_s = _stream(start_sluice, topic, event, name)
    records = read_topic(topic, loop.sent, timeout=60)
    check_exactly_once((r.value for r in records), loop.sent)
    where = {seq_of(r.value): (r.partition, r.offset) for r in records}
    for seq, fut in enumerate(loop.futures):
        md = fut.result(0)
        assert (md.partition, md.offset) == where[seq], f"record {seq}: future says {md}, reader {where[seq]}"
    stall = loop.longest_outcome_s()
    print(f"\n{name}: {loop.sent} records, event took {event_s:.1f}s, longest send->outcome {stall:.2f}s, "
          f"retries {d.stats()['totals'].get('retries', '?')}")
    assert stall < MAX_STALL_S, f"a record waited {stall:.1f}s for its outcome"
    return stall


def _stream_acks1(start_sluice: Callable[..., Any], topic: str, read_topic: Callable[..., Any],
                  event: Callable[[], None], name: str) -> tuple[int, int]:
    """The acks=1 variant (see the module docstring); returns (lost, duplicated)."""
    d, loop, event_s = _stream(start_sluice, topic, event, name)
    records = read_topic(topic, loop.sent, timeout=20)
    by_seq: dict[int, list[tuple[int, int]]] = {}
    last: dict[int, int] = {}
    for r in records:  # sorted by (partition, offset)
        seq = seq_of(r.value)
        assert 0 <= seq < loop.sent, f"record {seq} in the topic was never sent"
        if seq not in by_seq:
            assert seq > last.get(r.partition, -1), f"partition {r.partition}: record {seq} after {last[r.partition]}"
            last[r.partition] = seq
        by_seq.setdefault(seq, []).append((r.partition, r.offset))
    lost = 0
    for seq, fut in enumerate(loop.futures):
        md = fut.result(0)
        copies = by_seq.get(seq)
        if copies is None:
            lost += 1
        else:
            assert (md.partition, md.offset) in copies, f"record {seq}: future says {md}, reader {copies}"
    duplicated = sum(len(c) - 1 for c in by_seq.values())
    stall = loop.longest_outcome_s()
    print(f"\n{name} (acks=1): {loop.sent} records, event took {event_s:.1f}s, longest send->outcome "
          f"{stall:.2f}s, lost {lost}, duplicated {duplicated}, retries {d.stats()['totals'].get('retries', '?')}")
    assert stall < MAX_STALL_S, f"a record waited {stall:.1f}s for its outcome"
    return lost, duplicated


def _stream(start_sluice: Callable[..., Any], topic: str, event: Callable[[], None], name: str) -> tuple[Any, Any, float]:
    """Stream records through a daemon, run ``event`` in the middle, go on streaming a while;
    every future must resolve successfully. Returns (daemon, send loop, seconds the event took)."""
    d = start_sluice(workers=2, kafka=KAFKA, profiles=PROFILES, topics=TOPICS)
    with Producer(d.socket_path, client_name=f"cluster-{name}") as p:
        loop = SendLoop(p, topic, rate=RATE).start()
        try:
            wait_until(lambda: len(loop.done_at) > RATE, 30, "records flowing")
            t0 = time.monotonic()
            event()
            event_s = time.monotonic() - t0
            # Streaming goes on after the event, and what was sent since gets delivered.
            after = loop.sent
            wait_until(lambda: len(loop.done_at) > after + RATE, 90, "records delivered after the event")
        finally:
            loop.stop()
        assert p.flush(DELIVERY_TIMEOUT_MS / 1000) == 0
    ok, failed, pending = loop.outcomes()
    assert (ok, dict(failed), pending) == (loop.sent, {}, 0), "every future resolved, none failed"
    return d, loop, event_s


def _busiest_leader(cluster: Cluster, admin: Any, topic: str) -> int:
    counts: dict[int, int] = {}
    for leader in leaders(admin, topic).values():
        counts[leader] = counts.get(leader, 0) + 1
    return max(counts, key=lambda n: (counts[n], -n))


def _back_in_sync(cluster: Cluster, admin: Any, topic: str, node: int) -> None:
    cluster.start(node)
    await_served(admin, topic, PARTITIONS, timeout=60)


def _kill_the_busiest_leader(cluster: Cluster, admin: Any, topic: str) -> Callable[[], None]:
    def event() -> None:
        victim = _busiest_leader(cluster, admin, topic)
        led = [p for p, n in leaders(admin, topic).items() if n == victim]
        cluster.kill(victim)
        # Its partitions move to the survivors; records keep flowing meanwhile.
        wait_until(lambda: all(leaders(admin, topic)[p] not in (victim, -1) for p in led), 30,
                   "new leaders for the dead broker's partitions")
        time.sleep(2)
        _back_in_sync(cluster, admin, topic, victim)

    return event


def _restart_each(cluster: Cluster, admin: Any, topic: str) -> Callable[[], None]:
    def event() -> None:
        for node in (1, 2, 3):
            cluster.stop(node)
            _back_in_sync(cluster, admin, topic, node)

    return event


# The payments profile (exactly once) and the clicks one (acks=1: see the module docstring).
_CHECKS = {"payments": _stream_through, "clicks": _stream_acks1}
_PREFIXES = {"payments": "pay", "clicks": "click"}


@pytest.mark.parametrize("profile", ["payments", "clicks"])
def test_sigkill_of_the_busiest_leader(profile, controlled, cluster_topic, kafka_admin, start_sluice,
                                       read_topic) -> None:
    topic = cluster_topic(f"{_PREFIXES[profile]}-kill", PARTITIONS)
    _CHECKS[profile](start_sluice, topic, read_topic, _kill_the_busiest_leader(controlled, kafka_admin, topic),
                     "SIGKILL of the busiest leader")


def test_sigterm_of_a_broker(controlled, cluster_topic, kafka_admin, start_sluice, read_topic) -> None:
    topic = cluster_topic("pay-term", PARTITIONS)

    def event() -> None:
        victim = _busiest_leader(controlled, kafka_admin, topic)
        controlled.stop(victim)
        time.sleep(2)
        _back_in_sync(controlled, kafka_admin, topic, victim)

    _stream_through(start_sluice, topic, read_topic, event, "SIGTERM of a broker")


def test_a_broker_stalled_past_the_request_timeout(controlled, cluster_topic, kafka_admin, start_sluice,
                                                  read_topic) -> None:
    topic = cluster_topic("pay-stall", PARTITIONS)
    request_timeout_s = PROFILES["payments"]["request_timeout_ms"] / 1000

    def event() -> None:
        victim = _busiest_leader(controlled, kafka_admin, topic)
        controlled.pause(victim)
        try:
            time.sleep(request_timeout_s + 4)  # fenced after 3 s; requests to it time out at 11 s
        finally:
            controlled.resume(victim)
        await_served(kafka_admin, topic, PARTITIONS, timeout=60)

    stall = _stream_through(start_sluice, topic, read_topic, event, "a broker stalled")
    # Records written to the stalled leader waited for their request timeout; none waited for more.
    assert stall >= request_timeout_s * 0.9, f"the longest stall {stall:.1f}s: did the test stall anything?"


@pytest.mark.parametrize("profile", ["payments", "clicks"])
def test_rolling_restart_of_all_three(profile, controlled, cluster_topic, kafka_admin, start_sluice,
                                      read_topic) -> None:
    topic = cluster_topic(f"{_PREFIXES[profile]}-roll", PARTITIONS)
    _CHECKS[profile](start_sluice, topic, read_topic, _restart_each(controlled, kafka_admin, topic), "rolling restart")
