"""What counts as busy time, for which key, and when: the one policy every path uses.

Pure: no I/O, no clock (``now`` is always a parameter), no logging. Decisions 2 to 5 and 7 (docs/decisions.md).

Decisions taken here (decisions 23 and 32 to 35 in docs/decisions.md give their reasons):

- **Window edges.** ``sync_window(now)`` is ``[now, now + N calendar months)``, the months counted on the
  wall clock of the configured zone. ``in_window`` is a half-open overlap test: an item whose end is at or
  before ``now`` is over and is never sent as new; an item starting exactly at the window end (or later)
  is not sent; anything overlapping the window (including an appointment created for later today, and
  one already under way) is sent with its **full** times, never clipped, so Planner sees the real
  appointment. What happens to a *known* event that leaves the window is decided in
  ``shared.domain.transform_core``.
- **DST fall-back hour.** ``origin_id`` formats the original start on the local wall clock
  (``yyyyMMdd-HHmmss``, Europe/Copenhagen), exactly like the reference client, so existing Planner events
  keep their keys when a municipality switches over. On 25 Oct 2026 02:30 happens twice; both instants
  give the same string. That is accepted: Exchange has no recurrence finer than daily, so one series can
  never have two occurrences whose original starts are an hour apart, and the key is only ever combined
  with the series UID. The spring gap cannot produce a clash either (the non-existent 02:30 is expanded
  by Exchange to an instant that formats as 03:30).
- **All-day items.** The dates are taken from the item's UTC instants seen in the item's own zone
  (Windows or IANA id), each snapped to the *nearest* local midnight, so an exchangelib/host-zone slip of
  up to 12 hours (the DST hour, a host in America/New_York) cannot move the day. The busy interval runs from
  00:00 of the first date to 00:00 of the day after the last date in the configured zone. An end not
  after the start (exchangelib's spring-DST trap, decision 23) is treated as a one-day item. A missing zone id on an
  all-day item falls back to the configured zone; an id we cannot map is rejected.
- **Planner-originated items.** Organizer addresses compare case-insensitively, once, where the item is read
  (``organizer_rule``): the item carries only ``organizer_is_planner``, never the address (decision 71). UID
  patterns are matched with ``re.search`` (anchor them if you need to).
- **Missing status.** A cancelled item or one in a deleted-items folder is not busy whatever else it
  carries; a live item with no free/busy status, no UID, or impossible times is rejected
  (``ItemRejected``), never guessed.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from shared.domain.contracts import CalendarItem, Interval

UTC = timezone.utc
ORIGIN_TIME_FORMAT = "%Y%m%d-%H%M%S"   # the reference client's yyyyMMdd-HHmmss

# Windows time zone ids (what Exchange puts in StartTimeZone/@Id) to IANA ids, after CLDR windowZones.xml
# (territory "001"). Any IANA id is accepted as it is.
WINDOWS_ZONES: dict[str, str] = {
    "Dateline Standard Time": "Etc/GMT+12",
    "UTC-11": "Etc/GMT+11",
    "Hawaiian Standard Time": "Pacific/Honolulu",
    "Alaskan Standard Time": "America/Anchorage",
    "Pacific Standard Time": "America/Los_Angeles",
    "Mountain Standard Time": "America/Denver",
    "US Mountain Standard Time": "America/Phoenix",
    "Central Standard Time": "America/Chicago",
    "Central America Standard Time": "America/Guatemala",
    "Canada Central Standard Time": "America/Regina",
    "Mexico Standard Time": "America/Mexico_City",
    "Central Standard Time (Mexico)": "America/Mexico_City",
    "Eastern Standard Time": "America/New_York",
    "US Eastern Standard Time": "America/Indianapolis",
    "SA Pacific Standard Time": "America/Bogota",
    "Atlantic Standard Time": "America/Halifax",
    "SA Western Standard Time": "America/La_Paz",
    "Newfoundland Standard Time": "America/St_Johns",
    "E. South America Standard Time": "America/Sao_Paulo",
    "Argentina Standard Time": "America/Buenos_Aires",
    "Greenland Standard Time": "America/Nuuk",
    "UTC-02": "Etc/GMT+2",
    "Azores Standard Time": "Atlantic/Azores",
    "Cape Verde Standard Time": "Atlantic/Cape_Verde",
    "UTC": "Etc/UTC",
    "Coordinated Universal Time": "Etc/UTC",
    "GMT Standard Time": "Europe/London",
    "Greenwich Standard Time": "Atlantic/Reykjavik",
    "Morocco Standard Time": "Africa/Casablanca",
    "W. Europe Standard Time": "Europe/Berlin",
    "Central Europe Standard Time": "Europe/Budapest",
    "Romance Standard Time": "Europe/Paris",
    "Central European Standard Time": "Europe/Warsaw",
    "W. Central Africa Standard Time": "Africa/Lagos",
    "GTB Standard Time": "Europe/Bucharest",
    "E. Europe Standard Time": "Europe/Chisinau",
    "FLE Standard Time": "Europe/Kyiv",
    "Kaliningrad Standard Time": "Europe/Kaliningrad",
    "Turkey Standard Time": "Europe/Istanbul",
    "Israel Standard Time": "Asia/Jerusalem",
    "Egypt Standard Time": "Africa/Cairo",
    "South Africa Standard Time": "Africa/Johannesburg",
    "Russian Standard Time": "Europe/Moscow",
    "Belarus Standard Time": "Europe/Minsk",
    "Arab Standard Time": "Asia/Riyadh",
    "Arabian Standard Time": "Asia/Dubai",
    "Iran Standard Time": "Asia/Tehran",
    "Pakistan Standard Time": "Asia/Karachi",
    "India Standard Time": "Asia/Kolkata",
    "Bangladesh Standard Time": "Asia/Dhaka",
    "SE Asia Standard Time": "Asia/Bangkok",
    "China Standard Time": "Asia/Shanghai",
    "Singapore Standard Time": "Asia/Singapore",
    "Tokyo Standard Time": "Asia/Tokyo",
    "Korea Standard Time": "Asia/Seoul",
    "AUS Eastern Standard Time": "Australia/Sydney",
    "E. Australia Standard Time": "Australia/Brisbane",
    "New Zealand Standard Time": "Pacific/Auckland",
}


class ItemRejected(ValueError):
    """An item that cannot be turned into busy time. ``reason`` is content-free (ids and field names only)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class BusyPolicy:
    """The busy rules' parameters; built from the settings by the shell (``BusySettings.policy()``)."""

    busy_statuses: frozenset[str]
    window_months: int
    zone: ZoneInfo
    planner_organizers: frozenset[str]          # lower-cased
    planner_uid_patterns: tuple[re.Pattern[str], ...]


def _add_months(moment: datetime, months: int) -> datetime:
    years, month0 = divmod(moment.month - 1 + months, 12)
    year, month = moment.year + years, month0 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def _require_aware(moment: datetime, name: str) -> None:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name} must be an aware datetime")


def sync_window(now: datetime, policy: BusyPolicy) -> Interval:
    """``[now, now + window_months)``, months counted on the configured zone's wall clock, in UTC."""
    _require_aware(now, "now")
    local = now.astimezone(policy.zone)
    end_wall = _add_months(local.replace(tzinfo=None), policy.window_months)
    end = end_wall.replace(tzinfo=policy.zone).astimezone(UTC)
    return Interval(start=now.astimezone(UTC), end=end)


def in_window(interval: Interval, window: Interval) -> bool:
    """Half-open overlap: over at ``window.start`` or starting at ``window.end`` is outside."""
    return interval.end > window.start and interval.start < window.end


def overlaps(interval: Interval | None, window: Interval) -> bool:
    """``in_window`` for an interval that may be absent (None never overlaps)."""
    return interval is not None and in_window(interval, window)


def zone_of(zone_id: str) -> ZoneInfo:
    """A ZoneInfo for a Windows or IANA zone id; ItemRejected when it is neither."""
    iana = WINDOWS_ZONES.get(zone_id.strip(), zone_id.strip())
    try:
        return ZoneInfo(iana)
    except (ZoneInfoNotFoundError, ValueError):
        raise ItemRejected(f"unknown time zone id {zone_id!r}") from None


def origin_id(item: CalendarItem, zone: ZoneInfo) -> str:
    """Planner's OriginSystemIdentifier for an item (the reference client's format, decision 4 in docs/decisions.md)."""
    if not item.uid:
        raise ItemRejected(f"item {item.item_type} has no UID")
    if item.item_type in ("single", "master"):
        return item.uid
    if item.original_start is None:
        raise ItemRejected(f"{item.item_type} has no original start")
    return f"{item.uid}${item.original_start.astimezone(zone).strftime(ORIGIN_TIME_FORMAT)}"


def organizer_flag(address: str | None, planner_organizers: frozenset[str]) -> bool | None:
    """``CalendarItem.organizer_is_planner`` for an organizer address as read (None when there is none).

    The adapters ask this when they read an item and keep only the answer; the address goes no further
    (decision 71 in docs/decisions.md). ``planner_organizers`` is lower-cased (``BusyPolicy.planner_organizers``).
    """
    return address.strip().lower() in planner_organizers if address else None


def is_planner_originated(item: CalendarItem, policy: BusyPolicy) -> bool:
    """True for an item Planner itself put in the calendar (its invitation), recognised by organizer flag or UID."""
    if item.organizer_is_planner:
        return True
    uid = item.uid
    if not uid:
        return False
    return any(pattern.search(uid) for pattern in policy.planner_uid_patterns)


def not_busy_reason(item: CalendarItem, policy: BusyPolicy) -> str | None:
    """Why an item (or a whole series, for a master) is not busy, from its status alone; None when it is.

    Raises ItemRejected for a live item without a free/busy status.
    """
    if item.cancelled:
        return "cancelled"
    if item.in_deleted_items:
        return "in deleted items"
    if is_planner_originated(item, policy):
        return "planner originated"
    if item.free_busy is None:
        raise ItemRejected(f"{item.item_type} has no free/busy status")
    if item.free_busy not in policy.busy_statuses:
        return f"status {item.free_busy}"
    return None


def _nearest_date(moment: datetime, zone: ZoneInfo) -> date:
    return (moment.astimezone(zone) + timedelta(hours=12)).date()


def _local_midnight(day: date, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)


def all_day_interval(item: CalendarItem, policy: BusyPolicy) -> Interval:
    """The busy interval of an all-day item: whole days in the configured zone, dates from the item's zone."""
    assert item.start is not None and item.end is not None
    own = zone_of(item.time_zone) if item.time_zone else policy.zone
    first = _nearest_date(item.start, own)
    after_last = max(_nearest_date(item.end, own), first + timedelta(days=1))
    return Interval(start=_local_midnight(first, policy.zone), end=_local_midnight(after_last, policy.zone))


def busy_interval(item: CalendarItem, policy: BusyPolicy) -> Interval | None:
    """The busy interval an item puts in Planner, or None when it is not busy.

    Not busy: status outside the policy, cancelled, in a deleted-items folder, Planner-originated, zero length.
    Raises ItemRejected (content-free reason) for an item that cannot be judged.
    """
    if not_busy_reason(item, policy) is not None:
        return None
    if item.start is None or item.end is None:
        missing = "start" if item.start is None else "end"
        raise ItemRejected(f"{item.item_type} has no {missing}")
    if item.all_day:
        return all_day_interval(item, policy)
    if item.end < item.start:
        raise ItemRejected(f"{item.item_type} ends before it starts")
    if item.end == item.start:
        return None
    return Interval(start=item.start, end=item.end)
