"""Pull and streaming subscriptions: per-subscription event queues fed by store changes, with watermarks."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime

import structlog

from . import ids
from .model import CALENDAR
from .store import Change, Store

log = structlog.get_logger()

EVENT_TYPES = (
    "CopiedEvent", "CreatedEvent", "DeletedEvent", "ModifiedEvent", "MovedEvent", "NewMailEvent", "FreeBusyChangedEvent",
)
_MAIN_EVENT = {"created": "CreatedEvent", "modified": "ModifiedEvent", "deleted": "DeletedEvent", "moved": "MovedEvent"}


@dataclass(frozen=True)
class Event:
    seq: int
    type: str
    time: datetime
    mailbox: str
    key: int
    version: int
    folder: str
    old_folder: str | None


@dataclass
class Subscription:
    id: str
    mailbox: str
    kind: str  # "pull" or "streaming"
    folders: frozenset[str] | None  # None = all folders
    event_types: frozenset[str]
    timeout_seconds: float | None  # pull only: expires when not polled for this long
    last_used: float = field(default_factory=time.monotonic)
    events: list[Event] = field(default_factory=list)
    next_seq: int = 1
    stream_cursor: int = 0
    gone: str | None = None  # error code once expired or removed by a fault

    @property
    def last_seq(self) -> int:
        return self.next_seq - 1


class SubscriptionError(Exception):
    """An EWS error about a subscription id (ErrorSubscriptionNotFound, ErrorExpiredSubscription...)."""

    def __init__(self, code: str, subscription_id: str) -> None:
        super().__init__(f"{code}: {subscription_id}")
        self.code = code
        self.subscription_id = subscription_id


class Subscriptions:
    """All subscriptions of the simulator; listens to the store and queues events for matching ones."""

    def __init__(self, store: Store, minute_seconds: float) -> None:
        self.store = store
        self.minute_seconds = minute_seconds
        self.by_id: dict[str, Subscription] = {}
        self.by_mailbox: dict[str, dict[str, Subscription]] = {}   # the same, by mailbox: a change looks at its own
        self._lock = threading.RLock()
        self._stamp = itertools.count(1)
        store.listeners.append(self.on_change)

    def subscribe(
        self, mailbox: str, kind: str, folders: frozenset[str] | None, event_types: frozenset[str],
        timeout_minutes: int | None = None,
    ) -> Subscription:
        sid = ids._encode("S", mailbox, uuid.uuid4().hex)  # noqa: SLF001 - same opaque format as other ids
        timeout = timeout_minutes * self.minute_seconds if timeout_minutes else None
        sub = Subscription(sid, mailbox, kind, folders, event_types, timeout)
        with self._lock:
            self.by_id[sid] = sub
            self.by_mailbox.setdefault(mailbox, {})[sid] = sub
        log.info("exchange_sim_subscribed", mailbox=mailbox, kind=kind, subscription=sid[-12:])
        return sub

    def get(self, subscription_id: str) -> Subscription:
        with self._lock:
            sub = self.by_id.get(subscription_id)
            if sub is None:
                raise SubscriptionError("ErrorSubscriptionNotFound", subscription_id)
            if sub.gone:
                raise SubscriptionError(sub.gone, subscription_id)
            if sub.timeout_seconds and time.monotonic() - sub.last_used > sub.timeout_seconds:
                sub.gone = "ErrorExpiredSubscription"
                raise SubscriptionError(sub.gone, subscription_id)
            sub.last_used = time.monotonic()
            return sub

    def unsubscribe(self, subscription_id: str) -> None:
        with self._lock:
            sub = self.get(subscription_id)
            del self.by_id[subscription_id]
            self.by_mailbox.get(sub.mailbox, {}).pop(subscription_id, None)

    def expire(self, subscription_id: str, code: str = "ErrorSubscriptionNotFound") -> None:
        """Make a subscription disappear (fault injection); an open stream reports it."""
        with self.store.lock:
            sub = self.by_id.get(subscription_id)
            if sub is not None:
                sub.gone = code
            self.store.changed.notify_all()

    def clear(self) -> None:
        with self._lock:
            for sub in self.by_id.values():
                sub.gone = "ErrorSubscriptionNotFound"
            self.by_id.clear()
            self.by_mailbox.clear()

    def on_change(self, change: Change) -> None:
        types = [_MAIN_EVENT[change.kind]]
        if CALENDAR in (change.folder, change.old_folder):
            types.append("FreeBusyChangedEvent")
        box = self.store.mailbox(change.mailbox)
        item = box.items.get(change.key) if box else None
        version = item.version if item else 0
        with self._lock:
            for sub in self.by_mailbox.get(change.mailbox, {}).values():   # not every subscription of every mailbox
                if sub.mailbox != change.mailbox or sub.gone:
                    continue
                if sub.folders is not None and not ({change.folder, change.old_folder} & sub.folders):
                    continue
                for event_type in types:
                    if event_type in sub.event_types:
                        sub.events.append(Event(sub.next_seq, event_type, change.time, change.mailbox, change.key,
                                                version, change.folder, change.old_folder))
                        sub.next_seq += 1

    def pull(self, sub: Subscription, after_seq: int, limit: int) -> tuple[list[Event], bool]:
        """Events after a watermark (acknowledging everything up to it), at most ``limit``, and whether more wait."""
        with self._lock:
            sub.events = [e for e in sub.events if e.seq > after_seq]
            return sub.events[:limit], len(sub.events) > limit

    def take_for_stream(self, sub: Subscription) -> list[Event]:
        with self._lock:
            fresh = [e for e in sub.events if e.seq > sub.stream_cursor]
            if fresh:
                sub.stream_cursor = fresh[-1].seq
                sub.events = []
            return fresh
