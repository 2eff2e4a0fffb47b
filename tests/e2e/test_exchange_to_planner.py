"""Exchange (simulator) → change producer → transformer → publisher → Planner (simulator), all as processes.

The change producer runs with TZ=America/New_York: an all-day item and a weekly series across both DST
changes must still come out on the right dates and UTC times. Canary strings put into subjects and
bodies must appear in no message, log line or database row.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import pika
import pytest
import requests

from shared.adapters.store import Store, upgrade
from shared.broker.topology import Topology
from shared.config import Settings
from simulators.exchange.server import RunningExchangeSim, start_server
from simulators.planner.server import RunningPlannerSim
from tests.support.broker import BROKER_HOST
from tests.support.processes import PLANNERSYNC, WorkerProcess
from tests.support.producers import CPH
from tests.support.waiting import wait_for

MAILBOX = "anne@jobcenter.dk"
CANARY = f"CANARY{uuid.uuid4().hex[:8]}"


def last_sunday(year: int, month: int) -> date:
    day = date(year, month + 1, 1) - timedelta(days=1)
    return day - timedelta(days=(day.weekday() + 1) % 7)


def dst_weekends(today: date) -> tuple[date, date]:
    """The next spring change at least five weeks away, and the autumn change after it."""
    year = today.year
    while last_sunday(year, 3) - timedelta(weeks=5) <= today:
        year += 1
    return last_sunday(year, 3), last_sunday(year, 10)


@pytest.fixture
def ews() -> Iterator[RunningExchangeSim]:
    sim = start_server(users={"svc": "pw"}, minute_seconds=2.0, keepalive_seconds=0.5, mailboxes=[MAILBOX])
    yield sim
    sim.stop()


@pytest.fixture
def tap(topology: Topology) -> Iterator[Any]:
    """A copy of every message on both exchanges, to search for canaries."""
    connection = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST))
    channel = connection.channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, topology.calendar_exchange, "#")
    channel.queue_bind(queue, topology.busy_exchange, "#")

    def bodies() -> list[bytes]:
        out = []
        while True:
            method, _p, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append(body)

    yield bodies
    connection.close()


def test_a_caseworkers_calendar_reaches_planner_right_across_dst_from_a_new_york_host(
    settings: Settings, topology: Topology, worker_env: dict[str, str], ews: RunningExchangeSim, planner_sim: RunningPlannerSim,
    processes: list[WorkerProcess], tap: Any, tmp_path: Path,
) -> None:
    spring, autumn = dst_weekends(datetime.now(CPH).date())
    first_monday = spring - timedelta(days=6) - timedelta(weeks=3)
    weeks = (autumn - first_monday).days // 7 + 2  # one Monday after the autumn change too
    control = f"{ews.control_url}/mailboxes/{MAILBOX}"

    series = requests.post(f"{control}/items", json={
        "start": f"{first_monday}T09:00", "end": f"{first_monday}T09:30", "timezone": "Romance Standard Time",
        "recurrence": {"pattern": "weekly", "days_of_week": ["Monday"], "count": weeks},
        "subject": f"{CANARY} team meeting", "body": f"{CANARY} agenda", "location": f"{CANARY} room",
    }, timeout=10).json()
    moved_day = first_monday + timedelta(weeks=4)  # the Monday after the spring change
    deleted_day = first_monday + timedelta(weeks=5)
    requests.patch(f"{control}/items/{series['key']}/occurrences", json={"original_start": f"{moved_day}T09:00", "start": f"{moved_day}T11:00", "end": f"{moved_day}T11:45"}, timeout=10).raise_for_status()
    requests.delete(f"{control}/items/{series['key']}/occurrences", json={"original_start": f"{deleted_day}T09:00"}, timeout=10).raise_for_status()
    all_day = requests.post(f"{control}/items", json={"start": spring.isoformat(), "all_day": True, "status": "OOF", "timezone": "Romance Standard Time", "subject": f"{CANARY} away"}, timeout=10).json()
    requests.post(f"{control}/items", json={"start": f"{spring + timedelta(days=1)}T12:00", "end": f"{spring + timedelta(days=1)}T13:00", "status": "Free", "timezone": "Romance Standard Time", "subject": CANARY}, timeout=10).raise_for_status()
    private = requests.post(f"{control}/items", json={"start": f"{spring + timedelta(days=2)}T14:00", "end": f"{spring + timedelta(days=2)}T15:00", "sensitivity": "Private", "timezone": "Romance Standard Time", "body": CANARY}, timeout=10).json()

    db = Path(worker_env["PLANNERSYNC_DATABASE__URL"].removeprefix("sqlite:///"))
    store = Store.connect(worker_env["PLANNERSYNC_DATABASE__URL"])
    upgrade(store.engine)
    store.add_mailbox(MAILBOX)
    env = {
        **worker_env,
        "PLANNERSYNC_PLANNER__ENDPOINT": planner_sim.url,
        "PLANNERSYNC_PLANNER__LINGER": "50ms",
        "PLANNERSYNC_BUSY__WINDOW_MONTHS": "24",
        "PLANNERSYNC_EXCHANGE__ENDPOINT": ews.url,
        "PLANNERSYNC_EXCHANGE__USERNAME": "svc",
        "PLANNERSYNC_EXCHANGE__PASSWORD": "pw",
        "PLANNERSYNC_EXCHANGE__STREAM_MINUTES": "1",
        "PLANNERSYNC_EXCHANGE__MAILBOX_RELOAD_INTERVAL": "500ms",
    }
    processes += [
        WorkerProcess("change-producer", {**env, "TZ": "America/New_York"}, tmp_path).start(),
        WorkerProcess("transformer", env, tmp_path).start(),
        WorkerProcess("publisher", env, tmp_path).start(),
    ]

    expected: dict[str, tuple[datetime, datetime]] = {}
    for week in range(weeks):
        day = first_monday + timedelta(weeks=week)
        if day == deleted_day:
            continue
        start, end = (time(11, 0), time(11, 45)) if day == moved_day else (time(9, 0), time(9, 30))
        key = f"{series['uid']}${day:%Y%m%d}-090000"
        expected[key] = (datetime.combine(day, start, CPH).astimezone(timezone.utc), datetime.combine(day, end, CPH).astimezone(timezone.utc))
    expected[all_day["uid"]] = (datetime.combine(spring, time(0), CPH).astimezone(timezone.utc), datetime.combine(spring + timedelta(days=1), time(0), CPH).astimezone(timezone.utc))
    expected[private["uid"]] = (datetime.combine(spring + timedelta(days=2), time(14), CPH).astimezone(timezone.utc), datetime.combine(spring + timedelta(days=2), time(15), CPH).astimezone(timezone.utc))

    def held() -> dict[str, tuple[datetime, datetime]]:
        return {e.origin_id: (e.start, e.end) for e in planner_sim.state.events(MAILBOX)}

    wait_for(lambda: held() == expected, 90, interval=0.5, what=f"Planner to hold exactly the {len(expected)} busy times")
    before_spring = expected[f"{series['uid']}${first_monday:%Y%m%d}-090000"][0]
    after_spring = expected[f"{series['uid']}${first_monday + timedelta(weeks=6):%Y%m%d}-090000"][0]
    after_autumn = expected[f"{series['uid']}${first_monday + timedelta(weeks=weeks - 1):%Y%m%d}-090000"][0]
    assert (before_spring.hour, after_spring.hour, after_autumn.hour) == (8, 7, 8)  # 09:00 CET / CEST / CET in UTC
    assert expected[all_day["uid"]][0].hour == 23  # 00:00 CET on the spring Sunday, though the producer's host is in New York

    # a live edit: the moved occurrence moves again, and reaches Planner in seconds
    requests.patch(f"{control}/items/{series['key']}/occurrences", json={"original_start": f"{moved_day}T09:00", "start": f"{moved_day}T13:00", "end": f"{moved_day}T13:30"}, timeout=10).raise_for_status()
    moved_key = f"{series['uid']}${moved_day:%Y%m%d}-090000"
    wait_for(lambda: held().get(moved_key, (None,))[0] == datetime.combine(moved_day, time(13), CPH).astimezone(timezone.utc), 30, what="the second move in Planner")

    # the operator's view while everything runs
    import json
    import subprocess

    status_env = {k: v for k, v in env.items() if k != "TZ"}
    status = json.loads(wait_for(lambda: _status(PLANNERSYNC, status_env), 30, what="all three workers healthy"))
    row = next(m for m in status["mailboxes"] if m["mailbox"] == MAILBOX)
    assert row["last_sync_at"] and row["last_delivery_at"] and row["exchange"].startswith("active") and not row["last_error"]
    assert subprocess.run([PLANNERSYNC, "health", "publisher"], env=status_env, capture_output=True, timeout=60).returncode == 0

    for proc in processes:
        assert proc.stop() == 0, proc.log()[-3000:]
    # one correlation id follows the all-day item from the Exchange read to Planner's receipt
    import json as _json

    trail = {}
    for proc in processes:
        for line in proc.log().splitlines():
            if line.startswith("{"):
                entry = _json.loads(line)
                trail.setdefault(entry.get("correlation_id"), set()).add(entry.get("event"))
    assert any({"calendar_change_published", "calendar_transformed", "planner_receipt", "busy_time_delivered"} <= events for cid, events in trail.items() if cid)
    # the canary is nowhere: messages, logs, database, Planner
    messages = b"\n".join(tap())
    assert messages and CANARY.encode() not in messages
    for proc in processes:
        assert CANARY not in proc.log() and proc.log()
    assert CANARY.encode() not in db.read_bytes()
    assert CANARY not in str([c.to_json() for c in planner_sim.state.calls()])


def _status(exe: str, env: dict[str, str]) -> str | None:
    import json
    import subprocess

    done = subprocess.run([exe, "status", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    workers = json.loads(done.stdout)["workers"]
    wanted = {"transformer", "publisher", "change-producer"}
    return done.stdout if wanted <= set(workers) and all(workers[w]["healthy"] for w in wanted) else None
