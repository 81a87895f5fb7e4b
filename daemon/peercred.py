"""Who is on the other end of a Unix socket: ``SO_PEERCRED`` and an allow-list check.

Access to the daemon has two gates. The first is the filesystem: the socket is mode 0660,
owned by the daemon's user and group, inside a 0750 runtime directory, so only members of that
group (and root) can connect at all. The second is this module: the supervisor calls
:func:`check_peer` on every accepted connection, before the handshake, with the config's
``allowed_uids`` and ``allowed_gids``, and closes the connection (logging the reason) when it
returns one. That lets a host where many services share the socket group still say exactly
which users may produce.

Rules of :func:`check_peer`:

* both lists empty: everyone who got through the first gate is allowed;
* otherwise the peer is allowed when its uid is in ``allowed_uids``, or its primary gid or any
  of its supplementary groups is in ``allowed_gids``;
* root (uid 0) gets no exception: list 0 explicitly if ``sudo sluice stats`` should work.

The credentials are the ones the peer had when it called ``connect()`` (the kernel records
them then), so a client cannot change them afterwards by dropping or gaining privileges.
Supplementary groups come from ``SO_PEERGROUPS`` (Linux >= 4.13), recorded at the same moment;
only where that is unavailable or the list is too long for one ``getsockopt`` (over 256 groups)
does the module fall back to the ``Groups:`` line of ``/proc/<pid>/status``, which is read later
and therefore racy (the peer may have exited and its pid been reused), and hidden when the
daemon runs with ``ProtectProc=invisible`` (then only the primary gid counts).
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Collection

__all__ = ["peer_credentials", "peer_groups", "check_peer"]

_UCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
# Not exported by Python's socket module; the value is fixed in the Linux ABI (asm-generic).
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
# CPython's getsockopt() refuses buffers over 1024 bytes: 256 gid_t values.
_MAX_GROUPS_BUF = 1024


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process that connected ``sock`` (an ``AF_UNIX`` socket).

    Raises:
        OSError: the socket has no peer credentials (not ``AF_UNIX``, not connected).
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    if pid == 0 and uid == -1:
        # What the kernel reports for a socket that carries no credentials (TCP, unconnected):
        # uid -1 must never reach an allow-list as if it were a user.
        raise OSError(errno.ENOTCONN, "socket has no peer credentials")
    return pid, uid, gid


def _parse_groups_line(status_text: str) -> tuple[int, ...] | None:
    for line in status_text.splitlines():
        if line.startswith("Groups:"):
            return tuple(int(g) for g in line[len("Groups:"):].split())
    return None


def _proc_groups(pid: int) -> tuple[int, ...] | None:
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            return _parse_groups_line(f.read())
    except (OSError, ValueError):
        return None


def peer_groups(sock: socket.socket, pid: int | None = None) -> tuple[int, ...] | None:
    """Supplementary group ids of the peer, or ``None`` when they cannot be learnt.

    Uses ``SO_PEERGROUPS`` (captured at ``connect()``); falls back to ``/proc/<pid>/status``
    (``pid`` from :func:`peer_credentials` when not given), see the module docstring.
    """
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, _MAX_GROUPS_BUF)
    except OSError as exc:
        if exc.errno not in (errno.ERANGE, errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    else:
        count = len(raw) // 4
        return struct.unpack(f"{count}I", raw[: count * 4])
    if pid is None:
        pid = peer_credentials(sock)[0]
    return _proc_groups(pid)


def check_peer(sock: socket.socket, allowed_uids: Collection[int],
               allowed_gids: Collection[int]) -> str | None:
    """Decide whether the peer of ``sock`` may use the daemon.

    Returns:
        ``None`` when allowed, else a one-line reason for the log (it names the peer's pid,
        uid and gid; send the client no more than "access denied").
    """
    if not allowed_uids and not allowed_gids:
        return None
    try:
        pid, uid, gid = peer_credentials(sock)
    except OSError as exc:
        return f"peer credentials unavailable ({exc.strerror or exc}); refusing"
    if uid in allowed_uids:
        return None
    if gid in allowed_gids:
        return None
    groups: tuple[int, ...] | None = None
    if allowed_gids:
        try:
            groups = peer_groups(sock, pid)
        except OSError:
            groups = None
        if groups is not None and any(g in allowed_gids for g in groups):
            return None
    if not allowed_gids:
        shown = "not checked"
    elif groups is None:
        shown = "unknown"
    else:
        shown = ",".join(map(str, groups)) or "none"
    return (f"peer pid {pid} uid {uid} gid {gid} (supplementary groups: {shown}) matches "
            f"neither allowed_uids {sorted(allowed_uids)} nor allowed_gids {sorted(allowed_gids)}")
