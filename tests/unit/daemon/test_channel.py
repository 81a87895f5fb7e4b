"""daemon.channel: messages and fds over a SEQPACKET pair, and a dead peer."""

from __future__ import annotations

import os

import pytest

from daemon import channel as ch


def test_round_trip_with_fds() -> None:
    a, b = ch.Channel.pair()
    sup, wrk = ch.Channel(a, ch.ToSupervisor), ch.Channel(b, ch.ToWorker)
    r, w = os.pipe()
    try:
        sup.send(ch.AddClient(client_id=3, pid=1, name="c"), [r])
        sup.send(ch.RemoveClient(client_id=3))
        got = wrk.receive()
        assert [m for m, _ in got] == [ch.AddClient(client_id=3, pid=1, name="c"), ch.RemoveClient(client_id=3)]
        (fd,) = got[0][1]
        os.write(w, b"x")
        assert os.read(fd, 1) == b"x"  # a duplicate of the same pipe
        os.close(fd)
        assert got[1][1] == []
    finally:
        for f in (r, w):
            os.close(f)
        sup.close()
        wrk.close()


def test_send_to_a_dead_peer_is_dropped_not_raised() -> None:
    # The supervisor broadcasts to a worker that was SIGKILLed a moment ago: the send must not
    # raise out of the broadcast (the other workers still need the message).
    a, b = ch.Channel.pair()
    sup = ch.Channel(a, ch.ToSupervisor)
    b.close()
    try:
        sup.send(ch.RemoveClient(client_id=1))
        assert sup.flush() and sup.pending == 0
    finally:
        sup.close()


def test_receive_raises_eof_when_the_peer_is_gone() -> None:
    a, b = ch.Channel.pair()
    wrk = ch.Channel(a, ch.ToWorker)
    b.close()
    try:
        with pytest.raises(EOFError):
            wrk.receive()
    finally:
        wrk.close()


def test_the_last_messages_before_eof_are_received_then_eof() -> None:
    # A worker sends Bye and exits: the supervisor must read the Bye, not lose it to the EOF
    # that follows it in the same receive().
    a, b = ch.Channel.pair()
    sup = ch.Channel(a, ch.ToSupervisor)
    wrk = ch.Channel(b, ch.ToWorker)
    wrk.send(ch.Bye(worker=0, undelivered=3))
    assert wrk.flush()
    wrk.close()
    try:
        msgs = sup.receive()
        assert [m for m, _ in msgs] == [ch.Bye(worker=0, undelivered=3)]
        with pytest.raises(EOFError):
            sup.receive()
    finally:
        sup.close()
