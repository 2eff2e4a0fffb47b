"""The instances a calendar view lists: singles and the expanded occurrences of series, never a series master.

Only the Calendar folder counts (an item moved to Deleted Items is gone from the view), with the EWS simulator's
overlap rule and recurrence expansion, so both protocols list exactly the same instances.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from simulators.exchange.model import CALENDAR, Item, Occurrence
from simulators.exchange.recurrence import expand, find_occurrence, overlaps
from simulators.exchange.store import Mailbox, NotFound

from .ids import EventRef


@dataclass(frozen=True)
class Instance:
    """A single (``occ`` None) or one occurrence/exception of a series."""

    item: Item
    occ: Occurrence | None

    @property
    def start(self) -> datetime:
        return self.occ.start if self.occ is not None else self.item.start

    @property
    def end(self) -> datetime:
        return self.occ.end if self.occ is not None else self.item.end


def instances(box: Mailbox, start: datetime, end: datetime) -> list[Instance]:
    """Every instance overlapping [start, end), sorted by start (then item key)."""
    found: list[tuple[datetime, int, Instance]] = []
    for item in box.items.values():
        if item.folder != CALENDAR:
            continue
        if item.recurrence is None:
            if overlaps(item.start, item.end, start, end):
                found.append((item.start, item.key, Instance(item, None)))
        else:
            found.extend((occ.start, item.key, Instance(item, occ)) for occ in expand(item, start, end))
    found.sort(key=lambda row: (row[0], row[1]))
    return [row[2] for row in found]


def resolve(box: Mailbox, ref: EventRef) -> tuple[Item, Occurrence | None]:
    """The item (and occurrence) an event id names; NotFound for a deleted occurrence or another folder's item."""
    item = box.items.get(ref.key)
    if item is None or item.folder != CALENDAR or ref.mailbox != box.address:
        raise NotFound("event not found")
    if ref.original_start is None:
        return item, None
    if ref.original_start in item.deleted:
        raise NotFound("occurrence deleted")
    occ = find_occurrence(item, original_start=ref.original_start)
    if occ is None:
        raise NotFound("no such occurrence")
    return item, occ
