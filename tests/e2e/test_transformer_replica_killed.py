"""A transformer replica that dies between publishing its states and recording them loses nothing (decision 95).

Found by the fault suite's replicas scenario (one run in about five): an appointment created and deleted while a
transformer replica was SIGKILLed stayed in Planner. Made here the way it happens, with two transformer processes, a
publisher process, the Planner simulator and PostgreSQL:

1. The test locks the desired-state table (writes wait; reads and the claims table do not) and publishes the create.
   One replica (A) claims the mailbox, decides the create and publishes it (Planner gets the event), then waits in
   its record step.
2. A stalls (SIGSTOP: a paused VM, a swapped-out host; its broker heartbeat is set long enough to outlast this). The
   delete is published (again, until the other replica has it): the other replica (B) finds the mailbox claimed
   and holds the delete back until A's claim expires, then decides it, from a store that never learnt of the
   create: nothing to delete. Its record waits on the lock too.
3. A is SIGKILLed and the lock let go: A's create goes back to the queue and on to B, after the delete.

Before decision 95 that late create, older than the delete, was ignored and the event stayed in Planner for good.
Now it restates the delete, as the delete would have decided had it known the key, and the publisher deletes the
event. (In the fault suite the same order came from two held messages coming due in turn.)
"""

from __future__ import annotations

import os
import signal
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest

from services.transformer.worker import CLAIM_TTL
from shared.adapters.store import Store, upgrade
from shared.broker.topology import Topology
from shared.domain.contracts import CalendarChange, CalendarItem
from simulators.planner.server import RunningPlannerSim
from tests.support.broker import publish_raw
from tests.support.processes import WorkerProcess
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(300)

MAILBOX = "replica.killed@jobcenter.dk"


def _change(observed_at: datetime, change: str, start: datetime) -> CalendarChange:
    item = CalendarItem(item_id="item-killed-1", uid="uid-killed-1", start=start, end=start + timedelta(hours=1), free_busy="Busy")
    return CalendarChange(
        correlation_id=uuid.uuid4().hex, mailbox=MAILBOX, observed_at=observed_at, change=change,  # type: ignore[arg-type]
        item_id=item.item_id, item=item if change == "upsert" else None,
    )


def test_a_create_sent_by_a_replica_that_died_before_its_record_is_deleted_when_its_delete_was_decided_first(
    worker_env: dict[str, str], pg_url: str, topology: Topology, planner_sim: RunningPlannerSim, processes: list[WorkerProcess], tmp_path: Path,
) -> None:
    store = Store.connect(pg_url)
    upgrade(store.engine)
    store.add_mailbox(MAILBOX)
    store.engine.dispose()
    env = {**worker_env, "PLANNERSYNC_DATABASE__URL": pg_url, "PLANNERSYNC_PLANNER__ENDPOINT": planner_sim.url, "PLANNERSYNC_PLANNER__LINGER": "50ms"}
    processes.append(WorkerProcess("publisher", env, tmp_path).start())
    replicas = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()   # a log of its own; the health directory (and so the replica slots) is shared
        replicas.append(WorkerProcess("transformer", {**env, "PLANNERSYNC_BROKER__HEARTBEAT": "600"}, tmp_path / name).start())
    processes.extend(replicas)
    wait_for(lambda: all("worker_consuming" in r.log() for r in replicas), 30, what="both transformers consuming")

    start = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=2)
    created_at = datetime.now(timezone.utc)
    create, delete = _change(created_at, "upsert", start), _change(created_at + timedelta(seconds=1), "delete", start)
    locker = psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
    try:
        with locker.transaction():
            locker.execute("LOCK TABLE desired_states IN SHARE MODE")
            publish_raw(topology.calendar_exchange, topology.change_key(MAILBOX), create.model_dump_json().encode())
            wait_for(lambda: [e.origin_id for e in planner_sim.state.events(MAILBOX)] == ["uid-killed-1"], 30,
                     what="the create in Planner, its record waiting on the lock")
            (stalled,) = [r for r in replicas if create.correlation_id in r.log()]
            (other,) = [r for r in replicas if r is not stalled]
            assert stalled.process is not None
            os.kill(stalled.process.pid, signal.SIGSTOP)

            def the_other_holds_the_delete() -> bool:
                if "messages_deferred" not in other.log():
                    publish_raw(topology.calendar_exchange, topology.change_key(MAILBOX), delete.model_dump_json().encode())
                return "messages_deferred" in other.log()

            wait_for(the_other_holds_the_delete, 20, interval=1.0, what="the delete held back by the other replica")
            wait_for(lambda: delete.correlation_id in other.log() and "calendar_transformed" in other.log(), CLAIM_TTL.total_seconds() + 30,
                     interval=1.0, what="the delete decided by the other replica once the stalled one's claim expired")
            stalled.kill()
    finally:
        locker.close()

    wait_for(lambda: create.correlation_id in other.log(), 30, what="the create handed to the other replica")
    wait_for(lambda: planner_sim.state.events(MAILBOX) == [], 30, interval=0.5, what="the event deleted from Planner")
    operations = [c.operation for c in planner_sim.state.calls() if c.operation in ("CreateEvents", "DeleteEvents")]
    assert operations == ["CreateEvents", "DeleteEvents"], operations
