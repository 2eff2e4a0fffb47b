"""JSON item descriptions: local times in Windows or IANA zones, all-day dates, errors."""

from datetime import UTC, datetime

import pytest

from simulators.exchange.item_spec import SpecError, parse_item


def test_local_time_is_placed_in_the_named_zone_and_the_zone_is_stored_by_its_windows_id():
    fields = parse_item({"start": "2027-03-29T09:00", "end": "2027-03-29T10:00", "timezone": "Europe/Copenhagen"},
                        "UTC")
    assert fields["start"] == datetime(2027, 3, 29, 7, tzinfo=UTC) and fields["tz"] == "Romance Standard Time"


def test_an_all_day_item_spans_local_midnights_also_on_the_spring_dst_sunday():
    fields = parse_item({"start": "2027-03-28", "all_day": True}, "Romance Standard Time")
    assert fields["is_all_day"]
    assert (fields["start"], fields["end"]) == (datetime(2027, 3, 27, 23, tzinfo=UTC),
                                                datetime(2027, 3, 28, 22, tzinfo=UTC))


@pytest.mark.parametrize("spec", [
    {"end": "2027-01-01T10:00"},
    {"start": "2027-01-01T10:00", "end": "2027-01-01T09:00"},
    {"start": "2027-01-01T10:00", "status": "Sleeping"},
    {"start": "2027-01-01T10:00", "timezone": "Mars Standard Time"},
    {"start": "2027-01-01T10:00", "recurrence": {"pattern": "hourly"}},
])
def test_bad_descriptions_are_refused(spec):
    with pytest.raises(SpecError):
        parse_item(spec, "UTC")
