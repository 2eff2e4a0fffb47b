"""The EWS reader loses nothing when a read fails: a broker cut mid-read, sync states invalidated by a mailbox move.

A failed first read: a mailbox is enrolled, its first SyncFolderItems read returns everything, and the connection to
RabbitMQ drops while the changes are being published. The retry must read the mailbox again from nothing, not
continue from a sync state exchangelib cached on its folder object during the failed pass (decision 25 in
docs/decisions.md). The cut is made by a TCP proxy between the producer and the broker, after a fixed number of
bytes, so it lands in the middle of the burst without any timing.

Invalidated sync states: after a mailbox move or restore Exchange refuses every sync state it handed out,
including the one exchangelib keeps on its cached folder object. The full re-read must then send no state at
all, find the changes, and publish a snapshot (so deletions are found too), instead of sending the refused
state again in a loop.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from typing import Any, Iterator

import psycopg
import pytest
import requests

from services.change_producer.worker import build
from shared.adapters.store import Store, upgrade
from shared.broker.topology import Topology
from shared.config import Settings, load_settings
from shared.domain.contracts import CalendarSnapshot
from simulators.exchange.server import RunningExchangeSim, start_server
from tests.support.producers import CPH, Collector, producer_settings
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import wait_for

ANNE = "anne@jobcenter.dk"
APPOINTMENTS = 300


@pytest.fixture
def ews() -> Iterator[RunningExchangeSim]:
    import exchangelib.protocol

    sim = start_server(users={"svc": "pw"}, minute_seconds=2.0, keepalive_seconds=0.5, mailboxes=[ANNE])
    yield sim
    sim.stop()
    exchangelib.protocol.close_connections()


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    p = TcpProxy(5672)
    yield p
    p.close()


def test_a_broker_cut_during_the_first_read_loses_no_appointment(settings: Settings, topology: Topology, ews: RunningExchangeSim, proxy: TcpProxy) -> None:
    day = (datetime.now(CPH) + timedelta(days=1)).date()
    specs = [
        {"uid": f"first-read-{n}", "start": f"{day + timedelta(days=n // 8)}T{8 + n % 8:02d}:00", "end": f"{day + timedelta(days=n // 8)}T{8 + n % 8:02d}:30",
         "status": "Busy", "timezone": "Romance Standard Time"}
        for n in range(APPOINTMENTS)
    ]
    requests.post(f"{ews.control_url}/mailboxes/{ANNE}/items", json={"items": specs}, timeout=30).raise_for_status()
    store = Store.connect(settings.database_url())
    upgrade(store.engine)
    store.add_mailbox(ANNE)
    through_proxy = load_settings(environ={}, **{**producer_settings(settings, ews).model_dump(mode="python"), "broker": {**settings.broker.model_dump(mode="python"), "port": proxy.port}})
    proxy.cut_after(60_000)  # the handshake, the topology and some tens of the first read's changes get through
    collector = Collector(topology)
    producer = build(through_proxy)
    thread = threading.Thread(target=producer.run, daemon=True)
    thread.start()

    def seen() -> set[str]:
        return {m.item.uid for m in collector.poll() if m.type == "calendar_change" and m.item is not None}

    try:
        wait_for(lambda: proxy.cuts >= 1, 30, what="the proxy to cut the producer's connection mid-burst")
        wait_for(lambda: len(seen()) >= APPOINTMENTS, 60, interval=0.2, what=f"all {APPOINTMENTS} appointments on the broker")
        published = seen()
    finally:
        producer.stop()
        thread.join(20)
        collector.close()
    assert published == {spec["uid"] for spec in specs}
    assert store.sync_position(ANNE) is not None  # the retried read finished and recorded its state


def test_an_appointment_deleted_after_a_failed_first_read_published_it_is_deleted_by_the_retried_read(
    settings: Settings, topology: Topology, ews: RunningExchangeSim, pg_url: str, pg_admin: Any,
) -> None:
    """The first read publishes its changes and then cannot save its sync state (the database connection is cut while
    the write waits), so the retry reads from nothing. An appointment already published is deleted before the
    retry. A read from nothing shows only what exists: without a snapshot beside it the deletion is never said and
    the busy time stays in Planner until the nightly snapshot (found by the fault suite's SIGKILL scenario under
    load). The first read marks the mailbox before it publishes, so the retry knows and publishes a complete
    snapshot, read after its read from nothing (decision 85)."""
    day = (datetime.now(CPH) + timedelta(days=1)).date()
    specs = [
        {"uid": f"first-read-{n}", "start": f"{day + timedelta(days=n // 8)}T{8 + n % 8:02d}:00", "end": f"{day + timedelta(days=n // 8)}T{8 + n % 8:02d}:30",
         "status": "Busy", "timezone": "Romance Standard Time"}
        for n in range(20)
    ]
    requests.post(f"{ews.control_url}/mailboxes/{ANNE}/items", json={"items": specs}, timeout=30).raise_for_status()
    store = Store.connect(pg_url)
    upgrade(store.engine)
    store.add_mailbox(ANNE)
    database = pg_url.rsplit("/", 1)[1]
    config = load_settings(environ={}, **{**producer_settings(settings, ews).model_dump(mode="python"), "database": {"url": pg_url}})
    collector = Collector(topology)
    locker = psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
    producer = build(config)
    thread = threading.Thread(target=producer.run, daemon=True)

    def changed() -> list[str]:
        return [m.item.uid for m in collector.poll() if m.type == "calendar_change" and m.item is not None]

    # the first read's answer waits 3 s: time to lock the sync states once the read has marked the mailbox
    requests.post(f"{ews.control_url}/faults", json={"kind": "latency", "latency_ms": 3000, "mailbox": ANNE,
                                                     "operations": ["SyncFolderItems"], "count": 1}, timeout=10).raise_for_status()
    try:
        thread.start()
        wait_for(lambda: locker.execute("SELECT 1 FROM exchange_sync").fetchall(), 10, interval=0.05, what="the first read to mark the mailbox")
        with locker.transaction():   # reads go on, writes of sync states wait
            locker.execute("LOCK TABLE exchange_sync IN EXCLUSIVE MODE")
            wait_for(lambda: len(changed()) >= len(specs), 30, what="the first read's changes on the broker")
            waiting = wait_for(lambda: pg_admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'", (database,)).fetchall(),
                30, what="the sync state's write waiting")
            gone = specs[0]["uid"]
            requests.delete(f"{ews.control_url}/mailboxes/{ANNE}/items/{gone}", timeout=10).raise_for_status()
            for (pid,) in waiting:
                pg_admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        wait_for(lambda: store.sync_position(ANNE) is not None, 60, what="the retried read to save its state")
        snapshots = [m for m in collector.poll() if isinstance(m, CalendarSnapshot)]
    finally:
        producer.stop()
        thread.join(20)
        collector.close()
        locker.close()
    finals = [m for m in snapshots if m.final]
    assert finals, "the retried first read published no snapshot: the deletion is never said"
    parts = [m for m in snapshots if m.snapshot_id == finals[-1].snapshot_id]
    in_snapshot = {item.uid for part in parts for item in part.items}
    assert len(parts) == finals[-1].total_parts
    assert in_snapshot == {spec["uid"] for spec in specs} - {gone}


def test_sync_states_invalidated_by_a_mailbox_move_lead_to_a_real_full_read_and_a_snapshot(
    settings: Settings, topology: Topology, ews: RunningExchangeSim
) -> None:
    store = Store.connect(settings.database_url())
    upgrade(store.engine)
    store.add_mailbox(ANNE)
    day = (datetime.now(CPH) + timedelta(days=2)).date()
    collector = Collector(topology)
    producer = build(producer_settings(settings, ews))
    thread = threading.Thread(target=producer.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: store.sync_position(ANNE), 20, what="the first read")
        requests.delete(f"{ews.control_url}/calls", timeout=10).raise_for_status()
        requests.post(f"{ews.control_url}/mailboxes/{ANNE}/invalidate-sync-states", timeout=10).raise_for_status()
        spec = {"uid": "after-the-move", "start": f"{day}T09:00", "end": f"{day}T10:00", "status": "Busy", "timezone": "Romance Standard Time"}
        requests.post(f"{ews.control_url}/mailboxes/{ANNE}/items", json=spec, timeout=10).raise_for_status()
        wait_for(lambda: [m for m in collector.poll() if m.type == "calendar_change" and m.item is not None and m.item.uid == "after-the-move"], 20,
                 what="the appointment made after the move, found by the full re-read")
        wait_for(lambda: [m for m in collector.poll() if m.type == "calendar_snapshot" and m.final], 20, what="the snapshot after the full re-read")
        calls = requests.get(f"{ews.control_url}/calls", params={"operation": "SyncFolderItems", "mailbox": ANNE}, timeout=10).json()
    finally:
        producer.stop()
        thread.join(20)
        collector.close()
    refused = [c for c in calls if "InvalidSyncState" in str(c.get("outcome"))]
    assert 1 <= len(refused) <= 2, f"the refused state was sent {len(refused)} times"
