"""Publishing to the broker: the message properties every copy carries, and the producers' confirming publisher.

Every publish is persistent, mandatory and confirmed (the channels are in confirm mode), so a message is
either routed to a durable queue or the publish raises. The consume loop publishes its outputs, retries and
dead letters through ``publish`` on its own channel; producers and tools use ``Publisher``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import BasicProperties

from shared.broker.connection import open_connection
from shared.broker.topology import Topology
from shared.config import BrokerSettings
from shared.domain.contracts import (
    BusyTimeState,
    CalendarChange,
    CalendarSnapshot,
    encode,
)

RETRY_COUNT = "x-retry-count"
FIRST_FAILURE = "x-first-failure-at"
REASON = "x-plannersync-reason"
Message = CalendarChange | CalendarSnapshot | BusyTimeState


@dataclass(frozen=True)
class Outgoing:
    """A message to publish: persistent, confirmed, mandatory."""

    exchange: str
    routing_key: str
    message: Message

    def properties(self) -> BasicProperties:
        message_id = self.message.message_id() if isinstance(self.message, BusyTimeState) else self.message.correlation_id
        return BasicProperties(
            delivery_mode=2,
            content_type="application/json",
            message_id=message_id,
            correlation_id=self.message.correlation_id,
            type=self.message.type,
            timestamp=int(time.time()),
            headers={"x-schema-version": self.message.schema_version},
        )


def publish_confirmed(channel: BlockingChannel, exchange: str, routing_key: str, body: bytes, properties: BasicProperties) -> None:
    """Publish persistent + mandatory on a confirm channel; raises if unroutable or nacked."""
    channel.basic_publish(exchange=exchange, routing_key=routing_key, body=body, properties=properties, mandatory=True)


def copy_properties(original: BasicProperties, headers: dict[str, Any]) -> BasicProperties:
    """A persistent copy of a message's properties with new headers (retry, dead-letter, replay)."""
    return BasicProperties(
        delivery_mode=2,
        content_type=original.content_type,
        message_id=original.message_id,
        correlation_id=original.correlation_id,
        type=original.type,
        timestamp=original.timestamp,
        headers=headers,
    )


class Publisher:
    """A confirming publisher for producers and tools (not for consumers, which use their own channel)."""

    def __init__(self, broker: BrokerSettings, topology: Topology, name: str = "publisher") -> None:
        self.broker = broker
        self.name = name
        self.topology = topology
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None

    def _ensure(self) -> BlockingChannel:
        if self._channel is None or not self._channel.is_open:
            self._connection = open_connection(self.broker, self.name)
            self._channel = self._connection.channel()
            self._channel.confirm_delivery()
            self.topology.declare(self._channel)
        return self._channel

    def publish(self, outgoing: Outgoing) -> None:
        channel = self._ensure()
        publish_confirmed(channel, outgoing.exchange, outgoing.routing_key, encode(outgoing.message), outgoing.properties())

    def close(self) -> None:
        if self._connection is not None and self._connection.is_open:
            self._connection.close()
        self._connection = self._channel = None
