"""The transformer's scenario table again, end to end: broker → transformer → publisher → Planner simulator.

Every scenario of ``tests/unit/domain/test_transform_core.py`` gets its own mailbox; all are published in
order and run through the real workers (transformer clock fixed at the table's "now"). What the
Planner simulator finally holds per mailbox must equal the scenario's final state.
"""

from __future__ import annotations

import threading
from typing import Any, Iterator

import pytest

from services.publisher.worker import build as build_publisher
from services.transformer.worker import TransformerDeps, handle
from shared.adapters.store import open_store
from shared.broker.consume_loop import Consumer, ConsumerOptions
from shared.broker.publishing import Outgoing, Publisher
from shared.broker.topology import Topology
from shared.config import Settings, load_settings
from shared.domain.contracts import CalendarChange, CalendarSnapshot, Interval
from simulators.planner.server import RunningPlannerSim, start_server
from tests.support.waiting import wait_for
from tests.unit.domain.test_transform_core import NOW, POLICY, SCENARIOS

RUNNABLE = [(n, s) for n, s in enumerate(SCENARIOS) if not any(isinstance(step, tuple) for step in s.steps)]


@pytest.fixture
def planner() -> Iterator[RunningPlannerSim]:
    sim = start_server()
    yield sim
    sim.stop()


def _mailbox(n: int) -> str:
    return f"scenario{n:02d}@kommune.dk"


def _rewrite(step: Any, n: int) -> CalendarChange | CalendarSnapshot:
    update: dict[str, Any] = {"mailbox": _mailbox(n)}
    if isinstance(step, CalendarSnapshot):
        update["snapshot_id"] = f"{n}-{step.snapshot_id}"
    return step.model_copy(update=update)


def test_every_scenario_ends_with_the_expected_busy_times_in_planner(settings: Settings, topology: Topology, planner: RunningPlannerSim) -> None:
    assert len(RUNNABLE) >= 40 and sum(1 for _, s in RUNNABLE if s.final) >= 20
    config = load_settings(environ={}, **{**settings.model_dump(mode="python", exclude={"planner", "busy"}), "planner": {"endpoint": planner.url, "linger": "50ms"}})
    store = open_store(config.database_url(), True)
    transformer = Consumer(
        config.broker, topology, topology.stage("transformer"),
        lambda batch: handle(batch, TransformerDeps(store, topology, POLICY, clock=lambda: NOW)), ConsumerOptions(prefetch=200, batch_size=100),
    )
    publisher = build_publisher(config)
    threads = [threading.Thread(target=w.run, daemon=True) for w in (transformer, publisher)]
    for thread in threads:
        thread.start()
    producer = Publisher(config.broker, topology)
    sent = 0
    for n, scenario in RUNNABLE:
        for step in scenario.steps:
            message = _rewrite(step, n)
            key = topology.change_key(message.mailbox) if isinstance(message, CalendarChange) else topology.snapshot_key(message.mailbox)
            producer.publish(Outgoing(topology.calendar_exchange, key, message))
            sent += 1
    producer.close()

    def held(n: int) -> dict[str, Interval]:
        return {e.origin_id: Interval(start=e.start, end=e.end) for e in planner.state.events(_mailbox(n))}

    def all_match() -> bool:
        return all(held(n) == scenario.final for n, scenario in RUNNABLE)

    try:
        wait_for(lambda: transformer.counters.handled >= sent, 60, what=f"the transformer to handle {sent} messages")
        wait_for(all_match, 60, interval=0.2, what="Planner to hold every scenario's final state")
    finally:
        for worker in (transformer, publisher):
            worker.stop()
        for thread in threads:
            thread.join(20)
    mismatches = {scenario.name: (held(n), scenario.final) for n, scenario in RUNNABLE if held(n) != scenario.final}
    assert mismatches == {}
    assert transformer.counters.dead_lettered == 0 and publisher.counters.dead_lettered == 0
