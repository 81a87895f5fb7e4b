"""Kafka request/response codec against hand-written byte vectors, plus round trips.

The vectors are spelled out field by field from the message JSON schemas (Kafka 4.1.1); one
vector (``JAVA_PRODUCE_RESPONSE_V9``) was produced by Kafka's own serializer as a second,
independent witness.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.protocol import messages as m
from shm.errors import ProtocolError


def h(*parts: str) -> bytes:
    return bytes.fromhex("".join(parts).replace(" ", ""))


def strip_request(frame: bytes) -> bytes:
    size = int.from_bytes(frame[:4], "big")
    assert size == len(frame) - 4
    return frame[4:]


def response_body(frame: bytes, header_version: int, correlation_id: int) -> memoryview:
    size = int.from_bytes(frame[:4], "big")
    assert size == len(frame) - 4
    hdr = m.decode_response_header(frame[4:], header_version)
    assert hdr.correlation_id == correlation_id
    return memoryview(frame[4:])[hdr.body_offset :]


# --- headers ------------------------------------------------------------------------------


def test_request_header_v2_vector() -> None:
    # api_key 18 | version 3 | correlation 7 | client_id INT16-length "ab" | no tagged fields
    assert m.encode_request_header(18, 3, 7, "ab") == h("0012 0003 00000007 0002 6162 00")
    assert m.encode_request_header(0, 9, -1, None) == h("0000 0009 ffffffff ffff 00")


def test_response_headers_v0_and_v1() -> None:
    assert m.decode_response_header(h("0000002a 99"), 0) == m.ResponseHeader(42, 4)
    # v1 carries tagged fields: one field, tag 5, two bytes
    assert m.decode_response_header(h("0000002a 01 05 02 abcd 99"), 1) == m.ResponseHeader(42, 9)
    assert m.response_header_version(m.API_VERSIONS) == 0
    assert m.response_header_version(m.PRODUCE) == 1


# --- ApiVersions --------------------------------------------------------------------------


def test_api_versions_request_v3_vector() -> None:
    frame = m.encode_api_versions_request(3, 1, "c", m.ApiVersionsRequest("sl", "0.1"))
    body = h(
        "0012 0003 00000001 0001 63 00",  # header v2
        "03 736c",  # client_software_name "sl"
        "04 302e31",  # client_software_version "0.1"
        "00",  # tagged fields
    )
    assert frame == len(body).to_bytes(4, "big") + body


API_VERSIONS_RESPONSE_V3 = h(
    "0000",  # error_code
    "03",  # api_keys: 2 entries
    "0000 0003 000c 00",  # Produce 3..12
    "0012 0000 0004 00",  # ApiVersions 0..4
    "00000000",  # throttle_time_ms
    "01 01 08 0000000000000005",  # tagged: FinalizedFeaturesEpoch = 5 (skipped)
)


def test_api_versions_response_v3_vector() -> None:
    resp = m.decode_api_versions_response(API_VERSIONS_RESPONSE_V3, 3)
    assert resp == m.ApiVersionsResponse(
        0, [m.ApiVersionRange(0, 3, 12), m.ApiVersionRange(18, 0, 4)], 0
    )


def test_api_versions_unsupported_version_answer_is_read_as_v0() -> None:
    # error 35 | INT32 array length 1 | ApiVersions 0..2, no tagged fields, no throttle
    resp = m.decode_api_versions_response(h("0023 00000001 0012 0000 0002"), 4)
    assert resp.error_code == 35
    assert resp.api_keys == [m.ApiVersionRange(18, 0, 2)]
    with pytest.raises(m.UnsupportedVersionError, match="ApiVersions"):
        m.pick_versions(resp.api_keys, [m.API_VERSIONS])


def test_api_versions_response_round_trip_uses_header_v0() -> None:
    resp = m.ApiVersionsResponse(0, [m.ApiVersionRange(3, 0, 13), m.ApiVersionRange(22, 0, 6)], 9)
    frame = m.encode_api_versions_response(77, 4, resp)
    assert frame[4:8] == (77).to_bytes(4, "big") and frame[8:10] == b"\x00\x00"  # no tagged byte
    assert m.decode_api_versions_response(response_body(frame, 0, 77), 4) == resp


def test_pick_versions_takes_the_highest_common_version() -> None:
    broker = [
        m.ApiVersionRange(0, 3, 13),
        m.ApiVersionRange(3, 0, 13),
        m.ApiVersionRange(18, 0, 4),
        m.ApiVersionRange(22, 0, 6),
    ]
    assert m.pick_versions(broker) == {m.PRODUCE: 12, m.METADATA: 13, m.API_VERSIONS: 4, m.INIT_PRODUCER_ID: 5}
    older = [m.ApiVersionRange(0, 3, 10), m.ApiVersionRange(3, 0, 12), m.ApiVersionRange(18, 0, 3), m.ApiVersionRange(22, 0, 4)]
    assert m.pick_versions(older) == {m.PRODUCE: 10, m.METADATA: 12, m.API_VERSIONS: 3, m.INIT_PRODUCER_ID: 4}


def test_pick_versions_refuses_clearly() -> None:
    with pytest.raises(m.UnsupportedVersionError, match=r"Produce.*9\.\.12.*3\.\.8") as info:
        m.pick_versions([m.ApiVersionRange(0, 3, 8)], [m.PRODUCE])
    assert info.value.code == 35 and not info.value.retriable
    with pytest.raises(m.UnsupportedVersionError, match="does not offer Metadata"):
        m.pick_versions([m.ApiVersionRange(0, 3, 12)], [m.METADATA])


def test_encoders_refuse_unimplemented_versions() -> None:
    with pytest.raises(ValueError):
        m.encode_metadata_request(11, 0, None, m.MetadataRequest(["t"]))
    with pytest.raises(ValueError):
        m.encode_produce_request(13, 0, None, 1, 1000, [])


# --- Metadata -----------------------------------------------------------------------------


def test_metadata_request_v12_vector() -> None:
    frame = m.encode_metadata_request(12, 5, None, m.MetadataRequest(["t"], allow_auto_topic_creation=False))
    assert strip_request(frame) == h(
        "0003 000c 00000005 ffff 00",  # header: Metadata v12, correlation 5, null client id
        "02",  # topics: 1
        "00000000000000000000000000000000 02 74 00",  # zero topic id, name "t", tagged
        "00",  # allow_auto_topic_creation false
        "00",  # include_topic_authorized_operations false
        "00",  # tagged
    )
    # a null topic array asks for all topics; an empty one for none (just brokers)
    assert strip_request(m.encode_metadata_request(12, 5, None, m.MetadataRequest(None)))[11] == 0
    assert strip_request(m.encode_metadata_request(12, 5, None, m.MetadataRequest([])))[11] == 1


METADATA_RESPONSE_V12 = h(
    "00000000",  # throttle_time_ms
    "02",  # brokers: 1
    "00000001 02 68 00002384 00 00",  # node 1, host "h", port 9092, rack null, tagged
    "02 63",  # cluster_id "c"
    "00000001",  # controller_id
    "02",  # topics: 1
    "0000 02 74",  # error 0, name "t"
    "11111111111111111111111111111111",  # topic_id
    "00",  # is_internal
    "02",  # partitions: 1
    "0000 00000000 00000001 00000005",  # error 0, partition 0, leader 1, leader_epoch 5
    "02 00000001",  # replicas [1]
    "02 00000001",  # isr [1]
    "01",  # offline []
    "00",  # partition tagged
    "80000000",  # topic_authorized_operations (unset)
    "00",  # topic tagged
    "00",  # tagged
)

EXPECTED_METADATA = m.MetadataResponse(
    throttle_time_ms=0,
    brokers=[m.MetadataBroker(1, "h", 9092, None)],
    cluster_id="c",
    controller_id=1,
    topics=[
        m.MetadataTopic(
            0, "t", b"\x11" * 16, False, [m.MetadataPartition(0, 0, 1, 5, [1], [1], [])], -(2**31)
        )
    ],
)


def test_metadata_response_v12_vector() -> None:
    assert m.decode_metadata_response(METADATA_RESPONSE_V12, 12) == EXPECTED_METADATA


def test_metadata_response_v13_has_a_top_level_error_code() -> None:
    v13 = METADATA_RESPONSE_V12[:-1] + h("0003") + h("00")
    resp = m.decode_metadata_response(v13, 13)
    assert resp.error_code == 3
    with pytest.raises(ProtocolError):
        m.decode_metadata_response(v13, 12)  # two trailing bytes under v12


@pytest.mark.parametrize("version", [12, 13])
def test_metadata_round_trip(version: int) -> None:
    frame = m.encode_metadata_response(9, version, EXPECTED_METADATA)
    assert m.decode_metadata_response(response_body(frame, 1, 9), version) == EXPECTED_METADATA
    req = m.MetadataRequest(["a", "b\u00e9"], allow_auto_topic_creation=True)
    hdr, back = m.decode_metadata_request(strip_request(m.encode_metadata_request(version, 3, "cid", req)))
    assert (hdr.api_key, hdr.api_version, hdr.correlation_id, hdr.client_id) == (3, version, 3, "cid")
    assert back == req


# --- InitProducerId -----------------------------------------------------------------------


def test_init_producer_id_request_v4_vector() -> None:
    frame = m.encode_init_producer_id_request(4, 2, "x", m.InitProducerIdRequest())
    assert strip_request(frame) == h(
        "0016 0004 00000002 0001 78 00",  # header
        "00",  # transactional_id null
        "0000ea60",  # transaction_timeout_ms 60000
        "ffffffffffffffff",  # producer_id -1
        "ffff",  # producer_epoch -1
        "00",  # tagged
    )


def test_init_producer_id_response_vector() -> None:
    body = h("00000000 0000 0000000000000005 0001 00")
    assert m.decode_init_producer_id_response(body, 5) == m.InitProducerIdResponse(0, 0, 5, 1)


def test_init_producer_id_round_trip() -> None:
    req = m.InitProducerIdRequest(None, 1000, 42, 3)
    _, back = m.decode_init_producer_id_request(strip_request(m.encode_init_producer_id_request(5, 1, None, req)))
    assert back == req
    resp = m.InitProducerIdResponse(1, 15, -1, -1)
    frame = m.encode_init_producer_id_response(4, 3, resp)
    assert m.decode_init_producer_id_response(response_body(frame, 1, 4), 3) == resp


# --- Produce ------------------------------------------------------------------------------


def test_produce_request_v9_vector_and_no_copy() -> None:
    records = memoryview(bytearray(b"REC"))
    buffers = m.encode_produce_request(9, 7, "x", -1, 30000, [("t", [(0, records)])])
    assert any(b is records for b in buffers), "record bytes must be passed through, not copied"
    wire = b"".join(bytes(b) for b in buffers)
    body = h(
        "0000 0009 00000007 0001 78 00",  # header v2
        "00",  # transactional_id null
        "ffff",  # acks -1
        "00007530",  # timeout_ms 30000
        "02",  # topics: 1
        "02 74",  # name "t"
        "02",  # partitions: 1
        "00000000",  # index 0
        "04 524543",  # records: COMPACT_BYTES of 3
        "00",  # partition tagged
        "00",  # topic tagged
        "00",  # tagged
    )
    assert wire == len(body).to_bytes(4, "big") + body


def test_produce_request_round_trip_many_partitions() -> None:
    topics = [("a", [(0, b"x" * 200), (2, b"")]), ("b", [(1, bytes(range(256)))])]
    buffers = m.encode_produce_request(11, 99, None, 1, 500, topics)
    hdr, req = m.decode_produce_request(strip_request(b"".join(bytes(b) for b in buffers)))
    assert (hdr.api_key, hdr.api_version, hdr.correlation_id) == (0, 11, 99)
    assert (req.acks, req.timeout_ms, req.transactional_id) == (1, 500, None)
    got = [(t.name, [(p.index, bytes(p.records)) for p in t.partitions]) for t in req.topics]
    assert got == [(n, [(i, bytes(r)) for i, r in ps]) for n, ps in topics]


# Kafka 4.1.1's own ProduceResponseData serializer, v9: topic "t", partition 1, error 0,
# base offset 5, log_append_time -1, log_start_offset 0, throttle 7.
JAVA_PRODUCE_RESPONSE_V9 = h(
    "020274020000000100000000000000000005ffffffffffffffff0000000000000000010000000000000700"
)


def test_produce_response_from_kafkas_own_serializer() -> None:
    resp = m.decode_produce_response(JAVA_PRODUCE_RESPONSE_V9, 9)
    assert resp == m.ProduceResponse(
        [m.ProduceTopicResponse("t", [m.ProducePartitionResponse(1, 0, 5, -1, 0, [], None)])], 7
    )


PRODUCE_RESPONSE_V10 = h(
    "02",  # responses: 1
    "02 74",  # name "t"
    "02",  # partitions: 1
    "00000001",  # index 1
    "0006",  # error NOT_LEADER_OR_FOLLOWER
    "ffffffffffffffff",  # base_offset -1
    "ffffffffffffffff",  # log_append_time_ms -1
    "ffffffffffffffff",  # log_start_offset -1
    "02 00000000 04 626164 00",  # record_errors: [(0, "bad")]
    "03 6e6f",  # error_message "no"
    "01 00 09 00000002 00000007 00",  # tagged: CurrentLeader(leader 2, epoch 7)
    "00",  # topic tagged
    "00000000",  # throttle_time_ms
    "01 00 0d 02 00000002 02 62 00002384 00 00",  # tagged: NodeEndpoints [(2, "b", 9092, null)]
)


def test_produce_response_v10_vector_with_tagged_leader_hints() -> None:
    resp = m.decode_produce_response(PRODUCE_RESPONSE_V10, 10)
    part = resp.topics[0].partitions[0]
    assert part == m.ProducePartitionResponse(
        1, 6, -1, -1, -1, [m.RecordError(0, "bad")], "no", current_leader_id=2, current_leader_epoch=7
    )
    assert resp.node_endpoints == [m.NodeEndpoint(2, "b", 9092, None)]


def test_produce_response_round_trip_v12() -> None:
    resp = m.ProduceResponse(
        [
            m.ProduceTopicResponse(
                "x",
                [
                    m.ProducePartitionResponse(0, 0, 100, 1700000000000, 0),
                    m.ProducePartitionResponse(3, 10, -1, -1, -1, [], "too big", 4, 9),
                ],
            )
        ],
        0,
        [m.NodeEndpoint(4, "host", 1, "r1")],
    )
    frame = m.encode_produce_response(123, 12, resp)
    assert m.decode_produce_response(response_body(frame, 1, 123), 12) == resp


def test_truncated_response_raises_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        m.decode_produce_response(PRODUCE_RESPONSE_V10[:-3], 10)
    with pytest.raises(ProtocolError):
        m.decode_metadata_response(METADATA_RESPONSE_V12[:20], 12)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(min_size=1, max_size=20),
            st.lists(st.tuples(st.integers(0, 2**31 - 1), st.binary(max_size=300)), max_size=4),
        ),
        max_size=4,
    ),
    st.sampled_from([0, 1, -1]),
    st.integers(9, 12),
)
def test_produce_request_round_trip_property(topics, acks: int, version: int) -> None:
    buffers = m.encode_produce_request(version, 1, "p", acks, 1000, topics)
    _, req = m.decode_produce_request(strip_request(b"".join(bytes(b) for b in buffers)))
    assert [(t.name, [(p.index, bytes(p.records)) for p in t.partitions]) for t in req.topics] == topics
    assert req.acks == acks
