"""Health files: ``plannersync run`` writes ``<health_dir>/<worker>.json`` every few seconds for every worker.

The file holds what the worker's ``health()`` answered (``shared.workers.Health``) plus when it was written.
``plannersync status`` shows the files next to the mailboxes and queue depths; ``plannersync health <worker>``
exits 0 only for a fresh file of a worker whose loop is still beating and that can do its job (the compose
healthcheck). A file is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from shared.logs import get_logger
from shared.workers import Health, Worker

log = get_logger(__name__)
WRITE_EVERY = 2.0


def write_health(directory: Path, name: str, health: Health, now: float | None = None) -> None:
    """Write one worker's health file atomically."""
    now = time.time() if now is None else now
    directory.mkdir(parents=True, exist_ok=True)
    data = {
        "worker": name,
        "state": health.state,
        "ok": health.ok,
        "pid": os.getpid(),
        "updated_at": datetime.fromtimestamp(now, timezone.utc).isoformat(),
        "updated_ts": now,
        "beat_at": datetime.fromtimestamp(health.beat_at, timezone.utc).isoformat(),
        "beat_ts": health.beat_at,
        **health.facts,
    }
    tmp = directory / f".{name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, default=str))
    tmp.replace(directory / f"{name}.json")


def read_health(directory: Path) -> dict[str, dict[str, Any]]:
    """Every health file in ``directory``, by worker name; an unreadable file says so."""
    result = {}
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            result[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            result[path.stem] = {"worker": path.stem, "state": "unreadable", "ok": False}
    return result


def is_healthy(data: dict[str, Any] | None, stale_after: float, now: float | None = None) -> tuple[bool, str]:
    """Healthy: a file written within ``stale_after`` seconds, by a loop that beat within it, of a worker that is ok."""
    if data is None:
        return False, "no health file"
    now = time.time() if now is None else now
    age = now - float(data.get("updated_ts", 0))
    if age > stale_after:
        return False, f"health file is {age:.0f} s old"
    beat = now - float(data.get("beat_ts", 0))
    if beat > stale_after:
        return False, f"loop has not run for {beat:.0f} s"
    if not data.get("ok", False):
        return False, f"state {data.get('state')}"
    return True, str(data.get("state"))


class HealthReporter:
    """Writes a worker's ``health()`` to its file every ``WRITE_EVERY`` seconds, on a thread of its own."""

    def __init__(self, worker: Worker, name: str, directory: Path, every: float = WRITE_EVERY) -> None:
        self.worker, self.name, self.directory, self.every = worker, name, directory, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"health-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.every * 2)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._write()
            self._stop.wait(self.every)

    def _write(self) -> None:
        try:
            write_health(self.directory, self.name, self.worker.health())
        except Exception as exc:  # noqa: BLE001 - a full disk must not stop the worker; it shows as a stale file
            log.warning("health_not_written", worker=self.name, error=type(exc).__name__, detail=str(exc)[:200])
