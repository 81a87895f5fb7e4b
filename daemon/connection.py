"""Broker connections: one TCP connection per broker, framing, correlation ids, reconnects.

asyncio (runs on uvloop). A :class:`Connection` knows nothing of batches: a request carries
either a future (control requests: ApiVersions, Metadata, InitProducerId) or an opaque
``context`` that goes back to a :class:`ConnectionListener` with the response, or with the
error code that failed it.

Connections
    One per broker (node id), opened on demand, each starting with ApiVersions; one version per
    API is pinned per connection (:func:`daemon.protocol.messages.pick_versions`). Requests are
    pipelined (the caller bounds the window with ``len(conn.outstanding)``); Kafka answers a
    connection's requests in order, so each response must carry the correlation id of the
    oldest request outstanding (anything else closes the connection). A connection that drops,
    or a request past its deadline (:meth:`ConnectionPool.expire_requests`), fails every request
    outstanding on it as retriable (NETWORK_EXCEPTION / REQUEST_TIMED_OUT) and the broker is
    reconnected after ``reconnect_backoff_ms`` doubling to ``reconnect_backoff_max_ms`` (with
    jitter).

A broker that throttles a client (``throttle_time_ms`` in a response) mutes the connection for
that long; :meth:`Connection.throttle` records until when, and the sender sends nothing new on
it before then (the connection itself does not queue or delay anything).

Security (``security_protocol``; policies in :mod:`daemon.security`)
    SSL and SASL_SSL connections are TLS from the first byte (``ssl=`` an SSLContext from
    :class:`~daemon.security.TlsContexts`, ``server_hostname`` the host connected to). SASL
    (SASL_PLAINTEXT, SASL_SSL) runs after ApiVersions and before the connection counts as ready:
    SaslHandshake v1 names the mechanism, then SaslAuthenticate v2 rounds carry the
    :mod:`daemon.sasl` exchange. A refusal (wrong password, a mechanism the listener does not
    enable, an expired token), an untrusted certificate or a host name mismatch is a
    :class:`~daemon.security.BrokerAuthError` naming the broker: the pool logs it as an error and
    stops connecting to that broker (retrying cannot fix credentials; a restart after the fix
    does); batches for it expire at their ``delivery_timeout_ms``. From the bootstrap connection
    the error reaches start-up, which exits with it. TLS failures that are not about
    certificates (EOF or reset during the handshake) stay retriable.

Re-authentication (KIP-368)
    When SaslAuthenticate answers a ``session_lifetime_ms`` (the broker's
    ``connections.max.reauth.ms``, or the token's expiry), the connection is *retired* at a
    random point between 80 % and 90 % of it: nothing new is sent on it, the requests in flight
    are answered, then it closes and the next request opens a fresh, freshly authenticated
    connection (no backoff, not counted as a reconnect). Sluice reconnects rather than
    re-authenticating in place, so a re-authentication never interleaves with pipelined
    Produce requests; the cost is one handshake per session lifetime.

Requests that get no response (Produce with acks=0) are written with
:meth:`Connection.send_unanswered`; their contexts come back from
:meth:`Connection.take_written` once the transport has written them out.

Counters written into the shared ``stats`` dict: ``in_flight`` (requests outstanding),
``protocol_errors``, ``reconnects``, ``brokers_auth_failed`` (brokers given up on after an
authentication failure).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from daemon import sasl
from daemon.config import KafkaSettings
from daemon.protocol import errors as ec
from daemon.protocol import messages as m
from daemon.security import BrokerAuthError, TlsContexts, TokenSource, describe_tls_error, read_secret
from shm.errors import KafkaError, ProtocolError

__all__ = [
    "BOOTSTRAP_NODE",
    "CONTROL_TIMEOUT_S",
    "Connection",
    "ConnectionListener",
    "ConnectionPool",
    "parse_hostport",
]

log = logging.getLogger(__name__)

# The node id of a connection to a bootstrap server, whose real node id is not known.
BOOTSTRAP_NODE = -1
# How long a control request (Metadata, InitProducerId) waits for its answer.
CONTROL_TIMEOUT_S = 10.0
_CLIENT_SOFTWARE = ("sluice", "0.1.0")
# A broker never sends a response this large; a bigger size means the stream is out of step.
_MAX_RESPONSE_BYTES = 128 * 1024 * 1024
# What a connection asks first, before it knows which ApiVersions versions the broker serves.
_API_VERSIONS_FALLBACK = 4
# A connection with a SASL session lifetime retires at a random point in this share of it.
_REAUTH_WINDOW = (0.8, 0.9)
# SSL errors whose reason means "these peers will never agree" (certificates, protocol
# versions), as opposed to a connection that broke during the handshake.
_RETRIABLE_SSL_ERRORS = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)


def _now_ms() -> float:
    return time.monotonic() * 1000.0


class ConnectionListener(Protocol):
    """What a connection reports back to (the sender implements it).

    Called synchronously from the transport's callbacks, so a listener sees a connection's
    events in the order they happened.
    """

    def on_response(self, conn: Connection, context: Any, body: memoryview) -> None:
        """The response ``body`` to the request sent with ``context``.

        A :class:`ProtocolError` raised here closes the connection.
        """

    def on_request_failed(self, context: Any, code: int) -> None:
        """The request sent with ``context`` will not be answered (connection lost: ``code``)."""

    def on_connection_lost(self, conn: Connection) -> None:
        """``conn`` is closed; every request on it has been failed already."""


class _Outstanding:
    """A request written to a connection and not answered yet."""

    __slots__ = ("correlation_id", "api_key", "deadline_ms", "future", "context")

    def __init__(self, correlation_id: int, api_key: int, deadline_ms: float,
                 future: asyncio.Future[memoryview] | None, context: Any) -> None:
        self.correlation_id = correlation_id
        self.api_key = api_key
        self.deadline_ms = deadline_ms
        self.future = future
        self.context = context


class Connection(asyncio.Protocol):
    """One TCP connection to one broker: framing, correlation ids, the in-flight list."""

    def __init__(self, listener: ConnectionListener, stats: dict[str, Any], node_id: int, host: str, port: int,
                 client_id: str) -> None:
        self.listener = listener
        self.stats = stats
        self.node_id = node_id
        self.host = host
        self.port = port
        self.client_id = client_id
        self.transport: asyncio.Transport | None = None
        self.versions: dict[int, int] = {}
        self._api_keys: list[m.ApiVersionRange] = []
        self.ready = False
        self.closed = False
        self.outstanding: deque[_Outstanding] = deque()
        # Contexts of requests that get no response, written but maybe still in the transport's
        # buffer: they count as sent only once the buffer is empty (take_written).
        self.unflushed: list[Any] = []
        self._buf = bytearray()
        self._next_correlation_id = 0
        # The broker mutes this connection until then (ms, the monotonic clock): see throttle().
        self.throttled_until_ms = 0.0
        # Retiring: its SASL session nears its end; nothing new is sent, it closes once drained.
        self.retiring = False
        # The TLS error that ended the connection, if one did (for the error message).
        self.tls_error: ssl.SSLError | None = None

    def describe(self) -> str:
        """``broker N (host:port)``, or ``bootstrap server host:port``, for messages."""
        if self.node_id == BOOTSTRAP_NODE:
            return f"bootstrap server {self.host}:{self.port}"
        return f"broker {self.node_id} ({self.host}:{self.port})"

    # asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # noqa: D102
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:  # noqa: D102
        buf = self._buf
        buf += data
        start = 0
        n = len(buf)
        try:
            while n - start >= 4:
                size = int.from_bytes(buf[start : start + 4], "big", signed=True)
                if size < 4 or size > _MAX_RESPONSE_BYTES:
                    raise ProtocolError(f"bad response size {size} from broker {self.node_id}")
                if n - start - 4 < size:
                    break
                frame_bytes = bytes(buf[start + 4 : start + 4 + size])
                start += 4 + size
                self._on_frame(frame_bytes)
        except ProtocolError as exc:
            log.warning("closing connection to broker %s (%s:%s): %s", self.node_id, self.host, self.port, exc)
            self.stats["protocol_errors"] += 1
            self.close(ec.NETWORK_EXCEPTION)
            return
        if start:
            del buf[:start]

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        if isinstance(exc, ssl.SSLError):
            self.tls_error = exc
        self._fail_all(ec.NETWORK_EXCEPTION)

    # ------------------------------------------------------------------------------------------

    def _on_frame(self, frame_bytes: bytes) -> None:
        if not self.outstanding:
            raise ProtocolError(f"unsolicited response from broker {self.node_id}")
        req = self.outstanding[0]
        header = m.decode_response_header(frame_bytes, m.response_header_version(req.api_key))
        if header.correlation_id != req.correlation_id:
            # Left in ``outstanding`` so the close that follows fails it like the others.
            raise ProtocolError(
                f"correlation id {header.correlation_id} from broker {self.node_id}, expected {req.correlation_id}"
            )
        self.outstanding.popleft()
        if self.retiring and not self.outstanding:
            asyncio.get_running_loop().call_soon(self.close)
        body = memoryview(frame_bytes)[header.body_offset :]
        self.stats["in_flight"] -= 1
        if req.future is not None:
            if not req.future.done():
                req.future.set_result(body)
        elif req.context is not None:
            self.listener.on_response(self, req.context, body)

    def _fail_all(self, code: int) -> None:
        if self.closed:
            return
        self.closed = True
        self.ready = False
        outstanding, self.outstanding = self.outstanding, deque()
        unflushed, self.unflushed = self.unflushed, []
        self.stats["in_flight"] -= len(outstanding)
        for req in outstanding:
            if req.future is not None:
                if not req.future.done():
                    req.future.set_exception(KafkaError.for_code(code, f"connection to broker {self.node_id} lost"))
            elif req.context is not None:
                self.listener.on_request_failed(req.context, code)
        for context in unflushed:
            self.listener.on_request_failed(context, code)
        self.listener.on_connection_lost(self)

    def close(self, code: int = ec.NETWORK_EXCEPTION) -> None:
        """Abort the transport and fail what is outstanding with ``code``."""
        if self.transport is not None:
            self.transport.abort()
        self._fail_all(code)

    def retire(self) -> None:
        """Send nothing new; close once every request in flight is answered (re-authentication)."""
        if self.closed:
            return
        self.retiring = True
        if not self.outstanding:
            self.close()

    def throttle(self, now_ms: float, throttle_time_ms: int) -> None:
        """A response said the broker throttles this client for ``throttle_time_ms`` from now."""
        self.throttled_until_ms = max(self.throttled_until_ms, now_ms + throttle_time_ms)

    def next_correlation_id(self) -> int:
        """A fresh correlation id (wraps within INT32)."""
        cid = self._next_correlation_id
        self._next_correlation_id = (cid + 1) & 0x7FFFFFFF
        return cid

    def _send(self, buffers: list[bytes | memoryview], outstanding: _Outstanding | None) -> None:
        if self.transport is None or self.closed:
            raise KafkaError.for_code(ec.NETWORK_EXCEPTION, f"connection to broker {self.node_id} is closed")
        if outstanding is not None:
            self.outstanding.append(outstanding)
            self.stats["in_flight"] += 1
        self.transport.writelines(buffers)

    def send(self, buffers: list[bytes | memoryview], correlation_id: int, api_key: int, deadline_ms: float,
             context: Any) -> None:
        """Write one framed request; its response goes to the listener with ``context``.

        ``deadline_ms`` (monotonic ms) is when :meth:`ConnectionPool.expire_requests` gives up
        on the response and closes the connection.
        """
        self._send(buffers, _Outstanding(correlation_id, api_key, deadline_ms, None, context))

    def send_unanswered(self, buffers: list[bytes | memoryview], context: Any) -> None:
        """Write one framed request that gets no response (Produce with acks=0)."""
        self._send(buffers, None)
        self.unflushed.append(context)

    def take_written(self) -> list[Any]:
        """Contexts of unanswered requests now written out in full (and forgotten here)."""
        if self.unflushed and self.transport is not None and self.transport.get_write_buffer_size() == 0:
            done, self.unflushed = self.unflushed, []
            return done
        return []

    async def request(self, api_key: int, encode: Callable[[int, int], bytes], timeout_s: float) -> tuple[int, memoryview]:
        """Send a control request and await its body. Returns (version used, body)."""
        if api_key == m.API_VERSIONS:
            version = self.versions.get(api_key, _API_VERSIONS_FALLBACK)
        else:
            version = self.versions[api_key]
        cid = self.next_correlation_id()
        fut: asyncio.Future[memoryview] = asyncio.get_running_loop().create_future()
        deadline = _now_ms() + timeout_s * 1000.0
        self._send([encode(version, cid)], _Outstanding(cid, api_key, deadline, fut, None))
        try:
            body = await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            self.close(ec.REQUEST_TIMED_OUT)
            raise KafkaError.for_code(
                ec.REQUEST_TIMED_OUT, f"{m.API_NAMES[api_key]} to broker {self.node_id} timed out after {timeout_s}s"
            ) from None
        return version, body

    async def handshake(self, timeout_s: float) -> None:
        """ApiVersions, then pin one version per API."""
        client_id = self.client_id
        req = m.ApiVersionsRequest(*_CLIENT_SOFTWARE)
        version = m.SUPPORTED_VERSIONS[m.API_VERSIONS][1]
        for _ in range(2):
            self.versions[m.API_VERSIONS] = version
            _, body = await self.request(
                m.API_VERSIONS, lambda v, cid: m.encode_api_versions_request(v, cid, client_id, req), timeout_s
            )
            resp = m.decode_api_versions_response(body, version)
            if resp.error_code == ec.UNSUPPORTED_VERSION:
                # The broker answered in v0 with the ApiVersions range it serves: retry once lower.
                ours = m.pick_versions(resp.api_keys, [m.API_VERSIONS])
                version = ours[m.API_VERSIONS]
                continue
            if resp.error_code:
                raise KafkaError.for_code(resp.error_code, f"ApiVersions refused by broker {self.node_id}")
            self.versions = m.pick_versions(resp.api_keys)
            self._api_keys = resp.api_keys
            return
        raise m.UnsupportedVersionError(f"broker {self.node_id} refused every ApiVersions version we offered")

    async def authenticate(self, mechanism: sasl.Mechanism, timeout_s: float) -> int:
        """SaslHandshake, then SaslAuthenticate rounds until ``mechanism`` is done.

        Returns the session lifetime the broker granted (ms; 0 = no limit).

        Raises:
            BrokerAuthError: the broker refused the mechanism or the credentials, or its answer
                failed the mechanism's checks.
        """
        try:
            self.versions.update(m.pick_versions(self._api_keys, m.SASL_APIS))
        except m.UnsupportedVersionError as exc:
            raise BrokerAuthError(f"{self.describe()}: SASL is not available: {exc}") from None
        client_id = self.client_id
        name = mechanism.name
        _, body = await self.request(
            m.SASL_HANDSHAKE, lambda v, cid: m.encode_sasl_handshake_request(v, cid, client_id, name), timeout_s
        )
        hs = m.decode_sasl_handshake_response(body, self.versions[m.SASL_HANDSHAKE])
        if hs.error_code:
            offered = ", ".join(hs.mechanisms) or "none"
            raise BrokerAuthError(
                f"{self.describe()}: SASL mechanism {name} is not enabled on this listener "
                f"({ec.error_name(hs.error_code)}; it offers: {offered})"
            )
        token: bytes | None = mechanism.start()
        lifetime = 0
        while token is not None:
            _, body = await self.request(
                m.SASL_AUTHENTICATE,
                lambda v, cid, payload=token: m.encode_sasl_authenticate_request(v, cid, client_id, payload),
                timeout_s,
            )
            resp = m.decode_sasl_authenticate_response(body, self.versions[m.SASL_AUTHENTICATE])
            if resp.error_code:
                detail = resp.error_message or ec.error_name(resp.error_code)
                server = getattr(mechanism, "server_error", "")
                raise BrokerAuthError(
                    f"{self.describe()}: SASL {name} authentication failed: {detail}"
                    + (f" (server said {server})" if server else "")
                )
            lifetime = resp.session_lifetime_ms
            try:
                token = mechanism.step(resp.auth_bytes)
            except sasl.SaslError as exc:
                raise BrokerAuthError(f"{self.describe()}: SASL {name}: {exc}") from None
        return lifetime


class ConnectionPool:
    """The cluster's brokers: their addresses, one connection per broker, a bootstrap connection.

    Args:
        settings: bootstrap servers, client id, timeouts and reconnect backoff.
        stats: the shared counters (see the module docstring).
        listener: where responses to requests sent with a context go, and connection losses
            (after the pool's own bookkeeping). None for a pool that sends control requests only.
        wakeup: called when a connection opens, fails to open or is lost.
    """

    def __init__(self, settings: KafkaSettings, stats: dict[str, Any] | None = None,
                 listener: ConnectionListener | None = None, wakeup: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.stats: dict[str, Any] = stats if stats is not None else {"in_flight": 0, "protocol_errors": 0,
                                                                        "reconnects": 0, "brokers_auth_failed": 0}
        self._listener = listener
        self._wakeup = wakeup
        self._bootstrap = [parse_hostport(s) for s in settings.bootstrap_servers.split(",") if s.strip()]
        if not self._bootstrap:
            raise ValueError("bootstrap_servers is empty")
        self._brokers: dict[int, tuple[str, int]] = {}
        self._conns: dict[int, Connection] = {}
        self._connecting: dict[int, asyncio.Task[None]] = {}
        self._reconnect_at: dict[int, float] = {}
        self._reconnect_backoff: dict[int, float] = {}
        self._bootstrap_conn: Connection | None = None
        self._stopped = False
        self._tls = TlsContexts(settings) if settings.uses_tls() else None
        self._tokens = TokenSource(settings)
        # Brokers given up on after a BrokerAuthError: node -> the error's message.
        self.fatal: dict[int, str] = {}

    # --- brokers ----------------------------------------------------------------------------

    def set_brokers(self, brokers: dict[int, tuple[str, int]]) -> None:
        """Replace the broker list (from a Metadata response)."""
        self._brokers = brokers
        if self._bootstrap_conn is not None and self._conns:
            # Broker connections exist now; the bootstrap one is no longer needed.
            self._bootstrap_conn.close()
            self._bootstrap_conn = None

    def add_broker(self, node: int, host: str, port: int) -> None:
        """Learn or update one broker's address (from a Produce response's NodeEndpoints)."""
        self._brokers[node] = (host, port)

    def knows(self, node: int) -> bool:
        """Whether the broker's address is known."""
        return node in self._brokers

    # --- connections ------------------------------------------------------------------------

    def connections(self) -> list[Connection]:
        """The open broker connections (not the bootstrap one)."""
        return list(self._conns.values())

    def ready(self, node: int) -> Connection | None:
        """The broker's connection if it is open and past its handshake."""
        conn = self._conns.get(node)
        if conn is not None and conn.ready and not conn.closed and not conn.retiring:
            return conn
        return None

    def connect(self, node: int, now: float) -> bool:
        """Start connecting to the broker unless already under way or backing off.

        Returns False when a connection is due but the broker's address is unknown (the broker
        list needs a refresh).
        """
        current = self._conns.get(node)
        if current is not None and not current.closed:
            return True  # retiring: its successor opens once it has closed (ordering per broker)
        if node not in self._connecting and now >= self._reconnect_at.get(node, 0.0) and not self._stopped:
            addr = self._brokers.get(node)
            if addr is None:
                return False
            task = asyncio.get_running_loop().create_task(self._connect(node, addr))
            self._connecting[node] = task
        return True

    async def control_connection(self) -> Connection:
        """A ready connection for control requests: the least busy broker, else bootstrap."""
        ready = [c for c in self._conns.values() if c.ready and not c.closed and not c.retiring]
        if ready:
            return min(ready, key=lambda c: len(c.outstanding))
        boot = self._bootstrap_conn
        if boot is not None and boot.ready and not boot.closed and not boot.retiring:
            return boot
        last: Exception | None = None
        for host, port in self._bootstrap:
            try:
                self._bootstrap_conn = await self._open(BOOTSTRAP_NODE, host, port)
                return self._bootstrap_conn
            except (m.UnsupportedVersionError, BrokerAuthError):
                raise  # not a reachability problem: another bootstrap server will not differ
            except KafkaError as exc:
                last = exc
        raise KafkaError.for_code(ec.NETWORK_EXCEPTION, f"no bootstrap server reachable: {last}")

    def expire_requests(self, now: float) -> None:
        """Close each broker connection whose oldest request is past its deadline."""
        for conn in list(self._conns.values()):
            if conn.outstanding and conn.outstanding[0].deadline_ms <= now:
                log.warning("request to broker %s timed out; reconnecting", conn.node_id)
                conn.close(ec.REQUEST_TIMED_OUT)

    def stop(self) -> None:
        """Open no more connections (a connection that opens later is closed at once)."""
        self._stopped = True

    def close(self, code: int) -> None:
        """Stop, close every connection (failing its requests with ``code``), cancel connects."""
        self._stopped = True
        for conn in list(self._conns.values()):
            conn.close(code)
        if self._bootstrap_conn is not None:
            self._bootstrap_conn.close(code)
        for task in list(self._connecting.values()):
            task.cancel()

    # --- ConnectionListener (for the pool's own connections) ---------------------------------

    def on_response(self, conn: Connection, context: Any, body: memoryview) -> None:  # noqa: D102
        if self._listener is not None:
            self._listener.on_response(conn, context, body)

    def on_request_failed(self, context: Any, code: int) -> None:  # noqa: D102
        if self._listener is not None:
            self._listener.on_request_failed(context, code)

    def on_connection_lost(self, conn: Connection) -> None:  # noqa: D102
        if self._conns.get(conn.node_id) is conn:
            del self._conns[conn.node_id]
            if not conn.retiring:
                self.stats["reconnects"] += 1
                self._back_off(conn.node_id)
        if self._bootstrap_conn is conn:
            self._bootstrap_conn = None
        if self._listener is not None:
            self._listener.on_connection_lost(conn)

    # ----------------------------------------------------------------------------------------

    def _back_off(self, node: int) -> None:
        backoff = self._reconnect_backoff.get(node, float(self.settings.reconnect_backoff_ms))
        self._reconnect_at[node] = _now_ms() + backoff * random.uniform(0.8, 1.2)
        self._reconnect_backoff[node] = min(max(backoff * 2, 1.0), float(self.settings.reconnect_backoff_max_ms))

    async def _open(self, node: int, host: str, port: int) -> Connection:
        loop = asyncio.get_running_loop()
        timeout = self.settings.socket_connection_setup_timeout_ms / 1000.0
        client_id = self.settings.client_id
        where = f"broker {node} ({host}:{port})" if node != BOOTSTRAP_NODE else f"bootstrap server {host}:{port}"
        tls: dict[str, Any] = {}
        if self._tls is not None:
            try:
                tls = {"ssl": self._tls.context(), "server_hostname": host}
            except BrokerAuthError as exc:
                raise BrokerAuthError(f"{where}: {exc}") from None
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: Connection(self, self.stats, node, host, port, client_id), host, port,
                                       **tls),
                timeout,
            )
        except ssl.SSLError as exc:
            if isinstance(exc, _RETRIABLE_SSL_ERRORS):
                raise KafkaError.for_code(ec.NETWORK_EXCEPTION, f"{where}: {describe_tls_error(exc, host)}") from None
            raise BrokerAuthError(
                f"{where}: {describe_tls_error(exc, host, bool(self.settings.ssl_certificate_location))}"
            ) from None
        except (OSError, asyncio.TimeoutError) as exc:
            raise KafkaError.for_code(ec.NETWORK_EXCEPTION, f"cannot connect to {host}:{port}: {exc!r}") from None
        try:
            await conn.handshake(timeout)
            if self.settings.uses_sasl():
                lifetime = await conn.authenticate(await self._mechanism(), timeout)
                if lifetime > 0:
                    loop.call_later(lifetime / 1000.0 * random.uniform(*_REAUTH_WINDOW), self._retire, conn)
            conn.ready = True
        except KafkaError as exc:
            conn.close()
            tls_error = conn.tls_error
            if tls_error is not None and not isinstance(tls_error, _RETRIABLE_SSL_ERRORS):
                # TLS 1.3: a refused client certificate shows only after the handshake, as an
                # alert on the first read.
                has_cert = bool(self.settings.ssl_certificate_location)
                raise BrokerAuthError(f"{where}: {describe_tls_error(tls_error, host, has_cert)}") from None
            if isinstance(exc, BrokerAuthError) and not str(exc).startswith(where):
                raise BrokerAuthError(f"{where}: {exc}") from None
            raise
        except BaseException:
            conn.close()
            raise
        return conn

    async def _mechanism(self) -> sasl.Mechanism:
        """A fresh exchange for the configured mechanism, with secrets read now."""
        s = self.settings
        if s.sasl_mechanism == "OAUTHBEARER":
            return sasl.OAuthBearer(await self._tokens.token())
        password = read_secret(s.sasl_password, s.sasl_password_file, "sasl_password_file")
        if s.sasl_mechanism == "PLAIN":
            return sasl.Plain(s.sasl_username, password)
        return sasl.Scram(s.sasl_mechanism, s.sasl_username, password)

    def _retire(self, conn: Connection) -> None:
        if conn.closed:
            return
        log.info("%s: SASL session nears its end; reconnecting to re-authenticate", conn.describe())
        conn.retire()
        if self._wakeup is not None:
            self._wakeup()

    async def _connect(self, node: int, addr: tuple[str, int]) -> None:
        try:
            conn = await self._open(node, *addr)
        except BrokerAuthError as exc:
            # Retrying cannot fix credentials or certificates: stop, and say so once.
            self._reconnect_at[node] = math.inf
            self.fatal[node] = str(exc)
            self.stats["brokers_auth_failed"] = len(self.fatal)
            log.error("%s; not connecting to broker %s again until restart", exc, node)
        except KafkaError as exc:
            self._back_off(node)
            log.warning("broker %s (%s:%s): %s", node, addr[0], addr[1], exc)
        else:
            if self._stopped:
                conn.close()
            else:
                self._conns[node] = conn
                self._reconnect_backoff.pop(node, None)
        finally:
            self._connecting.pop(node, None)
            if self._wakeup is not None:
                self._wakeup()


def parse_hostport(s: str) -> tuple[str, int]:
    """``host:port`` (IPv6 hosts in brackets) as (host, port)."""
    s = s.strip()
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"bootstrap server {s!r} is not host:port")
    return host.strip("[]"), int(port)
