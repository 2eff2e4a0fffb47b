"""``plannersync export``: one mailbox's busy times as an iCalendar file, to open beside Outlook (decision 63).

One calendar, two categories: ``plannersync (desired)``, what plannersync holds as the calendar's busy time
(desired rows), and ``Planner (delivered)``, what Planner is known to hold (delivered rows that are present).
Every event is an opaque busy block with ids only (the store holds no subject, body or location; decision 1
in docs/decisions.md); its summary names its category, so the two can be told apart without colours.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import icalendar

from shared.adapters.store import Store

DESIRED = "plannersync (desired)"
DELIVERED = "Planner (delivered)"


def _event(kind: str, row: dict[str, Any], mailbox: str, stamp: datetime, details: list[str]) -> icalendar.Event:
    event = icalendar.Event()
    suffix = "desired" if kind == DESIRED else "delivered"
    event.add("uid", f"{row['origin_id']}/{suffix}/{mailbox}")
    event.add("dtstamp", stamp)
    event.add("dtstart", row["start_at"].astimezone(timezone.utc))
    event.add("dtend", row["end_at"].astimezone(timezone.utc))
    event.add("summary", f"Busy: {kind}")
    event.add("categories", [kind])
    event.add("transp", "OPAQUE")
    event.add("description", "\n".join([f"key: {row['origin_id']}", f"version: {row['version']}", *details]))
    return event


def build_calendar(store: Store, mailbox: str, now: datetime | None = None) -> tuple[icalendar.Calendar, int, int]:
    """The calendar, and how many desired and delivered events it holds."""
    mailbox = mailbox.strip().lower()
    stamp = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    desired_rows, delivered_rows = store.explain_rows(mailbox)
    calendar = icalendar.Calendar()
    calendar.add("prodid", "-//plannersync//export//EN")
    calendar.add("version", "2.0")
    calendar.add("x-wr-calname", f"plannersync: {mailbox}")
    calendar.add("x-wr-caldesc", f"{DESIRED}: what plannersync holds; {DELIVERED}: what Planner is known to hold")
    desired = delivered = 0
    for row in sorted(desired_rows, key=lambda r: r["origin_id"]):
        if row["origin_id"].startswith("~") or row["start_at"] is None or row["end_at"] is None:
            continue  # bookkeeping and absent keys are not busy time
        calendar.add_component(_event(DESIRED, row, mailbox, stamp, [f"source item: {row['source_item_id'] or '-'}"]))
        desired += 1
    for row in sorted(delivered_rows, key=lambda r: r["origin_id"]):
        if not row["present"] or row["start_at"] is None or row["end_at"] is None:
            continue
        receipt = f"receipt: {row['last_code']} {row['last_message'] or ''}".rstrip()
        ids = f"Planner event: {row['planner_event_id'] or '-'}; resource: {row['planner_resource_id'] or '-'}"
        calendar.add_component(_event(DELIVERED, row, mailbox, stamp, [receipt, ids]))
        delivered += 1
    return calendar, desired, delivered
