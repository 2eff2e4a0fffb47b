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

Failures are per message: a handler that raises instead of answering is run again on each message alone, so
only the messages that fail by themselves get a failure, with their own reason (decision 50 in
docs/decisions.md). A handler still running after ``stop_grace`` is abandoned on stop (its messages go back
unacked), and one running longer than ``handler_deadline`` shows in ``health()`` (decision 51). A refused
publish (a full queue) is waited out with backoff while the loop keeps beating, never taken for a lost
connection (decision 56), and sent again on a fresh publishing channel; deliveries are acked on the channel that
delivered them, which is never replaced within a session (decision 82). A message the handler defers (another replica
works on its key) is kept unacked and handed to the handler again a moment later, without a retry tier and without
counting as an attempt (decision 90).
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Generic, Protocol, Sequence, TypeVar

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from shared import metrics
from shared.broker.connection import open_connection
from shared.broker.publishing import (
    FIRST_FAILURE,
    REASON,
    RETRY_COUNT,
    Confirms,
    Message,
    Outgoing,
    PublishRefused,
    Send,
    copy_properties,
    publish_confirmed,
    queue_of,
)
from shared.broker.topology import Stage, Topology
from shared.config import BrokerSettings
from shared.domain import retry
from shared.domain.contracts import (
    decode,
    encode,
)
from shared.domain.retry import Transient
from shared.domain.timing import exponential_backoff
from shared.logs import correlation, get_logger
from shared.workers import Health

log = get_logger(__name__)
# The reconnect and deferral jitter comes from a generator of its own: a loop never moves the process-wide random state
# (another thread's draws from it, a test's seeded ones, Hypothesis's check that a strategy leaves it alone).
_JITTER = random.Random()
RECONNECT_BASE = timedelta(milliseconds=500)
ISOLATION_BUDGET = timedelta(seconds=60)  # probing a failed batch message by message stops after this (a slow store)


T = TypeVar("T")


@dataclass(frozen=True)
class Together(Generic[T]):
    """A record step that runs together with the same ``run``'s steps of its batch: ``run(items)`` once (one
    transaction) instead of once per message (decision 78). If that call fails, each message's step runs alone,
    so only the messages that fail by themselves fail (decision 50)."""

    run: Callable[[Sequence[T]], None]
    item: T

    def __call__(self) -> None:
        self.run([self.item])


@dataclass(frozen=True)
class Done:
    """Success: publish these, then run ``record`` (after the confirms), then ack."""

    publish: Sequence[Outgoing] = ()
    record: Callable[[], None] | None = None  # a ``Together`` runs with its batch's others


@dataclass(frozen=True)
class Defer:
    """Not now: another replica is working on this message's key (decision 89 in docs/decisions.md). The loop keeps
    the message unacked and hands it to the handler again after a short wait, in a later batch; it is no failure and
    no attempt. One deferred for longer than ``ConsumerOptions.defer_budget`` goes up the retry ladder (decision 90)."""

    reason: str


Result = Done | Defer | BaseException


@dataclass(frozen=True)
class Inbound:
    message: Message
    delivery_tag: int
    redelivered: bool
    retry_count: int


Handler = Callable[[list[Inbound]], list[Result]]
ExtraHealth = Callable[[], tuple[str | None, dict[str, Any]]]  # (a problem that makes the worker not ok, or None; facts)


class Pausable(Protocol):
    def pause_until(self, moment: float, reason: str) -> None: ...


@dataclass
class _Delivery:
    tag: int
    redelivered: bool
    properties: BasicProperties
    body: bytes
    received: float
    deferred_since: float | None = None  # time.monotonic() of its first deferral (decision 90)
    deferrals: int = 0


@dataclass
class _Held:
    """A deferred message waiting for its next turn (``due``, time.monotonic())."""

    delivery: _Delivery
    due: float


@dataclass
class _InFlight:
    deliveries: list[_Delivery]
    inbound: list[Inbound]
    future: Future[list[Result]]
    started: float  # time.monotonic()


@dataclass
class ConsumerOptions:
    prefetch: int = 100
    batch_size: int = 50
    linger: timedelta = timedelta(milliseconds=20)
    idle_poll: float = 0.05
    handler_deadline: timedelta | None = None  # health shows a batch running longer than this (None: never)
    stop_grace: timedelta = timedelta(seconds=60)  # on stop, a batch still running after this is left unacked
    refused_patience: timedelta = timedelta(seconds=60)  # an output refused this long sends its message up the ladder
    decoder: Callable[[bytes], Message] = decode  # the transformer's also upgrades version-1 messages (decision 71)
    defer_budget: timedelta = timedelta(minutes=5)  # a message deferred longer than this goes up the retry ladder (decision 90)
    defer_first_wait: timedelta = timedelta(milliseconds=50)  # a deferred message's first wait; doubles up to a second


@dataclass
class Counters:
    """What the loop has done since it started; read by ``health()`` and by tests."""

    started_at: float = field(default_factory=time.time)
    beat_at: float = field(default_factory=time.time)
    connected: bool = False
    handled: int = 0
    retried: int = 0
    dead_lettered: int = 0
    deferred: int = 0
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
        extra_health: ExtraHealth | None = None,
    ) -> None:
        self.broker = broker
        self.topology = topology
        self.stage = stage
        self.handler = handler
        self.options = options or ConsumerOptions()
        self.extra_health = extra_health
        self.counters = Counters()
        self.metrics = metrics.stage(stage.name)  # Prometheus counters beside Counters (shared/metrics.py)
        self._stop = threading.Event()
        self._stop_asked = 0.0
        self._buffer: list[_Delivery] = []
        self._held: list[_Held] = []  # deferred messages, unacked, waiting for their next batch (decision 90)
        self._in_flight: _InFlight | None = None
        self._orphan: Future[list[Result]] | None = None  # a handler whose connection died; no new batch until it ends
        self._connection: pika.BlockingConnection | None = None
        self._loop_thread: int | None = None  # threading.get_ident() of the thread in ``run``

    # --- control -------------------------------------------------------------------------
    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop_asked = time.monotonic()
        self._stop.set()
        if threading.get_ident() != self._loop_thread:
            # the loop sees it now, not at the end of its wait for broker events. Not from the loop's own thread: there
            # stop() is a signal handler, which may run while that thread holds the lock pika's wake-up takes
            _wake(self._connection)

    def pause_until(self, moment: float, reason: str) -> None:
        """Take no new batches until ``moment`` (time.time()); used when Planner is clearly down."""
        if moment > self.counters.paused_until:
            self.counters.paused_until = moment
            self.counters.pause_reason = reason
            log.warning("consumer_paused", stage=self.stage.name, seconds=round(moment - time.time(), 1), reason=reason)

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        self._loop_thread = threading.get_ident()
        failures = 0
        while not self._stop.is_set():
            try:
                self._session()
            except (pika.exceptions.AMQPError, ConnectionError, OSError) as exc:
                failures = 1 if self.counters.connected else failures + 1  # a session that got going starts the count again
                self.counters.connected = False
                self._abandon_in_flight()
                cap = self.broker.reconnect_max_delay
                wait = exponential_backoff(failures, RECONNECT_BASE, cap).total_seconds() * _JITTER.uniform(0.8, 1.2)
                log.warning("broker_connection_lost", stage=self.stage.name, error=type(exc).__name__, detail=str(exc)[:200], retry_in=round(wait, 2))
                deadline = time.monotonic() + wait
                while not self._stop.is_set() and time.monotonic() < deadline:  # keep beating while waiting
                    self.counters.beat_at = time.time()
                    self._stop.wait(min(1.0, max(0.0, deadline - time.monotonic())))
        log.info("worker_stopped", stage=self.stage.name)

    def _session(self) -> None:
        connection = self._connection = open_connection(self.broker, self.stage.name)
        try:
            channel = connection.channel()
            self.topology.declare(channel)
            # every publish is confirmed, a batch's at once (decision 76); a nacked one is sent again on a fresh channel
            # of this connection, while consuming and acking stay on this one, confirms.channel (decision 82)
            confirms = Confirms(channel)
            channel.basic_qos(prefetch_count=self.options.prefetch)
            consumer_tag = channel.basic_consume(self.stage.work_queue(), self._on_message)
            self.counters.connected = True
            log.info("worker_consuming", stage=self.stage.name, queue=self.stage.work_queue(), prefetch=self.options.prefetch)
            while True:
                connection.process_data_events(time_limit=self._poll_limit())
                self.counters.beat_at = time.time()
                if self._in_flight is not None and self._in_flight.future.done():
                    self._settle(confirms)
                if self._stop.is_set():
                    if self._in_flight is not None and time.monotonic() - self._stop_asked < self.options.stop_grace.total_seconds():
                        continue
                    if self._in_flight is not None:
                        in_flight, self._in_flight = self._in_flight, None
                        log.error(
                            "handler_abandoned",
                            stage=self.stage.name,
                            messages=len(in_flight.inbound),
                            running_s=round(time.monotonic() - in_flight.started, 1),
                            grace_s=self.options.stop_grace.total_seconds(),
                        )  # its messages stay unacked: the broker redelivers them
                    channel.basic_cancel(consumer_tag)
                    returned = len(self._buffer) + len(self._held)
                    self._buffer.clear()  # unacked: the broker returns them when the channel closes
                    self._held.clear()
                    log.info("worker_stopping", stage=self.stage.name, returned_unacked=returned)
                    return
                if self._in_flight is None and self._ready():
                    self._dispatch(confirms)
        finally:
            self._connection = None
            self._buffer.clear()
            self._held.clear()
            try:
                if connection.is_open:
                    connection.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail in many ways
                pass

    def health(self) -> Health:
        """Consuming, paused (Planner down), disconnected, or a handler past its deadline, with the loop's counters.

        Safe from any thread. A worker-specific problem (``extra_health``, e.g. TLS towards Planner failing for
        minutes) becomes the state and makes the worker not ok.
        """
        counters = self.counters
        paused = time.time() < counters.paused_until
        state = "disconnected" if not counters.connected else ("paused" if paused else "consuming")
        ok = counters.connected
        facts: dict[str, Any] = {
            "queue": self.stage.work_queue(),
            "handled": counters.handled,
            "retried": counters.retried,
            "dead_lettered": counters.dead_lettered,
            "deferred": counters.deferred,
        }
        if paused:
            facts["paused_until"] = datetime.fromtimestamp(counters.paused_until, timezone.utc).isoformat()
            facts["pause_reason"] = counters.pause_reason
        in_flight = self._in_flight
        if in_flight is not None:
            running = time.monotonic() - in_flight.started
            facts["handler_running_s"] = round(running, 1)
            facts["handler_messages"] = len(in_flight.inbound)
            deadline = self.options.handler_deadline
            if deadline is not None and running > deadline.total_seconds():
                facts["handler_deadline_s"] = deadline.total_seconds()
                state, ok = "handler_overdue", False
        if self.extra_health is not None:
            problem, extra = self.extra_health()
            facts.update(extra)
            if problem is not None:
                state, ok = problem, False
        return Health(state, counters.beat_at, ok=ok, facts=facts)

    def _on_message(self, channel: BlockingChannel, method: Basic.Deliver, properties: BasicProperties, body: bytes) -> None:
        self._buffer.append(_Delivery(method.delivery_tag, bool(method.redelivered), properties, body, time.monotonic()))
        self.metrics.received()

    def _poll_limit(self) -> float:
        """How long the next wait for broker events may last: until a batch is due (the first message's linger ends, a
        deferred message's wait ends) and at most ``idle_poll``. A handler that finishes wakes the wait itself
        (``_start_handler``), so neither a batch's settling nor the next one waits for a poll (decision 112)."""
        limit = self.options.idle_poll
        held_back = time.time() < self.counters.paused_until or (self._orphan is not None and not self._orphan.done())
        if self._in_flight is None and not held_back:  # paused, or an orphaned handler running: no batch is due
            now = time.monotonic()
            if self._buffer:
                limit = min(limit, self._buffer[0].received + self.options.linger.total_seconds() - now)
            if self._held:
                limit = min(limit, min(held.due for held in self._held) - now)
        return max(0.0, limit)

    def _ready(self) -> bool:
        due = bool(self._held) and min(held.due for held in self._held) <= time.monotonic()
        if not (self._buffer or due) or time.time() < self.counters.paused_until:
            return False
        if self._orphan is not None:
            if not self._orphan.done():
                return False  # one handler at a time, even one whose results can no longer be acked
            self._orphan = None
        if due or len(self._buffer) >= self.options.batch_size:
            return True
        return time.monotonic() - self._buffer[0].received >= self.options.linger.total_seconds()

    def _dispatch(self, confirms: Confirms) -> None:
        now = time.monotonic()
        again = [held.delivery for held in self._held if held.due <= now][: self.options.batch_size]
        if again:
            tags = {delivery.tag for delivery in again}
            self._held = [held for held in self._held if held.delivery.tag not in tags]
        room = self.options.batch_size - len(again)
        batch, self._buffer = again + self._buffer[:room], self._buffer[room:]
        decoded: list[_Delivery] = []
        inbound: list[Inbound] = []
        for delivery in batch:
            attempt = retry_count(delivery.properties)
            try:
                message = self.options.decoder(delivery.body)
            except Exception as exc:  # noqa: BLE001 - every decode failure is dead-lettered with its reason
                try:
                    self._divert(confirms, delivery, exc)
                except PublishRefused:  # stopping while the dead-letter queue is full: it stays unacked
                    return
                except pika.exceptions.UnroutableError:
                    self._give_back(confirms, delivery)  # the dead-letter queue's node is down (decision 81)
                    continue
                confirms.channel.basic_ack(delivery.tag)
                continue
            decoded.append(delivery)
            inbound.append(Inbound(message, delivery.tag, delivery.redelivered, attempt))
        if inbound:
            self._in_flight = _InFlight(decoded, inbound, self._start_handler(inbound), time.monotonic())

    def _start_handler(self, inbound: list[Inbound]) -> Future[list[Result]]:
        """Run the handler on a daemon thread (one that is abandoned on stop cannot hold the process open); when it ends,
        it wakes the loop's wait for broker events, so the batch is settled at once (decision 112)."""
        future: Future[list[Result]] = Future()
        connection = self._connection

        def target() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(self._call_handler(inbound))
            except BaseException as exc:  # noqa: BLE001 - handed to the loop, which settles every message
                future.set_exception(exc)
            finally:
                _wake(connection)

        threading.Thread(target=target, name=f"{self.stage.name}-handler", daemon=True).start()
        return future

    def _call_handler(self, inbound: list[Inbound]) -> list[Result]:
        try:
            return self._checked(self.handler(inbound), len(inbound))
        except Exception as exc:  # noqa: BLE001 - isolate: only the messages that fail alone fail
            if len(inbound) == 1:
                log.warning("handler_failed", stage=self.stage.name, size=1, error=type(exc).__name__, detail=str(exc)[:200])
                return [exc]
            log.warning("handler_failed", stage=self.stage.name, size=len(inbound), error=type(exc).__name__, detail=str(exc)[:200], isolating=True)
            return self._isolate(inbound, exc)

    def _isolate(self, inbound: list[Inbound], batch_error: Exception) -> list[Result]:
        """Run the handler on each message alone to find those that fail by themselves, then on the rest together."""
        failed: dict[int, Exception] = {}
        give_up_at = time.monotonic() + ISOLATION_BUDGET.total_seconds()
        for i, item in enumerate(inbound):
            if time.monotonic() > give_up_at or self._stop.is_set():
                # every probe so slow that the failure is surely not this batch's content: the rest fail as the batch did
                log.warning("isolation_stopped", stage=self.stage.name, probed=i, size=len(inbound))
                failed.update({j: batch_error for j in range(i, len(inbound))})
                break
            try:
                self._checked(self.handler([item]), 1)
            except Exception as exc:  # noqa: BLE001 - this message fails by itself: that is its own result
                failed[i] = exc
                with correlation(item.message.correlation_id, stage=self.stage.name):
                    log.warning("poison_message_isolated", error=type(exc).__name__, detail=str(exc)[:200])
        if not failed:  # fails only in company: nothing to single out, fail the batch as it failed
            return [batch_error] * len(inbound)
        rest = [i for i in range(len(inbound)) if i not in failed]
        results: list[Result] = [failed[i] if i in failed else batch_error for i in range(len(inbound))]
        if rest:
            for i, result in zip(rest, self._call_handler([inbound[i] for i in rest])):
                results[i] = result
        return results

    @staticmethod
    def _checked(results: list[Result], expected: int) -> list[Result]:
        if len(results) != expected:
            raise RuntimeError(f"handler returned {len(results)} results for {expected} messages")
        return results

    def _settle(self, confirms: Confirms) -> None:
        """Apply a batch's results: publish every output and await the confirms once, record, then ack.

        Per message the order stays publish, confirm, record, ack (decision 18); what is batched is the waiting
        (one confirm window for all outputs, decision 76), the record steps that can run together (one call for
        the batch, decision 78, each message alone again if that call fails) and the ack (one multiple-ack,
        decision 77). A message whose outputs were not all confirmed is never recorded nor acked as done: it goes
        up the retry ladder (or stays unacked when stopping).
        """
        assert self._in_flight is not None
        in_flight, self._in_flight = self._in_flight, None
        batch = list(zip(in_flight.deliveries, in_flight.inbound, in_flight.future.result()))
        held = self._hold([(delivery, result) for delivery, _, result in batch if isinstance(result, Defer)])
        failures: dict[int, BaseException] = {}
        for n, (delivery, _, result) in enumerate(batch):
            if isinstance(result, BaseException):
                failures[n] = result
            elif isinstance(result, Defer) and delivery.tag not in held:
                failures[n] = Transient(f"deferred for longer than {self.options.defer_budget}: {result.reason}")
        sends: list[Send] = []
        owners: list[int] = []
        for n, (_, _, result) in enumerate(batch):
            if isinstance(result, Done):
                for out in result.publish:
                    queue = queue_of(self.topology, out.exchange, out.routing_key)
                    sends.append(Send(out.exchange, out.routing_key, encode(out.message), out.properties(), queue))
                    owners.append(n)
        outcomes = confirms.publish(sends, patience=self.options.refused_patience, wait=self._wait) if sends else []
        unsettled: set[int] = set()
        for n, outcome in zip(owners, outcomes):
            if outcome is None or n in failures or n in unsettled:
                continue
            if not isinstance(outcome, PublishRefused):
                raise outcome  # unroutable: a channel error, as from pika's own confirm mode
            if self._stop.is_set():
                unsettled.add(n)  # stopping while a queue is full: it stays unacked, the broker redelivers it
            else:
                failures[n] = Transient(f"publish refused: {outcome}")
        done = {n: result for n, (_, _, result) in enumerate(batch) if isinstance(result, Done) and n not in failures and n not in unsettled}
        self.metrics.published(sum(len(result.publish) for result in done.values()))
        failures.update(self._record(batch, done))
        given_back: set[int] = set()
        for n, error in sorted(failures.items()):
            delivery, item, _ = batch[n]
            with correlation(item.message.correlation_id, stage=self.stage.name):
                try:
                    self._divert(confirms, delivery, error)
                except PublishRefused:  # stopping while the retry or dead-letter queue is full: it stays unacked
                    log.info("settling_interrupted", stage=self.stage.name)
                    unsettled.add(n)
                except pika.exceptions.UnroutableError:  # the dead-letter queue's node is down (decision 81)
                    given_back.add(n)
        settled = [batch[n][0].tag for n in range(len(batch)) if n not in unsettled and n not in given_back and batch[n][0].tag not in held]
        if settled and len(settled) == len(batch) and not self._held:
            # Every tag below this batch's is settled already (batches are settled whole and in order, decode
            # failures at dispatch, no deferred message waiting), so one multiple-ack settles exactly this batch
            # (decision 77).
            confirms.channel.basic_ack(max(settled), multiple=True)
        else:
            for tag in settled:
                confirms.channel.basic_ack(tag)
        for n in sorted(given_back):
            self._give_back(confirms, batch[n][0])
        for n in done:
            if n not in failures and n not in unsettled:
                self.counters.handled += 1
                self.metrics.handled()

    def _hold(self, deferred: list[tuple[_Delivery, Result]]) -> set[int]:
        """Keep deferred messages for a later batch, each after its own short wait (50 ms, doubling to a second, with
        jitter); the tags kept. One deferred for longer than the budget is not kept: it goes up the ladder."""
        now = time.monotonic()
        kept: set[int] = set()
        first_time = 0
        for delivery, result in deferred:
            since = delivery.deferred_since if delivery.deferred_since is not None else now
            if now - since > self.options.defer_budget.total_seconds():
                continue
            delivery.deferred_since, delivery.deferrals = since, delivery.deferrals + 1
            wait = exponential_backoff(delivery.deferrals, self.options.defer_first_wait, timedelta(seconds=1)).total_seconds() * _JITTER.uniform(0.5, 1.5)
            self._held.append(_Held(delivery, now + wait))
            kept.add(delivery.tag)
            first_time += delivery.deferrals == 1
        if first_time:  # said once per message, not at every turn it waits
            self.counters.deferred += first_time
            first = next(result for _, result in deferred if isinstance(result, Defer))
            log.info("messages_deferred", stage=self.stage.name, messages=first_time, reason=first.reason, waiting=len(self._held))
        return kept

    def _record(self, batch: list[tuple[_Delivery, Inbound, Result]], done: dict[int, Done]) -> dict[int, BaseException]:
        """Run the record steps of the messages done, together where they can be; the failures, per message."""
        failures: dict[int, BaseException] = {}
        together: dict[Any, list[tuple[int, Any]]] = {}
        alone: list[int] = []
        for n, result in done.items():
            if isinstance(result.record, Together):
                together.setdefault(result.record.run, []).append((n, result.record.item))
            elif result.record is not None:
                alone.append(n)
        for run, entries in together.items():
            members = [n for n, _ in entries]
            try:
                run([item for _, item in entries])
            except Exception as exc:  # noqa: BLE001 - find the messages whose record fails alone
                log.warning("record_failed", stage=self.stage.name, size=len(members), error=type(exc).__name__, detail=str(exc)[:200], isolating=len(members) > 1)
                if len(members) > 1:
                    alone.extend(members)
                else:
                    failures[members[0]] = exc
        for n in sorted(alone):
            record, item = done[n].record, batch[n][1]
            with correlation(item.message.correlation_id, stage=self.stage.name):
                try:
                    if record is not None:
                        record()
                except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError):
                    raise
                except Exception as exc:  # noqa: BLE001 - e.g. the store is down: retry the message later
                    log.warning("apply_failed", error=type(exc).__name__, detail=str(exc)[:200])
                    failures[n] = exc
        return failures

    def _wait(self, seconds: float) -> bool:
        """Wait for a refused publish's next try, servicing the connection and beating; False once stop is asked."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            self.counters.beat_at = time.time()
            if self._connection is not None:
                self._connection.sleep(min(left, 0.5))
            else:
                time.sleep(min(left, 0.5))
        return False

    def _divert(self, confirms: Confirms, delivery: _Delivery, error: BaseException) -> None:
        """A failed message's copy to its retry tier or the dead-letter queue, confirmed; the caller acks."""
        attempt = retry_count(delivery.properties)
        outcome = retry.decide(error, attempt, self.topology.ladder)
        self.metrics.failed(error)
        now = datetime.now(timezone.utc).isoformat()
        headers = dict(delivery.properties.headers or {})
        headers.setdefault(FIRST_FAILURE, now)
        headers[REASON] = outcome.reason[:1000]
        headers["x-original-queue"] = self.stage.work_queue()
        if isinstance(outcome, retry.RetryLater):
            headers[RETRY_COUNT] = attempt + 1
            target = self.stage.retry_queue(outcome.delay)
            # never given up while running: there is nowhere else to put the message (decision 56)
            publish_confirmed(confirms, "", target, delivery.body, copy_properties(delivery.properties, headers), queue=target, patience=None, wait=self._wait)
            self.counters.retried += 1
            self.metrics.retried()
            log.warning("message_retry_scheduled", attempt=attempt + 1, delay_s=outcome.delay.total_seconds(), queue=target, reason=outcome.reason)
        else:
            headers[RETRY_COUNT] = attempt
            headers["x-dead-lettered-at"] = now
            target = self.stage.dead_letter_queue()
            publish_confirmed(confirms, "", target, delivery.body, copy_properties(delivery.properties, headers), queue=target, patience=None, wait=self._wait)
            self.counters.dead_lettered += 1
            self.metrics.dead_lettered()
            log.error("message_dead_lettered", attempts=attempt + 1, queue=target, reason=outcome.reason)

    def _give_back(self, confirms: Confirms, delivery: _Delivery) -> None:
        """A message whose copy no queue took goes back to its work queue alone; its batch-mates are acked.

        Its copy to the dead-letter queue is returned unroutable while the cluster node holding that classic queue is
        down (decision 81 in docs/decisions.md). Requeued, it is delivered again, and at the work queue's delivery
        limit the broker dead-letters it itself and keeps it (at-least-once) until the dead-letter queue is back.
        Ending the session instead would send the whole batch back with it, and its good messages would reach the
        delivery limit too.
        """
        log.warning("message_given_back", stage=self.stage.name, reason="its copy was unroutable: the dead-letter queue's node down?")
        confirms.channel.basic_nack(delivery.tag, requeue=True)

    def _abandon_in_flight(self) -> None:
        """After a lost connection the broker redelivers everything; forget local state.

        A handler still running is not waited for (it may be stuck): its results cannot be acked any more, and no
        new batch starts until it has ended.
        """
        self._buffer.clear()
        self._held.clear()
        if self._in_flight is not None:
            self._orphan = self._in_flight.future
            self._in_flight = None


def _wake(connection: pika.BlockingConnection | None) -> None:
    """Make the connection's thread return from its wait for broker events now (pika's one thread-safe call)."""
    if connection is None:
        return
    try:
        connection.add_callback_threadsafe(_nothing)
    except (pika.exceptions.AMQPError, OSError):  # closed meanwhile: the loop is reconnecting and looks again anyway
        pass


def _nothing() -> None:
    """A callback that only ends the wait it is dispatched in."""


def retry_count(properties: BasicProperties) -> int:
    value = (properties.headers or {}).get(RETRY_COUNT, 0)
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0
