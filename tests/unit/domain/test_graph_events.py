"""Graph events to CalendarItems: the mapping table, content dropped, the iCalUId ↔ EWS UID round trip, and the same
OriginSystemIdentifier (and busy interval) as the EWS path for the same item (decision 4 in docs/decisions.md)."""

from __future__ import annotations

import json
import re
from datetime import date, datetime, time, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.config import BusySettings
from shared.domain.busy_rules import ItemRejected, busy_interval, origin_id
from shared.domain.contracts import CalendarItem
from shared.domain.graph_events import (
    GOID_CLASS_ID,
    KEPT_FIELDS,
    GraphEventError,
    NotAGlobalObjectId,
    calendar_item_from_event,
    ical_uid_for,
    is_global_object_id,
    keep_busy_fields,
    missing_series_uid,
    series_uid_from_ical_uid,
    sync_change_from_event,
)
from shared.domain.mailbox_reads import SyncChange

UTC = timezone.utc
CPH = ZoneInfo("Europe/Copenhagen")
POLICY = BusySettings().policy()
CANARY = "CANARY-7f3a"
# An Outlook/Exchange-created item: class id, zero instance date, creation time (FILETIME), reserved, size 16, data.
OUTLOOK_UID = (
    "040000008200E00074C5B7101A82E008" "00000000" "A0A742E5073DDA01" "0000000000000000" "10000000"
    "998F8D5FA0E3F44D9B1C7C0B6E1A1B2C"
)
EXTERNAL_UID = "20261019T070000Z-4711@kalender.kommune.example"


def _dt(moment: datetime) -> dict[str, str]:
    utc = moment.astimezone(UTC)
    return {"dateTime": utc.strftime("%Y-%m-%dT%H:%M:%S.0000000"), "timeZone": "UTC"}


def graph_event(uid: str, start: datetime, end: datetime, kind: str = "singleInstance", original: datetime | None = None,
                **extra: Any) -> dict[str, Any]:
    """A Graph event as calendarView/delta sends it (with Prefer outlook.timezone="UTC"), content included."""
    instance_date = original.astimezone(CPH).date() if original is not None else None
    event: dict[str, Any] = {
        "@odata.etag": 'W/"abc"',
        "id": f"AAMk-{uid[-6:]}-{(original or start).isoformat()}",
        "createdDateTime": "2026-09-01T08:00:00.1234567Z",
        "lastModifiedDateTime": "2026-09-02T09:30:00.1234567Z",
        "changeKey": "DwAAABYAAAA",
        "categories": [CANARY],
        "originalStartTimeZone": "Romance Standard Time",
        "originalEndTimeZone": "Romance Standard Time",
        "iCalUId": ical_uid_for(uid, instance_date),
        "subject": CANARY,
        "bodyPreview": CANARY,
        "body": {"contentType": "html", "content": f"<p>{CANARY}</p>"},
        "importance": "normal",
        "sensitivity": "normal",
        "isAllDay": False,
        "isCancelled": False,
        "showAs": "busy",
        "type": kind,
        "seriesMasterId": "AAMk-master" if kind != "singleInstance" else None,
        "webLink": f"https://outlook.office365.com/owa/?itemid={CANARY}",
        "start": _dt(start),
        "end": _dt(end),
        "location": {"displayName": CANARY, "address": {"street": CANARY}},
        "locations": [{"displayName": CANARY}],
        "attendees": [{"emailAddress": {"name": CANARY, "address": "borger@example.dk"}}],
        "organizer": {"emailAddress": {"name": CANARY, "address": "anne@kommune.example"}},
        "onlineMeeting": {"joinUrl": f"https://teams.example/{CANARY}"},
        "someFutureField": CANARY,
    }
    if original is not None:
        event["originalStart"] = original.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    event.update(extra)
    return event


# --- the mapping table ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("show_as", "free_busy"),
    [("free", "Free"), ("tentative", "Tentative"), ("busy", "Busy"), ("oof", "OOF"), ("workingElsewhere", "WorkingElsewhere"),
     ("unknown", "NoData"), ("somethingNew", None)],
)
def test_show_as_becomes_the_free_busy_status(show_as: str, free_busy: str | None) -> None:
    start = datetime(2026, 10, 19, 7, tzinfo=UTC)
    item = calendar_item_from_event(graph_event(OUTLOOK_UID, start, start + timedelta(hours=1), showAs=show_as))
    assert item.free_busy == free_busy


@pytest.mark.parametrize(
    ("sensitivity", "expected"),
    [("normal", "Normal"), ("personal", "Personal"), ("private", "Private"), ("confidential", "Confidential"), (None, "Normal")],
)
def test_sensitivity(sensitivity: str | None, expected: str) -> None:
    start = datetime(2026, 10, 19, 7, tzinfo=UTC)
    assert calendar_item_from_event(graph_event(OUTLOOK_UID, start, start, sensitivity=sensitivity)).sensitivity == expected


@pytest.mark.parametrize(("kind", "item_type"), [("singleInstance", "single"), ("occurrence", "occurrence"), ("exception", "exception")])
def test_instance_types(kind: str, item_type: str) -> None:
    start = datetime(2026, 10, 19, 7, tzinfo=UTC)
    original = start if kind != "singleInstance" else None
    item = calendar_item_from_event(graph_event(OUTLOOK_UID, start, start + timedelta(minutes=30), kind, original))
    assert item.item_type == item_type
    assert item.original_start == original


def test_a_series_master_never_comes_from_a_calendar_view() -> None:
    start = datetime(2026, 10, 19, 7, tzinfo=UTC)
    with pytest.raises(GraphEventError, match="seriesMaster"):
        calendar_item_from_event(graph_event(OUTLOOK_UID, start, start, "seriesMaster"))


def test_an_unknown_type_or_a_missing_id_is_refused() -> None:
    start = datetime(2026, 10, 19, 7, tzinfo=UTC)
    with pytest.raises(GraphEventError, match="unknown type"):
        calendar_item_from_event(graph_event(OUTLOOK_UID, start, start, "appointment"))
    event = graph_event(OUTLOOK_UID, start, start)
    del event["id"]
    with pytest.raises(GraphEventError, match="without an id"):
        calendar_item_from_event(event)


def test_every_field_is_mapped() -> None:
    start, original = datetime(2026, 10, 19, 7, tzinfo=UTC), datetime(2026, 10, 19, 6, tzinfo=UTC)
    event = graph_event(OUTLOOK_UID, start, start + timedelta(hours=1), "exception", original, isCancelled=True, sensitivity="private")
    item = calendar_item_from_event(event)
    assert item == CalendarItem(
        item_id=event["id"],
        change_key="DwAAABYAAAA",
        uid=OUTLOOK_UID,
        item_type="exception",
        start=start,
        end=start + timedelta(hours=1),
        original_start=original,
        time_zone="Romance Standard Time",
        all_day=False,
        free_busy="Busy",
        cancelled=True,
        sensitivity="Private",
        organizer_is_planner=False,
        last_modified=datetime(2026, 9, 2, 9, 30, 0, 123456, tzinfo=UTC),
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"dateTime": "2026-10-19T07:00:00.0000000", "timeZone": "UTC"}, datetime(2026, 10, 19, 7, tzinfo=UTC)),
        ({"dateTime": "2026-10-19T09:00:00.0000000", "timeZone": "Romance Standard Time"}, datetime(2026, 10, 19, 7, tzinfo=UTC)),
        ({"dateTime": "2026-10-19T09:00:00.0000000", "timeZone": "Europe/Copenhagen"}, datetime(2026, 10, 19, 7, tzinfo=UTC)),
        ({"dateTime": "2026-10-19T03:00:00.0000000", "timeZone": "Eastern Standard Time"}, datetime(2026, 10, 19, 7, tzinfo=UTC)),
        ({"dateTime": "2026-10-19T07:00:00Z", "timeZone": "Tokyo Standard Time"}, datetime(2026, 10, 19, 7, tzinfo=UTC)),
        ({"dateTime": "2026-10-19T07:00:00.0000000", "timeZone": "tzone://Microsoft/Custom"}, None),
        ({"dateTime": "2026-10-19T07:00:00.0000000"}, None),
        ({"dateTime": "not a time", "timeZone": "UTC"}, None),
        ("2026-10-19T07:00:00Z", None),
        (None, None),
    ],
)
def test_start_in_utc_or_a_named_zone(value: Any, expected: datetime | None) -> None:
    event = graph_event(OUTLOOK_UID, datetime(2026, 10, 19, 7, tzinfo=UTC), datetime(2026, 10, 19, 8, tzinfo=UTC))
    event["start"] = value
    assert calendar_item_from_event(event).start == expected


def test_missing_fields_become_none_and_the_busy_rules_reject_the_item_with_a_reason() -> None:
    item = calendar_item_from_event({"id": "AAMk-bare"})
    assert (item.uid, item.start, item.end, item.free_busy, item.organizer_is_planner, item.last_modified, item.time_zone) == (None,) * 7
    assert item.item_type == "single" and not item.cancelled and item.sensitivity == "Normal"
    with pytest.raises(ItemRejected, match="no free/busy status"):
        busy_interval(item, POLICY)
    with pytest.raises(ItemRejected, match="no UID"):
        origin_id(item, CPH)


def test_an_instance_without_type_but_with_a_series_master_is_an_occurrence() -> None:
    item = calendar_item_from_event({"id": "AAMk-x", "seriesMasterId": "AAMk-m", "originalStart": "2026-10-19T07:00:00Z"})
    assert item.item_type == "occurrence" and item.original_start == datetime(2026, 10, 19, 7, tzinfo=UTC)


def test_a_custom_zone_is_left_to_the_configured_one() -> None:
    start = datetime(2026, 10, 18, 22, tzinfo=UTC)
    event = graph_event(EXTERNAL_UID, start, start + timedelta(days=1), isAllDay=True, originalStartTimeZone="tzone://Microsoft/Custom")
    item = calendar_item_from_event(event)
    assert item.time_zone is None
    assert busy_interval(item, POLICY) is not None


def test_removed_entries_become_deletes() -> None:
    removed = {"@odata.type": "#microsoft.graph.event", "id": "AAMk-gone", "@removed": {"reason": "deleted"}}
    assert sync_change_from_event(removed) == SyncChange("delete", "AAMk-gone", None)
    with pytest.raises(GraphEventError, match="removal"):
        calendar_item_from_event(removed)
    start = datetime(2026, 10, 19, 7, tzinfo=UTC)
    change = sync_change_from_event(graph_event(OUTLOOK_UID, start, start))
    assert change.change == "upsert" and change.item is not None and change.item.uid == OUTLOOK_UID


# --- content is dropped ----------------------------------------------------------------------------------------------
def test_only_allow_listed_fields_survive_and_no_content_at_all() -> None:
    start = datetime(2026, 10, 19, 7, tzinfo=UTC)
    event = graph_event(OUTLOOK_UID, start, start + timedelta(hours=1), "occurrence", start)
    kept = keep_busy_fields(event)
    assert set(kept) <= set(KEPT_FIELDS)
    assert CANARY not in json.dumps(kept)
    assert kept["organizer"] == {"emailAddress": {"address": "anne@kommune.example"}}
    for name in ("subject", "body", "bodyPreview", "location", "locations", "attendees", "categories", "onlineMeeting", "webLink", "someFutureField"):
        assert name not in kept
    mapped = calendar_item_from_event(event, planner_organizers=frozenset({"anne@kommune.example"})).model_dump_json()
    assert CANARY not in mapped and "anne@kommune.example" not in mapped


def test_the_organizer_becomes_a_flag_against_planners_addresses_and_its_address_is_not_kept() -> None:
    start = datetime(2026, 10, 19, 7, tzinfo=UTC)
    planner = frozenset({"noreply@planner.star.dk"})
    from_planner = graph_event(OUTLOOK_UID, start, start + timedelta(hours=1), organizer={"emailAddress": {"name": CANARY, "address": "NoReply@Planner.STAR.dk"}})
    from_citizen = graph_event(OUTLOOK_UID, start, start + timedelta(hours=1), organizer={"emailAddress": {"name": CANARY, "address": "borger-7f3a@borger.dk"}})
    no_organizer = graph_event(OUTLOOK_UID, start, start + timedelta(hours=1), organizer=None)
    assert calendar_item_from_event(from_planner, planner_organizers=planner).organizer_is_planner is True
    assert calendar_item_from_event(from_citizen, planner_organizers=planner).organizer_is_planner is False
    assert calendar_item_from_event(no_organizer, planner_organizers=planner).organizer_is_planner is None
    assert sync_change_from_event(from_planner, planner_organizers=planner).item == calendar_item_from_event(from_planner, planner_organizers=planner)
    for event in (from_planner, from_citizen):
        dumped = calendar_item_from_event(event, planner_organizers=planner).model_dump_json().lower()
        assert "borger" not in dumped and "planner.star.dk" not in dumped and CANARY.lower() not in dumped


def test_content_smuggled_into_allowed_fields_is_dropped_too() -> None:
    event = {
        "id": "AAMk-1",
        "start": {"dateTime": "2026-10-19T07:00:00", "timeZone": "UTC", "note": CANARY},
        "organizer": {"emailAddress": {"address": "a@b.dk", "name": CANARY}, "extra": CANARY},
        "@removed": {"reason": "deleted", "why": CANARY},
        "showAs": {"text": CANARY},
    }
    kept = keep_busy_fields(event)
    assert CANARY not in json.dumps(kept)
    assert "showAs" not in kept


# --- the UID ---------------------------------------------------------------------------------------------------------
def test_an_outlook_global_object_id_keeps_its_hex_with_the_date_zeroed() -> None:
    occurrence = ical_uid_for(OUTLOOK_UID, date(2026, 10, 19))
    assert occurrence[32:40] == "07EA0A13"   # YH YL M D: 2026-10-19
    assert occurrence[:32] == OUTLOOK_UID[:32] and occurrence[40:] == OUTLOOK_UID[40:]
    assert series_uid_from_ical_uid(occurrence) == OUTLOOK_UID
    assert series_uid_from_ical_uid(occurrence.lower()) == OUTLOOK_UID
    assert ical_uid_for(OUTLOOK_UID, None) == OUTLOOK_UID


def test_an_invitation_from_outside_exchange_gives_the_senders_uid() -> None:
    wrapped = ical_uid_for(EXTERNAL_UID, date(2026, 10, 19))
    assert wrapped.startswith(GOID_CLASS_ID.hex().upper())
    assert "7643616C2D556964" in wrapped   # "vCal-Uid"
    assert wrapped.endswith("00")
    assert series_uid_from_ical_uid(wrapped) == EXTERNAL_UID


def test_a_real_looking_vcal_global_object_id_from_the_wire() -> None:
    # [MS-OXOCAL]-style: an occurrence on 2026-10-19 of an invitation whose UID is EXTERNAL_UID
    data = b"vCal-Uid" + b"\x01\x00\x00\x00" + EXTERNAL_UID.encode() + b"\x00"
    raw = GOID_CLASS_ID + bytes.fromhex("07EA0A13") + bytes(16) + len(data).to_bytes(4, "little") + data
    assert series_uid_from_ical_uid(raw.hex()) == EXTERNAL_UID


@pytest.mark.parametrize(
    "value",
    ["", "not hex at all", EXTERNAL_UID, "00" * 60, OUTLOOK_UID[:-2], OUTLOOK_UID + "00", OUTLOOK_UID[:-1] + "Z",
     GOID_CLASS_ID.hex() + "00" * 20 + "05000000"],
)
def test_what_is_not_a_global_object_id(value: str) -> None:
    assert not is_global_object_id(value)
    with pytest.raises(NotAGlobalObjectId):
        series_uid_from_ical_uid(value)


def test_an_event_whose_ical_uid_is_unusable_has_no_uid_unless_the_series_gives_one() -> None:
    start = datetime(2026, 10, 19, 7, tzinfo=UTC)
    event = graph_event(OUTLOOK_UID, start, start, "occurrence", start, iCalUId="garbage")
    assert calendar_item_from_event(event).uid is None
    assert missing_series_uid(event) == "AAMk-master"
    assert calendar_item_from_event(event, series_uid=OUTLOOK_UID).uid == OUTLOOK_UID
    assert missing_series_uid(graph_event(OUTLOOK_UID, start, start, "occurrence", start)) is None


printable_uids = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=120).filter(lambda u: not is_global_object_id(u))
instance_dates = st.one_of(st.none(), st.dates(min_value=date(1900, 1, 1), max_value=date(2999, 12, 31)))


@st.composite
def goid_uids(draw: st.DrawFn) -> str:
    """A Global Object Id as EWS reports one: uppercase hex, zero instance date, data that is not a vCal-Uid wrapper."""
    data = draw(st.binary(min_size=0, max_size=64).filter(lambda d: not d.startswith(b"vCal-Uid")))
    raw = GOID_CLASS_ID + bytes(4) + draw(st.binary(min_size=8, max_size=8)) + bytes(8) + len(data).to_bytes(4, "little") + data
    return raw.hex().upper()


@settings(max_examples=300)
@given(uid=st.one_of(printable_uids, goid_uids()), day=instance_dates, other_day=instance_dates)
def test_uid_round_trip(uid: str, day: date | None, other_day: date | None) -> None:
    ical = ical_uid_for(uid, day)
    assert is_global_object_id(ical) and ical == ical.upper()
    assert series_uid_from_ical_uid(ical) == uid
    assert series_uid_from_ical_uid(ical_uid_for(uid, other_day)) == uid   # every occurrence names the same series
    if day is not None:
        assert ical[32:40] == f"{day.year:04X}{day.month:02X}{day.day:02X}"


# --- the same OriginSystemIdentifier as EWS ---------------------------------------------------------------------
def ews_item(uid: str, item_id: str, start: datetime, end: datetime, item_type: str = "single", original: datetime | None = None,
             all_day: bool = False, free_busy: str = "Busy") -> CalendarItem:
    """What ``shared.adapters.ews.to_calendar_item`` gives for the item (UID as EWS reports it, instants in UTC)."""
    return CalendarItem(item_id=item_id, uid=uid, item_type=item_type, start=start, end=end, original_start=original,
                        time_zone="Romance Standard Time", all_day=all_day, free_busy=free_busy, organizer_is_planner=False)


def _local(day: date, hour: int, minute: int = 0) -> datetime:
    return datetime.combine(day, time(hour, minute), tzinfo=CPH).astimezone(UTC)


CASES = [
    ("single, Outlook UID", OUTLOOK_UID, _local(date(2026, 10, 19), 9), _local(date(2026, 10, 19), 10), "single", None, False),
    ("single, external UID", EXTERNAL_UID, _local(date(2026, 10, 19), 9), _local(date(2026, 10, 19), 10), "single", None, False),
    ("occurrence", OUTLOOK_UID, _local(date(2026, 10, 20), 9), _local(date(2026, 10, 20), 9, 15), "occurrence", _local(date(2026, 10, 20), 9), False),
    ("moved exception", EXTERNAL_UID, _local(date(2026, 10, 22), 13), _local(date(2026, 10, 22), 14), "exception", _local(date(2026, 10, 21), 9), False),
    ("occurrence after the autumn change", OUTLOOK_UID, _local(date(2026, 10, 26), 9), _local(date(2026, 10, 26), 10), "occurrence", _local(date(2026, 10, 26), 9), False),
    ("occurrence on the spring Sunday", OUTLOOK_UID, _local(date(2027, 3, 28), 3), _local(date(2027, 3, 28), 4), "occurrence", _local(date(2027, 3, 28), 3), False),
    ("late-evening occurrence (next day in UTC+14)", EXTERNAL_UID, _local(date(2026, 12, 31), 23, 30), _local(date(2027, 1, 1), 0, 30), "occurrence", _local(date(2026, 12, 31), 23, 30), False),
    ("all-day OOF", OUTLOOK_UID, _local(date(2026, 10, 23), 0), _local(date(2026, 10, 24), 0), "single", None, True),
    ("all-day on the autumn Sunday", EXTERNAL_UID, _local(date(2026, 10, 25), 0), _local(date(2026, 10, 26), 0), "single", None, True),
    ("all-day occurrence on the spring Sunday", OUTLOOK_UID, _local(date(2027, 3, 28), 0), _local(date(2027, 3, 29), 0), "occurrence", _local(date(2027, 3, 28), 0), True),
]


@pytest.mark.parametrize(("name", "uid", "start", "end", "item_type", "original", "all_day"), CASES, ids=[c[0] for c in CASES])
def test_graph_gives_the_same_origin_id_and_busy_time_as_ews(name: str, uid: str, start: datetime, end: datetime, item_type: str,
                                                             original: datetime | None, all_day: bool) -> None:
    kind = {"single": "singleInstance", "occurrence": "occurrence", "exception": "exception"}[item_type]
    ews = ews_item(uid, "ews-id", start, end, item_type, original, all_day, "OOF" if all_day else "Busy")
    graph = calendar_item_from_event(graph_event(uid, start, end, kind, original, isAllDay=all_day, showAs="oof" if all_day else "busy"))
    assert origin_id(graph, POLICY.zone) == origin_id(ews, POLICY.zone)
    assert busy_interval(graph, POLICY) == busy_interval(ews, POLICY)


def test_the_origin_id_format_for_an_occurrence() -> None:
    original = _local(date(2026, 10, 20), 9)
    graph = calendar_item_from_event(graph_event(EXTERNAL_UID, original, original + timedelta(minutes=15), "occurrence", original))
    assert origin_id(graph, POLICY.zone) == f"{EXTERNAL_UID}$20261020-090000"
    assert re.fullmatch(r".+\$\d{8}-\d{6}", origin_id(graph, POLICY.zone))


def test_an_all_day_item_given_as_utc_midnights_lands_on_the_same_days() -> None:
    """Whether Graph gives an all-day item's midnights in its own zone or as floating midnights in UTC, the days agree."""
    own = calendar_item_from_event(graph_event(OUTLOOK_UID, _local(date(2027, 3, 28), 0), _local(date(2027, 3, 29), 0), isAllDay=True))
    floating = calendar_item_from_event(graph_event(OUTLOOK_UID, datetime(2027, 3, 28, tzinfo=UTC), datetime(2027, 3, 29, tzinfo=UTC), isAllDay=True))
    assert busy_interval(own, POLICY) == busy_interval(floating, POLICY)


@settings(max_examples=200)
@given(
    uid=st.one_of(printable_uids.filter(lambda u: len(u) <= 120), goid_uids()),
    original=st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2090, 12, 31), timezones=st.just(UTC)),
    kind=st.sampled_from(["occurrence", "exception"]),
)
def test_origin_ids_agree_for_any_uid_and_original_start(uid: str, original: datetime, kind: str) -> None:
    original = original.replace(microsecond=0)
    ews = ews_item(uid, "ews-id", original, original + timedelta(hours=1), kind, original)
    graph = calendar_item_from_event(graph_event(uid, original, original + timedelta(hours=1), kind, original))
    assert origin_id(graph, POLICY.zone) == origin_id(ews, POLICY.zone)
