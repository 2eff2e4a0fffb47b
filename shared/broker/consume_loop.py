"""The one consume loop every worker runs. Only this module acks, rejects or republishes.

For each batch of deliveries it: decodes each message (undecodable → dead-letter at once),
hands the decoded batch to the worker's handler **in a worker thread** (so pika's I/O thread
keeps heartbeats going during a slow SOAP call), and then, back on the I/O thread, applies each
result in a fixed order: publish the outputs and wait for their confirms, run the record step,
ack. A failure result goes through ``shared.domain.retry.decide``: a copy to the next retry tier or to
the dead-letter queue (confirmed) and then the ack. A crash anywhere means a redelivery that
repeats harmless work, never a lost message.

The loop reconnects with exponential backoff and jitter when the broker goes away, and on
SIGTERM/SIGINT finishes the batch in flight, returns the rest unacked and exits.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Protocol, Sequence

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from shared.broker.connection import open_connection
from shared.broker.publishing import (
    FIRST_FAILURE,
    REASON,
    RETRY_COUNT,
    Message,
    Outgoing,
    copy_properties,
    publish_confirmed,
)
from shared.broker.topology import Stage, Topology
from shared.config import BrokerSettings
from shared.domain import retry
from shared.domain.contracts import (
    decode,
    encode,
)
from shared.domain.timing import exponential_backoff
from shared.logs import correlation, get_logger
from shared.workers import Health

log = get_logger(__name__)
RECONNECT_BASE = timedelta(milliseconds=500)



@dataclass(frozen=True)
class Done:
    """Success: publish these, then run ``record`` (after the confirms), then ack."""

    publish: Sequence[Outgoing] = ()
    record: Callable[[], None] | None = None


Result = Done | BaseException


@dataclass(frozen=True)
class Inbound:
    message: Message
    delivery_tag: int
    redelivered: bool
    retry_count: int


Handler = Callable[[list[Inbound]], list[Result]]


class Pausable(Protocol):
    def pause_until(self, moment: float, reason: str) -> None: ...


@dataclass
class _Delivery:
    tag: int
    redelivered: bool
    properties: BasicProperties
    body: bytes
    received: float


@dataclass
class ConsumerOptions:
    prefetch: int = 100
    batch_size: int = 50
    linger: timedelta = timedelta(milliseconds=20)
    idle_poll: float = 0.05


@dataclass
class Counters:
    """What the loop has done since it started; read by ``health()`` and by tests."""

    started_at: float = field(default_factory=time.time)
    beat_at: float = field(default_factory=time.time)
    connected: bool = False
    handled: int = 0
    retried: int = 0
    dead_lettered: int = 0
    paused_until: float = 0.0
    pause_reason: str = ""


class Consumer:
    """Consumes one stage's work queue with a batch handler. ``run`` blocks until ``stop``."""

    def __init__(
        self,
        broker: BrokerSettings,
        topology: Topology,
        stage: Stage,
        handler: Handler,
        options: ConsumerOptions | None = None,
    ) -> None:
        self.broker = broker
        self.topology = topology
        self.stage = stage
        self.handler = handler
        self.options = options or ConsumerOptions()
        self.counters = Counters()
        self._stop = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{stage.name}-handler")
        self._buffer: list[_Delivery] = []
        self._in_flight: tuple[list[_Delivery], list[Inbound], Future[list[Result]]] | None = None

    # --- control -------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def pause_until(self, moment: float, reason: str) -> None:
        """Take no new batches until ``moment`` (time.time()); used when Planner is clearly down."""
        if moment > self.counters.paused_until:
            self.counters.paused_until = moment
            self.counters.pause_reason = reason
            log.warning("consumer_paused", stage=self.stage.name, seconds=round(moment - time.time(), 1), reason=reason)

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self._session()
            except (pika.exceptions.AMQPError, ConnectionError, OSError) as exc:
                failures = 1 if self.counters.connected else failures + 1  # a session that got going starts the count again
                self.counters.connected = False
                self._abandon_in_flight()
                cap = self.broker.reconnect_max_delay
                wait = exponential_backoff(failures, RECONNECT_BASE, cap).total_seconds() * random.uniform(0.8, 1.2)
                log.warning("broker_connection_lost", stage=self.stage.name, error=type(exc).__name__, detail=str(exc)[:200], retry_in=round(wait, 2))
                deadline = time.monotonic() + wait
                while not self._stop.is_set() and time.monotonic() < deadline:  # keep beating while waiting
                    self.counters.beat_at = time.time()
                    self._stop.wait(min(1.0, max(0.0, deadline - time.monotonic())))
        self._executor.shutdown(wait=True)
        log.info("worker_stopped", stage=self.stage.name)

    def _session(self) -> None:
        connection = open_connection(self.broker, self.stage.name)
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            self.topology.declare(channel)
            channel.basic_qos(prefetch_count=self.options.prefetch)
            consumer_tag = channel.basic_consume(self.stage.work_queue(), self._on_message)
            self.counters.connected = True
            log.info("worker_consuming", stage=self.stage.name, queue=self.stage.work_queue(), prefetch=self.options.prefetch)
            while True:
                connection.process_data_events(time_limit=self.options.idle_poll)
                self.counters.beat_at = time.time()
                if self._in_flight is not None and self._in_flight[2].done():
                    self._settle(channel)
                if self._stop.is_set():
                    if self._in_flight is None:
                        channel.basic_cancel(consumer_tag)
                        returned = len(self._buffer)
                        self._buffer.clear()  # unacked: the broker returns them when the channel closes
                        log.info("worker_stopping", stage=self.stage.name, returned_unacked=returned)
                        return
                    continue
                if self._in_flight is None and self._ready():
                    self._dispatch(channel)
        finally:
            self._buffer.clear()
            try:
                if connection.is_open:
                    connection.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail in many ways
                pass

    def health(self) -> Health:
        """Consuming, paused (Planner down) or disconnected, with the loop's counters; safe from any thread."""
        counters = self.counters
        paused = time.time() < counters.paused_until
        state = "disconnected" if not counters.connected else ("paused" if paused else "consuming")
        facts: dict[str, Any] = {
            "queue": self.stage.work_queue(),
            "handled": counters.handled,
            "retried": counters.retried,
            "dead_lettered": counters.dead_lettered,
        }
        if paused:
            facts["paused_until"] = datetime.fromtimestamp(counters.paused_until, timezone.utc).isoformat()
            facts["pause_reason"] = counters.pause_reason
        return Health(state, counters.beat_at, ok=counters.connected, facts=facts)

    def _on_message(self, channel: BlockingChannel, method: Basic.Deliver, properties: BasicProperties, body: bytes) -> None:
        self._buffer.append(_Delivery(method.delivery_tag, bool(method.redelivered), properties, body, time.monotonic()))

    def _ready(self) -> bool:
        if not self._buffer or time.time() < self.counters.paused_until:
            return False
        if len(self._buffer) >= self.options.batch_size:
            return True
        return time.monotonic() - self._buffer[0].received >= self.options.linger.total_seconds()

    def _dispatch(self, channel: BlockingChannel) -> None:
        batch, self._buffer = self._buffer[: self.options.batch_size], self._buffer[self.options.batch_size :]
        decoded: list[_Delivery] = []
        inbound: list[Inbound] = []
        for delivery in batch:
            attempt = retry_count(delivery.properties)
            try:
                message = decode(delivery.body)
            except Exception as exc:  # noqa: BLE001 - every decode failure is dead-lettered with its reason
                self._fail(channel, delivery, exc)
                continue
            decoded.append(delivery)
            inbound.append(Inbound(message, delivery.tag, delivery.redelivered, attempt))
        if inbound:
            self._in_flight = (decoded, inbound, self._executor.submit(self._call_handler, inbound))

    def _call_handler(self, inbound: list[Inbound]) -> list[Result]:
        try:
            results = self.handler(inbound)
        except Exception as exc:  # noqa: BLE001 - a crashing handler fails the whole batch, each message retried
            log.exception("handler_failed", stage=self.stage.name, size=len(inbound))
            return [exc] * len(inbound)
        if len(results) != len(inbound):
            error = RuntimeError(f"handler returned {len(results)} results for {len(inbound)} messages")
            return [error] * len(inbound)
        return results

    def _settle(self, channel: BlockingChannel) -> None:
        assert self._in_flight is not None
        deliveries, inbound, future = self._in_flight
        self._in_flight = None
        for delivery, item, result in zip(deliveries, inbound, future.result()):
            with correlation(item.message.correlation_id, stage=self.stage.name):
                if isinstance(result, Done):
                    try:
                        for out in result.publish:
                            publish_confirmed(channel, out.exchange, out.routing_key, encode(out.message), out.properties())
                        if result.record is not None:
                            result.record()
                    except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError):
                        raise
                    except Exception as exc:  # noqa: BLE001 - e.g. the store is down: retry the message later
                        log.warning("apply_failed", error=type(exc).__name__, detail=str(exc)[:200])
                        self._fail(channel, delivery, exc)
                        continue
                    channel.basic_ack(delivery.tag)
                    self.counters.handled += 1
                else:
                    self._fail(channel, delivery, result)

    def _fail(self, channel: BlockingChannel, delivery: _Delivery, error: BaseException) -> None:
        attempt = retry_count(delivery.properties)
        outcome = retry.decide(error, attempt, self.topology.ladder)
        now = datetime.now(timezone.utc).isoformat()
        headers = dict(delivery.properties.headers or {})
        headers.setdefault(FIRST_FAILURE, now)
        headers[REASON] = outcome.reason[:1000]
        headers["x-original-queue"] = self.stage.work_queue()
        if isinstance(outcome, retry.RetryLater):
            headers[RETRY_COUNT] = attempt + 1
            target = self.stage.retry_queue(outcome.delay)
            publish_confirmed(channel, "", target, delivery.body, copy_properties(delivery.properties, headers))
            self.counters.retried += 1
            log.warning("message_retry_scheduled", attempt=attempt + 1, delay_s=outcome.delay.total_seconds(), queue=target, reason=outcome.reason)
        else:
            headers[RETRY_COUNT] = attempt
            headers["x-dead-lettered-at"] = now
            target = self.stage.dead_letter_queue()
            publish_confirmed(channel, "", target, delivery.body, copy_properties(delivery.properties, headers))
            self.counters.dead_lettered += 1
            log.error("message_dead_lettered", attempts=attempt + 1, queue=target, reason=outcome.reason)
        channel.basic_ack(delivery.tag)

    def _abandon_in_flight(self) -> None:
        """After a lost connection the broker redelivers everything; forget local state."""
        self._buffer.clear()
        if self._in_flight is not None:
            try:
                self._in_flight[2].result()  # let the handler finish; its results cannot be acked any more
            except Exception:  # noqa: BLE001
                pass
            self._in_flight = None


def retry_count(properties: BasicProperties) -> int:
    value = (properties.headers or {}).get(RETRY_COUNT, 0)
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0
