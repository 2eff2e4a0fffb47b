"""Microsoft Graph events to our content-free ``CalendarItem``, and Graph's ``iCalUId`` to the EWS UID. Pure.

- ``keep_busy_fields`` is applied to every event object before anything else sees it: an allow-list of the
  fields busy time needs; subject, body, location, attendees and everything else Graph sends are dropped
  (decision 1 in docs/decisions.md; ``$select`` is not supported on calendarView delta). The organizer keeps
  its address only until the mapping turns it into ``organizer_is_planner`` (decision 71).
- ``calendar_item_from_event`` / ``sync_change_from_event`` map one calendarView (or calendarView/delta) entry.
  A field that is missing or malformed becomes None, so the transformer rejects the item with a reason
  (decision 34) instead of us guessing. A ``seriesMaster`` never comes from a calendar view: it is refused.
- ``series_uid_from_ical_uid`` turns Graph's per-occurrence ``iCalUId`` (the hex Global Object Id, [MS-OXOCAL]
  2.2.1.27) into exactly what EWS reports as the UID, so the OriginSystemIdentifier is the same whichever
  source read the item (decision 4). ``ical_uid_for`` is the inverse, used by the Graph simulator.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable, Mapping
from datetime import date, datetime, timezone
from typing import Any, Final

from pydantic import ValidationError

from shared.domain.busy_rules import ItemRejected, organizer_flag, zone_of
from shared.domain.contracts import CalendarItem, FreeBusy, ItemType, Sensitivity, describe_validation
from shared.domain.mailbox_reads import SyncChange

UTC = timezone.utc

# --- the Global Object Id ([MS-OXOCAL] 2.2.1.27) ---------------------------------------------------------------
GOID_CLASS_ID: Final = bytes.fromhex("040000008200E00074C5B7101A82E008")
_DATE = slice(16, 20)      # YH YL M D; zero for the series and for single items
_HEADER = 40               # class id 16 + instance date 4 + creation time 8 + reserved 8 + size 4
VCAL_MARKER: Final = b"vCal-Uid" + bytes((1, 0, 0, 0))


class NotAGlobalObjectId(ValueError):
    """A string that is not the hex form of a Global Object Id."""


def _goid_bytes(value: str) -> bytes | None:
    """The bytes of a hex Global Object Id, or None when ``value`` is not one (class id, size and length checked)."""
    text = value.strip()
    if len(text) < 2 * _HEADER or len(text) % 2:
        return None
    try:
        raw = binascii.unhexlify(text)
    except (binascii.Error, ValueError):
        return None
    if raw[:16] != GOID_CLASS_ID:
        return None
    size = int.from_bytes(raw[_HEADER - 4 : _HEADER], "little")
    return raw if size == len(raw) - _HEADER else None


def is_global_object_id(value: str) -> bool:
    """True when ``value`` is the hex form of a Global Object Id."""
    return _goid_bytes(value) is not None


def _with_date(raw: bytes, instance_date: date | None) -> bytes:
    stamp = bytes(4) if instance_date is None else instance_date.year.to_bytes(2, "big") + bytes((instance_date.month, instance_date.day))
    return raw[:16] + stamp + raw[20:]


def series_uid_from_ical_uid(ical_uid: str) -> str:
    """What EWS reports as the UID of the item (or series) whose Graph ``iCalUId`` this is.

    The instance date is zeroed; a vCal-Uid wrapper (an invitation created outside Exchange) gives the sender's
    UID; any other Global Object Id gives its uppercase hex. Raises NotAGlobalObjectId.
    """
    raw = _goid_bytes(ical_uid)
    if raw is None:
        raise NotAGlobalObjectId("iCalUId is not a Global Object Id")
    raw = _with_date(raw, None)
    data = raw[_HEADER:]
    if data.startswith(VCAL_MARKER) and data.endswith(b"\x00") and len(data) > len(VCAL_MARKER) + 1:
        try:
            return data[len(VCAL_MARKER) : -1].decode("utf-8")
        except UnicodeDecodeError:
            pass
    return raw.hex().upper()


def ical_uid_for(uid: str, instance_date: date | None) -> str:
    """The ``iCalUId`` Graph shows for an item with EWS UID ``uid`` (an occurrence: its instance date).

    A UID that is already a Global Object Id gets its instance date set; any other UID is wrapped as vCal-Uid.
    Inverse of ``series_uid_from_ical_uid`` for every UID EWS reports (an EWS UID is never a vCal-Uid wrapper).
    """
    raw = _goid_bytes(uid)
    if raw is None:
        data = VCAL_MARKER + uid.encode("utf-8") + b"\x00"
        raw = GOID_CLASS_ID + bytes(4) + bytes(8) + bytes(8) + len(data).to_bytes(4, "little") + data
    return _with_date(raw, instance_date).hex().upper()


# --- dropping content ----------------------------------------------------------------------------------------------
def _string(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _boolean(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _date_time_zone(value: Any) -> dict[str, str] | None:
    if not isinstance(value, Mapping):
        return None
    return {name: value[name] for name in ("dateTime", "timeZone") if isinstance(value.get(name), str)}


def _organizer(value: Any) -> dict[str, dict[str, str]] | None:
    address = value.get("emailAddress", {}).get("address") if isinstance(value, Mapping) and isinstance(value.get("emailAddress"), Mapping) else None
    return {"emailAddress": {"address": address}} if isinstance(address, str) else None


def _removed(value: Any) -> dict[str, str] | None:
    if not isinstance(value, Mapping):
        return None
    reason = value.get("reason")
    return {"reason": reason} if isinstance(reason, str) else {}


# The allow-list: every field busy time needs, each with what of it is kept. Nothing else survives.
KEPT_FIELDS: Final[Mapping[str, Callable[[Any], Any]]] = {
    "id": _string,
    "@removed": _removed,
    "type": _string,
    "seriesMasterId": _string,
    "iCalUId": _string,
    "changeKey": _string,
    "start": _date_time_zone,
    "end": _date_time_zone,
    "originalStart": _string,
    "originalStartTimeZone": _string,
    "isAllDay": _boolean,
    "showAs": _string,
    "isCancelled": _boolean,
    "sensitivity": _string,
    "organizer": _organizer,
    "lastModifiedDateTime": _string,
}


def keep_busy_fields(event: Mapping[str, Any]) -> dict[str, Any]:
    """Only the allow-listed fields of a Graph event, each reduced to what busy time needs (no names, no content)."""
    kept: dict[str, Any] = {}
    for name, keep in KEPT_FIELDS.items():
        if name in event:
            value = keep(event[name])
            if value is not None:
                kept[name] = value
    return kept


# --- mapping ---------------------------------------------------------------------------------------------------------
class GraphEventError(ValueError):
    """An event entry that cannot become an item at all (no id, or a series master). Content-free message."""


ITEM_TYPES: Final[Mapping[str, ItemType]] = {"singleInstance": "single", "occurrence": "occurrence", "exception": "exception"}
SHOW_AS: Final[Mapping[str, FreeBusy]] = {
    "free": "Free",
    "tentative": "Tentative",
    "busy": "Busy",
    "oof": "OOF",
    "workingElsewhere": "WorkingElsewhere",
    "unknown": "NoData",
}
SENSITIVITY: Final[Mapping[str, Sensitivity]] = {"normal": "Normal", "personal": "Personal", "private": "Private", "confidential": "Confidential"}
MAX_UID = 480  # CalendarItem.uid


def _instant(value: str | None) -> datetime | None:
    """An ISO 8601 instant with an offset or ``Z`` (Edm.DateTimeOffset), as aware UTC; None when not one."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return parsed.astimezone(UTC) if parsed.tzinfo is not None else None


def date_time_of(value: Mapping[str, str] | None) -> datetime | None:
    """A Graph ``dateTimeTimeZone`` ({dateTime, timeZone}) as aware UTC; None when it cannot be read."""
    if not value or not value.get("dateTime"):
        return None
    try:
        local = datetime.fromisoformat(value["dateTime"].strip())
    except ValueError:
        return None
    if local.tzinfo is not None:
        return local.astimezone(UTC)
    zone_name = (value.get("timeZone") or "").strip()
    if not zone_name:
        return None
    if zone_name.upper() == "UTC":
        return local.replace(tzinfo=UTC)
    try:
        return local.replace(tzinfo=zone_of(zone_name)).astimezone(UTC)
    except ItemRejected:
        return None


def _item_type(event: Mapping[str, Any]) -> ItemType:
    kind = event.get("type")
    if kind == "seriesMaster":
        raise GraphEventError(f"event {event['id'][-40:]} is a seriesMaster; a calendar view lists instances only")
    if kind is None:
        return "occurrence" if event.get("seriesMasterId") else "single"   # only an instance of a series has a master
    if kind not in ITEM_TYPES:
        raise GraphEventError(f"event {event['id'][-40:]} has unknown type {str(kind)[:40]!r}")
    return ITEM_TYPES[kind]


def uid_of(event: Mapping[str, Any]) -> str | None:
    """The EWS UID from the event's ``iCalUId``; None when it has none or it is not a Global Object Id."""
    ical_uid = event.get("iCalUId")
    if not isinstance(ical_uid, str):
        return None
    try:
        uid = series_uid_from_ical_uid(ical_uid)
    except NotAGlobalObjectId:
        return None
    return uid if 0 < len(uid) <= MAX_UID else None


def missing_series_uid(event: Mapping[str, Any]) -> str | None:
    """The ``seriesMasterId`` whose UID an occurrence or exception needs because its own iCalUId gives none."""
    if is_removal(event) or uid_of(event) is not None:
        return None
    master = event.get("seriesMasterId")
    return master if isinstance(master, str) and master else None


def _own_zone(event: Mapping[str, Any]) -> str | None:
    """The event's own zone id (Windows or IANA) when we can map it; a custom zone is left to the configured one."""
    name = event.get("originalStartTimeZone")
    if not isinstance(name, str) or not name.strip():
        return None
    try:
        zone_of(name)
    except ItemRejected:
        return None
    return name.strip()


def is_removal(event: Mapping[str, Any]) -> bool:
    return "@removed" in event


def calendar_item_from_event(event: Mapping[str, Any], series_uid: str | None = None, planner_organizers: frozenset[str] = frozenset()) -> CalendarItem:
    """One Graph instance (singleInstance, occurrence, exception) as a content-free CalendarItem.

    ``series_uid``: the UID read from the series master, used when the event's own iCalUId gives none.
    ``planner_organizers`` (lower-cased) decides ``organizer_is_planner``; the organizer's address is not kept
    (decision 71 in docs/decisions.md).
    Raises GraphEventError for an entry without id, a removal, or a series master.
    """
    kept = keep_busy_fields(event)
    item_id = kept.get("id")
    if not item_id:
        raise GraphEventError("event without an id")
    if is_removal(kept):
        raise GraphEventError(f"event {item_id[-40:]} is a removal, not an item")
    item_type = _item_type(kept)
    organizer = kept.get("organizer", {}).get("emailAddress", {}).get("address") or None
    try:
        return CalendarItem(
            item_id=item_id,
            change_key=kept.get("changeKey"),
            uid=uid_of(kept) or series_uid,
            item_type=item_type,
            start=date_time_of(kept.get("start")),
            end=date_time_of(kept.get("end")),
            original_start=_instant(kept.get("originalStart")) if item_type != "single" else None,
            time_zone=_own_zone(kept),
            all_day=bool(kept.get("isAllDay", False)),
            free_busy=SHOW_AS.get(kept.get("showAs", "")),
            cancelled=bool(kept.get("isCancelled", False)),
            sensitivity=SENSITIVITY.get(kept.get("sensitivity", ""), "Normal"),
            organizer_is_planner=organizer_flag(organizer, planner_organizers),
            last_modified=_instant(kept.get("lastModifiedDateTime")),
        )
    except ValidationError as exc:
        raise GraphEventError(f"event {item_id[-40:]}: {describe_validation(exc)}") from None


def sync_change_from_event(event: Mapping[str, Any], series_uid: str | None = None, planner_organizers: frozenset[str] = frozenset()) -> SyncChange:
    """A calendarView/delta entry as a SyncChange: ``@removed`` is a delete, anything else an upsert."""
    item_id = _string(event.get("id"))
    if not item_id:
        raise GraphEventError("delta entry without an id")
    if is_removal(event):
        return SyncChange("delete", item_id, None)
    return SyncChange("upsert", item_id, calendar_item_from_event(event, series_uid, planner_organizers))
