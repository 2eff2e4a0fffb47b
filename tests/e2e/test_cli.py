"""The plannersync command as an operator uses it: help everywhere, schema, topology, mailboxes, resync."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from plannersync.cli import parser
from tests.support.broker import drain
from tests.support.processes import PLANNERSYNC

ROOT = Path(__file__).resolve().parents[2]
THIS_CODE = {name: os.environ[name] for name in ("PYTHONPATH",) if name in os.environ}  # a bare environment still runs this checkout


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


def _walk(command: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], argparse.Action]]:
    """Every argument of every (sub)command, with the words that reach it."""
    for action in command._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _walk(child, (*words, name))
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)) or words == ():
            yield words, action


def test_every_option_and_argument_of_every_command_has_help_text() -> None:
    missing = [f"plannersync {' '.join(words)} {'/'.join(action.option_strings) or action.dest}" for words, action in _walk(parser()) if not (action.help or "").strip()]
    assert not missing, "arguments without help text:\n" + "\n".join(missing)


def test_version_is_printed() -> None:
    done = run("--version", env={"PATH": "/usr/bin:/bin", **THIS_CODE})
    assert done.returncode == 0 and re.fullmatch(r"plannersync \d+\.\d+\.\d+\S*\n", done.stdout), done.stdout


@pytest.mark.parametrize("words", _subcommands(), ids=lambda w: " ".join(w))
def test_every_subcommand_has_help(words: list[str]) -> None:
    done = run(*words, "--help")
    assert done.returncode == 0 and "usage: plannersync" in done.stdout


def test_db_upgrade_is_idempotent_and_mailboxes_are_managed_by_hand(worker_env: dict[str, str]) -> None:
    for _ in range(2):
        done = run("db", "upgrade", env=worker_env)
        assert done.returncode == 0 and "database schema at version" in done.stdout, done.stderr
    assert "enrolled" in run("mailboxes", "add", "Anne@Jobcenter.dk", "bo@jobcenter.dk", env=worker_env).stdout
    assert "already enrolled" in run("mailboxes", "add", "anne@jobcenter.dk", env=worker_env).stdout
    assert "removed" in run("mailboxes", "remove", "bo@jobcenter.dk", env=worker_env).stdout
    listed = run("mailboxes", "list", env=worker_env).stdout.splitlines()
    assert listed[0].split() == ["mailbox", "enabled", "status", "backend", "last", "delivery", "last", "error"]
    assert [line.split()[:4] for line in listed[1:]] == [["anne@jobcenter.dk", "enabled", "new", "default"], ["bo@jobcenter.dk", "disabled", "removed", "default"]]
    as_json = [json.loads(line) for line in run("mailboxes", "list", "--json", env=worker_env).stdout.splitlines()]
    assert [(m["address"], m["enabled"], m["backend"]) for m in as_json] == [("anne@jobcenter.dk", True, "default (ews)"), ("bo@jobcenter.dk", False, "default (ews)")]


def test_mailboxes_add_checks_every_address_first_and_refuses_an_empty_list(worker_env: dict[str, str]) -> None:
    empty = run("mailboxes", "add", env=worker_env)
    assert empty.returncode == 2 and empty.stderr.strip() == "plannersync: mailboxes add needs at least one address; nothing done"
    bad = run("mailboxes", "add", "anne@jobcenter.dk", "bo jobcenter.dk", "cy@jobcenter", "dy@jobcenter.dk,ey@jobcenter.dk", env=worker_env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert lines[0] == "plannersync: 'bo jobcenter.dk' is not a mailbox address: needs exactly one @"
    assert lines[1].startswith("plannersync: 'cy@jobcenter' is not a mailbox address: the domain") and "'dy@jobcenter.dk,ey@jobcenter.dk'" in lines[2]
    assert lines[3] == "plannersync: nothing enrolled: correct the address(es) and run again" and len(lines) == 4
    assert run("mailboxes", "list", "--json", env=worker_env).stdout == ""  # not even the valid one
    assert run("mailboxes", "remove", env=worker_env).returncode == 2


def test_a_mailbox_names_its_backend_when_added_and_can_change_it(worker_env: dict[str, str]) -> None:
    assert run("mailboxes", "add", "cloud@jobcenter.dk", "--backend", "graph", env=worker_env).returncode == 0
    assert run("mailboxes", "add", "onprem@jobcenter.dk", env=worker_env).returncode == 0
    assert run("mailboxes", "set-backend", "onprem@jobcenter.dk", "ews", env=worker_env).stdout.strip() == "onprem@jobcenter.dk: backend ews"
    assert run("mailboxes", "set-backend", "cloud@jobcenter.dk", "default", env=worker_env).returncode == 0
    unknown = run("mailboxes", "set-backend", "nobody@jobcenter.dk", "graph", env=worker_env)
    assert unknown.returncode == 1 and "nobody@jobcenter.dk is not enrolled" in unknown.stderr
    rows = {m["address"]: m["backend"] for m in map(json.loads, run("mailboxes", "list", "--json", env=worker_env).stdout.splitlines())}
    assert rows == {"cloud@jobcenter.dk": "default (ews)", "onprem@jobcenter.dk": "ews"}
    assert "onprem@jobcenter.dk  enabled  new     ews" in run("mailboxes", "list", env=worker_env).stdout


def test_allow_and_deny_lists_are_kept_listed_and_lifted(worker_env: dict[str, str]) -> None:
    assert "added to the allow list" in run("mailboxes", "allow", "Anne@Jobcenter.dk", env=worker_env).stdout
    assert "already on the allow list" in run("mailboxes", "allow", "anne@jobcenter.dk", env=worker_env).stdout
    assert run("mailboxes", "deny", "not-an-address", env=worker_env).returncode == 2
    assert run("mailboxes", "deny", "bo@jobcenter.dk", env=worker_env).returncode == 0
    allowed = run("mailboxes", "allow", env=worker_env).stdout.splitlines()
    assert allowed[0].split() == ["address", "added"] and allowed[1].startswith("anne@jobcenter.dk  ")
    assert [json.loads(line)["address"] for line in run("mailboxes", "deny", "--json", env=worker_env).stdout.splitlines()] == ["bo@jobcenter.dk"]
    assert "taken off the deny list" in run("mailboxes", "undeny", "bo@jobcenter.dk", env=worker_env).stdout
    assert "not on the allow list" in run("mailboxes", "unallow", "bo@jobcenter.dk", env=worker_env).stdout
    empty = run("mailboxes", "deny", env=worker_env)
    assert empty.stdout == "" and "the deny list is empty" in empty.stderr


def test_mailboxes_sync_enrols_from_planner_and_reports(worker_env: dict[str, str], topology: object, planner_sim: object) -> None:
    import requests

    requests.post(f"{planner_sim.control_url}/resources", json=[{"email": "anne@jobcenter.dk"}, {"email": "ANNE@jobcenter.dk"}, {"email": "bo@jobcenter.dk"}], timeout=10).raise_for_status()  # type: ignore[attr-defined]
    env = {**worker_env, "PLANNERSYNC_PLANNER__ENDPOINT": planner_sim.url}  # type: ignore[attr-defined]
    assert run("mailboxes", "deny", "bo@jobcenter.dk", env=env).returncode == 0
    done = run("mailboxes", "sync", env=env)
    assert done.returncode == 0, done.stderr
    assert "enrolment from Planner: applied" in done.stdout and "enrolled: anne@jobcenter.dk" in done.stdout
    assert "listed more than once by Planner (enrolled once): anne@jobcenter.dk" in done.stdout and "on the deny list: bo@jobcenter.dk" in done.stdout
    requests.post(f"{planner_sim.control_url}/resources", json=[], timeout=10).raise_for_status()  # type: ignore[attr-defined]
    empty = run("mailboxes", "sync", "--json", env=env)
    assert empty.returncode == 1 and json.loads(empty.stdout)["outcome"] == "empty"


def test_reconcile_all_shows_a_progress_line_per_mailbox(worker_env: dict[str, str], topology: object, planner_sim: object) -> None:
    env = {**worker_env, "PLANNERSYNC_PLANNER__ENDPOINT": planner_sim.url, "PLANNERSYNC_RECONCILE__MAILBOXES_PER_CALL": "2"}  # type: ignore[attr-defined]
    assert run("mailboxes", "add", "anne@jobcenter.dk", "bo@jobcenter.dk", "cy@jobcenter.dk", env=env).returncode == 0
    done = run("reconcile", "--all", env=env)
    assert done.returncode == 0, done.stderr
    progress = [line for line in done.stderr.splitlines() if line.startswith("[")]
    assert progress == ["[1/3] anne@jobcenter.dk: reconciled", "[2/3] bo@jobcenter.dk: reconciled", "[3/3] cy@jobcenter.dk: reconciled"]
    assert done.stdout.splitlines()[0].startswith("mailbox") and len(done.stdout.splitlines()) == 4


def test_topology_export_writes_the_definitions_compose_renders_at_boot(tmp_path: Path) -> None:
    env = {**THIS_CODE, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PLANNERSYNC_BROKER__USER": "plannersync"}
    done = run("topology", "export", "--password-file", str(ROOT / "deploy" / "secrets" / "amqp_password.txt"), "-o", str(tmp_path / "d.json"), env=env)
    assert done.returncode == 0, done.stderr
    written = json.loads((tmp_path / "d.json").read_text())
    assert [(u["name"], u["tags"]) for u in written["users"]] == [("plannersync", ["policymaker"])]
    assert {q["name"]: q["arguments"]["x-queue-type"] for q in written["queues"]}["plannersync.publisher.dlq"] == "classic"


def test_ddl_for_sql_server_is_printed_for_review() -> None:
    done = run("db", "ddl", "mssql", env={"PATH": "/usr/bin:/bin", **THIS_CODE})
    assert done.returncode == 0 and done.stdout.count("CREATE TABLE") == 10 and "DATETIME2" in done.stdout
    assert "CREATE INDEX ix_key_claims_owner ON key_claims (stage, owner);" in done.stdout


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


# --- common mistakes: one line, no traceback, exit 3 (decision 44) ---------------------------------------------


MISTAKES = [
    ("broker unreachable", {"PLANNERSYNC_BROKER__PORT": "1"}, ("dlq", "list", "publisher"), "cannot reach the broker at amqp://127.0.0.1:1: connection refused"),
    ("unknown broker host", {"PLANNERSYNC_BROKER__HOST": "no-such-host.invalid"}, ("dlq", "list", "publisher"), "amqp://no-such-host.invalid:5672: unknown host name"),
    ("wrong broker password", {"PLANNERSYNC_BROKER__PASSWORD": "wrong"}, ("dlq", "list", "publisher"), "refused user 'guest': wrong user or password"),
    ("database directory missing", {"PLANNERSYNC_DATABASE__URL": "sqlite:////nonexistent/plannersync/state.db"}, ("mailboxes", "list"), "the database directory /nonexistent/plannersync does not exist"),
    ("database not writable", {"PLANNERSYNC_DATABASE__URL": "sqlite:////proc/plannersync-state.db"}, ("mailboxes", "list"), "the database /proc/plannersync-state.db is not writable"),
    (
        "database server unreachable",
        {"PLANNERSYNC_DATABASE__URL": "postgresql+psycopg://plannersync:hunter2@127.0.0.1:1/plannersync"},
        ("mailboxes", "list"),
        "cannot use the database postgresql+psycopg://plannersync:***@127.0.0.1:1/plannersync",
    ),
    ("management API unreachable", {"PLANNERSYNC_BROKER__MANAGEMENT_URL": "http://127.0.0.1:1"}, ("topology", "apply"), "cannot reach the RabbitMQ management API at http://127.0.0.1:1"),
    ("wrong management password", {"PLANNERSYNC_BROKER__PASSWORD": "wrong"}, ("status",), "the RabbitMQ management API at http://127.0.0.1:15672 refused user 'guest'"),
]


@pytest.mark.parametrize(("what", "change", "command", "expected"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_common_mistake_is_one_clear_line_and_a_non_zero_exit(what: str, change: dict[str, str], command: tuple[str, ...], expected: str, worker_env: dict[str, str], topology: object) -> None:
    done = run(*command, env={**worker_env, **change})
    assert done.returncode == 3, done.stdout + done.stderr
    if command == ("status",):  # status shows what it can, then the one line of what it cannot reach
        assert "Mailboxes" in done.stdout and expected in done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("plannersync: ") and expected in lines[0], lines[0]
    assert "hunter2" not in done.stderr


# --- dead letters from the command line (decisions 42 and 43) ------------------------------------------------------


def _dead_letters(topology: object, count: int) -> None:
    import pika

    from tests.support.broker import BROKER_HOST

    stage = topology.stage("publisher")  # type: ignore[attr-defined]
    connection = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST))
    channel = connection.channel()
    channel.confirm_delivery()
    for n in range(count):
        headers = {"x-plannersync-reason": "code 3: unknown resource", "x-retry-count": 7, "x-first-failure-at": "2026-11-28T01:00:00+00:00", "x-original-queue": stage.work_queue()}
        body = json.dumps({"type": "busy_time_state", "mailbox": "anne@jobcenter.dk", "origin_id": f"uid-{n}"}).encode()
        channel.basic_publish("", stage.dead_letter_queue(), body, pika.BasicProperties(delivery_mode=2, message_id=f"m{n:03}", type="busy_time_state", headers=headers), mandatory=True)
    connection.close()


def test_dlq_list_shows_every_field_the_total_and_what_is_left(worker_env: dict[str, str], topology: object) -> None:
    _dead_letters(topology, 105)
    done = run("dlq", "list", "publisher", env=worker_env)
    assert done.returncode == 0, done.stderr
    header, first = done.stdout.splitlines()[:2]
    for title in ("message id", "mailbox", "origin id", "original queue", "attempts", "first failure", "reason"):
        assert title in header
    assert "anne@jobcenter.dk" in first and "uid-0" in first and ".publisher.in" in first and "2026-11-28T01:00:00" in first and "code 3" in first
    assert len(done.stdout.splitlines()) == 101
    assert "showing 1-100 of 105 dead letters; 5 more: --offset 100 or --all" in done.stderr
    everything = run("dlq", "list", "publisher", "--all", "--json", env=worker_env)
    assert len(everything.stdout.splitlines()) == 105 and json.loads(everything.stdout.splitlines()[-1])["message_id"] == "m104"


def test_dlq_replay_dry_run_unknown_id_and_purge_need_no_guessing(worker_env: dict[str, str], topology: object) -> None:
    _dead_letters(topology, 3)
    dry = run("dlq", "replay", "publisher", "--dry-run", env=worker_env)
    assert dry.returncode == 0 and dry.stdout.count("anne@jobcenter.dk") == 3 and "would replay 3 of 3" in dry.stderr, dry.stderr
    unknown = run("dlq", "replay", "publisher", "--message-id", "nope", env=worker_env)
    assert unknown.returncode == 1 and unknown.stderr.strip().splitlines() == [f"plannersync: no dead letter with message id 'nope' in {topology.stage('publisher').dead_letter_queue()} (3 messages)"]  # type: ignore[attr-defined]
    refused = run("dlq", "purge", "publisher", env=worker_env)
    assert refused.returncode == 1 and "nothing removed: add --yes to confirm" in refused.stderr
    assert "of 3 dead letters" in run("dlq", "list", "publisher", env=worker_env).stderr
    replayed = run("dlq", "replay", "publisher", "--message-id", "m001", env=worker_env)
    assert replayed.returncode == 0 and "replayed 1 of 3" in replayed.stderr and "2 left" in replayed.stderr
    purged = run("dlq", "purge", "publisher", "--yes", env=worker_env)
    assert purged.returncode == 0 and "purged 2 message(s)" in purged.stdout


# --- one state directory: status from anywhere sees the same store and health files (decision 45) -----------------


def test_status_from_any_directory_sees_the_same_store_and_health_files(tmp_path: Path) -> None:
    import time

    from shared.config import SYSTEM_STATE_DIR, default_state_dir
    from shared.health import write_health
    from shared.workers import Health

    if SYSTEM_STATE_DIR.is_dir() and os.access(SYSTEM_STATE_DIR, os.W_OK):
        pytest.skip(f"{SYSTEM_STATE_DIR} is this machine's state directory: the test would write into it")
    home = tmp_path / "home"
    env = {**THIS_CODE, "PATH": os.environ["PATH"], "HOME": str(home)}
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    assert subprocess.run([PLANNERSYNC, "mailboxes", "add", "anne@jobcenter.dk"], env=env, cwd=here, capture_output=True, text=True, timeout=60).returncode == 0
    state = default_state_dir(env)
    write_health(state / "health", "transformer", Health("consuming", time.time(), ok=True))
    shown = subprocess.run([PLANNERSYNC, "status", "--json"], env=env, cwd=there, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert [m["mailbox"] for m in status["mailboxes"]] == ["anne@jobcenter.dk"]
    assert status["workers"]["transformer"]["healthy"] is True
    assert status["state"]["database"] == f"sqlite:///{state / 'state.db'}"
    health = subprocess.run([PLANNERSYNC, "health", "transformer"], env=env, cwd="/", capture_output=True, text=True, timeout=60)
    assert health.returncode == 0, health.stdout
    assert not list(here.iterdir()) and not list(there.iterdir())  # nothing written where the commands ran


def test_a_worker_that_cannot_reach_its_database_logs_one_json_line_with_the_traceback_as_a_field(worker_env: dict[str, str]) -> None:
    env = {**worker_env, "PLANNERSYNC_DATABASE__URL": "postgresql+psycopg://plannersync:hunter2@127.0.0.1:1/plannersync"}
    done = run("run", "transformer", env=env)
    assert done.returncode == 3, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    logged = json.loads(lines[0])
    assert logged["event"] == "worker_crashed" and "postgresql+psycopg://plannersync:***@127.0.0.1:1/plannersync" in logged["problem"]
    assert logged["traceback"].startswith("Traceback") and "hunter2" not in done.stderr
