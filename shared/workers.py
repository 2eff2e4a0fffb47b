"""The one shape every worker has, so the command line, health files and status treat them alike.

A worker is built from the settings by its service's ``build(settings)``, runs in the foreground until
``stop()`` is called (SIGTERM/SIGINT), and answers ``health()`` at any moment from any thread without
blocking. ``plannersync run`` writes that answer to ``<health_dir>/<name>.json`` every few seconds
(``shared.health.HealthReporter``), for every worker the same way: consumers, producers and the nightly
reconciler alike (decision 19 in docs/decisions.md).

``beat_at`` is when the worker's own loop last went round. A loop that is stuck (a wedged call, a deadlock)
stops beating, and the health check then says so even though the reporting thread is still writing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Protocol


@dataclass(frozen=True)
class Health:
    """A worker's own account of itself: content-free facts only (counts, ids, times)."""

    state: str                      # "consuming", "paused", "disconnected", "waiting", "running", ...
    beat_at: float                  # time.time() of the worker loop's last pass
    ok: bool = True                 # False: running, but unable to do its job (no broker, say)
    facts: dict[str, Any] = field(default_factory=dict)


class WorkerWedged(Exception):
    """A worker found one of its own threads stuck far past any deadline (a deadlock in a library, say).

    Python cannot interrupt a thread, so the process exits at once, without waiting for that thread, and its
    supervisor (compose's ``restart:``, systemd's ``Restart=``) starts it afresh (decision 70 in docs/decisions.md).
    """


class Worker(Protocol):
    """What ``plannersync run <name>`` needs of a worker."""

    def run(self) -> None: ...

    def stop(self) -> None: ...

    def health(self) -> Health: ...


def wait_until(due: datetime, clock: Callable[[], datetime], stopping: threading.Event, beat: Callable[[], None], slice_seconds: float) -> bool:
    """A scheduled worker's wait: True once ``clock()`` reaches ``due``, False when ``stopping`` is set first.

    Waits in slices of at most ``slice_seconds`` and calls ``beat`` before each, so a worker waiting hours for its
    nightly run still shows a live loop in its health (and a test clock moved forward is noticed within a slice).
    """
    while True:
        beat()
        remaining = (due - clock()).total_seconds()
        if remaining <= 0:
            return True
        if stopping.wait(min(remaining, slice_seconds)):
            return False
