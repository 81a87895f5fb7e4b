"""The control-socket server: accept, peer checks, fd passing, the conversation, segment adoption.

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
- The conversation: Hello first and once, SegmentOffer only after a Hello that asked for it;
  anything else out of place is a fatal UNEXPECTED_MESSAGE. A malformed frame is a fatal
  BAD_FRAME (the frames before it in the same read are served first). A fatal ErrorReply is
  the connection's last frame; the daemon carries on.
- Frames of one connection are read in order, by :class:`daemon.ingest.FrameReader` (a plain
  Produce stays msgpack until ingest writes it into the rings; consecutive ones without ack to
  one topic in one read come as one message). A Produce to a topic ingest already knows goes
  into the rings before the next frame is read (a full ring under ``on_full = "block"`` stops
  the reading: back-pressure). A Produce that needs a topic lookup goes into a queue of its
  topic that one task empties in order, the lookup first, and the next Produces to that topic
  join the queue while it exists (per-topic order), while frames for other topics go on. TopicLookup, Flush and StatsRequest are worked on at once, their replies queued in request
  order (:meth:`ControlServer._in_order`).
- Partition growth: a connection whose Hello set ``topic_updates`` gets a TopicChanged when
  any topic gains partitions (:meth:`ControlServer.topic_changed`, after every worker
  was told). It is queued at once, not in request order: it answers no request.
- Memory per connection is bounded: replies wait in the connection's queue, written as the
  client reads them; once more than ``MAX_UNSENT_REPLY_BYTES`` wait there, or more than
  ``MAX_INFLIGHT_RECORDS`` of the connection's records have no outcome yet, the daemon stops
  reading that connection until both are below again (a client that never reads its replies is
  stopped, not buffered). What a closed connection leaves behind is only its records still in
  flight, which go when their outcomes come.
- Segments: adopted only when their layout matches the Welcome; the daemon keeps the mapping
  after the client goes, and releases it once every worker drained and detached it.
- Tokens: a client that can reconnect gets its previous id back after a daemon crash
  (daemon/state.py), so the recovered records' completions reach it.
- Drops: a client counts the records it drops under ``on_full = "drop"`` in its segment, per
  topic id (shm/layout.py). :meth:`ControlServer.drop_counts` reads every segment the daemon
  holds and adds what released segments said last, so a client's drops are counted after it
  exits or dies too.
- Stopping (:meth:`ControlServer.finish_socket_clients`, then :meth:`ControlServer.close`):
  stop reading every connection; wait, up to the deadline, for the outcomes of the records
  already read and send their ProduceAcks (ingest refuses records still waiting for ring space
  with SHUTTING_DOWN, and at the deadline answers the rest as OUTCOME_UNKNOWN); then a fatal
  SHUTTING_DOWN and close. Shared-memory clients hear SHUTTING_DOWN last, after the workers
  drained their rings.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable
from typing import Any, Protocol

from daemon import channel as ch
from daemon.config import Config
from daemon.ingest import INGEST_CLIENT_NAME, FrameReader, PackedProduce, SocketIngest, record_count
from daemon.peercred import check_peer, peer_credentials
from daemon.state import Tokens
from daemon.tasks import TaskSet
from shm import control
from shm.errors import KafkaError, ProtocolError, SegmentError, SluiceError
from shm.segment import Segment, fds_of

__all__ = [
    "MAX_INFLIGHT_RECORDS",
    "MAX_UNSENT_REPLY_BYTES",
    "Client",
    "ControlServer",
    "Services",
    "WorkerLink",
    "bind_listener",
]

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
# A closing connection's queued replies (a fatal ErrorReply last) are written as long as the
# client reads some of them every this long; a client that stops reading loses the rest.
_CLOSE_FLUSH_S = 2.0
_FLUSH_POLL_S = 0.005
# How many loop turns a closing connection waits for its reader to be unregistered.
_READER_GONE_TURNS = 1000
# Reads of unread data a closing connection drops (_discard_unread), at _RECV_BYTES each.
_DISCARD_READS = 64
# Replies written with one send: small frames are joined up to this size.
_WRITE_CHUNK = 256 * 1024
# After the shutdown deadline, how long the acks it released get to be queued.
_GIVE_UP_WAIT_S = 1.0

MAX_UNSENT_REPLY_BYTES = 8 * 1024 * 1024
"""Reply bytes queued for one connection beyond which the daemon stops reading it."""
MAX_INFLIGHT_RECORDS = 262_144
"""Records of one connection without an outcome yet beyond which the daemon stops reading it.
At most ~35 MiB of futures per connection (acknowledged frames); 131,072 held one fast
connection (`sluice send`, 1,000-line frames) to 0.93M records/s, this lets it reach 1.2M."""

_STOPPED = object()  # _read's answer once the daemon stopped reading the connection


class WorkerLink(Protocol):
    """The workers as the server sees them: how many, and a message to all of them."""

    def __len__(self) -> int: ...

    def broadcast(self, msg: Any, fds: list[int] | None = None) -> None: ...


class Services(Protocol):
    """What the server hands on to the rest of the daemon."""

    config: Config

    async def lookup_topic(self, name: str) -> control.TopicInfo: ...

    def stats(self) -> dict[str, Any]: ...

    def state_changed(self) -> None: ...

    @property
    def topic_id_bound(self) -> int:
        """Every topic id handed out is below this."""
        ...


class Client:
    """A socket connection; with a segment when it is a shared-memory client.

    It is the :class:`daemon.ingest.Origin` of its Produce frames: ``reply`` queues a message,
    ``settled`` counts outcomes.
    """

    def __init__(self, client_id: int, sock: socket.socket) -> None:
        self.client_id = client_id
        self.sock = sock
        self.token = 0  # Hello.token: the client keeps it across daemon restarts
        self.name = ""
        self.pid = 0
        self.internal = False  # the daemon's own socket-ingest producer
        self.greeted = False  # Hello came
        self.wants_segment = False
        self.topic_updates = False  # Hello.topic_updates: it is told when a topic grows
        self.segment: Segment | None = None
        self.detached: set[int] = set()  # workers that drained and let go of the segment
        self.gone = False  # its connection closed: workers drain its segment, then detach
        self.inbox: deque[tuple[Any, list[int]]] = deque()
        self.bad_frame: ProtocolError | None = None  # raised once the frames before it are served
        # Outcomes still to come: ack and completion waiters, Produce tasks waiting on a lookup.
        self.pending: set[asyncio.Future[Any]] = set()
        # Per topic waiting on a lookup: its Produces in order, each with the future Flush waits
        # on; one task empties the queue (ControlServer._drain_topic).
        self.queues: dict[str, deque[tuple[control.Produce | PackedProduce, asyncio.Future[None]]]] = {}
        self.last_ordered: asyncio.Future[Any] | None = None  # the latest in-order reply
        self.inflight = 0  # records without an outcome yet
        self.failed = 0  # records failed since the last FlushDone
        # The reply queue, written by the writer task.
        self.out: deque[bytes] = deque()
        self.unsent = 0
        self.out_ready = asyncio.Event()
        self.room = asyncio.Event()  # set while the daemon may read this connection
        self.room.set()
        self.paused = False
        self.reading = True  # False once the daemon stopped reading (Goodbye, fatal, shutdown)
        self.dispatching = False  # a frame is being served (a Produce may wait for ring space)
        self.read_fut: asyncio.Future[Any] | None = None
        self.final = False  # a fatal ErrorReply or Goodbye: nothing more is queued
        self.closing = False  # _close_client has begun
        self.closed = False  # the socket is closed (or broken): replies are dropped
        self.writer: asyncio.Task[Any] | None = None

    # --- daemon.ingest.Origin --------------------------------------------------------------

    def reply(self, msg: Any) -> None:
        if self.closed or self.final:
            return
        self._queue(control.encode(msg))

    def reply_frame(self, frame: bytes) -> None:
        """Queue an encoded message (one frame encoded once for many connections)."""
        if self.closed or self.final:
            return
        self._queue(frame)

    def settled(self, records: int, failed: int) -> None:
        self.inflight -= records
        self.failed += failed
        self.check_room()

    # --- the queue ---------------------------------------------------------------------------

    def _queue(self, data: bytes) -> None:
        self.out.append(data)
        self.unsent += len(data)
        self.out_ready.set()
        self.check_room()

    def check_room(self) -> None:
        """Open or close the reading gate after the queue or the records in flight changed."""
        if not self.reading or (self.unsent <= MAX_UNSENT_REPLY_BYTES and self.inflight <= MAX_INFLIGHT_RECORDS):
            self.room.set()
        else:
            self.room.clear()

    def stop_reading(self) -> None:
        self.reading = False
        self.room.set()
        if self.read_fut is not None and not self.read_fut.done():
            self.read_fut.set_result(None)


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

    def __init__(self, services: Services, workers: WorkerLink, tokens: Tokens, ingest: SocketIngest) -> None:
        self.clients: dict[int, Client] = {}
        self._services = services
        self._workers = workers
        self._tokens = tokens
        self._ingest = ingest
        self._listener: socket.socket | None = None
        self._next_client = 1
        self._stopping = False
        # Drops by topic id of the segments already released, as each said last.
        self._released_drops: list[int] = []
        # Closed connections whose records still wait for their outcomes (for stats).
        self._leaving: set[Client] = set()
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

    async def finish_socket_clients(self, timeout: float) -> None:
        """Shutdown, first step: stop reading every client; for socket clients (no segment),
        wait up to ``timeout`` seconds for the outcomes of the records already read, send
        their ProduceAcks (unfinished ones as OUTCOME_UNKNOWN), then a fatal SHUTTING_DOWN,
        and close. Shared-memory clients stay connected until :meth:`close`."""
        self._ingest.stop()
        clients = [c for c in self.clients.values() if not c.internal and not c.closing]
        for client in clients:
            client.stop_reading()
        socket_clients = [c for c in clients if c.segment is None]
        if not await _settle(socket_clients, timeout):
            log.warning("shutdown: socket Produces still without outcome after %.0fs; answering OUTCOME_UNKNOWN", timeout)
            self._ingest.give_up()
            await _settle(socket_clients, _GIVE_UP_WAIT_S)
        await asyncio.gather(*(self._say_goodbye(c) for c in socket_clients))

    async def _say_goodbye(self, client: Client, *, release: bool = True) -> None:
        client.reply(control.error_reply(control.ERR_SHUTTING_DOWN, "the daemon is stopping", fatal=True))
        client.final = True
        await self._close_client(client, release=release)

    async def close(self) -> None:
        """Close every connection and release every segment (the workers are gone)."""
        # The shared-memory clients: their rings are drained, so now they hear why.
        await asyncio.gather(*(
            self._say_goodbye(c, release=False) for c in list(self.clients.values()) if not c.closing and not c.internal
        ))
        # Stop the connection tasks before closing their sockets: closing an fd that still has
        # a reader registered makes uvloop abort the whole process (SIGABRT, exit -6).
        await self._tasks.cancel(_CANCEL_WAIT_S)
        for client in list(self.clients.values()):
            client.closed = True
            try:
                client.sock.close()
            except OSError:
                pass
            if client.segment is not None:
                client.segment.close()

    # --- what the rest of the daemon asks --------------------------------------------------

    def connection_count(self) -> int:
        return sum(1 for c in self.clients.values() if not c.closed)

    def segment_count(self) -> int:
        """Shared-memory clients: connections whose segment the workers still hold."""
        return sum(1 for c in self.clients.values() if c.segment is not None)

    def socket_stats(self) -> dict[str, int]:
        """The connections' side of stats ``socket``: open client connections (the daemon's
        own producer not counted), those whose reading is paused for back-pressure, reply
        bytes queued, records without an outcome."""
        conns = [c for c in self.clients.values() if not c.closed and not c.internal]
        self._leaving = {c for c in self._leaving if c.inflight > 0}
        return {
            "connections": len(conns),
            "paused": sum(1 for c in conns if c.paused),
            "unsent_reply_bytes": sum(c.unsent for c in conns),
            "inflight_records": sum(c.inflight for c in conns) + sum(c.inflight for c in self._leaving),
        }

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

    def topic_changed(self, name: str, topic_id: int, partitions: int) -> int:
        """``name`` grew to ``partitions``: tell every connection whose Hello asked
        (``topic_updates``), at once, ahead of any reply still queued behind a request. Returns
        how many were told."""
        msg = control.TopicChanged(topic=name, topic_id=topic_id, partitions=partitions)
        frame = control.encode(msg)
        told = 0
        for client in list(self.clients.values()):
            if client.topic_updates and not (client.closed or client.final):
                client.reply_frame(frame)
                told += 1
        return told

    def client_dropped(self, cid: int, reason: str) -> None:
        """A worker found the client's ring malformed: tell it why and cut the connection."""
        client = self.clients.get(cid)
        log.error("client %d dropped: %s", cid, reason)
        if client is None or client.closing:
            return
        self._tasks.spawn(self._fatal(client, control.ERR_BAD_FRAME, reason), f"client-{cid}-dropped")

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
            if self._tokens.reserve(cid):
                # Saved before the id reaches a worker (and so an arena's runs tables).
                self._services.state_changed()
            client = Client(cid, sock)
            self.clients[cid] = client
            client.writer = self._tasks.spawn(self._write_loop(client), f"client-{cid}-writer")
            self._tasks.spawn(self._serve(client), f"client-{cid}")

    async def _write_loop(self, client: Client) -> None:
        """Writes the connection's queued replies as the client takes them."""
        loop = asyncio.get_running_loop()
        while True:
            if not client.out:
                client.out_ready.clear()
                await client.out_ready.wait()
                continue
            parts = [client.out.popleft()]
            size = len(parts[0])
            while client.out and size < _WRITE_CHUNK:
                parts.append(client.out.popleft())
                size += len(parts[-1])
            try:
                await loop.sock_sendall(client.sock, parts[0] if len(parts) == 1 else b"".join(parts))
            except OSError:
                # The client is gone: nothing queued can reach it any more.
                client.closed = True
                client.out.clear()
                client.unsent = 0
                client.stop_reading()
                return
            client.unsent -= size
            client.check_room()

    async def _flush_replies(self, client: Client, timeout: float) -> None:
        """Wait for the queued replies to be written, as long as the client takes some of
        them every ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        left = client.unsent
        while client.unsent and not client.closed and time.monotonic() < deadline:
            await asyncio.sleep(_FLUSH_POLL_S)
            if client.unsent < left:
                left = client.unsent
                deadline = time.monotonic() + timeout

    async def _read(self, client: Client, reader: FrameReader) -> Any:
        """The next (message, fds) of ``client``; None at EOF, _STOPPED once the daemon stopped
        reading it.

        Only a SegmentOffer may bring fds; any others are closed, never kept.

        Raises:
            ProtocolError: a malformed frame (after the frames before it were returned).
        """
        loop = asyncio.get_running_loop()
        if not client.reading:
            # Frames decoded but not served yet were not read, as far as the client can tell:
            # the daemon never answers them, so they must not be served either.
            for _msg, fds in client.inbox:
                for fd_ in fds:
                    os.close(fd_)
            client.inbox.clear()
            return _STOPPED
        while not client.inbox:
            if client.bad_frame is not None:
                raise client.bad_frame
            if not client.room.is_set():
                client.paused = True
                await client.room.wait()
                client.paused = False
            if not client.reading:
                return _STOPPED
            fut = client.read_fut = loop.create_future()
            fd = client.sock.fileno()
            loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
            try:
                await fut
            finally:
                loop.remove_reader(fd)
                client.read_fut = None
            if not client.reading:
                return _STOPPED
            try:
                data, anc, _flags, _ = client.sock.recvmsg(_RECV_BYTES, _MAX_ANCILLARY)
            except (BlockingIOError, InterruptedError):
                continue
            fds = fds_of(anc)
            if not data:
                for fd_ in fds:
                    os.close(fd_)
                return None
            msgs: list[Any] = []
            try:
                for m in reader.feed(data):
                    msgs.append(m)
            except ProtocolError as exc:
                client.bad_frame = exc
            if fds:
                if len(msgs) == 1 and isinstance(msgs[0], control.SegmentOffer):
                    client.inbox.append((msgs[0], fds))
                    continue
                for fd_ in fds:
                    os.close(fd_)
            client.inbox.extend((m, []) for m in msgs)
        return client.inbox.popleft()

    async def _serve(self, client: Client) -> None:
        reader = FrameReader()
        stopped = False  # by whoever stopped the reading, who then closes the connection
        try:
            refused = self._check_peer(client)
            if refused:
                await self._refuse(client, reader, refused)
                return
            while True:
                try:
                    item = await self._read(client, reader)
                except ProtocolError as exc:
                    log.warning("client %d (%s): bad frame: %s", client.client_id, client.name, exc)
                    await self._fatal(client, control.ERR_BAD_FRAME, str(exc))
                    return
                if item is _STOPPED:
                    stopped = True
                    return
                if item is None:
                    # EOF, perhaps only a half-close: as a Goodbye, what was asked is answered.
                    await self._wind_up(client)
                    return
                msg, fds = item
                client.dispatching = True
                try:
                    if not await self._dispatch(client, msg, fds):
                        return
                finally:
                    client.dispatching = False
        except (ConnectionError, OSError) as exc:
            log.info("client %d (%s): connection lost: %s", client.client_id, client.name, exc)
        finally:
            if not stopped:
                await self._close_client(client)

    async def _refuse(self, client: Client, reader: FrameReader, reason: str) -> None:
        client.reply(control.error_reply(control.ERR_NOT_ALLOWED, reason, fatal=True))
        client.final = True
        try:
            item = await asyncio.wait_for(self._read(client, reader), _REFUSE_LINGER_S)
        except (asyncio.TimeoutError, SluiceError):
            item = None
        items = ([item] if isinstance(item, tuple) else []) + list(client.inbox)
        for _msg, fds in items:
            for fd in fds:  # a SegmentOffer sent ahead of the reply: not ours to keep
                os.close(fd)
        client.inbox.clear()
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

    async def _fatal(self, client: Client, code: int, message: str) -> None:
        """The connection's last word: replies not queued yet are dropped, then close."""
        if client.last_ordered is not None:
            client.last_ordered.cancel()
        client.reply(control.error_reply(code, message, fatal=True))
        client.final = True
        await self._close_client(client)

    async def _dispatch(self, client: Client, msg: Any, fds: list[int]) -> bool:
        """Handle one message; False to close the connection."""
        if not client.greeted and not isinstance(msg, control.Hello):
            for fd in fds:
                os.close(fd)
            name = "Produce" if isinstance(msg, PackedProduce) else type(msg).__name__
            await self._fatal(client, control.ERR_UNEXPECTED_MESSAGE, f"{name} before Hello")
            return False
        match msg:
            case control.Hello(
                version=version, client_name=name, pid=pid, token=token, wants_segment=wants, topic_updates=updates
            ):
                if client.greeted:
                    await self._fatal(client, control.ERR_UNEXPECTED_MESSAGE, "a second Hello")
                    return False
                if version < control.MIN_PROTOCOL_VERSION:
                    await self._fatal(
                        client,
                        control.ERR_UNSUPPORTED_PROTOCOL_VERSION,
                        f"version {version} < {control.MIN_PROTOCOL_VERSION}",
                    )
                    return False
                client.greeted = True
                client.wants_segment = wants
                client.topic_updates = updates
                client.name = name or f"client-{client.client_id}"
                client.internal = client.pid == os.getpid() and name == INGEST_CLIENT_NAME
                client.pid = client.pid or pid
                if token and wants and not client.token:
                    self._claim_token(client, token)
                cfg = self._services.config.daemon
                client.reply(
                    control.Welcome(
                        version=min(version, control.PROTOCOL_VERSION),
                        workers=len(self._workers),
                        request_ring_bytes=cfg.request_ring_bytes,
                        completion_ring_bytes=cfg.completion_ring_bytes,
                        client_id=client.client_id,
                    ),
                )
            case control.SegmentOffer(workers=workers):
                if not client.wants_segment:
                    for fd in fds:
                        os.close(fd)
                    await self._fatal(client, control.ERR_UNEXPECTED_MESSAGE, "SegmentOffer after a Hello without wants_segment")
                    return False
                return await self._adopt_segment(client, workers, fds)
            case control.TopicLookup(topic=name):
                self._in_order(client, self._lookup_reply(name))
            case control.Produce() | PackedProduce():
                await self._produce(client, msg)
            case control.Flush(timeout_ms=ms):
                self._in_order(client, self._flush_reply(client, ms))
            case control.StatsRequest():
                self._in_order(client, self._stats_reply())
            case control.Goodbye():
                await self._wind_up(client)
                return False
        return True

    async def _wind_up(self, client: Client) -> None:
        """Goodbye or EOF: read nothing more; the pending acks and replies go out (within the
        shutdown timeout, and only while the client can still read them)."""
        client.stop_reading()
        deadline = time.monotonic() + self._services.config.daemon.shutdown_timeout_ms / 1000.0
        waits = _outstanding(client)
        while waits and not client.closed and client.writer is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # The writer ends only when the client is gone: then nobody waits for the replies.
            await asyncio.wait([*waits, client.writer], timeout=left, return_when=asyncio.FIRST_COMPLETED)
            waits = [w for w in waits if not w.done()]
        client.final = True

    # --- requests --------------------------------------------------------------------------

    def _in_order(self, client: Client, work: Awaitable[Any]) -> None:
        """Work on a request now; queue its reply after the replies of the requests before it."""
        prev = client.last_ordered
        client.last_ordered = self._tasks.spawn(self._reply_after(client, prev, work), f"client-{client.client_id}-reply")

    @staticmethod
    async def _reply_after(client: Client, prev: asyncio.Future[Any] | None, work: Awaitable[Any]) -> None:
        reply = await work
        if prev is not None and not prev.done():
            await asyncio.wait([prev])
        client.reply(reply)

    async def _lookup_reply(self, name: str) -> Any:
        try:
            return await self._services.lookup_topic(name)
        except KafkaError as exc:
            return control.ErrorReply(code=exc.code, name=exc.name, message=str(exc), fatal=False)
        except SluiceError as exc:
            return control.ErrorReply(code=-1, name="UNKNOWN_SERVER_ERROR", message=str(exc), fatal=False)

    async def _flush_reply(self, client: Client, timeout_ms: int) -> control.FlushDone:
        waits = [f for f in client.pending if not f.done()]
        done = True
        if waits:
            _, still = await asyncio.wait(waits, timeout=timeout_ms / 1000.0)
            done = not still
        failed, client.failed = client.failed, 0
        return control.FlushDone(complete=done, pending=0 if done else max(client.inflight, 1), failed=failed)

    async def _stats_reply(self) -> control.StatsReply:
        return control.StatsReply(stats=self._services.stats())

    async def _produce(self, client: Client, msg: control.Produce | PackedProduce) -> None:
        """Into the rings now when the topic is known and nothing of it waits; else into the
        topic's queue, behind the connection's earlier Produces to that topic."""
        client.inflight += record_count(msg)
        client.check_room()
        topic = msg.topic
        queue = client.queues.get(topic)
        if queue is None and self._ingest.known(topic):
            waiter = await self._ingest.produce(msg, client)
            if waiter is not None:
                self._track(client, waiter)
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._track(client, done)
        if queue is None:
            queue = client.queues[topic] = deque()
            self._tasks.spawn(self._drain_topic(client, topic, queue), f"client-{client.client_id}-topic")
        if isinstance(msg, PackedProduce):
            msg.keep()  # it waits beyond this read
        queue.append((msg, done))

    async def _drain_topic(
        self, client: Client, topic: str, queue: deque[tuple[control.Produce | PackedProduce, asyncio.Future[None]]]
    ) -> None:
        """Produce the topic's queued frames in order (the first waits for the lookup, the rest
        follow at once); the queue goes when empty, and later frames go inline again."""
        try:
            while queue:
                msg, done = queue[0]
                waiter = await self._ingest.produce(msg, client)
                queue.popleft()
                if waiter is None:
                    done.set_result(None)
                else:
                    waiter.add_done_callback(lambda _w, d=done: d.done() or d.set_result(None))
        finally:
            # Empty, or cancelled (the daemon is closing): nothing may wait on these any more.
            client.queues.pop(topic, None)
            for _msg, done in queue:
                if not done.done():
                    done.cancel()

    @staticmethod
    def _track(client: Client, fut: asyncio.Future[Any]) -> None:
        client.pending.add(fut)
        fut.add_done_callback(client.pending.discard)

    async def _adopt_segment(self, client: Client, workers: int, fds: list[int]) -> bool:
        if client.segment is not None or not fds:
            for fd in fds:
                os.close(fd)
            await self._fatal(client, control.ERR_SEGMENT_REFUSED, "no segment fds, or a second segment")
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
            await self._fatal(client, control.ERR_SEGMENT_REFUSED, str(exc))
            return False
        client.segment = segment
        self._workers.broadcast(ch.AddClient(client_id=client.client_id, pid=client.pid, name=client.name), segment.fds())
        log.info("client %d (%s, pid %d) attached its segment", client.client_id, client.name, client.pid)
        client.reply(control.SegmentAccepted(client_id=client.client_id))
        return True

    async def _close_client(self, client: Client, *, release: bool = True) -> None:
        """Stop reading, let the queued replies out (briefly), close. Records already taken
        are still delivered; replies for them are dropped. ``release``: tell the workers to
        drain and let go of its segment (not when they are gone already)."""
        if client.closing:
            return
        client.closing = True
        client.stop_reading()
        await self._flush_replies(client, _CLOSE_FLUSH_S)
        if client.writer is not None and client.writer is not asyncio.current_task():
            client.writer.cancel()
            await asyncio.wait([client.writer], timeout=_CANCEL_WAIT_S)
        # The serve task unregisters its reader when it wakes (stop_reading woke it); closing
        # the fd before would make uvloop abort, and removing it here could hit a reused fd.
        for _ in range(_READER_GONE_TURNS):
            if client.read_fut is None:
                break
            await asyncio.sleep(0)
        client.closed = True
        client.out.clear()
        client.unsent = 0
        _discard_unread(client.sock)
        try:
            client.sock.close()
        except OSError:
            pass
        client.gone = True
        if client.inflight > 0:
            self._leaving.add(client)
        if client.segment is None:
            self.clients.pop(client.client_id, None)
            self._forget_token(client)
            return
        # Workers drain what it committed, then detach; the segment goes when all have.
        if release:
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


def _discard_unread(sock: socket.socket) -> None:
    """Read and drop what the client sent that will never be served (frames after a Goodbye,
    a fatal error or the shutdown's stop): a Unix socket closed with unread data makes the
    peer's next read fail with ECONNRESET instead of EOF. Bounded: a client still writing
    may see the reset all the same."""
    for _ in range(_DISCARD_READS):
        try:
            if not sock.recv(_RECV_BYTES):
                return
        except OSError:  # BlockingIOError: nothing more now; anything else: gone anyway
            return


async def _settle(clients: list[Client], timeout: float) -> bool:
    """Wait up to ``timeout`` until no frame of ``clients`` is being served and nothing they
    asked for is outstanding; True when so. Serving a frame may add outstanding work, so the
    set is taken again after every wait."""
    deadline = time.monotonic() + timeout
    while True:
        waits = [f for c in clients for f in _outstanding(c)]
        busy = any(c.dispatching for c in clients)
        if not waits and not busy:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if waits:
            await asyncio.wait(waits, timeout=min(left, _FLUSH_POLL_S) if busy else left)
        else:
            await asyncio.sleep(min(left, _FLUSH_POLL_S))


def _outstanding(client: Client) -> list[asyncio.Future[Any]]:
    """What a client's records and requests still wait for."""
    waits = [f for f in client.pending if not f.done()]
    if client.last_ordered is not None and not client.last_ordered.done():
        waits.append(client.last_ordered)
    return waits
