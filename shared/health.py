"""Health files: ``plannersync run`` writes ``<health_dir>/<worker>.json`` every few seconds for every worker.

Replicas of one worker share the health directory (compose's state volume, or one host), so each process writes a file
of its own (decision 103 in docs/decisions.md): the first replica ``<worker>.json``, the n-th ``<worker>.<n>.json``, the
slot held with ``flock`` (``hold_slot``) while the process lives. A file names the host it was written on, and
``plannersync health <worker>`` judges the freshest file of that worker written on its own host (in a container: its
own replica). A replica beyond the first removes its file when it stops; a file whose slot nobody holds is removed by
the next replica that starts.

The file holds what the worker's ``health()`` answered (``shared.workers.Health``) plus when it was written.
``plannersync status`` shows the files next to the mailboxes and queue depths; ``plannersync health <worker>``
exits 0 only for a fresh file of a worker whose loop is still beating and that can do its job (the compose
healthcheck). A file is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from shared.logs import get_logger
from shared.workers import Health, Worker

log = get_logger(__name__)
WRITE_EVERY = 2.0


def write_health(directory: Path, name: str, health: Health, now: float | None = None) -> None:
    """Write one worker's health file atomically."""
    now = time.time() if now is None else now
    directory.mkdir(parents=True, exist_ok=True)
    data = {
        "worker": worker_of(name),
        "state": health.state,
        "ok": health.ok,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "updated_at": datetime.fromtimestamp(now, timezone.utc).isoformat(),
        "updated_ts": now,
        "beat_at": datetime.fromtimestamp(health.beat_at, timezone.utc).isoformat(),
        "beat_ts": health.beat_at,
        **health.facts,
    }
    tmp = directory / f".{name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, default=str))
    tmp.replace(directory / f"{name}.json")


MAX_SLOTS = 32


def hold_slot(directory: Path, stem: str, first: int = 1, last: int = MAX_SLOTS) -> tuple[int, IO[str]] | None:
    """The first of the slot files ``<stem>-<n>.lock`` (n from ``first`` to ``last``) in ``directory`` that no live
    process holds, locked (``flock``) for as long as the returned handle stays open: the kernel lets go of it when the
    process ends, however it ends. None where there is no such slot or no ``flock`` (not POSIX)."""
    try:
        import fcntl
    except ImportError:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    for slot in range(first, last + 1):
        handle = open(directory / f"{stem}-{slot}.lock", "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        return slot, handle
    return None


def health_file_name(name: str, slot: int) -> str:
    return name if slot == 1 else f"{name}.{slot}"


def worker_of(file_name: str) -> str:
    """The worker a health file (by its name without ``.json``) belongs to: ``transformer.2`` is a transformer's."""
    return file_name.split(".", 1)[0]


def own_health(files: dict[str, dict[str, Any]], worker: str, host: str) -> dict[str, Any] | None:
    """What ``plannersync health <worker>`` judges: of that worker's files, the freshest written on ``host`` (a file
    from before decision 103 names no host and counts as this host's); None when there is none."""
    mine = [data for name, data in files.items() if worker_of(name) == worker and data.get("host", host) == host]
    return max(mine, key=lambda data: float(data.get("updated_ts", 0)), default=None)


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
        self.file_name = name
        self._slot: IO[str] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"health-{name}", daemon=True)

    def start(self) -> None:
        self._take_file()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.every * 2)
        if self.file_name != self.name:   # a replica beyond the first leaves: its file goes with it
            (self.directory / f"{self.file_name}.json").unlink(missing_ok=True)
        if self._slot is not None:
            self._slot.close()
            self._slot = None

    def _take_file(self) -> None:
        """This process's own file (decision 103); files of replicas that are gone (their slots free) are removed."""
        try:
            held = hold_slot(self.directory, f"{self.name}.health")
            if held is None:
                return
            slot, self._slot = held
            self.file_name = health_file_name(self.name, slot)
            for other in self.directory.glob(f"{self.name}.*.json"):
                gone = other.name[len(self.name) + 1 : -len(".json")]
                if gone.isdigit() and int(gone) != slot and (free := hold_slot(self.directory, f"{self.name}.health", int(gone), int(gone))) is not None:
                    other.unlink(missing_ok=True)
                    free[1].close()
        except OSError as exc:   # an unusable directory: written (or not) as before, and said
            log.warning("health_file_not_claimed", worker=self.name, error=type(exc).__name__, detail=str(exc)[:200])

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._write()
            self._stop.wait(self.every)

    def _write(self) -> None:
        try:
            write_health(self.directory, self.file_name, self.worker.health())
        except Exception as exc:  # noqa: BLE001 - a full disk must not stop the worker; it shows as a stale file
            log.warning("health_not_written", worker=self.name, error=type(exc).__name__, detail=str(exc)[:200])
