"""The broker topology: the one place exchanges, queues, retry tiers and policies are named.

Everything is derived from a prefix and the retry ladder, never typed twice. The same data
declares the queues when a worker starts (``declare``), creates the policies through the
management API (``ensure_policies``) and writes the definitions file that ``compose.yaml``
loads at boot (``definitions``).

Queues are durable quorum queues declared with nothing but ``x-queue-type``; dead-lettering,
TTLs, length limits and delivery limits live in policies, so operators can change them in
the management UI without a code change (see runbooks/broker.md)::

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
from typing import Any, Protocol
from urllib.parse import quote

QUORUM = {"x-queue-type": "quorum"}
RABBITMQ_VERSION = "3.10.8"


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
            result.append(Policy(dlq, _exact(dlq), {"delivery-limit": 1000, "max-length": self.max_length, "overflow": "reject-publish"}))
        return result

    def declare(self, channel: DeclaringChannel) -> None:
        """Declare everything idempotently over AMQP (policies need the management API)."""
        for name, kind in self.exchanges():
            channel.exchange_declare(exchange=name, exchange_type=kind, durable=True)
        for name in self.queues():
            channel.queue_declare(queue=name, durable=True, arguments=dict(QUORUM))
        for exchange, queue, key in self.bindings():
            channel.queue_bind(queue=queue, exchange=exchange, routing_key=key)

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
                {"name": name, "vhost": self.vhost, "durable": True, "auto_delete": False, "arguments": dict(QUORUM)}
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
            doc["users"] = [{"name": user, "password_hash": rabbit_password_hash(user, password), "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": ["administrator"]}]
            doc["permissions"] = [{"user": user, "vhost": self.vhost, "configure": ".*", "write": ".*", "read": ".*"}]
        return doc


class DeclaringChannel(Protocol):
    def exchange_declare(self, exchange: str, exchange_type: str, durable: bool) -> Any: ...

    def queue_declare(self, queue: str, durable: bool, arguments: dict[str, Any]) -> Any: ...

    def queue_bind(self, queue: str, exchange: str, routing_key: str) -> Any: ...


def _exact(name: str) -> str:
    return f"^{re.escape(name)}$"


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


def ensure_policies(topology: Topology, management_url: str, user: str, password: str, force: bool = False, timeout: float = 10.0) -> list[str]:
    """Create the topology's policies that are missing (all of them with ``force``); return their names.

    Existing policies are left alone unless forced, so an operator's tuning in the UI survives
    worker restarts.
    """
    import requests

    vhost = quote(topology.vhost, safe="")
    written = []
    with requests.Session() as session:
        session.auth = (user, password)
        for policy in topology.policies():
            url = f"{management_url.rstrip('/')}/api/policies/{vhost}/{quote(policy.name, safe='')}"
            if not force:
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


def delete_everything(topology: Topology, management_url: str, user: str, password: str, timeout: float = 10.0) -> None:
    """Remove the topology's queues, exchanges and policies (tests and ``topology delete``)."""
    import requests

    vhost = quote(topology.vhost, safe="")
    base = management_url.rstrip("/")
    with requests.Session() as session:
        session.auth = (user, password)
        for policy in topology.policies():
            session.delete(f"{base}/api/policies/{vhost}/{quote(policy.name, safe='')}", timeout=timeout)
        for queue in topology.queues():
            session.delete(f"{base}/api/queues/{vhost}/{quote(queue, safe='')}", timeout=timeout)
        for exchange, _ in topology.exchanges():
            session.delete(f"{base}/api/exchanges/{vhost}/{quote(exchange, safe='')}", timeout=timeout)
