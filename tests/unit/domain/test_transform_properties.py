"""Delivery order does not matter: duplicates, replays and reordering give the same desired states.

Hypothesis builds a mailbox history (singles created, moved, freed, cancelled and deleted; a weekly series
whose occurrences move, vanish and come back; the series cancelled or deleted; nightly snapshots in one or
two parts). Every mutation produces the change message a producer would send, with increasing
observed_at. The messages are then delivered once in order, and again shuffled with duplicates. Each
snapshot part goes through ``finish_snapshot_part`` with the parts recorded so far, as the transformer
worker does, so a snapshot completes on whichever of its parts arrives last. Both deliveries must leave the
same desired state, and that state must be what the calendar finally holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Union
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.config import BusySettings
from shared.domain.busy_rules import busy_interval, sync_window
from shared.domain.contracts import (
    CalendarChange,
    CalendarItem,
    CalendarSnapshot,
    Interval,
)
from shared.domain.transform_core import (
    DesiredRecord,
    derive_change,
    derive_snapshot_part,
    finish_snapshot_part,
    is_event_key,
)

CPH = ZoneInfo("Europe/Copenhagen")
MAILBOX = "bo@kommune.dk"
POLICY = BusySettings().policy()
NOW = datetime(2026, 3, 16, 12, tzinfo=CPH)
WINDOW = sync_window(NOW, POLICY)
SINGLES = ["s0", "s1", "s2"]
SERIES = "series"
STARTS = [datetime(2026, 3, 17, 9, tzinfo=CPH), datetime(2026, 3, 17, 13, tzinfo=CPH), datetime(2026, 3, 18, 23, 30, tzinfo=CPH)]
ORIGINALS = [datetime(2026, 3, 23, 9, tzinfo=CPH) + timedelta(weeks=n) for n in range(4)]   # across the DST change
STATUSES = ["Busy", "Tentative", "Free", "WorkingElsewhere"]


Message = Union[CalendarChange, CalendarSnapshot]


@dataclass
class Calendar:
    """The source mailbox, mutated step by step."""

    singles: dict[str, CalendarItem] = field(default_factory=dict)
    series: CalendarItem | None = None
    occurrences: dict[int, CalendarItem] = field(default_factory=dict)

    def view(self) -> list[CalendarItem]:
        """What a CalendarView returns: singles and occurrences, never the master."""
        items = list(self.singles.values())
        if self.series is not None:
            items += [o.model_copy(update={"cancelled": self.series.cancelled}) for o in self.occurrences.values()]
        return items


single_state = st.one_of(
    st.none(),
    st.tuples(st.sampled_from(range(len(STARTS))), st.sampled_from([30, 60, 0]), st.sampled_from(STATUSES), st.booleans()),
)
occurrence_state = st.one_of(st.none(), st.tuples(st.sampled_from(range(len(STARTS) + 1)), st.sampled_from(STATUSES[:3])))
mutation = st.one_of(
    st.tuples(st.just("single"), st.sampled_from(SINGLES), single_state),
    st.tuples(st.just("series"), st.one_of(st.none(), st.tuples(st.booleans(), st.lists(occurrence_state, min_size=4, max_size=4)))),
    st.tuples(st.just("snapshot"), st.integers(min_value=1, max_value=2)),
)


def build_history(mutations: list[Any]) -> tuple[list[Message], Calendar]:
    calendar, messages = Calendar(), list[Message]()
    clock = iter(NOW - timedelta(hours=2) + timedelta(seconds=n) for n in range(10_000))
    for number, (kind, *args) in enumerate(mutations):
        at = next(clock)
        if kind == "single":
            uid, state = args
            if state is None:
                calendar.singles.pop(uid, None)
                messages.append(CalendarChange(correlation_id=f"m{number}", mailbox=MAILBOX, observed_at=at, change="delete", item_id=f"id-{uid}"))
                continue
            start_index, minutes, status, cancelled = state
            start = STARTS[start_index]
            calendar.singles[uid] = CalendarItem(item_id=f"id-{uid}", uid=uid, start=start, end=start + timedelta(minutes=minutes), free_busy=status, cancelled=cancelled)
            messages.append(CalendarChange(correlation_id=f"m{number}", mailbox=MAILBOX, observed_at=at, change="upsert", item_id=f"id-{uid}", item=calendar.singles[uid]))
        elif kind == "series":
            (state,) = args
            if state is None:
                calendar.series, calendar.occurrences = None, {}
                messages.append(CalendarChange(correlation_id=f"m{number}", mailbox=MAILBOX, observed_at=at, change="delete", item_id="id-series"))
                continue
            cancelled, occurrence_states = state
            calendar.series = CalendarItem(item_id="id-series", uid=SERIES, item_type="master", start=ORIGINALS[0], end=ORIGINALS[0] + timedelta(hours=1), free_busy="Busy", cancelled=cancelled)
            calendar.occurrences = {}
            for index, occurrence in enumerate(occurrence_states):
                if occurrence is None:
                    continue
                moved, status = occurrence
                start = ORIGINALS[index] if moved == len(STARTS) else STARTS[moved]
                calendar.occurrences[index] = CalendarItem(
                    item_id=f"id-series-{index}", uid=SERIES, item_type="occurrence" if start == ORIGINALS[index] else "exception",
                    start=start, end=start + timedelta(hours=1), original_start=ORIGINALS[index], free_busy=status,
                )
            messages.append(CalendarChange(
                correlation_id=f"m{number}", mailbox=MAILBOX, observed_at=at, change="upsert", item_id="id-series",
                item=calendar.series, occurrences=list(calendar.occurrences.values()), window=WINDOW,
            ))
        else:
            (parts,) = args
            items, snapshot_id = calendar.view(), f"snap-{number}"
            chunks = [items[i::parts] for i in range(parts)]
            snapshot = [
                CalendarSnapshot(
                    correlation_id=f"m{number}", snapshot_id=snapshot_id, mailbox=MAILBOX, observed_at=at, window=WINDOW,
                    part=p, final=p == parts, total_parts=parts if p == parts else None, items=chunk,
                )
                for p, chunk in enumerate(chunks, start=1)
            ]
            messages += snapshot
    return messages, calendar


def deliver(messages: list[Message]) -> dict[str, Interval]:
    known: dict[str, DesiredRecord] = {}
    recorded: dict[str, tuple[set[int], int | None]] = {}   # snapshot id -> parts recorded, total (the store's snapshot_progress)
    for message in messages:
        if isinstance(message, CalendarChange):
            decision = derive_change(message, known, POLICY, NOW)
        else:
            parts, total = recorded.get(message.snapshot_id, (set(), None))
            decision = finish_snapshot_part(message, derive_snapshot_part(message, known, POLICY, NOW), known, parts, total)
            recorded[message.snapshot_id] = (parts | {message.part}, total if total is not None else message.total_parts)
        for k in decision.remember:
            if k.origin_id not in known or known[k.origin_id].version <= k.version:
                known[k.origin_id] = k
    return {key: k.interval for key, k in known.items() if is_event_key(key) and k.interval is not None}


def truth(calendar: Calendar) -> dict[str, Interval]:
    held = {}
    for item in calendar.singles.values():
        interval = busy_interval(item, POLICY)
        if interval is not None:
            held[item.uid or ""] = interval
    if calendar.series is not None and not calendar.series.cancelled:
        for occurrence in calendar.occurrences.values():
            interval = busy_interval(occurrence, POLICY)
            if interval is not None:
                held[f"{SERIES}${occurrence.original_start.astimezone(CPH):%Y%m%d-%H%M%S}"] = interval  # type: ignore[union-attr]
    return held


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[Message], Calendar, list[int]]:
    messages, calendar = build_history(draw(st.lists(mutation, min_size=1, max_size=12)))
    extra = draw(st.lists(st.sampled_from(range(len(messages))), max_size=len(messages)))
    order = draw(st.permutations([*range(len(messages)), *extra]))
    return messages, calendar, order


@settings(max_examples=200, deadline=None)
@given(histories())
def test_any_interleaving_duplication_and_reordering_gives_the_same_desired_states(history: tuple[list[Message], Calendar, list[int]]) -> None:
    messages, calendar, order = history
    in_order = deliver(messages)
    assert in_order == truth(calendar)
    assert deliver([messages[index] for index in order]) == in_order
