"""One busy time carried end to end: broker → transformer process → publisher process → Planner simulator."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import requests

from shared.broker.publishing import Outgoing, Publisher
from shared.broker.topology import Topology
from shared.config import Settings
from shared.domain.contracts import CalendarChange, CalendarItem, encode
from simulators.planner.server import RunningPlannerSim
from tests.support.broker import drain, publish_raw, queue_depth
from tests.support.processes import WorkerProcess
from tests.support.waiting import wait_for

MAILBOX = "sagsbehandler@jobcenter.dk"


def busy_change(start: datetime, hours: int = 1, uid: str | None = None, observed: datetime | None = None) -> CalendarChange:
    uid = uid or f"040000008200E00074C5B7101A82E008{uuid.uuid4().hex}"
    item = CalendarItem(item_id=f"AAMk-{uid[-8:]}", uid=uid, start=start, end=start + timedelta(hours=hours), free_busy="Busy", time_zone="Romance Standard Time")
    return CalendarChange(
        correlation_id=uuid.uuid4().hex,
        mailbox=MAILBOX,
        observed_at=observed or datetime.now(timezone.utc),
        change="upsert",
        item_id=item.item_id,
        item=item,
    )


def sim_events(sim: RunningPlannerSim) -> list[dict]:
    return requests.get(f"{sim.control_url}/events", params={"email": MAILBOX}, timeout=5).json()["events"]


def tomorrow_at(hour: int) -> datetime:
    day = (datetime.now(timezone.utc) + timedelta(days=1)).date()
    return datetime(day.year, day.month, day.day, hour, tzinfo=timezone.utc)


def _env(worker_env: dict[str, str], sim: RunningPlannerSim) -> dict[str, str]:
    return {**worker_env, "PLANNERSYNC_PLANNER__ENDPOINT": sim.url, "PLANNERSYNC_PLANNER__LINGER": "50ms"}


def test_a_calendar_change_reaches_planner_through_both_worker_processes(
    settings: Settings, topology: Topology, worker_env: dict[str, str], planner_sim: RunningPlannerSim, processes: list[WorkerProcess], tmp_path: Path
) -> None:
    env = _env(worker_env, planner_sim)
    processes += [WorkerProcess("transformer", env, tmp_path).start(), WorkerProcess("publisher", env, tmp_path).start()]
    publisher = Publisher(settings.broker, topology)
    start = tomorrow_at(9)
    change = busy_change(start, hours=2)
    publisher.publish(Outgoing(topology.calendar_exchange, topology.change_key(MAILBOX), change))

    events = wait_for(lambda: sim_events(planner_sim), 60, what="the busy time in Planner")
    assert len(events) == 1
    event = events[0]
    assert event["origin_id"] == change.item.uid  # type: ignore[union-attr]
    assert datetime.fromisoformat(event["start"]) == start
    assert datetime.fromisoformat(event["end"]) == start + timedelta(hours=2)

    # bad input on the same running workers: dead-lettered with the reason, and consuming goes on
    raw = json.loads(encode(busy_change(start)))
    raw["schema_version"] = 42
    publish_raw(topology.calendar_exchange, topology.change_key(MAILBOX), json.dumps(raw).encode())
    publish_raw(topology.calendar_exchange, topology.change_key(MAILBOX), b"\x00garbage")
    second = busy_change(tomorrow_at(13))
    publisher.publish(Outgoing(topology.calendar_exchange, topology.change_key(MAILBOX), second))
    dead = drain(topology.stage("transformer").dead_letter_queue(), timeout=30, count=2)
    assert sorted(p.headers["x-plannersync-reason"].split(":")[0] for p, _ in dead) == ["malformed message", "unknown schema"]
    wait_for(lambda: len(sim_events(planner_sim)) == 2, 60, what="the next busy time after the bad messages")
    publisher.close()

    for proc in processes:
        assert proc.stop() == 0, proc.log()
    logs = processes[0].log() + processes[1].log()
    assert change.correlation_id in processes[0].log() and change.correlation_id in processes[1].log()
    assert "worker_stopped" in logs


def test_a_publisher_killed_while_holding_a_message_delivers_it_exactly_once_after_restart(
    settings: Settings, topology: Topology, worker_env: dict[str, str], planner_sim: RunningPlannerSim, processes: list[WorkerProcess], tmp_path: Path
) -> None:
    env = _env(worker_env, planner_sim)
    transformer = WorkerProcess("transformer", env, tmp_path).start()
    processes.append(transformer)
    publisher_queue = topology.stage("publisher").work_queue()
    producer = Publisher(settings.broker, topology)
    start = tomorrow_at(10)
    change = busy_change(start, hours=1)
    producer.publish(Outgoing(topology.calendar_exchange, topology.change_key(MAILBOX), change))
    producer.close()
    wait_for(lambda: queue_depth(topology, publisher_queue) == 1, 60, what="the busy-time state waiting for the publisher")

    requests.post(f"{planner_sim.control_url}/faults", json={"type": "latency", "seconds": 5}, timeout=5).raise_for_status()
    first = WorkerProcess("publisher", env, tmp_path).start()
    processes.append(first)
    wait_for(lambda: queue_depth(topology, publisher_queue) == 0, 60, what="the publisher taking the message (unacked)")
    first.kill()  # SIGKILL while the message is unacknowledged (buffered or inside the slow SOAP call)

    requests.delete(f"{planner_sim.control_url}/faults", timeout=5).raise_for_status()
    wait_for(lambda: queue_depth(topology, publisher_queue) == 1, 30, what="the broker returning the unacked message")
    second = WorkerProcess("publisher", env, tmp_path).start()
    processes.append(second)
    wait_for(lambda: queue_depth(topology, publisher_queue) == 0 and sim_events(planner_sim), 60, what="delivery after restart")
    wait_for(lambda: "busy_time_delivered" in second.log() or "busy_time_unchanged" in second.log(), 30, what="the restarted publisher settling")

    events = sim_events(planner_sim)
    assert len(events) == 1, events
    assert datetime.fromisoformat(events[0]["start"]) == start
    assert datetime.fromisoformat(events[0]["end"]) == start + timedelta(hours=1)
    assert second.stop() == 0
