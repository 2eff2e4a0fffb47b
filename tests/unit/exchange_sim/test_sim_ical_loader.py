"""Outlook-style iCalendar files become the right items (fixtures in tests/fixtures/ics)."""

from datetime import UTC, datetime
from pathlib import Path

import pytest

from simulators.exchange.ical_loader import IcsError, load_ics
from simulators.exchange.recurrence import expand

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "ics"


def by_uid(name: str) -> dict:
    return {item.uid: item for item in load_ics((FIXTURES / name).read_bytes())}


def test_the_caseworker_week_has_its_series_with_one_moved_and_one_deleted_occurrence():
    items = by_uid("caseworker-week.ics")
    weekly = items["040000008200E00074C5B7101A82E00800000000A1B2C3D4E5F6A7B8C9D0E1F2A3B4C5D6"]
    assert weekly.tz == "Romance Standard Time" and weekly.recurrence.pattern == "weekly"
    assert weekly.deleted == {datetime(2026, 11, 9, 8, tzinfo=UTC)}
    moved = weekly.overrides[datetime(2026, 11, 16, 8, tzinfo=UTC)]
    assert (moved.start, moved.status) == (datetime(2026, 11, 16, 12, tzinfo=UTC), "Tentative")
    starts = [o.start for o in expand(weekly)]
    assert starts[0] == datetime(2026, 10, 19, 7, tzinfo=UTC) and starts[-1] == datetime(2027, 4, 26, 7, tzinfo=UTC)


def test_free_busy_all_day_private_and_cancelled_come_from_outlook_properties():
    items = by_uid("caseworker-week.ics")
    leave = items["sim-fixture-leave-0002"]
    assert leave.is_all_day and leave.status == "OOF"
    assert (leave.start, leave.end) == (datetime(2026, 10, 20, 22, tzinfo=UTC), datetime(2026, 10, 21, 22, tzinfo=UTC))
    assert items["sim-fixture-lunch-0003"].status == "Free"
    assert items["sim-fixture-private-0004"].sensitivity == "Private"
    assert items["sim-fixture-homeoffice-0005"].status == "WorkingElsewhere"
    cancelled = items["sim-fixture-cancelled-0006"]
    assert cancelled.is_cancelled and cancelled.organizer == "planner@jobcenter.example"


def test_rrule_variants_map_to_ews_patterns():
    items = by_uid("recurrence-patterns.ics")
    last_weekday = items["sim-pattern-last-weekday"].recurrence
    assert (last_weekday.pattern, last_weekday.days_of_week, last_weekday.week_index) == (
        "relative_monthly", ("Weekday",), "Last")
    last_monday = items["sim-pattern-last-monday"].recurrence
    assert (last_monday.days_of_week, last_monday.week_index, last_monday.interval) == (("Monday",), "Last", 2)
    assert items["sim-pattern-day-15"].recurrence.day_of_month == 15
    assert items["sim-pattern-yearly"].recurrence.pattern == "absolute_yearly"
    eastern = items["sim-pattern-daily-eastern"]
    assert eastern.tz == "Eastern Standard Time"
    assert [o.start.hour for o in expand(eastern)] == [13, 14, 14, 14]


def test_text_that_is_not_icalendar_is_refused():
    with pytest.raises(IcsError):
        load_ics("hello")
