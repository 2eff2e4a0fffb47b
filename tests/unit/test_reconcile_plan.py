"""The reconciliation's pure rule: what Planner holds against the desired state and the delivered rows.

Every row of ``CASES`` is one situation for one mailbox: what GetEvents returned, what the desired
and delivered rows say, and what the plan must publish, correct and count. After each case the
plan's outcome is applied the way the publisher would apply it (``apply``), and planning again must
give no action at all (idempotence).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone

import pytest

from shared.domain.contracts import Interval
from shared.domain.delivery_plan import (
    DeliveredChange,
    DeliveredRecord,
    Holding,
    Send,
    plan,
)
from shared.domain.reconcile_plan import (
    DeliveredCorrection,
    MailboxReconciliation,
    plan_reconciliation,
)
from shared.domain.transform_core import BOOKKEEPING_PREFIX, DesiredRecord

MAILBOX = "anne@kommune.dk"
NOW = datetime(2026, 5, 4, 3, 30, tzinfo=timezone.utc)
WINDOW = Interval(start=NOW, end=NOW + timedelta(days=92))
NOW_VERSION = 9_000_000
T = NOW + timedelta(days=2)


def hours(start: int, end: int, day: int = 0) -> Interval:
    base = T + timedelta(days=day)
    return Interval(start=base + timedelta(hours=start), end=base + timedelta(hours=end))


NINE = hours(9, 10)
TEN = hours(10, 11)
PAST = Interval(start=NOW - timedelta(days=1), end=NOW - timedelta(days=1) + timedelta(hours=1))
BEYOND = Interval(start=WINDOW.end + timedelta(days=1), end=WINDOW.end + timedelta(days=1, hours=1))


@dataclass(frozen=True)
class Held:
    origin_id: str
    start: datetime
    end: datetime
    email: str = MAILBOX
    planner_event_id: str | None = None
    planner_resource_id: str | None = None


def held(origin_id: str, interval: Interval, guid: str | None = None) -> Held:
    return Held(origin_id, interval.start, interval.end, planner_event_id=guid or f"guid-{origin_id}", planner_resource_id="res-anne")


def want(origin_id: str, version: int, interval: Interval | None) -> DesiredRecord:
    return DesiredRecord(origin_id, origin_id.split("$")[0], None, version, interval, None)


def known(origin_id: str, version: int, interval: Interval | None, present: bool = True, echo: bool = False, guid: str | None = None) -> DeliveredRecord:
    return DeliveredRecord(
        MAILBOX, origin_id, version, present, interval if present else None,
        guid if guid is not None else (f"guid-{origin_id}" if present else None), "res-anne" if present else None, echo, 0, None,
    )


@dataclass(frozen=True)
class Case:
    name: str
    planner: list[Held]
    desired: list[DesiredRecord]
    delivered: list[DeliveredRecord]
    sends: dict[str, str] = field(default_factory=dict)  # origin_id -> create/update/delete
    counts: dict[str, int] = field(default_factory=dict)
    corrections: dict[str, bool] = field(default_factory=dict)  # origin_id -> present after correction
    max_delete_share: float = 1.0
    force: bool = False
    status: str = "reconciled"


CASES = [
    Case(
        "everything in step makes no call and no correction",
        [held("a", NINE)], [want("a", 5, NINE)], [known("a", 5, NINE)],
        counts={"up_to_date": 1, "in_planner": 1, "desired": 1},
    ),
    Case(
        "an extra event Planner holds with our identifier and the calendar no longer has is deleted",
        [held("a", NINE), held("gone", TEN)], [want("a", 5, NINE), want("gone", 6, None)], [known("a", 5, NINE), known("gone", 4, TEN)],
        sends={"gone": "delete"}, counts={"deleted": 1, "up_to_date": 1, "in_planner": 2},
    ),
    Case(
        "an event Planner holds with no desired row at all is deleted at the reconciliation's version",
        [held("a", NINE), held("orphan", TEN)], [want("a", 5, NINE)], [known("a", 5, NINE), known("orphan", 4, TEN)],
        sends={"orphan": "delete"}, counts={"deleted": 1},
    ),
    Case(
        "a busy time Planner lacks is created and the stale delivered row is corrected to absent",
        [], [want("a", 5, NINE)], [known("a", 5, NINE)],
        sends={"a": "create"}, corrections={"a": False}, counts={"created": 1, "in_planner": 0},
    ),
    Case(
        "a busy time the store never delivered and Planner lacks is created",
        [], [want("a", 5, NINE)], [],
        sends={"a": "create"}, counts={"created": 1},
    ),
    Case(
        "a busy time Planner holds with other times is updated, the row corrected to Planner's times",
        [held("a", TEN)], [want("a", 5, NINE)], [known("a", 5, NINE)],
        sends={"a": "update"}, corrections={"a": True}, counts={"updated": 1},
    ),
    Case(
        "state store lost: Planner holds exactly what the calendar has, so everything is adopted and nothing sent",
        [held("a", NINE), held("b", TEN), held("s$20260507-090000", hours(9, 10, day=3))],
        [want("a", 5, NINE), want("b", 6, TEN), want("s$20260507-090000", 7, hours(9, 10, day=3))],
        [],
        corrections={"a": True, "b": True, "s$20260507-090000": True},
        counts={"adopted": 3, "created": 0, "deleted": 0, "updated": 0, "up_to_date": 0},
        max_delete_share=0.1,
    ),
    Case(
        "state store lost: an adopted event with other times is updated, never deleted and re-created",
        [held("a", TEN), held("b", TEN)], [want("a", 5, NINE), want("b", 6, TEN)], [],
        sends={"a": "update"}, corrections={"a": True, "b": True}, counts={"adopted": 2, "updated": 1, "deleted": 0, "created": 0},
    ),
    Case(
        "migration from the reference client: its events carry our identifiers and are adopted; its leftovers go",
        [held("uid-1", NINE, guid="ref-1"), held("uid-2$20260506-100000", TEN, guid="ref-2"), held("uid-old", hours(8, 9), guid="ref-3")],
        [want("uid-1", 5, NINE), want("uid-2$20260506-100000", 6, TEN)], [],
        sends={"uid-old": "delete"}, corrections={"uid-1": True, "uid-2$20260506-100000": True, "uid-old": True},
        counts={"adopted": 2, "deleted": 1, "created": 0},
    ),
    Case(
        "an event the store does not know and the calendar has no busy time for is deleted",
        [held("stranger", NINE)], [want("stranger", 5, None)], [],
        sends={"stranger": "delete"}, corrections={"stranger": True}, counts={"deleted": 1, "adopted": 0},
    ),
    Case(
        "Planner-originated keys are left alone and never re-sent",
        [held("planner-1", NINE)], [want("planner-1", 5, NINE), want("planner-2", 5, TEN)],
        [known("planner-1", 5, None, present=False, echo=True), known("planner-2", 5, None, present=False, echo=True)],
        counts={"planner_originated_skipped": 2, "created": 0, "deleted": 0},
    ),
    Case(
        "the mass-delete guard stops the mailbox: nothing corrected, nothing sent",
        [held("x", NINE), held("y", TEN), held("a", hours(9, 10, day=1))], [want("a", 5, hours(9, 10, day=1))], [known("a", 5, hours(9, 10, day=1))],
        max_delete_share=0.5, status="stopped", counts={"deleted": 2, "in_planner": 3},
    ),
    Case(
        "force overrides the mass-delete guard",
        [held("x", NINE), held("y", TEN), held("a", hours(9, 10, day=1))], [want("a", 5, hours(9, 10, day=1))], [known("a", 5, hours(9, 10, day=1))],
        max_delete_share=0.5, force=True, sends={"x": "delete", "y": "delete"}, corrections={"x": True, "y": True}, counts={"deleted": 2},
    ),
    Case(
        "deleting exactly the allowed share is not stopped",
        [held("x", NINE), held("a", TEN)], [want("a", 5, TEN)], [known("a", 5, TEN)],
        max_delete_share=0.5, sends={"x": "delete"}, corrections={"x": True},
    ),
    Case(
        "events outside the window are ignored on every side",
        [held("past", PAST), held("beyond", BEYOND)],
        [want("past", 5, PAST), want("beyond", 5, BEYOND), want("gone-past", 5, None)],
        [known("gone-past", 4, PAST), known("beyond", 5, BEYOND)],
        counts={"in_planner": 0, "desired": 0, "up_to_date": 0, "deleted": 0, "created": 0},
        max_delete_share=0.1,
    ),
    Case(
        "a delivered row newer than the desired row is a state in flight and is left alone",
        [held("a", TEN)], [want("a", 5, NINE)], [known("a", 6, TEN)],
        counts={"in_flight": 1, "updated": 0},
    ),
    Case(
        "an absent row in Planner's view that was already absent needs nothing",
        [], [want("a", 5, None)], [known("a", 5, None, present=False)],
        counts={"up_to_date": 0, "deleted": 0},
    ),
    Case(
        "a delivered row claiming presence that Planner lacks, for a calendar-absent key, is corrected without a call",
        [], [want("a", 6, None)], [known("a", 5, NINE)],
        corrections={"a": False}, counts={"up_to_date": 1, "deleted": 0},
    ),
    Case(
        "bookkeeping rows of the transformer are never Planner events",
        [], [want(BOOKKEEPING_PREFIX + "snapshot", 5, NINE), want(BOOKKEEPING_PREFIX + "item/x", 5, TEN)], [],
        counts={"desired": 0, "created": 0},
    ),
    Case(
        "another mailbox's events and a duplicate identifier do not count twice",
        [held("a", NINE), held("a", TEN), Held("b", NINE.start, NINE.end, email="bo@kommune.dk")], [want("a", 5, NINE)], [known("a", 5, NINE)],
        counts={"in_planner": 1, "up_to_date": 1, "deleted": 0},
    ),
    Case(
        "missing Planner ids are filled in from GetEvents",
        [held("a", NINE, guid="guid-new")], [want("a", 5, NINE)], [known("a", 5, NINE, guid="")],
        corrections={"a": True}, counts={"up_to_date": 1},
    ),
]


def run(case: Case, planner: list[Held] | None = None, delivered: list[DeliveredRecord] | None = None) -> MailboxReconciliation:
    return plan_reconciliation(
        MAILBOX,
        case.planner if planner is None else planner,
        {row.origin_id: row for row in case.desired},
        {row.origin_id: row for row in (case.delivered if delivered is None else delivered)},
        case.max_delete_share,
        case.force,
        NOW_VERSION,
        window=WINDOW,
        correlation_id="reconcile-test",
    )


def apply(result: MailboxReconciliation, planner: list[Held], delivered: list[DeliveredRecord]) -> tuple[list[Held], list[DeliveredRecord]]:
    """Write the corrections, then deliver each state as the publisher does (plan, call, record)."""
    rows = {row.origin_id: row for row in delivered}
    for c in result.corrections:
        old = rows.get(c.origin_id)
        rows[c.origin_id] = DeliveredRecord(
            MAILBOX, c.origin_id, c.version, c.present, c.interval,
            c.planner_event_id or (old.planner_event_id if old else None), c.planner_resource_id or (old.planner_resource_id if old else None),
            old.planner_originated if old else False, None, None,
        )
    events = {e.origin_id: e for e in reversed(planner) if e.email == MAILBOX}
    others = [e for e in planner if e.email != MAILBOX]
    for state in result.states:
        action = plan(state, rows.get(state.origin_id))
        assert isinstance(action, Send), f"a published state does nothing at the publisher: {state.origin_id} {action}"
        if action.operation == "delete":
            events.pop(state.origin_id, None)
            rows[state.origin_id] = replace(rows[state.origin_id], version=state.version, present=False, interval=None)
        else:
            assert state.interval is not None
            events[state.origin_id] = held(state.origin_id, state.interval)
            base = rows.get(state.origin_id) or known(state.origin_id, 0, None, present=False)
            rows[state.origin_id] = replace(base, version=state.version, present=True, interval=state.interval, planner_event_id=f"guid-{state.origin_id}", planner_resource_id="res-anne")
    return list(events.values()) + others, list(rows.values())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_reconciliation(case: Case) -> None:
    result = run(case)
    assert result.report.status == case.status, result.report.reason
    sent = {s.origin_id: plan(s, _row_after(result, case, s.origin_id)) for s in result.states}
    assert {key: action.operation for key, action in sent.items() if isinstance(action, Send)} == case.sends
    assert all(s.cause == "reconcile" and s.mailbox == MAILBOX for s in result.states)
    assert {c.origin_id: c.present for c in result.corrections} == case.corrections
    for name, expected in case.counts.items():
        assert getattr(result.report, name) == expected, f"{name}: {result.report}"
    if case.status == "stopped":
        assert result.states == () and result.corrections == ()
        assert result.report.reason and "force" in result.report.reason
        return
    planner, delivered = apply(result, case.planner, case.delivered)
    again = run(case, planner, delivered)
    assert again.states == () and again.corrections == (), f"not idempotent: {again}"


def _row_after(result: MailboxReconciliation, case: Case, origin_id: str) -> DeliveredRecord | None:
    rows = {row.origin_id: row for row in case.delivered}
    for c in result.corrections:
        if c.origin_id == origin_id:
            old = rows.get(origin_id)
            return DeliveredRecord(MAILBOX, origin_id, c.version, c.present, c.interval, c.planner_event_id, c.planner_resource_id, bool(old and old.planner_originated), None, None)
    return rows.get(origin_id)


def test_states_carry_the_desired_version_and_deletes_without_a_desired_row_the_known_version() -> None:
    case = Case("", [held("a", TEN), held("orphan", NINE), held("stranger", TEN)], [want("a", 5, NINE)], [known("a", 5, NINE), known("orphan", 3, NINE)])
    states = {s.origin_id: s for s in run(case).states}
    assert states["a"].version == 5 and states["a"].interval == NINE
    assert states["orphan"].version == 3 and states["orphan"].interval is None
    assert states["stranger"].version == 0 and states["stranger"].interval is None
    assert NOW_VERSION not in {s.version for s in states.values()}  # a later, older busy observation can still create them


def test_a_delete_carries_planner_times_in_the_corrected_row_so_the_publisher_can_send_it() -> None:
    case = Case("", [held("stranger", NINE, guid="g-1")], [], [])
    result = run(case)
    assert result.corrections == (DeliveredCorrection("stranger", True, NINE, 0, "g-1", "res-anne"),)


def test_an_adopted_event_with_the_desired_times_is_recorded_at_the_desired_version() -> None:
    case = Case("", [held("a", NINE, guid="g-a")], [want("a", 5, NINE)], [])
    (correction,) = run(case).corrections
    assert correction == DeliveredCorrection("a", True, NINE, 5, "g-a", "res-anne")
    assert correction.change() == DeliveredChange("a", version=5, holding=Holding(True, NINE), planner_event_id="g-a", planner_resource_id="res-anne")


def test_a_planner_event_without_a_positive_length_is_ignored_and_counted() -> None:
    bad = Held("bad", NINE.start, NINE.start)
    result = run(Case("", [bad], [], []))
    assert result.states == () and result.report.malformed == 1 and result.report.in_planner == 0


def test_the_report_is_plain_data() -> None:
    report = run(CASES[1]).report
    assert report.as_dict()["deleted"] == 1 and report.as_dict()["mailbox"] == MAILBOX


# --------------------------------------------------------------------------------------------- the schedule


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (datetime(2026, 5, 4, 1, 0, tzinfo=timezone.utc), datetime(2026, 5, 4, 3, 30, tzinfo=timezone.utc)),  # 03:00 CEST: today 05:30
        (datetime(2026, 5, 4, 3, 30, tzinfo=timezone.utc), datetime(2026, 5, 5, 3, 30, tzinfo=timezone.utc)),  # exactly due: tomorrow
        (datetime(2026, 3, 28, 12, 0, tzinfo=timezone.utc), datetime(2026, 3, 29, 3, 30, tzinfo=timezone.utc)),  # spring forward night
        (datetime(2026, 10, 24, 12, 0, tzinfo=timezone.utc), datetime(2026, 10, 25, 4, 30, tzinfo=timezone.utc)),  # fall back night
    ],
)
def test_the_reconciliation_runs_at_half_past_five_copenhagen_wall_clock_across_dst(now: datetime, expected: datetime) -> None:
    from shared.domain.timing import next_run

    assert next_run(now, "05:30", "Europe/Copenhagen") == expected


def test_the_report_table_has_one_line_per_mailbox_with_status_counts_and_reason() -> None:
    from services.reconciler.worker import render_table

    stopped = run(CASES[11]).report
    lines = render_table([run(CASES[1]).report, stopped]).splitlines()
    assert lines[0].split()[:3] == ["mailbox", "status", "held"]
    assert lines[1].split()[:8] == [MAILBOX, "reconciled", "2", "1", "1", "0", "0", "1"]
    assert lines[2].startswith(MAILBOX) and "stopped" in lines[2] and lines[2].endswith("run with force to apply")
