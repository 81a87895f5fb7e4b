"""Topic ids and metadata: the daemon-wide table of topic name -> (topic id, partitions).

Ring frames carry a 16-bit topic id instead of the name, so every process must agree on the
ids. The supervisor hands them out here, one per name, in the order topics are first looked
up; a worker hears of a topic (``on_change``) before any client is told its id. The ids
survive a daemon restart (daemon/state.py), because a reconnecting client keeps writing the ids
it was given.

Partition counts only grow: Kafka cannot shrink a topic, and a worker's report of a smaller
count is a stale metadata response.

The supervisor's own metadata client lives here too (:func:`open_metadata`): it answers the
partition count of a topic that no worker has heard of yet.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Protocol

from daemon.config import Config
from daemon.metadata import Metadata
from shm import control
from shm.errors import SluiceError

__all__ = [
    "MAX_TOPICS",
    "METADATA_TIMEOUT_S",
    "Metadata",
    "PartitionSource",
    "TopicTable",
    "open_metadata",
    "topic_info",
]

log = logging.getLogger("sluice.topics")

# Topic ids are u16 in the ring frames; 0xFFFF itself is never handed out, so the ids that
# exist are 0..0xFFFE and a table of 0xFFFF names is full.
MAX_TOPICS = 0xFFFF
# One metadata lookup of an unknown topic waits this long for Kafka before the client hears the
# error (UNKNOWN_TOPIC_OR_PARTITION when auto-creation is off).
METADATA_TIMEOUT_S = 5.0


class PartitionSource(Protocol):
    """What the table needs from Kafka: the partition count of a topic."""

    async def partitions_for(self, topic: str, timeout: float = METADATA_TIMEOUT_S) -> int: ...


def open_metadata(config: Config) -> Metadata:
    """The supervisor's metadata client (not started): its own connections, no batches."""
    return Metadata(config.kafka)


def topic_info(config: Config, name: str, topic_id: int, partitions: int) -> control.TopicInfo:
    """The TopicLookup answer: the id, the partition count and the topic's delivery profile."""
    profile = config.profile_for(name)
    return control.TopicInfo(
        topic=name,
        topic_id=topic_id,
        partitions=partitions,
        profile=config.profile_name_for(name),
        max_request_size=profile.max_request_size,
        on_full=profile.on_full,
        max_block_ms=profile.max_block_ms,
        batch_size=profile.batch_size,
        linger_ms=profile.linger_ms,
    )


class TopicTable:
    """Topic name -> (topic id, partitions), with the ids handed out once each.

    Args:
        on_change: called with (name, topic id, partitions) after a topic is added or grows,
            before :meth:`lookup` returns its id to anyone: the supervisor saves the state and
            tells every worker there.
    """

    def __init__(self, on_change: Callable[[str, int, int], None]) -> None:
        self._on_change = on_change
        self._topics: dict[str, tuple[int, int]] = {}
        self._next_id = 0
        self._lookup_locks: dict[str, asyncio.Lock] = {}

    def __len__(self) -> int:
        return len(self._topics)

    def __iter__(self) -> Iterator[tuple[str, tuple[int, int]]]:
        """(name, (topic id, partitions)) for every known topic."""
        return iter(list(self._topics.items()))

    def get(self, name: str) -> tuple[int, int] | None:
        return self._topics.get(name)

    @property
    def id_bound(self) -> int:
        """One past the highest id handed out: every id in use is below it."""
        return self._next_id

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """A copy of the table, for the saved state."""
        return dict(self._topics)

    def restore(self, topics: dict[str, tuple[int, int]]) -> None:
        """Take over the ids a previous daemon handed out; new ones continue after the highest.

        Raises:
            ValueError: two names share an id, or an id is out of range (the table is unchanged).
        """
        ids = [tid for tid, _ in topics.values()]
        if len(set(ids)) != len(ids) or any(not 0 <= t < MAX_TOPICS for t in ids):
            raise ValueError("topic ids are not unique")
        self._topics = dict(topics)
        self._next_id = max(ids, default=-1) + 1

    async def lookup(self, name: str, metadata: PartitionSource) -> tuple[int, int]:
        """The topic's (id, partitions), registering it on first use.

        Raises:
            KafkaError: Kafka does not know the topic (or did not answer in time).
            SluiceError: the table is full.
        """
        known = self._topics.get(name)
        if known is not None:
            return known
        # One metadata lookup per name at a time, but names do not wait for each other: an
        # unknown topic takes its whole timeout, and must not stall every other client's lookup.
        lock = self._lookup_locks.setdefault(name, asyncio.Lock())
        try:
            async with lock:
                known = self._topics.get(name)
                if known is not None:
                    return known
                parts = await metadata.partitions_for(name, timeout=METADATA_TIMEOUT_S)
                # The lock leaves the dict as soon as nobody holds it, so a lookup of this name
                # under a newer lock may have finished while this one waited on Kafka.
                known = self._topics.get(name)
                if known is not None:
                    return known
                if len(self._topics) >= MAX_TOPICS:
                    raise SluiceError(f"too many topics ({MAX_TOPICS})")
                tid = self._next_id
                self._next_id += 1
                self._topics[name] = (tid, parts)
                self._on_change(name, tid, parts)
                return tid, parts
        finally:
            if not lock.locked():
                self._lookup_locks.pop(name, None)

    def grow(self, name: str, partitions: int) -> bool:
        """A worker saw ``name`` with ``partitions``: record it if that is more. True if it grew."""
        known = self._topics.get(name)
        if known is None or partitions <= known[1]:
            return False
        log.info("topic %s grew to %d partitions", name, partitions)
        self._topics[name] = (known[0], partitions)
        self._on_change(name, known[0], partitions)
        return True
