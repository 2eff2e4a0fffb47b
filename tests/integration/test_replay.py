"""Dead letters: list them with their reasons, replay them selectively and safely."""

from __future__ import annotations

import pika
from pika.spec import BasicProperties

from shared.broker.replay import list_dead_letters, replay
from shared.broker.topology import Topology
from shared.config import Settings
from tests.support.broker import BROKER_HOST, drain, queue_depth


def _dead_letter(topology: Topology, message_id: str, replays: int = 0) -> None:
    connection = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST))
    channel = connection.channel()
    channel.confirm_delivery()
    headers = {"x-plannersync-reason": f"code 3: unknown resource ({message_id})", "x-retry-count": 2, "x-first-failure-at": "2026-11-28T01:00:00+00:00"}
    if replays:
        headers["x-replay-count"] = replays
    props = BasicProperties(delivery_mode=2, message_id=message_id, correlation_id=f"corr-{message_id}", type="busy_time_state", headers=headers)
    channel.basic_publish("", topology.stage("publisher").dead_letter_queue(), b'{"type": "busy_time_state"}', props, mandatory=True)
    connection.close()


def test_dead_letters_are_listed_with_their_reasons_and_stay_put(settings: Settings, topology: Topology) -> None:
    _dead_letter(topology, "m1")
    _dead_letter(topology, "m2")
    rows = list_dead_letters(settings, "publisher")
    assert [(r["message_id"], r["reason"], r["retries"]) for r in rows] == [("m1", "code 3: unknown resource (m1)", 2), ("m2", "code 3: unknown resource (m2)", 2)]
    assert queue_depth(topology, topology.stage("publisher").dead_letter_queue()) == 2


def test_a_dry_run_moves_nothing_and_a_replay_moves_only_the_chosen_message(settings: Settings, topology: Topology) -> None:
    stage = topology.stage("publisher")
    for message_id in ("a", "b", "c"):
        _dead_letter(topology, message_id)
    assert replay(settings, "publisher", dry_run=True) == 3
    assert queue_depth(topology, stage.dead_letter_queue()) == 3 and queue_depth(topology, stage.work_queue()) == 0
    assert replay(settings, "publisher", message_id="b") == 1
    moved = drain(stage.work_queue(), timeout=5)
    assert len(moved) == 1
    props, body = moved[0]
    assert props.message_id == "b" and props.correlation_id == "corr-b" and body == b'{"type": "busy_time_state"}'
    assert props.headers["x-replay-count"] == 1 and props.headers["x-retry-count"] == 0
    assert props.headers["x-last-dead-letter-reason"] == "code 3: unknown resource (b)"
    assert "x-plannersync-reason" not in props.headers and props.delivery_mode == 2
    assert queue_depth(topology, stage.dead_letter_queue()) == 2


def test_a_message_replayed_three_times_stays_parked(settings: Settings, topology: Topology) -> None:
    stage = topology.stage("publisher")
    _dead_letter(topology, "tired", replays=3)
    _dead_letter(topology, "fresh")
    assert replay(settings, "publisher") == 1
    assert [p.message_id for p, _ in drain(stage.work_queue(), timeout=5)] == ["fresh"]
    assert [r["message_id"] for r in list_dead_letters(settings, "publisher")] == ["tired"]
