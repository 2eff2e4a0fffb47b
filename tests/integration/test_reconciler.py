"""The nightly reconciliation end to end: real broker, real publisher (in a thread), the Planner simulator.

Each test seeds the store (desired and delivered rows) and Planner (through its SOAP API), runs
``reconcile`` once over a ``ReconcilerDeps`` built from the fixtures (``run_reconciliation``, the command
line's way, builds its own), and waits with a deadline for Planner to reach the expected events.
The ``Reconciler`` tests drive the daily schedule with a clock the test moves and read ``health()``.
Calls are counted at the simulator, so "Planner unchanged" means no Create/Update/Delete call at all.
"""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta, timezone
from typing import Iterator

import pytest

from services.publisher.worker import build as build_publisher
from services.reconciler.worker import Reconciler, ReconcilerDeps, reconcile, run_reconciliation
from shared.adapters.planner_client import PlannerClient, PlannerEvent
from shared.adapters.store import Store, open_store
from shared.broker.consume_loop import Consumer
from shared.broker.publishing import Outgoing, Publisher
from shared.broker.topology import Topology
from shared.config import Settings, load_settings
from shared.domain.contracts import BusyTimeState, Interval
from shared.domain.delivery_plan import DeliveredChange, Holding
from shared.domain.reconcile_plan import MailboxReport
from shared.domain.timing import next_run
from shared.domain.transform_core import DesiredRecord
from simulators.planner.server import RunningPlannerSim, start_server
from tests.support.broker import queue_depth
from tests.support.settings import nested_settings as _nested
from tests.support.waiting import wait_for

WRITES = {"CreateEvents", "UpdateEvents", "DeleteEvents"}
START = (datetime.now(timezone.utc) + timedelta(days=2)).replace(minute=0, second=0, microsecond=0)


def slot(hour: int, day: int = 0, length: int = 1) -> Interval:
    start = START + timedelta(days=day, hours=hour)
    return Interval(start=start, end=start + timedelta(hours=length))


@pytest.fixture
def planner_sim() -> Iterator[RunningPlannerSim]:
    sim = start_server()
    yield sim
    sim.stop()


@pytest.fixture
def settings(worker_env: dict[str, str], planner_sim: RunningPlannerSim) -> Settings:
    env = dict(worker_env, PLANNERSYNC_PLANNER__ENDPOINT=planner_sim.url, PLANNERSYNC_PLANNER__LINGER="20ms")
    return load_settings(environ=env, **_nested(env))


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
    assert not thread.is_alive(), "publisher did not stop"


class CountingPublisher:
    """The real confirming publisher, remembering what it published."""

    def __init__(self, settings: Settings, topology: Topology) -> None:
        self.inner = Publisher(settings.broker, topology)
        self.states: list[BusyTimeState] = []

    def publish(self, outgoing: Outgoing) -> None:
        self.inner.publish(outgoing)
        assert isinstance(outgoing.message, BusyTimeState)
        self.states.append(outgoing.message)


@pytest.fixture
def publisher(settings: Settings, topology: Topology) -> Iterator[CountingPublisher]:
    counting = CountingPublisher(settings, topology)
    yield counting
    counting.inner.close()


@pytest.fixture
def planner(settings: Settings) -> Iterator[PlannerClient]:
    client = PlannerClient.from_settings(settings.planner, settings.retry, zone=settings.busy.time_zone)
    yield client
    client.close()


@pytest.fixture
def mailbox(store: Store) -> str:
    address = f"anne.{uuid.uuid4().hex[:8]}@kommune.dk"
    store.add_mailbox(address)
    return address


def seed_planner(planner: PlannerClient, mailbox: str, events: dict[str, Interval]) -> None:
    result = planner.create_events([PlannerEvent(origin_id=key, email=mailbox, start=i.start, end=i.end) for key, i in events.items()])
    assert [r.code for r in result.receipts] == [0] * len(events)


def seed_desired(store: Store, mailbox: str, rows: dict[str, tuple[int, Interval | None]]) -> None:
    store.save_desired(mailbox, [DesiredRecord(key, key, None, version, interval, None) for key, (version, interval) in rows.items()])


def held(sim: RunningPlannerSim, mailbox: str) -> dict[str, Interval]:
    return {e.origin_id: Interval(start=e.start, end=e.end) for e in sim.state.events(mailbox)}


def writes(sim: RunningPlannerSim) -> list[str]:
    return [call.operation for call in sim.state.calls() if call.operation in WRITES]


@pytest.fixture
def deps(settings: Settings, store: Store, planner: PlannerClient, publisher: CountingPublisher) -> ReconcilerDeps:
    return ReconcilerDeps.from_settings(settings, store=store, planner=planner, publisher=publisher)


def reconcile_one(deps: ReconcilerDeps, mailbox: str, force: bool = False) -> MailboxReport:
    (report,) = reconcile(deps, [mailbox], force=force)
    return report


def test_drift_is_healed_through_the_publisher(settings, store, planner_sim, planner, publisher, deps, publisher_worker, mailbox) -> None:  # type: ignore[no-untyped-def]
    seed_desired(store, mailbox, {"same": (5, slot(9)), "missing": (6, slot(11)), "moved": (7, slot(13)), "gone": (8, None)})
    seed_planner(planner, mailbox, {"same": slot(9), "moved": slot(15), "gone": slot(17), "stranger": slot(10, day=1)})
    store.record_delivered(mailbox, [DeliveredChange("same", version=5, holding=Holding(True, slot(9)))])
    store.record_delivered(mailbox, [DeliveredChange("missing", version=6, holding=Holding(True, slot(11)))])  # the store believes it; Planner lost it
    store.record_delivered(mailbox, [DeliveredChange("moved", version=7, holding=Holding(True, slot(13)))])
    store.record_delivered(mailbox, [DeliveredChange("gone", version=4, holding=Holding(True, slot(17)))])

    report = reconcile_one(deps, mailbox)

    assert (report.status, report.in_planner, report.created, report.updated, report.deleted, report.up_to_date) == ("reconciled", 4, 1, 1, 2, 1)
    assert {s.origin_id for s in publisher.states} == {"missing", "moved", "gone", "stranger"}
    expected = {"same": slot(9), "missing": slot(11), "moved": slot(13)}
    wait_for(lambda: held(planner_sim, mailbox) == expected, 20, what=f"Planner to hold {sorted(expected)}")

    def recorded() -> bool:
        rows = store.delivered(mailbox)
        return {k: (r.present, r.interval) for k, r in rows.items()} == {
            **{k: (True, i) for k, i in expected.items()}, "gone": (False, None), "stranger": (False, None)
        }

    wait_for(recorded, 20, what="delivered rows to match Planner")
    assert store.delivered(mailbox)["same"].version == 5

    # a second run finds nothing to do
    publisher.states.clear()
    again = reconcile_one(deps, mailbox)
    assert (again.up_to_date, again.created, again.updated, again.deleted, again.corrected) == (3, 0, 0, 0, 0)
    assert publisher.states == []


def test_a_lost_state_store_leaves_planner_unchanged(settings, store, planner_sim, planner, publisher, deps, publisher_worker, mailbox) -> None:  # type: ignore[no-untyped-def]
    calendar = {"uid-1": slot(9), "uid-2": slot(11, length=2), "series$20260601-080000": slot(8, day=3), "allday": slot(0, day=5, length=24)}
    seed_desired(store, mailbox, {key: (100 + n, interval) for n, (key, interval) in enumerate(calendar.items())})
    seed_planner(planner, mailbox, calendar)  # what the earlier installation (or the reference client) created
    before = [e.to_json() for e in planner_sim.state.events(mailbox)]
    writes_before = len(writes(planner_sim))
    assert store.delivered(mailbox) == {}  # the delivered rows are lost

    report = reconcile_one(deps, mailbox)

    assert (report.adopted, report.created, report.updated, report.deleted) == (4, 0, 0, 0)
    assert publisher.states == []
    assert queue_depth(publisher_worker.topology, f"{settings.broker.prefix}.publisher.in") == 0
    assert len(writes(planner_sim)) == writes_before, "no Create/Update/Delete call may reach Planner"
    assert [e.to_json() for e in planner_sim.state.events(mailbox)] == before
    rows = store.delivered(mailbox)
    guids = {e.origin_id: e.calendar_event_identifier for e in planner_sim.state.events(mailbox)}
    assert {k: (r.present, r.interval, r.planner_event_id, r.version) for k, r in rows.items()} == {
        key: (True, interval, guids[key], 100 + n) for n, (key, interval) in enumerate(calendar.items())
    }


def test_an_adopted_event_with_other_times_is_updated_not_recreated(settings, store, planner_sim, planner, publisher, deps, publisher_worker, mailbox) -> None:  # type: ignore[no-untyped-def]
    seed_desired(store, mailbox, {"uid-1": (10, slot(9)), "uid-2": (11, slot(12))})
    seed_planner(planner, mailbox, {"uid-1": slot(9), "uid-2": slot(14)})
    guid = {e.origin_id: e.calendar_event_identifier for e in planner_sim.state.events(mailbox)}["uid-2"]
    writes_before = len(writes(planner_sim))

    report = reconcile_one(deps, mailbox)

    assert (report.adopted, report.updated, report.created, report.deleted) == (2, 1, 0, 0)
    wait_for(lambda: held(planner_sim, mailbox) == {"uid-1": slot(9), "uid-2": slot(12)}, 20, what="uid-2 moved")
    assert writes(planner_sim)[writes_before:] == ["UpdateEvents"]
    assert {e.origin_id: e.calendar_event_identifier for e in planner_sim.state.events(mailbox)}["uid-2"] == guid


def test_the_mass_delete_guard_stops_the_mailbox_until_forced(settings, store, planner_sim, planner, publisher, deps, publisher_worker, mailbox) -> None:  # type: ignore[no-untyped-def]
    seed_desired(store, mailbox, {"keep": (5, slot(9))})
    seed_planner(planner, mailbox, {"keep": slot(9), "x": slot(11), "y": slot(13)})
    before = held(planner_sim, mailbox)
    writes_before = len(writes(planner_sim))

    stopped = reconcile_one(deps, mailbox)

    assert stopped.status == "stopped" and stopped.deleted == 2 and "force" in (stopped.reason or "")
    assert publisher.states == [] and store.delivered(mailbox) == {}
    assert held(planner_sim, mailbox) == before and len(writes(planner_sim)) == writes_before

    forced = reconcile_one(deps, mailbox, force=True)

    assert forced.status == "reconciled" and (forced.deleted, forced.adopted) == (2, 1)
    wait_for(lambda: held(planner_sim, mailbox) == {"keep": slot(9)}, 20, what="x and y deleted")


def test_a_get_events_failure_skips_the_chunk_and_is_never_read_as_an_empty_planner(settings, store, planner_sim, planner, publisher, deps, mailbox) -> None:  # type: ignore[no-untyped-def]
    other = f"bo.{uuid.uuid4().hex[:8]}@kommune.dk"
    store.add_mailbox(other)
    seed_desired(store, mailbox, {"a": (5, slot(9))})
    store.record_delivered(mailbox, [DeliveredChange("a", version=5, holding=Holding(True, slot(9)))])
    seed_planner(planner, mailbox, {"a": slot(9)})
    planner_sim.state.add_faults([{"type": "http_status", "status": 503, "operations": ["GetEvents"]}], datetime.now(timezone.utc))

    reports = reconcile(deps, [mailbox, other])

    assert [(r.mailbox, r.status) for r in reports] == [(mailbox, "failed"), (other, "failed")]
    assert all("GetEvents" in (r.reason or "") for r in reports)
    assert publisher.states == [] and store.delivered(mailbox)["a"].present


def test_a_mailbox_that_is_not_enrolled_is_reported_and_left_alone(settings, store, planner_sim, topology, mailbox) -> None:  # type: ignore[no-untyped-def]
    reports = run_reconciliation(settings, ["nobody@kommune.dk", mailbox.upper()])  # the command line's way: its own store and clients
    assert [(r.mailbox, r.status) for r in reports] == [("nobody@kommune.dk", "skipped"), (mailbox, "reconciled")]


def test_the_scheduler_runs_at_the_configured_wall_clock_time_and_stops_on_request(settings, planner_sim, publisher_worker, mailbox) -> None:  # type: ignore[no-untyped-def]
    import time as _time

    # a clock that reaches 05:30 Copenhagen (03:30 UTC in summer) one second from now, then runs on
    base = datetime(2026, 7, 1, 3, 29, 59, tzinfo=timezone.utc)
    started = _time.monotonic()
    reconciler = Reconciler(settings, clock=lambda: base + timedelta(seconds=_time.monotonic() - started))
    thread = threading.Thread(target=reconciler.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: reconciler.health().facts["runs"] >= 1, 20, what="the scheduled run")
        assert [c.operation for c in planner_sim.state.calls()] == ["GetEvents"]  # one run, then a day's wait
    finally:
        stop_asked = _time.monotonic()
        reconciler.stop()
        thread.join(10)
    assert not thread.is_alive(), "the scheduler did not stop"
    assert _time.monotonic() - stop_asked < 5


class MovableClock:
    """A clock that stands still until the test moves it."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def test_the_reconcilers_health_says_waiting_until_the_run_is_due_then_reports_the_run(settings, store, planner_sim, publisher_worker, mailbox) -> None:  # type: ignore[no-untyped-def]
    seed_desired(store, mailbox, {"missing": (5, slot(9))})
    due = next_run(datetime.now(timezone.utc), settings.reconcile.time, settings.busy.time_zone)
    clock = MovableClock(due - timedelta(hours=1))
    reconciler = Reconciler(settings, clock=clock)
    thread = threading.Thread(target=reconciler.run, daemon=True)
    thread.start()
    try:
        waiting = wait_for(lambda: (h := reconciler.health()).facts["next_run_at"] is not None and h, 10, what="the schedule")
        assert (waiting.state, waiting.ok, waiting.facts["next_run_at"], waiting.facts["runs"], waiting.facts["last_run_at"]) == (
            "waiting", True, due.isoformat(), 0, None
        )
        wait_for(lambda: reconciler.health().beat_at > waiting.beat_at, 10, what="the waiting loop to beat again")
        assert "GetEvents" not in [c.operation for c in planner_sim.state.calls()], "nothing runs before it is due"

        clock.now = due
        done = wait_for(lambda: (h := reconciler.health()).facts["runs"] == 1 and h.state == "waiting" and h, 20, what="the run")
    finally:
        reconciler.stop()
        thread.join(10)
    assert not thread.is_alive(), "the reconciler did not stop"
    assert done.facts == {
        "next_run_at": next_run(due, settings.reconcile.time, settings.busy.time_zone).isoformat(),
        "last_run_at": due.isoformat(),
        "last_run_mailboxes": 1,
        "last_run_failed": 0,
        "last_run_stopped": 0,
        "runs": 1,
    }
    wait_for(lambda: held(planner_sim, mailbox) == {"missing": slot(9)}, 20, what="the run's create to reach Planner")


def test_a_receipt_written_while_getevents_was_answered_is_not_corrected_back_to_the_older_answer(  # type: ignore[no-untyped-def]
    settings, store, planner_sim, planner, publisher, deps, publisher_worker, mailbox,
) -> None:
    """Decision 104. Planner answers GetEvents with the mailbox as it was (no event yet) and the answer takes a moment
    on its way (the simulator's ``slow_answer``); meanwhile the publisher creates the event and records its receipt.
    The reconciler then reads the store, newer than Planner's answer: before, it "corrected" the row to absent, so
    the next move of the appointment went to Planner as a CreateEvents (refused: it exists) and an UpdateEvents."""
    seed_desired(store, mailbox, {"uid-1": (1, slot(9))})
    planner_sim.state.add_faults([{"type": "slow_answer", "seconds": 2, "operations": ["GetEvents"], "times": 1}], datetime.now(timezone.utc))
    reports: list[MailboxReport] = []
    reconciling = threading.Thread(target=lambda: reports.append(reconcile_one(deps, mailbox)))
    reconciling.start()
    try:
        wait_for(lambda: any(call.operation == "GetEvents" for call in planner_sim.state.calls()), 10, what="GetEvents answered, slowly")
        state = BusyTimeState(correlation_id=uuid.uuid4().hex, mailbox=mailbox, origin_id="uid-1", version=1, interval=slot(9))
        publisher.inner.publish(Outgoing(deps.topology.busy_exchange, deps.topology.busy_key(mailbox), state))
        wait_for(lambda: (row := store.delivered(mailbox).get("uid-1")) is not None and row.present, 10, what="the create's receipt recorded")
    finally:
        reconciling.join(20)
    assert reports and reports[0].status == "reconciled"
    assert held(planner_sim, mailbox) == {"uid-1": slot(9)}
    row = store.delivered(mailbox)["uid-1"]
    assert (row.present, row.interval, row.version) == (True, slot(9), 1), "the receipt was overwritten by the older GetEvents answer"

    moved = BusyTimeState(correlation_id=uuid.uuid4().hex, mailbox=mailbox, origin_id="uid-1", version=2, interval=slot(10))
    publisher.inner.publish(Outgoing(deps.topology.busy_exchange, deps.topology.busy_key(mailbox), moved))
    wait_for(lambda: held(planner_sim, mailbox) == {"uid-1": slot(10)}, 20, what="the move in Planner")
    assert writes(planner_sim) == ["CreateEvents", "UpdateEvents"]
