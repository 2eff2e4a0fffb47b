"""Looking at a dead-letter queue never costs a dead letter (decision 42 in docs/decisions.md).

A dead letter is looked at by `plannersync dlq list` (basic.get, never acked) and by the management UI's
"Get messages" (ack mode "Nack message requeue true"). On a quorum queue each look counts as a delivery and
the message is dropped at the delivery limit; a dead-letter queue must survive any number of looks.
"""

from __future__ import annotations

from urllib.parse import quote

import pika
import requests
from pika.spec import BasicProperties

from shared.broker.replay import list_dead_letters, purge, replay
from shared.broker.topology import CLASSIC, QUORUM, Topology, migrate_dead_letter_queues
from shared.config import Settings
from tests.support.broker import BROKER_HOST, MANAGEMENT, queue_depth

LOOKS = 2000
MESSAGES = 3


def _dead_letter(channel: pika.adapters.blocking_connection.BlockingChannel, queue: str, message_id: str) -> None:
    headers = {"x-plannersync-reason": "code 3: unknown resource", "x-retry-count": 0, "x-first-failure-at": "2026-11-28T01:00:00+00:00"}
    props = BasicProperties(delivery_mode=2, message_id=message_id, type="busy_time_state", headers=headers)
    channel.basic_publish("", queue, b'{"type": "busy_time_state", "mailbox": "anne@jobcenter.dk", "origin_id": "u1"}', props, mandatory=True)


def _fill(queue: str, count: int) -> None:
    connection = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST))
    channel = connection.channel()
    channel.confirm_delivery()
    for n in range(count):
        _dead_letter(channel, queue, f"m{n}")
    connection.close()


def _ui_get_messages(queue: str, count: int) -> int:
    """What the management UI's "Get messages" button does (its default ack mode requeues)."""
    url = f"{MANAGEMENT}/api/queues/%2F/{quote(queue, safe='')}/get"
    body = {"count": count, "ackmode": "ack_requeue_true", "encoding": "auto", "truncate": 50000}
    response = requests.post(url, json=body, auth=("guest", "guest"), timeout=10)
    response.raise_for_status()
    return len(response.json())


def test_a_dead_letter_queue_looked_at_2000_times_still_holds_every_message(settings: Settings, topology: Topology) -> None:
    dlq = topology.stage("publisher").dead_letter_queue()
    _fill(dlq, MESSAGES)
    for look in range(LOOKS):
        if look % 2:
            page = list_dead_letters(settings, "publisher")
            assert page.total == MESSAGES and len(page.letters) == MESSAGES, f"look {look}: {page.total} left"
        else:
            assert _ui_get_messages(dlq, MESSAGES) == MESSAGES, f"look {look}"
    assert queue_depth(topology, dlq) == MESSAGES
    page = list_dead_letters(settings, "publisher")
    assert [letter.message_id for letter in page.letters] == ["m0", "m1", "m2"]  # in their places, too


def test_dead_letter_queues_are_classic_and_work_queues_quorum(topology: Topology) -> None:
    for queue in topology.queues():
        info = requests.get(f"{MANAGEMENT}/api/queues/%2F/{quote(queue, safe='')}", auth=("guest", "guest"), timeout=10).json()
        expected = "classic" if queue.endswith(".dlq") else "quorum"
        assert info["type"] == expected, queue
        assert "delivery-limit" not in (info.get("effective_policy_definition") or {}) or expected == "quorum", queue


def test_nothing_leaves_a_dead_letter_queue_but_a_replay_or_a_confirmed_purge(settings: Settings, topology: Topology) -> None:
    stage = topology.stage("publisher")
    _fill(stage.dead_letter_queue(), 4)
    replay(settings, "publisher", dry_run=True)
    list_dead_letters(settings, "publisher", limit=1, offset=2)
    assert queue_depth(topology, stage.dead_letter_queue()) == 4
    assert len(replay(settings, "publisher", message_id="m1").replayed) == 1
    assert purge(settings, "publisher", message_id="m2") == 1
    assert [letter.message_id for letter in list_dead_letters(settings, "publisher").letters] == ["m0", "m3"]
    assert purge(settings, "publisher") == 2
    assert queue_depth(topology, stage.dead_letter_queue()) == 0


def test_an_older_quorum_dead_letter_queue_keeps_working_and_is_migrated_with_its_messages(settings: Settings, broker: str, prefix: str) -> None:
    from shared.broker.topology import delete_everything, from_settings

    topology = from_settings(settings.broker, settings.retry)
    connection = pika.BlockingConnection(pika.URLParameters(settings.broker.amqp_url()))
    try:
        channel = connection.channel()
        for dlq in topology.dead_letter_queues():  # what an older release declared
            channel.queue_declare(dlq, durable=True, arguments=dict(QUORUM))
        assert topology.declare(channel) == topology.dead_letter_queues()  # a worker still starts
        assert channel.is_open
        _fill(topology.stage("publisher").dead_letter_queue(), 5)
        moved = migrate_dead_letter_queues(connection, topology)
        assert moved == {topology.stage("transformer").dead_letter_queue(): 0, topology.stage("publisher").dead_letter_queue(): 5}
        assert topology.declare(connection.channel()) == []
        for dlq in topology.dead_letter_queues():
            info = requests.get(f"{MANAGEMENT}/api/queues/%2F/{quote(dlq, safe='')}", auth=("guest", "guest"), timeout=10).json()
            assert info["type"] == "classic" and info["arguments"] == CLASSIC
        assert [letter.message_id for letter in list_dead_letters(settings, "publisher").letters] == [f"m{n}" for n in range(5)]
        # the broker's own dead-lettering still reaches the new queue through its binding
        bindings = requests.get(f"{MANAGEMENT}/api/queues/%2F/{quote(topology.stage('publisher').dead_letter_queue(), safe='')}/bindings", auth=("guest", "guest"), timeout=10).json()
        assert any(b["source"] == topology.dead_letter_exchange and b["routing_key"] == topology.stage("publisher").work_queue() for b in bindings)
    finally:
        if connection.is_open:
            connection.close()
        delete_everything(topology, MANAGEMENT, "guest", "guest")


def test_the_uis_move_messages_keeps_every_header_as_the_runbook_says(topology: Topology) -> None:
    """runbooks/replay.md: Move messages moves all, parked ones too, and resets nothing (unlike `dlq replay`)."""
    from tests.support.broker import drain
    from tests.support.waiting import wait_for

    stage = topology.stage("publisher")
    connection = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST))
    channel = connection.channel()
    channel.confirm_delivery()
    headers = {"x-plannersync-reason": "gave up after 8 attempts: HTTP 503", "x-retry-count": 7, "x-first-failure-at": "2026-11-28T01:00:00+00:00", "x-replay-count": 3}
    channel.basic_publish("", stage.dead_letter_queue(), b"{}", BasicProperties(delivery_mode=2, message_id="parked", headers=headers), mandatory=True)
    connection.close()
    name = f"Move from {stage.dead_letter_queue()}"
    shovel = {  # what the UI's form sends (rabbitmq_shovel_management's queue page)
        "value": {
            "src-uri": "amqp:///%2F",
            "src-queue": stage.dead_letter_queue(),
            "src-protocol": "amqp091",
            "src-prefetch-count": 1000,
            "src-delete-after": "queue-length",
            "dest-protocol": "amqp091",
            "dest-uri": "amqp:///%2F",
            "dest-add-forward-headers": False,
            "ack-mode": "on-confirm",
            "dest-queue": stage.work_queue(),
        }
    }
    requests.put(f"{MANAGEMENT}/api/parameters/shovel/%2F/{quote(name, safe='')}", json=shovel, auth=("guest", "guest"), timeout=10).raise_for_status()
    try:
        moved = wait_for(lambda: drain(stage.work_queue(), timeout=1), timeout=30, what="the shovel to move the dead letter")
    finally:
        requests.delete(f"{MANAGEMENT}/api/parameters/shovel/%2F/{quote(name, safe='')}", auth=("guest", "guest"), timeout=10)
    props, _body = moved[0]
    assert props.message_id == "parked"  # a parked message is moved too
    kept = {key: props.headers[key] for key in headers}
    assert kept == headers  # x-retry-count, x-replay-count and the reason are not touched
    assert queue_depth(topology, stage.dead_letter_queue()) == 0
