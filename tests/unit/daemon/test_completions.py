"""daemon.completions' slot holds and the order completion frames are written in.

The end-to-end bookkeeping (frames per chunk, CHUNK_DONE, detach) is in test_worker.py, which
drives a real Worker; these check the two small contracts it builds on.
"""

from __future__ import annotations

import random

import msgspec

from daemon.arena import Arena
from daemon.completions import SlotHolds
from daemon.drain import Outcome


def test_a_slot_is_freed_by_its_last_release_only() -> None:
    arena = Arena(1 << 16, chunk_size=4096)
    try:
        a, b = arena.alloc(4096), arena.alloc(4096)
        assert a >= 0 and b >= 0
        holds = SlotHolds(arena)
        holds.keep(a, 2)
        holds.add(a)
        holds.keep(b, 0)  # nothing needs it: freed at once
        assert holds.held() == {a: 3}
        assert b not in arena.allocations()
        for left in (2, 1):
            holds.release(a)
            assert holds.held() == {a: left} and a in arena.allocations()
        holds.release(a)
        assert holds.held() == {} and a not in arena.allocations()
        holds.release(a)  # not held any more: ignored, not freed twice
        assert arena.used_bytes == 0
    finally:
        arena.close()


def test_outcomes_sort_as_the_tuples_of_their_fields() -> None:
    # A chunk's COMPLETION frames are written sorted; the client resolves each partition's
    # records in that order, so Outcome must sort exactly as the tuples did.
    seed = 20261130
    print("seed", seed)
    rng = random.Random(seed)
    rows = [tuple(rng.randrange(-1, 4) for _ in range(7)) for _ in range(500)]
    assert [msgspec.structs.astuple(o) for o in sorted(Outcome(*r) for r in rows)] == sorted(rows)
