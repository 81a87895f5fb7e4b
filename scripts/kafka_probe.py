"""Readiness probe for the local broker, with the standard library only.

It sends a real ApiVersions (v0) and Metadata (v4) request and succeeds once the broker answers
ApiVersions without error and lists at least MIN_BROKERS brokers (default 1: itself) in
Metadata; a cluster's node is ready once it lists them all. It deliberately shares no code with
Sluice's own codec, so a bug there cannot make a dead broker look alive.

Usage: python3 kafka_probe.py HOST PORT [TIMEOUT_S [MIN_BROKERS]]   (exit 0 ready, 1 not ready)
"""

from __future__ import annotations

import socket
import struct
import sys


def _request(sock: socket.socket, api_key: int, version: int, corr: int, body: bytes) -> bytes:
    client_id = b"sluice-probe"
    header = struct.pack(">hhih", api_key, version, corr, len(client_id)) + client_id
    msg = header + body
    sock.sendall(struct.pack(">i", len(msg)) + msg)
    size = struct.unpack(">i", _recv_exact(sock, 4))[0]
    resp = _recv_exact(sock, size)
    (got,) = struct.unpack_from(">i", resp)
    if got != corr:
        raise RuntimeError(f"correlation id {got} != {corr}")
    return resp[4:]


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        buf += chunk
    return bytes(buf)


def probe(host: str, port: int, timeout: float, min_brokers: int = 1) -> str:
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        api = _request(sock, 18, 0, 1, b"")  # ApiVersions v0: empty body
        (err,) = struct.unpack_from(">h", api)
        if err:
            raise RuntimeError(f"ApiVersions error code {err}")
        # Metadata v4: topics = [] (no topics, just brokers), allow_auto_topic_creation = false
        meta = _request(sock, 3, 4, 2, struct.pack(">i?", 0, False))
        _throttle, nbrokers = struct.unpack_from(">ii", meta)
        if nbrokers < min_brokers:
            raise RuntimeError(f"Metadata lists {nbrokers} of {min_brokers} brokers")
    return f"ready: {nbrokers} broker(s)"


def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 2.0
    min_brokers = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    try:
        print(probe(host, port, timeout, min_brokers))
    except (OSError, RuntimeError, struct.error) as exc:
        print(f"not ready: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
