"""exchangelib's calendar item to our CalendarItem: the organizer becomes a flag, nothing of it is kept (decision 71)."""

from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import pytest
from exchangelib.properties import Attendee, Mailbox

from shared.adapters.ews import to_calendar_item

PLANNER = frozenset({"noreply@planner.star.dk"})
CANARY_ADDRESS, CANARY_NAME, CANARY_ATTENDEE = "canary-organizer-7f3a@borger.dk", "Canary Organizer 7f3a", "Canary Attendee Q9"


def ews_item(organizer: Mailbox | None) -> Any:
    start = datetime(2027, 1, 4, 8, tzinfo=timezone.utc)
    return SimpleNamespace(
        id="AAMk1", changekey="CK1", uid="uid-1", type="Single", start=start, end=start.replace(hour=9), legacy_free_busy_status="Busy",
        organizer=organizer, subject="Canary subject", required_attendees=[Attendee(mailbox=Mailbox(name=CANARY_ATTENDEE, email_address="a@laege.dk"))],
    )


@pytest.mark.parametrize(
    ("organizer", "flag"),
    [
        (Mailbox(name=CANARY_NAME, email_address="NoReply@Planner.STAR.dk"), True),
        (Mailbox(name=CANARY_NAME, email_address=CANARY_ADDRESS), False),
        (Mailbox(name=CANARY_NAME), None),
        (None, None),
    ],
    ids=["planner", "citizen", "name-only", "none"],
)
def test_the_organizer_is_read_as_a_flag_only(organizer: Mailbox | None, flag: bool | None) -> None:
    item = to_calendar_item(ews_item(organizer), PLANNER)
    assert item.organizer_is_planner is flag
    dumped = item.model_dump_json().lower()
    for canary in (CANARY_ADDRESS, CANARY_NAME, CANARY_ATTENDEE, "planner.star.dk", "canary subject"):
        assert canary.lower() not in dumped


def test_without_planner_addresses_no_organizer_is_planners() -> None:
    assert to_calendar_item(ews_item(Mailbox(email_address="noreply@planner.star.dk"))).organizer_is_planner is False


def test_a_whole_body_is_handed_to_the_parser_in_large_slices_and_a_stream_is_left_to_requests() -> None:
    """exchangelib parses from ``iter_content()`` (a byte per step by default); a body already read goes in 64 KiB
    slices (decision 93), a stream's body not yet read is left to requests."""
    import io

    from shared.adapters.ews import _WholeBodyResponse

    body = bytes(range(256)) * 800   # 204,800 bytes
    whole = _WholeBodyResponse()
    whole._content, whole._content_consumed = body, True  # type: ignore[attr-defined]
    slices = list(whole.iter_content())
    assert b"".join(slices) == body and len(slices) == 4
    stream = _WholeBodyResponse()
    stream.raw = io.BytesIO(body[:10])
    assert list(stream.iter_content()) == [bytes([b]) for b in body[:10]]


def _calendar_item_xml(fields: str) -> Any:
    from lxml import etree

    return etree.fromstring(f'<t:CalendarItem xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types">{fields}</t:CalendarItem>')


def test_our_reads_parse_an_item_straight_from_its_element_as_exchangelib_would() -> None:
    """Decision 101: the fields the rules need, read from the element; zones kept as exchangelib keeps them (its
    Windows id, an IANA name turned into one, None for an id it does not know), booleans as it reads them."""
    from shared.adapters.ews import _ReadItem

    element = _calendar_item_xml(
        '<t:ItemId Id="AAMk2" ChangeKey="CK2"/><t:UID>uid-2</t:UID><t:CalendarItemType>Exception</t:CalendarItemType>'
        "<t:Start>2027-01-04T08:00:00Z</t:Start><t:End>2027-01-04T09:00:00Z</t:End><t:OriginalStart>2027-01-03T08:00:00Z</t:OriginalStart>"
        "<t:IsAllDayEvent>false</t:IsAllDayEvent><t:IsCancelled>ON</t:IsCancelled><t:LegacyFreeBusyStatus>OOF</t:LegacyFreeBusyStatus>"
        "<t:Sensitivity>Private</t:Sensitivity><t:Organizer><t:Mailbox><t:Name>x</t:Name><t:EmailAddress>NoReply@Planner.STAR.dk</t:EmailAddress>"
        '</t:Mailbox></t:Organizer><t:StartTimeZone Id="Europe/Copenhagen"/>'
    )
    item = to_calendar_item(_ReadItem.from_xml(element, None), PLANNER)
    assert (item.item_id, item.change_key, item.uid, item.item_type) == ("AAMk2", "CK2", "uid-2", "exception")
    assert item.start == datetime(2027, 1, 4, 8, tzinfo=timezone.utc) and item.end == datetime(2027, 1, 4, 9, tzinfo=timezone.utc)
    assert item.original_start == datetime(2027, 1, 3, 8, tzinfo=timezone.utc)
    assert (item.all_day, item.cancelled, item.free_busy, item.sensitivity) == (False, True, "OOF", "Private")
    assert item.organizer_is_planner is True and item.time_zone == "Romance Standard Time"

    unknown_zone = to_calendar_item(_ReadItem.from_xml(_calendar_item_xml('<t:ItemId Id="A3"/><t:StartTimeZone Id="Mars Standard Time"/>'), None))
    assert unknown_zone.time_zone is None


def test_an_item_with_missing_fields_reads_as_unknown_not_as_a_default() -> None:
    """An Exchange item without UID, times, status or type: each stays None (the busy rules reject it by name)."""
    from shared.adapters.ews import _ReadItem

    item = to_calendar_item(_ReadItem.from_xml(_calendar_item_xml('<t:ItemId Id="A4"/><t:IsAllDayEvent>maybe</t:IsAllDayEvent>'), None))
    assert (item.item_id, item.uid, item.start, item.end, item.free_busy, item.original_start, item.time_zone) == ("A4", None, None, None, None, None, None)
    assert item.item_type == "single" and item.all_day is False and item.organizer_is_planner is None
