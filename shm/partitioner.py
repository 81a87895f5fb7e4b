"""Partitioning, shared by clients and daemon: which partition a record goes to, and which
worker owns a partition.

- :func:`owner` maps (topic, partition) to a worker: a pure, process-independent function
  (CRC-32 of the topic name, never Python's salted ``hash()``), so every client and the daemon
  agree without talking. A topic's partitions go round-robin over the workers starting at a
  topic-dependent worker, so each topic is spread evenly and small topics do not all pile up
  on worker 0.
- Keyed records use Kafka's default partitioner, so a key lands on the same partition as
  with the Java client: ``(murmur2(key) & 0x7fffffff) % num_partitions``, where murmur2 is
  Kafka's ``Utils.murmur2`` (seed 0x9747b28c, signed 32-bit result).
- Records without a key use :class:`StickyPartitioner`, Kafka's uniform sticky partitioner
  (KIP-794): stay on one random partition until about ``batch_size`` bytes went to it.

Speed: :func:`murmur2` is ``shm._client.murmur2`` (C), the function the compiled ``send()``
uses, with no cache in front (a call costs about what a dict hit would). :func:`partition_for_key`
is the same hash for Python callers (``send_many``'s single-key case, the tests);
:func:`partitions_for_keys` (``shm._client.partitions``) hashes a list of keys in one call
(``send_many``): 6 ns a key, against 16 for the numpy pass it replaced and 65 for a loop over
the C function (4,096 16-byte keys; the tests check it against Kafka's vectors).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence

from shm._client import murmur2, partitions

__all__ = [
    "murmur2",
    "to_positive",
    "partition_for_key",
    "partitions_for_keys",
    "owner",
    "StickyPartitioner",
]

def to_positive(n: int) -> int:
    """Kafka's ``Utils.toPositive``: clears the sign bit (a mask, not ``abs``)."""
    return n & 0x7FFFFFFF


def partition_for_key(key: bytes | bytearray | memoryview, num_partitions: int) -> int:
    """Kafka's default partition of a non-null key: ``toPositive(murmur2(key)) % n``."""
    return (murmur2(key) & 0x7FFFFFFF) % num_partitions


def partitions_for_keys(keys: Sequence[bytes | bytearray | memoryview], num_partitions: int) -> list[int]:
    """:func:`partition_for_key` of each key, in one compiled call."""
    return partitions(keys, num_partitions)


_TOPIC_HASH: dict[str, int] = {}
_TOPIC_HASH_MAX = 4096


def owner(topic: str, partition: int, workers: int) -> int:
    """The worker (0 to ``workers - 1``) that owns ``partition`` of ``topic``.

    ``(crc32(topic as UTF-8) + partition) % workers``: stable across processes, hosts and
    Python versions; consecutive partitions of a topic go to consecutive workers.
    """
    h = _TOPIC_HASH.get(topic)
    if h is None:
        h = zlib.crc32(topic.encode("utf-8"))
        if len(_TOPIC_HASH) < _TOPIC_HASH_MAX:
            _TOPIC_HASH[topic] = h
    return (h + partition) % workers


class StickyPartitioner:
    """Kafka's uniform sticky partitioner (KIP-794) for records without a key.

    Each topic sticks to one randomly chosen partition; once at least ``batch_size`` bytes
    were sent to it, the next record picks another one at random. Batches fill up instead of
    every partition getting a trickle. Unlike Kafka's, the new partition always differs from
    the old one when the topic has more than one (Kafka may draw the same one again).

    Args:
        batch_size: bytes to send to a partition before moving on (Kafka's ``batch.size``).
        rng: source of randomness (pass a seeded ``random.Random`` in tests).
    """

    __slots__ = ("batch_size", "_rng", "_state")

    def __init__(self, batch_size: int = 16384, rng: random.Random | None = None) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        self.batch_size = batch_size
        self._rng = rng if rng is not None else random.Random()
        self._state: dict[str, list[int]] = {}  # topic -> [partition, bytes sent to it]

    def partition(self, topic: str, num_partitions: int, record_bytes: int) -> int:
        """The partition for a keyless record of about ``record_bytes`` bytes."""
        state = self._state.get(topic)
        if state is None or state[1] >= self.batch_size or state[0] >= num_partitions:
            state = self._move_on(topic, num_partitions, state)
        state[1] += record_bytes
        return state[0]

    def _move_on(self, topic: str, num_partitions: int, state: list[int] | None) -> list[int]:
        if num_partitions < 1:
            raise ValueError(f"topic {topic!r} has no partitions")
        if state is None or num_partitions == 1 or state[0] >= num_partitions:
            partition = self._rng.randrange(num_partitions)
        else:
            # Any partition but the current one, uniformly.
            partition = self._rng.randrange(num_partitions - 1)
            if partition >= state[0]:
                partition += 1
        new = [partition, 0]
        self._state[topic] = new
        return new

    def current(self, topic: str) -> int | None:
        """The partition ``topic`` is sticking to now, or None before its first record."""
        state = self._state.get(topic)
        return None if state is None else state[0]
