"""daemon.state: the state file and the clean-shutdown marker on a real directory, and Tokens."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from daemon.state import CLEAN_MARKER, CLIENT_ID_BLOCK, STATE_FILE, Saved, StateDir, Tokens

BIG_TOKEN = 0xFEDC_BA98_7654_3211  # 64 bits: the file holds it as 16 hex digits


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    d = StateDir(str(tmp_path))
    d.write({"orders": (0, 6), "clicks": (3, 12)}, {BIG_TOKEN: 7, 1: 2})
    assert d.read() == Saved({"orders": (0, 6), "clicks": (3, 12)}, {BIG_TOKEN: 7, 1: 2})
    raw = json.loads((tmp_path / STATE_FILE).read_text())
    assert raw["version"] == 1
    assert raw["clients"] == {f"{BIG_TOKEN:016x}": 7, f"{1:016x}": 2}
    assert os.listdir(tmp_path) == [STATE_FILE]  # the temporary file was renamed, not left


def test_write_replaces_the_whole_file(tmp_path: Path) -> None:
    d = StateDir(str(tmp_path))
    d.write({"a": (0, 1), "b": (1, 1)}, {5: 1})
    d.write({"b": (1, 2)}, {})
    assert d.read() == Saved({"b": (1, 2)}, {})


def test_read_without_a_file_is_none(tmp_path: Path) -> None:
    assert StateDir(str(tmp_path)).read() is None


@pytest.mark.parametrize(
    "content",
    ["{not json", '{"topics": {"a": [1]}}', '{"topics": [], "clients": {}}', '{"clients": {"zz": 1}}', "[]"],
)
def test_unreadable_state_is_ignored_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str) -> None:
    (tmp_path / STATE_FILE).write_text(content)
    with caplog.at_level(logging.WARNING, logger="sluice.state"):
        assert StateDir(str(tmp_path)).read() is None
    assert "ignoring unreadable daemon state" in caplog.text


def test_write_failure_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = StateDir(str(tmp_path / "missing"))
    with caplog.at_level(logging.ERROR, logger="sluice.state"):
        d.write({"a": (0, 1)}, {})
        d.mark_clean()
    assert "cannot save the daemon state" in caplog.text
    assert "cannot write the clean-shutdown marker" in caplog.text


def test_clean_marker_is_consumed_at_start(tmp_path: Path) -> None:
    d = StateDir(str(tmp_path))
    assert d.take_clean_marker() is False  # no marker: the previous daemon died (or never ran)
    d.mark_clean()
    assert (tmp_path / CLEAN_MARKER).exists()
    assert d.take_clean_marker() is True
    # Removed, so that this daemon dying later is not mistaken for a clean stop.
    assert not (tmp_path / CLEAN_MARKER).exists()
    assert d.take_clean_marker() is False


def test_new_token_maps_to_the_connection_id() -> None:
    t = Tokens()
    assert t.claim(BIG_TOKEN, 3, live={3}) == 3
    assert t.snapshot() == {BIG_TOKEN: 3}
    assert t.awaited == frozenset()
    assert t.next_client_id() == 1


def test_restored_token_gets_its_old_id_back_once() -> None:
    t = Tokens()
    t.restore({BIG_TOKEN: 7, 11: 4})
    assert t.awaited == {7, 4}
    assert t.next_client_id() == 8  # new connections never take an awaited id
    assert t.claim(BIG_TOKEN, 8, live={8}) == 7
    assert t.awaited == {4}
    assert t.snapshot() == {BIG_TOKEN: 7, 11: 4}  # unchanged: nothing to save


def test_token_whose_old_id_is_live_gets_the_new_id(caplog: pytest.LogCaptureFixture) -> None:
    t = Tokens()
    t.restore({BIG_TOKEN: 7})
    with caplog.at_level(logging.WARNING, logger="sluice.state"):
        assert t.claim(BIG_TOKEN, 9, live={7, 9}) == 9
    assert "in use by a live connection" in caplog.text
    assert t.snapshot() == {BIG_TOKEN: 9}


def test_forget_only_the_token_of_that_client() -> None:
    t = Tokens()
    t.claim(5, 1, live=())
    assert t.forget(5, 2) is False  # the token now belongs to another id
    assert t.forget(0, 1) is False  # no token at all
    assert t.forget(5, 1) is True
    assert t.snapshot() == {}
    assert t.forget(5, 1) is False


def test_expire_forgets_the_clients_that_did_not_come_back() -> None:
    t = Tokens()
    t.restore({1: 4, 2: 6, 3: 5})
    assert t.claim(3, 9, live={9}) == 5  # client 5 came back
    assert t.expire(live={5, 6}) == [4]  # 6 is connected (under its id) but 4 is not
    assert t.awaited == frozenset()
    assert t.snapshot() == {2: 6, 3: 5}
    assert t.next_client_id() == 1


def test_the_client_id_reservation_round_trips_and_older_files_read_as_none(tmp_path: Path) -> None:
    d = StateDir(str(tmp_path))
    d.write({"orders": (0, 6)}, {BIG_TOKEN: 7}, 2048)
    assert d.read() == Saved({"orders": (0, 6)}, {BIG_TOKEN: 7}, 2048)
    (tmp_path / STATE_FILE).write_text('{"version": 1, "topics": {}, "clients": {}}')  # before the key
    assert d.read() == Saved({}, {}, 0)


def test_client_ids_are_reserved_in_blocks_and_never_reused_after_a_restart() -> None:
    t = Tokens()
    assert t.next_client_id() == 1
    assert t.reserve(1) is True and t.reserved == 1 + CLIENT_ID_BLOCK  # save before giving out 1
    assert not any(t.reserve(cid) for cid in range(2, 1 + CLIENT_ID_BLOCK))  # within the block
    assert t.reserve(1 + CLIENT_ID_BLOCK) is True and t.reserved == 1 + 2 * CLIENT_ID_BLOCK
    # The next daemon: ids the first one may have given (below the saved reservation) are never
    # given again, awaited or not, so a recovered runs table never names a new client.
    after = Tokens()
    after.restore({BIG_TOKEN: 7})
    after.restore_reserved(t.reserved)
    assert after.next_client_id() == 1 + 2 * CLIENT_ID_BLOCK
    assert after.reserve(after.next_client_id()) is True
    # An older state file (no reservation saved): after the awaited ids, as before.
    old = Tokens()
    old.restore({BIG_TOKEN: 7})
    old.restore_reserved(0)
    assert old.next_client_id() == 8
