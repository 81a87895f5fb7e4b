"""SO_PEERCRED credentials and the allow-list, with real sockets (and real other users as root)."""

from __future__ import annotations

import os
import select
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator

import pytest

from daemon import peercred

NOBODY = 65534
# A gid that is neither ours nor nobody's; it need not exist in /etc/group.
SPARE_GID = 4242


def _foreign(ids: set[int]) -> int:
    """An id not in ``ids`` (so a list of it cannot match us)."""
    candidate = 54321
    while candidate in ids:
        candidate += 1
    return candidate


def test_peer_credentials_socketpair(pair) -> None:
    assert peercred.peer_credentials(pair[0]) == (os.getpid(), os.getuid(), os.getgid())
    assert peercred.peer_credentials(pair[1]) == (os.getpid(), os.getuid(), os.getgid())


def test_peer_groups_match_ours(pair) -> None:
    groups = peercred.peer_groups(pair[0])
    assert groups is not None
    assert set(groups) == set(os.getgroups())


def test_empty_lists_allow_everyone(pair) -> None:
    assert peercred.check_peer(pair[0], [], []) is None
    assert peercred.check_peer(pair[0], (), frozenset()) is None


def test_own_uid_allowed(pair) -> None:
    assert peercred.check_peer(pair[0], [os.getuid()], []) is None
    assert peercred.check_peer(pair[0], {_foreign({os.getuid()}), os.getuid()}, [SPARE_GID]) is None


def test_own_primary_gid_allowed(pair) -> None:
    other_uid = _foreign({os.getuid()})
    assert peercred.check_peer(pair[0], [other_uid], [os.getgid()]) is None


def test_supplementary_group_allowed(pair) -> None:
    supplementary = [g for g in os.getgroups() if g != os.getgid()]
    if not supplementary:
        pytest.skip("this process has no supplementary group besides its primary gid "
                    "(test_supplementary_group_logic and the root tests cover it)")
    other_uid = _foreign({os.getuid()})
    assert peercred.check_peer(pair[0], [other_uid], [supplementary[0]]) is None


def test_supplementary_group_logic(pair, monkeypatch) -> None:
    other_uid = _foreign({os.getuid()})
    other_gid = _foreign({os.getgid(), *os.getgroups()})
    monkeypatch.setattr(peercred, "peer_groups", lambda sock, pid=None: (7, other_gid))
    assert peercred.check_peer(pair[0], [other_uid], [other_gid]) is None
    monkeypatch.setattr(peercred, "peer_groups", lambda sock, pid=None: None)
    reason = peercred.check_peer(pair[0], [other_uid], [other_gid])
    assert reason is not None and "supplementary groups: unknown" in reason


def test_peer_groups_proc_fallback(pair, monkeypatch) -> None:
    """Where SO_PEERGROUPS is missing (ENOPROTOOPT), /proc/<pid>/status supplies the groups."""
    monkeypatch.setattr(peercred, "_SO_PEERGROUPS", 0x7FFF)
    with pytest.raises(OSError):
        pair[0].getsockopt(socket.SOL_SOCKET, 0x7FFF, 64)
    groups = peercred.peer_groups(pair[0])
    assert groups is not None and set(groups) == set(os.getgroups())


def test_refused_with_reason(pair) -> None:
    mine = {os.getgid(), *os.getgroups()}
    other_uid = _foreign({os.getuid()})
    other_gid = _foreign(mine)
    reason = peercred.check_peer(pair[0], [other_uid], [other_gid])
    assert reason is not None
    assert f"pid {os.getpid()}" in reason
    assert f"uid {os.getuid()}" in reason
    assert f"gid {os.getgid()}" in reason
    assert str(other_uid) in reason and str(other_gid) in reason
    # Only a uid list: groups are not consulted, and the reason says so.
    reason = peercred.check_peer(pair[0], [other_uid], [])
    assert reason is not None and "not checked" in reason


def test_socket_without_credentials_is_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        reason = peercred.check_peer(tcp, [os.getuid()], [])
    # uid list includes us, but a TCP socket carries no credentials: refuse, never guess.
    assert reason is not None and "credentials unavailable" in reason


def test_proc_groups_parsing() -> None:
    status = "Name:\tpython\nUid:\t0\t0\t0\t0\nGroups:\t4 24 27 \nNSpid:\t1\n"
    assert peercred._parse_groups_line(status) == (4, 24, 27)
    assert peercred._parse_groups_line("Groups:\t\n") == ()
    assert peercred._parse_groups_line("Name:\tx\n") is None
    assert set(peercred._proc_groups(os.getpid()) or ()) == set(os.getgroups())
    assert peercred._proc_groups(0) is None


# ---------------------------------------------------------------------------------------------
# A real other user (needs root and the right to setuid in a forked child).


def _spawn_client(path: str, uid: int, gid: int, extra_groups: list[int]) -> tuple[int, int]:
    """Fork a child that becomes uid/gid, connects to ``path`` and reports what it got back.

    Returns (child pid, read end of its report pipe); see :func:`_collect` for the report.
    The child never returns into pytest: it always _exits. No thread runs while forking.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(rfd)
            try:
                os.setgroups(extra_groups)
                os.setgid(gid)
                os.setuid(uid)
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(5)
                    s.connect(path)
                    chunks = []
                    while True:
                        data = s.recv(4096)
                        if not data:
                            break
                        chunks.append(data)
                msg = b"reply:" + b"".join(chunks)
            except BaseException as exc:  # report everything to the parent
                msg = f"error:{type(exc).__name__}:{getattr(exc, 'errno', None)}".encode()
            os.write(wfd, msg)
        finally:
            os._exit(0)
    os.close(wfd)
    return pid, rfd


def _collect(pid: int, rfd: int) -> str:
    """The child's report: "reply:<what the server sent>" or "error:<ExceptionName>:<errno>"."""
    chunks = []
    while True:
        ready, _, _ = select.select([rfd], [], [], 10)
        if not ready:
            break
        data = os.read(rfd, 4096)
        if not data:
            break
        chunks.append(data)
    os.close(rfd)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


def _connect_as(path: str, uid: int, gid: int, extra_groups: list[int]) -> tuple[int, str]:
    pid, rfd = _spawn_client(path, uid, gid, extra_groups)
    return pid, _collect(pid, rfd)


class Listener:
    def __init__(self, mode: int) -> None:
        self.dir = tempfile.mkdtemp(prefix="sluice-peercred-")
        os.chmod(self.dir, 0o755)  # like /run/sluice: the socket's own mode is the gate
        self.path = os.path.join(self.dir, "sluice.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        os.chmod(self.path, mode)
        self.sock.listen(4)
        self.sock.settimeout(10)

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _serve_one(listener: Listener, allowed_uids, allowed_gids, uid, gid, extra):
    """Accept one connection from a child running as uid, answer with the check's verdict."""
    verdict: dict[str, object] = {}
    child, rfd = _spawn_client(listener.path, uid, gid, extra)
    # Either the child connects (the listener turns readable) or it reports an error first.
    ready, _, _ = select.select([listener.sock, rfd], [], [], 10)
    if listener.sock in ready:
        conn, _ = listener.sock.accept()
        with conn:
            verdict["creds"] = peercred.peer_credentials(conn)
            reason = peercred.check_peer(conn, allowed_uids, allowed_gids)
            verdict["reason"] = reason
            conn.sendall(b"ALLOWED" if reason is None else b"DENIED")
    return child, _collect(child, rfd), verdict


def _need_setuid() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another uid (nobody)")
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")


def _skip_if_setuid_refused(report: str) -> None:
    if report == "error:PermissionError:1":  # EPERM from setgroups/setgid/setuid
        pytest.skip("this machine does not allow setuid in a child (no CAP_SETUID here)")


@pytest.fixture
def listener_0666() -> Iterator[Listener]:
    lst = Listener(0o666)
    try:
        yield lst
    finally:
        lst.close()


def test_other_uid_refused(listener_0666: Listener) -> None:
    _need_setuid()
    child, report, verdict = _serve_one(listener_0666, [os.getuid()], [os.getgid()],
                                        NOBODY, NOBODY, [])
    _skip_if_setuid_refused(report)
    assert report == "reply:DENIED", (report, verdict)
    assert verdict["creds"] == (child, NOBODY, NOBODY)
    reason = verdict["reason"]
    assert isinstance(reason, str) and f"uid {NOBODY}" in reason and f"pid {child}" in reason


def test_other_uid_allowed_by_uid(listener_0666: Listener) -> None:
    _need_setuid()
    child, report, verdict = _serve_one(listener_0666, [NOBODY], [], NOBODY, NOBODY, [])
    _skip_if_setuid_refused(report)
    assert report == "reply:ALLOWED", (report, verdict)


def test_other_uid_allowed_by_supplementary_group(listener_0666: Listener) -> None:
    """nobody with SPARE_GID as a supplementary group is allowed by allowed_gids=[SPARE_GID]."""
    _need_setuid()
    child, report, verdict = _serve_one(listener_0666, [os.getuid()], [SPARE_GID],
                                        NOBODY, NOBODY, [SPARE_GID])
    _skip_if_setuid_refused(report)
    assert report == "reply:ALLOWED", (report, verdict)
    assert verdict["creds"] == (child, NOBODY, NOBODY)


def test_socket_mode_0660_keeps_others_out() -> None:
    """The first gate: without the socket's group, connect() itself fails with EACCES."""
    _need_setuid()
    lst = Listener(0o660)
    try:
        st = os.stat(lst.path)
        assert stat.S_IMODE(st.st_mode) == 0o660
        _, report = _connect_as(lst.path, NOBODY, NOBODY, [])
        _skip_if_setuid_refused(report)
        assert report == "error:PermissionError:13", report
        # ...and with the socket's group as a supplementary group it gets through.
        _, _, verdict = _serve_one(lst, [], [], NOBODY, NOBODY, [st.st_gid])
        assert verdict.get("reason", "missing") is None, verdict
    finally:
        lst.close()
