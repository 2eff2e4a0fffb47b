"""A receipt lost on the way to the store does not make the publisher create the event a second time.

Found by the fault suite's soak (`soak-exchange-pg`: one CreateEvents answered 8, "already exists"): Planner applied
a CreateEvents, and the publisher's write of the receipt failed because the database connection was cut at that
moment. The message was retried, the store still said "never delivered", and the same event was created again.
Made here the way it happens: Planner takes a moment to answer, meanwhile the test holds a lock on the receipts
table so the publisher's write waits, and then terminates that waiting database connection (PostgreSQL
``pg_terminate_backend``), as a failover or an operator's kill would. The publisher runs as a process.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import requests

from shared.adapters.store import Store, upgrade
from shared.broker.topology import Topology
from shared.domain.contracts import BusyTimeState, Interval
from simulators.planner.server import RunningPlannerSim
from tests.support.broker import publish_raw
from tests.support.processes import WorkerProcess
from tests.support.waiting import wait_for

MAILBOX = "receipt@jobcenter.dk"


def test_a_create_whose_receipt_could_not_be_stored_is_not_created_again(
    worker_env: dict[str, str], pg_url: str, pg_admin: Any, topology: Topology, planner_sim: RunningPlannerSim,
    processes: list[WorkerProcess], tmp_path: Path,
) -> None:
    database = pg_url.rsplit("/", 1)[1]
    store = Store.connect(pg_url)
    upgrade(store.engine)
    store.add_mailbox(MAILBOX)
    store.engine.dispose()
    env = {**worker_env, "PLANNERSYNC_DATABASE__URL": pg_url, "PLANNERSYNC_PLANNER__ENDPOINT": planner_sim.url, "PLANNERSYNC_PLANNER__LINGER": "50ms"}
    publisher = WorkerProcess("publisher", env, tmp_path).start()
    processes.append(publisher)
    requests.post(f"{planner_sim.control_url}/faults", json={"type": "latency", "seconds": 2.0, "operations": ["CreateEvents"], "times": 1},
                  timeout=10).raise_for_status()
    start = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=2)
    state = BusyTimeState(correlation_id="c-lost-receipt", mailbox=MAILBOX, origin_id="lost-receipt-1", version=1,
                          interval=Interval(start=start, end=start + timedelta(hours=1)))
    publish_raw(topology.busy_exchange, topology.busy_key(MAILBOX), state.model_dump_json().encode())

    wait_for(lambda: any(c.operation == "CreateEvents" for c in planner_sim.state.calls()), 30, what="the CreateEvents call under way")
    locker = psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
    try:
        with locker.transaction():   # the receipts table locked while Planner answers: the publisher's write has to wait
            locker.execute("LOCK TABLE delivered_events IN ACCESS EXCLUSIVE MODE")
            waiting = wait_for(lambda: pg_admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'", (database,)).fetchall(),
                30, what="the publisher's receipt write waiting on the lock")
            for (pid,) in waiting:
                pg_admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    finally:
        locker.close()
    wait_for(lambda: [e.origin_id for e in planner_sim.state.events(MAILBOX)] == ["lost-receipt-1"], 30, what="the event in Planner")
    time.sleep(3)   # the retry of the message (the test's retry ladder starts at 300 ms) has had its time
    creates = [(c.outcome, c.codes) for c in planner_sim.state.calls() if c.operation == "CreateEvents"]
    assert creates == [("ok", [0])], creates   # one create; not a second one answered 8 "already exists"
    assert "handler_failed" in publisher.log() or "OperationalError" in publisher.log()   # the write really failed
