"""shm.control: message round trips, framing, FrameReader chunking and refusals."""

from __future__ import annotations

import pathlib
import random
import re
import shutil
import struct
import subprocess
import typing

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shm import control as c
from shm.control import (
    MAX_FRAME_BYTES,
    ClientMessage,
    DaemonMessage,
    FrameReader,
    Produce,
    Rec,
    encode,
)
from shm.errors import ProtocolError

REPO = pathlib.Path(__file__).resolve().parents[3]

# --- strategies: one per message type -----------------------------------------------------------

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
maybe_bytes = st.none() | st.binary(max_size=64)
headers = st.none() | st.lists(st.tuples(st.text(max_size=8), maybe_bytes), max_size=4)
recs = st.builds(
    Rec,
    key=maybe_bytes,
    value=maybe_bytes,
    headers=headers,
    partition=st.none() | st.integers(0, 2**31 - 1),
    timestamp=st.none() | st.integers(0, 2**63 - 1),
)
results = st.builds(
    c.RecordResult,
    partition=st.integers(-(2**31), 2**31 - 1),
    offset=i64,
    timestamp=i64,
    error_code=st.integers(-1, 2000),
    error_name=st.text(max_size=30),
)
stats_values = st.recursive(
    st.none() | st.booleans() | i64 | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)

STRATEGIES: dict[type, st.SearchStrategy[typing.Any]] = {
    c.Hello: st.builds(
        c.Hello,
        version=u32,
        client_name=st.text(max_size=20),
        pid=u32,
        workers_expected=st.none() | st.integers(0, 1024),
        wants_segment=st.booleans(),
        token=u64,
        topic_updates=st.booleans(),
    ),
    c.SegmentOffer: st.builds(c.SegmentOffer, segment_bytes=u64, workers=u32, fd_count=u32),
    c.TopicLookup: st.builds(c.TopicLookup, topic=st.text(max_size=40)),
    c.Produce: st.builds(
        c.Produce, topic=st.text(max_size=40), records=st.lists(recs, max_size=5), ack=st.booleans(), seq=u64
    ),
    c.Flush: st.builds(c.Flush, timeout_ms=u32),
    c.StatsRequest: st.just(c.StatsRequest()),
    c.Goodbye: st.just(c.Goodbye()),
    c.Welcome: st.builds(
        c.Welcome, version=u32, workers=u32, request_ring_bytes=u64, completion_ring_bytes=u64, client_id=u64
    ),
    c.SegmentAccepted: st.builds(c.SegmentAccepted, client_id=u64),
    c.TopicInfo: st.builds(
        c.TopicInfo,
        topic=st.text(max_size=40),
        topic_id=st.integers(0, 0xFFFF),
        partitions=u32,
        profile=st.text(max_size=10),
        max_request_size=u32,
        on_full=st.sampled_from(["block", "drop"]),
        max_block_ms=u32,
        batch_size=u32,
        linger_ms=u32,
    ),
    c.ProduceAck: st.builds(c.ProduceAck, seq=u64, results=st.lists(results, max_size=5)),
    c.FlushDone: st.builds(c.FlushDone, complete=st.booleans(), pending=u64),
    c.StatsReply: st.builds(c.StatsReply, stats=st.dictionaries(st.text(max_size=8), stats_values, max_size=5)),
    c.ErrorReply: st.builds(
        c.ErrorReply, code=st.integers(-1, 2000), name=st.text(max_size=20), message=st.text(), fatal=st.booleans()
    ),
    c.TopicChanged: st.builds(c.TopicChanged, topic=st.text(max_size=40), topic_id=st.integers(0, 0xFFFF), partitions=u32),
}
CLIENT_TYPES = typing.get_args(ClientMessage)
DAEMON_TYPES = typing.get_args(DaemonMessage)
any_message = st.one_of(*STRATEGIES.values())


def test_every_message_type_has_a_strategy_and_is_exported() -> None:
    assert set(STRATEGIES) == set(CLIENT_TYPES) | set(DAEMON_TYPES)
    tags = [msgspec.inspect.type_info(t).tag for t in STRATEGIES]
    assert len(set(tags)) == len(tags)
    for t in STRATEGIES:
        assert t.__name__ in c.__all__


def _normalise(value: typing.Any) -> typing.Any:
    # msgpack has one array type: tuples inside StatsReply.stats come back as lists.
    return msgspec.msgpack.decode(msgspec.msgpack.encode(value))


@pytest.mark.parametrize("kind", list(STRATEGIES), ids=lambda t: t.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_round_trip_every_message(kind: type, data: st.DataObject) -> None:
    msg = data.draw(STRATEGIES[kind])
    frame = encode(msg)
    (length,) = struct.unpack_from(">I", frame)
    assert length == len(frame) - 4
    union = ClientMessage if kind in CLIENT_TYPES else DaemonMessage
    [back] = list(FrameReader(union).feed(frame))
    assert type(back) is kind
    if kind is c.StatsReply:
        assert back.stats == _normalise(msg.stats)
    else:
        assert back == msg
    # The catch-all reader decodes it too.
    [again] = list(FrameReader().feed(frame))
    assert again == back


def test_requests_omit_defaults_replies_carry_every_field() -> None:
    body = encode(Produce(topic="t", records=[Rec(value=b"v")]))[4:]
    assert msgspec.msgpack.decode(body) == {"type": "Produce", "topic": "t", "records": [{"value": b"v"}]}
    reply = c.ErrorReply(code=1002, name="BAD_FRAME", message="", fatal=False)
    assert set(msgspec.msgpack.decode(encode(reply)[4:])) == {"type", "code", "name", "message", "fatal"}


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    body = msgspec.msgpack.encode({"type": "Flush", "timeout_ms": 5, "new_in_v2": [1, 2]})
    [msg] = list(FrameReader(ClientMessage).feed(struct.pack(">I", len(body)) + body))
    assert msg == c.Flush(timeout_ms=5)


def test_error_reply_helper() -> None:
    e = c.error_reply(c.ERR_BAD_FRAME, "garbage", fatal=True)
    assert (e.code, e.name, e.fatal) == (1002, "BAD_FRAME", True)
    k = c.error_reply(3, "no such topic", name="UNKNOWN_TOPIC_OR_PARTITION")
    assert (k.code, k.name, k.fatal) == (3, "UNKNOWN_TOPIC_OR_PARTITION", False)
    assert all(code >= 1000 for code in c.ERROR_NAMES)


# --- FrameReader --------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(msgs=st.lists(any_message, min_size=1, max_size=8), cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_frame_reader_any_chunking(msgs: list[typing.Any], cuts: list[int]) -> None:
    stream = b"".join(encode(m) for m in msgs)
    points = sorted({min(p, len(stream)) for p in cuts} | {0, len(stream)})
    reader = FrameReader()
    out: list[typing.Any] = []
    for a, b in zip(points, points[1:]):
        out.extend(reader.feed(stream[a:b]))
    assert [type(m) for m in out] == [type(m) for m in msgs]
    assert len(out) == len(msgs)
    assert reader.buffered == 0


def test_frame_reader_byte_by_byte_and_partial() -> None:
    seed = 1234
    print("seed", seed)
    rng = random.Random(seed)
    msgs = [
        Produce(topic=f"t{i}", records=[Rec(value=rng.randbytes(rng.randrange(0, 300)))], seq=i)
        for i in range(20)
    ]
    stream = b"".join(encode(m) for m in msgs)
    reader = FrameReader(ClientMessage)
    out = []
    for i in range(len(stream)):
        out.extend(reader.feed(stream[i : i + 1]))
    assert out == msgs
    # A frame missing its last byte stays buffered, nothing is returned.
    frame = encode(msgs[0])
    assert list(reader.feed(frame[:-1])) == []
    assert reader.buffered == len(frame) - 1
    assert list(reader.feed(frame[-1:])) == [msgs[0]]


def test_frame_reader_iterates_lazily_and_keeps_state() -> None:
    frames = [encode(c.Flush(timeout_ms=i)) for i in range(3)]
    reader = FrameReader()
    it = reader.feed(b"".join(frames))
    assert next(it) == c.Flush(timeout_ms=0)
    # A new feed while the old iterator is half consumed loses nothing.
    rest = list(reader.feed(encode(c.Goodbye())))
    assert rest == [c.Flush(timeout_ms=1), c.Flush(timeout_ms=2), c.Goodbye()]
    assert list(it) == []


def test_frame_reader_accepts_memoryview_and_bytearray() -> None:
    frame = encode(c.StatsRequest())
    assert list(FrameReader().feed(memoryview(frame))) == [c.StatsRequest()]
    assert list(FrameReader().feed(bytearray(frame))) == [c.StatsRequest()]


@pytest.mark.parametrize("length", [0, MAX_FRAME_BYTES + 1, 2**32 - 1])
def test_bad_length_refused_before_the_body(length: int) -> None:
    reader = FrameReader()
    with pytest.raises(ProtocolError, match="frame length"):
        list(reader.feed(struct.pack(">I", length)))
    # The reader stays poisoned: the stream cannot be resynchronised.
    with pytest.raises(ProtocolError):
        reader.feed(encode(c.Goodbye()))


def test_custom_max_frame_bytes() -> None:
    frame = encode(Produce(topic="t", records=[Rec(value=b"x" * 100)]))
    with pytest.raises(ProtocolError):
        list(FrameReader(max_frame_bytes=50).feed(frame))
    assert len(list(FrameReader(max_frame_bytes=len(frame) - 4).feed(frame))) == 1


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # never-used msgpack opcode
        b"\x93\x01\x02\x03",  # an array, not a map
        msgspec.msgpack.encode({"topic": "t"}),  # no "type"
        msgspec.msgpack.encode({"type": "Nope"}),  # unknown type
        msgspec.msgpack.encode({"type": "Flush"}),  # missing required field
        msgspec.msgpack.encode({"type": "Flush", "timeout_ms": -1}),  # out of range
        msgspec.msgpack.encode({"type": "Produce", "topic": "t", "records": [{"value": "str"}]}),  # str, not bin
        msgspec.msgpack.encode({"type": "Goodbye"}) + b"\x00",  # trailing bytes in the frame
        msgspec.msgpack.encode({"type": "Flush", "timeout_ms": 1})[:-1],  # truncated body
    ],
)
def test_garbage_refused(body: bytes) -> None:
    reader = FrameReader(ClientMessage)
    good = encode(c.StatsRequest())
    # The good frame before the garbage is still delivered; then the error.
    it = reader.feed(good + struct.pack(">I", len(body)) + body + good)
    assert next(it) == c.StatsRequest()
    with pytest.raises(ProtocolError, match="bad frame"):
        next(it)
    with pytest.raises(ProtocolError):
        list(reader)


def test_daemon_reader_refuses_daemon_messages() -> None:
    welcome = c.Welcome(version=1, workers=2, request_ring_bytes=1, completion_ring_bytes=1, client_id=1)
    with pytest.raises(ProtocolError):
        list(FrameReader(ClientMessage).feed(encode(welcome)))
    with pytest.raises(ProtocolError):
        list(FrameReader(DaemonMessage).feed(encode(c.Goodbye())))


def test_encode_refuses_oversize() -> None:
    big = Produce(topic="t", records=[Rec(value=bytes(MAX_FRAME_BYTES))])
    with pytest.raises(ProtocolError, match="exceeds"):
        encode(big)


# --- docs/PROTOCOL.md's worked example ----------------------------------------------------------

EXAMPLE = Produce(
    topic="clicks",
    records=[Rec(key=b"k1", value=b"hello", headers=[("h", b"v")])],
    ack=True,
    seq=1,
)


def _hand_built_example() -> bytes:
    # msgpack written out by hand, independently of msgspec, as PROTOCOL.md explains it.
    def s(text: str) -> bytes:  # fixstr
        return bytes([0xA0 | len(text)]) + text.encode()

    def b(data: bytes) -> bytes:  # bin 8
        return bytes([0xC4, len(data)]) + data

    rec = bytes([0x83]) + s("key") + b(b"k1") + s("value") + b(b"hello")
    rec += s("headers") + bytes([0x91, 0x92]) + s("h") + b(b"v")
    body = bytes([0x85]) + s("type") + s("Produce") + s("topic") + s("clicks")
    body += s("records") + bytes([0x91]) + rec + s("ack") + b"\xc3" + s("seq") + b"\x01"
    return struct.pack(">I", len(body)) + body


def test_docs_example_hex_matches_the_encoder() -> None:
    frame = encode(EXAMPLE)
    assert frame == _hand_built_example()
    text = (REPO / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- example-hex -->\s*```\n(.*?)```", text, re.S)
    assert block is not None, "PROTOCOL.md lost its example-hex block"
    documented = bytes.fromhex("".join(line.split("|")[0] for line in block.group(1).splitlines()))
    assert documented == frame
    one_line = re.search(r"Both print\n`([0-9a-f]+)`", text)
    assert one_line is not None and one_line.group(1) == frame.hex()


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_docs_node_sketch_builds_the_same_frame(tmp_path: pathlib.Path) -> None:
    text = (REPO / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
    sketch = re.search(r"```js\n(.*?)```", text, re.S)
    assert sketch is not None
    script = tmp_path / "sketch.js"
    script.write_text(sketch.group(1), encoding="utf-8")
    out = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=30, check=True)
    assert bytes.fromhex(out.stdout.strip()) == encode(EXAMPLE)
