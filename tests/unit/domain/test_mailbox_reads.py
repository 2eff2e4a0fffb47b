"""The producers' pure rules: the mailbox read schedule and its backoff, a sync read as messages, snapshot parts, the nightly time."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shared.domain.contracts import CalendarItem, Interval
from shared.domain.mailbox_reads import (
    SyncChange,
    changes_from_sync,
    snapshot_parts,
)
from shared.domain.read_schedule import ReadTask, Schedule, Timing, backoff
from shared.domain.source_faults import SourceFault
from shared.domain.timing import next_run

T = datetime(2026, 12, 1, 8, tzinfo=timezone.utc)


def ids() -> "itertools.count[int]":
    return itertools.count(1)


def new_id_from(counter: "itertools.count[int]") -> "Callable[[], str]":
    return lambda: f"id-{next(counter)}"
WINDOW = Interval(start=T, end=T + timedelta(days=90))
TIMING = Timing(timedelta(minutes=15), timedelta(seconds=30), timedelta(hours=1))


def item(n: int, kind: str = "single", uid: str | None = None, start: datetime = T) -> CalendarItem:
    return CalendarItem(item_id=f"id{n}", uid=uid or f"uid{n}", item_type=kind, start=start, end=start + timedelta(hours=1), free_busy="Busy")  # type: ignore[arg-type]


def test_a_new_mailbox_is_read_at_once_then_on_its_safety_interval() -> None:
    schedule = Schedule(TIMING)
    schedule.set_members({"a@k.dk"})
    assert schedule.due(T) == ["a@k.dk"]
    schedule.started("a@k.dk")
    assert schedule.due(T) == []  # running
    schedule.succeeded("a@k.dk", T)
    assert schedule.due(T + timedelta(seconds=29)) == []
    assert schedule.due(T + timedelta(seconds=30)) == ["a@k.dk"]  # not subscribed yet: fast poll
    schedule.set_subscribed("a@k.dk", True)
    schedule.started("a@k.dk")
    schedule.succeeded("a@k.dk", T)
    assert schedule.due(T + timedelta(minutes=14)) == []
    assert schedule.due(T + timedelta(minutes=15)) == ["a@k.dk"]


def test_a_notification_during_a_read_makes_one_more_read() -> None:
    schedule = Schedule(TIMING)
    schedule.set_members({"a@k.dk"})
    schedule.started("a@k.dk")
    schedule.mark_dirty("a@k.dk")
    schedule.mark_dirty("a@k.dk")  # a burst coalesces
    schedule.succeeded("a@k.dk", T)
    assert schedule.due(T) == ["a@k.dk"]


def test_a_failing_mailbox_backs_off_alone() -> None:
    schedule = Schedule(TIMING)
    schedule.set_members({"a@k.dk", "b@k.dk"})
    for address in ("a@k.dk", "b@k.dk"):
        schedule.started(address)
    wait = schedule.failed("a@k.dk", T, SourceFault("mailbox_unavailable", "ErrorImpersonateUserDenied"))
    schedule.succeeded("b@k.dk", T)
    schedule.mark_dirty("b@k.dk")
    assert wait == timedelta(minutes=2)
    assert schedule.due(T + timedelta(seconds=1)) == ["b@k.dk"]
    assert schedule.mailboxes["a@k.dk"].status == "failing"
    assert "a@k.dk" in schedule.due(T + wait)


@pytest.mark.parametrize(
    ("fault", "failures", "expected"),
    [
        (SourceFault("throttled", "ErrorServerBusy", back_off=7.5), 1, timedelta(seconds=7.5)),
        (SourceFault("throttled", "ErrorServerBusy"), 1, timedelta(seconds=4)),
        (SourceFault("transient", "x"), 1, timedelta(seconds=2)),
        (SourceFault("transient", "x"), 3, timedelta(seconds=8)),
        (SourceFault("mailbox_unavailable", "x"), 10, timedelta(hours=1)),
        (SourceFault("invalid_sync_state", "x"), 1, timedelta(seconds=2)),  # the full re-read failed too: back off
        (SourceFault("invalid_sync_state", "x"), 3, timedelta(seconds=8)),
    ],
)
def test_backoff_follows_the_fault(fault: SourceFault, failures: int, expected: timedelta) -> None:
    assert backoff(fault, failures, TIMING) == expected


def test_removed_mailboxes_leave_the_schedule() -> None:
    schedule = Schedule(TIMING)
    schedule.set_members({"a@k.dk", "b@k.dk"})
    added, removed = schedule.set_members({"b@k.dk", "c@k.dk"})
    assert (added, removed) == ({"c@k.dk"}, {"a@k.dk"})
    assert sorted(schedule.mailboxes) == ["b@k.dk", "c@k.dk"]


def test_a_sync_becomes_changes_and_a_master_carries_its_occurrences() -> None:
    master = item(1, "master", uid="series")
    occurrences = {"series": [item(2, "occurrence", uid="series"), item(3, "exception", uid="series")]}
    changes = [SyncChange("upsert", "id0", item(0)), SyncChange("upsert", "id1", master), SyncChange("delete", "id9", None)]
    messages = changes_from_sync("a@k.dk", changes, occurrences, WINDOW, T, new_id_from(ids()))
    assert [m.change for m in messages] == ["upsert", "upsert", "delete"]
    assert messages[0].occurrences is None and messages[0].window is None
    assert [o.item_id for o in messages[1].occurrences or []] == ["id2", "id3"] and messages[1].window == WINDOW
    assert messages[2].item is None and messages[2].item_id == "id9"
    assert [m.correlation_id for m in messages] == ["id-1", "id-2", "id-3"]  # ids come from the caller


def test_snapshot_parts_are_numbered_and_only_the_last_is_final() -> None:
    parts = snapshot_parts("a@k.dk", [item(n) for n in range(7)], WINDOW, T, part_size=3, snapshot_id="s1")
    assert [(p.part, p.final, p.total_parts, len(p.items)) for p in parts] == [(1, False, None, 3), (2, False, None, 3), (3, True, 3, 1)]
    empty = snapshot_parts("a@k.dk", [], WINDOW, T, part_size=3, snapshot_id="s2")
    assert len(empty) == 1 and empty[0].final and empty[0].items == []


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (datetime(2026, 12, 1, 0, 0, tzinfo=timezone.utc), datetime(2026, 12, 1, 1, 0, tzinfo=timezone.utc)),  # 02:00 CET
        (datetime(2026, 12, 1, 1, 0, tzinfo=timezone.utc), datetime(2026, 12, 2, 1, 0, tzinfo=timezone.utc)),
        (datetime(2026, 7, 1, 12, 0, tzinfo=timezone.utc), datetime(2026, 7, 2, 0, 0, tzinfo=timezone.utc)),  # 02:00 CEST
        (datetime(2027, 3, 27, 12, 0, tzinfo=timezone.utc), datetime(2027, 3, 28, 1, 0, tzinfo=timezone.utc)),  # spring: 02:00 does not exist -> 03:00 CEST
        (datetime(2026, 10, 24, 12, 0, tzinfo=timezone.utc), datetime(2026, 10, 25, 0, 0, tzinfo=timezone.utc)),  # autumn: first 02:00
    ],
)
def test_the_nightly_run_is_at_local_time_across_dst(now: datetime, expected: datetime) -> None:
    assert next_run(now, "02:00", "Europe/Copenhagen") == expected


def _walk_all(schedule: Schedule, now: datetime) -> list[str]:
    """What ``due`` answered before decision 106: every mailbox looked at, every time."""
    ready = []
    for address, state in sorted(schedule.mailboxes.items()):
        if state.running or (state.not_before is not None and now < state.not_before):
            continue
        if state.dirty or state.next_safety is None or now >= state.next_safety:
            ready.append(address)
    return ready


_ADDRESSES = ["a@k.dk", "b@k.dk", "c@k.dk", "d@k.dk"]
_FAULTS = [SourceFault("transient", "x"), SourceFault("throttled", "x", back_off=7), SourceFault("mailbox_unavailable", "x")]
_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("tick"), st.integers(0, 3_000)),
        st.tuples(st.just("dirty"), st.sampled_from(_ADDRESSES)),
        st.tuples(st.just("due"), st.just("")),
        st.tuples(st.just("take"), st.integers(0, 3)),
        st.tuples(st.just("succeeded"), st.sampled_from(_ADDRESSES), st.sampled_from([None, 10, 600])),
        st.tuples(st.just("failed"), st.sampled_from(_ADDRESSES), st.sampled_from(_FAULTS)),
        st.tuples(st.just("subscribed"), st.sampled_from(_ADDRESSES), st.booleans()),
        st.tuples(st.just("members"), st.sets(st.sampled_from(_ADDRESSES))),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(_STEPS)
@example([("due", ""), ("succeeded", "a@k.dk", None), ("tick", 30), ("take", 0)])   # due by its time, no worker free: still counted as waiting
def test_the_queues_hold_exactly_the_mailboxes_a_walk_over_all_finds_due(steps: list[tuple[Any, ...]]) -> None:
    """Decisions 106 and 107: whatever happens between two calls, the mailboxes waiting in the queues (``due``, or what
    ``take`` hands out plus what ``waiting`` counts) are the ones a walk over every mailbox finds due, though the
    schedule walks only when a safety or backoff time has come."""
    schedule = Schedule(TIMING)
    schedule.set_members(set(_ADDRESSES))
    now = T
    for step in steps:
        kind = step[0]
        if kind == "tick":
            now += timedelta(seconds=step[1])
        elif kind == "dirty":
            schedule.mark_dirty(step[1], urgent=step[1] < "c")
        elif kind == "take":   # decision 107: only as many as there are free workers; the rest wait and stay due
            expected = _walk_all(schedule, now)
            taken = [address for task in schedule.take(now, step[1], urgent_cap=1) for address in task.mailboxes]
            assert set(taken) <= set(expected) and len(taken) == min(step[1], len(expected))
            assert schedule.waiting()[0] == len(expected) - len(taken)   # every other due mailbox waits in a queue
        elif kind == "due":
            expected = _walk_all(schedule, now)
            assert schedule.due(now) == expected
            for address in expected:
                schedule.started(address)
        elif kind == "succeeded" and step[1] in schedule.mailboxes and schedule.mailboxes[step[1]].running:
            schedule.succeeded(step[1], now, None if step[2] is None else timedelta(seconds=step[2]))
        elif kind == "failed" and step[1] in schedule.mailboxes and schedule.mailboxes[step[1]].running:
            schedule.failed(step[1], now, step[2])
        elif kind == "subscribed":
            schedule.set_subscribed(step[1], step[2])
        elif kind == "members":
            schedule.set_members(step[1])
    assert schedule.due(now) == _walk_all(schedule, now)


def test_a_shorter_next_read_than_the_safety_interval_is_kept_between_walks() -> None:
    """A Graph mailbox is polled every delta interval, sooner than the safety interval of the others (decision 106)."""
    schedule = Schedule(TIMING)
    schedule.set_members({"a@k.dk", "g@k.dk"})
    schedule.set_subscribed("a@k.dk", True)
    schedule.set_subscribed("g@k.dk", True)
    assert schedule.due(T) == ["a@k.dk", "g@k.dk"]
    schedule.started("a@k.dk")
    schedule.started("g@k.dk")
    schedule.succeeded("a@k.dk", T)
    assert schedule.due(T + timedelta(seconds=1)) == []   # a walk: the next comes at a's safety time, 15 minutes on
    schedule.succeeded("g@k.dk", T + timedelta(seconds=2), next_in=timedelta(seconds=60))
    assert schedule.due(T + timedelta(seconds=61)) == []
    assert schedule.due(T + timedelta(seconds=62)) == ["g@k.dk"]


# --- decision 107: reads handed out as workers come free, notified mailboxes first ----------------------------------
def _catching_up(addresses: list[str], urgent: list[str]) -> Schedule:
    """Every mailbox read once and subscribed, then all waiting for a catch-up read (a stream reopened), and the
    ``urgent`` ones named by a notification a second later."""
    schedule = Schedule(TIMING)
    schedule.set_members(set(addresses))
    for address in addresses:
        schedule.set_subscribed(address, True)
        schedule.started(address)
        schedule.succeeded(address, T)
    for address in addresses:
        schedule.mark_dirty(address)
    for address in urgent:
        schedule.mark_dirty(address, urgent=True)
    return schedule


def test_a_notified_mailbox_is_read_before_the_catch_up_yet_the_catch_up_keeps_a_worker() -> None:
    addresses = [f"m{n:02d}@k.dk" for n in range(20)]
    schedule = _catching_up(addresses, ["m19@k.dk", "m18@k.dk"])
    now = T + timedelta(seconds=3)
    tasks = schedule.take(now, free=4, urgent_cap=3)
    assert tasks == [ReadTask(("m19@k.dk",), True), ReadTask(("m18@k.dk",), True), ReadTask(("m00@k.dk",), False), ReadTask(("m01@k.dk",), False)]
    schedule.mark_dirty("m10@k.dk", urgent=True)
    schedule.mark_dirty("m11@k.dk", urgent=True)
    schedule.succeeded("m00@k.dk", now)   # one catch-up read ended: urgent reads take its worker, up to the cap
    assert schedule.take(now, free=1, urgent_running=2, urgent_cap=3) == [ReadTask(("m10@k.dk",), True)]
    schedule.succeeded("m01@k.dk", now)   # three urgent reads run: the next free worker goes to the catch-up
    assert schedule.take(now, free=1, urgent_running=3, urgent_cap=3) == [ReadTask(("m02@k.dk",), False)]
    assert schedule.waiting() == (20 - 6, 1)   # six taken; of the rest only m11 was named by a notification


def test_a_burst_of_notifications_for_a_waiting_mailbox_makes_one_read() -> None:
    schedule = _catching_up(["a@k.dk", "b@k.dk"], [])
    for _ in range(5):
        schedule.mark_dirty("b@k.dk", urgent=True)
    assert [task.mailboxes for task in schedule.take(T + timedelta(seconds=3), free=8)] == [("b@k.dk",), ("a@k.dk",)]
    assert schedule.take(T + timedelta(seconds=3), free=8) == []


def test_a_safety_read_with_no_worker_free_is_still_given_one_later() -> None:
    """Due by its time at a walk and not taken (no worker free): the calls before the next walk still find it."""
    schedule = Schedule(TIMING)
    schedule.set_members({"a@k.dk", "b@k.dk"})
    for address in ("a@k.dk", "b@k.dk"):
        schedule.set_subscribed(address, True)
        schedule.started(address)
    schedule.succeeded("a@k.dk", T)
    schedule.succeeded("b@k.dk", T + timedelta(minutes=1))
    later = T + timedelta(minutes=15, seconds=1)
    assert schedule.take(later, free=0) == []
    assert schedule.due(later) == ["a@k.dk"]       # a walk: b's safety time, a minute on, is the next wake-up
    assert schedule.take(later + timedelta(seconds=1), free=1) == [ReadTask(("a@k.dk",), False)]


def test_a_failed_urgent_read_stays_urgent_after_its_backoff() -> None:
    schedule = _catching_up(["a@k.dk", "b@k.dk"], ["b@k.dk"])
    assert schedule.take(T + timedelta(seconds=3), free=1, urgent_cap=1) == [ReadTask(("b@k.dk",), True)]
    wait = schedule.failed("b@k.dk", T + timedelta(seconds=3), SourceFault("transient", "x"))
    assert schedule.take(T + timedelta(seconds=3) + wait, free=2, urgent_cap=1)[0] == ReadTask(("b@k.dk",), True)


def test_graph_mailboxes_share_a_task_up_to_the_batch_size_and_a_failing_one_is_read_alone() -> None:
    graph = [f"g{n}@k.dk" for n in range(5)]
    schedule = _catching_up([*graph, "e@k.dk"], [])
    schedule.mailboxes["g1@k.dk"].failures = 1
    tasks = schedule.take(T + timedelta(seconds=3), free=8, batchable=set(graph), batch_size=2)
    assert [task.mailboxes for task in tasks] == [("g0@k.dk", "g2@k.dk"), ("g1@k.dk",), ("g3@k.dk", "g4@k.dk"), ("e@k.dk",)]
