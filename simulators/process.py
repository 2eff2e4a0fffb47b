"""What a simulator's command line does once it serves: say where, then wait for SIGTERM or SIGINT."""

from __future__ import annotations

import signal
import threading


def announce_and_wait(announcement: str) -> None:
    """Print ``announcement`` (the URLs a caller reads to find the simulator), then wait for SIGTERM or SIGINT.

    The handlers are in place before the announcement: a caller that stops the simulator as soon as it has read the
    URLs gets a clean stop (exit 0), not a kill by the default action."""
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print(announcement, flush=True)
    done.wait()
