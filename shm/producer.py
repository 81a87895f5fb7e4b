"""``shm.Producer``: the client library. ``send()`` is a copy into shared memory.

Usage::

    from shm import Producer

    with Producer() as p:                       # $SLUICE_SOCKET or /run/sluice/sluice.sock
        fut = p.send("payments", b"...", key=b"user-42")
        meta = fut.result(timeout=5)            # RecordMetadata(topic, partition, offset, timestamp)

How it works: the constructor connects to the daemon's Unix socket and says Hello
(:mod:`shm.connection`), creates a sealed memfd segment with a request and a completion ring
per worker and passes it over the socket (SCM_RIGHTS). ``send()`` and ``produce()`` are
compiled (``shm._client.SendCore``), and there is no other per-record path: they call the
serializers and check their output, encode, pick the partition (explicit, murmur2 of the key,
or sticky for null keys, as Kafka's default partitioner), find the worker that owns it
(:func:`shm.partitioner.owner`) and write one RECORD frame into that worker's request ring.
Python is called only for a topic's first lookup (I/O to the daemon), the error to raise
(:func:`shm.topic.refusal`) and a full ring, which goes to the wait-or-drop policy
(:meth:`shm.backpressure.Backpressure.enqueue`). The completion thread
(:mod:`shm.completions`) reads the completion rings and settles the futures
(:mod:`shm.futures`); what it reports (records completed, the daemon hung up: reconnect or
fail what is pending) is handled by the :class:`shm.session.Session`, and ring space freed
wakes the senders waiting for room.

Bulk: ``send_many()`` returns one :class:`DeliveryGroup` for all its records. It encodes the
records bound for one partition together, copies them into the ring with one claim
(:meth:`shm.backpressure.Backpressure.put_runs`), and registers them as one run in the
partition's pending FIFO, so the completion thread settles a whole run with one call. The
per-record costs left are a few C-level list operations.

This module wires the parts together and keeps ``send_many()``'s checks, the topic table,
``flush()`` and ``close()``.

Partition growth: the Hello asks for ``topic_updates``, so the daemon pushes a TopicChanged
when a topic gains partitions (its metadata refresh saw it, within ``metadata_max_age_ms``).
Whichever thread reads it from the control socket (the completion thread, or a request waiting
for its reply) grows the topic's state at once (:meth:`shm.topic.TopicState.grow`): new pending
FIFOs and owners, then the compiled tables and the count in one step, then the completion
thread's partition limit. From then on keyed records go to murmur2 modulo the new count, as
with Kafka's producer after its metadata refresh. A TopicChanged for a topic not in the table
yet is remembered, since a TopicInfo computed before the growth may still be on its way; the
table takes the larger count. Counts never shrink.

Thread safety: ``send()`` may be called from several threads, without a lock. The compiled
send() holds the GIL from its ring claim to its publish and runs no Python code in between;
the Python writers (``send_many()``, a record waiting for room) hold ``_send_lock``, and the
compiled send() hands its record to the waiting path while one of them is between its claim
and its publish, so each ring keeps a single producer. Futures are
resolved on the completion thread; ``on_delivery`` callbacks run there too and must be quick
(an exception they raise is logged on ``sluice.client``).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec

from shm import connection, control
from shm._client import SendCore
from shm.backpressure import Backpressure
from shm.completions import CompletionReader
from shm.connection import DEFAULT_SOCKET, ProducerConnection
from shm.errors import KafkaError, ProducerClosedError
from shm.frames import encode_headers
from shm.futures import DeliveryFuture, DeliveryGroup, DeliveryTally, RecordMetadata
from shm.segment import Segment
from shm.serializers import Serializer, bytes_list, serializer
from shm.session import Session
from shm.topic import UNKNOWN_TOPIC_OR_PARTITION, TopicState, check_sizes, plan_runs, refusal, stick

# Re-exported: these names were defined here before the futures, errors and connection got
# their own modules, and applications import them from here.
__all__ = [
    "Producer",
    "RecordMetadata",
    "DeliveryFuture",
    "DeliveryGroup",
    "DEFAULT_SOCKET",
    "DEFAULT_RECONNECT_TIMEOUT_S",
    "ProducerClosedError",
]

# How long a client waits for a restarted daemon to take its segment back (a systemd restart
# takes well under a second; a crash restart waits RestartSec).
DEFAULT_RECONNECT_TIMEOUT_S = 60.0

log = logging.getLogger("sluice.client")


class Producer:
    """A Sluice client over shared memory.

    Args:
        socket_path: the daemon's socket; default ``$SLUICE_SOCKET``, else
            ``/run/sluice/sluice.sock``.
        client_name: shown in the daemon's logs and stats (default: the program and pid).
        value_serializer, key_serializer: ``None``/``"bytes"`` (bytes as they are, str as
            UTF-8), ``"str"``, ``"json"``, ``"msgpack"`` or a callable returning bytes.
        connect_timeout: seconds for the connection and handshake.
        reconnect_timeout_s: when the daemon hangs up (it crashed, or was restarted), keep
            the pending records and reconnect for up to this many seconds (default 60),
            offering the same segment under the same client token: the new daemon completes
            what the old one had taken (exactly once with idempotent profiles) and reads on
            from the rings. ``send()`` keeps writing into the rings meanwhile (blocking or
            dropping per the profile when they fill). Past the timeout every pending record
            fails with ProducerClosedError, as does ``send()``. 0: fail them at the hang-up. A
            fatal ErrorReply (the daemon dropped this client) is never retried; neither is a
            daemon whose topic ids or segment layout differ (its records could not be
            matched).
        never_block: a full ring raises BufferFullError at once, whatever the topic's
            ``on_full`` and ``max_block_ms`` say (``drop`` still drops). For a caller that
            must not block its thread, such as the daemon's socket ingest on its event loop,
            and waits for room itself.

    Raises:
        SluiceError: the daemon refused the connection or the segment (the message says why).
        OSError: the socket could not be reached.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        client_name: str | None = None,
        value_serializer: str | Serializer | None = None,
        key_serializer: str | Serializer | None = None,
        connect_timeout: float = 10.0,
        reconnect_timeout_s: float = DEFAULT_RECONNECT_TIMEOUT_S,
        never_block: bool = False,
    ) -> None:
        self.socket_path = connection.socket_path(socket_path)
        self._vser = serializer(value_serializer)
        self._kser = serializer(key_serializer)
        self._closed = False
        self._send_lock = threading.Lock()
        # The topic table: by name for send(); by id, each partition's pending FIFO, for the
        # completion thread; by id, the partition count, for validating completions.
        self._topics: dict[str, TopicState] = {}
        self._pending_by_id: dict[int, list[deque[Any]]] = {}
        self._limits: list[int] = []
        # Held while the table changes: a topic added, or grown by a TopicChanged (on the
        # thread that read it). Partition counts the daemon pushed for topics not in the table
        # yet (at most one per topic the daemon knows).
        self._topics_lock = threading.Lock()
        self._announced: dict[str, int] = {}
        self.workers = 0  # the Welcome's, below
        self._final_drops: dict[str, int] | None = None  # drops, as they were at close()
        self._name = client_name or f"{os.path.basename(sys.argv[0] or 'python')}[{os.getpid()}]"
        self._reconnect_s = max(0.0, float(reconnect_timeout_s))
        # The identity a restarted daemon knows this segment by (0: never reconnects).
        self._token = (int.from_bytes(os.urandom(8), "little") | 1) if self._reconnect_s else 0

        self._ctl = ProducerConnection(
            self.socket_path, self._name, self._token, connect_timeout, on_notice=self.topic_changed
        )
        try:
            welcome = self._ctl.welcome
            self.workers = welcome.workers
            seg = Segment.create(welcome.workers, welcome.request_ring_bytes, welcome.completion_ring_bytes)
            self._segment = seg
            self._ctl.offer_segment(seg)
        except BaseException:
            self._ctl.close()
            raise
        self._req = [seg.request_ring(w) for w in range(self.workers)]
        self._cmp = [seg.completion_ring(w) for w in range(self.workers)]
        # A full ring: wait or drop. The pending count it adds to is the core's, made below
        # with the room's enqueue as its full= callable, hence the lambda.
        self._room = Backpressure(
            self._req, self._send_lock, self._check_open, lambda n: self._core.add_pending(n), seg.drop_counts,
            never_block=never_block,
        )
        # send() and produce(): compiled, the only per-record path (shm/_client.c).
        self._core = SendCore(
            topics=self._topics,
            future=DeliveryFuture,
            lookup=self._add_topic,
            check_open=self._check_open,
            refusal=refusal,
            full=self._room.enqueue,
            stick=stick,
            value_serializer=self._vser,
            key_serializer=self._kser,
        )
        self._core.set_writers(tuple(ring.writer for ring in self._req))
        self._core.enabled = 1
        self.send = self._core.send  # type: ignore[method-assign]
        self.produce = self._core.produce  # type: ignore[method-assign]
        # What the completion thread reports: records completed, the daemon hung up.
        self._session = Session(
            self._ctl, seg, self._core, self._topics, self._send_lock,
            reconnect_s=self._reconnect_s, closed=lambda: self._closed, wake_writers=self._room.wake,
        )
        self._completions = CompletionReader(
            seg,
            self._req,
            self._cmp,
            self._pending_by_id,
            self._limits,
            self._ctl.fileno(),
            read_control=self._ctl.read_notices,
            on_completed=self._session.completed,
            on_freed=self._room.wake,
            on_hangup=self._session.hung_up,
            on_error=self._session.unreadable,
            name=f"sluice-completions-{self.client_id}",
        )
        self._completions.start()

    # --- the topic table ------------------------------------------------------------------

    def lookup(self, topic: str) -> control.TopicInfo:
        """The topic's id, partition count and delivery profile (cached after the first call).

        Raises:
            KafkaError: e.g. UnknownTopicOrPartitionError for a topic that does not exist.
        """
        t = self._topics.get(topic)
        if t is None:
            t = self._add_topic(topic)
        return t.info

    def cached(self, topic: str) -> control.TopicInfo | None:
        """The topic's info if :meth:`lookup` (or a send) already asked the daemon, else None.
        Never does I/O, so an event loop may call it before deciding to look up in a thread."""
        t = self._topics.get(topic)
        return None if t is None else t.info

    def _add_topic(self, topic: str) -> TopicState:
        self._check_open()
        info = self._ctl.request(control.TopicLookup(topic=topic), control.TopicInfo)
        with self._topics_lock:
            known = self._topics.get(topic)
            if known is not None:
                return known  # another thread looked it up meanwhile: its FIFOs may hold records
            announced = self._announced.pop(topic, 0)
            if announced > info.partitions:
                info = msgspec.structs.replace(info, partitions=announced)
            t = TopicState(info, self.workers)
            while len(self._limits) <= t.id:
                self._limits.append(0)
            self._limits[t.id] = t.partitions
            self._pending_by_id[t.id] = t.pending
            self._topics[topic] = t
        return t

    def topic_changed(self, msg: control.TopicChanged) -> None:
        """What a TopicChanged from the daemon does: ``msg.topic`` has ``msg.partitions`` now,
        and records may go to the new partitions. Applications never call it (the producer
        reads the daemon's TopicChanged itself, on the thread that reads the control socket);
        the daemon's own socket ingest, which hears of the growth in-process first, does.
        A count that is not more than the one known changes nothing."""
        with self._topics_lock:
            t = self._topics.get(msg.topic)
            if t is None:
                if msg.partitions > self._announced.get(msg.topic, 0):
                    self._announced[msg.topic] = msg.partitions
                return
            if t.id != msg.topic_id:
                log.warning("sluice: TopicChanged for %r names id %d, not %d; ignored", msg.topic, msg.topic_id, t.id)
                return
            # The send lock keeps the Python writers (send_many's runs, records waiting for
            # room) off the table while it grows; the compiled send() needs no lock (_bind).
            with self._send_lock:
                old = t.partitions
                if not t.grow(msg.partitions, self.workers):
                    return
                self._limits[t.id] = msg.partitions
        log.info("sluice: topic %r grew from %d to %d partitions", msg.topic, old, msg.partitions)

    def partitions_for(self, topic: str) -> int:
        """The topic's partition count as the daemon reported it."""
        return self.lookup(topic).partitions

    # --- sending --------------------------------------------------------------------------

    def send(
        self,
        topic: str,
        value: Any,
        key: Any = None,
        *,
        partition: int | None = None,
        headers: Sequence[tuple[str | bytes, bytes | None]] | None = None,
        timestamp: int | None = None,
        on_delivery: Callable[[DeliveryFuture], None] | None = None,
    ) -> DeliveryFuture:
        """Queue one record; returns its DeliveryFuture.

        Raises at once, before the record enters shared memory, what the client can know:
        MessageTooLargeError (larger than the profile's max_request_size),
        UnknownTopicOrPartitionError (unknown topic or partition out of range),
        BufferFullError (on_full=block and no room within max_block_ms), TypeError (a value
        the serializer cannot take), ProducerClosedError. With on_full=drop a record that
        finds no room is counted in ``drops`` (in the segment, so the daemon counts it too)
        and its future fails with BufferFullError.
        """
        return self._core.send(  # the instance's send is this same compiled function
            topic, value, key, partition=partition, headers=headers, timestamp=timestamp, on_delivery=on_delivery
        )

    def produce(
        self,
        topic: str,
        value: Any,
        key: Any = None,
        *,
        partition: int | None = None,
        headers: Sequence[tuple[str | bytes, bytes | None]] | None = None,
        timestamp: int | None = None,
    ) -> None:
        """Fire and forget: queue one record as :meth:`send` does, without a future.

        As confluent-kafka's ``produce()`` without a callback: the cheapest way to send when
        the caller does not wait for each record. Outcomes are still counted per topic
        (:attr:`delivery_errors`, :attr:`delivered`), and the first failure of each kind is
        logged on ``sluice.client``. :meth:`flush` waits for these records too. Raises what
        :meth:`send` raises before a record enters shared memory.
        """
        self._core.produce(topic, value, key, partition=partition, headers=headers, timestamp=timestamp)

    def send_records(
        self, topic: str, records: list[Any], start: int = 0, tally: DeliveryTally | None = None
    ) -> tuple[int, list[DeliveryFuture]]:
        """:meth:`send` each of ``records[start:]`` (objects with the attributes ``value``,
        ``key``, ``partition``, ``headers`` and ``timestamp``, such as the socket protocol's
        decoded :class:`shm.control.Rec`) in one compiled call, for socket ingest. With a
        ``tally``, :meth:`produce` them instead: no futures, and the tally counts their
        outcomes (socket ingest's Produce without ack, one tally per connection and topic).

        It stops at the end, or at the first record it cannot write now (a full ring, or an
        error to raise): nothing of that record is written, and the caller sends it with
        :meth:`send` (which raises or waits) and goes on after it.

        Returns:
            ``(next, futures)``: the index of the record it stopped at (``len(records)`` when
            all went), and the futures of ``records[start:next]``, in order (none with a tally).
        """
        if topic not in self._topics or not self._core.enabled:
            return start, []
        return self._core.send_records(topic, records, start, tally)

    def send_packed(
        self, topic: str, body: Any, at: int, start: int, count: int, tally: DeliveryTally | None = None
    ) -> tuple[int, int, list[DeliveryFuture]]:
        """:meth:`send_records` for a Produce frame still in msgpack (``body``, which
        :func:`shm._client.scan_produce` accepted; its records ``start..count-1``, the first at
        offset ``at``): no Python object per record.

        Returns:
            ``(next, next_at, futures)``: the index and offset of the record it stopped at, and
            the futures of the records before it, as :meth:`send_records` returns them.
        """
        if topic not in self._topics or not self._core.enabled:
            return start, at, []
        return self._core.send_packed(topic, body, at, start, count, tally)

    @property
    def delivery_errors(self) -> dict[str, dict[str, int]]:
        """Failed :meth:`produce` records: topic -> error name -> records (a copy)."""
        return {name: dict(t.tally.errors) for name, t in list(self._topics.items()) if t.tally.failed}

    @property
    def delivered(self) -> dict[str, int]:
        """:meth:`produce` records Kafka accepted, per topic (a copy)."""
        return {name: t.tally.delivered for name, t in list(self._topics.items()) if t.tally.delivered}

    def send_many(
        self,
        topic: str,
        values: Iterable[Any],
        keys: Iterable[Any] | None = None,
        *,
        partition: int | None = None,
        headers: Sequence[tuple[str | bytes, bytes | None]] | None = None,
        on_delivery: Callable[[DeliveryGroup], None] | None = None,
    ) -> DeliveryGroup:
        """Send many records to one topic; returns one :class:`DeliveryGroup` for them all.

        Much cheaper per record than ``send()``: the records bound for one partition are
        encoded together (:func:`shm.frames.encode_record_frames`), copied into the ring with
        one claim and one head publish, and wait for their outcome as one pending entry
        (the completion thread settles a whole run at once). Records without a key stick to
        a partition for about ``batch_size`` bytes, as with ``send()``; keyed records use
        Kafka's partitioner. Records to different partitions may enter the ring in another
        order than given; each partition keeps the given order, which is all Kafka orders.

        Args:
            values: the values (serialized like ``send()``'s; None = tombstone).
            keys: one key per value, or None.
            partition: send every record to this partition.
            headers: the same headers on every record.
            on_delivery: called once with the group when every record has its outcome.

        Raises:
            As ``send()``. Size, type and partition errors come before any record enters
            shared memory. BufferFullError (on_full=block, no room within max_block_ms) and
            ProducerClosedError may come after some records went in: those are delivered as
            usual; the rest fail in the group (which the caller does not get).
        """
        t = self._topics.get(topic)
        if t is None:
            t = self._add_topic(topic)
        vals = bytes_list(values if type(values) is list else list(values), self._vser)
        ks: list[Any] | None = None
        if keys is not None:
            ks = bytes_list(keys if type(keys) is list else list(keys), self._kser)
            if len(ks) != len(vals):
                raise ValueError(f"send_many got {len(ks)} keys for {len(vals)} values")
            if ks.count(None) == len(ks):
                ks = None
        n = t.partitions
        if partition is not None and not 0 <= partition < n:
            raise KafkaError.for_code(UNKNOWN_TOPIC_OR_PARTITION, f"partition {partition} of {topic!r} (it has {n})")
        tail = encode_headers(headers)
        check_sizes(t, vals, ks, headers, len(tail))
        ts = int(time.time() * 1000)
        group = DeliveryGroup(topic, len(vals), ts)
        if on_delivery is not None:
            group.add_done_callback(on_delivery)
        if not vals:
            return group
        self._room.put_runs(t, group, plan_runs(t, vals, ks, partition, len(tail), group), ts, headers)
        return group

    def _check_open(self) -> None:
        if self._closed or self._session.gone:
            raise ProducerClosedError("the producer is closed" if self._closed else "the daemon closed the connection")

    # --- flush and close ------------------------------------------------------------------

    @property
    def drops(self) -> dict[str, int]:
        """Records dropped under ``on_full = "drop"``, per topic (topics with none left out).
        The daemon reads the same counters from the segment for ``sluice_drops_total``."""
        if self._final_drops is not None:
            return dict(self._final_drops)
        return self._room.drops(self._topics)

    @property
    def client_id(self) -> int:
        """The id the daemon gave this client (a new one after each reconnect)."""
        return self._session.client_id

    @property
    def reconnects(self) -> int:
        """How many times a restarted daemon took this client's segment back."""
        return self._session.reconnects

    @property
    def pending(self) -> int:
        """Records sent whose outcome has not come back yet."""
        return self._core.pending

    def flush(self, timeout: float | None = None) -> int:
        """Wait until every record sent so far has its outcome; returns how many are still
        pending (0 = all done) when ``timeout`` runs out."""
        return self._session.wait(timeout, self._completions.is_alive)

    def close(self, timeout: float | None = 30.0) -> None:
        """Flush (up to ``timeout``), say Goodbye and release everything.

        Records still pending after the timeout stay in shared memory and the daemon still
        delivers them; their futures here fail with ProducerClosedError.
        """
        if self._closed:
            return
        try:
            self.flush(timeout)
        finally:
            self._closed = True
            self._core.enabled = 0
            self._ctl.goodbye()
            self._completions.stop(timeout=1.0)
            self._session.fail_all(ProducerClosedError("the producer was closed before the outcome came"))
            self._ctl.close()
            self._final_drops = self.drops
            for ring in self._req + self._cmp:
                ring.release()
            self._segment.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Producer({self.socket_path!r}, client_id={getattr(self, 'client_id', None)}, pending={self.pending})"
