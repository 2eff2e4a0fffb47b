"""The nightly snapshot producer: every enrolled mailbox's window, on a schedule and on demand.

``run_snapshots`` reads a bounded number of mailboxes in parallel; a mailbox that fails is
recorded and the others go on. ``SnapshotProducer.run`` waits for the configured local time
(02:00 Europe/Copenhagen by default) each day; ``plannersync resync`` runs it at once.

A mailbox served by EWS is read with CalendarView (``snapshot_mailbox``); one served by Graph with a new delta round
over the whole window (``rebase_mailbox``), whose delta link is then saved, so the change producer's delta window
moves on with the sync window every night (decision 67 in docs/decisions.md). The EWS connection and the Graph reader
are built only when a mailbox needs them.

``SnapshotProducer.health()`` says "waiting" (with the next run) or "snapshotting", and what the last run
did. Its loop beats at least every ``WAIT_SLICE`` seconds, while waiting and while a run is under way.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

from shared.adapters.ews import EwsConnection
from shared.adapters.ews import classify as classify_ews
from shared.adapters.graph import GraphReader, operator_detail
from shared.adapters.graph import classify as classify_graph
from shared.adapters.store import Store, open_store
from shared.broker.publishing import Outgoing, Publisher
from shared.broker.topology import Topology, from_settings
from shared.config import Settings
from shared.domain.busy_rules import sync_window
from shared.domain.contracts import CalendarSnapshot
from shared.domain.mailbox_reads import Backend
from shared.domain.source_faults import SourceFault
from shared.domain.timing import next_run
from shared.logs import correlation, get_logger
from shared.mailbox_passes import Lazy, rebase_mailbox, snapshot_mailbox
from shared.workers import Health, wait_until

log = get_logger(__name__)

WAIT_SLICE = 1.0   # seconds: the longest the worker loop goes without a beat


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class SnapshotResult:
    """One mailbox's snapshot: the items published, or the content-free reason it failed."""

    mailbox: str
    items: int | None
    error: str | None


def ews_connection(settings: Settings) -> EwsConnection:
    return EwsConnection(
        settings.exchange, settings.busy.time_zone, settings.exchange.snapshot_parallelism + 2, settings.busy.policy().planner_organizers
    )


def graph_reader(settings: Settings) -> GraphReader:
    return GraphReader(settings.graph, planner_organizers=settings.busy.policy().planner_organizers)


def _lazy_ews(settings: Settings, exchange: EwsConnection | Lazy[EwsConnection] | None) -> Lazy[EwsConnection]:
    return exchange if isinstance(exchange, Lazy) else Lazy(lambda: ews_connection(settings), exchange)


def _lazy_graph(settings: Settings, graph: GraphReader | Lazy[GraphReader] | None) -> Lazy[GraphReader]:
    return graph if isinstance(graph, Lazy) else Lazy(lambda: graph_reader(settings), graph)


def backends_of(settings: Settings, store: Store, mailboxes: list[str]) -> dict[str, Backend]:
    """Each mailbox's backend: its own, else the configured default (also for a mailbox not enrolled)."""
    own = {row.address: row.backend for row in store.list_mailboxes()}
    return {m: own.get(m.lower()) or settings.exchange.default_backend for m in mailboxes}


def run_snapshots(
    settings: Settings,
    mailboxes: list[str],
    exchange: EwsConnection | Lazy[EwsConnection] | None,
    store: Store,
    topology: Topology,
    clock: Callable[[], datetime] = _now,
    beat: Callable[[], None] | None = None,
    graph: GraphReader | Lazy[GraphReader] | None = None,
    progress: Callable[[SnapshotResult], None] | None = None,
) -> list[SnapshotResult]:
    """Snapshot every mailbox, ``snapshot_parallelism`` at a time; results in the order of ``mailboxes``.

    ``exchange``/``graph``: the readers (None: built from the settings when a mailbox of that backend needs one).
    ``beat`` is called at least every ``WAIT_SLICE`` seconds while the reads are under way. ``progress`` is called
    with each mailbox's result as it finishes (in the calling thread, as they finish), so an operator's
    ``plannersync resync --all`` can say how far it is.
    """
    policy = settings.busy.policy()
    ews_reader, graph_lazy = _lazy_ews(settings, exchange), _lazy_graph(settings, graph)
    backends = backends_of(settings, store, mailboxes)
    local = threading.local()
    publishers: list[Publisher] = []   # one per pool thread, closed when the run ends

    def publish(parts: Sequence[CalendarSnapshot]) -> None:
        """All parts of one mailbox's snapshot, one confirm wait for all (decision 76)."""
        publisher = getattr(local, "publisher", None)
        if publisher is None:
            publisher = local.publisher = Publisher(settings.broker, topology)
            publishers.append(publisher)
        publisher.publish_many([Outgoing(topology.calendar_exchange, topology.snapshot_key(part.mailbox), part) for part in parts])

    def one(mailbox: str) -> SnapshotResult:
        observed_at = clock()
        backend = backends[mailbox]
        window = sync_window(observed_at, policy)
        part_size = settings.exchange.snapshot_part_size
        with correlation(None, mailbox=mailbox):
            try:
                if backend == "graph":
                    try:
                        reader = graph_lazy.get()
                    except ValueError as exc:   # Graph settings missing or unreadable: this mailbox fails, not the run
                        raise _GraphNotConfigured(str(exc)) from None
                    # the whole window in a new delta round; its link is saved, so the delta window moves on too
                    count = rebase_mailbox(mailbox, reader, store, publish, window, observed_at, part_size, uuid.uuid4().hex)
                else:
                    count = snapshot_mailbox(mailbox, ews_reader.get(), publish, window, observed_at, part_size, uuid.uuid4().hex)
                    store.record_full_read(mailbox, observed_at)
            except Exception as exc:  # noqa: BLE001 - one mailbox failing never stops the others
                fault = _classify(backend, exc)
                detail = operator_detail(fault) if backend == "graph" else fault.detail
                log.warning("snapshot_failed", kind=fault.kind, detail=fault.detail, backend=backend)
                try:
                    store.set_mailbox_status(mailbox, "failing" if fault.kind == "mailbox_unavailable" else "snapshot_failed", detail)
                except Exception:  # noqa: BLE001
                    pass
                return SnapshotResult(mailbox, None, detail)
            log.info("snapshot_published", items=count, backend=backend)
            return SnapshotResult(mailbox, count, None)

    try:
        with ThreadPoolExecutor(max_workers=settings.exchange.snapshot_parallelism, thread_name_prefix="snapshot") as pool:
            futures = [pool.submit(one, mailbox) for mailbox in mailboxes]
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=WAIT_SLICE, return_when=FIRST_COMPLETED)
                if progress is not None:
                    for future in done:
                        progress(future.result())
                if beat is not None:
                    beat()
    finally:
        for publisher in publishers:
            try:
                publisher.close()
            except Exception:  # noqa: BLE001 - a broken connection is gone anyway
                pass
    return [future.result() for future in futures]


class _GraphNotConfigured(Exception):
    """A Graph mailbox is to be snapshotted but the Graph reader cannot be built from the settings."""


def _classify(backend: Backend, error: BaseException) -> SourceFault:
    if isinstance(error, _GraphNotConfigured):
        return SourceFault("mailbox_unavailable", f"Graph is not configured ({error}): set PLANNERSYNC_GRAPH__* (runbooks/graph.md)")
    return classify_graph(error) if backend == "graph" else classify_ews(error)


@dataclass(frozen=True)
class _Status:
    """What ``health()`` reports, replaced as a whole so a reader never sees half an update."""

    state: str = "waiting"               # "waiting" or "snapshotting"
    next_run_at: datetime | None = None
    last_run_at: datetime | None = None
    last_run_mailboxes: int = 0
    last_run_failed: int = 0
    runs: int = 0


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


class SnapshotProducer:
    """Snapshots every enrolled mailbox at the configured local time each day; a ``shared.workers.Worker``."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        exchange: EwsConnection | None,
        topology: Topology,
        clock: Callable[[], datetime] = _now,
        graph: GraphReader | None = None,
    ) -> None:
        """``exchange``/``graph``: the readers, or None to build each when a mailbox of its backend first needs it."""
        self.settings, self.store, self.topology, self.clock = settings, store, topology, clock
        self.exchange = _lazy_ews(settings, exchange)
        self.graph = _lazy_graph(settings, graph)
        self.stopping = threading.Event()
        self.beat_at = time.time()       # the worker loop's last pass
        self.status = _Status()

    def stop(self) -> None:
        """Ask ``run`` to return; a run under way finishes its mailboxes first."""
        self.stopping.set()

    def health(self) -> Health:
        """Waiting (with the next run) or snapshotting, and what the last run did; safe from any thread."""
        status = self.status
        facts: dict[str, Any] = {
            "next_run_at": _iso(status.next_run_at),
            "last_run_at": _iso(status.last_run_at),
            "last_run_mailboxes": status.last_run_mailboxes,
            "last_run_failed": status.last_run_failed,
            "runs": status.runs,
        }
        return Health(status.state, self.beat_at, facts=facts)

    def run(self) -> None:
        """Wait for the next scheduled time, snapshot every enrolled mailbox, repeat until ``stop``."""
        while not self.stopping.is_set():
            due = next_run(self.clock(), self.settings.exchange.snapshot_time, self.settings.busy.time_zone)
            self.status = replace(self.status, state="waiting", next_run_at=due)
            log.info("snapshot_scheduled", at=due.isoformat())
            if not wait_until(due, self.clock, self.stopping, self._beat, WAIT_SLICE):
                break
            started = self.clock()
            self.status = replace(self.status, state="snapshotting", next_run_at=None)
            self._beat()
            mailboxes = [row.address for row in self.store.list_mailboxes(enabled_only=True)]
            results = run_snapshots(self.settings, mailboxes, self.exchange, self.store, self.topology, self.clock, self._beat, self.graph)
            failed = sum(1 for r in results if r.error)
            self.status = replace(
                self.status, last_run_at=started, last_run_mailboxes=len(results), last_run_failed=failed, runs=self.status.runs + 1
            )
            log.info("snapshots_done", mailboxes=len(results), failed=failed)
        log.info("worker_stopped", stage="snapshot_producer")

    def _beat(self) -> None:
        self.beat_at = time.time()


def build(settings: Settings) -> SnapshotProducer:
    """Wire the snapshot producer. Nothing connects to Exchange until a run; each reader is built when a mailbox
    first needs it (an EWS-only installation needs no Graph settings)."""
    store = open_store(settings.database_url(), settings.database.auto_upgrade)
    return SnapshotProducer(settings, store, None, from_settings(settings.broker, settings.retry))
