"""iCalendar (as Outlook exports it) to calendar items, with the ``icalendar`` library.

Windows TZIDs ("Romance Standard Time") are resolved through our own table: the wall-clock time of DTSTART is
taken as written and placed in that zone, whatever the VTIMEZONE block claims about historic rules.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import icalendar

from .model import DAY_NAMES, Item, Override, Recurrence
from .timezones import UnknownTimeZone, windows_id, zone

_DAYS = {"MO": 0, "TU": 1, "WE": 2, "TH": 3, "FR": 4, "SA": 5, "SU": 6}
_INDEX = {1: "First", 2: "Second", 3: "Third", 4: "Fourth", -1: "Last"}
_CDO_STATUS = {"FREE": "Free", "TENTATIVE": "Tentative", "BUSY": "Busy", "OOF": "OOF",
               "WORKINGELSEWHERE": "WorkingElsewhere"}
_SENSITIVITY = {"PRIVATE": "Private", "CONFIDENTIAL": "Confidential", "PUBLIC": "Normal"}


class IcsError(ValueError):
    """An iCalendar text that cannot be loaded."""


def _zone_name(prop: Any, default_tz: str) -> str:
    tzid = prop.params.get("TZID") if hasattr(prop, "params") else None
    if tzid:
        try:
            return windows_id(str(tzid))
        except UnknownTimeZone:
            return default_tz
    return default_tz


def _instant(prop: Any, tz: str, tzid: str | None = None) -> datetime:
    """A DTSTART/DTEND/RECURRENCE-ID/EXDATE value as an aware UTC datetime.

    A known TZID (ours, not icalendar's reading of VTIMEZONE) wins; ``tzid`` passes a list property's TZID.
    """
    value = prop.dt if hasattr(prop, "dt") else prop
    if tzid is None and hasattr(prop, "params"):
        tzid = prop.params.get("TZID")
    if isinstance(value, datetime):
        if tzid and _known(str(tzid)):
            return value.replace(tzinfo=zone(str(tzid))).astimezone(UTC)
        if value.tzinfo is not None:
            return value.astimezone(UTC)
        return value.replace(tzinfo=zone(tz)).astimezone(UTC)
    return datetime.combine(value, time(0), tzinfo=zone(tz)).astimezone(UTC)


def _known(tzid: str) -> bool:
    try:
        windows_id(tzid)
        return True
    except UnknownTimeZone:
        return False


def _days(values: list[str]) -> tuple[tuple[str, ...], int | None]:
    """BYDAY values to day names (or Day/Weekday/WeekendDay) and a common ordinal (e.g. -1 for -1MO)."""
    ordinal = None
    numbers: list[int] = []
    for raw in values:
        raw = str(raw)
        if len(raw) > 2:
            ordinal = int(raw[:-2])
        numbers.append(_DAYS[raw[-2:]])
    chosen = sorted(set(numbers))
    if chosen == list(range(7)):
        return ("Day",), ordinal
    if chosen == [0, 1, 2, 3, 4]:
        return ("Weekday",), ordinal
    if chosen == [5, 6]:
        return ("WeekendDay",), ordinal
    return tuple(DAY_NAMES[n] for n in chosen), ordinal


def _recurrence(rule: Any, start_local: date, tz: str) -> Recurrence:
    freq = rule.get("FREQ", [""])[0]
    interval = int(rule.get("INTERVAL", [1])[0])
    count = int(rule["COUNT"][0]) if rule.get("COUNT") else None
    end_date = None
    if rule.get("UNTIL"):
        until = rule["UNTIL"][0]
        end_date = until.astimezone(zone(tz)).date() if isinstance(until, datetime) and until.tzinfo else (
            until.date() if isinstance(until, datetime) else until)
    byday = [str(d) for d in rule.get("BYDAY", [])]
    setpos = int(rule["BYSETPOS"][0]) if rule.get("BYSETPOS") else None
    wkst = DAY_NAMES[_DAYS[str(rule["WKST"][0])]] if rule.get("WKST") else "Monday"
    common: dict[str, Any] = {"start_date": start_local, "interval": interval, "count": count, "end_date": end_date,
                              "first_day_of_week": wkst}
    month = int(rule["BYMONTH"][0]) if rule.get("BYMONTH") else None
    if freq == "DAILY" and not byday:
        return Recurrence("daily", **common)
    if freq in ("DAILY", "WEEKLY"):
        days = tuple(DAY_NAMES[_DAYS[d[-2:]]] for d in byday) or (DAY_NAMES[start_local.weekday()],)
        return Recurrence("weekly", days_of_week=days, **common)
    if freq in ("MONTHLY", "YEARLY"):
        yearly = freq == "YEARLY"
        if yearly:
            common["month"] = month or start_local.month
        if byday:
            days, ordinal = _days(byday)
            index = _INDEX.get(setpos if setpos is not None else (ordinal or 1))
            if index is None:
                raise IcsError(f"unsupported BYDAY/BYSETPOS ordinal in {rule.to_ical()!r}")
            return Recurrence("relative_yearly" if yearly else "relative_monthly", days_of_week=days,
                              week_index=index, **common)
        day = int(rule["BYMONTHDAY"][0]) if rule.get("BYMONTHDAY") else start_local.day
        return Recurrence("absolute_yearly" if yearly else "absolute_monthly", day_of_month=day, **common)
    raise IcsError(f"unsupported FREQ {freq!r}")


def _status(event: Any) -> str:
    cdo = event.get("X-MICROSOFT-CDO-BUSYSTATUS")
    if cdo and str(cdo).upper() in _CDO_STATUS:
        return _CDO_STATUS[str(cdo).upper()]
    if str(event.get("TRANSP", "OPAQUE")).upper() == "TRANSPARENT":
        return "Free"
    return "Tentative" if str(event.get("STATUS", "")).upper() == "TENTATIVE" else "Busy"


def _times(event: Any, tz: str) -> tuple[datetime, datetime, bool]:
    dtstart = event["DTSTART"]
    all_day = not isinstance(dtstart.dt, datetime) or str(
        event.get("X-MICROSOFT-CDO-ALLDAYEVENT", "FALSE")).upper() == "TRUE"
    start = _instant(dtstart, tz)
    if event.get("DTEND") is not None:
        end = _instant(event["DTEND"], tz)
    elif event.get("DURATION") is not None:
        end = start + event["DURATION"].dt
    else:
        end = start + (timedelta(days=1) if all_day else timedelta(0))
    if all_day:  # snap to local midnights of the dates in the item's zone
        local = zone(tz)
        first = start.astimezone(local).date() if isinstance(dtstart.dt, datetime) else dtstart.dt
        last_raw = event["DTEND"].dt if event.get("DTEND") is not None else first + timedelta(days=1)
        last = last_raw.date() if isinstance(last_raw, datetime) else last_raw
        start = datetime.combine(first, time(0), tzinfo=local).astimezone(UTC)
        end = datetime.combine(max(last, first + timedelta(days=1)), time(0), tzinfo=local).astimezone(UTC)
    return start, end, all_day


def _organizer(event: Any) -> str | None:
    org = event.get("ORGANIZER")
    if not org:
        return None
    return str(org).removeprefix("mailto:").removeprefix("MAILTO:") or None


def _text(event: Any, name: str) -> str:
    value = event.get(name)
    return str(value) if value is not None else ""


def load_ics(text: str | bytes, default_tz: str = "Romance Standard Time") -> list[Item]:
    """Items (key 0, not yet stored) for every VEVENT; RECURRENCE-ID events become overrides of their series."""
    try:
        cal = icalendar.Calendar.from_ical(text)
    except ValueError as exc:
        raise IcsError(f"not iCalendar: {exc}") from exc
    masters: dict[str, Item] = {}
    overrides: list[Any] = []
    items: list[Item] = []
    for event in cal.walk("VEVENT"):
        if event.get("RECURRENCE-ID") is not None:
            overrides.append(event)
            continue
        if event.get("DTSTART") is None:
            raise IcsError("a VEVENT without DTSTART")
        tz = _zone_name(event["DTSTART"], default_tz)
        start, end, all_day = _times(event, tz)
        uid = str(event.get("UID") or f"sim-{len(items)}")
        item = Item(
            key=0, uid=uid, start=start, end=end, tz=tz, subject=_text(event, "SUMMARY"),
            body=_text(event, "DESCRIPTION"), location=_text(event, "LOCATION"), organizer=_organizer(event),
            is_all_day=all_day, status=_status(event),
            sensitivity=_SENSITIVITY.get(str(event.get("CLASS", "PUBLIC")).upper(), "Normal"),
            is_cancelled=str(event.get("STATUS", "")).upper() == "CANCELLED",
        )
        if event.get("RRULE") is not None:
            item.recurrence = _recurrence(event["RRULE"], start.astimezone(zone(tz)).date(), tz)
            exdates = event.get("EXDATE")
            for prop in exdates if isinstance(exdates, list) else ([exdates] if exdates is not None else []):
                for value in prop.dts:
                    item.deleted.add(_instant(value, tz, prop.params.get("TZID")))
            masters[uid] = item
        items.append(item)
    for event in overrides:
        master = masters.get(str(event.get("UID")))
        if master is None:
            continue  # an exception without its series: Outlook does not export those
        original = _instant(event["RECURRENCE-ID"], master.tz)
        start, end, _all_day = _times(event, master.tz)
        master.overrides[original] = Override(
            start=start, end=end, status=_status(event),
            subject=_text(event, "SUMMARY") or None, location=_text(event, "LOCATION") or None,
            is_cancelled=True if str(event.get("STATUS", "")).upper() == "CANCELLED" else None,
        )
    return items
