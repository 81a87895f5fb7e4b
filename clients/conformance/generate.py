"""Writes ``protocol-v1.json``, the socket protocol's conformance vectors, from shm/control.py.

Every frame in the file is made by the reference encoder (:func:`shm.control.encode`), so the
hex is what the daemon sends and what a client must send. The file is the contract and is
committed; this script only saves typing it. ``tests/unit/clients/test_conformance_file.py``
fails when the two differ, and ``tests/integration/test_conformance.py`` replays every vector
against a real daemon and broker. The format is described in ``README.md`` beside this file.

Run from the repository root: ``.venv/bin/python clients/conformance/generate.py``.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import msgspec  # noqa: E402

from shm import control  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "protocol-v1.json")

FORMAT = 1
TOPIC = "sluice-conformance-v1"  # one partition; the runner creates it
MISSING = "sluice-conformance-v1-missing"  # must not exist (and the broker must not auto-create it)
TS = 1_700_000_000_000  # an explicit CreateTime, so the ProduceAck's timestamp is known
DEFAULT_PROFILE = dict(
    profile="default", max_request_size=1_048_576, on_full="block", max_block_ms=60_000, batch_size=16_384, linger_ms=5
)

# Placeholder values in expected frames; the `vary` map of each expected frame names them.
WELCOME_VARY = {"workers": "uint", "request_ring_bytes": "uint", "completion_ring_bytes": "uint", "client_id": "uint"}
ERROR_VARY = {"message": "str"}
STATS_KEYS = ["workers", "totals", "drops", "socket", "clients", "connections", "topics", "uptime_s", "version"]
SOCKET_KEYS = ["refused", "connections", "paused", "unsent_reply_bytes", "inflight_records", "unknown_topics"]


def stats_reply() -> dict[str, Any]:
    """A StatsReply whose placeholder map holds the keys every real one has (values: zeros)."""
    stats: dict[str, Any] = {k: 0 for k in STATS_KEYS}
    stats.update(workers={}, totals={}, drops={}, version="", uptime_s=0.0)
    stats["socket"] = {k: 0 for k in SOCKET_KEYS}
    stats["socket"]["refused"] = {}
    return expect(control.StatsReply(stats=stats), {"stats": "map"}, {"stats": STATS_KEYS, "stats.socket": SOCKET_KEYS})


def hx(frame: bytes) -> str:
    return frame.hex()


def raw(body: bytes) -> str:
    return hx(struct.pack(">I", len(body)) + body)


def send(msg: Any) -> str:
    return hx(control.encode(msg))


def expect(msg: Any, vary: dict[str, str] | None = None, required_keys: dict[str, list[str]] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"frame": hx(control.encode(msg)), "message": msgspec.to_builtins(msg)}
    out["message"] = _jsonable(out["message"])
    out["vary"] = vary or {}
    if required_keys:
        out["required_keys"] = required_keys
    return out


def _jsonable(v: Any) -> Any:
    # Only for the human-readable "message" echo: bytes become {"bin": hex}.
    if isinstance(v, (bytes, bytearray)):
        return {"bin": bytes(v).hex()}
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


HELLO = control.Hello(version=1, client_name="conformance")
WELCOME = control.Welcome(version=1, workers=2, request_ring_bytes=4_194_304, completion_ring_bytes=262_144, client_id=1)


def welcome() -> dict[str, Any]:
    return expect(WELCOME, WELCOME_VARY)


def error(code: int, *, fatal: bool, name: str | None = None) -> dict[str, Any]:
    return expect(control.error_reply(code, "", fatal=fatal, name=name), ERROR_VARY)


def ok(partition: int = 0, ts: int = TS) -> control.RecordResult:
    return control.RecordResult(partition=partition, offset=0, timestamp=ts, error_code=0, error_name="NONE")


def failed(partition: int, code: int, name: str) -> control.RecordResult:
    return control.RecordResult(partition=partition, offset=-1, timestamp=-1, error_code=code, error_name=name)


def vector(name: str, description: str, client: list[str], daemon: list[dict[str, Any]], then: str) -> dict[str, Any]:
    return {"name": name, "description": description, "client": client, "daemon": daemon, "then": then}


def vectors() -> list[dict[str, Any]]:
    rec = control.Rec(key=b"k1", value=b"hello", headers=[("h", b"v"), ("n", None)], timestamp=TS)
    v: list[dict[str, Any]] = []
    v.append(vector(
        "hello-welcome",
        "The handshake. Welcome.version is the version both speak; the ring sizes and worker count "
        "come from the daemon's config, client_id from its counter.",
        [send(HELLO)], [welcome()], "open"))
    v.append(vector(
        "hello-newer-version",
        "A client that speaks versions up to 9 is answered with version 1, the daemon's highest.",
        [send(control.Hello(version=9, client_name="conformance"))], [welcome()], "open"))
    v.append(vector(
        "hello-all-fields",
        "A Hello with optional fields written out (pid 4242, workers_expected 2); fields equal "
        "to their defaults are left out, as the reference encoder does.",
        [send(control.Hello(version=1, client_name="conformance", pid=4242, workers_expected=2))],
        [welcome()], "open"))
    v.append(vector(
        "hello-version-zero",
        "No version <= 0 exists: fatal UNSUPPORTED_PROTOCOL_VERSION, then the daemon closes.",
        [send(control.Hello(version=0))], [error(control.ERR_UNSUPPORTED_PROTOCOL_VERSION, fatal=True)], "closed"))
    for what, msg in (
        ("produce", control.Produce(topic=TOPIC, records=[control.Rec(value=b"x")], ack=True, seq=1)),
        ("topic-lookup", control.TopicLookup(topic=TOPIC)),
        ("flush", control.Flush(timeout_ms=1000)),
        ("stats", control.StatsRequest()),
    ):
        v.append(vector(
            f"{what}-before-hello",
            "Hello must come first: any other message is a fatal UNEXPECTED_MESSAGE (and a Produce's "
            "records are not taken).",
            [send(msg)], [error(control.ERR_UNEXPECTED_MESSAGE, fatal=True)], "closed"))
    v.append(vector(
        "second-hello",
        "Hello comes once: a second one is a fatal UNEXPECTED_MESSAGE.",
        [send(HELLO), send(HELLO)], [welcome(), error(control.ERR_UNEXPECTED_MESSAGE, fatal=True)], "closed"))
    v.append(vector(
        "segment-offer-not-asked",
        "A SegmentOffer after a Hello without wants_segment is a fatal UNEXPECTED_MESSAGE.",
        [send(HELLO), send(control.SegmentOffer(segment_bytes=1 << 20, workers=2, fd_count=3))],
        [welcome(), error(control.ERR_UNEXPECTED_MESSAGE, fatal=True)], "closed"))
    v.append(vector(
        "bad-frame-first",
        "Framing comes before the conversation: a body that is not msgpack is a fatal BAD_FRAME "
        "even before Hello.",
        [raw(b"\xc1\xc1\xc1")], [error(control.ERR_BAD_FRAME, fatal=True)], "closed"))
    for name, desc, body in (
        ("not-msgpack", "a body that is not msgpack (0xc1 is never used)", None),
        ("unknown-type", 'a "type" no message has', msgspec.msgpack.encode({"type": "Bogus"})),
        ("daemon-message", "a daemon-to-client message sent by the client (not a ClientMessage)",
         msgspec.msgpack.encode({"type": "FlushDone", "complete": True, "pending": 0})),
        ("missing-field", "a Produce without its required records",
         msgspec.msgpack.encode({"type": "Produce", "topic": TOPIC})),
        ("wrong-type", "a str where bytes are expected (a record value written as str)",
         msgspec.msgpack.encode({"type": "Produce", "topic": TOPIC, "records": [{"value": "text"}]})),
        ("trailing-bytes", "a body with bytes after the map", msgspec.msgpack.encode({"type": "StatsRequest"}) + b"\x00"),
    ):
        client = [send(HELLO), raw(body) if body is not None else raw(b"\xc1")]
        v.append(vector(
            f"bad-frame-{name}", f"After the handshake, {desc}: fatal BAD_FRAME, then the daemon closes.",
            client, [welcome(), error(control.ERR_BAD_FRAME, fatal=True)], "closed"))
    v.append(vector(
        "bad-frame-zero-length",
        "A length prefix of 0: fatal BAD_FRAME.",
        [send(HELLO), "00000000"], [welcome(), error(control.ERR_BAD_FRAME, fatal=True)], "closed"))
    v.append(vector(
        "bad-frame-too-long",
        "A length prefix above 16 MiB: fatal BAD_FRAME at once, before any body arrives.",
        [send(HELLO), hx(struct.pack(">I", control.MAX_FRAME_BYTES + 1))],
        [welcome(), error(control.ERR_BAD_FRAME, fatal=True)], "closed"))
    v.append(vector(
        "topic-lookup",
        "TopicInfo of the one-partition test topic under the built-in default profile. topic_id is "
        "the daemon's.",
        [send(HELLO), send(control.TopicLookup(topic=TOPIC))],
        [welcome(), expect(control.TopicInfo(topic=TOPIC, topic_id=0, partitions=1, **DEFAULT_PROFILE), {"topic_id": "uint"})],
        "open"))
    v.append(vector(
        "topic-lookup-unknown",
        "A topic Kafka does not have: a non-fatal ErrorReply with Kafka's code 3; the connection stays.",
        [send(HELLO), send(control.TopicLookup(topic=MISSING)), send(control.StatsRequest())],
        [welcome(), error(3, fatal=False, name="UNKNOWN_TOPIC_OR_PARTITION"),
         stats_reply()],
        "open"))
    v.append(vector(
        "produce-ack",
        "One acknowledged record with a key, a header with a value, a header with a nil value and an "
        "explicit CreateTime: its result carries the partition, the offset Kafka gave it and that "
        "CreateTime.",
        [send(HELLO), send(control.Produce(topic=TOPIC, records=[rec], ack=True, seq=1))],
        [welcome(), expect(control.ProduceAck(seq=1, results=[ok()]), {"results[*].offset": "uint"})],
        "open"))
    v.append(vector(
        "produce-empty-value-and-tombstone",
        "An empty value (bin 8 of length 0) is an empty value; a value left out is nil, a tombstone. "
        "Both are delivered (the replay reads them back and tells them apart).",
        [send(HELLO), send(control.Produce(
            topic=TOPIC, records=[control.Rec(key=b"e", value=b"", timestamp=TS), control.Rec(key=b"t", timestamp=TS)],
            ack=True, seq=2))],
        [welcome(), expect(control.ProduceAck(seq=2, results=[ok(), ok()]), {"results[*].offset": "uint"})],
        "open"))
    v.append(vector(
        "produce-no-ack-then-flush",
        "An unacknowledged Produce is never answered; the Flush after it comes when its record is "
        "complete.",
        [send(HELLO), send(control.Produce(topic=TOPIC, records=[control.Rec(value=b"fire-and-forget")])),
         send(control.Flush(timeout_ms=30_000))],
        [welcome(), expect(control.FlushDone(complete=True, pending=0, failed=0))],
        "open"))
    v.append(vector(
        "produce-unknown-topic-ack",
        "An acknowledged Produce to a topic Kafka does not have is answered by a ProduceAck whose "
        "every result fails with code 3, never by an ErrorReply. No partition was asked or chosen: -1.",
        [send(HELLO), send(control.Produce(topic=MISSING, records=[control.Rec(value=b"a"), control.Rec(value=b"b")],
                                           ack=True, seq=3))],
        [welcome(), expect(control.ProduceAck(seq=3, results=[failed(-1, 3, "UNKNOWN_TOPIC_OR_PARTITION")] * 2))],
        "open"))
    v.append(vector(
        "produce-unknown-topic-no-ack",
        "An unacknowledged Produce to a topic Kafka does not have gets no reply at all; the failure "
        "is counted (stats socket.refused) and reported by the next FlushDone's failed.",
        [send(HELLO), send(control.Produce(topic=MISSING, records=[control.Rec(value=b"a")])),
         send(control.Flush(timeout_ms=30_000))],
        [welcome(), expect(control.FlushDone(complete=True, pending=0, failed=1))],
        "open"))
    v.append(vector(
        "produce-bad-partition-ack",
        "A partition out of range fails that record only (code 3), and its result names the "
        "partition asked for; the next record is delivered.",
        [send(HELLO), send(control.Produce(
            topic=TOPIC, records=[control.Rec(value=b"bad", partition=5), control.Rec(value=b"good", timestamp=TS)],
            ack=True, seq=4))],
        [welcome(), expect(control.ProduceAck(seq=4, results=[failed(5, 3, "UNKNOWN_TOPIC_OR_PARTITION"), ok()]),
                           {"results[1].offset": "uint"})],
        "open"))
    v.append(vector(
        "produce-bad-partition-no-ack",
        "The same without ack: no reply; the FlushDone counts the failed record.",
        [send(HELLO), send(control.Produce(topic=TOPIC, records=[control.Rec(value=b"bad", partition=5),
                                                                 control.Rec(value=b"good")])),
         send(control.Flush(timeout_ms=30_000))],
        [welcome(), expect(control.FlushDone(complete=True, pending=0, failed=1))],
        "open"))
    v.append(vector(
        "stats",
        "StatsReply: the map's values change all the time; these keys are always there.",
        [send(HELLO), send(control.StatsRequest())],
        [welcome(), stats_reply()],
        "open"))
    v.append(vector(
        "replies-in-request-order",
        "TopicLookup, Flush and StatsRequest are answered in the order asked, even when the first "
        "(an unknown topic) takes longest.",
        [send(HELLO), send(control.TopicLookup(topic=MISSING)), send(control.TopicLookup(topic=TOPIC)),
         send(control.Flush(timeout_ms=1000)), send(control.StatsRequest())],
        [welcome(), error(3, fatal=False, name="UNKNOWN_TOPIC_OR_PARTITION"),
         expect(control.TopicInfo(topic=TOPIC, topic_id=0, partitions=1, **DEFAULT_PROFILE), {"topic_id": "uint"}),
         expect(control.FlushDone(complete=True, pending=0, failed=0)),
         stats_reply()],
        "open"))
    v.append(vector(
        "goodbye",
        "Goodbye: the daemon sends the ProduceAcks still pending, then closes.",
        [send(HELLO), send(control.Produce(topic=TOPIC, records=[control.Rec(value=b"last", timestamp=TS)], ack=True, seq=9)),
         send(control.Goodbye())],
        [welcome(), expect(control.ProduceAck(seq=9, results=[ok()]), {"results[*].offset": "uint"})],
        "closed"))
    return v


def document() -> dict[str, Any]:
    return {
        "protocol_version": control.PROTOCOL_VERSION,
        "format": FORMAT,
        "setup": {
            "topics": {TOPIC: 1},
            "missing_topics": [MISSING],
            "daemon": "a daemon with the built-in default profile for these topics (no [[topics]] rule "
                      "matching them) and a broker with auto.create.topics.enable=false",
        },
        "vectors": vectors(),
    }


def render() -> str:
    return json.dumps(document(), indent=1) + "\n"


if __name__ == "__main__":
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(render())
    print(f"wrote {OUT}")
