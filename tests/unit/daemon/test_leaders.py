"""Leader changes, leader epochs and throttling, against an in-process two-broker double.

Each node speaks the wire protocol through the codec's request decoders and response encoders.
The double exists to force what a healthy cluster does only at random moments: a stale Metadata
answer, a refused batch naming the new leader (KIP-951 CurrentLeader), a partition with no
leader, a throttle. Broker deaths and leader changes on the real thing: tests/cluster/.
"""

from __future__ import annotations

import asyncio
import importlib.util
import struct
import time
from pathlib import Path
from typing import Any

from daemon.config import KafkaSettings, Profile
from daemon.protocol import errors as ec
from daemon.protocol import messages as m
from daemon.sender import Sender

TOPIC = "t"

# The single-broker double's batch, accumulator and helpers (a module name of their own: the
# integration tests have a test_sender too).
_spec = importlib.util.spec_from_file_location("unit_sender_double", Path(__file__).with_name("test_sender.py"))
assert _spec is not None and _spec.loader is not None
_double = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_double)
FakeAccumulator, FakeBatch, fast_profile, run = _double.FakeAccumulator, _double.FakeBatch, _double.fast_profile, _double.run


class FakeCluster:
    """Two nodes (1 and 2) serving one topic of one partition.

    ``leader``/``epoch`` are the truth; ``metadata`` is what Metadata answers (it may lag: a
    stale view); ``throttle_ms`` is put in the next Produce response.
    """

    def __init__(self) -> None:
        self.leader = 1
        self.epoch = 0
        self.metadata: tuple[int, int] = (1, 0)  # (leader, epoch) Metadata answers
        self.ports: dict[int, int] = {}
        self.produced: list[tuple[int, int, float]] = []  # (node, batch number, monotonic time)
        self.log: list[int] = []
        self.metadata_requests = 0
        self.throttle_ms = 0
        self._servers: list[asyncio.AbstractServer] = []
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        for node in (1, 2):
            server = await asyncio.start_server(lambda r, w, n=node: self._serve(n, r, w), "127.0.0.1", 0)
            self.ports[node] = server.sockets[0].getsockname()[1]
            self._servers.append(server)

    async def stop(self) -> None:
        for w in self._writers:
            w.close()
        for s in self._servers:
            s.close()
            await s.wait_closed()

    def move_leader(self, node: int) -> None:
        """An election: ``node`` leads from a new epoch on (Metadata keeps its own view)."""
        self.leader = node
        self.epoch += 1

    async def _serve(self, node: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            while True:
                size = struct.unpack(">i", await reader.readexactly(4))[0]
                data = await reader.readexactly(size)
                writer.write(self._answer(node, struct.unpack_from(">h", data)[0], data))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _answer(self, node: int, api_key: int, data: bytes) -> bytes:
        if api_key == m.API_VERSIONS:
            hdr, _ = m.decode_api_versions_request(data)
            keys = [m.ApiVersionRange(k, 0, hi) for k, (_, hi) in m.SUPPORTED_VERSIONS.items()]
            return m.encode_api_versions_response(hdr.correlation_id, hdr.api_version, m.ApiVersionsResponse(0, keys))
        if api_key == m.METADATA:
            hdr, req = m.decode_metadata_request(data)
            self.metadata_requests += 1
            leader, epoch = self.metadata
            part = m.MetadataPartition(0 if leader >= 0 else ec.LEADER_NOT_AVAILABLE, 0, leader, epoch, [1, 2], [1, 2])
            topics = [m.MetadataTopic(0, name, b"\x01" * 16, False, [part]) for name in req.topics or [] if name == TOPIC]
            brokers = [m.MetadataBroker(n, "127.0.0.1", p) for n, p in self.ports.items()]
            return m.encode_metadata_response(hdr.correlation_id, hdr.api_version,
                                              m.MetadataResponse(0, brokers, "c", 1, topics))
        if api_key == m.INIT_PRODUCER_ID:
            hdr, _ = m.decode_init_producer_id_request(data)
            resp = m.InitProducerIdResponse(0, 0, 1000, 0)
            return m.encode_init_producer_id_response(hdr.correlation_id, hdr.api_version, resp)
        if api_key == m.PRODUCE:
            hdr, req = m.decode_produce_request(data)
            p = req.topics[0].partitions[0]
            n = struct.unpack_from(">q", p.records)[0]
            self.produced.append((node, n, time.monotonic()))
            throttle, self.throttle_ms = self.throttle_ms, 0
            if node != self.leader:
                # KIP-951: the refusal names the leader and its address.
                res = m.ProducePartitionResponse(0, ec.NOT_LEADER_OR_FOLLOWER, -1, current_leader_id=self.leader,
                                                 current_leader_epoch=self.epoch)
                eps = [m.NodeEndpoint(self.leader, "127.0.0.1", self.ports[self.leader])]
                resp = m.ProduceResponse([m.ProduceTopicResponse(TOPIC, [res])], throttle, eps)
            else:
                self.log.append(n)
                res = m.ProducePartitionResponse(0, 0, len(self.log) - 1)
                resp = m.ProduceResponse([m.ProduceTopicResponse(TOPIC, [res])], throttle)
            return m.encode_produce_response(hdr.correlation_id, hdr.api_version, resp)
        raise AssertionError(f"unexpected api {api_key}")


class Client:
    def __init__(self, cluster: FakeCluster, profile: Profile, **settings: Any) -> None:
        self.acc = FakeAccumulator()
        self.done: list[tuple[int, int]] = []  # (batch n, code)
        self.profile = profile
        s = KafkaSettings(bootstrap_servers=f"127.0.0.1:{cluster.ports[1]}", reconnect_backoff_ms=10, **settings)
        self.sender = Sender(s, self.acc, lambda t: profile, lambda b, code, off, ts: self.done.append((b.n, code)))
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Client:
        await self.sender.start()
        self.task = asyncio.get_running_loop().create_task(self.sender.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.sender.close(2)
        assert self.task is not None
        await asyncio.wait_for(self.task, 2)

    async def deliver(self, numbers: range, timeout: float = 5.0) -> None:
        for n in numbers:
            self.acc.add(FakeBatch(n, 0, self.profile))
        self.sender.wakeup()
        assert await self.sender.flush(timeout)


def in_cluster(body: Any) -> FakeCluster:
    async def main() -> FakeCluster:
        cluster = FakeCluster()
        await cluster.start()
        try:
            await body(cluster)
        finally:
            await cluster.stop()
        return cluster

    return run(main)


async def _wait(pred: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_a_refusal_naming_the_new_leader_is_retried_there_at_once() -> None:
    # A backoff of 3 s: a retry that waited it out would miss the 1 s bound.
    profile = fast_profile(retry_backoff_ms=3000, retry_backoff_max_ms=3000)

    async def body(cluster: FakeCluster) -> None:
        async with Client(cluster, profile) as c:
            await c.deliver(range(1))
            cluster.move_leader(2)
            cluster.metadata = (2, 1)
            t0 = time.monotonic()
            await c.deliver(range(1, 2))
            assert time.monotonic() - t0 < 1.0
            assert c.done == [(0, 0), (1, 0)]

    cluster = in_cluster(body)
    assert [(node, n) for node, n, _ in cluster.produced] == [(1, 0), (1, 1), (2, 1)]
    assert cluster.log == [0, 1]


def test_stale_metadata_never_takes_leadership_back() -> None:
    # After node 1 refused with CurrentLeader (2, epoch 1), Metadata keeps answering the old view
    # (leader 1, epoch 0), as a broker that has not heard of the election would: it is ignored.
    profile = fast_profile(retry_backoff_ms=20, retry_backoff_max_ms=50)

    async def body(cluster: FakeCluster) -> None:
        async with Client(cluster, profile) as c:
            await c.deliver(range(1))
            cluster.move_leader(2)
            await c.deliver(range(1, 2))
            # The refusal asked for a refresh; let it (and one more) answer the stale view.
            seen = cluster.metadata_requests
            await _wait(lambda: cluster.metadata_requests >= seen + 1)
            await asyncio.sleep(0.2)
            await c.deliver(range(2, 6))
            assert c.sender.stats["stale_leaders"] >= 1
            assert c.done == [(n, 0) for n in range(6)]

    cluster = in_cluster(body)
    to_node1 = [n for node, n, _ in cluster.produced if node == 1]
    assert to_node1 == [0, 1], f"batches went back to the old leader: {cluster.produced}"
    assert cluster.log == list(range(6))


def test_a_partition_without_a_leader_is_waited_for_then_delivered() -> None:
    profile = fast_profile(delivery_timeout_ms=10_000)

    async def body(cluster: FakeCluster) -> None:
        async with Client(cluster, profile) as c:
            await c.deliver(range(1))
            cluster.move_leader(-1)  # the leader died; no replica in sync yet
            cluster.metadata = (-1, 1)
            c.sender._metadata.want(TOPIC)
            seen = cluster.metadata_requests
            await _wait(lambda: cluster.metadata_requests > seen)
            c.acc.add(FakeBatch(1, 0, profile))
            c.sender.wakeup()
            await asyncio.sleep(0.5)
            assert c.done == [(0, 0)], "sent or failed while the partition had no leader"
            cluster.move_leader(2)
            cluster.metadata = (2, 2)
            assert await c.sender.flush(5)
            assert c.done == [(0, 0), (1, 0)]

    cluster = in_cluster(body)
    assert cluster.log == [0, 1]
    assert [(node, n) for node, n, _ in cluster.produced] == [(1, 0), (2, 1)]


def test_a_partition_without_a_leader_fails_at_its_delivery_timeout() -> None:
    profile = fast_profile(delivery_timeout_ms=400)

    async def body(cluster: FakeCluster) -> None:
        cluster.move_leader(-1)
        cluster.metadata = (-1, 1)
        async with Client(cluster, profile) as c:
            t0 = time.monotonic()
            await c.deliver(range(1))
            assert 0.35 <= time.monotonic() - t0 < 2.0
            assert c.done == [(0, ec.REQUEST_TIMED_OUT)]

    cluster = in_cluster(body)
    assert cluster.produced == []


def test_a_throttled_broker_gets_no_new_request_until_the_throttle_passed() -> None:
    profile = fast_profile()

    async def body(cluster: FakeCluster) -> None:
        async with Client(cluster, profile) as c:
            cluster.throttle_ms = 400
            await c.deliver(range(1))
            await c.deliver(range(1, 2))
            assert c.sender.stats["throttle_ms"] == 400
            assert c.done == [(0, 0), (1, 0)]

    cluster = in_cluster(body)
    (_, _, t0), (_, _, t1) = cluster.produced
    assert t1 - t0 >= 0.38, f"the second request came {t1 - t0:.3f}s after a 400 ms throttle"
