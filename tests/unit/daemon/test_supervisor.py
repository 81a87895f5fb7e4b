"""daemon.supervisor: the wiring between the parts, without starting a daemon.

The start-up, reload and shutdown paths run in tests/integration/test_daemon.py and
test_service.py against a real broker; here the supervisor's answers to its parts are checked.
"""

from __future__ import annotations

from pathlib import Path

from daemon import channel as ch
from daemon.config import loads
from daemon.supervisor import Supervisor
from shm import control


def _supervisor(tmp_path: Path) -> Supervisor:
    text = f'[daemon]\nsocket_path = "{tmp_path}/s.sock"\nworkers = 3\n'
    return Supervisor(str(tmp_path / "sluice.toml"), loads(text, source="test"), text)


def test_a_new_worker_hears_every_topic_and_the_awaited_clients(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path)
    sup.topics.restore({"orders": (0, 6), "clicks": (2, 3)})
    sup.tokens.restore({0xAB: 9, 0xCD: 4})
    intro = sup.introduce(1)
    # Runs of the crashed daemon's clients are kept until they reconnect or the grace ends.
    assert intro.clients == [4, 9]
    assert intro.messages == [
        (ch.AddTopic(topic_id=0, name="orders", partitions=6), []),
        (ch.AddTopic(topic_id=2, name="clicks", partitions=3), []),
    ]


def test_stats_before_any_worker_reported(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path)
    stats = sup.stats()
    assert set(stats["workers"]) == {"0", "1", "2"}
    assert all(w == {"alive": False, "restarts": 0} for w in stats["workers"].values())
    assert (stats["clients"], stats["connections"], stats["topics"], stats["restarts"]) == (0, 0, 0, 0)
    assert stats["reloads"] == 0 and stats["drops"] == {}


def test_a_worker_report_of_more_partitions_grows_the_topic(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path)
    sup.topics.restore({"orders": (0, 6)})
    sup.partitions_changed("orders", 8)
    sup.partitions_changed("orders", 7)  # a stale report
    assert sup.topics.get("orders") == (0, 8)
    assert sup.introduce(0).messages == [(ch.AddTopic(topic_id=0, name="orders", partitions=8), [])]


def test_growth_is_told_to_the_workers_then_ingest_then_the_connections(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path)
    sup.topics.restore({"orders": (0, 6)})
    events: list[tuple[str, object]] = []

    class Ingest:
        def topic_changed(self, msg: control.TopicChanged) -> None:
            events.append(("ingest", msg))

    class Server:
        def topic_changed(self, name: str, tid: int, parts: int) -> int:
            events.append(("connections", (name, tid, parts)))
            return 1

    sup.workers.broadcast = lambda msg, fds=None: events.append(("workers", msg))  # type: ignore[method-assign]
    sup.ingest = Ingest()  # type: ignore[assignment]
    sup.server = Server()  # type: ignore[assignment]
    sup.partitions_changed("orders", 8)
    sup.partitions_changed("orders", 8)  # no growth: nobody is told again
    sup.partitions_changed("unknown", 3)  # a topic no client looked up
    assert events == [
        ("workers", ch.AddTopic(topic_id=0, name="orders", partitions=8)),
        ("ingest", control.TopicChanged(topic="orders", topic_id=0, partitions=8)),
        ("connections", ("orders", 0, 8)),
    ]
