"""shm._client.scan_produce and SendCore.send_packed: socket ingest's packed Produce, held to msgspec.

The oracle is msgspec's own decoding of the same bytes (what the daemon did before the packed
path): whatever scan_produce accepts must decode to a Produce with the same topic, ack, seq and
record count, and send_packed must write each record exactly as send() writes the decoded one
(the pure-Python encoder gives the bodies). Frames come from a hand-written msgpack encoder that
picks every legal width for each integer, string, binary, map and array, shuffles keys, and adds
what the fast path must leave to msgspec (headers, unknown keys, signed integer encodings, a
"type" that is not first); hypothesis also mutates valid frames byte by byte.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shm import control
from shm._client import scan_produce
from shm.frames import encode_record_body
from shm.partitioner import partition_for_key
from shm.producer import Producer
from unit.shm.test_producer import WORKERS, StandIn, _quick, sock_path  # noqa: F401 - sock_path: the fixture

MAX = control.MAX_PRODUCE_RECORDS
decode = msgspec.msgpack.Decoder(control.ClientMessage).decode

# --- a msgpack encoder that picks its widths ---------------------------------------------------


def _uint(v: int, rnd: random.Random) -> bytes:
    forms = [(0xCC, ">B", 0xFF), (0xCD, ">H", 0xFFFF), (0xCE, ">I", 0xFFFFFFFF), (0xCF, ">Q", 2**64 - 1)]
    choices = [b"" if v >= 0x80 else bytes([v])] + [bytes([t]) + struct.pack(f, v) for t, f, top in forms if v <= top]
    return rnd.choice([c for c in choices if c])


def _sint(v: int, rnd: random.Random) -> bytes:
    """A signed encoding (int8..int64) of v: msgspec takes it, the fast path leaves it."""
    forms = [(0xD0, ">b", 127), (0xD1, ">h", 2**15 - 1), (0xD2, ">i", 2**31 - 1), (0xD3, ">q", 2**63 - 1)]
    return rnd.choice([bytes([t]) + struct.pack(f, v) for t, f, top in forms if v <= top])


def _head(n: int, small: int, fix: int, wide: list[tuple[int, str, int]], rnd: random.Random) -> bytes:
    choices = [bytes([fix | n])] if n < small else []
    choices += [bytes([t]) + struct.pack(f, n) for t, f, top in wide if n <= top]
    return rnd.choice(choices)


def _str(s: str, rnd: random.Random) -> bytes:
    b = s.encode()
    return _head(len(b), 32, 0xA0, [(0xD9, ">B", 0xFF), (0xDA, ">H", 0xFFFF), (0xDB, ">I", 2**32 - 1)], rnd) + b


def _bin(b: bytes, rnd: random.Random) -> bytes:
    return _head(len(b), 0, 0, [(0xC4, ">B", 0xFF), (0xC5, ">H", 0xFFFF), (0xC6, ">I", 2**32 - 1)], rnd) + b


def _map(items: list[tuple[bytes, bytes]], rnd: random.Random) -> bytes:
    head = _head(len(items), 16, 0x80, [(0xDE, ">H", 0xFFFF), (0xDF, ">I", 2**32 - 1)], rnd)
    return head + b"".join(k + v for k, v in items)


def _array(items: list[bytes], rnd: random.Random) -> bytes:
    return _head(len(items), 16, 0x90, [(0xDC, ">H", 0xFFFF), (0xDD, ">I", 2**32 - 1)], rnd) + b"".join(items)


NIL = b"\xc0"


def _record(rnd: random.Random, plain: bool) -> tuple[bytes, bool]:
    """One record's msgpack and whether it is in the plain shape."""
    items: list[tuple[bytes, bytes]] = []
    is_plain = True
    for name in ("key", "value", "partition", "timestamp", "headers"):
        if rnd.random() < 0.3:
            continue
        if name in ("key", "value"):
            v = NIL if rnd.random() < 0.2 else _bin(rnd.randbytes(rnd.choice([0, 1, 16, 100, 300])), rnd)
        elif name == "partition":
            v = NIL if rnd.random() < 0.3 else _uint(rnd.randrange(4), rnd)
        elif name == "timestamp":
            v = NIL if rnd.random() < 0.3 else _uint(rnd.choice([0, 5, 1_700_000_000_000, 2**63 - 1]), rnd)
        else:
            v = NIL
            if not plain and rnd.random() < 0.5:
                v = _array([_array([_str("h", rnd), _bin(b"x", rnd)], rnd)], rnd)
                is_plain = False
        items.append((_str(name, rnd), v))
    if not plain and rnd.random() < 0.3:
        odd = rnd.choice(["unknown", "partition-signed", "value-str"])
        is_plain = False
        if odd == "unknown":
            items.append((_str("extra", rnd), _uint(1, rnd)))
        elif odd == "partition-signed":
            items = [(k, v) for k, v in items if not k.endswith(b"partition")]
            items.append((_str("partition", rnd), _sint(rnd.randrange(4), rnd)))
        else:
            items = [(k, v) for k, v in items if not k.endswith(b"value")]
            items.append((_str("value", rnd), _str("text", rnd)))
    rnd.shuffle(items)
    return _map(items, rnd), is_plain


def frame(rnd: random.Random, *, plain: bool, records: int | None = None) -> tuple[bytes, bool]:
    """A Produce body (no length prefix) and whether it is in the plain shape."""
    n = rnd.choice([0, 1, 2, 15, 16, 40]) if records is None else records
    recs = [_record(rnd, plain) for _ in range(n)]
    is_plain = all(p for _, p in recs)
    items = [(_str("topic", rnd), _str(rnd.choice(["t", "u", "t\u00f6pic", "x" * 40]), rnd)),
             (_str("records", rnd), _array([r for r, _ in recs], rnd))]
    if rnd.random() < 0.6:
        items.append((_str("ack", rnd), rnd.choice([b"\xc2", b"\xc3"])))
    if rnd.random() < 0.6:
        items.append((_str("seq", rnd), _uint(rnd.choice([0, 7, 2**40, 2**64 - 1]), rnd)))
    rnd.shuffle(items)
    tag = (_str("type", rnd), _str("Produce", rnd))
    if not plain and rnd.random() < 0.2:
        items.insert(rnd.randrange(1, len(items) + 1), tag)  # not first: msgspec's to judge
        is_plain = False
    else:
        items.insert(0, tag)
    return _map(items, rnd), is_plain


def _agrees(body: bytes) -> Any:
    """scan_produce's verdict on ``body``, checked against msgspec's; the scan's tuple or None."""
    got = scan_produce(body, MAX)
    if got is None:
        return None
    msg = decode(body)  # accepted: msgspec must accept it too, and read the same
    assert isinstance(msg, control.Produce)
    topic, ack, seq, count, at = got
    assert (topic, ack, seq, count) == (msg.topic, msg.ack, msg.seq, len(msg.records))
    assert 0 < at <= len(body)
    assert all(r.headers is None for r in msg.records)
    return got


# --- scan_produce --------------------------------------------------------------------------------


@settings(max_examples=400)
@given(st.integers(0, 2**32 - 1), st.booleans())
def test_scan_accepts_every_plain_frame_and_only_what_msgspec_reads_the_same(seed: int, plain: bool) -> None:
    rnd = random.Random(seed)
    body, is_plain = frame(rnd, plain=plain)
    got = _agrees(body)
    if is_plain:
        assert got is not None, f"seed {seed}: a plain frame was left to msgspec"
    else:
        msgspec_ok = True
        try:
            decode(body)
        except msgspec.DecodeError:
            msgspec_ok = False
        assert got is None or msgspec_ok


@settings(max_examples=600)
@given(st.integers(0, 2**32 - 1), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255), st.sampled_from(
    ["flip", "insert", "delete", "truncate"])), min_size=1, max_size=4))
def test_scan_of_mutated_frames_never_reads_out_of_bounds_and_agrees_with_msgspec(
        seed: int, edits: list[tuple[int, int, str]]) -> None:
    body = bytearray(frame(random.Random(seed), plain=True, records=3)[0])
    for where, byte, how in edits:
        i = where % (len(body) + 1)
        if how == "flip" and i < len(body):
            body[i] ^= byte or 1
        elif how == "insert":
            body[i:i] = bytes([byte])
        elif how == "delete" and i < len(body):
            del body[i]
        elif how == "truncate":
            del body[i:]
    _agrees(bytes(body))


def test_scan_leaves_the_rest_to_msgspec() -> None:
    produce = control.encode(control.Produce(topic="t", records=[control.Rec(value=b"v")]))[4:]
    assert scan_produce(produce, MAX) == ("t", False, 0, 1, produce.index(b"\x91") + 1)
    assert scan_produce(produce, 0) is None  # more records than allowed: msgspec refuses it
    assert scan_produce(produce + b"\xc0", MAX) is None  # trailing bytes
    assert scan_produce(control.encode(control.Flush(timeout_ms=1))[4:], MAX) is None
    bad_topic = produce.replace(b"\xa1t", b"\xa1\xff")  # not UTF-8
    assert scan_produce(bad_topic, MAX) is None
    with pytest.raises(msgspec.DecodeError):
        decode(bad_topic)
    assert scan_produce(b"", MAX) is None and scan_produce(b"\x81", MAX) is None


# --- send_packed against the rings -------------------------------------------------------------


def _written(standin: StandIn) -> list[tuple[int, int, bytes]]:
    return [(part, ts, body) for w in range(WORKERS) for _tid, part, ts, body in standin.take(w)]


def test_send_packed_writes_each_record_as_send_writes_the_decoded_one(standin: StandIn) -> None:
    rnd = random.Random(20261130)
    print("seed 20261130")
    with _quick(Producer(standin.path)) as p:
        p.lookup("t")
        for _ in range(60):
            body, _ = frame(rnd, plain=True, records=rnd.choice([1, 5, 20]))
            got = scan_produce(body, MAX)
            assert got is not None
            topic, ack, seq, count, at = got
            recs = decode(body).records
            if topic != "t":
                continue
            nxt, end, futs = p.send_packed("t", body, at, 0, count)
            assert nxt == count and at <= end <= len(body) and len(futs) == count
            written = _written(standin)
            assert len(written) == count
            want = sorted(
                (f.partition, r.timestamp if r.timestamp is not None else f.timestamp, encode_record_body(r.key, r.value))
                for r, f in zip(recs, futs))
            assert sorted(written) == want
            for r, f in zip(recs, futs):
                if r.partition is not None:
                    assert f.partition == r.partition
                elif r.key is not None:
                    assert f.partition == partition_for_key(r.key, 4)


def test_send_packed_stops_before_a_record_send_must_raise_and_goes_on_from_there(standin: StandIn) -> None:
    recs = [control.Rec(value=b"a", partition=0), control.Rec(value=b"b" * 5000),  # too large
            control.Rec(value=b"c", partition=9),  # no such partition
            control.Rec(value=b"d", key=b"k", timestamp=7)]
    body = control.encode(control.Produce(topic="t", records=recs))[4:]
    topic, _ack, _seq, count, at = scan_produce(body, MAX)
    with _quick(Producer(standin.path)) as p:
        assert p.send_packed("t", body, at, 0, count) == (0, at, [])  # the topic is not looked up yet
        p.lookup("t")
        nxt, at1, futs = p.send_packed("t", body, at, 0, count)
        assert nxt == 1 and len(futs) == 1 and at < at1 < len(body)
        nxt, at2, futs = p.send_packed("t", body, at1, 1, count)
        assert (nxt, at2, futs) == (1, at1, [])  # stopped at the same record: nothing written
        skip = at1 + len(msgspec.msgpack.encode(recs[1]))
        nxt, at3, futs = p.send_packed("t", body, skip, 2, count)
        assert (nxt, futs) == (2, [])
        tally_frame = msgspec.msgpack.encode(recs[3])
        nxt, at4, futs = p.send_packed("t", body, len(body) - len(tally_frame), 3, count)
        assert (nxt, at4, len(futs)) == (4, len(body), 1) and futs[0].timestamp == 7
        assert sorted(b for *_, b in _written(standin)) == sorted(
            encode_record_body(r.key, r.value) for r in (recs[0], recs[3]))
        with pytest.raises(ValueError):
            p.send_packed("t", body, 1, 0, count)  # not at a record
        with pytest.raises(ValueError):
            p.send_packed("t", body, len(body) + 1, 0, count)


@pytest.fixture
def standin(sock_path: str) -> Iterator[StandIn]:  # noqa: F811 - test_producer's, redefined here
    s = StandIn(sock_path)
    yield s
    s.close()
