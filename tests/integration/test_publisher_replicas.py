"""Two publisher workers on one real queue and one store, against the Planner simulator (issue 12, decision 89).

Both run as in production (``services.publisher.worker.build(settings)`` → ``Consumer``), each in a thread of this
process. Planner takes a second over each CreateEvents. An appointment is created and, while Planner still holds its
create, deleted: the delete goes out twice, so one copy reaches the replica that is not busy with the create (the
broker hands a queue's messages to its consumers in turn). That replica must not judge the delete, nor call Planner
for the key, before the create's receipt is stored: otherwise its delete reaches Planner before the create (answered
10, "already gone", taken as done), the create then lands, and only the other copy, judged after the create by the
replica that made it, happens to remove the busy time again (sent once, it stays in Planner for good: the fault
suite's replicas test). So each key's Planner calls must be exactly one create and then one delete.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pytest

from services.publisher.worker import build
from shared.adapters.store import Store, upgrade
from shared.broker.consume_loop import Consumer
from shared.broker.publishing import Outgoing, Publisher
from shared.broker.topology import Topology
from shared.config import DatabaseSettings, Settings
from shared.domain.contracts import BusyTimeState, Interval, version_of
from simulators.planner.server import RunningPlannerSim, start_server
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(180)

MAILBOX = "anna.jensen@testkommune.dk"
DAY = datetime.combine((datetime.now(timezone.utc) + timedelta(days=7)).date(), datetime.min.time(), tzinfo=timezone.utc)
_versions = itertools.count(version_of(datetime.now(timezone.utc)))


def busy(origin_id: str, hour: int) -> BusyTimeState:
    interval = Interval(start=DAY + timedelta(hours=hour), end=DAY + timedelta(hours=hour + 1))
    return BusyTimeState(correlation_id=uuid.uuid4().hex, mailbox=MAILBOX, origin_id=origin_id, version=next(_versions), interval=interval)


def absent(origin_id: str) -> BusyTimeState:
    return BusyTimeState(correlation_id=uuid.uuid4().hex, mailbox=MAILBOX, origin_id=origin_id, version=next(_versions), interval=None)


@pytest.fixture
def planner() -> Iterator[RunningPlannerSim]:
    sim = start_server()
    yield sim
    sim.stop()


@dataclass
class Replicas:
    consumers: list[Consumer]
    database_url: str


@pytest.fixture
def replicas(request: pytest.FixtureRequest, settings: Settings, topology: Topology, planner: RunningPlannerSim, tmp_path: Path) -> Iterator[Replicas]:
    url = f"sqlite:///{tmp_path / 'state.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    upgrade(Store.connect(url).engine)  # once, before two workers start on it
    planner_settings = settings.planner.model_copy(update={"endpoint": planner.url, "timeout": timedelta(seconds=5), "linger": timedelta(milliseconds=20)})
    worker_settings = settings.model_copy(update={"planner": planner_settings, "database": DatabaseSettings(url=url)})
    consumers = [build(worker_settings), build(worker_settings)]
    threads = [threading.Thread(target=consumer.run, name=f"publisher-{n}", daemon=True) for n, consumer in enumerate(consumers)]
    for thread in threads:
        thread.start()
    wait_for(lambda: all(consumer.counters.connected for consumer in consumers), 20, what="both publishers consuming")
    yield Replicas(consumers, url)
    for consumer in consumers:
        consumer.stop()
    for thread in threads:
        thread.join(30)


@pytest.mark.parametrize("replicas", ["sqlite", "postgresql"], indirect=True)
def test_two_publishers_never_call_planner_for_one_event_key_at_once_so_a_create_then_delete_leaves_nothing(
    replicas: Replicas, settings: Settings, topology: Topology, planner: RunningPlannerSim,
) -> None:
    keys = [f"replica-race-{uuid.uuid4().hex[:8]}-{n}" for n in range(3)]
    planner.state.add_faults([{"type": "latency", "seconds": 1.0, "operations": ["CreateEvents"], "times": len(keys)}], datetime.now(timezone.utc))
    publisher = Publisher(settings.broker, topology)
    sent = 0
    try:
        for n, key in enumerate(keys):
            publisher.publish(Outgoing(topology.busy_exchange, topology.busy_key(MAILBOX), busy(key, 8 + n)))
            wait_for(lambda: any(key in call.origin_ids and call.outcome == "pending" for call in planner.state.calls()), 20,
                     interval=0.02, what="the create in Planner's hands")
            delete = absent(key)
            for _ in range(2):  # one copy reaches the other replica while the create is still in Planner's hands
                publisher.publish(Outgoing(topology.busy_exchange, topology.busy_key(MAILBOX), delete))
            sent += 3
        wait_for(lambda: sum(c.counters.handled + c.counters.dead_lettered for c in replicas.consumers) >= sent, 60, what=f"{sent} messages settled")
        wait_for(lambda: not any(call.outcome == "pending" for call in planner.state.calls()), 20, what="no Planner call in flight")
    finally:
        publisher.close()
    calls = {key: [(call.operation, dict(zip(call.origin_ids, call.codes)).get(key)) for call in planner.state.calls() if key in call.origin_ids]
             for key in keys}
    assert [event.origin_id for event in planner.state.events(MAILBOX)] == [], calls  # each was created, then deleted
    assert calls == {key: [("CreateEvents", 0), ("DeleteEvents", 0)] for key in keys}  # never a delete while the create is in Planner's hands
    assert sum(c.counters.dead_lettered for c in replicas.consumers) == 0
    store = Store.connect(replicas.database_url)
    rows = store.delivered(MAILBOX, keys)
    assert all(not rows[key].present and not rows[key].maybe_held for key in keys)  # the store says what Planner holds
    assert store.claims("publisher") == {}  # every claim released with its receipts
