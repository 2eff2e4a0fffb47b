"""The simulated Graph API answered in-process (no HTTP): paging, delta rounds, events/instances, $batch, faults."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from shared.domain.graph_events import series_uid_from_ical_uid
from simulators.exchange.store import Store
from simulators.graph import ids
from simulators.graph.api import Answer, Request, dispatch
from simulators.graph.faults import parse_fault
from simulators.graph.state import GraphSimState, Settings

MB = "anne@k.dk"
BASE = "http://sim/v1.0"
WINDOW = "startDateTime=2026-10-19T00:00:00Z&endDateTime=2026-10-26T00:00:00Z"


@pytest.fixture
def state() -> GraphSimState:
    state = GraphSimState(Settings(page_size=3), Store(clock=lambda: datetime(2026, 10, 1, tzinfo=UTC)))
    store = state.store
    for day in range(19, 24):
        store.add(MB, {"uid": f"single-{day}", "subject": "SUBJ", "start": f"2026-10-{day}T09:00", "end": f"2026-10-{day}T10:00"})
    series = store.add(MB, {"uid": "series", "start": "2026-10-19T12:00", "end": "2026-10-19T12:30",
                            "recurrence": {"pattern": "daily", "count": 3}})
    state.series_key = series.key  # type: ignore[attr-defined]
    store.ensure_mailbox("bo@k.dk")
    return state


def get(state: GraphSimState, url: str, prefer: str | None = None, mailbox_over: bool | None = None) -> Answer:
    headers = {"Prefer": prefer} if prefer else {}
    target = url[len(BASE):] if url.startswith(BASE) else url
    return dispatch(state, Request.parse("GET", target, headers, None, BASE), mailbox_over)


def read_all(state: GraphSimState, url: str, prefer: str | None = None) -> tuple[list[dict[str, Any]], str | None, int]:
    entries: list[dict[str, Any]] = []
    pages = 0
    next_url: str | None = url
    while next_url:
        answer = get(state, next_url, prefer)
        assert answer.status == 200, answer.body
        pages += 1
        entries += answer.body["value"]
        if "@odata.deltaLink" in answer.body:
            return entries, answer.body["@odata.deltaLink"], pages
        next_url = answer.body.get("@odata.nextLink")
    return entries, None, pages


def test_calendar_view_pages_by_maxpagesize_in_the_preferred_zone(state: GraphSimState) -> None:
    entries, _delta, pages = read_all(state, f"/users/{MB}/calendarView?{WINDOW}", 'outlook.timezone="Europe/Copenhagen", odata.maxpagesize=2')
    assert len(entries) == 8 and pages == 4
    assert {e["type"] for e in entries} == {"singleInstance", "occurrence"}
    assert entries[0]["start"]["timeZone"] == "Europe/Copenhagen" and entries[0]["start"]["dateTime"].startswith("2026-10-19T09:00")
    first = get(state, f"/users/{MB}/calendarView?{WINDOW}")
    assert len(first.body["value"]) == 3 and first.body["value"][0]["start"]["timeZone"] == "UTC"   # default page, UTC
    assert first.headers["Preference-Applied"] == 'outlook.timezone="UTC"'


def test_calendar_view_needs_its_window_and_an_existing_mailbox(state: GraphSimState) -> None:
    assert get(state, f"/users/{MB}/calendarView").status == 400
    answer = get(state, f"/users/nobody@k.dk/calendarView?{WINDOW}")
    assert answer.status == 404 and answer.body["error"]["code"] == "ErrorInvalidUser"


def test_delta_rounds_report_changes_removals_and_a_removed_occurrence(state: GraphSimState) -> None:
    entries, link, _pages = read_all(state, f"/users/{MB}/calendarView/delta?{WINDOW}", "odata.maxpagesize=3")
    assert len(entries) == 8 and link and "$deltatoken=" in link
    entries, link2, pages = read_all(state, link)
    assert entries == [] and pages == 1
    store = state.store
    key = store.find(MB, "single-20").key
    store.update(MB, key, {"start": "2026-10-20T14:00", "end": "2026-10-20T15:00"}, {"uid": "single-20", "start": "2026-10-20T09:00"})
    store.delete(MB, store.find(MB, "single-21").key)
    series_key = state.series_key  # type: ignore[attr-defined]
    store.delete_occurrence(MB, series_key, {"index": 2})
    entries, link3, _pages = read_all(state, link2)  # type: ignore[arg-type]
    removed = [e["id"] for e in entries if "@removed" in e]
    changed = {e["id"]: e for e in entries if "@removed" not in e}
    assert ids.event_id(MB, store.find(MB, "single-20").key) in changed
    assert len(removed) == 2
    assert any(ids.parse(r).original_start is not None for r in removed)   # the deleted occurrence
    assert all(e["type"] == "occurrence" for e in changed.values() if e["seriesMasterId"])
    assert series_uid_from_ical_uid(changed[ids.event_id(MB, store.find(MB, "single-20").key)]["iCalUId"]) == "single-20"
    assert read_all(state, link3)[0] == []  # type: ignore[arg-type]


def test_an_unknown_delta_token_or_an_injected_fault_answers_410(state: GraphSimState) -> None:
    answer = get(state, f"/users/{MB}/calendarView/delta?$deltatoken=nope")
    assert answer.status == 410 and answer.body["error"]["code"] == "SyncStateNotFound"
    _entries, link, _ = read_all(state, f"/users/{MB}/calendarView/delta?{WINDOW}")
    state.faults.add(parse_fault({"kind": "sync_state_not_found", "mailbox": MB, "code": "resyncRequired", "count": 1}))
    assert get(state, f"/users/{MB}/calendarView/delta?{WINDOW}").status == 200   # a new round has no token to lose
    answer = get(state, link)  # type: ignore[arg-type]
    assert answer.status == 410 and answer.body["error"]["code"] == "resyncRequired"
    assert get(state, link).status == 200  # type: ignore[arg-type]


def test_error_faults_carry_retry_after_and_hit_only_their_mailbox(state: GraphSimState) -> None:
    state.faults.add(parse_fault({"kind": "throttle", "mailbox": MB, "retry_after": 9}))
    answer = get(state, f"/users/{MB}/calendarView?{WINDOW}")
    assert answer.status == 429 and answer.headers["Retry-After"] == "9"
    assert get(state, f"/users/bo@k.dk/calendarView?{WINDOW}").status == 200
    state.faults.remove()
    for kind, status in (("unavailable", 503), ("forbidden", 403), ("not_found", 404), ("server_error", 500)):
        state.faults.add(parse_fault({"kind": kind, "count": 1}))
        assert get(state, f"/users/{MB}/calendarView?{WINDOW}").status == status


def test_events_and_instances(state: GraphSimState) -> None:
    master_id = ids.event_id(MB, state.series_key)  # type: ignore[attr-defined]
    master = get(state, f"/users/{MB}/events/{master_id}?$select=iCalUId,type")
    assert master.status == 200 and set(master.body) == {"@odata.etag", "id", "iCalUId", "type"}
    assert master.body["type"] == "seriesMaster" and series_uid_from_ical_uid(master.body["iCalUId"]) == "series"
    listed = get(state, f"/users/{MB}/events/{master_id}/instances?{WINDOW}")
    assert [e["type"] for e in listed.body["value"]] == ["occurrence"] * 3
    one = get(state, f"/users/{MB}/events/{listed.body['value'][0]['id']}")
    assert one.body["type"] == "occurrence" and one.body["seriesMasterId"] == master_id
    assert get(state, f"/users/{MB}/events/AAMkGSIMbogus").status == 404
    assert get(state, f"/users/{MB}/events/{ids.event_id('bo@k.dk', state.series_key)}").status == 404  # type: ignore[attr-defined]


def batch(state: GraphSimState, parts: list[dict[str, Any]]) -> Answer:
    return dispatch(state, Request.parse("POST", "/$batch", {}, {"requests": parts}, BASE))


def test_batch_answers_each_part_by_id_and_refuses_more_than_20(state: GraphSimState) -> None:
    parts = [{"id": "a", "method": "GET", "url": f"/users/{MB}/calendarView?{WINDOW}"},
             {"id": "b", "method": "GET", "url": f"users/bo@k.dk/calendarView/delta?{WINDOW}"},
             {"id": "c", "method": "GET", "url": f"/users/nobody@k.dk/calendarView?{WINDOW}"}]
    answer = batch(state, parts)
    assert answer.status == 200
    by_id = {r["id"]: r for r in answer.body["responses"]}
    assert [r["id"] for r in answer.body["responses"]] != ["a", "b", "c"]   # order is not promised
    assert by_id["a"]["status"] == 200 and len(by_id["a"]["body"]["value"]) == 3
    assert "@odata.deltaLink" in by_id["b"]["body"] and by_id["c"]["status"] == 404
    too_many = [{"id": str(n), "method": "GET", "url": f"/users/{MB}/calendarView?{WINDOW}"} for n in range(21)]
    assert batch(state, too_many).status == 400


def test_more_than_four_parts_for_one_mailbox_break_its_concurrency_limit(state: GraphSimState) -> None:
    parts = [{"id": str(n), "method": "GET", "url": f"/users/{MB}/calendarView?{WINDOW}"} for n in range(6)]
    statuses = sorted(r["status"] for r in batch(state, parts).body["responses"])
    assert statuses == [200] * 4 + [429] * 2
    assert state.peak_in_flight[MB] == 6
    throttled = [r for r in batch(state, parts).body["responses"] if r["status"] == 429]
    assert throttled[0]["body"]["error"]["code"] == "MailboxConcurrency" and throttled[0]["headers"]["Retry-After"] == "1"


def test_batch_parts_get_their_mailboxs_faults(state: GraphSimState) -> None:
    state.faults.add(parse_fault({"kind": "forbidden", "mailbox": "bo@k.dk"}))
    parts = [{"id": "a", "url": f"/users/{MB}/calendarView?{WINDOW}"}, {"id": "b", "url": f"/users/bo@k.dk/calendarView?{WINDOW}"}]
    by_id = {r["id"]: r["status"] for r in batch(state, parts).body["responses"]}
    assert by_id == {"a": 200, "b": 403}
    state.faults.add(parse_fault({"kind": "throttle", "endpoint": "batch", "count": 1}))
    assert batch(state, parts).status == 429
