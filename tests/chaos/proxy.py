"""A loopback TCP proxy that injects network faults between the daemon and a Kafka broker.

The chaos broker listens on one port and advertises the proxy's port in its metadata, so every
connection a client makes (bootstrap and leader connections alike) goes through the proxy::

    daemon / reader --> 127.0.0.1:listen_port (FaultProxy) --> 127.0.0.1:upstream_port (broker)

Faults, each switchable at any time from the test's thread:

- ``set_latency(ms)``: every chunk, in either direction, is forwarded ``ms`` later (order kept);
- ``stall()`` / ``resume()``: nothing is forwarded in either direction (connections stay open,
  bytes pile up in the proxy) until resumed;
- ``reset_mid_request(n)``: the next ``n`` client->broker chunks are cut: half of the chunk
  reaches the broker, then both sides of that connection are reset (RST, not FIN);
- ``reset_after_request(n)``: the next ``n`` client->broker chunks reach the broker whole, and
  the connection is reset before the broker's answer comes back (the broker did the work, the
  client never hears of it: the case idempotence exists for);
- ``reset_all()``: reset every open connection now.

The proxy runs its own asyncio loop in a daemon thread and only ever binds 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from typing import Any

__all__ = ["FaultProxy"]

_CHUNK = 65536
_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


def _rst(writer: asyncio.StreamWriter) -> None:
    """Abort a connection with a TCP reset (what a crashed peer or a middlebox does)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except OSError:
            pass
    writer.transport.abort()


class _Link:
    """One proxied connection: the client side and the broker side."""

    def __init__(self, client: asyncio.StreamWriter, broker: asyncio.StreamWriter) -> None:
        self.client = client
        self.broker = broker
        self.dead = False

    def reset(self) -> None:
        if self.dead:
            return
        self.dead = True
        _rst(self.client)
        _rst(self.broker)


class FaultProxy:
    """See the module docstring. ``start()`` binds and returns once the proxy accepts."""

    def __init__(self, listen_port: int, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.listen_port = listen_port
        self.upstream_port = upstream_port
        self.latency_s = 0.0
        self.connections = 0  # accepted so far
        self.resets = 0  # connections reset by a fault
        self.refused = 0  # accepted while the broker did not answer
        self._links: set[_Link] = set()
        self._mid_request = 0
        self._after_request = 0
        self._loop = asyncio.new_event_loop()
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._start()).result(10)
        return self

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, self.host, self.listen_port, reuse_address=True)

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self._call(self._close()).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self._loop.close()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.reset()
        self._flowing.set()

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _do(self, fn: Any, *args: Any) -> None:
        async def run() -> None:
            fn(*args)

        self._call(run()).result(10)

    # --- faults (called from the test's thread) ----------------------------------------------

    def set_latency(self, ms: float) -> None:
        """Delay every chunk by ``ms`` milliseconds from now on (0 = none)."""
        self.latency_s = ms / 1000.0

    def stall(self) -> None:
        """Stop forwarding in both directions until :meth:`resume`."""
        self._do(self._flowing.clear)

    def resume(self) -> None:
        self._do(self._flowing.set)

    def reset_mid_request(self, n: int = 1) -> None:
        """Cut the next ``n`` client->broker chunks in half and reset their connections."""
        self._mid_request += n

    def reset_after_request(self, n: int = 1) -> None:
        """Let the next ``n`` client->broker chunks through, then reset before any answer."""
        self._after_request += n

    def reset_all(self) -> int:
        """Reset every open connection; returns how many."""
        out: list[int] = []

        def run() -> None:
            links = list(self._links)
            for link in links:
                link.reset()
            self.resets += len(links)
            out.append(len(links))

        self._do(run)
        return out[0]

    @property
    def open_connections(self) -> int:
        return len(self._links)

    # --- forwarding ---------------------------------------------------------------------------

    async def _accept(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            breader, bwriter = await asyncio.open_connection(self.host, self.upstream_port)
        except OSError:
            # The broker is down: the client sees its connection reset, as with a dead host.
            self.refused += 1
            _rst(cwriter)
            return
        link = _Link(cwriter, bwriter)
        self._links.add(link)
        try:
            await asyncio.gather(
                self._pump(link, creader, bwriter, upstream=True),
                self._pump(link, breader, cwriter, upstream=False),
            )
        finally:
            self._links.discard(link)
            link.reset()

    async def _pump(self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    *, upstream: bool) -> None:
        # Reading and writing are separate tasks so latency delays chunks without throttling
        # the rate: chunks wait in the queue with the time they are due.
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.ensure_future(self._deliver(link, queue, writer, upstream))
        try:
            while not link.dead:
                try:
                    data = await reader.read(_CHUNK)
                except (ConnectionError, OSError):
                    break
                if not data:
                    break
                await queue.put((time.monotonic() + self.latency_s, data))
        finally:
            await queue.put((0.0, b""))
            try:
                await sender
            except (ConnectionError, OSError):
                pass
            link.reset()

    async def _deliver(self, link: _Link, queue: asyncio.Queue[tuple[float, bytes]],
                       writer: asyncio.StreamWriter, upstream: bool) -> None:
        while True:
            due, data = await queue.get()
            if not data or link.dead:
                return
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await self._flowing.wait()
            if link.dead:
                return
            if upstream and self._mid_request > 0:
                self._mid_request -= 1
                writer.write(data[: max(1, len(data) // 2)])
                await writer.drain()
                self.resets += 1
                link.reset()
                return
            writer.write(data)
            await writer.drain()
            if upstream and self._after_request > 0:
                self._after_request -= 1
                # Give the broker time to take the request in, but not to answer through us:
                # the reset comes before its response is forwarded (the link is dead by then).
                link.dead = True
                await asyncio.sleep(0.05)
                link.dead = False
                self.resets += 1
                link.reset()
                return
