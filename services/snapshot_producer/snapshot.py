"""A snapshot of one mailbox: everything in the sync window, in numbered parts with a final marker.

The calendar view is read completely before the first part is published, so a read that fails half
way publishes nothing; a publish that fails half way never sends the final part. Either way the
snapshot never completes, and an incomplete snapshot never makes the transformer delete anything.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Callable, Protocol

from shared.contracts import CalendarItem, CalendarSnapshot, Interval


class ViewReads(Protocol):
    def view(self, mailbox: str, window: Interval) -> list[CalendarItem]: ...


def snapshot_parts(mailbox: str, items: list[CalendarItem], window: Interval, observed_at: datetime, part_size: int, snapshot_id: str | None = None) -> list[CalendarSnapshot]:
    """Pure: split a complete view into parts; the last is final and says how many there are."""
    snapshot_id = snapshot_id or uuid.uuid4().hex
    ordered = sorted(items, key=lambda i: (i.start or observed_at, i.item_id))
    chunks = [ordered[i : i + part_size] for i in range(0, len(ordered), part_size)] or [[]]
    total = len(chunks)
    return [
        CalendarSnapshot(
            correlation_id=f"{snapshot_id[:24]}-{n}",
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


def snapshot_mailbox(
    mailbox: str, exchange: ViewReads, publish: Callable[[CalendarSnapshot], None], window: Interval, observed_at: datetime, part_size: int
) -> int:
    """Read the whole window, then publish its parts; return the number of items."""
    items = exchange.view(mailbox, window)
    for part in snapshot_parts(mailbox, items, window, observed_at, part_size):
        publish(part)
    return len(items)
