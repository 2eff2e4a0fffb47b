"""The transformer's decisions, scenario by scenario, through a tiny in-memory store.

Each scenario is a sequence of messages fed to derive_change / derive_snapshot_part, each snapshot part then
through finish_snapshot_part with the parts recorded so far (as the transformer worker does); the store
applies ``remember`` and the test checks what each step emitted and what Planner should hold at the end. Where we deliberately differ from the reference client (decisions 2 and 3 in docs/decisions.md) the row
says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from itertools import count
from typing import Any, Union
from zoneinfo import ZoneInfo

import pytest

from shared.config import BusySettings
from shared.domain.busy_rules import BusyPolicy, sync_window
from shared.domain.contracts import (
    BusyTimeState,
    CalendarChange,
    CalendarItem,
    CalendarSnapshot,
    Interval,
    version_of,
)
from shared.domain.transform_core import (
    Decision,
    DesiredRecord,
    change_version,
    deleted_record_key,
    derive_change,
    derive_snapshot_part,
    finish_snapshot_part,
    is_event_key,
    item_record_key,
    merge_decisions,
    snapshot_complete,
)

UTC = timezone.utc
CPH = ZoneInfo("Europe/Copenhagen")
MAILBOX = "Anna.Caseworker@kommune.dk"
POLICY = BusySettings(planner_organizers=["noreply@planner.star.dk"], planner_uid_patterns=[r"^STAR-PLANNER-"]).policy()
NOW = datetime(2026, 3, 16, 12, tzinfo=CPH)            # Monday; the window runs to 16 Jun 2026 12:00 CEST
WINDOW = sync_window(NOW, POLICY)
_clock = count(1)


def cph(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=CPH)


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


def span(start: datetime, end: datetime) -> Interval:
    return Interval(start=start, end=end)


def observed() -> datetime:
    """Strictly increasing observation times, like a producer reading the mailbox over and over."""
    return NOW - timedelta(hours=1) + timedelta(milliseconds=next(_clock))


def item(uid: str = "uid-a", start: datetime | None = None, end: datetime | None = None, **fields: Any) -> CalendarItem:
    base: dict[str, Any] = {
        "item_id": f"item-{uid}",
        "uid": uid,
        "start": start or cph(2026, 3, 17, 9),
        "end": end or cph(2026, 3, 17, 10),
        "free_busy": "Busy",
        "time_zone": "Romance Standard Time",
    }
    base.update(fields)
    return CalendarItem(**base)


def occurrence(uid: str, original: datetime, start: datetime | None = None, minutes: int = 60, **fields: Any) -> CalendarItem:
    start = start or original
    kind = "exception" if start != original or fields.get("free_busy") not in (None, "Busy") else "occurrence"
    return CalendarItem(
        item_id=f"occ-{uid}-{original.isoformat()}",
        uid=uid,
        item_type=fields.pop("item_type", kind),
        start=start,
        end=start + timedelta(minutes=minutes),
        original_start=original,
        free_busy=fields.pop("free_busy", "Busy"),
        **fields,
    )


def master(uid: str, **fields: Any) -> CalendarItem:
    return item(uid, item_type="master", **fields)


def upsert(value: CalendarItem, occurrences: list[CalendarItem] | None = None, window: Interval | None = None) -> CalendarChange:
    return CalendarChange(
        correlation_id=f"c{next(_clock)}", mailbox=MAILBOX, observed_at=observed(), change="upsert",
        item_id=value.item_id, item=value, occurrences=occurrences,
        window=(window or WINDOW) if occurrences is not None else None,
    )


def delete(item_id: str) -> CalendarChange:
    return CalendarChange(correlation_id=f"c{next(_clock)}", mailbox=MAILBOX, observed_at=observed(), change="delete", item_id=item_id)


def snapshot(*parts: list[CalendarItem], snapshot_id: str = "snap-1", window: Interval | None = None) -> list[CalendarSnapshot]:
    """The parts of one snapshot read at one moment; the last is the final part carrying the total."""
    at = observed()
    messages: list[CalendarSnapshot] = []
    for number, items in enumerate(parts, start=1):
        final = number == len(parts)
        messages.append(CalendarSnapshot(
            correlation_id=f"s{next(_clock)}", snapshot_id=snapshot_id, mailbox=MAILBOX, observed_at=at,
            window=window or WINDOW, part=number, final=final, total_parts=len(parts) if final else None, items=items,
        ))
    return messages


Step = Union[CalendarChange, CalendarSnapshot]


@dataclass
class MemoryStore:
    """Applies decisions like the state store (never lowering a key's version) and plays Planner."""

    policy: BusyPolicy = POLICY
    known: dict[str, DesiredRecord] = field(default_factory=dict)
    planner: dict[str, BusyTimeState] = field(default_factory=dict)
    parts: dict[str, tuple[set[int], int | None]] = field(default_factory=dict)   # snapshot id -> parts recorded, total

    def apply(self, decision: Decision) -> Decision:
        for k in decision.remember:
            if k.origin_id not in self.known or self.known[k.origin_id].version <= k.version:
                self.known[k.origin_id] = k
        for state in decision.emit:
            held = self.planner.get(state.origin_id)
            if held is None or held.version < state.version:
                self.planner[state.origin_id] = state
        return decision

    def feed(self, step: Step, now: datetime = NOW) -> Decision:
        if isinstance(step, CalendarChange):
            return self.apply(derive_change(step, self.known, self.policy, now))
        recorded, total = self.parts.get(step.snapshot_id, (set(), None))
        decision = finish_snapshot_part(step, derive_snapshot_part(step, self.known, self.policy, now), self.known, recorded, total)
        self.parts[step.snapshot_id] = (recorded | {step.part}, total if total is not None else step.total_parts)
        return self.apply(decision)

    def desired(self) -> dict[str, Interval]:
        return {key: k.interval for key, k in self.known.items() if is_event_key(key) and k.interval is not None}

    def held(self) -> dict[str, Interval]:
        return {key: s.interval for key, s in self.planner.items() if s.interval is not None}


def emitted(decision: Decision) -> dict[str, Interval | None]:
    return {state.origin_id: state.interval for state in decision.emit}


T = span(utc(2026, 3, 17, 8), utc(2026, 3, 17, 9))            # tomorrow 09:00-10:00 CET
T_LATER = span(utc(2026, 3, 17, 9), utc(2026, 3, 17, 10))
T_SHORT = span(utc(2026, 3, 17, 8), utc(2026, 3, 17, 8, 30))
T_PLUS_15 = span(utc(2026, 3, 17, 8), utc(2026, 3, 17, 9, 15))
A = "uid-a"


@dataclass
class Scenario:
    name: str
    steps: list[Any]                                  # Step, or (Step, now)
    emits: list[dict[str, Interval | None]]           # what each step emitted, in order
    final: dict[str, Interval]


def flat(*groups: Any) -> list[Any]:
    out: list[Any] = []
    for group in groups:
        out.extend(group if isinstance(group, list) else [group])
    return out


# Microsoft Graph streams: calendarView/delta reports instances only, each occurrence or exception as its own upsert
# with its own instance id (uid = the series UID, original_start set), and a removal names that instance id, also
# for an instance never seen. Rounds are unordered and replayed. EWS rows above use the default source "ews".
G = "series-g"
G_DAYS = [cph(2026, 3, 18, 9), cph(2026, 3, 25, 9), cph(2026, 4, 1, 9)]
K1, K2, K3 = (f"{G}${day:%Y%m%d-%H%M%S}" for day in G_DAYS)
GT1 = span(utc(2026, 3, 18, 8), utc(2026, 3, 18, 9))
GT2 = span(utc(2026, 3, 25, 8), utc(2026, 3, 25, 9))
GT3 = span(utc(2026, 4, 1, 7), utc(2026, 4, 1, 8))                # summer time
G_MOVED = span(utc(2026, 3, 18, 12), utc(2026, 3, 18, 13))


def instance(n: int, start: datetime | None = None, **fields: Any) -> CalendarItem:
    """Instance ``n`` of series G as Graph reports it: its own instance id, the series UID, its original start."""
    return occurrence(G, G_DAYS[n], start, **fields).model_copy(update={"item_id": f"graph-instance-{n}"})


def g_upsert(value: CalendarItem) -> CalendarChange:
    return upsert(value).model_copy(update={"source": "graph"})


def g_delete(item_id: str) -> CalendarChange:
    return delete(item_id).model_copy(update={"source": "graph"})


def g_removed(n: int) -> CalendarChange:
    """Graph's ``{"id": <instance id>, "@removed": ...}`` for instance ``n`` of series G."""
    return g_delete(f"graph-instance-{n}")


def g_snapshot(*parts: list[CalendarItem], snapshot_id: str = "snap-g") -> list[CalendarSnapshot]:
    return [part.model_copy(update={"source": "graph"}) for part in snapshot(*parts, snapshot_id=snapshot_id)]


def one_round(*changes: CalendarChange) -> list[CalendarChange]:
    """Changes of one delta round: one read, so one observed_at (the last one's)."""
    return [change.model_copy(update={"observed_at": changes[-1].observed_at}) for change in changes]


def newest_first(*steps: Step) -> list[Step]:
    """Messages observed in the order given, delivered in the reverse order."""
    return list(reversed(steps))


def twice(step: Step) -> list[Step]:
    return [step, step]


SCENARIOS = [
    Scenario("a busy appointment is created", [upsert(item())], [{A: T}], {A: T}),
    Scenario("a moved appointment is updated", [upsert(item()), upsert(item(start=cph(2026, 3, 17, 10), end=cph(2026, 3, 17, 11)))], [{A: T}, {A: T_LATER}], {A: T_LATER}),
    Scenario("a shortened appointment is updated", [upsert(item()), upsert(item(end=cph(2026, 3, 17, 9, 30)))], [{A: T}, {A: T_SHORT}], {A: T_SHORT}),
    Scenario("a cancelled appointment is deleted", [upsert(item()), upsert(item(cancelled=True))], [{A: T}, {A: None}], {}),
    Scenario("a deleted appointment is deleted", [upsert(item()), delete("item-uid-a")], [{A: T}, {A: None}], {}),
    Scenario("an appointment moved to Deleted Items is deleted", [upsert(item()), upsert(item(in_deleted_items=True))], [{A: T}, {A: None}], {}),
    Scenario(
        "free, busy, free, busy: created, deleted, created again",
        [upsert(item(free_busy="Free")), upsert(item()), upsert(item(free_busy="Free")), upsert(item())],
        [{}, {A: T}, {A: None}, {A: T}], {A: T},
    ),
    Scenario("an unknown zero-length appointment is ignored", [upsert(item(end=cph(2026, 3, 17, 9)))], [{}], {}),
    Scenario("a known appointment made zero-length is deleted", [upsert(item()), upsert(item(end=cph(2026, 3, 17, 9)))], [{A: T}, {A: None}], {}),
    Scenario(
        "an appointment created for later today is sent (the reference client never sent it)",
        [upsert(item(start=cph(2026, 3, 16, 15), end=cph(2026, 3, 16, 16)))],
        [{A: span(utc(2026, 3, 16, 14), utc(2026, 3, 16, 15))}], {A: span(utc(2026, 3, 16, 14), utc(2026, 3, 16, 15))},
    ),
    Scenario("an appointment already over is not sent", [upsert(item(start=cph(2026, 3, 16, 8), end=cph(2026, 3, 16, 9)))], [{}], {}),
    Scenario(
        "a delivered appointment that simply ended is left as it is",
        [(upsert(item(start=cph(2026, 3, 16, 13), end=cph(2026, 3, 16, 14))), NOW), (upsert(item(start=cph(2026, 3, 16, 13), end=cph(2026, 3, 16, 14))), NOW + timedelta(hours=3))],
        [{A: span(utc(2026, 3, 16, 12), utc(2026, 3, 16, 13))}, {}], {A: span(utc(2026, 3, 16, 12), utc(2026, 3, 16, 13))},
    ),
    Scenario("a known appointment moved into the past is deleted", [upsert(item()), upsert(item(start=cph(2026, 3, 13, 9), end=cph(2026, 3, 13, 10)))], [{A: T}, {A: None}], {}),
    Scenario("a known appointment moved beyond the window is deleted", [upsert(item()), upsert(item(start=cph(2026, 7, 1, 9), end=cph(2026, 7, 1, 10)))], [{A: T}, {A: None}], {}),
    Scenario("an appointment starting exactly at the window end is not sent", [upsert(item(start=WINDOW.end, end=WINDOW.end + timedelta(hours=1)))], [{}], {}),
    Scenario(
        "an appointment starting a minute before the window end is sent whole",
        [upsert(item(start=WINDOW.end - timedelta(minutes=1), end=WINDOW.end + timedelta(hours=1)))],
        [{A: span(WINDOW.end - timedelta(minutes=1), WINDOW.end + timedelta(hours=1))}], {A: span(WINDOW.end - timedelta(minutes=1), WINDOW.end + timedelta(hours=1))},
    ),
    Scenario("an appointment ending exactly now is not sent", [upsert(item(start=NOW - timedelta(hours=1), end=NOW))], [{}], {}),
    Scenario(
        "an all-day appointment blocks the Copenhagen day",
        [upsert(item(start=cph(2026, 3, 20), end=cph(2026, 3, 21), all_day=True, free_busy="OOF"))],
        [{A: span(utc(2026, 3, 19, 23), utc(2026, 3, 20, 23))}], {A: span(utc(2026, 3, 19, 23), utc(2026, 3, 20, 23))},
    ),
    Scenario(
        "a multi-day all-day appointment over the spring DST change blocks every day",
        [upsert(item(start=cph(2026, 3, 28), end=cph(2026, 3, 31), all_day=True))],
        [{A: span(utc(2026, 3, 27, 23), utc(2026, 3, 30, 22))}], {A: span(utc(2026, 3, 27, 23), utc(2026, 3, 30, 22))},
    ),
    Scenario("a private appointment is busy", [upsert(item(sensitivity="Private"))], [{A: T}], {A: T}),
    Scenario("a tentative appointment is busy", [upsert(item(free_busy="Tentative"))], [{A: T}], {A: T}),
    Scenario("an out-of-office appointment is busy", [upsert(item(free_busy="OOF"))], [{A: T}], {A: T}),
    Scenario("a working-elsewhere appointment is not busy", [upsert(item(free_busy="WorkingElsewhere"))], [{}], {}),
    Scenario("a meeting invitation from Planner is not echoed", [upsert(item(organizer_is_planner=True))], [{}], {}),
    Scenario("a Planner UID is not echoed", [upsert(item("STAR-PLANNER-42"))], [{}], {}),
    Scenario(
        "an unchanged snapshot emits nothing",
        flat(upsert(item()), snapshot([item()])), [{A: T}, {}], {A: T},
    ),
    Scenario(
        "a snapshot missing a known appointment deletes it only when complete",
        flat(upsert(item()), upsert(item("uid-b")), snapshot([item("uid-b")], [])),
        [{A: T}, {"uid-b": T}, {}, {A: None}], {"uid-b": T},
    ),
    Scenario(
        "a snapshot creates what the changes missed",
        flat(snapshot([item()])), [{A: T}], {A: T},
    ),
    # the reference client's own acceptance tests (its TestEventProcessor / DoesAppointmentQualifyForUpdate_*), as scenarios
    Scenario("reference ProcessNotifications_Create: a future busy item is created", [upsert(item())], [{A: T}], {A: T}),
    Scenario("reference ProcessNotifications_Update: a changed end is an update", [upsert(item()), upsert(item(end=cph(2026, 3, 17, 10, 15)))], [{A: T}, {A: T_PLUS_15}], {A: T_PLUS_15}),
    Scenario("reference ProcessNotifications_Cancelled: cancelled is deleted", [upsert(item()), upsert(item(cancelled=True))], [{A: T}, {A: None}], {}),
    Scenario(
        "reference ProcessNotifications_Delete: create, update, then Deleted Items is deleted",
        [upsert(item()), upsert(item(end=cph(2026, 3, 17, 10, 15))), upsert(item(end=cph(2026, 3, 17, 10, 15), in_deleted_items=True))],
        [{A: T}, {A: T_PLUS_15}, {A: None}], {},
    ),
    Scenario("reference EmptySyncLog_NoCalendarEvent: created", [upsert(item())], [{A: T}], {A: T}),
    Scenario("reference AppointmentUnchanged: no row", [upsert(item()), upsert(item())], [{A: T}, {}], {A: T}),
    Scenario("reference AppointmentChanged: +15 minutes is an update", [upsert(item()), upsert(item(end=cph(2026, 3, 17, 10, 15)))], [{A: T}, {A: T_PLUS_15}], {A: T_PLUS_15}),
    Scenario("reference AppointmentCancelled: deleted", [upsert(item()), upsert(item(cancelled=True))], [{A: T}, {A: None}], {}),
    Scenario("reference AppointmentDeleted: deleted", [upsert(item()), upsert(item(in_deleted_items=True))], [{A: T}, {A: None}], {}),
    Scenario("reference DoNotCreateSyncForAppointmentWithSameStartEnd: nothing", [upsert(item(end=cph(2026, 3, 17, 9)))], [{}], {}),
    Scenario("reference DoNotCreateSyncForFreeAppointment: nothing", [upsert(item(free_busy="Free"))], [{}], {}),
    Scenario("reference AppointmentChangedToFree: deleted", [upsert(item()), upsert(item(free_busy="Free"))], [{A: T}, {A: None}], {}),
    Scenario(
        "reference AppointmentChangedFromBusyToFreeToBusy: created again",
        [upsert(item()), upsert(item(free_busy="Free")), upsert(item())], [{A: T}, {A: None}, {A: T}], {A: T},
    ),
    Scenario("reference AppointmentChangedFromFree: an unknown busy item is created", [upsert(item())], [{A: T}], {A: T}),
    Scenario(
        "reference AllDayAppointment: created",
        [upsert(item(start=cph(2026, 3, 18), end=cph(2026, 3, 19), all_day=True))],
        [{A: span(utc(2026, 3, 17, 23), utc(2026, 3, 18, 23))}], {A: span(utc(2026, 3, 17, 23), utc(2026, 3, 18, 23))},
    ),
    Scenario(
        "reference MultiDayAppointment: created",
        [upsert(item(start=cph(2026, 3, 18, 9), end=cph(2026, 3, 20, 15)))],
        [{A: span(utc(2026, 3, 18, 8), utc(2026, 3, 20, 14))}], {A: span(utc(2026, 3, 18, 8), utc(2026, 3, 20, 14))},
    ),
    Scenario(
        "reference DoNotSyncCreateToday: WE DIFFER, an item for later today is created",
        [upsert(item(start=cph(2026, 3, 16, 14), end=cph(2026, 3, 16, 15)))],
        [{A: span(utc(2026, 3, 16, 13), utc(2026, 3, 16, 14))}], {A: span(utc(2026, 3, 16, 13), utc(2026, 3, 16, 14))},
    ),
    Scenario(
        "reference DoSyncUpdateToday: a known item moved to later today is updated",
        [upsert(item()), upsert(item(start=cph(2026, 3, 16, 14), end=cph(2026, 3, 16, 15)))],
        [{A: T}, {A: span(utc(2026, 3, 16, 13), utc(2026, 3, 16, 14))}], {A: span(utc(2026, 3, 16, 13), utc(2026, 3, 16, 14))},
    ),
    Scenario(
        "reference DoSyncDeleteToday: a known item for today that is deleted is deleted",
        [upsert(item(start=cph(2026, 3, 16, 14), end=cph(2026, 3, 16, 15))), delete("item-uid-a")],
        [{A: span(utc(2026, 3, 16, 13), utc(2026, 3, 16, 14))}, {A: None}], {},
    ),
    # Microsoft Graph streams (instances only, removals by instance id)
    Scenario("graph: an occurrence is created", [g_upsert(instance(0))], [{K1: GT1}], {K1: GT1}),
    Scenario(
        "graph: an occurrence moved is updated, its sibling untouched",
        [g_upsert(instance(0)), g_upsert(instance(1)), g_upsert(instance(0, start=cph(2026, 3, 18, 13)))],
        [{K1: GT1}, {K2: GT2}, {K1: G_MOVED}], {K1: G_MOVED, K2: GT2},
    ),
    Scenario(
        "graph: an occurrence removed is deleted alone, not its series",
        [g_upsert(instance(0)), g_upsert(instance(1)), g_removed(0)],
        [{K1: GT1}, {K2: GT2}, {K1: None}], {K2: GT2},
    ),
    Scenario(
        "graph: a removal delivered before its upsert is not undone (the late upsert restates it), and the sibling is untouched",
        flat(g_upsert(instance(1)), newest_first(g_upsert(instance(0)), g_removed(0))),
        [{K2: GT2}, {}, {K1: None}], {K2: GT2},
    ),
    Scenario(
        "graph: a replayed removal is a no-op",
        flat(g_upsert(instance(0)), g_upsert(instance(1)), twice(g_removed(0))),
        [{K1: GT1}, {K2: GT2}, {K1: None}, {}], {K2: GT2},
    ),
    Scenario(
        "graph: a series removed instance by instance in one round, one never seen, is deleted key by key",
        flat(g_upsert(instance(0)), g_upsert(instance(1)), one_round(g_removed(1), g_removed(2), g_removed(0))),
        [{K1: GT1}, {K2: GT2}, {K2: None}, {}, {K1: None}], {},
    ),
    Scenario(
        "graph: a series removed, its removals delivered before its upserts, is never created (the upserts restate the removals)",
        flat(newest_first(g_upsert(instance(0)), g_upsert(instance(1)), *one_round(g_removed(0), g_removed(1)))),
        [{}, {}, {K2: None}, {K1: None}], {},
    ),
    Scenario(
        "graph: an exception turned free is deleted, its sibling untouched",
        [g_upsert(instance(1)), g_upsert(instance(0, start=cph(2026, 3, 18, 13))), g_upsert(instance(0, start=cph(2026, 3, 18, 13), free_busy="Free"))],
        [{K2: GT2}, {K1: G_MOVED}, {K1: None}], {K2: GT2},
    ),
    Scenario(
        "graph: an instance first seen by a snapshot is removed by its instance id",
        flat(g_snapshot([instance(0), instance(1)]), g_removed(0)),
        [{K1: GT1, K2: GT2}, {K1: None}], {K2: GT2},
    ),
    Scenario(
        "graph: a removal of an instance never seen touches nothing, and an older snapshot that saw it restates the removal",
        flat(g_upsert(instance(1)), newest_first(*g_snapshot([instance(0), instance(1)]), g_removed(0))),
        [{K2: GT2}, {}, {K1: None}], {K2: GT2},
    ),
    Scenario(
        "graph: a late older upsert after a removal neither brings the instance back (it restates the removal) nor deletes its sibling",
        flat(g_upsert(instance(0)), g_upsert(instance(1)), newest_first(g_upsert(instance(0, start=cph(2026, 3, 18, 13))), g_removed(0))),
        [{K1: GT1}, {K2: GT2}, {K1: None}, {K1: None}], {K2: GT2},
    ),
    Scenario(
        "graph: an instance removed and later restored under its instance id is busy again",
        [g_upsert(instance(0)), g_removed(0), g_upsert(instance(0))],
        [{K1: GT1}, {K1: None}, {K1: GT1}], {K1: GT1},
    ),
    Scenario(
        "graph: a single removed is deleted",
        [g_upsert(item("uid-g")), g_upsert(instance(0)), g_delete("item-uid-g")],
        [{"uid-g": T}, {K1: GT1}, {"uid-g": None}], {K1: GT1},
    ),
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario(scenario: Scenario) -> None:
    store = MemoryStore()
    got = []
    for step in scenario.steps:
        message, now = step if isinstance(step, tuple) else (step, NOW)
        decision = store.feed(message, now)
        assert decision.rejected == []
        got.append(emitted(decision))
    assert got == scenario.emits
    assert store.desired() == scenario.final
    assert store.held() == scenario.final        # what the emitted states leave in Planner agrees


def test_reference_delete_appointments_not_in_view_outside_date_scope() -> None:
    """Only window events missing from the view are deleted; events outside the window and past events are left.

    The reference left an event present in the view with changed times to its qualification step; ours
    updates it in the same pass (one rule for every path).
    """
    store = MemoryStore()
    store.feed(upsert(item("in-window-missing")))
    store.feed(upsert(item("in-view-moved")))
    store.feed(upsert(item("ends-soon", start=cph(2026, 3, 16, 13), end=cph(2026, 3, 16, 14))))
    store.feed(upsert(item("beyond", start=cph(2026, 6, 10, 9), end=cph(2026, 6, 10, 10))))
    # the beyond-window event: known from a larger window earlier; the snapshot's window is shorter
    later = NOW + timedelta(hours=3)       # "ends-soon" is over by now
    window = span(later, cph(2026, 6, 1))
    steps = snapshot([item("in-view-moved", start=cph(2026, 3, 17, 11), end=cph(2026, 3, 17, 12))], window=window)
    (decision,) = [store.feed(step, later) for step in steps]
    assert emitted(decision) == {"in-view-moved": span(utc(2026, 3, 17, 10), utc(2026, 3, 17, 11)), "in-window-missing": None}
    assert set(store.desired()) == {"in-view-moved", "ends-soon", "beyond"}


def test_an_incomplete_snapshot_removes_nothing() -> None:
    store = MemoryStore()
    store.feed(upsert(item()))
    parts = snapshot([item("uid-b")], [])            # part 1 of 2 arrives; part 2 never does
    decision = store.feed(parts[0])
    assert all(state.interval is not None for state in decision.emit)
    assert store.desired() == {A: T, "uid-b": T}


def test_a_change_newer_than_the_snapshot_survives_it() -> None:
    store = MemoryStore()
    store.feed(upsert(item()))
    steps = snapshot([item()])                                     # read at t1: A at 09:00
    moved = upsert(item(start=cph(2026, 3, 17, 10), end=cph(2026, 3, 17, 11)))   # t2 > t1: A moved
    created = upsert(item("uid-new"))                              # t2 > t1: created after the snapshot read
    store.feed(moved)
    store.feed(created)
    restated = [state for step in steps for state in store.feed(step).emit]
    assert store.desired() == {A: T_LATER, "uid-new": T}
    # the older snapshot changes nothing; the keys it is older than are restated as decided (decision 95): the one it
    # saw, and the one its completion would have made absent
    assert {(s.origin_id, s.interval, s.version) for s in restated} == {
        (A, T_LATER, change_version(moved)), ("uid-new", T, change_version(created)),
    }


def test_an_older_change_never_overwrites_a_newer_one_and_a_duplicate_is_a_no_op() -> None:
    store = MemoryStore()
    first, second = upsert(item()), upsert(item(start=cph(2026, 3, 17, 10), end=cph(2026, 3, 17, 11)))
    store.feed(second)
    late = store.feed(first)
    assert late.remember == []
    # its states may have gone out before a record that was lost: what is decided goes out again (decision 95)
    assert [(s.origin_id, s.interval, s.version) for s in late.emit] == [(A, T_LATER, change_version(second))]
    assert store.feed(second) == Decision()
    assert store.desired() == {A: T_LATER}


def test_a_delete_that_overtakes_its_create_is_not_undone() -> None:
    store = MemoryStore()
    create, gone = upsert(item()), delete("item-uid-a")
    store.feed(gone)
    # the create restates the delete, as the delete would have decided had it known the key (decision 95)
    assert [(s.origin_id, s.interval, s.version) for s in store.feed(create).emit] == [(A, None, version_of(gone.observed_at))]
    assert store.desired() == {}


def test_an_older_change_arriving_after_a_complete_snapshot_that_did_not_see_it_is_not_sent() -> None:
    store = MemoryStore()
    late = upsert(item("uid-late"))                 # observed before the snapshot, delivered after it
    for step in snapshot([item()]):
        store.feed(step)
    # never sent busy; restated absent, as of the snapshot, in case it went out before a record that was lost (decision 95)
    assert emitted(store.feed(late)) == {"uid-late": None}
    assert store.desired() == {A: T}


def test_the_emitted_state_carries_mailbox_version_correlation_and_cause() -> None:
    change = upsert(item())
    (state,) = derive_change(change, {}, POLICY, NOW).emit
    assert state == BusyTimeState(correlation_id=change.correlation_id, mailbox=MAILBOX, origin_id=A, version=change_version(change), interval=T, cause="change")
    (part,) = snapshot([item("uid-s")])
    (state,) = derive_snapshot_part(part, {}, POLICY, NOW).emit
    assert (state.cause, state.correlation_id, state.version) == ("snapshot", part.correlation_id, version_of(part.observed_at))


def test_emits_are_sorted_by_origin_id() -> None:
    (part,) = snapshot([item("uid-c"), item("uid-a"), item("uid-b")])
    assert [s.origin_id for s in derive_snapshot_part(part, {}, POLICY, NOW).emit] == ["uid-a", "uid-b", "uid-c"]


def test_a_rejected_single_yields_only_the_rejection() -> None:
    decision = derive_change(upsert(item(end=cph(2026, 3, 17, 8))), {}, POLICY, NOW)
    assert decision == Decision(rejected=[("item-uid-a", "single ends before it starts")])


def test_a_rejected_item_does_not_stop_the_rest_of_a_snapshot_part() -> None:
    (part,) = snapshot([item("uid-bad", free_busy=None), item()])
    decision = derive_snapshot_part(part, {}, POLICY, NOW)
    assert decision.rejected == [("item-uid-bad", "single has no free/busy status")]
    assert emitted(decision) == {A: T}


# --- series -----------------------------------------------------------------------------------------

S = "series-1"


def key(uid: str, local: datetime) -> str:
    return f"{uid}${local.strftime('%Y%m%d-%H%M%S')}"


def weekly(uid: str, first: datetime, weeks: int, minutes: int = 60) -> list[CalendarItem]:
    return [occurrence(uid, first + timedelta(weeks=n), minutes=minutes) for n in range(weeks)]


def test_a_weekly_series_across_both_dst_changes_with_one_moved_and_one_deleted_occurrence() -> None:
    policy = BusySettings(window_months=8).policy()
    now = cph(2026, 10, 1, 12)
    window = sync_window(now, policy)
    store = MemoryStore(policy=policy)
    mondays = [datetime(2026, 10, 19, 9, tzinfo=CPH) + timedelta(weeks=n) for n in range(26)]   # to 12 Apr 2027
    moved_from, deleted = mondays[3], mondays[20]
    occurrences = [occurrence(S, m) for m in mondays if m not in (moved_from, deleted)]
    occurrences.append(occurrence(S, moved_from, start=datetime(2026, 11, 10, 13, tzinfo=CPH)))
    store.feed(upsert(master(S), [occurrence(S, m) for m in mondays], window), now)
    store.feed(upsert(master(S), occurrences, window), now)

    expected = {}
    for local in mondays:
        winter = datetime(2026, 10, 25) < local.replace(tzinfo=None) < datetime(2027, 3, 28)
        start = datetime(local.year, local.month, local.day, 8 if winter else 7, tzinfo=UTC)
        expected[key(S, local)] = span(start, start + timedelta(hours=1))
    expected[key(S, moved_from)] = span(utc(2026, 11, 10, 12), utc(2026, 11, 10, 13))
    del expected[key(S, deleted)]
    assert store.desired() == expected
    assert expected[key(S, mondays[0])].start == utc(2026, 10, 19, 7)        # summer time
    assert expected[key(S, mondays[1])].start == utc(2026, 10, 26, 8)        # winter time
    assert expected[key(S, mondays[-1])].start == utc(2027, 4, 12, 7)       # summer time again
    assert S not in store.desired()                                           # the master is never emitted


def test_a_series_shortened_by_changing_its_end_date_deletes_the_dropped_occurrences() -> None:
    store = MemoryStore()
    six = weekly(S, cph(2026, 3, 18, 9), 6)
    store.feed(upsert(master(S), six))
    decision = store.feed(upsert(master(S), six[:3]))
    assert emitted(decision) == {key(S, o.original_start.astimezone(CPH)): None for o in six[3:]}  # type: ignore[union-attr]
    assert len(store.desired()) == 3


def test_a_cancelled_series_deletes_every_occurrence() -> None:
    store = MemoryStore()
    four = weekly(S, cph(2026, 3, 18, 9), 4)
    store.feed(upsert(master(S), four))
    store.feed(upsert(master(S, cancelled=True), four))
    assert store.desired() == {}


def test_a_deleted_series_deletes_every_occurrence() -> None:
    store = MemoryStore()
    store.feed(upsert(master(S), weekly(S, cph(2026, 3, 18, 9), 4)))
    decision = store.feed(delete(f"item-{S}"))
    assert len(decision.emit) == 4 and all(s.interval is None for s in decision.emit)
    assert store.desired() == {}


def test_a_monthly_series_on_the_last_weekday_keys_each_occurrence_by_its_local_original_start() -> None:
    store = MemoryStore()
    last_weekdays = [cph(2026, 3, 31, 9), cph(2026, 4, 30, 9), cph(2026, 5, 29, 9)]
    store.feed(upsert(master(S), [occurrence(S, d, minutes=30) for d in last_weekdays]))
    assert store.desired() == {
        f"{S}$20260331-090000": span(utc(2026, 3, 31, 7), utc(2026, 3, 31, 7, 30)),
        f"{S}$20260430-090000": span(utc(2026, 4, 30, 7), utc(2026, 4, 30, 7, 30)),
        f"{S}$20260529-090000": span(utc(2026, 5, 29, 7), utc(2026, 5, 29, 7, 30)),
    }


def test_an_occurrence_moved_across_midnight_keeps_its_key() -> None:
    store = MemoryStore()
    original = cph(2026, 3, 20, 23)
    store.feed(upsert(master(S), [occurrence(S, original, minutes=30)]))
    decision = store.feed(upsert(master(S), [occurrence(S, original, start=cph(2026, 3, 21, 0, 30), minutes=30)]))
    assert emitted(decision) == {f"{S}$20260320-230000": span(utc(2026, 3, 20, 23, 30), utc(2026, 3, 21, 0))}


def test_a_single_turned_into_a_series_deletes_the_single() -> None:
    store = MemoryStore()
    store.feed(upsert(item(S)))
    decision = store.feed(upsert(master(S), weekly(S, cph(2026, 3, 18, 9), 2)))
    assert emitted(decision)[S] is None
    assert set(store.desired()) == {f"{S}$20260318-090000", f"{S}$20260325-090000"}


def test_a_rejected_occurrence_does_not_stop_the_rest_of_the_series() -> None:
    store = MemoryStore()
    good, bad = weekly(S, cph(2026, 3, 18, 9), 2)
    broken = bad.model_copy(update={"end": bad.start - timedelta(minutes=5)})
    decision = store.feed(upsert(master(S), [good, broken]))
    assert decision.rejected == [(broken.item_id, "occurrence ends before it starts")]
    assert set(store.desired()) == {f"{S}$20260318-090000"}


def test_a_snapshot_of_occurrences_after_the_series_was_deleted_does_not_resurrect_them() -> None:
    store = MemoryStore()
    occurrences = weekly(S, cph(2026, 3, 18, 9), 3)
    steps = snapshot(occurrences)                   # read before the delete, delivered after it
    store.feed(upsert(master(S), occurrences))
    store.feed(delete(f"item-{S}"))
    for step in steps:
        store.feed(step)
    assert store.desired() == {}


# --- order independence, the cases the property test found ----------------------------------------------


def test_an_unknown_free_item_emits_nothing_but_is_remembered_as_absent() -> None:
    store = MemoryStore()
    decision = store.feed(upsert(item(free_busy="Free")))
    assert decision.emit == []
    assert [(k.origin_id, k.interval) for k in decision.remember] == [(A, None)]


def test_an_older_busy_change_arriving_after_a_newer_free_one_is_not_sent() -> None:
    store = MemoryStore()
    busy, free = upsert(item()), upsert(item(free_busy="Free"))
    store.feed(free)
    # never sent busy: only the newer free decision is restated (decision 95)
    assert [(s.origin_id, s.interval, s.version) for s in store.feed(busy).emit] == [(A, None, change_version(free))]
    assert store.desired() == {}


def test_a_late_upsert_teaches_an_earlier_series_delete_its_uid() -> None:
    """Occurrences first seen by a snapshot carry no master id; the delete learns the UID from the late upsert."""
    store = MemoryStore()
    occurrences = weekly(S, cph(2026, 3, 18, 9), 2)
    create = upsert(master(S), occurrences)
    steps = snapshot(occurrences)
    gone = delete(f"item-{S}")
    for step in [*steps, gone]:
        store.feed(step)
    assert len(store.desired()) == 2                 # the delete could not know which keys were the series
    decision = store.feed(create)
    # the series' keys, and the master's own key restated as the delete would have decided it (decision 95)
    assert {s.origin_id: s.interval for s in decision.emit} == {f"{S}$20260318-090000": None, f"{S}$20260325-090000": None, S: None}
    assert {s.version for s in decision.emit} == {version_of(gone.observed_at)}
    assert store.desired() == {}


# --- snapshot completion: every part 1..total, in any order, the total from the final part ------------


def _part(number: int, total: int | None = None) -> CalendarSnapshot:
    """Part ``number`` of a snapshot; ``total`` given makes it the final part."""
    return CalendarSnapshot(
        correlation_id=f"s{number}", snapshot_id="snap-c", mailbox=MAILBOX, observed_at=NOW, window=WINDOW,
        part=number, final=total is not None, total_parts=total, items=[],
    )


@pytest.mark.parametrize(
    ("part", "recorded", "recorded_total", "complete"),
    [
        (_part(1, 1), set(), None, True),                   # a one-part snapshot
        (_part(3, 3), {1, 2}, None, True),                  # parts in order: the final one completes
        (_part(2), {1}, None, False),                       # in order, not there yet
        (_part(2), {1, 3}, 3, True),                        # out of order: the missing middle part completes
        (_part(1), {1, 2}, 2, True),                        # a duplicate of a complete snapshot's part completes again
        (_part(1), {1}, None, False),                       # a duplicate before the final part
        (_part(3, 3), set(), None, False),                  # the final part first
        (_part(3, 3), {3}, 3, False),                       # the final part again, still alone
        (_part(1), {2, 3}, 3, True),                        # the total known only from the store
        (_part(2), {3}, 3, False),                          # the total from the store, part 1 missing
        (_part(3, 3), {1}, None, False),                    # a part missing
        (_part(1), set(), None, False),                     # no total known at all
    ],
    ids=[
        "single", "in-order", "in-order-incomplete", "out-of-order", "duplicate-after-complete", "duplicate-before-final",
        "final-first", "final-duplicate", "total-from-store", "total-from-store-part-missing", "part-missing", "no-total",
    ],
)
def test_snapshot_complete(part: CalendarSnapshot, recorded: set[int], recorded_total: int | None, complete: bool) -> None:
    assert snapshot_complete(part, recorded, recorded_total) is complete


def test_a_part_that_does_not_complete_its_snapshot_keeps_its_own_decision() -> None:
    store = MemoryStore()
    store.feed(upsert(item()))
    (part, _) = snapshot([item("uid-b")], [])
    own = derive_snapshot_part(part, store.known, POLICY, NOW)
    assert finish_snapshot_part(part, own, store.known, set(), None) is own
    assert own.completed_snapshot is None


def test_the_completing_part_carries_its_own_states_and_the_completion_in_one_decision() -> None:
    store = MemoryStore()
    store.feed(upsert(item()))
    store.feed(upsert(item("uid-gone")))
    first, final = snapshot([item()], [item("uid-new")], snapshot_id="snap-one")
    store.feed(first)
    decision = store.feed(final)
    assert decision.completed_snapshot == "snap-one"
    assert emitted(decision) == {"uid-gone": None, "uid-new": T}
    assert [s.origin_id for s in decision.emit] == ["uid-gone", "uid-new"]          # sorted, like every decision
    assert store.desired() == {A: T, "uid-new": T}


@pytest.mark.parametrize("order", [(1, 2, 3), (3, 1, 2), (2, 3, 1), (3, 2, 1)], ids=lambda o: "-".join(map(str, o)))
def test_a_snapshot_completes_on_whichever_part_arrives_last(order: tuple[int, ...]) -> None:
    store = MemoryStore()
    store.feed(upsert(item()))
    parts = snapshot([item("uid-b")], [item("uid-c")], [])
    completed = [store.feed(parts[number - 1]).completed_snapshot for number in order]
    assert completed == [None, None, "snap-1"]
    assert store.desired() == {"uid-b": T, "uid-c": T}


def test_duplicate_parts_do_not_complete_a_snapshot_early_and_a_late_duplicate_removes_nothing_more() -> None:
    store = MemoryStore()
    store.feed(upsert(item()))
    one, two, three = snapshot([item("uid-b")], [item("uid-c")], [])
    for step in (three, one, three, one):
        assert store.feed(step).completed_snapshot is None
    assert store.desired() == {A: T, "uid-b": T}
    assert emitted(store.feed(two)) == {A: None, "uid-c": T}
    again = store.feed(one)
    assert again.completed_snapshot == "snap-1" and again.emit == []
    assert store.desired() == {"uid-b": T, "uid-c": T}


def test_a_snapshot_with_a_part_missing_removes_nothing() -> None:
    store = MemoryStore()
    store.feed(upsert(item()))
    one, _, three = snapshot([item("uid-b")], [item("uid-c")], [])
    assert [store.feed(step).completed_snapshot for step in (one, three)] == [None, None]
    assert store.desired() == {A: T, "uid-b": T}


def test_merge_decisions_lets_the_later_decision_win_per_key() -> None:
    first = derive_change(upsert(item()), {}, POLICY, NOW)
    later = derive_change(upsert(item(start=cph(2026, 3, 17, 10), end=cph(2026, 3, 17, 11))), {}, POLICY, NOW)
    other = derive_change(upsert(item("uid-b")), {}, POLICY, NOW)
    merged = merge_decisions(merge_decisions(first, other), Decision(later.emit, later.remember, [("x", "why")], "snap-x"))
    assert emitted(merged) == {A: T_LATER, "uid-b": T}
    assert {k.origin_id: k.interval for k in merged.remember} == {A: T_LATER, "uid-b": T}
    assert (merged.rejected, merged.completed_snapshot) == ([("x", "why")], "snap-x")


# --- Microsoft Graph: instance-level removals (the scenario rows "graph: ..." above) ----------------------


def test_a_removal_by_instance_id_makes_that_instance_absent() -> None:
    """The reproduction: an occurrence upsert, then Graph's removal of the same instance id."""
    created = derive_change(g_upsert(instance(0)), {}, POLICY, NOW)
    after = {record.origin_id: record for record in created.remember}
    assert after[K1].source_item_id == "graph-instance-0"
    assert emitted(derive_change(g_removed(0), after, POLICY, NOW)) == {K1: None}


def test_an_instance_removal_leaves_a_tombstone_that_does_not_name_the_series() -> None:
    store = MemoryStore()
    store.feed(g_upsert(instance(0)))
    store.feed(g_removed(0))
    tomb = store.known[deleted_record_key("graph-instance-0")]
    assert (tomb.uid, tomb.source_item_id, tomb.interval) == (None, "graph-instance-0", None)


def test_an_instance_removal_does_not_stop_an_older_snapshot_from_creating_its_siblings() -> None:
    store = MemoryStore()
    created = g_upsert(instance(0))
    steps = g_snapshot([instance(0), instance(1), instance(2)])    # read before the removal, delivered after it
    removed = g_removed(0)
    for step in [created, removed, *steps]:
        store.feed(step)
    assert store.desired() == {K2: GT2, K3: GT3}


def test_a_late_older_upsert_of_a_removed_instance_leaves_its_siblings_alone() -> None:
    store = MemoryStore()
    created = g_upsert(instance(0))
    steps = g_snapshot([instance(0), instance(1), instance(2)])    # siblings known, older than the removal
    removed = g_removed(0)
    for step in [removed, *steps, created]:
        store.feed(step)
    assert store.desired() == {K2: GT2, K3: GT3}
    assert store.known[K1].interval is None and store.known[K1].version == version_of(removed.observed_at)


def test_an_instance_removal_does_not_reach_another_instance_id_now_holding_the_key() -> None:
    """A series deleted and invited again under the same UID: new instance ids for the same keys."""
    store = MemoryStore()
    old = g_upsert(instance(0))
    old_removed = g_removed(0)
    new = g_upsert(instance(0).model_copy(update={"item_id": "graph-instance-0-again"}))
    for step in [new, old, old_removed]:
        store.feed(step)
    assert store.desired() == {K1: GT1}


@pytest.mark.parametrize("removal_first", [True, False], ids=["removal-first", "upsert-first"])
def test_in_one_round_a_new_instance_id_for_a_key_wins_over_the_removal_of_the_old_one(removal_first: bool) -> None:
    """One read saw the old id removed and the same key alive under a new id: the key is busy whatever the order."""
    store = MemoryStore()
    store.feed(g_upsert(instance(0)))
    removed, again = one_round(g_removed(0), g_upsert(instance(0).model_copy(update={"item_id": "graph-instance-0-again"})))
    for step in ([removed, again] if removal_first else [again, removed]) * 2:    # and each replayed
        store.feed(step)
    assert store.desired() == {K1: GT1}
    assert store.known[K1].source_item_id == "graph-instance-0-again"


def test_an_ews_snapshot_keeps_the_master_item_id_on_its_occurrences() -> None:
    store = MemoryStore()
    two = weekly(S, cph(2026, 3, 18, 9), 2)
    store.feed(upsert(master(S), two))
    for step in snapshot(two):
        store.feed(step)
    assert {store.known[key(S, o.original_start.astimezone(CPH))].source_item_id for o in two} == {f"item-{S}"}  # type: ignore[union-attr]


def test_an_ews_series_delete_still_reaches_every_occurrence_after_its_records_were_pruned() -> None:
    """EWS deletes name masters: a delete matching only occurrence keys still expands to the series UID.

    The master's bookkeeping and its absent key are pruned by age (the store's retention); an occurrence that
    entered the window later was first seen by a snapshot and carries no item id.
    """
    store = MemoryStore()
    store.feed(upsert(master(S), weekly(S, cph(2026, 3, 18, 9), 2)))
    for step in snapshot(weekly(S, cph(2026, 3, 18, 9), 3)):
        store.feed(step)
    del store.known[item_record_key(f"item-{S}")], store.known[S]
    assert len(store.desired()) == 3
    store.feed(delete(f"item-{S}"))
    assert store.desired() == {}
