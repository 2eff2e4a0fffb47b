"""The broker topology: the one place exchanges, queues, retry tiers and policies are named.

Everything is derived from a prefix and the retry ladder, never typed twice. The same data
declares the queues when a worker starts (``declare``), creates the policies through the
management API (``ensure_policies``) and writes the definitions file that ``compose.yaml``
loads at boot (``definitions``).

Work queues and retry tiers are durable quorum queues declared with nothing but ``x-queue-type``;
dead-lettering, TTLs, length limits and delivery limits live in policies, so operators can change them
in the management UI without a code change (decision 27 in docs/decisions.md; runbooks/broker.md).
Dead-letter queues are durable classic queues: a classic queue has no delivery limit, so looking at a
dead letter (``dlq list``, the UI's "Get messages") never costs it (decision 42 in docs/decisions.md)::

    producers -> <p>.calendar (topic, change.<mailbox> / snapshot.<mailbox>)
                   -> <p>.transformer.in -> transformer -> <p>.busy (topic, busy.<mailbox>)
                                                            -> <p>.publisher.in -> publisher -> Planner
    <stage>.in --transient failure (worker copies, confirms, acks)--> <stage>.retry.<delay> --TTL--> <stage>.in
    <stage>.in --permanent failure (worker copies with reason)--> <stage>.dlq
    <stage>.in --delivery limit / overflow (broker)--> <p>.dlx (direct, rk = queue) -> <stage>.dlq
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Collection, Literal, Protocol
from urllib.parse import quote

import pika
import pika.exceptions

from shared.logs import get_logger

log = get_logger(__name__)
QUORUM = {"x-queue-type": "quorum"}
CLASSIC = {"x-queue-type": "classic"}  # dead-letter queues (decision 42 in docs/decisions.md)
RABBITMQ_VERSION = "3.10.8"
USER_TAGS = ["policymaker"]  # create policies, read queues; not an administrator (decision 46 in docs/decisions.md)


def delay_label(delay: timedelta) -> str:
    millis = round(delay.total_seconds() * 1000)
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


@dataclass(frozen=True)
class Stage:
    """One consuming stage: its work queue, retry tiers and dead-letter queue."""

    prefix: str
    name: str
    source_exchange: str
    binding_key: str = "#"

    def work_queue(self) -> str:
        return f"{self.prefix}.{self.name}.in"

    def retry_queue(self, delay: timedelta) -> str:
        return f"{self.prefix}.{self.name}.retry.{delay_label(delay)}"

    def dead_letter_queue(self) -> str:
        return f"{self.prefix}.{self.name}.dlq"


@dataclass(frozen=True)
class Policy:
    name: str
    pattern: str
    definition: dict[str, Any]
    priority: int = 10
    apply_to: str = "queues"

    def as_definition(self, vhost: str) -> dict[str, Any]:
        return {
            "vhost": vhost,
            "name": self.name,
            "pattern": self.pattern,
            "apply-to": self.apply_to,
            "definition": self.definition,
            "priority": self.priority,
        }


@dataclass(frozen=True)
class Topology:
    prefix: str
    ladder: tuple[timedelta, ...]
    max_length: int = 1_000_000
    delivery_limit: int = 10
    vhost: str = "/"
    stages: dict[str, Stage] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "stages",
            {
                "transformer": Stage(self.prefix, "transformer", self.calendar_exchange),
                "publisher": Stage(self.prefix, "publisher", self.busy_exchange),
            },
        )

    @property
    def calendar_exchange(self) -> str:
        return f"{self.prefix}.calendar"

    @property
    def busy_exchange(self) -> str:
        return f"{self.prefix}.busy"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.prefix}.dlx"

    def stage(self, name: str) -> Stage:
        return self.stages[name]

    def tiers(self) -> list[timedelta]:
        """Distinct delays of the ladder; repeated delays share one tier queue."""
        return sorted(set(self.ladder))

    # --- routing keys -------------------------------------------------------------------
    @staticmethod
    def change_key(mailbox: str) -> str:
        return f"change.{_rk_safe(mailbox)}"

    @staticmethod
    def snapshot_key(mailbox: str) -> str:
        return f"snapshot.{_rk_safe(mailbox)}"

    @staticmethod
    def busy_key(mailbox: str) -> str:
        return f"busy.{_rk_safe(mailbox)}"

    # --- the data -------------------------------------------------------------------------
    def exchanges(self) -> list[tuple[str, str]]:
        return [(self.calendar_exchange, "topic"), (self.busy_exchange, "topic"), (self.dead_letter_exchange, "direct")]

    def queues(self) -> list[str]:
        names = []
        for stage in self.stages.values():
            names.append(stage.work_queue())
            names.extend(stage.retry_queue(delay) for delay in self.tiers())
            names.append(stage.dead_letter_queue())
        return names

    def dead_letter_queues(self) -> list[str]:
        return [stage.dead_letter_queue() for stage in self.stages.values()]

    def queue_arguments(self, name: str) -> dict[str, Any]:
        """What a queue is declared with: its type and nothing else."""
        return dict(CLASSIC if name in self.dead_letter_queues() else QUORUM)

    def bindings(self) -> list[tuple[str, str, str]]:
        """(exchange, queue, routing key)."""
        result = []
        for stage in self.stages.values():
            result.append((stage.source_exchange, stage.work_queue(), stage.binding_key))
            result.append((self.dead_letter_exchange, stage.dead_letter_queue(), stage.work_queue()))
        return result

    def policies(self) -> list[Policy]:
        safety = {"dead-letter-strategy": "at-least-once", "overflow": "reject-publish", "max-length": self.max_length}
        result = []
        for stage in self.stages.values():
            work = stage.work_queue()
            result.append(
                Policy(
                    f"{work}",
                    _exact(work),
                    {
                        "dead-letter-exchange": self.dead_letter_exchange,
                        "dead-letter-routing-key": work,
                        "delivery-limit": self.delivery_limit,
                        **safety,
                    },
                )
            )
            for delay in self.tiers():
                tier = stage.retry_queue(delay)
                result.append(
                    Policy(
                        tier,
                        _exact(tier),
                        {
                            "message-ttl": round(delay.total_seconds() * 1000),
                            "dead-letter-exchange": "",
                            "dead-letter-routing-key": work,
                            **safety,
                        },
                    )
                )
            dlq = stage.dead_letter_queue()
            # a classic queue: no delivery limit, so peeking never drops a dead letter (decision 42)
            result.append(Policy(dlq, _exact(dlq), {"max-length": self.max_length, "overflow": "reject-publish"}))
        return result

    def declare(self, channel: DeclaringChannel) -> list[str]:
        """Declare everything idempotently over AMQP (policies need the management API).

        Returns the dead-letter queues that exist as quorum queues from an older release: they are left
        as they are (declaring them classic would close the channel), logged, and moved to classic queues
        by ``migrate_dead_letter_queues`` (``plannersync topology apply``).
        """
        for name, kind in self.exchanges():
            channel.exchange_declare(exchange=name, exchange_type=kind, durable=True)
        legacy = []
        unavailable = set()
        for name in self.queues():
            if name in self.dead_letter_queues():
                outcome = _declare_on_probe(channel, name, self.queue_arguments(name))
                if outcome == "other_type":
                    legacy.append(name)
                    log.warning("dead_letter_queue_is_quorum", queue=name, fix="plannersync topology apply (moves its messages into a classic queue)")
                elif outcome == "node_down":  # it exists, with its binding; dead letters wait for its node (decision 81 in docs/decisions.md)
                    unavailable.add(name)
                    log.warning("dead_letter_queue_unavailable", queue=name, reason="the cluster node that holds it is down; dead letters wait until it is back")
                continue
            channel.queue_declare(queue=name, durable=True, arguments=self.queue_arguments(name))
        for exchange, queue, key in self.bindings():
            if queue not in unavailable:
                channel.queue_bind(queue=queue, exchange=exchange, routing_key=key)
        return legacy

    def definitions(self, user: str | None = None, password: str | None = None) -> dict[str, Any]:
        """A RabbitMQ definitions document for boot-time import (compose.yaml)."""
        doc: dict[str, Any] = {
            "rabbit_version": RABBITMQ_VERSION,
            "vhosts": [{"name": self.vhost}],
            "users": [],
            "permissions": [],
            "exchanges": [
                {"name": name, "vhost": self.vhost, "type": kind, "durable": True, "auto_delete": False, "internal": False, "arguments": {}}
                for name, kind in self.exchanges()
            ],
            "queues": [
                {"name": name, "vhost": self.vhost, "durable": True, "auto_delete": False, "arguments": self.queue_arguments(name)}
                for name in self.queues()
            ],
            "bindings": [
                {
                    "source": exchange,
                    "vhost": self.vhost,
                    "destination": queue,
                    "destination_type": "queue",
                    "routing_key": key,
                    "arguments": {},
                }
                for exchange, queue, key in self.bindings()
            ],
            "policies": [policy.as_definition(self.vhost) for policy in self.policies()],
        }
        if user and password is not None:
            doc["users"] = [{"name": user, "password_hash": rabbit_password_hash(user, password), "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": list(USER_TAGS)}]
            doc["permissions"] = [{"user": user, "vhost": self.vhost, **self.permissions()}]
        return doc

    def permissions(self) -> dict[str, str]:
        """The broker user's rights: everything under the prefix, and publishing through the default exchange
        (retries, dead letters and replays go to a queue by name; decision 46 in docs/decisions.md)."""
        own = f"^{re.escape(self.prefix)}\\."
        return {"configure": own, "write": f"^({re.escape(self.prefix)}\\..*|amq\\.default)$", "read": own}


class DeclaringChannel(Protocol):
    def exchange_declare(self, exchange: str, exchange_type: str, durable: bool) -> Any: ...

    def queue_declare(self, queue: str, durable: bool, arguments: dict[str, Any]) -> Any: ...

    def queue_bind(self, queue: str, exchange: str, routing_key: str) -> Any: ...


def _exact(name: str) -> str:
    return f"^{re.escape(name)}$"


def _declare_on_probe(channel: Any, queue: str, arguments: dict[str, Any]) -> Literal["declared", "other_type", "node_down"]:
    """Declare ``queue`` on a channel of its own (the broker closes a channel whose declare fails).

    ``other_type`` when it exists with another type; ``node_down`` when it is a classic queue whose cluster node is
    down (404 "home node ... is down or inaccessible"): it exists, but cannot be declared until that node is back.
    Only a real pika channel has a connection to open the probe on; anything else declares directly.
    """
    connection = getattr(channel, "connection", None)
    if not isinstance(connection, pika.BlockingConnection):
        channel.queue_declare(queue=queue, durable=True, arguments=arguments)
        return "declared"
    probe = connection.channel()
    try:
        probe.queue_declare(queue=queue, durable=True, arguments=arguments)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 406:  # PRECONDITION_FAILED: inequivalent x-queue-type
            return "other_type"
        if exc.reply_code == 404 and "home node" in str(exc.reply_text) and "down or inaccessible" in str(exc.reply_text):
            return "node_down"
        raise
    if probe.is_open:
        probe.close()
    return "declared"


def migrate_dead_letter_queues(connection: pika.BlockingConnection, topology: Topology) -> dict[str, int]:
    """Make every quorum dead-letter queue of an older release a classic one, keeping its messages; {queue: moved}.

    The messages wait in ``<dlq>.migrating`` (classic, durable) while the queue is replaced, so a crash half way
    loses nothing: run it again and it finishes. Run it with the workers stopped (runbooks/broker.md).
    """
    moved: dict[str, int] = {}
    channel = connection.channel()
    channel.confirm_delivery()
    for dlq in topology.dead_letter_queues():
        holding = f"{dlq}.migrating"
        outcome = _declare_on_probe(channel, dlq, dict(CLASSIC))
        if outcome == "node_down":
            raise RuntimeError(f"{dlq}: the cluster node that holds it is down; start that node and run this again")
        if outcome == "declared":
            if _exists(connection, holding):
                moved[dlq] = _move_all(channel, holding, dlq)
                channel.queue_delete(holding, if_empty=True)
            continue
        channel.queue_declare(holding, durable=True, arguments=dict(CLASSIC))
        count = _move_all(channel, dlq, holding)
        if channel.queue_declare(dlq, passive=True).method.message_count:  # a worker dead-lettered meanwhile: try again later
            raise RuntimeError(f"{dlq} received messages while being migrated; stop the workers and run it again")
        channel.queue_delete(dlq)  # quorum queues do not support if-empty; checked just above
        channel.close()  # a channel that talked to the quorum queue keeps its state: RabbitMQ 3.10 fails publishing to the new one
        channel = connection.channel()
        channel.confirm_delivery()
        channel.queue_declare(dlq, durable=True, arguments=dict(CLASSIC))
        channel.queue_bind(queue=dlq, exchange=topology.dead_letter_exchange, routing_key=dlq.removesuffix(".dlq") + ".in")
        _move_all(channel, holding, dlq)
        channel.queue_delete(holding, if_empty=True)
        moved[dlq] = count
        log.info("dead_letter_queue_migrated", queue=dlq, messages=count)
    channel.close()
    return moved


def _exists(connection: pika.BlockingConnection, queue: str) -> bool:
    probe = connection.channel()
    try:
        probe.queue_declare(queue=queue, passive=True)
    except pika.exceptions.ChannelClosedByBroker:
        return False
    probe.close()
    return True


def _move_all(channel: Any, source: str, target: str) -> int:
    """Copy every message of ``source`` to ``target`` (confirmed, persistent) and ack it; returns how many."""
    count = 0
    while True:
        method, properties, body = channel.basic_get(source, auto_ack=False)
        if method is None:
            return count
        headers = {k: v for k, v in (properties.headers or {}).items() if k != "x-delivery-count"}
        properties.headers = headers
        properties.delivery_mode = 2
        channel.basic_publish("", target, body, properties, mandatory=True)
        channel.basic_ack(method.delivery_tag)
        count += 1


def _rk_safe(mailbox: str) -> str:
    # '.' separates topic words; '#' and '*' are wildcards. Keep the mailbox readable but inert.
    return mailbox.lower().replace(".", "_").replace("#", "_").replace("*", "_")


def rabbit_password_hash(user: str, password: str) -> str:
    """RabbitMQ's salted SHA-256 hash; the salt is derived from the user so exports are reproducible."""
    salt = hashlib.sha256(f"plannersync:{user}".encode()).digest()[:4]
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def from_settings(broker: Any, retry: Any) -> Topology:
    return Topology(
        prefix=broker.prefix,
        ladder=tuple(retry.ladder),
        max_length=broker.max_queue_length,
        delivery_limit=broker.delivery_limit,
        vhost=broker.vhost,
    )


def ensure_policies(
    topology: Topology,
    management_url: str,
    user: str,
    password: str,
    force: bool = False,
    timeout: float = 10.0,
    verify: bool | str = True,
    overwrite: Collection[str] = (),
) -> list[str]:
    """Create the topology's policies that are missing (all of them with ``force``, and those named in ``overwrite``); return their names.

    Existing policies are left alone unless forced, so an operator's tuning in the UI survives
    worker restarts. ``verify`` is what an https management URL is verified against.
    """
    import requests

    vhost = quote(topology.vhost, safe="")
    written = []
    with requests.Session() as session:
        session.auth = (user, password)
        session.verify = verify
        for policy in topology.policies():
            url = f"{management_url.rstrip('/')}/api/policies/{vhost}/{quote(policy.name, safe='')}"
            if not force and policy.name not in overwrite:
                existing = session.get(url, timeout=timeout)
                if existing.status_code == 200:
                    continue
                if existing.status_code != 404:
                    existing.raise_for_status()
            body: dict[str, Any] = {"pattern": policy.pattern, "definition": policy.definition, "priority": policy.priority, "apply-to": policy.apply_to}
            response = session.put(url, json=body, timeout=timeout)
            response.raise_for_status()
            written.append(policy.name)
    return written


def delete_everything(topology: Topology, management_url: str, user: str, password: str, timeout: float = 10.0, verify: bool | str = True) -> list[str]:
    """Remove the topology's queues, exchanges and policies (tests, the demo); returns what could not be removed."""
    import requests

    vhost = quote(topology.vhost, safe="")
    base = management_url.rstrip("/")
    left = []
    with requests.Session() as session:
        session.auth = (user, password)
        session.verify = verify
        targets = [("policies", p.name) for p in topology.policies()] + [("queues", q) for q in topology.queues()]
        targets += [("queues", f"{q}.migrating") for q in topology.dead_letter_queues()] + [("exchanges", e) for e, _ in topology.exchanges()]
        for kind, name in targets:
            response = session.delete(f"{base}/api/{kind}/{vhost}/{quote(name, safe='')}", timeout=timeout)
            if response.status_code not in (204, 404):
                left.append(f"{kind[:-1] if kind != 'policies' else 'policy'} {name} ({response.status_code})")
    return left
