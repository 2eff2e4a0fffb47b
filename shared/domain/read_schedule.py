"""When each mailbox is read next. Pure: the caller passes the time; no I/O, no threads.

A notification only marks a mailbox dirty; a dirty mailbox is read at once (bursts coalesce into one
read, since marking a mailbox that is being read makes it run once more afterwards). Every mailbox is
also read on a safety interval, more often while it has no live subscription. A failing mailbox is
retried on its own backoff; it never delays another.

``due`` is asked after every notification, so it looks only at the dirty mailboxes until the earliest safety or
backoff time it last saw has come; only then does it walk every mailbox (decision 106 in docs/decisions.md).

``take`` hands out only as many reads as there are free workers, so what waits stays here, where a burst of
notifications for one mailbox still coalesces and the order can be chosen: a mailbox a notification named (urgent) goes
before the catch-up reads (new mailboxes, subscriptions just made, streams reopened, safety reads), each kind oldest
first; while catch-up reads wait, urgent reads hold at most ``urgent_cap`` workers, so the catch-up always moves
(decision 107 in docs/decisions.md).
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
    since: datetime | None = None  # when it became due and waiting (None: from the start); the order within a kind
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
    schedule keeps its dirty mailboxes and its earliest timed wake-up beside the states (decision 106)."""

    timing: Timing
    mailboxes: dict[str, MailboxState] = field(default_factory=dict)
    _dirty: set[str] = field(default_factory=set, init=False, repr=False)
    _walk_at: datetime | None = field(default=None, init=False, repr=False)   # no mailbox's safety or backoff time comes before this; None: walk at once

    # --- membership ----------------------------------------------------------------------------
    def set_members(self, addresses: set[str]) -> tuple[set[str], set[str]]:
        """Make the schedule follow the enrolled set; return (added, removed)."""
        current = set(self.mailboxes)
        added, removed = addresses - current, current - addresses
        for address in added:
            self.mailboxes[address] = MailboxState()
        for address in removed:
            del self.mailboxes[address]
        self._dirty -= removed
        self._dirty |= added
        return added, removed

    def mark_dirty(self, address: str, now: datetime | None = None, urgent: bool = False) -> None:
        """Read ``address`` again; ``urgent``: a notification says it changed (read before the catch-up reads);
        ``now``: when, for the order among the waiting ones."""
        state = self.mailboxes.get(address)
        if state is not None:
            if not state.dirty:
                state.since = now
            state.dirty = True
            state.urgent = state.urgent or urgent
            self._dirty.add(address)

    def set_subscribed(self, address: str, subscribed: bool) -> None:
        state = self.mailboxes.get(address)
        if state is not None:
            state.subscribed = subscribed

    # --- picking work ---------------------------------------------------------------------------
    def due(self, now: datetime) -> list[str]:
        """Mailboxes to read now (not running, not backing off, dirty or past their safety time), in address order.

        Before the earliest safety or backoff time seen at the last walk only the dirty mailboxes can be due, and
        only they are looked at; from then on one walk over all finds the due ones and the next such time. The
        caller starts every mailbox it is given (the change producer does): one due by its safety time and not
        started would be found again only at the next walk."""
        if self._walk_at is not None and now < self._walk_at:
            return [address for address in sorted(self._dirty) if self._ready(self.mailboxes[address], now)]
        ready = []
        walk_at: datetime | None = None
        for address, state in sorted(self.mailboxes.items()):
            if self._ready(state, now):
                ready.append(address)
                if not state.dirty:   # due by its time: dirty from now on, so the calls between walks find it until it is taken
                    state.dirty, state.since = True, state.not_before or state.next_safety
                    self._dirty.add(address)
            elif not state.running:   # a running mailbox's next time is set when its read ends
                wake = state.not_before if state.not_before is not None and now < state.not_before else state.next_safety
                if wake is not None and (walk_at is None or wake < walk_at):
                    walk_at = wake
        self._walk_at = walk_at if walk_at is not None else now + self.timing.safety_interval
        return ready

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
        """Start at most ``free`` read tasks among the due mailboxes (decision 107): urgent ones first while fewer than
        ``urgent_cap`` urgent reads run (``urgent_running`` now) or no catch-up read waits, else a catch-up read; each
        kind oldest first. A mailbox of ``batchable`` (Graph, not failing) shares its task with up to ``batch_size``
        others of its kind."""
        if free <= 0:
            return []
        ready = self.due(now)
        if not ready:
            return []
        cap = free if urgent_cap is None else urgent_cap
        floor = datetime.min.replace(tzinfo=now.tzinfo)
        order = sorted(ready, key=lambda a: (self.mailboxes[a].since or floor, a))
        lanes = {True: [a for a in order if self.mailboxes[a].urgent], False: [a for a in order if not self.mailboxes[a].urgent]}
        tasks: list[ReadTask] = []
        while len(tasks) < free and (lanes[True] or lanes[False]):
            urgent = bool(lanes[True]) and (not lanes[False] or urgent_running < cap)
            lane = lanes[urgent]
            group = [lane.pop(0)]
            if group[0] in batchable and self.mailboxes[group[0]].failures == 0:
                for address in [a for a in lane if a in batchable and self.mailboxes[a].failures == 0][: batch_size - 1]:
                    lane.remove(address)
                    group.append(address)
            for address in group:
                self.started(address, urgent)
            urgent_running += urgent
            tasks.append(ReadTask(tuple(group), urgent))
        return tasks

    def waiting(self) -> tuple[int, int]:
        """Mailboxes due for a read and not yet taken (failing ones left out), and of them the urgent ones."""
        states = [state for address in self._dirty if not (state := self.mailboxes[address]).running and not state.failures]
        return len(states), sum(1 for state in states if state.urgent)

    def started(self, address: str, urgent: bool = False) -> None:
        state = self.mailboxes[address]
        state.running, state.running_urgent = True, urgent
        state.dirty = state.urgent = False  # a notification during the read marks it dirty again
        state.since = None
        self._dirty.discard(address)

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

    def failed(self, address: str, now: datetime, fault: SourceFault) -> timedelta:
        """Record a failed read; return how long this mailbox now waits."""
        state = self.mailboxes.get(address)
        if state is None:
            return timedelta(0)
        state.running = False
        state.failures += 1
        if not state.dirty:
            state.since = now
        state.dirty = True  # whatever it was supposed to read is still unread
        state.urgent = state.urgent or state.running_urgent
        self._dirty.add(address)   # so ``due`` looks at it between walks, and finds it once its backoff is over
        wait = backoff(fault, state.failures, self.timing)
        state.not_before = now + wait
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
