"""Health: what each worker reports, how the runner writes it, and when it counts as healthy."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

from shared.broker.consume_loop import Consumer
from shared.broker.topology import Topology
from shared.config import load_settings
from shared.health import HealthReporter, is_healthy, own_health, read_health, write_health
from shared.workers import Health
from tests.support.waiting import wait_for


def consumer() -> Consumer:
    topology = Topology("ps", (timedelta(seconds=1),))
    return Consumer(load_settings(environ={}).broker, topology, topology.stage("publisher"), lambda batch: [])


def test_a_paused_publisher_says_so_and_why(tmp_path: Path) -> None:
    publisher = consumer()
    publisher.counters.connected = True
    publisher.pause_until(time.time() + 60, "planner_down: HTTP 503")
    write_health(tmp_path, "publisher", publisher.health())
    data = read_health(tmp_path)["publisher"]
    assert data["state"] == "paused" and "HTTP 503" in data["pause_reason"] and data["paused_until"]
    assert is_healthy(data, 30) == (True, "paused")


def test_a_consumer_without_a_broker_is_running_but_not_ok() -> None:
    health = consumer().health()
    assert health.state == "disconnected" and not health.ok


def test_a_disconnected_stale_or_stuck_worker_is_unhealthy(tmp_path: Path) -> None:
    now = time.time()
    write_health(tmp_path, "transformer", Health("disconnected", now, ok=False))
    assert is_healthy(read_health(tmp_path)["transformer"], 30) == (False, "state disconnected")
    write_health(tmp_path, "transformer", Health("consuming", now), now=now)
    data = read_health(tmp_path)["transformer"]
    assert is_healthy(data, 30, now=now) == (True, "consuming")
    assert is_healthy(data, 30, now=now + 31) == (False, "health file is 31 s old")
    write_health(tmp_path, "transformer", Health("consuming", now - 40), now=now)  # the file is fresh, the loop is not
    assert is_healthy(read_health(tmp_path)["transformer"], 30, now=now) == (False, "loop has not run for 40 s")
    assert is_healthy(None, 30) == (False, "no health file")


class Beating:
    def __init__(self) -> None:
        self.calls = 0

    def run(self) -> None: ...

    def stop(self) -> None: ...

    def health(self) -> Health:
        self.calls += 1
        return Health("waiting", time.time(), facts={"next_run_at": "2026-12-02T04:30:00+00:00", "calls": self.calls})


def test_the_reporter_writes_any_workers_health_repeatedly_until_stopped(tmp_path: Path) -> None:
    worker = Beating()
    reporter = HealthReporter(worker, "reconciler", tmp_path, every=0.05)
    reporter.start()
    try:
        wait_for(lambda: read_health(tmp_path).get("reconciler", {}).get("calls", 0) >= 3, 5, what="three writes")
    finally:
        reporter.stop()
    data = read_health(tmp_path)["reconciler"]
    assert data["worker"] == "reconciler" and data["next_run_at"].startswith("2026-12-02") and is_healthy(data, 30)[0]
    assert not reporter.running  # stopped: its thread has ended, so nothing more is written


def test_a_scheduled_wait_beats_each_slice_ends_when_the_clock_reaches_the_time_and_stops_when_asked() -> None:
    import threading
    from datetime import datetime, timedelta, timezone

    from shared.workers import wait_until

    now = [datetime(2026, 12, 2, 4, 0, tzinfo=timezone.utc)]
    due = now[0] + timedelta(minutes=30)
    beats: list[datetime] = []

    def beat() -> None:  # the test clock moves ten minutes per beat, so three beats reach the due time
        beats.append(now[0])
        now[0] += timedelta(minutes=10)

    assert wait_until(due, lambda: now[0], threading.Event(), beat, 0.01) is True
    assert beats == [due - timedelta(minutes=m) for m in (30, 20, 10)]
    stopping = threading.Event()
    stopping.set()
    assert wait_until(due + timedelta(days=1), lambda: now[0], stopping, beat, 0.01) is False


def test_the_health_command_judges_its_own_hosts_replica_not_another_containers(tmp_path: Path) -> None:
    """Decision 103: on compose's shared state volume every replica has a file; a container's healthcheck must judge
    its own (same host name), so a wedged replica is not passed by a healthy neighbour's fresh file."""
    now = time.time()
    write_health(tmp_path, "transformer", Health("consuming", now))
    write_health(tmp_path, "transformer.2", Health("consuming", now - 120))   # this replica's loop wedged long ago
    files = read_health(tmp_path)
    files["transformer.2"]["host"] = "container-b"
    files["transformer.2"]["updated_ts"] = now - 120
    files["transformer"]["host"] = "container-a"
    assert files["transformer.2"]["worker"] == "transformer"
    assert is_healthy(own_health(files, "transformer", "container-a"), 30, now) == (True, "consuming")
    assert not is_healthy(own_health(files, "transformer", "container-b"), 30, now)[0]
    assert own_health(files, "transformer", "container-c") is None and own_health(files, "publisher", "container-a") is None
    del files["transformer"]["host"]   # a file written before decision 103: counted as this host's
    assert own_health(files, "transformer", "container-c") is files["transformer"]
