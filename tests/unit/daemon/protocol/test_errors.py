"""The Kafka error table against a sample of Kafka's own Errors (4.1.1) and the class generation."""

from __future__ import annotations

import pickle

import pytest

import shm.errors as se
from daemon.protocol import errors as ec

# (code, NAME, retriable) as Kafka's Errors enum and RetriableException hierarchy define them.
KAFKA_SAMPLE = [
    (-1, "UNKNOWN_SERVER_ERROR", False),
    (2, "CORRUPT_MESSAGE", True),
    (3, "UNKNOWN_TOPIC_OR_PARTITION", True),
    (5, "LEADER_NOT_AVAILABLE", True),
    (6, "NOT_LEADER_OR_FOLLOWER", True),
    (7, "REQUEST_TIMED_OUT", True),
    (8, "BROKER_NOT_AVAILABLE", False),
    (10, "MESSAGE_TOO_LARGE", False),
    (13, "NETWORK_EXCEPTION", True),
    (17, "INVALID_TOPIC_EXCEPTION", False),
    (18, "RECORD_LIST_TOO_LARGE", False),
    (19, "NOT_ENOUGH_REPLICAS", True),
    (20, "NOT_ENOUGH_REPLICAS_AFTER_APPEND", True),
    (29, "TOPIC_AUTHORIZATION_FAILED", False),
    (35, "UNSUPPORTED_VERSION", False),
    (45, "OUT_OF_ORDER_SEQUENCE_NUMBER", False),
    (46, "DUPLICATE_SEQUENCE_NUMBER", False),
    (47, "INVALID_PRODUCER_EPOCH", False),
    (56, "KAFKA_STORAGE_ERROR", True),
    (59, "UNKNOWN_PRODUCER_ID", False),
    (74, "FENCED_LEADER_EPOCH", True),
    (75, "UNKNOWN_LEADER_EPOCH", True),
    (87, "INVALID_RECORD", False),
    (89, "THROTTLING_QUOTA_EXCEEDED", True),
    (90, "PRODUCER_FENCED", False),
    (100, "UNKNOWN_TOPIC_ID", True),
    (120, "TRANSACTION_ABORTABLE", False),
    (129, "REBOOTSTRAP_REQUIRED", False),
    (133, "SHARE_SESSION_LIMIT_REACHED", True),
]


@pytest.mark.parametrize(("code", "name", "retriable"), KAFKA_SAMPLE)
def test_sample_matches_kafka(code: int, name: str, retriable: bool) -> None:
    err = se.KafkaError.for_code(code)
    assert isinstance(err, se.KafkaError) and isinstance(err, se.SluiceError)
    assert (err.code, err.name, err.retriable) == (code, name, retriable)
    assert se.error_name(code) == name
    assert ec.is_retriable(code) is retriable
    assert getattr(ec, name) == code


def test_table_is_complete_and_unique() -> None:
    codes = [c for c, _, _ in se.KAFKA_ERRORS]
    names = [n for _, n, _ in se.KAFKA_ERRORS]
    assert len(set(codes)) == len(codes) and len(set(names)) == len(names)
    assert set(codes) == {-1} | set(range(1, 134)), "every code from -1 to 133 except 0 (NONE)"


def test_generated_class_names_and_identity() -> None:
    assert se.KafkaError.for_code(10).__class__ is se.MessageTooLargeError  # type: ignore[attr-defined]
    assert se.MessageTooLargeError.__name__ == "MessageTooLargeError"  # type: ignore[attr-defined]
    assert se.InvalidTopicError.code == 17  # type: ignore[attr-defined]  # _EXCEPTION dropped
    assert se.KafkaStorageError.name == "KAFKA_STORAGE_ERROR"  # type: ignore[attr-defined]
    assert se.NotLeaderOrFollowerError.retriable is True  # type: ignore[attr-defined]
    assert "UnknownTopicOrPartitionError" in se.__all__


def test_message_defaults_to_name_and_survives_pickling() -> None:
    err = se.KafkaError.for_code(18)
    assert str(err) == "RECORD_LIST_TOO_LARGE"
    err2 = se.KafkaError.for_code(18, "batch of 2 MB")
    back = pickle.loads(pickle.dumps(err2))
    assert type(back) is type(err2) and str(back) == "batch of 2 MB"


def test_unknown_code_and_none() -> None:
    err = se.KafkaError.for_code(9999)
    assert type(err) is se.KafkaError
    assert (err.code, err.retriable) == (9999, False)
    assert se.error_name(9999) == err.name == "UNKNOWN_ERROR_CODE_9999"
    assert se.error_name(0) == "NONE"
    with pytest.raises(ValueError):
        se.KafkaError.for_code(0)


def test_existing_tree_is_untouched() -> None:
    assert issubclass(se.ConfigError, ValueError)
    assert issubclass(se.CorruptFrameError, se.ProtocolError)
    assert se.KafkaError().name == "UNKNOWN_SERVER_ERROR"
