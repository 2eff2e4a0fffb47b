"""What one read of a mailbox becomes on the wire: calendar changes and snapshot parts. Pure.

The producers gather (a sync read or a calendar view, through an adapter), call these to decide the messages,
and publish them. Ids come from the caller (``new_id``, ``snapshot_id``), never from a random source here, so
the same read always gives the same messages (decisions 11 and 12 in docs/decisions.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Literal

from shared.domain.contracts import (
    CalendarChange,
    CalendarItem,
    CalendarSnapshot,
    Interval,
    Source,
)

Backend = Literal["ews", "graph"]  # the readers a mailbox can be served by (decision 49 in docs/decisions.md)


@dataclass(frozen=True)
class SyncChange:
    """One entry of an incremental read: an item created or updated (with its fields), or deleted."""

    change: Literal["upsert", "delete"]
    item_id: str
    item: CalendarItem | None


@dataclass(frozen=True)
class SyncPosition:
    """Where the last incremental read of a mailbox ended, and when reads happened."""

    sync_state: str | None
    last_sync_at: datetime | None
    last_full_sync_at: datetime | None
    backend: Backend = "ews"  # the reader whose state ``sync_state`` is; another reader cannot continue from it


def changes_from_sync(
    mailbox: str,
    changes: list[SyncChange],
    occurrences: dict[str, list[CalendarItem]],
    window: Interval,
    observed_at: datetime,
    new_id: Callable[[], str],
    source: Source = "ews",
) -> list[CalendarChange]:
    """One CalendarChange per changed item; a series master carries its occurrences in the window."""
    messages = []
    for change in changes:
        correlation = new_id()
        if change.change == "delete" or change.item is None:
            messages.append(
                CalendarChange(correlation_id=correlation, source=source, mailbox=mailbox, observed_at=observed_at, change="delete", item_id=change.item_id)
            )
            continue
        item = change.item
        is_master = item.item_type == "master"
        messages.append(
            CalendarChange(
                correlation_id=correlation,
                source=source,
                mailbox=mailbox,
                observed_at=observed_at,
                change="upsert",
                item_id=change.item_id,
                item=item,
                occurrences=occurrences.get(item.uid or "", []) if is_master else None,
                window=window if is_master else None,
            )
        )
    return messages


def series_occurrences(view: list[CalendarItem]) -> dict[str, list[CalendarItem]]:
    """The occurrences and exceptions of a calendar view, by series UID (what a changed master carries)."""
    found: dict[str, list[CalendarItem]] = {}
    for item in view:
        if item.item_type in ("occurrence", "exception") and item.uid:
            found.setdefault(item.uid, []).append(item)
    return found


def snapshot_parts(
    mailbox: str, items: list[CalendarItem], window: Interval, observed_at: datetime, part_size: int, snapshot_id: str, source: Source = "ews"
) -> list[CalendarSnapshot]:
    """Split a complete view into parts; the last is final and says how many there are."""
    ordered = sorted(items, key=lambda i: (i.start or observed_at, i.item_id))
    chunks = [ordered[i : i + part_size] for i in range(0, len(ordered), part_size)] or [[]]
    total = len(chunks)
    return [
        CalendarSnapshot(
            correlation_id=f"{snapshot_id[:24]}-{n}",
            source=source,
            snapshot_id=snapshot_id,
            mailbox=mailbox,
            observed_at=observed_at,
            window=window,
            part=n,
            final=n == total,
            total_parts=total if n == total else None,
            items=chunk,
        )
        for n, chunk in enumerate(chunks, start=1)
    ]
