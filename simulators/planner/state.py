"""What the Planner simulator holds: resources, events, injected faults and a log of calls (ids and codes only).

Pure data and decisions under one lock; no sockets and no XML here.
"""

from __future__ import annotations

import itertools
import re
import threading
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

EVENT_ID_NAMESPACE = uuid.UUID("5f1f6c3e-4c1a-4b7e-9a51-7d0c2b1c9e10")
NIL_GUID = "00000000-0000-0000-0000-000000000000"

CODE_OK = 0
CODE_ALREADY_EXISTS = 8
CODE_NOT_IN_PLANNER = 10
CODE_PLANNER_ORIGINATED = 13
MESSAGES = {
    CODE_ALREADY_EXISTS: "The calendar event already exists",
    CODE_NOT_IN_PLANNER: "The calendar event does not exist in Planner",
    CODE_PLANNER_ORIGINATED: "The calendar event originates from Planner",
}

FaultType = Literal["latency", "slow_answer", "http_status", "reset", "soap_fault", "receipt_code", "outage", "garbage"]
FAULT_TYPES: tuple[str, ...] = ("latency", "slow_answer", "http_status", "reset", "soap_fault", "receipt_code", "outage", "garbage")
GARBAGE_KINDS = ("not_xml", "billion_laughs", "oversized")


def event_guid(origin_id: str, email: str) -> str:
    """A stable CalendarEventIdentifier per (OriginSystemIdentifier, e-mail case-insensitive)."""
    return str(uuid.uuid5(EVENT_ID_NAMESPACE, f"{origin_id}\n{email.lower()}"))


def resource_guid(email: str) -> str:
    return str(uuid.uuid5(EVENT_ID_NAMESPACE, f"resource\n{email.lower()}"))


@dataclass(frozen=True)
class SimResource:
    name: str
    rid: str
    email: str
    planner_resource_id: str
    is_case_worker: bool = True
    description: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SimResource:
        email = str(data["email"])
        return cls(
            name=str(data.get("name", "")),
            rid=str(data.get("rid") or email[:64]),
            email=email,
            planner_resource_id=str(data.get("planner_resource_id") or resource_guid(email)),
            is_case_worker=bool(data.get("is_case_worker", True)),
            description=data.get("description"),
        )


@dataclass
class SimEvent:
    origin_id: str
    email: str
    start: datetime
    end: datetime
    calendar_event_identifier: str
    planner_resource_identifier: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "origin_id": self.origin_id,
            "email": self.email,
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "calendar_event_identifier": self.calendar_event_identifier,
            "planner_resource_identifier": self.planner_resource_identifier,
        }


@dataclass(frozen=True)
class EventInput:
    """One CalendarEvent of a request, as the simulator reads it."""

    origin_id: str
    email: str
    start: datetime
    end: datetime


@dataclass(frozen=True)
class ReceiptOutcome:
    origin_id: str
    code: int
    message: str | None
    calendar_event_identifier: str
    planner_resource_identifier: str | None


@dataclass
class Fault:
    """One injected fault. ``times`` None means every matching call; ``operations`` None means every operation."""

    id: int
    type: str
    operations: list[str] | None = None
    times: int | None = None
    seconds: float | None = None  # latency, slow_answer
    status: int | None = None  # http_status, outage mode "503" status, soap_fault HTTP status
    error_code: int | None = None  # soap_fault
    message: str | None = None  # soap_fault, receipt_code
    code: int | None = None  # receipt_code
    origin_ids: list[str] | None = None  # receipt_code
    until: datetime | None = None  # outage
    mode: str | None = None  # outage: "503" | "reset"
    kind: str | None = None  # garbage
    size: int | None = None  # garbage "oversized": body bytes
    declare_length: bool = True  # garbage "oversized": send Content-Length

    def to_json(self) -> dict[str, Any]:
        data = {key: value for key, value in asdict(self).items() if value is not None}
        if self.until is not None:
            data["until"] = self.until.isoformat()
        return data

    def applies_to(self, operation: str | None, now: datetime) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if self.operations is not None and operation not in self.operations:
            return False
        if self.type == "outage" and self.until is not None and now >= self.until:
            return False
        return True


def parse_fault(data: dict[str, Any], fault_id: int, now: datetime) -> Fault:
    """A Fault from the control API's JSON; raises ValueError naming what is wrong."""
    kind = data.get("type")
    if kind not in FAULT_TYPES:
        raise ValueError(f"type must be one of {list(FAULT_TYPES)}")
    operations = data.get("operations")
    if operations is not None and (not isinstance(operations, list) or not all(isinstance(op, str) for op in operations)):
        raise ValueError("operations must be a list of operation names")
    times = data.get("times")
    if times is not None and (not isinstance(times, int) or times < 1):
        raise ValueError("times must be a positive integer")
    fault = Fault(id=fault_id, type=kind, operations=operations, times=times)
    if kind in ("latency", "slow_answer"):
        fault.seconds = float(data.get("seconds", 0))
        if fault.seconds < 0:
            raise ValueError("seconds must be >= 0")
    elif kind == "http_status":
        fault.status = int(data.get("status", 503))
        if not 400 <= fault.status <= 599:
            raise ValueError("status must be 4xx or 5xx")
    elif kind == "soap_fault":
        fault.error_code = None if data.get("error_code") is None else int(data["error_code"])
        fault.message = str(data.get("message", "Injected fault"))
        fault.status = int(data.get("status", 500))
    elif kind == "receipt_code":
        if "code" not in data:
            raise ValueError("receipt_code needs code")
        fault.code = int(data["code"])
        fault.message = data.get("message")
        origin_ids = data.get("origin_ids")
        if not isinstance(origin_ids, list) or not origin_ids:
            raise ValueError("receipt_code needs a non-empty origin_ids list")
        fault.origin_ids = [str(origin) for origin in origin_ids]
    elif kind == "outage":
        if "until" in data:
            until = datetime.fromisoformat(str(data["until"]).replace("Z", "+00:00"))
            fault.until = until if until.tzinfo else until.replace(tzinfo=timezone.utc)
        else:
            fault.until = now + timedelta(seconds=float(data.get("seconds", 60)))
        fault.mode = str(data.get("mode", "503"))
        if fault.mode not in ("503", "reset"):
            raise ValueError('mode must be "503" or "reset"')
        fault.status = 503
    elif kind == "garbage":
        fault.kind = str(data.get("kind", "not_xml"))
        if fault.kind not in GARBAGE_KINDS:
            raise ValueError(f"kind must be one of {list(GARBAGE_KINDS)}")
        fault.size = int(data.get("size", 64 * 1024 * 1024))
        fault.declare_length = bool(data.get("declare_length", True))
    return fault


@dataclass
class CallRecord:
    operation: str | None
    time: datetime
    origin_ids: list[str] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)
    outcome: str = "ok"
    organisation: str | None = None   # the ActiveOrganisationHeader's OrganisationCode: the calling jobcentre

    def to_json(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "time": self.time.isoformat(),
            "origin_ids": list(self.origin_ids),
            "codes": list(self.codes),
            "outcome": self.outcome,
            "organisation": self.organisation,
        }


class SimState:
    """Everything the simulator remembers; every method takes the lock."""

    def __init__(self, resources: list[SimResource] | None = None, planner_uid_patterns: list[str] | None = None) -> None:
        self._lock = threading.Lock()
        self._seed = list(resources or [])
        self._resources = list(self._seed)
        self._patterns = [re.compile(pattern) for pattern in (planner_uid_patterns or [])]
        self._events: dict[tuple[str, str], SimEvent] = {}
        self._by_mailbox: dict[str, dict[tuple[str, str], SimEvent]] = {}   # the same events, per mailbox (GetEvents)
        self._faults: list[Fault] = []
        self._calls: list[CallRecord] = []
        self._ids = itertools.count(1)

    # -------------------------------------------------------------------------------- control

    def reset(self) -> None:
        with self._lock:
            self._resources = list(self._seed)
            self._events.clear()
            self._by_mailbox.clear()
            self._faults.clear()
            self._calls.clear()

    def set_resources(self, resources: list[SimResource]) -> None:
        with self._lock:
            self._resources = list(resources)

    def add_faults(self, specs: list[dict[str, Any]], now: datetime) -> list[Fault]:
        with self._lock:
            faults = [parse_fault(spec, next(self._ids), now) for spec in specs]
            self._faults.extend(faults)
            return list(faults)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def faults(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def record(self, call: CallRecord) -> None:
        with self._lock:
            self._calls.append(call)

    def calls(self) -> list[CallRecord]:
        with self._lock:
            return list(self._calls)

    def events(self, email: str | None = None) -> list[SimEvent]:
        with self._lock:
            held = self._events if email is None else self._by_mailbox.get(email.lower(), {})
            return [event for _, event in sorted(held.items())]

    def resources(self, emails: list[str] | None = None) -> list[SimResource]:
        wanted = {email.lower() for email in emails or []}
        with self._lock:
            return [resource for resource in self._resources if not wanted or resource.email.lower() in wanted]

    def health(self) -> dict[str, int]:
        with self._lock:
            return {"events": len(self._events), "resources": len(self._resources), "faults": len(self._faults)}

    # -------------------------------------------------------------------------------- faults for a call

    def call_faults(self, operation: str | None, now: datetime) -> list[Fault]:
        """The call-level faults that apply to this call: every latency, then at most one failure.

        Only the faults that are applied are counted, so ``times`` means "for the next N calls".
        """
        with self._lock:
            chosen = []
            failing = False
            for fault in self._faults:
                if fault.type == "receipt_code" or not fault.applies_to(operation, now):
                    continue
                if fault.type not in ("latency", "slow_answer"):
                    if failing:
                        continue
                    failing = True
                if fault.times is not None:
                    fault.times -= 1
                chosen.append(fault)
            return sorted(chosen, key=lambda f: f.type not in ("latency", "slow_answer"))

    def _forced_receipt(self, operation: str, origin_id: str, now: datetime) -> Fault | None:
        for fault in self._faults:
            if fault.type == "receipt_code" and fault.applies_to(operation, now) and origin_id in (fault.origin_ids or []):
                if fault.times is not None:
                    fault.times -= 1
                return fault
        return None

    # -------------------------------------------------------------------------------- operations

    def _resource_id(self, email: str) -> str | None:
        for resource in self._resources:
            if resource.email.lower() == email.lower():
                return resource.planner_resource_id
        return None

    def apply(self, operation: str, events: list[EventInput], now: datetime) -> list[ReceiptOutcome]:
        """CreateEvents / UpdateEvents / DeleteEvents: one receipt per event, in request order."""
        with self._lock:
            return [self._apply_one(operation, event, now) for event in events]

    def _apply_one(self, operation: str, event: EventInput, now: datetime) -> ReceiptOutcome:
        key = (event.origin_id, event.email.lower())
        resource_id = self._resource_id(event.email)
        stored = self._events.get(key)

        def outcome(code: int, message: str | None = None) -> ReceiptOutcome:
            guid = stored.calendar_event_identifier if stored else (event_guid(*key) if code == CODE_OK else NIL_GUID)
            return ReceiptOutcome(event.origin_id, code, message if message is not None else MESSAGES.get(code), guid, resource_id)

        forced = self._forced_receipt(operation, event.origin_id, now)
        if forced is not None and forced.code is not None:
            return outcome(forced.code, forced.message)
        if any(pattern.search(event.origin_id) for pattern in self._patterns):
            return outcome(CODE_PLANNER_ORIGINATED)
        if operation == "CreateEvents":
            if stored is not None:
                return outcome(CODE_ALREADY_EXISTS)
            stored = SimEvent(event.origin_id, event.email, event.start, event.end, event_guid(*key), resource_id)
            self._events[key] = stored
            self._by_mailbox.setdefault(key[1], {})[key] = stored
            return outcome(CODE_OK)
        if stored is None:
            return outcome(CODE_NOT_IN_PLANNER)
        if operation == "UpdateEvents":
            stored.start, stored.end = event.start, event.end
            return outcome(CODE_OK)
        del self._events[key]
        self._by_mailbox.get(key[1], {}).pop(key, None)
        return outcome(CODE_OK)

    def find_events(self, emails: list[str], start_from: datetime | None, start_to: datetime | None) -> list[SimEvent]:
        wanted = {email.lower() for email in emails}
        with self._lock:
            found = []
            held = [item for mailbox in sorted(wanted) for item in self._by_mailbox.get(mailbox, {}).items()] if wanted else list(self._events.items())
            for (_, mailbox), event in sorted(held):
                if start_from is not None and event.start < start_from:
                    continue
                if start_to is not None and event.start > start_to:
                    continue
                found.append(event)
            return found
