"""Everything one running Graph simulator holds: the calendar store (its own or an EWS simulator's), apps and
tokens, faults, delta rounds, in-flight requests per mailbox and the call log."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from simulators.exchange.store import Store

from .auth import Auth
from .delta import DeltaBook
from .faults import FaultBook


@dataclass(frozen=True)
class Call:
    endpoint: str
    mailbox: str | None
    status: int
    in_batch: bool
    time: datetime


@dataclass
class Settings:
    tenant: str = "sim-tenant"
    page_size: int = 10  # Graph's default page when no odata.maxpagesize is asked for
    max_page_size: int = 1000
    concurrency_limit: int = 4  # concurrent requests per mailbox before 429 MailboxConcurrency
    max_batch: int = 20
    token_lifetime: int = 3600


@dataclass
class GraphSimState:
    settings: Settings
    store: Store
    scheme: str = "http"
    auth: Auth = field(init=False)
    faults: FaultBook = field(default_factory=FaultBook)
    delta: DeltaBook = field(default_factory=DeltaBook)
    calls: list[Call] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.auth = Auth(self.settings.tenant, self.settings.token_lifetime)
        self._lock = threading.Lock()
        self._in_flight: Counter[str] = Counter()
        self.peak_in_flight: Counter[str] = Counter()

    @contextmanager
    def in_flight(self, mailboxes: list[str]) -> Iterator[list[str]]:
        """Count these requests as running; yields the mailboxes whose limit they break (one per extra request)."""
        over: list[str] = []
        with self._lock:
            for mailbox in mailboxes:
                self._in_flight[mailbox] += 1
                self.peak_in_flight[mailbox] = max(self.peak_in_flight[mailbox], self._in_flight[mailbox])
                if self._in_flight[mailbox] > self.settings.concurrency_limit:
                    over.append(mailbox)
        try:
            yield over
        finally:
            with self._lock:
                for mailbox in mailboxes:
                    self._in_flight[mailbox] -= 1

    def record(self, endpoint: str, mailbox: str | None, status: int, in_batch: bool = False) -> None:
        with self._lock:
            self.calls.append(Call(endpoint, mailbox, status, in_batch, datetime.now(UTC)))

    def call_log(self, endpoint: str | None = None, mailbox: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {"endpoint": c.endpoint, "mailbox": c.mailbox, "status": c.status, "in_batch": c.in_batch,
                 "time": c.time.isoformat()}
                for c in self.calls
                if (endpoint is None or c.endpoint == endpoint) and (mailbox is None or c.mailbox == mailbox)
            ]

    def clear_calls(self) -> None:
        with self._lock:
            self.calls.clear()
            self.peak_in_flight.clear()

    def reset(self) -> None:
        """Empty the store (shared with an EWS simulator on the same store!), faults, delta rounds, tokens, calls."""
        self.store.reset()
        self.faults.remove()
        self.delta.clear()
        self.auth.revoke_all()
        self.clear_calls()
