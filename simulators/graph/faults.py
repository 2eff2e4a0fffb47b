"""Scripted faults for the Graph simulator: per mailbox and/or endpoint, for the next N matching calls or a period.

kinds (status, Graph error code):
  throttle               429 ApplicationThrottled (or "code") with Retry-After: "retry_after" seconds (default 2)
  unavailable            503 ServiceUnavailable with Retry-After
  forbidden              403 ErrorAccessDenied (outside the app's RBAC scope / application access policy)
  not_found              404 ErrorInvalidUser (no such mailbox)
  sync_state_not_found   410 SyncStateNotFound (or "code", e.g. resyncRequired) on delta calls with a token
  server_error           500 (or "status" 5xx) ErrorInternalServerError (or "code")
  latency                the answer is delayed by "latency_ms" (combines with one other fault)
  drip                   the body is sent "drip_bytes" (1) at a time every "drip_interval_ms" (500); a dripping
                         part of a $batch makes the whole batch answer drip (Graph answers when all parts are done)
  no_ical_uid            instances are served without iCalUId (the adapter then reads the series master)
  delta_replay           the next delta page repeats its entries (Graph replays; order is not guaranteed)
  phantom_removal        the next delta page also removes an item the client never saw
  token_error            the token endpoint answers 401 "code" (default invalid_client)
endpoints: calendarView, delta, events, instances, batch (the outer $batch call), token.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

KINDS = (
    "throttle", "unavailable", "forbidden", "not_found", "sync_state_not_found", "server_error", "latency", "drip",
    "no_ical_uid", "delta_replay", "phantom_removal", "token_error",
)
ENDPOINTS = ("calendarView", "delta", "events", "instances", "batch", "token")
# kinds that change the answer's status: (status, default code)
ERROR_KINDS = {
    "throttle": (429, "ApplicationThrottled"),
    "unavailable": (503, "ServiceUnavailable"),
    "forbidden": (403, "ErrorAccessDenied"),
    "not_found": (404, "ErrorInvalidUser"),
    "sync_state_not_found": (410, "SyncStateNotFound"),
    "server_error": (500, "ErrorInternalServerError"),
}
_ids = itertools.count(1)


class FaultSpecError(ValueError):
    """A fault description the control API cannot accept."""


@dataclass
class Fault:
    kind: str
    mailbox: str | None = None
    endpoints: frozenset[str] | None = None
    remaining: int | None = None  # None = unlimited (within the period)
    until: float | None = None  # monotonic deadline
    code: str | None = None
    status: int | None = None
    retry_after: int = 2
    latency_ms: int = 0
    drip_bytes: int = 1
    drip_interval_ms: int = 500
    id: int = field(default_factory=lambda: next(_ids))

    def matches(self, endpoint: str, mailbox: str | None, now: float) -> bool:
        if self.until is not None and now > self.until:
            return False
        if self.remaining is not None and self.remaining <= 0:
            return False
        if self.endpoints is not None and endpoint not in self.endpoints:
            return False
        return self.mailbox is None or (mailbox is not None and mailbox == self.mailbox)

    def answer(self) -> tuple[int, str]:
        status, code = ERROR_KINDS[self.kind]
        return (self.status or status), (self.code or code)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "mailbox": self.mailbox,
            "endpoints": sorted(self.endpoints) if self.endpoints else None, "remaining": self.remaining,
            "seconds_left": None if self.until is None else max(0.0, round(self.until - time.monotonic(), 3)),
            "code": self.code, "status": self.status, "retry_after": self.retry_after, "latency_ms": self.latency_ms,
            "drip_bytes": self.drip_bytes, "drip_interval_ms": self.drip_interval_ms,
        }


def parse_fault(spec: dict[str, Any]) -> Fault:
    kind = spec.get("kind")
    if kind not in KINDS:
        raise FaultSpecError(f"kind must be one of {', '.join(KINDS)}")
    endpoints = spec.get("endpoints") or ([spec["endpoint"]] if spec.get("endpoint") else None)
    if kind == "sync_state_not_found":
        endpoints = ["delta"]
    elif kind in ("delta_replay", "phantom_removal"):
        endpoints = ["delta"]
    elif kind == "token_error":
        endpoints = ["token"]
    unknown = sorted(set(endpoints or ()) - set(ENDPOINTS))
    if unknown:
        raise FaultSpecError(f"unknown endpoints {unknown}; known: {', '.join(ENDPOINTS)}")
    status = spec.get("status")
    if status is not None and (kind != "server_error" or not 500 <= int(status) <= 599):
        raise FaultSpecError("'status' is only for server_error (500-599)")
    seconds = spec.get("seconds")
    return Fault(
        kind=kind,
        mailbox=spec["mailbox"].strip().lower() if spec.get("mailbox") else None,
        endpoints=frozenset(endpoints) if endpoints else None,
        remaining=int(spec["count"]) if spec.get("count") is not None else None,
        until=time.monotonic() + float(seconds) if seconds is not None else None,
        code=spec.get("code"),
        status=int(status) if status is not None else None,
        retry_after=int(spec.get("retry_after", 2)),
        latency_ms=int(spec.get("latency_ms", 0)),
        drip_bytes=max(1, int(spec.get("drip_bytes", 1))),
        drip_interval_ms=int(spec.get("drip_interval_ms", 500)),
    )


class FaultBook:
    """Active faults. ``take`` consumes the matching faults of the given kinds (at most one error kind per call)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.faults: list[Fault] = []

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def remove(self, fault_id: int | None = None) -> None:
        with self._lock:
            self.faults = [] if fault_id is None else [f for f in self.faults if f.id != fault_id]

    def take(self, endpoint: str, mailbox: str | None, kinds: tuple[str, ...]) -> list[Fault]:
        now = time.monotonic()
        taken: list[Fault] = []
        with self._lock:
            error_taken = False
            for fault in self.faults:
                if fault.kind not in kinds or not fault.matches(endpoint, mailbox, now):
                    continue
                if fault.kind in ERROR_KINDS or fault.kind == "token_error":
                    if error_taken:
                        continue
                    error_taken = True
                if fault.remaining is not None:
                    fault.remaining -= 1
                taken.append(fault)
            self._prune(now)
        return taken

    def _prune(self, now: float) -> None:
        self.faults = [f for f in self.faults if (f.remaining is None or f.remaining > 0) and (f.until is None or f.until > now)]

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            self._prune(time.monotonic())
            return [f.describe() for f in self.faults]
