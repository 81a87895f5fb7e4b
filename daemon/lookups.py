"""Topic lookups as the clients see them: one Kafka lookup per name at a time, and unknown
names remembered for a while.

A lookup of a topic Kafka does not have waits for the metadata timeout (several seconds) before
it fails. A client that keeps sending to such a topic (a typo in a config, a topic not created
yet) would pay that on every frame and hold up its connection. So:

- Concurrent lookups of one name share one answer (one metadata request, one wait).
- A name that failed with a Kafka error is remembered for ``daemon.unknown_topic_cache_ms``
  (0 = not at all): lookups within that time fail at once with the same error. After it, the
  next lookup asks Kafka again, so a topic created meanwhile is found.
- At most ``_MAX_REMEMBERED`` names are remembered; a client inventing endless names cannot
  grow the daemon (the oldest entries go first).

Only Kafka errors are remembered; a full topic table or a daemon not connected yet is not an
answer about the name.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from shm import control
from shm.errors import KafkaError

__all__ = ["TopicLookups"]

_MAX_REMEMBERED = 4096

Lookup = Callable[[str], Awaitable[control.TopicInfo]]


class TopicLookups:
    """``lookup(name)`` answers as ``source(name)`` does, coalesced and with failures remembered.

    Args:
        source: the real lookup (Kafka metadata, the topic table).
        ttl_ms: how long a failure is remembered; called at every failure, so a reload of the
            config takes effect for the next one.
    """

    def __init__(self, source: Lookup, ttl_ms: Callable[[], int]) -> None:
        self._source = source
        self._ttl_ms = ttl_ms
        self._unknown: OrderedDict[str, tuple[float, KafkaError]] = OrderedDict()
        self._running: dict[str, asyncio.Future[control.TopicInfo]] = {}

    def __len__(self) -> int:
        """Names remembered as unknown now (expired ones may still be counted until asked)."""
        return len(self._unknown)

    def remembered(self, name: str) -> KafkaError | None:
        """The error a lookup of ``name`` would fail with at once, or None to ask Kafka."""
        entry = self._unknown.get(name)
        if entry is None:
            return None
        if time.monotonic() >= entry[0]:
            del self._unknown[name]
            return None
        return entry[1]

    async def lookup(self, name: str) -> control.TopicInfo:
        """The topic's TopicInfo.

        Raises:
            KafkaError: Kafka does not have it (now, or within the remembered time).
            SluiceError: the daemon cannot look it up (not connected, table full).
        """
        known = self.remembered(name)
        if known is not None:
            raise known
        running = self._running.get(name)
        if running is None:
            running = self._running[name] = asyncio.ensure_future(self._ask(name))
        # shield: one waiter cancelled (its connection closed) must not cancel the others'.
        return await asyncio.shield(running)

    async def _ask(self, name: str) -> control.TopicInfo:
        try:
            return await self._source(name)
        except KafkaError as exc:
            ttl = self._ttl_ms()
            if ttl > 0:
                self._unknown[name] = (time.monotonic() + ttl / 1000.0, exc)
                self._unknown.move_to_end(name)
                while len(self._unknown) > _MAX_REMEMBERED:
                    self._unknown.popitem(last=False)
            raise
        finally:
            self._running.pop(name, None)
