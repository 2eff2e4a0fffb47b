"""A worker that dies says why: a JSON line for an exception, a stack trace for a fatal signal (decision 57).

The workers run as real processes (``plannersync run transformer``); what they write to stderr is read as an
operator's log pipeline would read it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from shared.broker.topology import Topology
from shared.domain.contracts import CalendarChange, CalendarItem, encode
from tests.support.broker import publish_raw
from tests.support.database import pg_database_url
from tests.support.processes import PLANNERSYNC
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(120)


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            lines.append(value)
    return lines


@pytest.mark.parametrize("database", ["sqlite-directory-deleted", "postgres-database-dropped"])
def test_a_worker_whose_database_is_gone_logs_the_cause_as_one_json_line(worker_env: dict[str, str], tmp_path: Path, pg_admin: Any, database: str) -> None:
    if database == "sqlite-directory-deleted":
        directory = tmp_path / "volume"
        directory.mkdir()
        directory.rmdir()  # the volume the store lived on is gone
        url = f"sqlite:///{directory / 'state.db'}"
    else:
        name = f"ps_{uuid.uuid4().hex[:10]}"
        pg_admin.execute(f'CREATE DATABASE "{name}"')
        pg_admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        url = pg_database_url(name)
    env = {**worker_env, "PLANNERSYNC_DATABASE__URL": url}
    finished = subprocess.run([PLANNERSYNC, "run", "transformer", "--no-ensure-topology"], env=env, capture_output=True, text=True, timeout=90)

    assert finished.returncode != 0
    crashes = [line for line in json_lines(finished.stderr) if line.get("event") == "worker_crashed"]
    assert len(crashes) == 1, finished.stderr[-3000:]
    crash = crashes[0]
    assert crash["level"] == "critical"
    assert crash["error"] and crash["detail"]
    assert "database" in crash["detail"] or "unable to open" in crash["detail"]
    assert crash["traceback"].startswith("Traceback") and crash["error"].rsplit(".", 1)[-1] in crash["traceback"]


def test_a_worker_killed_by_sigbus_on_a_vanished_wal_index_leaves_a_trace_on_stderr(worker_env: dict[str, str], topology: Topology, tmp_path: Path) -> None:
    stderr_path = tmp_path / "transformer.stderr"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen([PLANNERSYNC, "run", "transformer"], env=worker_env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_for(lambda: "worker_consuming" in stderr_path.read_text(errors="replace"), 30, what="the transformer consuming")
        shm = Path(worker_env["PLANNERSYNC_DATABASE__URL"].removeprefix("sqlite:///") + "-shm")
        assert shm.exists()
        os.truncate(shm, 0)  # what a vanished or truncated WAL index looks like to the mapping SQLite holds
        start = datetime.fromtimestamp(time.time(), timezone.utc) + timedelta(days=1)
        item = CalendarItem(item_id="item-bus", uid="uid-bus", start=start, end=start + timedelta(hours=1), free_busy="Busy")
        change = CalendarChange(correlation_id="corr-bus", mailbox="anne@kommune.dk", observed_at=start, change="upsert", item_id="item-bus", item=item)
        publish_raw(topology.calendar_exchange, topology.change_key(change.mailbox), encode(change))
        returncode = process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    text = stderr_path.read_text(errors="replace")
    assert returncode == -signal.SIGBUS, text[-3000:]
    assert "Fatal Python error: Bus error" in text, text[-3000:]
    assert "most recent call first" in text  # the stack of the thread that touched the mapping, and the others
