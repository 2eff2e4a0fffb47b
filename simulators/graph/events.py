"""Calendar store items as Graph event JSON, the way Graph sends them: content included.

Real Graph sends subject, body, location and attendees with every calendarView and delta entry (``$select`` is
not supported on delta), so the simulator does too: the adapter must drop them. Times come in the zone the
``Prefer: outlook.timezone`` header names (UTC when absent); ``originalStart`` is UTC. Occurrences and exceptions
carry ``seriesMasterId``, ``originalStart`` and an ``iCalUId`` with their instance date
(``shared.domain.graph_events.ical_uid_for``).
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from shared.domain.graph_events import ical_uid_for
from simulators.exchange.model import DAY_GROUPS, DAY_NAMES, Item, Occurrence, Recurrence
from simulators.exchange.timezones import UnknownTimeZone, zone

from . import ids

SHOW_AS = {"Free": "free", "Tentative": "tentative", "Busy": "busy", "OOF": "oof", "WorkingElsewhere": "workingElsewhere",
           "NoData": "unknown"}
PATTERNS = {"daily": "daily", "weekly": "weekly", "absolute_monthly": "absoluteMonthly",
            "relative_monthly": "relativeMonthly", "absolute_yearly": "absoluteYearly",
            "relative_yearly": "relativeYearly"}


def output_zone(name: str | None) -> tuple[str, ZoneInfo | None]:
    """The zone named by ``Prefer: outlook.timezone`` (Windows or IANA); UTC when absent or unknown."""
    if not name or name.upper() == "UTC":
        return "UTC", None
    try:
        return name, zone(name)
    except UnknownTimeZone:
        return "UTC", None


def date_time(value: datetime, tz: tuple[str, ZoneInfo | None]) -> dict[str, str]:
    local = value.astimezone(tz[1] or UTC)
    return {"dateTime": local.strftime("%Y-%m-%dT%H:%M:%S.") + f"{local.microsecond:06d}0", "timeZone": tz[0]}


def utc_stamp(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _instance_date(item: Item, original_start: datetime) -> date:
    return original_start.astimezone(zone(item.tz)).date()


def _person(address: str, name: str | None = None) -> dict[str, str]:
    return {"name": name or address.split("@")[0].replace(".", " ").title(), "address": address}


def event_json(mailbox: str, item: Item, occ: Occurrence | None, tz: tuple[str, ZoneInfo | None],
               with_ical_uid: bool = True, master: bool = False) -> dict[str, Any]:
    """A single, an occurrence/exception (``occ``) or, with ``master``, the series master itself."""
    value = occ.value if occ is not None else (lambda name: getattr(item, name))
    if occ is not None:
        event_id = ids.instance_id(mailbox, item.key, occ.original_start)
        kind = "exception" if occ.is_exception else "occurrence"
        start, end = occ.start, occ.end
        modified = occ.override.last_modified if occ.override and occ.override.last_modified else item.last_modified
    else:
        event_id = ids.event_id(mailbox, item.key)
        kind = "seriesMaster" if master else "singleInstance"
        start, end = item.start, item.end
        modified = item.last_modified
    change_key = ids.change_key(item.version)
    subject, body, location = str(value("subject")), str(value("body")), str(value("location"))
    organizer = item.organizer or mailbox
    event: dict[str, Any] = {
        "@odata.etag": f'W/"{change_key}"',
        "id": event_id,
        "createdDateTime": utc_stamp(item.created or item.start),
        "lastModifiedDateTime": utc_stamp(modified or item.start),
        "changeKey": change_key,
        "categories": [],
        "transactionId": None,
        "originalStartTimeZone": item.tz,
        "originalEndTimeZone": item.tz,
        "reminderMinutesBeforeStart": 15,
        "isReminderOn": True,
        "hasAttachments": False,
        "subject": subject,
        "bodyPreview": body[:255],
        "importance": "normal",
        "sensitivity": str(value("sensitivity")).lower(),
        "isAllDay": item.is_all_day,
        "isCancelled": bool(value("is_cancelled")),
        "isOrganizer": item.organizer is None,
        "responseRequested": True,
        "seriesMasterId": ids.event_id(mailbox, item.key) if occ is not None else None,
        "showAs": SHOW_AS[str(value("status"))],
        "type": kind,
        "webLink": f"https://outlook.office365.com/owa/?itemid={event_id}&exvsurl=1&path=/calendar/item",
        "onlineMeetingUrl": None,
        "isOnlineMeeting": False,
        "onlineMeetingProvider": "unknown",
        "allowNewTimeProposals": True,
        "isDraft": False,
        "hideAttendees": False,
        "responseStatus": {"response": "organizer" if item.organizer is None else "accepted",
                           "time": "0001-01-01T00:00:00Z"},
        "body": {"contentType": "text", "content": body},
        "start": date_time(start, tz),
        "end": date_time(end, tz),
        "location": {"displayName": location, "locationType": "default", "uniqueIdType": "unknown",
                     "address": {}, "coordinates": {}},
        "locations": [{"displayName": location, "locationType": "default"}] if location else [],
        "recurrence": None,
        "attendees": [{"type": "required", "status": {"response": "none", "time": "0001-01-01T00:00:00Z"},
                       "emailAddress": _person(address, name)} for address, name in [(mailbox, None), *((a, n) for n, a in item.attendees)]],
        "organizer": {"emailAddress": _person(organizer, item.organizer_name if item.organizer else None)},
        "onlineMeeting": None,
    }
    if with_ical_uid:
        event["iCalUId"] = ical_uid_for(item.uid, _instance_date(item, occ.original_start) if occ else None)
    if occ is not None:
        event["originalStart"] = utc_stamp(occ.original_start)
    if master and item.recurrence is not None:
        event["recurrence"] = recurrence_json(item.recurrence, item.tz)
    return event


def _days(names: tuple[str, ...]) -> list[str]:
    days: list[str] = []
    for name in names:
        for index in DAY_GROUPS.get(name, (DAY_NAMES.index(name),) if name in DAY_NAMES else ()):
            days.append(DAY_NAMES[index].lower())
    return days


def recurrence_json(rec: Recurrence, tz: str) -> dict[str, Any]:
    pattern: dict[str, Any] = {"type": PATTERNS[rec.pattern], "interval": rec.interval, "month": rec.month or 0,
                               "dayOfMonth": rec.day_of_month or 0, "firstDayOfWeek": rec.first_day_of_week.lower(),
                               "index": (rec.week_index or "First").lower()}
    if rec.days_of_week:
        pattern["daysOfWeek"] = _days(rec.days_of_week)
    kind = "numbered" if rec.count is not None else ("endDate" if rec.end_date is not None else "noEnd")
    return {
        "pattern": pattern,
        "range": {"type": kind, "startDate": rec.start_date.isoformat(),
                  "endDate": rec.end_date.isoformat() if rec.end_date else "0001-01-01",
                  "recurrenceTimeZone": tz, "numberOfOccurrences": rec.count or 0},
    }


def removed_json(event_id: str, reason: str = "deleted") -> dict[str, Any]:
    return {"@odata.type": "#microsoft.graph.event", "id": event_id, "@removed": {"reason": reason}}


def selected(event: dict[str, Any], select: list[str]) -> dict[str, Any]:
    """``$select``: the named fields plus id and etag."""
    if not select:
        return event
    keep = {"@odata.etag", "id", *select}
    return {name: value for name, value in event.items() if name in keep}
