"""Dead letters: list them whole and in pages, replay them selectively and safely, purge only on purpose (decision 43)."""

from __future__ import annotations

import json

import pika
import pytest
from pika.spec import BasicProperties

from shared.broker.replay import MAX_REPLAYS, Parked, UnknownMessage, list_dead_letters, purge, replay, show_dead_letter
from shared.broker.topology import Topology
from shared.config import Settings
from tests.support.broker import BROKER_HOST, drain, queue_depth

FIRST_FAILURE = "2026-11-28T01:00:00+00:00"


def _dead_letters(topology: Topology, *message_ids: str, replays: int = 0) -> None:
    connection = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST))
    channel = connection.channel()
    channel.confirm_delivery()
    stage = topology.stage("publisher")
    for message_id in message_ids:
        headers = {
            "x-plannersync-reason": f"code 3: unknown resource ({message_id})",
            "x-retry-count": 2,
            "x-first-failure-at": FIRST_FAILURE,
            "x-dead-lettered-at": "2026-11-28T07:36:00+00:00",
            "x-original-queue": stage.work_queue(),
        }
        if replays:
            headers["x-replay-count"] = replays
        body = json.dumps({"type": "busy_time_state", "mailbox": "anne@jobcenter.dk", "origin_id": f"uid-{message_id}", "version": 1, "interval": None}).encode()
        props = BasicProperties(delivery_mode=2, message_id=message_id, correlation_id=f"corr-{message_id}", type="busy_time_state", headers=headers)
        channel.basic_publish("", stage.dead_letter_queue(), body, props, mandatory=True)
    connection.close()


def test_each_dead_letter_shows_mailbox_origin_queue_reason_attempts_and_first_failure(settings: Settings, topology: Topology) -> None:
    _dead_letters(topology, "m1", "m2")
    page = list_dead_letters(settings, "publisher")
    assert page.total == 2 and page.left == 0
    first = page.letters[0]
    assert (first.message_id, first.mailbox, first.origin_id, first.original_queue) == ("m1", "anne@jobcenter.dk", "uid-m1", topology.stage("publisher").work_queue())
    assert (first.reason, first.attempts, first.first_failure_at, first.replays, first.parked) == ("code 3: unknown resource (m1)", 2, FIRST_FAILURE, 0, False)
    assert queue_depth(topology, topology.stage("publisher").dead_letter_queue()) == 2


def test_a_broker_dead_letter_shows_what_x_death_says(settings: Settings, topology: Topology) -> None:
    stage = topology.stage("publisher")
    connection = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.basic_publish("", stage.work_queue(), b"{}", BasicProperties(delivery_mode=2, message_id="crashy"), mandatory=True)
    method, _props, _body = channel.basic_get(stage.work_queue())
    channel.basic_reject(method.delivery_tag, requeue=False)  # what the delivery limit does, too
    connection.close()
    from tests.support.waiting import wait_for

    letters = wait_for(lambda: list_dead_letters(settings, "publisher").letters, timeout=10, what="the broker to dead-letter")
    assert (letters[0].message_id, letters[0].original_queue, letters[0].reason, letters[0].attempts) == ("crashy", stage.work_queue(), "broker: rejected", 1)
    assert letters[0].first_failure_at is not None


def test_listing_never_stops_silently_it_pages_and_says_what_is_left(settings: Settings, topology: Topology) -> None:
    _dead_letters(topology, *(f"m{n:03}" for n in range(130)))
    page = list_dead_letters(settings, "publisher")
    assert (page.total, len(page.letters), page.left) == (130, 100, 30)
    rest = list_dead_letters(settings, "publisher", offset=100)
    assert [letter.message_id for letter in rest.letters] == [f"m{n:03}" for n in range(100, 130)] and rest.left == 0
    assert len(list_dead_letters(settings, "publisher", limit=None).letters) == 130
    result = replay(settings, "publisher")
    assert (result.total, len(result.replayed), result.left) == (130, 100, 30)
    assert queue_depth(topology, topology.stage("publisher").dead_letter_queue()) == 30


def test_a_dry_run_lists_what_would_be_replayed_and_moves_nothing(settings: Settings, topology: Topology) -> None:
    stage = topology.stage("publisher")
    _dead_letters(topology, "a", "b", "c")
    dry = replay(settings, "publisher", dry_run=True)
    assert [letter.message_id for letter in dry.replayed] == ["a", "b", "c"] and dry.left == 3
    assert queue_depth(topology, stage.dead_letter_queue()) == 3 and queue_depth(topology, stage.work_queue()) == 0


def test_a_replay_moves_only_the_chosen_message_and_keeps_its_first_failure(settings: Settings, topology: Topology) -> None:
    stage = topology.stage("publisher")
    _dead_letters(topology, "a", "b", "c")
    assert [letter.message_id for letter in replay(settings, "publisher", message_id="b").replayed] == ["b"]
    moved = drain(stage.work_queue(), timeout=5)
    assert len(moved) == 1
    props, body = moved[0]
    assert props.message_id == "b" and props.correlation_id == "corr-b" and json.loads(body)["origin_id"] == "uid-b"
    assert props.headers["x-replay-count"] == 1 and props.headers["x-retry-count"] == 0
    assert props.headers["x-first-failure-at"] == FIRST_FAILURE
    assert props.headers["x-last-dead-letter-reason"] == "code 3: unknown resource (b)"
    assert "x-plannersync-reason" not in props.headers and props.delivery_mode == 2
    assert [letter.message_id for letter in list_dead_letters(settings, "publisher").letters] == ["a", "c"]


def test_an_unknown_message_id_is_an_error_not_zero_replayed(settings: Settings, topology: Topology) -> None:
    _dead_letters(topology, "a")
    for call in (
        lambda: replay(settings, "publisher", message_id="nope"),
        lambda: replay(settings, "publisher", message_id="nope", dry_run=True),
        lambda: list_dead_letters(settings, "publisher", message_id="nope"),
        lambda: show_dead_letter(settings, "publisher", "nope"),
        lambda: purge(settings, "publisher", message_id="nope"),
    ):
        with pytest.raises(UnknownMessage, match="no dead letter with message id 'nope'"):
            call()
    assert queue_depth(topology, topology.stage("publisher").dead_letter_queue()) == 1


def test_a_message_replayed_three_times_stays_parked_says_so_and_can_be_shown_or_purged(settings: Settings, topology: Topology) -> None:
    stage = topology.stage("publisher")
    _dead_letters(topology, "tired", replays=MAX_REPLAYS)
    _dead_letters(topology, "fresh")
    result = replay(settings, "publisher")
    assert [letter.message_id for letter in result.replayed] == ["fresh"] and [letter.message_id for letter in result.parked] == ["tired"]
    assert [p.message_id for p, _ in drain(stage.work_queue(), timeout=5)] == ["fresh"]
    with pytest.raises(Parked, match="parked: it was replayed 3 times"):
        replay(settings, "publisher", message_id="tired")
    parked = list_dead_letters(settings, "publisher", parked_only=True)
    assert [(letter.message_id, letter.parked) for letter in parked.letters] == [("tired", True)]
    shown = show_dead_letter(settings, "publisher", "tired")
    assert shown[0]["headers"]["x-replay-count"] == MAX_REPLAYS and shown[0]["body"]["origin_id"] == "uid-tired"
    assert purge(settings, "publisher", parked_only=True) == 1
    assert queue_depth(topology, stage.dead_letter_queue()) == 0
