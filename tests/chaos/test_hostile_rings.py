"""Hostile clients that corrupt their own shared-memory segment.

Each scenario is a real ``shm.Producer`` whose request ring (or completion ring) the test then
writes into directly, as a buggy or malicious process could: random bytes, a frame length past
the end of the ring, unknown topic ids and partitions, malformed record bodies, frames rewritten
after they were published, and ring positions that make no sense. Meanwhile a well-behaved
client sends sequence-numbered records to the *same* topic and partitions (so hostile records
would share its batches).

Promised, and checked: the daemon never crashes (no worker restart), never delivers a corrupt
record as valid (the independent reader finds only the good client's records and the hostile
clients' well-formed records from before the corruption), drops only the offending client
(its segment is released, the good client keeps working, exactly once) and logs why.
"""

from __future__ import annotations

import os
import random
import re
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest
from chaos_util import SendLoop, check_exactly_once
from helpers import wait_until

from shm import Producer
from shm.frames import RECORD_HEADER, encode_record_body, put_record
from shm.layout import FRAME_PADDING, FRAME_RECORD
from shm.partitioner import owner

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

SEED = 20261127
HOSTILE_OK = b"hostile-valid-"
REWRITTEN = 1500  # records rewritten_after_publish publishes, each with body _valid_body(REWRITTEN_BODY)
REWRITTEN_BODY = 7  # no other scenario writes this body, so the reader can tell its records apart
_HDR = struct.Struct("<II")


def _valid_body(i: int) -> bytes:
    return encode_record_body(b"hk", HOSTILE_OK + b"%d" % i, None)


def _ring_for(p: Producer, topic: str, partition: int) -> Any:
    return p._req[owner(topic, partition, p.workers)]


def _publish_valid(p: Producer, topic: str, partition: int, n: int) -> None:
    """n well-formed records, published the normal way (they may be delivered)."""
    tid = p.lookup(topic).topic_id
    ring = _ring_for(p, topic, partition)
    for i in range(n):
        assert put_record(ring, tid, partition, int(time.time() * 1000), _valid_body(i))
    ring.publish_head()


def _claim(ring: Any, payload_len: int) -> int:
    pos = ring.claim(FRAME_RECORD, payload_len)
    assert pos >= 0, "ring full"
    return pos


def _claim_record(ring: Any, tid: int, part: int, body: bytes) -> int:
    """Claim a RECORD frame and write its record header and ``body`` (not published); returns
    the payload's position."""
    pos = _claim(ring, RECORD_HEADER.size + len(body))
    RECORD_HEADER.pack_into(ring.view, pos, tid, 0, part, int(time.time() * 1000))
    ring.view[pos + RECORD_HEADER.size : pos + RECORD_HEADER.size + len(body)] = body
    return pos


# --- scenarios: each corrupts one client's segment -----------------------------------------


def random_bytes(p: Producer, topic: str, part: int, rng: random.Random) -> None:
    """A frame whose header and payload are random bytes."""
    ring = _ring_for(p, topic, part)
    n = rng.randrange(16, 400)
    pos = _claim(ring, n)
    ring.view[pos - 8 : pos + n] = rng.randbytes(n + 8)
    # A random type 0 (padding) of random length would just skip to the wrap; keep it a frame
    # the reader must judge.
    _HDR.pack_into(ring.view, pos - 8, rng.randrange(0, 1 << 32), rng.choice([1, 2, 3, 7, 0xFFFFFFFF]))
    ring.publish_head()


def random_payload(p: Producer, topic: str, part: int, rng: random.Random) -> None:
    """A RECORD frame with a valid header and topic, and random bytes as the record body."""
    tid = p.lookup(topic).topic_id
    ring = _ring_for(p, topic, part)
    _claim_record(ring, tid, part, rng.randbytes(rng.randrange(1, 200)))
    ring.publish_head()


def length_past_end(p: Producer, topic: str, part: int, rng: random.Random) -> None:
    """A RECORD frame whose payload length runs past the end of the ring."""
    tid = p.lookup(topic).topic_id
    ring = _ring_for(p, topic, part)
    pos = _claim_record(ring, tid, part, _valid_body(0))
    _HDR.pack_into(ring.view, pos - 8, rng.choice([ring.capacity, ring.capacity * 4, 0xFFFFFFF0]), FRAME_RECORD)
    ring.publish_head()


def length_past_frame(p: Producer, topic: str, part: int, rng: random.Random) -> None:
    """Valid records, then one whose length claims more than was published."""
    _publish_valid(p, topic, part, 3)
    tid = p.lookup(topic).topic_id
    ring = _ring_for(p, topic, part)
    body = _valid_body(9)
    pos = _claim_record(ring, tid, part, body)
    _HDR.pack_into(ring.view, pos - 8, RECORD_HEADER.size + len(body) + 4096, FRAME_RECORD)
    ring.publish_head()


def unknown_topic_id(p: Producer, topic: str, part: int, rng: random.Random) -> None:
    ring = _ring_for(p, topic, part)
    assert put_record(ring, rng.choice([999, 4242, 0xFFFF]), part, int(time.time() * 1000), _valid_body(1))
    ring.publish_head()


def partition_out_of_range(p: Producer, topic: str, part: int, rng: random.Random) -> None:
    tid = p.lookup(topic).topic_id
    ring = _ring_for(p, topic, part)
    assert put_record(ring, tid, rng.choice([-1, 3, 1 << 30]), int(time.time() * 1000), _valid_body(2))
    ring.publish_head()


def malformed_body(p: Producer, topic: str, part: int, rng: random.Random) -> None:
    """Well-framed records with bodies Kafka would reject: lengths that overrun the body,
    lengths below -1, a header count that lies."""
    tid = p.lookup(topic).topic_id
    ring = _ring_for(p, topic, part)
    bad = rng.choice(
        [
            b"\x14abc\x02x\x00",  # key length 10, 3 bytes follow
            b"\x05\x02x\x00",  # key length -3
            b"\x01\x02x\x06",  # 3 headers announced, none there
            b"\x01\x02x\x00trailing",  # bytes after the last field
            b"\x01\xff\xff\xff\xff\xff\x01\x00",  # a 6-byte varint
        ]
    )
    _publish_valid(p, topic, part, 2)
    assert put_record(ring, tid, part, int(time.time() * 1000), bad)
    ring.publish_head()


def rewritten_after_publish(p: Producer, topic: str, part: int, rng: random.Random) -> None:
    """Publish valid records, then overwrite their bodies in place with malformed ones. The
    worker validates and appends from its private copy of the ring, so a frame it copied
    before the rewrite is delivered exactly as it was validated, and one it copies after is
    refused (the client is dropped); what it delivers is never the rewritten bytes. The test
    checks this on what the reader finds (see ``_check_rewritten``)."""
    tid = p.lookup(topic).topic_id
    ring = _ring_for(p, topic, part)
    body = _valid_body(REWRITTEN_BODY)
    spots = []
    for _ in range(REWRITTEN):
        spots.append(_claim_record(ring, tid, part, body) + RECORD_HEADER.size)
    ring.publish_head()
    garbage = b"\x7e" + b"\x00" * (len(body) - 1)  # key length 63 in a shorter body
    for at in spots:
        ring.view[at : at + len(body)] = garbage
    for at in spots:  # and once more the type word, so a late reader meets a non-record
        _HDR.pack_into(ring.view, at - 24, RECORD_HEADER.size + len(body), 0x5A5A5A5A)


def head_jumps(p: Producer, topic: str, part: int, rng: random.Random) -> None:
    """The request ring's head jumps far past the tail (more than its capacity)."""
    ring = _ring_for(p, topic, part)
    ring._words[ring._head_i] = ring._words[ring._head_i] + ring.capacity * 3 + 8 * rng.randrange(1, 100)


def head_unaligned(p: Producer, topic: str, part: int, rng: random.Random) -> None:
    ring = _ring_for(p, topic, part)
    ring._words[ring._head_i] = ring._words[ring._head_i] + rng.choice([1, 3, 5, 7])


def head_backwards(p: Producer, topic: str, part: int, rng: random.Random) -> None:
    _publish_valid(p, topic, part, 5)
    ring = _ring_for(p, topic, part)
    time.sleep(0.3)  # let the worker read them
    ring._words[ring._head_i] = 0


def completion_tail_bogus(p: Producer, topic: str, part: int, rng: random.Random) -> None:
    """The client's tail of a completion ring (which the worker writes) goes wild, then the
    client sends records one publish at a time, so the worker has more completions to write
    than the (4 KiB) ring holds and must look at the tail."""
    w = owner(topic, part, p.workers)
    cmp = p._cmp[w]
    p._closed = True
    p._completions.stop(2)  # the client's completion thread would store a sane tail again
    cmp._words[cmp._tail_i] = rng.choice([1 << 60, cmp._words[cmp._tail_i] + 3])
    for _ in range(200):
        _publish_valid(p, topic, part, 1)
        time.sleep(0.002)


def padding_storm(p: Producer, topic: str, part: int, rng: random.Random) -> None:
    """Padding frames that do not end at the wrap, with random lengths."""
    ring = _ring_for(p, topic, part)
    pos = _claim(ring, 64)
    _HDR.pack_into(ring.view, pos - 8, rng.randrange(0, 1 << 32), FRAME_PADDING)
    ring.publish_head()
    _publish_valid(p, topic, part, 2)


SCENARIOS: list[Callable[[Producer, str, int, random.Random], None]] = [
    random_bytes,
    random_payload,
    length_past_end,
    length_past_frame,
    unknown_topic_id,
    partition_out_of_range,
    malformed_body,
    rewritten_after_publish,
    head_jumps,
    head_unaligned,
    head_backwards,
    completion_tail_bogus,
    padding_storm,
]


def _check_rewritten(records: list[Any], part: int, dropped: bool) -> int:
    """What the reader found of rewritten_after_publish's records: each one intact (its key,
    value and no headers, on its partition); all of them if the worker read every frame before
    the rewrite (the client was not dropped), fewer if it met a rewritten frame and dropped the
    client. (A rewritten body delivered as a record fails check_exactly_once: no client wrote
    it.) Returns how many were delivered."""
    delivered = [r for r in records if r.value == HOSTILE_OK + b"%d" % REWRITTEN_BODY]
    assert all((r.key, r.headers, r.partition) == (b"hk", [], part) for r in delivered), [
        (r.key, r.headers, r.partition) for r in delivered[:5]]
    if dropped:
        assert len(delivered) < REWRITTEN, f"dropped, yet all {REWRITTEN} records delivered"
    else:
        assert len(delivered) == REWRITTEN, f"not dropped, yet {len(delivered)} of {REWRITTEN} records delivered"
    return len(delivered)


def _closed_by_daemon(p: Producer, timeout: float = 5.0) -> bool:
    """The hostile client's control socket sees EOF or a reset within ``timeout`` (read through
    a duplicate of its descriptor; what the daemon sent meanwhile is dropped)."""
    with socket.socket(fileno=os.dup(p._ctl.fileno())) as sock:
        sock.settimeout(timeout)
        try:
            while sock.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass
        except TimeoutError:
            return False
    return True


def _let_go(p: Producer) -> None:
    """Release a hostile client without flushing (its rings are garbage)."""
    if p._ctl.fileno() < 0:
        return  # closed normally already
    p._closed = True
    p._completions.stop(2)
    p._ctl.close()
    for ring in p._req + p._cmp:
        ring.release()
    p._segment.close()


def test_corrupt_rings_drop_only_the_offender(broker, start_sluice, topic, read_topic) -> None:
    rng = random.Random(SEED)
    print(f"seed {SEED}")
    name = topic("hostile", partitions=2)
    d = start_sluice(workers=2, daemon={"completion_ring_bytes": 4096}, profiles={"default": {"linger_ms": 20}})
    outcomes: list[str] = []
    dropped_clients = 0
    rewritten: dict[str, Any] = {}  # rewritten_after_publish's partition and whether it was dropped
    with Producer(d.socket_path, client_name="good-client") as good:
        # The daemon's own socket-ingest client and the good one.
        baseline = d.wait_stats(lambda s: s["clients"] >= 2, timeout=10, what="clients attached")["clients"]
        loop = SendLoop(good, name, rate=1500, keys=8).start()
        try:
            wait_until(lambda: len(loop.done_at) > 200, 20, "the good client's records flowing")
            for i, scenario in enumerate(SCENARIOS):
                part = i % 2
                hostile = Producer(d.socket_path, client_name=f"hostile-{scenario.__name__}")
                cid = hostile.client_id
                try:
                    hostile.lookup(name)
                    scenario(hostile, name, part, rng)
                    if scenario is rewritten_after_publish:
                        rewritten.update(part=part, dropped=False)
                    # The daemon drops the offender, says why in its log and closes the
                    # connection (a fatal ErrorReply, then EOF).
                    dropped = f"client {cid} dropped"
                    try:
                        wait_until(lambda: dropped in d.log(), 10, f"{scenario.__name__}: client dropped")
                    except AssertionError:
                        if scenario is not rewritten_after_publish:
                            raise
                        # The worker read every frame before the rewrite: nothing corrupt to see
                        # (checked on what the reader finds: then every record is delivered).
                        outcomes.append(f"{scenario.__name__}: read before the rewrite, not dropped")
                        hostile.close(10)
                        continue
                    dropped_clients += 1
                    if scenario is rewritten_after_publish:
                        rewritten["dropped"] = True
                    assert _closed_by_daemon(hostile), f"{scenario.__name__}: connection still open"
                finally:
                    _let_go(hostile)
                reason = re.search(rf"client {cid} dropped: (.*)", d.log())
                outcomes.append(f"{scenario.__name__}: {reason.group(1)[:100] if reason else '?'}")
                assert d.proc.poll() is None, "the daemon exited"
            time.sleep(1.0)
        finally:
            loop.stop()
        assert good.flush(30) == 0
        d.wait_stats(lambda s: s["clients"] == baseline, timeout=30, what="every hostile segment released")
    ok, failed, pending = loop.outcomes()
    assert (ok, dict(failed), pending) == (loop.sent, {}, 0), "the good client suffered"
    stats = d.stats()
    assert stats["restarts"] == 0, "a worker crashed"
    assert all(w["alive"] for w in stats["workers"].values())
    assert stats["totals"]["dropped_clients"] == dropped_clients

    records = read_topic(name, loop.sent, timeout=60)
    good_values = [r.value for r in records if not r.value.startswith(HOSTILE_OK)]
    hostile_values = [r.value for r in records if r.value.startswith(HOSTILE_OK)]
    check_exactly_once(good_values, loop.sent)  # also fails on any value no client wrote
    assert all(re.fullmatch(rb"hostile-valid-\d+", v) for v in hostile_values)
    delivered = _check_rewritten(records, rewritten["part"], rewritten["dropped"])
    print(f"{loop.sent} good records exactly once, {len(hostile_values)} valid hostile records "
          f"({delivered} of {REWRITTEN} rewritten_after_publish records); " + "; ".join(outcomes))
