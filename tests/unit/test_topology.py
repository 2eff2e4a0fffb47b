"""Broker topology: derived names, policies, and the definitions file compose loads."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from shared.broker.topology import (
    Topology,
    delay_label,
    from_settings,
    rabbit_password_hash,
)
from shared.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
LADDER = (timedelta(seconds=10), timedelta(minutes=1), timedelta(minutes=1), timedelta(milliseconds=250))


def test_names_are_derived_from_the_prefix_and_ladder() -> None:
    topology = Topology("ps", LADDER)
    stage = topology.stage("publisher")
    assert stage.work_queue() == "ps.publisher.in"
    assert stage.dead_letter_queue() == "ps.publisher.dlq"
    assert [stage.retry_queue(d) for d in topology.tiers()] == ["ps.publisher.retry.250ms", "ps.publisher.retry.10s", "ps.publisher.retry.60s"]
    assert delay_label(timedelta(hours=2)) == "7200s"


def test_every_queue_is_quorum_and_has_exactly_one_policy() -> None:
    topology = Topology("ps", LADDER)
    queues = topology.queues()
    policies = topology.policies()
    import re

    for queue in queues:
        matching = [p for p in policies if re.match(p.pattern, queue)]
        assert len(matching) == 1, queue
    doc = topology.definitions()
    assert all(q["arguments"] == {"x-queue-type": "quorum"} for q in doc["queues"])


def test_retry_tiers_expire_back_into_their_own_work_queue() -> None:
    topology = Topology("ps", LADDER)
    tier = next(p for p in topology.policies() if p.name == "ps.transformer.retry.10s")
    assert tier.definition["message-ttl"] == 10_000
    assert tier.definition["dead-letter-exchange"] == ""
    assert tier.definition["dead-letter-routing-key"] == "ps.transformer.in"
    assert tier.definition["dead-letter-strategy"] == "at-least-once"
    assert tier.definition["overflow"] == "reject-publish"


def test_work_queues_have_a_crash_loop_limit_and_safe_dead_lettering() -> None:
    work = next(p for p in Topology("ps", LADDER, delivery_limit=7).policies() if p.name == "ps.publisher.in")
    assert work.definition["delivery-limit"] == 7
    assert work.definition["dead-letter-exchange"] == "ps.dlx"
    assert work.definition["dead-letter-routing-key"] == "ps.publisher.in"


def test_the_definitions_file_in_the_repo_is_what_the_code_declares() -> None:
    settings = load_settings(broker={"prefix": "plannersync"})
    password = (ROOT / "deploy" / "secrets" / "amqp_password.txt").read_text().strip()
    expected = from_settings(settings.broker, settings.retry).definitions("plannersync", password)
    shipped = json.loads((ROOT / "deploy" / "rabbitmq" / "definitions.json").read_text())
    assert shipped == expected, "deploy/rabbitmq/definitions.json drifted: run the command in runbooks/broker.md"


def test_password_hash_is_reproducible_and_salted_per_user() -> None:
    assert rabbit_password_hash("a", "pw") == rabbit_password_hash("a", "pw")
    assert rabbit_password_hash("a", "pw") != rabbit_password_hash("b", "pw")
