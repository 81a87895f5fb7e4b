"""Kafka error codes as the daemon uses them: integer constants, retriability, exceptions.

The one table lives in :mod:`shm.errors` (the client raises the same classes); this module
re-exports it and adds an integer constant per code (``MESSAGE_TOO_LARGE == 10``) so the
sender's per-partition result handling compares plain ints instead of building exceptions.
"""

from __future__ import annotations

from shm.errors import KAFKA_ERRORS, KafkaError, ProtocolError, error_name

__all__ = [
    "KafkaError",
    "ProtocolError",
    "KAFKA_ERRORS",
    "error_name",
    "is_retriable",
    "RETRIABLE_CODES",
    "CODE_BY_NAME",
    "NONE",
]

NONE = 0

CODE_BY_NAME: dict[str, int] = {name: code for code, name, _ in KAFKA_ERRORS}
CODE_BY_NAME["NONE"] = NONE

RETRIABLE_CODES: frozenset[int] = frozenset(code for code, _, retriable in KAFKA_ERRORS if retriable)


def is_retriable(code: int) -> bool:
    """True where Kafka's exception for ``code`` is a RetriableException."""
    return code in RETRIABLE_CODES


def _export_constants() -> None:
    module = globals()
    for code, name, _ in KAFKA_ERRORS:
        module[name] = code
        __all__.append(name)


_export_constants()

# Names the daemon refers to, spelled out so readers (and linters) can find them.
UNKNOWN_SERVER_ERROR: int = CODE_BY_NAME["UNKNOWN_SERVER_ERROR"]
CORRUPT_MESSAGE: int = CODE_BY_NAME["CORRUPT_MESSAGE"]
UNKNOWN_TOPIC_OR_PARTITION: int = CODE_BY_NAME["UNKNOWN_TOPIC_OR_PARTITION"]
LEADER_NOT_AVAILABLE: int = CODE_BY_NAME["LEADER_NOT_AVAILABLE"]
REPLICA_NOT_AVAILABLE: int = CODE_BY_NAME["REPLICA_NOT_AVAILABLE"]
NOT_LEADER_OR_FOLLOWER: int = CODE_BY_NAME["NOT_LEADER_OR_FOLLOWER"]
REQUEST_TIMED_OUT: int = CODE_BY_NAME["REQUEST_TIMED_OUT"]
MESSAGE_TOO_LARGE: int = CODE_BY_NAME["MESSAGE_TOO_LARGE"]
NETWORK_EXCEPTION: int = CODE_BY_NAME["NETWORK_EXCEPTION"]
OUT_OF_ORDER_SEQUENCE_NUMBER: int = CODE_BY_NAME["OUT_OF_ORDER_SEQUENCE_NUMBER"]
DUPLICATE_SEQUENCE_NUMBER: int = CODE_BY_NAME["DUPLICATE_SEQUENCE_NUMBER"]
INVALID_PRODUCER_EPOCH: int = CODE_BY_NAME["INVALID_PRODUCER_EPOCH"]
UNKNOWN_PRODUCER_ID: int = CODE_BY_NAME["UNKNOWN_PRODUCER_ID"]
PRODUCER_FENCED: int = CODE_BY_NAME["PRODUCER_FENCED"]
FENCED_LEADER_EPOCH: int = CODE_BY_NAME["FENCED_LEADER_EPOCH"]
UNKNOWN_LEADER_EPOCH: int = CODE_BY_NAME["UNKNOWN_LEADER_EPOCH"]
KAFKA_STORAGE_ERROR: int = CODE_BY_NAME["KAFKA_STORAGE_ERROR"]
UNKNOWN_TOPIC_ID: int = CODE_BY_NAME["UNKNOWN_TOPIC_ID"]
UNSUPPORTED_VERSION: int = CODE_BY_NAME["UNSUPPORTED_VERSION"]
INVALID_PRODUCER_ID_MAPPING: int = CODE_BY_NAME["INVALID_PRODUCER_ID_MAPPING"]
