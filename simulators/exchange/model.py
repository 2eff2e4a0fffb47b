"""The calendar model of one mailbox: items, recurrence patterns, modified and deleted occurrences.

Times are aware UTC datetimes; ``tz`` is the item's Windows zone id, the zone occurrences are expanded in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

FREE_BUSY_STATUSES = ("Free", "Tentative", "Busy", "OOF", "NoData", "WorkingElsewhere")
SENSITIVITIES = ("Normal", "Personal", "Private", "Confidential")
DAY_NAMES = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
DAY_GROUPS = {
    "Day": tuple(range(7)),
    "Weekday": (0, 1, 2, 3, 4),
    "WeekendDay": (5, 6),
}
WEEK_INDEXES = ("First", "Second", "Third", "Fourth", "Last")
PATTERNS = ("daily", "weekly", "absolute_monthly", "relative_monthly", "absolute_yearly", "relative_yearly")
CALENDAR = "calendar"
DELETED_ITEMS = "deleteditems"
FOLDERS = (CALENDAR, DELETED_ITEMS)


@dataclass
class Recurrence:
    """An EWS recurrence: one pattern plus one range (count, end date or no end)."""

    pattern: str
    start_date: date
    interval: int = 1
    days_of_week: tuple[str, ...] = ()  # Monday..Sunday, or Day / Weekday / WeekendDay for relative patterns
    day_of_month: int | None = None
    week_index: str | None = None  # First..Fourth, Last
    month: int | None = None  # 1..12 for yearly patterns
    first_day_of_week: str = "Monday"
    count: int | None = None
    end_date: date | None = None  # inclusive, a local date in the item's zone


@dataclass
class Override:
    """A modified occurrence (an Exception in EWS terms); fields left None inherit from the master."""

    start: datetime
    end: datetime
    status: str | None = None
    subject: str | None = None
    body: str | None = None
    location: str | None = None
    sensitivity: str | None = None
    is_cancelled: bool | None = None
    last_modified: datetime | None = None


@dataclass
class Item:
    """A single appointment or a recurring master as stored in a mailbox folder."""

    key: int
    uid: str
    start: datetime
    end: datetime
    tz: str
    subject: str = ""
    body: str = ""
    location: str = ""
    organizer: str | None = None
    organizer_name: str | None = None  # display name; None: the address's local part
    attendees: tuple[tuple[str, str], ...] = ()  # (display name, address) of each required attendee
    is_all_day: bool = False
    status: str = "Busy"
    sensitivity: str = "Normal"
    is_cancelled: bool = False
    folder: str = CALENDAR
    recurrence: Recurrence | None = None
    overrides: dict[datetime, Override] = field(default_factory=dict)  # keyed by original start (UTC)
    deleted: set[datetime] = field(default_factory=set)  # original starts (UTC)
    created: datetime | None = None
    last_modified: datetime | None = None
    version: int = 0

    @property
    def duration(self) -> timedelta:
        return self.end - self.start

    @property
    def is_recurring(self) -> bool:
        return self.recurrence is not None


@dataclass(frozen=True)
class Occurrence:
    """One expanded occurrence of a series (index is 1-based, as EWS InstanceIndex)."""

    master: Item
    index: int
    original_start: datetime
    start: datetime
    end: datetime
    override: Override | None

    @property
    def is_exception(self) -> bool:
        return self.override is not None

    def value(self, name: str) -> object:
        """An attribute of the occurrence: the override's when it has one, else the master's."""
        if self.override is not None:
            own = getattr(self.override, name)
            if own is not None:
                return own
        return getattr(self.master, name)
