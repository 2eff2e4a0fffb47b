"""The transformer's decision core: calendar changes and snapshots in, busy-time desired states out.

Pure: no I/O, no clock (``now`` is a parameter), no logging. Live changes, snapshot parts and snapshot
completion all go through the same ``_Decider.decide`` so the paths cannot disagree.

``known`` is what the transformer last decided for one mailbox (origin id -> ``DesiredRecord``), persisted by
``shared.adapters.store``. Besides one entry per event key it holds two kinds of **bookkeeping entries**, which are
never emitted and never reach Planner (``is_event_key`` tells them apart):

- ``~plannersync/item/<hash of item id>`` (newest upsert of a series master) and
  ``~plannersync/deleted/<hash of item id>`` (newest delete of an item): uid, item id, version. Every change
  for an item id is ignored when one of these is at least as new, so a delete that overtakes its create, or
  an older master upsert arriving after a newer one, cannot resurrect anything (a per-key version alone
  cannot do that for keys the late message would create). Snapshot items of the same item id or series
  UID are ignored the same way. A late upsert of an item deleted before its UID was known teaches the
  delete its UID, and the delete is then applied to that UID's older keys; a late occurrence or exception
  (a Graph instance removed before we saw it) teaches it only its own key, which becomes absent as of the
  delete if older. The tombstone of a removed instance never carries a UID, so it blocks that instance id
  alone and is never read as the series (not by ``_delete``, ``_learn_deleted_uid``, nor a snapshot's
  per-UID check).
- ``~plannersync/snapshot``: the newest *completed* snapshot (its id, version, and window as the interval).
  A message older than that snapshot may not make an event busy inside its window unless the snapshot
  saw that event: the snapshot is the newer observation that said it was not there.

Together these make the outcome independent of delivery order and duplication (``test_transform_properties``).

Retention: absent rows and bookkeeping records are tombstones. Pruning one is safe only once no message
older than it can still arrive (the retry ladder's total, plus however long an operator may wait before
replaying a dead-lettered message), so prune absent rows and records only by age, with that margin.

Rules (decisions 2, 3, 6, 30 to 32, 58, 59 and 95 in docs/decisions.md; the version is ``version_of(observed_at)``, and
one microsecond more for a change that is an upsert: ``change_version``):

- A key whose ``DesiredRecord.version`` is at least the incoming version is left alone (one exception at equal
  versions, see *Instances standing alone*). Otherwise the new desired
  interval is compared with ``DesiredRecord.interval``: different -> emit and remember; equal -> remember only
  (a version bump). A key never known and not busy emits nothing, but **is remembered as absent** at its
  version: otherwise an older "busy" message for it that arrives late would create it (decision 31 in
  docs/decisions.md: order-independence needs this tombstone). Such rows cost one per item seen; see
  the retention note below.
- **Window** (``busy_rules.sync_window(now)``): an item overlapping the window is sent with its full times.
  An item starting at or after the window end is not sent, and a *known* event that moved there becomes
  absent (Planner should not keep a slot we no longer maintain; it comes back when the window reaches it).
  An item that is over (end <= now) is never sent as new; a known event whose interval is unchanged and
  simply ended is left as it is (a correctly delivered past event is not deleted), while a known event
  that was *changed* to a time already over becomes absent (as the reference client does: moved into
  the past -> D).
- **Series**: a master is never emitted; its listed occurrences and exceptions become keys (missing UID,
  organizer flag, status and zone are inherited from the master). Present keys of the series (``uid$...``) that
  overlap ``change.window`` and are not listed become absent; a master that is cancelled, deleted, free or
  Planner-originated makes all its current and future occurrences absent. The master's own key (its UID) is
  absent, which deletes the event of a single that was turned into a series.
- **Instances standing alone** (Microsoft Graph, whose calendarView/delta reports no masters): an occurrence
  or exception upsert not carried by a master settles its own key (``uid$...``) alone and records its own
  item id (the instance id) as the key's ``source_item_id``, like a single; siblings are never touched. In
  one read (one ``observed_at``), the upsert of an instance id for a key that the removal of *another* id made
  absent wins, in either order, as an upsert's version is one above its read's (``_handover``: a series deleted
  and invited again under its UID).
- **Delete**: every present key whose ``source_item_id`` is the deleted item id, or whose uid is the uid
  recorded for that item id, becomes absent; the tombstone records that uid. Except an **instance
  delete**: a delete from a source in ``INSTANCE_DELETE_SOURCES`` (Graph) whose item id is the
  ``source_item_id`` of one or more keys, all of them occurrence/exception keys (``origin_id != uid``), and
  that has no master record or UID-bearing tombstone: exactly those keys become absent, nothing is expanded
  to the series UID, and the tombstone records no UID. A delete naming no key and no recorded UID (an
  instance or single never seen) only leaves a UID-less tombstone. EWS deletes keep expanding to the UID even when only occurrence
  keys carry the id (a master whose own key and record were pruned), since EWS deletes name masters.
  (Occurrences first seen by an EWS snapshot carry no master item id; if the master was never seen by a
  change either, its delete removes them at the next snapshot.)
- **Snapshots**: every item seen records ``seen_in_snapshot``. A single records its item id; an occurrence
  or exception records its own item id only when the snapshot's ``source`` is in ``INSTANCE_DELETE_SOURCES``
  (a Graph instance id, so that a later removal of an instance first seen by a snapshot finds its key); an
  EWS snapshot leaves the key's item id as it was (the master's, which EWS deletes name).
  ``complete_snapshot`` makes absent every present event key overlapping the snapshot window that the
  snapshot did not see and whose version is older than the snapshot. ``derive_snapshot_part`` alone never makes anything absent. A snapshot is
  complete once every part 1..total has arrived, in any order, the total known from the final part
  (``snapshot_complete``); ``finish_snapshot_part`` adds the completion to the part that makes it whole.
  A duplicate part of a complete snapshot completes it again, which finds nothing new to remove.
- An item that cannot be judged (``ItemRejected``) is reported in ``rejected`` with a content-free reason;
  the other items of the message are still processed. A rejected single produces nothing else.
- **Stale messages** (decision 95): the worker publishes a message's states before it records them, so a message's
  states can reach the publisher while its record never happens (its replica killed in between, its record step
  failed), and the message comes again, possibly after newer ones that were decided without it. So a message
  older than what decides a key it names never just leaves it: it **restates** that key. A key decided at a newer
  version is emitted again as it is, at that version (the publisher ignores it when it has it already). A key the
  newer decision did not decide, because it could not know this message's effect on it (an upsert whose item was
  deleted since, a master's occurrence a newer master upsert did not list, an item a newer complete snapshot did
  not see), is decided as that decision would have: absent, at its version. A Graph instance taking a key over from
  another instance id sends its state even when the times are unchanged (the other id's removal may have gone out
  unrecorded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Collection, Iterable, Literal, Mapping

from shared.domain.busy_rules import (
    BusyPolicy,
    ItemRejected,
    busy_interval,
    not_busy_reason,
    origin_id,
    overlaps,
    sync_window,
)
from shared.domain.contracts import (
    BusyTimeState,
    CalendarChange,
    CalendarItem,
    CalendarSnapshot,
    Interval,
    Source,
    stable_id,
    version_of,
)

BOOKKEEPING_PREFIX = "~plannersync/"
ITEM_RECORD_PREFIX = BOOKKEEPING_PREFIX + "item/"
DELETED_RECORD_PREFIX = BOOKKEEPING_PREFIX + "deleted/"
SNAPSHOT_MARKER = BOOKKEEPING_PREFIX + "snapshot"
Cause = Literal["change", "snapshot"]
# Sources whose deletes name an occurrence's or exception's own id (Graph's calendarView/delta reports instances
# only). EWS deletes name singles and series masters, never an occurrence id (decisions 24 and 59 in docs/decisions.md).
INSTANCE_DELETE_SOURCES: frozenset[Source] = frozenset({"graph"})


@dataclass(frozen=True)
class DesiredRecord:
    """What the transformer last decided for one event key (or a bookkeeping entry, see the module doc)."""

    origin_id: str
    uid: str | None
    source_item_id: str | None   # the item id whose delete removes this key: the single's, the series master's, or a Graph instance's
    version: int
    interval: Interval | None    # None = absent
    seen_in_snapshot: str | None = None


@dataclass(frozen=True)
class Decision:
    """What one message implies: states to publish, records to store, items that could not be judged."""

    emit: list[BusyTimeState] = field(default_factory=list)        # only what changes what Planner should hold
    remember: list[DesiredRecord] = field(default_factory=list)    # every key whose DesiredRecord changes
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (item_id, content-free reason)
    completed_snapshot: str | None = None                          # the snapshot id this decision completes


def is_event_key(key: str) -> bool:
    """False for the core's bookkeeping entries in ``known``; they are never Planner events."""
    return not key.startswith(BOOKKEEPING_PREFIX)


def item_record_key(item_id: str) -> str:
    """The bookkeeping key of an item id's newest series-master upsert."""
    return ITEM_RECORD_PREFIX + stable_id("item", item_id)


def deleted_record_key(item_id: str) -> str:
    """The bookkeeping key of an item id's newest delete."""
    return DELETED_RECORD_PREFIX + stable_id("item", item_id)


def _series_prefix(uid: str) -> str:
    return uid + "$"


class _Decider:
    """Accumulates one message's decisions over ``known`` (later decisions see earlier ones)."""

    def __init__(self, mailbox: str, correlation_id: str, cause: Cause, version: int, known: Mapping[str, DesiredRecord]) -> None:
        self.mailbox, self.correlation_id, self.cause, self.version = mailbox, correlation_id, cause, version
        self.known = known
        self.changed: dict[str, DesiredRecord] = {}
        self.emitted: dict[str, BusyTimeState] = {}
        self.rejected: list[tuple[str, str]] = []
        self.marker = known.get(SNAPSHOT_MARKER)

    def current(self, key: str) -> DesiredRecord | None:
        return self.changed.get(key) or self.known.get(key)

    def event_keys(self) -> list[DesiredRecord]:
        merged = {**self.known, **self.changed}
        return [k for key, k in merged.items() if is_event_key(key)]

    def remember(self, known: DesiredRecord) -> None:
        self.changed[known.origin_id] = known

    def decide(
        self,
        key: str,
        desired: Interval | None,
        *,
        uid: str | None,
        source_item_id: str | None,
        seen_in_snapshot: str | None = None,
        handover: bool = False,
    ) -> None:
        """Settle one event key on ``desired`` (already filtered by the window rules) at this message's version.

        ``handover``: the key passes from one item id to another (a Graph instance id replacing another under one
        key: a series deleted and invited again, see ``_handover``). The other id's removal may have reached the
        publisher without being recorded here (decision 95), so the state is sent even when its times are unchanged.
        """
        previous = self.current(key)
        version = self.version
        if previous is not None and previous.version > version:
            self.restate(key, previous.version, uid=uid, source_item_id=source_item_id)
            return
        if previous is not None and previous.version == version:
            return
        marker = self.marker
        stale = (
            marker is not None
            and version < marker.version
            and (previous is None or previous.seen_in_snapshot != marker.seen_in_snapshot)
            and marker.interval is not None
            and overlaps(desired, marker.interval)
        )
        if stale:
            assert marker is not None
            desired, version = None, marker.version     # the newer complete snapshot did not see it
        self.remember(
            DesiredRecord(
                origin_id=key,
                uid=uid if uid is not None else (previous.uid if previous else None),
                source_item_id=source_item_id if source_item_id is not None else (previous.source_item_id if previous else None),
                version=version,
                interval=desired,
                seen_in_snapshot=seen_in_snapshot or (previous.seen_in_snapshot if previous else None),
            )
        )
        if stale or handover or (previous.interval if previous is not None else None) != desired:   # restated (decision 95)
            self.emitted[key] = BusyTimeState(
                correlation_id=self.correlation_id,
                mailbox=self.mailbox,
                origin_id=key,
                version=version,
                interval=desired,
                cause=self.cause,
            )

    def restate(self, key: str, newest: int, *, uid: str | None, source_item_id: str | None) -> None:
        """Emit again what is decided for ``key``: this message is older than a decision that covers it (see *Stale
        messages* in the module doc). A key decided at a newer version than this message is restated as it is, at
        that version. A key the newer decision (at ``newest``: its item's delete, or a newer upsert of its series
        master, which did not list it) did not decide, because it never knew this message's effect on it, is
        decided as that decision would have: absent, at ``newest``."""
        current = self.current(key)
        if key in self.emitted or (newest <= self.version and (current is None or current.version <= self.version)):
            return   # a duplicate: nothing newer covers the key
        if current is None or current.version <= self.version:
            current = DesiredRecord(
                origin_id=key,
                uid=uid or (current.uid if current is not None else None),
                source_item_id=source_item_id or (current.source_item_id if current is not None else None),   # the item the newer decision is about
                version=newest,
                interval=None,
                seen_in_snapshot=current.seen_in_snapshot if current is not None else None,
            )
            self.remember(current)
        self.emitted[key] = BusyTimeState(
            correlation_id=self.correlation_id, mailbox=self.mailbox, origin_id=key, version=current.version, interval=current.interval, cause=self.cause,
        )

    def result(self) -> Decision:
        return Decision(
            emit=[self.emitted[key] for key in sorted(self.emitted)],
            remember=[self.changed[key] for key in sorted(self.changed)],
            rejected=list(self.rejected),
        )


def _desired(interval: Interval | None, previous: DesiredRecord | None, now: datetime, window: Interval) -> Interval | None:
    """The window rules (see the module doc) applied to an item's busy interval."""
    if interval is None:
        return None
    if interval.end <= now:
        return interval if previous is not None and previous.interval == interval else None
    if interval.start >= window.end:
        return None
    return interval


def _inherit(occurrence: CalendarItem, master: CalendarItem) -> CalendarItem:
    missing = {
        name: getattr(master, name)
        for name in ("uid", "free_busy", "organizer_is_planner", "time_zone")
        if getattr(occurrence, name) is None and getattr(master, name) is not None
    }
    return occurrence.model_copy(update=missing) if missing else occurrence


def _is_instance(item: CalendarItem) -> bool:
    return item.item_type in ("occurrence", "exception")


def _is_series_key(record: DesiredRecord) -> bool:
    """An occurrence's or exception's key (``uid$...``), not a single's or a master's (the bare UID)."""
    return record.origin_id != record.uid


def _handover(previous: DesiredRecord | None, item_id: str, version: int) -> bool:
    """Whether an upsert of instance id ``item_id`` at ``version`` takes ``previous`` over from another item id.

    One read that removed instance id X and reports instance id Y for the same key (a series deleted and invited
    again under its UID) saw the event alive under Y, whichever message comes first: the upsert's version is above
    the removal's (``change_version``), so Y wins.
    """
    return previous is not None and previous.source_item_id not in (None, item_id) and previous.version < version


def _newer_record(known: Mapping[str, DesiredRecord], item_id: str, version: int) -> bool:
    return _newest_record(known, item_id) >= version


def _newest_record(known: Mapping[str, DesiredRecord], item_id: str) -> int:
    records = (known.get(item_record_key(item_id)), known.get(deleted_record_key(item_id)))
    return max((record.version for record in records if record is not None), default=-1)


def _named_keys(change: CalendarChange, known: Mapping[str, DesiredRecord], policy: BusyPolicy) -> list[tuple[str, str | None]]:
    """The event keys (with their UIDs) ``change`` decides: the item's own, a master's and its listed occurrences', or
    for a delete the keys its item id removes."""
    item = change.item
    if item is None:
        return [(k.origin_id, k.uid) for key, k in known.items() if is_event_key(key) and k.source_item_id == change.item_id]
    named = []
    for each in [item, *(_inherit(occurrence, item) for occurrence in change.occurrences or [])] if item.item_type == "master" else [item]:
        try:
            named.append((origin_id(each, policy.zone), each.uid))
        except ItemRejected:
            continue
    return named


def _restate_stale(change: CalendarChange, version: int, known: Mapping[str, DesiredRecord], learned: Decision, policy: BusyPolicy) -> Decision:
    """A change older than its item's newest record (a newer upsert of the master, or its delete): after what
    ``_learn_deleted_uid`` learns from it, every key it names is restated (see *Stale messages* in the module doc)."""
    after = {**known, **{record.origin_id: record for record in learned.remember}}
    decider = _Decider(change.mailbox, change.correlation_id, "change", version, after)
    decider.emitted = {state.origin_id: state for state in learned.emit}
    newest = _newest_record(after, change.item_id)
    for key, uid in _named_keys(change, after, policy):
        decider.restate(key, newest, uid=uid, source_item_id=change.item_id)
    restated = decider.result()
    return Decision(restated.emit, merge_decisions(learned, restated).remember, learned.rejected)


def _learn_deleted_uid(change: CalendarChange, known: Mapping[str, DesiredRecord], policy: BusyPolicy) -> Decision:
    """A late upsert of an item deleted before we knew its UID: apply that delete to the UID's keys now.

    Keys of that UID older than the delete (for example occurrences first seen by a snapshot, which carry
    no master item id) are absent as of the delete's version. A late occurrence or exception (a Graph instance
    removed before we saw it) teaches the delete only its own key: that key alone is absent as of the delete,
    its siblings are untouched, and the delete keeps no UID.
    """
    tomb = known.get(deleted_record_key(change.item_id))
    item = change.item
    uid = item.uid if item is not None else None
    if tomb is None or tomb.uid is not None or item is None or not uid:
        return Decision()
    decider = _Decider(change.mailbox, change.correlation_id, "change", tomb.version, known)
    if _is_instance(item):
        try:
            key = origin_id(item, policy.zone)
        except ItemRejected:
            return Decision()
        decider.decide(key, None, uid=uid, source_item_id=item.item_id)    # no-op when the key is already as new
        return decider.result()
    for k in decider.event_keys():
        if k.interval is not None and k.version < tomb.version and (k.uid == uid or k.origin_id.startswith(_series_prefix(uid))):
            decider.decide(k.origin_id, None, uid=k.uid, source_item_id=k.source_item_id)
    decider.remember(DesiredRecord(tomb.origin_id, uid, tomb.source_item_id, tomb.version, None))
    return decider.result()


def change_version(change: CalendarChange) -> int:
    """A change's version: ``version_of(observed_at)``, and one microsecond more for an upsert. One read gives all its
    changes one ``observed_at``; when it removes item id X and reports item id Y under the same key (a series or a
    meeting deleted and invited again under its UID), the event is alive, in whichever order the two arrive, here and
    at the publisher, which takes a state of the version it last applied for a key as a duplicate (decision 95)."""
    return version_of(change.observed_at) + (1 if change.change == "upsert" else 0)


def derive_change(change: CalendarChange, known: Mapping[str, DesiredRecord], policy: BusyPolicy, now: datetime) -> Decision:
    """The desired states one calendar change implies, given what was last decided for its mailbox."""
    version = change_version(change)
    if _newer_record(known, change.item_id, version):
        return _restate_stale(change, version, known, _learn_deleted_uid(change, known, policy), policy)
    decider = _Decider(change.mailbox, change.correlation_id, "change", version, known)
    window = sync_window(now, policy)
    if change.change == "delete":
        _delete(change, decider)
        return decider.result()
    item = change.item
    assert item is not None   # an upsert carries its item (CalendarChange validates this)
    if item.item_type == "master":
        _upsert_master(change, item, decider, policy, now, window)
        return decider.result()
    try:
        key = origin_id(item, policy.zone)
        interval = busy_interval(item, policy)
    except ItemRejected as rejected:
        return Decision(rejected=[(item.item_id, rejected.reason)])
    # a single, or an occurrence/exception standing alone (a Graph instance): its own id is the one its delete names
    previous = decider.current(key)
    decider.decide(
        key, _desired(interval, previous, now, window), uid=item.uid, source_item_id=item.item_id,
        handover=_is_instance(item) and _handover(previous, item.item_id, version),
    )
    return decider.result()


def _delete(change: CalendarChange, decider: _Decider) -> None:
    record = decider.known.get(item_record_key(change.item_id)) or decider.known.get(deleted_record_key(change.item_id))
    named = [k for k in decider.event_keys() if k.source_item_id == change.item_id]
    if (
        change.source in INSTANCE_DELETE_SOURCES
        and named
        and all(_is_series_key(k) for k in named)
        and (record is None or not record.uid)
    ):
        # a removed instance: exactly its keys become absent, never the series; the tombstone names no UID
        for k in named:
            if k.interval is not None:
                decider.decide(k.origin_id, None, uid=k.uid, source_item_id=k.source_item_id)
        decider.remember(DesiredRecord(deleted_record_key(change.item_id), None, change.item_id, decider.version, None))
        return
    uids = {k.uid for k in named if k.uid}
    if record is not None and record.uid:
        uids.add(record.uid)
    for k in decider.event_keys():
        if k.interval is not None and (k.source_item_id == change.item_id or k.uid in uids):
            decider.decide(k.origin_id, None, uid=k.uid, source_item_id=k.source_item_id)
    uid = record.uid if record is not None and record.uid else (min(uids) if uids else None)
    decider.remember(DesiredRecord(deleted_record_key(change.item_id), uid, change.item_id, decider.version, None))


def _upsert_master(change: CalendarChange, master: CalendarItem, decider: _Decider, policy: BusyPolicy, now: datetime, window: Interval) -> None:
    try:
        master_key = origin_id(master, policy.zone)
        series_busy = not_busy_reason(master, policy) is None
    except ItemRejected as rejected:
        decider.rejected.append((master.item_id, rejected.reason))
        return
    uid = master_key
    listed: set[str] = set()
    for occurrence in change.occurrences or []:
        occurrence = _inherit(occurrence, master)
        try:
            key = origin_id(occurrence, policy.zone)
        except ItemRejected as rejected:
            decider.rejected.append((occurrence.item_id, rejected.reason))
            continue
        listed.add(key)
        try:
            interval = busy_interval(occurrence, policy) if series_busy else None
        except ItemRejected as rejected:
            decider.rejected.append((occurrence.item_id, rejected.reason))
            continue   # the occurrence exists: leave its key as it is
        decider.decide(key, _desired(interval, decider.current(key), now, window), uid=uid, source_item_id=master.item_id)
    decider.decide(master_key, None, uid=uid, source_item_id=master.item_id)   # a single that became a series
    scope = change.window or window
    for k in decider.event_keys():
        if k.interval is None or k.origin_id in listed or not k.origin_id.startswith(_series_prefix(uid)):
            continue
        if k.uid not in (uid, None) and k.source_item_id != master.item_id:
            continue
        if overlaps(k.interval, scope) or (not series_busy and k.interval.end > now):
            decider.decide(k.origin_id, None, uid=uid, source_item_id=master.item_id)
    decider.remember(DesiredRecord(item_record_key(master.item_id), uid, master.item_id, decider.version, None))


def derive_snapshot_part(part: CalendarSnapshot, known: Mapping[str, DesiredRecord], policy: BusyPolicy, now: datetime) -> Decision:
    """The desired states one snapshot part implies. Never makes an unseen key absent: that is ``complete_snapshot``."""
    version = version_of(part.observed_at)
    decider = _Decider(part.mailbox, part.correlation_id, "snapshot", version, known)
    window = sync_window(now, policy)
    instance_ids = part.source in INSTANCE_DELETE_SOURCES    # an occurrence's own id is what removes it
    newest_by_uid: dict[str, int] = {}
    for key, record in known.items():
        if key.startswith((ITEM_RECORD_PREFIX, DELETED_RECORD_PREFIX)) and record.uid:
            newest_by_uid[record.uid] = max(record.version, newest_by_uid.get(record.uid, -1))
    for item in part.items:
        if item.item_type == "master":
            decider.rejected.append((item.item_id, "a snapshot carries occurrences, not series masters"))
            continue
        try:
            key = origin_id(item, policy.zone)
            interval = busy_interval(item, policy)
        except ItemRejected as rejected:
            decider.rejected.append((item.item_id, rejected.reason))
            continue
        previous = decider.current(key)
        source = item.item_id if item.item_type == "single" or instance_ids else None
        newest = max(_newest_record(known, item.item_id), newest_by_uid.get(item.uid or "", -1))
        if newest >= version:
            # A newer change of this item or series decided already; the snapshot still saw the event.
            if previous is not None and previous.version < version and previous.seen_in_snapshot != part.snapshot_id:
                decider.remember(DesiredRecord(key, previous.uid, previous.source_item_id, previous.version, previous.interval, part.snapshot_id))
            if newest > version:
                decider.restate(key, newest, uid=item.uid, source_item_id=source)
            continue
        decider.decide(key, _desired(interval, previous, now, window), uid=item.uid, source_item_id=source, seen_in_snapshot=part.snapshot_id)
    return decider.result()


def complete_snapshot(
    mailbox: str,
    snapshot_id: str,
    observed_at: datetime,
    window: Interval,
    known: Mapping[str, DesiredRecord],
    correlation_id: str,
) -> Decision:
    """Once every part has been derived: present events in the window the snapshot did not see become absent."""
    version = version_of(observed_at)
    decider = _Decider(mailbox, correlation_id, "snapshot", version, known)
    decider.marker = None    # the snapshot being completed is the authority here
    for k in decider.event_keys():
        if k.interval is not None and overlaps(k.interval, window) and k.seen_in_snapshot != snapshot_id:
            decider.decide(k.origin_id, None, uid=k.uid, source_item_id=k.source_item_id)   # a key newer than the snapshot is restated
    marker = known.get(SNAPSHOT_MARKER)
    if marker is None or marker.version < version:
        decider.remember(DesiredRecord(SNAPSHOT_MARKER, None, None, version, window, snapshot_id))
    return decider.result()


@dataclass(frozen=True)
class Reads:
    """What deciding some messages of one mailbox needs of what was decided for it (decision 97 in docs/decisions.md).

    ``whole``: everything (a snapshot part: its per-UID checks and its completion look at every key). Otherwise the
    rows whose key is in ``origin_ids`` (each change's item, tombstone and master records, its item's and listed
    occurrences' keys, the snapshot marker), whose ``source_item_id`` is in ``item_ids``, or whose UID is in
    ``uids`` or is the UID of one of those rows (a delete names an item id; the keys to remove carry its UID).
    ``select`` is that rule over a mapping; the store runs the same rule as two queries.
    """

    whole: bool = False
    origin_ids: frozenset[str] = frozenset()
    item_ids: frozenset[str] = frozenset()
    uids: frozenset[str] = frozenset()

    def select(self, known: Mapping[str, DesiredRecord]) -> dict[str, DesiredRecord]:
        if self.whole:
            return dict(known)
        first = {key: k for key, k in known.items() if key in self.origin_ids or k.source_item_id in self.item_ids or k.uid in self.uids}
        more = {k.uid for k in first.values() if k.uid} - self.uids
        if more:
            first.update({key: k for key, k in known.items() if k.uid in more})
        return first


def reads_for(messages: Iterable[CalendarChange | CalendarSnapshot], policy: BusyPolicy) -> Reads:
    """The ``Reads`` that deciding ``messages`` (all of one mailbox, in any order) needs."""
    origin_ids, item_ids, uids = {SNAPSHOT_MARKER}, set(), set()
    for message in messages:
        if isinstance(message, CalendarSnapshot):
            return Reads(whole=True)
        item_ids.add(message.item_id)
        origin_ids.update((item_record_key(message.item_id), deleted_record_key(message.item_id)))
        item = message.item
        for each in [item, *(_inherit(occurrence, item) for occurrence in message.occurrences or [])] if item is not None else []:
            if each.uid:
                uids.add(each.uid)
            try:
                origin_ids.add(origin_id(each, policy.zone))
            except ItemRejected:
                continue
    return Reads(False, frozenset(origin_ids), frozenset(item_ids), frozenset(uids))


def snapshot_complete(part: CalendarSnapshot, recorded_parts: Collection[int], recorded_total: int | None) -> bool:
    """Whether ``part`` together with the parts recorded before it makes every part 1..total present.

    The total is the final part's ``total_parts``: this part's, or ``recorded_total`` when the final part was
    recorded earlier. Until the final part has arrived the snapshot is never complete.
    """
    total = part.total_parts if part.total_parts is not None else recorded_total
    if total is None:
        return False
    return {*recorded_parts, part.part}.issuperset(range(1, total + 1))


def merge_decisions(first: Decision, then: Decision) -> Decision:
    """One decision doing ``first`` and then ``then``: for a key both emit or remember, ``then`` wins."""
    emit = {state.origin_id: state for state in first.emit}
    emit.update({state.origin_id: state for state in then.emit})
    remember = {record.origin_id: record for record in first.remember}
    remember.update({record.origin_id: record for record in then.remember})
    return Decision(
        emit=[emit[key] for key in sorted(emit)],
        remember=[remember[key] for key in sorted(remember)],
        rejected=[*first.rejected, *then.rejected],
        completed_snapshot=then.completed_snapshot or first.completed_snapshot,
    )


def finish_snapshot_part(
    part: CalendarSnapshot,
    decision: Decision,
    known: Mapping[str, DesiredRecord],
    recorded_parts: Collection[int],
    recorded_total: int | None,
) -> Decision:
    """``decision`` (``derive_snapshot_part`` of ``part`` over ``known``), completed when ``part`` makes the snapshot whole.

    ``recorded_parts`` and ``recorded_total`` are what is known of the snapshot's other parts (stored, or handled
    earlier in the same batch). When ``snapshot_complete`` holds, ``complete_snapshot`` runs over ``known`` with
    the part's decision applied and is merged into it; ``completed_snapshot`` then names the snapshot.
    """
    if not snapshot_complete(part, recorded_parts, recorded_total):
        return decision
    after_part = {**known, **{record.origin_id: record for record in decision.remember}}
    closing = complete_snapshot(part.mailbox, part.snapshot_id, part.observed_at, part.window, after_part, part.correlation_id)
    return merge_decisions(decision, Decision(closing.emit, closing.remember, closing.rejected, part.snapshot_id))
