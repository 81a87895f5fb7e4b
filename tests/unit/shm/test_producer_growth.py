"""shm.Producer and TopicChanged: a connected producer follows a topic's partition growth.

A stand-in daemon answers the socket protocol from a thread and pushes TopicChanged when the
test says so; the test plays the workers (reads RECORD frames, writes COMPLETION frames). What
is checked: the Hello asks for topic updates; after the push keyed records go to murmur2 modulo
the NEW count, each to its partition's owner; completions of the new partitions settle their
futures; a push that arrives while a request waits for its reply is not taken for the reply,
and one that overtakes a stale TopicInfo wins; counts never shrink.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from frames_oracle import iter_records, put_completion
from helpers import wait_until

from shm import control
from shm.partitioner import owner, partition_for_key
from shm.producer import Producer, RecordMetadata
from shm.segment import Segment, recv_fds

WORKERS = 3
BEFORE, AFTER = 3, 6
TOPIC, TID = "grows", 0
LATE, LATE_TID = "late", 1  # looked up while it grows: the push overtakes the TopicInfo


class GrowingDaemon:
    """A daemon's socket side for one client; ``push`` sends a TopicChanged at any moment."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.hello: control.Hello | None = None
        self.segment: Segment | None = None
        self.conn: socket.socket | None = None
        self.partitions = {TOPIC: BEFORE, LATE: BEFORE}
        self.lookups: list[str] = []
        self.before_late_reply: list[Any] = []  # frames sent ahead of LATE's TopicInfo
        self._send = threading.Lock()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def push(self, msg: Any) -> None:
        assert self.conn is not None
        with self._send:
            self.conn.sendall(control.encode(msg))

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
                    if not self._handle(msg, fds):
                        return
                    fds = []
        except OSError:
            return

    def _handle(self, msg: Any, fds: list[int]) -> bool:
        match msg:
            case control.Hello():
                self.hello = msg
                reply: Any = control.Welcome(version=1, workers=WORKERS, request_ring_bytes=1 << 16,
                                             completion_ring_bytes=4096, client_id=7)
            case control.SegmentOffer():
                self.segment = Segment.attach(fds[0], fds[1:])
                reply = control.SegmentAccepted(client_id=7)
            case control.TopicLookup(topic=name):
                self.lookups.append(name)
                tid = TID if name == TOPIC else LATE_TID
                # The answer as computed before any growth, sent after what the test queued.
                for early in self.before_late_reply if name == LATE else []:
                    self.push(early)
                reply = control.TopicInfo(topic=name, topic_id=tid, partitions=BEFORE, profile="default",
                                          max_request_size=1 << 20, on_full="block", max_block_ms=1000,
                                          batch_size=16384, linger_ms=5)
            case control.Goodbye():
                return False
            case _:
                raise AssertionError(f"unexpected {msg!r}")
        self.push(reply)
        return True

    # --- the workers' side ----------------------------------------------------------------

    def take(self, limits: list[int]) -> list[tuple[int, int, int, int, bytes]]:
        """Every RECORD published since the last take: (worker, topic id, partition, ts, body)."""
        assert self.segment is not None
        out = []
        for w in range(WORKERS):
            ring = self.segment.request_ring(w)
            while True:
                start, end = ring.region()
                if start == end:
                    break
                for _fend, tid, part, ts, body in iter_records(ring, start, end, limits):
                    out.append((w, tid, part, ts, bytes(body)))
                ring.advance(end - start)
        return out

    def complete(self, w: int, tid: int, part: int, base: int, count: int) -> None:
        assert self.segment is not None
        ring = self.segment.completion_ring(w)
        assert put_completion(ring, tid, 0, part, base, -1, count)
        ring.publish_head()

    def close(self) -> None:
        self.listener.close()
        if self.conn is not None:
            self.conn.close()
        self.thread.join(5)
        if self.segment is not None:
            self.segment.close()


@pytest.fixture
def daemon() -> Iterator[GrowingDaemon]:
    d = tempfile.mkdtemp(prefix="slg-", dir="/tmp")
    path = os.path.join(d, "s.sock")
    g = GrowingDaemon(path)
    yield g
    g.close()
    os.unlink(path)
    os.rmdir(d)


def _changed(topic: str, tid: int, partitions: int) -> control.TopicChanged:
    return control.TopicChanged(topic=topic, topic_id=tid, partitions=partitions)


def test_keyed_records_follow_the_new_count_and_new_partitions_settle(daemon: GrowingDaemon) -> None:
    keys = [b"user-%d" % i for i in range(200)]
    with Producer(daemon.path, client_name="grow-unit") as p:
        assert daemon.hello is not None and daemon.hello.topic_updates
        before = [p.send(TOPIC, b"b%d" % i, k, timestamp=i) for i, k in enumerate(keys)]
        daemon.push(_changed(TOPIC, TID, AFTER))
        # The completion thread reads the push; lookup() is the cached state, no I/O.
        wait_until(lambda: p.partitions_for(TOPIC) == AFTER, 5, "the producer heard of the growth")
        after = [p.send(TOPIC, b"a%d" % i, k, timestamp=1000 + i) for i, k in enumerate(keys)]
        assert daemon.lookups == [TOPIC]  # the growth cost no lookup

        seen = daemon.take([AFTER])
        assert len(seen) == 2 * len(keys)
        by_part: dict[int, list[int]] = {}
        for w, tid, part, ts, _body in seen:
            assert tid == TID and w == owner(TOPIC, part, WORKERS)
            i, n = (ts, BEFORE) if ts < 1000 else (ts - 1000, AFTER)
            assert part == partition_for_key(keys[i], n), (ts, part)
            by_part.setdefault(part, []).append(ts)
        assert set(by_part) == set(range(AFTER)), "the new partitions got records"
        for fut, k in zip(after, keys):
            assert fut.partition == partition_for_key(k, AFTER)
        # Completions of every partition, the new ones included, settle in send order.
        for part, stamps in by_part.items():
            daemon.complete(owner(TOPIC, part, WORKERS), TID, part, 100 * part, len(stamps))
        offset = {ts: 100 * part + n for part, stamps in by_part.items() for n, ts in enumerate(stamps)}
        for i, fut in enumerate(before):
            assert fut.result(timeout=5) == RecordMetadata(TOPIC, fut.partition, offset[i], i)
        for i, fut in enumerate(after):
            assert fut.result(timeout=5) == RecordMetadata(TOPIC, fut.partition, offset[1000 + i], 1000 + i)
        assert p.flush(5) == 0

        # Never shrinks: a smaller count (a stale push) changes nothing.
        daemon.push(_changed(TOPIC, TID, BEFORE))
        daemon.push(_changed(TOPIC, TID + 5, AFTER + 2))  # another id: not this topic
        last = p.send(TOPIC, b"x", partition=AFTER - 1)
        seen = daemon.take([AFTER])
        assert [(w, part) for w, _tid, part, _ts, _b in seen] == [(owner(TOPIC, AFTER - 1, WORKERS), AFTER - 1)]
        daemon.complete(seen[0][0], TID, AFTER - 1, 7, 1)
        assert last.result(timeout=5).offset == 7
        assert p.partitions_for(TOPIC) == AFTER


def test_a_push_during_a_request_is_not_its_reply_and_beats_a_stale_topic_info(daemon: GrowingDaemon) -> None:
    with Producer(daemon.path, client_name="grow-race") as p:
        assert p.partitions_for(TOPIC) == BEFORE
        # While lookup(LATE) waits for its reply, the daemon pushes two TopicChanged ahead of
        # a TopicInfo that was computed before LATE grew: the request thread reads them.
        daemon.before_late_reply = [_changed(TOPIC, TID, AFTER), _changed(LATE, LATE_TID, AFTER)]
        info = p.lookup(LATE)
        assert info.topic == LATE and info.partitions == AFTER
        assert p.partitions_for(TOPIC) == AFTER
        fut = p.send(LATE, b"v", partition=AFTER - 1)
        seen = daemon.take([AFTER, AFTER])
        assert [(part, tid) for _w, tid, part, _ts, _b in seen] == [(AFTER - 1, LATE_TID)]
        daemon.complete(seen[0][0], LATE_TID, AFTER - 1, 42, 1)
        assert fut.result(timeout=5).offset == 42


def test_sends_on_several_threads_while_the_topic_grows_step_by_step(daemon: GrowingDaemon) -> None:
    """The compiled send() of other threads runs while _bind swaps the tables (run under ASan
    by ``make sanitize``): every record goes to murmur2 modulo one of the counts the topic had,
    to that partition's owner, and settles."""
    counts = list(range(BEFORE, 17))
    per_thread, threads = 150, 3
    with Producer(daemon.path, client_name="grow-threads") as p:
        assert p.partitions_for(TOPIC) == BEFORE
        errors: list[BaseException] = []
        go = threading.Event()

        def sender(t: int) -> None:
            go.wait(5)
            try:
                for i in range(per_thread):
                    p.produce(TOPIC, b"v", b"t%d-k%d" % (t, i), timestamp=t * per_thread + i)
                    if i % 5 == 0:
                        time.sleep(0.0002)  # spread the sends over the pushes
            except BaseException as exc:  # noqa: BLE001 - reported to the test
                errors.append(exc)

        workers = [threading.Thread(target=sender, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        go.set()
        for n in counts[1:]:
            daemon.push(_changed(TOPIC, TID, n))
            time.sleep(0.001)
        for w in workers:
            w.join(10)
        assert not errors, errors
        wait_until(lambda: p.partitions_for(TOPIC) == counts[-1], 5, "the last growth")
        seen = daemon.take([counts[-1]])
        assert len(seen) == per_thread * threads
        by_part: dict[tuple[int, int], int] = {}
        early = late = 0  # records sent before the last growth, after the first
        for w, _tid, part, ts, _body in seen:
            t, i = divmod(ts, per_thread)
            key = b"t%d-k%d" % (t, i)
            assert part in {partition_for_key(key, n) for n in counts}, (key, part)
            assert w == owner(TOPIC, part, WORKERS)
            by_part[(w, part)] = by_part.get((w, part), 0) + 1
            early += part != partition_for_key(key, counts[-1])
            late += part != partition_for_key(key, BEFORE)
        assert early and late, "the sends went on while the topic grew"
        for (w, part), count in by_part.items():
            daemon.complete(w, TID, part, 0, count)
        assert p.flush(5) == 0
        assert sum(p.delivered.values()) == per_thread * threads
