"""Worker health files: each worker writes ``<health_dir>/<stage>.json`` every few seconds.

``plannersync status`` shows them next to the mailboxes and queue depths; ``plannersync health
<stage>`` exits 0 only for a fresh file of a worker that is not disconnected (the compose
healthcheck). A file is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def write_health(directory: Path, stage: str, state: str, **facts: Any) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    data = {"stage": stage, "state": state, "pid": os.getpid(), "updated_at": datetime.now(timezone.utc).isoformat(), "updated_ts": time.time(), **facts}
    tmp = directory / f".{stage}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, default=str))
    tmp.replace(directory / f"{stage}.json")


def read_health(directory: Path) -> dict[str, dict[str, Any]]:
    result = {}
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            result[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            result[path.stem] = {"stage": path.stem, "state": "unreadable"}
    return result


def is_healthy(data: dict[str, Any] | None, stale_after: float, now: float | None = None) -> tuple[bool, str]:
    if data is None:
        return False, "no health file"
    age = (now or time.time()) - float(data.get("updated_ts", 0))
    if age > stale_after:
        return False, f"health file is {age:.0f} s old"
    if data.get("state") in ("disconnected", "unreadable"):
        return False, f"state {data.get('state')}"
    return True, str(data.get("state"))
