"""compose.yaml cannot be run here (no Docker), so check what it says against the code."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from plannersync.cli import parser
from shared.config import unknown_variables
from tests.support.settings import settings_from_env

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())


def _env_file() -> dict[str, str]:
    env = {}
    for line in (ROOT / "deploy" / "plannersync.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


@pytest.mark.parametrize("service", [name for name, spec in COMPOSE["services"].items() if spec.get("image", "").startswith("plannersync")])
def test_every_plannersync_service_runs_a_real_subcommand(service: str) -> None:
    command = COMPOSE["services"][service]["command"]
    args = parser().parse_args(command)
    assert callable(args.func)


def test_the_env_file_names_only_real_settings_and_validates(tmp_path: Path) -> None:
    env = _env_file()
    assert unknown_variables(env) == []
    secret = tmp_path / "amqp"
    secret.write_text("x")
    env["PLANNERSYNC_BROKER__PASSWORD_FILE"] = str(secret)
    env["PLANNERSYNC_EXCHANGE__PASSWORD_FILE"] = str(secret)
    settings = settings_from_env(env)
    assert settings.broker.host == "rabbitmq" and settings.broker.password.get_secret_value() == "x"


def test_rabbitmq_mounts_the_files_the_repo_ships() -> None:
    for volume in COMPOSE["services"]["rabbitmq"]["volumes"]:
        source = volume.split(":")[0]
        if source.startswith("./"):
            assert (ROOT / source).is_file(), source
    conf = (ROOT / "deploy" / "rabbitmq" / "rabbitmq.conf").read_text()
    assert "definitions.import_backend = local_filesystem" in conf
    assert "load_definitions" not in conf.replace("# do NOT use load_definitions", "")  # the 3.10 boot trap


def test_every_worker_runs_as_its_own_service_with_a_healthcheck_for_that_worker() -> None:
    from plannersync.workers import WORKERS

    commands = {tuple(spec.get("command", [])) for spec in COMPOSE["services"].values()}
    for worker in WORKERS:
        assert ("run", worker) in commands, worker
        check = COMPOSE["services"][worker]["healthcheck"]["test"]
        args = parser().parse_args(check[2:])
        assert args.func.__name__ == "cmd_health" and args.worker == worker


def test_workers_wait_for_the_schema_and_the_broker() -> None:
    for name in ("transformer", "publisher", "change-producer", "snapshot-producer"):
        depends = COMPOSE["services"][name]["depends_on"]
        assert depends["db-upgrade"]["condition"] == "service_completed_successfully"
        assert depends["rabbitmq"]["condition"] == "service_healthy"


def test_the_image_copies_every_package_the_project_installs() -> None:
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    for pattern in packages:
        name = pattern.rstrip("*")
        assert f"COPY {name} ./{name}" in dockerfile, f"the Dockerfile does not copy {name}/ although pyproject.toml installs it"
