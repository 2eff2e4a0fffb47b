"""compose.yaml cannot be run here (no Docker), so every service is checked the way its container would see it.

For each service built from this repository: its env files (in order) and ``environment``, the secrets it mounts
at ``/run/secrets/<name>`` and the volumes it mounts, and nothing else (decision 47 in docs/decisions.md). Its
settings are then loaded from exactly that, with each mounted secret replaced by the repository's file and each
mount by a directory of the test; a variable naming a secret the service does not mount, or a path on a volume it
does not mount, fails, the commented production lines of its env files included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from plannersync.cli import parser
from shared.config import Settings, check_files, load_settings, sqlite_path, unknown_variables

ROOT = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
OURS = [name for name, spec in SERVICES.items() if str(spec.get("image", "")).startswith("plannersync") or "build" in spec]
SECTION_FILES = {"broker": "broker.env", "database": "database.env", "exchange": "exchange.env", "planner": "planner.env"}


@dataclass
class Container:
    """What one service's container sees."""

    service: str
    env_files: list[Path]
    env: dict[str, str]
    secrets: dict[str, Path]  # /run/secrets/<name> -> the repository file compose mounts there
    mounts: dict[str, str]  # target -> source (a named volume or a ./ path)
    hints: dict[str, str] = field(default_factory=dict)  # commented production lines of its env files

    def covers(self, path: str) -> bool:
        """Is ``path`` a mounted secret or on a mounted volume?"""
        target = PurePosixPath(path)
        return path in self.secrets or any(target == PurePosixPath(mount) or PurePosixPath(mount) in target.parents for mount in self.mounts)


def _env_lines(path: Path, commented: bool) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        text = line.strip()
        if commented:
            if not text.startswith("#"):
                continue
            text = text.lstrip("#").strip()
            if not re.match(r"^PLANNERSYNC_[A-Z0-9_]+=", text):
                continue
        elif not text or text.startswith("#"):
            continue
        key, _, value = text.partition("=")
        found[key] = value
    return found


def container(service: str) -> Container:
    spec = SERVICES[service]
    files = spec.get("env_file") or []
    env_files = [ROOT / (entry if isinstance(entry, str) else entry["path"]) for entry in ([files] if isinstance(files, str) else files)]
    env: dict[str, str] = {}
    hints: dict[str, str] = {}
    for path in env_files:
        env.update(_env_lines(path, commented=False))
        hints.update(_env_lines(path, commented=True))
    environment = spec.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    env.update({key: str(value) for key, value in environment.items()})
    secrets = {}
    for entry in spec.get("secrets") or []:
        name = entry if isinstance(entry, str) else entry["source"]
        target = name if isinstance(entry, str) else entry.get("target", name)
        secrets[target if target.startswith("/") else f"/run/secrets/{target}"] = ROOT / COMPOSE["secrets"][name]["file"]
    mounts = {}
    for volume in spec.get("volumes") or []:
        source, target = volume.split(":")[:2]
        mounts[target] = source
    return Container(service, env_files, env, secrets, mounts, hints)


def as_seen_by(box: Container, tmp_path: Path) -> dict[str, str]:
    """The container's environment with its secrets and mounts replaced by real paths here; nothing else is reachable."""
    roots = {target: (ROOT / source[2:] if source.startswith("./") else tmp_path / "volumes" / source) for target, source in box.mounts.items()}
    for directory in roots.values():
        directory.mkdir(parents=True, exist_ok=True)

    def rewrite(value: str) -> str:
        if value in box.secrets:
            return str(box.secrets[value])
        for target, directory in sorted(roots.items(), key=lambda item: -len(item[0])):
            if value == target or value.startswith(target.rstrip("/") + "/"):
                return str(directory) + value[len(target.rstrip("/")) :]
        for prefix in ("sqlite:///",):
            if value.startswith(prefix):
                return prefix + rewrite(value[len(prefix) :])
        if value.startswith("/"):
            return str(tmp_path / "not-mounted") + value  # what the container cannot see does not exist here either
        return value

    return {key: rewrite(value) for key, value in box.env.items()}


@pytest.mark.parametrize("service", OURS)
def test_every_plannersync_service_runs_a_real_subcommand_and_builds_the_image(service: str) -> None:
    spec = SERVICES[service]
    args = parser().parse_args(spec["command"])
    assert callable(args.func)
    assert "build" in spec, f"{service} would pull plannersync:latest from a registry instead of building it"


@pytest.mark.parametrize("service", OURS)
def test_every_file_variable_names_a_secret_the_service_mounts(service: str) -> None:
    box = container(service)
    for origin, variables in (("", box.env), ("commented production line ", box.hints)):
        for name, value in variables.items():
            if name.endswith("_FILE"):
                assert value in box.secrets, f"{service}: {origin}{name}={value} names a secret it does not mount (it mounts {sorted(box.secrets)})"


@pytest.mark.parametrize("service", OURS)
def test_every_path_is_on_a_volume_or_secret_the_service_mounts(service: str) -> None:
    box = container(service)
    for origin, variables in (("", box.env), ("commented production line ", box.hints)):
        for name, value in variables.items():
            path = str(sqlite_path(value)) if value.startswith("sqlite:///") else value
            if path.startswith("/"):
                assert box.covers(path), f"{service}: {origin}{name}={value} is not on a volume or secret it mounts ({sorted(box.mounts)})"
    command = SERVICES[service]["command"]
    for flag in ("-o", "--output", "--password-file"):
        if flag in command:
            assert box.covers(command[command.index(flag) + 1]), f"{service}: {flag} {command[command.index(flag) + 1]} is not mounted"


@pytest.mark.parametrize("service", [name for name in OURS if SERVICES[name]["command"][0] not in ("sim",)])
def test_each_service_loads_its_settings_exactly_as_its_container_would(service: str, tmp_path: Path) -> None:
    box = container(service)
    assert unknown_variables(box.env) == [] and unknown_variables(box.hints) == []
    settings = load_settings(environ=as_seen_by(box, tmp_path))
    errors, _warnings = check_files(settings)
    assert errors == [], f"{service}: {errors}"
    if SERVICES[service]["command"][:2] == ["topology", "export"]:
        return  # keeps no state: writes the definitions file only (checked above and below)
    for what, path in container_paths(settings).items():
        assert str(path).startswith(str(tmp_path / "volumes")), f"{service}: its {what} {path} is not on a mounted volume"


def container_paths(settings: Settings) -> dict[str, Path]:
    """Where the container's state and health files end up."""
    found = {"state_dir": settings.state_dir, "health_dir": settings.status.health_dir}
    database = sqlite_path(settings.database.url)
    if database is not None:
        found["database"] = database
    return found


def test_every_service_sees_the_same_state_volume_at_the_same_place(tmp_path: Path) -> None:
    states = {service: container_paths(load_settings(environ=as_seen_by(container(service), tmp_path))) for service in OURS if "state" in container(service).mounts.values()}
    assert len({str(paths["database"]) for paths in states.values()}) == 1, states  # one store, db-upgrade's included
    assert len({str(paths["health_dir"]) for paths in states.values()}) == 1, states  # `plannersync health` sees the workers


def test_every_worker_gets_the_settings_its_code_reads() -> None:
    """A worker that reads ``settings.planner`` gets planner.env, and so on (a default endpoint would be a silent misconfiguration)."""
    from plannersync.workers import WORKERS

    for worker, module in WORKERS.items():
        code = code_of(module)
        sections = set(re.findall(r"settings\.(broker|database|exchange|planner)\b", code)) | {"broker", "database"}
        given = {path.name for path in container(worker).env_files}
        for section in sections:
            assert SECTION_FILES[section] in given, f"{worker} reads settings.{section} but does not get deploy/{SECTION_FILES[section]}"


def code_of(module: str) -> str:
    """A service worker's code: every file of its package. A worker in plannersync/ (the status page): its own module and
    the plannersync modules it imports, not the whole command line beside it."""
    if not module.startswith("plannersync."):
        return "".join(path.read_text() for path in (ROOT / module.rsplit(".", 1)[0].replace(".", "/")).glob("*.py"))
    seen: set[str] = set()
    todo, code = [module], ""
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        text = (ROOT / (name.replace(".", "/") + ".py")).read_text()
        code += text
        todo += re.findall(r"^\s*from (plannersync\.\w+) import", text, re.M)
    return code


def test_every_worker_runs_as_its_own_service_with_a_healthcheck_for_that_worker() -> None:
    from plannersync.workers import WORKERS

    commands = {tuple(spec.get("command", [])) for spec in SERVICES.values()}
    for worker in WORKERS:
        assert ("run", worker) in commands, worker
        check = SERVICES[worker]["healthcheck"]["test"]
        args = parser().parse_args(check[2:])
        assert args.func.__name__ == "cmd_health" and args.worker == worker


def test_workers_wait_for_the_schema_and_the_broker_and_the_broker_for_its_definitions() -> None:
    for name in ("transformer", "publisher", "change-producer", "snapshot-producer", "reconciler", "resource-sync"):
        depends = SERVICES[name]["depends_on"]
        assert depends["db-upgrade"]["condition"] == "service_completed_successfully"
        assert depends["rabbitmq"]["condition"] == "service_healthy"
    assert SERVICES["rabbitmq"]["depends_on"]["broker-definitions"]["condition"] == "service_completed_successfully"


def test_rabbitmq_loads_the_definitions_the_definitions_service_writes() -> None:
    rabbit = container("rabbitmq")
    for target, source in rabbit.mounts.items():
        if source.startswith("./"):
            assert (ROOT / source[2:]).exists(), source
    conf = (ROOT / "deploy" / "rabbitmq" / "rabbitmq.conf").read_text()
    assert "definitions.import_backend = local_filesystem" in conf
    assert "load_definitions" not in conf.replace("do NOT use load_definitions", "")  # the 3.10 boot trap
    loaded = PurePosixPath(re.search(r"^definitions\.local\.path = (\S+)$", conf, re.M).group(1))  # type: ignore[union-attr]
    volume = next(source for target, source in rabbit.mounts.items() if PurePosixPath(target) in loaded.parents)
    writer = container("broker-definitions")
    command = SERVICES["broker-definitions"]["command"]
    written = PurePosixPath(command[command.index("-o") + 1])
    mount = next(target for target, source in writer.mounts.items() if source == volume)
    assert written.relative_to(mount) == loaded.relative_to(next(t for t, s in rabbit.mounts.items() if s == volume))
    plugins = (ROOT / "deploy" / "rabbitmq" / "enabled_plugins").read_text()
    assert "rabbitmq_management" in plugins and "rabbitmq_shovel_management" in plugins  # the UI and its "Move messages"


def test_no_password_hash_is_committed() -> None:
    for path in (ROOT / "deploy").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".conf", ".env", ".yaml", ".txt"):
            assert "password_hash" not in path.read_text(errors="replace"), path


def test_the_image_copies_every_package_the_project_installs() -> None:
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    for pattern in packages:
        name = pattern.rstrip("*")
        assert f"COPY {name} ./{name}" in dockerfile, f"the Dockerfile does not copy {name}/ although pyproject.toml installs it"


def test_the_image_has_the_directories_the_volumes_are_mounted_on() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for service in OURS:
        for target, source in container(service).mounts.items():
            if not source.startswith("./"):
                assert target in dockerfile, f"{service} mounts the volume {source} at {target}, which the image does not create (owned by its user)"
