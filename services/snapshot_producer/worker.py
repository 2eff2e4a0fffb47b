"""The nightly snapshot producer: every enrolled mailbox's window, on a schedule and on demand.

``run_snapshots`` reads a bounded number of mailboxes in parallel; a mailbox that fails is
recorded and the others go on. ``SnapshotProducer.run`` waits for the configured local time
(02:00 Europe/Copenhagen by default) each day; ``plannersync resync`` runs it at once.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, time, timedelta, timezone
from typing import Callable
from zoneinfo import ZoneInfo

from shared.busy_rules import BusyPolicy, sync_window
from shared.config import Settings
from shared.consumer import Outgoing, Publisher
from shared.contracts import CalendarSnapshot
from shared.ews import Exchange, classify
from shared.logs import correlation, get_logger
from shared.store import Store, open_store
from shared.topology import Topology, from_settings

from services.snapshot_producer.snapshot import snapshot_mailbox

log = get_logger(__name__)


def next_run(now: datetime, at: str, zone: str) -> datetime:
    """The next moment the local wall clock shows ``at`` (HH:MM), as aware UTC; DST-safe."""
    tz = ZoneInfo(zone)
    hour, minute = (int(part) for part in at.split(":"))
    local = now.astimezone(tz)
    for days in range(0, 3):
        day = (local + timedelta(days=days)).date()
        candidate = datetime.combine(day, time(hour, minute), tzinfo=tz)
        # a wall time skipped by the spring change does not exist: zoneinfo gives the hour after, which is fine
        if candidate.astimezone(timezone.utc) > now.astimezone(timezone.utc):
            return candidate.astimezone(timezone.utc)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class SnapshotResult:
    mailbox: str
    items: int | None
    error: str | None


def run_snapshots(settings: Settings, mailboxes: list[str], exchange: Exchange, store: Store, topology: Topology, clock: Callable[[], datetime] | None = None) -> list[SnapshotResult]:
    clock = clock or (lambda: datetime.now(timezone.utc))
    policy = BusyPolicy.from_settings(settings.busy)
    local = threading.local()

    def publish(part: CalendarSnapshot) -> None:
        publisher = getattr(local, "publisher", None)
        if publisher is None:
            publisher = local.publisher = Publisher(settings.broker, topology)
        publisher.publish(Outgoing(topology.calendar_exchange, topology.snapshot_key(part.mailbox), part))

    def one(mailbox: str) -> SnapshotResult:
        observed_at = clock()
        with correlation(None, mailbox=mailbox):
            try:
                count = snapshot_mailbox(mailbox, exchange, publish, sync_window(observed_at, policy), observed_at, settings.exchange.snapshot_part_size)
            except Exception as exc:  # noqa: BLE001 - one mailbox failing never stops the others
                fault = classify(exc)
                log.warning("snapshot_failed", kind=fault.kind, detail=fault.detail)
                try:
                    store.set_mailbox_status(mailbox, "failing" if fault.kind == "mailbox_unavailable" else "snapshot_failed", fault.detail)
                except Exception:  # noqa: BLE001
                    pass
                return SnapshotResult(mailbox, None, fault.detail)
            store.save_sync_state(mailbox, last_full_sync_at=observed_at)
            log.info("snapshot_published", items=count)
            return SnapshotResult(mailbox, count, None)

    with ThreadPoolExecutor(max_workers=settings.exchange.snapshot_parallelism, thread_name_prefix="snapshot") as pool:
        results = list(pool.map(one, mailboxes))
    return results


class SnapshotProducer:
    def __init__(self, settings: Settings, store: Store, exchange: Exchange, topology: Topology) -> None:
        self.settings, self.store, self.exchange, self.topology = settings, store, exchange, topology
        self.stopping = threading.Event()

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        while not self.stopping.is_set():
            now = datetime.now(timezone.utc)
            due = next_run(now, self.settings.exchange.snapshot_time, self.settings.busy.time_zone)
            log.info("snapshot_scheduled", at=due.isoformat())
            if self.stopping.wait((due - now).total_seconds()):
                break
            mailboxes = [row.address for row in self.store.list_mailboxes(enabled_only=True)]
            results = run_snapshots(self.settings, mailboxes, self.exchange, self.store, self.topology)
            log.info("snapshots_done", mailboxes=len(results), failed=sum(1 for r in results if r.error))
        log.info("worker_stopped", stage="snapshot_producer")


def build(settings: Settings) -> SnapshotProducer:
    store = open_store(settings.database_url(), settings.database.auto_upgrade)
    exchange = Exchange(settings.exchange, settings.busy.time_zone, settings.exchange.snapshot_parallelism + 2)
    return SnapshotProducer(settings, store, exchange, from_settings(settings.broker, settings.retry))
