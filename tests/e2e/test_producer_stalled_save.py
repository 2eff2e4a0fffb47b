"""A change-producer replica that stalls in the middle of a read, past its lease, does not save its older sync state over
the one its successor saved (decision 102).

Found by the fault suite's replicas scenario (about one run in three, on PostgreSQL): an appointment created and
deleted while a replica was SIGSTOPped stayed in Planner. Made here the way it happens, with two change-producer
processes and the EWS simulator:

1. Replica A holds the mailbox and reads it. Its SyncFolderItems answer drips (the simulator made it when the request
   came: the state it carries is the mailbox as it was then). A is SIGSTOPped while the answer is on its way.
2. Replica B starts, takes the mailbox over once A's lease has expired, and reads it. The caseworker creates an
   appointment; B reads it (the create is published) and saves a state that includes it.
3. A resumes (SIGCONT) and ends its read. Before the fix it saved its state, which predates the appointment.
4. The caseworker deletes the appointment. Read from A's state the appointment was never there, so the deletion is
   never read: no delete, and the busy time stays in Planner for good. Read from B's state it is a delete.
"""

from __future__ import annotations

import json
import os
import signal
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from shared.adapters.store import Store, upgrade
from shared.broker.topology import Topology
from shared.domain.contracts import CalendarChange
from simulators.exchange.server import RunningExchangeSim, start_server
from tests.support.processes import WorkerProcess
from tests.support.producers import Collector, add_appointment
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(240)

MAILBOX = "stalled.save@jobcenter.dk"


@pytest.fixture
def ews() -> Iterator[RunningExchangeSim]:
    sim = start_server(users={"svc": "pw"}, minute_seconds=2.0, keepalive_seconds=0.5, mailboxes=[MAILBOX])
    yield sim
    sim.stop()


@pytest.fixture
def collector(topology: Topology) -> Iterator[Collector]:
    c = Collector(topology)
    yield c
    c.close()


def add_item(sim: RunningExchangeSim, day: int) -> dict[str, Any]:
    return add_appointment(sim, MAILBOX, day, f"uid-stalled-{day}")


def events(worker: WorkerProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]


def deletes(collector: Collector, item_id: str) -> list[CalendarChange]:
    collector.poll()
    return [m for m in collector.messages if isinstance(m, CalendarChange) and m.change == "delete" and m.item_id == item_id]


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_replica_stalled_in_a_read_past_its_lease_does_not_save_its_older_state_over_its_successors(
    database: str, worker_env: dict[str, str], ews: RunningExchangeSim, collector: Collector, processes: list[WorkerProcess],
    tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    url = request.getfixturevalue("pg_url") if database == "postgresql" else worker_env["PLANNERSYNC_DATABASE__URL"]
    store = Store.connect(url)
    upgrade(store.engine)
    store.add_mailbox(MAILBOX)
    env = {
        **worker_env,
        "PLANNERSYNC_DATABASE__URL": url,
        "PLANNERSYNC_EXCHANGE__ENDPOINT": ews.url,
        "PLANNERSYNC_EXCHANGE__USERNAME": "svc",
        "PLANNERSYNC_EXCHANGE__PASSWORD": "pw",
        "PLANNERSYNC_EXCHANGE__LEASE_TTL": "3s",
        "PLANNERSYNC_EXCHANGE__STREAM_MINUTES": "1",
        "PLANNERSYNC_EXCHANGE__STREAM_SILENCE_TIMEOUT": "3s",
        "PLANNERSYNC_EXCHANGE__SAFETY_SYNC_INTERVAL": "10m",
        "PLANNERSYNC_EXCHANGE__MAILBOX_RELOAD_INTERVAL": "300ms",
        "PLANNERSYNC_EXCHANGE__TRANSIENT_RETRY": "200ms",
        "PLANNERSYNC_BROKER__HEARTBEAT": "600",   # A's broker connection outlasts its stall (its lease does not)
    }
    try:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        a = WorkerProcess("change-producer", {**env, "PLANNERSYNC_EXCHANGE__REPLICA_ID": "replica-a"}, tmp_path / "a").start()
        processes.append(a)

        def owner() -> str | None:
            return next((lease.owner for lease in store.leases() if lease.mailbox == MAILBOX), None)

        def saved_after(moment: datetime) -> bool:
            position = store.sync_position(MAILBOX)
            return position is not None and position.last_sync_at > moment

        wait_for(lambda: owner() == "replica-a" and store.sync_position(MAILBOX) is not None, 30, what="A reading the mailbox")
        wait_for(lambda: any(e.get("event") == "stream_opened" or e.get("event") == "subscribed" for e in events(a))
                 or len(ews.state.call_log("Subscribe", MAILBOX)) > 0, 30, what="A subscribed")

        # 1. A's next read gets an answer that drips (for a second or more); A is stopped while it comes. The fault is
        # taken when the request arrives, so once the simulator lists it no more, A's read is under way.
        fault = {"kind": "drip", "mailbox": MAILBOX, "operation": "SyncFolderItems", "count": 1, "interval_ms": 150}
        requests.post(f"{ews.control_url}/faults", json=fault, timeout=10).raise_for_status()
        first = add_item(ews, 3)
        wait_for(lambda: requests.get(f"{ews.control_url}/faults", timeout=10).json() == [], 20, what="A's dripping read under way")
        assert a.process is not None
        os.kill(a.process.pid, signal.SIGSTOP)
        stopped_at = datetime.now(timezone.utc)
        try:
            # 2. B takes the mailbox over and reads it; the appointment is created and B reads that too
            b = WorkerProcess("change-producer", {**env, "PLANNERSYNC_EXCHANGE__REPLICA_ID": "replica-b"}, tmp_path / "b").start()
            processes.append(b)
            wait_for(lambda: owner() == "replica-b" and saved_after(stopped_at), 40, what="B holding the mailbox and reading it")
            created_at = datetime.now(timezone.utc)
            doomed = add_item(ews, 4)
            wait_for(lambda: collector.changes_for(doomed["uid"]) and saved_after(created_at), 20, what="B publishing the create and saving")
            read_by_b = store.sync_position(MAILBOX)
        finally:
            os.kill(a.process.pid, signal.SIGCONT)
        # 3. A ends its read: the answer it waited for carries the state from before the appointment
        # (it either saves that state, or, fenced, logs that it did not)
        wait_for(lambda: any(e.get("event") == "lease_lost" and e.get("mailbox") == MAILBOX for e in events(a))
                 or store.sync_position(MAILBOX) != read_by_b, 30, what="A ending its stalled read")
        assert collector.changes_for(first["uid"])
        after_a = store.sync_position(MAILBOX)
        # 4. the appointment is deleted: the replica that holds the mailbox must read the delete
        requests.delete(f"{ews.control_url}/mailboxes/{MAILBOX}/items/{doomed['uid']}", timeout=10).raise_for_status()
        wait_for(lambda: deletes(collector, doomed["id"]), 20, what="the delete read and published")
        assert read_by_b is not None and after_a == read_by_b, "the stalled replica saved its older state"
        assert owner() == "replica-b"
        lost = [e for e in events(a) if e.get("event") == "lease_lost"]
        assert lost and "not saved" in lost[-1]["detail"]
    finally:
        store.engine.dispose()
