"""SASL client mechanisms for broker connections: PLAIN, SCRAM-SHA-256/512, OAUTHBEARER. No I/O.

A mechanism is a small state machine: :meth:`Mechanism.start` gives the first client message,
:meth:`Mechanism.step` takes each server message and gives the next client message, or None
once the exchange is complete on the client's side. :mod:`daemon.connection` carries the
messages in SaslAuthenticate requests; a broker's refusal arrives there as an error code, and
a server message this side cannot accept (a SCRAM server signature that does not verify, a
nonce the client never sent) raises :class:`SaslError` here.

SCRAM (RFC 5802, RFC 7677 for SHA-256; Kafka's SCRAM-SHA-512 is the same with SHA-512)
    No channel binding (``n,,``); the client nonce is 24 random bytes from :mod:`secrets`; the
    server's iteration count must lie within Kafka's own bounds, 4096 to 16384: fewer would make
    a captured exchange cheap to attack, more would let a hostile server stall the worker's
    event loop in PBKDF2 (4096 rounds of SHA-512 take a few milliseconds). The server's final
    signature is verified, so a server that does not know the password is detected.
    Server-first extensions are ignored.

OAUTHBEARER (RFC 7628)
    ``n,,\\x01auth=Bearer TOKEN\\x01\\x01``. A broker that refuses the token first sends a JSON
    error as its challenge; the client answers ``\\x01`` (as the RFC asks) and the broker then
    fails the exchange with SASL_AUTHENTICATION_FAILED. The JSON is kept for the error message.
    Where tokens come from and when they are refetched is :class:`daemon.security.TokenSource`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

__all__ = ["SaslError", "Mechanism", "Plain", "Scram", "OAuthBearer", "SCRAM_MIN_ITERATIONS", "SCRAM_MAX_ITERATIONS"]

# Kafka refuses SCRAM credentials with fewer or more iterations; a server asking otherwise is
# not Kafka.
SCRAM_MIN_ITERATIONS = 4096
SCRAM_MAX_ITERATIONS = 16384
_SCRAM_NONCE_BYTES = 24
_SCRAM_HASHES = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}
_GS2_HEADER = b"n,,"


class SaslError(Exception):
    """A server message this client cannot accept; the text says which and why."""


class Mechanism:
    """One authentication exchange (a new object per connection and per re-authentication)."""

    name = ""

    def start(self) -> bytes:
        """The client's first message."""
        raise NotImplementedError

    def step(self, challenge: bytes) -> bytes | None:
        """The next client message for the server's ``challenge``; None when done."""
        raise NotImplementedError


class Plain(Mechanism):
    """PLAIN (RFC 4616): one message, ``\\0user\\0password``; the broker's answer is empty."""

    name = "PLAIN"

    def __init__(self, username: str, password: str) -> None:
        self._message = b"\0" + username.encode() + b"\0" + password.encode()

    def start(self) -> bytes:  # noqa: D102
        return self._message

    def step(self, challenge: bytes) -> bytes | None:  # noqa: D102
        return None


def _saslname(username: str) -> str:
    return username.replace("=", "=3D").replace(",", "=2C")


def _attributes(message: bytes) -> dict[str, str]:
    try:
        text = message.decode()
    except UnicodeDecodeError:
        raise SaslError("SCRAM server message is not UTF-8") from None
    attrs: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if sep and len(key) == 1:
            attrs.setdefault(key, value)
    return attrs


class Scram(Mechanism):
    """SCRAM-SHA-256 or SCRAM-SHA-512: client-first, client-final, then the server's proof."""

    def __init__(self, mechanism: str, username: str, password: str, nonce: str | None = None) -> None:
        if mechanism not in _SCRAM_HASHES:
            raise ValueError(f"not a SCRAM mechanism: {mechanism}")
        self.name = mechanism
        self._hash = _SCRAM_HASHES[mechanism]
        self._password = password.encode()
        self._nonce = nonce or base64.b64encode(secrets.token_bytes(_SCRAM_NONCE_BYTES)).decode()
        self._first_bare = f"n={_saslname(username)},r={self._nonce}".encode()
        self._server_signature: bytes | None = None

    def _hmac(self, key: bytes, msg: bytes) -> bytes:
        return hmac.new(key, msg, self._hash).digest()

    def start(self) -> bytes:  # noqa: D102
        return _GS2_HEADER + self._first_bare

    def step(self, challenge: bytes) -> bytes | None:  # noqa: D102
        if self._server_signature is None:
            return self._client_final(challenge)
        attrs = _attributes(challenge)
        if "e" in attrs:
            raise SaslError(f"SCRAM server error: {attrs['e']}")
        try:
            signature = base64.b64decode(attrs.get("v", ""), validate=True)
        except ValueError:
            raise SaslError("SCRAM server-final message has no valid signature") from None
        if not hmac.compare_digest(signature, self._server_signature):
            raise SaslError("SCRAM server signature does not verify: the broker does not know the password")
        return None

    def _client_final(self, server_first: bytes) -> bytes:
        attrs = _attributes(server_first)
        if "e" in attrs:
            raise SaslError(f"SCRAM server error: {attrs['e']}")
        nonce = attrs.get("r", "")
        if not nonce.startswith(self._nonce) or len(nonce) <= len(self._nonce):
            raise SaslError("SCRAM server nonce does not extend the client's")
        try:
            salt = base64.b64decode(attrs["s"], validate=True)
            iterations = int(attrs["i"])
        except (KeyError, ValueError):
            raise SaslError("SCRAM server-first message lacks a valid salt or iteration count") from None
        if not SCRAM_MIN_ITERATIONS <= iterations <= SCRAM_MAX_ITERATIONS:
            raise SaslError(f"SCRAM iteration count {iterations} is outside Kafka's "
                            f"{SCRAM_MIN_ITERATIONS}..{SCRAM_MAX_ITERATIONS}")
        salted = hashlib.pbkdf2_hmac(self._hash, self._password, salt, iterations)
        client_key = self._hmac(salted, b"Client Key")
        stored_key = hashlib.new(self._hash, client_key).digest()
        without_proof = b"c=" + base64.b64encode(_GS2_HEADER) + b",r=" + nonce.encode()
        auth_message = self._first_bare + b"," + server_first + b"," + without_proof
        client_signature = self._hmac(stored_key, auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, client_signature, strict=True))
        self._server_signature = self._hmac(self._hmac(salted, b"Server Key"), auth_message)
        return without_proof + b",p=" + base64.b64encode(proof)


class OAuthBearer(Mechanism):
    """OAUTHBEARER with a token obtained beforehand (:class:`daemon.security.TokenSource`)."""

    name = "OAUTHBEARER"

    def __init__(self, token: str) -> None:
        self._token = token
        self.server_error = ""

    def start(self) -> bytes:  # noqa: D102
        return _GS2_HEADER + b"\x01auth=Bearer " + self._token.encode() + b"\x01\x01"

    def step(self, challenge: bytes) -> bytes | None:  # noqa: D102
        if challenge and not self.server_error:
            # The broker's error JSON ({"status": "invalid_token", ...}): acknowledge it, and the
            # broker fails the exchange.
            self.server_error = challenge.decode(errors="replace")
            return b"\x01"
        return None
