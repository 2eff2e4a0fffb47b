"""The busy policy, one row per scenario: what is busy, for which interval, under which key."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from shared.config import BusySettings
from shared.domain.busy_rules import (
    ItemRejected,
    busy_interval,
    in_window,
    is_planner_originated,
    organizer_flag,
    origin_id,
    sync_window,
)
from shared.domain.contracts import CalendarItem, Interval

UTC = timezone.utc
CPH = ZoneInfo("Europe/Copenhagen")
PARIS = ZoneInfo("Europe/Paris")
LONDON = ZoneInfo("Europe/London")
NEW_YORK = ZoneInfo("America/New_York")
POLICY = BusySettings(planner_organizers=["Planner@STAR.dk"], planner_uid_patterns=[r"^PLANNER-[0-9a-f]+$"]).policy()


def cph(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=CPH)


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


def item(**fields: Any) -> CalendarItem:
    base: dict[str, Any] = {
        "item_id": "AAMkItem1",
        "uid": "040000008200E00074C5B7101A82E008-1",
        "start": cph(2026, 6, 15, 9),
        "end": cph(2026, 6, 15, 10),
        "free_busy": "Busy",
        "time_zone": "Romance Standard Time",
    }
    base.update(fields)
    return CalendarItem(**base)


def all_day(first: datetime, after_last: datetime, **fields: Any) -> CalendarItem:
    return item(start=first, end=after_last, all_day=True, **fields)


def span(start: datetime, end: datetime) -> Interval:
    return Interval(start=start, end=end)


BUSY_ROWS = [
    ("busy is busy", item(), span(utc(2026, 6, 15, 7), utc(2026, 6, 15, 8))),
    ("tentative is busy", item(free_busy="Tentative"), span(utc(2026, 6, 15, 7), utc(2026, 6, 15, 8))),
    ("out of office is busy", item(free_busy="OOF"), span(utc(2026, 6, 15, 7), utc(2026, 6, 15, 8))),
    ("free is not busy", item(free_busy="Free"), None),
    ("no data is not busy", item(free_busy="NoData"), None),
    ("working elsewhere is not busy", item(free_busy="WorkingElsewhere"), None),
    (
        "an all-day working-from-home marker does not block the day",
        all_day(cph(2026, 6, 15), cph(2026, 6, 16), free_busy="WorkingElsewhere"),
        None,
    ),
    ("a cancelled item is not busy", item(cancelled=True), None),
    ("a cancelled item without times is not busy rather than rejected", item(cancelled=True, start=None, end=None), None),
    ("an item in deleted items is not busy", item(in_deleted_items=True), None),
    ("a zero-length item is not busy", item(end=cph(2026, 6, 15, 9)), None),
    ("a private item is busy like any other", item(sensitivity="Private"), span(utc(2026, 6, 15, 7), utc(2026, 6, 15, 8))),
    ("a confidential item is busy like any other", item(sensitivity="Confidential"), span(utc(2026, 6, 15, 7), utc(2026, 6, 15, 8))),
    (
        "a timed multi-day item keeps its exact times",
        item(start=cph(2026, 6, 1, 9), end=cph(2026, 6, 3, 15)),
        span(utc(2026, 6, 1, 7), utc(2026, 6, 3, 13)),
    ),
    (
        "an all-day item covers its local day",
        all_day(cph(2026, 6, 15), cph(2026, 6, 16)),
        span(utc(2026, 6, 14, 22), utc(2026, 6, 15, 22)),
    ),
    (
        "an all-day item of three days covers three local days",
        all_day(cph(2026, 6, 1), cph(2026, 6, 4), free_busy="OOF"),
        span(utc(2026, 5, 31, 22), utc(2026, 6, 3, 22)),
    ),
    (
        "an all-day item on the spring DST Sunday 2026 is 23 hours",
        all_day(datetime(2026, 3, 29, tzinfo=PARIS), datetime(2026, 3, 30, tzinfo=PARIS)),
        span(utc(2026, 3, 28, 23), utc(2026, 3, 29, 22)),
    ),
    (
        "an all-day item on the spring DST Sunday whose end came back before its start is one day",
        all_day(utc(2026, 3, 28, 23), utc(2026, 3, 28, 22)),
        span(utc(2026, 3, 28, 23), utc(2026, 3, 29, 22)),
    ),
    (
        "an all-day item on the spring DST Sunday whose end equals its start is one day",
        all_day(utc(2026, 3, 28, 23), utc(2026, 3, 28, 23)),
        span(utc(2026, 3, 28, 23), utc(2026, 3, 29, 22)),
    ),
    (
        "an all-day item on the autumn DST Sunday 2026 is 25 hours",
        all_day(datetime(2026, 10, 25, tzinfo=PARIS), datetime(2026, 10, 26, tzinfo=PARIS)),
        span(utc(2026, 10, 24, 22), utc(2026, 10, 25, 23)),
    ),
    (
        "an all-day item on the spring DST Sunday 2027 is 23 hours",
        all_day(datetime(2027, 3, 28, tzinfo=PARIS), datetime(2027, 3, 29, tzinfo=PARIS)),
        span(utc(2027, 3, 27, 23), utc(2027, 3, 28, 22)),
    ),
    (
        "an all-day item on the autumn DST Sunday 2027 is 25 hours",
        all_day(datetime(2027, 10, 31, tzinfo=PARIS), datetime(2027, 11, 1, tzinfo=PARIS)),
        span(utc(2027, 10, 30, 22), utc(2027, 10, 31, 23)),
    ),
    (
        "an all-day item spanning the autumn DST change covers both local days",
        all_day(datetime(2026, 10, 24, tzinfo=PARIS), datetime(2026, 10, 26, tzinfo=PARIS)),
        span(utc(2026, 10, 23, 22), utc(2026, 10, 25, 23)),
    ),
    (
        "an all-day item written with New York offsets keeps its Copenhagen day (the instants matter)",
        all_day(datetime(2026, 3, 28, 19, tzinfo=NEW_YORK), datetime(2026, 3, 29, 18, tzinfo=NEW_YORK)),
        span(utc(2026, 3, 28, 23), utc(2026, 3, 29, 22)),
    ),
    (
        "an all-day item turned into New York midnights by a host-zone slip keeps its day",
        all_day(datetime(2026, 3, 27, tzinfo=NEW_YORK), datetime(2026, 3, 28, tzinfo=NEW_YORK)),
        span(utc(2026, 3, 26, 23), utc(2026, 3, 27, 23)),
    ),
    (
        "an all-day item in GMT Standard Time is its London date, busy on Copenhagen's clock",
        all_day(datetime(2026, 6, 10, tzinfo=LONDON), datetime(2026, 6, 11, tzinfo=LONDON), time_zone="GMT Standard Time"),
        span(utc(2026, 6, 9, 22), utc(2026, 6, 10, 22)),
    ),
    (
        "an all-day item in Eastern Standard Time is its New York date, busy on Copenhagen's clock",
        all_day(datetime(2026, 6, 10, tzinfo=NEW_YORK), datetime(2026, 6, 11, tzinfo=NEW_YORK), time_zone="Eastern Standard Time"),
        span(utc(2026, 6, 9, 22), utc(2026, 6, 10, 22)),
    ),
    (
        "an all-day item with an IANA zone id is accepted",
        all_day(cph(2026, 6, 15), cph(2026, 6, 16), time_zone="Europe/Copenhagen"),
        span(utc(2026, 6, 14, 22), utc(2026, 6, 15, 22)),
    ),
    (
        "an all-day item without a zone id uses the configured zone",
        all_day(cph(2026, 12, 24), cph(2026, 12, 25), time_zone=None),
        span(utc(2026, 12, 23, 23), utc(2026, 12, 24, 23)),
    ),
    ("a Planner invitation is recognised by its organizer flag", item(organizer_is_planner=True), None),
    ("a Planner invitation is recognised by its UID pattern", item(uid="PLANNER-00ab12"), None),
    ("a Planner UID wins over an organizer that is not Planner's", item(uid="PLANNER-00ab12", organizer_is_planner=False), None),
    ("an organizer that is not Planner's is busy", item(organizer_is_planner=False), span(utc(2026, 6, 15, 7), utc(2026, 6, 15, 8))),
    ("an unknown organizer is busy", item(organizer_is_planner=None), span(utc(2026, 6, 15, 7), utc(2026, 6, 15, 8))),
    ("a timed item's unknown zone id does not matter", item(time_zone="Customized Time Zone"), span(utc(2026, 6, 15, 7), utc(2026, 6, 15, 8))),
]


@pytest.mark.parametrize("given, expected", [row[1:] for row in BUSY_ROWS], ids=[row[0] for row in BUSY_ROWS])
def test_busy_interval(given: CalendarItem, expected: Interval | None) -> None:
    assert busy_interval(given, POLICY) == expected


REJECTED_ROWS = [
    ("an all-day item with an unknown zone id", all_day(cph(2026, 6, 15), cph(2026, 6, 16), time_zone="Customized Time Zone"), "unknown time zone id"),
    ("a timed item ending before it starts", item(end=cph(2026, 6, 15, 8)), "ends before it starts"),
    ("a live item without a start", item(start=None), "has no start"),
    ("a live item without an end", item(end=None), "has no end"),
    ("a live item without a free/busy status", item(free_busy=None), "no free/busy status"),
]


@pytest.mark.parametrize("given, reason", [row[1:] for row in REJECTED_ROWS], ids=[row[0] for row in REJECTED_ROWS])
def test_impossible_items_are_rejected_with_a_reason(given: CalendarItem, reason: str) -> None:
    with pytest.raises(ItemRejected, match=reason) as raised:
        busy_interval(given, POLICY)
    assert isinstance(raised.value, ValueError)
    assert raised.value.reason == str(raised.value)


UID = "040000008200E00074C5B7101A82E008-1"
ORIGIN_ROWS = [
    ("a single item is its UID", item(), UID),
    ("a series master is its UID", item(item_type="master"), UID),
    ("a summer occurrence uses Copenhagen summer time", item(item_type="occurrence", original_start=utc(2026, 6, 15, 7)), f"{UID}$20260615-090000"),
    ("a winter occurrence uses Copenhagen winter time", item(item_type="occurrence", original_start=utc(2026, 12, 1, 8)), f"{UID}$20261201-090000"),
    ("an exception uses its original start, not its new one", item(item_type="exception", start=cph(2026, 6, 16, 14), end=cph(2026, 6, 16, 15), original_start=utc(2026, 6, 15, 7)), f"{UID}$20260615-090000"),
    ("an original start given with a New York offset still formats in Copenhagen", item(item_type="occurrence", original_start=datetime(2026, 6, 15, 3, tzinfo=NEW_YORK)), f"{UID}$20260615-090000"),
    ("the first 02:30 of the fall-back night", item(item_type="occurrence", original_start=utc(2026, 10, 25, 0, 30)), f"{UID}$20261025-023000"),
    ("the second 02:30 of the fall-back night gives the same wall-clock key", item(item_type="occurrence", original_start=utc(2026, 10, 25, 1, 30)), f"{UID}$20261025-023000"),
    ("an original start just after the spring gap is 03:30", item(item_type="occurrence", original_start=utc(2026, 3, 29, 1, 30)), f"{UID}$20260329-033000"),
]


@pytest.mark.parametrize("given, expected", [row[1:] for row in ORIGIN_ROWS], ids=[row[0] for row in ORIGIN_ROWS])
def test_origin_id_keeps_the_reference_format(given: CalendarItem, expected: str) -> None:
    assert origin_id(given, CPH) == expected


def test_origin_id_does_not_depend_on_the_offset_the_original_start_arrived_in() -> None:
    instant = utc(2026, 10, 25, 1, 30)
    keys = {origin_id(item(item_type="occurrence", original_start=instant.astimezone(zone)), CPH) for zone in (UTC, CPH, NEW_YORK, LONDON)}
    assert keys == {f"{UID}$20261025-023000"}


@pytest.mark.parametrize(
    "given, reason",
    [(item(uid=None), "no UID"), (item(uid=""), "no UID"), (item(item_type="occurrence", original_start=None), "no original start")],
    ids=["an item without a UID", "an item with an empty UID", "an occurrence without an original start"],
)
def test_items_without_identity_are_rejected(given: CalendarItem, reason: str) -> None:
    with pytest.raises(ItemRejected, match=reason):
        origin_id(given, CPH)


def test_organizer_addresses_compare_case_insensitively_when_read() -> None:
    assert organizer_flag(" PLANNER@star.DK ", POLICY.planner_organizers) is True
    assert organizer_flag("colleague@kommune.dk", POLICY.planner_organizers) is False
    assert organizer_flag("planner@star.dk.example", POLICY.planner_organizers) is False


def test_no_organizer_address_gives_an_unknown_flag() -> None:
    assert organizer_flag(None, POLICY.planner_organizers) is None
    assert organizer_flag("", POLICY.planner_organizers) is None


def test_planner_originated_items_are_recognised_by_the_flag_or_the_uid_only() -> None:
    assert is_planner_originated(item(organizer_is_planner=True), POLICY)
    assert not is_planner_originated(item(organizer_is_planner=False), POLICY)
    assert not is_planner_originated(item(organizer_is_planner=None, uid="not-planner"), POLICY)
    assert is_planner_originated(item(organizer_is_planner=None, uid="PLANNER-00ab12"), POLICY)


def test_a_calendar_item_has_no_field_for_the_organizer_address() -> None:
    assert not any("organizer" in name and name != "organizer_is_planner" for name in CalendarItem.model_fields)
    with pytest.raises(ValueError, match="organizer"):
        item(organizer="planner@star.dk")


def test_the_busy_statuses_come_from_configuration() -> None:
    policy = BusySettings(busy_statuses=["Busy", "WorkingElsewhere"]).policy()
    assert busy_interval(item(free_busy="WorkingElsewhere"), policy) is not None
    assert busy_interval(item(free_busy="Tentative"), policy) is None


WINDOW_ROWS = [
    ("three months ahead on Copenhagen's wall clock across spring DST", cph(2026, 3, 10, 10), 3, utc(2026, 6, 10, 8)),
    ("three months ahead across autumn DST", cph(2026, 9, 10, 10), 3, utc(2026, 12, 10, 9)),
    ("the 31st clamps to the end of a shorter month", cph(2026, 1, 31, 12), 3, utc(2026, 4, 30, 10)),
    ("into a new year and February", cph(2026, 11, 30, 12), 3, utc(2027, 2, 28, 11)),
    ("a configured window of one month", cph(2026, 6, 15, 9), 1, utc(2026, 7, 15, 7)),
]


@pytest.mark.parametrize("now, months, end", [row[1:] for row in WINDOW_ROWS], ids=[row[0] for row in WINDOW_ROWS])
def test_sync_window(now: datetime, months: int, end: datetime) -> None:
    window = sync_window(now, BusySettings(window_months=months).policy())
    assert window == Interval(start=now, end=end)


NOW = cph(2026, 6, 15, 12)
WINDOW = sync_window(NOW, POLICY)   # ends 2026-09-15 12:00 Copenhagen
EDGE_ROWS = [
    ("an item starting exactly at the window end is not sent", span(WINDOW.end, WINDOW.end + timedelta(hours=1)), False),
    ("an item starting a minute before the window end is sent", span(WINDOW.end - timedelta(minutes=1), WINDOW.end + timedelta(hours=1)), True),
    ("an item ending exactly now is not sent", span(NOW - timedelta(hours=1), NOW), False),
    ("an item ending a minute after now is sent", span(NOW - timedelta(hours=1), NOW + timedelta(minutes=1)), True),
    ("an item created for later today is sent", span(cph(2026, 6, 15, 15), cph(2026, 6, 15, 16)), True),
    ("an item already under way is sent", span(cph(2026, 6, 15, 11), cph(2026, 6, 15, 13)), True),
    ("an item already over this morning is not sent", span(cph(2026, 6, 15, 8), cph(2026, 6, 15, 9)), False),
]


@pytest.mark.parametrize("interval, sent", [row[1:] for row in EDGE_ROWS], ids=[row[0] for row in EDGE_ROWS])
def test_window_edges(interval: Interval, sent: bool) -> None:
    assert in_window(interval, WINDOW) is sent
