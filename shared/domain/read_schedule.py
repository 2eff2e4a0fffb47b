"""When each mailbox is read next. Pure: the caller passes the time; no I/O, no threads.

A notification only marks a mailbox dirty; a dirty mailbox is read at once (bursts coalesce into one
read, since marking a mailbox that is being read makes it run once more afterwards). Every mailbox is
also read on a safety interval, more often while it has no live subscription. A failing mailbox is
retried on its own backoff; it never delays another.

The schedule is asked after every notification, so it walks every mailbox only once the earliest safety or backoff
time it last saw has come (decision 106 in docs/decisions.md); in between only the mailboxes waiting in its queues can
be due.

``take`` hands out only as many reads as there are free workers, so what waits stays here, where a burst of
notifications for one mailbox still coalesces and the order can be chosen: a mailbox a notification named (urgent) goes
before the catch-up reads (new mailboxes, subscriptions just made, streams reopened, safety reads), each kind first
come, first served; while catch-up reads wait, urgent reads hold at most ``urgent_cap`` workers, so the catch-up always
moves (decision 107 in docs/decisions.md). The waiting mailboxes stand in two queues, one per kind, so ``take`` costs
what it hands out, not what waits: under a backlog it is asked after every notification and every read.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple

from shared.domain.source_faults import SourceFault
from shared.domain.timing import exponential_backoff


@dataclass
class MailboxState:
    dirty: bool = True  # a new mailbox is read at once
    urgent: bool = False  # a notification named it since its last read began (decision 107)
    queue: bool | None = None  # waiting in the urgent (True) or the catch-up (False) queue; None: in neither
    running: bool = False
    running_urgent: bool = False  # the read running is an urgent one; a failed one stays urgent
    subscribed: bool = False
    next_safety: datetime | None = None
    not_before: datetime | None = None
    failures: int = 0
    status: str = "new"
    detail: str | None = None


@dataclass(frozen=True)
class Timing:
    safety_interval: timedelta
    unsubscribed_interval: timedelta
    backoff_max: timedelta
    transient_base: timedelta = timedelta(seconds=2)
    unavailable_base: timedelta = timedelta(minutes=2)


class ReadTask(NamedTuple):
    """Mailboxes read together by one worker (several only for Graph's ``$batch``), and whether a notification named
    them (an urgent read) or not (a catch-up read)."""

    mailboxes: tuple[str, ...]
    urgent: bool


@dataclass
class Schedule:
    """The read schedule of the mailboxes followed. Change a ``MailboxState`` only through these methods: the
    schedule keeps its queues and its earliest timed wake-up beside the states (decisions 106 and 107)."""

    timing: Timing
    mailboxes: dict[str, MailboxState] = field(default_factory=dict)
    _walk_at: datetime | None = field(default=None, init=False, repr=False)   # no mailbox's safety or backoff time comes before this; None: walk at once
    # the mailboxes waiting for a worker, urgent (True) and catch-up (False), each in the order they came (dicts keep it)
    _queues: dict[bool, dict[str, None]] = field(default_factory=lambda: {True: {}, False: {}}, init=False, repr=False)

    # --- membership ----------------------------------------------------------------------------
    def set_members(self, addresses: set[str]) -> tuple[set[str], set[str]]:
        """Make the schedule follow the enrolled set; return (added, removed)."""
        current = set(self.mailboxes)
        added, removed = addresses - current, current - addresses
        for address in removed:
            self._unqueue(address, self.mailboxes.pop(address))
        for address in sorted(added):
            self.mailboxes[address] = state = MailboxState()
            self._enqueue(address, state)
        return added, removed

    def mark_dirty(self, address: str, urgent: bool = False) -> None:
        """Read ``address`` again; ``urgent``: a notification says it changed (read before the catch-up reads). A
        mailbox being read waits until its read ends, a failing one until its backoff is over."""
        state = self.mailboxes.get(address)
        if state is not None:
            state.dirty = True
            state.urgent = state.urgent or urgent
            self._enqueue(address, state)

    def _enqueue(self, address: str, state: MailboxState, ready: bool = False) -> None:
        """Into the queue of its kind, unless it runs or backs off (its read's end, or the walk at the backoff's end,
        puts it there; ``ready``: the walk found it ready); a waiting catch-up mailbox a notification names moves to
        the urgent queue's end. So after a walk the queued mailboxes are exactly the ready dirty ones."""
        if state.queue is None:
            if state.running or (state.not_before is not None and not ready):
                return
        elif state.queue or not state.urgent:
            return
        else:
            del self._queues[False][address]
        self._queues[state.urgent][address] = None
        state.queue = state.urgent

    def _unqueue(self, address: str, state: MailboxState) -> None:
        if state.queue is not None:
            del self._queues[state.queue][address]
            state.queue = None

    def set_subscribed(self, address: str, subscribed: bool) -> None:
        state = self.mailboxes.get(address)
        if state is not None:
            state.subscribed = subscribed

    # --- picking work ---------------------------------------------------------------------------
    def due(self, now: datetime) -> list[str]:
        """Mailboxes to read now (not running, not backing off, dirty or past their safety time), in address order,
        without taking them: the ones waiting in the queues once a walk has queued those due by their time."""
        self._walk(now)
        return sorted([*self._queues[True], *self._queues[False]])

    def _walk(self, now: datetime) -> None:
        """Once the earliest safety or backoff time seen at the last walk has come: every mailbox looked at, the due
        ones queued, the next such time found (decision 106)."""
        if self._walk_at is not None and now < self._walk_at:
            return
        walk_at: datetime | None = None
        for address, state in sorted(self.mailboxes.items()):
            if self._ready(state, now):
                state.dirty = True
                self._enqueue(address, state, ready=True)
            elif not state.running:   # a running mailbox's next time is set when its read ends
                wake = state.not_before if state.not_before is not None and now < state.not_before else state.next_safety
                if wake is not None and (walk_at is None or wake < walk_at):
                    walk_at = wake
        self._walk_at = walk_at if walk_at is not None else now + self.timing.safety_interval

    @staticmethod
    def _ready(state: MailboxState, now: datetime) -> bool:
        if state.running or (state.not_before is not None and now < state.not_before):
            return False
        return state.dirty or state.next_safety is None or now >= state.next_safety

    def _wake_by(self, at: datetime) -> None:
        if self._walk_at is not None and at < self._walk_at:
            self._walk_at = at

    def take(self, now: datetime, free: int, urgent_running: int = 0, urgent_cap: int | None = None,
             batchable: Collection[str] = (), batch_size: int = 1) -> list[ReadTask]:
        """Start at most ``free`` read tasks among the waiting mailboxes (decision 107): urgent ones first while fewer
        than ``urgent_cap`` urgent reads run (``urgent_running`` now) or no catch-up read waits, else a catch-up read;
        each kind first come, first served. A mailbox of ``batchable`` (Graph) that is not failing shares its task
        with up to ``batch_size`` others of its kind."""
        self._walk(now)   # even with no worker free: what is due by its time is queued, and ``waiting`` counts it
        if free <= 0:
            return []
        cap = free if urgent_cap is None else urgent_cap
        tasks: list[ReadTask] = []
        while len(tasks) < free and (self._queues[True] or self._queues[False]):
            urgent = bool(self._queues[True]) and (not self._queues[False] or urgent_running < cap)
            lane = self._queues[urgent]
            group = [next(iter(lane))]
            if group[0] in batchable and self.mailboxes[group[0]].failures == 0:
                for address in lane:
                    if len(group) >= batch_size:
                        break
                    if address != group[0] and address in batchable and self.mailboxes[address].failures == 0:
                        group.append(address)
            for address in group:
                self.started(address, urgent)
            urgent_running += urgent
            tasks.append(ReadTask(tuple(group), urgent))
        return tasks

    def waiting(self) -> tuple[int, int]:
        """Mailboxes waiting for a worker, and of them the urgent ones."""
        return len(self._queues[True]) + len(self._queues[False]), len(self._queues[True])

    def started(self, address: str, urgent: bool = False) -> None:
        state = self.mailboxes[address]
        state.running, state.running_urgent = True, urgent
        state.dirty = state.urgent = False  # a notification during the read marks it dirty again
        self._unqueue(address, state)

    # --- outcomes -------------------------------------------------------------------------------
    def succeeded(self, address: str, now: datetime, next_in: timedelta | None = None) -> None:
        """A read ended well: the next safety read is ``next_in`` from now (by default the safety interval, shorter
        while the mailbox has no live subscription)."""
        state = self.mailboxes.get(address)
        if state is None:
            return
        state.running = False
        state.failures = 0
        state.not_before = None
        state.status, state.detail = "active", None
        interval = self.timing.safety_interval if state.subscribed else self.timing.unsubscribed_interval
        state.next_safety = now + (next_in if next_in is not None else interval)
        self._wake_by(state.next_safety)
        if state.dirty:   # a notification came during the read
            self._enqueue(address, state)

    def failed(self, address: str, now: datetime, fault: SourceFault) -> timedelta:
        """Record a failed read; return how long this mailbox now waits."""
        state = self.mailboxes.get(address)
        if state is None:
            return timedelta(0)
        state.running = False
        state.failures += 1
        state.dirty = True  # whatever it was supposed to read is still unread
        state.urgent = state.urgent or state.running_urgent
        wait = backoff(fault, state.failures, self.timing)
        state.not_before = now + wait
        self._wake_by(state.not_before)   # the walk then queues it again
        state.status = "failing" if fault.kind == "mailbox_unavailable" else ("throttled" if fault.kind == "throttled" else "retrying")
        state.detail = fault.detail
        return wait


def backoff(fault: SourceFault, failures: int, timing: Timing) -> timedelta:
    """Throttling waits as long as the source asks; an unavailable mailbox slowly; other faults quickly.

    An invalid sync state is answered at once by a full re-read (the producer does that within the same pass);
    when that re-read fails too, the mailbox backs off like any transient fault instead of looping.
    """
    if fault.kind == "throttled":
        return timedelta(seconds=fault.back_off) if fault.back_off else exponential_backoff(failures + 1, timing.transient_base, timing.backoff_max)
    base = timing.unavailable_base if fault.kind == "mailbox_unavailable" else timing.transient_base
    return exponential_backoff(failures, base, timing.backoff_max)
