"""The compiled client's layout constants (shm/_layout.h, exported by shm._client) against
shm/layout.py, the one source of truth; the worker's are checked in
tests/unit/daemon/test_batcher.py."""

from __future__ import annotations

from shm import _client, layout
from shm.frames import RECORD_HEADER


def test_ring_header_offsets_match_shm_layout() -> None:
    assert _client.RING_HEADER_BYTES == layout.RING_HEADER_BYTES
    assert _client.RING_HEAD_OFFSET == layout.RING_OFFSETS["head"]
    assert _client.RING_FULL_COUNT_OFFSET == layout.RING_OFFSETS["full_count"]
    assert _client.RING_TAIL_OFFSET == layout.RING_OFFSETS["tail"]
    assert _client.RING_READER_SLEEPING_OFFSET == layout.RING_OFFSETS["reader_sleeping"]


def test_frame_constants_match_shm_layout() -> None:
    assert _client.FRAME_RECORD == layout.FRAME_RECORD
    assert _client.FRAME_PADDING == layout.FRAME_PADDING
    assert _client.RECORD_PREFIX_BYTES == RECORD_HEADER.size


def test_claim_codes_are_negative_and_distinct() -> None:
    codes = {_client.CLAIM_FULL, _client.CLAIM_CORRUPT, _client.CLAIM_TOO_BIG}
    assert len(codes) == 3 and all(c < 0 for c in codes)
    assert _client.CLAIM_FULL == -1  # SpscRing.claim's documented "no room now"
