"""shm.connection.Connection against a scripted daemon: handshake, typed replies, errors."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from shm import control
from shm.connection import DEFAULT_SOCKET, Connection, hello_for, reply_error, socket_path
from shm.errors import ConnectionClosedError, KafkaError, ProtocolError, SluiceError

WELCOME = control.Welcome(version=1, workers=2, request_ring_bytes=1 << 16, completion_ring_bytes=4096, client_id=9)


def _answer(msg: Any) -> list[Any] | None:
    match msg:
        case control.Hello():
            return [WELCOME]
        case control.StatsRequest():
            return [control.StatsReply(stats={"clients": 1})]
        case control.TopicLookup(topic="missing"):
            return [control.ErrorReply(code=3, name="UNKNOWN_TOPIC_OR_PARTITION", message="no such topic", fatal=False)]
        case control.TopicLookup(topic="refused"):
            return [control.ErrorReply(code=control.ERR_NOT_ALLOWED, name="NOT_ALLOWED", message="not you", fatal=True)]
        case control.Flush():
            return [control.StatsReply(stats={}), control.FlushDone(complete=True, pending=0)]
        case control.Goodbye():
            return None
    return []


def test_hello_request_and_goodbye(scripted_daemon: Any) -> None:
    scripted_daemon.handler = _answer
    with Connection(scripted_daemon.path, hello=hello_for("unit", token=5)) as c:
        assert c.welcome == WELCOME
        assert c.request(control.StatsRequest(), control.StatsReply).stats == {"clients": 1}
        c.send(control.Goodbye())
        with pytest.raises(ConnectionClosedError):
            c.recv()
    hello = scripted_daemon.received[0]
    assert (hello.client_name, hello.pid, hello.token, hello.version) == ("unit", os.getpid(), 5, control.PROTOCOL_VERSION)


def test_error_replies_raise_what_they_stand_for(scripted_daemon: Any) -> None:
    scripted_daemon.handler = _answer
    with Connection(scripted_daemon.path, hello=hello_for("unit")) as c:
        with pytest.raises(KafkaError) as kafka:
            c.request(control.TopicLookup(topic="missing"), control.TopicInfo)
        assert kafka.value.code == 3 and str(kafka.value) == "no such topic"
        with pytest.raises(SluiceError, match="^NOT_ALLOWED: not you$") as own:
            c.request(control.TopicLookup(topic="refused"), control.TopicInfo)
        assert not isinstance(own.value, KafkaError)
        # Asked for, an ErrorReply is just the reply.
        c.send(control.TopicLookup(topic="missing"))
        assert c.expect(control.ErrorReply).code == 3
        # Another reply than the one expected is a protocol error; the next one is still there.
        c.send(control.Flush(timeout_ms=0))
        with pytest.raises(ProtocolError, match="expected FlushDone, got StatsReply"):
            c.expect(control.FlushDone)
        assert c.expect(control.FlushDone).complete


def test_recv_available_returns_a_whole_read(scripted_daemon: Any) -> None:
    scripted_daemon.handler = lambda msg: [WELCOME, WELCOME, WELCOME] if isinstance(msg, control.Hello) else []
    with Connection(scripted_daemon.path, hello=None) as c:
        c.send(hello_for("unit"))
        got: list[Any] = []
        deadline = time.monotonic() + 5
        while len(got) < 3 and time.monotonic() < deadline:
            batch = c.recv_available()
            assert batch, "recv_available returns at least one message"
            got += batch
        assert got == [WELCOME] * 3


def test_fatal_reply_and_closed_by_daemon(scripted_daemon: Any) -> None:
    fatal = control.ErrorReply(code=control.ERR_SHUTTING_DOWN, name="SHUTTING_DOWN", message="bye", fatal=True)
    scripted_daemon.handler = lambda msg: [WELCOME] if isinstance(msg, control.Hello) else None
    with Connection(scripted_daemon.path, hello=hello_for("unit")) as c:
        assert c.fatal_reply() is None  # nothing said yet, and it does not block
        assert not c.closed_by_daemon(0.1)
    scripted_daemon.handler = lambda msg: [WELCOME] if isinstance(msg, control.Hello) else [fatal, control.encode(fatal)]
    with Connection(scripted_daemon.path, hello=hello_for("unit")) as c:
        c.send(control.StatsRequest())
        deadline = time.monotonic() + 5
        while c.fatal_reply() is None:
            assert time.monotonic() < deadline, "the fatal ErrorReply never showed"
            time.sleep(0.01)
        assert c.fatal_reply() == fatal
    scripted_daemon.handler = lambda msg: [WELCOME] if isinstance(msg, control.Hello) else None
    with Connection(scripted_daemon.path, hello=hello_for("unit")) as c:
        c.send(control.Goodbye())
        assert c.closed_by_daemon(5.0)


def test_refused_hello_and_unreachable_socket(scripted_daemon: Any, tmp_path: Any) -> None:
    refusal = control.ErrorReply(code=control.ERR_NOT_ALLOWED, name="NOT_ALLOWED", message="uid 1000", fatal=True)
    scripted_daemon.handler = lambda msg: [refusal]
    with pytest.raises(SluiceError, match="NOT_ALLOWED: uid 1000"):
        Connection(scripted_daemon.path, hello=hello_for("unit"), timeout=5)
    with pytest.raises(FileNotFoundError):
        Connection(str(tmp_path / "nobody.sock"), hello=hello_for("unit"))


def test_socket_path_and_reply_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLUICE_SOCKET", raising=False)
    assert socket_path(None) == DEFAULT_SOCKET
    monkeypatch.setenv("SLUICE_SOCKET", "/tmp/x.sock")
    assert socket_path(None) == "/tmp/x.sock" and socket_path("/a.sock") == "/a.sock"
    err = reply_error(control.ErrorReply(code=10, name="MESSAGE_TOO_LARGE", message="big", fatal=False))
    assert isinstance(err, KafkaError) and err.name == "MESSAGE_TOO_LARGE"
