"""The control-socket server: accept, peer checks, fd passing, dispatch and segment adoption.

Every client connects to one SOCK_STREAM Unix socket and speaks length-prefixed msgpack frames
(shm/control.py, docs/PROTOCOL.md). A shared-memory client sends Hello, then a SegmentOffer with
its segment's fds (SCM_RIGHTS); once adopted, the segment is handed to every worker and the
connection stays open only for control (topic lookups, flush, stats). A socket client sends
Produce frames instead (daemon/ingest.py).

Policies:

- Peers: the socket's mode is the first check; SO_PEERCRED against ``allowed_uids`` /
  ``allowed_gids`` is the second (daemon/peercred.py). A refused peer gets a fatal NOT_ALLOWED
  and the connection lingers ``_REFUSE_LINGER_S`` for its Hello, so it reads the reply instead
  of EPIPE.
- Segments: adopted only when their layout matches the Welcome; the daemon keeps the mapping
  after the client goes, and releases it once every worker drained and detached it.
- A malformed frame closes that connection with a fatal BAD_FRAME; the daemon carries on.
- Tokens: a client that can reconnect gets its previous id back after a daemon crash
  (daemon/state.py), so the recovered records' completions reach it.
- Drops: a client counts the records it drops under ``on_full = "drop"`` in its segment, per
  topic id (shm/layout.py). :meth:`ControlServer.drop_counts` reads every segment the daemon
  holds and adds what released segments said last, so a client's drops are counted after it
  exits or dies too.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
from typing import Any, Protocol

from daemon import channel as ch
from daemon.config import Config
from daemon.ingest import Reply
from daemon.peercred import check_peer, peer_credentials
from daemon.state import Tokens
from daemon.tasks import TaskSet
from shm import control
from shm.errors import KafkaError, SegmentError, SluiceError
from shm.segment import Segment, fds_of

__all__ = ["Client", "ControlServer", "Services", "WorkerLink", "bind_listener"]

log = logging.getLogger("sluice.server")

_LISTEN_BACKLOG = 512
_RECV_BYTES = 256 * 1024  # one recvmsg: several frames of a busy client at once
_SCM_MAX_FD = 253  # the kernel's limit of fds in one SCM_RIGHTS message
_MAX_ANCILLARY = socket.CMSG_SPACE(_SCM_MAX_FD * 4)
# How long a refused connection stays open for the client's Hello: closing before it arrives
# would hand the client EPIPE on its Hello instead of the NOT_ALLOWED reply.
_REFUSE_LINGER_S = 1.0
# How long close() waits for the connection tasks it cancelled.
_CANCEL_WAIT_S = 2.0


class WorkerLink(Protocol):
    """The workers as the server sees them: how many, and a message to all of them."""

    def __len__(self) -> int: ...

    def broadcast(self, msg: Any, fds: list[int] | None = None) -> None: ...


class Services(Protocol):
    """What the server hands on to the rest of the daemon."""

    config: Config

    async def lookup_topic(self, name: str) -> control.TopicInfo: ...

    async def produce(self, msg: control.Produce, reply: Reply, pending: set[asyncio.Future[Any]]) -> None: ...

    def stats(self) -> dict[str, Any]: ...

    def state_changed(self) -> None: ...

    @property
    def topic_id_bound(self) -> int:
        """Every topic id handed out is below this."""
        ...


class Client:
    """A socket connection; with a segment when it is a shared-memory client."""

    def __init__(self, client_id: int, sock: socket.socket) -> None:
        self.client_id = client_id
        self.sock = sock
        self.token = 0  # Hello.token: the client keeps it across daemon restarts
        self.name = ""
        self.pid = 0
        self.segment: Segment | None = None
        self.detached: set[int] = set()  # workers that drained and let go of the segment
        self.pending: set[asyncio.Future[Any]] = set()
        self.gone = False  # its connection closed: workers drain its segment, then detach
        self.inbox: list[tuple[Any, list[int]]] = []
        # Replies come from several tasks (the serve loop, one per acknowledged Produce); a
        # large frame may go out in pieces, so one frame is written at a time.
        self.send_lock = asyncio.Lock()


def bind_listener(path: str, mode: int) -> socket.socket:
    """The listening socket at ``path`` (a stale one from a dead daemon is replaced).

    Raises:
        SluiceError: another daemon answers at ``path``.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale, from a daemon that died
        else:
            raise SluiceError(f"another daemon is serving {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, mode)
    sock.listen(_LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


class ControlServer:
    """The connections of one daemon, from accept to close."""

    def __init__(self, services: Services, workers: WorkerLink, tokens: Tokens) -> None:
        self.clients: dict[int, Client] = {}
        self._services = services
        self._workers = workers
        self._tokens = tokens
        self._listener: socket.socket | None = None
        self._next_client = 1
        self._stopping = False
        # Drops by topic id of the segments already released, as each said last.
        self._released_drops: list[int] = []
        self._tasks = TaskSet(log)

    # --- lifecycle -------------------------------------------------------------------------

    def listen(self, path: str, mode: int) -> None:
        """Bind the socket; connections wait in the backlog until :meth:`start`."""
        self._listener = bind_listener(path, mode)

    def start(self) -> None:
        """Accept connections. Ids start after those a reconnecting client may claim back."""
        self._next_client = self._tokens.next_client_id()
        self._tasks.spawn(self._accept_loop(), "accept")

    def stop_listening(self, path: str) -> None:
        """No new connections; the socket file goes, so clients see the daemon is stopping."""
        self._stopping = True
        if self._listener is None:
            return
        try:
            os.unlink(path)
        except OSError:
            pass
        self._listener.close()
        self._listener = None

    async def close(self) -> None:
        """Close every connection and release every segment (the workers are gone)."""
        # Stop the connection tasks before closing their sockets: closing an fd that still has
        # a reader registered makes uvloop abort the whole process (SIGABRT, exit -6).
        await self._tasks.cancel(_CANCEL_WAIT_S)
        for client in list(self.clients.values()):
            try:
                client.sock.close()
            except OSError:
                pass
            if client.segment is not None:
                client.segment.close()

    # --- what the rest of the daemon asks --------------------------------------------------

    def connection_count(self) -> int:
        return len(self.clients)

    def segment_count(self) -> int:
        """Shared-memory clients: connections whose segment the workers still hold."""
        return sum(1 for c in self.clients.values() if c.segment is not None)

    def drop_counts(self, ids: int) -> list[int]:
        """Records the clients dropped under ``on_full = "drop"``, by topic id ``0..ids-1``:
        what every segment still held says now, plus what released segments said last."""
        totals = self._released_drops[:ids]
        totals += [0] * (ids - len(totals))
        for client in self.clients.values():
            if client.segment is not None:
                for tid, n in enumerate(client.segment.drop_counts[:ids].tolist()):
                    if n:
                        totals[tid] += n
        return totals

    def _keep_drops(self, segment: Segment) -> None:
        """``segment`` is about to be released: keep its drop counts."""
        ids = self._services.topic_id_bound
        kept = self._released_drops
        kept += [0] * (ids - len(kept))
        for tid, n in enumerate(segment.drop_counts[:ids].tolist()):
            if n:
                kept[tid] += n

    def introduce(self, worker: int) -> tuple[list[int], list[tuple[Any, list[int]]]]:
        """For a worker just spawned: the ids of the segments it serves, and their AddClients."""
        ids: list[int] = []
        msgs: list[tuple[Any, list[int]]] = []
        for client in self.clients.values():
            if client.segment is None or worker in client.detached:
                continue
            ids.append(client.client_id)
            msgs.append((ch.AddClient(client_id=client.client_id, pid=client.pid, name=client.name), client.segment.fds()))
            if client.gone:
                # The RemoveClient its predecessor got (or missed, being dead) dies with it.
                msgs.append((ch.RemoveClient(client_id=client.client_id), []))
        return ids, msgs

    def client_dropped(self, cid: int, reason: str) -> None:
        """A worker found the client's ring malformed: tell it why and cut the connection."""
        client = self.clients.get(cid)
        log.error("client %d dropped: %s", cid, reason)
        if client is None:
            return
        try:
            client.sock.send(control.encode(control.error_reply(control.ERR_BAD_FRAME, reason, fatal=True)))
        except OSError:
            pass
        try:
            client.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def client_detached(self, cid: int, worker: int) -> None:
        """``worker`` drained the gone client's segment; the last one to do so releases it."""
        client = self.clients.get(cid)
        if client is None:
            return
        client.detached.add(worker)
        if len(client.detached) >= len(self._workers) and client.segment is not None:
            self._keep_drops(client.segment)
            client.segment.close()
            client.segment = None
            self.clients.pop(cid, None)
            self._forget_token(client)
            log.info("client %d (%s): segment released", cid, client.name)

    # --- connections -----------------------------------------------------------------------

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        listener = self._listener
        while not self._stopping and listener is not None:
            try:
                sock, _ = await loop.sock_accept(listener)
            except (OSError, asyncio.CancelledError):
                return
            sock.setblocking(False)
            cid = self._next_client
            self._next_client += 1
            client = Client(cid, sock)
            self.clients[cid] = client
            self._tasks.spawn(self._serve(client), f"client-{cid}")

    async def _read(self, client: Client, reader: control.FrameReader) -> tuple[Any, list[int]] | None:
        """The next (message, fds) of ``client``; None at EOF.

        Only a SegmentOffer may bring fds; any others are closed, never kept.
        """
        loop = asyncio.get_running_loop()
        while not client.inbox:
            fut = loop.create_future()
            fd = client.sock.fileno()
            loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
            try:
                await fut
            finally:
                loop.remove_reader(fd)
            try:
                data, anc, _flags, _ = client.sock.recvmsg(_RECV_BYTES, _MAX_ANCILLARY)
            except (BlockingIOError, InterruptedError):
                continue
            fds = fds_of(anc)
            if not data:
                for fd_ in fds:
                    os.close(fd_)
                return None
            msgs = list(reader.feed(data))
            if fds:
                if len(msgs) == 1 and isinstance(msgs[0], control.SegmentOffer):
                    client.inbox.append((msgs[0], fds))
                    continue
                for fd_ in fds:
                    os.close(fd_)
            client.inbox.extend((m, []) for m in msgs)
        return client.inbox.pop(0)

    async def _send(self, client: Client, msg: Any) -> None:
        data = control.encode(msg)
        async with client.send_lock:
            await asyncio.get_running_loop().sock_sendall(client.sock, data)

    async def _serve(self, client: Client) -> None:
        reader = control.FrameReader(control.ClientMessage)
        try:
            refused = self._check_peer(client)
            if refused:
                await self._send(client, control.error_reply(control.ERR_NOT_ALLOWED, refused, fatal=True))
                try:
                    item = await asyncio.wait_for(self._read(client, reader), _REFUSE_LINGER_S)
                except (asyncio.TimeoutError, SluiceError):
                    item = None
                for _msg, fds in ([item] if item else []) + client.inbox:
                    for fd in fds:  # a SegmentOffer sent ahead of the reply: not ours to keep
                        os.close(fd)
                client.inbox.clear()
                return
            while True:
                try:
                    item = await self._read(client, reader)
                except SluiceError as exc:  # ProtocolError: a malformed frame
                    log.warning("client %d (%s): bad frame: %s", client.client_id, client.name, exc)
                    await self._send(client, control.error_reply(control.ERR_BAD_FRAME, str(exc), fatal=True))
                    return
                if item is None:
                    return
                msg, fds = item
                if not await self._dispatch(client, msg, fds):
                    return
        except (ConnectionError, OSError) as exc:
            log.info("client %d (%s): connection lost: %s", client.client_id, client.name, exc)
        finally:
            await self._close_client(client)

    def _check_peer(self, client: Client) -> str | None:
        """None when the peer may stay; else what to tell it (the log gets the details)."""
        cfg = self._services.config.daemon
        try:
            pid, uid, gid = peer_credentials(client.sock)
        except OSError:
            pid, uid, gid = 0, -1, -1  # check_peer refuses it whenever an allow-list is set
        client.pid = pid
        if pid == os.getpid():
            return None  # the supervisor's own socket-ingest producer, whatever the lists say
        reason = check_peer(client.sock, cfg.allowed_uids, cfg.allowed_gids)
        if reason is None:
            return None
        log.warning("client %d refused (allowed_uids/allowed_gids): %s", client.client_id, reason)
        # Not the lists themselves: a refused peer learns nothing about who is allowed.
        return f"access denied: uid {uid} gid {gid} is not allowed to use this daemon"

    async def _dispatch(self, client: Client, msg: Any, fds: list[int]) -> bool:
        """Handle one message; False to close the connection."""
        match msg:
            case control.Hello(version=version, client_name=name, pid=pid, token=token, wants_segment=wants):
                if version < control.MIN_PROTOCOL_VERSION:
                    await self._send(
                        client,
                        control.error_reply(control.ERR_UNSUPPORTED_PROTOCOL_VERSION, f"version {version} < {control.MIN_PROTOCOL_VERSION}", fatal=True),
                    )
                    return False
                client.name = name or f"client-{client.client_id}"
                client.pid = client.pid or pid
                if token and wants and not client.token:
                    self._claim_token(client, token)
                cfg = self._services.config.daemon
                await self._send(
                    client,
                    control.Welcome(
                        version=min(version, control.PROTOCOL_VERSION),
                        workers=len(self._workers),
                        request_ring_bytes=cfg.request_ring_bytes,
                        completion_ring_bytes=cfg.completion_ring_bytes,
                        client_id=client.client_id,
                    ),
                )
            case control.SegmentOffer(workers=workers):
                return await self._adopt_segment(client, workers, fds)
            case control.TopicLookup(topic=name):
                try:
                    info = await self._services.lookup_topic(name)
                except KafkaError as exc:
                    await self._send(client, control.ErrorReply(code=exc.code, name=exc.name, message=str(exc), fatal=False))
                    return True
                except SluiceError as exc:
                    await self._send(client, control.error_reply(control.ERR_UNEXPECTED_MESSAGE, str(exc)))
                    return True
                await self._send(client, info)
            case control.Produce():
                await self._services.produce(msg, functools.partial(self._send, client), client.pending)
            case control.Flush(timeout_ms=ms):
                pending = list(client.pending)
                done = True
                if pending:
                    _, still = await asyncio.wait(pending, timeout=ms / 1000.0)
                    done = not still
                await self._send(client, control.FlushDone(complete=done, pending=sum(1 for f in pending if not f.done())))
            case control.StatsRequest():
                await self._send(client, control.StatsReply(stats=self._services.stats()))
            case control.Goodbye():
                if client.pending:
                    await asyncio.wait(list(client.pending), timeout=self._services.config.daemon.shutdown_timeout_ms / 1000.0)
                return False
            case _:
                await self._send(client, control.error_reply(control.ERR_UNEXPECTED_MESSAGE, type(msg).__name__))
        return True

    async def _adopt_segment(self, client: Client, workers: int, fds: list[int]) -> bool:
        if client.segment is not None or not fds:
            for fd in fds:
                os.close(fd)
            await self._send(client, control.error_reply(control.ERR_SEGMENT_REFUSED, "no segment fds, or a second segment", fatal=True))
            return False
        n_workers = len(self._workers)
        try:
            if workers != n_workers:
                raise SegmentError(f"segment built for {workers} workers, the daemon runs {n_workers}")
            segment = Segment.attach(fds[0], fds[1:])
            if segment.workers != n_workers or not fds[1:]:
                segment.close()
                raise SegmentError("segment layout does not match the Welcome")
        except SluiceError as exc:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            log.warning("client %d (%s): segment refused: %s", client.client_id, client.name, exc)
            await self._send(client, control.error_reply(control.ERR_SEGMENT_REFUSED, str(exc), fatal=True))
            return False
        client.segment = segment
        self._workers.broadcast(ch.AddClient(client_id=client.client_id, pid=client.pid, name=client.name), segment.fds())
        log.info("client %d (%s, pid %d) attached its segment", client.client_id, client.name, client.pid)
        await self._send(client, control.SegmentAccepted(client_id=client.client_id))
        return True

    async def _close_client(self, client: Client) -> None:
        try:
            client.sock.close()
        except OSError:
            pass
        client.gone = True
        if client.segment is None:
            self.clients.pop(client.client_id, None)
            self._forget_token(client)
            return
        # Workers drain what it committed, then detach; the segment goes when all have.
        self._workers.broadcast(ch.RemoveClient(client_id=client.client_id))

    # --- tokens ----------------------------------------------------------------------------

    def _claim_token(self, client: Client, token: int) -> None:
        """A client's Hello carried ``token``: give it its old id, or remember the new one."""
        client.token = token
        cid = self._tokens.claim(token, client.client_id, self.clients)
        if cid != client.client_id:
            del self.clients[client.client_id]
            client.client_id = cid
            self.clients[cid] = client
            log.info("client %d (%s) reconnected under its previous id", cid, client.name)
            return
        self._services.state_changed()

    def _forget_token(self, client: Client) -> None:
        if self._tokens.forget(client.token, client.client_id):
            self._services.state_changed()

