"""Pure decisions of the Planner publisher: what to send for a desired state, what a receipt means.

Desired state, not commands (decision 6 in docs/decisions.md): whether a state becomes Create, Update, Delete
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
    # A create or update whose outcome is unknown (sent, answer lost) may have been applied: Planner may hold the
    # event at ``maybe_interval`` whatever ``present`` says, until a receipt for the key settles it
    # (decision 68 in docs/decisions.md).
    maybe_held: bool = False
    maybe_interval: Interval | None = None


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
    """One write to the delivered record of an event key. A field left ``None`` keeps what the store holds.

    ``maybe_sent`` records that Planner *may* hold the event at that interval (a call whose outcome is unknown);
    it never touches ``version``, ``present`` or the held interval. A ``holding`` is what Planner is known to
    hold, so writing one settles (clears) any such maybe; so does ``maybe_cleared``.
    """

    origin_id: str
    version: int | None = None
    holding: Holding | None = None
    planner_originated: bool | None = None
    planner_event_id: str | None = None
    planner_resource_id: str | None = None
    receipt: ReceiptFacts | None = None
    maybe_sent: Interval | None = None
    maybe_cleared: bool = False   # Planner's own answer says the call that wrote the maybe applied nothing (decision 84)


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
        if known is not None and known.maybe_held and known.maybe_interval is not None:
            # A create whose answer was lost may have been applied: delete it (Planner answers 10, "ok", if not).
            return Send("delete", desired.origin_id, known.maybe_interval)
        return NoChange("already_absent")
    if known is not None and not known.present and known.maybe_held:
        # Planner may hold it (a lost answer): update, never create twice; Planner's 10 turns it into a create
        return Send("update", desired.origin_id, desired.interval)
    if known is None or not known.present:
        return Send("create", desired.origin_id, desired.interval)
    if known.interval != desired.interval or (known.maybe_held and known.maybe_interval != desired.interval):
        return Send("update", desired.origin_id, desired.interval)
    return NoChange("same_interval")


def maybe_applied(send: Send, code: int | None = None) -> DeliveredChange | None:
    """What to record when ``send``'s call failed transiently (connection cut, timeout, 5xx, unparsable answer).

    A create or update may have been applied though its answer was lost: Planner may now hold the event at the
    interval sent. A failure carrying Planner's error ``code`` (a SOAP fault) is Planner's answer: nothing was
    applied. A delete needs nothing: the record still says present, so it is sent again.
    """
    if send.operation == "delete" or code is not None:
        return None
    return DeliveredChange(send.origin_id, maybe_sent=send.interval)


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
    """The operation a receipt action asks to send instead, if any."""
    if action == "update_instead":
        return "update"
    if action == "create_instead":
        return "create"
    return None


@dataclass(frozen=True)
class EventReceipt:
    """Planner's receipt for one event of a call, as plain values (the worker converts the client's)."""

    code: int
    message: str | None = None
    planner_event_id: str | None = None
    planner_resource_id: str | None = None
    received_at: datetime | None = None
    conflict_notification_sent: bool = False
    reference: str | None = None  # ServiceRequestLogReferenceIdentifier of the call


@dataclass(frozen=True)
class Delivered:
    """Planner holds what was sent (or, after a delete, no longer holds it)."""


@dataclass(frozen=True)
class PlannerOriginated:
    """The event belongs to Planner: remembered, never sent again."""


@dataclass(frozen=True)
class FollowUp:
    """Send again with another operation (create <-> update), at most once each."""

    send: Send


@dataclass(frozen=True)
class Postpone:
    """Retry the message later (a transient failure)."""

    reason: str
    code: int | None = None


@dataclass(frozen=True)
class Reject:
    """Dead-letter the message (a permanent failure)."""

    reason: str
    code: int | None = None


Settled = Delivered | PlannerOriginated | FollowUp | Postpone | Reject


@dataclass(frozen=True)
class Settlement:
    """What one receipt means: the action it maps to, the store write (if any) and the message's outcome."""

    action: ReceiptAction | None  # None when Planner sent no receipt for the event
    record: DeliveredChange | None
    outcome: Settled


def settle(send: Send, version: int, tried: Sequence[Operation], receipt: EventReceipt | None, table: Mapping[str, str]) -> Settlement:
    """What Planner's receipt for ``send`` (of the state at ``version``) means.

    ``tried`` are the operations already sent for this event before ``send``; a follow-up never
    repeats one of them or ``send`` itself. Planner ids it leaves empty keep what the store holds.
    A missing receipt is never taken as success.
    """
    operation = send.operation
    if receipt is None:
        return Settlement(None, None, Postpone(f"no receipt for the event in the {operation} answer"))
    action = receipt_action(receipt.code, operation, table)
    facts = ReceiptFacts(receipt.code, receipt.message, receipt.conflict_notification_sent, receipt.received_at, receipt.reference)
    event_id, resource_id = receipt.planner_event_id or None, receipt.planner_resource_id or None
    if action == "ok":
        holding = Holding(True, send.interval) if operation != "delete" else Holding.absent()
        change = DeliveredChange(send.origin_id, version, holding, planner_event_id=event_id, planner_resource_id=resource_id, receipt=facts)
        return Settlement(action, change, Delivered())
    if action == "planner_originated":
        change = DeliveredChange(
            send.origin_id, version, Holding.absent(), planner_originated=True, planner_event_id=event_id, planner_resource_id=resource_id, receipt=facts
        )
        return Settlement(action, change, PlannerOriginated())
    next_operation = follow_up(action)
    if next_operation is not None and next_operation != operation and next_operation not in tried:
        return Settlement(action, None, FollowUp(Send(next_operation, send.origin_id, send.interval)))
    if action == "retry":
        return Settlement(action, None, Postpone(receipt.message or "Planner asked to retry", receipt.code))
    # dead_letter, or a follow-up already tried: the receipt is kept for support; the version is not,
    # since Planner did not take the state.
    change = DeliveredChange(send.origin_id, planner_event_id=event_id, planner_resource_id=resource_id, receipt=facts)
    return Settlement(action, change, Reject(receipt.message or f"Planner receipt code {receipt.code}", receipt.code))
