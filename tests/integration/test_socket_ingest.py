"""Socket ingest end to end: ``sluice send`` and a raw socket-protocol client, read back with
confluent-kafka; errors over the socket; a malformed frame closes only its own connection.
"""

from __future__ import annotations

import re
import signal
import struct
import subprocess
import threading
import time

import pytest
from daemon_fixture import SLUICE, connect

from shm import control
from shm.partitioner import partition_for_key

pytestmark = pytest.mark.integration


def test_sluice_send_cli_with_acks(sluice_daemon, new_topic, read_topic) -> None:
    topic = new_topic(partitions=3)
    # Enough lines that several 1000-record ProduceAcks are outstanding at once (large frames).
    lines = [f"key-{i}:value-{i}" for i in range(30000)] + ["no-key-line", "k:v:with:colons"]
    out = subprocess.run(
        [SLUICE, "send", "-t", topic, "-K", ":", "--acks", "--socket", sluice_daemon.socket_path],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert f"sent {len(lines)} records to {topic}: {len(lines)} acknowledged, 0 failed" in out.stderr
    records = read_topic(topic, len(lines), timeout=20)
    assert len(records) == len(lines)
    got = {(r.key, r.value): r for r in records}
    for i in range(30000):
        r = got[(b"key-%d" % i, b"value-%d" % i)]
        assert r.partition == partition_for_key(b"key-%d" % i, 3)
    assert (None, b"no-key-line") in got
    assert (b"k", b"v:with:colons") in got
    # The CLI reports the offset range per partition; it matches what the reader saw.
    ranges = dict(
        (int(p), (int(lo), int(hi))) for p, lo, hi in re.findall(r"p(\d+):(\d+)\.\.(\d+)", out.stderr)
    )
    for p in range(3):
        offs = [r.offset for r in records if r.partition == p]
        assert ranges[p] == (min(offs), max(offs))


def test_raw_protocol_produce_with_and_without_acks(sluice_daemon, new_topic, read_topic) -> None:
    topic = new_topic(partitions=2)
    with connect(sluice_daemon.socket_path) as c:
        assert c.welcome is not None and c.welcome.workers == 2
        c.send(control.TopicLookup(topic=topic))
        info = c.expect(control.TopicInfo)
        assert (info.topic, info.partitions) == (topic, 2)
        recs = [
            control.Rec(key=b"rk-%d" % i, value=b"rv-%d" % i, headers=[("h", b"%d" % i), ("n", None)], timestamp=1_600_000_000_000 + i)
            for i in range(50)
        ]
        c.send(control.Produce(topic=topic, records=recs, ack=True, seq=7))
        # Fire-and-forget, with explicit partitions; then Flush waits for them.
        c.send(control.Produce(topic=topic, records=[control.Rec(value=b"nf-%d" % i, partition=1) for i in range(30)]))
        ack = c.expect(control.ProduceAck)
        assert ack.seq == 7 and len(ack.results) == 50
        assert all(r.error_code == 0 and r.error_name == "NONE" for r in ack.results)
        c.send(control.Flush(timeout_ms=10_000))
        done = c.expect(control.FlushDone)
        assert done.complete and done.pending == 0
        c.send(control.Goodbye())
        assert c.closed_by_daemon(5.0)
    records = read_topic(topic, 80, timeout=20)
    assert len(records) == 80
    by_value = {r.value: r for r in records}
    for i, res in enumerate(ack.results):
        r = by_value[b"rv-%d" % i]
        assert (r.partition, r.offset) == (res.partition, res.offset)
        assert r.partition == partition_for_key(b"rk-%d" % i, 2)
        assert r.key == b"rk-%d" % i and r.timestamp == 1_600_000_000_000 + i
        assert r.headers == [("h", b"%d" % i), ("n", None)]
    nf = [r for r in records if r.value.startswith(b"nf-")]
    assert [r.value for r in nf] == [b"nf-%d" % i for i in range(30)]  # partition 1, in order
    assert {r.partition for r in nf} == {1}


def test_socket_errors_keep_the_connection(sluice_daemon, new_topic, read_topic) -> None:
    topic = new_topic(partitions=1)
    with connect(sluice_daemon.socket_path) as c:
        c.send(control.TopicLookup(topic="missing-" + topic))
        err = c.expect(control.ErrorReply)
        assert (err.code, err.name, err.fatal) == (3, "UNKNOWN_TOPIC_OR_PARTITION", False)
        # Produce to an unknown topic: with ack, every record fails in the ack.
        c.send(control.Produce(topic="missing-" + topic, records=[control.Rec(value=b"x")] * 2, ack=True, seq=1))
        ack = c.expect(control.ProduceAck)
        assert [r.error_name for r in ack.results] == ["UNKNOWN_TOPIC_OR_PARTITION"] * 2
        # A partition out of range fails that record only.
        c.send(control.Produce(
            topic=topic, records=[control.Rec(value=b"bad", partition=5), control.Rec(value=b"good")], ack=True, seq=2,
        ))
        ack = c.expect(control.ProduceAck)
        assert ack.seq == 2
        assert ack.results[0].error_name == "UNKNOWN_TOPIC_OR_PARTITION" and ack.results[0].offset == -1
        assert ack.results[1].error_code == 0 and ack.results[1].offset >= 0
        # Still usable: a lookup of the real topic and stats are answered.
        c.send(control.TopicLookup(topic=topic))
        assert c.expect(control.TopicInfo).topic == topic
        assert "workers" in c.request(control.StatsRequest(), control.StatsReply).stats
    records = read_topic(topic, 1, timeout=15)
    assert [(r.value, r.offset) for r in records] == [(b"good", ack.results[1].offset)]


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1", id="not-msgpack"),
        pytest.param(struct.pack(">I", 0), id="zero-length"),
        pytest.param(struct.pack(">I", 0x7FFFFFFF) + b"abc", id="huge-length"),
        pytest.param(b"\x00\x00\x00\x0a\x81\xa4type\xa3Bad\x00", id="unknown-type"),
    ],
)
def test_malformed_frame_closes_only_that_connection(sluice_daemon, new_topic, read_topic, garbage) -> None:
    topic = new_topic(partitions=2)
    n_good = 3000
    stop = threading.Event()
    acked: list[int] = []
    errors: list[BaseException] = []

    def good_client() -> None:
        try:
            with connect(sluice_daemon.socket_path, name="good-neighbour") as g:
                seq = 0
                for start in range(0, n_good, 100):
                    seq += 1
                    g.send(control.Produce(
                        topic=topic, records=[control.Rec(value=b"g-%d" % i) for i in range(start, start + 100)], ack=True, seq=seq,
                    ))
                    ack = g.expect(control.ProduceAck)
                    acked.extend(r.offset for r in ack.results if r.error_code == 0)
                    time.sleep(0.002)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            stop.set()

    t = threading.Thread(target=good_client)
    t.start()
    try:
        with connect(sluice_daemon.socket_path, name="bad-client") as bad:
            bad.send_raw(garbage)
            err = bad.expect(control.ErrorReply)
            assert err.code == control.ERR_BAD_FRAME and err.fatal
            assert bad.closed_by_daemon(5.0)
    finally:
        t.join(30)
    assert not t.is_alive()
    assert not errors, errors
    assert len(acked) == n_good
    records = read_topic(topic, n_good, timeout=20)
    assert sorted(r.value for r in records) == sorted(b"g-%d" % i for i in range(n_good))
    assert stop.is_set()
    # The daemon still serves new connections.
    with connect(sluice_daemon.socket_path) as again:
        assert again.request(control.StatsRequest(), control.StatsReply).stats["connections"] >= 1


def test_unknown_topic_lookup_does_not_stall_other_lookups(sluice_daemon, new_topic) -> None:
    topic = new_topic(partitions=1)
    with connect(sluice_daemon.socket_path, name="asks-missing") as a, connect(sluice_daemon.socket_path, name="asks-real") as b:
        a.send(control.TopicLookup(topic="missing-" + topic))
        time.sleep(0.2)  # a's metadata retries are under way
        t0 = time.monotonic()
        b.send(control.TopicLookup(topic=topic))
        assert b.expect(control.TopicInfo).topic == topic
        assert time.monotonic() - t0 < 2.0  # not behind a's lookup (which retries for 5 s)
        assert a.expect(control.ErrorReply).name == "UNKNOWN_TOPIC_OR_PARTITION"


@pytest.mark.parametrize("acks", [False, True], ids=["no-acks", "acks"])
def test_sigterm_while_sluice_send_streams(start_sluice, new_topic, acks) -> None:
    d = start_sluice()
    topic = new_topic(partitions=2)
    cli = subprocess.Popen(
        [SLUICE, "send", "-t", topic, "-K", ":", "--socket", d.socket_path] + (["--acks"] if acks else []),
        stdin=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    stop = threading.Event()

    def feed() -> None:
        line = b"k:streaming along\n" * 200
        try:
            while not stop.is_set():
                cli.stdin.write(line)
                cli.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass

    t = threading.Thread(target=feed)
    t.start()
    try:
        d.wait_stats(lambda s: s["totals"]["records_in"] > 1000, timeout=10, what="records flowing")
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(20) == 0, d.log()[-3000:]
        d.stopped = True
        # The CLI notices and exits with an error, it does not hang.
        assert cli.wait(15) != 0
        assert b"sluice:" in cli.stderr.read()
    finally:
        stop.set()
        if cli.poll() is None:
            cli.kill()
            cli.wait(5)
        t.join(5)
        for f in (cli.stdin, cli.stderr):
            try:
                f.close()
            except OSError:  # BrokenPipeError flushing stdin: the CLI is gone, as intended
                pass
    assert "Fatal Python error" not in d.log()
