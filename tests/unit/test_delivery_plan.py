"""The publisher's pure rule: desired state against what Planner holds."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from shared.config import DEFAULT_RECEIPT_ACTIONS
from shared.domain.contracts import BusyTimeState, Interval
from shared.domain.delivery_plan import (
    DeliveredRecord,
    NoChange,
    Send,
    newest_per_key,
    plan,
    receipt_action,
)

T = datetime(2026, 12, 1, 8, tzinfo=timezone.utc)
NINE_TO_TEN = Interval(start=T, end=T + timedelta(hours=1))
TEN_TO_ELEVEN = Interval(start=T + timedelta(hours=1), end=T + timedelta(hours=2))
KEY = "uid-1"


def desired(version: int, interval: Interval | None) -> BusyTimeState:
    return BusyTimeState(correlation_id="c", mailbox="a@b.dk", origin_id=KEY, version=version, interval=interval)


def delivered(version: int, interval: Interval | None, present: bool = True, echo: bool = False) -> DeliveredRecord:
    return DeliveredRecord("a@b.dk", KEY, version, present, interval, None, None, echo, 0, None)


def test_a_reconciliation_resends_the_current_version_but_never_an_older_one() -> None:
    again = BusyTimeState(correlation_id="c", mailbox="a@b.dk", origin_id=KEY, version=7, interval=NINE_TO_TEN, cause="reconcile")
    assert plan(again, delivered(7, None, present=False)) == Send("create", KEY, NINE_TO_TEN)
    assert plan(again, delivered(8, None, present=False)) == NoChange("not_newer")


def test_a_new_busy_time_is_created() -> None:
    assert plan(desired(1, NINE_TO_TEN), None) == Send("create", KEY, NINE_TO_TEN)


def test_a_moved_busy_time_is_updated() -> None:
    assert plan(desired(2, TEN_TO_ELEVEN), delivered(1, NINE_TO_TEN)) == Send("update", KEY, TEN_TO_ELEVEN)


def test_an_absent_state_deletes_what_planner_holds_with_its_times() -> None:
    assert plan(desired(2, None), delivered(1, NINE_TO_TEN)) == Send("delete", KEY, NINE_TO_TEN)


def test_a_late_older_version_makes_no_planner_call() -> None:
    assert plan(desired(6, TEN_TO_ELEVEN), delivered(7, NINE_TO_TEN)) == NoChange("not_newer")


def test_a_duplicate_makes_no_planner_call() -> None:
    assert plan(desired(7, NINE_TO_TEN), delivered(7, NINE_TO_TEN)) == NoChange("not_newer")


def test_a_delete_then_recreate_ends_present() -> None:
    assert plan(desired(3, NINE_TO_TEN), delivered(2, None, present=False)) == Send("create", KEY, NINE_TO_TEN)


def test_deleting_something_planner_never_had_makes_no_call() -> None:
    assert plan(desired(3, None), None) == NoChange("already_absent")


def test_a_planner_originated_event_is_never_sent_again() -> None:
    assert plan(desired(9, TEN_TO_ELEVEN), delivered(1, None, present=False, echo=True)) == NoChange("planner_originated")


def test_the_newest_state_of_a_key_in_a_batch_wins() -> None:
    states = [desired(3, NINE_TO_TEN), desired(5, None), desired(4, TEN_TO_ELEVEN)]
    assert newest_per_key(states) == {("a@b.dk", KEY): 1}


@pytest.mark.parametrize(
    ("code", "operation", "action"),
    [
        (0, "create", "ok"),
        (8, "create", "update_instead"),
        (8, "update", "dead_letter"),
        (10, "update", "create_instead"),
        (10, "delete", "ok"),
        (13, "create", "planner_originated"),
        (15, "update", "retry"),
        (16, "create", "retry"),
        (3, "create", "dead_letter"),
        (14, "delete", "dead_letter"),
    ],
)
def test_receipt_codes_map_through_the_configured_table(code: int, operation: str, action: str) -> None:
    assert receipt_action(code, operation, DEFAULT_RECEIPT_ACTIONS) == action  # type: ignore[arg-type]


def test_the_table_is_configuration_not_code() -> None:
    table = {**DEFAULT_RECEIPT_ACTIONS, "3": "retry"}
    assert receipt_action(3, "create", table) == "retry"
