"""Progress lines for long commands (``resync --all``, ``dlq replay``): on stderr, so stdout stays the result.

A line such as ``resync: 120/2000 mailboxes, 3 failed`` is printed every ``every`` items, at least every ``seconds``
while items keep finishing, and always for the last one (decision 75 in docs/decisions.md).
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


class ProgressLine:
    """Prints ``<what>: <done>/<total> <unit>[, <extra>]`` now and then; ``update`` is called after each item."""

    def __init__(
        self,
        what: str,
        unit: str,
        total: int,
        every: int = 100,
        seconds: float = 5.0,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what, self.unit, self.total = what, unit, total
        self.every, self.seconds = max(1, every), seconds
        self.stream = stream
        self.clock = clock
        self._printed_at = clock()
        self._printed_done = 0

    def update(self, done: int, extra: str = "") -> None:
        """Print a line when ``every`` items passed since the last one, ``seconds`` went by, or this is the last."""
        now = self.clock()
        if done < self.total and done - self._printed_done < self.every and now - self._printed_at < self.seconds:
            return
        self._printed_at, self._printed_done = now, done
        line = f"{self.what}: {done}/{self.total} {self.unit}" + (f", {extra}" if extra else "")
        print(line, file=self.stream or sys.stderr, flush=True)
