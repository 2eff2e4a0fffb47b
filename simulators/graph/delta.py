"""calendarView/delta rounds: the window is fixed by a round's first call; pages follow $skiptoken nextLinks; the
last page carries a $deltatoken deltaLink. A later round returns changed instances in full and gone ones as
``@removed``.

Tokens are random and kept here (the newest ``limit`` of them); an evicted, unknown or other mailbox's token is
answered 410 SyncStateNotFound, as Graph does for an expired one. What the client knows is a fingerprint per
instance id: any change of the rendered event (content included, as in Graph) sends it again.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any


class UnknownToken(LookupError):
    """A $deltatoken or $skiptoken this simulator does not (or no longer) know."""


@dataclass(frozen=True)
class Round:
    """What a deltaLink stands for: a mailbox, the round's window and what the client knows after it."""

    mailbox: str
    start: datetime
    end: datetime
    known: dict[str, str]  # instance id -> fingerprint


@dataclass(frozen=True)
class Pending:
    """The rest of one delta response, served page by page through $skiptoken."""

    mailbox: str
    start: datetime
    end: datetime
    entries: list[dict[str, Any]]
    known_after: dict[str, str]


def fingerprint(event: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(event, sort_keys=True, default=str).encode()).hexdigest()[:24]


def changes(known: dict[str, str], current: dict[str, tuple[str, dict[str, Any]]],
            removed: Any) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Entries for a round (new or changed instances in full, gone ones as removals) and what is known after it.

    ``current``: instance id -> (fingerprint, event JSON); ``removed(id)`` builds a removal entry.
    """
    entries = [event for event_id, (fp, event) in current.items() if known.get(event_id) != fp]
    entries += [removed(event_id) for event_id in known if event_id not in current]
    return entries, {event_id: fp for event_id, (fp, _event) in current.items()}


class DeltaBook:
    """Delta and skip tokens of all mailboxes, the newest ``limit`` of each kind."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._rounds: OrderedDict[str, Round] = OrderedDict()
        self._pending: OrderedDict[str, Pending] = OrderedDict()

    def _keep(self, book: OrderedDict[str, Any], value: Any) -> str:
        token = secrets.token_urlsafe(24)
        book[token] = value
        while len(book) > self.limit:
            book.popitem(last=False)
        return token

    def round(self, token: str, mailbox: str) -> Round:
        with self._lock:
            found = self._rounds.get(token)
        if found is None or found.mailbox != mailbox:
            raise UnknownToken(token)
        return found

    def pending(self, token: str, mailbox: str) -> Pending:
        with self._lock:
            found = self._pending.get(token)
        if found is None or found.mailbox != mailbox:
            raise UnknownToken(token)
        return found

    def page(self, pending: Pending, size: int) -> tuple[list[dict[str, Any]], str, bool]:
        """The next ``size`` entries and the token for what follows: a skiptoken, or (last page) a deltatoken."""
        page, rest = pending.entries[:size], pending.entries[size:]
        with self._lock:
            if rest:
                return page, self._keep(self._pending, Pending(pending.mailbox, pending.start, pending.end, rest,
                                                               pending.known_after)), False
            return page, self._keep(self._rounds, Round(pending.mailbox, pending.start, pending.end,
                                                        pending.known_after)), True

    def clear(self) -> None:
        with self._lock:
            self._rounds.clear()
            self._pending.clear()
