"""Workers as real OS processes (``plannersync run <worker>``) against the simulators."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from simulators.planner.server import RunningPlannerSim, start_server

PLANNERSYNC = str(Path(sys.executable).with_name("plannersync"))


class WorkerProcess:
    def __init__(self, worker: str, env: dict[str, str], log_dir: Path) -> None:
        self.worker = worker
        self.env = env
        self.log_path = log_dir / f"{worker}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen([PLANNERSYNC, "run", self.worker], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def stop(self, timeout: float = 20) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


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
