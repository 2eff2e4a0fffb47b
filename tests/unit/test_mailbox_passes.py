"""The producers' passes over one mailbox (shared/mailbox_passes.py) against a reader and a position store in memory:
the order of publish and record that makes a failed pass repeat instead of losing anything."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Callable

import pytest

from shared.domain.contracts import CalendarChange, CalendarItem, CalendarSnapshot, Interval
from shared.domain.mailbox_reads import Backend, SyncChange, SyncPosition
from shared.mailbox_passes import resync_mailbox, snapshot_mailbox, sync_mailbox

T = datetime(2026, 12, 1, 8, tzinfo=timezone.utc)
WINDOW = Interval(start=T, end=T + timedelta(days=90))


def new_ids() -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"id-{next(counter)}"


def item(n: int) -> CalendarItem:
    return CalendarItem(item_id=f"id{n}", uid=f"uid{n}", item_type="single", start=T, end=T + timedelta(hours=1), free_busy="Busy")


class FakeExchange:
    def __init__(self, changes: list[SyncChange], view: list[CalendarItem], fail_view: bool = False) -> None:
        self.changes, self.items, self.fail_view = changes, view, fail_view
        self.views = 0
        self.states: list[str | None] = []

    def sync(self, mailbox: str, sync_state: str | None, page_size: int = 200) -> tuple[list[SyncChange], str]:
        self.states.append(sync_state)
        return self.changes, "state-2"

    def view(self, mailbox: str, window: Interval) -> list[CalendarItem]:
        self.views += 1
        if self.fail_view:
            raise ConnectionError("cut")
        return self.items

    def occurrences(self, mailbox: str, window: Interval) -> list[CalendarItem]:
        return self.view(mailbox, window)   # the view's instances, with its singles (``series_occurrences`` picks)


class FakeStore:
    def __init__(self, state: str | None, backend: Backend = "ews") -> None:
        self.state, self.backend = state, backend
        self.full: list[bool] = []

    def sync_position(self, mailbox: str) -> SyncPosition | None:
        return SyncPosition(self.state, None, None, self.backend)

    def save_sync_position(self, mailbox: str, sync_state: str, read_at: datetime, full: bool, backend: Backend = "ews") -> None:
        self.state, self.backend = sync_state, backend
        self.full.append(full)


def test_the_sync_state_is_saved_only_after_every_change_is_published() -> None:
    store = FakeStore("state-1")
    exchange = FakeExchange([SyncChange("upsert", "id0", item(0))], [])
    published: list[object] = []

    def publish(messages: Sequence[object]) -> None:
        assert store.state == "state-1"  # not yet advanced
        published.extend(messages)

    result = sync_mailbox("a@k.dk", exchange, store, publish, WINDOW, T, new_ids())
    assert exchange.states == ["state-1"] and len(published) == 1 and store.state == "state-2"
    assert exchange.views == 0 and not result.full_resync


def test_a_failed_publish_leaves_the_sync_state_so_the_read_repeats() -> None:
    store = FakeStore("state-1")

    def publish(messages: Sequence[object]) -> None:
        raise ConnectionError("broker gone")

    with pytest.raises(ConnectionError):
        sync_mailbox("a@k.dk", FakeExchange([SyncChange("upsert", "id0", item(0))], []), store, publish, WINDOW, T, new_ids())
    assert store.state == "state-1"


def test_a_snapshot_whose_read_fails_publishes_nothing() -> None:
    published: list[object] = []
    with pytest.raises(ConnectionError):
        snapshot_mailbox("a@k.dk", FakeExchange([], [], fail_view=True), published.extend, WINDOW, T, 100, "s1")
    assert published == []


def test_a_state_written_by_the_other_reader_is_not_continued_the_mailbox_is_read_in_full() -> None:
    store = FakeStore("ews-sync-state", backend="ews")  # the mailbox moved to Exchange Online
    reader = FakeExchange([SyncChange("upsert", "id0", item(0))], [])
    result = sync_mailbox("a@k.dk", reader, store, lambda messages: None, WINDOW, T, new_ids(), backend="graph")
    assert reader.states == [None] and result.full_resync
    assert (store.state, store.backend, store.full) == ("state-2", "graph", [True])


class OrderedExchange(FakeExchange):
    """Records the order of its calls: an item deleted between the read from nothing and the view is in neither."""

    def __init__(self, changes: list[SyncChange], view: list[CalendarItem], fail_view: bool = False) -> None:
        super().__init__(changes, view, fail_view)
        self.calls: list[str] = []

    def sync(self, mailbox: str, sync_state: str | None, page_size: int = 200) -> tuple[list[SyncChange], str]:
        self.calls.append("sync")
        return super().sync(mailbox, sync_state, page_size)

    def view(self, mailbox: str, window: Interval) -> list[CalendarItem]:
        self.calls.append("view")
        return super().view(mailbox, window)


def test_a_resync_reads_from_nothing_then_the_view_publishes_both_together_and_saves_the_state_last() -> None:
    store = FakeStore("refused-state")
    exchange = OrderedExchange([SyncChange("upsert", "id0", item(0)), SyncChange("upsert", "id1", item(1))], [item(0), item(1), item(2)])
    batches: list[list[object]] = []

    def publish(messages: Sequence[object]) -> None:
        assert store.state == "refused-state"  # nothing saved before every message is confirmed
        batches.append(list(messages))

    result, items = resync_mailbox("a@k.dk", exchange, store, publish, WINDOW, T, new_ids(), part_size=2)
    assert exchange.calls == ["sync", "view"] and exchange.states == [None]
    assert len(batches) == 1
    changes = [m for m in batches[0] if isinstance(m, CalendarChange)]
    parts = [m for m in batches[0] if isinstance(m, CalendarSnapshot)]
    assert [c.item_id for c in changes] == ["id0", "id1"] and batches[0][: len(changes)] == changes   # changes first
    assert [len(p.items) for p in parts] == [2, 1] and parts[-1].final and parts[-1].total_parts == 2
    assert {p.observed_at for p in parts} == {c.observed_at for c in changes} == {T}
    assert (result.published, result.full_resync, items) == (2, True, 3)
    assert store.state == "state-2" and store.full == [True]


def test_a_resync_whose_view_fails_publishes_nothing_and_saves_nothing() -> None:
    store = FakeStore("refused-state")
    exchange = OrderedExchange([SyncChange("upsert", "id0", item(0))], [item(0)], fail_view=True)
    published: list[object] = []
    with pytest.raises(ConnectionError):
        resync_mailbox("a@k.dk", exchange, store, published.extend, WINDOW, T, new_ids(), part_size=10)
    assert published == [] and store.state == "refused-state" and store.full == []
