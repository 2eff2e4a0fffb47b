"""The change-event producer against the EWS simulator (unmodified exchangelib) and the real broker."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

import pytest
import requests

from services.change_producer.worker import build
from shared.adapters.store import Store
from shared.broker.topology import Topology
from shared.config import Settings
from simulators.exchange.server import RunningExchangeSim, start_server
from tests.support.producers import CPH, Collector, producer_settings
from tests.support.waiting import wait_for

ANNE, BO = "anne@jobcenter.dk", "bo@jobcenter.dk"


def _future(days: int, hour: int) -> str:
    day = (datetime.now(CPH) + timedelta(days=days)).date()
    return f"{day.isoformat()}T{hour:02d}:00"


@pytest.fixture
def ews() -> Iterator[RunningExchangeSim]:
    import exchangelib.protocol

    sim = start_server(users={"svc": "pw"}, minute_seconds=2.0, keepalive_seconds=0.5, mailboxes=[ANNE, BO])
    yield sim
    sim.stop()
    exchangelib.protocol.close_connections()


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


@pytest.fixture
def collector(topology: Topology) -> Iterator[Collector]:
    c = Collector(topology)
    yield c
    c.close()


@pytest.fixture
def enrolled(settings: Settings) -> Store:
    store = Store.connect(settings.database_url())
    from shared.adapters.store import upgrade

    upgrade(store.engine)
    store.add_mailbox(ANNE)
    store.add_mailbox(BO)
    return store


def add_item(sim: RunningExchangeSim, mailbox: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("timezone", "Romance Standard Time")
    spec.setdefault("uid", f"uid-{uuid.uuid4().hex}")
    response = requests.post(f"{sim.control_url}/mailboxes/{mailbox}/items", json=spec, timeout=10)
    assert response.status_code == 201, response.text
    return response.json()


def fault(sim: RunningExchangeSim, **spec: Any) -> None:
    response = requests.post(f"{sim.control_url}/faults", json=spec, timeout=10)
    assert response.status_code in (200, 201), response.text


def subscribed(sim: RunningExchangeSim, mailbox: str) -> bool:
    subs = requests.get(f"{sim.control_url}/subscriptions", timeout=10).json()
    rows = subs.get("subscriptions", subs) if isinstance(subs, dict) else subs
    return any((row.get("mailbox") or "").lower() == mailbox and row.get("kind", row.get("type", "streaming")) == "streaming" for row in rows)


def test_a_new_appointment_reaches_the_broker_within_seconds(settings: Settings, topology: Topology, ews: RunningExchangeSim, enrolled: Store, collector: Collector) -> None:
    with Running(producer_settings(settings, ews)):
        wait_for(lambda: subscribed(ews, ANNE) and subscribed(ews, BO), 20, what="both mailboxes subscribed")
        item = add_item(ews, ANNE, start=_future(2, 9), end=_future(2, 10), subject="CANARY-subject-1")
        changes = wait_for(lambda: collector.changes_for(item["uid"]), 15, what="the change on the broker")
    change = changes[0]
    assert change.mailbox == ANNE and change.change == "upsert" and change.item is not None
    assert change.item.free_busy == "Busy" and change.item.item_type == "single"
    assert change.item.start == datetime.fromisoformat(_future(2, 9)).replace(tzinfo=CPH).astimezone(timezone.utc)
    assert enrolled.sync_position(ANNE).sync_state  # type: ignore[union-attr]


def test_health_says_running_and_counts_the_reads_after_the_first_sync(settings: Settings, topology: Topology, ews: RunningExchangeSim, enrolled: Store) -> None:
    with Running(producer_settings(settings, ews)) as running:
        wait_for(lambda: enrolled.sync_position(ANNE) and enrolled.sync_position(BO), 20, what="first sync of both mailboxes")
        health = wait_for(lambda: (h := running.producer.health()).facts["reads"] >= 2 and h, 10, what="both reads counted")
        assert health.state == "running" and health.ok
        assert health.facts["mailboxes"] == 2 and health.facts["failing"] == 0
        wait_for(lambda: running.producer.health().beat_at > time.time() - 2, 5, what="a recent beat")
        wait_for(lambda: running.producer.health().facts["subscribed"] == 2, 20, what="both mailboxes subscribed")


def test_a_change_made_while_the_producer_was_stopped_is_found_without_a_snapshot(
    settings: Settings, topology: Topology, ews: RunningExchangeSim, enrolled: Store, collector: Collector
) -> None:
    config = producer_settings(settings, ews)
    with Running(config):
        wait_for(lambda: enrolled.sync_position(ANNE) and enrolled.sync_position(BO), 20, what="first sync of both mailboxes")
    item = add_item(ews, BO, start=_future(3, 13), end=_future(3, 14))
    with Running(config):
        changes = wait_for(lambda: collector.changes_for(item["uid"]), 20, what="the change made while stopped")
    assert changes[0].mailbox == BO
    assert not [m for m in collector.poll() if m.type == "calendar_snapshot"]


@pytest.mark.parametrize(
    "spec",
    [
        {"kind": "stream_cut", "after_seconds": 0.2, "count": 1},
        {"kind": "stream_silent", "after_seconds": 0.2, "count": 1},
        {"kind": "stream_expire", "after_seconds": 0.2, "count": 1},
    ],
    ids=lambda s: s["kind"],
)
def test_a_change_made_while_the_stream_is_down_arrives_after_the_reconnect(
    spec: dict[str, Any], settings: Settings, topology: Topology, ews: RunningExchangeSim, enrolled: Store, collector: Collector
) -> None:
    with Running(producer_settings(settings, ews)) as running:
        wait_for(lambda: subscribed(ews, ANNE), 20, what="subscription")
        wait_for(lambda: enrolled.sync_position(ANNE), 20, what="first sync")
        fault(ews, **spec)
        item = add_item(ews, ANNE, start=_future(4, 8), end=_future(4, 9))
        wait_for(lambda: collector.changes_for(item["uid"]), 30, what=f"the change after {spec['kind']}")
        after = add_item(ews, BO, start=_future(4, 10), end=_future(4, 11))
        wait_for(lambda: collector.changes_for(after["uid"]), 30, what="later changes still flowing")
    assert running.producer.health().facts["reads"] > 0


@pytest.mark.parametrize(
    ("spec", "status"),
    [
        ({"kind": "server_busy", "back_off_ms": 400, "count": 2}, "throttled"),
        ({"kind": "http_503", "retry_after": 1, "count": 2}, "throttled"),
        ({"kind": "impersonation_denied", "count": 3}, "failing"),
        ({"kind": "nonexistent_mailbox", "count": 3}, "failing"),
        ({"kind": "mailbox_move", "count": 3}, "failing"),
        ({"kind": "invalid_sync_state", "count": 1}, None),
        ({"kind": "latency", "latency_ms": 1500, "count": 2}, None),
    ],
    ids=lambda v: v["kind"] if isinstance(v, dict) else str(v),
)
def test_a_mailbox_fault_is_recovered_from_and_the_other_mailbox_keeps_flowing(
    spec: dict[str, Any], status: str | None, settings: Settings, topology: Topology, ews: RunningExchangeSim, enrolled: Store, collector: Collector
) -> None:
    with Running(producer_settings(settings, ews)):
        wait_for(lambda: subscribed(ews, ANNE) and subscribed(ews, BO), 20, what="subscriptions")
        wait_for(lambda: enrolled.sync_position(ANNE) and enrolled.sync_position(BO), 20, what="first syncs")
        fault(ews, mailbox=ANNE, operations=["SyncFolderItems"], **spec) if spec["kind"] != "invalid_sync_state" else fault(ews, mailbox=ANNE, **spec)
        anne = add_item(ews, ANNE, start=_future(5, 9), end=_future(5, 10))
        bo = add_item(ews, BO, start=_future(5, 11), end=_future(5, 12))
        wait_for(lambda: collector.changes_for(bo["uid"]), 20, what="the healthy mailbox's change")
        if status is not None:
            wait_for(lambda: any(m.address == ANNE and m.status == status for m in enrolled.list_mailboxes()), 20, what=f"status {status} recorded")
        wait_for(lambda: collector.changes_for(anne["uid"]), 30, what="the faulty mailbox's change after recovery")
        wait_for(lambda: any(m.address == ANNE and m.status == "active" for m in enrolled.list_mailboxes()), 20, what="status back to active")


def test_invalid_sync_state_rereads_the_mailbox_and_publishes_a_snapshot(settings: Settings, topology: Topology, ews: RunningExchangeSim, enrolled: Store, collector: Collector) -> None:
    with Running(producer_settings(settings, ews)):
        wait_for(lambda: enrolled.sync_position(ANNE), 20, what="first sync")
        fault(ews, mailbox=ANNE, kind="invalid_sync_state", count=1)
        item = add_item(ews, ANNE, start=_future(6, 9), end=_future(6, 10))
        wait_for(lambda: collector.changes_for(item["uid"]), 20, what="the change after a full re-read")
        snapshots = wait_for(lambda: [m for m in collector.poll() if m.type == "calendar_snapshot" and m.mailbox == ANNE and m.final], 20, what="a snapshot")
    assert any(i.uid == item["uid"] for s in snapshots for i in s.items) or any(i.uid == item["uid"] for m in collector.messages if m.type == "calendar_snapshot" for i in m.items)


def test_enrolment_and_removal_are_noticed_without_a_restart(settings: Settings, topology: Topology, ews: RunningExchangeSim, enrolled: Store, collector: Collector) -> None:
    carl = "carl@jobcenter.dk"
    requests.post(f"{ews.control_url}/mailboxes", json={"address": carl}, timeout=10)
    with Running(producer_settings(settings, ews)) as running:
        wait_for(lambda: enrolled.sync_position(ANNE), 20, what="first sync")
        enrolled.add_mailbox(carl)
        item = add_item(ews, carl, start=_future(7, 9), end=_future(7, 10))
        wait_for(lambda: collector.changes_for(item["uid"]), 20, what="the new mailbox's items")
        enrolled.remove_mailbox(BO)
        wait_for(lambda: BO not in running.producer.schedule.mailboxes, 10, what="removal noticed")


def _subscriptions(sim: RunningExchangeSim, kind: str) -> set[str]:
    rows = requests.get(f"{sim.control_url}/subscriptions", timeout=10).json()
    return {(row.get("mailbox") or "").lower() for row in rows if row.get("kind") == kind and not row.get("gone")}


def test_pull_subscriptions_are_a_working_alternative(settings: Settings, topology: Topology, ews: RunningExchangeSim, enrolled: Store, collector: Collector) -> None:
    with Running(producer_settings(settings, ews, subscription="pull", pull_interval="300ms", unsubscribed_poll_interval="10m")):
        wait_for(lambda: _subscriptions(ews, "pull") >= {ANNE, BO}, 20, what="pull subscriptions")
        wait_for(lambda: enrolled.sync_position(ANNE) and enrolled.sync_position(BO), 20, what="first syncs")
        item = add_item(ews, BO, start=_future(8, 9), end=_future(8, 10))
        wait_for(lambda: collector.changes_for(item["uid"]), 15, what="the change found through GetEvents")
    assert _subscriptions(ews, "streaming") == set()


def test_mailboxes_beyond_the_streaming_capacity_are_still_read(settings: Settings, topology: Topology, ews: RunningExchangeSim, enrolled: Store, collector: Collector) -> None:
    config = producer_settings(settings, ews, streaming_connections=1, mailboxes_per_connection=1, unsubscribed_poll_interval="500ms")
    with Running(config) as running:
        wait_for(lambda: ANNE in _subscriptions(ews, "streaming"), 20, what="the first mailbox streaming")
        item = add_item(ews, BO, start=_future(9, 9), end=_future(9, 10))
        wait_for(lambda: collector.changes_for(item["uid"]), 15, what="the unstreamed mailbox's change, by polling")
        assert not running.producer.schedule.mailboxes[BO].subscribed
    assert BO not in _subscriptions(ews, "streaming")


def test_a_stream_that_ran_to_its_end_is_reopened_without_reading_every_mailbox_again(
    settings: Settings, topology: Topology, ews: RunningExchangeSim, enrolled: Store, collector: Collector,
) -> None:
    """Decision 105. Exchange closes a stream after its lifetime (here a simulated minute, 2 s); the subscriptions keep
    their events until the next stream. Before, every reopening read every mailbox of the group (200 SyncFolderItems
    every 10 minutes per connection in production), whether anything changed or not. A change made while no stream is
    open (the next GetStreamingEvents held by the simulator) still arrives: its event waits on the subscription."""
    with Running(producer_settings(settings, ews)):
        wait_for(lambda: subscribed(ews, ANNE) and subscribed(ews, BO), 20, what="both mailboxes subscribed")
        wait_for(lambda: enrolled.sync_position(ANNE) and enrolled.sync_position(BO), 20, what="first reads")
        time.sleep(1.0)   # the reads right after subscribing are done
        since = datetime.now(timezone.utc)

        def after(operation: str) -> list[dict[str, Any]]:
            return [c for c in ews.state.call_log(operation) if datetime.fromisoformat(c["started"]) > since]

        wait_for(lambda: len(after("GetStreamingEvents")) >= 3, 20, what="three streams opened again")
        assert after("SyncFolderItems") == [], "mailboxes read again though nothing changed"

        fault(ews, kind="latency", operation="GetStreamingEvents", latency_ms=1500, count=1)
        wait_for(lambda: requests.get(f"{ews.control_url}/faults", timeout=10).json() == [], 20, what="the next stream held back")
        item = add_item(ews, ANNE, start=_future(5, 8), end=_future(5, 9))   # no stream open: the event waits
        wait_for(lambda: collector.changes_for(item["uid"]), 20, what="the change made between two streams")


def test_a_mailbox_that_changed_is_read_before_a_backlog_of_catch_up_reads(
    settings: Settings, topology: Topology, ews: RunningExchangeSim, enrolled: Store, collector: Collector,
) -> None:
    """Decision 107. After a stream was cut, every mailbox of its group is read again (events sent and not read are
    gone). Each read here takes 150 ms (the simulator's latency fault), two at a time. An appointment saved in the
    group's last mailbox during that catch-up is read next, after at most the reads already running. Before, every due
    read went into the worker pool's queue at once, and the change waited behind all of them (37 reads here; 200
    mailboxes a stream in production)."""
    crowd = [f"cw{n:02d}@jobcenter.dk" for n in range(40)]
    for address in crowd:
        requests.post(f"{ews.control_url}/mailboxes", json={"address": address}, timeout=10).raise_for_status()
        enrolled.add_mailbox(address)
    last, everyone = crowd[-1], len(crowd) + 2
    fault(ews, kind="latency", operation="SyncFolderItems", latency_ms=150)
    with Running(producer_settings(settings, ews, sync_workers=2)):
        wait_for(lambda: len(ews.state.call_log("SyncFolderItems")) >= 2 * everyone, 30, what="the first reads and those after subscribing")
        time.sleep(0.5)
        streams = len(ews.state.call_log("GetStreamingEvents"))
        fault(ews, kind="stream_cut", after_seconds=0.1, count=1)
        reopened = wait_for(lambda: ews.state.call_log("GetStreamingEvents")[streams + 1 :], 30, what="the stream cut and opened again")
        before_cut = len([c for c in ews.state.call_log("SyncFolderItems") if c["started"] < reopened[0]["started"]])
        wait_for(lambda: len(ews.state.call_log("SyncFolderItems")) > before_cut + 2, 30, what="the catch-up after the cut begun")
        edited_at = datetime.now(timezone.utc)
        item = add_item(ews, last, start=_future(3, 9), end=_future(3, 10))
        wait_for(lambda: collector.changes_for(item["uid"]), 30, what="the change in the last mailbox")
        wait_for(lambda: len(ews.state.call_log("SyncFolderItems")) >= before_cut + everyone, 30, what="the catch-up done")
    reads = [c for c in ews.state.call_log("SyncFolderItems") if datetime.fromisoformat(c["started"]) > edited_at]
    read_last = [n for n, c in enumerate(reads) if c["mailbox"] == last]
    assert read_last, "the changed mailbox was not read after the change"
    assert read_last[0] <= 2, f"{read_last[0]} catch-up reads began after the change and before the changed mailbox's read"
    assert len(reads) > read_last[0] + 10, "the catch-up was over before the change was read: the test proves nothing"
