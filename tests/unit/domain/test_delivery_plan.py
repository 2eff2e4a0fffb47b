"""The publisher's pure rule: desired state against what Planner holds."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from shared.config import DEFAULT_RECEIPT_ACTIONS
from shared.domain.contracts import BusyTimeState, Interval
from shared.domain.delivery_plan import (
    Delivered,
    DeliveredChange,
    DeliveredRecord,
    EventReceipt,
    FollowUp,
    Holding,
    NoChange,
    Operation,
    PlannerOriginated,
    Postpone,
    ReceiptFacts,
    Reject,
    Send,
    Settled,
    maybe_applied,
    newest_per_key,
    plan,
    receipt_action,
    settle,
)

T = datetime(2026, 12, 1, 8, tzinfo=timezone.utc)
NINE_TO_TEN = Interval(start=T, end=T + timedelta(hours=1))
TEN_TO_ELEVEN = Interval(start=T + timedelta(hours=1), end=T + timedelta(hours=2))
KEY = "uid-1"


def desired(version: int, interval: Interval | None) -> BusyTimeState:
    return BusyTimeState(correlation_id="c", mailbox="a@b.dk", origin_id=KEY, version=version, interval=interval)


def delivered(version: int, interval: Interval | None, present: bool = True, echo: bool = False) -> DeliveredRecord:
    return DeliveredRecord("a@b.dk", KEY, version, present, interval, None, None, echo, 0, None)


def maybe(version: int, sent: Interval, interval: Interval | None = None, present: bool = False) -> DeliveredRecord:
    """A record after a create or update whose answer was lost: Planner may hold ``sent``."""
    return DeliveredRecord("a@b.dk", KEY, version, present, interval, None, None, False, None, None, maybe_held=True, maybe_interval=sent)


@pytest.mark.parametrize(
    ("state", "known", "action"),
    [
        pytest.param(desired(3, None), maybe(0, NINE_TO_TEN), Send("delete", KEY, NINE_TO_TEN),
                     id="an absent state deletes a create whose answer was lost, with the times that were sent"),
        pytest.param(desired(3, None), maybe(2, NINE_TO_TEN), Send("delete", KEY, NINE_TO_TEN),
                     id="an absent state deletes what may be held even after an older version was remembered"),
        pytest.param(desired(2, None), maybe(2, NINE_TO_TEN), NoChange("not_newer"),
                     id="an absent state no newer than the record still sends nothing though planner may hold the event"),
        pytest.param(desired(1, None), maybe(2, NINE_TO_TEN), NoChange("not_newer"),
                     id="an older absent state sends nothing though planner may hold the event"),
        pytest.param(desired(3, TEN_TO_ELEVEN), maybe(0, NINE_TO_TEN), Send("update", KEY, TEN_TO_ELEVEN),
                     id="a busy state updates what planner may hold and planner's code 10 turns it into a create"),
        pytest.param(desired(3, NINE_TO_TEN), maybe(0, NINE_TO_TEN), Send("update", KEY, NINE_TO_TEN),
                     id="the retry of a create whose answer was lost is sent as an update so nothing is created twice"),
        pytest.param(desired(3, None), maybe(2, TEN_TO_ELEVEN, NINE_TO_TEN, present=True), Send("delete", KEY, NINE_TO_TEN),
                     id="an absent state deletes a held event whose update answer was lost"),
        pytest.param(desired(3, NINE_TO_TEN), maybe(2, TEN_TO_ELEVEN, NINE_TO_TEN, present=True), Send("update", KEY, NINE_TO_TEN),
                     id="a busy state back at the held times moves an event whose update answer was lost"),
        pytest.param(desired(3, TEN_TO_ELEVEN), maybe(2, TEN_TO_ELEVEN, NINE_TO_TEN, present=True), Send("update", KEY, TEN_TO_ELEVEN),
                     id="a busy state at the times of an update whose answer was lost updates again"),
        pytest.param(desired(3, None), delivered(2, None, present=False), NoChange("already_absent"),
                     id="an absent state for a record planner surely lacks still makes no call"),
    ],
)
def test_what_planner_may_hold_after_a_lost_answer_is_planned_for(state: BusyTimeState, known: DeliveredRecord, action: object) -> None:
    assert plan(state, known) == action


@pytest.mark.parametrize(
    ("operation", "change"),
    [
        ("create", DeliveredChange(KEY, maybe_sent=NINE_TO_TEN)),
        ("update", DeliveredChange(KEY, maybe_sent=NINE_TO_TEN)),
        ("delete", None),
    ],
)
def test_a_call_whose_answer_was_lost_records_that_planner_may_hold_what_was_sent_and_nothing_else(
    operation: Operation, change: DeliveredChange | None
) -> None:
    recorded = maybe_applied(Send(operation, KEY, NINE_TO_TEN))
    assert recorded == change
    assert recorded is None or (recorded.version is None and recorded.holding is None)


def test_a_failure_carrying_planners_error_code_was_planners_answer_and_records_no_maybe() -> None:
    assert maybe_applied(Send("create", KEY, NINE_TO_TEN), code=16) is None


def test_a_receipt_that_settles_what_planner_holds_writes_a_holding_which_clears_a_maybe() -> None:
    for code in (0, 13):
        settled = settle(send("create"), 7, [], receipt(code), DEFAULT_RECEIPT_ACTIONS)
        assert settled.record is not None and settled.record.holding is not None
    assert settle(send("delete"), 7, [], receipt(10), DEFAULT_RECEIPT_ACTIONS).record.holding == Holding.absent()  # type: ignore[union-attr]


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


# ------------------------------------------------------------------------------ settle: what a receipt means

EVENT_ID = "0e0e0e0e-0000-0000-0000-000000000001"
RESOURCE_ID = "0f0f0f0f-0000-0000-0000-000000000002"
REFERENCE = "11111111-2222-3333-4444-555555555555"


def receipt(code: int, message: str | None = None, event_id: str | None = EVENT_ID, resource_id: str | None = RESOURCE_ID) -> EventReceipt:
    return EventReceipt(code, message, event_id, resource_id, T, conflict_notification_sent=True, reference=REFERENCE)


def facts(code: int, message: str | None = None) -> ReceiptFacts:
    return ReceiptFacts(code, message, True, T, REFERENCE)


def send(operation: Operation, interval: Interval = NINE_TO_TEN) -> Send:
    return Send(operation, KEY, interval)


@pytest.mark.parametrize(
    ("operation", "code", "holding", "outcome"),
    [
        ("create", 0, Holding(True, NINE_TO_TEN), Delivered()),
        ("update", 0, Holding(True, NINE_TO_TEN), Delivered()),
        ("delete", 0, Holding.absent(), Delivered()),
        ("delete", 10, Holding.absent(), Delivered()),
    ],
)
def test_an_accepted_receipt_records_the_version_what_planner_holds_and_the_receipt(
    operation: Operation, code: int, holding: Holding, outcome: Settled
) -> None:
    settled = settle(send(operation), 7, [], receipt(code), DEFAULT_RECEIPT_ACTIONS)
    assert settled.action == "ok"
    assert settled.outcome == outcome
    assert settled.record == DeliveredChange(KEY, 7, holding, planner_event_id=EVENT_ID, planner_resource_id=RESOURCE_ID, receipt=facts(code))


def test_code_13_is_remembered_as_planner_originated_and_absent() -> None:
    settled = settle(send("create"), 7, [], receipt(13, "from Planner"), DEFAULT_RECEIPT_ACTIONS)
    assert settled.outcome == PlannerOriginated()
    assert settled.record == DeliveredChange(
        KEY, 7, Holding.absent(), planner_originated=True, planner_event_id=EVENT_ID, planner_resource_id=RESOURCE_ID, receipt=facts(13, "from Planner")
    )


@pytest.mark.parametrize(
    ("operation", "code", "then"),
    [
        ("create", 8, "update"),
        ("update", 10, "create"),
    ],
)
def test_a_create_or_update_planner_disagrees_with_follows_up_with_the_other_operation_and_records_nothing(
    operation: Operation, code: int, then: Operation
) -> None:
    settled = settle(send(operation, TEN_TO_ELEVEN), 7, [], receipt(code), DEFAULT_RECEIPT_ACTIONS)
    assert settled.outcome == FollowUp(Send(then, KEY, TEN_TO_ELEVEN))
    assert settled.record is None


def test_code_8_on_create_becomes_an_update_once() -> None:
    first = settle(send("create"), 7, [], receipt(8), DEFAULT_RECEIPT_ACTIONS)
    assert first.outcome == FollowUp(send("update"))
    again = settle(send("create"), 7, ["create", "update"], receipt(8), DEFAULT_RECEIPT_ACTIONS)
    assert isinstance(again.outcome, Reject) and again.outcome.code == 8


def test_an_update_answered_10_after_a_create_answered_8_dead_letters_instead_of_looping() -> None:
    settled = settle(send("update"), 7, ["create"], receipt(10, "gone"), DEFAULT_RECEIPT_ACTIONS)
    assert settled.outcome == Reject("gone", 10)
    assert settled.record == DeliveredChange(KEY, planner_event_id=EVENT_ID, planner_resource_id=RESOURCE_ID, receipt=facts(10, "gone"))


def test_a_follow_up_never_repeats_the_operation_just_sent() -> None:
    table = {**DEFAULT_RECEIPT_ACTIONS, "8@update": "update_instead"}
    settled = settle(send("update"), 7, [], receipt(8), table)
    assert isinstance(settled.outcome, Reject)


@pytest.mark.parametrize(
    ("code", "message", "outcome"),
    [
        (15, "busy", Postpone("busy", 15)),
        (16, None, Postpone("Planner asked to retry", 16)),
    ],
)
def test_a_retry_code_postpones_the_message_and_records_nothing(code: int, message: str | None, outcome: Settled) -> None:
    settled = settle(send("update"), 7, [], receipt(code, message), DEFAULT_RECEIPT_ACTIONS)
    assert settled.action == "retry"
    assert settled.outcome == outcome
    assert settled.record is None


@pytest.mark.parametrize(
    ("code", "message", "reason"),
    [
        (3, "invalid resource", "invalid resource"),
        (14, None, "Planner receipt code 14"),
    ],
)
def test_the_dead_letter_case_records_the_receipt_but_not_the_version(code: int, message: str | None, reason: str) -> None:
    settled = settle(send("create"), 7, [], receipt(code, message), DEFAULT_RECEIPT_ACTIONS)
    assert settled.action == "dead_letter"
    assert settled.outcome == Reject(reason, code)
    assert settled.record == DeliveredChange(KEY, planner_event_id=EVENT_ID, planner_resource_id=RESOURCE_ID, receipt=facts(code, message))
    assert settled.record.version is None and settled.record.holding is None


def test_no_receipt_is_retried_not_assumed_and_records_nothing() -> None:
    settled = settle(send("delete"), 7, [], None, DEFAULT_RECEIPT_ACTIONS)
    assert settled.action is None
    assert settled.record is None
    assert settled.outcome == Postpone("no receipt for the event in the delete answer")


@pytest.mark.parametrize("missing", [None, ""])
def test_ids_planner_gives_none_of_keep_what_the_store_holds(missing: str | None) -> None:
    for code in (0, 13, 3):
        record = settle(send("create"), 7, [], receipt(code, event_id=missing, resource_id=missing), DEFAULT_RECEIPT_ACTIONS).record
        assert record is not None and record.planner_event_id is None and record.planner_resource_id is None


def test_the_receipt_action_table_decides_not_the_code() -> None:
    table = {**DEFAULT_RECEIPT_ACTIONS, "3": "retry", "15": "dead_letter"}
    assert settle(send("create"), 7, [], receipt(3), table).outcome == Postpone("Planner asked to retry", 3)
    assert settle(send("create"), 7, [], receipt(15), table).outcome == Reject("Planner receipt code 15", 15)
