"""Sluice's configuration: TOML decoded into frozen msgspec Structs.

Producer settings keep Kafka's property names (dots become underscores) and Kafka's defaults.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

__all__ = ["Profile", "KafkaSettings"]

Compression = Literal["none", "gzip", "snappy", "lz4", "zstd"]


class Profile(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """How the records of a topic are delivered. Named profiles map topics to these."""

    # 0 = no ack, 1 = leader, -1 = all in-sync replicas ("all" in TOML).
    acks: Literal[0, 1, -1] = -1
    enable_idempotence: bool = True
    linger_ms: Annotated[int, msgspec.Meta(ge=0, le=60_000)] = 5
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=64 * 1024 * 1024)] = 16_384
    compression_type: Compression = "none"
    delivery_timeout_ms: Annotated[int, msgspec.Meta(ge=1)] = 120_000
    request_timeout_ms: Annotated[int, msgspec.Meta(ge=1)] = 30_000
    retry_backoff_ms: Annotated[int, msgspec.Meta(ge=0)] = 100
    retry_backoff_max_ms: Annotated[int, msgspec.Meta(ge=0)] = 1_000
    max_request_size: Annotated[int, msgspec.Meta(ge=1)] = 1_048_576
    # What a client does when its ring is full: wait up to max_block_ms then raise
    # BufferFullError, or drop the record and count it.
    on_full: Literal["block", "drop"] = "block"
    max_block_ms: Annotated[int, msgspec.Meta(ge=0)] = 60_000


class KafkaSettings(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Connection-level producer settings shared by every profile."""

    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "sluice"
    max_in_flight_requests_per_connection: Annotated[int, msgspec.Meta(ge=1, le=100)] = 5
    metadata_max_age_ms: Annotated[int, msgspec.Meta(ge=1)] = 300_000
    socket_connection_setup_timeout_ms: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    reconnect_backoff_ms: Annotated[int, msgspec.Meta(ge=0)] = 50
    reconnect_backoff_max_ms: Annotated[int, msgspec.Meta(ge=0)] = 1_000
    # Bytes of batches one worker may hold in its arena before it stops draining rings.
    buffer_memory: Annotated[int, msgspec.Meta(ge=1024 * 1024)] = 33_554_432
