"""``plannersync explain`` and ``plannersync export`` on one caseworker's day, as an operator runs them.

The scenario is seeded in the store the way the transformer and the publisher leave it (desired and delivered
rows): a dentist appointment Planner blocks, a meeting whose delivery Planner refused, an appointment moved
whose update is still on its way, and an appointment marked free. The exported file is parsed back with
``icalendar``.
"""

from __future__ import annotations

import json
import subprocess
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import icalendar
import pytest

from shared.adapters.store import Store, open_store
from shared.domain.contracts import Interval, version_of
from shared.domain.delivery_plan import DeliveredChange, Holding, ReceiptFacts
from shared.domain.transform_core import DesiredRecord
from tests.support.processes import PLANNERSYNC
from tests.support.settings import settings_from_env

CPH = ZoneInfo("Europe/Copenhagen")
DAY = date.today() + timedelta(days=3)
MAILBOX = "anne@jobcenter.dk"


def local(hour: int, minute: int = 0) -> datetime:
    return datetime(DAY.year, DAY.month, DAY.day, hour, minute, tzinfo=CPH)


def span(start: int, end: int) -> Interval:
    return Interval(start=local(start), end=local(end))


def run(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PLANNERSYNC, *args], env=env, capture_output=True, text=True, timeout=60, cwd=cwd)


@pytest.fixture
def scenario(worker_env: dict[str, str]) -> Store:
    settings = settings_from_env(worker_env)
    store = open_store(settings.database_url(), auto_upgrade=True)
    store.add_mailbox(MAILBOX)
    seen = version_of(datetime.now(timezone.utc) - timedelta(minutes=5))
    store.save_sync_position(MAILBOX, "state", datetime.now(timezone.utc) - timedelta(minutes=5), full=True)
    store.save_desired(
        MAILBOX,
        [
            DesiredRecord("dentist-uid", "dentist-uid", "AAMk-dentist", seen, span(9, 10), None),
            DesiredRecord("meeting-uid", "meeting-uid", "AAMk-meeting", seen, span(11, 12), None),
            DesiredRecord("moved-uid", "moved-uid", "AAMk-moved", seen + 1, span(14, 15), None),
            DesiredRecord("free-uid", "free-uid", "AAMk-free", seen + 2, None, None),
        ],
        correlation_id="corr-1",
    )
    receipt_at = datetime.now(timezone.utc) - timedelta(minutes=4)
    store.record_delivered(
        MAILBOX,
        [
            DeliveredChange(
                "dentist-uid", seen, Holding(True, span(9, 10)), False, "0f8fad5b-d9cb-469f-a165-70867728950e", "9b2c1a3e-0000-4000-8000-000000000001",
                ReceiptFacts(0, None, False, receipt_at, "req-1"),
            ),
            DeliveredChange("meeting-uid", seen, None, None, None, None, ReceiptFacts(3, "Unknown resource", False, receipt_at, "req-2")),
            DeliveredChange("moved-uid", seen, Holding(True, span(13, 14)), False, "1f8fad5b-d9cb-469f-a165-70867728950e", None, ReceiptFacts(0, None, False, receipt_at, "req-3")),
        ],
        correlation_id="corr-1",
    )
    return store


def test_explain_answers_why_planner_does_or_does_not_block_each_busy_time(scenario: Store, worker_env: dict[str, str]) -> None:
    done = run("explain", "--mailbox", MAILBOX, "--at", DAY.isoformat(), "--json", env=worker_env)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    by_key = {event["origin_id"]: event for event in answer["busy_times"]}
    assert list(by_key) == ["dentist-uid", "meeting-uid", "moved-uid"]  # by start; the free one has no time to place
    dentist = by_key["dentist-uid"]
    assert dentist["exchange"]["source_item_id"] == "AAMk-dentist" and dentist["exchange"]["start"] == local(9).astimezone(timezone.utc).isoformat()
    assert dentist["transformer"]["decision"] == "busy" and any("sync window" in why for why in dentist["transformer"]["why"])
    assert dentist["planner"]["present"] is True and dentist["planner"]["receipt_code"] == 0 and dentist["planner"]["planner_event_id"].startswith("0f8fad5b")
    assert dentist["verdict"].startswith("blocked in Planner (receipt 0")
    meeting = by_key["meeting-uid"]
    assert meeting["planner"]["present"] is False and meeting["planner"]["receipt_message"] == "Unknown resource"
    assert meeting["verdict"].startswith("NOT blocked in Planner yet") and "last receipt code 3: Unknown resource" in meeting["verdict"]
    assert by_key["moved-uid"]["verdict"].startswith("Planner holds other times")
    assert [row["origin_id"] for row in answer["recently_not_busy"]] == ["free-uid"]
    assert answer["enrolled"]["enabled"] is True and answer["last_exchange_read_at"] is not None

    text = run("explain", "--mailbox", MAILBOX, "--at", f"{DAY.isoformat()}T09:30", env=worker_env)
    assert text.returncode == 0, text.stderr
    assert "* dentist-uid" in text.stdout and f"Exchange said:   {DAY.isoformat()} 09:00 to {DAY.isoformat()} 10:00" in text.stdout
    assert "=> blocked in Planner" in text.stdout and "the store keeps the decision, not which of these it was" in text.stdout
    assert "moved-uid" not in text.stdout.split("Recently decided")[0]  # 14:00 is more than 3 hours from 09:30


def test_explain_says_honestly_when_plannersync_holds_nothing(scenario: Store, worker_env: dict[str, str]) -> None:
    far = (DAY + timedelta(days=200)).isoformat()
    done = run("explain", "--mailbox", MAILBOX, "--at", far, env=worker_env)
    assert done.returncode == 0 and "plannersync holds no busy time around this time" in done.stdout and "outside the sync window" in done.stdout
    nobody = run("explain", "--mailbox", "nobody@jobcenter.dk", env=worker_env)
    assert "this mailbox is not enrolled" in nobody.stdout
    bad = run("explain", "--mailbox", MAILBOX, "--at", "tomorrow", env=worker_env)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("plannersync: --at 'tomorrow': not a date")


def test_export_writes_an_icalendar_file_of_what_plannersync_and_planner_hold(scenario: Store, worker_env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "anne.ics"
    done = run("export", "--mailbox", MAILBOX, "--output", str(out), env=worker_env)
    assert done.returncode == 0, done.stderr
    assert "3 busy times plannersync holds, 2 Planner holds" in done.stderr
    calendar = icalendar.Calendar.from_ical(out.read_bytes())
    assert str(calendar["X-WR-CALNAME"]) == f"plannersync: {MAILBOX}"
    events = [(str(e["CATEGORIES"].cats[0]), str(e["SUMMARY"]), e.decoded("DTSTART"), e.decoded("DTEND")) for e in calendar.walk("VEVENT")]
    desired = sorted((s, e) for cat, _, s, e in events if cat == "plannersync (desired)")
    delivered = sorted((s, e) for cat, _, s, e in events if cat == "Planner (delivered)")
    assert desired == [(local(9), local(10)), (local(11), local(12)), (local(14), local(15))]
    assert delivered == [(local(9), local(10)), (local(13), local(14))]
    assert all(summary == f"Busy: {cat}" for cat, summary, _, _ in events)
    assert len({str(e["UID"]) for e in calendar.walk("VEVENT")}) == 5
    default = run("export", "--mailbox", MAILBOX, env=worker_env, cwd=tmp_path)
    assert default.returncode == 0 and (tmp_path / f"plannersync-{MAILBOX}.ics").is_file()
