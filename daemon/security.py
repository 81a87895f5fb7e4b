"""Security to the brokers: TLS contexts, secrets, OAUTHBEARER tokens, authentication errors.

Policies
    TLS
        TLS 1.2 or newer, the standard :mod:`ssl` module (uvloop runs it). The broker's
        certificate must chain to ``ssl_ca_location`` (or the system's trust store when unset);
        with ``ssl_endpoint_identification_algorithm = "https"`` (the default) it must also name
        the host the connection was opened to (the bootstrap entry, or the host a broker
        advertises). ``ssl_certificate_location``/``ssl_key_location`` add a client certificate
        (mutual TLS).
    Reloading certificates
        :meth:`TlsContexts.context` is asked for each new connection and builds a fresh
        :class:`ssl.SSLContext` when any of its files changed (size, mtime or inode: a renamed
        replacement counts), so renewed certificates and keys apply to the next connection
        without a restart, a SIGHUP included; open connections keep the session they have.
    Secrets
        Each secret has an inline key and a ``*_file`` key (:func:`read_secret`). A ``*_file``
        path that is relative is taken under ``$CREDENTIALS_DIRECTORY`` (systemd's
        ``LoadCredential=``); without that variable it is refused. Files are read each time a
        connection authenticates, so a rotated password needs no restart. One trailing newline is
        dropped. Inline secrets must sit in a config file only its owner can read
        (:mod:`daemon.config`).
    OAUTHBEARER tokens
        From ``sasl_oauthbearer_token_file`` or the standard output of
        ``sasl_oauthbearer_token_command`` (split like a shell would, run without one, at most
        30 s). A token is reused until 80 % of its lifetime has passed: the lifetime runs to its
        JWT ``exp`` claim, or ``sasl_oauthbearer_token_lifetime_ms`` when it has none.
    Errors
        Wrong credentials, a mechanism the listener does not enable, an untrusted certificate, a
        host name the certificate does not name, an unreadable secret: :class:`BrokerAuthError`,
        whose message names the broker and says which. It is not retriable; the connection pool
        stops connecting to that broker (:mod:`daemon.connection`), and at start-up the daemon
        exits with the message.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shlex
import ssl
import time

from daemon.config import KafkaSettings
from daemon.protocol import errors as ec
from shm.errors import KafkaError

__all__ = [
    "BrokerAuthError",
    "TlsContexts",
    "TokenSource",
    "read_secret",
    "describe_tls_error",
    "jwt_expiry_s",
]

# How long a token command may run before the token counts as unobtainable.
_TOKEN_COMMAND_TIMEOUT_S = 30.0
# A token is fetched again once this share of its lifetime has passed (as Kafka's Java client,
# sasl.login.refresh.window.factor).
_TOKEN_REFRESH_FACTOR = 0.8
# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
_HOSTNAME_MISMATCH_CODES = (62, 64)


class BrokerAuthError(KafkaError):
    """Authentication to a broker failed in a way retrying cannot fix (TLS or SASL)."""

    code = ec.CODE_BY_NAME["SASL_AUTHENTICATION_FAILED"]
    name = "AUTHENTICATION_FAILED"
    retriable = False


def read_secret(inline: str, path: str, key: str) -> str:
    """The secret given inline, else read from ``path``, else "" (the module's Secrets policy).

    Raises:
        BrokerAuthError: the file cannot be read, or a relative path has no credentials directory.
    """
    if inline or not path:
        return inline
    if not os.path.isabs(path):
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if not creds:
            raise BrokerAuthError(f"{key} = {path!r} is relative, but $CREDENTIALS_DIRECTORY is not set "
                                  "(use an absolute path, or systemd's LoadCredential=)")
        path = os.path.join(creds, path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise BrokerAuthError(f"{key}: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return text[:-1] if text.endswith("\n") else text


def _signature(paths: list[str]) -> tuple[tuple[str, int, int, int], ...]:
    sig = []
    for p in paths:
        try:
            st = os.stat(p)
            sig.append((p, st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            sig.append((p, -1, -1, -1))
    return tuple(sig)


class TlsContexts:
    """The client :class:`ssl.SSLContext` for one ``[kafka]`` section, rebuilt when files change."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self._ctx: ssl.SSLContext | None = None
        self._sig: tuple[tuple[str, int, int, int], ...] = ()
        self.builds = 0

    def _files(self) -> list[str]:
        s = self.settings
        files = [s.ssl_ca_location, s.ssl_certificate_location, s.ssl_key_location]
        if s.ssl_key_password_file and os.path.isabs(s.ssl_key_password_file):
            files.append(s.ssl_key_password_file)
        return [f for f in files if f]

    def context(self) -> ssl.SSLContext:
        """The context for a new connection (built again if a file changed since the last one).

        Raises:
            BrokerAuthError: a file cannot be loaded (missing, not PEM, wrong key password).
        """
        sig = _signature(self._files())
        if self._ctx is None or sig != self._sig:
            self._ctx = self._build()
            self._sig = sig
            self.builds += 1
        return self._ctx

    def _build(self) -> ssl.SSLContext:
        s = self.settings
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            if s.ssl_ca_location:
                ctx.load_verify_locations(cafile=s.ssl_ca_location)
        except (OSError, ssl.SSLError) as exc:
            raise BrokerAuthError(f"ssl_ca_location: cannot load {s.ssl_ca_location}: {exc}") from None
        ctx.check_hostname = s.ssl_endpoint_identification_algorithm == "https"
        ctx.verify_mode = ssl.CERT_REQUIRED
        if s.ssl_certificate_location:
            password = read_secret(s.ssl_key_password, s.ssl_key_password_file, "ssl_key_password_file")
            try:
                ctx.load_cert_chain(s.ssl_certificate_location, s.ssl_key_location or None,
                                    password=password or None)
            except (OSError, ssl.SSLError) as exc:
                raise BrokerAuthError(
                    f"cannot load the client certificate {s.ssl_certificate_location}"
                    f"{' / key ' + s.ssl_key_location if s.ssl_key_location else ''}: {exc}"
                    " (a wrong ssl_key_password reads as a bad decrypt)"
                ) from None
        return ctx


def describe_tls_error(exc: ssl.SSLError, host: str, client_cert: bool = True) -> str:
    """A sentence saying what a TLS failure means for the operator (``client_cert``: one was sent)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code in _HOSTNAME_MISMATCH_CODES:
            return (f"TLS: the broker's certificate does not name {host!r} (hostname mismatch: "
                    f"{exc.verify_message}; ssl_endpoint_identification_algorithm = https)")
        return (f"TLS: the broker's certificate is not trusted ({exc.verify_message}; "
                "check ssl_ca_location)")
    reason = getattr(exc, "reason", None) or str(exc)
    if "CERTIFICATE_REQUIRED" in str(reason).upper() or "CERTIFICATE REQUIRED" in str(exc).upper():
        return "TLS: the broker requires a client certificate (set ssl_certificate_location, ssl_key_location)"
    if "UNKNOWN_CA" in str(reason).upper() or "BAD_CERTIFICATE" in str(reason).upper():
        if not client_cert:
            return ("TLS: the broker requires a client certificate (mutual TLS: set "
                    f"ssl_certificate_location and ssl_key_location; {reason})")
        return f"TLS: the broker refused the client certificate ({reason})"
    return f"TLS handshake failed ({reason})"


def jwt_expiry_s(token: str) -> float | None:
    """The ``exp`` claim (seconds since the epoch) of a JWT, or None if it has none or is no JWT."""
    parts = token.split(".")
    if len(parts) < 2:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, TypeError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None


class TokenSource:
    """OAUTHBEARER tokens for one ``[kafka]`` section, fetched again before they expire."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self._token = ""
        self._refresh_at = 0.0
        self.fetches = 0

    async def token(self) -> str:
        """A token with at least a fifth of its lifetime left (see the module docstring).

        Raises:
            BrokerAuthError: the file cannot be read, the command fails, or the token is empty.
        """
        now = time.time()
        if self._token and now < self._refresh_at:
            return self._token
        s = self.settings
        if s.sasl_oauthbearer_token_file:
            token = read_secret("", s.sasl_oauthbearer_token_file, "sasl_oauthbearer_token_file").strip()
        else:
            token = await _run_token_command(s.sasl_oauthbearer_token_command)
        if not token:
            raise BrokerAuthError("OAUTHBEARER: the token is empty")
        exp = jwt_expiry_s(token)
        if exp is not None and exp <= now:
            raise BrokerAuthError(f"OAUTHBEARER: the token expired {now - exp:.0f}s ago (its exp claim)")
        lifetime = (exp - now) if exp is not None else s.sasl_oauthbearer_token_lifetime_ms / 1000.0
        self._token = token
        self._refresh_at = now + lifetime * _TOKEN_REFRESH_FACTOR
        self.fetches += 1
        return token


async def _run_token_command(command: str) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            *shlex.split(command), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
    except (OSError, ValueError) as exc:
        raise BrokerAuthError(f"sasl_oauthbearer_token_command: cannot run {command!r}: {exc}") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), _TOKEN_COMMAND_TIMEOUT_S)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise BrokerAuthError(
            f"sasl_oauthbearer_token_command: no token within {_TOKEN_COMMAND_TIMEOUT_S:.0f}s"
        ) from None
    if proc.returncode:
        tail = err.decode(errors="replace").strip()[-300:]
        raise BrokerAuthError(f"sasl_oauthbearer_token_command exited {proc.returncode}: {tail}")
    return out.decode(errors="replace").strip()
