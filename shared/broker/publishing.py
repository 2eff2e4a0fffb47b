"""Publishing to the broker: the message properties every copy carries, and the producers' confirming publisher.

Every publish is persistent, mandatory and confirmed (the channels are in confirm mode), so a message is
either routed to a durable queue or the publish raises. The consume loop publishes its outputs, retries and
dead letters through ``publish`` on its own channel; producers and tools use ``Publisher``.

A publish the broker refuses (nacks: a full queue with ``overflow=reject-publish``) is backpressure, not a broken
connection: it is retried with growing waits and logged ``publish_refused`` with the queue; only after ``patience``
does it raise ``PublishRefused`` (decision 56 in docs/decisions.md). Each retry goes on a fresh channel of the same
connection, since a channel can also keep nacking after a quorum queue's leader died (decision 82).

A ``Publisher`` keeps its connection alive between publishes (a keeper thread services it, so heartbeats flow),
finds a connection the broker closed before it publishes, and replaces it (decision 54).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence

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
CONFIRM_WINDOW = 500  # publishes awaiting their confirms at most, on one channel (decision 76)
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


@dataclass(frozen=True)
class Send:
    """One publish on a ``Confirms`` channel: persistent properties given, mandatory always."""

    exchange: str
    routing_key: str
    body: bytes
    properties: BasicProperties
    queue: str = ""  # for logs; derived from the exchange and key when empty


@dataclass
class _Unconfirmed:
    index: int
    send: Send
    returned: bool = False


class _Lane:
    """One confirm-mode channel's publishes: its own sequence numbers, its own confirms and returns.

    The broker numbers confirms per channel, from 1 on each new channel, so everything that hangs on those numbers
    lives here, and the callbacks of a channel only ever touch their own lane (a late confirm of an old channel
    can never settle a publish of a new one).
    """

    def __init__(self, channel: BlockingChannel) -> None:
        self.channel = channel
        self.published = 0  # the broker's sequence number of the last publish on this channel
        self.unconfirmed: dict[int, _Unconfirmed] = {}  # by sequence number, in publish order
        self.nacked: list[_Unconfirmed] = []
        self.returned: list[_Unconfirmed] = []
        selected: list[bool] = []
        # pika's own Channel under the blocking one: its confirm mode hands over each ack/nack without waiting per
        # publish, and its basic_publish queues the frames without a trip round the I/O loop per message.
        impl = self.impl = channel._impl
        impl.add_on_return_callback(self._on_return)
        impl.confirm_delivery(ack_nack_callback=self._on_confirm, callback=lambda _frame: selected.append(True))
        while not selected:
            if not channel.is_open:
                raise pika.exceptions.ChannelWrongStateError("channel closed before confirm mode was selected")
            channel.connection.process_data_events(time_limit=0.01)

    def send(self, index: int, send: Send) -> None:
        self.published += 1
        self.unconfirmed[self.published] = _Unconfirmed(index, send)
        self.impl.basic_publish(send.exchange, send.routing_key, send.body, send.properties, mandatory=True)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        nack = isinstance(method, pika.spec.Basic.Nack)
        tags = [method.delivery_tag] if not method.multiple else [t for t in self.unconfirmed if t <= method.delivery_tag]
        for tag in tags:
            entry = self.unconfirmed.pop(tag, None)
            if entry is None:
                continue
            if nack:
                self.nacked.append(entry)
            elif entry.returned:
                self.returned.append(entry)

    def _on_return(self, _channel: Any, method: Any, _properties: Any, body: bytes) -> None:
        """A mandatory message no queue took; it comes before its confirm, so it is still unconfirmed."""
        for entry in self.unconfirmed.values():
            send = entry.send
            if not entry.returned and send.exchange == method.exchange and send.routing_key == method.routing_key and send.body == body:
                entry.returned = True
                return


class Confirms:
    """Publishes confirmed as a window, not one at a time (decision 76), on a channel in confirm mode.

    pika's ``BlockingChannel.confirm_delivery`` waits for the broker's confirm after every publish: one round trip
    per message. Here a batch's messages are sent with up to ``CONFIRM_WINDOW`` awaiting their confirms (a sliding
    window) and the rest are awaited once at the end, as the broker sends them (often one multiple-ack for many). A
    message counts as published only when its own confirm has arrived; a message returned as unroutable (mandatory)
    raises ``UnroutableError`` as pika's own confirm mode does.

    A nack (a full queue, or a channel that kept a dead quorum leader) is sent again after a growing wait (decision
    56) on a fresh channel of the same connection (decision 82 in docs/decisions.md): on RabbitMQ 3.10 a channel
    that first published to a quorum queue during its leader election keeps nacking. ``channel``, the channel
    given, is never replaced nor closed here: the consume loop consumes and acks on it, and delivery tags belong to
    the channel that delivered them. Publishes go on ``channel`` until the first nack, then on the latest fresh
    one; a fresh channel is closed when the next replaces it (all its confirms are in by then). All publishes on
    these channels must go through this object: the broker numbers confirms by each channel's publish count.
    """

    def __init__(self, channel: BlockingChannel) -> None:
        self.channel = channel
        self._lane = _Lane(channel)

    @property
    def is_open(self) -> bool:
        """The channel given and the one publishes go on are both open."""
        return bool(self.channel.is_open and self._lane.channel.is_open)

    def publish(
        self,
        sends: Sequence[Send],
        *,
        patience: timedelta | None = REFUSED_PATIENCE,
        wait: Waiter | None = None,
    ) -> list[BaseException | None]:
        """Publish all, wait for every confirm once; per message None (confirmed) or why not.

        A refused (nacked) message is published again on a fresh channel after a growing wait, logged
        ``publish_refused``, until ``patience`` (never, when None) runs out or ``wait`` says stop: then its outcome
        is ``PublishRefused``. Connection and channel failures raise: nothing of the batch may then be taken as
        published.
        """
        outcomes: list[BaseException | None] = [None] * len(sends)
        todo = list(range(len(sends)))
        refused = 0
        started = time.monotonic()
        while todo:
            lane = self._lane
            self._send(lane, todo, sends)
            self._await(lane)
            for entry in lane.returned:
                outcomes[entry.index] = pika.exceptions.UnroutableError([])
            nacked = [entry.index for entry in lane.nacked]
            lane.returned, lane.nacked = [], []
            if not nacked:
                break
            refused += 1
            delay = exponential_backoff(refused, REFUSED_BASE, REFUSED_MAX).total_seconds()
            give_up = patience is not None and time.monotonic() + delay - started > patience.total_seconds()
            first = sends[nacked[0]]
            target = first.queue or queue_of(None, first.exchange, first.routing_key)
            log.warning(
                "publish_refused", queue=target, exchange=first.exchange, routing_key=first.routing_key,
                attempt=refused, messages=len(nacked), channel=lane.channel.channel_number, retry_in_s=None if give_up else delay,
            )
            if give_up or not (wait or self._sleep)(delay):
                for index in nacked:
                    send = sends[index]
                    outcomes[index] = PublishRefused(send.queue or queue_of(None, send.exchange, send.routing_key), refused)
                break
            self._renew()
            todo = nacked
        if refused and any(outcome is None for outcome in outcomes):
            log.info(
                "publish_accepted", queue=sends[0].queue or queue_of(None, sends[0].exchange, sends[0].routing_key),
                attempts=refused + 1, channel=self._lane.channel.channel_number,
            )
        return outcomes

    def _renew(self) -> None:
        """Publish on a fresh channel of the same connection from now on (decision 82 in docs/decisions.md).

        The channel given stays open and untouched (its consumer and unacked deliveries are the consume loop's);
        an earlier fresh channel is closed, its confirms all in. The new channel is opened before the old is closed,
        so the two never share a channel number.
        """
        old = self._lane
        self._lane = _Lane(self.channel.connection.channel())
        if old.channel is not self.channel and old.channel.is_open:
            try:
                old.channel.close()
            except (pika.exceptions.AMQPError, OSError):  # closing a channel that is going anyway: nothing waits on it
                pass

    def _send(self, lane: _Lane, indexes: list[int], sends: Sequence[Send]) -> None:
        for index in indexes:
            while len(lane.unconfirmed) >= CONFIRM_WINDOW:  # a sliding window: confirms come back while we send
                self._check_open(lane)
                self._service(0.002)
            lane.send(index, sends[index])

    def _await(self, lane: _Lane) -> None:
        while lane.unconfirmed:
            self._check_open(lane)
            self._service(0.002)

    @staticmethod
    def _check_open(lane: _Lane) -> None:
        if not lane.channel.is_open:
            raise pika.exceptions.ChannelWrongStateError("channel closed while publishes awaited their confirms")

    def _service(self, seconds: float) -> None:
        self.channel.connection.process_data_events(time_limit=seconds)

    def _sleep(self, seconds: float) -> bool:
        self.channel.connection.sleep(seconds)
        return True


def publish_confirmed(
    confirms: Confirms,
    exchange: str,
    routing_key: str,
    body: bytes,
    properties: BasicProperties,
    *,
    queue: str | None = None,
    patience: timedelta | None = REFUSED_PATIENCE,
    wait: Waiter | None = None,
) -> None:
    """Publish one message persistent + mandatory and wait for its confirm; raises if refused past ``patience``,
    unroutable, or when the connection fails (decision 56)."""
    outcome = confirms.publish([Send(exchange, routing_key, body, properties, queue or "")], patience=patience, wait=wait)[0]
    if outcome is not None:
        raise outcome


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
        self._confirms: Confirms | None = None
        self._lock = threading.RLock()
        self._keeper: threading.Event | None = None  # set to stop the keeper thread of the open connection

    def _ensure(self) -> Confirms:
        """The open channel, after servicing the connection; a connection found dead is replaced first."""
        if self._connection is not None and self._confirms is not None and self._confirms.is_open:
            try:
                self._connection.process_data_events(time_limit=0)  # heartbeats, and news of a close
            except _DEAD as exc:
                log.info("publisher_connection_replaced", connection=self.name, error=type(exc).__name__)
                self._drop()
        if self._connection is None or self._confirms is None or not self._confirms.is_open or not self._connection.is_open:
            self._drop()
            self._connection = open_connection(self.broker, self.name)
            channel = self._connection.channel()
            self.topology.declare(channel)
            self._confirms = Confirms(channel)
            self._start_keeper()
        return self._confirms

    def publish(self, outgoing: Outgoing) -> None:
        self.publish_many([outgoing])

    def publish_many(self, outgoing: Sequence[Outgoing]) -> None:
        """Publish all and wait for their confirms once (decision 76); returns when every one is confirmed.

        Raises ``PublishRefused`` when the broker kept refusing one (decision 56), or the connection's error; then
        some of them may be in the queue already, and publishing all again is harmless (decision 6).
        """
        sends = [
            Send(out.exchange, out.routing_key, encode(out.message), out.properties(), queue_of(self.topology, out.exchange, out.routing_key))
            for out in outgoing
        ]
        if not sends:
            return
        with self._lock:
            for attempt in (1, 2):
                confirms = self._ensure()
                try:
                    outcomes = confirms.publish(sends)
                except _DEAD as exc:  # died between the check and the publish: once more on a fresh connection
                    self._drop()
                    if attempt == 2:
                        raise
                    log.info("publisher_connection_replaced", connection=self.name, error=type(exc).__name__)
                    continue
                failed = next((outcome for outcome in outcomes if outcome is not None), None)
                if failed is not None:
                    raise failed
                return

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
            self._connection, self._confirms = None, None

    def _drop(self) -> None:
        connection, self._connection, self._confirms = self._connection, None, None
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
