"""The plannersync command as an operator uses it: help everywhere, schema, topology, mailboxes, resync."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from plannersync.cli import parser
from tests.support.broker import drain
from tests.support.processes import PLANNERSYNC

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PLANNERSYNC, *args], env=env, capture_output=True, text=True, timeout=120)


def _subcommands() -> list[list[str]]:
    found = []
    top = parser()
    for action in top._subparsers._group_actions:  # type: ignore[union-attr]
        for name, sub in action.choices.items():
            found.append([name])
            for inner in sub._subparsers._group_actions if sub._subparsers else []:  # type: ignore[union-attr]
                found.extend([name, child] for child in inner.choices)
    return found


@pytest.mark.parametrize("words", _subcommands(), ids=lambda w: " ".join(w))
def test_every_subcommand_has_help(words: list[str]) -> None:
    done = run(*words, "--help")
    assert done.returncode == 0 and "usage: plannersync" in done.stdout


def test_db_upgrade_is_idempotent_and_mailboxes_are_managed_by_hand(worker_env: dict[str, str]) -> None:
    for _ in range(2):
        done = run("db", "upgrade", env=worker_env)
        assert done.returncode == 0 and "schema at version 1" in done.stdout, done.stderr
    assert "enrolled" in run("mailboxes", "add", "Anne@Jobcenter.dk", "bo@jobcenter.dk", env=worker_env).stdout
    assert "already enrolled" in run("mailboxes", "add", "anne@jobcenter.dk", env=worker_env).stdout
    assert "removed" in run("mailboxes", "remove", "bo@jobcenter.dk", env=worker_env).stdout
    listed = run("mailboxes", "list", env=worker_env).stdout.splitlines()
    assert [line.split("\t")[:2] for line in listed] == [["anne@jobcenter.dk", "enabled"], ["bo@jobcenter.dk", "disabled"]]


def test_topology_export_writes_the_definitions_compose_loads(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin"}
    done = run("topology", "export", "--password-file", str(ROOT / "deploy" / "secrets" / "amqp_password.txt"), "-o", str(tmp_path / "d.json"), env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "d.json").read_text()) == json.loads((ROOT / "deploy" / "rabbitmq" / "definitions.json").read_text())


def test_ddl_for_sql_server_is_printed_for_review() -> None:
    done = run("db", "ddl", "mssql", env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and done.stdout.count("CREATE TABLE") == 6 and "DATETIME2" in done.stdout


def test_resync_publishes_a_snapshot_of_an_enrolled_mailbox(worker_env: dict[str, str], topology: object) -> None:
    import requests

    from simulators.exchange.server import start_server

    sim = start_server(users={"svc": "pw"}, mailboxes=["anne@jobcenter.dk"])
    try:
        from datetime import date, timedelta

        day = date.today() + timedelta(days=7)
        requests.post(f"{sim.control_url}/mailboxes/anne@jobcenter.dk/items", json={"start": f"{day}T09:00", "end": f"{day}T10:00", "timezone": "Romance Standard Time"}, timeout=10).raise_for_status()
        env = {**worker_env, "PLANNERSYNC_EXCHANGE__ENDPOINT": sim.url, "PLANNERSYNC_EXCHANGE__USERNAME": "svc", "PLANNERSYNC_EXCHANGE__PASSWORD": "pw"}
        assert run("mailboxes", "add", "anne@jobcenter.dk", env=env).returncode == 0
        done = run("resync", "--all", env=env)
        assert done.returncode == 0, done.stderr
        assert "anne@jobcenter.dk\t1 items published" in done.stdout
        parts = drain(topology.stage("transformer").work_queue(), timeout=10)  # type: ignore[attr-defined]
        snapshot = json.loads(parts[0][1]) if parts else {}
        assert snapshot.get("type") == "calendar_snapshot" and snapshot["final"] is True and len(snapshot["items"]) == 1
        failed = run("resync", "--mailbox", "nobody@jobcenter.dk", env=env)
        assert failed.returncode == 1 and "FAILED" in failed.stdout
    finally:
        sim.stop()
