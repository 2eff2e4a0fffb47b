"""Hostile and unlucky traffic on the real broker: a poison message among good ones, malformed bodies, full queues.

Each test reproduces a field failure from the outside: messages are published to the test's own queues as a
producer would, the worker runs as in production (the real transformer against PostgreSQL, or the consume loop
with a scripted handler), and full queues are made with a test policy (``max-length`` + ``overflow:
reject-publish``) of a higher priority than the topology's, removed again afterwards.
"""

from __future__ import annotations

import json
import threading
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator
from urllib.parse import quote

import pika
import pika.exceptions
import pytest
import requests
from structlog.testing import capture_logs

from services.transformer.worker import build as build_transformer
from shared.broker.consume_loop import Consumer, ConsumerOptions, Done, Inbound, Result
from shared.broker.publishing import Outgoing, Publisher
from shared.broker.topology import Topology
from shared.config import DatabaseSettings, Settings
from shared.domain.contracts import BusyTimeState, CalendarChange, CalendarItem, CalendarSnapshot, Interval, encode
from shared.domain.retry import Permanent, Transient
from tests.support.broker import BROKER_HOST, MANAGEMENT, drain, publish_raw, queue_depth
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(180)

MAILBOX = "anne@kommune.dk"


def soon(hours: float) -> datetime:
    """A time inside the sync window (the transformer only emits busy time from now on)."""
    return (datetime.now(timezone.utc) + timedelta(days=2)).replace(minute=0, second=0, microsecond=0) + timedelta(hours=hours)


def change(n: int, mailbox: str = MAILBOX) -> CalendarChange:
    item = CalendarItem(item_id=f"item-{n}", uid=f"uid-{n}-{uuid.uuid4().hex[:6]}", start=soon(n), end=soon(n + 1), free_busy="Busy")
    return CalendarChange(
        correlation_id=f"corr-{n}-{uuid.uuid4().hex[:6]}",
        mailbox=mailbox,
        observed_at=datetime.now(timezone.utc),
        change="upsert",
        item_id=item.item_id,
        item=item,
    )


class Forwarder:
    """A handler that turns every message into one busy-time state, failing the messages the test names."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.seen: list[str] = []
        self.recorded: list[str] = []
        self.fail_once: dict[str, BaseException] = {}
        self.fail_always: dict[str, BaseException] = {}

    def __call__(self, batch: list[Inbound]) -> list[Result]:
        results: list[Result] = []
        for inbound in batch:
            cid = inbound.message.correlation_id
            self.seen.append(cid)
            if cid in self.fail_once:
                results.append(self.fail_once.pop(cid))
                continue
            if cid in self.fail_always:
                results.append(self.fail_always[cid])
                continue
            state = BusyTimeState(correlation_id=cid, mailbox=MAILBOX, origin_id=cid, version=1, interval=None)
            out = Outgoing(self.topology.busy_exchange, self.topology.busy_key(MAILBOX), state)
            results.append(Done(publish=[out], record=lambda cid=cid: self.recorded.append(cid)))
        return results


@contextmanager
def consuming(consumer: Consumer) -> Iterator[Consumer]:
    thread = threading.Thread(target=consumer.run, name="consumer-under-test", daemon=True)
    thread.start()
    wait_for(lambda: consumer.counters.connected, 15, what="consumer connected")
    try:
        yield consumer
    finally:
        consumer.stop()
        thread.join(30)
        assert not thread.is_alive(), "consumer did not stop"


def _policy_url(name: str) -> str:
    return f"{MANAGEMENT}/api/policies/%2F/{quote(name, safe='')}"


def _fill(queue: str, filler: bytes) -> None:
    """Publish fillers until the broker refuses one (a quorum queue may take one more than its max-length)."""
    connection = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for _ in range(10):
            try:
                channel.basic_publish("", queue, filler, pika.BasicProperties(delivery_mode=2), mandatory=True)
            except pika.exceptions.NackError:
                return
        raise AssertionError(f"{queue} never refused a publish")
    finally:
        connection.close()


@contextmanager
def full_queue(queue: str, filler: bytes = b"filler") -> Iterator[None]:
    """``queue`` is full and refuses every further publish until the block ends; then it is emptied of the fillers."""
    name = f"{queue}.test-full"
    body = {"pattern": f"^{queue.replace('.', '[.]')}$", "definition": {"max-length": 1, "overflow": "reject-publish"}, "priority": 99, "apply-to": "queues"}
    requests.put(_policy_url(name), json=body, auth=("guest", "guest"), timeout=10).raise_for_status()

    def applied() -> bool:
        info = requests.get(f"{MANAGEMENT}/api/queues/%2F/{quote(queue, safe='')}", auth=("guest", "guest"), timeout=10).json()
        return info.get("policy") == name

    try:
        wait_for(applied, 20, interval=0.2, what=f"the test policy on {queue}")
        _fill(queue, filler)
        yield
    finally:
        connection = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST))
        try:
            connection.channel().queue_purge(queue)  # the filler: not part of what the test sends
        finally:
            connection.close()
        requests.delete(_policy_url(name), auth=("guest", "guest"), timeout=10)


# --------------------------------------------------------------------------------------------- a poison message


def test_a_poison_message_fails_alone_and_the_good_messages_of_its_batch_go_through(settings: Settings, topology: Topology, pg_url: str) -> None:
    # A NUL byte in a mailbox is valid JSON and passes the contract, but PostgreSQL refuses it (DataError) when the
    # transformer reads that mailbox's decisions: the handler raises for the whole batch.
    good = [change(1), change(2), change(3)]
    poison = change(4, mailbox="anne\x00x@kommune.dk")
    for message in (good[0], poison, good[1], good[2]):  # queued before the worker starts: one batch
        publish_raw(topology.calendar_exchange, topology.change_key(MAILBOX), encode(message))
    stage = topology.stage("transformer")
    consumer = build_transformer(settings.model_copy(update={"database": DatabaseSettings(url=pg_url)}))
    with consuming(consumer):
        states = drain(topology.stage("publisher").work_queue(), timeout=30, count=3)
        dead = drain(stage.dead_letter_queue(), timeout=30, count=1)
        wait_for(lambda: queue_depth(topology, stage.work_queue()) == 0, 20, what="the work queue empty")

    assert sorted(json.loads(body)["correlation_id"] for _, body in states) == sorted(m.correlation_id for m in good)
    assert [json.loads(body)["correlation_id"] for _, body in dead] == [poison.correlation_id]
    assert "DataError" in dead[0][0].headers["x-plannersync-reason"]  # its own reason
    assert consumer.counters.retried == len(topology.ladder)  # only the poison message climbed the ladder
    assert consumer.counters.dead_lettered == 1
    assert queue_depth(topology, stage.dead_letter_queue()) == 0


def _publish_all(exchange: str, routing_key: str, bodies: list[bytes]) -> None:
    """Publish ``bodies`` back to back on one confirming channel, as a producer's read does (they arrive together)."""
    connection = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for body in bodies:
            channel.basic_publish(exchange, routing_key, body, pika.BasicProperties(delivery_mode=2), mandatory=True)
    finally:
        connection.close()


def _queue_info(queue: str) -> dict[str, Any]:
    response = requests.get(f"{MANAGEMENT}/api/queues/%2F/{quote(queue, safe='')}", auth=("guest", "guest"), timeout=10)
    response.raise_for_status()
    return dict(response.json())


def test_poison_messages_that_cannot_be_dead_lettered_go_back_alone_and_their_batch_mates_are_handled_once(settings: Settings, topology: Topology) -> None:
    """Decision 81: while the cluster node holding a classic dead-letter queue is down, a worker's copy to it is
    returned unroutable. On one node a deleted dead-letter queue answers the same. The poison messages (one
    malformed, one a permanent failure) must go back to the work queue alone, and the good messages of their batch
    be handled, confirmed, recorded and acked once, in the same session (not redelivered with them until the
    delivery limit dead-letters them too)."""
    stage = topology.stage("transformer")
    forwarder = Forwarder(topology)
    good = [change(n) for n in range(1, 7)]
    refused = change(99)
    forwarder.fail_always[refused.correlation_id] = Permanent("Planner code 3: unknown resource")
    bodies = [encode(m) for m in good[:3]] + [b"not json at all", encode(refused)] + [encode(m) for m in good[3:]]
    consumer = Consumer(settings.broker, topology, stage, forwarder, ConsumerOptions(prefetch=20, batch_size=10, linger=timedelta(milliseconds=300)))
    with capture_logs() as logs, consuming(consumer):
        connection = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST))
        connection.channel().queue_delete(stage.dead_letter_queue())
        connection.close()
        _publish_all(topology.calendar_exchange, topology.change_key(MAILBOX), bodies)
        wanted = sorted(m.correlation_id for m in good)
        wait_for(lambda: sorted(forwarder.recorded) == wanted, 30, what="the good messages handled")
        # the broker stops delivering the two at the work queue's delivery limit and keeps them for the dead-letter queue
        wait_for(lambda: forwarder.seen.count(refused.correlation_id) > settings.broker.delivery_limit, 60, what="the delivery limit reached")
        wait_for(lambda: _queue_info(stage.work_queue()).get("messages_dlx") == 2, 60, what="both poison messages kept by the work queue")

    assert sorted(cid for cid in forwarder.seen if cid != refused.correlation_id) == wanted  # each good one once
    states = drain(topology.stage("publisher").work_queue(), timeout=10, count=len(good) + 1)
    assert sorted(json.loads(body)["correlation_id"] for _, body in states) == wanted
    assert _events(logs, "broker_connection_lost") == []  # one session throughout
    assert len(_events(logs, "message_given_back")) >= 2 * settings.broker.delivery_limit
    assert consumer.counters.dead_lettered == 0 and consumer.counters.retried == 0


# --------------------------------------------------------------------------------------------- malformed input


def test_malformed_bodies_are_dead_lettered_at_once_with_their_reason_and_never_retried(settings: Settings, topology: Topology) -> None:
    stage = topology.stage("transformer")
    valid = json.loads(encode(change(1)))
    window = Interval(start=soon(0), end=soon(24 * 30))
    snapshot = json.loads(encode(CalendarSnapshot(correlation_id="snap", snapshot_id="s1", mailbox=MAILBOX, observed_at=soon(0), window=window, part=1)))
    bodies = {
        "nested": b'{"type": "calendar_change", "schema_version": 1, "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "huge integer": json.dumps({**valid, "schema_version": 1, "x": 1}).encode().replace(b'"x": 1', b'"x": ' + b"9" * 5000),
        "integer out of range": json.dumps({**snapshot, "part": 10**30}).encode(),
        "schema_version true": json.dumps({**valid, "schema_version": True}).encode(),
        "number as boolean": json.dumps({**valid, "item": {**valid["item"], "all_day": 1}}).encode(),
        "oversized": json.dumps({**valid, "occurrences": [valid["item"]] * 60_000, "window": json.loads(window.model_dump_json())}).encode(),
    }
    assert len(bodies["oversized"]) > 16 * 1024 * 1024
    good = change(2)
    for body in bodies.values():
        publish_raw(topology.calendar_exchange, topology.change_key(MAILBOX), body)
    forwarder = Forwarder(topology)
    consumer = Consumer(settings.broker, topology, stage, forwarder, ConsumerOptions(prefetch=20, batch_size=10))
    with consuming(consumer):
        publish_raw(topology.calendar_exchange, topology.change_key(MAILBOX), encode(good))
        dead = drain(stage.dead_letter_queue(), timeout=30, count=len(bodies))
        wait_for(lambda: good.correlation_id in forwarder.recorded, 20, what="the good message after the bad ones")

    reasons = sorted(properties.headers["x-plannersync-reason"] for properties, _ in dead)
    assert len(reasons) == len(bodies), reasons
    assert sum("nested deeper than" in r for r in reasons) == 1, reasons
    assert sum("integer" in r and "64 bits" in r for r in reasons) == 2, reasons
    assert sum("schema_version" in r for r in reasons) == 1, reasons
    assert sum("item.all_day" in r for r in reasons) == 1, reasons
    assert sum("larger than" in r for r in reasons) == 1, reasons
    assert all(properties.headers["x-retry-count"] == 0 for properties, _ in dead)
    assert consumer.counters.retried == 0  # nothing went round the ladder
    assert forwarder.seen == [good.correlation_id]  # no malformed message reached the handler


# --------------------------------------------------------------------------------------------- backpressure


def _events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


def test_a_full_downstream_queue_is_waited_out_with_backoff_not_taken_for_a_broken_broker(settings: Settings, topology: Topology) -> None:
    stage = topology.stage("transformer")
    downstream = topology.stage("publisher").work_queue()
    forwarder = Forwarder(topology)
    messages = [change(1), change(2)]
    consumer = Consumer(settings.broker, topology, stage, forwarder, ConsumerOptions(prefetch=10, batch_size=5))
    with capture_logs() as logs, consuming(consumer):
        with full_queue(downstream):
            publisher = Publisher(settings.broker, topology)
            for message in messages:
                publisher.publish(Outgoing(topology.calendar_exchange, topology.change_key(MAILBOX), message))
            publisher.close()
            wait_for(lambda: len(_events(logs, "publish_refused")) >= 3, 30, what="refused publishes retried with backoff")
            assert consumer.counters.connected and consumer.counters.dead_lettered == 0
            assert queue_depth(topology, stage.dead_letter_queue()) == 0
        wait_for(lambda: sorted(forwarder.recorded) == sorted(m.correlation_id for m in messages), 30, what="both delivered once there is room")

    refused = _events(logs, "publish_refused")
    assert {entry["queue"] for entry in refused} == {downstream}
    first = refused[:3]  # the loop settles one message at a time: these are its first output's first three tries
    assert [entry["attempt"] for entry in first] == [1, 2, 3]
    assert first[0]["retry_in_s"] < first[1]["retry_in_s"] < first[2]["retry_in_s"]  # growing waits
    assert _events(logs, "broker_connection_lost") == []
    assert consumer.counters.retried == 0 and consumer.counters.dead_lettered == 0
    assert queue_depth(topology, stage.dead_letter_queue()) == 0
    assert queue_depth(topology, downstream) == len(messages)


def test_a_full_retry_queue_is_waited_out_and_the_message_is_never_lost_or_dead_lettered_without_reason(settings: Settings, topology: Topology) -> None:
    stage = topology.stage("transformer")
    tier = stage.retry_queue(topology.ladder[0])
    forwarder = Forwarder(topology)
    message = change(1)
    forwarder.fail_once[message.correlation_id] = Transient("Planner timeout")
    consumer = Consumer(settings.broker, topology, stage, forwarder, ConsumerOptions(prefetch=10, batch_size=5))
    with capture_logs() as logs, consuming(consumer):
        with full_queue(tier):
            publish_raw(topology.calendar_exchange, topology.change_key(MAILBOX), encode(message))
            wait_for(lambda: len(_events(logs, "publish_refused")) >= 2, 30, what="the retry copy refused and tried again")
            assert consumer.counters.connected
            assert consumer.health().ok  # the loop keeps beating while it waits
        wait_for(lambda: message.correlation_id in forwarder.recorded, 30, what="the message retried and handled once there is room")

    assert {entry["queue"] for entry in _events(logs, "publish_refused")} == {tier}
    assert _events(logs, "broker_connection_lost") == []
    assert consumer.counters.retried == 1 and consumer.counters.dead_lettered == 0
    assert queue_depth(topology, stage.dead_letter_queue()) == 0
