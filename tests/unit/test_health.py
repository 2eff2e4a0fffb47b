"""Health files: what a worker reports, and when it counts as healthy."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

from shared.broker.consume_loop import Consumer
from shared.broker.topology import Topology
from shared.config import load_settings
from shared.health import is_healthy, read_health, write_health


def test_a_paused_publisher_says_so_and_why(tmp_path: Path) -> None:
    settings = load_settings(environ={})
    topology = Topology("ps", (timedelta(seconds=1),))
    consumer = Consumer(settings.broker, topology, topology.stage("publisher"), lambda batch: [], health_dir=tmp_path)
    consumer.health.connected = True
    consumer.pause_until(time.time() + 60, "planner_down: HTTP 503")
    consumer._write_health(force=True)
    data = read_health(tmp_path)["publisher"]
    assert data["state"] == "paused" and "HTTP 503" in data["pause_reason"] and data["paused_until"]
    assert is_healthy(data, 30) == (True, "paused")


def test_a_disconnected_or_stale_worker_is_unhealthy(tmp_path: Path) -> None:
    write_health(tmp_path, "transformer", "disconnected")
    assert is_healthy(read_health(tmp_path)["transformer"], 30)[0] is False
    write_health(tmp_path, "transformer", "consuming")
    data = read_health(tmp_path)["transformer"]
    assert is_healthy(data, 30)[0] is True
    assert is_healthy(data, 30, now=time.time() + 31) == (False, "health file is 31 s old")
    assert is_healthy(None, 30) == (False, "no health file")
