"""The nightly snapshot against the EWS simulator: complete past the view cap, never half-published."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

import pytest
import requests

from services.snapshot_producer.worker import SnapshotProducer, build, run_snapshots
from shared.adapters.ews import EwsConnection
from shared.adapters.store import Store, upgrade
from shared.broker.topology import Topology
from shared.config import Settings
from shared.domain.contracts import CalendarSnapshot
from shared.domain.timing import next_run
from simulators.exchange.server import RunningExchangeSim, start_server
from tests.support.producers import CPH, Collector, producer_settings
from tests.support.waiting import wait_for

BIG, SMALL = "big@jobcenter.dk", "small@jobcenter.dk"


@pytest.fixture
def ews() -> Iterator[RunningExchangeSim]:
    import exchangelib.protocol

    sim = start_server(users={"svc": "pw"}, mailboxes=[BIG, SMALL])
    yield sim
    sim.stop()
    exchangelib.protocol.close_connections()


@pytest.fixture
def collector(topology: Topology) -> Iterator[Collector]:
    c = Collector(topology)
    yield c
    c.close()


def seed_big(sim: RunningExchangeSim, series: int, days: int) -> None:
    first = (datetime.now(CPH) + timedelta(days=1)).date()
    for n in range(series):
        minute = 7 * 60 + n * 15
        spec: dict[str, Any] = {
            "start": f"{first.isoformat()}T{minute // 60:02d}:{minute % 60:02d}",
            "end": f"{first.isoformat()}T{(minute + 10) // 60:02d}:{(minute + 10) % 60:02d}",
            "timezone": "Romance Standard Time",
            "recurrence": {"pattern": "daily", "count": days},
            "subject": f"CANARY-bulk-{n}",
        }
        assert requests.post(f"{sim.control_url}/mailboxes/{BIG}/items", json=spec, timeout=10).status_code == 201


def parts_for(collector: Collector, mailbox: str) -> list[CalendarSnapshot]:
    return [m for m in collector.poll() if isinstance(m, CalendarSnapshot) and m.mailbox == mailbox]


def test_a_snapshot_of_3000_items_is_complete(settings: Settings, topology: Topology, ews: RunningExchangeSim, collector: Collector, tmp_path: Any) -> None:
    seed_big(ews, series=34, days=89)  # 3,026 occurrences inside the 3-month window, 3x Exchange's view cap
    config = producer_settings(settings, ews, snapshot_part_size=500)
    store = Store.connect(config.database_url())
    upgrade(store.engine)
    exchange = EwsConnection(config.exchange, "Europe/Copenhagen", 4)
    results = run_snapshots(config, [BIG, SMALL], exchange, store, topology)
    assert [(r.mailbox, r.items, r.error) for r in results] == [(BIG, 3026, None), (SMALL, 0, None)]

    parts = parts_for(collector, BIG)
    final = [p for p in parts if p.final]
    assert len(final) == 1 and final[0].total_parts == len(parts) == 7
    assert sorted(p.part for p in parts) == list(range(1, 8))
    ids = {item.item_id for p in parts for item in p.items}
    assert len(ids) == 3026 and len({p.snapshot_id for p in parts}) == 1
    assert all(item.item_type == "occurrence" for p in parts for item in p.items)
    empty = parts_for(collector, SMALL)
    assert len(empty) == 1 and empty[0].final and empty[0].items == []
    calls = requests.get(f"{ews.control_url}/calls", timeout=10).json()
    rows = calls.get("calls", calls) if isinstance(calls, dict) else calls
    assert sum(1 for c in rows if c.get("operation") == "FindItem" and (c.get("mailbox") or "").lower() == BIG) > 3  # paged around the cap


def test_an_interrupted_snapshot_is_not_published_and_the_others_are(settings: Settings, topology: Topology, ews: RunningExchangeSim, collector: Collector) -> None:
    seed_big(ews, series=15, days=89)
    requests.post(f"{ews.control_url}/mailboxes/{SMALL}/items", json={"start": (datetime.now(CPH) + timedelta(days=2)).strftime("%Y-%m-%dT09:00"), "timezone": "Romance Standard Time"}, timeout=10)
    requests.post(f"{ews.control_url}/faults", json={"kind": "http_503", "mailbox": BIG, "operations": ["GetItem"], "count": 1, "retry_after": 1}, timeout=10)
    config = producer_settings(settings, ews)
    store = Store.connect(config.database_url())
    upgrade(store.engine)
    store.add_mailbox(BIG)
    results = {r.mailbox: r for r in run_snapshots(config, [BIG, SMALL], EwsConnection(config.exchange, "Europe/Copenhagen", 4), store, topology)}
    assert results[BIG].error is not None and results[BIG].items is None
    assert results[SMALL].error is None and results[SMALL].items == 1
    assert parts_for(collector, BIG) == []  # nothing at all, so certainly no final part
    assert len(parts_for(collector, SMALL)) == 1
    assert store.list_mailboxes()[0].status == "snapshot_failed"


def test_health_says_waiting_with_the_next_run_and_beats_while_it_waits(settings: Settings, topology: Topology, ews: RunningExchangeSim) -> None:
    config = producer_settings(settings, ews)
    producer = build(config)
    thread = threading.Thread(target=producer.run, daemon=True)
    thread.start()
    try:
        health = wait_for(lambda: (h := producer.health()).facts["next_run_at"] and h, 10, what="the next run scheduled")
        assert health.state == "waiting" and health.ok
        assert health.facts["next_run_at"] == next_run(datetime.now(timezone.utc), config.exchange.snapshot_time, config.busy.time_zone).isoformat()
        assert (health.facts["runs"], health.facts["last_run_at"]) == (0, None)
        wait_for(lambda: producer.health().beat_at > health.beat_at, 5, what="a beat while waiting")
    finally:
        producer.stop()
        thread.join(10)
    assert not thread.is_alive()


def test_health_reports_the_run_it_did_and_waits_for_the_next(settings: Settings, topology: Topology, ews: RunningExchangeSim, collector: Collector) -> None:
    config = producer_settings(settings, ews)
    store = Store.connect(config.database_url())
    upgrade(store.engine)
    store.add_mailbox(SMALL)
    real = datetime.now(timezone.utc)
    due = next_run(real, config.exchange.snapshot_time, config.busy.time_zone)
    offset = due - timedelta(seconds=3) - real          # the producer's clock shows three seconds before the run

    def clock() -> datetime:
        return datetime.now(timezone.utc) + offset

    producer = SnapshotProducer(config, store, EwsConnection(config.exchange, config.busy.time_zone, 4), topology, clock)
    thread = threading.Thread(target=producer.run, daemon=True)
    thread.start()
    try:
        waiting = wait_for(lambda: (h := producer.health()).facts["next_run_at"] and h, 10, what="the run scheduled")
        assert waiting.state == "waiting" and waiting.facts["next_run_at"] == due.isoformat()
        done = wait_for(lambda: (h := producer.health()).facts["runs"] == 1 and h.state == "waiting" and h, 30, what="the run done")
        assert done.facts["last_run_mailboxes"] == 1 and done.facts["last_run_failed"] == 0
        assert datetime.fromisoformat(done.facts["last_run_at"]) >= due
        assert datetime.fromisoformat(done.facts["next_run_at"]) > due
        parts = wait_for(lambda: parts_for(collector, SMALL), 10, what="the snapshot on the broker")
        assert len(parts) == 1 and parts[0].final
    finally:
        producer.stop()
        thread.join(10)
    assert not thread.is_alive()
