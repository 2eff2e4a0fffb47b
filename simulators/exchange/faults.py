"""Scripted faults: per mailbox and/or operation, for the next N matching calls or for a period.

kinds:
  server_busy            SOAP fault ErrorServerBusy with BackOffMilliseconds (HTTP 500)
  http_503               HTTP 503 with Retry-After
  impersonation_denied   SOAP fault ErrorImpersonateUserDenied
  nonexistent_mailbox    SOAP fault ErrorNonExistentMailbox
  mailbox_move           SOAP fault ErrorMailboxMoveInProgress
  soap_fault             any SOAP fault: "code"
  invalid_sync_state     SyncFolderItems answers ErrorInvalidSyncStateData (with an empty SyncState)
  response_error         any operation answers an Error ResponseMessage with "code"
  latency                the response is delayed by "latency_ms"
  drip                   the answer's headers (with its Content-Length) go at once, its body 64 bytes every "interval_ms"
  stream_expire          an open stream reports its subscription gone ("code", default ErrorSubscriptionNotFound)
  stream_silent          an open stream stops sending anything (no keep-alives) but stays open
  stream_cut             an open stream is cut in the middle of a chunk
Stream faults act "after_seconds" (default 0.5) into a GetStreamingEvents.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

KINDS = (
    "server_busy", "http_503", "impersonation_denied", "nonexistent_mailbox", "mailbox_move", "soap_fault",
    "invalid_sync_state", "response_error", "latency", "drip", "stream_expire", "stream_silent", "stream_cut",
)
SOAP_FAULT_CODES = {
    "server_busy": "ErrorServerBusy",
    "impersonation_denied": "ErrorImpersonateUserDenied",
    "nonexistent_mailbox": "ErrorNonExistentMailbox",
    "mailbox_move": "ErrorMailboxMoveInProgress",
}
STREAM_KINDS = ("stream_expire", "stream_silent", "stream_cut")
_ids = itertools.count(1)


class FaultSpecError(ValueError):
    """A fault description the control API cannot accept."""


@dataclass
class Fault:
    kind: str
    mailbox: str | None = None
    operations: frozenset[str] | None = None
    remaining: int | None = None  # None = unlimited (within the period)
    until: float | None = None  # monotonic deadline
    code: str | None = None
    back_off_ms: int = 5000
    retry_after: int = 2
    latency_ms: int = 0
    interval_ms: int = 1000
    after_seconds: float = 0.5
    id: int = field(default_factory=lambda: next(_ids))

    def matches(self, operation: str, mailbox: str | None, now: float) -> bool:
        if self.until is not None and now > self.until:
            return False
        if self.remaining is not None and self.remaining <= 0:
            return False
        if self.operations is not None and operation not in self.operations:
            return False
        return self.mailbox is None or (mailbox is not None and mailbox == self.mailbox)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "mailbox": self.mailbox,
            "operations": sorted(self.operations) if self.operations else None, "remaining": self.remaining,
            "seconds_left": None if self.until is None else max(0.0, round(self.until - time.monotonic(), 3)),
            "code": self.code, "back_off_ms": self.back_off_ms, "retry_after": self.retry_after,
            "latency_ms": self.latency_ms, "interval_ms": self.interval_ms, "after_seconds": self.after_seconds,
        }


def parse_fault(spec: dict[str, Any]) -> Fault:
    kind = spec.get("kind")
    if kind not in KINDS:
        raise FaultSpecError(f"kind must be one of {', '.join(KINDS)}")
    if kind in ("soap_fault", "response_error") and not spec.get("code"):
        raise FaultSpecError(f"{kind} needs 'code' (an EWS error name such as ErrorInternalServerError)")
    ops = spec.get("operations") or ([spec["operation"]] if spec.get("operation") else None)
    if kind == "invalid_sync_state":
        ops = ["SyncFolderItems"]
    if kind in STREAM_KINDS:
        ops = ["GetStreamingEvents"]
    seconds = spec.get("seconds")
    return Fault(
        kind=kind,
        mailbox=spec["mailbox"].lower() if spec.get("mailbox") else None,
        operations=frozenset(ops) if ops else None,
        remaining=int(spec["count"]) if spec.get("count") is not None else None,
        until=time.monotonic() + float(seconds) if seconds is not None else None,
        code=spec.get("code"),
        back_off_ms=int(spec.get("back_off_ms", 5000)),
        retry_after=int(spec.get("retry_after", 2)),
        latency_ms=int(spec.get("latency_ms", 0)),
        interval_ms=int(spec.get("interval_ms", 1000)),
        after_seconds=float(spec.get("after_seconds", 0.5)),
    )


class FaultBook:
    """Active faults; ``take`` consumes one matching fault per call (latency faults combine with others)."""

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

    def take(self, operation: str, mailbox: str | None, kinds: tuple[str, ...] | None = None) -> list[Fault]:
        """Matching faults for this call: all latency faults plus the first other one; counts are consumed."""
        now = time.monotonic()
        taken: list[Fault] = []
        with self._lock:
            other_taken = False
            for fault in self.faults:
                if kinds is not None and fault.kind not in kinds:
                    continue
                if not fault.matches(operation, mailbox, now):
                    continue
                if fault.kind != "latency":
                    if other_taken:
                        continue
                    other_taken = True
                if fault.remaining is not None:
                    fault.remaining -= 1
                taken.append(fault)
            self.faults = [
                f for f in self.faults
                if (f.remaining is None or f.remaining > 0) and (f.until is None or f.until > now)
            ]
        return taken

    def describe(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        with self._lock:
            self.faults = [f for f in self.faults if (f.remaining is None or f.remaining > 0)
                           and (f.until is None or f.until > now)]
            return [f.describe() for f in self.faults]
