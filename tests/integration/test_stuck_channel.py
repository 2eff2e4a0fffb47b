"""A channel that keeps nacking every publish: the retry goes on a fresh channel (decision 82 in docs/decisions.md).

On RabbitMQ 3.10 a channel that first publishes to a quorum queue while the queue's leader is dead keeps the dead
leader and the broker nacks every publish on it, for a minute or more; a channel opened afterwards publishes at
once (``tests/e2e/test_cluster.py`` meets it when a cluster node is killed). On one node the worker's connection goes
through ``tests/support/nacking_proxy.py``, which makes the broker's confirms on the connection's first confirm-mode
channel nacks, as the stuck channel's are. A producer's publish and a consume loop's outputs must go through on a
fresh channel, and the consume loop must still ack its deliveries on the channel that delivered them: each input
handled once, none redelivered, the session never lost.
"""

from __future__ import annotations

import json
import threading
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

import pika
import pytest
from structlog.testing import capture_logs

from shared.broker.consume_loop import Consumer, ConsumerOptions, Done, Inbound, Result
from shared.broker.publishing import Outgoing, Publisher
from shared.broker.topology import Topology
from shared.config import BrokerSettings, Settings
from shared.domain.contracts import BusyTimeState, CalendarChange, CalendarItem, encode
from tests.support.broker import BROKER_HOST, publish_raw, queue_depth
from tests.support.nacking_proxy import NackingProxy
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(180)

MAILBOX = "anne@kommune.dk"
T = datetime(2026, 12, 1, 8, tzinfo=timezone.utc)


def change(n: int) -> CalendarChange:
    item = CalendarItem(item_id=f"item-{n}", uid=f"uid-{n}", start=T, end=T + timedelta(hours=1), free_busy="Busy")
    return CalendarChange(correlation_id=f"corr-{n}-{uuid.uuid4().hex[:6]}", mailbox=MAILBOX, observed_at=T, change="upsert", item_id=f"item-{n}", item=item)


@pytest.fixture
def stuck_broker(settings: Settings) -> Iterator[tuple[BrokerSettings, NackingProxy]]:
    """The test's broker settings through a proxy that nacks every publish on each connection's first confirm channel."""
    proxy = NackingProxy(settings.broker.port)
    yield settings.broker.model_copy(update={"port": proxy.port}), proxy
    proxy.close()


def correlation_ids(queue: str) -> list[str]:
    """Every message on ``queue`` (taken off it), by correlation id, in queue order."""
    connection = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST))
    ids: list[str] = []
    try:
        channel = connection.channel()
        while True:
            method, properties, _body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return ids
            ids.append(properties.correlation_id)
    finally:
        connection.close()


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


def test_a_producer_whose_channel_keeps_nacking_publishes_on_a_fresh_channel_of_its_connection(
    stuck_broker: tuple[BrokerSettings, NackingProxy], topology: Topology,
) -> None:
    broker, proxy = stuck_broker
    queue = topology.stage("transformer").work_queue()
    first, then = [change(n) for n in range(5)], [change(n) for n in range(5, 8)]
    publisher = Publisher(broker, topology, name="stuck-producer")
    try:
        with capture_logs() as logs:
            publisher.publish_many([Outgoing(topology.calendar_exchange, topology.change_key(MAILBOX), m) for m in first])
            publisher.publish_many([Outgoing(topology.calendar_exchange, topology.change_key(MAILBOX), m) for m in then])
    finally:
        publisher.close()

    assert proxy.nacked >= 1  # the stuck channel was met (a nack may cover several publishes)
    assert set(correlation_ids(queue)) == {m.correlation_id for m in first + then}
    refused, accepted = events(logs, "publish_refused"), events(logs, "publish_accepted")
    assert [entry["attempt"] for entry in refused] == [1]  # refused once, on the stuck channel, never on the fresh one
    assert len(accepted) == 1 and accepted[0]["channel"] != refused[0]["channel"]
    assert proxy.connections == 1  # the same connection, not a reconnect


class Forwarder:
    """Turns every message into one busy-time state; counts what it sees and records."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.seen: list[str] = []
        self.recorded: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, batch: list[Inbound]) -> list[Result]:
        results: list[Result] = []
        for inbound in batch:
            cid = inbound.message.correlation_id
            with self.lock:
                self.seen.append(cid)
            state = BusyTimeState(correlation_id=cid, mailbox=MAILBOX, origin_id=cid, version=1, interval=None)
            results.append(Done(publish=[Outgoing(self.topology.busy_exchange, self.topology.busy_key(MAILBOX), state)],
                                record=lambda cid=cid: self.recorded.append(cid)))
        return results


def test_a_consumer_whose_channel_keeps_nacking_publishes_on_a_fresh_channel_and_acks_on_its_own(
    stuck_broker: tuple[BrokerSettings, NackingProxy], topology: Topology,
) -> None:
    broker, proxy = stuck_broker
    stage = topology.stage("transformer")
    downstream = topology.stage("publisher").work_queue()
    messages = [change(n) for n in range(12)]
    forwarder = Forwarder(topology)
    consumer = Consumer(broker, topology, stage, forwarder, ConsumerOptions(prefetch=20, batch_size=5))
    thread = threading.Thread(target=consumer.run, name="stuck-consumer", daemon=True)
    with capture_logs() as logs:
        thread.start()
        try:
            wait_for(lambda: consumer.counters.connected, 15, what="consumer connected")
            for message in messages:
                publish_raw(topology.calendar_exchange, topology.change_key(MAILBOX), encode(message))
            wanted = sorted(m.correlation_id for m in messages)
            wait_for(lambda: sorted(forwarder.recorded) == wanted, 60, what="every message handled, its output confirmed and recorded")
            wait_for(lambda: queue_depth(topology, stage.work_queue()) == 0, 10, what="the work queue empty")
        finally:
            consumer.stop()
            thread.join(30)
    assert not thread.is_alive(), "consumer did not stop"

    assert proxy.nacked >= 1  # the stuck channel was met
    # acked on the channel that delivered them: nothing came back when the consumer's channel closed, nothing twice
    assert queue_depth(topology, stage.work_queue()) == 0
    assert sorted(forwarder.seen) == wanted and sorted(forwarder.recorded) == wanted
    assert set(correlation_ids(downstream)) == set(wanted)
    assert events(logs, "broker_connection_lost") == [] and proxy.connections == 1
    assert consumer.counters.retried == 0 and consumer.counters.dead_lettered == 0
    refused, accepted = events(logs, "publish_refused"), events(logs, "publish_accepted")
    assert [entry["attempt"] for entry in refused] == [1]
    assert len(accepted) == 1 and accepted[0]["channel"] != refused[0]["channel"]
    assert json.dumps(consumer.health().facts)  # health still reads
