"""``plannersync demo``: the whole pipeline on the embedded defaults, against the local RabbitMQ.

It starts the EWS simulator (a caseworker's calendar) and the Planner simulator in-process, runs the
change producer, the transformer and the publisher as real worker processes (``plannersync run``),
lets the first sync carry the calendar into Planner, then edits appointments in Exchange and prints
how long each edit took to reach Planner. Queues get a throwaway prefix, the state store a
temporary SQLite file; both are removed at the end, so the demo never touches a real installation.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
import uuid
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Callable
from zoneinfo import ZoneInfo

import requests

from plannersync.local_workers import start_workers, stop_workers
from shared.adapters.store import Store, upgrade
from shared.broker.topology import delete_everything, ensure_policies, from_settings
from shared.config import load_settings

MAILBOX = "caseworker@jobcenter.example"
CPH = ZoneInfo("Europe/Copenhagen")


def _calendar(first: date) -> list[dict[str, Any]]:
    """A caseworker's calendar from tomorrow: what Exchange holds before the demo starts editing."""
    day = first.isoformat()
    next_week = (first + timedelta(days=7)).isoformat()
    return [
        {"uid": "demo-meeting", "start": f"{day}T09:00", "end": f"{day}T10:00", "status": "Busy", "subject": "Team meeting"},
        {"uid": "demo-dentist", "start": f"{day}T13:00", "end": f"{day}T14:00", "status": "Tentative", "sensitivity": "Private", "subject": "Dentist"},
        {"uid": "demo-lunch", "start": f"{day}T12:00", "end": f"{day}T12:30", "status": "Free", "subject": "Lunch"},
        {"uid": "demo-homework", "start": next_week, "all_day": True, "status": "WorkingElsewhere", "subject": "Working from home"},
        {"uid": "demo-course", "start": (first + timedelta(days=2)).isoformat(), "end": (first + timedelta(days=4)).isoformat(), "all_day": True, "status": "OOF", "subject": "Course"},
        {
            "uid": "demo-standup", "start": f"{day}T08:30", "end": f"{day}T08:45", "status": "Busy", "subject": "Stand-up",
            "recurrence": {"pattern": "weekly", "days_of_week": ["Monday", "Wednesday", "Friday"], "count": 6},
        },
    ]


def run_demo(seconds: float = 60.0) -> int:
    from shared.logs import configure
    from simulators.exchange.server import start_server as start_exchange
    from simulators.planner.server import start_server as start_planner

    configure("WARNING", "console", service="demo")  # the simulators run in this process: keep their logs out of the way
    prefix = f"demo{uuid.uuid4().hex[:6]}"
    workdir = Path(tempfile.mkdtemp(prefix="plannersync-demo-"))
    exchange = start_exchange(users={"svc-plannersync": "demo"}, mailboxes=[MAILBOX])
    planner = start_planner()
    control = f"{exchange.control_url}/mailboxes/{MAILBOX}"
    tomorrow = datetime.now(CPH).date() + timedelta(days=1)
    for spec in _calendar(tomorrow):
        requests.post(f"{control}/items", json={**spec, "timezone": "Romance Standard Time"}, timeout=10).raise_for_status()

    env = {k: v for k, v in os.environ.items() if not k.startswith("PLANNERSYNC_")}
    env.update(
        {
            "PLANNERSYNC_BROKER__PREFIX": prefix,
            "PLANNERSYNC_DATABASE__URL": f"sqlite:///{workdir / 'state.db'}",
            "PLANNERSYNC_PLANNER__ENDPOINT": planner.url,
            "PLANNERSYNC_PLANNER__LINGER": "100ms",
            "PLANNERSYNC_EXCHANGE__ENDPOINT": exchange.url,
            "PLANNERSYNC_EXCHANGE__USERNAME": "svc-plannersync",
            "PLANNERSYNC_EXCHANGE__PASSWORD": "demo",
            "PLANNERSYNC_STATUS__HEALTH_DIR": str(workdir / "health"),
        }
    )
    settings = load_settings(environ=env, broker={"prefix": prefix}, database={"url": env["PLANNERSYNC_DATABASE__URL"]})
    store = Store.connect(settings.database_url())
    upgrade(store.engine)
    store.add_mailbox(MAILBOX)
    topology = from_settings(settings.broker, settings.retry)
    print(f"plannersync demo: queues '{prefix}.*' on {settings.broker.host}:{settings.broker.port}")
    print(f"  Exchange simulator {exchange.url}  (mailbox {MAILBOX})")
    print(f"  Planner simulator  {planner.url}")
    workers: list[subprocess.Popen[bytes]] = []

    def held() -> dict[str, tuple[datetime, datetime]]:
        return {e.origin_id: (e.start, e.end) for e in planner.state.events(MAILBOX)}

    def wait(condition: Callable[[dict[str, tuple[datetime, datetime]]], bool]) -> float | None:
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            if condition(held()):
                return time.monotonic() - started
            time.sleep(0.05)
        return None

    ok = True
    try:
        ensure_policies(topology, settings.broker.management_url, settings.broker.user, settings.broker.password.get_secret_value())
        workers = start_workers(["change-producer", "transformer", "publisher"], env, workdir)

        took = wait(lambda h: "demo-meeting" in h and "demo-course" in h and sum(k.startswith("demo-standup$") for k in h) == 6)
        ok &= _report("first sync: the calendar reaches Planner", took)
        _show(held())

        at = tomorrow.isoformat()
        requests.patch(f"{control}/items/demo-meeting", json={"start": f"{at}T10:00", "end": f"{at}T11:30"}, timeout=10).raise_for_status()
        moved = datetime.fromisoformat(f"{at}T10:00").replace(tzinfo=CPH)
        ok &= _report("move the team meeting to 10:00-11:30", wait(lambda h: h.get("demo-meeting", (None,))[0] == moved))

        requests.delete(f"{control}/items/demo-dentist", timeout=10).raise_for_status()
        ok &= _report("delete the dentist appointment", wait(lambda h: "demo-dentist" not in h))

        requests.patch(f"{control}/items/demo-lunch", json={"status": "Busy"}, timeout=10).raise_for_status()
        ok &= _report("mark lunch as busy", wait(lambda h: "demo-lunch" in h))

        requests.delete(f"{control}/items/demo-standup/occurrences", json={"index": 2}, timeout=10).raise_for_status()
        ok &= _report("cancel one stand-up of the series", wait(lambda h: sum(k.startswith("demo-standup$") for k in h) == 5))
        print()
        _show(held())
        calls = planner.state.calls()
        print(f"\nPlanner received {len(calls)} calls: " + ", ".join(f"{c.operation}({len(c.origin_ids)})" for c in calls))
        print("\nresult: " + ("OK - Planner follows the calendar" if ok else f"FAILED - see the worker logs in {workdir}"))
        return 0 if ok else 1
    finally:
        stop_workers(workers)
        exchange.stop()
        planner.stop()
        delete_everything(topology, settings.broker.management_url, settings.broker.user, settings.broker.password.get_secret_value())


def _report(step: str, took: float | None) -> bool:
    print(f"  {step:<45} " + (f"in Planner after {took:.2f} s" if took is not None else "NOT SEEN in time"))
    return took is not None


def _show(events: dict[str, tuple[datetime, datetime]]) -> None:
    print("\n  Planner holds (Europe/Copenhagen):")
    for origin, (start, end) in sorted(events.items(), key=lambda e: e[1][0]):
        print(f"    {start.astimezone(CPH):%a %d %b %H:%M} - {end.astimezone(CPH):%a %d %b %H:%M}  {origin}")
    print()
