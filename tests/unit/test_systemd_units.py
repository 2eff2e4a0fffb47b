"""The systemd units in deploy/systemd/: one per worker of plannersync/workers.py, each a command the real CLI accepts,
restarted unless its configuration is wrong, stopped with SIGTERM and time to finish, a health check per worker, and
the example environment file loads as valid settings (decision 74 in docs/decisions.md; runbooks/install.md)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from plannersync.cli import parser
from plannersync.workers import WORKERS
from shared.config import load_settings
from tests.support.processes import PLANNERSYNC

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
BINARY = "/opt/plannersync/bin/plannersync"


def unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections of a unit file, each key with every value it was given (systemd allows a key more than once)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def cli_words(exec_start: str, instance: str | None = None) -> list[str]:
    words = shlex.split(exec_start.replace("%i", instance or "%i"))
    assert words[0] == BINARY, exec_start
    return words[1:]


def test_every_worker_has_a_unit_and_every_unit_is_a_worker() -> None:
    named = {path.name.removeprefix("plannersync-").removesuffix(".service") for path in UNITS.glob("plannersync-*.service") if "@" not in path.name}
    assert named == set(WORKERS)
    wanted = unit(UNITS / "plannersync.target")["Unit"]["Wants"][0].split()
    assert sorted(wanted) == sorted(f"plannersync-{worker}.service" for worker in WORKERS)


@pytest.mark.parametrize("worker", list(WORKERS))
def test_a_worker_unit_runs_its_worker_restarts_and_stops_gracefully(worker: str) -> None:
    service = unit(UNITS / f"plannersync-{worker}.service")["Service"]
    words = cli_words(service["ExecStart"][0])
    args = parser().parse_args(words)  # the real CLI: an unknown worker or flag would exit here
    assert (args.command, args.worker) == ("run", [worker])
    assert service["Restart"] == ["always"] and service["RestartPreventExitStatus"] == ["2"]  # exit 2: bad configuration
    assert service["KillSignal"] == ["SIGTERM"] and int(service["TimeoutStopSec"][0]) >= 90  # the loop's 60 s grace fits
    assert "/etc/plannersync/plannersync.env" in service["EnvironmentFile"] and service["User"] == ["plannersync"]
    assert service["StateDirectory"] == ["plannersync"]


def test_the_health_check_unit_runs_plannersync_health_for_each_worker() -> None:
    service = unit(UNITS / "plannersync-health@.service")["Service"]
    for worker in WORKERS:
        args = parser().parse_args(cli_words(service["ExecStart"][0], worker))
        assert (args.command, args.worker) == ("health", worker)
    assert service["Type"] == ["oneshot"] and "/etc/plannersync/plannersync.env" in service["EnvironmentFile"]
    assert unit(UNITS / "plannersync-health@.timer")["Timer"]["OnUnitActiveSec"] == ["1min"]


def environment_file(path: Path) -> dict[str, str]:
    """Variables of an EnvironmentFile as systemd reads them: a double-quoted value loses its quotes, a doubled backslash is one."""
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith(("#", ";")):
            name, _, value = line.partition("=")
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            env[name.strip()] = value
    return env


def test_the_example_environment_file_is_valid_and_names_the_state_directory(tmp_path: Path) -> None:
    env = environment_file(UNITS / "plannersync.env")
    for name, value in env.items():
        if value.startswith("/etc/plannersync/secrets/"):  # the secret files the runbook has the operator create
            env[name] = str(tmp_path / Path(value).name)
            Path(env[name]).write_text("secret")
    settings = load_settings(environ=env)  # raises on an unknown PLANNERSYNC_ variable or a bad value
    assert str(settings.state_dir) == "/var/lib/plannersync" and settings.database.url == "sqlite:////var/lib/plannersync/state.db"
    assert settings.status.health_dir == Path("/var/lib/plannersync/health")
    assert settings.exchange.username == "KOMMUNE\\svc-plannersync"


def test_the_command_wrapper_reads_the_environment_file_as_systemd_does() -> None:
    wrapper = UNITS / "plannersync-cli"
    assert subprocess.run(["sh", "-n", str(wrapper)], capture_output=True, timeout=10).returncode == 0
    text = wrapper.read_text()
    assert ". /etc/plannersync/plannersync.env" in text and f"runuser -u plannersync -- {BINARY}" in text
    shell = subprocess.run(["sh", "-c", 'set -a; . "$1"; set +a; env -0', "sh", str(UNITS / "plannersync.env")], env={}, capture_output=True, text=True, timeout=10)
    sourced = dict(item.split("=", 1) for item in shell.stdout.split("\0") if "=" in item)
    expected = environment_file(UNITS / "plannersync.env")
    assert {name: sourced.get(name) for name in expected} == expected


def test_systemd_accepts_every_unit(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    for path in UNITS.glob("plannersync*"):
        if path.suffix in (".service", ".timer", ".target"):
            (tmp_path / path.name).write_text(path.read_text().replace(BINARY, PLANNERSYNC))
    names = [str(tmp_path / name.replace("@.", "@publisher.")) for name in sorted(p.name for p in tmp_path.iterdir())]
    for name in names:  # instances of the templates are checked as plannersync-health@publisher.*
        if "@publisher." in name:
            (tmp_path / Path(name).name).write_text((tmp_path / Path(name).name.replace("@publisher.", "@.")).read_text())
    done = subprocess.run(["systemd-analyze", "verify", *names], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), done.stderr + done.stdout
