"""partitions_many: numpy murmur2 agrees with the C murmur2 for every key length."""

from __future__ import annotations

import random

import pytest

from shm.partitioner import murmur2, partitions_many, to_positive


@pytest.mark.parametrize("klen", [0, 1, 2, 3, 4, 5, 6, 7, 8, 15, 16, 17, 36, 64, 101])
def test_partitions_many_equals_murmur2_per_key(klen: int) -> None:
    seed = 1000 + klen
    print("seed", seed)
    rng = random.Random(seed)
    keys = [rng.randbytes(klen) for _ in range(300)]
    for n in (1, 6, 7, 1000):
        assert partitions_many(keys, n) == [to_positive(murmur2(k)) % n for k in keys]


def test_partitions_many_refuses_mixed_lengths_and_takes_empty() -> None:
    assert partitions_many([b"ab", b"abc"], 3) is None
    assert partitions_many([], 3) == []
    # Kafka's published vectors: murmur2("21") and the like, through the bulk path.
    assert partitions_many([b"21"], 2**31 - 1) == [to_positive(-973932308) % (2**31 - 1)]
