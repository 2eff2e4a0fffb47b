"""The producers serving Graph mailboxes (Exchange Online) beside EWS ones, against both simulators on one calendar
store, the real broker and a real store: delta polling, faults per mailbox, a 410, a move between backends, the
nightly re-based snapshot, and readers built only when a mailbox needs them."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import exchangelib.protocol
import pytest
import requests

from services.change_producer.worker import build
from services.snapshot_producer.worker import run_snapshots
from shared.adapters.store import Store, upgrade
from shared.broker.topology import Topology
from shared.config import Settings
from shared.domain.contracts import CalendarChange, CalendarSnapshot
from simulators.exchange.server import RunningExchangeSim
from simulators.exchange.server import start_server as start_ews
from simulators.graph.faults import parse_fault
from simulators.graph.server import RunningGraphSim
from simulators.graph.server import start_server as start_graph
from tests.support.graph import AppCertificate, with_graph
from tests.support.producers import CPH, Collector, producer_settings
from tests.support.tls import ThrowawayPKI
from tests.support.waiting import wait_for

ANNE, BO, CARL, DORTE = "anne@kommune.example", "bo@kommune.example", "carl@kommune.example", "dorte@kommune.example"


@pytest.fixture
def ews() -> Iterator[RunningExchangeSim]:
    sim = start_ews(users={"svc": "pw"}, minute_seconds=2.0, keepalive_seconds=0.5, mailboxes=[ANNE, BO, CARL, DORTE])
    yield sim
    sim.stop()
    exchangelib.protocol.close_connections()


@pytest.fixture
def graph(ews: RunningExchangeSim, pki: ThrowawayPKI, app: AppCertificate) -> Iterator[RunningGraphSim]:
    """The Graph simulator on the EWS simulator's calendar store: one calendar, two protocols."""
    sim = start_graph(tls=(str(pki.server_cert), str(pki.server_key)), store=ews.state.store, client_certificates=[app.certificate_pem])
    yield sim
    sim.stop()


@pytest.fixture
def collector(topology: Topology) -> Iterator[Collector]:
    c = Collector(topology)
    yield c
    c.close()


@pytest.fixture
def store(settings: Settings) -> Store:
    s = Store.connect(settings.database_url())
    upgrade(s.engine)
    return s


def config(settings: Settings, ews: RunningExchangeSim, graph: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate,
           default_backend: str = "ews", **graph_values: Any) -> Settings:
    return with_graph(producer_settings(settings, ews), graph, app, pki.ca_cert, default_backend, **graph_values)


class Running:
    def __init__(self, settings: Settings) -> None:
        self.producer = build(settings)
        self.thread = threading.Thread(target=self.producer.run, daemon=True)

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.producer.stop()
        self.thread.join(20)


def at(days: int, hour: int, minute: int = 0) -> str:
    day = (datetime.now(CPH) + timedelta(days=days)).date()
    return f"{day.isoformat()}T{hour:02d}:{minute:02d}"


def add(sim: RunningExchangeSim | RunningGraphSim, mailbox: str, **spec: Any) -> str:
    spec.setdefault("uid", f"uid-{uuid.uuid4().hex}@ext.example")
    spec.setdefault("subject", "CANARY-subject")
    sim.state.store.add(mailbox, spec)
    return str(spec["uid"])


def fault(sim: RunningGraphSim, **spec: Any) -> None:
    sim.state.faults.add(parse_fault(spec))


def position(store: Store, mailbox: str) -> Any:
    return store.sync_position(mailbox)


def status(store: Store, mailbox: str) -> tuple[str, str | None]:
    row = next(r for r in store.list_mailboxes() if r.address == mailbox)
    return row.status, row.status_detail


def streaming(sim: RunningExchangeSim) -> set[str]:
    rows = requests.get(f"{sim.control_url}/subscriptions", timeout=10).json()
    return {(r.get("mailbox") or "").lower() for r in rows if r.get("kind") == "streaming" and not r.get("gone")}


def snapshots(collector: Collector, mailbox: str) -> list[CalendarSnapshot]:
    return [m for m in collector.poll() if isinstance(m, CalendarSnapshot) and m.mailbox == mailbox]


# --- delta polling ----------------------------------------------------------------------------------------------------
def test_graph_mailboxes_are_polled_by_delta_and_no_ews_connection_is_built(
    settings: Settings, topology: Topology, ews: RunningExchangeSim, graph: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate,
    store: Store, collector: Collector,
) -> None:
    store.add_mailbox(ANNE)   # the default backend: graph here
    store.add_mailbox(BO)
    with Running(config(settings, ews, graph, pki, app, default_backend="graph")) as running:
        wait_for(lambda: position(store, ANNE) and position(store, BO), 20, what="first delta rounds")
        assert position(store, ANNE).backend == "graph" and "deltatoken" in position(store, ANNE).sync_state
        uid = add(graph, ANNE, start=at(2, 9), end=at(2, 10))
        changes = wait_for(lambda: collector.changes_for(uid), 15, what="the change, found by delta polling")
        rounds = len(graph.state.call_log("delta", ANNE))
        wait_for(lambda: len(graph.state.call_log("delta", ANNE)) >= rounds + 3, 10, what="polling every delta_interval")
        facts = running.producer.health().facts
        assert running.producer.ews.built is None       # no EWS mailbox: no EWS connection at all
    assert facts["graph"] == 2 and facts["subscribed"] == 0 and facts["failing"] == 0
    assert changes[0].change == "upsert" and changes[0].mailbox == ANNE and changes[0].item is not None
    assert changes[0].item.item_type == "single" and changes[0].item.free_busy == "Busy"
    assert streaming(ews) == set() and not requests.get(f"{ews.control_url}/calls", timeout=10).json()


def test_an_ews_installation_needs_no_graph_settings_and_a_graph_mailbox_without_them_only_fails_itself(
    settings: Settings, topology: Topology, ews: RunningExchangeSim, store: Store, collector: Collector
) -> None:
    store.add_mailbox(ANNE)
    with Running(producer_settings(settings, ews)) as running:   # no PLANNERSYNC_GRAPH__* at all
        wait_for(lambda: ANNE in streaming(ews) and position(store, ANNE), 20, what="the EWS mailbox streaming and read")
        assert running.producer.graph.built is None
        store.add_mailbox(BO, backend="graph")
        wait_for(lambda: status(store, BO)[0] == "failing", 15, what="the Graph mailbox failing for want of settings")
        assert "Graph is not configured" in (status(store, BO)[1] or "") and "PLANNERSYNC_GRAPH__" in (status(store, BO)[1] or "")
        uid = add(ews, ANNE, start=at(3, 9), end=at(3, 10))
        wait_for(lambda: collector.changes_for(uid), 15, what="the EWS mailbox still flowing")
        assert running.thread.is_alive()


# --- faults -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "expected_status", "failed_status"),
    [
        ({"kind": "throttle", "retry_after": 2, "count": 1}, "throttled", 429),
        ({"kind": "unavailable", "retry_after": 2, "count": 1}, "throttled", 503),
        ({"kind": "forbidden", "count": 2}, "failing", 403),
        ({"kind": "not_found", "count": 2}, "failing", 404),
        ({"kind": "server_error", "status": 500, "count": 2}, "retrying", 500),
        ({"kind": "drip", "drip_bytes": 1, "drip_interval_ms": 200, "count": 1}, "retrying", None),
    ],
    ids=lambda v: v["kind"] if isinstance(v, dict) else str(v),
)
def test_a_graph_fault_waits_for_its_mailbox_alone_and_nothing_is_lost(
    spec: dict[str, Any], expected_status: str, failed_status: int | None, settings: Settings, topology: Topology, ews: RunningExchangeSim,
    graph: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate, store: Store, collector: Collector,
) -> None:
    store.add_mailbox(ANNE, backend="graph")
    store.add_mailbox(BO, backend="graph")
    store.add_mailbox(CARL)   # EWS
    with Running(config(settings, ews, graph, pki, app, timeout="1500ms")):
        wait_for(lambda: all(position(store, m) for m in (ANNE, BO, CARL)), 30, what="first reads")
        fault(graph, mailbox=ANNE, endpoint="delta", **spec)
        anne = add(graph, ANNE, start=at(4, 9), end=at(4, 10))
        bo = add(graph, BO, start=at(4, 11), end=at(4, 12))
        carl = add(ews, CARL, start=at(4, 13), end=at(4, 14))
        wait_for(lambda: status(store, ANNE)[0] == expected_status, 20, what=f"status {expected_status}")
        wait_for(lambda: collector.changes_for(bo) and collector.changes_for(carl), 15, what="the other mailboxes' changes")
        if expected_status == "throttled":   # while the throttled mailbox waits out its Retry-After
            assert not collector.changes_for(anne)
        detail = status(store, ANNE)[1] or ""
        wait_for(lambda: collector.changes_for(anne), 30, what="the faulty mailbox's change after recovery")
        wait_for(lambda: status(store, ANNE)[0] == "active", 15, what="status back to active")
    calls = graph.state.call_log("delta", ANNE)
    if failed_status is not None:
        failed = [c for c in calls if c["status"] == failed_status]
        assert failed, calls
        if expected_status == "throttled":   # the next read waited as long as Retry-After said
            after = [c for c in calls if c["time"] > failed[-1]["time"]]
            waited = datetime.fromisoformat(after[0]["time"]) - datetime.fromisoformat(failed[-1]["time"])
            assert waited >= timedelta(seconds=spec["retry_after"] - 0.2)
    if spec["kind"] == "forbidden":
        assert "RBAC" in detail and "403" in detail
    if spec["kind"] == "not_found":
        assert "no such mailbox" in detail and "404" in detail
    assert not snapshots(collector, ANNE)   # none of these needs a snapshot


def test_graph_mailboxes_are_polled_together_through_batch_and_a_failed_batch_isolates_its_mailboxes(
    settings: Settings, topology: Topology, ews: RunningExchangeSim, graph: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate,
    store: Store, collector: Collector,
) -> None:
    mailboxes = [f"batch{n:02d}@kommune.example" for n in range(7)]
    for mailbox in mailboxes:
        graph.state.store.ensure_mailbox(mailbox)
        store.add_mailbox(mailbox, backend="graph")
    with Running(config(settings, ews, graph, pki, app, timeout="1500ms", batch_size=4)):
        wait_for(lambda: all(position(store, m) for m in mailboxes), 30, what="first reads")
        graph.state.clear_calls()
        uids = [add(graph, mailbox, start=at(3, 9), end=at(3, 10)) for mailbox in mailboxes]
        wait_for(lambda: all(collector.changes_for(uid) for uid in uids), 20, what="every mailbox's change")
        polled = graph.state.call_log()
        # a whole $batch answer dripping: every mailbox in it fails once, then each is read alone and nothing is lost
        fault(graph, endpoint="batch", kind="drip", drip_bytes=1, drip_interval_ms=300, count=1)
        graph.state.clear_calls()
        later = [add(graph, mailbox, start=at(3, 11), end=at(3, 12)) for mailbox in mailboxes]
        wait_for(lambda: all(collector.changes_for(uid) for uid in later), 30, what="every mailbox's change after the failed batch")
        after_fault = graph.state.call_log()
    delta = [c for c in polled if c["endpoint"] == "delta"]
    assert delta and all(c["in_batch"] for c in delta), delta                       # no mailbox polled on its own
    batches = [c for c in polled if c["endpoint"] == "batch"]
    assert len(delta) >= 2 * len(batches) > 0, (len(delta), len(batches))            # several mailboxes per HTTP request
    alone = {c["mailbox"] for c in after_fault if c["endpoint"] == "delta" and not c["in_batch"]}
    assert alone and alone <= set(mailboxes), after_fault                            # the failed batch's mailboxes, read alone
    assert all(status(store, m)[0] == "active" for m in mailboxes)


def test_an_expired_delta_link_reads_the_mailbox_again_and_publishes_a_snapshot(
    settings: Settings, topology: Topology, ews: RunningExchangeSim, graph: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate,
    store: Store, collector: Collector,
) -> None:
    store.add_mailbox(ANNE, backend="graph")
    before = add(graph, ANNE, start=at(1, 9), end=at(1, 10))
    gone = graph.state.store.add(ANNE, {"uid": "gone@ext.example", "start": at(1, 11), "end": at(1, 12)})
    with Running(config(settings, ews, graph, pki, app)):
        wait_for(lambda: position(store, ANNE), 20, what="first read")
        first_link = position(store, ANNE).sync_state
        fault(graph, mailbox=ANNE, endpoint="delta", kind="sync_state_not_found", code="resyncRequired", count=1)
        graph.state.store.delete(ANNE, gone.key)   # deleted while the link is dead: only the snapshot can say so
        new = add(graph, ANNE, start=at(2, 9), end=at(2, 10))
        parts = wait_for(lambda: [p for p in snapshots(collector, ANNE) if p.final], 20, what="the snapshot after the 410")
        wait_for(lambda: position(store, ANNE).sync_state != first_link, 10, what="a new delta link saved")
    assert [c["status"] for c in graph.state.call_log("delta", ANNE)].count(410) == 1
    uids = {i.uid for p in snapshots(collector, ANNE) for i in p.items}
    assert uids == {before, new} and parts[0].source == "graph" and parts[0].total_parts == 1


# --- moving between backends ------------------------------------------------------------------------------------------
def test_a_mailbox_moved_from_ews_to_graph_is_read_in_full_by_graph_and_its_stream_ends(
    settings: Settings, topology: Topology, ews: RunningExchangeSim, graph: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate,
    store: Store, collector: Collector,
) -> None:
    store.add_mailbox(ANNE)
    store.add_mailbox(BO)
    series = add(ews, ANNE, start=at(1, 8), end=at(1, 8, 30), recurrence={"pattern": "daily", "count": 5})
    with Running(config(settings, ews, graph, pki, app)) as running:
        wait_for(lambda: streaming(ews) >= {ANNE, BO} and position(store, ANNE), 20, what="both mailboxes streaming")
        assert running.producer.graph.built is None
        store.set_backend(ANNE, "graph")
        wait_for(lambda: position(store, ANNE).backend == "graph", 20, what="the first read by Graph")
        parts = wait_for(lambda: [p for p in snapshots(collector, ANNE) if p.final and p.source == "graph"], 10, what="a snapshot by Graph")
        wait_for(lambda: ANNE not in streaming(ews), 20, what="the EWS subscription ended")
        assert {i.uid for p in snapshots(collector, ANNE) for i in p.items} == {series} and len(parts) == 1
        assert position(store, ANNE).last_full_sync_at is not None
        after = add(graph, ANNE, start=at(2, 13), end=at(2, 14))
        wait_for(lambda: collector.changes_for(after), 15, what="an edit after the move")
        bo = add(ews, BO, start=at(2, 15), end=at(2, 16))
        wait_for(lambda: collector.changes_for(bo), 15, what="the EWS mailbox still streaming")
        assert BO in streaming(ews) and running.producer.backend_of(ANNE) == "graph"


# --- the nightly snapshot -----------------------------------------------------------------------------------------------
def test_the_nightly_snapshot_of_a_graph_mailbox_rebases_its_delta_round(
    settings: Settings, topology: Topology, ews: RunningExchangeSim, graph: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate,
    store: Store, collector: Collector,
) -> None:
    cfg = config(settings, ews, graph, pki, app, max_page_size=5)
    store.add_mailbox(ANNE, backend="graph")
    store.add_mailbox(BO)                       # EWS
    store.add_mailbox(CARL, backend="graph")
    store.save_sync_position(ANNE, "stale-link", datetime.now(CPH), full=False, backend="graph")
    store.save_sync_position(BO, "ews-state", datetime.now(CPH), full=False, backend="ews")
    uids = [add(graph, ANNE, start=at(d, 9), end=at(d, 10)) for d in range(1, 13)]   # 12 items: pages of 5
    add(ews, BO, start=at(1, 9), end=at(1, 10))
    fault(graph, mailbox=CARL, kind="forbidden")
    results = {r.mailbox: r for r in run_snapshots(cfg, [ANNE, BO, CARL], None, store, topology)}
    assert (results[ANNE].items, results[ANNE].error) == (12, None) and (results[BO].items, results[BO].error) == (1, None)
    assert results[CARL].items is None and "RBAC" in (results[CARL].error or "")
    assert status(store, CARL)[0] == "failing"
    parts = snapshots(collector, ANNE)
    assert len(parts) == 1 and parts[0].final and parts[0].source == "graph" and {i.uid for i in parts[0].items} == set(uids)
    saved = position(store, ANNE)
    assert saved.backend == "graph" and saved.sync_state != "stale-link" and "deltatoken" in saved.sync_state
    assert saved.last_full_sync_at is not None
    assert position(store, BO).sync_state == "ews-state"   # an EWS snapshot leaves the SyncFolderItems state alone
    assert len(graph.state.call_log("calendarView", ANNE)) == 0 and len(graph.state.call_log("delta", ANNE)) == 3   # 12 items, pages of 5
    # the change producer continues from the re-based link: only what changed since
    with Running(cfg):
        later = add(graph, ANNE, start=at(20, 9), end=at(20, 10))
        wait_for(lambda: collector.changes_for(later), 15, what="a change after the snapshot")
    published = [m for m in collector.messages if isinstance(m, CalendarChange) and m.mailbox == ANNE]
    assert {m.item.uid for m in published if m.item is not None} == {later}
