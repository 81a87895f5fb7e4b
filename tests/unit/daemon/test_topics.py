"""daemon.topics: the topic table with a scripted metadata source, and topic_info from a Config."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from daemon.config import loads
from daemon.topics import MAX_TOPICS, METADATA_TIMEOUT_S, TopicTable, topic_info
from daemon.protocol.errors import UNKNOWN_TOPIC_OR_PARTITION as UNKNOWN_TOPIC
from shm.errors import KafkaError, SluiceError


class Metadata:
    """Partition counts by name; a name in ``slow`` answers only when its event is set."""

    def __init__(self, parts: dict[str, int]) -> None:
        self.parts = parts
        self.calls: list[tuple[str, float]] = []
        self.slow: dict[str, asyncio.Event] = {}

    async def partitions_for(self, topic: str, timeout: float = METADATA_TIMEOUT_S) -> int:
        self.calls.append((topic, timeout))
        if topic in self.slow:
            await self.slow[topic].wait()
        if topic not in self.parts:
            raise KafkaError.for_code(UNKNOWN_TOPIC)
        return self.parts[topic]


class Table:
    def __init__(self) -> None:
        self.changes: list[tuple[str, int, int]] = []
        self.table = TopicTable(on_change=self._changed)

    def _changed(self, name: str, tid: int, parts: int) -> None:
        # The table must already hold the topic when the workers are told of it.
        assert self.table.get(name) == (tid, parts)
        self.changes.append((name, tid, parts))


def test_ids_in_order_of_first_lookup_then_cached() -> None:
    async def main() -> None:
        t = Table()
        meta = Metadata({"a": 3, "b": 1})
        assert await t.table.lookup("a", meta) == (0, 3)
        assert await t.table.lookup("b", meta) == (1, 1)
        assert await t.table.lookup("a", meta) == (0, 3)
        assert meta.calls == [("a", METADATA_TIMEOUT_S), ("b", METADATA_TIMEOUT_S)]
        assert t.changes == [("a", 0, 3), ("b", 1, 1)]
        assert len(t.table) == 2
        assert list(t.table) == [("a", (0, 3)), ("b", (1, 1))]
        assert t.table.snapshot() == {"a": (0, 3), "b": (1, 1)}

    asyncio.run(main())


def test_concurrent_lookups_of_one_name_ask_kafka_once() -> None:
    async def main() -> None:
        t = Table()
        meta = Metadata({"a": 2})
        meta.slow["a"] = asyncio.Event()
        tasks = [asyncio.create_task(t.table.lookup("a", meta)) for _ in range(5)]
        await asyncio.sleep(0.01)
        meta.slow["a"].set()
        assert await asyncio.gather(*tasks) == [(0, 2)] * 5
        assert len(meta.calls) == 1
        assert t.changes == [("a", 0, 2)]

    asyncio.run(main())


def test_a_slow_name_does_not_stall_the_others() -> None:
    async def main() -> None:
        t = Table()
        meta = Metadata({"slow": 1, "fast": 4})
        meta.slow["slow"] = asyncio.Event()
        slow = asyncio.create_task(t.table.lookup("slow", meta))
        await asyncio.sleep(0.01)
        assert await asyncio.wait_for(t.table.lookup("fast", meta), 1.0) == (0, 4)
        meta.slow["slow"].set()
        assert await slow == (1, 1)

    asyncio.run(main())


def test_unknown_topic_raises_and_registers_nothing() -> None:
    async def main() -> None:
        t = Table()
        meta = Metadata({})
        with pytest.raises(KafkaError) as err:
            await t.table.lookup("nope", meta)
        assert err.value.code == UNKNOWN_TOPIC
        assert len(t.table) == 0 and t.changes == []
        meta.parts["nope"] = 2  # created meanwhile: the next lookup asks again
        assert await t.table.lookup("nope", meta) == (0, 2)

    asyncio.run(main())


def test_partition_counts_only_grow() -> None:
    async def main() -> None:
        t = Table()
        await t.table.lookup("a", Metadata({"a": 3}))
        assert t.table.grow("a", 2) is False  # a stale metadata answer
        assert t.table.grow("a", 3) is False
        assert t.table.grow("unknown", 9) is False
        assert t.table.grow("a", 8) is True
        assert t.table.get("a") == (0, 8)
        assert t.changes == [("a", 0, 3), ("a", 0, 8)]

    asyncio.run(main())


def test_restore_continues_after_the_highest_id() -> None:
    async def main() -> None:
        t = Table()
        t.table.restore({"x": (4, 1), "y": (1, 2)})
        assert t.changes == []  # taken over, not new: nothing to tell
        assert await t.table.lookup("x", Metadata({})) == (4, 1)  # no Kafka round trip
        assert await t.table.lookup("z", Metadata({"z": 5})) == (5, 5)

    asyncio.run(main())


@pytest.mark.parametrize("topics", [{"x": (1, 1), "y": (1, 2)}, {"x": (-1, 1)}, {"x": (MAX_TOPICS, 1)}])
def test_restore_refuses_bad_ids_and_keeps_the_table(topics: dict[str, tuple[int, int]]) -> None:
    t = Table()
    t.table.restore({"kept": (0, 1)})
    with pytest.raises(ValueError, match="not unique"):
        t.table.restore(topics)
    assert t.table.snapshot() == {"kept": (0, 1)}


def test_a_full_table_refuses_a_new_topic() -> None:
    async def main() -> None:
        t = Table()
        t.table.restore({f"t{i}": (i, 1) for i in range(MAX_TOPICS)})
        with pytest.raises(SluiceError, match="too many topics"):
            await t.table.lookup("one-more", Metadata({"one-more": 1}))
        assert t.table.get("one-more") is None

    asyncio.run(main())


def test_topic_info_carries_the_profile_of_the_topic() -> None:
    config = loads(
        '[profiles.clicks]\nlinger_ms = 50\n[[topics]]\nmatch = "clicks.*"\nprofile = "clicks"\n',
        source="test",
    )
    info = topic_info(config, "clicks.eu", 7, 12)
    profile: Any = config.profiles["clicks"]
    assert (info.topic, info.topic_id, info.partitions, info.profile) == ("clicks.eu", 7, 12, "clicks")
    assert (info.linger_ms, info.on_full, info.max_block_ms) == (50, profile.on_full, profile.max_block_ms)
    assert (info.batch_size, info.max_request_size) == (profile.batch_size, profile.max_request_size)
    assert topic_info(config, "orders", 0, 1).profile == "default"
