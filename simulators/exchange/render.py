"""EWS XML for folders and calendar items (singles, masters, occurrences, exceptions).

Every property is always rendered (exchangelib reads what it asked for and ignores the rest); element order
follows the EWS schema's CalendarItem sequence.
"""

from __future__ import annotations

from datetime import date, datetime, time

from . import ids
from .model import DAY_NAMES, Item, Occurrence, Recurrence
from .recurrence import find_occurrence, last_occurrence, occurrence_starts
from .soap import Element, sub, t, xs_bool, xs_datetime
from .timezones import zone

FOLDER_NAMES = {"root": "Top of Information Store", "calendar": "Calendar", "deleteditems": "Deleted Items"}
FOLDER_CLASSES = {"root": "IPF.Note", "calendar": "IPF.Appointment", "deleteditems": "IPF.Note"}


def folder(parent: Element, mailbox: str, name: str, total: int) -> Element:
    tag = t("CalendarFolder") if name == "calendar" else t("Folder")
    elem = sub(parent, tag)
    sub(elem, t("FolderId"), Id=ids.folder_id(mailbox, name), ChangeKey=ids.change_key(1))
    if name != "root":
        sub(elem, t("ParentFolderId"), Id=ids.folder_id(mailbox, "root"), ChangeKey=ids.change_key(1))
    sub(elem, t("FolderClass"), FOLDER_CLASSES[name])
    sub(elem, t("DisplayName"), FOLDER_NAMES[name])
    sub(elem, t("TotalCount"), str(total))
    sub(elem, t("ChildFolderCount"), "2" if name == "root" else "0")
    if name != "calendar":
        sub(elem, t("UnreadCount"), "0")
    return elem


def _local_date(day: date, tz_name: str) -> str:
    offset = datetime.combine(day, time(0), tzinfo=zone(tz_name)).utcoffset()
    minutes = int(offset.total_seconds() // 60) if offset is not None else 0
    sign = "+" if minutes >= 0 else "-"
    return f"{day.isoformat()}{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def recurrence(parent: Element, rec: Recurrence, tz_name: str) -> Element:
    elem = sub(parent, t("Recurrence"))
    names = {
        "daily": "DailyRecurrence",
        "weekly": "WeeklyRecurrence",
        "absolute_monthly": "AbsoluteMonthlyRecurrence",
        "relative_monthly": "RelativeMonthlyRecurrence",
        "absolute_yearly": "AbsoluteYearlyRecurrence",
        "relative_yearly": "RelativeYearlyRecurrence",
    }
    pattern = sub(elem, t(names[rec.pattern]))
    if not rec.pattern.endswith("yearly"):
        sub(pattern, t("Interval"), str(rec.interval))
    start_day = rec.start_date
    if rec.pattern == "weekly":
        sub(pattern, t("DaysOfWeek"), " ".join(rec.days_of_week))
        sub(pattern, t("FirstDayOfWeek"), rec.first_day_of_week)
    elif rec.pattern.startswith("relative"):
        sub(pattern, t("DaysOfWeek"), " ".join(rec.days_of_week) or DAY_NAMES[start_day.weekday()])
        sub(pattern, t("DayOfWeekIndex"), rec.week_index or "First")
    elif rec.pattern.startswith("absolute"):
        sub(pattern, t("DayOfMonth"), str(rec.day_of_month or start_day.day))
    if rec.pattern.endswith("yearly"):
        sub(pattern, t("Month"), date(2000, rec.month or start_day.month, 1).strftime("%B"))
    if rec.count is not None:
        rng = sub(elem, t("NumberedRecurrence"))
        sub(rng, t("StartDate"), _local_date(start_day, tz_name))
        sub(rng, t("NumberOfOccurrences"), str(rec.count))
    elif rec.end_date is not None:
        rng = sub(elem, t("EndDateRecurrence"))
        sub(rng, t("StartDate"), _local_date(start_day, tz_name))
        sub(rng, t("EndDate"), _local_date(rec.end_date, tz_name))
    else:
        rng = sub(elem, t("NoEndRecurrence"))
        sub(rng, t("StartDate"), _local_date(start_day, tz_name))
    return elem


def _occurrence_info(parent: Element, tag: str, mailbox: str, occ: Occurrence) -> None:
    elem = sub(parent, t(tag))
    sub(elem, t("ItemId"), Id=ids.occurrence_id(mailbox, occ.master.key, occ.original_start),
        ChangeKey=ids.change_key(occ.master.version))
    sub(elem, t("Start"), xs_datetime(occ.start))
    sub(elem, t("End"), xs_datetime(occ.end))
    sub(elem, t("OriginalStart"), xs_datetime(occ.original_start))


def _first_live(item: Item) -> Occurrence | None:
    for _index, original in occurrence_starts(item):
        if original not in item.deleted:
            return find_occurrence(item, original_start=original)
    return None


def calendar_item(parent: Element, mailbox: str, item: Item, occ: Occurrence | None = None) -> Element:
    """A single, a recurring master (occ None, item recurring), or an occurrence/exception (occ given)."""
    value = occ.value if occ is not None else (lambda name: getattr(item, name))
    elem = sub(parent, t("CalendarItem"))
    if occ is not None:
        sub(elem, t("ItemId"), Id=ids.occurrence_id(mailbox, item.key, occ.original_start),
            ChangeKey=ids.change_key(item.version))
        kind = "Exception" if occ.is_exception else "Occurrence"
        start, end = occ.start, occ.end
    else:
        sub(elem, t("ItemId"), Id=ids.item_id(mailbox, item.key), ChangeKey=ids.change_key(item.version))
        kind = "RecurringMaster" if item.is_recurring else "Single"
        start, end = item.start, item.end
    sub(elem, t("ParentFolderId"), Id=ids.folder_id(mailbox, item.folder), ChangeKey=ids.change_key(1))
    sub(elem, t("ItemClass"), "IPM.Appointment")
    sub(elem, t("Subject"), str(value("subject")))
    sub(elem, t("Sensitivity"), str(value("sensitivity")))
    sub(elem, t("Body"), str(value("body")), BodyType="Text")
    sub(elem, t("DateTimeReceived"), xs_datetime(item.created or item.start))
    sub(elem, t("Importance"), "Normal")
    sub(elem, t("DateTimeCreated"), xs_datetime(item.created or item.start))
    sub(elem, t("HasAttachments"), "false")
    modified = occ.override.last_modified if occ is not None and occ.override and occ.override.last_modified else None
    sub(elem, t("LastModifiedTime"), xs_datetime(modified or item.last_modified or item.start))
    sub(elem, t("UID"), item.uid)
    if occ is not None:
        sub(elem, t("RecurrenceId"), xs_datetime(occ.original_start))
    sub(elem, t("Start"), xs_datetime(start))
    sub(elem, t("End"), xs_datetime(end))
    if occ is not None:
        sub(elem, t("OriginalStart"), xs_datetime(occ.original_start))
    sub(elem, t("IsAllDayEvent"), xs_bool(item.is_all_day))
    sub(elem, t("LegacyFreeBusyStatus"), str(value("status")))
    sub(elem, t("Location"), str(value("location")))
    sub(elem, t("IsMeeting"), xs_bool(item.organizer is not None))
    sub(elem, t("IsCancelled"), xs_bool(bool(value("is_cancelled"))))
    # Real Exchange reports IsRecurring=false on the organizer's RecurringMaster; mimicked.
    sub(elem, t("IsRecurring"), xs_bool(occ is not None))
    sub(elem, t("CalendarItemType"), kind)
    sub(elem, t("MyResponseType"), "Organizer" if item.organizer is None else "Accept")
    if item.organizer:
        mbx = sub(sub(elem, t("Organizer")), t("Mailbox"))
        sub(mbx, t("Name"), item.organizer_name or item.organizer.split("@")[0])
        sub(mbx, t("EmailAddress"), item.organizer)
        sub(mbx, t("RoutingType"), "SMTP")
        sub(mbx, t("MailboxType"), "Mailbox")
    if item.attendees:   # sent whatever the shape asked for, so a reader that keeps what it gets is caught
        required = sub(elem, t("RequiredAttendees"))
        for name, address in item.attendees:
            attendee = sub(sub(required, t("Attendee")), t("Mailbox"))
            sub(attendee, t("Name"), name)
            sub(attendee, t("EmailAddress"), address)
            sub(attendee, t("RoutingType"), "SMTP")
    if occ is None and item.recurrence is not None:
        recurrence(elem, item.recurrence, item.tz)
        first = _first_live(item)
        if first is not None:
            _occurrence_info(elem, "FirstOccurrence", mailbox, first)
        last = last_occurrence(item)
        if last is not None:
            _occurrence_info(elem, "LastOccurrence", mailbox, last)
        if item.overrides:
            mods = sub(elem, t("ModifiedOccurrences"))
            for original in sorted(item.overrides):
                ov = item.overrides[original]
                _occurrence_info(mods, "Occurrence", mailbox, Occurrence(item, 0, original, ov.start, ov.end, ov))
        if item.deleted:
            dels = sub(elem, t("DeletedOccurrences"))
            for original in sorted(item.deleted):
                sub(sub(dels, t("DeletedOccurrence")), t("Start"), xs_datetime(original))
    sub(elem, t("StartTimeZone"), Id=item.tz, Name=item.tz)
    sub(elem, t("EndTimeZone"), Id=item.tz, Name=item.tz)
    return elem
