"""One read of one mailbox: what changed since its sync state becomes CalendarChange messages.

Gather (SyncFolderItems from the persisted sync state; for changed series one calendar view of the
window), decide (``changes_from_sync``: pure), apply (publish every message with confirms, *then*
save the new sync state, so a crash in between repeats the read instead of losing it).
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Protocol

from shared.contracts import CalendarChange, CalendarItem, Interval
from shared.ews import SyncChange

Publish = Callable[[CalendarChange], None]


class ExchangeReads(Protocol):
    def sync(self, mailbox: str, sync_state: str | None, page_size: int = 200) -> tuple[list[SyncChange], str]: ...

    def view(self, mailbox: str, window: Interval) -> list[CalendarItem]: ...


class SyncStates(Protocol):
    def sync_state(self, mailbox: str) -> dict | None: ...

    def save_sync_state(self, mailbox: str, **values: object) -> None: ...


def changes_from_sync(
    mailbox: str, changes: list[SyncChange], occurrences: dict[str, list[CalendarItem]], window: Interval, observed_at: datetime, source: str = "ews"
) -> list[CalendarChange]:
    """Pure: one CalendarChange per changed item; a series master carries its occurrences in the window."""
    messages = []
    for change in changes:
        correlation = uuid.uuid4().hex
        if change.change == "delete" or change.item is None:
            messages.append(
                CalendarChange(correlation_id=correlation, source=source, mailbox=mailbox, observed_at=observed_at, change="delete", item_id=change.item_id)  # type: ignore[arg-type]
            )
            continue
        item = change.item
        is_master = item.item_type == "master"
        messages.append(
            CalendarChange(
                correlation_id=correlation,
                source=source,  # type: ignore[arg-type]
                mailbox=mailbox,
                observed_at=observed_at,
                change="upsert",
                item_id=change.item_id,
                item=item,
                occurrences=occurrences.get(item.uid or "", []) if is_master else None,
                window=window if is_master else None,
            )
        )
    return messages


@dataclass(frozen=True)
class PassResult:
    published: int
    full_resync: bool


def sync_mailbox(
    mailbox: str, exchange: ExchangeReads, store: SyncStates, publish: Publish, window: Interval, observed_at: datetime, full: bool = False
) -> PassResult:
    """Read and publish one mailbox's changes. ``full`` (or a missing state) reads everything again."""
    saved = None if full else (store.sync_state(mailbox) or {}).get("sync_state")
    changes, new_state = exchange.sync(mailbox, saved)
    occurrences: dict[str, list[CalendarItem]] = defaultdict(list)
    if any(c.item is not None and c.item.item_type == "master" for c in changes):
        for item in exchange.view(mailbox, window):
            if item.item_type in ("occurrence", "exception") and item.uid:
                occurrences[item.uid].append(item)
    messages = changes_from_sync(mailbox, changes, occurrences, window, observed_at)
    for message in messages:
        publish(message)
    values: dict[str, object] = {"sync_state": new_state, "last_sync_at": observed_at}
    if saved is None:
        values["last_full_sync_at"] = observed_at
    store.save_sync_state(mailbox, **values)
    return PassResult(len(messages), saved is None)
