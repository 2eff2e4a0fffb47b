"""The Planner simulator's in-memory model (``SimState``) behind the client interface the publisher uses.

No sockets and no XML: a call goes straight to ``SimState.apply``. Faults are injected the
simulator's way (``fault(type=...)``); a call-level fault becomes the exception the real client
raises for it, classified by the real client's ``classify``. Latency faults are counted but
not slept. One capability ``SimState`` lacks is kept here: leaving one event's receipt out of
an answer (``drop_receipt_for``). Receipts come back in reverse request order, so a caller that
matches by position instead of by OriginSystemIdentifier fails.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Protocol, Sequence

import requests
import zeep.exceptions
from lxml import etree

from shared.adapters.planner_client import CallResult, Receipt, ResponseTooLarge, classify
from shared.adapters.planner_contract import Namespaces
from shared.domain.contracts import Interval
from simulators.planner.state import CallRecord, EventInput, Fault, SimState

OPERATIONS = {"create": "CreateEvents", "update": "UpdateEvents", "delete": "DeleteEvents"}
SHORT = {name: short for short, name in OPERATIONS.items()}


class EventLike(Protocol):
    origin_id: str
    email: str
    start: datetime
    end: datetime


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class PlannerModel:
    """create_events / update_events / delete_events against a ``SimState``, answered like ``PlannerClient``."""

    state: SimState = field(default_factory=SimState)
    clock: Callable[[], datetime] = _now
    drop_receipt_for: set[str] = field(default_factory=set)

    # ------------------------------------------------------------------------------ the client interface

    def create_events(self, events: Sequence[EventLike]) -> CallResult:
        return self._call("CreateEvents", events)

    def update_events(self, events: Sequence[EventLike]) -> CallResult:
        return self._call("UpdateEvents", events)

    def delete_events(self, events: Sequence[EventLike]) -> CallResult:
        return self._call("DeleteEvents", events)

    # ------------------------------------------------------------------------------ test controls

    def fault(self, **spec: Any) -> None:
        """Inject one fault, as the simulator's control API takes it (see ``simulators.planner.state.parse_fault``)."""
        self.state.add_faults([spec], self.clock())

    def force_code(self, origin_id: str, code: int, times: int | None = None) -> None:
        """Answer every call for ``origin_id`` (or the next ``times``) with receipt ``code``."""
        spec: dict[str, Any] = {"type": "receipt_code", "code": code, "origin_ids": [origin_id]}
        if times is not None:
            spec["times"] = times
        self.state.add_faults([spec], self.clock())

    def holds(self, origin_id: str, email: str) -> tuple[datetime, datetime] | None:
        """The times Planner holds for an event, or None."""
        for event in self.state.events(email):
            if event.origin_id == origin_id:
                return event.start, event.end
        return None

    def seed(self, origin_id: str, email: str, interval: Interval) -> None:
        """Planner already holds an event (put there outside the call log)."""
        self.state.apply("CreateEvents", [EventInput(origin_id, email, interval.start, interval.end)], self.clock())

    def forget(self, origin_id: str, email: str) -> None:
        """Planner lost an event (removed outside the call log)."""
        held = self.holds(origin_id, email)
        if held is not None:
            self.state.apply("DeleteEvents", [EventInput(origin_id, email, *held)], self.clock())

    @property
    def calls(self) -> list[tuple[str, list[str]]]:
        """The call log as (create|update|delete, origin ids), in order."""
        return [(SHORT.get(call.operation or "", call.operation or ""), list(call.origin_ids)) for call in self.state.calls()]

    # ------------------------------------------------------------------------------ one call

    def _call(self, operation: str, events: Sequence[EventLike]) -> CallResult:
        now = self.clock()
        call = CallRecord(operation, now, origin_ids=[event.origin_id for event in events], outcome="pending")
        self.state.record(call)  # on arrival, as the simulator does
        for fault in self.state.call_faults(operation, now):
            if fault.type != "latency":
                call.outcome = fault.type
                raise classify(_client_error(fault), operation)
        outcomes = self.state.apply(operation, [EventInput(e.origin_id, e.email, e.start, e.end) for e in events], now)
        call.codes = [outcome.code for outcome in outcomes]
        call.outcome = "ok"
        receipts = [
            Receipt(
                origin_id=outcome.origin_id,
                code=outcome.code,
                message=outcome.message,
                planner_event_id=outcome.calendar_event_identifier,
                planner_resource_id=outcome.planner_resource_identifier,
                received_at=now,
                conflict_notification_sent=False,
            )
            for outcome in reversed(outcomes)
            if outcome.origin_id not in self.drop_receipt_for
        ]
        return CallResult(receipts=receipts, reference=str(uuid.uuid4()))


def _client_error(fault: Fault) -> BaseException:
    """The exception the real client's transport or zeep would raise for a call-level fault."""
    if fault.type == "reset" or (fault.type == "outage" and fault.mode == "reset"):
        return requests.ConnectionError("connection reset by peer")
    if fault.type in ("http_status", "outage"):
        return zeep.exceptions.TransportError(status_code=fault.status or 503)  # type: ignore[no-untyped-call]
    if fault.type == "soap_fault":
        detail = etree.Element("detail")
        if fault.error_code is not None:
            details = etree.SubElement(detail, f"{{{Namespaces.FAULT}}}FaultDetails")
            etree.SubElement(details, f"{{{Namespaces.FAULT}}}ErrorCode").text = str(fault.error_code)
        return zeep.exceptions.Fault(fault.message or "Injected fault", code="Server", detail=detail)  # type: ignore[no-untyped-call]
    if fault.kind == "billion_laughs":
        return zeep.exceptions.EntitiesForbidden("lol", "")  # type: ignore[no-untyped-call]
    if fault.kind == "oversized":
        return ResponseTooLarge("response exceeds the cap")
    return zeep.exceptions.XMLParseError("not XML")  # type: ignore[no-untyped-call]


class Pauser:
    """Stands in for the consumer the outage guard pauses; remembers why."""

    def __init__(self) -> None:
        self.paused: list[str] = []

    def pause_until(self, moment: float, reason: str) -> None:
        self.paused.append(reason)
