"""Everything one running simulator holds: store, subscriptions, faults, call log and settings."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .faults import FaultBook
from .store import Store
from .subscriptions import Subscriptions


@dataclass(frozen=True)
class Call:
    operation: str
    mailbox: str | None
    time: datetime  # when the answer was ready
    outcome: str  # NoError, a fault kind, or an HTTP status
    started: datetime | None = None  # when the request arrived (its headers were read)
    client: str | None = None  # the request's User-Agent: which client (which replica) called


@dataclass
class Settings:
    users: dict[str, str]
    minute_seconds: float = 60.0  # how long a "minute" lasts for ConnectionTimeout and pull Timeout
    keepalive_seconds: float = 5.0  # keep-alive envelopes on an idle stream
    view_limit: int = 1000  # EWSFindCountLimit
    events_page: int = 50  # GetEvents MoreEvents page size
    default_tz: str = "Romance Standard Time"


@dataclass
class SimState:
    settings: Settings
    store: Store = field(init=False)
    subs: Subscriptions = field(init=False)
    faults: FaultBook = field(default_factory=FaultBook)
    calls: list[Call] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.store = Store(default_tz=self.settings.default_tz)
        self.subs = Subscriptions(self.store, self.settings.minute_seconds)
        self._calls_lock = threading.Lock()

    def record(self, operation: str, mailbox: str | None, outcome: str, started: datetime | None = None, client: str | None = None) -> None:
        with self._calls_lock:
            self.calls.append(Call(operation, mailbox, datetime.now(UTC), outcome, started, client))

    def call_log(self, operation: str | None = None, mailbox: str | None = None) -> list[dict[str, Any]]:
        with self._calls_lock:
            return [
                {"operation": c.operation, "mailbox": c.mailbox, "time": c.time.isoformat(), "outcome": c.outcome,
                 "started": c.started.isoformat() if c.started else None, "client": c.client}
                for c in self.calls
                if (operation is None or c.operation == operation) and (mailbox is None or c.mailbox == mailbox)
            ]

    def clear_calls(self) -> None:
        with self._calls_lock:
            self.calls.clear()

    def reset(self) -> None:
        """Empty mailboxes, subscriptions, faults and the call log (settings and users stay)."""
        self.subs.clear()
        self.store.reset()
        self.faults.remove()
        self.clear_calls()
