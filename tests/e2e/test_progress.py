"""Long commands say how far they are: ``plannersync resync --all`` and ``plannersync dlq replay`` as real processes
against the real broker, progress on stderr, results on stdout (decision 75 in docs/decisions.md)."""

from __future__ import annotations

import json
import subprocess
from datetime import date, timedelta

import pika
import requests

from shared.broker.topology import Topology
from tests.support.broker import BROKER_HOST, queue_depth
from tests.support.processes import PLANNERSYNC


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PLANNERSYNC, *args], env=env, capture_output=True, text=True, timeout=120)


def progress_lines(stderr: str, what: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"{what}: ")]


def test_resync_all_prints_how_many_mailboxes_are_done_and_how_many_failed(worker_env: dict[str, str], topology: Topology) -> None:
    from simulators.exchange.server import start_server

    sim = start_server(users={"svc": "pw"}, mailboxes=["anne@jobcenter.dk", "bo@jobcenter.dk"])
    try:
        day = date.today() + timedelta(days=7)
        requests.post(f"{sim.control_url}/mailboxes/anne@jobcenter.dk/items", json={"start": f"{day}T09:00", "end": f"{day}T10:00", "timezone": "Romance Standard Time"}, timeout=10).raise_for_status()
        env = {**worker_env, "PLANNERSYNC_EXCHANGE__ENDPOINT": sim.url, "PLANNERSYNC_EXCHANGE__USERNAME": "svc", "PLANNERSYNC_EXCHANGE__PASSWORD": "pw"}
        assert run("mailboxes", "add", "anne@jobcenter.dk", "bo@jobcenter.dk", "nobody@jobcenter.dk", env=env).returncode == 0
        each = run("resync", "--all", "--progress-every", "1", env=env)
        assert each.returncode == 1, each.stderr  # nobody@ has no mailbox: the run did not fully succeed
        lines = progress_lines(each.stderr, "resync")
        assert [line.split(",")[0] for line in lines] == ["resync: 1/3 mailboxes", "resync: 2/3 mailboxes", "resync: 3/3 mailboxes"], each.stderr
        assert lines[-1] == "resync: 3/3 mailboxes, 1 failed"
        assert not progress_lines(each.stdout, "resync") and "anne@jobcenter.dk\t1 items published" in each.stdout  # stdout stays the result
        default = run("resync", "--all", env=env)
        assert progress_lines(default.stderr, "resync")[-1] == "resync: 3/3 mailboxes, 1 failed", default.stderr
    finally:
        sim.stop()


def _dead_letters(topology: Topology, count: int, parked: int) -> None:
    stage = topology.stage("publisher")
    connection = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST))
    channel = connection.channel()
    channel.confirm_delivery()
    for n in range(count):
        headers = {"x-plannersync-reason": "gave up after 7 attempts: HTTP 503", "x-retry-count": 7, "x-original-queue": stage.work_queue(), "x-replay-count": 3 if n < parked else 0}
        body = json.dumps({"type": "busy_time_state", "mailbox": "anne@jobcenter.dk", "origin_id": f"uid-{n}"}).encode()
        channel.basic_publish("", stage.dead_letter_queue(), body, pika.BasicProperties(delivery_mode=2, message_id=f"m{n:03}", type="busy_time_state", headers=headers), mandatory=True)
    connection.close()


def test_dlq_replay_prints_how_many_dead_letters_it_has_looked_at_replayed_and_left_parked(worker_env: dict[str, str], topology: Topology) -> None:
    _dead_letters(topology, 5, parked=1)
    dry = run("dlq", "replay", "publisher", "--dry-run", "--progress-every", "2", env=worker_env)
    assert dry.returncode == 0, dry.stderr
    assert progress_lines(dry.stderr, "replay") == [
        "replay: 2/5 dead letters looked at, 1 would replay, 1 parked",
        "replay: 4/5 dead letters looked at, 3 would replay, 1 parked",
        "replay: 5/5 dead letters looked at, 4 would replay, 1 parked",
    ]
    done = run("dlq", "replay", "publisher", "--all", env=worker_env)
    assert done.returncode == 0, done.stderr
    assert progress_lines(done.stderr, "replay") == ["replay: 5/5 dead letters looked at, 4 replayed, 1 parked"]
    assert queue_depth(topology, topology.stage("publisher").dead_letter_queue()) == 1  # the parked one stays
    assert queue_depth(topology, topology.stage("publisher").work_queue()) == 4
