"""EWS operations on the store: each takes the request element and a Context and returns the response element.

GetStreamingEvents is not here: it writes a long chunked response and lives in ``streaming.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from . import ids, render, sync_state
from .model import CALENDAR, DELETED_ITEMS, Item
from .recurrence import expand, find_occurrence, overlaps
from .restriction import UnsupportedRestriction, matches
from .soap import Element, m, message, response, sub, t, xs_bool
from .store import Store
from .subscriptions import (
    EVENT_TYPES,
    Event,
    Subscription,
    SubscriptionError,
    Subscriptions,
)

FOLDER_ALIASES = {"root": "root", "msgfolderroot": "root", "calendar": CALENDAR, "deleteditems": DELETED_ITEMS}
MAX_SYNC_CHANGES = 512  # real Exchange's upper bound for MaxChangesReturned


@dataclass
class Context:
    store: Store
    subs: Subscriptions
    mailbox: str  # the impersonated (or own) mailbox, canonical lower case
    view_limit: int = 1000  # EWSFindCountLimit: most items one FindItem returns
    events_page: int = 50  # GetEvents page size (MoreEvents beyond it)
    forced_error: str | None = None  # fault injection: answer with this error ResponseCode


def _folder(elem: Element, ctx: Context) -> str | None:
    """The folder name a DistinguishedFolderId/FolderId points at, or None when unknown or another mailbox's."""
    if elem.tag == t("DistinguishedFolderId"):
        email = elem.find(f"{t('Mailbox')}/{t('EmailAddress')}")
        if email is not None and email.text and email.text.strip().lower() != ctx.mailbox:
            return None
        return FOLDER_ALIASES.get(elem.get("Id", ""))
    if elem.tag == t("FolderId"):
        try:
            mailbox, name = ids.parse_folder_id(elem.get("Id", ""))
        except ids.BadId:
            return None
        return name if mailbox == ctx.mailbox else None
    return None


def _items(ctx: Context, folder: str) -> list[Item]:
    box = ctx.store.require(ctx.mailbox)
    return [item for item in box.items.values() if item.folder == folder]


def get_folder(req: Element, ctx: Context) -> Element:
    root, msgs = response("GetFolder")
    for ref in req.find(m("FolderIds")):
        name = _folder(ref, ctx)
        if name is None:
            message(msgs, "GetFolder", "ErrorFolderNotFound", "The specified folder could not be found in the store.")
            continue
        msg = message(msgs, "GetFolder")
        total = 0 if name == "root" else len(_items(ctx, name))
        render.folder(sub(msg, m("Folders")), ctx.mailbox, name, total)
    return root


def find_item(req: Element, ctx: Context) -> Element:
    root, msgs = response("FindItem")
    parents = req.find(m("ParentFolderIds"))
    name = _folder(parents[0], ctx) if parents is not None and len(parents) else None
    if name is None or name == "root":
        message(msgs, "FindItem", "ErrorFolderNotFound", "The specified folder could not be found in the store.")
        return root
    view = req.find(m("CalendarView"))
    restriction = req.find(m("Restriction"))
    if view is not None:
        if restriction is not None:
            message(msgs, "FindItem", "ErrorInvalidRestriction", "Restrictions can't be used with a calendar view.")
            return root
        return _calendar_view(root, msgs, view, name, ctx)
    paging = req.find(m("IndexedPageItemView"))
    candidates = sorted(_items(ctx, name), key=lambda i: (i.start, i.key))
    if restriction is not None:
        try:
            candidates = [item for item in candidates if matches(restriction, item)]
        except UnsupportedRestriction as exc:
            message(msgs, "FindItem", "ErrorUnsupportedPathForQuery", f"Unsupported restriction: {exc}")
            return root
    offset = int(paging.get("Offset", "0")) if paging is not None else 0
    size = int(paging.get("MaxEntriesReturned", str(ctx.view_limit))) if paging is not None else ctx.view_limit
    page = candidates[offset: offset + min(size, ctx.view_limit)]
    msg = message(msgs, "FindItem")
    last = offset + len(page) >= len(candidates)
    folder_elem = sub(msg, m("RootFolder"), IndexedPagingOffset=str(offset + len(page)),
                      TotalItemsInView=str(len(candidates)), IncludesLastItemInRange=xs_bool(last))
    items = sub(folder_elem, t("Items"))
    for item in page:
        render.calendar_item(items, ctx.mailbox, item)
    return root


def _calendar_view(root: Element, msgs: Element, view: Element, folder: str, ctx: Context) -> Element:
    start = datetime.fromisoformat(view.get("StartDate", "").replace("Z", "+00:00")).astimezone(UTC)
    end = datetime.fromisoformat(view.get("EndDate", "").replace("Z", "+00:00")).astimezone(UTC)
    if end < start:
        message(msgs, "FindItem", "ErrorCalendarEndDateIsEarlierThanStartDate", "EndDate is earlier than StartDate")
        return root
    found: list[tuple[datetime, int, Item, object]] = []
    for item in _items(ctx, folder):
        if item.recurrence is None:
            if overlaps(item.start, item.end, start, end):
                found.append((item.start, item.key, item, None))
        else:
            found.extend((occ.start, item.key, item, occ) for occ in expand(item, start, end))
    found.sort(key=lambda row: (row[0], row[1]))
    cap = min(int(view.get("MaxEntriesReturned", str(ctx.view_limit))), ctx.view_limit)
    page = found[:cap]
    msg = message(msgs, "FindItem")
    folder_elem = sub(msg, m("RootFolder"), TotalItemsInView=str(len(found)),
                      IncludesLastItemInRange=xs_bool(len(page) == len(found)))
    items = sub(folder_elem, t("Items"))
    for _start, _key, item, occ in page:
        render.calendar_item(items, ctx.mailbox, item, occ)  # type: ignore[arg-type]
    return root


def _item_ref(elem: Element, ctx: Context) -> tuple[Item, object] | str:
    """(item, occurrence or None) for an ItemId/OccurrenceItemId/RecurringMasterItemId, or an error code."""
    box = ctx.store.require(ctx.mailbox)
    try:
        if elem.tag == t("ItemId"):
            ref = ids.parse_item_id(elem.get("Id", ""))
        elif elem.tag == t("OccurrenceItemId"):
            master = ids.parse_item_id(elem.get("RecurringMasterId", ""))
            item = box.items.get(master.key) if master.mailbox == ctx.mailbox else None
            if item is None:
                return "ErrorItemNotFound"
            occ = find_occurrence(item, index=int(elem.get("InstanceIndex", "0")))
            if occ is None:
                return "ErrorCalendarOccurrenceIndexIsOutOfRecurrenceRange"
            if occ.original_start in item.deleted:
                return "ErrorCalendarOccurrenceIsDeletedFromRecurrence"
            return item, occ
        elif elem.tag == t("RecurringMasterItemId"):
            ref = ids.parse_item_id(elem.get("OccurrenceId", ""))
            ref = ids.ItemRef(ref.mailbox, ref.key)
        else:
            return "ErrorInvalidIdMalformed"
    except (ids.BadId, ValueError):
        return "ErrorInvalidIdMalformed"
    item = box.items.get(ref.key) if ref.mailbox == ctx.mailbox else None
    if item is None:
        return "ErrorItemNotFound"
    if ref.original_start is None:
        return item, None
    if ref.original_start in item.deleted:
        return "ErrorCalendarOccurrenceIsDeletedFromRecurrence"
    occ = find_occurrence(item, original_start=ref.original_start)
    return (item, occ) if occ is not None else "ErrorItemNotFound"


def get_item(req: Element, ctx: Context) -> Element:
    root, msgs = response("GetItem")
    for ref in req.find(m("ItemIds")):
        found = _item_ref(ref, ctx)
        if isinstance(found, str):
            message(msgs, "GetItem", found, "The specified object was not found in the store.")
            continue
        item, occ = found
        msg = message(msgs, "GetItem")
        render.calendar_item(sub(msg, m("Items")), ctx.mailbox, item, occ)  # type: ignore[arg-type]
    return root


def sync_folder_items(req: Element, ctx: Context) -> Element:
    root, msgs = response("SyncFolderItems")
    folder_ref = req.find(m("SyncFolderId"))
    name = _folder(folder_ref[0], ctx) if folder_ref is not None and len(folder_ref) else None
    state_elem = req.find(m("SyncState"))
    state = state_elem.text if state_elem is not None else None
    limit = int(req.findtext(m("MaxChangesReturned")) or "100")

    def fail(code: str, text: str) -> Element:
        msg = message(msgs, "SyncFolderItems", code, text)
        sub(msg, m("SyncState"))  # exchangelib reads these before ResponseClass; real Exchange sends them
        sub(msg, m("IncludesLastItemInRange"), "true")
        return root

    if ctx.forced_error:
        return fail(ctx.forced_error, f"{ctx.forced_error} (injected)")
    if name is None or name == "root":
        return fail("ErrorFolderNotFound", "The specified folder could not be found in the store.")
    if not 1 <= limit <= MAX_SYNC_CHANGES:
        return fail("ErrorInvalidArgument", "MaxChangesReturned must be between 1 and 512.")
    try:
        epoch = ctx.store.require(ctx.mailbox).sync_epoch
        known = sync_state.decode(state, ctx.mailbox, name, epoch)
    except sync_state.InvalidSyncState:
        return fail("ErrorInvalidSyncStateData", "Synchronization state data is corrupt or otherwise invalid.")
    changes, after, last = sync_state.changes(known, _items(ctx, name), limit)
    msg = message(msgs, "SyncFolderItems")
    sub(msg, m("SyncState"), sync_state.encode(ctx.mailbox, name, after, epoch))
    sub(msg, m("IncludesLastItemInRange"), xs_bool(last))
    container = sub(msg, m("Changes"))
    for change in changes:
        elem = sub(container, t(change.kind))
        if change.item is None:
            sub(elem, t("ItemId"), Id=ids.item_id(ctx.mailbox, change.key), ChangeKey=ids.change_key(0))
        else:
            render.calendar_item(elem, ctx.mailbox, change.item)
    return root


def subscribe(req: Element, ctx: Context) -> Element:
    root, msgs = response("Subscribe")
    request = req.find(m("PullSubscriptionRequest"))
    kind = "pull"
    if request is None:
        request, kind = req.find(m("StreamingSubscriptionRequest")), "streaming"
    if request is None:
        message(msgs, "Subscribe", "ErrorInvalidSubscriptionRequest", "Only pull and streaming subscriptions.")
        return root
    folders: frozenset[str] | None = None
    if request.get("SubscribeToAllFolders", "false").lower() != "true":
        names = [_folder(ref, ctx) for ref in request.find(t("FolderIds"))]
        if any(n is None for n in names):
            message(msgs, "Subscribe", "ErrorFolderNotFound", "The specified folder could not be found in the store.")
            return root
        folders = frozenset(n for n in names if n)
    types = frozenset(e.text for e in request.find(t("EventTypes")) if e.text) or frozenset(EVENT_TYPES)
    timeout = int(request.findtext(t("Timeout")) or "30") if kind == "pull" else None
    created = ctx.subs.subscribe(ctx.mailbox, kind, folders, types, timeout)
    msg = message(msgs, "Subscribe")
    sub(msg, m("SubscriptionId"), created.id)
    sub(msg, m("Watermark"), ids.watermark(created.id, created.last_seq))
    return root


def render_notification(parent: Element, subscription: Subscription, previous_seq: int, events: list[Event],
                        more: bool, status_if_empty: bool) -> Element:
    note = sub(parent, m("Notification"))
    sub(note, t("SubscriptionId"), subscription.id)
    sub(note, t("PreviousWatermark"), ids.watermark(subscription.id, previous_seq))
    sub(note, t("MoreEvents"), xs_bool(more))
    if not events and status_if_empty:
        status = sub(note, t("StatusEvent"))
        sub(status, t("Watermark"), ids.watermark(subscription.id, previous_seq))
    for event in events:
        elem = sub(note, t(event.type))
        sub(elem, t("Watermark"), ids.watermark(subscription.id, event.seq))
        sub(elem, t("TimeStamp"), event.time.strftime("%Y-%m-%dT%H:%M:%SZ"))
        sub(elem, t("ItemId"), Id=ids.item_id(event.mailbox, event.key), ChangeKey=ids.change_key(event.version))
        sub(elem, t("ParentFolderId"), Id=ids.folder_id(event.mailbox, event.folder), ChangeKey=ids.change_key(1))
        if event.type == "MovedEvent" and event.old_folder:
            sub(elem, t("OldItemId"), Id=ids.item_id(event.mailbox, event.key), ChangeKey=ids.change_key(event.version))
            sub(elem, t("OldParentFolderId"), Id=ids.folder_id(event.mailbox, event.old_folder),
                ChangeKey=ids.change_key(1))
    return note


def get_events(req: Element, ctx: Context) -> Element:
    root, msgs = response("GetEvents")
    sid = req.findtext(m("SubscriptionId")) or ""
    try:
        subscription = ctx.subs.get(sid)
        wm_sid, wm_seq = ids.parse_watermark(req.findtext(m("Watermark")) or "")
    except SubscriptionError as exc:
        message(msgs, "GetEvents", exc.code, "The specified subscription was not found.")
        return root
    except ids.BadId:
        message(msgs, "GetEvents", "ErrorInvalidWatermark", "The watermark is invalid.")
        return root
    if wm_sid != sid or wm_seq > subscription.last_seq:
        message(msgs, "GetEvents", "ErrorInvalidWatermark", "The watermark is invalid.")
        return root
    events, more = ctx.subs.pull(subscription, wm_seq, ctx.events_page)
    msg = message(msgs, "GetEvents")
    render_notification(msg, subscription, wm_seq, events, more, status_if_empty=True)
    return root


def unsubscribe(req: Element, ctx: Context) -> Element:
    root, msgs = response("Unsubscribe")
    try:
        ctx.subs.unsubscribe(req.findtext(m("SubscriptionId")) or "")
        message(msgs, "Unsubscribe")
    except SubscriptionError as exc:
        message(msgs, "Unsubscribe", exc.code, "The specified subscription was not found.")
    return root


def convert_id(req: Element, ctx: Context) -> Element:
    """Ids here have one format; ConvertId echoes them in the requested format (also the version probe)."""
    root, msgs = response("ConvertId")
    dest = req.get("DestinationFormat", "EwsId")
    for source in req.find(m("SourceIds")):
        msg = message(msgs, "ConvertId")
        sub(msg, m("AlternateId"), Format=dest, Id=source.get("Id", ""), Mailbox=source.get("Mailbox", ""))
    return root


OPERATIONS: dict[str, Callable[[Element, Context], Element]] = {
    "GetFolder": get_folder,
    "FindItem": find_item,
    "GetItem": get_item,
    "SyncFolderItems": sync_folder_items,
    "Subscribe": subscribe,
    "GetEvents": get_events,
    "Unsubscribe": unsubscribe,
    "ConvertId": convert_id,
}
# Operations that work without a mailbox of their own.
MAILBOX_FREE = frozenset({"ConvertId", "GetStreamingEvents", "GetEvents", "Unsubscribe"})
