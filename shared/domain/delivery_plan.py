"""Pure decisions of the Planner publisher: what to send for a desired state, what a receipt means.

Desired state, not commands (DOMAIN decision 6): whether a state becomes Create, Update, Delete
or nothing is decided here, against what Planner is known to hold. Older versions never
overwrite newer ones, so duplicates, replays and reordering are harmless.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Mapping, Sequence

from shared.domain.contracts import BusyTimeState, Interval

Operation = Literal["create", "update", "delete"]
ReceiptAction = Literal["ok", "update_instead", "create_instead", "planner_originated", "retry", "dead_letter"]


@dataclass(frozen=True)
class DeliveredRecord:
    """What Planner is known to hold for one event key (the publisher's row in the state store)."""

    mailbox: str
    origin_id: str
    version: int
    present: bool
    interval: Interval | None
    planner_event_id: str | None
    planner_resource_id: str | None
    planner_originated: bool
    last_code: int | None
    last_message: str | None


@dataclass(frozen=True)
class Send:
    operation: Operation
    origin_id: str
    interval: Interval


@dataclass(frozen=True)
class NoChange:
    reason: str


Action = Send | NoChange


@dataclass(frozen=True)
class Holding:
    """Whether Planner holds an event and, when it does, at which times."""

    present: bool
    interval: Interval | None

    @classmethod
    def absent(cls) -> Holding:
        return cls(False, None)


@dataclass(frozen=True)
class ReceiptFacts:
    """What Planner's receipt for one event said, kept for support and the status page."""

    code: int
    message: str | None
    conflict_notification_sent: bool
    received_at: datetime | None
    reference: str | None


@dataclass(frozen=True)
class DeliveredChange:
    """One write to the delivered record of an event key. A field left ``None`` keeps what the store holds."""

    origin_id: str
    version: int | None = None
    holding: Holding | None = None
    planner_originated: bool | None = None
    planner_event_id: str | None = None
    planner_resource_id: str | None = None
    receipt: ReceiptFacts | None = None


def plan(desired: BusyTimeState, known: DeliveredRecord | None) -> Action:
    """The one rule for every path (live changes, snapshots, reconciliation, replays)."""
    if known is not None and known.planner_originated:
        return NoChange("planner_originated")
    if known is not None and (known.version > desired.version or (known.version == desired.version and desired.cause != "reconcile")):
        # A reconciliation re-sends the current desired state (same version) after correcting what
        # Planner is known to hold; anything else at the same version is a duplicate.
        return NoChange("not_newer")
    if desired.interval is None:
        if known is not None and known.present and known.interval is not None:
            return Send("delete", desired.origin_id, known.interval)
        return NoChange("already_absent")
    if known is None or not known.present:
        return Send("create", desired.origin_id, desired.interval)
    if known.interval != desired.interval:
        return Send("update", desired.origin_id, desired.interval)
    return NoChange("same_interval")


def remember_version(desired: BusyTimeState, known: DeliveredRecord | None, action: Action) -> bool:
    """Whether a state that needs no call must still be recorded as the newest word on its key.

    An absent state for a key Planner never got, or a newer version with unchanged times, sends
    nothing; unless its version is remembered, an older busy state arriving later would be
    measured against the older record and create or move the event after all.
    """
    if not isinstance(action, NoChange) or action.reason not in ("already_absent", "same_interval"):
        return False
    return known is None or known.version < desired.version


def newest_per_key(states: Sequence[BusyTimeState]) -> dict[tuple[str, str], int]:
    """Index of the newest state of each key in a batch; older ones in the same batch need no call."""
    best: dict[tuple[str, str], int] = {}
    for index, state in enumerate(states):
        current = best.get(state.key)
        if current is None or states[current].version < state.version:
            best[state.key] = index
    return best


def receipt_action(code: int, operation: Operation, table: Mapping[str, str]) -> ReceiptAction:
    """Look a receipt code up in the configured table: ``code@operation``, then ``code``, then ``*``."""
    for key in (f"{code}@{operation}", str(code), "*"):
        if key in table:
            return table[key]  # type: ignore[return-value]
    return "dead_letter"


def follow_up(action: ReceiptAction) -> Operation | None:
    if action == "update_instead":
        return "update"
    if action == "create_instead":
        return "create"
    return None
