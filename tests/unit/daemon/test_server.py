"""daemon.server: a real ControlServer on a real Unix socket, driven by a raw protocol client.

The rest of the daemon is played by two recorders (the Services and the workers): what the
server hands on to them, and the frames a client sees, are what the tests check. Segments are
real (shm.Segment.create) and travel with SCM_RIGHTS as a shm.Producer sends them.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from daemon import channel as ch
from daemon.config import Config, loads
from daemon.ingest import Origin, PackedProduce
from daemon.protocol.errors import UNKNOWN_TOPIC_OR_PARTITION
from daemon.server import ControlServer
from daemon.state import Tokens
from shm import control
from shm.errors import KafkaError
from shm.segment import Segment, send_fds

WORKERS = 2
TOKEN = 0x1234_5678_9ABC_DEF1


class Services:
    """The supervisor's side: topic lookups, produce, stats and saves, recorded."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.produced: list[control.Produce] = []
        self.saves = 0
        self.topic_id_bound = 5  # every topic is id 4

    async def lookup_topic(self, name: str) -> control.TopicInfo:
        if name.startswith("slow"):
            await asyncio.sleep(0.3)
        if name == "nope":
            raise KafkaError.for_code(UNKNOWN_TOPIC_OR_PARTITION)
        return control.TopicInfo(
            topic=name, topic_id=4, partitions=3, profile="default", max_request_size=1 << 20,
            on_full="drop" if name == "clicks" else "block", max_block_ms=60_000, batch_size=16384, linger_ms=5,
        )

    def stats(self) -> dict[str, Any]:
        return {"connections": 1}

    def state_changed(self) -> None:
        self.saves += 1


class Ingest:
    """Socket ingest, recorded: every topic is known, every record settles at once."""

    def __init__(self) -> None:
        self.produced: list[control.Produce] = []
        self.stopped = False
        self.result_per_record = False  # acks carry one result per record (large acks)
        self.held: list[tuple[control.Produce, Origin, asyncio.Future[None]]] = []
        self.hold = False  # outcomes come only when release() is called
        self.full = False  # produce() waits for ring space until stop(), then refuses

    def known(self, topic: str) -> bool:
        return True

    async def produce(self, msg: control.Produce | PackedProduce, origin: Origin) -> asyncio.Future[None] | None:
        if isinstance(msg, PackedProduce):  # what the server hands over as it came: read it as msgspec does
            msg = msg.decode()
        self.produced.append(msg)
        if self.full:
            while not self.stopped:
                await asyncio.sleep(0.01)
            origin.settled(len(msg.records), len(msg.records))
            result = control.RecordResult(partition=-1, offset=-1, timestamp=-1, error_code=control.ERR_SHUTTING_DOWN,
                                          error_name="SHUTTING_DOWN")
            origin.reply(control.ProduceAck(seq=msg.seq, results=[result] * len(msg.records)))
            return None
        if self.hold:
            fut = asyncio.get_running_loop().create_future()
            self.held.append((msg, origin, fut))
            return fut
        self._answer(msg, origin)
        return None

    def _answer(self, msg: control.Produce, origin: Origin) -> None:
        origin.settled(len(msg.records), 0)
        if msg.ack:
            result = control.RecordResult(partition=0, offset=1, timestamp=1, error_code=0, error_name="NONE")
            origin.reply(control.ProduceAck(seq=msg.seq, results=[result] * len(msg.records) if self.result_per_record else []))

    def release(self) -> None:
        for msg, origin, fut in self.held:
            self._answer(msg, origin)
            fut.set_result(None)
        self.held.clear()

    def stop(self) -> None:
        self.stopped = True

    def give_up(self) -> None:
        pass


class Workers:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, int]] = []  # (message, number of fds)

    def __len__(self) -> int:
        return WORKERS

    def broadcast(self, msg: Any, fds: list[int] | None = None) -> None:
        self.sent.append((msg, len(fds or ())))


class Client:
    """A raw protocol client on the loop (the server shares the thread)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.reader = control.FrameReader(control.DaemonMessage)
        self.inbox: list[Any] = []

    async def connect(self) -> Client:
        await asyncio.get_running_loop().sock_connect(self.sock, self.path)
        return self

    async def send(self, msg: Any) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, control.encode(msg))

    async def recv(self) -> Any:
        """The next message; None at EOF."""
        while not self.inbox:
            data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 65536), 5.0)
            if not data:
                return None
            self.inbox.extend(self.reader.feed(data))
        return self.inbox.pop(0)

    async def ask(self, msg: Any) -> Any:
        await self.send(msg)
        return await self.recv()

    def close(self) -> None:
        self.sock.close()


class Harness:
    def __init__(self, tmp_path: Path, config_extra: str = "") -> None:
        self.path = str(tmp_path / "s.sock")
        self.config = loads(f'[daemon]\nsocket_path = "{self.path}"\nworkers = {WORKERS}\n{config_extra}', source="test")
        self.services = Services(self.config)
        self.workers = Workers()
        self.tokens = Tokens()
        self.ingest = Ingest()
        self.server = ControlServer(self.services, self.workers, self.tokens, self.ingest)  # type: ignore[arg-type]

    def sent(self, kind: type) -> list[tuple[Any, int]]:
        return [(m, n) for m, n in self.workers.sent if isinstance(m, kind)]


def _run(tmp_path: Path, body: Callable[[Harness], Coroutine[Any, Any, None]], *, config_extra: str = "",
         before_start: Callable[[Harness], None] | None = None) -> None:
    async def main() -> None:
        h = Harness(tmp_path, config_extra)
        h.server.listen(h.path, 0o660)
        if before_start is not None:
            before_start(h)
        h.server.start()
        try:
            await body(h)
        finally:
            h.server.stop_listening(h.path)
            await h.server.close()
        assert not os.path.exists(h.path)

    asyncio.run(main())


async def _until(cond: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_socket_client_conversation(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        c = await Client(h.path).connect()
        welcome = await c.ask(control.Hello(version=control.PROTOCOL_VERSION, client_name="t"))
        assert isinstance(welcome, control.Welcome)
        assert (welcome.workers, welcome.client_id) == (WORKERS, 1)
        assert welcome.request_ring_bytes == h.config.daemon.request_ring_bytes
        info = await c.ask(control.TopicLookup(topic="orders"))
        assert isinstance(info, control.TopicInfo) and info.topic_id == 4
        err = await c.ask(control.TopicLookup(topic="nope"))
        assert isinstance(err, control.ErrorReply)
        assert (err.code, err.fatal) == (UNKNOWN_TOPIC_OR_PARTITION, False)
        stats = await c.ask(control.StatsRequest())
        assert stats == control.StatsReply(stats={"connections": 1})
        ack = await c.ask(control.Produce(topic="orders", records=[control.Rec(value=b"v")], ack=True, seq=9))
        assert ack == control.ProduceAck(seq=9, results=[])
        assert [m.topic for m in h.ingest.produced] == ["orders"]
        done = await c.ask(control.Flush(timeout_ms=100))
        assert done == control.FlushDone(complete=True, pending=0)
        assert h.server.connection_count() == 1 and h.server.segment_count() == 0
        await c.send(control.Goodbye())
        assert await c.recv() is None  # Goodbye closes the connection
        await _until(lambda: h.server.connection_count() == 0, "the connection to go")
        assert h.workers.sent == []  # no segment, so nothing for the workers
        c.close()

    _run(tmp_path, body)


def test_bad_frame_closes_only_that_connection(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        good = await Client(h.path).connect()
        bad = await Client(h.path).connect()
        await asyncio.get_running_loop().sock_sendall(bad.sock, b"\xff\xff\xff\xff garbage")
        err = await bad.recv()
        assert isinstance(err, control.ErrorReply)
        assert (err.code, err.fatal) == (control.ERR_BAD_FRAME, True)
        assert await bad.recv() is None
        welcome = await good.ask(control.Hello(version=control.PROTOCOL_VERSION))
        assert isinstance(welcome, control.Welcome)
        good.close()
        bad.close()

    _run(tmp_path, body)


def test_old_protocol_version_is_refused(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        c = await Client(h.path).connect()
        err = await c.ask(control.Hello(version=control.MIN_PROTOCOL_VERSION - 1))
        assert isinstance(err, control.ErrorReply)
        assert (err.code, err.fatal) == (control.ERR_UNSUPPORTED_PROTOCOL_VERSION, True)
        assert await c.recv() is None
        c.close()

    _run(tmp_path, body)


async def _attach(h: Harness, token: int = 0, workers: int = WORKERS) -> tuple[Client, Segment, Any, Any]:
    c = await Client(h.path).connect()
    welcome = await c.ask(control.Hello(version=control.PROTOCOL_VERSION, client_name="shm", wants_segment=True, token=token))
    seg = Segment.create(workers, welcome.request_ring_bytes, welcome.completion_ring_bytes)
    fds = seg.fds()
    offer = control.SegmentOffer(segment_bytes=seg.size, workers=workers, fd_count=len(fds))
    send_fds(c.sock, control.encode(offer), fds)
    return c, seg, welcome, await c.recv()


def test_segment_is_adopted_handed_to_workers_and_released_after_all_detach(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        c, seg, welcome, reply = await _attach(h, token=TOKEN)
        cid = welcome.client_id
        assert reply == control.SegmentAccepted(client_id=cid)
        assert h.server.segment_count() == 1
        ((add, nfds),) = h.sent(ch.AddClient)
        assert add == ch.AddClient(client_id=cid, pid=os.getpid(), name="shm")
        assert nfds == len(seg.fds())  # the memfd and every doorbell
        # Saved twice: the first block of client ids reserved, then the token.
        assert h.tokens.snapshot() == {TOKEN: cid} and h.services.saves == 2
        assert h.tokens.reserved > cid
        # A worker spawned now is introduced to the segment.
        ids, msgs = h.server.introduce(0)
        assert ids == [cid] and [type(m) for m, _ in msgs] == [ch.AddClient]
        c.close()
        await _until(lambda: h.sent(ch.RemoveClient), "RemoveClient")
        assert h.sent(ch.RemoveClient) == [(ch.RemoveClient(client_id=cid), 0)]
        # Gone but not drained: a respawned worker must drain it too, then hear it is gone.
        ids, msgs = h.server.introduce(1)
        assert ids == [cid] and [type(m) for m, _ in msgs] == [ch.AddClient, ch.RemoveClient]
        h.server.client_detached(cid, 0)
        assert h.server.segment_count() == 1
        assert h.server.introduce(0) == ([], [])  # worker 0 let go of it already
        h.server.client_detached(cid, 1)
        assert h.server.segment_count() == 0 and h.server.connection_count() == 0
        assert h.tokens.snapshot() == {} and h.services.saves == 3  # the token is forgotten, saved
        seg.close()

    _run(tmp_path, body)


def test_segment_for_another_worker_count_is_refused(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        c, seg, _, reply = await _attach(h, workers=WORKERS + 1)
        assert isinstance(reply, control.ErrorReply)
        assert (reply.code, reply.fatal) == (control.ERR_SEGMENT_REFUSED, True)
        assert await c.recv() is None
        assert h.workers.sent == [] and h.server.segment_count() == 0
        c.close()
        seg.close()

    _run(tmp_path, body)


def test_reconnecting_client_gets_its_previous_id(tmp_path: Path) -> None:
    def crashed_daemon_left(h: Harness) -> None:
        h.tokens.restore({TOKEN: 7})

    async def body(h: Harness) -> None:
        stranger = await Client(h.path).connect()
        welcome = await stranger.ask(control.Hello(version=control.PROTOCOL_VERSION))
        assert welcome.client_id == 8  # new ids start after the awaited ones
        c, seg, welcome, reply = await _attach(h, token=TOKEN)
        assert welcome.client_id == 7 and reply == control.SegmentAccepted(client_id=7)
        assert h.tokens.awaited == frozenset()
        assert set(h.server.clients) == {7, 8}
        for x in (c, stranger):
            x.close()
        seg.close()

    _run(tmp_path, body, before_start=crashed_daemon_left)


def test_dropped_client_is_told_why_and_cut_off(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        c, seg, welcome, _ = await _attach(h)
        h.server.client_dropped(welcome.client_id, "ring corrupt at 64")
        err = await c.recv()
        assert isinstance(err, control.ErrorReply)
        assert (err.code, err.message, err.fatal) == (control.ERR_BAD_FRAME, "ring corrupt at 64", True)
        assert await c.recv() is None
        c.close()
        seg.close()

    _run(tmp_path, body)


def test_peer_outside_the_allow_list_is_refused(tmp_path: Path) -> None:
    # The server trusts its own process (the socket-ingest producer), so the peer is a child.
    client = (
        "import socket, sys\n"
        "from shm import control\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(sys.argv[1])\n"
        "s.sendall(control.encode(control.Hello(version=control.PROTOCOL_VERSION)))\n"
        "r = control.FrameReader(control.DaemonMessage)\n"
        "while True:\n"
        "    msgs = list(r.feed(s.recv(65536)))\n"
        "    if msgs:\n"
        "        m = msgs[0]; print(type(m).__name__, m.code, m.fatal, m.message); break\n"
    )
    foreign = 54321 if os.getuid() != 54321 else 54322

    async def body(h: Harness) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", client, h.path, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
        kind, code, fatal, message = out.decode().strip().split(" ", 3)
        assert (kind, int(code), fatal) == ("ErrorReply", control.ERR_NOT_ALLOWED, "True")
        assert message.startswith(f"access denied: uid {os.getuid()}")
        assert str(foreign) not in message  # a refused peer learns nothing of the lists

    _run(tmp_path, body, config_extra=f"allowed_uids = [{foreign}]\n")




def test_drops_are_read_from_the_segment_and_outlive_the_client(tmp_path: Path) -> None:
    """A real Producer drops records (nothing drains its rings here) and counts them in its
    segment; the server reads the same counts, and keeps them once the segment is released."""
    from shm import Producer

    async def body(h: Harness) -> None:
        def fill() -> tuple[Producer, int]:
            p = Producer(h.path, client_name="dropper", reconnect_timeout_s=0)
            # 2 rings of 4 MiB (the default) take about 800 of these; the rest are dropped.
            futs = [p.send("clicks", b"x" * 10_000) for _ in range(1200)]
            return p, sum(1 for f in futs if f.done())

        p, dropped = await asyncio.to_thread(fill)
        assert 0 < dropped < 1200 and p.drops == {"clicks": dropped}
        assert h.server.drop_counts(5) == [0, 0, 0, 0, dropped]
        assert h.server.drop_counts(3) == [0, 0, 0]  # ids past the bound are not read
        cid = p.client_id
        await asyncio.to_thread(p.close, 0.1)
        await _until(lambda: h.sent(ch.RemoveClient), "RemoveClient")
        for w in range(WORKERS):
            h.server.client_detached(cid, w)
        assert h.server.segment_count() == 0
        assert h.server.drop_counts(5) == [0, 0, 0, 0, dropped]

    _run(tmp_path, body)


def test_hello_comes_first_and_once(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        early = await Client(h.path).connect()
        err = await early.ask(control.Produce(topic="orders", records=[control.Rec(value=b"v")], ack=True, seq=1))
        assert (err.code, err.fatal) == (control.ERR_UNEXPECTED_MESSAGE, True)
        assert await early.recv() is None and h.ingest.produced == []  # its records were not taken
        twice = await Client(h.path).connect()
        assert isinstance(await twice.ask(control.Hello(version=1)), control.Welcome)
        err = await twice.ask(control.Hello(version=1))
        assert (err.code, err.name, err.fatal) == (control.ERR_UNEXPECTED_MESSAGE, "UNEXPECTED_MESSAGE", True)
        assert await twice.recv() is None
        early.close()
        twice.close()

    _run(tmp_path, body)


def test_replies_come_in_request_order_while_lookups_overlap(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        c = await Client(h.path).connect()
        await c.ask(control.Hello(version=1))
        t0 = asyncio.get_running_loop().time()
        for msg in (control.TopicLookup(topic="slow-a"), control.TopicLookup(topic="slow-b"),
                    control.TopicLookup(topic="fast"), control.StatsRequest()):
            await c.send(msg)
        # An acknowledged Produce is not held up by the lookups before it.
        await c.send(control.Produce(topic="orders", records=[], ack=True, seq=3))
        replies = [await c.recv() for _ in range(5)]
        took = asyncio.get_running_loop().time() - t0
        assert isinstance(replies[0], control.ProduceAck)
        assert [r.topic for r in replies[1:4]] == ["slow-a", "slow-b", "fast"]
        assert isinstance(replies[4], control.StatsReply)
        assert took < 0.55  # the two slow lookups ran side by side (0.3 s each)
        c.close()

    _run(tmp_path, body)


def test_a_client_that_does_not_read_is_not_read_either(tmp_path: Path) -> None:
    from daemon.server import MAX_UNSENT_REPLY_BYTES

    async def body(h: Harness) -> None:
        h.ingest.result_per_record = True
        c = await Client(h.path).connect()
        await c.ask(control.Hello(version=1))
        frame = control.encode(control.Produce(topic="orders", records=[control.Rec()] * 5000, ack=True, seq=1))
        loop = asyncio.get_running_loop()
        sent = 0
        while True:  # never a recv
            try:
                await asyncio.wait_for(loop.sock_sendall(c.sock, frame), 0.5)
            except asyncio.TimeoutError:
                break
            sent += 1
            assert sent < 1000, "the server kept reading"
        stats = h.server.socket_stats()
        assert stats["paused"] == 1 and stats["unsent_reply_bytes"] > MAX_UNSENT_REPLY_BYTES
        read_then = len(h.ingest.produced)
        await asyncio.sleep(0.2)
        assert len(h.ingest.produced) == read_then  # stopped, not buffering
        # Once the client reads its replies, the server reads again: every frame is answered.
        acks = 0
        while acks < sent:
            msg = await c.recv()
            assert isinstance(msg, control.ProduceAck) and len(msg.results) == 5000
            acks += 1
        assert h.server.socket_stats()["paused"] == 0 and len(h.ingest.produced) == sent
        c.close()

    _run(tmp_path, body)


def test_shutdown_acknowledges_what_was_read_then_says_shutting_down(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        h.ingest.hold = True
        c = await Client(h.path).connect()
        await c.ask(control.Hello(version=1))
        await c.send(control.Produce(topic="orders", records=[control.Rec(value=b"a")], ack=True, seq=1))
        await _until(lambda: len(h.ingest.produced) == 1, "the Produce read")
        finishing = asyncio.ensure_future(h.server.finish_socket_clients(5.0))
        await asyncio.sleep(0.05)
        assert h.ingest.stopped and not finishing.done()  # waiting for the outcome
        await c.send(control.Produce(topic="orders", records=[control.Rec(value=b"b")], ack=True, seq=2))
        await asyncio.sleep(0.05)
        h.ingest.release()
        ack = await c.recv()
        assert isinstance(ack, control.ProduceAck) and ack.seq == 1
        bye = await c.recv()
        assert (bye.code, bye.name, bye.fatal) == (control.ERR_SHUTTING_DOWN, "SHUTTING_DOWN", True)
        assert await c.recv() is None
        await asyncio.wait_for(finishing, 5)
        assert [m.seq for m in h.ingest.produced] == [1]  # the frame after the stop was never read
        c.close()

    _run(tmp_path, body)


def test_shutdown_while_a_produce_waits_for_room_serves_nothing_after_it(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        h.ingest.full = True
        c = await Client(h.path).connect()
        await c.ask(control.Hello(version=1))
        two = b"".join(control.encode(control.Produce(topic="orders", records=[control.Rec(value=b"x")], ack=True, seq=n))
                       for n in (1, 2))
        await asyncio.get_running_loop().sock_sendall(c.sock, two)  # one read brings both
        await _until(lambda: len(h.ingest.produced) == 1, "the first Produce waiting for room")
        await asyncio.wait_for(h.server.finish_socket_clients(5.0), 5)
        ack = await c.recv()
        assert isinstance(ack, control.ProduceAck) and ack.seq == 1
        assert ack.results[0].error_name == "SHUTTING_DOWN"  # refused, never delivered
        bye = await c.recv()
        assert isinstance(bye, control.ErrorReply) and bye.name == "SHUTTING_DOWN" and bye.fatal
        assert await c.recv() is None
        # The second frame was decoded with the first but never served, and never answered.
        assert [m.seq for m in h.ingest.produced] == [1]
        c.close()

    _run(tmp_path, body)


def test_topic_changed_goes_only_to_clients_that_asked_and_is_not_a_reply(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        asked = await Client(h.path).connect()
        plain = await Client(h.path).connect()
        await asked.ask(control.Hello(version=1, topic_updates=True))
        await plain.ask(control.Hello(version=1))
        # A push while a slow lookup is being answered comes ahead of its reply.
        await asked.send(control.TopicLookup(topic="slow-x"))
        await plain.send(control.TopicLookup(topic="slow-x"))
        await asyncio.sleep(0.05)
        assert h.server.topic_changed("orders", 4, 6) == 1
        changed = control.TopicChanged(topic="orders", topic_id=4, partitions=6)
        assert await asked.recv() == changed
        reply = await asked.recv()
        assert isinstance(reply, control.TopicInfo) and reply.topic == "slow-x"
        reply = await plain.recv()  # the client that did not ask gets only its reply
        assert isinstance(reply, control.TopicInfo) and reply.topic == "slow-x"
        stats = await plain.ask(control.StatsRequest())
        assert isinstance(stats, control.StatsReply) and plain.inbox == []
        # A connection that is going gets nothing more.
        await asked.send(control.Goodbye())
        assert await asked.recv() is None
        assert h.server.topic_changed("orders", 4, 7) == 0
        asked.close()
        plain.close()

    _run(tmp_path, body)
