"""Enrolment from Planner: GetResources a few times a day, enrol its caseworkers, remove denied mailboxes.

Gather (GetResources; the mailboxes, allow list and deny list from the store), decide
(``shared.domain.enrolment.plan_enrolment``, pure), apply: for each denied mailbox that is enrolled, publish an
absent ``BusyTimeState`` (cause "reconcile") for every busy time Planner is known to hold for it, through the
ordinary publisher path, and only then disable it (status "denied"); then enrol the new ones. A failed call or an
empty answer changes nothing and is reported (decision 62 in docs/decisions.md). Logs carry addresses and counts
only; a resource's name and description are never logged.

``sync_resources`` runs one pass over a ``ResourceSyncDeps`` (tests build it directly); ``run_resource_sync`` is the
command line's one-off (``plannersync mailboxes sync``); ``ResourceSync`` (``plannersync run resource-sync``) waits
for each of ``resource_sync.times`` on the configured zone's wall clock, runs, and answers ``health()``.
"""

from __future__ import annotations

import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Protocol, Sequence

from shared.adapters.store import Store, open_store
from shared.broker.publishing import Outgoing, Publisher
from shared.broker.topology import Topology, from_settings
from shared.config import Settings
from shared.domain.contracts import version_of
from shared.domain.enrolment import EnrolmentPlan, KnownMailbox, OfferedResource, plan_enrolment, removal_states
from shared.domain.retry import Permanent, Transient
from shared.domain.timing import next_run
from shared.logs import correlation, get_logger
from shared.workers import Health, wait_until

log = get_logger(__name__)

WAIT_SLICE = 2.0  # seconds: the longest the schedule's wait goes without a beat


class PlannerDirectory(Protocol):
    """What enrolment needs of Planner (``planner_client.PlannerClient`` fits)."""

    def get_resources(self) -> Sequence[OfferedResource]: ...


class StatePublisher(Protocol):
    def publish(self, outgoing: Outgoing) -> None: ...


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class ResourceSyncDeps:
    store: Store
    planner: PlannerDirectory
    publisher: StatePublisher
    topology: Topology
    clock: Callable[[], datetime] = _utc_now


@contextmanager
def open_deps(settings: Settings, clock: Callable[[], datetime] | None = None) -> Iterator[ResourceSyncDeps]:
    """Store, Planner client and confirming publisher built from ``settings`` for one pass; closed afterwards."""
    from shared.adapters.planner_client import PlannerClient

    with ExitStack() as stack:
        store = open_store(settings.database_url(), settings.database.auto_upgrade)
        stack.callback(store.engine.dispose)
        planner = PlannerClient.from_settings(settings.planner, settings.retry, zone=settings.busy.time_zone)
        stack.callback(planner.close)
        topology = from_settings(settings.broker, settings.retry)
        publisher = Publisher(settings.broker, topology)
        stack.callback(publisher.close)
        yield ResourceSyncDeps(store, planner, publisher, topology, clock or _utc_now)


@dataclass(frozen=True)
class ResourceSyncReport:
    """One pass: the plan, and what applying it did (removals that failed stay enrolled for the next pass)."""

    run_id: str
    at: datetime
    plan: EnrolmentPlan
    enrolled: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    states_published: int = 0
    removal_failures: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.plan.outcome == "applied" and not self.removal_failures

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.plan.as_dict(),
            "run_id": self.run_id,
            "at": self.at.isoformat(),
            "enrolled": list(self.enrolled),
            "removed": list(self.removed),
            "busy_times_removed": self.states_published,
            "removal_failures": dict(self.removal_failures),
        }


def sync_resources(deps: ResourceSyncDeps, beat: Callable[[], None] | None = None) -> ResourceSyncReport:
    """One enrolment pass: gather, decide, apply, report."""
    now = deps.clock()
    run_id = f"resources-{uuid.uuid4().hex[:16]}"
    with correlation(run_id):
        resources: Sequence[OfferedResource] | None = None
        failure: str | None = None
        try:
            resources = deps.planner.get_resources()
        except Exception as exc:  # noqa: BLE001 - never "Planner has no caseworkers": nothing is removed
            failure = exc.reason if isinstance(exc, (Transient, Permanent)) else f"{type(exc).__name__}: {str(exc)[:200]}"
        if beat is not None:
            beat()
        known = [KnownMailbox(row.address, row.enabled, row.status) for row in deps.store.list_mailboxes()]
        plan = plan_enrolment(
            resources,
            known,
            [address for address, _ in deps.store.rules("allow")],
            [address for address, _ in deps.store.rules("deny")],
            failure,
        )
        if plan.outcome != "applied":
            log.warning("enrolment_skipped", outcome=plan.outcome, reason=plan.reason)
            return ResourceSyncReport(run_id, now, plan)
        for email in plan.duplicates:
            log.warning("planner_resource_duplicated", mailbox=email)
        for email in plan.invalid:
            log.warning("planner_resource_invalid_email", mailbox=email, reason=plan.details.get(email))
        removed, failures, published = [], {}, 0
        for address in plan.remove:
            if beat is not None:
                beat()
            try:
                states = removal_states(address, deps.store.delivered(address), version_of(now), run_id)
                for state in states:
                    deps.publisher.publish(Outgoing(deps.topology.busy_exchange, deps.topology.busy_key(address), state))
                published += len(states)
                deps.store.remove_mailbox(address, status="denied")  # only once every removal is confirmed by the broker
                removed.append(address)
                log.info("mailbox_denied_removed", mailbox=address, busy_times_removed=len(states))
            except Exception as exc:  # noqa: BLE001 - stays enrolled; the next pass tries again
                failures[address] = f"{type(exc).__name__}: {str(exc)[:200]}"
                log.warning("mailbox_removal_failed", mailbox=address, error=type(exc).__name__, detail=str(exc)[:200])
        enrolled = []
        for address in plan.enrol:
            deps.store.add_mailbox(address)
            enrolled.append(address)
            log.info("mailbox_enrolled", mailbox=address, source="planner")
        report = ResourceSyncReport(run_id, now, plan, tuple(enrolled), tuple(removed), published, failures)
        log.info(
            "enrolment_finished",
            resources=plan.resources,
            enrolled=len(enrolled),
            removed=len(removed),
            duplicates=len(plan.duplicates),
            invalid=len(plan.invalid),
            not_allowed=len(plan.not_allowed),
            denied=len(plan.denied),
            removed_by_hand=len(plan.removed_by_hand),
            removal_failures=len(failures),
        )
        return report


def run_resource_sync(settings: Settings) -> ResourceSyncReport:
    """One pass now (``plannersync mailboxes sync``)."""
    with open_deps(settings) as deps:
        return sync_resources(deps)


def next_due(now: datetime, times: Sequence[str], zone: str) -> datetime:
    """The next of the day's ``times`` (HH:MM, wall clock of ``zone``) after ``now``."""
    return min(next_run(now, at, zone) for at in times)


class ResourceSync:
    """``plannersync run resource-sync``: an enrolment pass at each of ``resource_sync.times``; a ``shared.workers.Worker``."""

    def __init__(self, settings: Settings, clock: Callable[[], datetime] | None = None) -> None:
        self.settings = settings
        self.clock = clock or _utc_now
        self.stopping = threading.Event()
        self._state = "waiting"
        self._beat_at = time.time()
        self._next_run_at: datetime | None = None
        self._last: ResourceSyncReport | None = None
        self._last_error: str | None = None
        self._last_error_at: datetime | None = None
        self._runs = 0

    def stop(self) -> None:
        self.stopping.set()

    def health(self) -> Health:
        """Waiting (next run) or syncing, and the last pass: outcome, counts, duplicates; safe from any thread."""
        last = self._last
        facts: dict[str, Any] = {
            "next_run_at": self._next_run_at.isoformat() if self._next_run_at is not None else None,
            "runs": self._runs,
            "last_run_at": last.at.isoformat() if last is not None else None,
        }
        if last is not None:
            facts.update(
                last_outcome=last.plan.outcome,
                last_reason=last.plan.reason,
                last_resources=last.plan.resources,
                last_enrolled=len(last.enrolled),
                last_removed=len(last.removed),
                duplicate_emails=list(last.plan.duplicates),
                invalid_emails=list(last.plan.invalid),
                removal_failures=sorted(last.removal_failures),
            )
        if self._last_error is not None:
            facts.update(last_run_error=self._last_error, last_run_error_at=self._last_error_at.isoformat() if self._last_error_at else None)
        return Health(self._state, self._beat_at, ok=True, facts=facts)

    def run(self) -> None:
        while not self.stopping.is_set():
            due = next_due(self.clock(), self.settings.resource_sync.times, self.settings.busy.time_zone)
            self._next_run_at = due
            self._state = "waiting"
            log.info("enrolment_scheduled", at=due.isoformat())
            if not wait_until(due, self.clock, self.stopping, self._beat, WAIT_SLICE):
                break
            self._state = "syncing"
            self._beat()
            self.run_once()
        log.info("worker_stopped", stage="resource-sync")

    def _beat(self) -> None:
        self._beat_at = time.time()

    def run_once(self) -> None:
        """One pass now, remembered for ``health()``."""
        try:
            with open_deps(self.settings, self.clock) as deps:
                self._last = sync_resources(deps, beat=self._beat)
        except Exception as exc:  # noqa: BLE001 - the store, a client or the broker could not be used; the next pass runs
            self._last_error, self._last_error_at = f"{type(exc).__name__}: {str(exc)[:200]}", self.clock()
            log.exception("enrolment_failed")
        self._runs += 1


def build(settings: Settings) -> ResourceSync:
    """For ``plannersync run resource-sync``."""
    return ResourceSync(settings)
