"""The supervisor <-> worker channel: msgpack messages over a SOCK_SEQPACKET socketpair.

One datagram is one message (SEQPACKET keeps boundaries), so no framing is needed. A message
that hands over a client's segment carries its fds in the same datagram (SCM_RIGHTS).

Supervisor -> worker: Start, AddTopic, AddClient (+ fds), RemoveClient, Reload, Shutdown.
Worker -> supervisor: Ready, Stats (also the worker's heartbeat), PartitionCount,
ClientDropped (its ring was corrupt), ClientDetached (its ring is drained and unmapped), Bye.
"""

from __future__ import annotations

import array
import socket
from typing import Any, TypeAlias

import msgspec

from shm.segment import fds_of

__all__ = [
    "Start",
    "AddTopic",
    "AddClient",
    "RemoveClient",
    "Reload",
    "Shutdown",
    "Ready",
    "Stats",
    "PartitionCount",
    "ClientDropped",
    "ClientDetached",
    "Bye",
    "ToWorker",
    "ToSupervisor",
    "Channel",
    "MAX_MESSAGE",
]

MAX_MESSAGE = 1 << 20
"""Largest datagram either side sends (a Stats snapshot is far smaller)."""
_MAX_FDS = 256


class _Msg(msgspec.Struct, tag_field="t", array_like=True):
    pass


class Start(_Msg, tag="start"):
    worker: int
    workers: int
    config_text: str
    config_source: str
    # A restart after a crash: recover the arena the dead worker left (daemon/arena.py). False
    # at daemon start, when client ids begin again and old runs would name the wrong clients.
    recover: bool = False
    # The clients the supervisor adds right after Start (AddClient): recovered runs of any
    # other client will never be matched, so the worker need not keep their batches.
    clients: list[int] = []


class AddTopic(_Msg, tag="topic"):
    topic_id: int
    name: str
    partitions: int


class AddClient(_Msg, tag="client"):
    client_id: int
    pid: int
    name: str


class RemoveClient(_Msg, tag="remove"):
    client_id: int


class Reload(_Msg, tag="reload"):
    config_text: str
    config_source: str


class Shutdown(_Msg, tag="shutdown"):
    timeout_ms: int


class Ready(_Msg, tag="ready"):
    worker: int


class Stats(_Msg, tag="stats"):
    worker: int
    snapshot: dict[str, Any]


class PartitionCount(_Msg, tag="partitions"):
    topic: str
    partitions: int


class ClientDropped(_Msg, tag="dropped"):
    client_id: int
    reason: str


class ClientDetached(_Msg, tag="detached"):
    client_id: int


class Bye(_Msg, tag="bye"):
    worker: int
    undelivered: int


ToWorker: TypeAlias = Start | AddTopic | AddClient | RemoveClient | Reload | Shutdown
ToSupervisor: TypeAlias = Ready | Stats | PartitionCount | ClientDropped | ClientDetached | Bye

_encoder = msgspec.msgpack.Encoder()


class Channel:
    """One end of the socketpair, non-blocking; sends queue when the socket is full."""

    def __init__(self, sock: socket.socket, incoming: Any) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._decoder = msgspec.msgpack.Decoder(incoming)
        self._outbox: list[tuple[bytes, list[int]]] = []

    @classmethod
    def pair(cls) -> tuple[socket.socket, socket.socket]:
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, msg: Any, fds: list[int] | None = None) -> None:
        """Queue ``msg`` (with ``fds``, which are duplicated by the kernel on send)."""
        self._outbox.append((_encoder.encode(msg), list(fds or ())))
        self.flush()

    def flush(self) -> bool:
        """Send what is queued; True when the outbox is empty."""
        while self._outbox:
            data, fds = self._outbox[0]
            try:
                if fds:
                    self.sock.sendmsg(
                        [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    )
                else:
                    self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                return False
            except (BrokenPipeError, ConnectionResetError):
                # The peer is dead. Its reader sees EOF and handles that (the supervisor
                # restarts a worker, a worker shuts down); what was queued is for nobody now
                # (queued fds belong to the caller: the kernel duplicates them only on send).
                self._outbox.clear()
                return True
            self._outbox.pop(0)
        return True

    @property
    def pending(self) -> int:
        return len(self._outbox)

    def receive(self) -> list[tuple[Any, list[int]]]:
        """Every message waiting now (non-blocking). Raises EOFError when the peer is gone."""
        out: list[tuple[Any, list[int]]] = []
        fds_size = socket.CMSG_SPACE(_MAX_FDS * 4)
        while True:
            try:
                data, anc, flags, _ = self.sock.recvmsg(MAX_MESSAGE, fds_size)
            except (BlockingIOError, InterruptedError):
                return out
            fds = fds_of(anc)
            if not data:
                for fd in fds:
                    _close(fd)
                if out:
                    # The peer's last messages (a worker's Bye) come first; the next call
                    # reports the end of file (a SEQPACKET socket reads it again).
                    return out
                raise EOFError("channel closed")
            out.append((self._decoder.decode(data), fds))

    def close(self) -> None:
        self.sock.close()


def _close(fd: int) -> None:
    import os

    try:
        os.close(fd)
    except OSError:
        pass
