"""Worker processes on this machine, for the demo and the benchmarks: start them, stop them cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

PLANNERSYNC = str(Path(sys.executable).with_name("plannersync"))


def start_workers(names: list[str], env: dict[str, str], log_dir: Path) -> list[subprocess.Popen[bytes]]:
    """``plannersync run <name>`` for each name, logging to ``<log_dir>/<name>.log``."""
    return [
        subprocess.Popen([PLANNERSYNC, "run", name], env=env, stdout=(log_dir / f"{name}.log").open("wb"), stderr=subprocess.STDOUT)
        for name in names
    ]


def stop_workers(workers: list[subprocess.Popen[bytes]], grace: float = 30.0) -> None:
    """SIGTERM all, wait for each to finish its in-flight work, SIGKILL what does not stop in time."""
    for proc in workers:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in workers:
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
