"""The ``sluice`` command: ``run`` the daemon, ``send`` lines from stdin, show ``stats``.

``sluice send`` and ``sluice stats`` speak the socket protocol of docs/PROTOCOL.md, like any
non-Python client would.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import BinaryIO

from shm import control
from shm.connection import Connection, hello_for, socket_path
from shm.errors import KafkaError, SluiceError

__all__ = ["main"]

_LINES_PER_FRAME = 1000
_READ_BYTES = 1 << 20
_MAX_UNACKED_FRAMES = 8
_TIMEOUT_S = 30.0
_EXIT_UNREACHABLE = 2


def _connect(arg: str | None) -> Connection:
    """The daemon's socket (``--socket``, else $SLUICE_SOCKET, else the default), greeted."""
    return Connection(socket_path(arg), hello=hello_for("sluice-cli"), timeout=_TIMEOUT_S)


def _frames(stream: BinaryIO, sep: bytes | None, partition: int | None) -> Iterator[list[control.Rec]]:
    """The lines of ``stream`` as records, at most ``_LINES_PER_FRAME`` per list: read in blocks
    of ``_READ_BYTES`` and split in bulk (a line-at-a-time loop cost more than the socket)."""
    tail = b""
    while True:
        block = stream.read1(_READ_BYTES) if hasattr(stream, "read1") else stream.read(_READ_BYTES)
        if not block:
            break
        buf = tail + block if tail else block
        lines = buf.split(b"\n")
        tail = lines.pop()  # a line not finished yet (b"" after a final newline)
        recs = _records(lines, sep, partition, b"\r" in buf)
        for start in range(0, len(recs), _LINES_PER_FRAME):
            yield recs[start : start + _LINES_PER_FRAME]
    if tail:
        yield _records([tail], sep, partition, tail.endswith(b"\r"))


def _records(lines: list[bytes], sep: bytes | None, partition: int | None, crlf: bool) -> list[control.Rec]:
    """One record per line (a trailing CR dropped); with ``sep``, the key is what comes before
    its first occurrence."""
    Rec = control.Rec
    if crlf:
        lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    if sep is None:
        return [Rec(value=line, partition=partition) for line in lines]
    out = []
    for line in lines:
        kv = line.split(sep, 1)
        out.append(Rec(key=kv[0], value=kv[1], partition=partition) if len(kv) == 2 else Rec(value=line, partition=partition))
    return out


def cmd_send(args: argparse.Namespace) -> int:
    with _connect(args.socket) as conn:
        return _send_lines(conn, args)


def _send_lines(conn: Connection, args: argparse.Namespace) -> int:
    sep = args.key_delimiter.encode() if args.key_delimiter else None
    seq = 0
    sent = ok = failed = 0
    unacked: set[int] = set()
    errors: dict[str, int] = {}
    offsets: dict[int, list[int]] = {}  # partition -> [lowest, highest] offset acknowledged

    def take_ack() -> None:
        nonlocal ok, failed
        msg = conn.recv()
        if isinstance(msg, control.ErrorReply):
            raise SystemExit(f"sluice: {msg.name}: {msg.message}")
        if not isinstance(msg, control.ProduceAck):
            return
        unacked.discard(msg.seq)
        for r in msg.results:
            if r.error_code == 0:
                ok += 1
                o = r.offset
                span = offsets.get(r.partition)
                if span is None:
                    offsets[r.partition] = [o, o]
                elif o < span[0]:
                    span[0] = o
                elif o > span[1]:
                    span[1] = o
            else:
                failed += 1
                errors[r.error_name] = errors.get(r.error_name, 0) + 1

    for batch in _frames(sys.stdin.buffer, sep, args.partition):
        seq += 1
        conn.send(control.Produce(topic=args.topic, records=batch, ack=args.acks, seq=seq))
        sent += len(batch)
        if args.acks:
            unacked.add(seq)
            while len(unacked) >= _MAX_UNACKED_FRAMES:
                take_ack()
    while unacked:
        take_ack()
    conn.send(control.Flush(timeout_ms=int(args.timeout * 1000)))
    done = conn.expect(control.FlushDone)
    conn.send(control.Goodbye())
    if args.acks:
        parts = ", ".join(f"p{p}:{lo}..{hi}" for p, (lo, hi) in sorted(offsets.items()))
        print(f"sent {sent} records to {args.topic}: {ok} acknowledged, {failed} failed" + (f" ({parts})" if parts else ""), file=sys.stderr)
        for name, n in sorted(errors.items()):
            print(f"  {name}: {n}", file=sys.stderr)
        return 0 if failed == 0 else 1
    line = f"sent {sent} records to {args.topic}"
    if done.failed:
        line += f": {done.failed} failed (see sluice stats, socket.refused and failed by topic)"
    if not done.complete:
        line += f" ({done.pending} records still pending)"
    print(line, file=sys.stderr)
    return 0 if done.failed == 0 and done.complete else 1


def cmd_stats(args: argparse.Namespace) -> int:
    from daemon.stats import format_table

    with _connect(args.socket) as conn:
        reply = conn.request(control.StatsRequest(), control.StatsReply)
        conn.send(control.Goodbye())
    if args.json:
        print(json.dumps(reply.stats, indent=2, sort_keys=True))
    else:
        print(format_table(reply.stats))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from daemon.supervisor import run

    return run(args.config)


def cmd_check(args: argparse.Namespace) -> int:
    from daemon.config import EXIT_CONFIG, ConfigError, load

    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"sluice: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{args.config}: ok ({cfg.daemon.worker_count()} workers, profiles: {', '.join(sorted(cfg.profiles))})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sluice", description="Sluice: a local ingestion daemon for Apache Kafka.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the daemon in the foreground")
    p.add_argument("--config", "-c", required=True, help="TOML config file")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("send", help="send stdin lines as records (like kcat -P)")
    p.add_argument("-t", "--topic", required=True)
    p.add_argument("-K", "--key-delimiter", help="split each line into key and value at this string")
    p.add_argument("-p", "--partition", type=int, default=None)
    p.add_argument("--acks", action="store_true", help="wait for every record's outcome and report offsets")
    p.add_argument("--socket", help="daemon socket (default $SLUICE_SOCKET or /run/sluice/sluice.sock)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for delivery at the end")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("stats", help="show the daemon's counters")
    p.add_argument("--json", action="store_true")
    p.add_argument("--socket")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("check-config", help="validate a config file and exit")
    p.add_argument("config", nargs="?", help="TOML config file (or --config FILE, as for run)")
    p.add_argument("--config", "-c", dest="config_option", metavar="CONFIG", help="TOML config file")
    p.set_defaults(func=cmd_check)

    args = parser.parse_args(argv)
    if args.command == "check-config":
        if (args.config is None) == (args.config_option is None):
            parser.error("check-config: give the config file once, as CONFIG or --config CONFIG")
        args.config = args.config or args.config_option
    try:
        return args.func(args)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        print(f"sluice: cannot reach the daemon: {exc}", file=sys.stderr)
        return _EXIT_UNREACHABLE
    except ConnectionError as exc:  # it went away mid-session (stopped, or dropped us)
        print(f"sluice: lost the connection to the daemon: {exc}", file=sys.stderr)
        return _EXIT_UNREACHABLE
    except KafkaError as exc:  # an ErrorReply with a Kafka code
        print(f"sluice: {exc.name}: {exc}", file=sys.stderr)
        return 1
    except SluiceError as exc:  # any other ErrorReply ("NAME: message"), or an unexpected reply
        print(f"sluice: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
