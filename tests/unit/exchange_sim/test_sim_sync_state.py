"""Sync states: opaque, bound to mailbox and folder, and the change list they imply."""

from datetime import UTC, datetime

import pytest

from simulators.exchange import sync_state
from simulators.exchange.model import Item


def item(key: int, version: int) -> Item:
    t = datetime(2026, 11, 2, 8, tzinfo=UTC)
    return Item(key=key, uid=f"u{key}", start=t, end=t, tz="UTC", version=version)


def test_a_state_round_trips_and_is_refused_for_another_mailbox_or_garbage():
    state = sync_state.encode("alice@x", "calendar", {1: 5, 2: 7})
    assert sync_state.decode(state, "alice@x", "calendar") == {1: 5, 2: 7}
    with pytest.raises(sync_state.InvalidSyncState):
        sync_state.decode(state, "bob@x", "calendar")
    with pytest.raises(sync_state.InvalidSyncState):
        sync_state.decode("not-a-state", "alice@x", "calendar")


def test_changes_are_creates_then_nothing_then_update_and_delete():
    items = [item(1, 1), item(2, 2)]
    first, known, last = sync_state.changes({}, items, 100)
    assert [(c.kind, c.key) for c in first] == [("Create", 1), ("Create", 2)] and last
    assert sync_state.changes(known, items, 100)[0] == []
    changed, _, _ = sync_state.changes(known, [item(1, 3)], 100)
    assert sorted((c.kind, c.key) for c in changed) == [("Delete", 2), ("Update", 1)]


def test_paging_hands_out_each_change_once_and_says_when_it_is_done():
    items = [item(k, k) for k in range(1, 6)]
    known: dict[int, int] = {}
    seen: list[int] = []
    pages = 0
    while True:
        page, known, last = sync_state.changes(known, items, 2)
        seen += [c.key for c in page]
        pages += 1
        if last:
            break
    assert seen == [1, 2, 3, 4, 5] and pages == 3
