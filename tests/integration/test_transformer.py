"""The transformer worker on the real broker: bad items dead-lettered with the reason, snapshots completed only when whole."""

from __future__ import annotations

import json
import threading
import uuid
from datetime import datetime, timedelta, timezone
from typing import Iterator

import pytest

from services.transformer.worker import TransformerDeps, build, handle
from shared.adapters.store import open_store
from shared.broker.consume_loop import Consumer, Done, Inbound
from shared.broker.publishing import Outgoing, Publisher
from shared.broker.topology import Topology
from shared.config import Settings, load_settings
from shared.domain.contracts import (
    BusyTimeState,
    CalendarChange,
    CalendarItem,
    CalendarSnapshot,
    Interval,
)
from tests.support.broker import drain, publish_raw
from tests.support.waiting import wait_for

MAILBOX = "anne@jobcenter.dk"
NOW = datetime.now(timezone.utc)
START = (NOW + timedelta(days=3)).replace(minute=0, second=0, microsecond=0)


@pytest.fixture
def transformer(settings: Settings, topology: Topology) -> Iterator[Consumer]:
    consumer = build(settings)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    yield consumer
    consumer.stop()
    thread.join(20)


def item(uid: str | None, start: datetime = START, hours: float = 1, **fields: object) -> CalendarItem:
    values: dict[str, object] = {"free_busy": "Busy", "time_zone": "Romance Standard Time", **fields}
    return CalendarItem(item_id=f"id-{uid or uuid.uuid4().hex}", uid=uid, start=start, end=start + timedelta(hours=hours), **values)  # type: ignore[arg-type]


def change(value: CalendarItem, observed: datetime | None = None) -> CalendarChange:
    return CalendarChange(correlation_id=uuid.uuid4().hex, mailbox=MAILBOX, observed_at=observed or datetime.now(timezone.utc), change="upsert", item_id=value.item_id, item=value)


def states(topology: Topology, count: int, timeout: float = 15) -> list[BusyTimeState]:
    return [BusyTimeState.model_validate(json.loads(body)) for _, body in drain(topology.stage("publisher").work_queue(), timeout=timeout, count=count)]


def test_items_that_cannot_be_judged_are_dead_lettered_with_the_reason_and_the_rest_flows(
    settings: Settings, topology: Topology, transformer: Consumer
) -> None:
    producer = Publisher(settings.broker, topology)
    bad = [
        change(item(None)),
        change(item("backwards", hours=-1)),
        change(item("nowhere", all_day=True, time_zone="Mars Standard Time")),
    ]
    good = change(item("fine"))
    for message in [*bad, good]:
        producer.publish(Outgoing(topology.calendar_exchange, topology.change_key(MAILBOX), message))
    producer.close()
    dead = drain(topology.stage("transformer").dead_letter_queue(), timeout=15, count=3)
    reasons = {props.correlation_id: props.headers["x-plannersync-reason"] for props, _ in dead}
    assert len(reasons) == 3 and all(r.startswith("item rejected: ") for r in reasons.values())
    assert "uid" in reasons[bad[0].correlation_id].lower()
    assert "time zone" in reasons[bad[2].correlation_id].lower()
    (state,) = states(topology, 1)
    assert state.origin_id == "fine" and state.interval == Interval(start=START, end=START + timedelta(hours=1))


def test_a_snapshot_deletes_what_it_no_longer_holds_only_once_every_part_has_arrived(
    settings: Settings, topology: Topology, transformer: Consumer
) -> None:
    producer = Publisher(settings.broker, topology)
    earlier = datetime.now(timezone.utc) - timedelta(minutes=5)
    for uid in ("keep", "gone"):
        producer.publish(Outgoing(topology.calendar_exchange, topology.change_key(MAILBOX), change(item(uid), earlier)))
    assert {s.origin_id for s in states(topology, 2)} == {"keep", "gone"}

    window = Interval(start=NOW, end=NOW + timedelta(days=90))
    observed = datetime.now(timezone.utc)
    sid = uuid.uuid4().hex
    part2 = CalendarSnapshot(correlation_id="p2", snapshot_id=sid, mailbox=MAILBOX, observed_at=observed, window=window, part=2, final=True, total_parts=2, items=[item("new", START + timedelta(hours=3))])
    part1 = CalendarSnapshot(correlation_id="p1", snapshot_id=sid, mailbox=MAILBOX, observed_at=observed, window=window, part=1, items=[item("keep")])
    producer.publish(Outgoing(topology.calendar_exchange, topology.snapshot_key(MAILBOX), part2))  # the final part first
    first = states(topology, 1)
    assert [(s.origin_id, s.interval is not None) for s in first] == [("new", True)]  # nothing deleted yet
    assert drain(topology.stage("publisher").work_queue(), timeout=1) == []
    producer.publish(Outgoing(topology.calendar_exchange, topology.snapshot_key(MAILBOX), part1))
    (absent,) = states(topology, 1)
    assert absent.origin_id == "gone" and absent.interval is None and absent.cause == "snapshot"
    producer.publish(Outgoing(topology.calendar_exchange, topology.snapshot_key(MAILBOX), part1))  # a duplicate part
    wait_for(lambda: transformer.counters.handled >= 5, 10, what="the duplicate handled")
    assert drain(topology.stage("publisher").work_queue(), timeout=1) == []
    producer.close()


def test_parts_of_one_snapshot_in_one_batch_complete_it_even_with_the_final_part_first(settings: Settings, topology: Topology) -> None:
    """Nothing of a batch is stored before the batch is settled, so the batch's own parts and total count too."""
    deps = TransformerDeps(open_store(settings.database_url(), True), topology, settings.busy.policy())
    mailbox = f"batch-{uuid.uuid4().hex[:8]}@jobcenter.dk"
    earlier = datetime.now(timezone.utc) - timedelta(minutes=5)
    (known,) = handle([Inbound(change(item("batch-gone"), earlier).model_copy(update={"mailbox": mailbox}), 1, False, 0)], deps)
    assert isinstance(known, Done) and known.record is not None
    known.record()

    window = Interval(start=NOW, end=NOW + timedelta(days=90))
    observed, sid = datetime.now(timezone.utc), uuid.uuid4().hex
    final = CalendarSnapshot(
        correlation_id="b2", snapshot_id=sid, mailbox=mailbox, observed_at=observed, window=window, part=2, final=True, total_parts=2, items=[item("batch-new")]
    )
    first = CalendarSnapshot(correlation_id="b1", snapshot_id=sid, mailbox=mailbox, observed_at=observed, window=window, part=1, items=[])
    results = handle([Inbound(final, 2, False, 0), Inbound(first, 3, False, 0)], deps)
    emitted = [[(o.message.origin_id, o.message.interval is not None) for o in r.publish] for r in results if isinstance(r, Done)]  # type: ignore[union-attr]
    assert emitted == [[("batch-new", True)], [("batch-gone", False)]]


def v1_body(value: CalendarItem, organizer: str | None) -> bytes:
    """A change as a version-1 producer (before decision 71) wrote it: the organizer's address in the item."""
    raw = json.loads(change(value).model_dump_json())
    raw["schema_version"] = 1
    del raw["item"]["organizer_is_planner"]
    raw["item"]["organizer"] = organizer
    return json.dumps(raw).encode()


def test_version_1_changes_queued_before_the_upgrade_are_judged_by_the_policys_organizers(
    settings: Settings, topology: Topology
) -> None:
    planner = "noreply@planner.star.dk"
    config = load_settings(environ={}, **{**settings.model_dump(mode="python", exclude={"busy"}), "busy": {"planner_organizers": [planner]}})
    queued = {
        "citizen": v1_body(item("v1-citizen"), "canary-organizer-7f3a@borger.dk"),
        "invitation": v1_body(item("v1-invitation", START + timedelta(hours=2)), "NoReply@Planner.STAR.dk"),
        "no-organizer": v1_body(item("v1-none", START + timedelta(hours=4)), None),
    }
    for body in queued.values():   # in the queue before the new transformer starts
        publish_raw(topology.calendar_exchange, topology.change_key(MAILBOX), body)
    consumer = build(config)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        got = {state.origin_id: state.interval for state in states(topology, 2)}
        assert got == {"v1-citizen": Interval(start=START, end=START + timedelta(hours=1)),
                       "v1-none": Interval(start=START + timedelta(hours=4), end=START + timedelta(hours=5))}
        assert drain(topology.stage("publisher").work_queue(), timeout=1, count=1) == []   # the invitation is never busy time
        assert drain(topology.stage("transformer").dead_letter_queue(), timeout=1, count=1) == []   # nothing refused
    finally:
        consumer.stop()
        thread.join(20)
    rows = {record.origin_id for record in open_store(config.database_url(), True).desired(MAILBOX).values()}
    assert {"v1-citizen", "v1-none"} <= rows
