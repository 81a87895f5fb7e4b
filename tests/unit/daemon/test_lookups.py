"""daemon.lookups: concurrent lookups of a name share one answer; Kafka's "no such topic" is
remembered for the configured time (and no longer), other failures are not remembered."""

from __future__ import annotations

import asyncio

import pytest

from daemon.lookups import TopicLookups
from daemon.protocol.errors import UNKNOWN_TOPIC_OR_PARTITION
from shm import control
from shm.errors import KafkaError, SluiceError


class Source:
    """The real lookup, scripted: every call counted, each takes ``delay`` seconds."""

    def __init__(self, delay: float = 0.05) -> None:
        self.calls: list[str] = []
        self.delay = delay
        self.exists: set[str] = {"t"}
        self.broken = False

    async def __call__(self, name: str) -> control.TopicInfo:
        self.calls.append(name)
        await asyncio.sleep(self.delay)
        if self.broken:
            raise SluiceError("not connected to Kafka yet")
        if name not in self.exists:
            raise KafkaError.for_code(UNKNOWN_TOPIC_OR_PARTITION, name)
        return control.TopicInfo(topic=name, topic_id=1, partitions=1, profile="default", max_request_size=1,
                                 on_full="block", max_block_ms=0, batch_size=1, linger_ms=0)


def test_concurrent_lookups_of_a_name_share_one() -> None:
    async def main() -> None:
        src = Source()
        lookups = TopicLookups(src, lambda: 1000)
        infos = await asyncio.gather(*(lookups.lookup("t") for _ in range(5)))
        assert [i.topic for i in infos] == ["t"] * 5 and src.calls == ["t"]
        results = await asyncio.gather(*(lookups.lookup("gone") for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, KafkaError) and r.code == UNKNOWN_TOPIC_OR_PARTITION for r in results)
        assert src.calls == ["t", "gone"]

    asyncio.run(main())


def test_unknown_is_remembered_for_the_ttl_only() -> None:
    async def main() -> None:
        src = Source(delay=0.0)
        lookups = TopicLookups(src, lambda: 200)
        for _ in range(3):
            with pytest.raises(KafkaError):
                await lookups.lookup("gone")
        assert src.calls == ["gone"] and len(lookups) == 1
        src.exists.add("gone")  # created meanwhile
        await asyncio.sleep(0.25)
        assert (await lookups.lookup("gone")).topic == "gone"
        assert src.calls == ["gone", "gone"]

    asyncio.run(main())


def test_ttl_zero_and_non_kafka_errors_are_not_remembered() -> None:
    async def main() -> None:
        src = Source(delay=0.0)
        off = TopicLookups(src, lambda: 0)
        for _ in range(2):
            with pytest.raises(KafkaError):
                await off.lookup("gone")
        assert src.calls == ["gone", "gone"] and len(off) == 0
        src.broken = True
        on = TopicLookups(src, lambda: 60_000)
        for _ in range(2):
            with pytest.raises(SluiceError):
                await on.lookup("t")
        assert len(on) == 0

    asyncio.run(main())


def test_a_cancelled_waiter_does_not_cancel_the_others() -> None:
    async def main() -> None:
        src = Source(delay=0.1)
        lookups = TopicLookups(src, lambda: 1000)
        first = asyncio.ensure_future(lookups.lookup("t"))
        second = asyncio.ensure_future(lookups.lookup("t"))
        await asyncio.sleep(0.01)
        first.cancel()
        assert (await second).topic == "t"

    asyncio.run(main())


def test_remembered_names_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from daemon import lookups as mod

    monkeypatch.setattr(mod, "_MAX_REMEMBERED", 3)

    async def main() -> None:
        src = Source(delay=0.0)
        lookups = TopicLookups(src, lambda: 60_000)
        for i in range(5):
            with pytest.raises(KafkaError):
                await lookups.lookup(f"gone-{i}")
        assert len(lookups) == 3
        assert lookups.remembered("gone-0") is None and lookups.remembered("gone-4") is not None

    asyncio.run(main())
