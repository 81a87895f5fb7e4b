"""The security pieces without a broker: config rules and the secrets policy, the SASL codecs,
SCRAM against RFC 7677's test vector, secrets from files and systemd credentials, OAUTHBEARER
token refresh, and TLS contexts rebuilt when their files change."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon import sasl
from daemon.config import ConfigError, KafkaSettings, load, loads
from daemon.protocol import messages as m
from daemon.protocol.primitives import Reader
from daemon.security import BrokerAuthError, TlsContexts, TokenSource, jwt_expiry_s, read_secret

SCRAM_OK = """
[kafka]
security_protocol = "sasl_ssl"
sasl_mechanism = "scram-sha-512"
sasl_username = "alice"
sasl_password_file = "sasl-password"
"""


def test_security_keys_load_under_kafka_names_case_insensitively() -> None:
    k = loads(SCRAM_OK).kafka
    assert (k.security_protocol, k.sasl_mechanism, k.sasl_password_file) == ("SASL_SSL", "SCRAM-SHA-512",
                                                                            "sasl-password")
    assert k.uses_tls() and k.uses_sasl() and k.ssl_endpoint_identification_algorithm == "https"
    off = loads('[kafka]\nsecurity_protocol = "SSL"\nssl_endpoint_identification_algorithm = ""\n').kafka
    assert off.ssl_endpoint_identification_algorithm == "none"


@pytest.mark.parametrize(
    ("table", "key", "words"),
    [
        ('ssl_ca_location = "/ca.pem"', "kafka.ssl_ca_location", "does not use TLS"),
        ('security_protocol = "SSL"\nsasl_mechanism = "PLAIN"', "kafka.sasl_mechanism", "does not use SASL"),
        ('security_protocol = "SASL_SSL"', "kafka.sasl_mechanism", "is required"),
        ('security_protocol = "SASL_SSL"\nsasl_mechanism = "PLAIN"\nsasl_password = "x"', "kafka.sasl_username",
         "is required"),
        ('security_protocol = "SASL_SSL"\nsasl_mechanism = "PLAIN"\nsasl_username = "a"', "kafka.sasl_password",
         "is required"),
        ('security_protocol = "SASL_SSL"\nsasl_mechanism = "PLAIN"\nsasl_username = "a"\nsasl_password = "x"\n'
         'sasl_password_file = "/p"', "kafka.sasl_password_file", "both set"),
        ('security_protocol = "SASL_SSL"\nsasl_mechanism = "OAUTHBEARER"', "kafka.sasl_oauthbearer_token_file",
         "exactly one"),
        ('security_protocol = "SASL_SSL"\nsasl_mechanism = "OAUTHBEARER"\nsasl_oauthbearer_token_file = "/t"\n'
         'sasl_username = "a"', "kafka.sasl_username", "does not apply to OAUTHBEARER"),
        ('security_protocol = "SSL"\nssl_key_location = "/k.pem"', "kafka.ssl_key_location",
         "without ssl_certificate_location"),
        ('security_protocol = "SSL"\nssl_key_password = "x"', "kafka.ssl_key_password", "no client key"),
        ('security_protocol = "TLS"', "kafka.security_protocol", "'TLS' is not one of PLAINTEXT, SSL"),
        ('security_protocol = "SASL_SSL"\nsasl_mechanism = "GSSAPI"', "kafka.sasl_mechanism",
         "'GSSAPI' is not one of PLAIN, SCRAM-SHA-256"),
    ],
)
def test_bad_security_combinations_are_refused_naming_the_key(table: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        loads(f"[kafka]\n{table}\n", source="x.toml")
    assert f"x.toml: {key}:" in str(err.value) and words in str(err.value)


def test_check_config_reports_a_bad_combination(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[kafka]\nsecurity_protocol = "SASL_SSL"\n')
    out = subprocess.run([sys.executable, "-m", "daemon", "check-config", str(path)], capture_output=True, text=True,
                         check=False, timeout=60)
    assert out.returncode == 78
    assert "kafka.sasl_mechanism: is required with security_protocol = SASL_SSL" in out.stderr


def test_inline_secret_needs_a_file_only_its_owner_reads(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(SCRAM_OK.replace('sasl_password_file = "sasl-password"', 'sasl_password = "pw"'))
    for mode in (0o644, 0o640, 0o604):
        os.chmod(path, mode)
        with pytest.raises(ConfigError, match=f"kafka.sasl_password: .*readable by other users \\(mode {mode:04o}\\)"):
            load(path)
    os.chmod(path, 0o600)
    assert load(path).kafka.sasl_password == "pw"
    # A secret in a file of its own is fine in a world-readable config.
    path.write_text(SCRAM_OK)
    os.chmod(path, 0o644)
    assert load(path).kafka.sasl_password_file == "sasl-password"


def test_secret_files_absolute_relative_to_credentials_and_trailing_newline(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    assert read_secret("inline", str(tmp_path / "pw"), "k") == "inline"
    assert read_secret("", str(tmp_path / "pw"), "k") == "s3cret"
    assert read_secret("", "", "k") == ""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(BrokerAuthError, match="relative, but \\$CREDENTIALS_DIRECTORY is not set"):
        read_secret("", "pw", "sasl_password_file")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_secret("", "pw", "sasl_password_file") == "s3cret"
    with pytest.raises(BrokerAuthError, match="sasl_password_file: cannot read .*missing"):
        read_secret("", "missing", "sasl_password_file")


def test_scram_sha_256_matches_rfc_7677() -> None:
    s = sasl.Scram("SCRAM-SHA-256", "user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
    assert s.start() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    final = s.step(b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
    assert final == (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                     b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    assert s.step(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=") is None


def test_scram_refuses_a_server_that_does_not_know_the_password_or_cheats() -> None:
    server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    s = sasl.Scram("SCRAM-SHA-256", "user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
    s.start()
    s.step(server_first)
    with pytest.raises(sasl.SaslError, match="does not verify"):
        s.step(b"v=" + base64.b64encode(b"\0" * 32))
    other = sasl.Scram("SCRAM-SHA-256", "user", "pencil", nonce="abc")
    with pytest.raises(sasl.SaslError, match="nonce"):
        other.step(server_first)
    weak = sasl.Scram("SCRAM-SHA-512", "user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
    with pytest.raises(sasl.SaslError, match="iteration count 1 is outside"):
        weak.step(server_first.replace(b"i=4096", b"i=1"))
    stall = sasl.Scram("SCRAM-SHA-512", "user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
    with pytest.raises(sasl.SaslError, match="iteration count 10000000 is outside"):
        stall.step(server_first.replace(b"i=4096", b"i=10000000"))


def test_scram_escapes_the_username_and_uses_a_fresh_nonce() -> None:
    a, b = sasl.Scram("SCRAM-SHA-512", "a=b,c", "p"), sasl.Scram("SCRAM-SHA-512", "a=b,c", "p")
    assert a.start().startswith(b"n,,n=a=3Db=2Cc,r=") and a.start() != b.start()


def test_plain_and_oauthbearer_messages() -> None:
    assert sasl.Plain("alice", "pw").start() == b"\0alice\0pw"
    o = sasl.OAuthBearer("tok")
    assert o.start() == b"n,,\x01auth=Bearer tok\x01\x01"
    assert o.step(b'{"status":"invalid_token"}') == b"\x01" and "invalid_token" in o.server_error
    assert sasl.OAuthBearer("tok").step(b"") is None


def test_sasl_codecs_round_trip() -> None:
    frame = m.encode_sasl_handshake_request(1, 7, "sluice", "SCRAM-SHA-512")
    header, mechanism = m.decode_sasl_handshake_request(frame[4:])
    assert (header.api_key, header.api_version, header.correlation_id, mechanism) == (17, 1, 7, "SCRAM-SHA-512")
    resp = m.SaslHandshakeResponse(33, ["PLAIN", "OAUTHBEARER"])
    body = m.encode_sasl_handshake_response(7, 1, resp)[4:]
    h = m.decode_response_header(body, m.response_header_version(m.SASL_HANDSHAKE))
    assert m.decode_sasl_handshake_response(body[h.body_offset:], 1) == resp

    frame = m.encode_sasl_authenticate_request(2, 8, "sluice", b"\0a\0b")
    header, auth = m.decode_sasl_authenticate_request(frame[4:])
    assert (header.api_key, header.api_version, auth) == (36, 2, b"\0a\0b")
    resp2 = m.SaslAuthenticateResponse(0, None, b"v=xyz", 20_000)
    body = m.encode_sasl_authenticate_response(8, 2, resp2)[4:]
    h = m.decode_response_header(body, m.response_header_version(m.SASL_AUTHENTICATE))
    assert m.decode_sasl_authenticate_response(body[h.body_offset:], 2) == resp2
    # The handshake request has header v1: no tagged-fields byte before the mechanism.
    r = Reader(m.encode_sasl_handshake_request(1, 7, None, "PLAIN")[4:])
    r.int16(), r.int16(), r.int32()
    assert r.string() is None and r.string() == "PLAIN"


def _jwt(exp: float | None) -> str:
    claims = {"sub": "x"} if exp is None else {"sub": "x", "exp": int(exp)}
    enc = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJub25lIn0.{enc}."


def test_tokens_are_refetched_before_they_expire(tmp_path: Path) -> None:
    path = tmp_path / "token"
    settings = KafkaSettings(security_protocol="SASL_SSL", sasl_mechanism="OAUTHBEARER",
                             sasl_oauthbearer_token_file=str(path))
    source = TokenSource(settings)
    assert jwt_expiry_s(_jwt(1234)) == 1234 and jwt_expiry_s("opaque") is None
    path.write_text(_jwt(time.time() + 3600))
    first = asyncio.run(source.token())
    path.write_text(_jwt(time.time() + 7200))
    assert asyncio.run(source.token()) == first  # far from expiry: reused
    path.write_text(_jwt(time.time() + 2))
    short = TokenSource(settings)
    asyncio.run(short.token())
    time.sleep(1.7)  # past 80 % of its 2 s
    path.write_text(_jwt(time.time() + 3600))
    assert asyncio.run(short.token()) != first and short.fetches == 2
    path.write_text(_jwt(time.time() - 5))
    with pytest.raises(BrokerAuthError, match="expired"):
        asyncio.run(TokenSource(settings).token())


def test_token_command_output_and_failure(tmp_path: Path) -> None:
    ok = KafkaSettings(security_protocol="SASL_SSL", sasl_mechanism="OAUTHBEARER",
                       sasl_oauthbearer_token_command=f"{sys.executable} -c \"print('abc.def.')\"")
    assert asyncio.run(TokenSource(ok).token()) == "abc.def."
    bad = KafkaSettings(security_protocol="SASL_SSL", sasl_mechanism="OAUTHBEARER",
                        sasl_oauthbearer_token_command=f"{sys.executable} -c \"import sys; sys.exit('no idp')\"")
    with pytest.raises(BrokerAuthError, match="exited 1: no idp"):
        asyncio.run(TokenSource(bad).token())


def test_tls_context_is_rebuilt_when_a_file_changes(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(tmp_path / "k"), "-out", str(ca), "-days", "1", "-subj", "/CN=t"],
                   check=True, capture_output=True, timeout=60)
    tls = TlsContexts(KafkaSettings(security_protocol="SSL", ssl_ca_location=str(ca)))
    first = tls.context()
    assert tls.context() is first and first.check_hostname
    replacement = tmp_path / "new.pem"
    replacement.write_bytes(ca.read_bytes())
    os.replace(replacement, ca)  # a renewed file: a new inode
    assert tls.context() is not first and tls.builds == 2
    ca.write_text("not a certificate")
    with pytest.raises(BrokerAuthError, match="ssl_ca_location: cannot load"):
        tls.context()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_credentials_dropin_verifies_and_its_names_are_the_documented_ones(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    dropin = (root / "systemd" / "credentials.conf").read_text()
    unit = tmp_path / "sluice.service"
    unit.write_text((root / "systemd" / "sluice.service").read_text()
                    .replace("/opt/sluice/bin/sluice", sys.executable))
    (tmp_path / "sluice.service.d").mkdir()
    (tmp_path / "sluice.service.d" / "credentials.conf").write_text(dropin)
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60,
                          check=False, env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})
    ours = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "credentials.conf" in ln]
    assert ours == [], ours
    names = [line.split("=", 1)[1].split(":", 1)[0] for line in dropin.splitlines()
             if line.startswith("LoadCredential=")]
    assert names == ["kafka-sasl-password", "kafka-ssl-key-password"]
    for name in names:  # the config keys the comment shows read these names
        assert f'_file = "{name}"' in dropin


def test_a_mechanism_the_listener_lacks_is_a_clear_error() -> None:
    """A broker double (our codec's server side) that enables PLAIN only: asking for SCRAM fails
    at once with the mechanisms it offers, naming the broker; nothing is retried."""
    from daemon.connection import ConnectionPool

    handshakes: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await answer(reader, writer)
        finally:
            writer.close()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                size = int.from_bytes(await reader.readexactly(4), "big")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            body = await reader.readexactly(size)
            api_key = int.from_bytes(body[:2], "big")
            if api_key == m.API_VERSIONS:
                h, _ = m.decode_api_versions_request(body)
                ranges = [m.ApiVersionRange(k, 0, hi) for k, (_, hi) in m.SUPPORTED_VERSIONS.items()]
                writer.write(m.encode_api_versions_response(h.correlation_id, h.api_version,
                                                            m.ApiVersionsResponse(0, ranges)))
            else:
                h, mechanism = m.decode_sasl_handshake_request(body)
                handshakes.append(mechanism)
                writer.write(m.encode_sasl_handshake_response(h.correlation_id, 1,
                                                              m.SaslHandshakeResponse(33, ["PLAIN"])))
            await writer.drain()

    async def main() -> str:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = ConnectionPool(KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}", security_protocol="SASL_PLAINTEXT",
                                            sasl_mechanism="SCRAM-SHA-256", sasl_username="u", sasl_password="p"))
        try:
            with pytest.raises(BrokerAuthError) as err:
                await pool.control_connection()
            return str(err.value)
        finally:
            pool.close(-1)
            await asyncio.sleep(0.1)  # the double sees the hang-up and closes its side
            server.close()
            await server.wait_closed()

    message = asyncio.run(main())
    assert handshakes == ["SCRAM-SHA-256"]
    assert message.startswith("bootstrap server 127.0.0.1:")
    assert ("SASL mechanism SCRAM-SHA-256 is not enabled on this listener "
            "(UNSUPPORTED_SASL_MECHANISM; it offers: PLAIN)") in message
