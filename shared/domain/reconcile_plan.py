"""Pure decisions of the nightly reconciliation with Planner: no I/O, no clock.

Given what Planner returned for one mailbox (GetEvents over the sync window), what the transformer
decided (desired rows) and what the store believes Planner holds (delivered rows),
``plan_reconciliation`` works out

1. **corrections**: delivered rows rewritten so they say what GetEvents actually showed (present or
   absent, Planner's times, Planner's ids), and
2. **states**: ``BusyTimeState`` messages (cause ``"reconcile"``) for the ordinary publisher path.

It is a composition of three pieces, each usable on its own:

- ``collect_keys``: the keys to look at (Planner's events in the window, desired busy times and
  known-present delivered rows starting in it), with the count of malformed Planner events;
- ``decide_key``: for one key, the corrected delivered row, the state to publish (if any) and the
  report counters it adds to;
- ``mass_delete_guard``: stop or go for the mailbox as a whole, with the reason.

``decide_key`` does not choose Create/Update/Delete itself: it asks the publisher's own rule
(``delivery_plan.plan``) what the state would do against the corrected row, so live delivery and
reconciliation cannot disagree. A state is published only when ``plan`` would send something.

Rules (decision 39 in docs/decisions.md), per event key whose Planner event, desired busy time or known-present delivered row
starts inside the window:

- Planner-originated keys (delivered row marked so) are left alone and never re-sent.
- Planner holds our identifier but the calendar has no busy time for it (desired absent, or no
  desired row at all) → delete. With a desired row the state carries its version; without one, the
  version the delivered row is corrected to (0 for an event the store never knew).
- The calendar has a busy time Planner lacks, or holds with other times → create or update, at the
  desired row's version (``plan`` allows a reconcile state to re-send the same version).
- Planner holds an event the store has no delivered row for (state store lost, or migration from
  the reference client, which used the same OriginSystemIdentifier): if the calendar has a busy
  time for that key it is **adopted** (recorded as delivered with Planner's times and ids; updated
  only when the times differ, never deleted and re-created); otherwise deleted.
- A delivered row newer than the desired row means a newer state is on its way through the
  pipeline: left alone this time (``in_flight``).
- More than ``max_delete_share`` of the mailbox's Planner events to delete → the mailbox stops:
  no corrections, no states, reason in the report; ``force`` overrides.

Decisions taken here (the details under decision 39 in docs/decisions.md):

- The window is the one GetEvents was called with; Planner events starting outside it are ignored,
  and a delivered row whose start lies outside it is never "corrected" (GetEvents could not see it).
- An adopted event whose times equal the desired ones is recorded at the desired row's version (Planner
  holds exactly that state); one with other times is recorded at version 0 so any state updates it.
- When Planner's times equal the desired ones, the corrected row takes the desired row's version.
- A Planner event whose end is not after its start is ignored (counted as ``malformed``).
- Planner may return an identifier twice; the first occurrence counts (as the reference client did).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Any, Literal, Mapping, Protocol, Sequence

from pydantic import ValidationError

from shared.domain.contracts import BusyTimeState, Interval
from shared.domain.delivery_plan import (
    DeliveredChange,
    DeliveredRecord,
    Holding,
    NoChange,
    Send,
    plan,
)
from shared.domain.transform_core import DesiredRecord, is_event_key

Status = Literal["reconciled", "stopped", "failed", "skipped"]


class HeldEvent(Protocol):
    """An event as GetEvents returns it (``planner_client.PlannerEvent`` fits)."""

    @property
    def origin_id(self) -> str: ...
    @property
    def email(self) -> str: ...
    @property
    def start(self) -> datetime: ...
    @property
    def end(self) -> datetime: ...
    @property
    def planner_event_id(self) -> str | None: ...
    @property
    def planner_resource_id(self) -> str | None: ...


@dataclass(frozen=True)
class DeliveredCorrection:
    """One delivered row to write so it matches what GetEvents showed."""

    origin_id: str
    present: bool
    interval: Interval | None
    version: int
    planner_event_id: str | None
    planner_resource_id: str | None

    def change(self) -> DeliveredChange:
        """The typed store write; ids Planner did not give are kept as they are."""
        return DeliveredChange(
            self.origin_id,
            version=self.version,
            holding=Holding(self.present, self.interval),
            planner_event_id=self.planner_event_id or None,
            planner_resource_id=self.planner_resource_id or None,
        )


@dataclass(frozen=True)
class MailboxReport:
    """What a reconciliation found and did for one mailbox. Counts and ids only, never content."""

    mailbox: str
    status: Status = "reconciled"
    reason: str | None = None
    in_planner: int = 0
    desired: int = 0
    up_to_date: int = 0
    created: int = 0
    updated: int = 0
    deleted: int = 0
    adopted: int = 0
    planner_originated_skipped: int = 0
    in_flight: int = 0
    corrected: int = 0
    malformed: int = 0

    @property
    def stopped(self) -> bool:
        return self.status != "reconciled"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MailboxReconciliation:
    """The plan for one mailbox: the delivered rows to correct first, then the states to publish, and the report."""

    mailbox: str
    corrections: tuple[DeliveredCorrection, ...]
    states: tuple[BusyTimeState, ...]
    report: MailboxReport


Tally = Literal["up_to_date", "created", "updated", "deleted", "adopted", "planner_originated_skipped", "in_flight"]


@dataclass(frozen=True)
class HeldInWindow:
    """One Planner event that counts: first of its identifier, positive length, starting inside the window."""

    event: HeldEvent
    interval: Interval


@dataclass(frozen=True)
class KeysToCheck:
    """Every event key worth a look for one mailbox, with what each side says about it."""

    keys: tuple[str, ...]                      # sorted
    held: Mapping[str, HeldInWindow]           # Planner's events in the window, by identifier
    wanted: Mapping[str, DesiredRecord]        # desired rows of event keys (no bookkeeping rows)
    known: Mapping[str, DeliveredRecord]       # delivered rows of event keys
    desired_in_window: int                     # desired rows whose busy time starts in the window
    malformed: int                             # Planner events whose end is not after their start


@dataclass(frozen=True)
class KeyDecision:
    """What to do about one key: the row to correct, the state to publish, the report counters it adds one to."""

    correction: DeliveredCorrection | None
    state: BusyTimeState | None
    tallies: tuple[Tally, ...]


@dataclass(frozen=True)
class GuardVerdict:
    """The mass-delete guard's answer: ``stop`` with the reason, or go (``reason`` is then None)."""

    stop: bool
    reason: str | None = None


def _starts_in(interval: Interval | None, window: Interval) -> bool:
    return interval is not None and window.start <= interval.start < window.end


def _held_interval(event: HeldEvent) -> Interval | None:
    try:
        return Interval(start=event.start, end=event.end)
    except ValidationError:
        return None


def collect_keys(
    mailbox: str,
    planner_events: Sequence[HeldEvent],
    desired: Mapping[str, DesiredRecord],
    delivered: Mapping[str, DeliveredRecord],
    window: Interval,
) -> KeysToCheck:
    """The keys to look at: Planner's events in the window, desired busy times and known-present delivered rows starting in it."""
    mailbox = mailbox.lower()
    held: dict[str, HeldInWindow] = {}
    malformed = 0
    for event in planner_events:
        if event.email.lower() != mailbox or event.origin_id in held:
            continue
        interval = _held_interval(event)
        if interval is None:
            malformed += 1
        elif _starts_in(interval, window):
            held[event.origin_id] = HeldInWindow(event, interval)
    wanted = {key: row for key, row in desired.items() if is_event_key(key)}
    known = {key: row for key, row in delivered.items() if is_event_key(key)}
    wanted_in_window = {key for key, row in wanted.items() if _starts_in(row.interval, window)}
    keys = set(held) | wanted_in_window | {key for key, row in known.items() if row.present and _starts_in(row.interval, window)}
    return KeysToCheck(tuple(sorted(keys)), held, wanted, known, len(wanted_in_window), malformed)


def _corrected(
    known: DeliveredRecord | None,
    held: HeldInWindow | None,
    wanted: DesiredRecord | None,
    mailbox: str,
    origin_id: str,
    window: Interval,
) -> DeliveredRecord | None:
    """The delivered row as GetEvents showed it (``known`` itself when nothing needs correcting)."""
    wanted_busy = wanted.interval if wanted is not None else None
    if held is None:
        if known is None or not known.present:
            return known
        if not _starts_in(known.interval, window):
            return known  # GetEvents could not have seen it where the store says it is
        return replace(known, present=False, interval=None)
    event = held.event
    matches_desired = wanted is not None and wanted_busy is not None and wanted_busy == held.interval
    if known is None:
        version = wanted.version if matches_desired and wanted is not None else 0
        return DeliveredRecord(mailbox, origin_id, version, True, held.interval, event.planner_event_id, event.planner_resource_id, False, None, None)
    version = max(known.version, wanted.version) if matches_desired and wanted is not None else known.version
    return replace(
        known,
        version=version,
        present=True,
        interval=held.interval,
        planner_event_id=event.planner_event_id or known.planner_event_id,
        planner_resource_id=event.planner_resource_id or known.planner_resource_id,
    )


def _differs(before: DeliveredRecord | None, after: DeliveredRecord | None) -> bool:
    if after is None:
        return False
    if before is None:
        return True
    return (before.version, before.present, before.interval, before.planner_event_id, before.planner_resource_id) != (
        after.version, after.present, after.interval, after.planner_event_id, after.planner_resource_id,
    )


def decide_key(
    mailbox: str,
    origin_id: str,
    held: HeldInWindow | None,
    wanted: DesiredRecord | None,
    known: DeliveredRecord | None,
    now_version: int,
    *,
    window: Interval,
    correlation_id: str,
) -> KeyDecision:
    """Decide one key: correct its delivered row to what GetEvents showed, then ask ``delivery_plan.plan`` what to send."""
    mailbox = mailbox.lower()
    if known is not None and known.planner_originated:
        return KeyDecision(None, None, ("planner_originated_skipped",))
    after = _corrected(known, held, wanted, mailbox, origin_id, window)
    correction = None
    if after is not None and _differs(known, after):
        correction = DeliveredCorrection(origin_id, after.present, after.interval, after.version, after.planner_event_id, after.planner_resource_id)
    adopting = known is None and held is not None and wanted is not None and wanted.interval is not None
    state = BusyTimeState(
        correlation_id=correlation_id,
        mailbox=mailbox,
        origin_id=origin_id,
        # without a desired row, delete at the version Planner's event is known at (0 when the store never
        # knew it): a busy time the transformer records later, even from an older observation, still wins
        version=wanted.version if wanted is not None else (after.version if after is not None else now_version),
        interval=wanted.interval if wanted is not None else None,
        cause="reconcile",
    )
    action = plan(state, after)
    adopted: tuple[Tally, ...] = ("adopted",) if adopting else ()
    if isinstance(action, Send):
        operation: Tally = "created" if action.operation == "create" else "updated" if action.operation == "update" else "deleted"
        return KeyDecision(correction, state, (*adopted, operation))
    if isinstance(action, NoChange) and action.reason == "not_newer":
        return KeyDecision(correction, None, (*adopted, "in_flight"))
    return KeyDecision(correction, None, adopted or ("up_to_date",))


def mass_delete_guard(deletes: int, held: int, max_delete_share: float, force: bool) -> GuardVerdict:
    """Stop a mailbox whose plan deletes more than ``max_delete_share`` of Planner's events in the window, unless forced."""
    if force or held == 0 or deletes <= max_delete_share * held:
        return GuardVerdict(stop=False)
    reason = f"would delete {deletes} of {held} Planner events (more than {max_delete_share:.0%}); run with force to apply"
    return GuardVerdict(stop=True, reason=reason)


def plan_reconciliation(
    mailbox: str,
    planner_events: Sequence[HeldEvent],
    desired: Mapping[str, DesiredRecord],
    delivered: Mapping[str, DeliveredRecord],
    max_delete_share: float,
    force: bool,
    now_version: int,
    *,
    window: Interval,
    correlation_id: str,
) -> MailboxReconciliation:
    """Decide how to make Planner equal the desired state for one mailbox: collect the keys, decide each, guard. Pure."""
    mailbox = mailbox.lower()
    found = collect_keys(mailbox, planner_events, desired, delivered, window)
    decisions = [
        decide_key(
            mailbox, key, found.held.get(key), found.wanted.get(key), found.known.get(key), now_version,
            window=window, correlation_id=correlation_id,
        )
        for key in found.keys
    ]
    corrections = tuple(d.correction for d in decisions if d.correction is not None)
    states = tuple(d.state for d in decisions if d.state is not None)
    tallied = Counter(tally for d in decisions for tally in d.tallies)
    report = MailboxReport(
        mailbox=mailbox,
        in_planner=len(found.held),
        desired=found.desired_in_window,
        corrected=len(corrections),
        malformed=found.malformed,
        up_to_date=tallied["up_to_date"],
        created=tallied["created"],
        updated=tallied["updated"],
        deleted=tallied["deleted"],
        adopted=tallied["adopted"],
        planner_originated_skipped=tallied["planner_originated_skipped"],
        in_flight=tallied["in_flight"],
    )
    verdict = mass_delete_guard(report.deleted, report.in_planner, max_delete_share, force)
    if verdict.stop:
        return MailboxReconciliation(mailbox, (), (), replace(report, status="stopped", reason=verdict.reason))
    return MailboxReconciliation(mailbox, corrections, states, report)
