"""``sluice run`` as a systemd service, proven against a real daemon and a real Kafka broker.

systemd itself is not needed: a bound ``AF_UNIX`` datagram socket stands in for
``$NOTIFY_SOCKET`` (tests/integration/service_fixture.py) and records what the daemon sends and
from which pid. What is checked:

* start-up: READY=1 once, only after the socket answers (and never without Kafka metadata),
  STATUS= lines that follow the traffic, only the main pid notifying, workers' environment
  without NOTIFY_SOCKET/WATCHDOG_*; a bad config exits 78;
* the watchdog: WATCHDOG=1 at least every WatchdogSec, withheld while a worker is stopped
  (SIGSTOP), resumed after SIGCONT; honoured or ignored according to WATCHDOG_PID;
* SIGTERM: STOPPING=1 and EXTEND_TIMEOUT_USEC, then exit 0 (also while Kafka is unreachable);
* SIGHUP: RELOADING=1 then READY=1, the new linger_ms in force in the workers (measured as a
  record's delivery latency), restart-only keys and invalid files refused with nothing changed;
* metrics: Prometheus text whose sluice_records_out_total follows the records delivered;
* access: SO_PEERCRED allow-lists refuse and admit real clients, including, as root, a client
  running as uid 65534.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service_fixture import (
    SLUICE,
    NotifySocket,
    ServiceDaemon,
    config_toml,
    free_port,
    short_tmpdir,
)

from shm import Producer, SluiceError

pytestmark = pytest.mark.integration

START_S = 45.0  # READY=1 after start (Kafka connection, two workers, the ingest client)
WATCHDOG_USEC = 2_000_000  # WatchdogSec=2s: pings every 1 s, a worker stale after 3 s
NOBODY = 65534

Started = tuple[ServiceDaemon, NotifySocket]


def _is(key: str, value: str = "1") -> Callable[[Any], bool]:
    return lambda m: m.fields.get(key) == value


@pytest.fixture
def service(kafka_bootstrap: str) -> Iterator[Callable[..., Started]]:
    """``service(daemon=..., profiles=..., topics=..., watchdog_pid=..., bootstrap=...)`` starts
    a daemon with a notification socket; ``watchdog_pid`` is True (the daemon's own pid, as
    systemd sets it), a string (that value), or None (unset)."""
    made: list[Started] = []

    def start(*, daemon: dict[str, Any] | None = None, profiles: dict[str, dict[str, Any]] | None = None,
              topics: dict[str, str] | None = None, watchdog_usec: int | None = None,
              watchdog_pid: bool | str | None = None, bootstrap: str | None = None) -> Started:
        workdir = short_tmpdir()
        notify = NotifySocket(workdir)
        env: dict[str, str | None] = {"NOTIFY_SOCKET": notify.path}
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        if isinstance(watchdog_pid, str):
            env["WATCHDOG_PID"] = watchdog_pid
        text = config_toml(os.path.join(workdir, "s.sock"), bootstrap or kafka_bootstrap,
                           daemon=daemon, profiles=profiles, topics=topics)
        d = ServiceDaemon(workdir, text, env=env, watchdog_pid=watchdog_pid is True)
        made.append((d, notify))
        return d, notify

    yield start
    for d, notify in made:
        if d.proc.poll() is None or d.proc.returncode != 0:
            print(f"--- daemon log ({d.workdir}) ---\n{d.log()[-8000:]}")
        d.cleanup()
        notify.close()


def _wait_ready(d: ServiceDaemon, notify: NotifySocket) -> int:
    deadline = time.monotonic() + START_S
    while True:
        try:
            return notify.wait_for(_is("READY"), timeout=0.5, what="READY=1")
        except AssertionError as exc:
            if d.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{exc} (daemon exit status {d.proc.returncode})\n"
                                     f"daemon log:\n{d.log()[-4000:]}") from None


def _pings(notify: NotifySocket, since: float = 0.0) -> list[float]:
    return [m.at for m in notify.messages if m.fields.get("WATCHDOG") == "1" and m.at >= since]


def _reload(d: ServiceDaemon, notify: NotifySocket, text: str) -> tuple[str, int]:
    """Write ``text`` as the config, SIGHUP, wait for RELOADING=1 then READY=1; returns the
    daemon's reload log line and the index of the READY=1 datagram."""
    d.write_config(text)
    n, log_at = notify.count(), len(d.log())
    d.signal(signal.SIGHUP)
    i = notify.wait_for(_is("RELOADING"), after=n, timeout=10, what="RELOADING=1 after SIGHUP")
    assert "MONOTONIC_USEC" in notify.messages[i], "RELOADING=1 must carry MONOTONIC_USEC"
    j = notify.wait_for(_is("READY"), after=i + 1, timeout=10, what="READY=1 after RELOADING=1")
    line = d.wait_log("reload", after=log_at, timeout=5)
    return line, j


def _bootstrap_of(d: ServiceDaemon) -> str:
    found = re.search(r'bootstrap_servers = "([^"]+)"', Path(d.config_path).read_text())
    assert found is not None
    return found.group(1)


def _delivery_latency(p: Producer, topic: str) -> float:
    t0 = time.monotonic()
    p.send(topic, b"latency probe").result(20)
    return time.monotonic() - t0


def _status_records_out(m: Any) -> int | None:
    found = re.search(r"(\d+) records out", m.fields.get("STATUS", ""))
    return int(found.group(1)) if found else None


# --- start-up, status, watchdog, stop ---------------------------------------------------------


def test_ready_status_watchdog_and_stop(service, new_topic) -> None:
    d, notify = service(watchdog_usec=WATCHDOG_USEC, watchdog_pid=True)
    ready = _wait_ready(d, notify)
    # READY=1 means clients can connect now, not "soon".
    assert d.answers(timeout=2.0), "READY=1 arrived but the socket does not answer"
    log = d.log()
    assert "worker 0 started" in log and "worker 1 started" in log
    before = notify.messages[:ready]
    assert any("starting" in m.fields.get("STATUS", "") for m in before), before

    # NotifyAccess=main: every datagram comes from the daemon's own pid, and no worker even
    # has the variables that would let it try.
    pids = d.worker_pids()
    assert len(pids) == 2 and d.pid not in pids
    for pid in pids:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not [v for v in env if v.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_USEC=", b"WATCHDOG_PID="))]

    # STATUS= follows the traffic: records delivered show up in it.
    first = _status_records_out(notify.messages[ready])
    assert first == 0, notify.messages[ready].raw
    topic = new_topic(partitions=2)
    with Producer(d.socket_path, client_name="test-status") as p:
        futures = [p.send(topic, b"status %d" % i) for i in range(30)]
        for f in futures:
            f.result(20)
    notify.wait_for(lambda m: (_status_records_out(m) or 0) >= 30, after=ready, timeout=6,
                    what="a STATUS= line with 30 records out")

    # WATCHDOG=1 every WatchdogSec/2; systemd would kill us at a gap of WatchdogSec.
    t_ready = notify.messages[ready].at
    deadline = time.monotonic() + 10
    while len(_pings(notify, t_ready)) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    pings = _pings(notify, t_ready)
    assert len(pings) >= 4, f"only {len(pings)} watchdog pings in {time.monotonic() - t_ready:.1f}s"
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert max(gaps) < WATCHDOG_USEC / 1e6, f"gaps between pings: {gaps}"

    # A hung worker (SIGSTOP): its heartbeat goes stale and the pings stop.
    log_at = len(d.log())
    os.kill(pids[0], signal.SIGSTOP)
    try:
        t_stop = time.monotonic()
        quiet_for = 2.5  # more than two ping periods without a ping
        while True:
            now = time.monotonic()
            last = max(_pings(notify, t_ready))
            if now - last >= quiet_for and now - t_stop >= quiet_for:
                break
            assert now - t_stop < 10, "watchdog pings still arrive 10 s after a worker stopped"
            time.sleep(0.1)
        # Stale after 3 s (3 heartbeats), noticed at the next ping period (1 s), with slack.
        assert last - t_stop < 5.5, f"last ping {last - t_stop:.1f}s after SIGSTOP"
        assert "withholding systemd watchdog pings" in d.wait_log("withholding", after=log_at, timeout=2)
        workers = d.stats()["workers"]
        assert workers["0"]["alive"] is False and workers["1"]["alive"] is True
    finally:
        os.kill(pids[0], signal.SIGCONT)
    t_cont = time.monotonic()
    deadline = t_cont + 5
    while not _pings(notify, t_cont):
        assert time.monotonic() < deadline, "watchdog pings did not resume within 5 s of SIGCONT"
        time.sleep(0.05)
    d.wait_log("resuming systemd watchdog pings", after=log_at, timeout=2)

    # A crashed worker is the supervisor's to restart: the pings go on meanwhile.
    t_kill = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    deadline = t_kill + 15
    while True:
        workers = d.stats()["workers"]
        if workers["1"]["restarts"] == 1 and workers["1"].get("pid") not in (None, pids[1]) and workers["1"]["alive"]:
            break
        assert time.monotonic() < deadline, f"worker 1 not back 15 s after SIGKILL: {workers['1']}"
        time.sleep(0.2)
    time.sleep(max(0.0, t_kill + 3.0 - time.monotonic()))
    around = [t_cont, *_pings(notify, t_cont)]
    gaps = [b - a for a, b in zip(around, around[1:])]
    assert max(gaps) < WATCHDOG_USEC / 1e6, f"ping gaps around a worker crash: {gaps}"

    assert sum(1 for m in notify.messages if m.fields.get("READY") == "1") == 1, "READY=1 more than once"

    # SIGTERM: STOPPING=1, the stop timeout extended for the drain, exit 0.
    n = notify.count()
    d.signal(signal.SIGTERM)
    notify.wait_for(_is("STOPPING"), after=n, timeout=5, what="STOPPING=1 after SIGTERM")
    i = notify.wait_for(lambda m: int(m.fields.get("EXTEND_TIMEOUT_USEC", "0")) > 0, after=n, timeout=5,
                        what="EXTEND_TIMEOUT_USEC after SIGTERM")
    assert notify.messages[i].at >= notify.messages[n].at
    assert d.proc.wait(20) == 0
    senders = {m.pid for m in notify.messages}
    assert senders == {d.pid}, f"notifications from pids {senders}, daemon is {d.pid}"


def test_no_ready_without_kafka_and_sigterm_during_start(service) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there: no metadata can be fetched
    d, notify = service(bootstrap=dead)
    notify.wait_for(lambda m: "connecting to Kafka" in m.fields.get("STATUS", ""), timeout=15,
                    what="STATUS=starting: connecting to Kafka")
    time.sleep(3.0)
    assert not [m for m in notify.messages if "READY" in m], "READY=1 without Kafka metadata"
    assert not d.answers(timeout=1.0)
    assert d.proc.poll() is None, "the daemon gave up on Kafka within seconds"
    n = notify.count()
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    notify.wait_for(_is("STOPPING"), after=n, timeout=5, what="STOPPING=1 after SIGTERM during start-up")
    assert d.proc.wait(10) == 0
    assert time.monotonic() - t0 < 10
    assert "stop requested during start-up" in d.log()


def test_bad_config_at_start_exits_78() -> None:
    workdir = short_tmpdir()
    try:
        notify = NotifySocket(workdir)
        text = config_toml(os.path.join(workdir, "s.sock"), "127.0.0.1:9092", daemon={"no_such_key": 1})
        d = ServiceDaemon(workdir, text, env={"NOTIFY_SOCKET": notify.path})
        try:
            assert d.proc.wait(15) == 78  # EX_CONFIG: the unit's RestartPreventExitStatus
        finally:
            d.kill()
            notify.close()
        assert "daemon.no_such_key" in d.log()
        assert not [m for m in notify.messages if "READY" in m]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --- SIGHUP -----------------------------------------------------------------------------------


def test_sighup_reload_applies_live_keys_and_refuses_the_rest(service, new_topic) -> None:
    topic = new_topic(partitions=1)
    profiles = {"svc": {"linger_ms": 5}}
    rules = {topic: "svc"}
    # WATCHDOG_PID unset: systemd's rule is that the watchdog then applies to whoever reads it.
    d, notify = service(profiles=profiles, topics=rules, watchdog_usec=WATCHDOG_USEC)
    _wait_ready(d, notify)
    sock = d.socket_path
    bootstrap = _bootstrap_of(d)

    def text(linger: int, *, socket_path: str = sock, daemon: dict[str, Any] | None = None) -> str:
        return config_toml(socket_path, bootstrap, profiles={"svc": {"linger_ms": linger}}, topics=rules,
                           daemon=daemon)

    with Producer(sock, client_name="test-reload") as p:
        p.send(topic, b"warm-up").result(20)
        fast = min(_delivery_latency(p, topic) for _ in range(2))
        assert fast < 1.0, f"linger_ms=5 but a record took {fast:.2f}s"

        # A live key: applied, logged by name, counted, and in force in the workers.
        line, _ = _reload(d, notify, text(2000))
        assert "reloaded" in line and "profiles.svc.linger_ms" in line, line
        assert d.stats()["reloads"] == 1
        slow = _delivery_latency(p, topic)
        assert 1.9 <= slow < 8.0, f"linger_ms=2000 but a record took {slow:.2f}s"

        # A restart-only key (with a live one beside it): refused whole, nothing changes.
        other = os.path.join(d.workdir, "other.sock")
        line, _ = _reload(d, notify, text(5, socket_path=other))
        assert "refused" in line and "daemon.socket_path" in line, line
        assert d.stats()["reloads"] == 1
        assert d.answers() and not os.path.exists(other)
        still = _delivery_latency(p, topic)
        assert still >= 1.9, f"a refused reload changed linger_ms: a record took {still:.2f}s"

        # An invalid file (an unknown key): refused, logged with the key, nothing changes.
        line, _ = _reload(d, notify, text(5, daemon={"bogus_key": 1}))
        assert "refused" in line and "bogus_key" in line, line
        assert d.stats()["reloads"] == 1
        assert d.answers()

    # The watchdog kept going through all of it (WATCHDOG_PID unset = it applies).
    pings = _pings(notify)
    assert len(pings) >= 3
    assert max(b - a for a, b in zip(pings, pings[1:])) < WATCHDOG_USEC / 1e6
    assert d.stop() == 0


# --- metrics ----------------------------------------------------------------------------------


def _scrape(port: int) -> tuple[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        return resp.read().decode("utf-8"), resp.headers["Content-Type"]


def _sum(body: str, metric: str) -> float:
    total = 0.0
    seen = False
    for line in body.splitlines():
        if line.startswith(metric + "{") or line.startswith(metric + " "):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    assert seen, f"no {metric} samples in:\n{body}"
    return total


def test_metrics_follow_records_out(service, new_topic) -> None:
    port = free_port()
    # WATCHDOG_PID names another process: the watchdog is not ours, so no pings at all.
    d, notify = service(daemon={"metrics_port": port}, watchdog_usec=WATCHDOG_USEC, watchdog_pid="1")
    ready = _wait_ready(d, notify)
    body, ctype = _scrape(port)
    assert ctype.startswith("text/plain; version=0.0.4")
    assert _sum(body, "sluice_workers_up") == 2
    assert re.search(r'^sluice_build_info\{version="[^"]+"\} 1(\.0)?$', body, re.M), body
    before = _sum(body, "sluice_records_out_total")

    topic = new_topic(partitions=3)
    n = 200
    with Producer(d.socket_path, client_name="test-metrics") as p:
        futures = [p.send(topic, b"m%d" % i, b"k%d" % i) for i in range(n)]
        for f in futures:
            f.result(20)
    # The workers report once a second; the next scrapes must show every delivered record.
    deadline = time.monotonic() + 6
    while True:
        after = _sum(_scrape(port)[0], "sluice_records_out_total")
        if after >= before + n or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert after >= before + n, f"sluice_records_out_total went {before} -> {after} after {n} records"

    time.sleep(max(0.0, 2.5 - (time.monotonic() - notify.messages[ready].at)))  # 2+ ping periods
    assert _pings(notify) == [], "watchdog pings although WATCHDOG_PID names another process"
    assert d.stop() == 0


# --- access -----------------------------------------------------------------------------------


def test_allow_list_refuses_our_client(service) -> None:
    other = os.getuid() + 4242
    d, notify = service(daemon={"allowed_uids": [other]})
    _wait_ready(d, notify)  # its own socket-ingest connection is not subject to the list
    log_at = len(d.log())
    with pytest.raises(SluiceError, match="not allowed") as info:
        Producer(d.socket_path, client_name="test-refused", connect_timeout=5)
    assert str(other) not in str(info.value), "the refusal must not reveal the allow-list"
    line = d.wait_log("refused", after=log_at, timeout=5)
    assert f"uid {os.getuid()}" in line and str(other) in line, line
    out = subprocess.run([SLUICE, "stats", "--socket", d.socket_path], capture_output=True, text=True, timeout=15)
    assert out.returncode != 0 and "NOT_ALLOWED" in out.stderr, out
    assert d.stop() == 0


def _client_as(uid: int, gid: int, socket_path: str, topic: str, timeout: float = 30.0) -> tuple[str, str]:
    """Fork a client that switches to ``uid``/``gid`` before it connects (SO_PEERCRED records
    the credentials at connect) and sends one record; returns (outcome, detail) with outcome
    ok / refused / nosetuid / error."""
    r, w = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns on fork with threads alive; the child only uses its own new
        # socket, memfd and threads, then leaves with os._exit.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        outcome, detail = "error", ""
        try:
            os.close(r)
            try:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
            except OSError as exc:
                outcome, detail = "nosetuid", str(exc)
            else:
                try:
                    with Producer(socket_path, client_name=f"test-uid-{uid}", connect_timeout=5) as p:
                        meta = p.send(topic, b"from uid %d" % uid).result(20)
                    outcome, detail = "ok", f"{meta.partition}:{meta.offset}"
                except SluiceError as exc:
                    outcome, detail = "refused", str(exc)
                except BaseException as exc:  # noqa: BLE001 - reported to the parent
                    outcome, detail = "error", repr(exc)
            os.write(w, f"{outcome}\n{detail}".encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], timeout)
        data = os.read(r, 65536).decode() if ready else ""
    finally:
        os.close(r)
        if not data:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    if not data:
        raise AssertionError(f"client as uid {uid} did not finish within {timeout}s")
    outcome, _, detail = data.partition("\n")
    return outcome, detail


def test_allow_list_with_another_user(service, new_topic, read_topic) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the client is switched to uid 65534 (nobody) with setuid")
    topic = new_topic(partitions=1)
    # Mode 0666 in a 0755 directory: the file mode lets nobody in, so the allow-list decides.
    d, notify = service(daemon={"allowed_uids": [0], "socket_mode": "0666"})
    _wait_ready(d, notify)
    log_at = len(d.log())
    outcome, detail = _client_as(NOBODY, NOBODY, d.socket_path, topic)
    if outcome == "nosetuid":
        pytest.skip(f"setuid to {NOBODY} is not permitted here: {detail}")
    assert outcome == "refused" and "not allowed" in detail, (outcome, detail)
    line = d.wait_log("refused", after=log_at, timeout=5)
    assert f"uid {NOBODY}" in line, line

    # allowed_uids is live: after SIGHUP the same user is let in and its record is delivered.
    bootstrap = _bootstrap_of(d)
    line, _ = _reload(d, notify, config_toml(d.socket_path, bootstrap,
                                             daemon={"allowed_uids": [0, NOBODY], "socket_mode": "0666"}))
    assert "daemon.allowed_uids" in line, line
    outcome, detail = _client_as(NOBODY, NOBODY, d.socket_path, topic)
    assert outcome == "ok", (outcome, detail)
    got = read_topic(topic, expected=1, timeout=20)
    assert [r.value for r in got] == [b"from uid %d" % NOBODY]
    assert f"0:{got[0].offset}" == detail
    assert d.stop() == 0
