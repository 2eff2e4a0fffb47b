"""The nightly reconciliation with Planner: read what Planner holds, make it equal the desired state.

Gather (GetEvents for ``reconcile.mailboxes_per_call`` mailboxes at a time over the sync window,
then the mailbox's desired and delivered rows, read *after* Planner so anything the publisher
delivers in between shows up in the store), decide (``reconcile_plan.plan_reconciliation``, pure),
apply (write the delivered-row corrections, then publish the reconcile states to the busy exchange,
confirmed). Planner is changed only by the ordinary publisher, so receipts, retries, dead-lettering
and the handling of Planner-originated events are the same as for live changes.

A GetEvents failure skips that chunk's mailboxes (reported ``failed``); it is never read as
"Planner is empty". One mailbox failing never stops the others. Logs carry ids and counts only.

``run_reconciliation`` runs once (``plannersync reconcile``); ``Reconciler.run`` / ``run_forever``
wait for ``reconcile.time`` on the configured zone's wall clock every day (``plannersync run reconciler``).
"""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timezone
from typing import Callable, Protocol, Sequence

from shared.adapters.store import Store, open_store
from shared.broker.publishing import Outgoing, Publisher
from shared.broker.topology import Topology, from_settings
from shared.config import Settings
from shared.domain.busy_rules import sync_window
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

log = get_logger(__name__)


class PlannerReader(Protocol):
    def get_events(self, emails: list[str], start_from: datetime, start_to: datetime) -> Sequence[HeldEvent]: ...


class StatePublisher(Protocol):
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


def run_reconciliation(
    settings: Settings,
    mailboxes: Sequence[str] | None = None,
    force: bool = False,
    client: PlannerReader | None = None,
    store: Store | None = None,
    publisher: StatePublisher | None = None,
    clock: Callable[[], datetime] | None = None,
) -> list[MailboxReport]:
    """Reconcile the given mailboxes (all enrolled ones when ``None``) with Planner once; one report each.

    ``client``, ``store`` and ``publisher`` are built from ``settings`` when not given (and closed again).
    """
    topology = from_settings(settings.broker, settings.retry)
    own_client = own_publisher = None
    if store is None:
        store = open_store(settings.database_url(), settings.database.auto_upgrade)
    if client is None:
        from shared.adapters.planner_client import PlannerClient

        client = own_client = PlannerClient.from_settings(settings.planner, settings.retry, zone=settings.busy.time_zone)
    if publisher is None:
        publisher = own_publisher = Publisher(settings.broker, topology)
    try:
        return _reconcile(settings, topology, store, client, publisher, mailboxes, force, clock or (lambda: datetime.now(timezone.utc)))
    finally:
        if own_publisher is not None:
            own_publisher.close()
        if own_client is not None:
            own_client.close()


def _reconcile(
    settings: Settings,
    topology: Topology,
    store: Store,
    client: PlannerReader,
    publisher: StatePublisher,
    mailboxes: Sequence[str] | None,
    force: bool,
    clock: Callable[[], datetime],
) -> list[MailboxReport]:
    run_id = f"reconcile-{uuid.uuid4().hex[:16]}"
    now = clock()
    window = sync_window(now, settings.busy.policy())
    targets, reports = _targets(store, mailboxes)
    with correlation(run_id):
        log.info("reconciliation_started", mailboxes=len(targets), force=force, window_start=window.start.isoformat(), window_end=window.end.isoformat())
        for chunk in _chunks(targets, settings.reconcile.mailboxes_per_call):
            try:
                events = client.get_events(chunk, window.start, window.end)
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
                report = _reconcile_mailbox(settings, topology, store, publisher, mailbox, by_mailbox[mailbox], window, version_of(now), force, run_id)
                _log_report(report)
                reports.append(report)
        log.info(
            "reconciliation_finished",
            mailboxes=len(reports),
            failed=sum(1 for r in reports if r.status == "failed"),
            stopped=sum(1 for r in reports if r.status == "stopped"),
        )
    return reports


def _reconcile_mailbox(
    settings: Settings,
    topology: Topology,
    store: Store,
    publisher: StatePublisher,
    mailbox: str,
    events: list[HeldEvent],
    window: Interval,
    now_version: int,
    force: bool,
    run_id: str,
) -> MailboxReport:
    with correlation(run_id, mailbox=mailbox):
        try:
            result: MailboxReconciliation = plan_reconciliation(
                mailbox,
                events,
                store.desired(mailbox),
                store.delivered(mailbox),
                settings.reconcile.max_delete_share,
                force,
                now_version,
                window=window,
                correlation_id=run_id,
            )
            # first: they are true whatever happens to the publishing
            store.record_delivered(mailbox, [fix.change() for fix in result.corrections], run_id)
            for state in result.states:
                publisher.publish(Outgoing(topology.busy_exchange, topology.busy_key(mailbox), state))
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


class Reconciler:
    """``plannersync run reconciler``: reconcile every enrolled mailbox daily at ``reconcile.time``."""

    def __init__(self, settings: Settings, stopping: threading.Event | None = None, clock: Callable[[], datetime] | None = None) -> None:
        self.settings = settings
        self.stopping = stopping or threading.Event()
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self.runs = 0

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        while not self.stopping.is_set():
            now = self.clock()
            due = next_run(now, self.settings.reconcile.time, self.settings.busy.time_zone)
            log.info("reconciliation_scheduled", at=due.isoformat())
            if self.stopping.wait(max(0.0, (due - now).total_seconds())):
                break
            try:
                run_reconciliation(self.settings, clock=self.clock)
            except Exception:  # noqa: BLE001 - a failed night is logged; the next one still runs
                log.exception("reconciliation_failed")
            try:
                store = open_store(self.settings.database_url(), self.settings.database.auto_upgrade)
                log.info("store_pruned", **store.prune(self.clock() - self.settings.database.retention))
            except Exception:  # noqa: BLE001
                log.exception("store_prune_failed")
            self.runs += 1
        log.info("worker_stopped", stage="reconciler")


def run_forever(settings: Settings, stopping: threading.Event | None = None) -> None:
    """Run the daily schedule until ``stopping`` is set."""
    Reconciler(settings, stopping).run()


def build(settings: Settings) -> Reconciler:
    """For ``plannersync run reconciler``: an object with ``run()`` and ``stop()`` like the other workers."""
    return Reconciler(settings)
