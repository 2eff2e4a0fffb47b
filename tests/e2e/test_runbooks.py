"""Every ``plannersync`` command in the runbooks is one the real command line accepts, and the read-only ones run.

The commands are taken from the fenced code blocks of ``runbooks/*.md``: a line that starts with ``plannersync``
(or ``/opt/plannersync/bin/plannersync``, after ``sudo -u plannersync`` or ``VAR=value`` prefixes), and the plannersync
part of ``docker compose run --rm <service> …`` and ``docker compose exec <service> plannersync …``; ``&&``, ``;`` and
``|`` separate commands on one line, ``\\`` continues one. Each is parsed by the real parser (``plannersync.cli.parser``;
a simulator's own options by that simulator's parser), so a runbook that names a subcommand, a flag or a choice that
does not exist fails here. The read-only ones (``READ_ONLY``) then run for real, as processes, against the local
RabbitMQ with this test's own prefix and a temporary state directory.

Runbooks write real-looking examples (``anne@kommune.example``; decision 73 in docs/decisions.md). Where one must write a placeholder, it is one of
``PLACEHOLDERS`` below, replaced by the value shown before parsing; any other ``<…>`` word fails the test.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from plannersync.cli import parser
from plannersync.workers import WORKERS
from shared.health import write_health
from shared.workers import Health
from tests.support.processes import PLANNERSYNC
from tests.support.runbooks import EXERCISED, FILE_RUNBOOKS, FILE_TOOLS, NOT_RUN, Line, command_lines, fenced_lines, lines_of, shell_argvs
from tests.support.runbooks import kind_of as kind_of_command
from tests.support.runbooks import simple_commands as _simple_commands

ROOT = Path(__file__).resolve().parents[2]
RUNBOOKS = sorted((ROOT / "runbooks").glob("*.md"))

# placeholder in a runbook  ->  what the test puts in its place (document a new one here before using it)
PLACEHOLDERS = {
    "<mailbox>": "anne@kommune.example",
    "<worker>": "publisher",
    "<stage>": "publisher",
    "<message-id>": "m-0001",
    "<file>": "plannersync-example.out",
}
# compose services that run the plannersync image (its ENTRYPOINT is `plannersync`): `docker compose run --rm publisher
# config check` is `plannersync config check`
IMAGE_SERVICES = {*WORKERS, "db-upgrade", "broker-definitions", "planner-sim", "exchange-sim"}
# compose.jobcentres.yaml (decision 88): the same services once per jobcentre, jc-101-publisher and so on
IMAGE_SERVICES |= {f"{jc}-{name}" for jc in ("jc-101", "jc-102") for name in IMAGE_SERVICES if name not in ("planner-sim", "exchange-sim")}
# compose's own options before its subcommand that take a value (`docker compose -f compose.jobcentres.yaml run ...`)
COMPOSE_GLOBAL_VALUES = {"-f", "--file", "-p", "--project-name", "--profile", "--env-file"}
# options of `docker compose run` that take a value (the word after them is not the service)
COMPOSE_RUN_VALUES = {"-v", "--volume", "-e", "--env", "-u", "--user", "-w", "--workdir", "--name", "-p", "--publish", "-l", "--label"}
# (words) -> run for real: they read and print, change nothing outside the temporary state directory
READ_ONLY = {
    ("status",),
    ("explain",),
    ("export",),
    ("health",),
    ("config", "check"),
    ("db", "ddl"),
    ("mailboxes", "list"),
    ("dlq", "list"),
}


@dataclass(frozen=True)
class Command:
    where: str  # runbooks/x.md:LINE
    words: tuple[str, ...]  # the arguments after `plannersync`

    def __str__(self) -> str:
        return f"{self.where}: plannersync {shlex.join(self.words)}"


def _plannersync_words(tokens: list[str]) -> tuple[str, ...] | None:
    """The arguments a shell command gives plannersync, or None when it does not run plannersync."""
    words = list(tokens)
    while words and (re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]) or words[0] in ("sudo", "env", "-E")):
        if words[0] == "sudo" and len(words) > 2 and words[1] == "-u":
            words = words[3:]
        else:
            words = words[1:]
    if not words:
        return None
    if Path(words[0]).name == "plannersync":
        return tuple(words[1:])
    if words[:2] == ["docker", "compose"]:  # compose's own options do not change what runs
        rest = words[2:]
        while rest and rest[0].startswith("-"):
            rest = rest[2:] if rest[0] in COMPOSE_GLOBAL_VALUES else rest[1:]
        words = ["docker", "compose", *rest]
    if words[:3] == ["docker", "compose", "run"]:
        rest = words[3:]
        while rest and rest[0].startswith("-"):
            if rest[0] == "--entrypoint":  # runs something else than plannersync
                return None
            rest = rest[2:] if rest[0] in COMPOSE_RUN_VALUES else rest[1:]
        if rest and rest[0] in IMAGE_SERVICES:
            return tuple(rest[1:])
    if words[:3] == ["docker", "compose", "exec"] and len(words) > 4 and Path(words[4]).name == "plannersync":
        return tuple(words[5:])
    return None


def commands_in(text: str, name: str) -> list[Command]:
    found = []
    for number, line in fenced_lines(text):
        if "plannersync" not in line and "docker compose" not in line:
            continue
        try:
            commands = _simple_commands(line)
        except ValueError as exc:  # unbalanced quotes: fail rather than skip a command silently
            raise AssertionError(f"{name}:{number}: cannot split {line!r} as a shell line ({exc})") from None
        for tokens in commands:
            words = _plannersync_words(tokens)
            if words is not None:
                found.append(Command(f"{name}:{number}", tuple(PLACEHOLDERS.get(w, w) for w in words)))
    return found


def runbook_commands() -> list[Command]:
    return [c for path in RUNBOOKS for c in commands_in(path.read_text(), f"runbooks/{path.name}")]


def problem(command: Command) -> str | None:
    """Why the real CLI would refuse the command, or None when it accepts it."""
    leftover = [w for w in command.words if re.search(r"<[^>]*>", w)]
    if leftover:
        return f"{command}: placeholder {leftover[0]} is not in PLACEHOLDERS (tests/e2e/test_runbooks.py)"
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            args = parser().parse_args(list(command.words))
            if getattr(args, "command", None) == "sim":
                _simulator_parser(args.system).parse_args(args.sim_args)
    except SystemExit as exc:
        if exc.code not in (0, None):  # --help and --version exit 0
            return f"{command}: {errors.getvalue().strip().splitlines()[-1] if errors.getvalue().strip() else exc}"
    return None


def _simulator_parser(system: str) -> object:
    if system == "planner":
        from simulators.planner.server import _parser

        return _parser()
    if system == "graph":
        from simulators.graph.server import build_parser as graph_parser

        return graph_parser()
    from simulators.exchange.server import build_parser as exchange_parser

    return exchange_parser()


def _read_only(command: Command) -> bool:
    return command.words[:1] in READ_ONLY or command.words[:2] in READ_ONLY or "--help" in command.words or "--version" in command.words


COMMANDS = runbook_commands()


def test_the_runbooks_have_commands_to_check() -> None:
    assert len(COMMANDS) >= 40, "\n".join(map(str, COMMANDS))  # the extraction still finds the runbooks' commands
    assert sum(_read_only(c) for c in COMMANDS) >= 10
    files = {c.where.split(":")[0] for c in COMMANDS}
    for name in ("install.md", "certificate.md", "backup.md", "upgrade.md", "daily.md", "replay.md"):
        assert f"runbooks/{name}" in files, f"no plannersync command found in runbooks/{name}"


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_every_runbook_command_parses_against_the_real_cli(command: Command) -> None:
    assert problem(command) is None, problem(command)


def test_a_subcommand_a_flag_or_a_placeholder_that_does_not_exist_is_caught() -> None:
    snippet = """
Good:

```bash
plannersync dlq list publisher --all && plannersync status --json   # two commands on one line
plannersync export --mailbox anne@kommune.example -o - > anne.ics 2>&1
docker compose run --rm publisher config check
```

Bad:

```bash
plannersync dlq list publisher --everything
plannersync frobnicate
docker compose exec publisher plannersync run publiser
plannersync explain --mailbox <caseworker>
```
"""
    found = commands_in(snippet, "snippet.md")
    assert [c.words for c in found] == [
        ("dlq", "list", "publisher", "--all"),
        ("status", "--json"),
        ("export", "--mailbox", "anne@kommune.example", "-o", "-"),
        ("config", "check"),
        ("dlq", "list", "publisher", "--everything"),
        ("frobnicate",),
        ("run", "publiser"),
        ("explain", "--mailbox", "<caseworker>"),
    ]
    problems = [problem(c) for c in found]
    assert problems[:4] == [None, None, None, None]
    assert "unrecognized arguments: --everything" in str(problems[4])
    assert "invalid choice: 'frobnicate'" in str(problems[5])
    assert "invalid choice: 'publiser'" in str(problems[6])
    assert "placeholder <caseworker> is not in PLACEHOLDERS" in str(problems[7])


@pytest.fixture
def runbook_env(worker_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """A temporary state directory, this test's broker prefix, every worker healthy, a schema and one mailbox."""
    return _runbook_env({k: v for k, v in worker_env.items() if k != "PLANNERSYNC_DATABASE__URL"}, tmp_path)


def _runbook_env(worker_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in worker_env.items() if k != "PLANNERSYNC_STATUS__HEALTH_DIR"}  # the store: SQLite in the state dir unless a URL is given
    env.update({"PLANNERSYNC_STATE_DIR": str(tmp_path / "state"), "HOME": str(tmp_path / "home")})
    for worker in WORKERS:
        write_health(tmp_path / "state" / "health", worker, Health("running", time.time(), ok=True))
    done = subprocess.run([PLANNERSYNC, "mailboxes", "add", PLACEHOLDERS["<mailbox>"]], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return env


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_the_read_only_runbook_commands_run_against_the_local_broker_and_a_temporary_state_dir(
    database: str, worker_env: dict[str, str], topology: object, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The store is the temporary state directory's SQLite file, or a throwaway database on the local PostgreSQL."""
    if database == "postgresql":
        worker_env = {**worker_env, "PLANNERSYNC_DATABASE__URL": request.getfixturevalue("pg_url")}
    runbook_env = request.getfixturevalue("runbook_env") if database == "sqlite" else _runbook_env(worker_env, tmp_path)
    work = tmp_path / "cwd"
    work.mkdir()
    ran, failed = 0, []
    for command in {c.words: c for c in COMMANDS if _read_only(c) and problem(c) is None}.values():  # each once
        for name in WORKERS:  # `plannersync health` only knows this host's workers: write theirs fresh again
            write_health(tmp_path / "state" / "health", name, Health("running", time.time(), ok=True))
        done = subprocess.run([PLANNERSYNC, *command.words], env=runbook_env, cwd=work, capture_output=True, text=True, timeout=120)
        ran += 1
        if done.returncode != 0 or "Traceback" in done.stderr:
            failed.append(f"{command}: exit {done.returncode}\n{done.stderr[-2000:]}")
    assert ran >= 10
    assert not failed, "\n\n".join(failed)
    shown = subprocess.run([PLANNERSYNC, "status", "--json"], env=runbook_env, cwd=work, capture_output=True, text=True, timeout=120)
    status = json.loads(shown.stdout)
    assert status["state"]["database"].startswith("sqlite:///" if database == "sqlite" else "postgresql+psycopg://")  # the store asked for
    assert [m["mailbox"] for m in status["mailboxes"]] == [PLACEHOLDERS["<mailbox>"]]


# --- the standard tools of the backup, upgrade and certificate runbooks, on temporary copies -----------------------

TOOL_RUNBOOKS = FILE_RUNBOOKS
TOOLS = FILE_TOOLS  # what runs here; `install -o plannersync`, systemctl, docker do not (tests/support/runbooks.py)


def tool_lines() -> list[tuple[str, str]]:
    """(where, line) of every line in those runbooks' code blocks that starts with one of ``TOOLS``."""
    return [
        (f"runbooks/{name}:{number}", line.strip())
        for name in TOOL_RUNBOOKS
        for number, line in fenced_lines((ROOT / "runbooks" / name).read_text())
        if line.strip().startswith(TOOLS)
    ]


def test_the_sqlite_and_openssl_commands_of_the_runbooks_run_on_temporary_copies(runbook_env: dict[str, str], tmp_path: Path) -> None:
    """Paths of the host are moved under the temporary directory; the demo certificate stands for the OCES one."""
    import shutil

    places = {"/var/lib/plannersync": tmp_path / "state", "/var/backups/plannersync": tmp_path / "backups", "/etc/plannersync/secrets": tmp_path / "secrets"}
    work = tmp_path / "cwd"
    (tmp_path / "secrets").mkdir()
    work.mkdir()
    for target in (work / "oces.p12", tmp_path / "secrets" / "oces.p12"):
        shutil.copy(ROOT / "deploy" / "secrets" / "oces.p12", target)
    for target in (work / "oces_passphrase.txt", tmp_path / "secrets" / "oces_passphrase"):
        shutil.copy(ROOT / "deploy" / "secrets" / "oces_passphrase.txt", target)
    lines = tool_lines()
    assert sum(line.startswith("sqlite3") for _, line in lines) >= 4 and sum(line.startswith("openssl") for _, line in lines) >= 3, lines
    failed = []
    for where, line in lines:
        for host, here in places.items():
            line = line.replace(host, str(here))
        done = subprocess.run(["bash", "-o", "pipefail", "-c", line], cwd=work, capture_output=True, text=True, timeout=60)
        if done.returncode != 0 or "integrity_check" in line and done.stdout.strip() != "ok":
            failed.append(f"{where}: {line}\nexit {done.returncode}\n{done.stdout[-500:]}{done.stderr[-1000:]}")
    assert not failed, "\n\n".join(failed)
    assert list((tmp_path / "backups").glob("state-*.db")) and (work / "oces-public.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")


def test_the_postgresql_backup_and_restore_of_the_runbook_bring_back_the_state(pg_url: str, tmp_path: Path) -> None:
    """runbooks/backup.md's pg_dump and pg_restore lines, run as written against a throwaway database here (the
    runbook's host, database and user are this test's; the dated dump file is the one pg_dump just wrote)."""
    from shared.adapters.store import Store, upgrade

    lines = [line for _, line in fenced_lines((ROOT / "runbooks" / "backup.md").read_text()) if line.strip().startswith(("pg_dump", "pg_restore"))]
    assert [line.split()[0] for line in lines] == ["pg_dump", "pg_restore"], lines
    database = pg_url.rsplit("/", 1)[1]
    conninfo = f"host=127.0.0.1 dbname={database} user=postgres"
    store = Store.connect(pg_url)
    upgrade(store.engine)
    store.add_mailbox("kept@jobcenter.dk")
    backups = tmp_path / "backups"
    backups.mkdir()

    def run(line: str) -> None:
        line = line.replace("host=db01.kommune.local dbname=plannersync user=plannersync", conninfo).replace("/var/backups/plannersync", str(backups))
        done = subprocess.run(["bash", "-o", "pipefail", "-c", line], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{line}\nexit {done.returncode}\n{done.stderr[-1000:]}"

    run(lines[0])
    dumps = list(backups.glob("plannersync-*.dump"))
    assert len(dumps) == 1
    store.add_mailbox("added-after-the-backup@jobcenter.dk")
    store.engine.dispose()
    run(re.sub(r"plannersync-\d{4}-\d{2}-\d{2}\.dump", dumps[0].name, lines[1]))
    restored = Store.connect(pg_url)
    assert [row.address for row in restored.list_mailboxes()] == ["kept@jobcenter.dk"]   # the state as it was at the backup
    restored.engine.dispose()


# --- the lines that cannot run here (no Docker, no systemd): what they name must exist ------------------------------

COMPOSE_SUBCOMMANDS = {"up", "down", "ps", "logs", "run", "exec", "restart", "stop", "start", "pull", "build", "config", "cp", "images", "top", "kill", "rm", "create"}
COMPOSE_VALUE_OPTIONS = {"-v", "--volume", "-e", "--env", "--entrypoint", "-u", "--user", "-w", "--workdir", "--tail", "-p", "--project-name", "-f", "--file",
                         "--profile", "--env-file", "--name", "-t", "--timeout", "--scale", "--index", "--since"}
SYSTEMCTL_UNIT_VERBS = {"start", "stop", "restart", "status", "enable", "disable", "is-active", "reload", "cat", "show", "reset-failed", "kill", "edit"}
EXTERNAL_UNITS = {"rabbitmq-server", "rabbitmq-server.service", "postgresql", "postgresql.service", "docker", "docker.service", "systemd-journald"}


def _tool_commands(tool: str) -> list[tuple[str, list[str]]]:
    """(where, argv) of every simple command in any runbook's code blocks whose first word is ``tool``."""
    found = []
    for path in sorted((ROOT / "runbooks").glob("*.md")):
        for number, line in fenced_lines(path.read_text()):
            for argv in _simple_commands(line.split(" #")[0]):
                if argv and argv[0] == tool:
                    found.append((f"{path.relative_to(ROOT)}:{number}", argv))
    return found


def _compose_services(compose_file: str = "compose.yaml") -> set[str]:
    import yaml

    return set(yaml.safe_load((ROOT / compose_file).read_text())["services"])


def _unit_exists(unit: str) -> bool:
    if unit in EXTERNAL_UNITS:
        return True
    name = unit if "." in unit else unit + ".service"
    if "@" in name:   # an instance of a template: plannersync-health@publisher.timer -> plannersync-health@.timer
        name = name.split("@", 1)[0] + "@." + name.rsplit(".", 1)[1]
    return (ROOT / "deploy" / "systemd" / name).exists()


def compose_problems(where: str, argv: list[str], services: set[str]) -> list[str]:
    """What is wrong with one ``docker compose ...`` line: an unknown subcommand or service."""
    if argv[:2] != ["docker", "compose"]:
        return [f"{where}: {' '.join(argv)}: only `docker compose` is used in the runbooks"]
    rest, i, compose_file = argv[2:], 0, "compose.yaml"
    while i < len(rest) and rest[i].startswith("-"):   # global options; -f names the file whose services count
        if rest[i] in ("-f", "--file") and i + 1 < len(rest):
            compose_file = rest[i + 1]
            if not (ROOT / compose_file).exists():
                return [f"{where}: {' '.join(argv)}: no compose file {compose_file}"]
            services = _compose_services(compose_file)
        i += 2 if rest[i] in COMPOSE_VALUE_OPTIONS else 1
    if i >= len(rest) or rest[i] not in COMPOSE_SUBCOMMANDS:
        return [f"{where}: {' '.join(argv)}: no known compose subcommand"]
    sub, args, i = rest[i], rest[i + 1 :], 0
    positional: list[str] = []
    while i < len(args):
        if args[i].startswith("-"):
            i += 2 if args[i] in COMPOSE_VALUE_OPTIONS else 1
            continue
        positional.append(args[i])
        if sub in ("run", "exec"):   # the service, then its command
            break
        i += 1
    if sub == "cp":
        positional = [p.split(":", 1)[0] for p in positional if ":" in p]
    return [f"{where}: {' '.join(argv)}: no service {name!r} in {compose_file}" for name in positional if name not in services]


def systemd_problems(where: str, argv: list[str]) -> list[str]:
    """What is wrong with one ``systemctl`` or ``journalctl`` line: a unit that is not shipped in deploy/systemd."""
    if argv[0] == "journalctl":
        units = [argv[i + 1] for i, word in enumerate(argv[:-1]) if word in ("-u", "--unit")]
    else:
        verbs = [word for word in argv[1:] if not word.startswith("-")]
        units = verbs[1:] if verbs and verbs[0] in SYSTEMCTL_UNIT_VERBS else []
    return [f"{where}: {' '.join(argv)}: no unit {unit!r} in deploy/systemd" for unit in units if "*" not in unit and not _unit_exists(unit)]


def setting_problems(where: str, name: str) -> list[str]:
    """A ``PLANNERSYNC_...`` variable that names no setting (``_FILE`` reads a secret file for the setting)."""
    from shared.config import Settings

    parts = name.removeprefix("PLANNERSYNC_").lower().split("__")
    fields: dict[str, Any] = dict(Settings.model_fields)
    for n, part in enumerate(parts):
        last = n == len(parts) - 1
        field = fields.get(part) or (fields.get(part.removesuffix("_file")) if last else None)
        if field is None:
            return [f"{where}: {name} names no setting"]
        annotation = field.annotation
        fields = dict(getattr(annotation, "model_fields", {})) if not last else fields
    return []


def test_every_docker_systemctl_and_journalctl_line_names_what_exists() -> None:
    """Docker and systemd are not on this machine; their runbook lines are checked against compose.yaml and deploy/systemd."""
    services = _compose_services()
    docker, systemctl, journalctl = _tool_commands("docker"), _tool_commands("systemctl"), _tool_commands("journalctl")
    assert len(docker) >= 20 and len(systemctl) >= 10, (len(docker), len(systemctl))   # the runbooks still have them
    problems = [p for where, argv in docker for p in compose_problems(where, argv, services)]
    problems += [p for where, argv in systemctl + journalctl for p in systemd_problems(where, argv)]
    assert not problems, "\n".join(problems)


def test_every_plannersync_variable_in_a_runbook_names_a_setting() -> None:
    names = sorted({(f"runbooks/{path.name}", match) for path in (ROOT / "runbooks").glob("*.md")
                    for match in re.findall(r"\bPLANNERSYNC_[A-Z0-9_]+", path.read_text()) if not match.endswith("_")})
    assert len(names) > 40
    problems = [p for where, name in names for p in setting_problems(where, name)]
    assert not problems, "\n".join(problems)


def test_the_checks_of_lines_that_cannot_run_catch_what_does_not_exist() -> None:
    services = _compose_services()
    assert compose_problems("x", ["docker", "compose", "restart", "publiser"], services)
    assert compose_problems("x", ["docker", "compose", "frobnicate"], services)
    assert not compose_problems("x", ["docker", "compose", "--profile", "demo", "up", "-d", "publisher", "planner-sim"], services)
    assert compose_problems("x", ["docker", "compose", "run", "--rm", "-v", "a:b", "publishr", "config", "check"], services)
    assert not compose_problems("x", ["docker", "compose", "-f", "compose.jobcentres.yaml", "logs", "jc-102-publisher"], services)
    assert compose_problems("x", ["docker", "compose", "-f", "compose.jobcentres.yaml", "logs", "publisher"], services)   # not in that file
    assert compose_problems("x", ["docker", "compose", "-f", "compose.jobcenters.yaml", "ps"], services)
    assert systemd_problems("x", ["systemctl", "restart", "plannersync-publiser.service"])
    assert not systemd_problems("x", ["systemctl", "start", "plannersync-health@publisher.timer", "plannersync.target"])
    assert systemd_problems("x", ["journalctl", "-u", "plannersync-nothing"])
    assert setting_problems("x", "PLANNERSYNC_PLANNER__CLIENT_CERT_P13")
    assert setting_problems("x", "PLANNERSYNC_PLANER__ENDPOINT")
    assert not setting_problems("x", "PLANNERSYNC_PLANNER__CLIENT_CERT_PASSPHRASE_FILE")


# --- every command line of every runbook: exercised, or it says why not (tests/support/runbooks.py) ----------------


def unexercised(lines: list[Line]) -> list[str]:
    """The simple commands no rule of ``kind_of`` knows."""
    return [f"{line.where}: {' '.join(argv)}" for line in lines for argv in shell_argvs(line) if kind_of_command(line, argv) is None]


def test_every_runbook_command_line_is_exercised_or_says_why_not() -> None:
    """Each simple command of each bash/sh/powershell line has one kind, and each kind either names the test that
    runs or checks it, or is one of the few that cannot run here (printed, so a review sees them)."""
    lines = command_lines()
    assert len(lines) > 150, len(lines)
    assert not unexercised(lines), "a runbook command that nothing exercises (add a rule in tests/support/runbooks.py):\n" + "\n".join(unexercised(lines))
    kinds = {kind_of_command(line, argv) for line in lines for argv in shell_argvs(line)}
    assert kinds <= set(EXERCISED) | set(NOT_RUN), kinds
    assert {"plannersync", "broker", "cluster", "network", "powershell", "sqlcmd"} <= kinds
    for kind in NOT_RUN:
        print(f"not run here ({kind}: {NOT_RUN[kind]}):")
        for line in lines_of(kind):
            print(f"  {line.where}: {line.text.strip()}")


def test_a_command_of_a_tool_no_rule_knows_is_caught() -> None:
    lines = [Line("runbooks/broker.md:1", "bash", "rabbitmqadmin list queues && rabbitmqctl list_queues"), Line("runbooks/daily.md:2", "sh", "telnet db01 1433")]
    assert unexercised(lines) == ["runbooks/broker.md:1: rabbitmqadmin list queues", "runbooks/daily.md:2: telnet db01 1433"]
    assert not unexercised([Line("runbooks/exchange.md:3", "powershell", "Get-Mailbox anne")])
