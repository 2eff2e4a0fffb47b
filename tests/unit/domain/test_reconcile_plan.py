"""The reconciliation's pure rule: what Planner holds against the desired state and the delivered rows.

Planner is the simulator's in-memory model, ``simulators.planner.state.SimState`` (pure data, no
sockets): a case's Planner events are created in one, GetEvents is its ``find_events`` over the
sync window, and its ids are the simulator's deterministic ``event_guid`` / ``resource_guid``.

Every row of ``CASES`` is one situation for one mailbox: what Planner holds, what the desired and
delivered rows say, and what the plan must publish, correct and count. After each case the plan's
outcome is applied the way the publisher would apply it (``apply``: write the corrections, then
``plan``, call ``SimState.apply``, ``settle`` the receipt), and planning again against the same
SimState must give no action at all (idempotence). The three pieces ``plan_reconciliation`` is made
of (``collect_keys``, ``decide_key``, ``mass_delete_guard``) have their own tests below.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import NamedTuple, Sequence

import pytest

from shared.config import DEFAULT_RECEIPT_ACTIONS
from shared.domain.contracts import Interval
from shared.domain.delivery_plan import (
    Delivered,
    DeliveredChange,
    DeliveredRecord,
    EventReceipt,
    Holding,
    Send,
    plan,
    settle,
)
from shared.domain.reconcile_plan import (
    DeliveredCorrection,
    GuardVerdict,
    HeldEvent,
    HeldInWindow,
    MailboxReconciliation,
    Tally,
    collect_keys,
    decide_key,
    mass_delete_guard,
    plan_reconciliation,
)
from shared.domain.transform_core import BOOKKEEPING_PREFIX, DesiredRecord
from simulators.planner.state import CODE_OK, EventInput, SimEvent, SimResource, SimState, event_guid, resource_guid

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


RESOURCE = resource_guid(MAILBOX)  # the mailbox's PlannerResourceIdentifier in the simulator
OPERATIONS = {"create": "CreateEvents", "update": "UpdateEvents", "delete": "DeleteEvents"}


def guid(origin_id: str) -> str:
    """The CalendarEventIdentifier the simulator gives the mailbox's event ``origin_id``."""
    return event_guid(origin_id, MAILBOX)


def held(origin_id: str, interval: Interval, email: str = MAILBOX) -> EventInput:
    """An event Planner holds, as it is created in the SimState."""
    return EventInput(origin_id, email, interval.start, interval.end)


def planner_holding(events: Sequence[EventInput]) -> SimState:
    """A SimState that knows the mailbox's resource and holds ``events``."""
    state = SimState(resources=[SimResource(name="Anne", rid="anne", email=MAILBOX, planner_resource_id=RESOURCE)])
    receipts = state.apply("CreateEvents", list(events), NOW)
    assert [r.code for r in receipts] == [CODE_OK] * len(events), receipts
    return state


class Returned(NamedTuple):
    """One SimEvent as GetEvents hands it over: the HeldEvent names for the simulator's id fields, copied at call time."""

    origin_id: str
    email: str
    start: datetime
    end: datetime
    planner_event_id: str | None
    planner_resource_id: str | None


def returned(events: Sequence[SimEvent]) -> list[HeldEvent]:
    return [Returned(e.origin_id, e.email, e.start, e.end, e.calendar_event_identifier, e.planner_resource_identifier) for e in events]


def get_events(state: SimState) -> list[HeldEvent]:
    """GetEvents for the mailbox over the sync window."""
    return returned(state.find_events([MAILBOX], WINDOW.start, WINDOW.end))


def want(origin_id: str, version: int, interval: Interval | None) -> DesiredRecord:
    return DesiredRecord(origin_id, origin_id.split("$")[0], None, version, interval, None)


def known(origin_id: str, version: int, interval: Interval | None, present: bool = True, echo: bool = False, guid: str | None = None) -> DeliveredRecord:
    """A delivered row; a present one carries the ids the simulator gave the event unless ``guid`` says otherwise."""
    return DeliveredRecord(
        MAILBOX, origin_id, version, present, interval if present else None,
        guid if guid is not None else (event_guid(origin_id, MAILBOX) if present else None), RESOURCE if present else None, echo, 0, None,
    )


def written(row: DeliveredRecord | None, origin_id: str, change: DeliveredChange) -> DeliveredRecord:
    """The delivered row after a store write; what the change leaves None keeps what the row holds."""
    row = row or DeliveredRecord(MAILBOX, origin_id, 0, False, None, None, None, False, None, None)
    return replace(
        row,
        version=row.version if change.version is None else change.version,
        present=row.present if change.holding is None else change.holding.present,
        interval=row.interval if change.holding is None else change.holding.interval,
        planner_originated=row.planner_originated if change.planner_originated is None else change.planner_originated,
        planner_event_id=change.planner_event_id or row.planner_event_id,
        planner_resource_id=change.planner_resource_id or row.planner_resource_id,
        last_code=row.last_code if change.receipt is None else change.receipt.code,
        last_message=row.last_message if change.receipt is None else change.receipt.message,
    )


@dataclass(frozen=True)
class Case:
    name: str
    planner: list[EventInput]  # what Planner holds, created in a SimState
    desired: list[DesiredRecord]
    delivered: list[DeliveredRecord]
    sends: dict[str, str] = field(default_factory=dict)  # origin_id -> create/update/delete
    counts: dict[str, int] = field(default_factory=dict)
    corrections: dict[str, bool] = field(default_factory=dict)  # origin_id -> present after correction
    max_delete_share: float = 1.0
    force: bool = False
    status: str = "reconciled"
    # What GetEvents returns on top of the SimState's answer: only data the simulator cannot give for
    # one mailbox (it holds one event per identifier and mailbox, and find_events filters by mailbox).
    odd: list[SimEvent] = field(default_factory=list)


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
        [held("uid-1", NINE), held("uid-2$20260506-100000", TEN), held("uid-old", hours(8, 9))],
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
        [held("a", NINE)], [want("a", 5, NINE)], [known("a", 5, NINE)],
        counts={"in_planner": 1, "up_to_date": 1, "deleted": 0},
        # built directly: a SimState holds one "a" per mailbox and never answers GetEvents for anne with bo's event
        odd=[
            SimEvent("a", MAILBOX, TEN.start, TEN.end, guid("a"), RESOURCE),
            SimEvent("b", "bo@kommune.dk", NINE.start, NINE.end, event_guid("b", "bo@kommune.dk"), resource_guid("bo@kommune.dk")),
        ],
    ),
    Case(
        "missing Planner ids are filled in from GetEvents",
        [held("a", NINE)], [want("a", 5, NINE)], [known("a", 5, NINE, guid="")],
        corrections={"a": True}, counts={"up_to_date": 1},
    ),
]


def run(case: Case, planner: SimState | None = None, delivered: list[DeliveredRecord] | None = None) -> MailboxReconciliation:
    """Plan the case against what GetEvents returns from ``planner`` (a fresh SimState holding ``case.planner`` by default)."""
    state = planner_holding(case.planner) if planner is None else planner
    return plan_reconciliation(
        MAILBOX,
        get_events(state) + returned(case.odd),
        {row.origin_id: row for row in case.desired},
        {row.origin_id: row for row in (case.delivered if delivered is None else delivered)},
        case.max_delete_share,
        case.force,
        NOW_VERSION,
        window=WINDOW,
        correlation_id="reconcile-test",
    )


def apply(result: MailboxReconciliation, planner: SimState, delivered: list[DeliveredRecord]) -> list[DeliveredRecord]:
    """Write the corrections, then deliver each state as the publisher does: plan, call the SimState, settle the receipt, record."""
    rows = {row.origin_id: row for row in delivered}
    for c in result.corrections:
        rows[c.origin_id] = written(rows.get(c.origin_id), c.origin_id, c.change())
    for state in result.states:
        action = plan(state, rows.get(state.origin_id))
        assert isinstance(action, Send), f"a published state does nothing at the publisher: {state.origin_id} {action}"
        (receipt,) = planner.apply(OPERATIONS[action.operation], [EventInput(action.origin_id, state.mailbox, action.interval.start, action.interval.end)], NOW)
        assert receipt.origin_id == state.origin_id and receipt.code == CODE_OK, f"Planner refused the {action.operation}: {receipt}"
        answer = EventReceipt(receipt.code, receipt.message, receipt.calendar_event_identifier, receipt.planner_resource_identifier)
        settled = settle(action, state.version, (), answer, DEFAULT_RECEIPT_ACTIONS)
        assert isinstance(settled.outcome, Delivered) and settled.record is not None, settled
        rows[state.origin_id] = written(rows.get(state.origin_id), state.origin_id, settled.record)
    return list(rows.values())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_reconciliation(case: Case) -> None:
    planner = planner_holding(case.planner)
    result = run(case, planner)
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
    delivered = apply(result, planner, case.delivered)
    again = run(case, planner, delivered)
    assert again.states == () and again.corrections == (), f"not idempotent: {again}"


def _row_after(result: MailboxReconciliation, case: Case, origin_id: str) -> DeliveredRecord | None:
    rows = {row.origin_id: row for row in case.delivered}
    for c in result.corrections:
        if c.origin_id == origin_id:
            return written(rows.get(origin_id), origin_id, c.change())
    return rows.get(origin_id)


def test_states_carry_the_desired_version_and_deletes_without_a_desired_row_the_known_version() -> None:
    case = Case("", [held("a", TEN), held("orphan", NINE), held("stranger", TEN)], [want("a", 5, NINE)], [known("a", 5, NINE), known("orphan", 3, NINE)])
    states = {s.origin_id: s for s in run(case).states}
    assert states["a"].version == 5 and states["a"].interval == NINE
    assert states["orphan"].version == 3 and states["orphan"].interval is None
    assert states["stranger"].version == 0 and states["stranger"].interval is None
    assert NOW_VERSION not in {s.version for s in states.values()}  # a later, older busy observation can still create them


def test_a_delete_carries_planner_times_in_the_corrected_row_so_the_publisher_can_send_it() -> None:
    case = Case("", [held("stranger", NINE)], [], [])
    result = run(case)
    assert result.corrections == (DeliveredCorrection("stranger", True, NINE, 0, guid("stranger"), RESOURCE),)


def test_an_adopted_event_with_the_desired_times_is_recorded_at_the_desired_version() -> None:
    case = Case("", [held("a", NINE)], [want("a", 5, NINE)], [])
    (correction,) = run(case).corrections
    assert correction == DeliveredCorrection("a", True, NINE, 5, guid("a"), RESOURCE)
    assert correction.change() == DeliveredChange("a", version=5, holding=Holding(True, NINE), planner_event_id=guid("a"), planner_resource_id=RESOURCE)


def test_a_planner_event_without_a_positive_length_is_ignored_and_counted() -> None:
    bad = EventInput("bad", MAILBOX, NINE.start, NINE.start)  # the simulator stores it as given
    result = run(Case("", [bad], [], []))
    assert result.states == () and result.report.malformed == 1 and result.report.in_planner == 0


def test_the_report_is_plain_data() -> None:
    report = run(CASES[1]).report
    assert report.as_dict()["deleted"] == 1 and report.as_dict()["mailbox"] == MAILBOX


# ----------------------------------------------------------------------------------- collecting the keys


def test_the_keys_are_planners_events_desired_busy_times_and_present_delivered_rows_starting_in_the_window() -> None:
    # everything the simulator holds, unfiltered, as a Planner answering wider than asked would return it
    planner = planner_holding([held("held", NINE), held("held-past", PAST), held("other-mailbox", TEN, email="bo@kommune.dk")])
    found = collect_keys(
        MAILBOX.upper(),
        returned(planner.events()),
        {row.origin_id: row for row in [want("wanted", 5, TEN), want("wanted-absent", 5, None), want("wanted-beyond", 5, BEYOND), want(BOOKKEEPING_PREFIX + "snapshot", 5, NINE)]},
        {row.origin_id: row for row in [known("known", 4, NINE), known("known-absent", 4, None, present=False), known("known-past", 4, PAST)]},
        WINDOW,
    )
    assert found.keys == ("held", "known", "wanted")
    assert set(found.held) == {"held"} and found.held["held"].interval == NINE
    assert found.desired_in_window == 1 and found.malformed == 0
    assert BOOKKEEPING_PREFIX + "snapshot" not in found.wanted and set(found.known) == {"known", "known-absent", "known-past"}


def test_collecting_counts_a_malformed_planner_event_and_keeps_the_first_of_a_repeated_identifier() -> None:
    planner = planner_holding([EventInput("bad", MAILBOX, NINE.start, NINE.start), held("a", NINE)])
    # the repeat is built directly: a SimState holds one "a" per mailbox
    repeat = SimEvent("a", MAILBOX, TEN.start, TEN.end, "second", RESOURCE)
    found = collect_keys(MAILBOX, get_events(planner) + returned([repeat]), {}, {}, WINDOW)
    assert found.malformed == 1 and found.keys == ("a",)
    assert found.held["a"].event.planner_event_id == guid("a") and found.held["a"].interval == NINE


# ------------------------------------------------------------------------------------- deciding one key


def in_window(origin_id: str, interval: Interval) -> HeldInWindow:
    (event,) = get_events(planner_holding([held(origin_id, interval)]))
    return HeldInWindow(event, interval)


@dataclass(frozen=True)
class KeyCase:
    name: str
    held: HeldInWindow | None
    wanted: DesiredRecord | None
    known: DeliveredRecord | None
    tallies: tuple[Tally, ...]
    sends: str | None = None            # the publisher's operation for the state, None: no state
    corrected: bool | None = None       # present after the correction, None: no correction


KEY_CASES = [
    KeyCase("a key in step is up to date with nothing to send or correct", in_window("a", NINE), want("a", 5, NINE), known("a", 5, NINE), ("up_to_date",)),
    KeyCase("a planner-originated key is skipped without a state or a correction", in_window("a", NINE), want("a", 5, TEN), known("a", 5, None, present=False, echo=True), ("planner_originated_skipped",)),
    KeyCase("a busy time Planner lacks is created and its stale row corrected to absent", None, want("a", 5, NINE), known("a", 5, NINE), ("created",), "create", False),
    KeyCase("a busy time the store never knew and Planner lacks is created without a correction", None, want("a", 5, NINE), None, ("created",), "create"),
    KeyCase("a busy time Planner holds at other times is updated and the row corrected to Planner's times", in_window("a", TEN), want("a", 5, NINE), known("a", 5, NINE), ("updated",), "update", True),
    KeyCase("an event the calendar no longer has is deleted", in_window("a", TEN), want("a", 6, None), known("a", 4, TEN), ("deleted",), "delete"),
    KeyCase("an unknown event with the calendar's times is adopted without a call", in_window("a", NINE), want("a", 5, NINE), None, ("adopted",), None, True),
    KeyCase("an unknown event with other times is adopted and updated", in_window("a", TEN), want("a", 5, NINE), None, ("adopted", "updated"), "update", True),
    KeyCase("an unknown event the calendar has no busy time for is deleted, not adopted", in_window("a", NINE), None, None, ("deleted",), "delete", True),
    KeyCase("a delivered row newer than the desired row is in flight and left alone", in_window("a", TEN), want("a", 5, NINE), known("a", 6, TEN), ("in_flight",)),
    KeyCase("a row claiming presence Planner lacks for a calendar-absent key is corrected without a call", None, want("a", 6, None), known("a", 5, NINE), ("up_to_date",), None, False),
]


@pytest.mark.parametrize("case", KEY_CASES, ids=[c.name for c in KEY_CASES])
def test_one_key_is_decided(case: KeyCase) -> None:
    decision = decide_key(MAILBOX, "a", case.held, case.wanted, case.known, NOW_VERSION, window=WINDOW, correlation_id="reconcile-test")
    assert decision.tallies == case.tallies
    assert (decision.correction.present if decision.correction is not None else None) == case.corrected
    if case.sends is None:
        assert decision.state is None
        return
    assert decision.state is not None and decision.state.cause == "reconcile" and decision.state.correlation_id == "reconcile-test"
    fix = decision.correction
    after = case.known if fix is None else DeliveredRecord(MAILBOX, "a", fix.version, fix.present, fix.interval, fix.planner_event_id, fix.planner_resource_id, False, None, None)
    action = plan(decision.state, after)
    assert isinstance(action, Send) and action.operation == case.sends


def test_a_decided_state_carries_the_desired_version_and_interval() -> None:
    decision = decide_key(MAILBOX, "a", in_window("a", TEN), want("a", 5, NINE), known("a", 5, NINE), NOW_VERSION, window=WINDOW, correlation_id="c")
    assert decision.state is not None and (decision.state.version, decision.state.interval, decision.state.mailbox) == (5, NINE, MAILBOX)


# ------------------------------------------------------------------------------------ the mass-delete guard


@pytest.mark.parametrize(
    ("deletes", "held_events", "force", "stops"),
    [
        pytest.param(1, 4, False, False, id="deleting under the share goes"),
        pytest.param(2, 4, False, False, id="deleting exactly the share goes"),
        pytest.param(3, 4, False, True, id="deleting over the share stops"),
        pytest.param(4, 4, True, False, id="force lets a delete over the share go"),
        pytest.param(0, 0, False, False, id="a mailbox Planner holds nothing for goes"),
    ],
)
def test_the_mass_delete_guard_stops_only_over_the_share_and_never_when_forced(deletes: int, held_events: int, force: bool, stops: bool) -> None:
    verdict = mass_delete_guard(deletes, held_events, 0.5, force)
    assert verdict.stop is stops
    assert (verdict.reason is not None) is stops


def test_the_mass_delete_guard_gives_the_counts_and_the_way_out_as_its_reason() -> None:
    assert mass_delete_guard(3, 4, 0.5, False) == GuardVerdict(stop=True, reason="would delete 3 of 4 Planner events (more than 50%); run with force to apply")


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

