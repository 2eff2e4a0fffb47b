"""The README's first command works: the demo carries a calendar into Planner, follows edits, and leaves nothing behind."""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

import pytest
import requests

from tests.support.broker import MANAGEMENT
from tests.support.processes import PLANNERSYNC

GUEST = ("guest", "guest")


def _demo(env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PLANNERSYNC, "demo", "--seconds", "60"], capture_output=True, text=True, timeout=240, env=env)


def _ours(vhost: str, prefix: str) -> list[str]:
    found = []
    for kind in ("queues", "exchanges", "policies"):
        listed = requests.get(f"{MANAGEMENT}/api/{kind}/{quote(vhost, safe='')}", auth=GUEST, timeout=10).json()
        found += [f"{kind}: {item['name']}" for item in listed if item["name"].startswith(prefix + ".")]
    return found


def test_the_demo_runs_green(broker: str) -> None:  # the fixture fails loudly without RabbitMQ
    done = _demo()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "result: OK" in done.stdout
    for step in ("first sync", "move the team meeting", "delete the dentist", "mark lunch as busy", "cancel one stand-up"):
        line = next(line for line in done.stdout.splitlines() if step in line)
        assert "in Planner after" in line, line
    assert "Team meeting" not in done.stdout and "Dentist" not in done.stdout  # subjects never leave Exchange


@pytest.fixture
def vhost(broker: str) -> Iterator[str]:
    """A virtual host of this test on the shared broker, guest allowed; deleted afterwards."""
    name = f"demo-test-{uuid.uuid4().hex[:8]}"
    requests.put(f"{MANAGEMENT}/api/vhosts/{quote(name, safe='')}", auth=GUEST, timeout=10).raise_for_status()
    requests.put(f"{MANAGEMENT}/api/permissions/{quote(name, safe='')}/guest", json={"configure": ".*", "write": ".*", "read": ".*"}, auth=GUEST, timeout=10).raise_for_status()
    yield name
    requests.delete(f"{MANAGEMENT}/api/vhosts/{quote(name, safe='')}", auth=GUEST, timeout=30)


def test_the_demo_runs_where_the_broker_settings_say_says_so_and_removes_everything(vhost: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLANNERSYNC_")}
    env["PLANNERSYNC_BROKER__VHOST"] = vhost
    done = _demo(env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"virtual host '{vhost}'" in done.stdout and "amqp://127.0.0.1:5672" in done.stdout and MANAGEMENT in done.stdout
    prefix = re.search(r"'(demo[0-9a-f]{6})\.\*'", done.stdout).group(1)  # type: ignore[union-attr]
    workdir = Path(re.search(r"state and worker logs in (\S+)", done.stdout).group(1))  # type: ignore[union-attr]
    assert f"removed the queues, exchanges and policies '{prefix}.*' from amqp://127.0.0.1:5672/{vhost} and {workdir}" in done.stdout
    assert _ours(vhost, prefix) == [] and _ours("/", prefix) == []  # the workers used the same broker as setup and cleanup
    assert not workdir.exists()
