"""A control connection to the daemon's Unix socket, and reconnecting to a restarted daemon.

The socket protocol itself (message Structs, framing) is :mod:`shm.control`; this module is
the blocking client end of it. :class:`Connection` is shared by ``sluice send`` and ``sluice
stats``, the bench's socket runner, the tests and :class:`ProducerConnection`, the producer's
connection: the handshake, the segment offer, topic lookups, and reconnecting to a restarted
daemon with the same segment::

    with Connection(socket_path(None), hello=hello_for("my-tool")) as conn:
        stats = conn.request(control.StatsRequest(), control.StatsReply).stats

Threads: one thread may send while another receives (the kernel orders each side); two
receivers, or two request/reply pairs at once, need the caller's lock.

Unsolicited messages (``TopicChanged``, for a Hello with ``topic_updates``) are never returned
as replies: whichever read brings one in hands it to the connection's ``on_notice`` at once, in
stream order, and goes on waiting for the reply it wanted. :class:`ProducerConnection` keeps one
reader at a time: a request holds its lock while it waits, and the completion thread reads only
what is already there (:meth:`ProducerConnection.read_notices`), and only when no request is
waiting, so it never takes a reply from a request.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from shm import control
from shm.errors import ConnectionClosedError, KafkaError, ProducerClosedError, ProtocolError, SluiceError
from shm.segment import Segment, send_fds

__all__ = [
    "DEFAULT_SOCKET",
    "Connection",
    "socket_path",
    "hello_for",
    "reply_error",
    "ProducerConnection",
]

log = logging.getLogger("sluice.client")

DEFAULT_SOCKET = "/run/sluice/sluice.sock"
_RECV_BYTES = 1 << 20
# Reconnect back-off: quick first tries (a systemd restart takes well under a second), then
# no faster than twice a second so a crash-looping daemon is not hammered.
_FIRST_DELAY_S = 0.05
_MAX_DELAY_S = 0.5

_M = TypeVar("_M")


def socket_path(path: str | None) -> str:
    """``path``, else ``$SLUICE_SOCKET``, else :data:`DEFAULT_SOCKET`."""
    return path or os.environ.get("SLUICE_SOCKET") or DEFAULT_SOCKET


def hello_for(
    client_name: str, *, wants_segment: bool = False, token: int = 0, topic_updates: bool = False
) -> control.Hello:
    """The Hello this process sends (this protocol version and pid)."""
    return control.Hello(
        version=control.PROTOCOL_VERSION,
        client_name=client_name,
        pid=os.getpid(),
        wants_segment=wants_segment,
        token=token,
        topic_updates=topic_updates,
    )


def reply_error(msg: control.ErrorReply) -> SluiceError:
    """The exception an ErrorReply stands for: the KafkaError subclass for a Kafka code (below
    1000), else a SluiceError whose message is ``"NAME: message"``."""
    if 0 < msg.code < 1000:
        return KafkaError.for_code(msg.code, msg.message)
    return SluiceError(f"{msg.name}: {msg.message}")


class Connection:
    """One blocking control-protocol connection.

    Args:
        path: the daemon's socket.
        hello: say this Hello and wait for the Welcome (kept in ``welcome``); None to say
            nothing (a test that sends its own first bytes).
        timeout: seconds for connect and for every later send or receive; None blocks.
        on_notice: called with each unsolicited message (TopicChanged) as it is read, on the
            reading thread; never returned by :meth:`recv`. None drops them.

    Raises:
        OSError: the socket could not be reached.
        SluiceError: the daemon refused the Hello (see :func:`reply_error`), or hung up
            (:class:`ConnectionClosedError`).
    """

    def __init__(
        self,
        path: str,
        *,
        hello: control.Hello | None,
        timeout: float | None = 10.0,
        on_notice: Callable[[control.TopicChanged], None] | None = None,
    ) -> None:
        self.path = path
        self.welcome: control.Welcome | None = None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._reader = control.FrameReader(control.DaemonMessage)
        self._inbox: deque[Any] = deque()
        self._on_notice = on_notice
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(path)
            if hello is not None:
                self.welcome = self.request(hello, control.Welcome)
        except BaseException:
            self._sock.close()
            raise

    # --- sending --------------------------------------------------------------------------

    def send(self, msg: control.Message) -> None:
        self._sock.sendall(control.encode(msg))

    def send_raw(self, data: bytes) -> None:
        """Bytes as they are (already framed, or deliberately not)."""
        self._sock.sendall(data)

    def send_with_fds(self, msg: control.Message, fds: Sequence[int]) -> None:
        """``msg`` with file descriptors attached (SCM_RIGHTS), as a SegmentOffer needs."""
        send_fds(self._sock, control.encode(msg), fds)

    def shutdown_write(self) -> None:
        """Half-close: the daemon reads EOF, and may still reply."""
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    # --- receiving ------------------------------------------------------------------------

    def _fill(self) -> None:
        data = self._sock.recv(_RECV_BYTES)
        if not data:
            raise ConnectionClosedError("the daemon closed the connection")
        self._take(data)

    def _take(self, data: bytes) -> None:
        """Decode ``data``: replies into the inbox, unsolicited messages to ``on_notice``."""
        for msg in self._reader.feed(data):
            if type(msg) is control.TopicChanged:
                if self._on_notice is not None:
                    self._on_notice(msg)
            else:
                self._inbox.append(msg)

    def read_ready(self) -> None:
        """Read what has already arrived, without blocking (nor changing the socket's mode):
        replies stay in the inbox for :meth:`recv`, unsolicited messages go to ``on_notice``.
        The daemon's hang-up is left for the caller's poll() to see.

        Raises:
            ProtocolError: a malformed frame.
        """
        while True:
            try:
                data = self._sock.recv(_RECV_BYTES, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # reset or closed: the poll() reports the hang-up
            if not data:
                return
            self._take(data)

    def recv(self) -> Any:
        """The next message.

        Raises:
            ConnectionClosedError: the daemon closed the connection.
            ProtocolError: it sent a malformed frame.
        """
        while not self._inbox:
            self._fill()
        return self._inbox.popleft()

    def recv_available(self) -> list[Any]:
        """Every message already received, or, when none is, those of the next read (at
        least one). For readers that time one batch of replies with one clock reading."""
        while not self._inbox:
            self._fill()
        out = list(self._inbox)
        self._inbox.clear()
        return out

    def expect(self, kind: type[_M]) -> _M:
        """The next message, which must be a ``kind``.

        Raises:
            SluiceError: an ErrorReply came instead (:func:`reply_error`).
            ProtocolError: another message came instead.
        """
        msg = self.recv()
        if isinstance(msg, kind):
            return msg
        if isinstance(msg, control.ErrorReply):
            raise reply_error(msg)
        raise ProtocolError(f"expected {kind.__name__}, got {type(msg).__name__}")

    def request(self, msg: control.Message, kind: type[_M]) -> _M:
        """Send ``msg`` and return its ``kind`` reply (raises as :meth:`expect`)."""
        self.send(msg)
        return self.expect(kind)

    def offer_segment(self, segment: Segment) -> None:
        """Hand ``segment`` to the daemon (SegmentOffer with its fds) and wait for acceptance."""
        fds = segment.fds()
        offer = control.SegmentOffer(segment_bytes=segment.size, workers=segment.workers, fd_count=len(fds))
        self.send_with_fds(offer, fds)
        self.expect(control.SegmentAccepted)

    def fatal_reply(self) -> control.ErrorReply | None:
        """After a hang-up: the fatal ErrorReply the daemon sent before closing, if it said why
        (then it meant to drop this client). Reads only what is already there."""
        timeout = self._sock.gettimeout()
        try:
            self._sock.setblocking(False)
            while True:
                data = self._sock.recv(_RECV_BYTES)
                if not data:
                    break
                self._take(data)
        except (BlockingIOError, InterruptedError):
            pass
        except (OSError, SluiceError):
            return None
        finally:
            try:
                self._sock.settimeout(timeout)
            except OSError:
                pass
        for m in self._inbox:
            if isinstance(m, control.ErrorReply) and m.fatal:
                return m
        return None

    def closed_by_daemon(self, timeout: float = 5.0) -> bool:
        """True when the daemon closes the connection (EOF or reset) within ``timeout``; what
        it sends meanwhile is dropped."""
        self._sock.settimeout(timeout)
        try:
            while self._sock.recv(_RECV_BYTES):
                pass
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        return True

    # --- the socket -----------------------------------------------------------------------

    def fileno(self) -> int:
        """The socket's fd (-1 once closed), for poll()."""
        return self._sock.fileno()

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Connection({self.path!r}, fd={self.fileno()})"


class ProducerConnection:
    """The control connection of a client that owns a segment (:class:`shm.Producer`).

    Thread-safe: requests are serialized by a lock, and :meth:`reconnect` swaps the
    connection under it. The daemon hanging up on a request raises ProducerClosedError.

    Args:
        path: the daemon's socket.
        client_name: shown in the daemon's logs and stats.
        token: the identity a restarted daemon knows the segment by (0: never reconnects).
        connect_timeout: seconds for connecting and the handshake, per attempt.
        on_notice: called with each TopicChanged the daemon pushes (the Hello asks for them),
            on whichever thread read it, with this connection's lock held; in stream order.

    Raises:
        OSError: the socket could not be reached.
        SluiceError: the daemon refused the Hello.
    """

    def __init__(
        self,
        path: str,
        client_name: str,
        token: int,
        connect_timeout: float,
        on_notice: Callable[[control.TopicChanged], None],
    ) -> None:
        self.path = path
        self._name = client_name
        self._token = token
        self._connect_timeout = connect_timeout
        self._on_notice = on_notice
        self._lock = threading.Lock()
        self._conn = Connection(path, hello=None, timeout=connect_timeout, on_notice=on_notice)
        try:
            self.welcome = self.request(self._hello(), control.Welcome)
        except BaseException:
            self._conn.close()
            raise

    def _hello(self) -> control.Hello:
        return hello_for(self._name, wants_segment=True, token=self._token, topic_updates=True)

    def request(self, msg: control.Message, kind: type[_M]) -> _M:
        """Send ``msg`` and return its ``kind`` reply (raises as :meth:`Connection.expect`)."""
        with self._lock:
            try:
                return self._conn.request(msg, kind)
            except ConnectionClosedError as exc:
                raise ProducerClosedError(str(exc)) from exc

    def offer_segment(self, segment: Segment) -> None:
        """Hand ``segment`` to the daemon; then the handshake is over and nothing times out."""
        with self._lock:
            try:
                self._conn.offer_segment(segment)
            except ConnectionClosedError as exc:
                raise ProducerClosedError(str(exc)) from exc
            self._conn.settimeout(None)

    def goodbye(self) -> None:
        """Say Goodbye (the daemon then closes the connection); a dead socket is ignored."""
        try:
            with self._lock:
                self._conn.send(control.Goodbye())
        except OSError:
            pass

    def read_notices(self) -> bool:
        """Read what the daemon sent unasked (the completion thread, when poll() says the socket
        is readable), unless a request is waiting for its reply: that request reads it then.
        Replies found stay for their request. False when a request held the connection.

        Raises:
            ProtocolError: a malformed frame.
        """
        if not self._lock.acquire(blocking=False):
            return False
        try:
            self._conn.read_ready()
        finally:
            self._lock.release()
        return True

    def fileno(self) -> int:
        return self._conn.fileno()

    def dropped(self) -> bool:
        """After a hang-up: did the daemon say why (a fatal ErrorReply)? Then it meant it,
        unless the reason is SHUTTING_DOWN: a restarted daemon may take the segment back."""
        with self._lock:
            reply = self._conn.fatal_reply()
        return reply is not None and reply.code != control.ERR_SHUTTING_DOWN

    def reconnect(
        self, segment: Segment, topic_ids: Callable[[], dict[str, int]], *, within_s: float, stopped: Callable[[], bool]
    ) -> bool:
        """The daemon hung up: connect to its successor and offer the same segment under the
        same token, retrying with back-off for up to ``within_s`` seconds.

        Gives up at once when the new daemon wants another segment layout or knows one of
        ``topic_ids()`` (name -> id) by another id, since ring frames carry topic ids. A topic
        that has more partitions now is reported to ``on_notice`` as a TopicChanged.

        Returns:
            True when the new daemon took the segment; the client id in ``welcome`` is new.
        """
        deadline = time.monotonic() + within_s
        delay = _FIRST_DELAY_S
        while not stopped():
            left = deadline - time.monotonic()
            if left <= 0:
                log.error("sluice: no daemon took the segment back within %.0fs", within_s)
                return False
            conn = None
            try:
                conn = Connection(
                    self.path, hello=None, timeout=max(0.1, min(self._connect_timeout, left)), on_notice=self._on_notice
                )
                welcome = conn.request(self._hello(), control.Welcome)
                if (
                    welcome.workers != segment.workers
                    or welcome.request_ring_bytes != segment.request_ring_bytes
                    or welcome.completion_ring_bytes != segment.completion_ring_bytes
                ):
                    log.error("sluice: the restarted daemon wants another segment layout; giving up")
                    conn.close()
                    return False
                # Under the lock from the offer on: a lookup of a new topic must not slip in
                # between the id check and the swap.
                with self._lock:
                    conn.offer_segment(segment)
                    for name, tid in topic_ids().items():
                        info = conn.request(control.TopicLookup(topic=name), control.TopicInfo)
                        if info.topic_id != tid:
                            log.error("sluice: topic %r has id %d in the restarted daemon, not %d; giving up",
                                      name, info.topic_id, tid)
                            conn.close()
                            return False
                        # It may have grown while no daemon could say so (never shrinks).
                        self._on_notice(control.TopicChanged(topic=name, topic_id=tid, partitions=info.partitions))
                    conn.settimeout(None)
                    old, self._conn, self.welcome = self._conn, conn, welcome
                old.close()
                return True
            except (OSError, SluiceError) as exc:
                if conn is not None:
                    conn.close()
                log.debug("sluice: reconnect attempt failed: %s", exc)
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, _MAX_DELAY_S)
        return False

    def close(self) -> None:
        self._conn.close()

    def __repr__(self) -> str:
        return f"ProducerConnection({self.path!r}, {self._conn!r})"
