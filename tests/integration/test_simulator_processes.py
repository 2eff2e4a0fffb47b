"""A simulator started from the command line and stopped as soon as it has said where it serves stops cleanly.

Found as a flaky test (``test_the_command_line_serves_a_loaded_calendar_until_terminated``): each simulator printed
its URLs and only then installed its SIGTERM handler, so a caller that read the URLs and stopped it at once killed it
by the default action (exit -15) about one time in six. Made here the way a test harness or a supervisor does it:
start, read the announcement, SIGTERM, many times over.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.support.processes import PLANNERSYNC

STARTS = 12


@pytest.mark.parametrize("simulator", ["exchange", "planner", "graph"])
def test_a_simulator_stopped_right_after_its_announcement_exits_cleanly(simulator: str) -> None:
    codes = []
    for _ in range(STARTS):
        process = subprocess.Popen([PLANNERSYNC, "sim", simulator, "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert process.stdout is not None
        try:
            line = ""
            while "control" not in line:
                line = process.stdout.readline()
                assert line, "the simulator exited before announcing its URLs"
            process.terminate()
            codes.append(process.wait(timeout=10))
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
            process.stdout.close()
    assert codes == [0] * STARTS
