"""The change-event producer: Exchange notifications are hints; SyncFolderItems (EWS) or the calendarView delta
(Graph) reads what changed.

Each mailbox is served by one backend (decision 49 in docs/decisions.md): its own ``mailboxes.backend``, else
``exchange.default_backend``, re-read with every enrolment reload. EWS mailboxes stream (or pull) as before; Graph
mailboxes are unsubscribed and read by delta polling every ``graph.delta_interval``. A mailbox whose stored
position another backend wrote (it moved) is read in full by its new reader and gets a snapshot; a Graph 410 does
the same as EWS's invalid sync state (decision 66 in docs/decisions.md). The EWS connection and the Graph reader are built only when a
mailbox needs them.

Threads:
- the scheduler (``run``): follows enrolments in the store, starts reads of due mailboxes on a pool;
- one notification thread per streaming group (≤ ``mailboxes_per_connection`` mailboxes each, at most
  ``streaming_connections`` groups), or one pull thread in pull mode. A notification marks its mailbox
  dirty; every (re)connect marks the whole group dirty, so changes made while a stream was down, the
  producer was stopped or a subscription had expired are found by the next read, not at night.

Failures are per mailbox (``schedule.failed``): throttling waits as long as Exchange asks, an
unavailable mailbox (impersonation denied, not found, being moved) is retried slowly with its status
recorded, an invalid sync state makes a full re-read plus a snapshot (so deletions are found too).

Replicas (decision 91 in docs/decisions.md): any number of change producers may run; each reads only the mailboxes it
holds a lease on in the store (``leases.MailboxLeases``), takes its fair share, gives back what is above it when another
replica comes, and takes over the mailboxes of one that stops renewing. The scheduler runs a lease pass every third of
``exchange.lease_ttl``; every read is fenced (the store must still say the mailbox is this replica's), and only held
mailboxes are scheduled, subscribed and read. With one replica it holds every mailbox.

``health()`` reports the scheduler's last pass (``beat_at``) and counts: mailboxes followed, subscribed,
failing, reads done. A read still running after ``exchange.read_stuck_after`` is wedged (no Exchange call lasts
that long): health turns red at once and ``run`` raises ``WorkerWedged``, so the process exits and its supervisor
restarts it, instead of beating on while no mailbox is read (decision 70 in docs/decisions.md).
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Callable, NamedTuple, Sequence

from shared.adapters.deadline import in_flight as calls_in_flight
from shared.adapters.ews import EwsConnection
from shared.adapters.ews import classify as classify_ews
from shared.adapters.graph import DeltaRound, GraphReader, GraphSyncReader, operator_detail
from shared.adapters.graph import classify as classify_graph
from shared.adapters.store import Store, open_store
from shared.broker.publishing import Outgoing, Publisher, PublishRefused
from shared.broker.topology import Topology, from_settings
from shared.config import Settings
from shared.domain.busy_rules import sync_window
from shared.domain.contracts import CalendarChange, CalendarSnapshot
from shared.domain.mailbox_reads import Backend, SyncPosition
from shared.domain.read_schedule import ReadTask, Schedule, Timing
from shared.domain.source_faults import SourceFault
from shared.domain.timing import exponential_backoff
from shared.logs import correlation, get_logger
from shared.mailbox_passes import Lazy, Unread, publish_sync, rebase_mailbox, resync_mailbox, sync_mailbox
from shared.workers import Health, WorkerWedged

from .leases import LeasedPositions, LeaseLost, MailboxLeases

log = get_logger(__name__)

STREAM_RETRY_BASE = timedelta(seconds=1)   # a broken stream group reconnects after 1 s, 2 s, 4 s, ...
STREAM_RETRY_MAX = timedelta(seconds=30)
FAILING_STATUSES = ("failing", "throttled", "retrying")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _new_id() -> str:
    return uuid.uuid4().hex


def classify(error: BaseException) -> SourceFault:
    """An EWS failure as a fault (the notification threads are EWS only)."""
    return classify_ews(error)


def ews_connection(settings: Settings) -> EwsConnection:
    ex = settings.exchange
    return EwsConnection(ex, settings.busy.time_zone, ex.streaming_connections + ex.sync_workers + 2, settings.busy.policy().planner_organizers)


def graph_reader(settings: Settings) -> GraphReader:
    return GraphReader(settings.graph, planner_organizers=settings.busy.policy().planner_organizers)


class Membership(NamedTuple):
    """The mailboxes this replica follows, by backend."""

    ews: list[str]   # sorted: the streams' and pull subscriptions' groups are slices of it
    graph: frozenset[str]


class GraphNotConfigured(Exception):
    """A Graph mailbox is enrolled but the Graph reader cannot be built from the settings."""


class ChangeProducer:
    """Follows the enrolled mailboxes' notifications and reads what changed; a ``shared.workers.Worker``."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        exchange: EwsConnection | None,
        topology: Topology,
        clock: Callable[[], datetime] = _now,
        graph: GraphReader | None = None,
    ) -> None:
        """``exchange``/``graph``: the readers, or None to build each from the settings when a mailbox first needs it."""
        self.settings = settings
        self.store = store
        self.ews = Lazy(lambda: ews_connection(settings), exchange)
        self.graph = Lazy(lambda: graph_reader(settings), graph)
        self.backends: dict[str, Backend] = {}   # mailbox -> the backend serving it now (under ``lock``)
        self.membership: Membership | None = None   # the followed mailboxes by backend, until membership changes (under ``lock``)
        self.topology = topology
        self.clock = clock
        self.policy = settings.busy.policy()
        ex = settings.exchange
        self.schedule = Schedule(Timing(ex.safety_sync_interval, ex.unsubscribed_poll_interval, ex.failure_backoff_max, ex.transient_retry, ex.unavailable_retry))
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=ex.sync_workers, thread_name_prefix="ews-sync")
        self.local = threading.local()
        self.reads = 0                   # successful mailbox reads since start (under ``lock``)
        self.in_flight: dict[str, float] = {}   # mailbox -> time.monotonic() its read started (under ``lock``)
        self.tasks = self.urgent_tasks = 0     # read tasks given to the pool and not ended, and of them urgent (under ``lock``)
        # urgent reads leave a quarter of the workers (at least one) to the catch-up while it waits (decision 107)
        self.urgent_cap = max(1, ex.sync_workers - max(1, ex.sync_workers // 4))
        self.beat_at = time.time()       # the scheduler loop's last pass
        self.leases = MailboxLeases(store, ex.replica(), ex.lease(), clock)
        self.positions = LeasedPositions(store, self.leases)   # a read's state saved only under its lease (decision 102)

    @property
    def exchange(self) -> EwsConnection:
        """The EWS connection, built on first use (only EWS mailboxes use it)."""
        return self.ews.get()

    # --- control ---------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask ``run`` to return; reads under way finish first."""
        self.stopping.set()
        self.wake.set()

    def health(self) -> Health:
        """Running, with the mailboxes followed, subscribed and failing, the reads done and waiting; safe from any thread."""
        with self.lock:
            states = list(self.schedule.mailboxes.values())
            reads = self.reads
            waiting, waiting_changed = self.schedule.waiting()
            backends = list(self.backends.values())
        stuck = self._stuck_reads()
        facts = {
            "replica": self.leases.me,
            "replicas": self.leases.live,   # live change-producer replicas at the last lease pass
            "enrolled": len(backends),
            "mailboxes": len(states),       # the ones this replica holds and reads
            "subscribed": sum(1 for state in states if state.subscribed),
            "failing": sum(1 for state in states if state.status in FAILING_STATUSES),
            "reads": reads,
            # due for a read and not yet given a worker; "changed": of them, the ones a notification named (decision
            # 107). A number that stays up means the reads fall behind: more sync_workers, or another replica
            "waiting": waiting,
            "waiting_changed": waiting_changed,
            "graph": sum(1 for backend in backends if backend == "graph"),
        }
        if stuck:
            return Health("read_stuck", self.beat_at, ok=False, facts={**facts, "stuck_reads": len(stuck), "oldest_read_s": round(max(stuck.values()))})
        overdue = [call for call in calls_in_flight() if call.overdue]   # past its deadline and not cut: a bug (decision 86)
        if overdue:
            return Health("exchange_call_overdue", self.beat_at, ok=False, facts={**facts, "exchange_call_overdue_s": round(overdue[0].running_s, 1)})
        return Health("running", self.beat_at, facts=facts)

    def _stuck_reads(self) -> dict[str, float]:
        """Reads running longer than ``read_stuck_after``: mailbox -> seconds so far."""
        limit = self.settings.exchange.read_stuck_after.total_seconds()
        now = time.monotonic()
        with self.lock:
            return {address: now - started for address, started in self.in_flight.items() if now - started > limit}

    def run(self) -> None:
        """Start the notification threads and schedule mailbox reads until ``stop``."""
        ex = self.settings.exchange
        notifier: list[threading.Thread]
        if ex.subscription == "streaming":
            notifier = [threading.Thread(target=self._stream_group, args=(i,), name=f"ews-stream-{i}", daemon=True) for i in range(ex.streaming_connections)]
        else:
            notifier = [threading.Thread(target=self._pull_loop, name="ews-pull", daemon=True)]
        next_reload = next_lease = 0.0
        log.info("change_producer_started", subscription=ex.subscription, workers=ex.sync_workers, default_backend=ex.default_backend,
                 replica=self.leases.me, lease_ttl_s=ex.lease().total_seconds())
        for thread in notifier:
            thread.start()
        while not self.stopping.is_set():
            self.beat_at = time.time()
            if time.monotonic() >= next_reload:
                if self._reload_mailboxes():
                    next_lease = 0.0   # an enrolment or removal: the leases follow at once
                next_reload = time.monotonic() + ex.mailbox_reload_interval.total_seconds()
            if time.monotonic() >= next_lease:
                self._lease_pass()
                next_lease = time.monotonic() + ex.lease().total_seconds() / 3
            now = self.clock()
            with self.lock:
                # only as many tasks as there are free workers: what waits stays in the schedule, where a mailbox a
                # notification names goes before the catch-up reads (decision 107 in docs/decisions.md)
                tasks = self.schedule.take(now, ex.sync_workers - self.tasks, self.urgent_tasks, self.urgent_cap, self._batchable(),
                                           self.settings.graph.batch_size)
                self.tasks += len(tasks)
                self.urgent_tasks += sum(1 for task in tasks if task.urgent)
            for task in tasks:
                self.pool.submit(self._timed_read, task)
            stuck = self._stuck_reads()
            if stuck:
                for address, seconds in sorted(stuck.items()):
                    log.error("mailbox_read_stuck", mailbox=address, running_s=round(seconds), limit_s=self.settings.exchange.read_stuck_after.total_seconds())
                self.pool.shutdown(wait=False, cancel_futures=True)
                self._leave()
                raise WorkerWedged(f"{len(stuck)} mailbox read(s) stuck for more than {self.settings.exchange.read_stuck_after}; exiting to be restarted")
            self.wake.wait(0.5)
            self.wake.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self._leave()
        log.info("worker_stopped", stage="change_producer")

    # --- membership ----------------------------------------------------------------------------------
    def _reload_mailboxes(self) -> bool:
        """Follow enrolments and removals in the store; True when the enrolled set changed."""
        default = self.settings.exchange.default_backend
        try:
            enrolled: dict[str, Backend] = {row.address: row.backend or default for row in self.store.list_mailboxes(enabled_only=True)}
        except Exception as exc:  # noqa: BLE001 - the store being down must not stop notifications
            log.warning("mailbox_reload_failed", error=type(exc).__name__)
            return False
        with self.lock:
            was = dict(self.backends)
            added, removed = set(enrolled) - set(was), set(was) - set(enrolled)
            moved = {a: (was[a], b) for a, b in enrolled.items() if a in was and was[a] != b}
            self.backends = dict(enrolled)
            self.membership = None
            for address in moved:
                self.schedule.set_subscribed(address, False)  # an EWS subscription ends with the move; Graph has none
                self.schedule.mark_dirty(address)             # the new reader reads it in full at once
        for address in sorted(added):
            log.info("mailbox_enrolled", mailbox=address, backend=enrolled[address])
        for address in sorted(removed):
            log.info("mailbox_removed", mailbox=address)
            if was.get(address) == "ews" and self.ews.built is not None:
                self.ews.built.forget(address)
        for address, (old, new) in sorted(moved.items()):
            log.info("mailbox_backend_changed", mailbox=address, backend=new, previous=old)
            if old == "ews" and self.ews.built is not None:
                self.ews.built.forget(address)
        if moved:
            self.wake.set()
        ex = self.settings.exchange
        capacity = ex.streaming_connections * ex.mailboxes_per_connection
        streamed = sum(1 for b in enrolled.values() if b == "ews")
        if ex.subscription == "streaming" and (added or removed or moved) and streamed > capacity:
            log.warning("streaming_capacity_exceeded", enrolled=streamed, capacity=capacity, polled_every_s=ex.unsubscribed_poll_interval.total_seconds())
        self._follow()
        return bool(added or removed)

    def _lease_pass(self) -> None:
        """Renew, give back and take leases (decision 91 in docs/decisions.md), then schedule what is held."""
        with self.lock:
            enrolled = set(self.backends)
            reading = {address for address, state in self.schedule.mailboxes.items() if state.running}
        try:
            self.leases.take_part(enrolled, reading)
        except Exception as exc:  # noqa: BLE001 - the store down: reads are fenced by it too, so none goes on unfenced
            log.warning("lease_pass_failed", error=type(exc).__name__)
            return
        self._follow()

    def _follow(self) -> None:
        """Schedule (and subscribe) exactly the enrolled mailboxes this replica holds."""
        held = self.leases.holding()
        with self.lock:
            joined, left = self.schedule.set_members(set(self.backends) & held)
            if joined or left:
                self.membership = None
        if self.ews.built is not None:
            for address in left:
                self.ews.built.forget(address)
        if joined or left:
            self.wake.set()

    def _leave(self) -> None:
        with self.lock:
            reading = set(self.in_flight)
        try:
            self.leases.leave(reading)
        except Exception as exc:  # noqa: BLE001 - they expire on their own
            log.warning("leases_not_released", error=type(exc).__name__)

    def backend_of(self, address: str) -> Backend:
        with self.lock:
            return self.backends.get(address, self.settings.exchange.default_backend)

    def _membership(self) -> Membership:
        """The followed mailboxes by backend, worked out again only after the enrolments or the leases changed (a stream
        checks its group after every notification, the scheduler its Graph mailboxes at every hand-out). Under ``lock``."""
        if self.membership is None:
            default = self.settings.exchange.default_backend
            ews: list[str] = []
            graph: set[str] = set()
            for address in sorted(self.schedule.mailboxes):
                if self.backends.get(address, default) == "ews":
                    ews.append(address)
                else:
                    graph.add(address)
            self.membership = Membership(ews, frozenset(graph))
        return self.membership

    def _members(self) -> list[str]:
        """The EWS mailboxes (the ones streaming or pull subscriptions follow), sorted."""
        with self.lock:
            return self._membership().ews

    def _group(self, index: int) -> list[str]:
        size = self.settings.exchange.mailboxes_per_connection
        return self._members()[index * size : (index + 1) * size]

    # --- reading one mailbox --------------------------------------------------------------------------
    def _publisher(self) -> Publisher:
        publisher = getattr(self.local, "publisher", None)
        if publisher is None:
            publisher = Publisher(self.settings.broker, self.topology)
            self.local.publisher = publisher
        return publisher

    def _publish(self, messages: Sequence[CalendarChange | CalendarSnapshot]) -> None:
        """All of one read's messages, in order, one confirm wait for all (decision 76)."""
        outgoing = [
            Outgoing(self.topology.calendar_exchange,
                     self.topology.change_key(m.mailbox) if isinstance(m, CalendarChange) else self.topology.snapshot_key(m.mailbox), m)
            for m in messages
        ]
        try:
            self._publisher().publish_many(outgoing)
        except PublishRefused:
            raise  # backpressure: the connection is fine; the mailbox's read is retried (decision 56)
        except Exception:
            self._publisher().close()
            raise
        for message in messages:
            if isinstance(message, CalendarChange):  # the start of the correlation trail: Exchange item id -> Planner receipt
                with correlation(message.correlation_id):
                    log.info("calendar_change_published", change=message.change, item_id=message.item_id[-40:], occurrences=len(message.occurrences or []))

    def _batchable(self) -> frozenset[str]:
        """The Graph mailboxes: they are read up to ``graph.batch_size`` together, their delta pages through one ``$batch``
        per page, except one whose last read failed: it is read alone until it succeeds, so a slow or failing mailbox
        holds up no other (decision 72 in docs/decisions.md; ``Schedule.take`` leaves it alone). Called under ``lock``."""
        return self._membership().graph

    def _timed_read(self, task: ReadTask) -> None:
        """One read task: the reads, then its worker is free and the scheduler is woken to give it the next."""
        try:
            self._fenced_read(list(task.mailboxes))
        finally:
            with self.lock:
                self.tasks -= 1
                self.urgent_tasks -= task.urgent
            self.wake.set()

    def _fenced_read(self, addresses: list[str]) -> None:
        """One scheduled read task, fenced by the leases and timed for the wedge check (``_stuck_reads``)."""
        try:
            held = self.leases.fence(addresses)   # with each mailbox's sync position (decision 109)
        except Exception as exc:  # noqa: BLE001 - the store down: the read fails like any read that cannot reach it
            for address in addresses:
                with correlation(None, mailbox=address):
                    self._failed(address, self.backend_of(address), SourceFault("transient", f"lease not checked: {type(exc).__name__}"), full=False)
            return
        if len(held) < len(addresses):
            self._follow()   # lost to another replica: no longer scheduled here
            addresses = [address for address in addresses if address in held]
            if not addresses:
                return
        started = time.monotonic()
        with self.lock:
            self.in_flight.update({address: started for address in addresses})
        try:
            if len(addresses) == 1:
                self._read(addresses[0], stored=held[addresses[0]])
            else:
                self._read_graph_batch(addresses, held)
        finally:
            with self.lock:
                for address in addresses:
                    self.in_flight.pop(address, None)

    def _read_graph_batch(self, addresses: list[str], positions: dict[str, SyncPosition | None]) -> None:
        """Several Graph mailboxes' delta rounds read together (``GraphReader.sync_many``), then each published and
        recorded alone: a fault stays with its mailbox. A mailbox that moved from EWS, or whose delta link Graph
        refuses (410), gets the single full read that finds deletions too. ``positions``: as the fence read them."""
        observed_at = self.clock()
        window = sync_window(observed_at, self.policy)
        try:
            reader = self._graph_reader()
        except Exception as exc:  # noqa: BLE001 - no reader: every mailbox of the group has this fault
            for address in addresses:
                with correlation(None, mailbox=address):
                    self._failed(address, "graph", self._classify("graph", exc), full=False)
            return
        # a mailbox that moved from EWS, or whose earlier first read may have published and then failed, is read alone
        # in full (decisions 66 and 85 in docs/decisions.md); a first read is marked before it can publish anything
        moved = [a for a, p in positions.items() if p is not None and p.backend != "graph"]
        moved += [a for a, p in positions.items() if p is None and not self.store.mark_first_read(a, "graph", observed_at)]
        rounds = [DeltaRound(a, p.sync_state if p is not None else None, window) for a, p in positions.items() if a not in moved]
        for address in moved:
            self._read(address, stored=positions[address])
        results = reader.sync_many(rounds) if rounds else {}
        for round_ in rounds:
            address = round_.mailbox
            result = results.get(address) or SourceFault("transient", "no answer for this mailbox in the $batch")
            with correlation(None, mailbox=address):
                if isinstance(result, SourceFault):
                    self._failed(address, "graph", result, full=False)
                    continue
                try:
                    done = publish_sync(address, result.changes, result.delta_link, round_.delta_link is None, GraphSyncReader(reader, window),
                                        self.positions, self._publish, window, observed_at, _new_id, backend="graph")
                except LeaseLost:
                    self._lease_lost(address)
                    continue
                except Exception as exc:  # noqa: BLE001 - a publish or store failure is this mailbox's alone
                    self._failed(address, "graph", self._classify("graph", exc), full=False)
                    continue
                self._succeeded(address, "graph", done.published, done.full_resync)

    def _read(self, address: str, full: bool = False, stored: SyncPosition | None | Unread = Unread.READ_IT) -> None:
        """One mailbox's read; ``stored``: its sync position as the fence read it, else it is read here."""
        observed_at = self.clock()
        window = sync_window(observed_at, self.policy)
        backend = self.backend_of(address)
        part_size = self.settings.exchange.snapshot_part_size
        with correlation(None, mailbox=address):
            try:
                if stored is Unread.READ_IT:
                    stored = self.store.sync_position(address)
                if stored is not None and stored.backend != backend and not full:
                    # moved between backends: the new reader reads it in full, and a snapshot finds what was deleted
                    # meanwhile; unchanged busy times give Planner no call (decisions 49 and 66 in docs/decisions.md)
                    log.info("mailbox_read_by_new_backend", backend=backend, previous=stored.backend)
                    full = True
                elif stored is None and not full and not self.store.mark_first_read(address, backend, observed_at):
                    # an earlier first read began and never saved its state: it may have published items deleted
                    # since, which a read from nothing cannot say, so a snapshot goes with it (decision 85)
                    log.info("mailbox_first_read_retried", backend=backend)
                    full = True
                if backend == "graph":
                    reader = self._graph_reader()
                    if full:   # a new delta round over the window, published as a snapshot, then its link saved
                        items = rebase_mailbox(address, reader, self.positions, self._publish, window, observed_at, part_size, _new_id())
                        log.info("mailbox_resynced", items=items, backend=backend)
                        published, full_read = items, True
                    else:
                        result = sync_mailbox(address, GraphSyncReader(reader, window), self.positions, self._publish, window, observed_at, _new_id, backend="graph",
                                              stored=stored)
                        published, full_read = result.published, result.full_resync
                elif full:   # a read from nothing and a snapshot read after it, then the state (decision 85)
                    result, items = resync_mailbox(address, self.exchange, self.positions, self._publish, window, observed_at, _new_id, part_size)
                    log.info("mailbox_resynced", items=items, backend=backend)
                    published, full_read = result.published, result.full_resync
                else:
                    result = sync_mailbox(address, self.exchange, self.positions, self._publish, window, observed_at, _new_id, stored=stored)
                    published, full_read = result.published, result.full_resync
            except LeaseLost:
                self._lease_lost(address)
                return
            except Exception as exc:  # noqa: BLE001 - every failure is per mailbox; classify decides the wait
                self._failed(address, backend, self._classify(backend, exc), full)
                return
            self._succeeded(address, backend, published, full_read)

    def _lease_lost(self, address: str) -> None:
        """The read ran while another replica took the mailbox over: its state is not saved, and the mailbox is no
        longer read here; the new holder reads on from the state it saved itself (decision 102)."""
        self.leases.lost([address], "taken over during the read: its sync state was not saved")
        self._follow()

    def _failed(self, address: str, backend: Backend, fault: SourceFault, full: bool) -> None:
        """A read failed: an invalid sync state is read again in full at once; anything else waits (``schedule``)."""
        if fault.kind == "invalid_sync_state" and not full:
            log.warning("sync_state_invalid", detail=fault.detail, backend=backend)
            self._read(address, full=True)
            return
        with self.lock:
            wait = self.schedule.failed(address, self.clock(), fault)
            state = self.schedule.mailboxes.get(address)
        log.warning("mailbox_read_failed", kind=fault.kind, detail=fault.detail, retry_in_s=round(wait.total_seconds(), 1), backend=backend)
        if state is not None:
            detail = operator_detail(fault) if backend == "graph" else fault.detail
            self._record_status(address, state.status, detail, self.clock() + wait)

    def _succeeded(self, address: str, backend: Backend, published: int, full_read: bool) -> None:
        with self.lock:
            previous = self.schedule.mailboxes.get(address)
            was = previous.status if previous else None
            now = self.clock()
            # Graph is polled, never notified: its next read is a delta interval away
            self.schedule.succeeded(address, now, self.settings.graph.delta_interval if backend == "graph" else None)
            self.reads += 1
        if published:
            log.info("mailbox_changes_published", changes=published, full=full_read, backend=backend)
        if was != "active":
            self._record_status(address, "active", None, None)

    def _graph_reader(self) -> GraphReader:
        try:
            return self.graph.get()
        except ValueError as exc:   # settings the reader cannot start with: a status for each Graph mailbox, no crash
            raise GraphNotConfigured(str(exc)) from None

    @staticmethod
    def _classify(backend: Backend, error: BaseException) -> SourceFault:
        if isinstance(error, GraphNotConfigured):
            return SourceFault("mailbox_unavailable", f"Graph is not configured ({error}): set PLANNERSYNC_GRAPH__* (runbooks/graph.md)")
        return classify_graph(error) if backend == "graph" else classify_ews(error)

    def _record_status(self, address: str, status: str, detail: str | None, next_attempt: datetime | None) -> None:
        try:
            self.store.set_mailbox_status(address, status, detail, next_attempt)
        except Exception as exc:  # noqa: BLE001
            log.warning("mailbox_status_not_saved", error=type(exc).__name__)

    def _mark_dirty(self, addresses: list[str], urgent: bool = False) -> None:
        """Read these mailboxes again; ``urgent``: a notification named them (read before the catch-up, decision 107)."""
        with self.lock:
            for address in addresses:
                self.schedule.mark_dirty(address, urgent)
        self.wake.set()

    # --- streaming notifications ---------------------------------------------------------------------------
    def _stream_group(self, index: int) -> None:
        ex = self.settings.exchange
        subscriptions: dict[str, str] = {}  # subscription id -> mailbox
        failures = 0                        # stream failures in a row
        whole = False                       # the last stream ran to its end: it delivered every event it took
        while not self.stopping.is_set():
            members = self._group(index)
            for sub_id, address in list(subscriptions.items()):
                if address not in members:
                    del subscriptions[sub_id]
                    self._unsubscribe(address, sub_id)
            fresh = []
            for address in members:
                if address in subscriptions.values():
                    continue
                try:
                    subscriptions[self.exchange.subscribe_streaming(address)] = address
                    fresh.append(address)
                    with self.lock:
                        self.schedule.set_subscribed(address, True)
                except Exception as exc:  # noqa: BLE001 - this mailbox waits; the others stream
                    log.warning("subscribe_failed", mailbox=address, kind=classify(exc).kind, detail=classify(exc).detail)
            if not subscriptions:
                self.stopping.wait(1.0)
                continue
            # catch up on what a stream may have missed: a new subscription's mailbox always (it changed, maybe, before
            # it was subscribed); every mailbox after a stream that was cut or left early (events it had sent and we
            # had not read are gone). After a stream that ran to its end, the subscriptions kept their events
            # meanwhile and the next stream delivers them: no read (decision 105 in docs/decisions.md).
            self._mark_dirty(fresh if whole else list(subscriptions.values()))
            whole = False
            anchor = next(iter(subscriptions.values()))
            try:
                for sub_id in self.exchange.stream(anchor, list(subscriptions), ex.stream_minutes, ex.stream_silence_timeout.total_seconds()):
                    notified = subscriptions.get(sub_id)
                    if notified is not None:
                        self._mark_dirty([notified], urgent=True)
                    if self.stopping.is_set() or set(self._group(index)) != set(subscriptions.values()):
                        break
                else:
                    whole = True
                failures = 0
            except Exception as exc:  # noqa: BLE001
                fault = classify(exc)
                log.warning("stream_interrupted", group=index, kind=fault.kind, detail=fault.detail)
                if fault.kind in ("subscription_lost", "mailbox_unavailable"):
                    with self.lock:
                        for address in subscriptions.values():
                            self.schedule.set_subscribed(address, False)
                    subscriptions.clear()  # resubscribe the group; a dead mailbox fails alone on subscribe
                failures += 1
                delay = exponential_backoff(failures, STREAM_RETRY_BASE, STREAM_RETRY_MAX).total_seconds()
                self.stopping.wait(fault.back_off if fault.kind == "throttled" and fault.back_off else delay)

    def _unsubscribe(self, address: str, sub_id: str) -> None:
        try:
            self.exchange.unsubscribe(address, sub_id)
        except Exception:  # noqa: BLE001 - it expires on its own
            pass

    # --- pull notifications ----------------------------------------------------------------------------------
    def _pull_loop(self) -> None:
        interval = self.settings.exchange.pull_interval.total_seconds()
        subscriptions: dict[str, tuple[str, str]] = {}  # mailbox -> (subscription id, watermark)
        while not self.stopping.is_set():
            members = self._members()
            for address in list(subscriptions):
                if address not in members:
                    self._unsubscribe(address, subscriptions.pop(address)[0])
            for address in members:
                try:
                    if address not in subscriptions:
                        subscriptions[address] = self.exchange.subscribe_pull(address)
                        with self.lock:
                            self.schedule.set_subscribed(address, True)
                        self._mark_dirty([address])
                        continue
                    sub_id, watermark = subscriptions[address]
                    changed, watermark = self.exchange.pull(address, sub_id, watermark)
                    subscriptions[address] = (sub_id, watermark)
                    if changed:
                        self._mark_dirty([address], urgent=True)
                except Exception as exc:  # noqa: BLE001
                    fault = classify(exc)
                    log.warning("pull_failed", mailbox=address, kind=fault.kind, detail=fault.detail)
                    subscriptions.pop(address, None)
                    with self.lock:
                        self.schedule.set_subscribed(address, False)
            self.stopping.wait(interval)


def build(settings: Settings) -> ChangeProducer:
    """Wire the change producer. Nothing connects to Exchange until ``run``; each reader is built when a mailbox
    first needs it (an EWS-only installation needs no Graph settings)."""
    store = open_store(settings.database_url(), settings.database.auto_upgrade)
    return ChangeProducer(settings, store, None, from_settings(settings.broker, settings.retry))

