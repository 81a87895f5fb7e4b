"""Partitioning, shared by clients and daemon: which partition a record goes to, and which
worker owns a partition.

- :func:`owner` maps (topic, partition) to a worker: a pure, process-independent function
  (CRC-32 of the topic name, never Python's salted ``hash()``), so every client and the daemon
  agree without talking. A topic's partitions go round-robin over the workers starting at a
  topic-dependent worker, so each topic is spread evenly and small topics do not all pile up
  on worker 0.
- Keyed records use Kafka's default partitioner, so a key lands on the same partition as
  with the Java client: ``(murmur2(key) & 0x7fffffff) % num_partitions``. :func:`murmur2` is
  Kafka's ``Utils.murmur2`` (seed 0x9747b28c, signed 32-bit result).
- Records without a key use :class:`StickyPartitioner`, Kafka's uniform sticky partitioner
  (KIP-794): stay on one random partition until about ``batch_size`` bytes went to it.

Speed: the compiled ``send()`` hashes keys itself (``shm._client.murmur2``, C, no cache); what
is here serves the Python paths. Pure-Python murmur2 costs about a microsecond for a short key,
so :func:`partition_for_key` keeps a bounded two-generation cache of key hashes (a hit is one
dict lookup), and :func:`partitions_for_keys` does a whole list in one call. Many keys of one
length at once (``send_many``) go through :func:`partitions_many`, which runs murmur2 over all
of them with numpy: about 35 ns a key, against about 1,100 ns a key in pure Python.
"""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "murmur2",
    "to_positive",
    "KeyHashCache",
    "partition_for_key",
    "partitions_for_keys",
    "partitions_many",
    "owner",
    "StickyPartitioner",
]

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF
# Word unpackers for keys up to 256 bytes, built once; longer keys format theirs per call.
_WORDS = [struct.Struct(f"<{n}I").unpack_from for n in range(65)]


def murmur2(data: bytes | bytearray | memoryview) -> int:
    """Kafka's ``Utils.murmur2``: MurmurHash2, seed 0x9747b28c, as a signed 32-bit int."""
    n = len(data)
    m = _M
    h = _SEED ^ n
    n4 = n >> 2
    if n4:
        words = _WORDS[n4](data) if n4 <= 64 else struct.unpack_from(f"<{n4}I", data)
        for k in words:
            # k *= m; k ^= k >>> 24; k *= m; h *= m; h ^= k  (all mod 2**32). The low 32 bits
            # of a product depend only on the low 32 bits of its factors, so masking once
            # after the xor of the two products is enough.
            k = (k * m) & _MASK
            h = ((h * m) ^ ((k ^ (k >> 24)) * m)) & _MASK
    rem = n & 3
    if rem:
        i = n4 << 2
        if rem == 3:
            h ^= data[i + 2] << 16
        if rem >= 2:
            h ^= data[i + 1] << 8
        h = ((h ^ data[i]) * m) & _MASK
    h ^= h >> 13
    h = (h * m) & _MASK
    h ^= h >> 15
    return h - 0x1_0000_0000 if h & 0x8000_0000 else h


def to_positive(n: int) -> int:
    """Kafka's ``Utils.toPositive``: clears the sign bit (a mask, not ``abs``)."""
    return n & 0x7FFFFFFF


class KeyHashCache:
    """Bounded cache of ``to_positive(murmur2(key))``: two generations of dicts.

    New hashes go into the young generation; when it holds ``max_entries // 2`` keys it
    becomes the old one and the previous old one is dropped. A key found only in the old
    generation is copied to the young one, so keys in use survive and the cost per miss stays
    O(1) (an LRU approximation without per-hit bookkeeping).
    """

    __slots__ = ("_young", "_old", "_half")

    def __init__(self, max_entries: int = 65536) -> None:
        if max_entries < 2:
            raise ValueError("max_entries must be at least 2")
        self._young: dict[bytes, int] = {}
        self._old: dict[bytes, int] = {}
        self._half = max_entries // 2

    def _miss(self, key: bytes) -> int:
        h = self._old.get(key)
        if h is None:
            h = murmur2(key) & 0x7FFFFFFF
        if len(self._young) >= self._half:
            self._old = self._young
            self._young = {}
        self._young[key] = h
        return h

    def partition(self, key: bytes, num_partitions: int) -> int:
        """Kafka's partition for ``key`` (bytes; convert bytearray/memoryview first)."""
        h = self._young.get(key)
        if h is None:
            h = self._miss(key)
        return h % num_partitions

    def partitions(self, keys: Iterable[bytes], num_partitions: int) -> list[int]:
        """:meth:`partition` of each key, in one call."""
        out: list[int] = []
        append = out.append
        get = self._young.get
        for key in keys:
            h = get(key)
            if h is None:
                h = self._miss(key)
                get = self._young.get  # the miss may have started a new generation
            append(h % num_partitions)
        return out

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def __contains__(self, key: object) -> bool:
        return key in self._young or key in self._old


_DEFAULT_CACHE = KeyHashCache()
partition_for_key = _DEFAULT_CACHE.partition
"""``partition_for_key(key: bytes, num_partitions: int) -> int``: Kafka's default partition
of a non-null key, through this process's shared :class:`KeyHashCache`."""
partitions_for_keys = _DEFAULT_CACHE.partitions
"""``partitions_for_keys(keys: Iterable[bytes], num_partitions: int) -> list[int]``: the same
for many keys at once."""


def partitions_many(keys: Sequence[bytes], num_partitions: int) -> list[int] | None:
    """Kafka's default partition of each key, all keys hashed in one vectorised pass.

    For keys that all have the same length (ids, UUIDs, fixed-width numbers): murmur2 runs
    column by column over a ``(len(keys), key_length)`` array with numpy (uint32 arithmetic
    wraps exactly as Kafka's int arithmetic does). No cache: at about 35 ns a key this is
    cheaper than a dict lookup and a miss.

    Returns:
        One partition per key, or None when the keys differ in length or numpy is not
        installed (then use :meth:`KeyHashCache.partitions`).
    """
    n = len(keys)
    if not n:
        return []
    np = _numpy()
    if np is None:
        return None
    klen = len(keys[0])
    joined = b"".join(keys)
    if len(joined) != n * klen:
        return None
    u32 = np.uint32
    m = u32(_M)
    h = np.full(n, (_SEED ^ klen) & _MASK, dtype=u32)
    nw = klen >> 2
    if nw:
        cols = np.frombuffer(joined, dtype=np.uint8).reshape(n, klen)[:, : nw * 4]
        words = np.ascontiguousarray(cols).view("<u4")  # (n, nw)
        s24 = u32(24)
        for j in range(nw):
            k = words[:, j] * m
            k ^= k >> s24
            k *= m
            h *= m
            h ^= k
    rem = klen & 3
    if rem:
        tail = np.frombuffer(joined, dtype=np.uint8).reshape(n, klen)[:, nw * 4 :].astype(u32)
        if rem == 3:
            h ^= tail[:, 2] << u32(16)
        if rem >= 2:
            h ^= tail[:, 1] << u32(8)
        h ^= tail[:, 0]
        h *= m
    h ^= h >> u32(13)
    h *= m
    h ^= h >> u32(15)
    h &= u32(0x7FFFFFFF)
    h %= u32(num_partitions)
    return h.tolist()


_np: Any = None


def _numpy() -> Any:
    """numpy, imported on first use (it costs about 0.1 s to import); None if absent."""
    global _np
    if _np is None:
        try:
            import numpy
        except ImportError:
            numpy = False
        _np = numpy
    return _np or None


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
