"""The socket protocol's promises that need a real daemon and broker (issue 16): memory per
connection is bounded when a client never reads; unacknowledged failures are counted and
reported; unknown topics are remembered and do not hold up other topics; per-topic order holds
when a Produce waits for a lookup; SIGTERM acknowledges what was read, then says SHUTTING_DOWN.
Deliveries are read back with confluent-kafka."""

from __future__ import annotations

import signal
import socket
import threading
import time
from typing import Any

import psutil
import pytest
from daemon_fixture import connect

from daemon.server import MAX_UNSENT_REPLY_BYTES
from shm import control
from shm.errors import ConnectionClosedError

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def test_a_client_that_never_reads_is_stopped_not_buffered(sluice_daemon, new_topic) -> None:
    topic = new_topic(partitions=2)
    pid = sluice_daemon.proc.pid
    with connect(sluice_daemon.socket_path) as warm:  # the topic known, the daemon warmed up
        warm.request(control.Produce(topic=topic, records=[control.Rec(value=b"w")], ack=True, seq=1), control.ProduceAck)
    time.sleep(0.5)
    base = _rss(pid)
    frame = control.encode(control.Produce(
        topic=topic, records=[control.Rec(key=b"k%d" % i, value=b"v" * 100) for i in range(1000)], ack=True, seq=7))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(sluice_daemon.socket_path)
    sock.sendall(control.encode(control.Hello(version=1, client_name="never-reads")))
    sock.settimeout(3.0)
    sent = 0
    peak = base
    blocked = False
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            try:
                sock.sendall(frame)  # never a recv: every ProduceAck stays unread
            except TimeoutError:
                blocked = True  # the daemon stopped reading us for 3 s
                break
            sent += 1
            if sent % 20 == 0:
                peak = max(peak, _rss(pid))
        assert blocked, f"the daemon read {sent} frames ({sent * len(frame) // MiB} MiB) without stopping"
        stats = sluice_daemon.wait_stats(lambda s: s["socket"]["paused"] >= 1, timeout=5, what="connection paused")
        assert stats["socket"]["unsent_reply_bytes"] >= MAX_UNSENT_REPLY_BYTES
        for _ in range(5):  # it stays stopped, and the daemon does not grow meanwhile
            time.sleep(0.5)
            peak = max(peak, _rss(pid))
        with pytest.raises(TimeoutError):
            sock.sendall(frame)
    finally:
        sock.close()
    grown = peak - base
    print(f"never-reading client: {sent} frames of {len(frame)} bytes read before the daemon stopped; "
          f"daemon RSS {base / MiB:.0f} MiB -> peak {peak / MiB:.0f} MiB")
    assert grown < 150 * MiB, f"daemon grew {grown / MiB:.0f} MiB"
    # The connection gone (the one left is the stats request's own), its replies go with it.
    sluice_daemon.wait_stats(lambda s: s["socket"]["connections"] <= 1 and s["socket"]["inflight_records"] == 0,
                             timeout=20, what="connection and its records gone")
    time.sleep(1.0)
    after = _rss(pid)
    print(f"after the client left: {after / MiB:.0f} MiB")
    assert after - base < 80 * MiB, f"daemon kept {(after - base) / MiB:.0f} MiB after the client left"


def test_unacknowledged_failures_are_counted_and_flush_reports_them(start_sluice, new_topic, read_topic) -> None:
    d = start_sluice(profiles={"small": {"max_request_size": 10_000, "batch_size": 10_000}}, topics={"small-*": "small"})
    topic = new_topic(partitions=1, prefix="small")
    missing = topic + "-missing"
    # The exact size limit (docs/PROTOCOL.md): with a 1-byte key and no headers the record body
    # is value + 6 bytes, and it must be at most max_request_size - 90.
    fits, too_big = 10_000 - 96, 10_000 - 95
    with connect(d.socket_path) as c:
        c.send(control.Produce(topic=missing, records=[control.Rec(value=b"a"), control.Rec(value=b"b")]))
        c.send(control.Produce(topic=topic, records=[
            control.Rec(value=b"p", partition=3),
            control.Rec(key=b"k", value=b"x" * too_big),
            control.Rec(key=b"k", value=b"y" * fits),
            control.Rec(value=b"fine"),
        ]))
        c.send(control.Flush(timeout_ms=20_000))
        done = c.recv()  # nothing before it: the failed ack=false records are never answered
        assert done == control.FlushDone(complete=True, pending=0, failed=4)
        c.send(control.Flush(timeout_ms=1_000))
        assert c.recv() == control.FlushDone(complete=True, pending=0, failed=0)  # since the last
        c.send(control.Produce(topic=topic, records=[control.Rec(value=b"q", partition=9)], ack=True, seq=5))
        ack = c.expect(control.ProduceAck)
        assert (ack.results[0].partition, ack.results[0].error_name) == (9, "UNKNOWN_TOPIC_OR_PARTITION")
        refused = c.request(control.StatsRequest(), control.StatsReply).stats["socket"]["refused"]
    assert refused == {missing: {"UNKNOWN_TOPIC_OR_PARTITION": 2},
                       topic: {"UNKNOWN_TOPIC_OR_PARTITION": 2, "MESSAGE_TOO_LARGE": 1}}
    got = read_topic(topic, 2, timeout=20)
    assert sorted(len(r.value) for r in got) == [4, fits]
    metrics_text = _metrics(d)
    assert f'sluice_socket_refused_total{{error="MESSAGE_TOO_LARGE",topic="{topic}"}} 1.0' in metrics_text


def _metrics(d: Any) -> str:
    """The Prometheus text, rendered from the same stats the daemon serves."""
    from daemon.metrics import render

    return render(d.stats()).decode()


def test_unknown_topics_are_remembered_and_do_not_hold_up_other_topics(start_sluice, new_topic, read_topic) -> None:
    d = start_sluice(daemon={"unknown_topic_cache_ms": 30_000})
    good = new_topic(partitions=1)
    missing = good + "-missing"
    with connect(d.socket_path) as c:
        c.request(control.TopicLookup(topic=good), control.TopicInfo)
        t0 = time.monotonic()
        c.send(control.Produce(topic=missing, records=[control.Rec(value=b"m")], ack=True, seq=1))
        c.send(control.Produce(topic=good, records=[control.Rec(value=b"g")], ack=True, seq=2))
        first = c.expect(control.ProduceAck)
        took_good = time.monotonic() - t0
        second = c.expect(control.ProduceAck)
        took_missing = time.monotonic() - t0
        # The good topic's ack does not wait for the unknown topic's lookup (seconds).
        assert (first.seq, second.seq) == (2, 1), (first, second)
        assert took_good < 1.0 < took_missing
        assert second.results[0].error_name == "UNKNOWN_TOPIC_OR_PARTITION"
        # Remembered: the next lookup and Produce fail at once.
        t1 = time.monotonic()
        err = c.request(control.TopicLookup(topic=missing), control.ErrorReply)
        c.send(control.Produce(topic=missing, records=[control.Rec(value=b"m")], ack=True, seq=3))
        assert c.expect(control.ProduceAck).results[0].error_code == 3
        assert err.code == 3 and time.monotonic() - t1 < 0.5
        assert c.request(control.StatsRequest(), control.StatsReply).stats["socket"]["unknown_topics"] == 1
    assert [r.value for r in read_topic(good, 1, timeout=15)] == [b"g"]


def test_per_topic_order_holds_behind_a_lookup(sluice_daemon, new_topic, read_topic) -> None:
    # The topic exists but the daemon has not seen it: the first Produce waits for its lookup
    # as a task; the ones after it must not overtake it.
    topic = new_topic(partitions=1)
    other = new_topic(partitions=1)
    with connect(sluice_daemon.socket_path) as c:
        for f in range(20):
            c.send(control.Produce(topic=topic, records=[control.Rec(value=b"%03d-%03d" % (f, i)) for i in range(50)]))
            c.send(control.Produce(topic=other, records=[control.Rec(value=b"o%d" % f)]))
        c.send(control.Flush(timeout_ms=20_000))
        assert c.expect(control.FlushDone) == control.FlushDone(complete=True, pending=0, failed=0)
    got = [r.value for r in read_topic(topic, 1000, timeout=20)]
    assert got == [b"%03d-%03d" % (f, i) for f in range(20) for i in range(50)]
    assert [r.value for r in read_topic(other, 20, timeout=20)] == [b"o%d" % f for f in range(20)]


def test_sigterm_acknowledges_what_was_read_then_says_shutting_down(start_sluice, new_topic, read_topic) -> None:
    d = start_sluice()
    topic = new_topic(partitions=2)
    frames = 400
    per = 500
    replies: list[Any] = []
    closed = threading.Event()
    c = connect(d.socket_path, timeout=30)

    def read_all() -> None:
        try:
            while True:
                replies.append(c.recv())
        except (ConnectionClosedError, OSError):
            closed.set()

    reader = threading.Thread(target=read_all)
    reader.start()
    sent = 0
    try:
        for f in range(frames):
            recs = [control.Rec(key=b"%d" % (i % 7), value=b"f%d-%d" % (f, i)) for i in range(per)]
            try:
                c.send(control.Produce(topic=topic, records=recs, ack=True, seq=f))
            except OSError:
                break
            sent += 1
            if f == 40:
                d.wait_stats(lambda s: s["totals"]["records_out"] > 5_000, timeout=15, what="records delivered")
                d.proc.send_signal(signal.SIGTERM)
        assert closed.wait(30), "the daemon did not close the connection"
        assert d.proc.wait(30) == 0, d.log()[-3000:]
        d.stopped = True
    finally:
        c.close()
        reader.join(10)
    *acks, last = replies
    assert isinstance(last, control.ErrorReply) and last.fatal and last.name == "SHUTTING_DOWN", replies[-3:]
    assert all(isinstance(a, control.ProduceAck) for a in acks)
    acked = {a.seq for a in acks}
    assert len(acked) == len(acks) and 40 <= len(acks) < sent
    # Every record read was delivered and acknowledged, none refused or unknown: the deadline
    # (10 s) was not reached.
    assert all(r.error_code == 0 for a in acks for r in a.results)
    got = read_topic(topic, len(acks) * per, timeout=30)
    values = {r.value for r in got}
    assert len(got) == len(values) == len(acks) * per
    # A frame that got no ack was never read: none of its records is in Kafka (safe to resend).
    assert values == {b"f%d-%d" % (f, i) for f in acked for i in range(per)}
    assert acked == set(range(len(acks)))  # read in order: the unanswered ones are the last


def test_sluice_send_without_acks_reports_failures(sluice_daemon, new_topic) -> None:
    import subprocess

    from daemon_fixture import SLUICE

    topic = new_topic(partitions=1)
    out = subprocess.run([SLUICE, "send", "-t", topic, "-p", "4", "--socket", sluice_daemon.socket_path],
                         input="a\nb\nc\n", capture_output=True, text=True, timeout=30)
    assert out.returncode == 1, out.stderr
    assert f"sent 3 records to {topic}: 3 failed" in out.stderr
    ok = subprocess.run([SLUICE, "send", "-t", topic, "--socket", sluice_daemon.socket_path],
                        input="a\nb\n", capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and ok.stderr.strip() == f"sent 2 records to {topic}", ok.stderr
