"""The Graph adapter against the Graph simulator over HTTPS (throwaway CA), with msal and an app certificate.

Paging, delta rounds, $batch, faults and their classification, the hard deadline and size cap, the per-mailbox
concurrency limit, content canaries, and one scenario read through EWS and through Graph on the same calendar store.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import exchangelib.protocol
import pytest
import requests
from structlog.testing import capture_logs

from shared.adapters.deadline import DeadlineExceeded
from shared.adapters.ews import EwsConnection
from shared.adapters.graph import (
    DeltaResult,
    DeltaRound,
    GraphAuthError,
    GraphError,
    GraphProtocolError,
    GraphReader,
    GraphSyncReader,
    SyncStateNotFound,
    classify,
)
from shared.adapters.tls_sessions import ResponseTooLarge
from shared.config import BusySettings, ExchangeSettings
from shared.domain.busy_rules import busy_interval, origin_id
from shared.domain.contracts import CalendarChange, CalendarItem, Interval
from shared.domain.mailbox_reads import Backend, SyncPosition
from shared.domain.source_faults import SourceFault
from shared.mailbox_passes import sync_mailbox
from simulators.exchange.server import start_server as start_ews
from simulators.graph.faults import parse_fault
from simulators.graph.server import RunningGraphSim, start_server
from tests.support.graph import AppCertificate, graph_settings, write_app_certificate
from tests.support.tls import ThrowawayPKI

ANNE, BO, CARL = "anne@kommune.example", "bo@kommune.example", "carl@kommune.example"
CPH = ZoneInfo("Europe/Copenhagen")
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
CANARIES = ("CANARY-SUBJECT-91c", "CANARY-BODY-4be", "CANARY-LOCATION-77d")
POLICY = BusySettings().policy()
OUTLOOK_UID = "040000008200E00074C5B7101A82E00800000000A0A742E5073DDA01000000000000000010000000998F8D5FA0E3F44D9B1C7C0B6E1A1B2C"


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> AppCertificate:
    return write_app_certificate(tmp_path_factory.mktemp("app"), passphrase="app-passphrase-æøå")


@pytest.fixture
def sim(pki: ThrowawayPKI, app: AppCertificate) -> Iterator[RunningGraphSim]:
    running = start_server(tls=(str(pki.server_cert), str(pki.server_key)), client_certificates=[app.certificate_pem],
                           mailboxes=[ANNE, BO, CARL])
    yield running
    running.stop()


def reader(sim: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate, planner_organizers: frozenset[str] = frozenset(), **overrides: Any) -> GraphReader:
    values: dict[str, Any] = {"client_secret": None, "client_certificate": app.pem, "client_certificate_passphrase": app.passphrase,
                              "ca_bundle": pki.ca_cert}
    values.update(overrides)
    return GraphReader(graph_settings(sim, **values), planner_organizers=planner_organizers)


def day(offset: int) -> date:
    return datetime.now(CPH).date() + timedelta(days=offset)


def at(offset: int, hour: int, minute: int = 0) -> str:
    """A wall-clock time in Copenhagen ``offset`` days from today, as the item spec takes it."""
    return f"{day(offset).isoformat()}T{hour:02d}:{minute:02d}"


def window(days: int = 30) -> Interval:
    now = datetime.now(UTC)
    return Interval(start=now, end=now + timedelta(days=days))


def add(sim: RunningGraphSim, mailbox: str, **spec: Any) -> int:
    content = {"subject": CANARIES[0], "body": CANARIES[1], "location": CANARIES[2]}
    return sim.state.store.add(mailbox, {**content, **spec}).key


def fault(sim: RunningGraphSim, **spec: Any) -> None:
    sim.state.faults.add(parse_fault(spec))   # the control API over HTTPS is tested in tests/unit/graph_sim


def no_canary(value: Any) -> None:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    for canary in CANARIES:
        assert canary not in text


def dump(items: list[CalendarItem]) -> str:
    return json.dumps([item.model_dump(mode="json") for item in items])


# --- tokens and trust ----------------------------------------------------------------------------------------------
def test_a_certificate_token_is_fetched_once_and_the_configured_ca_wins_over_the_environment(
    sim: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", SYSTEM_BUNDLE)
    monkeypatch.setenv("SSL_CERT_FILE", SYSTEM_BUNDLE)
    add(sim, ANNE, start=at(1, 9), end=at(1, 10))
    graph = reader(sim, pki, app)
    for _ in range(3):
        assert len(graph.view(ANNE, window())) == 1
    assert sim.state.auth.issued == 1
    assert [c["status"] for c in sim.state.call_log("token")] == [200]


def test_a_short_lived_token_is_renewed_before_it_expires(pki: ThrowawayPKI, app: AppCertificate) -> None:
    with start_server(tls=(str(pki.server_cert), str(pki.server_key)), client_certificates=[app.certificate_pem], mailboxes=[ANNE],
                      token_lifetime=120) as short:
        graph = reader(short, pki, app)
        for _ in range(3):
            graph.view(ANNE, window())
        assert short.state.auth.issued == 3   # msal renews a token that has less than 5 minutes left


def test_a_rejected_token_is_dropped_and_fetched_again(sim: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate) -> None:
    graph = reader(sim, pki, app)
    graph.view(ANNE, window())
    sim.state.auth.revoke_all()
    graph.view(ANNE, window())
    assert sim.state.auth.issued == 2
    assert [c["status"] for c in sim.state.call_log("calendarView")] == [200, 200]
    assert [c["status"] for c in sim.state.call_log("-")] == [401]


def test_the_client_secret_is_the_fallback(sim: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate) -> None:
    add(sim, ANNE, start=at(1, 9))
    assert len(reader(sim, pki, app, client_certificate=None, client_secret="sim-secret").view(ANNE, window())) == 1
    with pytest.raises(GraphAuthError, match="invalid_client") as refused:
        reader(sim, pki, app, client_certificate=None, client_secret="wrong").view(ANNE, window())
    assert classify(refused.value) == SourceFault("transient", "token: invalid_client")


def test_an_unregistered_certificate_gets_no_token(sim: RunningGraphSim, pki: ThrowawayPKI, tmp_path: Path) -> None:
    stranger = write_app_certificate(tmp_path)
    with pytest.raises(GraphAuthError, match="invalid_client"):
        reader(sim, pki, stranger, client_certificate_passphrase=None).view(ANNE, window())


def test_an_untrusted_server_fails_even_when_the_environment_would_trust_it(
    sim: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.ca_cert))
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_cert))
    for bundle in (pki.other_ca_cert, None):
        with pytest.raises(requests.exceptions.SSLError, match="(?i)certificate verify failed") as failed:
            reader(sim, pki, app, ca_bundle=bundle).view(ANNE, window())
        assert classify(failed.value).kind == "transient"


# --- reads -----------------------------------------------------------------------------------------------------------
def test_view_follows_next_links_and_returns_no_content(sim: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate) -> None:
    for offset in range(1, 12):
        add(sim, ANNE, start=at(offset, 9), end=at(offset, 10), status="Busy" if offset % 2 else "Tentative")
    add(sim, ANNE, uid="standup@ext.example", start=at(1, 8), end=at(1, 8, 15), recurrence={"pattern": "daily", "count": 12})
    items = reader(sim, pki, app, max_page_size=5).view(ANNE, window())
    assert len(items) == 23
    assert len(sim.state.call_log("calendarView")) == 5
    occurrences = [i for i in items if i.item_type == "occurrence"]
    assert len(occurrences) == 12 and {i.uid for i in occurrences} == {"standup@ext.example"}
    assert all(i.original_start is not None for i in occurrences)
    no_canary(dump(items))


def test_delta_rounds_see_edits_deletes_and_a_removed_occurrence(sim: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate) -> None:
    store = sim.state.store
    single = add(sim, ANNE, uid="single@ext", start=at(2, 9), end=at(2, 10))
    gone = add(sim, ANNE, uid="gone@ext", start=at(3, 9), end=at(3, 10))
    series = add(sim, ANNE, uid=OUTLOOK_UID, start=at(1, 8), end=at(1, 8, 15), recurrence={"pattern": "daily", "count": 5})
    graph = reader(sim, pki, app, max_page_size=3)
    w = window()
    changes, link = graph.sync(ANNE, None, w)
    assert len(changes) == 7 and {c.change for c in changes} == {"upsert"} and len(sim.state.call_log("delta")) == 3
    assert graph.sync(ANNE, link, w)[0] == []
    link = graph.sync(ANNE, link, w)[1]
    store.update(ANNE, single, {"start": at(2, 13), "end": at(2, 14)}, {"uid": "single@ext", "start": at(2, 9)})
    store.delete(ANNE, gone)
    store.delete_occurrence(ANNE, series, {"index": 3})
    store.modify_occurrence(ANNE, series, {"index": 4, "start": at(4, 10), "end": at(4, 10, 30), "status": "Tentative"})
    changes, link = graph.sync(ANNE, link, w)
    deletes = [c for c in changes if c.change == "delete"]
    upserts = {c.item.uid if c.item else None: c for c in changes if c.change == "upsert"}
    assert len(deletes) == 2   # the deleted single and the deleted occurrence
    moved = upserts["single@ext"].item
    assert moved is not None and moved.start == datetime.fromisoformat(at(2, 13)).replace(tzinfo=CPH).astimezone(UTC)
    exceptions = [c.item for c in changes if c.item is not None and c.item.item_type == "exception"]
    assert len(exceptions) == 1 and exceptions[0].free_busy == "Tentative" and exceptions[0].uid == OUTLOOK_UID
    store.move(ANNE, single)
    changes, _link = graph.sync(ANNE, link, w)
    assert [c.change for c in changes] == ["delete"]
    no_canary(repr(changes))


def test_rebase_reads_the_whole_new_window_and_continues_from_there(sim: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate) -> None:
    add(sim, ANNE, start=at(1, 9))
    add(sim, ANNE, start=at(2, 9), recurrence={"pattern": "daily", "count": 4})
    graph = reader(sim, pki, app)
    items, link = graph.rebase(ANNE, window())
    assert sorted(i.item_id for i in items) == sorted(i.item_id for i in graph.view(ANNE, window()))
    assert graph.sync(ANNE, link, window())[0] == []


def test_replays_are_folded_and_removals_of_unseen_items_come_through(sim: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate) -> None:
    add(sim, ANNE, start=at(1, 9))
    add(sim, ANNE, start=at(2, 9))
    graph = reader(sim, pki, app)
    fault(sim, kind="delta_replay", mailbox=ANNE, count=1)
    fault(sim, kind="phantom_removal", mailbox=ANNE, count=1)
    changes, _link = graph.sync(ANNE, None, window())
    assert len(changes) == 3 and len({c.item_id for c in changes}) == 3
    assert sorted(c.change for c in changes) == ["delete", "upsert", "upsert"]


def test_an_expired_delta_link_raises_a_typed_error_and_a_new_round_recovers(sim: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate) -> None:
    add(sim, ANNE, start=at(1, 9))
    graph = reader(sim, pki, app)
    _changes, link = graph.sync(ANNE, None, window())
    fault(sim, kind="sync_state_not_found", mailbox=ANNE, code="resyncRequired", count=1)
    with pytest.raises(SyncStateNotFound) as expired:
        graph.sync(ANNE, link, window())
    assert classify(expired.value) == SourceFault("invalid_sync_state", "HTTP 410 resyncRequired")
    sim.state.delta.clear()   # the simulator forgot every round: Graph's expiry
    with pytest.raises(SyncStateNotFound):
        graph.sync(ANNE, link, window())
    changes, _link = graph.sync(ANNE, None, window())
    assert len(changes) == 1


def test_a_link_to_another_host_is_never_followed(sim: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate) -> None:
    with pytest.raises(GraphProtocolError):
        reader(sim, pki, app).sync(ANNE, "https://graph.evil.example/v1.0/users/x/calendarView/delta?$deltatoken=1", window())
    assert sim.state.call_log("delta") == []


# --- faults ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"kind": "throttle", "retry_after": 7}, SourceFault("throttled", "HTTP 429 ApplicationThrottled", 7.0)),
        ({"kind": "unavailable", "retry_after": 3}, SourceFault("throttled", "HTTP 503 ServiceUnavailable", 3.0)),
        ({"kind": "forbidden"}, SourceFault("mailbox_unavailable", "HTTP 403 ErrorAccessDenied")),
        ({"kind": "not_found"}, SourceFault("mailbox_unavailable", "HTTP 404 ErrorInvalidUser")),
        ({"kind": "server_error", "status": 502}, SourceFault("transient", "HTTP 502 ErrorInternalServerError")),
    ],
)
def test_faults_are_classified_per_mailbox(sim: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate, spec: dict[str, Any],
                                           expected: SourceFault) -> None:
    fault(sim, mailbox=ANNE, **spec)
    graph = reader(sim, pki, app)
    with pytest.raises(GraphError) as failed:
        graph.view(ANNE, window())
    assert classify(failed.value) == expected
    assert graph.view(BO, window()) == []   # the others are not held back


def test_a_mailbox_that_does_not_exist_is_unavailable(sim: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate) -> None:
    with pytest.raises(GraphError) as failed:
        reader(sim, pki, app).sync("nobody@kommune.example", None, window())
    assert classify(failed.value).kind == "mailbox_unavailable"


def test_a_dripping_server_hits_the_hard_deadline(sim: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate) -> None:
    add(sim, ANNE, start=at(1, 9))
    graph = reader(sim, pki, app, timeout=1.5)
    graph.view(ANNE, window())   # a token first, so only the drip is timed
    fault(sim, kind="drip", mailbox=ANNE, endpoint="calendarView", drip_bytes=1, drip_interval_ms=100)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as late:
        graph.view(ANNE, window())
    assert 1.4 < time.monotonic() - started < 3.5
    assert classify(late.value) == SourceFault("transient", "timeout (DeadlineExceeded)")


def test_a_dripping_token_endpoint_hits_the_deadline_too(sim: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate) -> None:
    fault(sim, kind="drip", endpoint="token", drip_bytes=1, drip_interval_ms=100)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        reader(sim, pki, app, timeout=1.5).view(ANNE, window())
    assert time.monotonic() - started < 5


def test_a_response_beyond_the_cap_is_refused(sim: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate) -> None:
    sim.state.store.add(ANNE, {"subject": "x" * 100_000, "start": at(1, 9)})
    with pytest.raises(ResponseTooLarge) as big:
        reader(sim, pki, app, max_response_bytes=64 * 1024).view(ANNE, window())
    assert classify(big.value) == SourceFault("transient", "response too large")


def test_never_more_than_four_requests_in_flight_per_mailbox(sim: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate) -> None:
    add(sim, ANNE, start=at(1, 9))
    graph = reader(sim, pki, app)
    graph.view(ANNE, window())
    fault(sim, kind="latency", mailbox=ANNE, latency_ms=150)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            graph.view(ANNE, window())
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert sim.state.peak_in_flight[ANNE] == 4
    assert all(c["status"] == 200 for c in sim.state.call_log("calendarView"))


# --- $batch ------------------------------------------------------------------------------------------------------------
def test_sync_many_reads_several_mailboxes_through_batch_with_a_fault_each(sim: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate) -> None:
    for offset in range(1, 6):
        add(sim, ANNE, start=at(offset, 9))
    add(sim, BO, start=at(1, 11))
    add(sim, CARL, start=at(1, 12))
    fault(sim, kind="forbidden", mailbox=CARL)
    graph = reader(sim, pki, app, max_page_size=2)
    w = window()
    results = graph.sync_many([DeltaRound(ANNE, None, w), DeltaRound(BO, None, w), DeltaRound(CARL, None, w)])
    anne, bo, carl = results[ANNE], results[BO], results[CARL]
    assert isinstance(anne, DeltaResult) and len(anne.changes) == 5
    assert isinstance(bo, DeltaResult) and len(bo.changes) == 1
    assert carl == SourceFault("mailbox_unavailable", "HTTP 403 ErrorAccessDenied")
    assert len(sim.state.call_log("batch")) == 3   # pages of 2: ANNE needs three rounds trips, the others ride along
    assert all(c["in_batch"] for c in sim.state.call_log("delta"))
    add(sim, BO, start=at(2, 11))
    fault(sim, kind="throttle", mailbox=ANNE, retry_after=11, count=1)
    again = graph.sync_many([DeltaRound(ANNE, anne.delta_link, w), DeltaRound(BO, bo.delta_link, w)])
    assert again[ANNE] == SourceFault("throttled", "HTTP 429 ApplicationThrottled", 11.0)
    assert isinstance(again[BO], DeltaResult) and len(again[BO].changes) == 1


def test_series_uids_come_from_the_masters_through_batch_when_instances_lack_them(sim: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate) -> None:
    uids = [f"series-{n}@ext.example" for n in range(6)]
    for n, uid in enumerate(uids):
        add(sim, ANNE, uid=uid, start=at(1, 8 + n), end=at(1, 8 + n, 30), recurrence={"pattern": "daily", "count": 2})
    fault(sim, kind="no_ical_uid", mailbox=ANNE, endpoint="calendarView")
    graph = reader(sim, pki, app, max_page_size=50)
    items = graph.view(ANNE, window())
    assert len(items) == 12 and sorted({i.uid for i in items}) == sorted(uids)
    master_reads = sim.state.call_log("events")
    assert len(master_reads) == 6 and all(c["in_batch"] and c["status"] == 200 for c in master_reads)
    assert len(sim.state.call_log("batch")) == 2   # four per mailbox per $batch, then two
    assert sim.state.peak_in_flight[ANNE] <= 4
    graph.view(ANNE, window())
    assert len(sim.state.call_log("events")) == 6   # cached


# --- the producer's pass ------------------------------------------------------------------------------------------------
@dataclass
class Positions:
    saved: dict[str, SyncPosition]

    def sync_position(self, mailbox: str) -> SyncPosition | None:
        return self.saved.get(mailbox)

    def save_sync_position(self, mailbox: str, sync_state: str, read_at: datetime, full: bool, backend: Backend = "ews") -> None:
        self.saved[mailbox] = SyncPosition(sync_state, read_at, read_at if full else None, backend)


def test_sync_mailbox_runs_over_graph_with_the_delta_link_as_sync_state(sim: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate) -> None:
    add(sim, ANNE, start=at(1, 9))
    add(sim, ANNE, start=at(2, 9), recurrence={"pattern": "daily", "count": 3})
    graph, positions, published = reader(sim, pki, app), Positions({}), []
    w, ids = window(), iter(range(1000))
    observed = datetime.now(UTC)
    result = sync_mailbox(ANNE, GraphSyncReader(graph, w), positions, published.extend, w, observed, lambda: f"c{next(ids)}", backend="graph")
    assert result.published == 4 and result.full_resync
    assert all(isinstance(m, CalendarChange) and m.source == "graph" and m.change == "upsert" for m in published)
    assert positions.saved[ANNE].sync_state is not None and "$deltatoken=" in positions.saved[ANNE].sync_state  # type: ignore[operator]
    add(sim, ANNE, start=at(3, 9))
    result = sync_mailbox(ANNE, GraphSyncReader(graph, w), positions, published.extend, w, observed, lambda: f"c{next(ids)}", backend="graph")
    assert result.published == 1 and not result.full_resync
    no_canary([m.model_dump(mode="json") for m in published])


# --- canaries ----------------------------------------------------------------------------------------------------------
def test_subject_body_and_location_never_reach_results_or_logs(sim: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    add(sim, ANNE, start=at(1, 9), end=at(1, 10))
    series = add(sim, ANNE, start=at(1, 11), recurrence={"pattern": "daily", "count": 3})
    sim.state.store.modify_occurrence(ANNE, series, {"index": 2, "subject": CANARIES[0] + "-exception", "location": CANARIES[2]})
    add(sim, BO, start=at(1, 9))
    with capture_logs() as logs:
        graph = reader(sim, pki, app, max_page_size=2)
        results: list[Any] = [graph.view(ANNE, window())]
        changes, link = graph.sync(ANNE, None, window())
        results.append(changes)
        sim.state.store.update(ANNE, series, {"body": CANARIES[1] + "-edited"}, {"start": at(1, 11), "recurrence": {"pattern": "daily", "count": 3}})
        results.append(graph.sync(ANNE, link, window())[0])
        results.append(graph.sync_many([DeltaRound(BO, None, window())]))
        fault(sim, kind="no_ical_uid", mailbox=ANNE, endpoint="calendarView", count=1)
        results.append(graph.view(ANNE, window()))
    no_canary(repr(results))
    no_canary(repr(logs))
    no_canary(caplog.text)
    assert any(entry["event"] == "graph_view_read" for entry in logs)


# --- one scenario, two protocols --------------------------------------------------------------------------------------
def test_a_week_reads_the_same_through_ews_and_through_graph(pki: ThrowawayPKI, app: AppCertificate) -> None:
    ews = start_ews(users={"svc": "pw"}, mailboxes=[ANNE])
    graph_sim = start_server(tls=(str(pki.server_cert), str(pki.server_key)), store=ews.state.store, client_certificates=[app.certificate_pem])
    try:
        store = ews.state.store
        monday = day(7 - day(0).weekday())
        offset = (monday - day(0)).days
        series = store.add(ANNE, {"uid": OUTLOOK_UID, "subject": CANARIES[0], "start": at(offset, 9), "end": at(offset, 9, 15),
                                  "recurrence": {"pattern": "weekly", "days_of_week": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"],
                                                 "count": 5}})
        store.modify_occurrence(ANNE, series.key, {"index": 3, "start": at(offset + 2, 10), "end": at(offset + 2, 10, 30)})
        store.delete_occurrence(ANNE, series.key, {"index": 4})
        store.add(ANNE, {"start": (monday + timedelta(days=4)).isoformat(), "all_day": True, "status": "OOF", "uid": "oof-friday"})
        store.add(ANNE, {"start": at(offset + 1, 12), "end": at(offset + 1, 12, 30), "status": "Free", "subject": "Frokost"})
        invitation = "20261019T070000Z-4711@kalender.kommune.example"
        store.add(ANNE, {"uid": invitation, "start": at(offset + 1, 14), "end": at(offset + 1, 15), "organizer": "Planner@Jobcenter.example"})
        store.add(ANNE, {"start": at(offset + 3, 15), "end": at(offset + 3, 16), "status": "Tentative", "sensitivity": "Private"})
        w = Interval(start=datetime.now(UTC), end=datetime.combine(monday + timedelta(days=7), datetime.min.time(), tzinfo=CPH).astimezone(UTC))
        exchangelib.protocol.close_connections()
        planner = frozenset({"planner@jobcenter.example"})   # the policy's lower-cased addresses (decision 71)
        via_ews = EwsConnection(ExchangeSettings(endpoint=ews.url, username="svc", password="pw"), "Europe/Copenhagen", 2, planner).view(ANNE, w)
        via_graph = reader(graph_sim, pki, app, planner).view(ANNE, w)

        def busy(items: list[CalendarItem]) -> dict[str, Interval | None]:
            return {origin_id(item, POLICY.zone): busy_interval(item, POLICY) for item in items}

        assert len(via_ews) == len(via_graph) == 8   # 4 standups (one moved, one deleted), OOF, lunch, invitation, tentative
        assert busy(via_graph) == busy(via_ews)
        assert sum(interval is not None for interval in busy(via_graph).values()) == 6   # lunch is free, Planner's invitation is not busy
        for items in (via_ews, via_graph):
            assert {i.uid: i.organizer_is_planner for i in items if i.item_type == "single" and i.uid == invitation} == {invitation: True}
            assert not any(i.organizer_is_planner for i in items if i.uid != invitation)
            assert "jobcenter.example" not in dump(items).lower()
        assert {i.item_type for i in via_graph} == {"single", "occurrence", "exception"}
        assert f"{OUTLOOK_UID}${(monday + timedelta(days=2)).strftime('%Y%m%d')}-090000" in busy(via_graph)
        no_canary(dump(via_graph))
    finally:
        graph_sim.stop()
        ews.stop()
        exchangelib.protocol.close_connections()
