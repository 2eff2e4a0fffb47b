"""Workers as real OS processes: ``plannersync run <worker>`` with its own environment and log file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

PLANNERSYNC = str(Path(sys.executable).with_name("plannersync"))  # the console script installed beside this Python


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
