"""Prometheus metrics: text exposition format 0.0.4 served over HTTP on loopback.

The supervisor owns the numbers; this module only exposes them. A callable ``snapshot()``
(plain or ``async``) returns one dict per scrape (:meth:`daemon.supervisor.Supervisor.stats`),
:class:`SnapshotCollector` turns it into metric families, prometheus_client writes the text
format (:func:`render`), and :class:`MetricsServer` answers ``GET /metrics`` with it on
``127.0.0.1:<port>``. Port 0 in the config means "metrics off" (:func:`start_metrics` returns
``None``); the class itself treats port 0 as "any free port", which tests use.

Why prometheus_client only for the exposition, not its registry or HTTP server: the numbers
live in the workers' snapshots and the clients' segments, so a custom collector reads one
snapshot per scrape (no metric objects to keep in step); and the server here is an asyncio
one on the supervisor's loop with a loopback-only bind, a read timeout, a request-size limit
and a connection limit, which prometheus_client's threaded server does not have.

Why loopback only: the endpoint has no authentication or TLS and names topics and error
counts. Scrape it with an agent on the same host, or put an authenticating proxy in front.

Snapshot shape
--------------
Every key is optional unless marked required; a missing key produces no sample (never a
made-up zero), unknown keys are ignored (``sluice stats`` shows the same dict). Counters
(``_total``) must not decrease for a given worker label except when that worker restarts, which
Prometheus' ``rate()`` treats as a counter reset. ::

    {
      "workers": {                      # required; key = worker index (str or int)
        "0": {
          "alive": bool,                # process running and heartbeat fresh
          "restarts": int,              # times the supervisor restarted this worker
          "records_in": int,            # records drained from rings into the accumulator
          "records_out": int,           # records acknowledged by Kafka (acks=0: written)
          "bytes_in": int,              # record bytes drained from rings
          "bytes_out": int,             # RecordBatch bytes sent in Produce requests
          "batches": int,               # batches produced successfully
          "requests": int,              # Produce requests sent
          "in_flight": int,             # Produce requests awaiting a response now
          "retries": int,               # batch retries (retriable errors, timeouts)
          "throttle_s": float,          # seconds brokers throttled Produce (throttle_time_ms)
          "splits": int,                # batches split after a MESSAGE_TOO_LARGE (or known too large)
          "recovered_splits": int,      # of those, batches recovered from a dead worker's arena
          "brokers_auth_failed": int,   # brokers given up on after an authentication failure
          "errors": {name: int},        # records failed, by Kafka/Sluice error name
          "failed": {topic: int},       # records failed, by topic
          "ring_fill": float,           # 0..1, fullest request ring this worker drains
          "arena_fill": float,          # 0..1, arena bytes in use / buffer_memory
          "latency_ms": {"p50": float, "p90": float, "p99": float, "p999": float},
                                        # Produce round trip, milliseconds; any subset
          "latency_count": int,         # requests the quantiles summarise (summary _count)
          "latency_sum_ms": float,      # their total round trip, ms (summary _sum)
        },
      },
      "drops": {topic: int},            # records clients dropped under on_full="drop"
      "socket": {                       # socket clients (daemon/server.py, daemon/ingest.py)
        "refused": {topic: {error: int}},  # records refused before a ring, by topic and error
        "connections": int,             # open client connections
        "paused": int,                  # connections not read now (back-pressure)
        "unsent_reply_bytes": int,      # replies queued, not yet read by their clients
        "inflight_records": int,        # socket records without an outcome yet
        "unknown_topics": int,          # topic names remembered as unknown
      },
      "clients": int,                   # connected client sessions
      "start_time": float,              # daemon start, Unix seconds
      "reloads": int,                   # successful config reloads
      "version": str,                   # Sluice version, for sluice_build_info
      "totals": {...},                  # ignored: sum by worker in PromQL
    }

Metrics exposed (the per-worker ones carry ``worker="<index>"``):

=====================================  =========  ===================  ======================
metric                                 type       labels               from
=====================================  =========  ===================  ======================
sluice_worker_up                       gauge      worker               workers.*.alive
sluice_workers_up                      gauge                           count of alive workers
sluice_worker_restarts_total           counter    worker               workers.*.restarts
sluice_records_in_total                counter    worker               workers.*.records_in
sluice_records_out_total               counter    worker               workers.*.records_out
sluice_bytes_in_total                  counter    worker               workers.*.bytes_in
sluice_bytes_out_total                 counter    worker               workers.*.bytes_out
sluice_batches_total                   counter    worker               workers.*.batches
sluice_requests_total                  counter    worker               workers.*.requests
sluice_in_flight_requests              gauge      worker               workers.*.in_flight
sluice_retries_total                   counter    worker               workers.*.retries
sluice_produce_throttle_seconds_total  counter    worker               workers.*.throttle_s
sluice_batch_splits_total              counter    worker               workers.*.splits
sluice_recovered_batch_splits_total    counter    worker               workers.*.recovered_splits
sluice_brokers_auth_failed             gauge      worker               workers.*.brokers_auth_failed
sluice_errors_total                    counter    worker, error        workers.*.errors
sluice_records_failed_total            counter    worker, topic        workers.*.failed
sluice_ring_fill_ratio                 gauge      worker               workers.*.ring_fill
sluice_arena_fill_ratio                gauge      worker               workers.*.arena_fill
sluice_request_latency_seconds         summary    worker, quantile     workers.*.latency_*
sluice_drops_total                     counter    topic                drops
sluice_socket_refused_total            counter    topic, error         socket.refused
sluice_socket_connections              gauge                           socket.connections
sluice_socket_paused_connections       gauge                           socket.paused
sluice_socket_unsent_reply_bytes       gauge                           socket.unsent_reply_bytes
sluice_socket_inflight_records         gauge                           socket.inflight_records
sluice_unknown_topics_remembered       gauge                           socket.unknown_topics
sluice_clients_connected               gauge                           clients
sluice_start_time_seconds              gauge                           start_time
sluice_config_reloads_total            counter                         reloads
sluice_build_info                      gauge      version              version (value 1)
=====================================  =========  ===================  ======================

``sluice_drops_total`` has no worker label: a client drops a record before any worker sees
it, and counts it in its segment (shm/layout.py), where the supervisor reads it (including the
drops of clients that have exited or died). Totals are deliberately not exposed: a series for
the total beside the per-worker series would make every ``sum()`` over the metric count each
record twice.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from shm.errors import ConfigError

__all__ = [
    "CONTENT_TYPE",
    "METRICS",
    "MetricsServer",
    "Snapshot",
    "SnapshotCollector",
    "render",
    "start_metrics",
]

log = logging.getLogger(__name__)

# The text format 0.0.4 that generate_latest writes (with the default escaping, which leaves
# names like ours alone). prometheus_client's CONTENT_TYPE_LATEST names a newer version.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Snapshot = Mapping[str, Any]
SnapshotFn = Callable[[], "Snapshot | Awaitable[Snapshot]"]

# Per-worker scalar metrics: (metric name, type, help, snapshot key).
_WORKER_SCALARS: tuple[tuple[str, str, str, str], ...] = (
    ("sluice_worker_restarts_total", "counter",
     "Times the supervisor restarted this worker.", "restarts"),
    ("sluice_records_in_total", "counter",
     "Records drained from client rings into the accumulator.", "records_in"),
    ("sluice_records_out_total", "counter",
     "Records acknowledged by Kafka (acks=0: written to the broker connection).", "records_out"),
    ("sluice_bytes_in_total", "counter",
     "Record bytes drained from client rings.", "bytes_in"),
    ("sluice_bytes_out_total", "counter",
     "RecordBatch bytes sent in Produce requests.", "bytes_out"),
    ("sluice_batches_total", "counter",
     "Record batches produced successfully.", "batches"),
    ("sluice_requests_total", "counter",
     "Produce requests sent.", "requests"),
    ("sluice_in_flight_requests", "gauge",
     "Produce requests awaiting a response.", "in_flight"),
    ("sluice_retries_total", "counter",
     "Batch retries after retriable errors or timeouts.", "retries"),
    ("sluice_produce_throttle_seconds_total", "counter",
     "Time brokers throttled this worker's Produce requests (quota throttle_time_ms), seconds.", "throttle_s"),
    ("sluice_batch_splits_total", "counter",
     "Batches cut in two because the broker refused them as too large for the topic (or one that size was).",
     "splits"),
    ("sluice_recovered_batch_splits_total", "counter",
     "Of those, batches (or parts of them) recovered from a dead worker's arena.", "recovered_splits"),
    ("sluice_brokers_auth_failed", "gauge",
     "Brokers this worker stopped connecting to after an authentication failure (TLS or SASL) until a restart.",
     "brokers_auth_failed"),
    ("sluice_ring_fill_ratio", "gauge",
     "Fill of the fullest request ring this worker drains (0 to 1).", "ring_fill"),
    ("sluice_arena_fill_ratio", "gauge",
     "Arena bytes in use over buffer_memory (0 to 1).", "arena_fill"),
)

# Per-worker dict metrics: (metric name, type, help, snapshot key, label for the dict's keys).
_WORKER_MAPS: tuple[tuple[str, str, str, str, str], ...] = (
    ("sluice_errors_total", "counter",
     "Records failed, by Kafka or Sluice error name.", "errors", "error"),
    ("sluice_records_failed_total", "counter",
     "Records completed with an error (refused by Kafka, timed out, too large), by topic.", "failed", "topic"),
)

# Quantile keys of latency_ms and the quantile label each becomes.
_QUANTILES: tuple[tuple[str, str], ...] = (
    ("p50", "0.5"), ("p90", "0.9"), ("p95", "0.95"), ("p99", "0.99"), ("p999", "0.999"),
)

_LATENCY = "sluice_request_latency_seconds"
_DROPS = ("sluice_drops_total",
          "Records clients dropped because a ring was full under on_full=drop, by topic.")
_REFUSED = ("sluice_socket_refused_total",
            "Socket-client records refused before they reached a ring (unknown topic, partition out of range, "
            "too large, BUFFER_FULL after max_block_ms, SHUTTING_DOWN), by topic and error.")
# Scalars of the socket section: (metric name, type, help, key of snapshot["socket"]).
_SOCKET_SCALARS: tuple[tuple[str, str, str, str], ...] = (
    ("sluice_socket_connections", "gauge", "Open client connections.", "connections"),
    ("sluice_socket_paused_connections", "gauge",
     "Connections the daemon does not read now: their replies or records in flight reached the cap.", "paused"),
    ("sluice_socket_unsent_reply_bytes", "gauge", "Reply bytes queued that clients have not read yet.",
     "unsent_reply_bytes"),
    ("sluice_socket_inflight_records", "gauge", "Socket-client records without an outcome yet.", "inflight_records"),
    ("sluice_unknown_topics_remembered", "gauge",
     "Topic names remembered as unknown (unknown_topic_cache_ms).", "unknown_topics"),
)
# Daemon-wide scalars: (metric name, type, help, snapshot key).
_DAEMON_SCALARS: tuple[tuple[str, str, str, str], ...] = (
    ("sluice_clients_connected", "gauge", "Connected client sessions.", "clients"),
    ("sluice_start_time_seconds", "gauge", "Daemon start time, Unix seconds.", "start_time"),
    ("sluice_config_reloads_total", "counter", "Successful configuration reloads.", "reloads"),
)

#: Every metric name this module exposes, with its type (for docs and tests).
METRICS: dict[str, str] = {
    "sluice_worker_up": "gauge",
    "sluice_workers_up": "gauge",
    **{name: kind for name, kind, _, _ in _WORKER_SCALARS},
    **{name: kind for name, kind, _, _, _ in _WORKER_MAPS},
    _LATENCY: "summary",
    _DROPS[0]: "counter",
    _REFUSED[0]: "counter",
    **{name: kind for name, kind, _, _ in _SOCKET_SCALARS},
    **{name: kind for name, kind, _, _ in _DAEMON_SCALARS},
    "sluice_build_info": "gauge",
}


def _number(v: Any) -> float:
    # float() would take "12" too; a snapshot with a string where a number belongs is a bug.
    if isinstance(v, (int, float)):
        return float(v)
    raise TypeError(f"metric value must be a number, got {type(v).__name__}: {v!r}")


def _family(name: str, kind: str, help_text: str, labels: tuple[str, ...]) -> Metric:
    if kind == "counter":
        # prometheus_client names a counter family without _total and adds it on exposition.
        return CounterMetricFamily(name.removesuffix("_total"), help_text, labels=labels)
    return GaugeMetricFamily(name, help_text, labels=labels)


def _worker_order(key: Any) -> tuple[int, int, str]:
    text = str(key)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


class SnapshotCollector:
    """A prometheus_client collector of one snapshot (shape in the module docstring).

    Raises (from :meth:`collect`):
        TypeError: a value that must be a number is not one.
    """

    def __init__(self, snapshot: Snapshot) -> None:
        self._snap = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snap
        raw = snap.get("workers") or {}
        workers = [(str(k), raw[k]) for k in sorted(raw, key=_worker_order)]

        up = GaugeMetricFamily("sluice_worker_up", "1 while the worker process runs and its heartbeat is fresh.",
                               labels=("worker",))
        alive = 0
        for wid, w in workers:
            if "alive" in w:
                alive += bool(w["alive"])
                up.add_metric((wid,), 1.0 if w["alive"] else 0.0)
        yield up
        yield GaugeMetricFamily("sluice_workers_up", "Workers whose process runs and heartbeat is fresh.",
                                value=alive)

        for name, kind, help_text, key in _WORKER_SCALARS:
            family = _family(name, kind, help_text, ("worker",))
            for wid, w in workers:
                if key in w:
                    family.add_metric((wid,), _number(w[key]))
            yield family

        for name, kind, help_text, key, label in _WORKER_MAPS:
            family = _family(name, kind, help_text, ("worker", label))
            for wid, w in workers:
                values = w.get(key) or {}
                for item in sorted(values, key=str):
                    family.add_metric((wid, str(item)), _number(values[item]))
            yield family

        latency = Metric(_LATENCY, "Produce request round trip to the broker, seconds.", "summary")
        for wid, w in workers:
            quantiles = w.get("latency_ms") or {}
            for key, q in _QUANTILES:
                if key in quantiles:
                    latency.add_sample(_LATENCY, {"worker": wid, "quantile": q}, _number(quantiles[key]) / 1000.0)
            if "latency_sum_ms" in w:
                latency.add_sample(_LATENCY + "_sum", {"worker": wid}, _number(w["latency_sum_ms"]) / 1000.0)
            if "latency_count" in w:
                latency.add_sample(_LATENCY + "_count", {"worker": wid}, _number(w["latency_count"]))
        yield latency

        drops = _family(_DROPS[0], "counter", _DROPS[1], ("topic",))
        values = snap.get("drops") or {}
        for topic in sorted(values, key=str):
            drops.add_metric((str(topic),), _number(values[topic]))
        yield drops

        sock = snap.get("socket") or {}
        refused = _family(_REFUSED[0], "counter", _REFUSED[1], ("topic", "error"))
        by_topic = sock.get("refused") or {}
        for topic in sorted(by_topic, key=str):
            for error in sorted(by_topic[topic], key=str):
                refused.add_metric((str(topic), str(error)), _number(by_topic[topic][error]))
        yield refused
        for name, kind, help_text, key in _SOCKET_SCALARS:
            family = _family(name, kind, help_text, ())
            if key in sock:
                family.add_metric((), _number(sock[key]))
            yield family

        for name, kind, help_text, key in _DAEMON_SCALARS:
            family = _family(name, kind, help_text, ())
            if key in snap:
                family.add_metric((), _number(snap[key]))
            yield family

        info = GaugeMetricFamily("sluice_build_info", "Always 1; the version label says which Sluice runs.",
                                 labels=("version",))
        if "version" in snap:
            info.add_metric((str(snap["version"]),), 1.0)
        yield info


def render(snapshot: Snapshot) -> bytes:
    """``snapshot`` in the text format 0.0.4, UTF-8 (prometheus_client's exposition).

    Raises:
        TypeError: a value that must be a number is not one.
    """
    return generate_latest(SnapshotCollector(snapshot))


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _response(code: int, body: bytes, *, content_type: str = "text/plain; charset=utf-8",
              extra: str = "", head: bool = False) -> bytes:
    header = (
        f"HTTP/1.1 {code} {_REASONS[code]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{extra}"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    return header if head else header + body


class MetricsServer:
    """A minimal HTTP/1.1 server for ``GET /metrics`` (and ``HEAD``), one request per connection.

    Args:
        snapshot: returns the snapshot dict (or an awaitable of it) for each scrape.
        port: TCP port; 0 binds any free port (see :attr:`port` after :meth:`start`).
        host: must be a loopback address.
        read_timeout: seconds a client gets to send its whole request head; also bounds the
            snapshot call and the response write. A slow client only ever holds its own
            connection, for at most about this long.
        max_request_bytes: request line plus headers; longer requests get 431.
        max_connections: concurrent connections; beyond this new ones get 503 at once.
    """

    def __init__(self, snapshot: SnapshotFn, *, port: int = 0, host: str = "127.0.0.1",
                 read_timeout: float = 5.0, max_request_bytes: int = 8192,
                 max_connections: int = 32) -> None:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConfigError(f"metrics host {host!r}: only a loopback address is allowed "
                              "(the endpoint has no authentication)")
        if not 0 <= port <= 65535:
            raise ConfigError(f"metrics port {port}: must be 0..65535")
        self._snapshot = snapshot
        self.host = host
        self.port = port
        self.read_timeout = read_timeout
        self.max_request_bytes = max_request_bytes
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        #: Scrapes answered with 200 (for stats and tests).
        self.scrapes = 0

    async def start(self) -> None:
        """Bind and listen. Afterwards :attr:`port` is the bound port."""
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, limit=self.max_request_bytes,
            reuse_address=True,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def close(self) -> None:
        """Stop listening and end connections still being served."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            if len(self._handlers) > self.max_connections:
                await self._send(writer, _response(503, b"too many connections\n"))
                return
            await self._serve_one(reader, writer)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            if task is not None:
                self._handlers.discard(task)
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), self.read_timeout)
            except (ConnectionError, asyncio.TimeoutError, asyncio.CancelledError):
                pass

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await asyncio.wait_for(writer.drain(), self.read_timeout)

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.read_timeout)
        except asyncio.TimeoutError:
            await self._send(writer, _response(408, b"request timeout\n"))
            return
        except asyncio.LimitOverrunError:
            await self._send(writer, _response(431, b"request too large\n"))
            return
        except asyncio.IncompleteReadError:
            return  # the client went away before finishing its request
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            await self._send(writer, _response(400, b"bad request\n"))
            return
        method, target = parts[0], parts[1]
        if target.split(b"?", 1)[0] != b"/metrics":
            await self._send(writer, _response(404, b"not found; try /metrics\n"))
            return
        if method not in (b"GET", b"HEAD"):
            await self._send(writer, _response(405, b"method not allowed\n",
                                               extra="Allow: GET, HEAD\r\n"))
            return
        try:
            snap = self._snapshot()
            if inspect.isawaitable(snap):
                snap = await asyncio.wait_for(snap, self.read_timeout)
            body = render(snap)
        except Exception:
            log.exception("metrics snapshot failed")
            await self._send(writer, _response(500, b"snapshot failed\n"))
            return
        self.scrapes += 1
        await self._send(writer, _response(200, body, content_type=CONTENT_TYPE,
                                           head=method == b"HEAD"))


async def start_metrics(snapshot: SnapshotFn, port: int, *,
                        host: str = "127.0.0.1") -> MetricsServer | None:
    """Start the metrics server as configured: ``port == 0`` means metrics are off (``None``)."""
    if port == 0:
        return None
    server = MetricsServer(snapshot, port=port, host=host)
    await server.start()
    return server
