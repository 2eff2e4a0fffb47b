"""Nothing missed under failure: random edits while workers are SIGKILLed (and, in the soak, the broker restarts).

The test keeps its own model of the calendars; at the end Planner must hold exactly the busy times the
model says, and no dead-letter queue may hold anything (Jepsen-style accounting: lost = 0, extra = 0).
"""

from __future__ import annotations

import random
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pytest
import requests

from shared.adapters.store import Store, upgrade
from shared.broker.topology import Topology
from shared.config import Settings
from simulators.exchange.server import RunningExchangeSim, start_server
from simulators.planner.server import RunningPlannerSim
from tests.support.broker import queue_depth
from tests.support.processes import WorkerProcess
from tests.support.producers import CPH
from tests.support.waiting import wait_for

MAILBOXES = ["ann@jobcenter.dk", "bo@jobcenter.dk", "cai@jobcenter.dk"]


@pytest.fixture
def ews() -> Iterator[RunningExchangeSim]:
    sim = start_server(users={"svc": "pw"}, minute_seconds=3.0, keepalive_seconds=0.5, mailboxes=MAILBOXES)
    yield sim
    sim.stop()


def _run_chaos(
    edits: int, restart_broker: bool, worker_env: dict[str, str], ews: RunningExchangeSim, planner: RunningPlannerSim,
    topology: Topology, processes: list[WorkerProcess], tmp_path: Path,
) -> None:
    rng = random.Random(20261128)
    store = Store.connect(worker_env["PLANNERSYNC_DATABASE__URL"])
    upgrade(store.engine)
    for mailbox in MAILBOXES:
        store.add_mailbox(mailbox)
    env = {
        **worker_env,
        "PLANNERSYNC_PLANNER__ENDPOINT": planner.url,
        "PLANNERSYNC_PLANNER__LINGER": "50ms",
        "PLANNERSYNC_EXCHANGE__ENDPOINT": ews.url,
        "PLANNERSYNC_EXCHANGE__USERNAME": "svc",
        "PLANNERSYNC_EXCHANGE__PASSWORD": "pw",
        "PLANNERSYNC_EXCHANGE__STREAM_MINUTES": "1",
        "PLANNERSYNC_EXCHANGE__SAFETY_SYNC_INTERVAL": "5s",
        "PLANNERSYNC_EXCHANGE__TRANSIENT_RETRY": "200ms",
        "PLANNERSYNC_BROKER__RECONNECT_MAX_DELAY": "2s",
    }
    workers = {name: WorkerProcess(name, env, tmp_path).start() for name in ("change-producer", "transformer", "publisher")}
    processes.extend(workers.values())
    model: dict[tuple[str, str], tuple[datetime, datetime] | None] = {}
    day0 = datetime.now(CPH).date() + timedelta(days=1)
    kills = {edits // 5: "publisher", 2 * edits // 5: "change-producer", 3 * edits // 5: "transformer"}
    with requests.Session() as http:
        for n in range(edits):
            time.sleep(rng.uniform(0.02, 0.15))  # pacing the load on purpose (not a wait for anything), so kills land while work is in flight
            if n in kills:
                victim = kills[n]
                workers[victim].kill()
                workers[victim] = WorkerProcess(victim, env, tmp_path).start()
                processes.append(workers[victim])
            if restart_broker and n == edits // 2:
                subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True, timeout=120)
                subprocess.run(["rabbitmqctl", "-q", "start_app"], check=True, timeout=120)
            mailbox = rng.choice(MAILBOXES)
            known = [uid for (mb, uid) in model if mb == mailbox and model[(mb, uid)] is not None]
            action = rng.choice(["create", "create", "move", "free", "delete"]) if known else "create"
            if action == "create":
                uid = f"chaos-{n}"
                day = day0 + timedelta(days=rng.randrange(0, 40))
                start = datetime(day.year, day.month, day.day, rng.randrange(8, 15), 0, tzinfo=CPH)
                spec = {"uid": uid, "start": start.strftime("%Y-%m-%dT%H:%M"), "end": (start + timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M"), "timezone": "Romance Standard Time"}
                http.post(f"{ews.control_url}/mailboxes/{mailbox}/items", json=spec, timeout=10).raise_for_status()
                model[(mailbox, uid)] = (start, start + timedelta(minutes=30))
            else:
                uid = rng.choice(known)
                if action == "move":
                    start = model[(mailbox, uid)][0] + timedelta(minutes=rng.choice((15, 45, 90)))  # type: ignore[index]
                    body = {"start": start.strftime("%Y-%m-%dT%H:%M"), "end": (start + timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M")}
                    http.patch(f"{ews.control_url}/mailboxes/{mailbox}/items/{uid}", json=body, timeout=10).raise_for_status()
                    model[(mailbox, uid)] = (start, start + timedelta(minutes=30))
                elif action == "free":
                    http.patch(f"{ews.control_url}/mailboxes/{mailbox}/items/{uid}", json={"status": "Free"}, timeout=10).raise_for_status()
                    model[(mailbox, uid)] = None
                else:
                    http.delete(f"{ews.control_url}/mailboxes/{mailbox}/items/{uid}", timeout=10).raise_for_status()
                    model[(mailbox, uid)] = None

    expected = {
        (mailbox, uid): (start.astimezone(timezone.utc), end.astimezone(timezone.utc))
        for (mailbox, uid), times in model.items()
        if times is not None
        for start, end in [times]
    }

    def held() -> dict[tuple[str, str], tuple[datetime, datetime]]:
        return {(mailbox, e.origin_id): (e.start, e.end) for mailbox in MAILBOXES for e in planner.state.events(mailbox)}

    wait_for(lambda: held() == expected, 120, interval=0.5, what=f"Planner to match the {len(expected)} busy times of the model")
    lost = set(expected) - set(held())
    extra = set(held()) - set(expected)
    assert (lost, extra) == (set(), set())
    for stage in ("transformer", "publisher"):
        assert queue_depth(topology, topology.stage(stage).dead_letter_queue()) == 0, stage


def test_random_edits_survive_sigkilled_workers(
    settings: Settings, topology: Topology, worker_env: dict[str, str], ews: RunningExchangeSim, planner_sim: RunningPlannerSim,
    processes: list[WorkerProcess], tmp_path: Path,
) -> None:
    _run_chaos(60, False, worker_env, ews, planner_sim, topology, processes, tmp_path)


@pytest.mark.soak
def test_soak_many_edits_with_killed_workers_and_a_broker_restart(
    settings: Settings, topology: Topology, worker_env: dict[str, str], ews: RunningExchangeSim, planner_sim: RunningPlannerSim,
    processes: list[WorkerProcess], tmp_path: Path,
) -> None:
    _run_chaos(1500, True, worker_env, ews, planner_sim, topology, processes, tmp_path)


