"""Every worker in one process (`plannersync run all`, decision 94): the pipeline works end to end, each worker
keeps its own health file and log name, SIGTERM stops them all, and one worker that cannot run ends the process."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pytest
import requests

from shared.adapters.store import Store, upgrade
from simulators.exchange.server import RunningExchangeSim, start_server
from simulators.planner.server import RunningPlannerSim
from tests.support.processes import PLANNERSYNC
from tests.support.producers import CPH
from tests.support.waiting import wait_for

MAILBOX = "anne@jobcenter.dk"
EVERY_WORKER = ["change-producer", "snapshot-producer", "transformer", "publisher", "reconciler", "resource-sync"]


@pytest.fixture
def ews() -> Iterator[RunningExchangeSim]:
    sim = start_server(users={"svc": "pw"}, minute_seconds=2.0, keepalive_seconds=0.5, mailboxes=[MAILBOX])
    yield sim
    sim.stop()


def _env(worker_env: dict[str, str], ews: RunningExchangeSim, planner_sim: RunningPlannerSim) -> dict[str, str]:
    return {
        **worker_env,
        "PLANNERSYNC_PLANNER__ENDPOINT": planner_sim.url,
        "PLANNERSYNC_PLANNER__LINGER": "50ms",
        "PLANNERSYNC_EXCHANGE__ENDPOINT": ews.url,
        "PLANNERSYNC_EXCHANGE__USERNAME": "svc",
        "PLANNERSYNC_EXCHANGE__PASSWORD": "pw",
        "PLANNERSYNC_EXCHANGE__STREAM_MINUTES": "1",
        "PLANNERSYNC_EXCHANGE__MAILBOX_RELOAD_INTERVAL": "500ms",
    }


def test_every_worker_in_one_process_carries_busy_times_to_planner_and_stops_on_sigterm(
    worker_env: dict[str, str], ews: RunningExchangeSim, planner_sim: RunningPlannerSim, tmp_path: Path,
) -> None:
    day = (datetime.now(CPH) + timedelta(days=2)).date()
    control = f"{ews.control_url}/mailboxes/{MAILBOX}"
    uids = []
    for hour in (9, 11, 13):
        uid = f"together-{hour}"
        requests.post(f"{control}/items", json={"uid": uid, "start": f"{day}T{hour:02d}:00", "end": f"{day}T{hour:02d}:45", "timezone": "Romance Standard Time"},
                      timeout=10).raise_for_status()
        uids.append(uid)
    store = Store.connect(worker_env["PLANNERSYNC_DATABASE__URL"])
    upgrade(store.engine)
    store.add_mailbox(MAILBOX)
    env = _env(worker_env, ews, planner_sim)
    log_path = tmp_path / "all.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([PLANNERSYNC, "run", "all"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: {e.origin_id for e in planner_sim.state.events(MAILBOX)} == set(uids), 60, interval=0.3, what="Planner to hold the three busy times")
        requests.patch(f"{control}/items/{uids[0]}", json={"start": f"{day}T15:00", "end": f"{day}T15:30"}, timeout=10).raise_for_status()
        moved = datetime.combine(day, datetime.min.time()).replace(hour=15, tzinfo=CPH).astimezone(timezone.utc)
        wait_for(lambda: any(e.origin_id == uids[0] and e.start == moved for e in planner_sim.state.events(MAILBOX)), 30, interval=0.2,
                 what="the moved appointment in Planner")

        def healthy(worker: str) -> bool:
            return subprocess.run([PLANNERSYNC, "health", worker], env=env, capture_output=True, timeout=30).returncode == 0

        wait_for(lambda: all(healthy(worker) for worker in EVERY_WORKER), 30, interval=0.5, what="a fresh health file of every worker")
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    services = {line.get("service") for line in lines}
    assert {"change-producer", "transformer", "publisher"} <= services, services   # each thread's lines name their worker
    assert not [line for line in lines if line.get("event") == "worker_crashed"]


def test_a_worker_that_cannot_run_ends_the_whole_process_with_one_line(
    worker_env: dict[str, str], ews: RunningExchangeSim, planner_sim: RunningPlannerSim, tmp_path: Path,
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    env = {**_env(worker_env, ews, planner_sim), "PLANNERSYNC_STATUS__PAGE_PORT": str(taken.getsockname()[1])}
    try:
        done = subprocess.run([PLANNERSYNC, "run", "transformer", "status-page"], env=env, capture_output=True, text=True, timeout=90)
    finally:
        taken.close()
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    crashed = [line for line in lines if line.get("event") == "worker_crashed"]
    assert done.returncode != 0
    assert [line.get("worker") for line in crashed] == ["status-page"], crashed
    assert "transformer" in {line.get("service") for line in lines}   # it had started, and was stopped with the process
