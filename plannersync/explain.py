"""``plannersync explain``: why Planner does (or does not) block a time, from what the store holds (decision 63).

For one mailbox and a moment, every event key whose desired or delivered interval lies around that moment, with:

1. what Exchange said: the desired row (key, UID, source item id, version and when it was observed, interval,
   the snapshot that last saw it);
2. what the transformer decided and why: busy or not. The store keeps the decision, not its reason: a busy row
   means the item's free/busy status was one of ``busy.busy_statuses``, it was not cancelled nor Planner's own
   invitation, and it overlapped the sync window; an absent row means one of those failed (or the item was
   deleted), and which one is not stored. Rejected items (decision 34) are never stored: they are in the
   transformer's log as ``item_rejected``. The answer says so instead of guessing;
3. what was sent to Planner and its receipt: the delivered row (present, interval, version, receipt code and
   message, receipt time, Planner's event and resource ids, STAR's request reference).

Absent keys have no time stored, so they cannot be placed around a moment; the most recently decided ones are
listed apart. Content never appears: the store holds none (decision 1 in docs/decisions.md).
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

from shared.adapters.store import Store
from shared.domain.busy_rules import BusyPolicy, sync_window
from shared.domain.contracts import Interval

RECENT_ABSENT = 10  # absent keys listed apart, newest decision first


def parse_moment(text: str | None, zone: str, now: datetime) -> tuple[datetime, bool]:
    """``--at``: an ISO date-time (naive: local time of ``zone``) or a date (the whole local day); None is now.

    Returns the moment and whether a whole day was meant.
    """
    if text is None:
        return now, False
    tz = ZoneInfo(zone)
    try:
        if len(text.strip()) == 10:
            day = date.fromisoformat(text.strip())
            return datetime.combine(day, time(12), tzinfo=tz).astimezone(timezone.utc), True
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--at {text!r}: not a date (2026-12-01) or a date and time (2026-12-01T09:30, local time)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz)
    return moment.astimezone(timezone.utc), False


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _version_time(version: int | None) -> str | None:
    """A version is microseconds since the epoch of the Exchange read that saw it (decision 30)."""
    if not version:
        return None
    return (datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=version)).isoformat()


def _overlaps(start: datetime | None, end: datetime | None, span: Interval) -> bool:
    return start is not None and end is not None and start < span.end and end > span.start


def _exchange(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "uid": row["uid"],
        "source_item_id": row["source_item_id"],
        "version": row["version"],
        "observed_at": _version_time(row["version"]),
        "start": _iso(row["start_at"]),
        "end": _iso(row["end_at"]),
        "seen_in_snapshot": row["seen_in_snapshot"],
        "correlation_id": row["correlation_id"],
        "decided_at": _iso(row["updated_at"]),
    }


def _planner(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "present": row["present"],
        "start": _iso(row["start_at"]),
        "end": _iso(row["end_at"]),
        "version": row["version"],
        "receipt_code": row["last_code"],
        "receipt_message": row["last_message"],
        "receipt_at": _iso(row["receipt_at"]),
        "planner_event_id": row["planner_event_id"],
        "planner_resource_id": row["planner_resource_id"],
        "planner_originated": row["planner_originated"],
        "service_request_ref": row["service_request_ref"],
        "correlation_id": row["correlation_id"],
    }


def _decision(desired: dict[str, Any] | None, delivered: dict[str, Any] | None, policy: BusyPolicy, window: Interval, now: datetime) -> tuple[str, list[str]]:
    """What the transformer decided, and the reasons the store lets us give (said so where it cannot)."""
    statuses = ", ".join(sorted(policy.busy_statuses))
    if delivered is not None and delivered["planner_originated"]:
        return "planner originated", ["Planner itself put this event in the calendar (receipt 13 or a recognised organizer/UID): it is never sent back"]
    if desired is None:
        return "unknown", [
            "plannersync holds no Exchange observation for this key (state lost or pruned, or the event came from elsewhere)",
            "items that could not be judged are rejected and not stored: look for item_rejected in the transformer's log",
        ]
    if desired["start_at"] is None:
        return "not busy", [
            f"the last observation made it absent: its free/busy status is not one of {statuses}, or it was cancelled, deleted, "
            "moved to deleted items, recognised as Planner's own invitation, or moved out of the sync window",
            "the store keeps the decision, not which of these it was (the transformer logs no appointment content)",
        ]
    reasons = [f"busy: its free/busy status is one of {statuses}, it is not cancelled and not Planner's own invitation"]
    if desired["end_at"] <= now:
        reasons.append("it is over: a past busy time is kept as it is, never sent as new")
    elif desired["start_at"] >= window.end:
        reasons.append(f"it starts after the sync window ends ({window.end.isoformat()}): it is sent when the window reaches it")
    else:
        reasons.append(f"it overlaps the sync window ({window.start.isoformat()} to {window.end.isoformat()})")
    return "busy", reasons


def _verdict(desired: dict[str, Any] | None, delivered: dict[str, Any] | None, decision: str) -> str:
    code = delivered["last_code"] if delivered is not None else None
    receipt = f" (last receipt code {code}: {delivered['last_message'] or 'no message'})" if delivered is not None and code not in (None, 0) else ""
    held = delivered is not None and delivered["present"]
    if decision == "planner originated":
        return "Planner's own event: plannersync leaves it alone"
    if decision == "busy" and desired is not None:
        if not held:
            return "NOT blocked in Planner yet: the busy time is on its way, or its delivery failed" + receipt + " (plannersync dlq list publisher)"
        assert delivered is not None
        if (delivered["start_at"], delivered["end_at"]) != (desired["start_at"], desired["end_at"]):
            return "Planner holds other times: an update is on its way or failed" + receipt
        return f"blocked in Planner (receipt {code if code is not None else '?'} at {_iso(delivered['receipt_at']) or '?'})"
    if held:
        return "Planner still holds it although the calendar has no busy time for it: a delete is on its way or failed" + receipt + "; the nightly reconciliation removes it"
    return "not blocked in Planner, as decided"


def explain(store: Store, mailbox: str, at: datetime, policy: BusyPolicy, now: datetime, span: timedelta = timedelta(hours=12)) -> dict[str, Any]:
    """The whole answer as one JSON-able dict (``--json``); ``render`` turns it into text."""
    mailbox = mailbox.strip().lower()
    around = Interval(start=at - span, end=at + span)
    window = sync_window(now, policy)
    desired_rows, delivered_rows = store.explain_rows(mailbox)
    desired = {r["origin_id"]: r for r in desired_rows if not r["origin_id"].startswith("~")}  # bookkeeping entries are never events
    delivered = {r["origin_id"]: r for r in delivered_rows}
    keys = sorted(
        {k for k, r in desired.items() if _overlaps(r["start_at"], r["end_at"], around)} | {k for k, r in delivered.items() if _overlaps(r["start_at"], r["end_at"], around)},
        key=lambda k: ((desired.get(k) or delivered[k])["start_at"] or around.start, k),
    )
    events = []
    for key in keys:
        decision, reasons = _decision(desired.get(key), delivered.get(key), policy, window, now)
        events.append(
            {
                "origin_id": key,
                "exchange": _exchange(desired.get(key)),
                "transformer": {"decision": decision, "why": reasons},
                "planner": _planner(delivered.get(key)),
                "verdict": _verdict(desired.get(key), delivered.get(key), decision),
            }
        )
    absent = sorted((r for r in desired.values() if r["start_at"] is None), key=lambda r: r["version"], reverse=True)[:RECENT_ABSENT]
    row = next((m for m in store.list_mailboxes() if m.address == mailbox), None)
    position = store.sync_position(mailbox)
    notes = []
    if row is None:
        notes.append("this mailbox is not enrolled: plannersync does not read it (plannersync mailboxes add)")
    elif not row.enabled:
        notes.append(f"this mailbox is disabled ({row.status}): plannersync no longer reads it")
    if not (window.start <= at < window.end):
        notes.append(f"this time is outside the sync window ({window.start.isoformat()} to {window.end.isoformat()}): Planner is told only about busy time inside it")
    if not events:
        notes.append(
            "plannersync holds no busy time around this time: Exchange did not report one (is it marked Busy, Tentative or Out of office in "
            "Outlook, not Free or Working elsewhere?), or it was rejected (item_rejected in the transformer's log), or the mailbox was not read since"
        )
    return {
        "mailbox": mailbox,
        "at": at.isoformat(),
        "around": {"start": around.start.isoformat(), "end": around.end.isoformat()},
        "sync_window": {"start": window.start.isoformat(), "end": window.end.isoformat()},
        "enrolled": None if row is None else {"enabled": row.enabled, "status": row.status, "backend": row.backend, "last_delivery_at": _iso(row.last_delivery_at), "last_error": row.last_error},
        "last_exchange_read_at": _iso(position.last_sync_at) if position else None,
        "busy_times": events,
        "not_busy_means": _decision({"start_at": None}, None, policy, window, now)[1],
        "recently_not_busy": [{"origin_id": r["origin_id"], "version": r["version"], "observed_at": _version_time(r["version"]), "planner": _planner(delivered.get(r["origin_id"]))} for r in absent],
        "notes": notes,
    }


def render(answer: dict[str, Any], zone: str) -> str:
    """The answer as text for a person; times in the configured zone."""
    tz = ZoneInfo(zone)

    def local(value: str | None) -> str:
        return datetime.fromisoformat(value).astimezone(tz).strftime("%Y-%m-%d %H:%M") if value else "-"

    lines = [f"{answer['mailbox']}: busy times from {local(answer['around']['start'])} to {local(answer['around']['end'])} ({zone})"]
    enrolled = answer["enrolled"]
    if enrolled is not None:
        lines.append(f"  enrolled: {'enabled' if enrolled['enabled'] else 'disabled'} ({enrolled['status']}), last Exchange read {local(answer['last_exchange_read_at'])}")
    for event in answer["busy_times"]:
        ex, pl, tr = event["exchange"], event["planner"], event["transformer"]
        lines.append("")
        lines.append(f"* {event['origin_id']}")
        if ex is None:
            lines.append("  Exchange said:   nothing plannersync still holds")
        else:
            lines.append(f"  Exchange said:   {local(ex['start'])} to {local(ex['end'])}" if ex["start"] else "  Exchange said:   not busy")
            lines.append(f"                   version {ex['version']} (read at {local(ex['observed_at'])}), item {ex['source_item_id'] or '-'}, UID {ex['uid'] or '-'}")
        lines.append(f"  Transformer:     {tr['decision']}")
        lines.extend(f"                   - {why}" for why in tr["why"])
        if pl is None:
            lines.append("  Sent to Planner: nothing yet")
        else:
            held = f"{local(pl['start'])} to {local(pl['end'])}" if pl["present"] else "absent (deleted or never created)"
            lines.append(f"  Sent to Planner: {held}, version {pl['version']}")
            lines.append(
                f"                   receipt {pl['receipt_code'] if pl['receipt_code'] is not None else '-'} {pl['receipt_message'] or ''} at {local(pl['receipt_at'])}; "
                f"Planner event {pl['planner_event_id'] or '-'}, resource {pl['planner_resource_id'] or '-'}, request {pl['service_request_ref'] or '-'}"
            )
        lines.append(f"  => {event['verdict']}")
    if answer["recently_not_busy"]:
        lines.append("")
        lines.append("Recently decided NOT busy (no time is stored for these, so they may or may not be this appointment):")
        lines.extend(f"  - {why}" for why in answer["not_busy_means"])
        for row in answer["recently_not_busy"]:
            lines.append(f"  {row['origin_id']}  read at {local(row['observed_at'])}")
    for note in answer["notes"]:
        lines.append("")
        lines.append(f"Note: {note}")
    return "\n".join(lines)
