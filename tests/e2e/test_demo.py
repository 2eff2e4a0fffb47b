"""The README's first command works: the demo carries a calendar into Planner and follows edits."""

from __future__ import annotations

import subprocess

from tests.support.processes import PLANNERSYNC


def test_the_demo_runs_green(broker: str) -> None:  # the fixture fails loudly without RabbitMQ
    done = subprocess.run([PLANNERSYNC, "demo", "--seconds", "60"], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "result: OK" in done.stdout
    for step in ("first sync", "move the team meeting", "delete the dentist", "mark lunch as busy", "cancel one stand-up"):
        line = next(line for line in done.stdout.splitlines() if step in line)
        assert "in Planner after" in line, line
    assert "Team meeting" not in done.stdout and "Dentist" not in done.stdout  # subjects never leave Exchange
