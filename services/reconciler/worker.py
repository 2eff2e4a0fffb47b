"""The nightly reconciliation with Planner: read what Planner holds, make it equal the desired state.

Gather (GetEvents for ``reconcile.mailboxes_per_call`` mailboxes at a time over the sync window,
then the mailbox's desired and delivered rows, read *after* Planner so anything the publisher
delivers in between shows up in the store), decide (``reconcile_plan.plan_reconciliation``, pure),
apply (write the delivered-row corrections, then publish the reconcile states to the busy exchange,
confirmed). Planner is changed only by the ordinary publisher, so receipts, retries, dead-lettering
and the handling of Planner-originated events are the same as for live changes.

A GetEvents failure skips that chunk's mailboxes (reported ``failed``); it is never read as
"Planner is empty". One mailbox failing never stops the others. Logs carry ids and counts only.

Everything a run needs comes in one ``ReconcilerDeps`` (``open_deps`` builds it from the settings;
tests build it directly). ``run_reconciliation`` runs once (``plannersync reconcile``); ``Reconciler``
(``plannersync run reconciler``) waits for ``reconcile.time`` on the configured zone's wall clock every
day, runs with a freshly opened ``ReconcilerDeps`` and prunes the store, and answers ``health()``.
"""

from __future__ import annotations

import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Protocol, Sequence

from shared.adapters.store import Store, now_utc, open_store
from shared.broker.publishing import Outgoing, Publisher
from shared.broker.topology import Topology, from_settings
from shared.config import Settings
from shared.domain.busy_rules import BusyPolicy, sync_window
from shared.domain.contracts import Interval, version_of
from shared.domain.reconcile_plan import (
    HeldEvent,
    MailboxReconciliation,
    MailboxReport,
    plan_reconciliation,
)
from shared.domain.retry import Permanent, Transient
from shared.domain.timing import next_run
from shared.logs import correlation, get_logger
from shared.workers import Health, wait_until

log = get_logger(__name__)

WAIT_SLICE = 2.0  # seconds: the longest the schedule's wait goes without a beat


class PlannerReader(Protocol):
    """What the reconciliation needs of Planner (``planner_client.PlannerClient`` fits)."""

    def get_events(self, emails: list[str], start_from: datetime, start_to: datetime) -> Sequence[HeldEvent]: ...


class StatePublisher(Protocol):
    """A confirming publisher (``publishing.Publisher`` fits)."""

    def publish(self, outgoing: Outgoing) -> None: ...


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _targets(store: Store, mailboxes: Sequence[str] | None) -> tuple[list[str], list[MailboxReport]]:
    enrolled = [row.address for row in store.list_mailboxes(enabled_only=True)]
    if mailboxes is None:
        return enrolled, []
    wanted = list(dict.fromkeys(m.strip().lower() for m in mailboxes))
    known = set(enrolled)
    skipped = [MailboxReport(m, status="skipped", reason="not an enrolled mailbox") for m in wanted if m not in known]
    return [m for m in wanted if m in known], skipped


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class ReconcilerDeps:
    """What a reconciliation run needs: the settings-derived values, the store, Planner, the publisher, the clock."""

    store: Store
    planner: PlannerReader
    publisher: StatePublisher
    topology: Topology
    policy: BusyPolicy
    max_delete_share: float
    mailboxes_per_call: int
    clock: Callable[[], datetime] = _utc_now

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        store: Store,
        planner: PlannerReader,
        publisher: StatePublisher,
        clock: Callable[[], datetime] | None = None,
    ) -> ReconcilerDeps:
        """The values from ``settings``, the adapters as given."""
        return cls(
            store=store,
            planner=planner,
            publisher=publisher,
            topology=from_settings(settings.broker, settings.retry),
            policy=settings.busy.policy(),
            max_delete_share=settings.reconcile.max_delete_share,
            mailboxes_per_call=settings.reconcile.mailboxes_per_call,
            clock=clock or _utc_now,
        )


@contextmanager
def open_deps(settings: Settings, clock: Callable[[], datetime] | None = None) -> Iterator[ReconcilerDeps]:
    """Store, Planner client and confirming publisher built from ``settings`` for one run; closed again afterwards."""
    from shared.adapters.planner_client import PlannerClient

    with ExitStack() as stack:
        store = open_store(settings.database_url(), settings.database.auto_upgrade)
        stack.callback(store.engine.dispose)
        planner = PlannerClient.from_settings(settings.planner, settings.retry, zone=settings.busy.time_zone)
        stack.callback(planner.close)
        publisher = Publisher(settings.broker, from_settings(settings.broker, settings.retry))
        stack.callback(publisher.close)
        yield ReconcilerDeps.from_settings(settings, store=store, planner=planner, publisher=publisher, clock=clock)


def run_reconciliation(settings: Settings, mailboxes: Sequence[str] | None = None, force: bool = False) -> list[MailboxReport]:
    """Reconcile the given mailboxes (all enrolled ones when ``None``) with Planner once; one report each (``plannersync reconcile``)."""
    with open_deps(settings) as deps:
        return reconcile(deps, mailboxes, force)


@dataclass(frozen=True)
class _Run:
    run_id: str
    window: Interval
    now_version: int
    force: bool


def reconcile(
    deps: ReconcilerDeps,
    mailboxes: Sequence[str] | None = None,
    force: bool = False,
    beat: Callable[[], None] | None = None,
) -> list[MailboxReport]:
    """One reconciliation run over ``deps``: gather per chunk of mailboxes, decide per mailbox, apply. ``beat`` is called per chunk."""
    now = deps.clock()
    run = _Run(f"reconcile-{uuid.uuid4().hex[:16]}", sync_window(now, deps.policy), version_of(now), force)
    targets, reports = _targets(deps.store, mailboxes)
    with correlation(run.run_id):
        log.info("reconciliation_started", mailboxes=len(targets), force=force, window_start=run.window.start.isoformat(), window_end=run.window.end.isoformat())
        for chunk in _chunks(targets, deps.mailboxes_per_call):
            if beat is not None:
                beat()
            asked_at = now_utc()   # the store's own clock: rows written after this are newer than Planner's answer
            try:
                events = deps.planner.get_events(chunk, run.window.start, run.window.end)
            except Exception as exc:  # noqa: BLE001 - never "Planner is empty": these mailboxes are not reconciled this time
                reason = exc.reason if isinstance(exc, (Transient, Permanent)) else f"{type(exc).__name__}: {str(exc)[:200]}"
                log.warning("reconciliation_get_events_failed", mailboxes=len(chunk), reason=reason, code=getattr(exc, "code", None))
                for mailbox in chunk:
                    report = MailboxReport(mailbox, status="failed", reason=f"GetEvents failed: {reason}"[:500])
                    _log_report(report)
                    reports.append(report)
                continue
            by_mailbox: dict[str, list[HeldEvent]] = {mailbox: [] for mailbox in chunk}
            for event in events:
                by_mailbox.setdefault(event.email.lower(), []).append(event)
            for mailbox in chunk:
                report = _reconcile_mailbox(deps, run, mailbox, by_mailbox[mailbox], asked_at)
                _log_report(report)
                reports.append(report)
        log.info(
            "reconciliation_finished",
            mailboxes=len(reports),
            failed=sum(1 for r in reports if r.status == "failed"),
            stopped=sum(1 for r in reports if r.status == "stopped"),
        )
    return reports


def _reconcile_mailbox(deps: ReconcilerDeps, run: _Run, mailbox: str, events: list[HeldEvent], asked_at: datetime) -> MailboxReport:
    with correlation(run.run_id, mailbox=mailbox):
        try:
            result: MailboxReconciliation = plan_reconciliation(
                mailbox,
                events,
                deps.store.desired(mailbox),
                deps.store.delivered(mailbox),
                deps.max_delete_share,
                run.force,
                run.now_version,
                window=run.window,
                correlation_id=run.run_id,
            )
            # first: they are true whatever happens to the publishing, of every row the publisher has not written since
            # GetEvents was asked (decision 104: a receipt written meanwhile is newer than Planner's answer)
            deps.store.record_delivered(mailbox, [fix.change() for fix in result.corrections], run.run_id, unchanged_since=asked_at)
            for state in result.states:
                deps.publisher.publish(Outgoing(deps.topology.busy_exchange, deps.topology.busy_key(mailbox), state))
        except Exception as exc:  # noqa: BLE001 - one mailbox failing (store, broker) never stops the others
            log.warning("reconciliation_mailbox_failed", error=type(exc).__name__, detail=str(exc)[:200])
            return MailboxReport(mailbox, status="failed", reason=f"{type(exc).__name__}: {str(exc)[:200]}")
        return result.report


def _log_report(report: MailboxReport) -> None:
    """One structured line per mailbox: status and counts, never appointment content."""
    log.info("reconciliation_mailbox", **report.as_dict())


COLUMNS = ("in_planner", "desired", "up_to_date", "created", "updated", "deleted", "adopted", "planner_originated_skipped", "in_flight", "corrected")
HEADINGS = ("held", "desired", "ok", "create", "update", "delete", "adopt", "planner", "inflight", "fixed")


def render_table(reports: Sequence[MailboxReport]) -> str:
    """The reports as a plain-text table for ``plannersync reconcile`` (one line per mailbox, reason last)."""
    width = max([len("mailbox"), *(len(r.mailbox) for r in reports)])
    lines = [f"{'mailbox':<{width}}  {'status':<10}  " + "  ".join(f"{h:>8}" for h in HEADINGS) + "  reason"]
    for r in reports:
        counts = "  ".join(f"{getattr(r, c):>8}" for c in COLUMNS)
        lines.append(f"{r.mailbox:<{width}}  {r.status:<10}  {counts}  {r.reason or ''}".rstrip())
    return "\n".join(lines)


@dataclass(frozen=True)
class _LastRun:
    at: datetime
    mailboxes: int
    failed: int
    stopped: int
    error: str | None = None


class Reconciler:
    """``plannersync run reconciler``: reconcile every enrolled mailbox daily at ``reconcile.time``; a ``shared.workers.Worker``."""

    def __init__(self, settings: Settings, clock: Callable[[], datetime] | None = None) -> None:
        self.settings = settings
        self.clock = clock or _utc_now
        self.stopping = threading.Event()
        self._state = "waiting"
        self._beat_at = time.time()
        self._next_run_at: datetime | None = None
        self._last_run: _LastRun | None = None
        self._runs = 0

    def stop(self) -> None:
        """Ask ``run`` to return; it does within a wait slice (or after the current run)."""
        self.stopping.set()

    def health(self) -> Health:
        """Waiting (with the next run's time) or reconciling, and the last run's counts; safe from any thread."""
        last = self._last_run
        facts: dict[str, Any] = {
            "next_run_at": self._next_run_at.isoformat() if self._next_run_at is not None else None,
            "last_run_at": last.at.isoformat() if last is not None else None,
            "last_run_mailboxes": last.mailboxes if last is not None else None,
            "last_run_failed": last.failed if last is not None else None,
            "last_run_stopped": last.stopped if last is not None else None,
            "runs": self._runs,
        }
        if last is not None and last.error is not None:
            facts["last_run_error"] = last.error
        return Health(self._state, self._beat_at, ok=True, facts=facts)

    def run(self) -> None:
        """Wait for each day's ``reconcile.time`` (wall clock of ``busy.time_zone``) and run; until ``stop``."""
        while not self.stopping.is_set():
            due = next_run(self.clock(), self.settings.reconcile.time, self.settings.busy.time_zone)
            self._next_run_at = due
            self._state = "waiting"
            log.info("reconciliation_scheduled", at=due.isoformat())
            if not wait_until(due, self.clock, self.stopping, self._beat, WAIT_SLICE):
                break
            self._state = "reconciling"
            self._beat()
            self._last_run = self._run_once()
            self._runs += 1
        log.info("worker_stopped", stage="reconciler")

    def _beat(self) -> None:
        self._beat_at = time.time()

    def _run_once(self) -> _LastRun:
        started = self.clock()
        reports: list[MailboxReport] = []
        error: str | None = None
        try:
            with open_deps(self.settings, self.clock) as deps:
                try:
                    reports = reconcile(deps, beat=self._beat)
                except Exception as exc:  # noqa: BLE001 - a failed night is logged; the next one still runs
                    error = type(exc).__name__
                    log.exception("reconciliation_failed")
                try:
                    log.info("store_pruned", **deps.store.prune(self.clock() - self.settings.database.retention))
                except Exception:  # noqa: BLE001
                    log.exception("store_prune_failed")
        except Exception as exc:  # noqa: BLE001 - the store or a client could not be opened
            error = error or type(exc).__name__
            log.exception("reconciliation_failed")
        return _LastRun(
            at=started,
            mailboxes=len(reports),
            failed=sum(1 for r in reports if r.status == "failed"),
            stopped=sum(1 for r in reports if r.status == "stopped"),
            error=error,
        )


def build(settings: Settings) -> Reconciler:
    """For ``plannersync run reconciler``: a worker with ``run()``, ``stop()`` and ``health()`` like the others."""
    return Reconciler(settings)
