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
