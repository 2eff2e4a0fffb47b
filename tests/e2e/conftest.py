"""Fixtures for end-to-end runs: the Planner simulator and the worker processes (tests/support/processes.py) of a test."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from simulators.planner.server import RunningPlannerSim, start_server
from tests.support.processes import WorkerProcess


@pytest.fixture
def planner_sim() -> Iterator[RunningPlannerSim]:
    sim = start_server()
    yield sim
    sim.stop()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for proc in started:
        if proc.process is not None and proc.process.poll() is None:
            proc.process.kill()
            proc.process.wait(10)
        print(f"----- {proc.worker} log -----\n{proc.log()[-6000:]}")  # shown by pytest when the test failed
