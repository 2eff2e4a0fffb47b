"""Replicas of one worker sharing the health directory each keep a health file of their own (decision 103).

Before, every transformer replica wrote ``transformer.json``: the last writer won, ``plannersync status`` showed one
transformer whichever was alive, and a container's healthcheck could pass a wedged replica on its neighbour's file.
Here with real processes: two transformer replicas and a third that takes the place of one SIGKILLed, all on one
health directory as compose's state volume gives them.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from shared.broker.topology import Topology
from tests.support.processes import PLANNERSYNC, WorkerProcess
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(180)


def files(health_dir: Path) -> dict[str, dict[str, object]]:
    out = {}
    for path in health_dir.glob("transformer*.json"):
        try:
            out[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue   # being replaced this very moment
    return out


def fresh_pids(health_dir: Path) -> dict[str, object]:
    now = time.time()
    return {name: data["pid"] for name, data in files(health_dir).items() if now - float(str(data["updated_ts"])) < 3}


def test_each_replica_keeps_its_own_health_file_and_a_gone_one_is_seen_and_cleared(
    worker_env: dict[str, str], topology: Topology, processes: list[WorkerProcess], tmp_path: Path,
) -> None:
    health_dir = Path(worker_env["PLANNERSYNC_STATUS__HEALTH_DIR"])
    replicas = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        replicas.append(WorkerProcess("transformer", worker_env, tmp_path / name).start())
        processes.append(replicas[-1])
        wait_for(lambda: len(fresh_pids(health_dir)) == len(replicas) and all(d["state"] == "consuming" for d in files(health_dir).values()), 30,
                 what=f"replica {name}'s health file")
    pids = {r.process.pid for r in replicas if r.process is not None}
    assert set(fresh_pids(health_dir)) == {"transformer", "transformer.2"} and set(fresh_pids(health_dir).values()) == pids
    status = subprocess.run([PLANNERSYNC, "status", "--json"], env=worker_env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    workers = json.loads(status.stdout)["workers"]
    assert {name: (w["worker"], w["healthy"], w["why"]) for name, w in workers.items() if name.startswith("transformer")} == {
        "transformer": ("transformer", True, "consuming"), "transformer.2": ("transformer", True, "consuming")}
    health = subprocess.run([PLANNERSYNC, "health", "transformer"], env=worker_env, capture_output=True, text=True, timeout=60)
    assert health.returncode == 0, health.stdout + health.stderr

    # the second replica is SIGKILLed: its file stays, and goes stale (the status shows a replica gone) ...
    second = next(r for r in replicas if r.process is not None and r.process.pid == files(health_dir)["transformer.2"]["pid"])
    second.kill()
    wait_for(lambda: "transformer.2" not in fresh_pids(health_dir), 10, what="the killed replica's file going stale")
    assert "transformer" in fresh_pids(health_dir)
    # ... until a replica takes its place, and its slot: the same file, fresh again
    (tmp_path / "c").mkdir()
    third = WorkerProcess("transformer", worker_env, tmp_path / "c").start()
    processes.append(third)
    assert third.process is not None
    wait_for(lambda: fresh_pids(health_dir).get("transformer.2") == third.process.pid, 30, what="the new replica in the freed slot")
    # a replica beyond the first that stops cleanly takes its file with it
    assert third.stop() == 0
    assert set(files(health_dir)) == {"transformer"}
