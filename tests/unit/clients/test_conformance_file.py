"""clients/conformance/protocol-v1.json: the committed file is what its generator writes, every
frame decodes as the protocol's message, and the checking rule accepts each expected frame and
refuses changed ones (so the replay against the daemon can fail)."""

from __future__ import annotations

import importlib.util
import json
import struct

import msgspec
import pytest
from conformance_check import ConformanceError, check_frame

from shm import control
from tests.conftest import ROOT

FILE = ROOT / "clients" / "conformance" / "protocol-v1.json"


def _generator():
    spec = importlib.util.spec_from_file_location("conformance_generate", ROOT / "clients" / "conformance" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _doc() -> dict:
    return json.loads(FILE.read_text(encoding="utf-8"))


def test_file_is_what_the_generator_writes() -> None:
    assert FILE.read_text(encoding="utf-8") == _generator().render(), "run clients/conformance/generate.py"


def test_names_are_unique_and_fields_present() -> None:
    doc = _doc()
    assert doc["format"] == 1 and doc["protocol_version"] == control.PROTOCOL_VERSION
    names = [v["name"] for v in doc["vectors"]]
    assert len(names) == len(set(names))
    for v in doc["vectors"]:
        assert v["client"] and v["daemon"] and v["then"] in ("open", "closed"), v["name"]


def test_daemon_frames_decode_and_pass_their_own_check() -> None:
    reader = control.FrameReader(control.DaemonMessage)
    for v in _doc()["vectors"]:
        for exp in v["daemon"]:
            frame = bytes.fromhex(exp["frame"])
            (msg,) = list(reader.feed(frame))
            assert msgspec.to_builtins(msg)["type"] == exp["message"]["type"]
            check_frame(frame, exp)


def test_well_formed_client_frames_decode() -> None:
    for v in _doc()["vectors"]:
        if v["name"].startswith("bad-frame"):
            continue
        reader = control.FrameReader(control.ClientMessage)
        for hx in v["client"]:
            assert len(list(reader.feed(bytes.fromhex(hx)))) == 1, v["name"]


def _by_name(name: str) -> dict:
    return next(v for v in _doc()["vectors"] if v["name"] == name)


def test_check_allows_what_varies() -> None:
    exp = _by_name("hello-welcome")["daemon"][0]
    other = control.encode(control.Welcome(version=1, workers=7, request_ring_bytes=1 << 16,
                                           completion_ring_bytes=1 << 12, client_id=123456))
    check_frame(other, exp)
    ack = _by_name("produce-bad-partition-ack")["daemon"][1]
    check_frame(control.encode(control.ProduceAck(seq=4, results=[
        control.RecordResult(partition=5, offset=-1, timestamp=-1, error_code=3, error_name="UNKNOWN_TOPIC_OR_PARTITION"),
        control.RecordResult(partition=0, offset=99999, timestamp=1_700_000_000_000, error_code=0, error_name="NONE"),
    ])), ack)


@pytest.mark.parametrize("change", ["version", "fatal", "offset-kind", "missing-key", "long-int", "failed-partition"])
def test_check_refuses_changes(change: str) -> None:
    if change == "version":
        exp = _by_name("hello-welcome")["daemon"][0]
        frame = control.encode(control.Welcome(version=2, workers=2, request_ring_bytes=1, completion_ring_bytes=1, client_id=1))
    elif change == "fatal":
        exp = _by_name("second-hello")["daemon"][1]
        frame = control.encode(control.error_reply(control.ERR_UNEXPECTED_MESSAGE, "x", fatal=False))
    elif change == "offset-kind":
        exp = _by_name("produce-ack")["daemon"][1]
        frame = control.encode(control.ProduceAck(seq=1, results=[control.RecordResult(
            partition=0, offset=-1, timestamp=1_700_000_000_000, error_code=0, error_name="NONE")]))
    elif change == "missing-key":
        exp = _by_name("stats")["daemon"][1]
        frame = control.encode(control.StatsReply(stats={"workers": {}}))
    elif change == "long-int":
        # seq 1 written as uint 32: the same value, not the smallest encoding.
        exp = _by_name("produce-ack")["daemon"][1]
        good = bytes.fromhex(exp["frame"])[4:]
        body = good.replace(b"\xa3seq\x01", b"\xa3seq\xce\x00\x00\x00\x01")
        frame = struct.pack(">I", len(body)) + body
    else:
        exp = _by_name("produce-bad-partition-ack")["daemon"][1]
        frame = control.encode(control.ProduceAck(seq=4, results=[
            control.RecordResult(partition=-1, offset=-1, timestamp=-1, error_code=3, error_name="UNKNOWN_TOPIC_OR_PARTITION"),
            control.RecordResult(partition=0, offset=1, timestamp=1_700_000_000_000, error_code=0, error_name="NONE"),
        ]))
    with pytest.raises(ConformanceError):
        check_frame(frame, exp)
