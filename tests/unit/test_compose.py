"""compose.yaml and compose.jobcentres.yaml cannot be run here (no Docker), so every service is checked the way its
container would see it.

For each service built from this repository: its env files (in order) and ``environment``, the secrets it mounts
at ``/run/secrets/<name>`` and the volumes it mounts, and nothing else (decision 47 in docs/decisions.md). Its
settings are then loaded from exactly that, with each mounted secret replaced by the repository's file and each
mount by a directory of the test; a variable naming a secret the service does not mount, or a path on a volume it
does not mount, fails, the commented production lines of its env files included.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from plannersync.cli import parser
from shared.config import Settings, check_files, load_settings, sqlite_path, unknown_variables

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES: dict[str, dict[str, Any]] = {name: yaml.safe_load((ROOT / name).read_text()) for name in ("compose.yaml", "compose.jobcentres.yaml")}
COMPOSE: dict[str, Any] = COMPOSE_FILES["compose.yaml"]
SERVICES: dict[str, Any] = COMPOSE["services"]


def ours(compose: dict[str, Any]) -> list[str]:
    return [name for name, spec in compose["services"].items() if str(spec.get("image", "")).startswith("plannersync") or "build" in spec]


OURS = ours(COMPOSE)
# (compose file, service) of every service built from this repository, in both files
EVERY = [pytest.param(file, name, id=f"{file}:{name}") for file, compose in COMPOSE_FILES.items() for name in ours(compose)]
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


def container(service: str, compose_file: str = "compose.yaml") -> Container:
    compose = COMPOSE_FILES[compose_file]
    spec = compose["services"][service]
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
        secrets[target if target.startswith("/") else f"/run/secrets/{target}"] = ROOT / compose["secrets"][name]["file"]
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


@pytest.mark.parametrize(("compose_file", "service"), EVERY)
def test_every_plannersync_service_runs_a_real_subcommand_and_builds_the_image(compose_file: str, service: str) -> None:
    spec = COMPOSE_FILES[compose_file]["services"][service]
    args = parser().parse_args(spec["command"])
    assert callable(args.func)
    assert "build" in spec, f"{service} would pull plannersync:latest from a registry instead of building it"


@pytest.mark.parametrize(("compose_file", "service"), EVERY)
def test_every_file_variable_names_a_secret_the_service_mounts(compose_file: str, service: str) -> None:
    box = container(service, compose_file)
    for origin, variables in (("", box.env), ("commented production line ", box.hints)):
        for name, value in variables.items():
            if name.endswith("_FILE"):
                assert value in box.secrets, f"{service}: {origin}{name}={value} names a secret it does not mount (it mounts {sorted(box.secrets)})"


@pytest.mark.parametrize(("compose_file", "service"), EVERY)
def test_every_path_is_on_a_volume_or_secret_the_service_mounts(compose_file: str, service: str) -> None:
    box = container(service, compose_file)
    for origin, variables in (("", box.env), ("commented production line ", box.hints)):
        for name, value in variables.items():
            path = str(sqlite_path(value)) if value.startswith("sqlite:///") else value
            if path.startswith("/"):
                assert box.covers(path), f"{service}: {origin}{name}={value} is not on a volume or secret it mounts ({sorted(box.mounts)})"
    command = COMPOSE_FILES[compose_file]["services"][service]["command"]
    for flag in ("-o", "--output", "--password-file"):
        if flag in command:
            assert box.covers(command[command.index(flag) + 1]), f"{service}: {flag} {command[command.index(flag) + 1]} is not mounted"


@pytest.mark.parametrize(("compose_file", "service"), [p for p in EVERY if COMPOSE_FILES[p.values[0]]["services"][p.values[1]]["command"][0] != "sim"])
def test_each_service_loads_its_settings_exactly_as_its_container_would(compose_file: str, service: str, tmp_path: Path) -> None:
    box = container(service, compose_file)
    assert unknown_variables(box.env) == [] and unknown_variables(box.hints) == []
    settings = load_settings(environ=as_seen_by(box, tmp_path))
    errors, _warnings = check_files(settings)
    assert errors == [], f"{service}: {errors}"
    if COMPOSE_FILES[compose_file]["services"][service]["command"][:2] == ["topology", "export"]:
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
    for compose_file, service in (p.values for p in EVERY):
        for target, source in container(str(service), str(compose_file)).mounts.items():
            if not source.startswith("./"):
                assert target in dockerfile, f"{service} mounts the volume {source} at {target}, which the image does not create (owned by its user)"


# --- compose.jobcentres.yaml: several jobcentres, one set of workers each (decision 88 in docs/decisions.md) --------

JOBCENTRES_FILE = "compose.jobcentres.yaml"
JOBCENTRES = COMPOSE_FILES[JOBCENTRES_FILE]["services"]


def jobcentres() -> list[str]:
    """The jobcentres of compose.jobcentres.yaml: the ``jc-NNN`` of its ``jc-NNN-<role>`` services."""
    return sorted({m.group(1) for name in JOBCENTRES if (m := re.match(r"^(jc-\d+)-", name))})


def seen(service: str, tmp_path: Path) -> Settings:
    return load_settings(environ=as_seen_by(container(service, JOBCENTRES_FILE), tmp_path))


def test_each_jobcentre_runs_every_worker_with_its_healthcheck_after_its_schema_and_the_broker() -> None:
    from plannersync.workers import WORKERS

    assert jobcentres() == sorted(path.name for path in (ROOT / "deploy" / "jobcentres").iterdir()), "one deploy/jobcentres/<jc>/ per jobcentre, and back"
    assert len(jobcentres()) >= 2
    for jc in jobcentres():
        assert JOBCENTRES[f"{jc}-db-upgrade"]["command"] == ["db", "upgrade"]
        assert JOBCENTRES[f"{jc}-broker-definitions"]["command"][:2] == ["topology", "export"]
        for worker in WORKERS:
            spec = JOBCENTRES[f"{jc}-{worker}"]
            assert spec["command"] == ["run", worker]
            args = parser().parse_args(spec["healthcheck"]["test"][2:])
            assert args.func.__name__ == "cmd_health" and args.worker == worker
            if worker != "status-page":
                assert spec["depends_on"][f"{jc}-db-upgrade"]["condition"] == "service_completed_successfully"
                assert spec["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
        assert JOBCENTRES["rabbitmq"]["depends_on"][f"{jc}-broker-definitions"]["condition"] == "service_completed_successfully"
        for service in JOBCENTRES:  # a jobcentre's containers read only that jobcentre's files and secrets
            if service.startswith(f"{jc}-"):
                box = container(service, JOBCENTRES_FILE)
                others = [p for p in box.env_files + list(box.secrets.values()) if "jobcentres" in p.parts and jc not in p.parts]
                assert not others, f"{service} reads another jobcentre's {others}"


def test_each_jobcentres_services_agree_on_their_settings_and_no_two_jobcentres_share_any(tmp_path: Path) -> None:
    """Within a jobcentre every service loads the same vhost, prefix, broker user, database and health directory, and
    its Planner workers the same jobcentre number and certificate; across jobcentres none of these is shared (nor the
    certificate's content, nor the status page's port on the host)."""
    import hashlib

    from plannersync.workers import WORKERS

    per_jobcentre: dict[str, dict[str, set[str]]] = {}
    for jc in jobcentres():
        values: dict[str, set[str]] = {key: set() for key in ("vhost", "prefix", "user", "database", "health_dir", "number", "certificate", "page_port")}
        for worker in [*WORKERS, "db-upgrade"]:
            settings = seen(f"{jc}-{worker}", tmp_path)
            paths = container_paths(settings)
            values["database"].add(str(paths["database"]))
            values["health_dir"].add(str(paths["health_dir"]))
            if worker != "db-upgrade":
                values["vhost"].add(settings.broker.vhost)
                values["prefix"].add(settings.broker.prefix)
                values["user"].add(settings.broker.user)
            if worker in ("publisher", "reconciler", "resource-sync"):
                values["number"].add(str(settings.planner.jobcenter_number))
                assert settings.planner.client_cert_p12 is not None
                values["certificate"].add(hashlib.sha256(settings.planner.client_cert_p12.read_bytes()).hexdigest())
        definitions = seen(f"{jc}-broker-definitions", tmp_path).broker
        assert (definitions.vhost, definitions.prefix, definitions.user) == (next(iter(values["vhost"])), next(iter(values["prefix"])), next(iter(values["user"])))
        values["page_port"] = {port.split(":")[1] for port in JOBCENTRES[f"{jc}-status-page"]["ports"]}
        for key, found in values.items():
            assert len(found) == 1, f"{jc}: its services disagree on {key}: {found}"
        per_jobcentre[jc] = values
    for key in ("vhost", "prefix", "user", "database", "health_dir", "number", "certificate", "page_port"):
        every = [next(iter(values[key])) for values in per_jobcentre.values()]
        assert len(set(every)) == len(every), f"two jobcentres share a {key}: {every}"


def test_the_broker_imports_the_definitions_every_jobcentre_writes(tmp_path: Path) -> None:
    """Each jobcentre's broker-definitions writes its own file into the directory RabbitMQ imports at boot; the files
    (written here by the real `plannersync topology export` with each container's settings) hold disjoint vhosts,
    users and queues, each user with permissions on its own vhost only."""
    import json
    import subprocess
    import sys

    conf = (ROOT / "deploy" / "rabbitmq" / "rabbitmq-jobcentres.conf").read_text()
    assert "definitions.import_backend = local_filesystem" in conf and "load_definitions" not in conf.replace("do NOT use load_definitions", "")
    directory = PurePosixPath(re.search(r"^definitions\.local\.path = (\S+)$", conf, re.M).group(1))  # type: ignore[union-attr]
    rabbit = container("rabbitmq", JOBCENTRES_FILE)
    assert rabbit.mounts["/etc/rabbitmq/rabbitmq.conf"] == "./deploy/rabbitmq/rabbitmq-jobcentres.conf"
    volume = rabbit.mounts[str(directory)]
    seen_names: set[str] = set()
    for jc in jobcentres():
        service = f"{jc}-broker-definitions"
        box = container(service, JOBCENTRES_FILE)
        command = JOBCENTRES[service]["command"]
        written = PurePosixPath(command[command.index("-o") + 1])
        mount = next(target for target, source in box.mounts.items() if source == volume)
        assert written.parent == PurePosixPath(mount) and written.suffix == ".json"  # straight into the imported directory
        environ = {**{k: v for k, v in os.environ.items() if not k.startswith("PLANNERSYNC_")}, **as_seen_by(box, tmp_path), "HOME": str(tmp_path)}
        out = tmp_path / "volumes" / volume / written.name
        args = [a.replace(str(written), str(out)) for a in command]
        args[args.index("--password-file") + 1] = str(box.secrets[args[args.index("--password-file") + 1]])
        done = subprocess.run([str(Path(sys.executable).with_name("plannersync")), *args], env=environ, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        definitions = json.loads(out.read_text())
        vhost = seen(service, tmp_path).broker.vhost
        assert [v["name"] for v in definitions["vhosts"]] == [vhost]
        assert [(p["user"], p["vhost"]) for p in definitions["permissions"]] == [(seen(service, tmp_path).broker.user, vhost)]
        names = {q["name"] for q in definitions["queues"]} | {e["name"] for e in definitions["exchanges"]}
        assert names and all(name.startswith(seen(service, tmp_path).broker.prefix + ".") for name in names)
        assert not names & seen_names, "two jobcentres declare the same queue or exchange"
        seen_names |= names
