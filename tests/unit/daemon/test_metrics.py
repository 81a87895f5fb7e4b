"""Prometheus exposition and the loopback HTTP endpoint, read back with a small parser.

The snapshots here are written by hand, to pin the exposition of every key; the numbers a real
daemon puts in them are checked where they are produced: the workers' per-topic failures in
tests/unit/daemon/test_worker.py (a real worker's snapshot, exposed and parsed back), the
clients' drops in tests/unit/daemon/test_server.py (a real Producer's segment, read by a real
ControlServer), and both end to end, scraped over HTTP from a real daemon, in
tests/integration/test_metrics.py."""

from __future__ import annotations

import asyncio
import http.client
import math
import re
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon import metrics
from shm.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# A small, independent parser of the text format (what a scraper would do).


def _parse_labels(text: str, i: int) -> tuple[dict[str, str], int]:
    """Parse ``{a="x",b="y"}`` starting at text[i] == '{'; return labels and index after '}'."""
    labels: dict[str, str] = {}
    i += 1
    while text[i] != "}":
        eq = text.index("=", i)
        name = text[i:eq]
        if text[eq + 1] != '"':
            raise ValueError(f"label value not quoted at {eq}")
        j = eq + 2
        chars = []
        while text[j] != '"':
            if text[j] == "\\":
                nxt = text[j + 1]
                chars.append({"\\": "\\", '"': '"', "n": "\n"}[nxt])
                j += 2
            else:
                chars.append(text[j])
                j += 1
        labels[name] = "".join(chars)
        i = j + 1
        if text[i] == ",":
            i += 1
    return labels, i + 1


def parse(text: str) -> tuple[dict[tuple[str, frozenset], float], dict[str, str], dict[str, str]]:
    samples: dict[tuple[str, frozenset], float] = {}
    types: dict[str, str] = {}
    helps: dict[str, str] = {}
    assert text.endswith("\n")
    for line in text.split("\n"):
        if not line:
            continue
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            helps[name] = help_text
            continue
        if line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert name not in types, f"TYPE repeated for {name}"
            types[name] = kind
            continue
        assert not line.startswith("#"), line
        brace = line.find("{")
        space = line.find(" ")
        if brace != -1 and brace < space:
            name = line[:brace]
            labels, end = _parse_labels(line, brace)
            rest = line[end:]
        else:
            name, rest = line[:space], line[space:]
            labels = {}
        assert rest.startswith(" ")
        value = float(rest.strip().replace("+Inf", "inf").replace("-Inf", "-inf"))
        key = (name, frozenset(labels.items()))
        assert key not in samples, f"duplicate sample {key}"
        samples[key] = value
    return samples, types, helps


def sample(samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


# ---------------------------------------------------------------------------------------------

NASTY_TOPIC = 'we"ird\\topic\nname'

SNAP = {
    "workers": {
        "1": {
            "alive": False, "restarts": 2, "records_in": 10, "records_out": 9,
            "bytes_in": 1000, "bytes_out": 900, "batches": 1, "requests": 1,
            "in_flight": 0, "retries": 0, "errors": {}, "failed": {},
            "ring_fill": 0.0, "arena_fill": 0.0,
        },
        "0": {
            "alive": True, "restarts": 0, "records_in": 1_234_567, "records_out": 1_234_000,
            "bytes_in": 123_456_700, "bytes_out": 98_765_432, "batches": 1200, "requests": 400,
            "in_flight": 3, "retries": 7,
            "errors": {"NOT_LEADER_OR_FOLLOWER": 4, "REQUEST_TIMED_OUT": 1},
            "failed": {"payments": 2},
            "ring_fill": 0.25, "arena_fill": 0.5,
            "latency_ms": {"p50": 2.5, "p99": 40.0, "p999": 120.0},
            "latency_count": 400, "latency_sum_ms": 1500.0,
        },
    },
    "drops": {"clicks": 55, NASTY_TOPIC: 1},
    "clients": 12,
    "start_time": 1_700_000_000.5,
    "reloads": 3,
    "version": "0.1.0",
    "totals": {"records_in": 1_234_577},
}


def test_render_values_and_types() -> None:
    samples, types, helps = parse(metrics.render(SNAP).decode())
    assert types == metrics.METRICS
    assert set(helps) == set(metrics.METRICS)
    s = samples
    assert sample(s, "sluice_records_in_total", worker="0") == 1_234_567
    assert sample(s, "sluice_records_in_total", worker="1") == 10
    assert sample(s, "sluice_records_out_total", worker="0") == 1_234_000
    assert sample(s, "sluice_bytes_in_total", worker="0") == 123_456_700
    assert sample(s, "sluice_bytes_out_total", worker="0") == 98_765_432
    assert sample(s, "sluice_batches_total", worker="0") == 1200
    assert sample(s, "sluice_requests_total", worker="0") == 400
    assert sample(s, "sluice_in_flight_requests", worker="0") == 3
    assert sample(s, "sluice_retries_total", worker="0") == 7
    assert sample(s, "sluice_errors_total", worker="0", error="NOT_LEADER_OR_FOLLOWER") == 4
    assert sample(s, "sluice_errors_total", worker="0", error="REQUEST_TIMED_OUT") == 1
    assert sample(s, "sluice_records_failed_total", worker="0", topic="payments") == 2
    # Drops are the clients', not a worker's: no worker label.
    assert sample(s, "sluice_drops_total", topic="clicks") == 55
    assert sample(s, "sluice_drops_total", topic=NASTY_TOPIC) == 1
    assert sample(s, "sluice_ring_fill_ratio", worker="0") == 0.25
    assert sample(s, "sluice_arena_fill_ratio", worker="0") == 0.5
    assert sample(s, "sluice_request_latency_seconds", worker="0", quantile="0.5") == 0.0025
    assert sample(s, "sluice_request_latency_seconds", worker="0", quantile="0.99") == 0.04
    assert sample(s, "sluice_request_latency_seconds", worker="0", quantile="0.999") == 0.12
    assert sample(s, "sluice_request_latency_seconds_sum", worker="0") == 1.5
    assert sample(s, "sluice_request_latency_seconds_count", worker="0") == 400
    assert sample(s, "sluice_worker_up", worker="0") == 1
    assert sample(s, "sluice_worker_up", worker="1") == 0
    assert sample(s, "sluice_workers_up") == 1
    assert sample(s, "sluice_worker_restarts_total", worker="1") == 2
    assert sample(s, "sluice_clients_connected") == 12
    assert sample(s, "sluice_start_time_seconds") == 1_700_000_000.5
    assert sample(s, "sluice_config_reloads_total") == 3
    assert sample(s, "sluice_build_info", version="0.1.0") == 1
    # Totals are not rendered (they would double every sum()).
    assert len([k for k in s if k[0] == "sluice_records_in_total"]) == 2


def test_render_escapes_label_values_on_the_wire() -> None:
    text = metrics.render(SNAP).decode()
    assert 'topic="we\\"ird\\\\topic\\nname"' in text
    # Every sample stays on one line despite the newline in the topic name.
    assert all(line.startswith(("#", "sluice_")) for line in text.splitlines())


def test_render_orders_workers_numerically() -> None:
    snap = {"workers": {str(i): {"records_in": i} for i in (10, 2, 1)}}
    lines = [ln for ln in metrics.render(snap).decode().splitlines()
             if ln.startswith("sluice_records_in_total{")]
    assert lines == [f'sluice_records_in_total{{worker="{i}"}} {i}.0' for i in (1, 2, 10)]


def test_render_missing_keys_give_no_sample() -> None:
    samples, types, _ = parse(metrics.render({"workers": {"0": {"records_in": 5}}}).decode())
    assert types == metrics.METRICS
    assert set(k[0] for k in samples) == {"sluice_records_in_total", "sluice_workers_up"}
    assert sample(samples, "sluice_workers_up") == 0


def test_render_empty_snapshot() -> None:
    samples, _, _ = parse(metrics.render({}).decode())
    assert samples == {("sluice_workers_up", frozenset()): 0}


def test_render_special_floats_and_bad_values() -> None:
    text = metrics.render({"workers": {"0": {"ring_fill": math.nan, "arena_fill": math.inf}}}).decode()
    assert 'sluice_ring_fill_ratio{worker="0"} NaN' in text
    assert 'sluice_arena_fill_ratio{worker="0"} +Inf' in text
    with pytest.raises(TypeError):
        metrics.render({"workers": {"0": {"records_in": "12"}}})


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=40))
def test_label_escaping_round_trips(topic: str) -> None:
    snap = {"workers": {"3": {"failed": {topic: 7}}}, "drops": {topic: 5}}
    samples, _, _ = parse(metrics.render(snap).decode())
    assert sample(samples, "sluice_records_failed_total", worker="3", topic=topic) == 7
    assert sample(samples, "sluice_drops_total", topic=topic) == 5


# ---------------------------------------------------------------------------------------------
# The HTTP server.


async def raw_request(port: int, data: bytes, timeout: float = 3.0) -> tuple[int, dict, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("ascii").split("\r\n")
    code = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return code, headers, body


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: test\r\n\r\n".encode()


def run(coro):
    return asyncio.run(coro)


def test_get_metrics_over_http() -> None:
    async def main() -> tuple[int, dict, bytes, int]:
        async with metrics.MetricsServer(lambda: SNAP, port=0) as server:
            assert server.port != 0
            code, headers, body = await raw_request(server.port, get("/metrics"))
            return code, headers, body, server.scrapes

    code, headers, body, scrapes = run(main())
    assert code == 200
    assert headers["content-type"] == metrics.CONTENT_TYPE
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert scrapes == 1
    samples, _, _ = parse(body.decode())
    assert sample(samples, "sluice_drops_total", topic=NASTY_TOPIC) == 1
    assert sample(samples, "sluice_records_in_total", worker="0") == 1_234_567


def test_http_client_library_and_query_string() -> None:
    """The stdlib HTTP client (a real, independent implementation) can scrape it."""

    def scrape(port: int) -> tuple[int, str, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
        try:
            conn.request("GET", "/metrics?name[]=x")
            resp = conn.getresponse()
            return resp.status, resp.getheader("Content-Type"), resp.read()
        finally:
            conn.close()

    async def main():
        async with metrics.MetricsServer(lambda: SNAP, port=0) as server:
            return await asyncio.to_thread(scrape, server.port)

    status, ctype, body = run(main())
    assert status == 200
    assert ctype == metrics.CONTENT_TYPE
    assert body == metrics.render(SNAP)


def test_async_snapshot() -> None:
    async def snap():
        await asyncio.sleep(0)
        return {"workers": {"0": {"records_out": 42}}}

    async def main():
        async with metrics.MetricsServer(snap, port=0) as server:
            return await raw_request(server.port, get("/metrics"))

    code, _, body = run(main())
    assert code == 200
    assert 'sluice_records_out_total{worker="0"} 42.0' in body.decode()


def test_status_codes() -> None:
    async def main():
        async with metrics.MetricsServer(lambda: SNAP, port=0) as server:
            return {
                "404": await raw_request(server.port, get("/")),
                "404post": await raw_request(server.port, get("/nope", "POST")),
                "405": await raw_request(server.port, get("/metrics", "POST")),
                "405del": await raw_request(server.port, get("/metrics", "DELETE")),
                "400": await raw_request(server.port, b"garbage\r\n\r\n"),
                "head": await raw_request(server.port, get("/metrics", "HEAD")),
                "scrapes": server.scrapes,
            }

    r = run(main())
    assert r["404"][0] == 404
    assert r["404post"][0] == 404
    assert r["405"][0] == 405 and r["405"][1]["allow"] == "GET, HEAD"
    assert r["405del"][0] == 405
    assert r["400"][0] == 400
    code, headers, body = r["head"]
    assert code == 200 and body == b""
    assert int(headers["content-length"]) == len(metrics.render(SNAP))
    assert r["scrapes"] == 1


def test_oversized_request_is_refused() -> None:
    async def main():
        async with metrics.MetricsServer(lambda: SNAP, port=0, max_request_bytes=1024) as server:
            big = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 4096 + b"\r\n\r\n"
            return await raw_request(server.port, big)

    code, _, _ = run(main())
    assert code == 431


def test_failing_snapshot_gives_500_and_server_survives(caplog) -> None:
    calls = {"n": 0}

    def snap():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("stats table torn")
        return SNAP

    async def main():
        async with metrics.MetricsServer(snap, port=0) as server:
            first = await raw_request(server.port, get("/metrics"))
            second = await raw_request(server.port, get("/metrics"))
            return first[0], second[0]

    assert run(main()) == (500, 200)
    assert "metrics snapshot failed" in caplog.text


def test_slow_client_times_out_without_blocking_others() -> None:
    read_timeout = 0.5

    async def main():
        async with metrics.MetricsServer(lambda: SNAP, port=0, read_timeout=read_timeout) as server:
            slow_reader, slow_writer = await asyncio.open_connection("127.0.0.1", server.port)
            slow_writer.write(b"GET /metr")  # and then nothing: a slowloris
            await slow_writer.drain()
            t0 = time.monotonic()
            code, _, _ = await raw_request(server.port, get("/metrics"))
            fast_elapsed = time.monotonic() - t0
            reply = await asyncio.wait_for(slow_reader.read(), read_timeout * 6)
            slow_elapsed = time.monotonic() - t0
            slow_writer.close()
            await slow_writer.wait_closed()
            return code, fast_elapsed, reply, slow_elapsed

    code, fast_elapsed, reply, slow_elapsed = run(main())
    assert code == 200
    assert fast_elapsed < read_timeout, "a normal scrape waited on the slow client"
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert read_timeout * 0.8 <= slow_elapsed < read_timeout * 6


def test_connection_limit() -> None:
    async def main():
        async with metrics.MetricsServer(lambda: SNAP, port=0, max_connections=1,
                                         read_timeout=2.0) as server:
            idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", server.port)
            await asyncio.sleep(0.05)  # let the server accept it
            code, _, _ = await raw_request(server.port, get("/metrics"))
            idle_writer.close()
            await idle_writer.wait_closed()
            return code

    assert run(main()) == 503


def test_start_metrics_port_zero_is_off() -> None:
    assert run(metrics.start_metrics(lambda: SNAP, 0)) is None


def test_start_metrics_binds_configured_port() -> None:
    async def main():
        probe = metrics.MetricsServer(lambda: SNAP, port=0)
        await probe.start()
        port = probe.port
        await probe.close()
        server = await metrics.start_metrics(lambda: SNAP, port)
        assert server is not None
        try:
            return port, server.port, (await raw_request(server.port, get("/metrics")))[0]
        finally:
            await server.close()

    want, got, code = run(main())
    assert got == want and code == 200


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "example.org"])
def test_non_loopback_host_is_refused(host: str) -> None:
    with pytest.raises(ConfigError):
        metrics.MetricsServer(lambda: SNAP, host=host)


def test_bad_port_is_refused() -> None:
    with pytest.raises(ConfigError):
        metrics.MetricsServer(lambda: SNAP, port=70000)


def test_works_on_uvloop() -> None:
    """The workers and supervisor run on uvloop; the slow-client timeout must hold there too."""
    uvloop = pytest.importorskip("uvloop")

    async def main():
        async with metrics.MetricsServer(lambda: SNAP, port=0, read_timeout=0.3) as server:
            slow_reader, slow_writer = await asyncio.open_connection("127.0.0.1", server.port)
            slow_writer.write(b"GET /metrics HTTP/1.1\r\n")
            ok = await raw_request(server.port, get("/metrics"))
            reply = await asyncio.wait_for(slow_reader.read(), 3.0)
            slow_writer.close()
            await slow_writer.wait_closed()
            return ok, reply

    (code, _, body), reply = uvloop.run(main())
    assert code == 200 and body == metrics.render(SNAP)
    assert reply.startswith(b"HTTP/1.1 408 ")


def test_operations_doc_lists_exactly_the_metrics_exposed() -> None:
    """docs/OPERATIONS.md is what operators alert on: its table names every metric, no other."""
    doc = (Path(__file__).resolve().parents[3] / "docs" / "OPERATIONS.md").read_text()
    section = doc[doc.index("### Metrics"):doc.index("### Stopping and draining")]
    table = [line for line in section.splitlines() if line.startswith("| `sluice_")]
    named = {m for line in table for m in re.findall(r"`(sluice_\w+)`", line.split("|")[1])}
    assert named == set(metrics.METRICS)
    # Every metric the prose uses exists too.
    assert set(re.findall(r"\b(sluice_[a-z_]+)\b", section)) <= set(metrics.METRICS) | {
        name + suffix for name in metrics.METRICS for suffix in ("_sum", "_count")
    }


def test_socket_section_becomes_refusals_by_topic_and_error_and_gauges() -> None:
    snap = {"workers": {}, "socket": {"refused": {"orders": {"UNKNOWN_TOPIC_OR_PARTITION": 3, "BUFFER_FULL": 1}},
                                      "connections": 4, "paused": 1, "unsent_reply_bytes": 9000,
                                      "inflight_records": 12, "unknown_topics": 2}}
    text = metrics.render(snap).decode()
    assert 'sluice_socket_refused_total{error="UNKNOWN_TOPIC_OR_PARTITION",topic="orders"} 3.0' in text
    assert 'sluice_socket_refused_total{error="BUFFER_FULL",topic="orders"} 1.0' in text
    for line in ("sluice_socket_connections 4.0", "sluice_socket_paused_connections 1.0",
                 "sluice_socket_unsent_reply_bytes 9000.0", "sluice_socket_inflight_records 12.0",
                 "sluice_unknown_topics_remembered 2.0"):
        assert line in text.splitlines()
    # No socket section: no samples, never made-up zeros.
    assert not [ln for ln in metrics.render({"workers": {}}).decode().splitlines() if ln.startswith("sluice_socket_")]
