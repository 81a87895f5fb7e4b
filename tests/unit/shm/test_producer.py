"""shm.Producer against a stand-in daemon: the real handshake, segment and rings.

The stand-in answers the socket protocol (Hello, SegmentOffer, TopicLookup, Goodbye) from a
thread, attaches the client's segment as the daemon would, and the test plays the workers:
it reads RECORD frames from the request rings and writes COMPLETION and CHUNK_DONE frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from frames_oracle import iter_records, put_completion
from helpers import wait_until

from shm import control
from shm.errors import BufferFullError, MessageTooLargeError, UnknownTopicOrPartitionError  # type: ignore[attr-defined]
from shm.frames import encode_record_body
from shm.layout import FRAME_CHUNK_DONE
from shm.partitioner import owner, partition_for_key
from shm.futures import DeliveryFuture, DeliveryTally
from shm.producer import Producer, ProducerClosedError, RecordMetadata
from shm.segment import Segment, recv_fds

WORKERS = 2
TOPICS = {"t": 4, "u": 1}
TOPICS_IDS = {name: i for i, name in enumerate(TOPICS)}


class StandIn:
    """A daemon's socket side, one client at a time; the test drives the rings."""

    def __init__(self, path: str, *, request_ring_bytes: int = 1 << 16, on_full: str = "block",
                 max_block_ms: int = 1000, max_request_size: int = 4096) -> None:
        self.path = path
        self.request_ring_bytes = request_ring_bytes
        self.info = dict(on_full=on_full, max_block_ms=max_block_ms, max_request_size=max_request_size)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.segment: Segment | None = None
        self.conn: socket.socket | None = None
        self.attached = threading.Event()
        self.cursor = [0] * WORKERS
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        self.conn = conn
        reader = control.FrameReader(control.ClientMessage)
        try:
            while True:
                data, fds = recv_fds(conn, 1 << 16, 64)
                if not data:
                    return
                for msg in reader.feed(data):
                    if not self._handle(conn, msg, fds):
                        return
                    fds = []
        except OSError:
            return

    def _handle(self, conn: socket.socket, msg: Any, fds: list[int]) -> bool:
        match msg:
            case control.Hello():
                reply: Any = control.Welcome(version=1, workers=WORKERS, request_ring_bytes=self.request_ring_bytes,
                                             completion_ring_bytes=4096, client_id=5)
            case control.SegmentOffer():
                self.segment = Segment.attach(fds[0], fds[1:])
                reply = control.SegmentAccepted(client_id=5)
                self.attached.set()
            case control.TopicLookup(topic=name) if name in TOPICS:
                reply = control.TopicInfo(topic=name, topic_id=list(TOPICS).index(name), partitions=TOPICS[name],
                                          profile="default", batch_size=16384, linger_ms=5, **self.info)
            case control.TopicLookup(topic=name):
                reply = control.ErrorReply(code=3, name="UNKNOWN_TOPIC_OR_PARTITION", message=name, fatal=False)
            case control.Goodbye():
                return False
            case _:
                raise AssertionError(f"unexpected {msg!r}")
        conn.sendall(control.encode(reply))
        return True

    # --- the workers' side ----------------------------------------------------------------

    def take(self, w: int) -> list[tuple[int, int, int, bytes]]:
        """Every RECORD published in request ring ``w`` since the last take."""
        ring = self.segment.request_ring(w)
        out = []
        while True:
            start, end = ring.region()
            if start == end:
                break
            for _fend, tid, part, ts, body in iter_records(ring, start, end, list(TOPICS.values())):
                out.append((tid, part, ts, bytes(body)))
            ring.advance(end - start)
        self.cursor[w] = ring.cursor
        return out

    def complete(self, w: int, tid: int, part: int, base: int, count: int, err: int = 0, ts: int = -1) -> None:
        ring = self.segment.completion_ring(w)
        assert put_completion(ring, tid, err, part, base, ts, count)
        ring.publish_head()

    def chunk_done(self, w: int) -> int:
        ring = self.segment.completion_ring(w)
        pos = ring.claim(FRAME_CHUNK_DONE, 8)
        assert pos >= 0
        ring.view[pos : pos + 8] = self.cursor[w].to_bytes(8, "little")
        ring.publish_head()
        return self.cursor[w]

    def hang_up(self) -> None:
        if self.conn is not None:
            self.conn.shutdown(socket.SHUT_RDWR)
            self.conn.close()

    def close(self) -> None:
        self.listener.close()
        if self.conn is not None:
            self.conn.close()
        self.thread.join(5)
        if self.segment is not None:
            self.segment.close()


@pytest.fixture
def sock_path() -> Iterator[str]:
    import tempfile

    d = tempfile.mkdtemp(prefix="slp-", dir="/tmp")
    yield os.path.join(d, "s.sock")
    for f in Path(d).iterdir():
        f.unlink()
    os.rmdir(d)


@pytest.fixture
def standin(sock_path: str) -> Iterator[StandIn]:
    s = StandIn(sock_path)
    yield s
    s.close()


def test_send_routes_to_the_owner_and_completions_resolve_in_order(standin: StandIn) -> None:
    with Producer(standin.path, client_name="unit") as p:
        assert standin.attached.is_set() and p.workers == WORKERS
        keys = [b"key-%d" % i for i in range(60)]
        futs = [p.send("t", b"value-%d" % i, k, headers=[("i", b"%d" % i)], timestamp=1000 + i) for i, k in enumerate(keys)]
        assert p.pending == 60
        by_part: dict[int, list[int]] = {}
        for w in range(WORKERS):
            for tid, part, ts, body in standin.take(w):
                assert tid == 0 and owner("t", part, WORKERS) == w
                i = ts - 1000
                assert part == partition_for_key(keys[i], 4)
                assert body == encode_record_body(keys[i], b"value-%d" % i, [("i", b"%d" % i)])
                by_part.setdefault(part, []).append(i)
        assert sorted(i for v in by_part.values() for i in v) == list(range(60))
        # One completion per partition resolves its records in send order.
        for part, idx in by_part.items():
            standin.complete(owner("t", part, WORKERS), 0, part, 100 * part, len(idx), ts=-1)
        for part, idx in by_part.items():
            for n, i in enumerate(idx):
                assert futs[i].result(timeout=5) == RecordMetadata("t", part, 100 * part + n, 1000 + i)
        assert p.flush(5) == 0
        # CHUNK_DONE frees the request ring up to its position, not before.
        req = [standin.segment.request_ring(w) for w in range(WORKERS)]
        assert all(r.tail == 0 for r in req)
        ends = [standin.chunk_done(w) for w in range(WORKERS)]
        wait_until(lambda: [r.tail for r in req] == ends)


def test_errors_the_client_knows_never_enter_the_ring(standin: StandIn) -> None:
    with Producer(standin.path) as p:
        with pytest.raises(UnknownTopicOrPartitionError):
            p.send("missing", b"x")
        with pytest.raises(MessageTooLargeError):
            p.send("t", b"x" * 4096)
        with pytest.raises(UnknownTopicOrPartitionError):
            p.send("t", b"x", partition=4)
        with pytest.raises(TypeError):
            p.send("t", 12345)  # no serializer: bytes or str only
        assert p.pending == 0
        assert [standin.segment.request_ring(w).head for w in range(WORKERS)] == [0, 0]


def test_error_completion_and_callbacks(standin: StandIn) -> None:
    seen: list[Any] = []
    with Producer(standin.path) as p:
        futs = [p.send("u", b"a", on_delivery=seen.append), p.send("u", b"b", on_delivery=seen.append)]
        w = owner("u", 0, WORKERS)
        assert len(standin.take(w)) == 2
        standin.complete(w, 1, 0, -1, 2, err=10)
        for f in futs:
            with pytest.raises(MessageTooLargeError):
                f.result(timeout=5)
        assert seen == futs
        assert p.flush(1) == 0


def test_daemon_hang_up_fails_pending_and_later_sends(standin: StandIn) -> None:
    p = Producer(standin.path, reconnect_timeout_s=0)
    try:
        done = p.send("u", b"done")
        lost = [p.send("u", b"lost-%d" % i) for i in range(5)]
        w = owner("u", 0, WORKERS)
        standin.take(w)
        standin.complete(w, 1, 0, 41, 1)
        assert done.result(timeout=5).offset == 41
        t0 = time.monotonic()
        standin.hang_up()
        for f in lost:
            with pytest.raises(ProducerClosedError):
                f.result(timeout=5)
        assert time.monotonic() - t0 < 2
        assert p.flush(1) == 0 and p.pending == 0
        with pytest.raises(ProducerClosedError):
            p.send("u", b"after")
    finally:
        p.close(timeout=1)


def test_ring_full_drop_policy_counts_and_fails(sock_path: str) -> None:
    s = StandIn(sock_path, request_ring_bytes=1024, on_full="drop", max_request_size=400)
    try:
        with Producer(sock_path) as p:
            futs = [p.send("u", b"x" * 200) for _ in range(20)]
            dropped = [f for f in futs if f.done()]
            assert dropped and p.drops == {"u": len(dropped)}
            # The daemon's mapping of the segment sees the same count, by topic id.
            assert s.segment.drop_counts[TOPICS_IDS["u"]] == len(dropped)
            for f in dropped:
                assert isinstance(f.exception(0), BufferFullError)
            kept = len(futs) - len(dropped)
            w = owner("u", 0, WORKERS)
            assert len(s.take(w)) == kept
            s.complete(w, 1, 0, 0, kept)
            assert p.flush(5) == 0
            s.chunk_done(w)
        # After close: the producer still answers, and the counts stay in the segment, which
        # the daemon keeps mapped after the client is gone.
        assert p.drops == {"u": len(dropped)}
        assert s.segment.drop_counts[TOPICS_IDS["u"]] == len(dropped)
    finally:
        s.close()


def test_ring_full_block_policy_raises_after_max_block(sock_path: str) -> None:
    s = StandIn(sock_path, request_ring_bytes=1024, on_full="block", max_block_ms=100, max_request_size=400)
    try:
        with Producer(sock_path) as p:
            sent = 0
            t0 = time.monotonic()
            with pytest.raises(BufferFullError):
                for _ in range(20):
                    p.send("u", b"x" * 200)
                    sent += 1
            assert 0.09 < time.monotonic() - t0 < 2
            # Room comes back when the worker completes and frees the ring: sending goes on.
            w = owner("u", 0, WORKERS)
            assert len(s.take(w)) == sent
            s.complete(w, 1, 0, 0, sent)
            s.chunk_done(w)
            wait_until(lambda: s.segment.request_ring(w).tail == s.cursor[w])
            f = p.send("u", b"again")
            assert len(s.take(w)) == 1
            s.complete(w, 1, 0, sent, 1)
            assert f.result(timeout=5).offset == sent
    finally:
        s.close()


def test_serializers_and_await(standin: StandIn) -> None:
    with Producer(standin.path, value_serializer="json", key_serializer="msgpack") as p:
        doc = {"a": [1, 2, None], "b": "\u00e9"}

        async def main() -> RecordMetadata:
            fut = p.send("u", doc, key=7)
            w = owner("u", 0, WORKERS)
            (tid, part, _ts, body), = standin.take(w)
            assert body == encode_record_body(msgspec.msgpack.encode(7), json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode(), None)
            standin.complete(w, tid, part, 9, 1, ts=123)
            return await fut

        meta = asyncio.run(asyncio.wait_for(main(), 5))
        assert meta == RecordMetadata("u", 0, 9, 123)  # log-append time wins over CreateTime
    with pytest.raises(ValueError):
        Producer(standin.path, value_serializer="yaml")


def test_never_block_raises_at_once_and_cached_needs_no_lookup(sock_path: str) -> None:
    s = StandIn(sock_path, request_ring_bytes=1024, on_full="block", max_block_ms=5000, max_request_size=400)
    try:
        with Producer(sock_path, never_block=True) as p:
            assert p.cached("u") is None
            info = p.lookup("u")
            assert p.cached("u") is info and info.on_full == "block"
            t0 = time.monotonic()
            with pytest.raises(BufferFullError):
                for _ in range(20):
                    p.send("u", b"x" * 200)
            assert time.monotonic() - t0 < 1.0, "never_block waited for max_block_ms"
            w = owner("u", 0, WORKERS)
            sent = len(s.take(w))
            s.complete(w, 1, 0, 0, sent)
            assert p.flush(5) == 0
            s.chunk_done(w)
    finally:
        s.close()


def test_a_raising_callback_is_logged_and_the_others_still_run(standin: StandIn, caplog: Any) -> None:
    seen: list[Any] = []

    def broken(f: Any) -> None:
        raise RuntimeError("callback bug")

    with Producer(standin.path) as p:
        f = p.send("u", b"a", on_delivery=broken)
        f.add_done_callback(seen.append)
        w = owner("u", 0, WORKERS)
        standin.take(w)
        with caplog.at_level("ERROR", logger="sluice.client"):
            standin.complete(w, 1, 0, 7, 1)
            assert f.result(timeout=5).offset == 7
            wait_until(lambda: seen == [f])
        assert any("callback bug" in (r.exc_text or "") and r.name == "sluice.client" for r in caplog.records)


# --- the compiled send() (shm._client.SendCore) ---------------------------------------------

@contextlib.contextmanager
def _quick(p: Producer) -> Iterator[Producer]:
    """Close without waiting for outcomes (these tests play no completions)."""
    try:
        yield p
    finally:
        p.close(timeout=0)


_MIXED: list[tuple[Any, Any, dict[str, Any]]] = [
    (b"v", None, {"partition": 1}),
    (b"", None, {"partition": 0}),  # an empty value is not a tombstone
    (None, b"k", {}),  # a tombstone with a key
    (b"x" * 300, b"key-300", {"headers": [("h", b"1"), ("\u00e9t\u00e9", None), (b"raw", b"")]}),
    (b"y" * 3000, None, {"partition": 3, "headers": []}),
    (b"z", b"", {"timestamp": 5}),
    (b"w", b"k2", {"partition": 2, "headers": (("a", b"b"),)}),
]


def _send_mixed(p: Producer) -> list[Any]:
    return [p.send("t", v, k, timestamp=kw.pop("timestamp", 1234), **kw) for v, k, kw in (
        (v, k, dict(kw)) for v, k, kw in _MIXED)]


def test_compiled_send_writes_what_the_oracle_encodes(standin: StandIn) -> None:
    with _quick(Producer(standin.path)) as p:
        futs = _send_mixed(p)
        frames = [standin.take(w) for w in range(WORKERS)]
        assert sum(map(len, frames)) == len(_MIXED)
        # Each record in its partition's owner's ring, with the partition, timestamp and body
        # the pure-Python encoder (the oracle) gives.
        got = sorted((w, part, ts, body) for w in range(WORKERS) for _, part, ts, body in frames[w])
        want = []
        for f, (v, k, kw) in zip(futs, _MIXED):
            part = kw.get("partition", partition_for_key(k, 4) if k is not None else f.partition)
            assert (f.topic, f.partition, f.timestamp) == ("t", part, kw.get("timestamp", 1234))
            want.append((owner("t", part, WORKERS), part, f.timestamp, encode_record_body(k, v, kw.get("headers"))))
        assert got == sorted(want)
        assert p.pending == len(_MIXED)


def test_compiled_send_converts_checks_and_refuses(standin: StandIn) -> None:
    with _quick(Producer(standin.path)) as p:
        p.send("t", b"first")  # the topic is now known
        standin.take(0), standin.take(1)
        with pytest.raises(UnknownTopicOrPartitionError, match="partition -1 of 't'"):
            p.send("t", b"x", partition=-1)
        with pytest.raises(UnknownTopicOrPartitionError, match="partition 4 of 't'"):
            p.send("t", b"x", partition=4)
        with pytest.raises(MessageTooLargeError, match="max_request_size"):
            p.send("t", b"x" * 5000)
        with pytest.raises(TypeError, match="nonsense"):
            p.send("t", b"x", nonsense=1)
        with pytest.raises(TypeError, match="key"):
            p.send("t", b"x", b"k", key=b"k")
        with pytest.raises(TypeError, match="cannot send dict as the value"):
            p.send("t", {"a": 1})
        with pytest.raises(TypeError, match="partition must be an int"):
            p.send("t", b"x", partition="1")
        with pytest.raises(TypeError, match="timestamp must be an int"):
            p.send("t", b"x", timestamp=1.5)
        with pytest.raises(TypeError, match="header"):
            p.send("t", b"x", headers=[("a", b"b", b"c")])
        with pytest.raises(TypeError, match="topic must be str"):
            p.send(b"t", b"x")
        assert standin.take(0) + standin.take(1) == []  # nothing refused entered a ring
        assert p.pending == 1
        # Buffers and str are copied or encoded; header pairs of any sequence type, many of them.
        hdrs = [[f"h{i}", bytearray(b"%d" % i)] for i in range(40)]
        f = p.send("t", bytearray(b"ba"), memoryview(b"mk"), headers=hdrs)
        g = p.send("t", "\u00e9", "k", partition=True)
        frames = standin.take(0) + standin.take(1)
        want_hdrs = [(f"h{i}", b"%d" % i) for i in range(40)]
        assert sorted(body for *_, body in frames) == sorted(
            [encode_record_body(b"mk", b"ba", want_hdrs), encode_record_body(b"k", "\u00e9".encode())])
        assert f.partition == partition_for_key(b"mk", 4) and g.partition == 1
    with pytest.raises(ProducerClosedError):
        p.send("t", b"after close")
    with pytest.raises(ProducerClosedError):
        p.produce("t", b"after close")


def test_compiled_send_from_many_threads_loses_and_reorders_nothing(standin: StandIn) -> None:
    # The compiled send() runs under the GIL from claim to publish; send_many (Python) holds
    # the send lock between its claim and its publish, and the compiled path defers to it.
    threads, per = 4, 500
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as CPython allows
    try:
        _many_threads(standin, threads, per)
    finally:
        sys.setswitchinterval(old_interval)


def _many_threads(standin: StandIn, threads: int, per: int) -> None:
    with _quick(Producer(standin.path)) as p:
        p.send("t", b"warm-up", partition=0)
        standin.take(0), standin.take(1)

        def one(n: int) -> None:
            for i in range(per):
                p.send("t", b"%d:%d" % (n, i), partition=i % 4)

        def many() -> None:
            for i in range(per // 50):
                p.send_many("t", [b"m:%d" % (50 * i + j) for j in range(50)], partition=1)

        ts = [threading.Thread(target=one, args=(n,)) for n in range(threads)] + [threading.Thread(target=many)]
        got: list[tuple[int, int, int, bytes]] = []
        for t in ts:
            t.start()
        deadline = time.monotonic() + 60
        while any(t.is_alive() for t in ts) and time.monotonic() < deadline:
            got += standin.take(0) + standin.take(1)
            standin.chunk_done(0), standin.chunk_done(1)  # free the rings as a worker would
            time.sleep(0.001)
        for t in ts:
            t.join(5)
        got += standin.take(0) + standin.take(1)
    # body: null key (1 byte), value length (1), value, header count (1)
    values = [(part, body[2:-1]) for _, part, _, body in got]
    assert len(values) == threads * per + per
    for n in range(threads):
        for part in range(4):
            mine = [v for q, v in values if q == part and v.startswith(b"%d:" % n)]
            # every record once, in send order within its partition
            assert mine == [b"%d:%d" % (n, i) for i in range(part, per, 4)]
    assert [v for _, v in values if v.startswith(b"m:")] == [b"m:%d" % i for i in range(per)]


def test_serializers_run_in_the_compiled_send_and_their_output_is_checked(standin: StandIn) -> None:
    with _quick(Producer(standin.path, value_serializer="json", key_serializer=lambda k: k.upper().encode())) as p:
        p.send("t", {"a": 1}, "k", partition=0)
        p.produce("t", [1, 2], None, partition=1)
        p.send("t", None, "tomb", partition=0)  # None is a tombstone, never serialized
        bodies = [body for *_, body in standin.take(0) + standin.take(1)]
        assert sorted(bodies) == sorted([encode_record_body(b"K", b'{"a":1}'), encode_record_body(None, b"[1,2]"),
                                         encode_record_body(b"TOMB", None)])


def test_a_serializer_that_returns_no_bytes_or_raises_sends_nothing(standin: StandIn) -> None:
    with _quick(Producer(standin.path, value_serializer=lambda v: 1 // v)) as p:  # returns int, or raises
        with pytest.raises(TypeError, match="value serializer returned int, not bytes"):
            p.send("t", 1)
        with pytest.raises(ZeroDivisionError):
            p.send("t", 0)
        assert standin.take(0) + standin.take(1) == []


def test_produce_is_fire_and_forget_and_counts_every_outcome(standin: StandIn, caplog: Any) -> None:
    with _quick(Producer(standin.path)) as p:
        for i in range(10):
            assert p.produce("t", b"v%d" % i, partition=i % 2, timestamp=7) is None
        assert p.pending == 10
        frames = standin.take(0) + standin.take(1)
        assert sorted(body for *_, body in frames) == sorted(encode_record_body(None, b"v%d" % i) for i in range(10))
        # Partition 0's five are delivered, partition 1's five refused (MESSAGE_TOO_LARGE).
        standin.complete(owner("t", 0, WORKERS), 0, 0, 100, 5)
        with caplog.at_level("WARNING", logger="sluice.client"):
            standin.complete(owner("t", 1, WORKERS), 0, 1, -1, 5, err=10)
            assert p.flush(5) == 0
        assert p.delivered == {"t": 5}
        assert p.delivery_errors == {"t": {"MessageTooLargeError": 5}}
        assert sum("MessageTooLargeError" in r.getMessage() or "too large" in r.getMessage().lower()
                   for r in caplog.records) == 1  # the first failure of a kind is logged once


def test_produce_with_a_serializer_counts_too(standin: StandIn) -> None:
    with _quick(Producer(standin.path, value_serializer="json")) as p:
        p.produce("t", {"a": 1}, partition=0)
        assert [json.loads(body[2:-1]) for *_, body in standin.take(0) + standin.take(1)] == [{"a": 1}]
        standin.complete(owner("t", 0, WORKERS), 0, 0, 3, 1)
        assert p.flush(5) == 0
        wait_until(lambda: p.delivered == {"t": 1})


def test_produce_dropped_on_a_full_ring_is_counted(sock_path: str) -> None:
    s = StandIn(sock_path, request_ring_bytes=4096, on_full="drop")
    try:
        with _quick(Producer(s.path)) as p:
            for _ in range(200):
                p.produce("t", b"x" * 100, partition=0)
            dropped = p.drops.get("t", 0)
            assert dropped > 0
            assert p.delivery_errors == {"t": {"BufferFullError": dropped}}
            assert p.pending == 200 - dropped
    finally:
        s.close()


def test_send_records_takes_the_records_the_compiled_path_can_and_stops_before_the_rest(standin: StandIn) -> None:
    recs = [
        control.Rec(value=b"a", partition=0, timestamp=11),
        control.Rec(value=b"b", key=b"k", headers=[("h", b"v")], timestamp=12),
        control.Rec(value=b"x" * 5000, partition=1),  # too large: send() must raise it
        control.Rec(value=None, key=b"t", timestamp=13),  # a tombstone
    ]
    with _quick(Producer(standin.path)) as p:
        p.lookup("t")
        nxt, futs = p.send_records("t", recs, 0)
        assert nxt == 2 and [f.partition for f in futs] == [0, partition_for_key(b"k", 4)]
        with pytest.raises(MessageTooLargeError):
            p.send("t", recs[2].value, partition=recs[2].partition)
        nxt, futs2 = p.send_records("t", recs, 3)
        assert nxt == 4 and len(futs2) == 1 and futs2[0].timestamp == 13
        frames = standin.take(0) + standin.take(1)
        assert sorted(body for *_, body in frames) == sorted(
            encode_record_body(r.key, r.value, r.headers) for r in (recs[0], recs[1], recs[3])
        )
        assert p.pending == 3


def test_send_records_with_a_tally_makes_no_futures_and_counts_every_outcome(standin: StandIn) -> None:
    recs = [control.Rec(value=b"v%d" % i, partition=i % 2) for i in range(6)]
    recs.insert(3, control.Rec(value=b"x" * 5000, partition=0))  # too large: stops the call
    tally = DeliveryTally("t")
    with _quick(Producer(standin.path)) as p:
        p.lookup("t")
        assert p.send_records("t", recs, 0, tally) == (3, [])
        assert p.send_records("t", recs, 4, tally) == (7, [])
        assert p.pending == 6 and tally.delivered == tally.failed == 0
        assert sorted(body for *_, body in standin.take(0) + standin.take(1)) == sorted(
            encode_record_body(None, r.value) for r in recs if len(r.value) < 100)
        standin.complete(owner("t", 0, WORKERS), 0, 0, 100, 3)
        standin.complete(owner("t", 1, WORKERS), 0, 1, -1, 3, err=10)
        assert p.flush(5) == 0
        assert (tally.delivered, tally.failed, tally.errors) == (3, 3, {"MessageTooLargeError": 3})
        assert p.delivered == {}  # the topic's own produce() tally saw none of them


def test_ack_results_encode_as_msgspec_encodes_record_results() -> None:
    from shm._client import ack_results, tails

    def settled(partition: int, outcome: Any, ts: int = 1700000000000) -> DeliveryFuture:
        f = DeliveryFuture("t", partition, ts)
        f.resolve(outcome)
        return f

    err = MessageTooLargeError("big")
    slots: list[Any] = [settled(0, 0), settled(1, 127), settled(2, 128), settled(3, 70000), settled(4, 2**40),
                        settled(5, -1, -1), settled(6, err), (7, 3, "UNKNOWN_TOPIC_OR_PARTITION"),
                        settled(2**31 - 1, 5, 2**63 - 1)]
    slots += [settled(i % 3, i) for i in range(40)]  # an array of 16 or more

    def describe(exc: BaseException | None) -> tuple[int, str]:
        return (1010, "OUTCOME_UNKNOWN") if exc is None else (exc.code, exc.name)  # type: ignore[attr-defined]

    got, failed = ack_results(slots, describe)
    assert failed == 2
    want = []
    for s in slots:
        if isinstance(s, tuple):
            want.append(control.RecordResult(partition=s[0], offset=-1, timestamp=-1, error_code=s[1], error_name=s[2]))
        elif s.exception(0) is not None:
            want.append(control.RecordResult(partition=s.partition, offset=-1, timestamp=-1, error_code=10,
                                             error_name="MESSAGE_TOO_LARGE"))
        else:
            meta = s.result(0)
            want.append(control.RecordResult(partition=meta.partition, offset=meta.offset, timestamp=meta.timestamp,
                                             error_code=0, error_name="NONE"))
    assert got == msgspec.msgpack.encode(want)
    ack = control.encode(control.ProduceAck(seq=9, results=msgspec.Raw(got)))  # type: ignore[arg-type]
    assert ack == control.encode(control.ProduceAck(seq=9, results=want))
    assert tails(slots[9:]) == [slots[-1], slots[-3], slots[-2]]  # the last of partitions 0, 1 and 2
    pending, failed = ack_results([DeliveryFuture("t", 3, 1)], describe)  # no outcome yet
    assert failed == 1 and msgspec.msgpack.decode(pending) == [
        {"partition": 3, "offset": -1, "timestamp": -1, "error_code": 1010, "error_name": "OUTCOME_UNKNOWN"}]
    with pytest.raises(TypeError):
        ack_results([object()], describe)


def test_send_records_reads_any_record_type(standin: StandIn) -> None:
    class Plain:  # attributes in a __dict__, one of them a property: read with getattr
        def __init__(self, value: bytes) -> None:
            self.value, self.key, self.partition, self.headers = value, None, 0, None

        @property
        def timestamp(self) -> int:
            return 77

    class Sub(control.Rec):  # slots inherited from Rec
        pass

    with _quick(Producer(standin.path)) as p:
        p.lookup("t")
        nxt, futs = p.send_records("t", [control.Rec(value=b"a", partition=0), Plain(b"b"), Sub(value=b"c", partition=0)])
        assert nxt == 3 and [f.timestamp for f in futs][1] == 77
        nxt, _ = p.send_records("t", [control.Rec(value=b"d", partition=0)])
        assert nxt == 1
        bodies = [body for *_, body in standin.take(owner("t", 0, WORKERS))]
        assert bodies == [encode_record_body(None, v) for v in (b"a", b"b", b"c", b"d")]


def test_a_watched_tally_calls_back_once_every_record_it_was_expecting_has_its_outcome() -> None:
    seen: list[DeliveryTally] = []
    early = DeliveryTally("t", on_done=seen.append)
    early.settle(2, None)  # outcomes before the count is known: not done yet
    assert seen == []
    early.expect(3)
    early.settle(1, MessageTooLargeError("big"))
    assert seen == [early] and (early.delivered, early.failed) == (2, 1)
    early.settle(1, None)  # more than expected never calls back twice
    late = DeliveryTally("t", on_done=seen.append)
    late.settle(4, None)
    late.expect(4)  # every outcome came before expect(): at once
    assert seen == [early, late]
    assert DeliveryTally("t", on_done=seen.append).expect(0) is None and len(seen) == 3


def test_headers_of_odd_shapes_are_copied_never_changed(standin: StandIn) -> None:
    hdrs = (("a", bytearray(b"1")), ["b", b"2"])  # a tuple the caller keeps
    with _quick(Producer(standin.path)) as p:
        p.send("t", b"v", partition=0, headers=hdrs)
        assert hdrs == (("a", bytearray(b"1")), ["b", b"2"]) and type(hdrs[1]) is list
        (body,) = [body for *_, body in standin.take(owner("t", 0, WORKERS))]
        assert body == encode_record_body(None, b"v", [("a", b"1"), ("b", b"2")])
