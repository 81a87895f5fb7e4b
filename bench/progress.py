"""The progress display on stderr: which case, elapsed time, records so far.

On a terminal one line is rewritten in place; otherwise (CI, a pipe) a line is printed every
few seconds, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """Writes the state of the running case to ``stream``."""

    def __init__(self, total_cases: int, stream: TextIO | None = None, interval_s: float = 5.0) -> None:
        self.total = total_cases
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval_s
        self._case = 0
        self._label = ""
        self._t0 = 0.0
        self._last_print = 0.0
        self._width = 0

    def begin(self, label: str, expected: int) -> None:
        """A new case starts (setup included)."""
        self._case += 1
        self._label = label
        self._expected = expected
        self._t0 = time.monotonic()
        self._last_print = 0.0
        self._emit(f"{self._prefix()} starting", force=True)

    def _prefix(self) -> str:
        return f"[{self._case}/{self.total}] {self._label}"

    def stage(self, what: str) -> None:
        """A named step of the case (creating topic, starting daemon, reading back)."""
        self._emit(f"{self._prefix()} {what} ({time.monotonic() - self._t0:.1f} s)", force=not self.tty)

    def update(self, records: int, sending_since: float | None) -> None:
        """Records acknowledged or sent so far (as the clients report them)."""
        now = time.monotonic()
        rate = ""
        if sending_since is not None and now > sending_since + 0.2:
            rate = f"  {records / (now - sending_since) / 1000:,.1f} k/s"
        pct = f" ({100 * records / self._expected:.0f}%)" if self._expected else ""
        self._emit(f"{self._prefix()}  {now - self._t0:5.1f} s  {records:,}/{self._expected:,} records{pct}{rate}")

    def end(self, summary: str) -> None:
        """The case is over; leave its summary on its own line."""
        self._emit(f"{self._prefix()} {summary}", force=True, final=True)

    def _emit(self, text: str, *, force: bool = False, final: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad + ("\n" if final else ""))
            self._width = 0 if final else len(text)
            self.stream.flush()
        elif force or now - self._last_print >= self.interval:
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last_print = now
