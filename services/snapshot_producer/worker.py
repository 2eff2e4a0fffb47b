"""The nightly snapshot producer: every enrolled mailbox's window, on a schedule and on demand.

``run_snapshots`` reads a bounded number of mailboxes in parallel; a mailbox that fails is
recorded and the others go on. ``SnapshotProducer.run`` waits for the configured local time
(02:00 Europe/Copenhagen by default) each day; ``plannersync resync`` runs it at once.
"""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from shared.adapters.ews import EwsConnection, classify
from shared.adapters.store import Store, open_store
from shared.broker.publishing import Outgoing, Publisher
from shared.broker.topology import Topology, from_settings
from shared.config import Settings
from shared.domain.busy_rules import sync_window
from shared.domain.contracts import CalendarSnapshot
from shared.domain.timing import next_run
from shared.logs import correlation, get_logger
from shared.mailbox_passes import snapshot_mailbox

log = get_logger(__name__)


@dataclass(frozen=True)
class SnapshotResult:
    mailbox: str
    items: int | None
    error: str | None


def run_snapshots(settings: Settings, mailboxes: list[str], exchange: EwsConnection, store: Store, topology: Topology, clock: Callable[[], datetime] | None = None) -> list[SnapshotResult]:
    clock = clock or (lambda: datetime.now(timezone.utc))
    policy = settings.busy.policy()
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
                count = snapshot_mailbox(mailbox, exchange, publish, sync_window(observed_at, policy), observed_at, settings.exchange.snapshot_part_size, uuid.uuid4().hex)
            except Exception as exc:  # noqa: BLE001 - one mailbox failing never stops the others
                fault = classify(exc)
                log.warning("snapshot_failed", kind=fault.kind, detail=fault.detail)
                try:
                    store.set_mailbox_status(mailbox, "failing" if fault.kind == "mailbox_unavailable" else "snapshot_failed", fault.detail)
                except Exception:  # noqa: BLE001
                    pass
                return SnapshotResult(mailbox, None, fault.detail)
            store.record_full_read(mailbox, observed_at)
            log.info("snapshot_published", items=count)
            return SnapshotResult(mailbox, count, None)

    with ThreadPoolExecutor(max_workers=settings.exchange.snapshot_parallelism, thread_name_prefix="snapshot") as pool:
        results = list(pool.map(one, mailboxes))
    return results


class SnapshotProducer:
    def __init__(self, settings: Settings, store: Store, exchange: EwsConnection, topology: Topology) -> None:
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
    exchange = EwsConnection(settings.exchange, settings.busy.time_zone, settings.exchange.snapshot_parallelism + 2)
    return SnapshotProducer(settings, store, exchange, from_settings(settings.broker, settings.retry))
