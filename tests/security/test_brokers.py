"""Sluice against a real Kafka node with TLS and SASL listeners (``KAFKA_SECURITY=1``).

Each mechanism delivers records through a real daemon, and confluent-kafka, configured with the
same security settings, reads them back: every value once, at the offset the daemon reported.
Mutual TLS works with a client certificate whose key is encrypted; a wrong password, an
untrusted CA, a host name the certificate does not name and a missing client certificate each
stop the daemon at start-up with a message that names the broker and the cause; an inline
password in a config file other users can read is refused before anything connects.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_fixture import SluiceDaemon

from bench.daemon_process import config_toml, short_tmpdir
from daemon.config import EXIT_CONFIG
from shm import Producer

pytestmark = [pytest.mark.integration]

# How long a daemon with bad credentials may take to give up: one attempt, no retry loop.
_FAIL_FAST_S = 15.0


def _unsecured_jwt(sub: str, lifetime_s: int) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    now = int(time.time())
    return f"{part({'alg': 'none'})}.{part({'sub': sub, 'iat': now, 'exp': now + lifetime_s})}."


def _secret_file(workdir: str, name: str, secret: str) -> str:
    path = os.path.join(workdir, name)
    Path(path).write_text(secret + "\n")
    os.chmod(path, 0o600)
    return path


def _kafka_table(case: str, c: dict[str, Any], workdir: str) -> dict[str, Any]:
    """The [kafka] table of one case, secrets in files (as an operator should)."""
    tls = {"ssl_ca_location": c["ca"]}
    password_file = _secret_file(workdir, "sasl-password", c["password"])
    user = {"sasl_username": c["username"], "sasl_password_file": password_file}
    if case == "mtls":
        return {"bootstrap_servers": c["ssl"], "security_protocol": "SSL", **tls,
                "ssl_certificate_location": c["client_cert"], "ssl_key_location": c["client_key"],
                "ssl_key_password_file": _secret_file(workdir, "key-password", c["client_key_password"])}
    if case == "oauthbearer":
        # A token command: the daemon runs it for each token it needs.
        script = os.path.join(workdir, "mint_jwt.py")
        Path(script).write_text(
            "import base64, json, time\n"
            "def p(o): return base64.urlsafe_b64encode(json.dumps(o).encode()).rstrip(b'=').decode()\n"
            "n = int(time.time())\n"
            "print(p({'alg': 'none'}) + '.' + p({'sub': 'sluice', 'iat': n, 'exp': n + 3600}) + '.')\n"
        )
        return {"bootstrap_servers": c["sasl_ssl"], "security_protocol": "SASL_SSL", **tls,
                "sasl_mechanism": "OAUTHBEARER", "sasl_oauthbearer_token_command": f"{sys.executable} {script}"}
    if case == "plain-sasl-plaintext":
        return {"bootstrap_servers": c["sasl_plaintext"], "security_protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": "PLAIN", **user}
    mechanism = {"plain": "PLAIN", "scram-sha-256": "SCRAM-SHA-256", "scram-sha-512": "SCRAM-SHA-512"}[case]
    return {"bootstrap_servers": c["sasl_ssl"], "security_protocol": "SASL_SSL", **tls,
            "sasl_mechanism": mechanism, **user}


def _daemon(kafka: dict[str, Any], *, mode: int = 0o600, workdir: str | None = None) -> SluiceDaemon:
    workdir = workdir or short_tmpdir()
    d = SluiceDaemon(workdir, cwd=workdir)
    d.write_config(config_toml(d.socket_path, kafka.pop("bootstrap_servers"), workers=1,
                               daemon={"shutdown_timeout_ms": 10_000}, kafka=kafka))
    os.chmod(d.config_path, mode)
    return d


def _produce(socket_path: str, topic: str, n: int) -> list[tuple[int, int]]:
    with Producer(socket_path, client_name="security-test") as p:
        futs = [p.send(topic, b"v-%d" % i, b"k%d" % (i % 7)) for i in range(n)]
        return [(md.partition, md.offset) for md in (f.result(timeout=30) for f in futs)]


def _stop(d: SluiceDaemon) -> None:
    """SIGTERM; it must exit 0. Its directory (the secret files the reader needs too) stays
    until the test ends (:func:`_workdirs`)."""
    code = d.stop()
    assert code == 0, f"sluice exited with {code}:\n{d.log_tail()}"


@pytest.fixture(autouse=True)
def _workdirs(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Every short_tmpdir a test makes is removed when it ends."""
    import shutil

    import bench.daemon_process as dp

    made: list[str] = []
    real = dp.short_tmpdir

    def tracked(prefix: str = "sl-") -> str:
        path = real(prefix)
        made.append(path)
        return path

    monkeypatch.setitem(globals(), "short_tmpdir", tracked)
    yield
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize(
    "case", ["scram-sha-256", "scram-sha-512", "plain", "plain-sasl-plaintext", "oauthbearer", "mtls"]
)
def test_delivers_and_reads_back(case: str, secure_kafka, secure_topic, secure_reader) -> None:
    topic = secure_topic()
    workdir = short_tmpdir()
    kafka = _kafka_table(case, secure_kafka, workdir)
    reader_settings = dict(kafka)
    d = _daemon(dict(kafka), workdir=workdir).start()
    try:
        n = 300
        placed = _produce(d.socket_path, topic, n)
    finally:
        _stop(d)
    got = secure_reader(reader_settings, topic, n)
    assert sorted(m.value() for m in got) == sorted(b"v-%d" % i for i in range(n))
    assert sorted((m.partition(), m.offset()) for m in got) == sorted(placed)


def test_inline_password_needs_a_private_config_file(secure_kafka, secure_topic, secure_reader) -> None:
    c = secure_kafka
    kafka = {"bootstrap_servers": c["sasl_ssl"], "security_protocol": "SASL_SSL", "ssl_ca_location": c["ca"],
             "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": c["username"], "sasl_password": c["password"]}
    loose = _daemon(dict(kafka), mode=0o644)
    loose.start(wait=False)
    assert loose.proc is not None and loose.proc.wait(timeout=_FAIL_FAST_S) == EXIT_CONFIG
    assert "readable by other users (mode 0644)" in loose.log() and "sasl_password" in loose.log()

    topic = secure_topic()
    d = _daemon(dict(kafka), mode=0o600).start()
    try:
        placed = _produce(d.socket_path, topic, 50)
    finally:
        _stop(d)
    assert len(secure_reader(kafka, topic, 50)) == len(placed) == 50


def _start_fails(kafka: dict[str, Any]) -> str:
    d = _daemon(kafka)
    t0 = time.monotonic()
    d.start(wait=False)
    assert d.proc is not None
    try:
        code = d.proc.wait(timeout=_FAIL_FAST_S)
    except subprocess.TimeoutExpired:
        d.kill()
        raise AssertionError(f"sluice kept trying for {_FAIL_FAST_S}s instead of failing:\n{d.log_tail()}") from None
    assert code != 0
    assert time.monotonic() - t0 < _FAIL_FAST_S
    log = d.log()
    assert "not reachable yet" not in log, "an authentication failure was retried as a network one"
    return log


def test_wrong_password_fails_at_start_with_the_reason(secure_kafka) -> None:
    c = secure_kafka
    log = _start_fails({"bootstrap_servers": c["sasl_ssl"], "security_protocol": "SASL_SSL",
                        "ssl_ca_location": c["ca"], "sasl_mechanism": "SCRAM-SHA-256",
                        "sasl_username": c["username"],
                        "sasl_password_file": _secret_file(short_tmpdir(), "pw", "not-the-password")})
    assert f"bootstrap server {c['sasl_ssl']}: SASL SCRAM-SHA-256 authentication failed" in log
    assert "invalid credentials" in log


def test_expired_token_fails_at_start_with_the_reason(secure_kafka) -> None:
    c = secure_kafka
    token = _secret_file(short_tmpdir(), "token", _unsecured_jwt("sluice", -60))
    log = _start_fails({"bootstrap_servers": c["sasl_ssl"], "security_protocol": "SASL_SSL",
                        "ssl_ca_location": c["ca"], "sasl_mechanism": "OAUTHBEARER",
                        "sasl_oauthbearer_token_file": token})
    assert "OAUTHBEARER: the token expired" in log


def test_untrusted_ca_fails_at_start_with_the_reason(secure_kafka) -> None:
    c = secure_kafka
    log = _start_fails({"bootstrap_servers": c["ssl"], "security_protocol": "SSL", "ssl_ca_location": c["other_ca"],
                        "ssl_certificate_location": c["client_cert"], "ssl_key_location": c["client_key_plain"]})
    assert f"bootstrap server {c['ssl']}: TLS: the broker's certificate is not trusted" in log


def test_hostname_mismatch_fails_at_start_with_the_reason(secure_kafka) -> None:
    c = secure_kafka
    port = c["sasl_ssl"].rsplit(":", 1)[1]
    log = _start_fails({"bootstrap_servers": f"localhost:{port}", "security_protocol": "SASL_SSL",
                        "ssl_ca_location": c["ca"], "sasl_mechanism": "PLAIN", "sasl_username": c["username"],
                        "sasl_password_file": _secret_file(short_tmpdir(), "pw", c["password"])})
    assert "does not name 'localhost' (hostname mismatch" in log


def test_hostname_check_off_connects_by_another_name(secure_kafka, secure_topic, secure_reader) -> None:
    c = secure_kafka
    port = c["sasl_ssl"].rsplit(":", 1)[1]
    workdir = short_tmpdir()
    kafka = {"bootstrap_servers": f"localhost:{port}", "security_protocol": "SASL_SSL", "ssl_ca_location": c["ca"],
             "ssl_endpoint_identification_algorithm": "none", "sasl_mechanism": "PLAIN",
             "sasl_username": c["username"], "sasl_password_file": _secret_file(workdir, "pw", c["password"])}
    topic = secure_topic()
    d = _daemon(dict(kafka), workdir=workdir).start()
    try:
        placed = _produce(d.socket_path, topic, 20)
    finally:
        _stop(d)
    assert len(secure_reader({**kafka, "bootstrap_servers": c["sasl_ssl"]}, topic, 20)) == len(placed)


def test_missing_client_certificate_fails_at_start_with_the_reason(secure_kafka) -> None:
    c = secure_kafka
    log = _start_fails({"bootstrap_servers": c["ssl"], "security_protocol": "SSL", "ssl_ca_location": c["ca"]})
    assert "TLS: the broker requires a client certificate" in log


def test_records_keep_flowing_across_sasl_session_ends(secure_kafka, secure_topic, secure_reader) -> None:
    """The broker ends SASL sessions after ``reauth_ms``; the daemon reconnects before each end
    (daemon/connection.py, Re-authentication), so a stream longer than two sessions loses and
    fails nothing."""
    c = secure_kafka
    reauth_s = c["reauth_ms"] / 1000.0
    if reauth_s <= 0 or reauth_s > 30:
        pytest.skip(f"the running secure node's SASL sessions last {reauth_s}s; this test needs a short one")
    workdir = short_tmpdir()
    kafka = _kafka_table("scram-sha-256", c, workdir)
    topic = secure_topic()
    d = _daemon(dict(kafka), workdir=workdir).start()
    sent = 0
    try:
        with Producer(d.socket_path, client_name="reauth-test") as p:
            futs = []
            end = time.monotonic() + reauth_s * 2.2
            while time.monotonic() < end:
                futs.append(p.send(topic, b"r-%d" % sent))
                sent += 1
                time.sleep(0.02)
            for f in futs:
                f.result(timeout=30)
        log = d.log()
    finally:
        _stop(d)
    assert log.count("nears its end; reconnecting to re-authenticate") >= 2, log[-3000:]
    got = secure_reader(kafka, topic, sent)
    assert sorted(m.value() for m in got) == sorted(b"r-%d" % i for i in range(sent))
