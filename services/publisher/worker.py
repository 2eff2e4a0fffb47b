"""The Planner publisher: busy-time desired states in, Planner calls out, receipts recorded.

Gather (what Planner is known to hold), decide (``delivery_plan``), apply (one call per mailbox
and operation, receipts matched by OriginSystemIdentifier, never by position). Only the failed
events of a batch are retried or dead-lettered; the others are done.

An event that cannot be sent at all (a content error) is dead-lettered alone and the call goes ahead with the
others; content errors never count towards the outage guard (decision 52 in docs/decisions.md). Health shows TLS
failures towards Planner that have lasted minutes (decision 53) and a Planner call that outlived its deadline
(decision 51).

Replicas (decision 89): a batch first claims the event keys it is to judge, reads what Planner holds for the keys it
got, and calls Planner only for those; a message whose key another replica holds is deferred (``Defer``: a moment
later, in a later batch, decision 90). The receipts' write releases the claims in its own transaction, and a claim
outlasts any Planner call made under it (``Claims.ready_for_call``).

Write ahead (decisions 84 and 115): the creates of a batch's first calls are recorded as maybe held in one transaction
before any call leaves.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import IO, Any, Callable, Iterable, Iterator, Protocol, Sequence, TypeVar

from shared import metrics
from shared.adapters.claims import Claims, replica_owner
from shared.adapters.store import Store, open_store
from shared.broker.consume_loop import (
    Consumer,
    ConsumerOptions,
    Defer,
    Done,
    Inbound,
    Pausable,
    Result,
)
from shared.broker.topology import Topology, from_settings
from shared.config import Settings
from shared.domain.contracts import BusyTimeState
from shared.domain.delivery_plan import (
    Action,
    Delivered,
    DeliveredChange,
    DeliveredRecord,
    EventReceipt,
    FollowUp,
    NoChange,
    Operation,
    PlannerOriginated,
    Postpone,
    Send,
    maybe_applied,
    newest_per_key,
    plan,
    remember_version,
    settle,
)
from shared.domain.retry import ContentError, Permanent, Transient
from shared.logs import correlation, get_logger

log = get_logger(__name__)
HANDLER_DEADLINE = timedelta(minutes=15)  # a batch running longer shows as handler_overdue in health (decision 51)
STAGE = "publisher"
CLAIM_MARGIN = timedelta(seconds=30)  # a claim outlasts the longest Planner call made under it by this much (decision 89)


def planner_call_budget(settings: Settings) -> timedelta:
    """The longest one Planner call can take: every quick try at its hard deadline (twice the timeout unless set,
    decision 51), with the longest waits between them."""
    attempt = settings.planner.call_deadline or 2 * settings.planner.timeout
    tries = settings.retry.quick_attempts
    return tries * attempt + (tries - 1) * settings.retry.quick_max_wait


def key_claims(store: Store, settings: Settings, owner: tuple[str, IO[str] | None] | None = None) -> Claims:
    """The publisher's claims: each lasts two calls' budget and the margin, renewed before a call that would outlive it."""
    budget = planner_call_budget(settings)
    return Claims(store, STAGE, ttl=2 * budget + CLAIM_MARGIN, call_budget=budget, margin=CLAIM_MARGIN, owner=owner)


_T = TypeVar("_T")
_R = TypeVar("_R")


class Pool(Protocol):
    """Runs a function over items in parallel (``ThreadPoolExecutor`` fits; the worker uses ``DaemonPool``)."""

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], /) -> Iterator[Any]: ...


class DaemonPool:
    """Runs calls on ``size`` daemon threads of its own, started with its first call and kept (decision 120).

    ``ThreadPoolExecutor`` joins its threads when the interpreter exits, so one call stuck for ever would hold a
    stopped worker open past its grace period; a daemon thread cannot (decision 51 in docs/decisions.md).
    """

    def __init__(self, size: int, name: str) -> None:
        self._size = size
        self._name = name
        self._work: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._start_lock = threading.Lock()

    def map(self, fn: Callable[[_T], _R], items: Iterable[_T], /) -> Iterator[_R]:
        self._start()
        futures: list[Future[_R]] = []
        for item in items:
            future: Future[_R] = Future()

            def run(item: _T = item, future: Future[_R] = future) -> None:
                try:
                    future.set_result(fn(item))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller by result()
                    future.set_exception(exc)

            self._work.put(run)
            futures.append(future)
        return (future.result() for future in futures)

    def _start(self) -> None:
        with self._start_lock:
            while len(self._threads) < self._size:
                thread = threading.Thread(target=self._serve, name=f"{self._name}-{len(self._threads)}", daemon=True)
                thread.start()
                self._threads.append(thread)

    def _serve(self) -> None:
        while True:
            self._work.get()()


class PlannerCalls(Protocol):
    def create_events(self, events: list[Any]) -> Any: ...

    def update_events(self, events: list[Any]) -> Any: ...

    def delete_events(self, events: list[Any]) -> Any: ...


@dataclass
class OutageGuard:
    """Counts consecutive transient call failures; past the threshold, pauses the consumer."""

    threshold: int
    cooldown: float
    consumer: Pausable | None = None
    consecutive: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def success(self) -> None:
        with self.lock:
            if self.consecutive >= self.threshold:
                log.info("planner_recovered")
            self.consecutive = 0

    def failure(self, reason: str) -> None:
        with self.lock:
            self.consecutive += 1
            down = self.consecutive >= self.threshold
        if down and self.consumer is not None:
            self.consumer.pause_until(time.time() + self.cooldown, f"planner_down: {reason}")


@dataclass
class PublisherDeps:
    settings: Settings
    store: Store
    client: PlannerCalls
    guard: OutageGuard
    event_factory: Any = None  # PlannerEvent constructor, injected so this module need not import zeep
    pool: Pool | None = None  # mailboxes delivered in parallel (one call per mailbox at a time)
    claims: Claims | None = None  # None: made from the store and the settings at the first batch

    def key_claims(self) -> Claims:
        if self.claims is None:
            self.claims = key_claims(self.store, self.settings)
        return self.claims


@dataclass
class _Pending:
    index: int
    state: BusyTimeState
    send: Send
    attempts: list[Operation] = field(default_factory=list)


def handle(batch: Sequence[Inbound], deps: PublisherDeps) -> list[Result]:
    """Deliver a batch of desired states; one result per message, in order."""
    results: list[Result | None] = [None] * len(batch)
    states: dict[int, BusyTimeState] = {}
    for i, inbound in enumerate(batch):
        if isinstance(inbound.message, BusyTimeState):
            states[i] = inbound.message
        else:
            results[i] = Permanent(f"publisher takes busy_time_state messages, not {inbound.message.type}")
    positions = list(states)  # newest_per_key indexes the states alone; map back to positions in the batch
    newest = {positions[j] for j in newest_per_key(list(states.values())).values()}
    claims = deps.key_claims()
    claimed = claims.take((states[i].mailbox.lower(), states[i].origin_id) for i in newest) if newest else set()
    by_mailbox: dict[str, list[int]] = defaultdict(list)
    for i, state in states.items():
        if i not in newest:
            results[i] = Done()  # an older state of the same key in this batch: the newest decides
        elif (state.mailbox.lower(), state.origin_id) not in claimed:
            results[i] = Defer("another publisher is delivering this event key")
        else:
            by_mailbox[state.mailbox.lower()].append(i)
    jobs = [(mailbox, [(i, states[i]) for i in indexes]) for mailbox, indexes in by_mailbox.items()]
    # What Planner holds for the whole batch in one read (after the claims), and every receipt and outcome of the batch
    # written in one transaction once its calls are done, releasing the claims, before the consume loop acks (decisions 78, 89).
    known = deps.store.delivered_many({mailbox: [state.origin_id for _, state in items] for mailbox, items in jobs})
    planned = [(mailbox, [(i, state, plan(state, known[mailbox].get(state.origin_id))) for i, state in items]) for mailbox, items in jobs]
    ahead = _write_ahead(planned, claims, deps.store)
    if deps.pool is not None and len(jobs) > 1:
        outcomes = list(deps.pool.map(lambda job: _deliver_mailbox(job[0], job[1], known[job[0]], deps, ahead), planned))
    else:
        outcomes = [_deliver_mailbox(mailbox, items, known[mailbox], deps, ahead) for mailbox, items in planned]
    records: list[tuple[str, DeliveredChange, str | None]] = []
    for (mailbox, _), outcome in zip(jobs, outcomes):
        records.extend((mailbox, change, correlation_id) for change, correlation_id in outcome.records)
        for i, result in outcome.results.items():
            results[i] = result
    if jobs:
        outcome_by_mailbox = {mailbox: outcome.error for (mailbox, _), outcome in zip(jobs, outcomes)}
        deps.store.record_delivered_batch(records, outcome_by_mailbox, release=claims.release_with())
    return [r if r is not None else Done() for r in results]


def _write_ahead(planned: list[tuple[str, list[tuple[int, BusyTimeState, Action]]]], claims: Claims, store: Store) -> frozenset[tuple[str, str]]:
    """Record every create of the batch's first calls as maybe held, in one transaction, before any call leaves
    (decisions 84 and 115); the (mailbox, origin id) written. If the write fails, no call goes out: the batch is retried.
    Nothing is written when a claim was lost: no call goes out then either."""
    ahead = [
        (mailbox, maybe, state.correlation_id)
        for mailbox, items in planned
        for _, state, action in items
        if isinstance(action, Send) and action.operation == "create" and (maybe := maybe_applied(action)) is not None
    ]
    if not ahead or not claims.ready_for_call():
        return frozenset()
    store.record_delivered_batch(ahead)
    return frozenset((mailbox, change.origin_id) for mailbox, change, _ in ahead)


@dataclass
class _Delivered:
    """One mailbox's part of a batch: a result per message, what to record (in order), and its first error."""

    results: dict[int, Result] = field(default_factory=dict)
    records: list[tuple[DeliveredChange, str | None]] = field(default_factory=list)
    error: str | None = None


def _deliver_mailbox(
    mailbox: str, items: list[tuple[int, BusyTimeState, Action]], known: dict[str, DeliveredRecord], deps: PublisherDeps, ahead: frozenset[tuple[str, str]],
) -> _Delivered:
    done = _Delivered()
    results = done.results
    pending: list[_Pending] = []
    for index, state, action in items:
        if isinstance(action, NoChange):
            with correlation(state.correlation_id, mailbox=mailbox, origin_id=state.origin_id):
                if remember_version(state, known.get(state.origin_id), action):
                    done.records.append((DeliveredChange(state.origin_id, version=state.version), state.correlation_id))
                log.info("busy_time_unchanged", reason=action.reason, version=state.version)
            results[index] = Done()
        else:
            pending.append(_Pending(index, state, action))
    rounds = 0
    while pending and rounds < 3:  # a create answered 8 becomes an update (and vice versa) at most twice
        rounds += 1
        next_round: list[_Pending] = []
        for operation in ("create", "update", "delete"):
            group = [p for p in pending if p.send.operation == operation]
            size = deps.settings.planner.batch_size
            for start in range(0, len(group), size):
                # the first round's creates were written ahead for the whole batch (decision 115); a later round's are written by their call
                next_round.extend(_call(mailbox, operation, group[start : start + size], known, deps, done, ahead if rounds == 1 else frozenset()))
        pending = next_round
    for p in pending:
        results[p.index] = Transient(f"Planner kept answering {p.attempts} for this event")
    failed = [r for r in results.values() if isinstance(r, BaseException)]
    done.error = str(failed[0])[:500] if failed else None
    return done


def _call(
    mailbox: str, operation: Operation, group: list[_Pending], known: dict[str, DeliveredRecord], deps: PublisherDeps, done: _Delivered,
    ahead: frozenset[tuple[str, str]] = frozenset(),
) -> list[_Pending]:
    results = done.results
    events = [deps.event_factory(origin_id=p.send.origin_id, email=mailbox, start=p.send.interval.start, end=p.send.interval.end) for p in group]
    call = {"create": deps.client.create_events, "update": deps.client.update_events, "delete": deps.client.delete_events}[operation]
    if not deps.key_claims().ready_for_call():  # the claims would not outlast the call, and one was lost: no call (decision 89)
        for p in group:
            results[p.index] = Transient("the claim on this event key was lost before the Planner call")
        log.warning("planner_call_skipped", mailbox=mailbox, operation=operation, events=len(group), reason="claim_lost")
        return []
    if operation == "create":
        # Written ahead: from the moment the call leaves, Planner may hold these events. If the receipt cannot be
        # stored afterwards (the database cut), the retry finds them "maybe held" and updates instead of creating
        # them again; no call goes out unless this write succeeded (decision 84 in docs/decisions.md).
        unwritten = [(mailbox, maybe, p.state.correlation_id) for p in group if (mailbox, p.send.origin_id) not in ahead and (maybe := maybe_applied(p.send)) is not None]
        if unwritten:
            deps.store.record_delivered_batch(unwritten)
    # the maybes this call wrote ahead, which Planner's own answer (a fault code, a receipt that created nothing) clears
    fresh = {p.send.origin_id for p in group if operation == "create" and not ((k := known.get(p.send.origin_id)) is not None and k.maybe_held)}
    try:
        with metrics.planner_call(operation):  # latency and errors by kind (shared/metrics.py)
            outcome = call(events)
    except ContentError as exc:  # about what some events carry, not about Planner: the guard does not hear of it
        return _content_error(mailbox, operation, group, known, deps, done, exc, ahead)
    except Transient as exc:
        deps.guard.failure(exc.reason)
        for p in group:
            results[p.index] = exc
            # Sent, answer lost: Planner may have applied it, so a later absent state still deletes it (decision 68).
            maybe = maybe_applied(p.send, exc.code)
            if maybe is not None:
                done.records.append((maybe, p.state.correlation_id))
            elif p.send.origin_id in fresh:   # Planner's own fault code: this create applied nothing
                done.records.append((DeliveredChange(p.send.origin_id, maybe_cleared=True), p.state.correlation_id))
        log.warning("planner_call_failed", mailbox=mailbox, operation=operation, events=len(group), reason=exc.reason)
        return []
    except Permanent as exc:
        deps.guard.success()
        for p in group:
            results[p.index] = exc
            if p.send.origin_id in fresh:
                done.records.append((DeliveredChange(p.send.origin_id, maybe_cleared=True), p.state.correlation_id))
        log.error("planner_call_rejected", mailbox=mailbox, operation=operation, events=len(group), reason=exc.reason)
        return []
    deps.guard.success()
    receipts = {r.origin_id: r for r in outcome.receipts}
    table = deps.settings.planner.receipt_actions
    again: list[_Pending] = []
    for p in group:
        state = p.state
        with correlation(state.correlation_id, mailbox=mailbox, origin_id=state.origin_id):
            receipt = receipts.get(state.origin_id)
            answer = settle(p.send, state.version, p.attempts, None if receipt is None else _event_receipt(receipt, outcome.reference), table)
            p.attempts.append(operation)
            if receipt is not None:
                metrics.planner_receipt(operation, receipt.code)
                log.info("planner_receipt", operation=operation, code=receipt.code, action=answer.action, reference=outcome.reference)
            if answer.record is not None:
                done.records.append((answer.record, state.correlation_id))
            if receipt is not None and state.origin_id in fresh and (answer.record is None or answer.record.holding is None):
                # Planner answered for this event and holds nothing from this create (15, 16, 3, ...)
                done.records.append((DeliveredChange(state.origin_id, maybe_cleared=True), state.correlation_id))
            settled = answer.outcome
            if isinstance(settled, Delivered):
                log.info("busy_time_delivered", operation=operation, version=state.version)
                metrics.delivered(operation, state.cause, state.version)  # end-to-end lag: version = the Exchange read's start (decision 30)
                results[p.index] = Done()
            elif isinstance(settled, PlannerOriginated):
                log.info("busy_time_planner_originated", version=state.version)
                results[p.index] = Done()
            elif isinstance(settled, FollowUp):
                again.append(_Pending(p.index, state, settled.send, p.attempts))
            elif isinstance(settled, Postpone):
                results[p.index] = Transient(settled.reason, code=settled.code)
            else:
                results[p.index] = Permanent(settled.reason, code=settled.code)
    return again


def _content_error(
    mailbox: str, operation: Operation, group: list[_Pending], known: dict[str, DeliveredRecord], deps: PublisherDeps, done: _Delivered, exc: ContentError,
    ahead: frozenset[tuple[str, str]],
) -> list[_Pending]:
    """Dead-letter only the events at fault and call again with the others; split the call when it does not say which."""
    bad = [p for p in group if p.send.origin_id in exc.problems]
    if not bad and len(group) > 1:
        half = len(group) // 2
        return [*_call(mailbox, operation, group[:half], known, deps, done, ahead), *_call(mailbox, operation, group[half:], known, deps, done, ahead)]
    for p in bad or group:
        problem = exc.problems.get(p.send.origin_id)
        reason = f"{operation_name(operation)}: {problem}" if problem else exc.reason
        done.results[p.index] = Permanent(reason, code=exc.code)
        with correlation(p.state.correlation_id, mailbox=mailbox, origin_id=p.state.origin_id):
            log.error("busy_time_unsendable", operation=operation, reason=reason)
    rest = [p for p in group if p not in bad] if bad else []
    return _call(mailbox, operation, rest, known, deps, done, ahead) if rest else []


def operation_name(operation: Operation) -> str:
    return {"create": "CreateEvents", "update": "UpdateEvents", "delete": "DeleteEvents"}[operation]


def _event_receipt(receipt: Any, reference: str | None) -> EventReceipt:
    """The client's receipt as the plain values ``settle`` reads."""
    return EventReceipt(
        code=receipt.code,
        message=receipt.message,
        planner_event_id=receipt.planner_event_id,
        planner_resource_id=receipt.planner_resource_id,
        received_at=receipt.received_at,
        conflict_notification_sent=receipt.conflict_notification_sent,
        reference=reference,
    )


CERTIFICATE_WARNING_DAYS = 30


def warn_if_certificate_expires(expiry: datetime | None, now: datetime | None = None) -> int | None:
    """Log at every start when the OCES certificate expires within 30 days; return the days left."""
    if expiry is None:
        return None
    days = (expiry - (now or datetime.now(timezone.utc))).days
    if days < CERTIFICATE_WARNING_DAYS:
        log.warning("planner_certificate_expires_soon", expires_at=expiry.isoformat(), days_left=days)
    else:
        log.info("planner_certificate_valid", expires_at=expiry.isoformat(), days_left=days)
    return days


def build(settings: Settings) -> Consumer:
    """Wire the publisher: store, Planner client, consumer. Nothing connects at import."""
    from shared.adapters.deadline import in_flight
    from shared.adapters.planner_client import (
        PlannerClient,
        PlannerEvent,
        client_certificate_expiry,
    )

    store = open_store(settings.database_url(), settings.database.auto_upgrade)
    client = PlannerClient.from_settings(settings.planner, settings.retry, zone=settings.busy.time_zone)
    expiry = client_certificate_expiry(settings.planner)
    warn_if_certificate_expires(expiry)
    metrics.certificate_expiry(expiry)
    topology: Topology = from_settings(settings.broker, settings.retry)
    guard = OutageGuard(settings.planner.outage_after_failures, settings.planner.outage_cooldown.total_seconds())
    pool = DaemonPool(settings.planner.parallel_calls, "planner-call")
    deps = PublisherDeps(settings, store, client, guard, PlannerEvent, pool)
    # A large batch lets a burst group per mailbox (one call of up to batch_size events each); the prefetch holds the
    # next batch ready while one is delivered.
    deps.claims = key_claims(store, settings, replica_owner(settings.status.health_dir, STAGE))
    options = ConsumerOptions(
        prefetch=2 * settings.planner.max_batch_messages,
        batch_size=settings.planner.max_batch_messages,
        linger=settings.planner.linger,
        handler_deadline=HANDLER_DEADLINE,
        defer_budget=deps.claims.ttl + CLAIM_MARGIN,  # a key waits locally past a claim left by a replica that died (decision 90)
    )
    consumer = Consumer(
        settings.broker, topology, topology.stage("publisher"), lambda batch: handle(batch, deps), options, publisher_health(client.tls_trouble, in_flight, expiry)
    )
    guard.consumer = consumer
    return consumer


def publisher_health(tls_trouble: Callable[[], Any], calls_in_flight: Callable[[], list[Any]],
                     certificate_expiry: datetime | None = None) -> Callable[[], tuple[str | None, dict[str, Any]]]:
    """What the publisher adds to the consume loop's health: TLS failing for minutes, a Planner call past its deadline,
    and its OCES certificate's expiry (so the status page shows it without holding the certificate; decision 83)."""

    def extra() -> tuple[str | None, dict[str, Any]]:
        problem: str | None = None
        facts: dict[str, Any] = {}
        if certificate_expiry is not None:
            facts["planner_certificate_expires_at"] = certificate_expiry.isoformat()
        overdue = [call for call in calls_in_flight() if call.overdue]
        if overdue:
            problem = "planner_call_overdue"
            facts["planner_call_overdue_s"] = round(overdue[0].running_s, 1)
        trouble = tls_trouble()
        if trouble is not None:
            problem = "planner_tls_failing"
            facts["planner_tls_error"] = trouble.cause
            facts["planner_tls_failing_since"] = trouble.since.isoformat()
            facts["planner_tls_failures"] = trouble.failures
        return problem, facts

    return extra
