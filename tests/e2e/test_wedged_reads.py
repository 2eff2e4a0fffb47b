"""A mailbox read that never ends makes the change producer say so and exit to be restarted (decision 70).

A wedged read (the exchangelib session-pool deadlock of decision 69 was one) used to leave the producer beating
and "healthy" while no mailbox was read again. Here Exchange holds every SyncFolderItems answer far longer than
``exchange.read_stuck_after``: the health turns red with the reason, and the plain process (what compose and
systemd run) logs which mailbox is stuck and exits non-zero at once instead of waiting on the stuck thread.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Iterator

import pytest
import requests

from services.change_producer.worker import build
from shared.adapters.store import Store, upgrade
from shared.config import Settings
from shared.workers import WorkerWedged
from simulators.exchange.server import RunningExchangeSim, start_server
from tests.support.processes import WorkerProcess
from tests.support.settings import settings_from_env
from tests.support.waiting import wait_for

MAILBOX = "wedge@jobcenter.dk"


@pytest.fixture
def ews() -> Iterator[RunningExchangeSim]:
    sim = start_server(users={"svc": "pw"}, mailboxes=[MAILBOX])
    yield sim
    requests.delete(f"{sim.control_url}/faults", timeout=10)
    sim.stop()


def hold_reads(sim: RunningExchangeSim, seconds: float) -> None:
    """Exchange answers every SyncFolderItems only after ``seconds`` (the read is in flight all that time)."""
    requests.post(f"{sim.control_url}/faults", json={"kind": "latency", "latency_ms": int(seconds * 1000), "operations": ["SyncFolderItems"]},
                  timeout=10).raise_for_status()


def producer_env(worker_env: dict[str, str], ews: RunningExchangeSim) -> dict[str, str]:
    store = Store.connect(worker_env["PLANNERSYNC_DATABASE__URL"])
    upgrade(store.engine)
    store.add_mailbox(MAILBOX)
    return {
        **worker_env,
        "PLANNERSYNC_EXCHANGE__ENDPOINT": ews.url,
        "PLANNERSYNC_EXCHANGE__USERNAME": "svc",
        "PLANNERSYNC_EXCHANGE__PASSWORD": "pw",
        "PLANNERSYNC_EXCHANGE__SUBSCRIPTION": "pull",
        "PLANNERSYNC_EXCHANGE__READ_STUCK_AFTER": "1s",
    }


def test_a_wedged_read_turns_health_red_and_run_raises(worker_env: dict[str, str], ews: RunningExchangeSim, topology: object) -> None:
    hold_reads(ews, 6)   # beyond read_stuck_after (1 s)
    settings: Settings = settings_from_env(producer_env(worker_env, ews))
    producer = build(settings)
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            producer.run()
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            outcome.append(exc)

    healths = []
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert producer.health().ok   # before the read has run for a second
    wait_for(lambda: healths.append(producer.health()) or not healths[-1].ok or bool(outcome), timeout=15, what="health red")
    thread.join(15)
    red = [h for h in healths if not h.ok]
    assert red and red[0].state == "read_stuck" and red[0].facts["stuck_reads"] == 1
    assert len(outcome) == 1 and isinstance(outcome[0], WorkerWedged)


def test_the_producer_process_logs_the_stuck_mailbox_and_exits_non_zero(
    worker_env: dict[str, str], ews: RunningExchangeSim, topology: object, tmp_path: Path, processes: list[WorkerProcess],
) -> None:
    hold_reads(ews, 60)   # beyond the wait below: a process that waited for the stuck thread would not exit in time
    process = WorkerProcess("change-producer", producer_env(worker_env, ews), tmp_path).start()
    processes.append(process)
    assert process.process is not None
    code = process.process.wait(30)
    lines = [json.loads(line) for line in process.log().splitlines() if line.startswith("{")]
    stuck = [line for line in lines if line.get("event") == "mailbox_read_stuck"]
    assert code == 1
    assert stuck and stuck[0]["mailbox"] == MAILBOX
    assert any(line.get("event") == "worker_crashed" and "WorkerWedged" in json.dumps(line) for line in lines)
