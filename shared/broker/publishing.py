"""Publishing to the broker: the message properties every copy carries, and the producers' confirming publisher.

Every publish is persistent, mandatory and confirmed (the channels are in confirm mode), so a message is
either routed to a durable queue or the publish raises. The consume loop publishes its outputs, retries and
dead letters through ``publish`` on its own channel; producers and tools use ``Publisher``.

A publish the broker refuses (nacks: a full queue with ``overflow=reject-publish``) is backpressure, not a broken
connection: it is retried on the same channel with growing waits and logged ``publish_refused`` with the queue;
only after ``patience`` does it raise ``PublishRefused`` (decision 56 in docs/decisions.md).

A ``Publisher`` keeps its connection alive between publishes (a keeper thread services it, so heartbeats flow),
finds a connection the broker closed before it publishes, and replaces it (decision 54).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import pika
import pika.exceptions
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
from shared.domain.timing import exponential_backoff
from shared.logs import get_logger

log = get_logger(__name__)

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


REFUSED_BASE = timedelta(milliseconds=500)
REFUSED_MAX = timedelta(seconds=10)
REFUSED_PATIENCE = timedelta(seconds=60)
Waiter = Callable[[float], bool]  # wait this many seconds, servicing the connection; False: give up now (stopping)


class PublishRefused(Exception):
    """The broker kept refusing (nacking) a publish: the queue is full. Backpressure, not a lost connection."""

    def __init__(self, queue: str, attempts: int) -> None:
        super().__init__(f"publish to {queue} refused {attempts} times (queue full?)")
        self.queue = queue
        self.attempts = attempts


def queue_of(topology: Topology | None, exchange: str, routing_key: str) -> str:
    """The queue a publish lands in, for logs: the routing key on the default exchange, else the bound work queue."""
    if exchange == "":
        return routing_key
    for stage in (topology.stages.values() if topology is not None else ()):
        if stage.source_exchange == exchange:
            return stage.work_queue()
    return f"{exchange}/{routing_key}"


def publish_confirmed(
    channel: BlockingChannel,
    exchange: str,
    routing_key: str,
    body: bytes,
    properties: BasicProperties,
    *,
    queue: str | None = None,
    patience: timedelta | None = REFUSED_PATIENCE,
    wait: Waiter | None = None,
    reopen: Callable[[], BlockingChannel] | None = None,
) -> None:
    """Publish persistent + mandatory on a confirm channel; raises if unroutable or the connection fails.

    A nack (the queue refused it) is retried with growing waits, logged ``publish_refused``; after ``patience``
    (never, when None) or when ``wait`` says stop, ``PublishRefused`` is raised. ``wait`` defaults to sleeping on the
    channel's connection, which keeps its heartbeats going. With ``reopen`` each retry goes out on the channel it
    returns (decision 82 in docs/decisions.md).
    """
    refused = 0
    started = time.monotonic()
    target = queue or queue_of(None, exchange, routing_key)
    while True:
        try:
            channel.basic_publish(exchange=exchange, routing_key=routing_key, body=body, properties=properties, mandatory=True)
            if refused:
                log.info("publish_accepted", queue=target, attempts=refused + 1)
            return
        except pika.exceptions.NackError:
            refused += 1
        delay = exponential_backoff(refused, REFUSED_BASE, REFUSED_MAX).total_seconds()
        give_up = patience is not None and time.monotonic() + delay - started > patience.total_seconds()
        log.warning("publish_refused", queue=target, exchange=exchange, routing_key=routing_key, attempt=refused, retry_in_s=None if give_up else delay)
        if give_up:
            raise PublishRefused(target, refused)
        if not (wait or _sleeper(channel))(delay):
            raise PublishRefused(target, refused)
        if reopen is not None:
            channel = reopen()


def _sleeper(channel: BlockingChannel) -> Waiter:
    def sleep(seconds: float) -> bool:
        channel.connection.sleep(seconds)
        return True

    return sleep


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


_DEAD = (pika.exceptions.AMQPConnectionError, pika.exceptions.ChannelClosed, pika.exceptions.ChannelWrongStateError, ConnectionError, OSError)


class Publisher:
    """A confirming publisher for producers and tools (not for consumers, which use their own channel).

    Safe to share between threads (one lock). Its connection is serviced by a keeper thread between publishes, so
    heartbeats flow and the broker never closes it for silence; a connection that died anyway (network cut,
    broker restart) is found before the next publish and replaced (decision 54 in docs/decisions.md).
    """

    def __init__(self, broker: BrokerSettings, topology: Topology, name: str = "publisher") -> None:
        self.broker = broker
        self.name = name
        self.topology = topology
        self.keepalive_every = max(0.5, min(5.0, broker.heartbeat / 4))
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._lock = threading.RLock()
        self._keeper: threading.Event | None = None  # set to stop the keeper thread of the open connection

    def _ensure(self) -> BlockingChannel:
        """The open channel, after servicing the connection; a connection found dead is replaced first."""
        if self._connection is not None and self._channel is not None and self._channel.is_open:
            try:
                self._connection.process_data_events(time_limit=0)  # heartbeats, and news of a close
            except _DEAD as exc:
                log.info("publisher_connection_replaced", connection=self.name, error=type(exc).__name__)
                self._drop()
        if self._connection is None or self._channel is None or not self._channel.is_open or not self._connection.is_open:
            self._drop()
            self._connection = open_connection(self.broker, self.name)
            self._channel = self._connection.channel()
            self._channel.confirm_delivery()
            self.topology.declare(self._channel)
            self._start_keeper()
        return self._channel

    def publish(self, outgoing: Outgoing) -> None:
        body, properties = encode(outgoing.message), outgoing.properties()
        queue = queue_of(self.topology, outgoing.exchange, outgoing.routing_key)
        with self._lock:
            for attempt in (1, 2):
                channel = self._ensure()
                try:
                    publish_confirmed(channel, outgoing.exchange, outgoing.routing_key, body, properties, queue=queue, reopen=self._reopen)
                    return
                except _DEAD as exc:  # died between the check and the publish: once more on a fresh connection
                    self._drop()
                    if attempt == 2:
                        raise
                    log.info("publisher_connection_replaced", connection=self.name, error=type(exc).__name__)

    def _reopen(self) -> BlockingChannel:
        """A fresh channel on the same connection for the retry after a nack: on RabbitMQ 3.10 a channel that first
        published to a quorum queue during its leader election keeps nacking for about a minute (decision 82 in docs/decisions.md)."""
        assert self._connection is not None
        if self._channel is not None and self._channel.is_open:
            self._channel.close()
        self._channel = self._connection.channel()
        self._channel.confirm_delivery()
        return self._channel

    def close(self) -> None:
        with self._lock:
            if self._keeper is not None:
                self._keeper.set()
                self._keeper = None
            if self._connection is not None and self._connection.is_open:
                try:
                    self._connection.close()
                except _DEAD:
                    pass
            self._connection = self._channel = None

    def _drop(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except _DEAD:
                pass

    def _start_keeper(self) -> None:
        if self._keeper is None:
            self._keeper = threading.Event()
            threading.Thread(target=self._keep_alive, args=(self._keeper,), name=f"{self.name}-keepalive", daemon=True).start()

    def _keep_alive(self, stopped: threading.Event) -> None:
        while not stopped.wait(self.keepalive_every):
            with self._lock:
                connection = self._connection
                if connection is None or not connection.is_open:
                    continue
                try:
                    connection.process_data_events(time_limit=0)
                except _DEAD as exc:  # the next publish opens a new one
                    log.info("publisher_connection_lost", connection=self.name, error=type(exc).__name__)
                    self._drop()
