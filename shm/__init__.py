"""Sluice's client side: shared-memory rings, segments, frames, the partitioner and the
client library (:class:`shm.Producer`).

Applications import only this package. It never imports :mod:`daemon`.
"""

from shm.errors import BufferFullError, KafkaError, SluiceError
from shm.futures import DeliveryFuture, RecordMetadata
from shm.producer import Producer

__all__ = ["Producer", "RecordMetadata", "DeliveryFuture", "SluiceError", "KafkaError", "BufferFullError"]
