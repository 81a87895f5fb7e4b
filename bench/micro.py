"""``python -m bench micro``: nanoseconds per record for each stage of a record's path.

Each stage runs in this process on the real code (no broker, no daemon), over the same seeded
records: 100-byte values, 12 partitions, 16-byte keys for the keyed rows. Every figure is the
best of several repetitions of a whole bulk (GC frozen), divided by the records in it, so that
regressions show as a row moving. What it cannot show is the cost of the event loop and of
the system calls around a stage: ``python -m bench`` measures those on a running daemon.

Client:  encode, partition (sticky, murmur2), ring write, future, completion (settling alone,
         and the completion thread's whole pass over a ring of keyed completions).
Ingest:  the socket ingest's Produce frames: msgspec decode + send_records (frames msgspec
         decodes), and the packed path (frame reader, scan_produce, send_packed).
Worker:  copy, validate, append, seal, sender (Produce request encoding), complete.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec

__all__ = ["main", "measure"]

RECORDS = 20_000
PARTITIONS = 12
T0 = 1_700_000_000_000
BASE_OFFSET = 1_000_000_000  # where the completion stages' offsets start
READ_BYTES = 256 * 1024  # what one read of a socket connection brings, at most (daemon/server.py)


def _best(fn: Callable[[], int], repeat: int) -> float:
    """ns per record of fn() (which returns how many records it handled), best of ``repeat``."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        gc.freeze()
        t = time.perf_counter_ns()
        n = fn()
        dt = time.perf_counter_ns() - t
        gc.unfreeze()
        best = min(best, dt / max(n, 1))
    return best


def _data(seed: int) -> tuple[list[bytes], list[bytes]]:
    rng = random.Random(seed)
    alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789"
    values = [bytes(rng.choices(alphabet, k=100)) for _ in range(RECORDS)]
    keys = [rng.randbytes(16) for _ in range(RECORDS)]
    return values, keys


def client_stages(values: list[bytes], keys: list[bytes], repeat: int) -> dict[str, float]:
    from shm.frames import encode_record_body, put_record
    from shm.layout import RING_HEADER_BYTES
    from shm.partitioner import StickyPartitioner, partition_for_key
    from shm.ring import SpscRing

    out: dict[str, float] = {}

    def encode() -> int:
        for v in values:
            encode_record_body(None, v)
        return len(values)

    def encode_keyed() -> int:
        for k, v in zip(keys, values):
            encode_record_body(k, v)
        return len(values)

    sticky = StickyPartitioner(batch_size=131072, rng=random.Random(1))

    def partition_sticky() -> int:
        part = sticky.partition
        for _ in values:
            part("t", PARTITIONS, 100)
        return len(values)

    def partition_murmur2() -> int:
        for k in keys:
            partition_for_key(k, PARTITIONS)
        return len(keys)

    bodies = [encode_record_body(None, v) for v in values]
    capacity = 1 << 22
    ring = SpscRing(bytearray(RING_HEADER_BYTES + capacity), 0, capacity, create=True)

    def ring_write() -> int:
        n = 0
        for b in bodies:
            if not put_record(ring, 0, n % PARTITIONS, T0, b):
                ring.publish_head()
                start, end = ring.region()
                ring.advance(end - start)
                ring.free_to(ring.cursor)
                put_record(ring, 0, n % PARTITIONS, T0, b)
            ring.publish_head()
            n += 1
        return n

    out["client encode"] = _best(encode, repeat)
    out["client encode keyed"] = _best(encode_keyed, repeat)
    out["client partition sticky"] = _best(partition_sticky, repeat)
    out["client partition murmur2"] = _best(partition_murmur2, repeat)
    out["client ring write"] = _best(ring_write, repeat)
    from shm import control
    from shm._client import SendCore
    from shm.futures import DeliveryFuture
    from shm.futures import settle_fifo as resolve_fifo
    from shm.topic import TopicState, stick

    futures: list[Any] = []

    def future() -> int:
        futures.clear()
        append = futures.append
        for i in range(len(values)):
            append(DeliveryFuture("t", i % PARTITIONS, T0))
        return len(values)

    def completion() -> int:
        # One COMPLETION frame per 1,000 records, as a worker sends for a batch.
        dq = deque(futures)
        n = len(dq)
        for base in range(0, n, 1000):
            resolve_fifo(dq, 0, 0, base, -1, min(1000, n - base))
        return n

    out["client future"] = _best(future, repeat)
    best = float("inf")
    for _ in range(repeat):
        future()  # fresh, pending futures (not timed)
        gc.collect()
        gc.freeze()
        t = time.perf_counter_ns()
        n = completion()
        best = min(best, (time.perf_counter_ns() - t) / n)
        gc.unfreeze()
    out["client completion"] = best
    out.update(completion_thread_stages(keys, repeat))

    # The whole compiled send() / produce(), as a Producer binds it, into a local ring (one
    # worker): encode, partition, clock, future, claim, copy, pending FIFO, publish.
    info = control.TopicInfo(topic="t", topic_id=0, partitions=PARTITIONS, profile="p", max_request_size=1 << 20,
                             on_full="block", max_block_ms=0, batch_size=131072, linger_ms=5)
    ring2 = SpscRing(bytearray(RING_HEADER_BYTES + capacity), 0, capacity, create=True)
    topic = TopicState(info, 1)

    def refuse(*args: Any, **kw: Any) -> Any:
        raise AssertionError("the micro benchmark's records all take the compiled path")

    core = SendCore(topics={"t": topic}, future=DeliveryFuture, lookup=refuse, check_open=refuse, refusal=refuse,
                    full=refuse, stick=stick)
    core.set_writers((ring2.writer,))
    core.enabled = 1

    def empty() -> None:
        """Take everything out of the ring and the pending FIFOs, as a worker and completions would."""
        s, e = ring2.region()
        while s != e:
            ring2.advance(e - s)
            s, e = ring2.region()
        ring2.free_to(ring2.cursor)
        for dq in topic.pending:
            dq.clear()

    def compiled(fn: Any, with_keys: bool) -> Callable[[], int]:
        def run() -> int:
            per = (capacity // 2) // 160  # records that surely fit, then the ring is emptied
            for start in range(0, len(values), per):
                end = min(start + per, len(values))
                if with_keys:
                    for i in range(start, end):
                        fn("t", values[i], keys[i])
                else:
                    for i in range(start, end):
                        fn("t", values[i])
                empty()
            return len(values)

        return run

    out["client send() compiled"] = _best(compiled(core.send, False), repeat)
    out["client send() compiled keyed"] = _best(compiled(core.send, True), repeat)
    out["client produce() compiled"] = _best(compiled(core.produce, False), repeat)

    # Socket ingest in the daemon: Produce frames of 128 records decoded (msgspec), then
    # send_records() with a future per record (ack=true) or a tally (ack=false).
    from shm.futures import DeliveryTally

    frame = 128
    bodies = [control.encode(control.Produce(topic="t", records=[control.Rec(value=v) for v in values[s : s + frame]]))[4:]
              for s in range(0, len(values), frame)]
    decode = msgspec.msgpack.Decoder(control.ClientMessage).decode
    tally = DeliveryTally("t")

    def ingest(entry: Any) -> Callable[[], int]:
        def run() -> int:
            per = (capacity // 2) // 160 // frame  # frames that surely fit, then the ring is emptied
            for start in range(0, len(bodies), per):
                for body in bodies[start : start + per]:
                    msg = decode(body)
                    core.send_records("t", msg.records, 0, entry)
                empty()
            return len(values)

        return run

    out["ingest decode"] = _best(lambda: sum(len(decode(b).records) for b in bodies), repeat)
    out["ingest decode + send_records (futures)"] = _best(ingest(None), repeat)
    out["ingest decode + send_records (tally)"] = _best(ingest(tally), repeat)

    # The packed path that socket ingest takes for plain frames: the daemon's FrameReader splits
    # the byte stream (reads of READ_BYTES) and scan_produce checks each Produce; send_packed
    # writes its records from the msgpack into the ring.
    from daemon.ingest import FrameReader, PackedProduce
    from shm._client import scan_produce

    stream = b"".join(control.LENGTH_PREFIX.pack(len(b)) + b for b in bodies)
    reads = [stream[i : i + READ_BYTES] for i in range(0, len(stream), READ_BYTES)]

    def split() -> list[PackedProduce]:
        reader = FrameReader()
        return [m for data in reads for m in reader.feed(data)]

    def packed(entry: Any) -> Callable[[], int]:
        def run() -> int:
            per = (capacity // 2) // 160 // frame
            parts = [part for m in split() for part in m.parts]  # frames without ack: joined per read
            for start in range(0, len(parts), per):
                for body, at, count in parts[start : start + per]:
                    core.send_packed("t", body, at, 0, count, entry)
                empty()
            return len(values)

        return run

    out["ingest scan_produce"] = _best(lambda: sum(scan_produce(b, control.MAX_PRODUCE_RECORDS)[3] for b in bodies), repeat)
    out["ingest frame reader (split + scan)"] = _best(lambda: sum(m.count for m in split()), repeat)
    out["ingest frame reader + send_packed (futures)"] = _best(packed(None), repeat)
    out["ingest frame reader + send_packed (tally)"] = _best(packed(tally), repeat)
    return out


def completion_thread_stages(keys: list[bytes], repeat: int) -> dict[str, float]:
    """The completion thread's pass over a completion ring (CompletionReader.read_ring: walk,
    check, settle, free) as a worker fills it for keyed records: each record's future pending in
    its key's partition FIFO, in send order; one COMPLETION per batch of a partition, batches
    sealed round-robin over the partitions, and a CHUNK_DONE after every 12. Timed: the whole
    pass, which also frees the futures (no one else holds them, as with a discarded send())."""
    from shm.completions import CompletionReader
    from shm.frames import CHUNK_DONE, COMPLETION
    from shm.futures import DeliveryFuture
    from shm.layout import FRAME_CHUNK_DONE, FRAME_COMPLETION, FRAME_RECORD, RING_COMPLETION, RING_HEADER_BYTES
    from shm.partitioner import partitions_for_keys
    from shm.ring import SpscRing

    n = len(keys)
    parts = partitions_for_keys(keys, PARTITIONS)
    capacity = 1 << 22
    out: dict[str, float] = {}

    def one_pass(per_frame: int) -> float:
        req = SpscRing(bytearray(RING_HEADER_BYTES + capacity), 0, capacity, create=True)
        cmp = SpscRing(bytearray(RING_HEADER_BYTES + capacity), 0, capacity, kind=RING_COMPLETION, create=True)
        assert req.claim(FRAME_RECORD, 1000) >= 0  # what the CHUNK_DONEs free
        req.publish_head()
        fifos = [deque() for _ in range(PARTITIONS)]  # type: ignore[var-annotated]
        for i, p in enumerate(parts):
            fifos[p].append(DeliveryFuture("t", p, T0))
        left = [len(dq) for dq in fifos]
        offset = [BASE_OFFSET] * PARTITIONS  # a topic's offsets are large: each one is an int made
        frames = 0
        while any(left):
            for p in range(PARTITIONS):
                k = min(per_frame, left[p])
                if not k:
                    continue
                at = cmp.claim(FRAME_COMPLETION, COMPLETION.size)
                COMPLETION.pack_into(cmp.view, at, 0, 0, p, offset[p], -1, k, 0)
                offset[p] += k
                left[p] -= k
                frames += 1
                if frames % 12 == 0:
                    at = cmp.claim(FRAME_CHUNK_DONE, CHUNK_DONE.size)
                    CHUNK_DONE.pack_into(cmp.view, at, req.head)
        cmp.publish_head()
        done = [0]

        def completed(k: int) -> None:
            done[0] += k

        reader = CompletionReader(
            None, [req], [cmp], {0: fifos}, [PARTITIONS], -1,  # type: ignore[arg-type] - the thread is not started
            read_control=lambda: True, on_completed=completed, on_freed=lambda: None, on_hangup=lambda: None,
            on_error=lambda exc: None, name="bench",
        )
        gc.collect()
        gc.freeze()
        t = time.perf_counter_ns()
        reader.read_ring(0, cmp)
        dt = time.perf_counter_ns() - t
        gc.unfreeze()
        assert done[0] == n and not any(fifos), "every pending record settled"
        return dt / n

    for per_frame in (1, 100):
        out[f"client completion thread keyed, {per_frame} per COMPLETION"] = min(
            one_pass(per_frame) for _ in range(repeat)
        )
    return out


def worker_stages(values: list[bytes], keys: list[bytes], repeat: int) -> dict[str, float]:
    from daemon import _batcher
    from daemon.accumulator import APPEND_OK, Accumulator
    from daemon.arena import Arena
    from daemon.config import Profile
    from daemon.protocol.messages import encode_produce_request
    from shm.frames import COMPLETION, encode_record_body, encode_record_frames

    out: dict[str, float] = {}
    rng = random.Random(7)
    # A ring region as a paced client writes it: one frame per send(), partitions interleaved.
    parts = [rng.randrange(PARTITIONS) for _ in values]
    region = b"".join(
        encode_record_frames(0, p, T0 + i // 100, [v]) for i, (p, v) in enumerate(zip(parts, values))
    )
    keyed = b"".join(
        encode_record_frames(0, p, T0 + i // 100, [v], [k]) for i, (p, k, v) in enumerate(zip(parts, keys, values))
    )
    n = len(values)
    src = memoryview(bytearray(region))

    out["worker copy"] = _best(lambda: (bytes(src[: len(region)]), n)[1], repeat)
    # The drain validates inside append (below); this walk alone is crash recovery's prepass.
    out["worker validate (recovery prepass)"] = _best(lambda: (_batcher.first_bad_body(region, len(region), False), n)[1], repeat)

    profile = Profile(batch_size=131072, linger_ms=5)
    acc = Accumulator(buffer_memory=64 << 20, profile_for=lambda t: profile, arena=Arena(64 << 20, chunk_size=4096))
    topics = ["t"]
    counts = [PARTITIONS]
    sealed: list[Any] = []

    def append(data: bytes) -> int:
        for b in sealed:
            acc.release(b)
        sealed.clear()
        code, pos, count = acc.append_region(data, 0, len(data), topics, counts, 1, 1, 0, 0.0)
        assert code == APPEND_OK and count == n
        acc.flush()
        sealed.extend(acc.ready(0.0))
        return count

    def seal_only(data: bytes) -> tuple[float, float]:
        for b in sealed:
            acc.release(b)
        sealed.clear()
        t = time.perf_counter_ns()
        acc.append_region(data, 0, len(data), topics, counts, 1, 1, 0, 0.0)
        t1 = time.perf_counter_ns()
        acc.flush()
        sealed.extend(acc.ready(0.0))
        t2 = time.perf_counter_ns()
        return (t1 - t) / n, (t2 - t1) / n

    for name, data in (("", region), (" keyed", keyed)):
        append(data)
        best_a = best_s = float("inf")
        for _ in range(repeat):
            gc.collect()
            a, s = seal_only(data)
            best_a, best_s = min(best_a, a), min(best_s, s)
        out[f"worker append{name}"] = best_a
        out[f"worker seal{name}"] = best_s
    batches = list(sealed)
    records = sum(b.record_count for b in batches)

    def sender() -> int:
        # One request per 12 batches, as a full pipeline to one leader sends them.
        for at in range(0, len(batches), PARTITIONS):
            group = batches[at : at + PARTITIONS]
            encode_produce_request(9, 1, "sluice", 1, 30000, [("t", [(b.partition, b.payload()) for b in group])])
        return records

    out["worker sender (request encode)"] = _best(sender, repeat)
    cring = bytearray(1 << 20)
    pack = COMPLETION.pack_into

    def complete() -> int:
        at = 0
        for b in batches:
            pack(cring, at, 0, 0, b.partition, 0, -1, b.record_count, 0)
            at = (at + 40) & 0xFFFF
        return records

    out["worker complete"] = _best(complete, repeat)
    for b in sealed:
        acc.release(b)
    _ = encode_record_body
    return out


def measure(seed: int = 20240601, repeat: int = 5) -> dict[str, float]:
    values, keys = _data(seed)
    res = client_stages(values, keys, repeat)
    res.update(worker_stages(values, keys, repeat))
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench micro", description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--seed", type=int, default=20240601)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    res = measure(args.seed, args.repeat)
    width = max(map(len, res))
    print(f"{'stage':<{width}}  ns/record")
    for name, ns in res.items():
        print(f"{name:<{width}}  {ns:9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"records": RECORDS, "ns_per_record": res}, f, indent=2)
    return 0
