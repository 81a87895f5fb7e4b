"""Sluice's one error tree, shared by the client library and the daemon.

``SluiceError`` is the root. Kafka's error codes live in one table below; each meaningful code
has its own ``KafkaError`` subclass generated from it.
"""

from __future__ import annotations

import re

__all__ = [
    "SluiceError",
    "ConfigError",
    "BufferFullError",
    "ProtocolError",
    "CorruptFrameError",
    "SegmentError",
    "ConnectionClosedError",
    "ProducerClosedError",
    "KafkaError",
    "KAFKA_ERRORS",
    "error_name",
]


class SluiceError(Exception):
    """Root of every error Sluice raises on purpose."""


class ConfigError(SluiceError, ValueError):
    """A configuration value or key was refused; the message names it and says why."""


class BufferFullError(SluiceError):
    """The client's ring stayed full for longer than ``max_block_ms``."""


class ProtocolError(SluiceError):
    """A peer broke a wire protocol (socket frames, Kafka responses)."""


class CorruptFrameError(ProtocolError):
    """A shared-memory ring holds a frame that fails validation; its writer must be dropped."""


class SegmentError(SluiceError):
    """A shared-memory segment was refused (unsealed, wrongly sized, bad header)."""


class ConnectionClosedError(SluiceError, ConnectionError):
    """The daemon closed the control connection (it stopped, or dropped this client)."""


class ProducerClosedError(SluiceError):
    """The producer was closed (or its daemon went away) before the record's outcome came."""


class KafkaError(SluiceError):
    """An error code returned by Kafka (or raised by Sluice with Kafka's meaning).

    Every code of Kafka's error table has its own subclass generated below (for example
    ``MessageTooLargeError``, ``NotLeaderOrFollowerError``); ``code``, ``name`` and ``retriable``
    are class attributes, so ``except RetriableKafka...`` style checks read ``err.retriable``.
    Build one from a wire code with :meth:`KafkaError.for_code`.
    """

    code: int = -1
    name: str = "UNKNOWN_SERVER_ERROR"
    retriable: bool = False

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.name)

    @staticmethod
    def for_code(code: int, message: str | None = None) -> KafkaError:
        """Return an instance of the subclass for Kafka error ``code``.

        A code missing from the table (a broker newer than this table) gives a plain
        ``KafkaError`` carrying that code, not retriable. Code 0 (NONE) is not an error and is
        refused with ``ValueError``.
        """
        if code == 0:
            raise ValueError("Kafka error code 0 (NONE) is not an error")
        cls = _CLASS_BY_CODE.get(code)
        if cls is not None:
            return cls(message)
        err = KafkaError(message or f"UNKNOWN_ERROR_CODE_{code}")
        # Instance attributes shadow the class defaults only for codes the table lacks.
        err.code = code
        err.name = f"UNKNOWN_ERROR_CODE_{code}"
        err.retriable = False
        return err


# Kafka's error table: (code, NAME, retriable), as in org.apache.kafka.common.protocol.Errors of
# Kafka 4.1.1. "retriable" is True exactly where Kafka's exception for the code extends
# RetriableException (so OUT_OF_ORDER_SEQUENCE_NUMBER and BROKER_NOT_AVAILABLE are False, and
# UNKNOWN_TOPIC_OR_PARTITION is True, as in Kafka). Code 0 (NONE) is success and has no class.
KAFKA_ERRORS: tuple[tuple[int, str, bool], ...] = (
    (-1, "UNKNOWN_SERVER_ERROR", False),
    (1, "OFFSET_OUT_OF_RANGE", False),
    (2, "CORRUPT_MESSAGE", True),
    (3, "UNKNOWN_TOPIC_OR_PARTITION", True),
    (4, "INVALID_FETCH_SIZE", False),
    (5, "LEADER_NOT_AVAILABLE", True),
    (6, "NOT_LEADER_OR_FOLLOWER", True),
    (7, "REQUEST_TIMED_OUT", True),
    (8, "BROKER_NOT_AVAILABLE", False),
    (9, "REPLICA_NOT_AVAILABLE", True),
    (10, "MESSAGE_TOO_LARGE", False),
    (11, "STALE_CONTROLLER_EPOCH", False),
    (12, "OFFSET_METADATA_TOO_LARGE", False),
    (13, "NETWORK_EXCEPTION", True),
    (14, "COORDINATOR_LOAD_IN_PROGRESS", True),
    (15, "COORDINATOR_NOT_AVAILABLE", True),
    (16, "NOT_COORDINATOR", True),
    (17, "INVALID_TOPIC_EXCEPTION", False),
    (18, "RECORD_LIST_TOO_LARGE", False),
    (19, "NOT_ENOUGH_REPLICAS", True),
    (20, "NOT_ENOUGH_REPLICAS_AFTER_APPEND", True),
    (21, "INVALID_REQUIRED_ACKS", False),
    (22, "ILLEGAL_GENERATION", False),
    (23, "INCONSISTENT_GROUP_PROTOCOL", False),
    (24, "INVALID_GROUP_ID", False),
    (25, "UNKNOWN_MEMBER_ID", False),
    (26, "INVALID_SESSION_TIMEOUT", False),
    (27, "REBALANCE_IN_PROGRESS", False),
    (28, "INVALID_COMMIT_OFFSET_SIZE", False),
    (29, "TOPIC_AUTHORIZATION_FAILED", False),
    (30, "GROUP_AUTHORIZATION_FAILED", False),
    (31, "CLUSTER_AUTHORIZATION_FAILED", False),
    (32, "INVALID_TIMESTAMP", False),
    (33, "UNSUPPORTED_SASL_MECHANISM", False),
    (34, "ILLEGAL_SASL_STATE", False),
    (35, "UNSUPPORTED_VERSION", False),
    (36, "TOPIC_ALREADY_EXISTS", False),
    (37, "INVALID_PARTITIONS", False),
    (38, "INVALID_REPLICATION_FACTOR", False),
    (39, "INVALID_REPLICA_ASSIGNMENT", False),
    (40, "INVALID_CONFIG", False),
    (41, "NOT_CONTROLLER", True),
    (42, "INVALID_REQUEST", False),
    (43, "UNSUPPORTED_FOR_MESSAGE_FORMAT", False),
    (44, "POLICY_VIOLATION", False),
    (45, "OUT_OF_ORDER_SEQUENCE_NUMBER", False),
    (46, "DUPLICATE_SEQUENCE_NUMBER", False),
    (47, "INVALID_PRODUCER_EPOCH", False),
    (48, "INVALID_TXN_STATE", False),
    (49, "INVALID_PRODUCER_ID_MAPPING", False),
    (50, "INVALID_TRANSACTION_TIMEOUT", False),
    (51, "CONCURRENT_TRANSACTIONS", True),
    (52, "TRANSACTION_COORDINATOR_FENCED", False),
    (53, "TRANSACTIONAL_ID_AUTHORIZATION_FAILED", False),
    (54, "SECURITY_DISABLED", False),
    (55, "OPERATION_NOT_ATTEMPTED", False),
    (56, "KAFKA_STORAGE_ERROR", True),
    (57, "LOG_DIR_NOT_FOUND", False),
    (58, "SASL_AUTHENTICATION_FAILED", False),
    (59, "UNKNOWN_PRODUCER_ID", False),
    (60, "REASSIGNMENT_IN_PROGRESS", False),
    (61, "DELEGATION_TOKEN_AUTH_DISABLED", False),
    (62, "DELEGATION_TOKEN_NOT_FOUND", False),
    (63, "DELEGATION_TOKEN_OWNER_MISMATCH", False),
    (64, "DELEGATION_TOKEN_REQUEST_NOT_ALLOWED", False),
    (65, "DELEGATION_TOKEN_AUTHORIZATION_FAILED", False),
    (66, "DELEGATION_TOKEN_EXPIRED", False),
    (67, "INVALID_PRINCIPAL_TYPE", False),
    (68, "NON_EMPTY_GROUP", False),
    (69, "GROUP_ID_NOT_FOUND", False),
    (70, "FETCH_SESSION_ID_NOT_FOUND", True),
    (71, "INVALID_FETCH_SESSION_EPOCH", True),
    (72, "LISTENER_NOT_FOUND", True),
    (73, "TOPIC_DELETION_DISABLED", False),
    (74, "FENCED_LEADER_EPOCH", True),
    (75, "UNKNOWN_LEADER_EPOCH", True),
    (76, "UNSUPPORTED_COMPRESSION_TYPE", False),
    (77, "STALE_BROKER_EPOCH", False),
    (78, "OFFSET_NOT_AVAILABLE", True),
    (79, "MEMBER_ID_REQUIRED", False),
    (80, "PREFERRED_LEADER_NOT_AVAILABLE", True),
    (81, "GROUP_MAX_SIZE_REACHED", False),
    (82, "FENCED_INSTANCE_ID", False),
    (83, "ELIGIBLE_LEADERS_NOT_AVAILABLE", True),
    (84, "ELECTION_NOT_NEEDED", True),
    (85, "NO_REASSIGNMENT_IN_PROGRESS", False),
    (86, "GROUP_SUBSCRIBED_TO_TOPIC", False),
    (87, "INVALID_RECORD", False),
    (88, "UNSTABLE_OFFSET_COMMIT", True),
    (89, "THROTTLING_QUOTA_EXCEEDED", True),
    (90, "PRODUCER_FENCED", False),
    (91, "RESOURCE_NOT_FOUND", False),
    (92, "DUPLICATE_RESOURCE", False),
    (93, "UNACCEPTABLE_CREDENTIAL", False),
    (94, "INCONSISTENT_VOTER_SET", False),
    (95, "INVALID_UPDATE_VERSION", False),
    (96, "FEATURE_UPDATE_FAILED", False),
    (97, "PRINCIPAL_DESERIALIZATION_FAILURE", False),
    (98, "SNAPSHOT_NOT_FOUND", False),
    (99, "POSITION_OUT_OF_RANGE", False),
    (100, "UNKNOWN_TOPIC_ID", True),
    (101, "DUPLICATE_BROKER_REGISTRATION", False),
    (102, "BROKER_ID_NOT_REGISTERED", False),
    (103, "INCONSISTENT_TOPIC_ID", True),
    (104, "INCONSISTENT_CLUSTER_ID", False),
    (105, "TRANSACTIONAL_ID_NOT_FOUND", False),
    (106, "FETCH_SESSION_TOPIC_ID_ERROR", True),
    (107, "INELIGIBLE_REPLICA", False),
    (108, "NEW_LEADER_ELECTED", False),
    (109, "OFFSET_MOVED_TO_TIERED_STORAGE", False),
    (110, "FENCED_MEMBER_EPOCH", False),
    (111, "UNRELEASED_INSTANCE_ID", False),
    (112, "UNSUPPORTED_ASSIGNOR", False),
    (113, "STALE_MEMBER_EPOCH", False),
    (114, "MISMATCHED_ENDPOINT_TYPE", False),
    (115, "UNSUPPORTED_ENDPOINT_TYPE", False),
    (116, "UNKNOWN_CONTROLLER_ID", False),
    (117, "UNKNOWN_SUBSCRIPTION_ID", False),
    (118, "TELEMETRY_TOO_LARGE", False),
    (119, "INVALID_REGISTRATION", False),
    (120, "TRANSACTION_ABORTABLE", False),
    (121, "INVALID_RECORD_STATE", False),
    (122, "SHARE_SESSION_NOT_FOUND", True),
    (123, "INVALID_SHARE_SESSION_EPOCH", True),
    (124, "FENCED_STATE_EPOCH", False),
    (125, "INVALID_VOTER_KEY", False),
    (126, "DUPLICATE_VOTER", False),
    (127, "VOTER_NOT_FOUND", False),
    (128, "INVALID_REGULAR_EXPRESSION", False),
    (129, "REBOOTSTRAP_REQUIRED", False),
    (130, "STREAMS_INVALID_TOPOLOGY", False),
    (131, "STREAMS_INVALID_TOPOLOGY_EPOCH", False),
    (132, "STREAMS_TOPOLOGY_FENCED", False),
    (133, "SHARE_SESSION_LIMIT_REACHED", True),
)

_NAME_BY_CODE: dict[int, str] = {code: name for code, name, _ in KAFKA_ERRORS}
_NAME_BY_CODE[0] = "NONE"
_CLASS_BY_CODE: dict[int, type[KafkaError]] = {}


def _class_name(name: str) -> str:
    """CamelCase class name for a Kafka error NAME: MESSAGE_TOO_LARGE -> MessageTooLargeError.

    A trailing _EXCEPTION or _ERROR is dropped first (INVALID_TOPIC_EXCEPTION -> InvalidTopicError,
    KAFKA_STORAGE_ERROR -> KafkaStorageError) so no name reads "ExceptionError" or "ErrorError".
    """
    base = re.sub(r"_(EXCEPTION|ERROR)$", "", name)
    return "".join(part.capitalize() for part in base.split("_")) + "Error"


def _generate() -> None:
    module = globals()
    for code, name, retriable in KAFKA_ERRORS:
        cls_name = _class_name(name)
        cls = type(
            cls_name,
            (KafkaError,),
            {
                "code": code,
                "name": name,
                "retriable": retriable,
                "__module__": __name__,
                "__qualname__": cls_name,
                "__doc__": f"Kafka error {code} {name} ({'retriable' if retriable else 'not retriable'}).",
            },
        )
        _CLASS_BY_CODE[code] = cls
        module[cls_name] = cls
        __all__.append(cls_name)


_generate()


def error_name(code: int) -> str:
    """Kafka's NAME for an error code ("NONE" for 0, "UNKNOWN_ERROR_CODE_<n>" if unknown)."""
    return _NAME_BY_CODE.get(code) or f"UNKNOWN_ERROR_CODE_{code}"
