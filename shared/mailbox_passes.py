"""One pass over one mailbox, for any calendar source: gather through a reader, decide (pure), publish, record.

- ``sync_mailbox``: what changed since the stored sync state becomes ``CalendarChange`` messages. Every message
  is published (confirmed) *before* the new sync state is saved, so a crash in between repeats the read instead
  of losing it. ``publish_sync`` is its second half, for changes read elsewhere (several Graph mailboxes' delta
  pages read together through ``$batch``).
- ``resync_mailbox``: a read from nothing and a snapshot of the window read after it, published together, then the
  state saved: for a mailbox whose sync state was refused, or whose first read may have published and then failed.
- ``snapshot_mailbox``: the whole window is read before the first part is published, so a read that fails half
  way publishes nothing; a publish that fails half way may leave some parts queued, and an incomplete snapshot
  (not every part recorded) never makes the transformer delete anything.

``publish`` takes all of a pass's messages at once and returns when every one is confirmed, in order, one
confirm wait for all of them (decision 76), not one round trip per message.
- ``rebase_mailbox``: Graph's snapshot: a new delta round over the window is the whole window; its items are
  published as a snapshot, then the round's delta link is saved, so the changes that follow are read over the new
  window (decision 67 in docs/decisions.md).

The reader is an adapter (EWS or Graph) seen through the small protocols below; nothing here imports one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from threading import Lock
from typing import Callable, Generic, Protocol, Sequence, TypeVar

from shared.domain.contracts import (
    CalendarChange,
    CalendarItem,
    CalendarSnapshot,
    Interval,
    Source,
)
from shared.domain.mailbox_reads import (
    Backend,
    SyncChange,
    SyncPosition,
    changes_from_sync,
    series_occurrences,
    snapshot_parts,
)


class ViewReader(Protocol):
    def view(self, mailbox: str, window: Interval) -> list[CalendarItem]: ...


class SeriesReader(ViewReader, Protocol):
    def occurrences(self, mailbox: str, window: Interval) -> list[CalendarItem]: ...   # the view's instances, at least


class SyncReader(SeriesReader, Protocol):
    def sync(self, mailbox: str, sync_state: str | None, page_size: int = 200) -> tuple[list[SyncChange], str]: ...


class RebaseReader(Protocol):
    def rebase(self, mailbox: str, window: Interval) -> tuple[list[CalendarItem], str]: ...


class SyncPositions(Protocol):
    def sync_position(self, mailbox: str) -> SyncPosition | None: ...

    def save_sync_position(self, mailbox: str, sync_state: str, read_at: datetime, full: bool, backend: Backend = "ews") -> object: ...


@dataclass(frozen=True)
class PassResult:
    published: int
    full_resync: bool


class Unread(Enum):
    READ_IT = "read it"   # ``sync_mailbox``'s default: the stored position is read from the store


def sync_mailbox(
    mailbox: str,
    reader: SyncReader,
    positions: SyncPositions,
    publish: Callable[[Sequence[CalendarChange]], None],
    window: Interval,
    observed_at: datetime,
    new_id: Callable[[], str],
    full: bool = False,
    backend: Backend = "ews",
    stored: SyncPosition | None | Unread = Unread.READ_IT,
) -> PassResult:
    """Read and publish one mailbox's changes. ``full`` (or no stored state) reads everything again. ``stored``: the
    mailbox's position as the caller has just read it from ``positions`` (saves a second query), else it is read here."""
    if full:
        stored = None
    elif stored is Unread.READ_IT:
        stored = positions.sync_position(mailbox)
    # a state another reader wrote (the mailbox moved between backends) cannot be continued: read it all
    saved = stored.sync_state if stored is not None and stored.backend == backend else None
    changes, new_state = reader.sync(mailbox, saved)
    return publish_sync(mailbox, changes, new_state, saved is None, reader, positions, publish, window, observed_at, new_id, backend)


def publish_sync(
    mailbox: str,
    changes: list[SyncChange],
    new_state: str,
    full: bool,
    reader: SeriesReader,
    positions: SyncPositions,
    publish: Callable[[Sequence[CalendarChange]], None],
    window: Interval,
    observed_at: datetime,
    new_id: Callable[[], str],
    backend: Backend = "ews",
) -> PassResult:
    """Publish what one read found, then save the state it ended at (``full``: the read started from nothing)."""
    occurrences: dict[str, list[CalendarItem]] = {}
    if any(c.item is not None and c.item.item_type == "master" for c in changes):
        occurrences = series_occurrences(reader.occurrences(mailbox, window))
    messages = changes_from_sync(mailbox, changes, occurrences, window, observed_at, new_id, backend)
    if messages:
        publish(messages)
    positions.save_sync_position(mailbox, new_state, observed_at, full=full, backend=backend)
    return PassResult(len(messages), full)


def resync_mailbox(
    mailbox: str,
    reader: SyncReader,
    positions: SyncPositions,
    publish: Callable[[Sequence[CalendarChange | CalendarSnapshot]], None],
    window: Interval,
    observed_at: datetime,
    new_id: Callable[[], str],
    part_size: int,
    backend: Backend = "ews",
) -> tuple[PassResult, int]:
    """A read from nothing with a snapshot beside it; return the pass and the number of items in the snapshot.

    The read from nothing comes first and the window's view after it, so whatever is deleted between the two is said
    by the next read from the state saved here (the other order loses it: the view sees an item that the read's state
    already counts as gone). The changes and the snapshot's parts are published together, then the state is saved:
    a failure anywhere saves nothing, and the next read is this one again (decision 85 in docs/decisions.md).
    """
    changes, new_state = reader.sync(mailbox, None)
    view = reader.view(mailbox, window)
    occurrences = series_occurrences(view) if any(c.item is not None and c.item.item_type == "master" for c in changes) else {}
    messages = changes_from_sync(mailbox, changes, occurrences, window, observed_at, new_id, backend)
    parts = snapshot_parts(mailbox, view, window, observed_at, part_size, new_id(), backend)
    publish([*messages, *parts])
    positions.save_sync_position(mailbox, new_state, observed_at, full=True, backend=backend)
    return PassResult(len(messages), True), len(view)


def snapshot_mailbox(
    mailbox: str,
    reader: ViewReader,
    publish: Callable[[Sequence[CalendarSnapshot]], None],
    window: Interval,
    observed_at: datetime,
    part_size: int,
    snapshot_id: str,
    source: Source = "ews",
) -> int:
    """Read the whole window, then publish its parts; return the number of items."""
    items = reader.view(mailbox, window)
    publish(snapshot_parts(mailbox, items, window, observed_at, part_size, snapshot_id, source))
    return len(items)


def rebase_mailbox(
    mailbox: str,
    reader: RebaseReader,
    positions: SyncPositions,
    publish: Callable[[Sequence[CalendarSnapshot]], None],
    window: Interval,
    observed_at: datetime,
    part_size: int,
    snapshot_id: str,
) -> int:
    """A Graph mailbox's snapshot: a new delta round over ``window`` published as a snapshot, then its delta link
    saved (backend "graph"); return the number of items. Nothing is saved unless every part was published."""
    items, delta_link = reader.rebase(mailbox, window)
    publish(snapshot_parts(mailbox, items, window, observed_at, part_size, snapshot_id, "graph"))
    positions.save_sync_position(mailbox, delta_link, observed_at, full=True, backend="graph")
    return len(items)


T = TypeVar("T")


class Lazy(Generic[T]):
    """A reader built on first use, once, from any thread: an EWS-only installation never builds a Graph reader
    (and needs no Graph settings), a Graph-only one never builds an EWS connection."""

    def __init__(self, make: Callable[[], T], built: T | None = None) -> None:
        self._make = make
        self._value = built
        self._lock = Lock()

    def get(self) -> T:
        with self._lock:
            if self._value is None:
                self._value = self._make()
            return self._value

    @property
    def built(self) -> T | None:
        return self._value
