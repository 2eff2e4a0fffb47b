"""Mailboxes and their items, the single place calendar state changes; every change is announced to listeners.

All access goes through ``Store.lock``; ``Store.changed`` (a Condition on that lock) wakes open streams.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import structlog

from . import ids
from .item_spec import SpecError, parse_item, parse_original_start, parse_override, refuse_unknown
from .model import CALENDAR, DELETED_ITEMS, Item
from .recurrence import find_occurrence

log = structlog.get_logger()


class NotFound(LookupError):
    """A mailbox, item or occurrence that does not exist (the control API answers 404)."""


@dataclass
class Mailbox:
    address: str
    items: dict[int, Item] = field(default_factory=dict)
    sync_epoch: int = 0  # bumped by invalidate_sync_states: every state handed out before is rejected


@dataclass(frozen=True)
class Change:
    """One stored change, as subscriptions see it. kind: created, modified, deleted or moved."""

    mailbox: str
    kind: str
    key: int
    folder: str
    old_folder: str | None
    time: datetime


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class Store:
    """In-memory mailboxes. Keys and versions never repeat, not even across ``reset``."""

    def __init__(self, default_tz: str = "Romance Standard Time", clock: Callable[[], datetime] = _now) -> None:
        self.default_tz = default_tz
        self.clock = clock
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.mailboxes: dict[str, Mailbox] = {}
        self.listeners: list[Callable[[Change], None]] = []
        self._keys = itertools.count(1)
        self._versions = itertools.count(1)

    # mailboxes -------------------------------------------------------------------------------------------------
    def ensure_mailbox(self, address: str) -> Mailbox:
        with self.lock:
            canonical = address.strip().lower()
            if not canonical:
                raise SpecError("empty mailbox address")
            return self.mailboxes.setdefault(canonical, Mailbox(canonical))

    def invalidate_sync_states(self, address: str) -> int:
        """As after a mailbox move or restore: every sync state handed out so far is rejected from now on."""
        box = self.require(address)
        box.sync_epoch += 1
        return box.sync_epoch

    def mailbox(self, address: str) -> Mailbox | None:
        return self.mailboxes.get(address.strip().lower())

    def require(self, address: str) -> Mailbox:
        box = self.mailbox(address)
        if box is None:
            raise NotFound(f"no mailbox {address}")
        return box

    def reset(self) -> None:
        with self.lock:
            self.mailboxes.clear()
            self.changed.notify_all()

    # items -----------------------------------------------------------------------------------------------------
    def item(self, address: str, key: int) -> Item:
        box = self.require(address)
        if key not in box.items:
            raise NotFound(f"no item {key} in {address}")
        return box.items[key]

    def find(self, address: str, ref: str) -> Item:
        """An item by its EWS id, its numeric key or its UID."""
        box = self.require(address)
        with self.lock:
            if ref.isdigit() and int(ref) in box.items:
                return box.items[int(ref)]
            try:
                parsed = ids.parse_item_id(ref)
                if parsed.key in box.items and parsed.mailbox == box.address:
                    return box.items[parsed.key]
            except ids.BadId:
                pass
            for item in box.items.values():
                if item.uid == ref:
                    return item
        raise NotFound(f"no item {ref} in {address}")

    def add(self, address: str, spec: dict[str, Any]) -> Item:
        with self.lock:
            box = self.ensure_mailbox(address)
            refuse_unknown(spec)
            fields = parse_item(spec, self.default_tz)
            now = self.clock()
            item = Item(key=next(self._keys), created=now, last_modified=now, version=next(self._versions), **fields)
            box.items[item.key] = item
            self._announce(box, "created", item, None)
            return item

    def add_many(self, address: str, specs: list[dict[str, Any]]) -> list[Item]:
        with self.lock:
            return [self.add(address, spec) for spec in specs]

    def add_parsed(self, address: str, item: Item) -> Item:
        """Store an item built elsewhere (iCalendar import); key, version and times are assigned here."""
        with self.lock:
            box = self.ensure_mailbox(address)
            now = self.clock()
            stored = replace(item, key=next(self._keys), version=next(self._versions), created=now, last_modified=now)
            box.items[stored.key] = stored
            self._announce(box, "created", stored, None)
            return stored

    def update(self, address: str, key: int, spec: dict[str, Any], current: dict[str, Any]) -> Item:
        """Apply a partial JSON change; ``current`` is the item's JSON form the change is merged into."""
        with self.lock:
            box = self.require(address)
            item = self.item(address, key)
            refuse_unknown(spec)
            merged = {**current, **spec}
            if ("start" in spec or "end" in spec) and "all_day" not in spec:
                merged["all_day"] = len(str(merged["start"])) == 10
            fields = parse_item(merged, self.default_tz)
            fields["uid"] = spec.get("uid", item.uid)
            if "recurrence" in spec or "start" in spec:
                item.overrides.clear()
                item.deleted.clear()
            for name, value in fields.items():
                setattr(item, name, value)
            self._touch(item)
            self._announce(box, "modified", item, None)
            return item

    def delete(self, address: str, key: int) -> None:
        with self.lock:
            box = self.require(address)
            item = box.items.pop(key, None)
            if item is None:
                raise NotFound(f"no item {key} in {address}")
            self._announce(box, "deleted", item, None)

    def move(self, address: str, key: int, folder: str = DELETED_ITEMS) -> Item:
        with self.lock:
            box = self.require(address)
            item = self.item(address, key)
            if folder not in (CALENDAR, DELETED_ITEMS):
                raise SpecError(f"cannot move to {folder!r}")
            old = item.folder
            item.folder = folder
            self._touch(item)
            self._announce(box, "moved", item, old)
            return item

    def modify_occurrence(self, address: str, key: int, occurrence: dict[str, Any]) -> Item:
        with self.lock:
            box = self.require(address)
            item = self.item(address, key)
            original = self._occurrence_start(item, occurrence)
            override = parse_override(occurrence, item, original)
            override.last_modified = self.clock()
            item.overrides[original] = override
            item.deleted.discard(original)
            self._touch(item)
            self._announce(box, "modified", item, None)
            return item

    def delete_occurrence(self, address: str, key: int, occurrence: dict[str, Any]) -> Item:
        with self.lock:
            box = self.require(address)
            item = self.item(address, key)
            original = self._occurrence_start(item, occurrence)
            item.overrides.pop(original, None)
            item.deleted.add(original)
            self._touch(item)
            self._announce(box, "modified", item, None)
            return item

    # internals -------------------------------------------------------------------------------------------------
    def _occurrence_start(self, item: Item, ref: dict[str, Any]) -> datetime:
        if item.recurrence is None:
            raise SpecError("the item is not a recurring series")
        if ref.get("index") is not None:
            occ = find_occurrence(item, index=int(ref["index"]))
        elif ref.get("original_start"):
            occ = find_occurrence(item, original_start=parse_original_start(ref["original_start"], item))
        else:
            raise SpecError("name the occurrence by 'original_start' or 'index'")
        if occ is None:
            raise NotFound("no such occurrence in the series")
        return occ.original_start

    def _touch(self, item: Item) -> None:
        item.version = next(self._versions)
        item.last_modified = self.clock()

    def _announce(self, box: Mailbox, kind: str, item: Item, old_folder: str | None) -> None:
        change = Change(box.address, kind, item.key, item.folder, old_folder, self.clock())
        log.info("exchange_sim_item_changed", mailbox=box.address, change=kind, key=item.key, folder=item.folder)
        for listener in self.listeners:
            listener(change)
        self.changed.notify_all()
