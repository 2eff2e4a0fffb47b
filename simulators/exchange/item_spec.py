"""JSON item descriptions (control API, seeds) to model objects, and model objects back to JSON.

Times are ISO 8601: with an offset they are instants; without one they are wall-clock times in the item's
``timezone`` (Windows or IANA name). All-day items take dates; ``end`` is exclusive and defaults to the next day.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from .model import (
    DAY_GROUPS,
    DAY_NAMES,
    FOLDERS,
    FREE_BUSY_STATUSES,
    PATTERNS,
    SENSITIVITIES,
    WEEK_INDEXES,
    Item,
    Override,
    Recurrence,
)
from .timezones import windows_id, zone


class SpecError(ValueError):
    """A JSON item description that cannot be understood (the control API answers 400)."""


def _instant(value: str, tz: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"not an ISO date-time: {value!r}") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=zone(tz))
    return parsed.astimezone(UTC)


def _date(value: str) -> date:
    try:
        return date.fromisoformat(str(value)[:10])
    except ValueError as exc:
        raise SpecError(f"not an ISO date: {value!r}") from exc


def _choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    for candidate in allowed:
        if candidate.lower() == str(value).lower():
            return candidate
    raise SpecError(f"{what} must be one of {', '.join(allowed)}, not {value!r}")


def parse_recurrence(spec: dict[str, Any], local_start: date) -> Recurrence:
    pattern = _choice(spec.get("pattern", ""), PATTERNS, "recurrence.pattern")
    days = tuple(_choice(d, DAY_NAMES + tuple(DAY_GROUPS), "days_of_week") for d in spec.get("days_of_week", ()))
    if pattern == "weekly" and not days:
        days = (DAY_NAMES[local_start.weekday()],)
    until = spec.get("until", spec.get("end_date"))
    count = spec.get("count")
    return Recurrence(
        pattern=pattern,
        start_date=_date(spec["start_date"]) if spec.get("start_date") else local_start,
        interval=int(spec.get("interval", 1)),
        days_of_week=days,
        day_of_month=spec.get("day_of_month"),
        week_index=_choice(spec["week_index"], WEEK_INDEXES, "week_index") if spec.get("week_index") else None,
        month=spec.get("month"),
        first_day_of_week=_choice(spec.get("first_day_of_week", "Monday"), DAY_NAMES, "first_day_of_week"),
        count=int(count) if count is not None else None,
        end_date=_date(until) if until else None,
    )


def _attendees(value: Any) -> tuple[tuple[str, str], ...]:
    """``[{"name": "...", "address": "..."}, ...]`` as (name, address) pairs."""
    if not isinstance(value, list) or not all(isinstance(a, dict) and isinstance(a.get("address"), str) for a in value):
        raise SpecError("attendees must be a list of {\"name\": ..., \"address\": ...}")
    return tuple((str(a.get("name") or a["address"]), a["address"]) for a in value)


ITEM_KEYS = frozenset({"uid", "start", "end", "timezone", "all_day", "is_all_day", "subject", "body", "location", "organizer",
                       "organizer_name", "attendees", "status", "sensitivity", "is_cancelled", "folder", "recurrence"})


def refuse_unknown(spec: dict[str, Any]) -> None:
    """An item's JSON from a client (a new item or a change) names only known fields: a misspelt ``is_cancelled``
    would otherwise make a live item without a word."""
    unknown = sorted(set(spec) - ITEM_KEYS)
    if unknown:
        raise SpecError(f"unknown item field(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(ITEM_KEYS))}")


def parse_item(spec: dict[str, Any], default_tz: str) -> dict[str, Any]:
    """Keyword arguments for ``Item`` (without key and version) from a JSON description."""
    if "start" not in spec:
        raise SpecError("an item needs 'start'")
    try:
        tz = windows_id(spec.get("timezone") or default_tz)
    except ValueError as exc:
        raise SpecError(f"unknown time zone {spec.get('timezone')!r}") from exc
    all_day = bool(spec.get("all_day", spec.get("is_all_day", False))) or len(str(spec["start"])) == 10
    if all_day:
        first = _date(spec["start"])
        last = _date(spec["end"]) if spec.get("end") else first + timedelta(days=1)
        if last <= first:
            raise SpecError("an all-day item's exclusive end must be after its start")
        start = datetime.combine(first, time(0), tzinfo=zone(tz)).astimezone(UTC)
        end = datetime.combine(last, time(0), tzinfo=zone(tz)).astimezone(UTC)
    else:
        start = _instant(spec["start"], tz)
        end = _instant(spec["end"], tz) if spec.get("end") else start + timedelta(minutes=30)
        if end < start:
            raise SpecError("'end' is before 'start'")
    recurrence = None
    if spec.get("recurrence"):
        recurrence = parse_recurrence(spec["recurrence"], start.astimezone(zone(tz)).date())
    folder = spec.get("folder", "calendar")
    if folder not in FOLDERS:
        raise SpecError(f"folder must be one of {FOLDERS}")
    return {
        "uid": spec.get("uid") or str(uuid.uuid4()).upper(),
        "start": start,
        "end": end,
        "tz": tz,
        "subject": spec.get("subject", ""),
        "body": spec.get("body", ""),
        "location": spec.get("location", ""),
        "organizer": spec.get("organizer"),
        "organizer_name": spec.get("organizer_name"),
        "attendees": _attendees(spec.get("attendees", [])),
        "is_all_day": all_day,
        "status": _choice(spec.get("status", "Busy"), FREE_BUSY_STATUSES, "status"),
        "sensitivity": _choice(spec.get("sensitivity", "Normal"), SENSITIVITIES, "sensitivity"),
        "is_cancelled": bool(spec.get("is_cancelled", False)),
        "folder": folder,
        "recurrence": recurrence,
    }


def parse_original_start(value: str, item: Item) -> datetime:
    """An occurrence's original start: ISO with offset, or wall-clock time in the item's zone."""
    return _instant(value, item.tz)


def parse_override(spec: dict[str, Any], item: Item, original_start: datetime) -> Override:
    start = _instant(spec["start"], item.tz) if spec.get("start") else original_start
    end = _instant(spec["end"], item.tz) if spec.get("end") else start + item.duration
    return Override(
        start=start,
        end=end,
        status=_choice(spec["status"], FREE_BUSY_STATUSES, "status") if spec.get("status") else None,
        subject=spec.get("subject"),
        body=spec.get("body"),
        location=spec.get("location"),
        sensitivity=_choice(spec["sensitivity"], SENSITIVITIES, "sensitivity") if spec.get("sensitivity") else None,
        is_cancelled=spec.get("is_cancelled"),
    )


def describe_recurrence(rec: Recurrence) -> dict[str, Any]:
    out: dict[str, Any] = {"pattern": rec.pattern, "interval": rec.interval, "start_date": rec.start_date.isoformat()}
    if rec.days_of_week:
        out["days_of_week"] = list(rec.days_of_week)
    for name in ("day_of_month", "week_index", "month", "count"):
        if getattr(rec, name) is not None:
            out[name] = getattr(rec, name)
    if rec.end_date is not None:
        out["until"] = rec.end_date.isoformat()
    out["first_day_of_week"] = rec.first_day_of_week
    return out


def describe(item: Item, mailbox: str, item_id: str) -> dict[str, Any]:
    """The JSON form of an item, as the control API lists it (re-parseable by ``parse_item``)."""
    tz = zone(item.tz)
    if item.is_all_day:
        start: str = item.start.astimezone(tz).date().isoformat()
        end: str = item.end.astimezone(tz).date().isoformat()
    else:
        start, end = item.start.astimezone(tz).isoformat(), item.end.astimezone(tz).isoformat()
    out: dict[str, Any] = {
        "id": item_id,
        "key": item.key,
        "mailbox": mailbox,
        "uid": item.uid,
        "start": start,
        "end": end,
        "timezone": item.tz,
        "all_day": item.is_all_day,
        "status": item.status,
        "sensitivity": item.sensitivity,
        "is_cancelled": item.is_cancelled,
        "folder": item.folder,
        "subject": item.subject,
        "body": item.body,
        "location": item.location,
        "organizer": item.organizer,
        "organizer_name": item.organizer_name,
        "attendees": [{"name": name, "address": address} for name, address in item.attendees],
        "version": item.version,
    }
    if item.recurrence is not None:
        out["recurrence"] = describe_recurrence(item.recurrence)
        out["modified_occurrences"] = [
            {"original_start": o.isoformat(), "start": ov.start.isoformat(), "end": ov.end.isoformat()}
            for o, ov in sorted(item.overrides.items())
        ]
        out["deleted_occurrences"] = [o.isoformat() for o in sorted(item.deleted)]
    return out
