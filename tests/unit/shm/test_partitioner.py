"""Partitioner: Kafka's murmur2 vectors and a plain transcription of Kafka's loop as the
oracle of the C murmur2, owner() spread and stability, and the uniform sticky partitioner."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import zlib
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shm import _client
from shm.partitioner import (
    StickyPartitioner,
    murmur2,
    owner,
    partition_for_key,
    partitions_for_keys,
    to_positive,
)

# From Kafka's clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java, testMurmur2.
KAFKA_VECTORS = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}
# The same function as other Kafka clients' test suites pin it (every tail length 0..3).
MORE_VECTORS = {
    b"": 275646681,
    b"1": -1993445489,
    b"12": 126087238,
    b"123": -267702483,
    b"1234": -1614185708,
    b"12345": -1188365604,
    b"hello world": 1221641059,
}


def reference_murmur2(data: bytes) -> int:
    """A plain transcription of Kafka's Utils.murmur2 loop: the oracle of the C murmur2."""
    length = len(data)
    m, r = 0x5BD1E995, 24
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    for i in range(length // 4):
        k = int.from_bytes(data[4 * i : 4 * i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    tail = length & ~3
    rest = length % 4
    if rest == 3:
        h ^= data[tail + 2] << 16
    if rest >= 2:
        h ^= data[tail + 1] << 8
    if rest >= 1:
        h ^= data[tail]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h - (1 << 32) if h >= 1 << 31 else h


@pytest.mark.parametrize(("data", "expected"), sorted({**KAFKA_VECTORS, **MORE_VECTORS}.items()))
def test_murmur2_vectors(data: bytes, expected: int) -> None:
    assert reference_murmur2(data) == expected
    assert murmur2(data) == expected


def test_murmur2_is_the_compiled_one() -> None:
    # One implementation: the Python paths hash with the function the compiled send() uses.
    assert murmur2 is _client.murmur2


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_murmur2_matches_reference(data: bytes) -> None:
    assert murmur2(data) == reference_murmur2(data)
    assert murmur2(bytearray(data)) == murmur2(memoryview(data)) == murmur2(data)


def test_partition_for_key_is_kafkas_default() -> None:
    for key, h in KAFKA_VECTORS.items():
        for n in (1, 3, 12, 100):
            assert partition_for_key(key, n) == to_positive(h) % n
    assert to_positive(-1) == 0x7FFFFFFF
    keys = [b"k%d" % i for i in range(500)]
    assert partitions_for_keys(keys, 7) == [to_positive(reference_murmur2(k)) % 7 for k in keys]
    assert partition_for_key(bytearray(b"21"), 12) == partition_for_key(memoryview(b"21"), 12) == to_positive(-973932308) % 12


def test_owner_spreads_each_topic_evenly() -> None:
    workers = 4
    for topic in ("orders", "clicks", "payments-v2", "t"):
        counts = Counter(owner(topic, p, workers) for p in range(4 * workers))
        assert counts == {w: 4 for w in range(workers)}
    starts = Counter(owner(f"topic-{i}", 0, workers) for i in range(400))
    assert set(starts) == set(range(workers))
    assert min(starts.values()) > 60  # ~100 each: topics start on different workers


def test_owner_is_stable_across_processes() -> None:
    cases = [("orders", 0, 3), ("orders", 5, 3), ("clicks", 2, 8), ("ünïcode", 1, 5)]
    here = [owner(t, p, w) for t, p, w in cases]
    code = (
        "import json,sys; from shm.partitioner import owner; "
        f"print(json.dumps([owner(t, p, w) for t, p, w in {cases!r}]))"
    )
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert json.loads(out.stdout) == here
    # Pinned values: a change here would move partitions between workers on upgrade.
    assert here == [2, 1, 3, 0]
    assert here[0] == zlib.crc32(b"orders") % 3


def test_sticky_partitioner_moves_on_after_batch_size() -> None:
    seed = random.randrange(1 << 30)
    print("seed", seed)
    sp = StickyPartitioner(batch_size=1000, rng=random.Random(seed))
    assert sp.current("t") is None
    first = sp.partition("t", 6, 100)
    assert [sp.partition("t", 6, 100) for _ in range(9)] == [first] * 9  # 1000 bytes in all
    second = sp.partition("t", 6, 100)
    assert second != first
    assert sp.current("t") == second
    # Over many batches every partition gets used, roughly uniformly.
    seen = Counter(sp.partition("t", 6, 1000) for _ in range(6000))
    assert set(seen) == set(range(6))
    assert min(seen.values()) > 700
    # Topics are independent; a shrunk partition count forces a valid choice.
    other = sp.partition("u", 1, 10)
    assert other == 0
    assert 0 <= sp.partition("t", 2, 10) < 2


def test_sticky_partitioner_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        StickyPartitioner(batch_size=0)
    with pytest.raises(ValueError):
        StickyPartitioner().partition("t", 0, 10)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=50), st.integers(1, 2**31 - 1))
def test_partitions_for_keys_is_partition_for_key_of_each(keys: list[bytes], n: int) -> None:
    want = [to_positive(reference_murmur2(k)) % n for k in keys]
    assert partitions_for_keys(keys, n) == want
    assert partitions_for_keys([bytearray(k) for k in keys], n) == want  # any bytes-like key
