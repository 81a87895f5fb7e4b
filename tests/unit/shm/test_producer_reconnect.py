"""Producer(reconnect_timeout_s=...): a daemon that hangs up is reconnected to with the same
token and the same segment; pending futures survive; a fatal ErrorReply or a timeout fails them."""

from __future__ import annotations

import importlib.util
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_until

from shm import control
from shm.partitioner import owner
from shm.producer import Producer, ProducerClosedError
from shm.segment import recv_fds

_spec = importlib.util.spec_from_file_location("_producer_standin_rc", Path(__file__).with_name("test_producer.py"))
_standin = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(_standin)  # type: ignore[union-attr]
StandIn = _standin.StandIn
WORKERS = _standin.WORKERS
sock_path = _standin.sock_path  # the fixture


class RestartingStandIn(StandIn):
    """A stand-in that accepts again after hanging up, as a restarted daemon would."""

    def __init__(self, path: str) -> None:
        self.hellos: list[control.Hello] = []
        self.inodes: list[int] = []
        self.fatal_next = 0  # an error code: hang_up sends it as a fatal ErrorReply first
        super().__init__(path)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if self.conn is not None:
                self.conn.close()  # the previous connection (closed by hang_up already, mostly)
            self.conn = conn
            reader = control.FrameReader(control.ClientMessage)
            live = True
            try:
                while live:
                    data, fds = recv_fds(conn, 1 << 16, 64)
                    if not data:
                        break
                    for msg in reader.feed(data):
                        if isinstance(msg, control.Hello):
                            self.hellos.append(msg)
                        if isinstance(msg, control.SegmentOffer):
                            self.inodes.append(os.fstat(fds[0]).st_ino)
                            if self.segment is not None:
                                self.segment.close()
                                self.segment = None
                        if not self._handle(conn, msg, fds):
                            live = False  # Goodbye: this connection is over
                            break
                        fds = []
            except OSError:
                pass
            finally:
                if conn is not self.conn:
                    conn.close()

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() the thread waits in
        except OSError:
            pass
        super().close()

    def hang_up(self) -> None:
        if self.fatal_next and self.conn is not None:
            self.conn.sendall(control.encode(control.error_reply(self.fatal_next, "dropped", fatal=True)))
        super().hang_up()


@pytest.fixture
def restarting(sock_path: str) -> Iterator[RestartingStandIn]:
    s = RestartingStandIn(sock_path)
    yield s
    s.close()


def test_reconnects_with_same_token_and_segment_and_keeps_pending(restarting: RestartingStandIn) -> None:
    p = Producer(restarting.path)  # reconnecting is the default
    try:
        w = owner("u", 0, WORKERS)
        before = [p.send("u", b"a%d" % i, partition=0) for i in range(3)]
        restarting.hang_up()
        wait_until(lambda: p.reconnects == 1)
        after = p.send("u", b"b", partition=0)  # written while reconnected, same ring
        assert len(restarting.hellos) == 2 and restarting.hellos[0].token == restarting.hellos[1].token != 0
        assert len(set(restarting.inodes)) == 1 and len(restarting.inodes) == 2  # the same memfd
        assert not any(f.done() for f in before)
        assert len(restarting.take(w)) == 4
        restarting.complete(w, 1, 0, 100, 4)
        assert [f.result(timeout=5).offset for f in before + [after]] == [100, 101, 102, 103]
    finally:
        p.close(timeout=1)


def test_fatal_error_before_hang_up_is_not_retried(restarting: RestartingStandIn) -> None:
    p = Producer(restarting.path, reconnect_timeout_s=5.0)
    try:
        f = p.send("u", b"x", partition=0)
        restarting.fatal_next = control.ERR_BAD_FRAME
        restarting.hang_up()
        with pytest.raises(ProducerClosedError):
            f.result(timeout=3)
        assert p.reconnects == 0 and len(restarting.hellos) == 1
    finally:
        p.close(timeout=1)


def test_shutting_down_is_no_reason_to_give_up(restarting: RestartingStandIn) -> None:
    # A stopping daemon says SHUTTING_DOWN before it closes: its successor may take the segment.
    p = Producer(restarting.path, reconnect_timeout_s=5.0)
    try:
        f = p.send("u", b"x", partition=0)
        restarting.fatal_next = control.ERR_SHUTTING_DOWN
        restarting.hang_up()
        wait_until(lambda: p.reconnects == 1)
        assert not f.done() and len(restarting.hellos) == 2
    finally:
        p.close(timeout=1)


def test_no_daemon_within_the_timeout_fails_pending(sock_path: str) -> None:
    s = StandIn(sock_path)  # accepts one connection only; then the socket is closed
    p = Producer(sock_path, reconnect_timeout_s=0.5)
    try:
        f = p.send("u", b"x", partition=0)
        s.listener.close()
        t0 = time.monotonic()
        s.hang_up()
        with pytest.raises(ProducerClosedError):
            f.result(timeout=5)
        assert 0.4 < time.monotonic() - t0 < 3.0
    finally:
        p.close(timeout=1)
        s.close()


def test_close_while_reconnecting_is_bounded_by_its_timeout(sock_path: str) -> None:
    # The default reconnects for 60 s; an application closing meanwhile waits only for close().
    s = StandIn(sock_path)
    p = Producer(sock_path)
    try:
        f = p.send("u", b"x", partition=0)
        s.listener.close()
        s.hang_up()
        time.sleep(0.2)  # the reader thread is in its reconnect loop now
        t0 = time.monotonic()
        p.close(timeout=0.5)
        assert time.monotonic() - t0 < 3.0
        with pytest.raises(ProducerClosedError):
            f.result(timeout=0)
    finally:
        p.close(timeout=0)
        s.close()


def test_no_token_without_reconnect(restarting: RestartingStandIn) -> None:
    with Producer(restarting.path, reconnect_timeout_s=0):
        pass
    assert restarting.hellos[0].token == 0


def test_a_topic_that_grew_while_the_daemon_was_away_grows_on_reconnect(restarting: RestartingStandIn) -> None:
    p = Producer(restarting.path, reconnect_timeout_s=5.0)
    try:
        assert p.partitions_for("u") == 1
        _standin.TOPICS["u"] = 3  # the restarted daemon's table: "u" has 3 partitions now
        restarting.hang_up()
        wait_until(lambda: p.reconnects == 1)
        assert p.partitions_for("u") == 3
        f = p.send("u", b"x", partition=2)
        w = owner("u", 2, WORKERS)
        assert [(tid, part) for tid, part, _ts, _b in restarting.take(w)] == [(1, 2)]
        restarting.complete(w, 1, 2, 7, 1)
        assert f.result(timeout=5).offset == 7
    finally:
        _standin.TOPICS["u"] = 1
        p.close(timeout=1)
