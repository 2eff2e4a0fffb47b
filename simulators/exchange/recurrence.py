"""Expansion of recurring series into occurrences, in the item's own Windows zone (DST through zoneinfo)."""

from __future__ import annotations

import calendar
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

from .model import DAY_GROUPS, DAY_NAMES, Item, Occurrence, Recurrence
from .timezones import zone

# A series with no end is expanded at most this far (real Exchange also stops somewhere).
MAX_OCCURRENCES = 20_000


def _weekdays(names: tuple[str, ...]) -> tuple[int, ...]:
    days: set[int] = set()
    for name in names:
        if name in DAY_GROUPS:
            days.update(DAY_GROUPS[name])
        else:
            days.add(DAY_NAMES.index(name))
    return tuple(sorted(days))


def _add_months(year: int, month: int, months: int) -> tuple[int, int]:
    total = year * 12 + (month - 1) + months
    return total // 12, total % 12 + 1


def _nth_weekday(year: int, month: int, days: tuple[int, ...], week_index: str) -> date | None:
    matching = [
        date(year, month, d)
        for d in range(1, calendar.monthrange(year, month)[1] + 1)
        if date(year, month, d).weekday() in days
    ]
    if not matching:
        return None
    if week_index == "Last":
        return matching[-1]
    position = ("First", "Second", "Third", "Fourth").index(week_index)
    return matching[position] if position < len(matching) else None


def _clamped(year: int, month: int, day: int) -> date:
    return date(year, month, min(day, calendar.monthrange(year, month)[1]))


def _candidate_dates(rec: Recurrence) -> Iterator[date]:
    """Dates matching the pattern, ascending, from the range's start date on (no range end applied)."""
    start = rec.start_date
    interval = max(1, rec.interval)
    if rec.pattern == "daily":
        day = start
        while True:
            yield day
            day += timedelta(days=interval)
    elif rec.pattern == "weekly":
        days = _weekdays(rec.days_of_week) or (start.weekday(),)
        first_dow = DAY_NAMES.index(rec.first_day_of_week)
        week_start = start - timedelta(days=(start.weekday() - first_dow) % 7)
        while True:
            for offset in range(7):
                day = week_start + timedelta(days=offset)
                if day.weekday() in days and day >= start:
                    yield day
            week_start += timedelta(weeks=interval)
    elif rec.pattern in ("absolute_monthly", "relative_monthly", "absolute_yearly", "relative_yearly"):
        yearly = rec.pattern.endswith("yearly")
        step = 12 * interval if yearly else interval
        year, month = start.year, (rec.month or start.month) if yearly else start.month
        while True:
            if rec.pattern.startswith("absolute"):
                candidate: date | None = _clamped(year, month, rec.day_of_month or start.day)
            else:
                candidate = _nth_weekday(year, month, _weekdays(rec.days_of_week), rec.week_index or "First")
            if candidate is not None and candidate >= start:
                yield candidate
            year, month = _add_months(year, month, step)
    else:
        raise ValueError(f"unknown recurrence pattern {rec.pattern!r}")


def occurrence_starts(item: Item) -> Iterator[tuple[int, datetime]]:
    """(1-based index, original start in UTC) of every occurrence of a series, deleted ones included."""
    rec = item.recurrence
    if rec is None:
        return
    tz = zone(item.tz)
    local_time = item.start.astimezone(tz).time()
    for index, day in enumerate(_candidate_dates(rec), start=1):
        if rec.count is not None and index > rec.count:
            return
        if rec.end_date is not None and day > rec.end_date:
            return
        if index > MAX_OCCURRENCES:
            return
        yield index, datetime.combine(day, local_time, tzinfo=tz).astimezone(UTC)


def expand(item: Item, window_start: datetime | None = None, window_end: datetime | None = None) -> list[Occurrence]:
    """Occurrences of a series overlapping [window_start, window_end), modified ones moved, deleted ones left out.

    A moved occurrence is found by its actual times, not its original slot.
    """
    duration = item.duration
    found: list[Occurrence] = []
    # A moved occurrence can lie up to this far from its slot; scan that much beyond the window.
    slack = max((abs(o.start - original) for original, o in item.overrides.items()), default=timedelta(0))
    for index, original in occurrence_starts(item):
        if window_end is not None and original >= window_end + slack + duration:
            break
        if original in item.deleted:
            continue
        override = item.overrides.get(original)
        start, end = (override.start, override.end) if override else (original, original + duration)
        if window_start is not None and window_end is not None and not overlaps(start, end, window_start, window_end):
            continue
        found.append(Occurrence(item, index, original, start, end, override))
    found.sort(key=lambda occ: occ.start)
    return found


def find_occurrence(item: Item, original_start: datetime | None = None, index: int | None = None) -> Occurrence | None:
    """The occurrence with this original start (UTC) or index, also when it has been deleted (override None)."""
    for i, original in occurrence_starts(item):
        if (index is not None and i == index) or (original_start is not None and original == original_start):
            override = item.overrides.get(original)
            start, end = (override.start, override.end) if override else (original, original + item.duration)
            return Occurrence(item, i, original, start, end, override)
        if original_start is not None and original > original_start:
            return None
        if index is not None and i > index:
            return None
    return None


def last_occurrence(item: Item) -> Occurrence | None:
    """The last occurrence of a series with an end, or None for a series without one."""
    rec = item.recurrence
    if rec is None or (rec.count is None and rec.end_date is None):
        return None
    live = expand(item)
    return live[-1] if live else None


def overlaps(start: datetime, end: datetime, window_start: datetime, window_end: datetime) -> bool:
    """CalendarView overlap; a zero-length item counts when it starts inside the window."""
    if start == end:
        return window_start <= start < window_end
    return start < window_end and end > window_start
