"""Delivery order does not matter: duplicates, replays and reordering give the same desired states.

Hypothesis builds a mailbox history (singles created, moved, freed, cancelled and deleted; a weekly series
whose occurrences move, vanish and come back; the series cancelled or deleted; nightly snapshots in one or
two parts). Every mutation produces the change message a producer would send, with increasing
observed_at. The messages are then delivered once in order, and again shuffled with duplicates. Each
snapshot part goes through ``finish_snapshot_part`` with the parts recorded so far, as the transformer
worker does, so a snapshot completes on whichever of its parts arrives last. Both deliveries must leave the
same desired state, and that state must be what the calendar finally holds.

The same holds for a Microsoft Graph mailbox (``source="graph"``), whose calendarView/delta reports instances
only: every occurrence or exception is its own upsert under its own instance id, a removal names one instance
id (also one never seen, or one already removed), a deleted series is one removal per instance, and one delta
round (one read) gives all its messages the same observed_at. A series deleted and invited again under the
same UID gets new instance ids for the same keys, also inside one round (the old ids' removals and the new ids'
upserts at one version). Snapshots list singles and instances with their ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Union
from zoneinfo import ZoneInfo

import pytest
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
    Decision,
    DesiredRecord,
    derive_change,
    derive_snapshot_part,
    finish_snapshot_part,
    is_event_key,
    reads_for,
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
    return deliver_to_planner([(message, False) for message in messages])[0]


def deliver_to_planner(deliveries: list[tuple[Message, bool]]) -> tuple[dict[str, Interval], dict[str, Interval]]:
    """The desired states, and what Planner holds once the publisher applied every state emitted, for ``deliveries``:
    (message, record lost). A lost record is a message whose states were published but whose record step never
    ran (its transformer replica killed between the confirms and the record; a record step that failed): the
    broker delivers it again later (decision 95 in docs/decisions.md). The publisher applies a state only when
    it is newer than the last one it applied for its key (``delivery_plan``), and remembers an absent one's version."""
    known: dict[str, DesiredRecord] = {}
    recorded: dict[str, tuple[set[int], int | None]] = {}   # snapshot id -> parts recorded, total (the store's snapshot_progress)
    planner: dict[str, tuple[int, Interval | None]] = {}
    for message, lost in deliveries:
        if isinstance(message, CalendarChange):
            decision = derive_change(message, known, POLICY, NOW)
        else:
            parts, total = recorded.get(message.snapshot_id, (set(), None))
            decision = finish_snapshot_part(message, derive_snapshot_part(message, known, POLICY, NOW), known, parts, total)
            if not lost:
                recorded[message.snapshot_id] = (parts | {message.part}, total if total is not None else message.total_parts)
        for state in decision.emit:
            held = planner.get(state.origin_id)
            if held is None or held[0] < state.version:
                planner[state.origin_id] = (state.version, state.interval)
        if lost:
            continue
        for k in decision.remember:
            if k.origin_id not in known or known[k.origin_id].version <= k.version:
                known[k.origin_id] = k
    desired = {key: k.interval for key, k in known.items() if is_event_key(key) and k.interval is not None}
    return desired, {key: interval for key, (_, interval) in planner.items() if interval is not None}


@st.composite
def with_lost_records(draw: st.DrawFn, order: list[int]) -> list[tuple[int, bool]]:
    """``order`` with some deliveries' records lost, each such message delivered again at a later place."""
    deliveries = [(index, False) for index in order]
    for place in sorted(draw(st.sets(st.sampled_from(range(len(order))), max_size=3)) if order else [], reverse=True):
        deliveries[place] = (order[place], True)
        again = draw(st.integers(min_value=place + 1, max_value=len(deliveries)))
        deliveries.insert(again, (order[place], False))
    return deliveries


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


@settings(max_examples=300, deadline=None)
@given(histories(), st.data())
def test_a_message_whose_states_went_out_but_whose_record_was_lost_leaves_planner_equal_to_the_calendar(
    history: tuple[list[Message], Calendar, list[int]], data: st.DataObject,
) -> None:
    """A transformer replica killed between its confirms and its record step (or a record step that failed): its
    states reached the publisher, nothing of them is stored, and the message comes again after newer ones. Before
    decision 95 such a message, judged against newer records, was ignored, and what it had sent stayed in Planner:
    a create whose delete was decided from a store that never knew it (the fault suite's replicas test)."""
    messages, calendar, order = history
    deliveries = data.draw(with_lost_records(order))
    desired, planner = deliver_to_planner([(messages[index], lost) for index, lost in deliveries])
    assert desired == truth(calendar)
    assert planner == truth(calendar)


# --- a Microsoft Graph mailbox -------------------------------------------------------------------------------------

GRAPH_SINGLES = ["g0", "g1"]
GRAPH_SERIES = "graph-series"


@dataclass
class GraphCalendar:
    """A Graph mailbox: singles, and one series whose instances live and die one by one."""

    singles: dict[str, CalendarItem] = field(default_factory=dict)
    generation: int = 0                                           # a new series under the same UID gets new instance ids
    instances: dict[int, CalendarItem] = field(default_factory=dict)

    def view(self) -> list[CalendarItem]:
        """What a calendarView returns: singles and instances, each with its own id."""
        return [*self.singles.values(), *self.instances.values()]

    def instance_id(self, index: int) -> str:
        return f"gid-series-{self.generation}-{index}"


instance_state = st.one_of(st.none(), st.tuples(st.sampled_from(range(len(STARTS) + 1)), st.sampled_from(STATUSES[:3]), st.booleans()))
graph_mutation = st.one_of(
    st.tuples(st.just("single"), st.sampled_from(GRAPH_SINGLES), single_state),
    st.tuples(st.just("instance"), st.sampled_from(range(len(ORIGINALS))), instance_state),
    st.tuples(st.just("series"), st.one_of(st.none(), st.tuples(st.booleans(), st.lists(occurrence_state, min_size=4, max_size=4)))),
    st.tuples(st.just("reinvited"), st.lists(occurrence_state, min_size=4, max_size=4)),
    st.tuples(st.just("elsewhere"), st.integers(min_value=0, max_value=2)),
    st.tuples(st.just("snapshot"), st.integers(min_value=1, max_value=2)),
)


def build_graph_history(mutations: list[Any]) -> tuple[list[Message], GraphCalendar]:
    calendar, messages = GraphCalendar(), list[Message]()
    clock = iter(NOW - timedelta(hours=2) + timedelta(seconds=n) for n in range(10_000))

    def upsert(number: int, at: datetime, item: CalendarItem) -> None:
        messages.append(CalendarChange(
            correlation_id=f"m{number}", source="graph", mailbox=MAILBOX, observed_at=at, change="upsert", item_id=item.item_id, item=item,
        ))

    def removal(number: int, at: datetime, item_id: str) -> None:
        messages.append(CalendarChange(correlation_id=f"m{number}", source="graph", mailbox=MAILBOX, observed_at=at, change="delete", item_id=item_id))

    def instance(index: int, moved: int, status: str, cancelled: bool) -> CalendarItem:
        start = ORIGINALS[index] if moved == len(STARTS) else STARTS[moved]
        return CalendarItem(
            item_id=calendar.instance_id(index), uid=GRAPH_SERIES, item_type="occurrence" if start == ORIGINALS[index] else "exception",
            start=start, end=start + timedelta(hours=1), original_start=ORIGINALS[index], free_busy=status, cancelled=cancelled,
        )

    for number, (kind, *args) in enumerate(mutations):
        at = next(clock)                        # one delta round: every message of this mutation shares it
        if kind == "single":
            uid, state = args
            if state is None:
                calendar.singles.pop(uid, None)
                removal(number, at, f"gid-{uid}")
                continue
            start_index, minutes, status, cancelled = state
            start = STARTS[start_index]
            calendar.singles[uid] = CalendarItem(item_id=f"gid-{uid}", uid=uid, start=start, end=start + timedelta(minutes=minutes), free_busy=status, cancelled=cancelled)
            upsert(number, at, calendar.singles[uid])
        elif kind == "instance":
            index, state = args
            if state is None:
                calendar.instances.pop(index, None)
                removal(number, at, calendar.instance_id(index))
                continue
            calendar.instances[index] = instance(index, *state)
            upsert(number, at, calendar.instances[index])
        elif kind == "series":
            (state,) = args
            if state is None:                   # one removal per instance, seen or not; a new series gets new ids
                for index in range(len(ORIGINALS)):
                    removal(number, at, calendar.instance_id(index))
                calendar.instances, calendar.generation = {}, calendar.generation + 1
                continue
            cancelled, occurrence_states = state
            for index, occurrence in enumerate(occurrence_states):
                if occurrence is None:
                    calendar.instances.pop(index, None)
                    removal(number, at, calendar.instance_id(index))
                else:
                    calendar.instances[index] = instance(index, *occurrence, cancelled)
                    upsert(number, at, calendar.instances[index])
        elif kind == "reinvited":               # deleted and invited again under the same UID, seen by one round
            (occurrence_states,) = args
            for index in range(len(ORIGINALS)):
                removal(number, at, calendar.instance_id(index))
            calendar.instances, calendar.generation = {}, calendar.generation + 1
            for index, occurrence in enumerate(occurrence_states):
                if occurrence is not None:
                    calendar.instances[index] = instance(index, *occurrence, False)
                    upsert(number, at, calendar.instances[index])
        elif kind == "elsewhere":               # an instance we never saw (it changed outside the window)
            (n,) = args
            removal(number, at, f"gid-elsewhere-{n}")
        else:
            (parts,) = args
            items, snapshot_id = calendar.view(), f"snap-{number}"
            chunks = [items[i::parts] for i in range(parts)]
            messages += [
                CalendarSnapshot(
                    correlation_id=f"m{number}", source="graph", snapshot_id=snapshot_id, mailbox=MAILBOX, observed_at=at, window=WINDOW,
                    part=p, final=p == parts, total_parts=parts if p == parts else None, items=chunk,
                )
                for p, chunk in enumerate(chunks, start=1)
            ]
    return messages, calendar


def graph_truth(calendar: GraphCalendar) -> dict[str, Interval]:
    held = {}
    for item in calendar.view():
        interval = busy_interval(item, POLICY)
        if interval is not None:
            key = item.uid if item.original_start is None else f"{item.uid}${item.original_start.astimezone(CPH):%Y%m%d-%H%M%S}"
            held[key or ""] = interval
    return held


@st.composite
def graph_histories(draw: st.DrawFn) -> tuple[list[Message], GraphCalendar, list[int]]:
    messages, calendar = build_graph_history(draw(st.lists(graph_mutation, min_size=1, max_size=14)))
    extra = draw(st.lists(st.sampled_from(range(len(messages))), max_size=len(messages)))
    order = draw(st.permutations([*range(len(messages)), *extra]))
    return messages, calendar, order


@settings(max_examples=300, deadline=None)
@given(graph_histories())
def test_graph_streams_give_the_same_desired_states_in_any_order_with_any_duplicates(history: tuple[list[Message], GraphCalendar, list[int]]) -> None:
    messages, calendar, order = history
    in_order = deliver(messages)
    assert in_order == graph_truth(calendar)
    assert deliver([messages[index] for index in order]) == in_order


@settings(max_examples=300, deadline=None)
@given(graph_histories(), st.data())
def test_graph_streams_with_lost_records_leave_planner_equal_to_the_calendar(history: tuple[list[Message], GraphCalendar, list[int]], data: st.DataObject) -> None:
    """As ``test_a_message_whose_states_went_out_but_whose_record_was_lost_leaves_planner_equal_to_the_calendar``,
    for a Graph mailbox."""
    messages, calendar, order = history
    deliveries = data.draw(with_lost_records(order))
    desired, planner = deliver_to_planner([(messages[index], lost) for index, lost in deliveries])
    assert desired == graph_truth(calendar)
    assert planner == graph_truth(calendar)


# --- reading only what a batch of changes needs (decision 97) ----------------------------------------------------


def decide_in_batches(messages: list[Message], sizes: list[int], partial: bool) -> list[Decision]:
    """Every message's decision, batch by batch as the worker decides them: one read of what the batch needs, then
    each message against that read with the batch's earlier decisions on top (``partial``: ``reads_for(batch)``'s
    rows only, else every row)."""
    known: dict[str, DesiredRecord] = {}
    recorded: dict[str, tuple[set[int], int | None]] = {}
    decisions = []
    cuts = [sum(sizes[: n + 1]) for n in range(len(sizes))]   # batches of these sizes, the rest one batch
    bounds = sorted({0, len(messages), *(cut for cut in cuts if 0 < cut < len(messages))})
    for start, end in zip(bounds, bounds[1:]):
        batch = messages[start:end]
        overlay = reads_for(batch, POLICY).select(known) if partial else dict(known)
        for message in batch:
            if isinstance(message, CalendarChange):
                decision = derive_change(message, overlay, POLICY, NOW)
            else:
                parts, total = recorded.get(message.snapshot_id, (set(), None))
                decision = finish_snapshot_part(message, derive_snapshot_part(message, overlay, POLICY, NOW), overlay, parts, total)
                recorded[message.snapshot_id] = (parts | {message.part}, total if total is not None else message.total_parts)
            decisions.append(decision)
            for k in decision.remember:
                for target in (overlay, known):
                    if k.origin_id not in target or target[k.origin_id].version <= k.version:
                        target[k.origin_id] = k
    return decisions


@settings(max_examples=300, deadline=None)
@given(histories(), st.lists(st.integers(min_value=1, max_value=3), max_size=40))
def test_a_batch_of_changes_decides_the_same_on_only_the_rows_it_needs(history: tuple[list[Message], Calendar, list[int]], sizes: list[int]) -> None:
    """The transformer reads, for a batch without snapshot parts, only the rows ``reads_for`` names: every decision
    (states, records, rejections) must be what it is with every row of the mailbox read."""
    messages, _calendar, order = history
    delivered = [messages[index] for index in order]
    assert decide_in_batches(delivered, sizes, partial=True) == decide_in_batches(delivered, sizes, partial=False)


@settings(max_examples=300, deadline=None)
@given(graph_histories(), st.lists(st.integers(min_value=1, max_value=3), max_size=40))
def test_a_batch_of_graph_changes_decides_the_same_on_only_the_rows_it_needs(
    history: tuple[list[Message], GraphCalendar, list[int]], sizes: list[int],
) -> None:
    messages, _calendar, order = history
    delivered = [messages[index] for index in order]
    assert decide_in_batches(delivered, sizes, partial=True) == decide_in_batches(delivered, sizes, partial=False)


# Found by leaving one part out of ``reads_for`` at a time and searching: each fails without that part.
NEEDS = [
    pytest.param([("single", "s0", None), ("series", (False, [None, None, None, (0, "Busy")])), ("snapshot", 1), ("series", None)], [0, 2, 1, 3],
                 id="a series delete finds the occurrences a snapshot saw by the UID of the master's record"),
    pytest.param([("series", None), ("series", (False, [None, None, None, (0, "Busy")])), ("snapshot", 1), ("series", (False, [None] * 4))], [0, 2, 3, 1],
                 id="a master upsert finds its series' keys by its UID"),
    pytest.param([("series", (False, [None, None, None, (0, "Busy")])), ("series", None), ("snapshot", 1)], [2, 0, 1],
                 id="a change older than a complete snapshot finds the snapshot marker"),
]


@pytest.mark.parametrize(("mutations", "order"), NEEDS)
def test_one_change_at_a_time_decides_the_same_on_only_the_rows_it_needs(mutations: list[Any], order: list[int]) -> None:
    messages, _calendar = build_history(mutations)
    delivered = [messages[index] for index in order]
    assert decide_in_batches(delivered, [1] * len(delivered), partial=True) == decide_in_batches(delivered, [1] * len(delivered), partial=False)
