"""A stand-in for ``sluice run`` that speaks the socket protocol and produces with confluent-kafka.

Only for testing the benchmark harness's daemon handling and its socket runner before (and
independently of) the real daemon: ``python -m bench --daemon-cmd "python THIS_FILE"``. It
claims nothing about Sluice; the harness still validates by reading the topic back.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tomllib

from confluent_kafka import Producer

from shm import control

__all__: list[str] = []


class StandIn:
    def __init__(self, config: dict) -> None:
        profile = config["profiles"]["bench"]
        acks = profile["acks"]
        self.produce_requests = 0
        self.producer = Producer({
            "bootstrap.servers": config["kafka"]["bootstrap_servers"],
            "acks": str(acks),
            "enable.idempotence": profile["enable_idempotence"],
            "linger.ms": profile["linger_ms"],
            "batch.size": profile["batch_size"],
            "compression.type": profile["compression_type"],
            "partitioner": "murmur2_random",
            "statistics.interval.ms": 200,
            "stats_cb": self._stats,
        })
        self.clients = 0

    def _stats(self, text: str) -> None:
        stats = json.loads(text)
        self.produce_requests = sum(b.get("req", {}).get("Produce", 0) for b in stats["brokers"].values())

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames = control.FrameReader(control.ClientMessage)
        self.clients += 1
        client_id = self.clients
        while data := await reader.read(1 << 20):
            for msg in frames.feed(data):
                match msg:
                    case control.Hello():
                        writer.write(control.encode(control.Welcome(version=1, workers=1, request_ring_bytes=0,
                                                                    completion_ring_bytes=0, client_id=client_id)))
                    case control.TopicLookup(topic=topic):
                        parts = len(self.producer.list_topics(topic, timeout=10).topics[topic].partitions)
                        writer.write(control.encode(control.TopicInfo(
                            topic=topic, topic_id=1, partitions=parts, profile="bench", max_request_size=1 << 20,
                            on_full="block", max_block_ms=60_000, batch_size=131_072, linger_ms=5)))
                    case control.Produce(topic=topic, records=records, ack=ack, seq=seq):
                        results: list[control.RecordResult] = []
                        cb = None
                        if ack:
                            def cb(err, m, results=results):  # noqa: ANN001
                                results.append(control.RecordResult(
                                    partition=m.partition(), offset=m.offset() if err is None else -1, timestamp=-1,
                                    error_code=0 if err is None else err.code(),
                                    error_name="NONE" if err is None else err.name()))
                        for r in records:
                            while True:
                                try:
                                    self.producer.produce(topic, r.value, r.key, on_delivery=cb)
                                    break
                                except BufferError:
                                    self.producer.poll(0.01)
                        self.producer.poll(0)
                        if ack:
                            while len(results) < len(records):
                                self.producer.poll(0.01)
                            writer.write(control.encode(control.ProduceAck(seq=seq, results=results)))
                    case control.Flush():
                        left = self.producer.flush(30)
                        writer.write(control.encode(control.FlushDone(complete=left == 0, pending=left)))
                    case control.StatsRequest():
                        self.producer.poll(0.3)  # one more statistics report
                        writer.write(control.encode(control.StatsReply(
                            stats={"workers": [{"sender": {"requests": self.produce_requests}}]})))
                    case control.Goodbye():
                        await writer.drain()
                        writer.close()
                        return
            await writer.drain()
        writer.close()


async def main(path: str) -> None:
    with open(path, "rb") as f:
        config = tomllib.load(f)
    standin = StandIn(config)
    sock = config["daemon"]["socket_path"]
    if os.path.exists(sock):
        os.unlink(sock)
    server = await asyncio.start_unix_server(standin.serve, path=sock)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()
    standin.producer.flush(10)


if __name__ == "__main__":
    if sys.argv[1:2] != ["run"] or sys.argv[2:3] != ["--config"]:
        sys.exit("usage: bench_standin_daemon.py run --config FILE")
    asyncio.run(main(sys.argv[3]))
