"""The EWS simulator driven by the unmodified exchangelib client, as our producers will use it.

Every test starts its own simulator in-process on a free port and closes exchangelib's protocol cache after it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from exchangelib import (
    BASIC,
    IMPERSONATION,
    Account,
    Build,
    Configuration,
    Credentials,
    EWSDateTime,
    EWSTimeZone,
    Version,
    errors,
)
from exchangelib.protocol import close_connections
from exchangelib.services import GetEvents
from lxml import etree

from simulators.exchange.server import RunningExchangeSim, start_server
from simulators.exchange.soap import MNS, TNS
from tests.support.waiting import wait_for

ALICE, BOB = "alice@kommune.example", "bob@kommune.example"
CPH = EWSTimeZone("Europe/Copenhagen")
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "ics"
REPO = Path(__file__).resolve().parents[2]


def local(*args: int) -> EWSDateTime:
    return EWSDateTime(*args, tzinfo=CPH)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.fixture
def sim() -> Iterator[RunningExchangeSim]:
    running = start_server(users={"svc": "pw"}, minute_seconds=1.0, mailboxes=[ALICE, BOB])
    running.state.settings.keepalive_seconds = 0.2
    yield running
    running.stop()
    close_connections()


def account(sim: RunningExchangeSim, mailbox: str = ALICE, password: str = "pw") -> Account:
    config = Configuration(service_endpoint=sim.url, credentials=Credentials("svc", password), auth_type=BASIC,
                           version=Version(build=Build(15, 1, 2507, 0)), max_connections=4)
    return Account(mailbox, config=config, access_type=IMPERSONATION, autodiscover=False, default_timezone=CPH)


def control(sim: RunningExchangeSim, method: str, path: str, body: Any = None, expect: int | None = None) -> Any:
    reply = requests.request(method, sim.control_url + path, json=body, timeout=30)
    if expect is not None:
        assert reply.status_code == expect, reply.text
    return reply.json()


def add(sim: RunningExchangeSim, mailbox: str, **spec: Any) -> dict[str, Any]:
    return control(sim, "POST", f"/mailboxes/{mailbox}/items", spec, expect=201)


def weekly_monday_nine(sim: RunningExchangeSim, mailbox: str = ALICE) -> dict[str, Any]:
    return add(sim, mailbox, subject="Teammøde", start="2026-10-19T09:00", end="2026-10-19T10:00",
               timezone="Europe/Copenhagen", recurrence={"pattern": "weekly", "days_of_week": ["Monday"],
                                                         "until": "2027-04-30"})


# ---- CalendarView, GetItem, FindItem with restriction ------------------------------------------------------------
def test_a_weekly_series_comes_out_in_utc_across_both_dst_changes_and_never_as_its_master(sim):
    weekly_monday_nine(sim)
    items = list(account(sim).calendar.view(start=local(2026, 10, 1), end=local(2027, 5, 1)))
    assert {i.type for i in items} == {"Occurrence"} and len(items) == 28
    starts = [i.start for i in items]
    assert starts[0] == utc(2026, 10, 19, 7)  # CEST
    assert utc(2026, 10, 26, 8) in starts and utc(2027, 3, 22, 8) in starts  # CET
    assert utc(2027, 3, 29, 7) in starts  # CEST again
    assert all(i.legacy_free_busy_status == "Busy" and i.uid == items[0].uid for i in items)


def test_view_with_only_needs_no_getitem_and_gives_the_same_times(sim):
    weekly_monday_nine(sim)
    control(sim, "DELETE", "/calls")
    view = account(sim).calendar.view(start=local(2027, 3, 20), end=local(2027, 4, 3))
    rows = list(view.only("start", "end", "type", "legacy_free_busy_status", "is_all_day"))
    assert [(r.start, r.type) for r in rows] == [(utc(2027, 3, 22, 8), "Occurrence"), (utc(2027, 3, 29, 7), "Occurrence")]
    assert [c["operation"] for c in control(sim, "GET", "/calls?mailbox=" + ALICE)] == ["GetFolder", "GetFolder",
                                                                                         "FindItem"]


def test_a_moved_and_a_deleted_occurrence_are_right_in_view_and_on_the_master(sim):
    series = weekly_monday_nine(sim)
    control(sim, "PATCH", f"/mailboxes/{ALICE}/items/{series['key']}/occurrences",
            {"original_start": "2026-11-02T09:00", "start": "2026-11-03T13:00", "end": "2026-11-03T14:00",
             "status": "Tentative"}, expect=200)
    control(sim, "DELETE", f"/mailboxes/{ALICE}/items/{series['key']}/occurrences",
            {"original_start": "2026-11-09T09:00+01:00"}, expect=200)
    calendar = account(sim).calendar
    rows = list(calendar.view(start=local(2026, 11, 1), end=local(2026, 11, 15)))
    assert [(r.type, r.start, r.legacy_free_busy_status) for r in rows] == [
        ("Exception", utc(2026, 11, 3, 12), "Tentative")]
    assert rows[0].original_start == utc(2026, 11, 2, 8) and rows[0].recurrence_id == utc(2026, 11, 2, 8)
    masters = list(calendar.filter(start__lt=local(2027, 1, 1), end__gt=local(2026, 1, 1)))
    assert [m.type for m in masters] == ["RecurringMaster"]
    master = masters[0]
    assert [o.original_start for o in master.modified_occurrences] == [utc(2026, 11, 2, 8)]
    assert [d.start for d in master.deleted_occurrences] == [utc(2026, 11, 9, 8)]
    assert master.recurrence.boundary.end == datetime(2027, 4, 30).date()
    assert master.first_occurrence.start == utc(2026, 10, 19, 7)
    again = list(account(sim).calendar.view(start=local(2026, 11, 1), end=local(2026, 11, 15)).only("start", "type"))
    assert [(r.start, r.type) for r in again] == [(utc(2026, 11, 3, 12), "Exception")]


def test_a_filter_restriction_is_evaluated_on_the_server(sim):
    add(sim, ALICE, subject="Tandlæge", start="2026-12-01T10:00", end="2026-12-01T11:00")
    add(sim, ALICE, subject="Borgersamtale", start="2026-12-02T10:00", end="2026-12-02T11:00", status="Free")
    calendar = account(sim).calendar
    found = list(calendar.filter(start__lt=local(2026, 12, 2), end__gt=local(2026, 11, 30)))
    assert [f.subject for f in found] == ["Tandlæge"]
    assert [f.subject for f in calendar.filter(subject__contains="samtale")] == ["Borgersamtale"]


_ALL_DAY_SCRIPT = """
import json, time
from exchangelib import BASIC, IMPERSONATION, Account, Build, Configuration, Credentials, EWSDateTime, EWSTimeZone, Version
from simulators.exchange.server import start_server
sim = start_server(users={"svc": "pw"}, mailboxes=["alice@x.example"])
sim.state.store.add("alice@x.example", {"start": "2026-10-21", "all_day": True, "status": "OOF"})
sim.state.store.add("alice@x.example", {"start": "2027-03-28", "all_day": True, "status": "OOF"})
cfg = Configuration(service_endpoint=sim.url, credentials=Credentials("svc", "pw"), auth_type=BASIC,
                    version=Version(build=Build(15, 1, 2507, 0)))
tz = EWSTimeZone("Europe/Copenhagen")
acc = Account("alice@x.example", config=cfg, access_type=IMPERSONATION, autodiscover=False, default_timezone=tz)
rows = acc.calendar.view(start=EWSDateTime(2026, 10, 1, tzinfo=tz), end=EWSDateTime(2027, 4, 30, tzinfo=tz))
print(json.dumps({"tzname": time.tzname[0], "rows": [[str(r.start), str(r.end), r.is_all_day] for r in rows]}))
sim.stop()
"""


def test_all_day_items_come_out_on_their_dates_when_the_client_runs_in_new_york():
    env = {**os.environ, "TZ": "America/New_York", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _ALL_DAY_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith('{"tzname"')))
    assert result["tzname"] in ("EST", "EDT")  # the client really ran in New York
    rows = result["rows"]
    assert rows[0] == ["2026-10-21", "2026-10-21", True]
    # The spring DST Sunday: the simulator sends local midnights 23:00Z..22:00Z; the start is right. exchangelib
    # subtracts 24 h from the exclusive end in UTC and so reports end 2027-03-27 (the trap of decision 23 in docs/decisions.md).
    assert rows[1][0] == "2027-03-28" and rows[1][2] is True


# ---- SyncFolderItems ---------------------------------------------------------------------------------------------
def test_sync_gives_creates_then_nothing_then_updates_and_deletes_after_edits(sim):
    single = add(sim, ALICE, start="2026-12-01T10:00", end="2026-12-01T11:00")
    doomed = add(sim, ALICE, start="2026-12-02T10:00", end="2026-12-02T11:00")
    trashed = add(sim, ALICE, start="2026-12-03T10:00", end="2026-12-03T11:00")
    series = weekly_monday_nine(sim)
    calendar = account(sim).calendar
    first = list(calendar.sync_items())
    assert sorted(kind for kind, _ in first) == ["create"] * 4
    assert {item.type for _, item in first} == {"Single", "RecurringMaster"}
    assert list(calendar.sync_items(sync_state=calendar.item_sync_state)) == []
    control(sim, "PATCH", f"/mailboxes/{ALICE}/items/{single['key']}", {"status": "Tentative"}, expect=200)
    control(sim, "DELETE", f"/mailboxes/{ALICE}/items/{doomed['key']}", expect=200)
    control(sim, "POST", f"/mailboxes/{ALICE}/items/{trashed['key']}/move", {"folder": "deleteditems"}, expect=200)
    control(sim, "DELETE", f"/mailboxes/{ALICE}/items/{series['key']}/occurrences", {"index": 3}, expect=200)
    changes = list(calendar.sync_items(sync_state=calendar.item_sync_state))
    summary = sorted((kind, getattr(item, "id", None)) for kind, item in changes)
    assert summary == sorted([("update", single["id"]), ("delete", doomed["id"]), ("delete", trashed["id"]),
                              ("update", series["id"])])
    updated = {item.id: item for kind, item in changes if kind == "update"}
    assert updated[single["id"]].legacy_free_busy_status == "Tentative"
    assert len(updated[series["id"]].deleted_occurrences) == 1


def test_sync_pages_with_max_changes_and_restarts_from_a_persisted_state(sim):
    for day in range(1, 8):
        add(sim, ALICE, start=f"2026-12-{day:02d}T10:00", end=f"2026-12-{day:02d}T11:00")
    control(sim, "DELETE", "/calls")
    calendar = account(sim).calendar
    created = [item.id for kind, item in calendar.sync_items(max_changes_returned=3) if kind == "create"]
    assert len(created) == len(set(created)) == 7
    assert len(control(sim, "GET", "/calls?operation=SyncFolderItems")) == 3  # 3 + 3 + 1
    persisted = calendar.item_sync_state
    close_connections()
    add(sim, ALICE, start="2026-12-09T10:00", end="2026-12-09T11:00")
    restarted = account(sim).calendar  # a new process would build a new Account too
    assert [kind for kind, _ in restarted.sync_items(sync_state=persisted, max_changes_returned=3)] == ["create"]


# ---- subscriptions -----------------------------------------------------------------------------------------------
def test_pull_subscription_reports_status_when_idle_and_the_edits_since(sim):
    calendar = account(sim).calendar
    subscription, watermark = calendar.subscribe_to_pull()
    idle = list(calendar.get_events(subscription, watermark))
    assert [type(e).__name__ for n in idle for e in n.events] == ["StatusEvent"]
    created = add(sim, ALICE, start="2026-12-01T10:00")
    control(sim, "PATCH", f"/mailboxes/{ALICE}/items/{created['key']}", {"status": "OOF"}, expect=200)
    notes = list(calendar.get_events(subscription, watermark))
    events = [e for n in notes for e in n.events]
    assert [type(e).__name__ for e in events] == ["CreatedEvent", "FreeBusyChangedEvent", "ModifiedEvent",
                                                  "FreeBusyChangedEvent"]
    assert events[0].item_id.id == created["id"]
    calendar.unsubscribe(subscription)
    with pytest.raises(errors.ErrorSubscriptionNotFound):
        list(calendar.get_events(subscription, watermark))


def test_getevents_pages_with_more_events_when_called_with_the_last_watermark(sim):
    sim.state.settings.events_page = 3
    acc = account(sim)
    subscription, watermark = acc.calendar.subscribe_to_pull(event_types=["CreatedEvent"])
    for day in range(1, 8):
        add(sim, ALICE, start=f"2026-12-{day:02d}T10:00")
    seen, pages, more = 0, 0, True
    while more:
        (note,) = list(GetEvents(account=acc).call(subscription_id=subscription, watermark=watermark))
        events = [e for e in note.events if type(e).__name__ == "CreatedEvent"]
        seen, pages, more = seen + len(events), pages + 1, note.more_events
        watermark = note.events[-1].watermark
    assert (seen, pages) == (7, 3)


def test_a_streamed_edit_arrives_within_seconds_and_the_stream_closes_after_its_scaled_timeout(sim):
    calendar = account(sim).calendar
    subscription = calendar.subscribe_to_streaming()
    created = add(sim, ALICE, start="2026-12-01T10:00")
    editor = threading.Timer(0.3, lambda: control(sim, "PATCH", f"/mailboxes/{ALICE}/items/{created['key']}",
                                                    {"status": "Free"}))
    began = time.monotonic()
    editor.start()
    arrivals = []
    for note in calendar.get_streaming_events(subscription, connection_timeout=1):  # 1 "minute" = 1 s here
        arrivals += [(time.monotonic() - began, type(e).__name__) for e in note.events]
    ended = time.monotonic() - began
    editor.join()
    kinds = [kind for _, kind in arrivals]
    assert "CreatedEvent" in kinds and "ModifiedEvent" in kinds
    assert max(t for t, kind in arrivals if kind == "ModifiedEvent") < 1.0  # edit at 0.3 s, delivered promptly
    assert 0.9 < ended < 5.0  # ConnectionStatus Closed ended the generator after ~1 scaled minute


def test_one_stream_carries_two_mailboxes(sim):
    alice, bob = account(sim, ALICE), account(sim, BOB)
    ids = [alice.calendar.subscribe_to_streaming(), bob.calendar.subscribe_to_streaming()]
    add(sim, ALICE, start="2026-12-01T10:00")
    add(sim, BOB, start="2026-12-01T11:00")
    notes = list(alice.calendar.get_streaming_events(ids, connection_timeout=1))
    assert {n.subscription_id for n in notes if n.events} == set(ids)


# ---- faults ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "error"), [
    ("impersonation_denied", errors.ErrorImpersonateUserDenied),
    ("nonexistent_mailbox", errors.ErrorNonExistentMailbox),
    ("mailbox_move", errors.ErrorMailboxMoveInProgress),
])
def test_mailbox_faults_raise_the_named_exchangelib_error(sim, kind, error):
    calendar = account(sim).calendar
    control(sim, "POST", "/faults", {"kind": kind, "mailbox": ALICE, "count": 1}, expect=201)
    with pytest.raises(error):
        list(calendar.view(start=local(2026, 12, 1), end=local(2026, 12, 2)))
    assert list(calendar.view(start=local(2026, 12, 1), end=local(2026, 12, 2))) == []  # the count was one


def test_server_busy_carries_its_back_off_and_503_is_busy_too(sim):
    calendar = account(sim).calendar
    control(sim, "POST", "/faults", {"kind": "server_busy", "back_off_ms": 1500, "count": 1}, expect=201)
    with pytest.raises(errors.ErrorServerBusy) as busy:
        list(calendar.sync_items())
    assert busy.value.back_off == 1.5
    control(sim, "POST", "/faults", {"kind": "http_503", "retry_after": 7, "count": 1}, expect=201)
    with pytest.raises(errors.ErrorServerBusy):
        list(calendar.sync_items())


def test_faults_only_hit_their_mailbox_and_operation_and_expire_after_their_period(sim):
    alice, bob = account(sim, ALICE).calendar, account(sim, BOB).calendar
    control(sim, "POST", "/faults", {"kind": "server_busy", "mailbox": ALICE, "operations": ["FindItem"],
                                     "seconds": 0.5}, expect=201)
    assert list(bob.view(start=local(2026, 12, 1), end=local(2026, 12, 2))) == []
    assert list(alice.sync_items()) == []
    with pytest.raises(errors.ErrorServerBusy):
        list(alice.view(start=local(2026, 12, 1), end=local(2026, 12, 2)))
    wait_for(lambda: control(sim, "GET", "/faults") == [], 10, interval=0.05, what="the 0.5 s fault to expire")


def test_an_invalid_sync_state_raises_the_named_error_both_injected_and_real(sim):
    calendar = account(sim).calendar
    list(calendar.sync_items())
    control(sim, "POST", "/faults", {"kind": "invalid_sync_state", "count": 1}, expect=201)
    with pytest.raises(errors.ErrorInvalidSyncStateData):
        list(calendar.sync_items(sync_state=calendar.item_sync_state))
    bob = account(sim, BOB).calendar
    with pytest.raises(errors.ErrorInvalidSyncStateData):  # Alice's state is no good for Bob
        list(bob.sync_items(sync_state=calendar.item_sync_state))


def test_an_unknown_mailbox_and_a_wrong_password_are_refused(sim):
    with pytest.raises(errors.ErrorNonExistentMailbox):
        account(sim, "nobody@kommune.example").calendar
    with pytest.raises(errors.UnauthorizedError):
        account(sim, ALICE, password="wrong").calendar


def test_a_subscription_expiring_inside_an_open_stream_raises_subscription_not_found(sim):
    calendar = account(sim).calendar
    subscription = calendar.subscribe_to_streaming()
    control(sim, "POST", "/faults", {"kind": "stream_expire", "after_seconds": 0.2, "count": 1}, expect=201)
    with pytest.raises(errors.ErrorSubscriptionNotFound):
        list(calendar.get_streaming_events(subscription, connection_timeout=1))
    with pytest.raises(errors.ErrorSubscriptionNotFound):
        list(calendar.get_events(subscription, "x"))


def test_a_stream_cut_mid_chunk_raises_chunked_encoding_error(sim):
    calendar = account(sim).calendar
    subscription = calendar.subscribe_to_streaming()
    control(sim, "POST", "/faults", {"kind": "stream_cut", "after_seconds": 0.2, "count": 1}, expect=201)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        list(calendar.get_streaming_events(subscription, connection_timeout=1))


def _soap(sim: RunningExchangeSim, body: str, **kwargs: Any) -> requests.Response:
    """A hand-written EWS request impersonating Alice (for what exchangelib hides)."""
    envelope = f"""<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"
      xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages"
      xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types"><s:Header><t:ExchangeImpersonation>
      <t:ConnectingSID><t:PrimarySmtpAddress>{ALICE}</t:PrimarySmtpAddress></t:ConnectingSID></t:ExchangeImpersonation>
      </s:Header><s:Body>{body}</s:Body></s:Envelope>"""
    return requests.post(sim.url, data=envelope.encode(), auth=("svc", "pw"),
                         headers={"Content-Type": "text/xml; charset=utf-8"}, **kwargs)


def _raw_stream(sim: RunningExchangeSim, subscription: str, read_timeout: float) -> requests.Response:
    body = f"""<m:GetStreamingEvents><m:SubscriptionIds><t:SubscriptionId>{subscription}</t:SubscriptionId>
      </m:SubscriptionIds><m:ConnectionTimeout>1</m:ConnectionTimeout></m:GetStreamingEvents>"""
    return _soap(sim, body, stream=True, timeout=(5, read_timeout))


def test_a_silent_stream_sends_nothing_not_even_keep_alives_while_a_healthy_one_does(sim):
    subscription = account(sim).calendar.subscribe_to_streaming()
    healthy = _raw_stream(sim, subscription, read_timeout=1.0)
    chunks = [chunk for chunk in healthy.iter_content(chunk_size=None)]
    assert sum(b"<m:ConnectionStatus>OK</m:ConnectionStatus>" in c for c in chunks) >= 2  # keep-alives
    control(sim, "POST", "/faults", {"kind": "stream_silent", "after_seconds": 0.0, "count": 1}, expect=201)
    silent = _raw_stream(sim, subscription, read_timeout=1.0)
    with pytest.raises(requests.exceptions.ConnectionError):  # the read times out: nothing arrives
        for _ in silent.iter_content(chunk_size=None):
            pass
    silent.close()


def test_latency_delays_the_response(sim):
    calendar = account(sim).calendar
    control(sim, "POST", "/faults", {"kind": "latency", "latency_ms": 400, "count": 1}, expect=201)
    began = time.monotonic()
    list(calendar.sync_items())
    assert time.monotonic() - began >= 0.4


# ---- scale: more than the view cap -------------------------------------------------------------------------------
def read_whole_view(calendar: Any, start: EWSDateTime, end: EWSDateTime, cap: int = 1000) -> dict[str, Any]:
    """How a client reads a CalendarView larger than the server's cap (1000).

    ``max_items=cap`` is essential: a capped view says IncludesLastItemInRange=false without a paging offset,
    and exchangelib then re-requests the same view forever. When a view comes back full, ask again from the
    start of the last item returned, and keep each item once (by id)."""
    seen: dict[str, Any] = {}
    cursor = start
    while True:
        view = calendar.view(start=cursor, end=end, max_items=cap)
        rows = list(view.only("start", "end", "type", "legacy_free_busy_status"))
        seen.update((row.id, row) for row in rows)
        if len(rows) < cap:
            return seen
        last_start = max(row.start for row in rows)
        if last_start <= cursor:
            raise RuntimeError("more than one view's worth of items start at the same instant")
        cursor = last_start


def test_a_view_of_3000_items_is_capped_at_1000_and_a_paging_client_reads_them_all(sim):
    first = datetime(2026, 11, 2, 7, tzinfo=UTC)
    items = [{"start": (first + timedelta(minutes=43 * n)).isoformat(), "status": "Busy"} for n in range(3000)]
    created = control(sim, "POST", f"/mailboxes/{ALICE}/items", {"items": items}, expect=201)
    assert len(created) == 3000
    calendar = account(sim).calendar
    window = (local(2026, 11, 1), local(2027, 2, 1))
    raw = _soap(sim, """<m:FindItem Traversal="Shallow"><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape></m:ItemShape>
      <m:CalendarView StartDate="2026-11-01T00:00:00+01:00" EndDate="2027-02-01T00:00:00+01:00"/>
      <m:ParentFolderIds><t:DistinguishedFolderId Id="calendar"/></m:ParentFolderIds></m:FindItem>""", timeout=30)
    root_folder = etree.fromstring(raw.content).find(".//{%s}RootFolder" % MNS)
    assert (root_folder.get("TotalItemsInView"), root_folder.get("IncludesLastItemInRange")) == ("3000", "false")
    assert len(root_folder.find("{%s}Items" % TNS)) == 1000  # the cap
    first_view = list(calendar.view(*window, max_items=1000).only("start"))
    assert len(first_view) == 1000 and max(r.start for r in first_view) == first + timedelta(minutes=43 * 999)
    everything = read_whole_view(calendar, *window)
    assert len(everything) == 3000
    assert {row.id for row in everything.values()} == {c["id"] for c in created}


# ---- iCalendar import, isolation, control API, CLI ---------------------------------------------------------------
def test_an_outlook_export_imports_and_reads_back_through_exchangelib(sim):
    text = (FIXTURES / "caseworker-week.ics").read_text(encoding="utf-8")
    loaded = requests.post(f"{sim.control_url}/mailboxes/{ALICE}/ics", data=text.encode(),
                           headers={"Content-Type": "text/calendar"}, timeout=30)
    assert loaded.status_code == 201 and len(loaded.json()) == 8
    rows = list(account(sim).calendar.view(start=local(2026, 10, 19), end=local(2026, 11, 23)))
    by_uid: dict[str, list[Any]] = {}
    for row in rows:
        by_uid.setdefault(row.uid, []).append(row)
    series = by_uid["040000008200E00074C5B7101A82E00800000000A1B2C3D4E5F6A7B8C9D0E1F2A3B4C5D6"]
    assert [(r.start, r.type) for r in series] == [
        (utc(2026, 10, 19, 7), "Occurrence"), (utc(2026, 10, 26, 8), "Occurrence"), (utc(2026, 11, 2, 8), "Occurrence"),
        (utc(2026, 11, 16, 12), "Exception")]  # 9 November deleted, 16 November moved to 13:00
    assert by_uid["sim-fixture-private-0004"][0].sensitivity == "Private"
    assert by_uid["sim-fixture-lunch-0003"][0].legacy_free_busy_status == "Free"
    assert by_uid["sim-fixture-homeoffice-0005"][0].legacy_free_busy_status == "WorkingElsewhere"
    assert by_uid["sim-fixture-cancelled-0006"][0].is_cancelled is True
    leave = by_uid["sim-fixture-leave-0002"][0]
    assert (leave.is_all_day, str(leave.start), leave.legacy_free_busy_status) == (True, "2026-10-21", "OOF")
    course = by_uid["sim-fixture-course-0007"][0]
    assert (course.start, course.end) == (utc(2026, 10, 26, 7), utc(2026, 10, 28, 15))


def test_impersonating_bob_never_shows_alices_items(sim):
    alice_item = add(sim, ALICE, start="2026-12-01T10:00", end="2026-12-01T11:00")
    add(sim, BOB, start="2026-12-01T12:00", end="2026-12-01T13:00")
    bob = account(sim, BOB)
    rows = list(bob.calendar.view(start=local(2026, 12, 1), end=local(2026, 12, 2)))
    assert len(rows) == 1 and rows[0].id != alice_item["id"]
    assert len(list(bob.calendar.sync_items())) == 1
    fetched = list(bob.fetch(ids=[(alice_item["id"], None)]))
    assert len(fetched) == 1 and isinstance(fetched[0], errors.ErrorItemNotFound)


def test_the_control_api_lists_edits_refuses_nonsense_and_resets(sim):
    created = add(sim, ALICE, subject="x", start="2026-12-01T10:00", uid="my-uid")
    assert control(sim, "GET", f"/mailboxes/{ALICE}/items/my-uid", expect=200)["key"] == created["key"]
    assert {m["address"] for m in control(sim, "GET", "/mailboxes", expect=200)} == {ALICE, BOB}
    control(sim, "POST", f"/mailboxes/{ALICE}/items", {"start": "not a time"}, expect=400)
    control(sim, "GET", f"/mailboxes/{ALICE}/items/999999", expect=404)
    control(sim, "POST", "/faults", {"kind": "nonsense"}, expect=400)
    control(sim, "POST", "/mailboxes", {"address": "carol@kommune.example"}, expect=201)
    control(sim, "POST", "/reset", expect=200)
    assert control(sim, "GET", "/mailboxes", expect=200) == []


def test_the_command_line_serves_a_loaded_calendar_until_terminated(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "simulators.exchange.server", "--port", "0", "--user", "svc", "--password", "pw",
         "--load", f"{ALICE}={FIXTURES / 'caseworker-week.ics'}", "--minute-seconds", "0.5"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        line = ""
        while "control:" not in line:
            line = process.stdout.readline()
            assert line, "the simulator exited before announcing its URL"
        control_url = line.split("control:")[1].strip()
        mailboxes = requests.get(control_url + "/mailboxes", timeout=10).json()
        assert mailboxes == [{"address": ALICE, "items": 8}]
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0


def test_https_serves_ews_with_the_configured_certificate(tmp_path):
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    secure = start_server(users={"svc": "pw"}, mailboxes=[ALICE], tls=(str(cert_file), str(key_file)))
    try:
        assert secure.url.startswith("https://")
        reply = _soap(secure, """<m:GetFolder><m:FolderShape><t:BaseShape>IdOnly</t:BaseShape></m:FolderShape>
          <m:FolderIds><t:DistinguishedFolderId Id="calendar"/></m:FolderIds></m:GetFolder>""",
                      verify=str(cert_file), timeout=10)
        assert reply.status_code == 200 and b"IPF.Appointment" in reply.content
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(secure.control_url + "/health", verify=True, timeout=10)
    finally:
        secure.stop()


def test_an_item_field_the_simulator_does_not_know_is_refused_on_create_and_on_change(sim):
    """A misspelt field ("cancelled" for "is_cancelled") made a live, busy item without a word; now a clear 400."""
    refused = control(sim, "POST", f"/mailboxes/{ALICE}/items", {"start": "2026-12-01T10:00", "cancelled": True}, expect=400)
    assert "unknown item field(s) 'cancelled'" in refused["error"] and "is_cancelled" in refused["error"]
    assert control(sim, "GET", f"/mailboxes/{ALICE}/items", expect=200) == []
    created = add(sim, ALICE, start="2026-12-01T10:00")
    refused = control(sim, "PATCH", f"/mailboxes/{ALICE}/items/{created['key']}", {"statu": "Free"}, expect=400)
    assert "'statu'" in refused["error"]
    assert control(sim, "PATCH", f"/mailboxes/{ALICE}/items/{created['key']}", {"status": "Free"}, expect=200)["status"] == "Free"
