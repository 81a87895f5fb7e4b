"""Sluice over its Unix socket: the control protocol of ``shm/control.py`` (docs/PROTOCOL.md).

This is what a client in another language does: Hello, TopicLookup, then Produce frames of
FRAME records each, and a final Flush that answers once every record is complete. Every
ACK_EVERY-th frame asks for a ProduceAck; the latency sample is that frame's send to its ack
(one sample per acked frame, so percentiles are over frames, not records). The Rec structs are
built from the seeded data before timing, as the values are for the other runners; encoding
the frames and writing them to the socket is timed. A reader thread takes the replies, so the
daemon never waits on us to read.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from bench import sluice_shm
from bench.client import ClientResult, ClientSpec, Pacer, make_keys, make_values, report, timed_section, wait_for_start
from bench.scenarios import Delivery

__all__ = ["NAME", "FRAME", "ACK_EVERY", "settings_for", "run_client"]

NAME = "sluice-socket"
FRAME = 128
"""Records per Produce frame."""
ACK_EVERY = 8
"""Every this-many-th frame asks for a ProduceAck (the latency samples)."""


def settings_for(delivery: Delivery, bootstrap: str) -> dict[str, Any]:
    """The daemon profile keys for ``delivery`` (written into the case's config): the
    shared-memory runner's, and how this runner frames its records."""
    return {
        **sluice_shm.settings_for(delivery, bootstrap),
        "produce_frame_records": FRAME,
        "ack_every_frames": ACK_EVERY,
    }


class _Replies:
    """The reader thread's state: ack times by seq, errors, and the final FlushDone."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.ack_at: dict[int, float] = {}
        self.errors: list[str] = []
        self.record_errors = 0
        self.flush_done: Any = None
        self.cond = threading.Condition()
        self.closed = False

    def run(self) -> None:
        from shm import control
        from shm.errors import ConnectionClosedError

        try:
            while True:
                # One clock reading per read from the socket, as the replies of one read
                # arrived together.
                msgs = self.daemon.recv_available()
                now = time.monotonic()
                for msg in msgs:
                    if isinstance(msg, control.ProduceAck):
                        self.ack_at[msg.seq] = now
                        for r in msg.results:
                            if r.error_code:
                                self.record_errors += 1
                                if len(self.errors) < 3:
                                    self.errors.append(f"{r.error_name} ({r.error_code})")
                    elif isinstance(msg, control.FlushDone):
                        with self.cond:
                            self.flush_done = msg
                            self.cond.notify_all()
                    elif isinstance(msg, control.ErrorReply):
                        self.errors.append(f"{msg.name}: {msg.message}")
        except ConnectionClosedError:
            pass
        except OSError as e:
            self.errors.append(repr(e))
        finally:
            with self.cond:
                self.closed = True
                self.cond.notify_all()

    def wait_flush(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.flush_done is None and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            return self.flush_done


def run_client(spec: ClientSpec, conn: Any, start: Any, counters: Any) -> None:
    """One socket client process (see bench/client.py for the protocol with the harness)."""
    from shm import control
    from shm.connection import Connection, hello_for

    values = make_values(spec)
    keys = make_keys(spec)
    n = spec.records
    # Rec structs for the distinct values only; the record list refers to them.
    cache: dict[tuple[int, int], Any] = {}
    recs = []
    for i in range(n):
        k = keys[i] if keys is not None else None
        ident = (id(values[i]), id(k))
        rec = cache.get(ident)
        if rec is None:
            rec = cache[ident] = control.Rec(key=k, value=values[i])
        recs.append(rec)
    del cache

    # The handshake and lookup raise (refused, or the daemon hung up) before the reader starts.
    daemon = Connection(spec.socket_path or "", hello=hello_for("bench"), timeout=None)
    daemon.request(control.TopicLookup(topic=spec.topic), control.TopicInfo)
    replies = _Replies(daemon)
    thread = threading.Thread(target=replies.run, daemon=True)
    thread.start()

    topic = spec.topic
    Produce, send = control.Produce, daemon.send
    pacer = Pacer(counters, spec.index, spec.rate, spec.deadline_s)
    sent_at: dict[int, float] = {}
    result = ClientResult(index=spec.index,
                          latency_method=f"Produce frame ({FRAME} records) to its ProduceAck, every {ACK_EVERY}th frame")
    wait_for_start(conn, start)
    sent = 0
    frame_no = 0
    monotonic = time.monotonic
    with timed_section() as cpu:
        t0 = monotonic()
        pacer.start(t0)
        while sent < n:
            end = min(sent + FRAME, n)
            frame_no += 1
            if frame_no % ACK_EVERY == 0:
                sent_at[frame_no] = monotonic()
                send(Produce(topic=topic, records=recs[sent:end], ack=True, seq=frame_no))
            else:
                send(Produce(topic=topic, records=recs[sent:end]))
            sent = end
            go, nap = pacer.after(sent)
            if nap:
                time.sleep(nap)
            if not go:
                break
        send(control.Flush(timeout_ms=300_000))
        done = replies.wait_flush(310.0)
        t1 = monotonic()
    counters[spec.index] = sent
    try:
        send(control.Goodbye())
    except OSError:
        pass
    daemon.shutdown_write()
    thread.join(10)
    daemon.close()
    errors = list(replies.errors)
    if done is None:
        errors.append("no FlushDone")
    elif not done.complete:
        errors.append(f"flush incomplete: {done.pending} pending")
    result.sent = sent
    result.payload_bytes = sent * spec.value_size + (sent * spec.key_size if keys else 0)
    result.t_start, result.t_end, result.cpu_s = t0, t1, cpu.cpu
    result.latencies_ms = [(replies.ack_at[s] - t) * 1000.0 for s, t in sent_at.items() if s in replies.ack_at]
    result.errors = len(errors) + replies.record_errors
    result.first_error = errors[0] if errors else ""
    report(conn, result)
