"""Enrolment from Planner end to end: the Planner simulator's resources, the real broker and publisher, the store.

Each test sets the simulator's resources through its control API (``POST /_sim/resources``), the allow and deny
lists in the store, runs one pass (``sync_resources``) or the scheduled worker, and checks the mailboxes, what
Planner holds and the report (decision 62 in docs/decisions.md).
"""

from __future__ import annotations

import threading
import time as _time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

import pytest
import requests

from services.publisher.worker import build as build_publisher
from services.resource_sync.worker import ResourceSync, ResourceSyncDeps, next_due, sync_resources
from shared.adapters.planner_client import PlannerClient
from shared.adapters.store import Store, open_store
from shared.broker.consume_loop import Consumer
from shared.broker.publishing import Outgoing, Publisher
from shared.broker.topology import Topology
from shared.config import Settings, load_settings
from shared.domain.contracts import BusyTimeState, Interval, version_of
from simulators.planner.server import RunningPlannerSim, start_server
from tests.support.settings import nested_settings
from tests.support.waiting import wait_for

START = (datetime.now(timezone.utc) + timedelta(days=2)).replace(minute=0, second=0, microsecond=0)
WRITES = {"CreateEvents", "UpdateEvents", "DeleteEvents"}


@pytest.fixture
def planner_sim() -> Iterator[RunningPlannerSim]:
    sim = start_server()
    yield sim
    sim.stop()


@pytest.fixture
def settings(worker_env: dict[str, str], planner_sim: RunningPlannerSim) -> Settings:
    env = dict(worker_env, PLANNERSYNC_PLANNER__ENDPOINT=planner_sim.url, PLANNERSYNC_PLANNER__LINGER="20ms")
    return load_settings(environ=env, **nested_settings(env))


@pytest.fixture
def store(settings: Settings) -> Store:
    return open_store(settings.database_url(), auto_upgrade=True)


@pytest.fixture
def publisher_worker(settings: Settings, topology: Topology) -> Iterator[Consumer]:
    consumer = build_publisher(settings)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    wait_for(lambda: consumer.counters.connected, 15, what="publisher connected")
    yield consumer
    consumer.stop()
    thread.join(15)


@pytest.fixture
def deps(settings: Settings, store: Store, topology: Topology) -> Iterator[ResourceSyncDeps]:
    planner = PlannerClient.from_settings(settings.planner, settings.retry, zone=settings.busy.time_zone)
    publisher = Publisher(settings.broker, topology)
    yield ResourceSyncDeps(store, planner, publisher, topology)
    publisher.close()
    planner.close()


def set_resources(sim: RunningPlannerSim, resources: list[dict[str, Any]]) -> None:
    requests.post(f"{sim.control_url}/resources", json=resources, timeout=10).raise_for_status()


def enrolled(store: Store) -> dict[str, str]:
    return {m.address: m.status for m in store.list_mailboxes(enabled_only=True)}


def unique(name: str) -> str:
    return f"{name}.{uuid.uuid4().hex[:6]}@kommune.dk"


def test_caseworkers_with_an_email_are_enrolled_and_an_allow_list_limits_them(planner_sim: RunningPlannerSim, deps: ResourceSyncDeps, store: Store) -> None:
    anne, bo = unique("anne"), unique("bo")
    set_resources(planner_sim, [{"email": anne.upper()}, {"email": bo}, {"email": unique("room"), "is_case_worker": False}])
    store.add_rule("allow", anne)
    report = sync_resources(deps)
    assert report.plan.outcome == "applied" and report.enrolled == (anne,) and report.plan.not_allowed == (bo,)
    assert list(enrolled(store)) == [anne]
    store.remove_rule("allow", anne)  # an empty allow list limits nothing
    assert sync_resources(deps).enrolled == (bo,) and sorted(enrolled(store)) == sorted([anne, bo])
    assert sync_resources(deps).enrolled == ()  # nothing new: nothing done


def test_a_denied_mailbox_is_removed_and_its_busy_times_leave_planner_through_the_publisher(
    planner_sim: RunningPlannerSim, deps: ResourceSyncDeps, store: Store, publisher_worker: Consumer
) -> None:
    anne, bo = unique("anne"), unique("bo")
    set_resources(planner_sim, [{"email": anne}, {"email": bo}])
    assert sync_resources(deps).enrolled == tuple(sorted([anne, bo]))
    now = datetime.now(timezone.utc)
    for mailbox in (anne, bo):  # busy times reach Planner the normal way
        for n in range(2):
            span = Interval(start=START + timedelta(hours=n), end=START + timedelta(hours=n, minutes=30))
            state = BusyTimeState(correlation_id="seed", mailbox=mailbox, origin_id=f"uid-{n}", version=version_of(now), interval=span)
            deps.publisher.publish(Outgoing(deps.topology.busy_exchange, deps.topology.busy_key(mailbox), state))
    wait_for(lambda: len(planner_sim.state.events()) == 4, 20, what="the seeded busy times in Planner")
    wait_for(lambda: all(r.present for m in (anne, bo) for r in store.delivered(m).values()) and len(store.delivered(bo)) == 2, 20, what="receipts")

    store.add_rule("deny", bo.upper())
    report = sync_resources(deps)
    assert report.removed == (bo,) and report.states_published == 2 and report.plan.denied == (bo,) and report.ok
    assert enrolled(store) == {anne: "new"}
    assert [m.status for m in store.list_mailboxes() if m.address == bo] == ["denied"]
    wait_for(lambda: not planner_sim.state.events(bo), 20, what="the denied mailbox's busy times deleted in Planner")
    assert len(planner_sim.state.events(anne)) == 2  # the others are untouched
    wait_for(lambda: not any(r.present for r in store.delivered(bo).values()), 20, what="the deletes recorded")

    store.remove_rule("deny", bo)  # lifted: enrolled again at the next pass (its busy times return with its next read)
    assert sync_resources(deps).enrolled == (bo,) and bo in enrolled(store)


def test_a_mailbox_removed_by_hand_is_not_enrolled_again(planner_sim: RunningPlannerSim, deps: ResourceSyncDeps, store: Store) -> None:
    anne = unique("anne")
    set_resources(planner_sim, [{"email": anne}])
    sync_resources(deps)
    store.remove_mailbox(anne)
    report = sync_resources(deps)
    assert report.enrolled == () and report.plan.removed_by_hand == (anne,) and enrolled(store) == {}


def test_an_email_listed_twice_is_enrolled_once_and_reported_in_health(planner_sim: RunningPlannerSim, settings: Settings, store: Store, topology: Topology) -> None:
    anne = unique("anne")
    set_resources(planner_sim, [{"email": anne, "rid": "RID:1"}, {"email": anne.upper(), "rid": "RID:2"}])
    worker = ResourceSync(settings)
    worker.run_once()
    assert enrolled(store) == {anne: "new"}
    facts = worker.health().facts
    assert facts["duplicate_emails"] == [anne] and facts["invalid_emails"] == []  # Planner's schema admits only addresses
    assert facts["last_outcome"] == "applied" and facts["last_enrolled"] == 1


def test_an_empty_answer_removes_nothing_and_is_reported(planner_sim: RunningPlannerSim, deps: ResourceSyncDeps, store: Store) -> None:
    bo = unique("bo")
    store.add_mailbox(bo)
    store.add_rule("deny", bo)
    set_resources(planner_sim, [])
    report = sync_resources(deps)
    assert report.plan.outcome == "empty" and "no resources" in (report.plan.reason or "") and not report.ok
    assert enrolled(store) == {bo: "new"}  # even the denied mailbox stays until Planner answers again


def test_a_failed_call_removes_nothing_and_is_reported(planner_sim: RunningPlannerSim, deps: ResourceSyncDeps, store: Store, settings: Settings, topology: Topology) -> None:
    bo = unique("bo")
    store.add_mailbox(bo)
    store.add_rule("deny", bo)
    set_resources(planner_sim, [{"email": unique("anne")}])
    requests.post(f"{planner_sim.control_url}/faults", json={"type": "http_status", "status": 503, "operations": ["GetResources"]}, timeout=10).raise_for_status()
    report = sync_resources(deps)
    assert report.plan.outcome == "failed" and "GetResources failed" in (report.plan.reason or "")
    assert enrolled(store) == {bo: "new"}
    assert not [c for c in planner_sim.state.calls() if c.operation in WRITES]
    worker = ResourceSync(settings)
    worker.run_once()
    assert worker.health().facts["last_outcome"] == "failed" and "GetResources failed" in worker.health().facts["last_reason"]


def test_the_worker_runs_at_each_configured_time_and_says_when_it_runs_next(planner_sim: RunningPlannerSim, worker_env: dict[str, str], store: Store) -> None:
    env = dict(worker_env, PLANNERSYNC_PLANNER__ENDPOINT=planner_sim.url, PLANNERSYNC_RESOURCE_SYNC__TIMES="12:00,07:30")
    settings = load_settings(environ=env, **nested_settings(env))
    assert settings.resource_sync.times == ["07:30", "12:00"]
    assert load_settings(environ={}).resource_sync.times == ["06:00", "09:00", "12:00", "15:00", "18:00"]  # five times a day
    set_resources(planner_sim, [{"email": unique("anne")}])
    base = datetime(2026, 7, 1, 5, 29, 59, tzinfo=timezone.utc)  # 07:29:59 in Copenhagen (summer)
    assert next_due(base, settings.resource_sync.times, settings.busy.time_zone) == datetime(2026, 7, 1, 5, 30, tzinfo=timezone.utc)
    started = _time.monotonic()
    worker = ResourceSync(settings, clock=lambda: base + timedelta(seconds=_time.monotonic() - started))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: worker.health().facts["runs"] >= 1, 20, what="the scheduled pass")
        facts = wait_for(lambda: (f := worker.health().facts)["next_run_at"] == "2026-07-01T10:00:00+00:00" and f, 10, what="the next time")
        assert facts["last_enrolled"] == 1 and [c.operation for c in planner_sim.state.calls()] == ["GetResources"]
    finally:
        worker.stop()
        thread.join(10)
    assert not thread.is_alive()
