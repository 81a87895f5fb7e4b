"""Sluice through its Go client (clients/go): the ``sluice-go-produce`` command is the client.

The client process the harness spawns (bench/client.py's protocol) builds the command once
(``go build``, into a directory named after a hash of the client's sources, so concurrent
clients and later runs reuse it) and starts it with ``-wait-start``: the command connects,
looks the topic up and builds its records, then says it is ready. This process reports ready
to the harness, relays the start signal on the command's stdin, and turns the command's JSON
summary into a ClientResult.

What is measured is the command's own: time from its first send to the daemon's FlushDone
(every record complete), its CPU (getrusage of the Go process, added to the daemon's by the
harness), and latency once per acknowledged frame, from the ``Send`` of its first record to
that record's acknowledgement (as the socket runner times its acked frames), reported as
percentiles.

Framing is the socket runner's (bench/sluice_socket.py), so the two compare like for like: the
Go producer batches per topic with the case's ``linger_ms`` and at most FRAME records per
Produce frame, and only every ACK_EVERY-th frame is acknowledged (``Send``); the others go
fire-and-forget (``Produce``, ack=false), and the final Flush asks the daemon, whose FlushDone
counts every failed record. ``SLUICE_BENCH_GO_ACK_EVERY=1`` in the environment acknowledges
every frame instead (every record's outcome decoded by the client), the Go client's
all-acknowledged mode. The producer holds at most IN_FLIGHT records between ``Send`` and their
outcome (written, for fire-and-forget ones): the socket runner has no queue of its own (it
blocks in its socket write), and a deep client queue adds only latency.

Records cycle through POOL distinct values and KEYS keys, as the Python runners' do; the data
differs in content only: values are ``RUN-i-`` and seeded letters of the case's size (never
the compressible vocabulary), keys ``k<i mod KEYS>`` padded to the case's key size.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import sluice_shm, sluice_socket
from bench.client import POOL, ClientResult, ClientSpec, report, wait_for_start
from bench.scenarios import Delivery

__all__ = ["NAME", "FRAME", "ACK_EVERY", "ACK_EVERY_ENV", "IN_FLIGHT", "KEYS", "settings_for", "unavailable_reason",
           "command_path", "run_client"]

NAME = "sluice-go"
FRAME = sluice_socket.FRAME
"""Records per Produce frame at most (the Go producer's BatchRecords): the socket runner's."""
ACK_EVERY = sluice_socket.ACK_EVERY
"""Every this-many-th frame is acknowledged, the others fire-and-forget: the socket runner's."""
KEYS = 65_536
"""Distinct keys of a keyed case (as many as the Python runners' key pool)."""
IN_FLIGHT = 16_384
"""The Go producer's MaxInFlightRecords: 128 frames of FRAME records (the client's default,
100,000, kept throughput the same here and added ~50 ms of queueing to every latency)."""
ACK_EVERY_ENV = "SLUICE_BENCH_GO_ACK_EVERY"
"""Environment variable overriding ACK_EVERY (1: every frame acknowledged)."""
CLIENT_DIR = Path(__file__).resolve().parent.parent / "clients" / "go"
_GO_INSTALL = "/usr/local/go/bin/go"  # the official tarball's place, when not on PATH
_BUILD_TIMEOUT_S = 300
_READY_TIMEOUT_S = 120


def _go() -> str | None:
    return shutil.which("go") or (_GO_INSTALL if os.access(_GO_INSTALL, os.X_OK) else None)


def settings_for(delivery: Delivery, bootstrap: str) -> dict[str, Any]:
    """The daemon profile keys for ``delivery`` (the shared-memory runner's), and the Go
    producer's own batching."""
    return {**sluice_shm.settings_for(delivery, bootstrap),
            "go_linger_ms": delivery.linger_ms, "go_frame_records": FRAME, "go_ack_every": _ack_every()}


def _ack_every() -> int:
    raw = os.environ.get(ACK_EVERY_ENV, "")
    try:
        value = int(raw) if raw else ACK_EVERY
    except ValueError:
        raise ValueError(f"{ACK_EVERY_ENV}={raw!r} is not an integer") from None
    if value < 1:
        raise ValueError(f"{ACK_EVERY_ENV}={raw!r}: must be >= 1")
    return value


def unavailable_reason(*, own_daemon: bool = True) -> str | None:
    """Why the Go runner cannot run here (no Go toolchain, or the socket runner's reasons), or
    None."""
    if _go() is None:
        return "the Go toolchain (`go`) is not installed"
    from bench.sluice_daemon import sluice_unavailable_reason

    return sluice_unavailable_reason("sluice-socket", own_daemon=own_daemon)


def command_path() -> str:
    """The built command, built now unless a build of the same sources exists."""
    go = _go()
    if go is None:
        raise RuntimeError("the Go toolchain (`go`) is not installed")
    digest = hashlib.sha256()
    for path in sorted(p for p in CLIENT_DIR.rglob("*") if p.suffix in (".go", ".mod", ".sum") and p.is_file()):
        digest.update(str(path.relative_to(CLIENT_DIR)).encode() + b"\0" + path.read_bytes())
    out_dir = Path(tempfile.gettempdir()) / f"sluice-go-produce-{digest.hexdigest()[:16]}"
    out = out_dir / "sluice-go-produce"
    if out.exists():
        return str(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".build-{os.getpid()}"
    env = {**os.environ, "GOFLAGS": (os.environ.get("GOFLAGS", "") + " -buildvcs=false").strip()}
    built = subprocess.run([go, "build", "-o", str(tmp), "./cmd/sluice-go-produce"], cwd=CLIENT_DIR, env=env,
                           capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
    if built.returncode != 0:
        raise RuntimeError(f"go build failed:\n{built.stdout}\n{built.stderr}")
    os.replace(tmp, out)  # atomic: a concurrent build of the same sources writes the same file
    return str(out)


def run_client(spec: ClientSpec, conn: Any, start: Any, counters: Any) -> None:
    """One Go client process (see bench/client.py for the protocol with the harness)."""
    cmd = [command_path(), "-socket", spec.socket_path or "", "-topic", spec.topic, "-count", str(spec.records),
           "-value-size", str(spec.value_size), "-linger", f"{spec.settings['go_linger_ms']}ms",
           "-frame-records", str(spec.settings["go_frame_records"]), "-ack-every", str(spec.settings["go_ack_every"]),
           "-distinct-values", str(POOL), "-max-in-flight", str(IN_FLIGHT),
           "-seed", str(spec.seed * 1_000_003 + spec.index),
           "-name", f"bench-go-{spec.index}", "-wait-start", "-timeout", "30m"]
    if spec.key_size:
        cmd += ["-keyed", "-key-size", str(spec.key_size), "-keys", str(KEYS)]
    if spec.rate:
        cmd += ["-rate", str(spec.rate)]
    if spec.deadline_s:
        cmd += ["-duration", f"{spec.deadline_s}s"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = json.loads(proc.stdout.readline() or "{}")  # type: ignore[union-attr]
        if not ready.get("ready"):
            proc.wait(_READY_TIMEOUT_S)
            raise RuntimeError(f"sluice-go-produce did not get ready: {ready} {proc.stderr.read() if proc.stderr else ''}")
        wait_for_start(conn, start)
        t0 = time.monotonic()
        proc.stdin.write("start\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"sluice-go-produce exited with {proc.returncode} without a summary:\n{err}")
    s = json.loads(lines[-1])
    sent = s["sent"]
    counters[spec.index] = sent
    ack_every = spec.settings["go_ack_every"]
    frames = "every frame" if ack_every == 1 else f"every {ack_every}th frame, the others fire-and-forget"
    method = (f"Go producer: Send() of a frame's first record to its acknowledgement, {frames} "
              f"({spec.settings['go_frame_records']} records)")
    result = ClientResult(index=spec.index, latency_method=method)
    result.sent = sent
    result.payload_bytes = sent * (spec.value_size + spec.key_size)
    # The command's own clock runs from its first send to its last ack; t0 is when it was told
    # to start (a pipe write earlier), on the harness's clock.
    result.t_start, result.t_end, result.cpu_s = t0, t0 + s["elapsed_s"], s["cpu_s"]
    lat = s.get("latency_ms") or {}
    if lat:
        result.reported_percentiles_ms = [lat["p50"], lat["p99"], lat["p999"]]
    result.errors = s["failed"] + s["refused"] + s["pending"]
    result.first_error = s["first_error"] or ("" if proc.returncode == 0 else f"exit status {proc.returncode}")
    if result.first_error and not result.errors:
        result.errors = 1
    if spec.compressible:
        result.notes.append("the Go client's values are seeded letters, not the compressible vocabulary")
    report(conn, result)
