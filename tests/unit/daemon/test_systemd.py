"""sd_notify and the watchdog, checked against a real AF_UNIX datagram socket."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator

import pytest

from daemon import systemd


class Receiver:
    """A bound SOCK_DGRAM socket standing in for systemd's notification socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def recv(self, timeout: float = 2.0) -> bytes:
        self.sock.settimeout(timeout)
        return self.sock.recv(65536)

    def drain(self) -> list[bytes]:
        out = []
        self.sock.setblocking(False)
        while True:
            try:
                out.append(self.sock.recv(65536))
            except BlockingIOError:
                return out


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest, tmp_path, monkeypatch) -> Iterator[Receiver]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        sock.bind(path)
        env_value = path
    else:
        name = f"sluice-test-notify-{os.getpid()}-{time.monotonic_ns()}"
        sock.bind("\0" + name)
        env_value = "@" + name
    monkeypatch.setenv("NOTIFY_SOCKET", env_value)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        yield Receiver(sock, env_value)
    finally:
        sock.close()


def test_unset_socket_is_a_noop(monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    assert systemd.ready("up") is False
    assert systemd.watchdog_ping() is False


def test_unsupported_address_kind_is_a_noop(monkeypatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.notify("READY=1") is False


def test_missing_receiver_returns_false(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert systemd.notify("READY=1") is False


def test_ready_with_status(receiver: Receiver) -> None:
    assert systemd.ready("listening on /run/sluice/sluice.sock") is True
    assert receiver.recv() == b"READY=1\nSTATUS=listening on /run/sluice/sluice.sock"


def test_ready_without_status(receiver: Receiver) -> None:
    assert systemd.ready() is True
    assert receiver.recv() == b"READY=1"


def test_status_newlines_are_flattened(receiver: Receiver) -> None:
    assert systemd.status("2 clients\n0 drops") is True
    assert receiver.recv() == b"STATUS=2 clients 0 drops"


def test_status_utf8(receiver: Receiver) -> None:
    systemd.status("draining \u2192 kafka")
    assert receiver.recv() == "STATUS=draining \u2192 kafka".encode()


def test_stopping(receiver: Receiver) -> None:
    systemd.stopping()
    assert receiver.recv() == b"STOPPING=1"
    systemd.stopping("draining")
    assert receiver.recv() == b"STOPPING=1\nSTATUS=draining"


def test_reloading_carries_monotonic_usec(receiver: Receiver) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert systemd.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = receiver.recv().split(b"\n")
    assert fields[0] == b"RELOADING=1"
    key, _, value = fields[1].partition(b"=")
    assert key == b"MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert len(fields) == 2


def test_extend_timeout(receiver: Receiver) -> None:
    systemd.extend_timeout(15_000_000)
    assert receiver.recv() == b"EXTEND_TIMEOUT_USEC=15000000"
    with pytest.raises(ValueError):
        systemd.extend_timeout(0)


def test_watchdog_ping(receiver: Receiver) -> None:
    assert systemd.watchdog_ping() is True
    assert receiver.recv() == b"WATCHDOG=1"


def test_bad_fields_are_refused(receiver: Receiver) -> None:
    with pytest.raises(ValueError):
        systemd.notify("READY=1\nSTOPPING=1")
    with pytest.raises(ValueError):
        systemd.notify("READY")
    assert receiver.drain() == []


def test_watchdog_interval(monkeypatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    assert systemd.watchdog_interval() == pytest.approx(5.0)
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == pytest.approx(5.0)
    # Inherited by a child: the watchdog belongs to another process.
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "-5", "ten"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert systemd.watchdog_interval() is None


def test_watchdog_disabled_without_interval(monkeypatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)

    async def main() -> bool:
        dog = systemd.Watchdog(lambda: True)
        started = dog.start()
        await dog.stop()
        return started or dog.enabled

    assert asyncio.run(main()) is False


def test_watchdog_uses_env_interval(receiver: Receiver, monkeypatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "40000")  # 40 ms -> ping every 20 ms
    dog = systemd.Watchdog(lambda: True)
    assert dog.period == pytest.approx(0.02)


def _count_pings(receiver: Receiver) -> int:
    got = receiver.drain()
    assert all(d == b"WATCHDOG=1" for d in got), got
    return len(got)


async def _wait_for(predicate, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


def test_watchdog_pings_only_while_healthy(receiver: Receiver) -> None:
    health = {"ok": True}
    period = 0.02

    async def main() -> None:
        dog = systemd.Watchdog(lambda: health["ok"], period=period)
        assert dog.start() is True
        assert await _wait_for(lambda: dog.pings >= 3)
        health["ok"] = False
        # Let any ping already in flight land, then forget everything sent so far.
        await asyncio.sleep(period * 2)
        _count_pings(receiver)
        skipped_before = dog.skipped
        await asyncio.sleep(period * 8)
        assert _count_pings(receiver) == 0
        assert dog.skipped > skipped_before
        health["ok"] = True
        assert await _wait_for(lambda: dog.pings >= 6)
        await dog.stop()
        assert not dog.running
        assert _count_pings(receiver) >= 1

    asyncio.run(main())


def test_watchdog_health_exception_counts_as_unhealthy(receiver: Receiver, caplog) -> None:
    def broken() -> bool:
        raise RuntimeError("heartbeat table unreadable")

    async def main() -> systemd.Watchdog:
        dog = systemd.Watchdog(broken, period=0.01)
        dog.start()
        assert await _wait_for(lambda: dog.skipped >= 3)
        await dog.stop()
        return dog

    dog = asyncio.run(main())
    assert dog.pings == 0
    assert _count_pings(receiver) == 0
    assert "treating as unhealthy" in caplog.text


def test_watchdog_rejects_bad_period() -> None:
    with pytest.raises(ValueError):
        systemd.Watchdog(lambda: True, period=0)
