"""Kafka request/response codec for the APIs a producer needs. No I/O.

Versions implemented (every one a *flexible* version: compact strings/arrays, tagged fields):

    API              key  versions  notes
    Produce            0  9..12     12 has the same wire form as 11 (KIP-890); 13 uses topic ids
    Metadata           3  12..13    13 adds a top-level ErrorCode
    ApiVersions       18  3..4      the RESPONSE header is always v0 (no tagged fields)
    InitProducerId    22  3..5      3+ carries ProducerId/ProducerEpoch (epoch bump)
    SaslHandshake     17  1         NOT flexible: request header v1, response header v0
    SaslAuthenticate  36  2         flexible; 1+ carries SessionLifetimeMs (KIP-368)

The two SASL APIs are pinned only on connections that authenticate (``pick_versions(...,
SASL_APIS)``); the default pin covers :data:`PRODUCER_APIS`, so a broker that offers no SASL
still serves a PLAINTEXT connection.

One version per API is pinned per connection by :func:`pick_versions` from the broker's
ApiVersions answer: the highest version both sides support, or :class:`UnsupportedVersionError`.

Framing: every request and response is preceded by an INT32 size of what follows.
Requests use header v2, responses header v1, except ApiVersions responses (header v0), so a
client can read the answer even when the broker rejects the request's version.

Request encoders return complete frames (size prefix included). ``encode_produce_request``
returns a list of buffers (small encoded pieces interleaved with the callers' record-batch
memoryviews) for ``transport.writelines``/``socket.sendmsg``, so record bytes are never copied.
Every message also has the opposite-direction codec (request decoders, response encoders) so
tests can run a broker double without hand-building every answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import msgspec

from daemon.protocol.primitives import (
    EMPTY_TAGGED_FIELDS,
    Reader,
    boolean,
    compact_array_len,
    compact_bytes,
    compact_bytes_header,
    compact_string,
    int16,
    int32,
    int64,
    string,
    tagged_fields,
)
from shm.errors import KafkaError, ProtocolError

__all__ = [
    "PRODUCE",
    "METADATA",
    "API_VERSIONS",
    "INIT_PRODUCER_ID",
    "SASL_HANDSHAKE",
    "SASL_AUTHENTICATE",
    "PRODUCER_APIS",
    "SASL_APIS",
    "API_NAMES",
    "SUPPORTED_VERSIONS",
    "UnsupportedVersionError",
    "pick_versions",
    "response_header_version",
    "RequestHeader",
    "ResponseHeader",
    "encode_request_header",
    "decode_request_header",
    "encode_response_header",
    "decode_response_header",
    "frame",
    "ApiVersionRange",
    "ApiVersionsRequest",
    "ApiVersionsResponse",
    "MetadataRequest",
    "MetadataBroker",
    "MetadataPartition",
    "MetadataTopic",
    "MetadataResponse",
    "InitProducerIdRequest",
    "InitProducerIdResponse",
    "ProducePartitionData",
    "ProduceTopicData",
    "ProduceRequest",
    "RecordError",
    "ProducePartitionResponse",
    "ProduceTopicResponse",
    "NodeEndpoint",
    "ProduceResponse",
    "encode_api_versions_request",
    "decode_api_versions_request",
    "encode_api_versions_response",
    "decode_api_versions_response",
    "encode_metadata_request",
    "decode_metadata_request",
    "encode_metadata_response",
    "decode_metadata_response",
    "encode_init_producer_id_request",
    "decode_init_producer_id_request",
    "encode_init_producer_id_response",
    "decode_init_producer_id_response",
    "SaslHandshakeResponse",
    "SaslAuthenticateResponse",
    "encode_sasl_handshake_request",
    "decode_sasl_handshake_request",
    "encode_sasl_handshake_response",
    "decode_sasl_handshake_response",
    "encode_sasl_authenticate_request",
    "decode_sasl_authenticate_request",
    "encode_sasl_authenticate_response",
    "decode_sasl_authenticate_response",
    "encode_produce_request",
    "decode_produce_request",
    "encode_produce_response",
    "decode_produce_response",
]

PRODUCE = 0
METADATA = 3
API_VERSIONS = 18
INIT_PRODUCER_ID = 22
SASL_HANDSHAKE = 17
SASL_AUTHENTICATE = 36

API_NAMES: dict[int, str] = {
    PRODUCE: "Produce",
    METADATA: "Metadata",
    API_VERSIONS: "ApiVersions",
    INIT_PRODUCER_ID: "InitProducerId",
    SASL_HANDSHAKE: "SaslHandshake",
    SASL_AUTHENTICATE: "SaslAuthenticate",
}

# What every connection pins; SASL_APIS only connections that authenticate.
PRODUCER_APIS: tuple[int, ...] = (PRODUCE, METADATA, API_VERSIONS, INIT_PRODUCER_ID)
SASL_APIS: tuple[int, ...] = (SASL_HANDSHAKE, SASL_AUTHENTICATE)

# (min, max) version this codec implements, per API key.
SUPPORTED_VERSIONS: dict[int, tuple[int, int]] = {
    PRODUCE: (9, 12),
    METADATA: (12, 13),
    API_VERSIONS: (3, 4),
    INIT_PRODUCER_ID: (3, 5),
    SASL_HANDSHAKE: (1, 1),
    SASL_AUTHENTICATE: (2, 2),
}

_UNSUPPORTED_VERSION = 35


class UnsupportedVersionError(KafkaError):
    """No version of an API is supported by both this codec and the broker."""

    code = _UNSUPPORTED_VERSION
    name = "UNSUPPORTED_VERSION"
    retriable = False


# --------------------------------------------------------------------------------------------
# Headers and framing
# --------------------------------------------------------------------------------------------


class RequestHeader(msgspec.Struct, frozen=True):
    """Request header v2."""

    # RequestHeader v2
    #   request_api_key      INT16
    #   request_api_version  INT16
    #   correlation_id       INT32
    #   client_id            NULLABLE_STRING   (INT16 length even in v2, so any broker can read it)
    #   _tagged_fields       TAGGED_FIELDS
    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None


class ResponseHeader(msgspec.Struct, frozen=True):
    """Response header v0 or v1; ``body_offset`` is where the response body starts."""

    # ResponseHeader v0                 ResponseHeader v1
    #   correlation_id  INT32             correlation_id  INT32
    #                                     _tagged_fields  TAGGED_FIELDS
    correlation_id: int
    body_offset: int


def response_header_version(api_key: int) -> int:
    """0 for ApiVersions (always, by design) and SaslHandshake (not flexible), else 1."""
    return 0 if api_key in (API_VERSIONS, SASL_HANDSHAKE) else 1


def encode_request_header(api_key: int, api_version: int, correlation_id: int, client_id: str | None) -> bytes:
    """Encode a request header v2."""
    return int16(api_key) + int16(api_version) + int32(correlation_id) + string(client_id) + EMPTY_TAGGED_FIELDS


def decode_request_header(r: Reader) -> RequestHeader:
    """Decode a request header v2 from ``r`` (advances it to the body)."""
    api_key = r.int16()
    api_version = r.int16()
    correlation_id = r.int32()
    client_id = r.string()
    r.tagged_fields()
    return RequestHeader(api_key, api_version, correlation_id, client_id)


def encode_response_header(correlation_id: int, header_version: int) -> bytes:
    """Encode a response header v0 or v1."""
    return int32(correlation_id) + (EMPTY_TAGGED_FIELDS if header_version >= 1 else b"")


def decode_response_header(buf: bytes | memoryview, header_version: int) -> ResponseHeader:
    """Decode a response header (the frame's size prefix already removed)."""
    r = Reader(buf)
    correlation_id = r.int32()
    if header_version >= 1:
        r.tagged_fields()
    return ResponseHeader(correlation_id, r.pos)


def frame(*parts: bytes) -> bytes:
    """Prefix the concatenated parts with their INT32 size."""
    body = b"".join(parts)
    return int32(len(body)) + body


def pick_versions(api_keys: Sequence[ApiVersionRange], wanted: Iterable[int] | None = None) -> dict[int, int]:
    """Choose one version per API: the highest that the broker and this codec both support.

    Args:
        api_keys: the broker's ranges from its ApiVersions response.
        wanted: API keys to pin (default: :data:`PRODUCER_APIS`).

    Raises:
        UnsupportedVersionError: an API is missing on the broker or the ranges do not overlap.
    """
    broker = {k.api_key: k for k in api_keys}
    chosen: dict[int, int] = {}
    for key in wanted if wanted is not None else PRODUCER_APIS:
        lo, hi = SUPPORTED_VERSIONS[key]
        b = broker.get(key)
        if b is None:
            raise UnsupportedVersionError(f"the broker does not offer {API_NAMES[key]} (key {key}) at all")
        top = min(hi, b.max_version)
        if top < max(lo, b.min_version):
            raise UnsupportedVersionError(
                f"no common {API_NAMES[key]} version: Sluice implements {lo}..{hi}, "
                f"the broker serves {b.min_version}..{b.max_version}"
            )
        chosen[key] = top
    return chosen


def _check_version(api_key: int, version: int) -> None:
    lo, hi = SUPPORTED_VERSIONS[api_key]
    if not lo <= version <= hi:
        raise ValueError(f"{API_NAMES[api_key]} v{version} is not implemented (only {lo}..{hi})")


def _request(api_key: int, version: int, correlation_id: int, client_id: str | None, body: bytes) -> bytes:
    _check_version(api_key, version)
    return frame(encode_request_header(api_key, version, correlation_id, client_id), body)


def _check_api(header: RequestHeader, api_key: int) -> None:
    if header.api_key != api_key:
        raise ProtocolError(f"expected {API_NAMES[api_key]} request, got api key {header.api_key}")
    _check_version(api_key, header.api_version)


# --------------------------------------------------------------------------------------------
# ApiVersions (key 18)
# --------------------------------------------------------------------------------------------


class ApiVersionsRequest(msgspec.Struct, frozen=True):
    """ApiVersions request v3/v4."""

    # ApiVersionsRequest v3-4
    #   client_software_name     COMPACT_STRING
    #   client_software_version  COMPACT_STRING
    #   _tagged_fields           TAGGED_FIELDS
    client_software_name: str
    client_software_version: str


class ApiVersionRange(msgspec.Struct, frozen=True):
    """One API's supported version range, as a broker announces it."""

    # ApiVersion (element of ApiKeys)
    #   api_key         INT16
    #   min_version     INT16
    #   max_version     INT16
    #   _tagged_fields  TAGGED_FIELDS   (v3+ only)
    api_key: int
    min_version: int
    max_version: int


class ApiVersionsResponse(msgspec.Struct, frozen=True):
    """ApiVersions response. Supported features (tagged fields) are skipped."""

    # ApiVersionsResponse v3-4 (v0 when error_code = UNSUPPORTED_VERSION, see the decoder)
    #   error_code         INT16
    #   api_keys           COMPACT_ARRAY of ApiVersion
    #   throttle_time_ms   INT32
    #   _tagged_fields     TAGGED_FIELDS  (0: SupportedFeatures, 1: FinalizedFeaturesEpoch,
    #                                      2: FinalizedFeatures, 3: ZkMigrationReady)
    error_code: int
    api_keys: list[ApiVersionRange]
    throttle_time_ms: int = 0


def encode_api_versions_request(
    version: int, correlation_id: int, client_id: str | None, req: ApiVersionsRequest
) -> bytes:
    """Encode a framed ApiVersions request."""
    body = compact_string(req.client_software_name) + compact_string(req.client_software_version) + EMPTY_TAGGED_FIELDS
    return _request(API_VERSIONS, version, correlation_id, client_id, body)


def decode_api_versions_request(buf: bytes | memoryview) -> tuple[RequestHeader, ApiVersionsRequest]:
    """Decode an ApiVersions request (without its size prefix)."""
    r = Reader(buf)
    h = decode_request_header(r)
    _check_api(h, API_VERSIONS)
    req = ApiVersionsRequest(r.compact_string() or "", r.compact_string() or "")
    r.tagged_fields()
    r.expect_end()
    return h, req


def encode_api_versions_response(correlation_id: int, version: int, resp: ApiVersionsResponse) -> bytes:
    """Encode a framed ApiVersions response (header v0)."""
    parts = [int16(resp.error_code), compact_array_len(len(resp.api_keys))]
    for k in resp.api_keys:
        parts.append(int16(k.api_key) + int16(k.min_version) + int16(k.max_version) + EMPTY_TAGGED_FIELDS)
    parts.append(int32(resp.throttle_time_ms) + EMPTY_TAGGED_FIELDS)
    return frame(encode_response_header(correlation_id, 0), *parts)


def decode_api_versions_response(buf: bytes | memoryview, version: int) -> ApiVersionsResponse:
    """Decode an ApiVersions response body (after the v0 header).

    A broker that does not support our request version answers UNSUPPORTED_VERSION with a v0
    body (INT32 array length, entries of three INT16, nothing else), listing the ApiVersions
    range it does serve, so the caller can retry with a lower version.
    """
    r = Reader(buf)
    error_code = r.int16()
    if error_code == _UNSUPPORTED_VERSION:
        # ApiVersionsResponse v0: error_code INT16 | api_keys ARRAY(INT32 length) of 3 x INT16
        n = r.int32()
        if n < 0 or n * 6 > r.remaining():
            raise ProtocolError(f"bad ApiVersions v0 array length {n}")
        keys = [ApiVersionRange(r.int16(), r.int16(), r.int16()) for _ in range(n)]
        return ApiVersionsResponse(error_code, keys, 0)
    n = r.compact_array_len()
    keys = []
    for _ in range(max(n, 0)):
        k = ApiVersionRange(r.int16(), r.int16(), r.int16())
        r.tagged_fields()
        keys.append(k)
    throttle = r.int32()
    r.tagged_fields()
    r.expect_end()
    return ApiVersionsResponse(error_code, keys, throttle)


# --------------------------------------------------------------------------------------------
# Metadata (key 3)
# --------------------------------------------------------------------------------------------

_NULL_UUID = bytes(16)


class MetadataRequest(msgspec.Struct, frozen=True):
    """Metadata request v12/v13 (by topic name; ``topics=None`` asks for every topic)."""

    # MetadataRequest v12-13
    #   topics                               COMPACT_NULLABLE_ARRAY of
    #     topic_id                             UUID              (all zero: by name)
    #     name                                 COMPACT_NULLABLE_STRING
    #     _tagged_fields                       TAGGED_FIELDS
    #   allow_auto_topic_creation            BOOLEAN
    #   include_topic_authorized_operations  BOOLEAN
    #   _tagged_fields                       TAGGED_FIELDS
    topics: list[str] | None
    allow_auto_topic_creation: bool = False
    include_topic_authorized_operations: bool = False


class MetadataBroker(msgspec.Struct, frozen=True):
    """A broker of the cluster."""

    # MetadataResponseBroker
    #   node_id         INT32
    #   host            COMPACT_STRING
    #   port            INT32
    #   rack            COMPACT_NULLABLE_STRING
    #   _tagged_fields  TAGGED_FIELDS
    node_id: int
    host: str
    port: int
    rack: str | None = None


class MetadataPartition(msgspec.Struct, frozen=True):
    """One partition's leadership."""

    # MetadataResponsePartition
    #   error_code        INT16
    #   partition_index   INT32
    #   leader_id         INT32     (-1: no leader)
    #   leader_epoch      INT32
    #   replica_nodes     COMPACT_ARRAY of INT32
    #   isr_nodes         COMPACT_ARRAY of INT32
    #   offline_replicas  COMPACT_ARRAY of INT32
    #   _tagged_fields    TAGGED_FIELDS
    error_code: int
    partition_index: int
    leader_id: int
    leader_epoch: int = -1
    replica_nodes: list[int] = []
    isr_nodes: list[int] = []
    offline_replicas: list[int] = []


class MetadataTopic(msgspec.Struct, frozen=True):
    """One topic's metadata."""

    # MetadataResponseTopic
    #   error_code                   INT16
    #   name                         COMPACT_NULLABLE_STRING
    #   topic_id                     UUID
    #   is_internal                  BOOLEAN
    #   partitions                   COMPACT_ARRAY of MetadataResponsePartition
    #   topic_authorized_operations  INT32
    #   _tagged_fields               TAGGED_FIELDS
    error_code: int
    name: str | None
    topic_id: bytes = _NULL_UUID
    is_internal: bool = False
    partitions: list[MetadataPartition] = []
    topic_authorized_operations: int = -(2**31)


class MetadataResponse(msgspec.Struct, frozen=True):
    """Metadata response v12/v13."""

    # MetadataResponse v12-13
    #   throttle_time_ms  INT32
    #   brokers           COMPACT_ARRAY of MetadataResponseBroker
    #   cluster_id        COMPACT_NULLABLE_STRING
    #   controller_id     INT32
    #   topics            COMPACT_ARRAY of MetadataResponseTopic
    #   error_code        INT16             (v13+)
    #   _tagged_fields    TAGGED_FIELDS
    throttle_time_ms: int
    brokers: list[MetadataBroker]
    cluster_id: str | None
    controller_id: int
    topics: list[MetadataTopic]
    error_code: int = 0


def encode_metadata_request(version: int, correlation_id: int, client_id: str | None, req: MetadataRequest) -> bytes:
    """Encode a framed Metadata request."""
    parts = [compact_array_len(None if req.topics is None else len(req.topics))]
    for name in req.topics or ():
        parts.append(_NULL_UUID + compact_string(name) + EMPTY_TAGGED_FIELDS)
    parts.append(boolean(req.allow_auto_topic_creation) + boolean(req.include_topic_authorized_operations))
    parts.append(EMPTY_TAGGED_FIELDS)
    return _request(METADATA, version, correlation_id, client_id, b"".join(parts))


def decode_metadata_request(buf: bytes | memoryview) -> tuple[RequestHeader, MetadataRequest]:
    """Decode a Metadata request (without its size prefix)."""
    r = Reader(buf)
    h = decode_request_header(r)
    _check_api(h, METADATA)
    n = r.compact_array_len()
    topics: list[str] | None = None
    if n >= 0:
        topics = []
        for _ in range(n):
            r.uuid()
            topics.append(r.compact_string() or "")
            r.tagged_fields()
    req = MetadataRequest(topics, r.boolean(), r.boolean())
    r.tagged_fields()
    r.expect_end()
    return h, req


def _int32_array(values: Sequence[int]) -> bytes:
    return compact_array_len(len(values)) + b"".join(int32(v) for v in values)


def encode_metadata_response(correlation_id: int, version: int, resp: MetadataResponse) -> bytes:
    """Encode a framed Metadata response (header v1)."""
    _check_version(METADATA, version)
    parts = [int32(resp.throttle_time_ms), compact_array_len(len(resp.brokers))]
    for b in resp.brokers:
        parts.append(int32(b.node_id) + compact_string(b.host) + int32(b.port) + compact_string(b.rack) + EMPTY_TAGGED_FIELDS)
    parts.append(compact_string(resp.cluster_id) + int32(resp.controller_id))
    parts.append(compact_array_len(len(resp.topics)))
    for t in resp.topics:
        parts.append(int16(t.error_code) + compact_string(t.name) + t.topic_id + boolean(t.is_internal))
        parts.append(compact_array_len(len(t.partitions)))
        for p in t.partitions:
            parts.append(int16(p.error_code) + int32(p.partition_index) + int32(p.leader_id) + int32(p.leader_epoch))
            parts.append(_int32_array(p.replica_nodes) + _int32_array(p.isr_nodes) + _int32_array(p.offline_replicas))
            parts.append(EMPTY_TAGGED_FIELDS)
        parts.append(int32(t.topic_authorized_operations) + EMPTY_TAGGED_FIELDS)
    if version >= 13:
        parts.append(int16(resp.error_code))
    parts.append(EMPTY_TAGGED_FIELDS)
    return frame(encode_response_header(correlation_id, 1), *parts)


def decode_metadata_response(buf: bytes | memoryview, version: int) -> MetadataResponse:
    """Decode a Metadata response body (after the v1 header)."""
    _check_version(METADATA, version)
    r = Reader(buf)
    throttle = r.int32()
    brokers = []
    for _ in range(max(r.compact_array_len(), 0)):
        b = MetadataBroker(r.int32(), r.compact_string() or "", r.int32(), r.compact_string())
        r.tagged_fields()
        brokers.append(b)
    cluster_id = r.compact_string()
    controller_id = r.int32()
    topics = []
    for _ in range(max(r.compact_array_len(), 0)):
        error_code = r.int16()
        name = r.compact_string()
        topic_id = r.uuid()
        is_internal = r.boolean()
        partitions = []
        for _ in range(max(r.compact_array_len(), 0)):
            p = MetadataPartition(
                error_code=r.int16(),
                partition_index=r.int32(),
                leader_id=r.int32(),
                leader_epoch=r.int32(),
                replica_nodes=r.int32_compact_array(),
                isr_nodes=r.int32_compact_array(),
                offline_replicas=r.int32_compact_array(),
            )
            r.tagged_fields()
            partitions.append(p)
        ops = r.int32()
        r.tagged_fields()
        topics.append(MetadataTopic(error_code, name, topic_id, is_internal, partitions, ops))
    error_code = r.int16() if version >= 13 else 0
    r.tagged_fields()
    r.expect_end()
    return MetadataResponse(throttle, brokers, cluster_id, controller_id, topics, error_code)


# --------------------------------------------------------------------------------------------
# InitProducerId (key 22)
# --------------------------------------------------------------------------------------------


class InitProducerIdRequest(msgspec.Struct, frozen=True):
    """InitProducerId request v3..v5 (idempotent producer: no transactional id)."""

    # InitProducerIdRequest v3-5
    #   transactional_id        COMPACT_NULLABLE_STRING
    #   transaction_timeout_ms  INT32
    #   producer_id             INT64   (-1: new producer; else the id whose epoch to bump)
    #   producer_epoch          INT16
    #   _tagged_fields          TAGGED_FIELDS
    transactional_id: str | None = None
    transaction_timeout_ms: int = 60_000
    producer_id: int = -1
    producer_epoch: int = -1


class InitProducerIdResponse(msgspec.Struct, frozen=True):
    """InitProducerId response v3..v5."""

    # InitProducerIdResponse v3-5
    #   throttle_time_ms  INT32
    #   error_code        INT16
    #   producer_id       INT64
    #   producer_epoch    INT16
    #   _tagged_fields    TAGGED_FIELDS
    throttle_time_ms: int
    error_code: int
    producer_id: int
    producer_epoch: int


def encode_init_producer_id_request(
    version: int, correlation_id: int, client_id: str | None, req: InitProducerIdRequest
) -> bytes:
    """Encode a framed InitProducerId request."""
    body = (
        compact_string(req.transactional_id)
        + int32(req.transaction_timeout_ms)
        + int64(req.producer_id)
        + int16(req.producer_epoch)
        + EMPTY_TAGGED_FIELDS
    )
    return _request(INIT_PRODUCER_ID, version, correlation_id, client_id, body)


def decode_init_producer_id_request(buf: bytes | memoryview) -> tuple[RequestHeader, InitProducerIdRequest]:
    """Decode an InitProducerId request (without its size prefix)."""
    r = Reader(buf)
    h = decode_request_header(r)
    _check_api(h, INIT_PRODUCER_ID)
    req = InitProducerIdRequest(r.compact_string(), r.int32(), r.int64(), r.int16())
    r.tagged_fields()
    r.expect_end()
    return h, req


def encode_init_producer_id_response(correlation_id: int, version: int, resp: InitProducerIdResponse) -> bytes:
    """Encode a framed InitProducerId response (header v1)."""
    _check_version(INIT_PRODUCER_ID, version)
    body = int32(resp.throttle_time_ms) + int16(resp.error_code) + int64(resp.producer_id) + int16(resp.producer_epoch)
    return frame(encode_response_header(correlation_id, 1), body, EMPTY_TAGGED_FIELDS)


def decode_init_producer_id_response(buf: bytes | memoryview, version: int) -> InitProducerIdResponse:
    """Decode an InitProducerId response body (after the v1 header)."""
    _check_version(INIT_PRODUCER_ID, version)
    r = Reader(buf)
    resp = InitProducerIdResponse(r.int32(), r.int16(), r.int64(), r.int16())
    r.tagged_fields()
    r.expect_end()
    return resp


# --------------------------------------------------------------------------------------------
# SaslHandshake (key 17) and SaslAuthenticate (key 36)
# --------------------------------------------------------------------------------------------


class SaslHandshakeResponse(msgspec.Struct, frozen=True):
    """SaslHandshake response v1."""

    # SaslHandshakeRequest v1 (not flexible; request header v1: no tagged fields)
    #   mechanism   STRING
    # SaslHandshakeResponse v1 (response header v0)
    #   error_code  INT16
    #   mechanisms  ARRAY(INT32 length) of STRING   (what the listener enables)
    error_code: int
    mechanisms: list[str]


class SaslAuthenticateResponse(msgspec.Struct, frozen=True):
    """SaslAuthenticate response v2."""

    # SaslAuthenticateRequest v2
    #   auth_bytes           COMPACT_BYTES
    #   _tagged_fields       TAGGED_FIELDS
    # SaslAuthenticateResponse v2
    #   error_code           INT16
    #   error_message        COMPACT_NULLABLE_STRING
    #   auth_bytes           COMPACT_BYTES
    #   session_lifetime_ms  INT64   (0: the session does not expire; KIP-368)
    #   _tagged_fields       TAGGED_FIELDS
    error_code: int
    error_message: str | None
    auth_bytes: bytes
    session_lifetime_ms: int = 0


def _request_header_v1(api_key: int, version: int, correlation_id: int, client_id: str | None) -> bytes:
    return int16(api_key) + int16(version) + int32(correlation_id) + string(client_id)


def encode_sasl_handshake_request(version: int, correlation_id: int, client_id: str | None, mechanism: str) -> bytes:
    """Encode a framed SaslHandshake request (request header v1)."""
    _check_version(SASL_HANDSHAKE, version)
    return frame(_request_header_v1(SASL_HANDSHAKE, version, correlation_id, client_id), string(mechanism))


def decode_sasl_handshake_request(buf: bytes | memoryview) -> tuple[RequestHeader, str]:
    """Decode a SaslHandshake request (without its size prefix): the header and the mechanism."""
    r = Reader(buf)
    h = RequestHeader(r.int16(), r.int16(), r.int32(), r.string())
    _check_api(h, SASL_HANDSHAKE)
    mechanism = r.string() or ""
    r.expect_end()
    return h, mechanism


def encode_sasl_handshake_response(correlation_id: int, version: int, resp: SaslHandshakeResponse) -> bytes:
    """Encode a framed SaslHandshake response (header v0)."""
    _check_version(SASL_HANDSHAKE, version)
    body = int16(resp.error_code) + int32(len(resp.mechanisms)) + b"".join(string(s) for s in resp.mechanisms)
    return frame(encode_response_header(correlation_id, 0), body)


def decode_sasl_handshake_response(buf: bytes | memoryview, version: int) -> SaslHandshakeResponse:
    """Decode a SaslHandshake response body (after the v0 header)."""
    _check_version(SASL_HANDSHAKE, version)
    r = Reader(buf)
    error_code = r.int16()
    n = r.int32()
    if n < 0 or n * 2 > r.remaining():
        raise ProtocolError(f"bad SaslHandshake mechanisms array length {n}")
    mechanisms = [r.string() or "" for _ in range(n)]
    r.expect_end()
    return SaslHandshakeResponse(error_code, mechanisms)


def encode_sasl_authenticate_request(version: int, correlation_id: int, client_id: str | None,
                                     auth_bytes: bytes) -> bytes:
    """Encode a framed SaslAuthenticate request."""
    return _request(SASL_AUTHENTICATE, version, correlation_id, client_id,
                    compact_bytes(auth_bytes) + EMPTY_TAGGED_FIELDS)


def decode_sasl_authenticate_request(buf: bytes | memoryview) -> tuple[RequestHeader, bytes]:
    """Decode a SaslAuthenticate request (without its size prefix): the header and the bytes."""
    r = Reader(buf)
    h = decode_request_header(r)
    _check_api(h, SASL_AUTHENTICATE)
    auth = r.compact_bytes()
    r.tagged_fields()
    r.expect_end()
    return h, bytes(auth or b"")


def encode_sasl_authenticate_response(correlation_id: int, version: int, resp: SaslAuthenticateResponse) -> bytes:
    """Encode a framed SaslAuthenticate response (header v1)."""
    _check_version(SASL_AUTHENTICATE, version)
    body = (int16(resp.error_code) + compact_string(resp.error_message) + compact_bytes(resp.auth_bytes)
            + int64(resp.session_lifetime_ms) + EMPTY_TAGGED_FIELDS)
    return frame(encode_response_header(correlation_id, 1), body)


def decode_sasl_authenticate_response(buf: bytes | memoryview, version: int) -> SaslAuthenticateResponse:
    """Decode a SaslAuthenticate response body (after the v1 header)."""
    _check_version(SASL_AUTHENTICATE, version)
    r = Reader(buf)
    error_code = r.int16()
    message = r.compact_string()
    auth = r.compact_bytes()
    lifetime = r.int64()
    r.tagged_fields()
    r.expect_end()
    return SaslAuthenticateResponse(error_code, message, bytes(auth or b""), lifetime)


# --------------------------------------------------------------------------------------------
# Produce (key 0)
# --------------------------------------------------------------------------------------------


class ProducePartitionData(msgspec.Struct, frozen=True):
    """One partition's records in a Produce request."""

    # PartitionProduceData
    #   index           INT32
    #   records         COMPACT_NULLABLE_BYTES (RECORDS: one or more RecordBatch v2)
    #   _tagged_fields  TAGGED_FIELDS
    index: int
    records: bytes | memoryview | None


class ProduceTopicData(msgspec.Struct, frozen=True):
    """One topic's partitions in a Produce request."""

    # TopicProduceData (v9-12)
    #   name            COMPACT_STRING
    #   partition_data  COMPACT_ARRAY of PartitionProduceData
    #   _tagged_fields  TAGGED_FIELDS
    name: str
    partitions: list[ProducePartitionData]


class ProduceRequest(msgspec.Struct, frozen=True):
    """Produce request v9..v12."""

    # ProduceRequest v9-12
    #   transactional_id  COMPACT_NULLABLE_STRING  (null: not transactional)
    #   acks              INT16
    #   timeout_ms        INT32
    #   topic_data        COMPACT_ARRAY of TopicProduceData
    #   _tagged_fields    TAGGED_FIELDS
    acks: int
    timeout_ms: int
    topics: list[ProduceTopicData]
    transactional_id: str | None = None


class RecordError(msgspec.Struct, frozen=True):
    """A record the broker blamed for rejecting its batch."""

    # BatchIndexAndErrorMessage
    #   batch_index               INT32
    #   batch_index_error_message COMPACT_NULLABLE_STRING
    #   _tagged_fields            TAGGED_FIELDS
    batch_index: int
    message: str | None


class ProducePartitionResponse(msgspec.Struct, frozen=True):
    """One partition's result."""

    # PartitionProduceResponse (v9-12)
    #   index              INT32
    #   error_code         INT16
    #   base_offset        INT64
    #   log_append_time_ms INT64   (-1 unless the topic uses LogAppendTime)
    #   log_start_offset   INT64
    #   record_errors      COMPACT_ARRAY of BatchIndexAndErrorMessage
    #   error_message      COMPACT_NULLABLE_STRING
    #   _tagged_fields     TAGGED_FIELDS  (v10+ tag 0: CurrentLeader
    #                                      { leader_id INT32, leader_epoch INT32, _tagged_fields })
    index: int
    error_code: int
    base_offset: int
    log_append_time_ms: int = -1
    log_start_offset: int = -1
    record_errors: list[RecordError] = []
    error_message: str | None = None
    current_leader_id: int = -1
    current_leader_epoch: int = -1


class ProduceTopicResponse(msgspec.Struct, frozen=True):
    """One topic's results."""

    # TopicProduceResponse (v9-12)
    #   name                 COMPACT_STRING
    #   partition_responses  COMPACT_ARRAY of PartitionProduceResponse
    #   _tagged_fields       TAGGED_FIELDS
    name: str
    partitions: list[ProducePartitionResponse]


class NodeEndpoint(msgspec.Struct, frozen=True):
    """A new leader's address, sent with NOT_LEADER_OR_FOLLOWER errors (v10+)."""

    # NodeEndpoint
    #   node_id         INT32
    #   host            COMPACT_STRING
    #   port            INT32
    #   rack            COMPACT_NULLABLE_STRING
    #   _tagged_fields  TAGGED_FIELDS
    node_id: int
    host: str
    port: int
    rack: str | None = None


class ProduceResponse(msgspec.Struct, frozen=True):
    """Produce response v9..v12."""

    # ProduceResponse v9-12
    #   responses         COMPACT_ARRAY of TopicProduceResponse
    #   throttle_time_ms  INT32
    #   _tagged_fields    TAGGED_FIELDS  (v10+ tag 0: NodeEndpoints, COMPACT_ARRAY of NodeEndpoint)
    topics: list[ProduceTopicResponse]
    throttle_time_ms: int = 0
    node_endpoints: list[NodeEndpoint] = []


def encode_produce_request(
    version: int,
    correlation_id: int,
    client_id: str | None,
    acks: int,
    timeout_ms: int,
    topics: Sequence[tuple[str, Sequence[tuple[int, bytes | memoryview]]]],
) -> list[bytes | memoryview]:
    """Encode a framed Produce request as a list of buffers, without copying the records.

    Args:
        topics: ``[(topic, [(partition, record_batch_bytes), ...]), ...]``; a partition may
            appear once per request.

    Returns:
        Buffers to write in order (``transport.writelines``): small encoded pieces interleaved
        with the caller's record buffers, which must stay unchanged until written.
    """
    _check_version(PRODUCE, version)
    out: list[bytes | memoryview] = []
    # Small pieces are gathered in ``pending`` and flushed as one bytes object between records.
    pending = bytearray(b"\x00\x00\x00\x00")  # size, patched below
    pending += encode_request_header(PRODUCE, version, correlation_id, client_id)
    pending += b"\x00"  # transactional_id: null
    pending += int16(acks) + int32(timeout_ms) + compact_array_len(len(topics))
    total = 0
    for name, partitions in topics:
        pending += compact_string(name) + compact_array_len(len(partitions))
        for index, records in partitions:
            n = len(records) if not isinstance(records, memoryview) else records.nbytes
            pending += int32(index) + compact_bytes_header(n)
            out.append(bytes(pending))
            total += len(pending)
            pending = bytearray()
            out.append(records)
            total += n
            pending += EMPTY_TAGGED_FIELDS  # partition
        pending += EMPTY_TAGGED_FIELDS  # topic
    pending += EMPTY_TAGGED_FIELDS  # request
    out.append(bytes(pending))
    total += len(pending)
    first = out[0]
    out[0] = int32(total - 4) + bytes(first[4:])
    return out


def decode_produce_request(buf: bytes | memoryview) -> tuple[RequestHeader, ProduceRequest]:
    """Decode a Produce request (without its size prefix); records stay memoryviews."""
    r = Reader(buf)
    h = decode_request_header(r)
    _check_api(h, PRODUCE)
    txn = r.compact_string()
    acks = r.int16()
    timeout_ms = r.int32()
    topics = []
    for _ in range(max(r.compact_array_len(), 0)):
        name = r.compact_string() or ""
        parts = []
        for _ in range(max(r.compact_array_len(), 0)):
            index = r.int32()
            records = r.compact_bytes()
            r.tagged_fields()
            parts.append(ProducePartitionData(index, records))
        r.tagged_fields()
        topics.append(ProduceTopicData(name, parts))
    r.tagged_fields()
    r.expect_end()
    return h, ProduceRequest(acks, timeout_ms, topics, txn)


def encode_produce_response(correlation_id: int, version: int, resp: ProduceResponse) -> bytes:
    """Encode a framed Produce response (header v1)."""
    _check_version(PRODUCE, version)
    parts = [compact_array_len(len(resp.topics))]
    for t in resp.topics:
        parts.append(compact_string(t.name) + compact_array_len(len(t.partitions)))
        for p in t.partitions:
            parts.append(
                int32(p.index) + int16(p.error_code) + int64(p.base_offset) + int64(p.log_append_time_ms) + int64(p.log_start_offset)
            )
            parts.append(compact_array_len(len(p.record_errors)))
            for e in p.record_errors:
                parts.append(int32(e.batch_index) + compact_string(e.message) + EMPTY_TAGGED_FIELDS)
            parts.append(compact_string(p.error_message))
            tags = []
            if version >= 10 and (p.current_leader_id != -1 or p.current_leader_epoch != -1):
                tags.append((0, int32(p.current_leader_id) + int32(p.current_leader_epoch) + EMPTY_TAGGED_FIELDS))
            parts.append(tagged_fields(tags))
        parts.append(EMPTY_TAGGED_FIELDS)
    parts.append(int32(resp.throttle_time_ms))
    tags = []
    if version >= 10 and resp.node_endpoints:
        eps = [compact_array_len(len(resp.node_endpoints))]
        for ep in resp.node_endpoints:
            eps.append(int32(ep.node_id) + compact_string(ep.host) + int32(ep.port) + compact_string(ep.rack) + EMPTY_TAGGED_FIELDS)
        tags.append((0, b"".join(eps)))
    parts.append(tagged_fields(tags))
    return frame(encode_response_header(correlation_id, 1), *parts)


def decode_produce_response(buf: bytes | memoryview, version: int) -> ProduceResponse:
    """Decode a Produce response body (after the v1 header)."""
    _check_version(PRODUCE, version)
    r = Reader(buf)
    topics = []
    for _ in range(max(r.compact_array_len(), 0)):
        name = r.compact_string() or ""
        parts = []
        for _ in range(max(r.compact_array_len(), 0)):
            index = r.int32()
            error_code = r.int16()
            base_offset = r.int64()
            log_append_time_ms = r.int64()
            log_start_offset = r.int64()
            record_errors = []
            for _ in range(max(r.compact_array_len(), 0)):
                record_errors.append(RecordError(r.int32(), r.compact_string()))
                r.tagged_fields()
            error_message = r.compact_string()
            leader_id = leader_epoch = -1
            tags = r.tagged_fields()
            if 0 in tags:
                lr = Reader(tags[0])
                leader_id = lr.int32()
                leader_epoch = lr.int32()
            parts.append(
                ProducePartitionResponse(
                    index,
                    error_code,
                    base_offset,
                    log_append_time_ms,
                    log_start_offset,
                    record_errors,
                    error_message,
                    leader_id,
                    leader_epoch,
                )
            )
        r.tagged_fields()
        topics.append(ProduceTopicResponse(name, parts))
    throttle = r.int32()
    endpoints = []
    tags = r.tagged_fields()
    if 0 in tags:
        er = Reader(tags[0])
        for _ in range(max(er.compact_array_len(), 0)):
            endpoints.append(NodeEndpoint(er.int32(), er.compact_string() or "", er.int32(), er.compact_string()))
            er.tagged_fields()
    r.expect_end()
    return ProduceResponse(topics, throttle, endpoints)
