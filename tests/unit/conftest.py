"""Fixtures shared by the unit tests of several packages."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shm import control

Handler = Callable[[Any], "list[Any] | None"]


class ScriptedDaemon:
    """The daemon's side of the control socket, scripted: each client message is passed to
    ``handler``, which returns the replies to send (encoded Structs, or raw bytes) or None to
    hang up. Connections are served one after another on one thread; ``received`` lists every
    message, in order."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.handler: Handler = lambda msg: []
        self.received: list[Any] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(4)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with conn:
                reader = control.FrameReader(control.ClientMessage)
                try:
                    while data := conn.recv(1 << 16):
                        for msg in reader.feed(data):
                            self.received.append(msg)
                            replies = self.handler(msg)
                            if replies is None:
                                raise ConnectionAbortedError  # hang up
                            for r in replies:
                                conn.sendall(r if isinstance(r, bytes) else control.encode(r))
                except OSError:
                    pass

    def wait_for(self, kind: type, timeout: float = 5.0) -> Any:
        """The first received message of ``kind``, waiting for the serving thread to read it
        (the client may return before the daemon's side has seen its last message)."""
        deadline = time.monotonic() + timeout
        while True:
            for msg in list(self.received):
                if isinstance(msg, kind):
                    return msg
            if time.monotonic() > deadline:
                raise AssertionError(f"no {kind.__name__} received within {timeout}s: {self.received!r}")
            time.sleep(0.005)

    def close(self) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone does not
        except OSError:
            pass
        self._listener.close()
        self._thread.join(5)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair of Unix stream sockets, closed after the test."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.fixture
def scripted_daemon() -> Iterator[ScriptedDaemon]:
    d = tempfile.mkdtemp(prefix="sld-", dir="/tmp")  # short: AF_UNIX paths are limited
    s = ScriptedDaemon(os.path.join(d, "s.sock"))
    yield s
    s.close()
    shutil.rmtree(d, ignore_errors=True)

