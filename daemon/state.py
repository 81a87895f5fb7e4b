"""What a daemon leaves for the next one in its runtime directory (docs/ARCHITECTURE.md,
"Daemon crashes").

Two files:

- ``sluice-state.json``: the topic ids (ring frames of reconnecting clients carry them), the
  clients' tokens -> client ids (a client that reconnects after a crash gets its old id
  back, and with it the completions of the records it wrote before the crash), and the first
  client id no daemon has given out yet (``client_ids_from``: ids are never reused across
  restarts, because a recovered arena's runs tables name clients by id). Rewritten
  whole, through a temporary file and a rename, at every change, so a crash leaves the old
  version or the new one, never half of one.
- ``clean-shutdown``: written last by a daemon whose workers all drained and said so, and
  removed by the next start. Its absence means the previous daemon died: the workers recover
  their arenas and the clients it knew may come back.

:class:`Tokens` is the token bookkeeping itself, without I/O.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Container, Mapping
from typing import NamedTuple

__all__ = ["CLEAN_MARKER", "CLIENT_ID_BLOCK", "STATE_FILE", "STATE_VERSION", "Saved", "StateDir", "Tokens"]

log = logging.getLogger("sluice.state")

STATE_FILE = "sluice-state.json"
CLEAN_MARKER = "clean-shutdown"
STATE_VERSION = 1  # written for a future reader; this one accepts any file it can parse
# Client ids are reserved (and the reservation saved) this many at a time, so the state file is
# rewritten once per this many connections rather than at each.
CLIENT_ID_BLOCK = 1024


class Saved(NamedTuple):
    """The content of the state file."""

    topics: dict[str, tuple[int, int]]  # name -> (topic id, partitions)
    tokens: dict[int, int]  # client token -> client id
    client_ids_from: int = 0  # ids below this may have been given out; 0 in older files


class StateDir:
    """The state files in one runtime directory."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def take_clean_marker(self) -> bool:
        """Whether the previous daemon stopped cleanly; the marker is removed either way.

        Removed at start, so that this daemon dying later is not mistaken for a clean stop.
        """
        marker = os.path.join(self.directory, CLEAN_MARKER)
        clean = os.path.exists(marker)
        try:
            os.unlink(marker)
        except OSError:
            pass
        return clean

    def read(self) -> Saved | None:
        """The saved state; None when there is none or it cannot be read (then logged)."""
        try:
            with open(os.path.join(self.directory, STATE_FILE), encoding="utf-8") as f:
                state = json.load(f)
            topics = {str(n): (int(v[0]), int(v[1])) for n, v in state.get("topics", {}).items()}
            tokens = {int(t, 16): int(c) for t, c in state.get("clients", {}).items()}
            ids_from = int(state.get("client_ids_from", 0))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, AttributeError, IndexError) as exc:
            log.warning("ignoring unreadable daemon state in %s: %s", self.directory, exc)
            return None
        return Saved(topics, tokens, ids_from)

    def write(self, topics: Mapping[str, tuple[int, int]], tokens: Mapping[int, int], client_ids_from: int = 0) -> None:
        """Replace the state file; a failure is logged (the daemon runs on without it)."""
        state = {
            "version": STATE_VERSION,
            "topics": {n: [tid, parts] for n, (tid, parts) in topics.items()},
            "clients": {f"{t:016x}": cid for t, cid in tokens.items()},
            "client_ids_from": client_ids_from,
        }
        path = os.path.join(self.directory, STATE_FILE)
        tmp = path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(state, f)
            os.replace(tmp, path)
        except OSError as exc:
            log.error("cannot save the daemon state to %s: %s", path, exc)

    def mark_clean(self) -> None:
        """Tell the next start that nothing is left to recover."""
        try:
            with open(os.path.join(self.directory, CLEAN_MARKER), "w", encoding="utf-8") as f:
                f.write("1\n")
        except OSError as exc:
            log.error("cannot write the clean-shutdown marker: %s", exc)


class Tokens:
    """Client tokens -> client ids, the ids of a crashed daemon's clients not yet back, and the
    client ids reserved so far.

    A shared-memory client that can reconnect sends a random token in its Hello and keeps it
    across daemon restarts. After a crash the saved map tells which id each token had: the
    workers recovered that id's runs from the arenas, so the client must get the same id again.
    No other client may get an id an earlier daemon gave out: a runs table recovered after a
    crash would name it. So ids are reserved in blocks of :data:`CLIENT_ID_BLOCK`, and the
    reservation is saved before an id of a new block is given (:meth:`reserve`).
    """

    def __init__(self) -> None:
        self._ids: dict[int, int] = {}
        self._awaited: set[int] = set()
        self._reserved = 0  # ids below this may have been given out (by this daemon or one before)

    def restore(self, tokens: Mapping[int, int]) -> None:
        """After a crash: the previous daemon's tokens; every id in them is awaited."""
        self._ids = dict(tokens)
        self._awaited = set(tokens.values())

    @property
    def awaited(self) -> frozenset[int]:
        """Ids of the previous daemon whose clients may still reconnect."""
        return frozenset(self._awaited)

    def restore_reserved(self, client_ids_from: int) -> None:
        """The saved reservation: ids below it are never given to a new connection."""
        self._reserved = max(self._reserved, client_ids_from)

    @property
    def reserved(self) -> int:
        """Ids below this may have been given out; what the state file saves."""
        return self._reserved

    def next_client_id(self) -> int:
        """The first id a new connection may take: after every awaited id and every id an
        earlier daemon may have given out."""
        return max(max(self._awaited, default=0) + 1, self._reserved)

    def reserve(self, client_id: int) -> bool:
        """``client_id`` is about to be given out. True when that needs a new block reserved:
        the caller saves the state before the id goes anywhere."""
        if client_id < self._reserved:
            return False
        self._reserved = client_id + CLIENT_ID_BLOCK
        return True

    def snapshot(self) -> dict[int, int]:
        """A copy of token -> client id, for the saved state."""
        return dict(self._ids)

    def claim(self, token: int, client_id: int, live: Container[int]) -> int:
        """A Hello carried ``token``: the id the client is to have.

        Its previous id when the token is known and that id is free (not in ``live``); else
        ``client_id``, which the token then maps to (the caller saves the state).
        """
        old = self._ids.get(token)
        if old is not None and old != client_id and old not in live:
            self._awaited.discard(old)
            return old
        if old is not None and old != client_id:
            log.warning("client token of %d is in use by a live connection; new id %d", old, client_id)
        self._ids[token] = client_id
        return client_id

    def forget(self, token: int, client_id: int) -> bool:
        """The client ``client_id`` is gone for good. True if its token was dropped."""
        if token and self._ids.get(token) == client_id:
            del self._ids[token]
            return True
        return False

    def expire(self, live: Container[int]) -> list[int]:
        """The grace for reconnecting ran out: the awaited ids not in ``live``, now forgotten."""
        gone = [cid for cid in sorted(self._awaited) if cid not in live]
        for cid in gone:
            for t, c in list(self._ids.items()):
                if c == cid:
                    del self._ids[t]
        self._awaited.clear()
        return gone
