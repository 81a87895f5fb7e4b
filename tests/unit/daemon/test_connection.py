"""daemon.connection: framing, correlation ids and what the listener hears, fed byte vectors.

A Connection is driven through its asyncio.Protocol methods with a recording transport; the
responses are raw frames (size, correlation id, body). ApiVersions is used as the API because
its response header is v0 (no tagged fields). Connecting to a real broker is in
tests/integration/test_metadata.py.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest

from daemon.config import KafkaSettings
from daemon.connection import Connection, ConnectionPool, parse_hostport
from daemon.protocol import errors as ec
from daemon.protocol import messages as m


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.buffered = 0
        self.aborted = False

    def writelines(self, buffers: list[bytes | memoryview]) -> None:
        self.written.append(b"".join(bytes(b) for b in buffers))

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def abort(self) -> None:
        self.aborted = True


class _Listener:
    """Records what the connection reports, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def on_response(self, conn: Connection, context: Any, body: memoryview) -> None:
        self.events.append(("response", context, bytes(body)))

    def on_request_failed(self, context: Any, code: int) -> None:
        self.events.append(("failed", context, code))

    def on_connection_lost(self, conn: Connection) -> None:
        self.events.append(("lost", conn.node_id))


def _stats() -> dict[str, Any]:
    return {"in_flight": 0, "protocol_errors": 0, "reconnects": 0}


def _connection() -> tuple[Connection, _Listener, _Transport]:
    listener = _Listener()
    conn = Connection(listener, _stats(), 1, "127.0.0.1", 9092, "test")
    transport = _Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, listener, transport


def _frame(correlation_id: int, body: bytes) -> bytes:
    return struct.pack(">ii", 4 + len(body), correlation_id) + body


def _send(conn: Connection, context: str) -> int:
    cid = conn.next_correlation_id()
    conn.send([b"request-%d" % cid], cid, m.API_VERSIONS, 1e18, context)
    return cid


def test_pipelined_responses_split_anywhere_reach_the_listener_in_order() -> None:
    conn, listener, transport = _connection()
    cids = [_send(conn, f"req{i}") for i in range(3)]
    assert transport.written == [b"request-0", b"request-1", b"request-2"]
    assert conn.stats["in_flight"] == 3
    stream = b"".join(_frame(cid, b"body-%d" % cid) for cid in cids)
    for i in range(0, len(stream), 5):  # a frame boundary is rarely a chunk boundary
        conn.data_received(stream[i : i + 5])
    assert listener.events == [("response", "req0", b"body-0"), ("response", "req1", b"body-1"),
                               ("response", "req2", b"body-2")]
    assert conn.stats["in_flight"] == 0 and not conn.outstanding and not conn.closed


def test_a_wrong_correlation_id_closes_and_fails_every_request_then_reports_the_loss() -> None:
    conn, listener, transport = _connection()
    first = _send(conn, "a")
    _send(conn, "b")
    conn.data_received(_frame(first + 1, b"x"))
    assert transport.aborted and conn.closed
    assert listener.events == [("failed", "a", ec.NETWORK_EXCEPTION), ("failed", "b", ec.NETWORK_EXCEPTION),
                               ("lost", 1)]
    assert conn.stats == {"in_flight": 0, "protocol_errors": 1, "reconnects": 0}
    with pytest.raises(ec.KafkaError):
        _send(conn, "c")


@pytest.mark.parametrize("size", [3, 128 * 1024 * 1024 + 1], ids=["too-small", "too-large"])
def test_an_impossible_frame_size_closes_the_connection(size: int) -> None:
    conn, listener, _ = _connection()
    _send(conn, "a")
    conn.data_received(struct.pack(">i", size) + b"\0" * 8)
    assert conn.closed and conn.stats["protocol_errors"] == 1
    assert listener.events == [("failed", "a", ec.NETWORK_EXCEPTION), ("lost", 1)]


def test_an_unsolicited_response_closes_the_connection() -> None:
    conn, listener, _ = _connection()
    conn.data_received(_frame(0, b"x"))
    assert conn.closed and listener.events == [("lost", 1)]


def test_unanswered_requests_count_as_written_only_once_the_transport_buffer_is_empty() -> None:
    conn, listener, transport = _connection()
    transport.buffered = 100
    conn.send_unanswered([b"acks0"], "z")
    assert conn.stats["in_flight"] == 0
    assert conn.take_written() == []
    transport.buffered = 0
    assert conn.take_written() == ["z"]
    assert conn.take_written() == []


def test_a_lost_connection_fails_unanswered_requests_too_and_reports_once() -> None:
    conn, listener, transport = _connection()
    transport.buffered = 100
    _send(conn, "a")
    conn.send_unanswered([b"acks0"], "z")
    conn.connection_lost(None)
    conn.connection_lost(None)
    conn.close(ec.REQUEST_TIMED_OUT)
    assert listener.events == [("failed", "a", ec.NETWORK_EXCEPTION), ("failed", "z", ec.NETWORK_EXCEPTION),
                               ("lost", 1)]


def test_correlation_ids_wrap_within_int32() -> None:
    conn, _, _ = _connection()
    conn._next_correlation_id = 0x7FFFFFFF  # noqa: SLF001 - two billion requests later
    assert [conn.next_correlation_id() for _ in range(2)] == [0x7FFFFFFF, 0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("localhost:9092", ("localhost", 9092)), (" 10.0.0.1:19092 ", ("10.0.0.1", 19092)), ("[::1]:9092", ("::1", 9092))],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["localhost", "localhost:", "localhost:x"])
def test_parse_hostport_refuses_what_is_not_host_port(text: str) -> None:
    with pytest.raises(ValueError, match="not host:port"):
        parse_hostport(text)


def test_a_pool_needs_a_bootstrap_server() -> None:
    with pytest.raises(ValueError, match="empty"):
        ConnectionPool(KafkaSettings(bootstrap_servers=" , "))


def test_a_pool_asks_for_the_broker_list_when_a_leader_has_no_address() -> None:
    pool = ConnectionPool(KafkaSettings(bootstrap_servers="127.0.0.1:1"))
    assert not pool.knows(5) and pool.connect(5, 0.0) is False and pool.ready(5) is None
    pool.stop()
    assert pool.connect(5, 0.0) is True  # stopped: nothing is due, so nothing is missing
