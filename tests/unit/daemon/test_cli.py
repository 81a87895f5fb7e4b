"""``sluice send`` and ``sluice stats`` against a scripted daemon, and the CLI's exit codes."""

from __future__ import annotations

import io
import json
import sys
from typing import Any

import pytest

from daemon.cli import main
from shm import control

WELCOME = control.Welcome(version=1, workers=2, request_ring_bytes=1 << 16, completion_ring_bytes=4096, client_id=3)


class _Stdin:
    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)


def _acking(msg: Any) -> list[Any] | None:
    """A daemon that acknowledges every record: offsets count up per partition 0."""
    match msg:
        case control.Hello():
            return [WELCOME]
        case control.Produce(ack=True):
            base = _acking.next_offset  # type: ignore[attr-defined]
            _acking.next_offset += len(msg.records)  # type: ignore[attr-defined]
            results = [
                control.RecordResult(partition=0, offset=base + i, timestamp=0, error_code=0, error_name="NONE")
                for i in range(len(msg.records))
            ]
            return [control.ProduceAck(seq=msg.seq, results=results)]
        case control.Flush():
            return [control.FlushDone(complete=True, pending=0)]
        case control.StatsRequest():
            return [control.StatsReply(stats={"clients": 2, "connections": 5})]
        case control.Goodbye():
            return None
    return []


def test_send_with_acks_reports_offsets(scripted_daemon: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    _acking.next_offset = 100  # type: ignore[attr-defined]
    scripted_daemon.handler = _acking
    lines = b"".join(b"k%d:v%d\n" % (i, i) for i in range(2500))
    monkeypatch.setattr(sys, "stdin", _Stdin(lines))
    assert main(["send", "-t", "clicks", "-K", ":", "--acks", "--socket", scripted_daemon.path]) == 0
    err = capsys.readouterr().err
    assert "sent 2500 records to clicks: 2500 acknowledged, 0 failed (p0:100..2599)" in err
    produced = [m for m in scripted_daemon.received if isinstance(m, control.Produce)]
    assert [len(m.records) for m in produced] == [1000, 1000, 500]
    assert produced[0].records[7] == control.Rec(key=b"k7", value=b"v7")
    assert isinstance(scripted_daemon.received[0], control.Hello) and scripted_daemon.received[0].client_name == "sluice-cli"
    scripted_daemon.wait_for(control.Goodbye)
    assert isinstance(scripted_daemon.received[-1], control.Goodbye)


def test_send_counts_failed_records(scripted_daemon: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    def failing(msg: Any) -> list[Any] | None:
        if isinstance(msg, control.Produce):
            results = [control.RecordResult(partition=1, offset=-1, timestamp=-1, error_code=10, error_name="MESSAGE_TOO_LARGE")
                       for _ in msg.records]
            return [control.ProduceAck(seq=msg.seq, results=results)]
        return _acking(msg)

    scripted_daemon.handler = failing
    monkeypatch.setattr(sys, "stdin", _Stdin(b"a\nb\n"))
    assert main(["send", "-t", "clicks", "--acks", "--socket", scripted_daemon.path]) == 1
    err = capsys.readouterr().err
    assert "2 acknowledged" not in err and "0 acknowledged, 2 failed" in err and "MESSAGE_TOO_LARGE: 2" in err


def test_stats_json(scripted_daemon: Any, capsys: Any) -> None:
    scripted_daemon.handler = _acking
    assert main(["stats", "--json", "--socket", scripted_daemon.path]) == 0
    assert json.loads(capsys.readouterr().out) == {"clients": 2, "connections": 5}


def test_refusals_and_unreachable_daemon(scripted_daemon: Any, capsys: Any, tmp_path: Any) -> None:
    scripted_daemon.handler = lambda msg: [
        control.ErrorReply(code=control.ERR_NOT_ALLOWED, name="NOT_ALLOWED", message="uid 1000 is not allowed", fatal=True)
    ]
    assert main(["stats", "--socket", scripted_daemon.path]) == 1
    assert capsys.readouterr().err.strip() == "sluice: NOT_ALLOWED: uid 1000 is not allowed"
    # The daemon hangs up after the Welcome: the connection was lost.
    scripted_daemon.handler = lambda msg: [WELCOME] if isinstance(msg, control.Hello) else None
    assert main(["stats", "--socket", scripted_daemon.path]) == 2
    assert "lost the connection" in capsys.readouterr().err
    assert main(["stats", "--socket", str(tmp_path / "nobody.sock")]) == 2
    assert "cannot reach the daemon" in capsys.readouterr().err


def test_check_config_exit_codes(tmp_path: Any, capsys: Any) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\nno_such_key = 1\n")
    assert main(["check-config", str(bad)]) == 78  # EX_CONFIG, as the unit file expects
    assert "no_such_key" in capsys.readouterr().err
    # --config FILE, as `sluice run` takes it, works too.
    assert main(["check-config", "--config", str(bad)]) == 78
    assert "no_such_key" in capsys.readouterr().err
    good = tmp_path / "good.toml"
    good.write_text("[daemon]\nworkers = 2\n")
    assert main(["check-config", "-c", str(good)]) == 0
    assert "ok (2 workers" in capsys.readouterr().out


class _Trickle(io.RawIOBase):
    """A pipe that hands out at most ``step`` bytes per read, so lines straddle reads."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data, self._step, self._at = data, step, 0

    def read1(self, n: int = -1) -> bytes:
        chunk = self._data[self._at : self._at + min(self._step, n if n > 0 else self._step)]
        self._at += len(chunk)
        return chunk


@pytest.mark.parametrize("step", [1, 3, 7, 1 << 20])
def test_lines_become_records_whatever_the_reads_look_like(step: int) -> None:
    from daemon.cli import _frames

    data = b"k1:v1\r\nplain\n\n:lead\nk2:v:2\r\nlast without newline"
    recs = [r for frame in _frames(_Trickle(data, step), b":", None) for r in frame]  # type: ignore[arg-type]
    assert recs == [control.Rec(key=b"k1", value=b"v1"), control.Rec(value=b"plain"), control.Rec(value=b""),
                    control.Rec(key=b"", value=b"lead"), control.Rec(key=b"k2", value=b"v:2"),
                    control.Rec(value=b"last without newline")]
    frames = list(_frames(_Trickle(b"x\n" * 2500, step), None, 3))  # type: ignore[arg-type]
    assert sum(map(len, frames)) == 2500 and max(map(len, frames)) <= 1000
    assert all(r == control.Rec(value=b"x", partition=3) for f in frames for r in f)
