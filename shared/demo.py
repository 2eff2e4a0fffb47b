"""``plannersync demo``: the whole pipeline on the embedded defaults, against the local RabbitMQ.

It starts the Planner simulator in-process, the transformer and the publisher as real worker
processes (``plannersync run``), plays a caseworker's day of calendar changes into the broker
(the stand-in for Exchange), and prints what Planner ends up holding. Queues get a throwaway
prefix and are removed at the end, so the demo never touches a real installation's queues.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

from shared.config import load_settings
from shared.consumer import Outgoing, Publisher
from shared.contracts import CalendarChange, CalendarItem, FreeBusy
from shared.topology import delete_everything, ensure_policies, from_settings

MAILBOX = "caseworker@jobcenter.example"
CPH = ZoneInfo("Europe/Copenhagen")


def _item(item_id: str, start: datetime, end: datetime, status: FreeBusy, all_day: bool = False) -> CalendarItem:
    return CalendarItem(item_id=item_id, uid=f"demo-{item_id}", start=start, end=end, free_busy=status, all_day=all_day, time_zone="Romance Standard Time")


def _change(item: CalendarItem | None, item_id: str, when: datetime) -> CalendarChange:
    return CalendarChange(
        correlation_id=uuid.uuid4().hex[:16],
        source="demo",
        mailbox=MAILBOX,
        observed_at=when,
        change="upsert" if item else "delete",
        item_id=item_id,
        item=item,
    )


def script(now: datetime) -> tuple[list[CalendarChange], dict[str, tuple[datetime, datetime]]]:
    """A caseworker's day of edits, and the busy times Planner must hold afterwards."""
    day = (now.astimezone(CPH) + timedelta(days=1)).date()

    def at(hour: int, minute: int = 0, days: int = 0) -> datetime:
        return datetime(day.year, day.month, day.day, hour, minute, tzinfo=CPH) + timedelta(days=days)

    t = now
    step = timedelta(milliseconds=1)
    changes = [
        _change(_item("meeting", at(9), at(10), "Busy"), "meeting", t),
        _change(_item("dentist", at(13), at(14), "Tentative"), "dentist", t + step),
        _change(_item("lunch", at(12), at(12, 30), "Free"), "lunch", t + 2 * step),
        _change(_item("course", at(0, days=6), at(0, days=8), "OOF", all_day=True), "course", t + 3 * step),
        _change(_item("homework", at(0, days=2), at(0, days=3), "WorkingElsewhere", all_day=True), "homework", t + 4 * step),
        _change(_item("meeting", at(10), at(11, 30), "Busy"), "meeting", t + 5 * step),  # moved and made longer
        _change(None, "dentist", t + 6 * step),  # deleted
    ]
    expected = {
        "demo-meeting": (at(10), at(11, 30)),
        "demo-course": (at(0, days=6), at(0, days=8)),
    }
    return changes, expected


def run_demo(seconds: float = 60.0) -> int:
    from simulators.planner.server import start_server

    base = load_settings()
    prefix = f"demo{uuid.uuid4().hex[:6]}"
    workdir = Path(tempfile.mkdtemp(prefix="plannersync-demo-"))
    sim = start_server()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLANNERSYNC_")}
    env.update(
        {
            "PLANNERSYNC_BROKER__PREFIX": prefix,
            "PLANNERSYNC_DATABASE__URL": f"sqlite:///{workdir / 'state.db'}",
            "PLANNERSYNC_PLANNER__ENDPOINT": sim.url,
            "PLANNERSYNC_LOG__FORMAT": "json",
        }
    )
    settings = load_settings(environ=env, broker={"prefix": prefix})
    topology = from_settings(settings.broker, settings.retry)
    exe = str(Path(sys.executable).with_name("plannersync"))
    print(f"plannersync demo: broker {base.broker.host}:{base.broker.port}, queues '{prefix}.*', Planner simulator {sim.url}")
    workers = []
    try:
        ensure_policies(topology, settings.broker.management_url, settings.broker.user, settings.broker.password.get_secret_value())
        for name in ("transformer", "publisher"):
            log = (workdir / f"{name}.log").open("wb")
            workers.append(subprocess.Popen([exe, "run", name], env=env, stdout=log, stderr=subprocess.STDOUT))
        changes, expected = script(datetime.now(timezone.utc))
        producer = Publisher(settings.broker, topology)
        for change in changes:
            producer.publish(Outgoing(topology.calendar_exchange, topology.change_key(MAILBOX), change))
        producer.close()
        print(f"published {len(changes)} calendar changes for {MAILBOX} (stand-in for Exchange)")
        deadline = time.monotonic() + seconds
        held: dict[str, tuple[datetime, datetime]] = {}
        while time.monotonic() < deadline:
            held = {e.origin_id: (e.start, e.end) for e in sim.state.events(MAILBOX)}
            if held == expected:
                break
            time.sleep(0.2)
        print("\nPlanner now holds (times in Europe/Copenhagen):")
        for origin, (start, end) in sorted(held.items()):
            print(f"  {origin:<16} {start.astimezone(CPH):%a %d %b %H:%M} - {end.astimezone(CPH):%a %d %b %H:%M}")
        calls = sim.state.calls()
        print(f"\nPlanner received {len(calls)} call(s): " + ", ".join(f"{c.operation}({len(c.origin_ids)})" for c in calls))
        ok = held == expected
        print("\nresult: " + ("OK - Planner matches the calendar" if ok else f"MISMATCH - expected {sorted(expected)}; worker logs in {workdir}"))
        return 0 if ok else 1
    finally:
        for proc in workers:
            proc.send_signal(signal.SIGTERM)
        for proc in workers:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        sim.stop()
        delete_everything(topology, settings.broker.management_url, settings.broker.user, settings.broker.password.get_secret_value())
