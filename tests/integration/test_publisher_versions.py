"""The publisher remembers the newest version of a key even when it sends nothing, and never loses a state
that shares a batch with a message of the wrong type."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from services.publisher.worker import OutageGuard, PublisherDeps, handle
from shared.adapters.planner_client import PlannerEvent
from shared.adapters.store import Store, upgrade
from shared.broker.consume_loop import Done, Inbound
from shared.config import load_settings
from shared.domain.contracts import BusyTimeState, CalendarChange, Interval
from shared.domain.delivery_plan import (
    DeliveredRecord,
    NoChange,
    plan,
    remember_version,
)
from shared.domain.retry import Permanent
from tests.support.planner_model import Pauser, PlannerModel

T = datetime(2026, 12, 1, 8, tzinfo=timezone.utc)
NINE_TO_TEN = Interval(start=T, end=T + timedelta(hours=1))
ONE_TO_TWO = Interval(start=T + timedelta(hours=5), end=T + timedelta(hours=6))
MAILBOX = "anne@kommune.dk"


def desired(version: int, interval: Interval | None, origin: str = "uid-1") -> BusyTimeState:
    return BusyTimeState(correlation_id=f"c-{version}", mailbox=MAILBOX, origin_id=origin, version=version, interval=interval)


def delivered(version: int, interval: Interval | None, present: bool = True) -> DeliveredRecord:
    return DeliveredRecord(MAILBOX, "uid-1", version, present, interval, None, None, False, 0, None)


def inbound(message: BusyTimeState | CalendarChange) -> Inbound:
    return Inbound(message, delivery_tag=1, redelivered=False, retry_count=0)


@pytest.fixture
def planner() -> PlannerModel:
    return PlannerModel(clock=lambda: T)


@pytest.fixture
def deps(tmp_path: Path, planner: PlannerModel) -> PublisherDeps:
    store = Store.connect(f"sqlite:///{tmp_path / 'state.db'}")
    upgrade(store.engine)
    store.add_mailbox(MAILBOX)
    return PublisherDeps(load_settings(), store, planner, OutageGuard(3, 60.0, Pauser()), PlannerEvent)


def test_an_absent_state_for_a_key_planner_never_had_is_remembered() -> None:
    state = desired(3, None)
    assert remember_version(state, None, plan(state, None))


def test_a_newer_version_with_the_same_times_is_remembered() -> None:
    known = delivered(1, NINE_TO_TEN)
    state = desired(3, NINE_TO_TEN)
    assert plan(state, known) == NoChange("same_interval") and remember_version(state, known, plan(state, known))


def test_a_duplicate_or_older_state_is_not_remembered() -> None:
    known = delivered(3, NINE_TO_TEN)
    for state in (desired(3, NINE_TO_TEN), desired(2, None)):
        assert not remember_version(state, known, plan(state, known))


def test_an_older_busy_state_after_an_unsent_absent_one_makes_no_call(deps: PublisherDeps, planner: PlannerModel) -> None:
    assert handle([inbound(desired(3, None))], deps) == [Done()]
    assert handle([inbound(desired(2, NINE_TO_TEN))], deps) == [Done()]
    assert planner.calls == []


def test_an_older_state_cannot_move_an_event_past_a_newer_one_with_the_same_times(deps: PublisherDeps, planner: PlannerModel) -> None:
    handle([inbound(desired(1, NINE_TO_TEN))], deps)
    handle([inbound(desired(3, NINE_TO_TEN))], deps)
    handle([inbound(desired(2, ONE_TO_TWO))], deps)
    assert planner.calls == [("create", ["uid-1"])]


def test_a_foreign_message_in_the_batch_does_not_hide_the_state_after_it(deps: PublisherDeps, planner: PlannerModel) -> None:
    stray = CalendarChange(correlation_id="stray", mailbox=MAILBOX, observed_at=T, change="delete", item_id="AAMk-1")
    results = handle([inbound(stray), inbound(desired(1, NINE_TO_TEN))], deps)
    assert isinstance(results[0], Permanent) and results[1] == Done()
    assert planner.calls == [("create", ["uid-1"])]
