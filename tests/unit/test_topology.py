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


def test_every_queue_has_exactly_one_policy_work_queues_are_quorum_dead_letter_queues_classic() -> None:
    topology = Topology("ps", LADDER)
    queues = topology.queues()
    policies = topology.policies()
    import re

    for queue in queues:
        matching = [p for p in policies if re.match(p.pattern, queue)]
        assert len(matching) == 1, queue
    doc = topology.definitions()
    types = {q["name"]: q["arguments"] for q in doc["queues"]}
    assert types["ps.publisher.dlq"] == types["ps.transformer.dlq"] == {"x-queue-type": "classic"}
    assert all(arguments == {"x-queue-type": "quorum"} for name, arguments in types.items() if not name.endswith(".dlq"))


def test_a_dead_letter_queue_has_no_delivery_limit_so_looking_never_drops_a_message() -> None:
    dlq = next(p for p in Topology("ps", LADDER).policies() if p.name == "ps.publisher.dlq")
    assert "delivery-limit" not in dlq.definition
    assert dlq.definition == {"max-length": 1_000_000, "overflow": "reject-publish"}


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


def test_the_broker_user_in_the_definitions_is_not_an_administrator_and_reaches_only_its_prefix() -> None:
    import re

    settings = load_settings(environ={}, broker={"prefix": "plannersync"})
    doc = from_settings(settings.broker, settings.retry).definitions("plannersync", "s3cret")
    (user,) = doc["users"]
    assert user["tags"] == ["policymaker"] and "administrator" not in json.dumps(doc)
    assert "s3cret" not in json.dumps(doc) and user["password_hash"] == rabbit_password_hash("plannersync", "s3cret")
    (permission,) = doc["permissions"]
    for right in ("configure", "write", "read"):
        assert re.match(permission[right], "plannersync.publisher.in") and not re.match(permission[right], "other.publisher.in")
    assert re.match(permission["write"], "amq.default") and not re.match(permission["read"], "amq.default")
    assert from_settings(settings.broker, settings.retry).definitions()["users"] == []


def test_no_definitions_file_is_committed_compose_renders_it_at_boot() -> None:
    assert not (ROOT / "deploy" / "rabbitmq" / "definitions.json").exists()


def test_password_hash_is_reproducible_and_salted_per_user() -> None:
    assert rabbit_password_hash("a", "pw") == rabbit_password_hash("a", "pw")
    assert rabbit_password_hash("a", "pw") != rabbit_password_hash("b", "pw")
