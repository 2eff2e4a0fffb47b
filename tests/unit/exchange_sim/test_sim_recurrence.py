"""Recurrence expansion in the item's Windows zone, DST included (pure: no server, no clock)."""

from datetime import UTC, date, datetime

from simulators.exchange.model import Item, Override, Recurrence
from simulators.exchange.recurrence import expand, find_occurrence, last_occurrence


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def series(start: datetime, end: datetime, rec: Recurrence, tz: str = "Romance Standard Time") -> Item:
    return Item(key=1, uid="U", start=start, end=end, tz=tz, recurrence=rec)


MONDAY_NINE = Recurrence("weekly", date(2026, 10, 19), days_of_week=("Monday",), end_date=date(2027, 4, 30))


def test_a_weekly_copenhagen_meeting_moves_in_utc_across_both_dst_changes():
    item = series(utc(2026, 10, 19, 7), utc(2026, 10, 19, 8), MONDAY_NINE)
    starts = [occ.start for occ in expand(item)]
    assert starts[0] == utc(2026, 10, 19, 7)  # summer time: 09:00 CEST
    assert starts[1] == utc(2026, 10, 26, 8)  # after the last Sunday of October: 09:00 CET
    assert utc(2027, 3, 22, 8) in starts and utc(2027, 3, 29, 7) in starts  # back to summer time
    assert starts[-1] == utc(2027, 4, 26, 7)


def test_a_moved_occurrence_appears_at_its_new_time_and_a_deleted_one_not_at_all():
    item = series(utc(2026, 10, 19, 7), utc(2026, 10, 19, 8), MONDAY_NINE)
    item.overrides[utc(2026, 11, 2, 8)] = Override(start=utc(2026, 11, 3, 12), end=utc(2026, 11, 3, 13), status="Tentative")
    item.deleted.add(utc(2026, 11, 9, 8))
    window = expand(item, utc(2026, 11, 1), utc(2026, 11, 12))
    assert [(o.start, o.is_exception) for o in window] == [(utc(2026, 11, 3, 12), True)]
    assert window[0].value("status") == "Tentative" and window[0].original_start == utc(2026, 11, 2, 8)


def test_a_series_moved_out_of_the_window_is_not_in_it_and_one_moved_in_is():
    item = series(utc(2026, 10, 19, 7), utc(2026, 10, 19, 8), MONDAY_NINE)
    item.overrides[utc(2026, 11, 30, 8)] = Override(start=utc(2026, 11, 20, 8), end=utc(2026, 11, 20, 9))
    window = expand(item, utc(2026, 11, 18), utc(2026, 11, 21))
    assert [o.original_start for o in window] == [utc(2026, 11, 30, 8)]


def test_monthly_on_the_last_weekday():
    rec = Recurrence("relative_monthly", date(2026, 10, 30), days_of_week=("Weekday",), week_index="Last", count=4)
    item = series(utc(2026, 10, 30, 13), utc(2026, 10, 30, 14), rec)
    assert [o.start.date() for o in expand(item)] == [date(2026, 10, 30), date(2026, 11, 30), date(2026, 12, 31),
                                                     date(2027, 1, 29)]


def test_monthly_on_day_31_falls_on_the_last_day_of_shorter_months():
    rec = Recurrence("absolute_monthly", date(2027, 1, 31), day_of_month=31, count=3)
    item = series(utc(2027, 1, 31, 9), utc(2027, 1, 31, 10), rec, tz="UTC")
    assert [o.start.date() for o in expand(item)] == [date(2027, 1, 31), date(2027, 2, 28), date(2027, 3, 31)]


def test_yearly_on_the_second_tuesday_of_march_every_year():
    rec = Recurrence("relative_yearly", date(2027, 1, 1), days_of_week=("Tuesday",), week_index="Second", month=3, count=2)
    item = series(utc(2027, 3, 9, 9), utc(2027, 3, 9, 10), rec, tz="UTC")
    assert [o.start.date() for o in expand(item)] == [date(2027, 3, 9), date(2028, 3, 14)]


def test_every_other_day_in_eastern_time_shifts_when_new_york_leaves_dst():
    rec = Recurrence("daily", date(2026, 10, 30), interval=2, count=3)
    item = series(utc(2026, 10, 30, 13), utc(2026, 10, 30, 13, 30), rec, tz="Eastern Standard Time")
    assert [o.start for o in expand(item)] == [utc(2026, 10, 30, 13), utc(2026, 11, 1, 14), utc(2026, 11, 3, 14)]


def test_every_second_week_on_two_days_counts_occurrences_not_weeks():
    rec = Recurrence("weekly", date(2026, 11, 2), interval=2, days_of_week=("Monday", "Thursday"), count=5)
    item = series(utc(2026, 11, 2, 8), utc(2026, 11, 2, 9), rec)
    assert [o.start.date().isoformat() for o in expand(item)] == [
        "2026-11-02", "2026-11-05", "2026-11-16", "2026-11-19", "2026-11-30"]


def test_occurrences_are_found_by_index_and_by_original_start_and_the_last_one_is_known():
    item = series(utc(2026, 10, 19, 7), utc(2026, 10, 19, 8), MONDAY_NINE)
    assert find_occurrence(item, index=2).original_start == utc(2026, 10, 26, 8)
    assert find_occurrence(item, original_start=utc(2026, 10, 26, 8)).index == 2
    assert find_occurrence(item, original_start=utc(2026, 10, 26, 9)) is None
    assert last_occurrence(item).start == utc(2027, 4, 26, 7)
