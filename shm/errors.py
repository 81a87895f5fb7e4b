"""Sluice's one error tree, shared by the client library and the daemon.

``SluiceError`` is the root. Kafka's error codes live in one table below; each meaningful code
has its own ``KafkaError`` subclass generated from it.
"""

from __future__ import annotations

__all__ = [
    "SluiceError",
    "ConfigError",
    "BufferFullError",
    "ProtocolError",
    "CorruptFrameError",
    "SegmentError",
    "KafkaError",
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


class KafkaError(SluiceError):
    """An error code returned by Kafka (or raised by Sluice with Kafka's meaning)."""

    code: int = -1
    name: str = "UNKNOWN_SERVER_ERROR"
    retriable: bool = False

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.name)
