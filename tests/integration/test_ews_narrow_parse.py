"""Our reads parse only the fields they request, and read exactly what exchangelib's full parse reads (decision 93).

The oracle is exchangelib itself: the same mailbox read through exchangelib's own ``sync_items`` and ``view`` (the
full parse of every field, since the narrowing is only on inside ``EwsConnection``'s reads) and mapped by the same
``to_calendar_item`` must give the same items as ``EwsConnection.sync`` and ``EwsConnection.view``. The mailbox holds
what the busy rules care about: a series with a moved and a deleted occurrence, an all-day OOF item on the spring DST
Sunday, a free lunch, Planner's invitation, a tentative private meeting, a cancelled meeting, items in other zones.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Iterator
from zoneinfo import ZoneInfo

import exchangelib.protocol
import pytest
from exchangelib.folders.collections import FolderCollection, SyncCompleted
from exchangelib.items import ID_ONLY
from exchangelib.services import SyncFolderItems
from exchangelib.util import xml_to_str

from shared.adapters.ews import FIELDS, EwsConnection, _CalendarSync, to_calendar_item
from shared.config import ExchangeSettings
from shared.domain.contracts import CalendarItem, Interval
from simulators.exchange.ids import parse_item_id
from simulators.exchange.server import RunningExchangeSim, start_server

CPH = ZoneInfo("Europe/Copenhagen")
ANNE = "anne@jobcenter.dk"
PLANNER = frozenset({"planner@jobcenter.example"})


@pytest.fixture
def ews() -> Iterator[RunningExchangeSim]:
    sim = start_server(users={"svc": "pw"}, mailboxes=[ANNE])
    store = sim.state.store
    today = datetime.now(CPH).date()

    def at(days: int, hour: int, minute: int = 0) -> str:
        return datetime.combine(today + timedelta(days=days), datetime.min.time()).replace(hour=hour, minute=minute).isoformat()

    series = store.add(ANNE, {"uid": "040000008200E00074C5B7101A82E00800000000", "start": at(1, 9), "end": at(1, 9, 15),
                              "recurrence": {"pattern": "daily", "count": 6}})
    store.modify_occurrence(ANNE, series.key, {"index": 2, "start": at(2, 11), "end": at(2, 11, 30)})
    store.delete_occurrence(ANNE, series.key, {"index": 4})
    spring = datetime(today.year + (1 if today.month > 3 else 0), 3, 31)
    dst_sunday = spring - timedelta(days=(spring.weekday() + 1) % 7)
    store.add(ANNE, {"start": dst_sunday.date().isoformat(), "all_day": True, "status": "OOF", "uid": "oof-dst"})
    store.add(ANNE, {"start": at(3, 12), "end": at(3, 12, 30), "status": "Free"})
    store.add(ANNE, {"uid": "20261019T070000Z-4711@kalender", "start": at(3, 14), "end": at(3, 15), "organizer": "Planner@Jobcenter.example"})
    store.add(ANNE, {"start": at(4, 15), "end": at(4, 16), "status": "Tentative", "sensitivity": "Private"})
    store.add(ANNE, {"start": at(5, 8), "end": at(5, 9), "is_cancelled": True})
    store.add(ANNE, {"start": at(6, 8), "end": at(6, 9), "timezone": "GMT Standard Time"})
    store.add(ANNE, {"start": at(7, 8), "end": at(7, 9), "timezone": "Pacific Standard Time", "status": "WorkingElsewhere"})
    yield sim
    sim.stop()
    exchangelib.protocol.close_connections()


def _connection(ews: RunningExchangeSim) -> EwsConnection:
    return EwsConnection(ExchangeSettings(endpoint=ews.url, username="svc", password="pw"), "Europe/Copenhagen", 2, PLANNER)


def test_a_sync_read_parses_the_same_items_as_exchangelibs_full_parse(ews: RunningExchangeSim) -> None:
    connection = _connection(ews)
    changes, _state = connection.sync(ANNE, None)
    ours = {c.item_id: c.item for c in changes}
    calendar = connection.account(ANNE).calendar
    full: dict[str, CalendarItem] = {}
    try:
        for change_type, item in FolderCollection(account=calendar.account, folders=[calendar]).sync_items(sync_state=None, only_fields=FIELDS):
            assert change_type == "create"
            full[item.id] = to_calendar_item(item, PLANNER)
    except SyncCompleted:
        pass
    assert len(ours) == len(full) == 8   # the series' master (its exceptions travel with it) and seven singles
    assert ours == full
    assert {i.item_type for i in ours.values() if i is not None} == {"master", "single"}
    assert sum(1 for i in ours.values() if i is not None and i.organizer_is_planner) == 1
    connection.close()


def test_a_sync_read_in_pages_reads_every_item_once_and_goes_on_from_the_state_it_ends_at(ews: RunningExchangeSim) -> None:
    """Decision 110: our SyncFolderItems calls (the fixed part of the request made once) page as exchangelib's
    ``sync_items`` does: a page per ``page_size`` changes until Exchange says the last one is in, every item once,
    and the state returned is where the next read goes on from."""
    connection = _connection(ews)
    whole, _ = connection.sync(ANNE, None)
    ews.state.clear_calls()
    paged, state = connection.sync(ANNE, None, page_size=3)
    assert len(paged) == 8 and {c.item_id: c.item for c in paged} == {c.item_id: c.item for c in whole}
    assert len(ews.state.call_log("SyncFolderItems", ANNE)) == 3   # 3 + 3 + 2 changes
    store = ews.state.store
    added = store.add(ANNE, {"start": datetime.now(CPH).replace(microsecond=0).isoformat(), "end": (datetime.now(CPH) + timedelta(hours=1)).replace(microsecond=0).isoformat()})
    gone = next(c for c in paged if c.item is not None and c.item.item_type == "single")
    store.delete(ANNE, parse_item_id(gone.item_id).key)
    later, state = connection.sync(ANNE, state, page_size=3)
    assert sorted((c.change, c.item_id == gone.item_id) for c in later) == [("delete", True), ("upsert", False)]
    assert next(c.item for c in later if c.change == "upsert").uid == added.uid   # type: ignore[union-attr]
    assert connection.sync(ANNE, state, page_size=3) == ([], state)
    connection.close()


def test_our_sync_request_is_the_one_exchangelib_builds_every_time(ews: RunningExchangeSim) -> None:
    """Decision 110: the ItemShape made once and copied gives, request after request, exactly the payload exchangelib's
    own SyncFolderItems builds from the same fields."""
    connection = _connection(ews)
    calendar = connection.account(ANNE).calendar
    fields = {f for f in calendar.normalize_fields(fields=FIELDS) if not f.field.is_attribute}

    def payload(service: type[SyncFolderItems], asked: object, state: str | None = "s1") -> Any:
        return service(account=calendar.account).get_payload(folder=calendar, shape=ID_ONLY, additional_fields=asked,
                                                              sync_state=state, ignore=None, max_changes_returned=3, sync_scope=None)

    theirs = str(xml_to_str(payload(SyncFolderItems, fields)))
    # all made before any is written out: the copy made once is never moved or changed by a request built from it
    ours = [str(xml_to_str(made)) for made in [payload(_CalendarSync, _CalendarSync.fields(calendar), state) for state in ("s1", None, "s1")]]
    assert ours[0] == ours[2] == theirs
    assert "SyncState" not in ours[1] and ours[1].count("FieldURI=") == theirs.count("FieldURI=") > 5
    fewer = {f for f in fields if f.field.name in ("uid", "type")}   # other fields: a shape of their own, not the one made first
    assert xml_to_str(payload(_CalendarSync, fewer)) == xml_to_str(payload(SyncFolderItems, fewer))
    connection.close()


def test_a_view_parses_the_same_items_as_exchangelibs_full_parse(ews: RunningExchangeSim) -> None:
    connection = _connection(ews)
    window = Interval(start=datetime.now(UTC) - timedelta(days=1), end=datetime.now(UTC) + timedelta(days=400))
    ours = {i.item_id: i for i in connection.view(ANNE, window)}
    calendar = connection.account(ANNE).calendar
    zone = connection.zone
    full = {item.id: to_calendar_item(item, PLANNER)
            for item in calendar.view(start=window.start.astimezone(zone), end=window.end.astimezone(zone)).only(*FIELDS)}
    assert len(ours) == len(full) == 12   # five occurrences (one moved, one deleted of six) and seven singles
    assert ours == full
    oof = [i for i in ours.values() if i.uid == "oof-dst"]
    assert oof and oof[0].all_day and oof[0].start is not None and oof[0].end is not None and oof[0].end - oof[0].start == timedelta(hours=23)
    connection.close()


def test_a_series_instances_read_gives_exactly_the_views_occurrences_in_one_finditem_and_one_getitem(ews: RunningExchangeSim) -> None:
    """What a changed master needs (decision 100): the view's occurrences and exceptions, each as the view reads it,
    from a FindItem that asks only for the type and a GetItem of the instances alone."""
    connection = _connection(ews)
    window = Interval(start=datetime.now(UTC) - timedelta(days=1), end=datetime.now(UTC) + timedelta(days=400))
    view = {i.item_id: i for i in connection.view(ANNE, window) if i.item_type in ("occurrence", "exception")}
    ews.state.clear_calls()
    ours = {i.item_id: i for i in connection.occurrences(ANNE, window)}
    assert len(view) == 5 and ours == view
    assert {i.item_type for i in ours.values()} == {"occurrence", "exception"}
    assert [call["operation"] for call in ews.state.call_log()] == ["FindItem", "GetItem"]
    connection.close()


def test_without_a_series_in_the_window_the_instances_read_is_one_finditem(ews: RunningExchangeSim) -> None:
    connection = _connection(ews)
    later = datetime.now(UTC) + timedelta(days=30)   # after the daily series and the dated singles
    window = Interval(start=later, end=later + timedelta(days=10))
    _ = connection.account(ANNE).calendar   # the calendar folder found first (GetFolder), as any earlier read does
    ews.state.clear_calls()
    assert connection.occurrences(ANNE, window) == []
    assert [call["operation"] for call in ews.state.call_log()] == ["FindItem"]
    connection.close()
