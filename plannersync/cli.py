"""The ``plannersync`` command. Every subcommand has ``--help``.

Configuration comes from the environment (see ``shared/config.py``) and is validated before
anything connects: a bad value prints the variable and what is wrong, and exits with status 2.
A broker, management API or database that cannot be reached or refuses us is one line naming
where it was looked for and which setting to check, and exit status 3; never a traceback
(decision 44 in docs/decisions.md). Workers (``run``) log the same as a JSON line, the
traceback as a field.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from plannersync.progress import ProgressLine
from plannersync.workers import CONSUMING_STAGES, WORKERS, build_worker
from shared.config import ConfigError, Settings, load_settings, mask_url, masked, sqlite_path

EXIT_FAILED = 1  # the command ran but did not succeed (an unknown message id, a failed resync)
EXIT_CONFIG = 2  # a setting is wrong; nothing was contacted
EXIT_UNAVAILABLE = 3  # the broker, the management API or the database cannot be reached or refuses us


class Unavailable(Exception):
    """Something the command needs cannot be used; ``str()`` is the one line the operator sees."""


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        print("plannersync: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def _configure_logs(settings: Settings, service: str) -> None:
    from shared.logs import configure

    configure(settings.log.level, settings.log.format, service=service)


# --- run ----------------------------------------------------------------------------------
ALL_WORKERS = "all"   # every worker but the status page, in one process (decision 94)


def cmd_run(args: argparse.Namespace) -> int:
    names = _worker_names(args.worker)
    if len(names) > 1:
        return _run_together(names, args)
    args.worker = names[0]
    settings = _settings()
    _configure_logs(settings, args.worker)
    from shared.health import HealthReporter
    from shared.logs import get_logger, install_crash_reporting, log_fatal

    install_crash_reporting()  # a fatal signal or a crashing thread leaves its cause on stderr (decision 57)
    log = get_logger("plannersync.run")
    try:
        _prepare_state(settings)
        worker = build_worker(args.worker, settings)

        def _stop(signum: int, _frame: Any) -> None:
            log.info("stop_requested", signal=signal.Signals(signum).name)
            worker.stop()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        if args.ensure_topology and args.worker != "status-page":  # the status page only reads
            _ensure_policies(settings, force=False, quiet=True)
        reporter = HealthReporter(worker, args.worker, settings.status.health_dir)
        reporter.start()
        metrics_server = _serve_metrics(settings, args, worker)  # /metrics next to the health file (runbooks/monitoring.md)
        log.info("worker_starting", worker=args.worker, broker=settings.broker.where(), prefix=settings.broker.prefix, state_dir=str(settings.state_dir))
        try:
            worker.run()
        finally:
            reporter.stop()
            if metrics_server is not None:
                metrics_server.stop()
    except Exception as exc:  # noqa: BLE001 - a worker's failure is one JSON line (worker_crashed), the traceback a field
        from plannersync.status_page import CannotServe
        from shared.workers import WorkerWedged

        message = operator_message(exc, settings) or (str(exc) if isinstance(exc, CannotServe) else None)
        log_fatal(exc, worker=args.worker, **({"problem": message} if message else {}))
        code = EXIT_UNAVAILABLE if message else EXIT_FAILED
        if isinstance(exc, WorkerWedged):   # a wedged thread would hold a normal exit for ever (decision 70)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    return 0


def _worker_names(given: list[str]) -> list[str]:
    """The workers named on the command line, ``all`` expanded, each once, in the registry's order."""
    wanted = set(given)
    if ALL_WORKERS in wanted:
        wanted |= {name for name in WORKERS if name != "status-page"}
    return [name for name in WORKERS if name in wanted]


def _run_together(names: list[str], args: argparse.Namespace) -> int:
    """Several workers in one process, each on its own thread with its own health file (decision 94).

    They share the imports and the process's memory; each still has its own connections, loops and health. SIGTERM
    stops them all. When one ends (it failed, or it stopped by itself) the others are stopped and the process exits
    with that worker's code, so a supervisor (compose ``restart:``, systemd ``Restart=``) starts the set again.
    """
    settings = _settings()
    _configure_logs(settings, "plannersync")
    import structlog

    from shared.health import HealthReporter
    from shared.logs import get_logger, install_crash_reporting, log_fatal
    from shared.workers import WorkerWedged

    install_crash_reporting()
    log = get_logger("plannersync.run")
    ended = threading.Event()
    failures: dict[str, BaseException] = {}
    try:
        _prepare_state(settings)
        workers = {name: build_worker(name, settings) for name in names}
        if args.ensure_topology and any(name != "status-page" for name in names):
            _ensure_policies(settings, force=False, quiet=True)
        reporters = [HealthReporter(worker, name, settings.status.health_dir) for name, worker in workers.items()]
        metrics_server = _serve_metrics(settings, args, None)
        if metrics_server is not None:
            from shared import metrics

            for name, worker in workers.items():
                metrics.worker_health_gauges(name, worker.health)
    except Exception as exc:  # noqa: BLE001 - one JSON line (worker_crashed), as for one worker
        message = operator_message(exc, settings)
        log_fatal(exc, worker=",".join(names), **({"problem": message} if message else {}))
        return EXIT_UNAVAILABLE if message else EXIT_FAILED

    def _stop(signum: int, _frame: Any) -> None:
        log.info("stop_requested", signal=signal.Signals(signum).name)
        ended.set()

    def _run(name: str) -> None:
        structlog.contextvars.bind_contextvars(service=name)   # this thread's log lines name their worker
        try:
            workers[name].run()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread, which ends the process
            failures[name] = exc
        finally:
            ended.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    for reporter in reporters:
        reporter.start()
    threads = [threading.Thread(target=_run, args=(name,), name=f"worker-{name}", daemon=True) for name in names]
    log.info("workers_starting", workers=names, broker=settings.broker.where(), prefix=settings.broker.prefix, state_dir=str(settings.state_dir))
    for thread in threads:
        thread.start()
    while not ended.wait(0.5):
        pass
    for worker in workers.values():
        worker.stop()
    for thread in threads:
        thread.join(60)
    for reporter in reporters:
        reporter.stop()
    if metrics_server is not None:
        metrics_server.stop()
    code = 0
    for name, failure in failures.items():
        message = operator_message(failure, settings) if isinstance(failure, Exception) else None
        log_fatal(failure, worker=name, **({"problem": message} if message else {}))
        code = code or (EXIT_UNAVAILABLE if message else EXIT_FAILED)
        if isinstance(failure, WorkerWedged):   # a wedged thread would hold a normal exit for ever (decision 70)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    stuck = [thread.name for thread in threads if thread.is_alive()]
    if stuck:
        log.error("workers_did_not_stop", threads=stuck)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or EXIT_FAILED)
    return code


def _serve_metrics(settings: Settings, args: argparse.Namespace, worker: Any) -> Any:
    """Serve this worker's Prometheus metrics when a port is given (``--metrics-port`` or PLANNERSYNC_STATUS__METRICS_PORT)."""
    port = args.metrics_port if args.metrics_port is not None else settings.status.metrics_port
    if not port:
        return None
    from shared import metrics
    from shared.logs import get_logger

    host = settings.status.metrics_host
    try:
        server = metrics.serve(host, port)
    except OSError as exc:
        raise Unavailable(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc} (PLANNERSYNC_STATUS__METRICS_HOST, PLANNERSYNC_STATUS__METRICS_PORT)") from None
    if worker is not None:
        metrics.worker_health_gauges(args.worker, worker.health)
    get_logger("plannersync.run").info("metrics_serving", url=f"http://{host}:{server.port}/metrics")
    return server


# --- config -------------------------------------------------------------------------------
def cmd_config_check(args: argparse.Namespace) -> int:
    """Everything that can be checked without connecting: the values, and the certificate and CA files they name."""
    from shared.config import check_files

    settings = _settings()
    print(json.dumps(masked(settings), indent=2, default=str))
    errors, warnings = check_files(settings)
    for warning in warnings:
        print(f"plannersync: warning: {warning}", file=sys.stderr)
    if errors:
        print("plannersync: invalid configuration:", file=sys.stderr)
        for error in errors:
            print(f"  {error}", file=sys.stderr)
        return EXIT_CONFIG
    print("configuration OK", file=sys.stderr)
    return 0


# --- where state lives ------------------------------------------------------------------------
def _prepare_state(settings: Settings) -> None:
    """Create the state directory when something lives in it; check a SQLite file can be written (decision 45)."""
    uses_state_dir = [p for p in (sqlite_path(settings.database.url), settings.status.health_dir) if p is not None and settings.state_dir in p.parents]
    if uses_state_dir:
        try:
            settings.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise Unavailable(f"cannot create the state directory {settings.state_dir}: {exc.strerror} (PLANNERSYNC_STATE_DIR)") from None
    path = sqlite_path(settings.database.url)
    if path is None:
        return
    if not path.parent.is_dir():
        raise Unavailable(f"the database directory {path.parent} does not exist (PLANNERSYNC_DATABASE__URL={settings.database.url})")
    import tempfile

    try:
        if path.exists():
            with path.open("r+b"):
                pass
        with tempfile.TemporaryFile(dir=path.parent):  # SQLite also writes its journal files next to the database
            pass
    except OSError as exc:
        raise Unavailable(f"the database {path} is not writable: {exc.strerror} (PLANNERSYNC_DATABASE__URL, PLANNERSYNC_STATE_DIR)") from None


def _open_store(settings: Settings, auto_upgrade: bool | None = None) -> Any:
    from shared.adapters.store import open_store

    _prepare_state(settings)
    return open_store(settings.database_url(), settings.database.auto_upgrade if auto_upgrade is None else auto_upgrade)


def operator_message(exc: BaseException, settings: Settings | None = None) -> str | None:
    """The one line an operator needs for an exception that means "cannot reach or use X", else None (a bug: traceback)."""
    if isinstance(exc, Unavailable):
        return str(exc)
    from shared.broker.connection import explain_broker_error

    explained = explain_broker_error(exc)
    if explained is not None:
        return explained
    module = type(exc).__module__ or ""
    if module.split(".")[0] in ("sqlalchemy", "sqlite3", "psycopg", "psycopg2", "pymssql") and settings is not None:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        where = mask_url(settings.database.url)
        return f"cannot use the database {where}: {detail[0] if detail else type(exc).__name__} (PLANNERSYNC_DATABASE__URL)"
    return None


# --- db -----------------------------------------------------------------------------------
def cmd_db_upgrade(args: argparse.Namespace) -> int:
    settings = _settings()
    from shared.adapters.store import make_engine, upgrade

    _prepare_state(settings)
    version = upgrade(make_engine(settings.database_url()))
    print(f"database schema at version {version} ({mask_url(settings.database.url)})")
    return 0


def cmd_db_prune(args: argparse.Namespace) -> int:
    settings = _settings()
    from datetime import datetime, timedelta, timezone

    retention = timedelta(days=args.days) if args.days is not None else settings.database.retention
    counts = _open_store(settings).prune(datetime.now(timezone.utc) - retention)
    print(f"pruned rows older than {retention}: " + ", ".join(f"{table} {n}" for table, n in counts.items()))
    return 0


def cmd_db_ddl(args: argparse.Namespace) -> int:
    from shared.adapters.store import ddl

    print(";\n\n".join(ddl(args.dialect)) + ";")
    return 0


# --- topology -------------------------------------------------------------------------------
def cmd_topology_export(args: argparse.Namespace) -> int:
    settings = _settings()
    from shared.broker.topology import from_settings

    try:
        password = Path(args.password_file).read_text(encoding="utf-8").strip() if args.password_file else None
    except OSError as exc:
        raise Unavailable(f"cannot read the password file {args.password_file}: {exc.strerror}") from None
    user = args.user or settings.broker.user
    document = from_settings(settings.broker, settings.retry).definitions(user if password is not None else None, password)
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _ensure_policies(settings: Settings, force: bool, quiet: bool = False, overwrite: tuple[str, ...] = ()) -> list[str]:
    from shared.broker.topology import ensure_policies, from_settings

    try:
        written = ensure_policies(
            from_settings(settings.broker, settings.retry),
            settings.broker.management_url,
            settings.broker.user,
            settings.broker.password.get_secret_value(),
            force=force,
            verify=settings.broker.management_verify(),
            overwrite=overwrite,
        )
    except Exception as exc:  # noqa: BLE001 - reported, not fatal for workers
        if not quiet:
            raise Unavailable(management_problem(exc, settings)) from None
        from shared.logs import get_logger

        get_logger("plannersync.topology").warning("broker_policies_unverified", error=type(exc).__name__, detail=management_problem(exc, settings))
        return []
    return written


def management_problem(exc: BaseException, settings: Settings) -> str:
    """One line for a failed call to the RabbitMQ management API, naming its URL."""
    import requests

    url = mask_url(settings.broker.management_url)
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        if code == 401:
            return f"the RabbitMQ management API at {url} refused user {settings.broker.user!r}: wrong user or password (PLANNERSYNC_BROKER__USER, PLANNERSYNC_BROKER__PASSWORD)"
        if code == 403:
            return f"the RabbitMQ management API at {url} does not let user {settings.broker.user!r} do this (it needs the policymaker tag)"
        return f"the RabbitMQ management API at {url} answered HTTP {code} (PLANNERSYNC_BROKER__MANAGEMENT_URL)"
    if isinstance(exc, requests.exceptions.SSLError):
        return f"TLS with the RabbitMQ management API at {url} failed (PLANNERSYNC_BROKER__CA_BUNDLE, PLANNERSYNC_BROKER__MANAGEMENT_URL)"
    if isinstance(exc, requests.RequestException):
        why = "timed out" if isinstance(exc, requests.Timeout) else "connection refused or host unknown"
        return f"cannot reach the RabbitMQ management API at {url}: {why} (PLANNERSYNC_BROKER__MANAGEMENT_URL)"
    return f"the RabbitMQ management API at {url} failed: {type(exc).__name__}: {str(exc)[:200]}"


def cmd_topology_apply(args: argparse.Namespace) -> int:
    settings = _settings()
    from shared.broker.connection import open_connection
    from shared.broker.topology import from_settings, migrate_dead_letter_queues

    topology = from_settings(settings.broker, settings.retry)
    connection = open_connection(settings.broker, "topology-apply")
    try:
        legacy = topology.declare(connection.channel())
        migrated = migrate_dead_letter_queues(connection, topology) if legacy else {}
    finally:
        if connection.is_open:
            connection.close()
    for queue, count in migrated.items():
        print(f"{queue}: now a classic queue (looking at dead letters is free); {count} dead letter(s) kept")
    written = _ensure_policies(settings, force=args.force, overwrite=tuple(migrated))
    print(
        f"declared {len(topology.queues())} queues on {settings.broker.where()}; "
        f"policies written: {len(written)} ({'forced' if args.force else 'missing ones only'})"
    )
    return 0


# --- contracts --------------------------------------------------------------------------------
def cmd_contracts_export(args: argparse.Namespace) -> int:
    from shared.domain.contracts import json_schemas

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for name, schema in json_schemas().items():
        (out / name).write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
    print(f"wrote {len(json_schemas())} schemas to {out}")
    return 0


# --- mailboxes --------------------------------------------------------------------------------
NEEDS_ADDRESSES = ("add", "remove", "unallow", "undeny")  # allow/deny without addresses list their list


def _invalid_addresses(addresses: list[str]) -> list[str]:
    """One line per address that is not one (``enrolment.address_problem``), for the operator."""
    from shared.domain.enrolment import address_problem

    return [f"plannersync: {address!r} is not a mailbox address: {problem}" for address in addresses if (problem := address_problem(address)) is not None]


def cmd_mailboxes(args: argparse.Namespace) -> int:
    """add / remove / list / set-backend / allow / deny / unallow / undeny / sync (decisions 40, 49 and 62 in docs/decisions.md)."""
    action = args.mailboxes_action
    addresses: list[str] = list(getattr(args, "addresses", []) or [])
    if action in NEEDS_ADDRESSES and not addresses:
        print(f"plannersync: mailboxes {action} needs at least one address; nothing done", file=sys.stderr)
        return EXIT_CONFIG
    if action in ("add", "allow", "deny") and addresses:
        problems = _invalid_addresses(addresses)
        if problems:
            for line in problems:
                print(line, file=sys.stderr)
            print(f"plannersync: nothing {'enrolled' if action == 'add' else 'changed'}: correct the address(es) and run again", file=sys.stderr)
            return EXIT_CONFIG
    settings = _settings()
    if action == "sync":
        return _mailboxes_sync(settings, args.json)
    store = _open_store(settings, auto_upgrade=True)
    if action == "add":
        backend = None if args.backend in (None, "default") else args.backend
        for address in addresses:
            print(f"{address.strip().lower()}: {'enrolled' if store.add_mailbox(address.strip(), backend=backend) else 'already enrolled'}")
    elif action == "remove":
        for address in addresses:
            print(f"{address.strip().lower()}: {'removed' if store.remove_mailbox(address.strip()) else 'not enrolled'}")
    elif action == "set-backend":
        backend = None if args.backend == "default" else args.backend
        if not store.set_backend(args.address.strip(), backend):
            print(f"plannersync: {args.address.strip().lower()} is not enrolled (plannersync mailboxes add)", file=sys.stderr)
            return EXIT_FAILED
        print(f"{args.address.strip().lower()}: backend {args.backend}")
    elif action in ("allow", "deny") and addresses:
        for address in addresses:
            added = store.add_rule(action, address)
            print(f"{address.strip().lower()}: {'added to' if added else 'already on'} the {action} list")
        if action == "deny":
            print("denied mailboxes that are enrolled are removed, their busy times with them, at the next enrolment pass (plannersync mailboxes sync)", file=sys.stderr)
    elif action in ("unallow", "undeny"):
        rule = action.removeprefix("un")
        for address in addresses:
            print(f"{address.strip().lower()}: {'taken off' if store.remove_rule(rule, address) else 'not on'} the {rule} list")
    elif action in ("allow", "deny"):
        rows = [{"address": address, "added_at": added.isoformat(timespec="seconds")} for address, added in store.rules(action)]
        _table(rows, (("address", "address"), ("added_at", "added")), args.json)
        if not rows and not args.json:
            print(f"the {action} list is empty" + (" (every caseworker Planner lists may be enrolled)" if action == "allow" else ""), file=sys.stderr)
    else:
        default_backend = str(getattr(settings.exchange, "default_backend", "ews"))
        rows = [
            {
                "address": m.address,
                "enabled": m.enabled,
                "status": m.status,
                "backend": m.backend or f"default ({default_backend})",
                "last_delivery_at": m.last_delivery_at.isoformat(timespec="seconds") if m.last_delivery_at else None,
                "last_error": m.last_error,
            }
            for m in store.list_mailboxes()
        ]
        if not args.json:
            rows = [{**row, "enabled": "enabled" if row["enabled"] else "disabled"} for row in rows]
        _table(rows, MAILBOX_COLUMNS, args.json)
        if not rows and not args.json:
            print("no mailboxes enrolled (plannersync mailboxes add ADDRESS, or run resource-sync)", file=sys.stderr)
    return 0


MAILBOX_COLUMNS = (
    ("address", "mailbox"),
    ("enabled", "enabled"),
    ("status", "status"),
    ("backend", "backend"),
    ("last_delivery_at", "last delivery"),
    ("last_error", "last error"),
)


def _mailboxes_sync(settings: Settings, as_json: bool) -> int:
    """One enrolment pass from Planner now (what resource-sync does on its schedule)."""
    _configure_logs(settings, "resource-sync")
    from services.resource_sync.worker import run_resource_sync

    report = run_resource_sync(settings)
    if as_json:
        print(json.dumps(report.as_dict(), default=str))
    else:
        plan = report.plan
        print(f"enrolment from Planner: {plan.outcome}" + (f": {plan.reason}" if plan.reason else ""))
        for title, values in (
            ("enrolled", report.enrolled),
            ("removed (denied; busy times removed from Planner)", report.removed),
            ("listed more than once by Planner (enrolled once)", plan.duplicates),
            ("not an address (not enrolled)", plan.invalid),
            ("not on the allow list", plan.not_allowed),
            ("on the deny list", plan.denied),
            ("removed by hand (plannersync mailboxes add to enrol again)", plan.removed_by_hand),
            ("removal failed (tried again next pass)", tuple(report.removal_failures)),
        ):
            if values:
                print(f"  {title}: {', '.join(values)}")
        if plan.outcome == "applied":
            print(f"  {plan.resources} resources, {plan.already_enrolled} already enrolled, {plan.not_case_workers} not caseworkers, {plan.without_email} without e-mail")
    return 0 if report.ok else EXIT_FAILED


def _table(rows: list[dict[str, Any]], columns: tuple[tuple[str, str], ...], as_json: bool) -> None:
    """A listing: a table with a header line (None shows as '-', the last column unpadded), or one JSON object per line (decision 64)."""
    if as_json:
        for row in rows:
            print(json.dumps(row, default=str))
        return
    if not rows:
        return
    cells = [[title for _key, title in columns]] + [["-" if row.get(key) is None else str(row[key]) for key, _title in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns) - 1)]
    for line in cells:
        print("  ".join([text.ljust(width) for text, width in zip(line, widths)] + [line[-1]]).rstrip())


# --- explain, export ------------------------------------------------------------------------------
def cmd_explain(args: argparse.Namespace) -> int:
    """Why Planner does or does not block a time for a mailbox (plannersync/explain.py)."""
    settings = _settings()
    from datetime import datetime, timedelta, timezone

    from plannersync.explain import explain, parse_moment, render

    now = datetime.now(timezone.utc)
    try:
        at, whole_day = parse_moment(args.at, settings.busy.time_zone, now)
    except ValueError as exc:
        print(f"plannersync: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    span = timedelta(hours=12 if whole_day and args.hours is None else (args.hours if args.hours is not None else 3))
    answer = explain(_open_store(settings), args.mailbox, at, settings.busy.policy(), now, span)
    print(json.dumps(answer, indent=2, default=str) if args.json else render(answer, settings.busy.time_zone))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """An iCalendar file of what plannersync holds and what Planner is known to hold (plannersync/export.py)."""
    settings = _settings()
    from plannersync.export import build_calendar

    calendar, desired, delivered = build_calendar(_open_store(settings), args.mailbox)
    data = calendar.to_ical()
    if args.output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        output = Path(args.output or f"plannersync-{args.mailbox.strip().lower()}.ics")
        output.write_bytes(data)
        print(f"wrote {output}: {desired} busy times plannersync holds, {delivered} Planner holds", file=sys.stderr)
    return 0


# --- simulators, demo ----------------------------------------------------------------------------
def cmd_sim(args: argparse.Namespace) -> int:
    if args.system == "planner":
        from simulators.planner.server import main as planner_main

        return planner_main(args.sim_args)
    if args.system == "graph":
        from simulators.graph.server import main as graph_main

        return graph_main(args.sim_args)
    from simulators.exchange.server import main as exchange_main

    return exchange_main(args.sim_args)


def cmd_demo(args: argparse.Namespace) -> int:
    from plannersync.demo import run_demo

    return run_demo(seconds=args.seconds, operator=_settings())


def cmd_resync(args: argparse.Namespace) -> int:
    settings = _settings()
    _configure_logs(settings, "resync")
    from services.snapshot_producer.worker import run_snapshots
    from shared.broker.topology import from_settings

    store = _open_store(settings)
    mailboxes = [row.address for row in store.list_mailboxes(enabled_only=True)] if args.all else [m.lower() for m in args.mailbox]
    if not mailboxes:
        print("no mailboxes to resync (enrol some with `plannersync mailboxes add`)", file=sys.stderr)
        return 1
    # each mailbox by its own backend (EWS or Graph); a reader is built only when one of its mailboxes is resynced
    line = ProgressLine("resync", "mailboxes", len(mailboxes), args.progress_every)
    finished: list[Any] = []

    def progress(result: Any) -> None:
        finished.append(result)
        line.update(len(finished), f"{sum(r.error is not None for r in finished)} failed")

    results = run_snapshots(settings, mailboxes, None, store, from_settings(settings.broker, settings.retry), progress=progress)
    for result in results:
        print(f"{result.mailbox}\t" + (f"{result.items} items published" if result.error is None else f"FAILED: {result.error}"))
    return 0 if all(r.error is None for r in results) else 1


def cmd_reconcile(args: argparse.Namespace) -> int:
    settings = _settings()
    _configure_logs(settings, "reconcile")
    from services.reconciler.worker import render_table

    reports = _reconcile_with_progress(settings, None if args.all else [m.strip().lower() for m in args.mailbox], args.force)
    print(json.dumps([r.as_dict() for r in reports], indent=2, default=str) if args.json else render_table(reports))
    return 0 if all(r.status == "reconciled" for r in reports) else 1


def _reconcile_with_progress(settings: Settings, mailboxes: list[str] | None, force: bool) -> list[Any]:
    """Reconcile in chunks of ``reconcile.mailboxes_per_call`` (one GetEvents each, as the nightly run does), with a
    progress line per mailbox on stderr as each chunk is done."""
    from services.reconciler.worker import open_deps, reconcile

    with open_deps(settings) as deps:
        targets = mailboxes if mailboxes is not None else [row.address for row in deps.store.list_mailboxes(enabled_only=True)]
        reports: list[Any] = []
        for start in range(0, len(targets), settings.reconcile.mailboxes_per_call):
            for report in reconcile(deps, targets[start : start + settings.reconcile.mailboxes_per_call], force):
                reports.append(report)
                print(f"[{len(reports)}/{len(targets)}] {report.mailbox}: {report.status}" + (f" ({report.reason})" if report.reason else ""), file=sys.stderr)
        return reports


def cmd_status(args: argparse.Namespace) -> int:
    settings = _settings()
    from plannersync.status import collect_status
    from shared.adapters.planner_client import client_certificate_expiry

    status = collect_status(settings, _open_store(settings), lambda: client_certificate_expiry(settings.planner))
    degraded = isinstance(status["queues"], str)  # shown, and the exit status says it (decision 44)
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return EXIT_UNAVAILABLE if degraded else 0
    print(f"State: {status['state']['database']}  health files {status['state']['health_dir']}")
    certificate = status["planner_certificate"]
    if certificate:
        shown = certificate.get("error") or f"expires {certificate['expires_at']} ({certificate['days_left']} days)"
        print(f"Planner client certificate: {shown}")
    print("Workers")
    for stage, data in sorted(status["workers"].items()):
        extra = f"  paused until {data['paused_until']} ({data['pause_reason']})" if data.get("paused_until") else ""
        print(f"  {stage:<18} {'ok ' if data['healthy'] else 'BAD'} {data['why']:<26} updated {data.get('updated_at', '?')}{extra}")
    if not status["workers"]:
        print(f"  no health files in {settings.status.health_dir}")
    print("Queues")
    if isinstance(status["queues"], str):
        print(f"  {status['queues']}")
    else:
        for q in status["queues"]:
            print(f"  {q['queue']:<44} ready {q['ready']:>6}  unacked {q['unacked']:>5}  consumers {q['consumers']}")
        for stage, tiers in status["stages"].items():
            retry = ", ".join(f"{delay} {_depth(q)}" for delay, q in tiers["retry"].items())
            print(f"  {stage:<12} queued {_depth(tiers['work']):>6}  retry tiers: {retry}  dead letters {_depth(tiers['dead_letters'])}")
    print("Mailboxes" + (" (" + ", ".join(f"{k} {v}" for k, v in status["mailboxes_by_status"].items()) + ")" if status["mailboxes_by_status"] else ""))
    _print_table(
        [
            {
                "mailbox": m["mailbox"],
                "enabled": "yes" if m["enabled"] else "no",
                "reader": m["backend"] or "default",
                "read by": m["read_by"],
                "exchange": m["exchange"],
                "last change seen": m["last_sync_at"],
                "last snapshot": m["last_full_sync_at"],
                "last delivery": m["last_delivery_at"],
                "busy times": m["busy_times_held"],
                "last error": f"{m['last_error_at']}: {m['last_error']}" if m["last_error"] else None,
            }
            for m in status["mailboxes"]
        ]
    )
    if degraded:
        print(f"plannersync: {status['queues']}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return 0


def _depth(queue: dict[str, Any] | None) -> str:
    return "?" if queue is None else str(queue["ready"] + queue["unacked"])


def _print_table(rows: list[dict[str, Any]]) -> None:
    """Rows as an indented table with a header line; None shows as '-', the last column is not padded."""
    if not rows:
        return
    titles = list(rows[0])
    cells = [titles] + [["-" if row[t] is None else (row[t].strftime("%Y-%m-%d %H:%M:%S") if hasattr(row[t], "strftime") else str(row[t])) for t in titles] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(titles) - 1)]
    for line in cells:
        print("  " + "  ".join([text.ljust(width) for text, width in zip(line, widths)] + [line[-1]]))


def cmd_health(args: argparse.Namespace) -> int:
    settings = _settings()
    import socket

    from shared.health import is_healthy, own_health, read_health

    # this host's own replica (in a container: its own), decision 103
    healthy, why = is_healthy(own_health(read_health(settings.status.health_dir), args.worker, socket.gethostname()), settings.status.stale_after.total_seconds())
    print(f"{args.worker}: {'healthy' if healthy else 'unhealthy'} ({why})")
    return 0 if healthy else 1


def cmd_dlq(args: argparse.Namespace) -> int:
    """list / show / replay / purge a stage's dead letters (decisions 42 and 43 in docs/decisions.md)."""
    settings = _settings()
    from shared.broker.replay import Parked, UnknownMessage

    try:
        return _dlq(settings, args)
    except (UnknownMessage, Parked) as exc:
        print(f"plannersync: {exc.args[0]}", file=sys.stderr)
        return EXIT_FAILED


def _dlq(settings: Settings, args: argparse.Namespace) -> int:
    from shared.broker.replay import list_dead_letters, replay, show_dead_letter

    limit = None if args.all else args.limit
    if args.action == "list":
        page = list_dead_letters(settings, args.stage, limit=limit, offset=args.offset, message_id=args.message_id, parked_only=args.parked)
        _print_letters([letter.as_dict() for letter in page.letters], args.json)
        what = "parked dead letters" if args.parked else "dead letters"
        shown = f"{page.offset + 1}-{page.offset + len(page.letters)}" if page.letters else "none"
        more = f"; {page.left} more: --offset {page.offset + len(page.letters)} or --all" if page.left else ""
        print(f"{page.queue}: showing {shown} of {page.total} {what}{more}", file=sys.stderr)
        return 0
    if args.action == "show":
        if not args.message_id:
            print("plannersync: dlq show needs --message-id ID", file=sys.stderr)
            return EXIT_CONFIG
        print(json.dumps(show_dead_letter(settings, args.stage, args.message_id), indent=2, default=str))
        return 0
    if args.action == "purge":
        return _dlq_purge(settings, args)
    verb = "would replay" if args.dry_run else "replayed"
    line: ProgressLine | None = None

    def progress(looked_at: int, so_far: Any) -> None:
        nonlocal line
        line = line or ProgressLine("replay", "dead letters looked at", so_far.total, args.progress_every)
        line.update(looked_at, f"{len(so_far.replayed)} {verb}, {len(so_far.parked)} parked")

    # one message by id is a lookup, not long work: its answer (or its one-line error) stands alone
    result = replay(settings, args.stage, limit=limit, message_id=args.message_id, dry_run=args.dry_run, progress=None if args.message_id else progress)
    _print_letters([letter.as_dict() for letter in result.replayed], args.json)
    summary = f"{result.queue}: {verb} {len(result.replayed)} of {result.total} to {result.queue.removesuffix('.dlq')}.in; {result.left} left in the queue"
    if limit is not None and len(result.replayed) >= limit and result.left > len(result.parked):
        summary += f" (limit {limit}: run again or use --all)"
    if result.parked:
        summary += (
            f"; {len(result.parked)} parked (replayed 3 times already, not replayed): "
            f"`plannersync dlq list {args.stage} --parked`, `plannersync dlq purge {args.stage} --parked --yes`"
        )
    print(summary, file=sys.stderr)
    return 0


def _dlq_purge(settings: Settings, args: argparse.Namespace) -> int:
    from shared.broker.replay import list_dead_letters, purge

    if not args.yes:
        page = list_dead_letters(settings, args.stage, limit=None, message_id=args.message_id, parked_only=args.parked)
        what = f"message id {args.message_id!r}" if args.message_id else ("the parked dead letters" if args.parked else "every dead letter")
        print(f"plannersync: purging removes {page.total} message(s) of {page.queue} for good ({what}); nothing removed: add --yes to confirm", file=sys.stderr)
        return EXIT_FAILED
    removed = purge(settings, args.stage, message_id=args.message_id, parked_only=args.parked)
    print(f"purged {removed} message(s) from the {args.stage} dead-letter queue")
    return 0


LETTER_COLUMNS = (
    ("message_id", "message id"),
    ("mailbox", "mailbox"),
    ("origin_id", "origin id"),
    ("original_queue", "original queue"),
    ("attempts", "attempts"),
    ("first_failure_at", "first failure"),
    ("replays", "replays"),
    ("reason", "reason"),
)


def _print_letters(rows: list[dict[str, Any]], as_json: bool) -> None:
    """A table with headers (nothing cut: an origin id is what one looks up), or one JSON object per line."""
    if as_json:
        for row in rows:
            print(json.dumps(row, default=str))
        return
    if not rows:
        return
    cells = [[title for _key, title in LETTER_COLUMNS]]
    for row in rows:
        shown = {**row, "replays": f"{row['replays']} (parked)" if row.get("parked") else row["replays"]}
        cells.append(["-" if shown.get(key) is None else str(shown[key]) for key, _title in LETTER_COLUMNS])
    widths = [max(len(line[i]) for line in cells) for i in range(len(LETTER_COLUMNS) - 1)]
    for line in cells:
        print("  ".join([text.ljust(width) for text, width in zip(line, widths)] + [line[-1]]))


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="plannersync", description="Exchange busy time into Jobcenter Planner.")
    top.add_argument("--version", action="version", version=f"plannersync {_version()}", help="print the version and exit")
    sub = top.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one worker (or several in one process) in the foreground until SIGTERM/SIGINT")
    run.add_argument("worker", nargs="+", choices=[*WORKERS, ALL_WORKERS], metavar="WORKER",
                     help=f"which worker to run: {', '.join(WORKERS)} (status-page: the read-only status page, runbooks/monitoring.md); "
                          f"several, or {ALL_WORKERS} (every worker but the status page), run together in one process (decision 94)")
    run.add_argument("--no-ensure-topology", dest="ensure_topology", action="store_false", help="do not create missing broker policies at start")
    run.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (overrides PLANNERSYNC_STATUS__METRICS_PORT; off when neither is set)")
    run.set_defaults(func=cmd_run)

    config = sub.add_parser("config", help="configuration").add_subparsers(dest="action", required=True)
    check = config.add_parser("check", help="validate and print the effective configuration (secrets masked)")
    check.set_defaults(func=cmd_config_check)

    db = sub.add_parser("db", help="the state store").add_subparsers(dest="action", required=True)
    db.add_parser("upgrade", help="create or migrate the schema (idempotent)").set_defaults(func=cmd_db_upgrade)
    prune = db.add_parser("prune", help="forget absent and past rows older than the retention (the reconciler does it nightly)")
    prune.add_argument("--days", type=int, help="override PLANNERSYNC_DATABASE__RETENTION")
    prune.set_defaults(func=cmd_db_prune)
    ddl = db.add_parser("ddl", help="print the CREATE statements for a dialect")
    ddl.add_argument("dialect", choices=("sqlite", "postgresql", "mssql"), help="the database dialect")
    ddl.set_defaults(func=cmd_db_ddl)

    topo = sub.add_parser("topology", help="the broker topology").add_subparsers(dest="action", required=True)
    export = topo.add_parser("export", help="write the RabbitMQ definitions file (for compose)")
    export.add_argument("--output", "-o", default="-", help="file to write, or - for stdout")
    export.add_argument("--user", help="broker user to include (with --password-file); default PLANNERSYNC_BROKER__USER")
    export.add_argument("--password-file", help="include the user (policymaker, its prefix only) with this password's salted hash")
    export.set_defaults(func=cmd_topology_export)
    apply = topo.add_parser("apply", help="declare queues and create missing policies on a running broker")
    apply.add_argument("--force", action="store_true", help="overwrite policies an operator changed")
    apply.set_defaults(func=cmd_topology_apply)

    contracts = sub.add_parser("contracts", help="message contracts").add_subparsers(dest="action", required=True)
    cexport = contracts.add_parser("export", help="write the JSON Schemas")
    cexport.add_argument("--output", "-o", default="docs/contracts", help="directory to write the schemas to (default docs/contracts)")
    cexport.set_defaults(func=cmd_contracts_export)

    _mailboxes_parser(sub)

    sim = sub.add_parser("sim", help="run a simulator (planner, exchange or graph); its own options follow")
    sim.add_argument("system", choices=("planner", "exchange", "graph"), help="which simulator (docs/simulators/<name>.md)")
    sim.add_argument("sim_args", nargs=argparse.REMAINDER, help="the simulator's own options (plannersync sim <name> --help)")
    sim.set_defaults(func=cmd_sim)

    demo = sub.add_parser("demo", help="run the whole pipeline against the configured broker (PLANNERSYNC_BROKER__*) and the simulators; removes what it creates")
    demo.add_argument("--seconds", type=float, default=60.0, help="give up waiting after this long")
    demo.set_defaults(func=cmd_demo)

    resync = sub.add_parser("resync", help="publish a snapshot of mailboxes now (what the nightly run does)")
    which = resync.add_mutually_exclusive_group(required=True)
    which.add_argument("--mailbox", action="append", default=[], help="a mailbox to resync (repeatable)")
    which.add_argument("--all", action="store_true", help="every enrolled mailbox")
    resync.add_argument("--progress-every", type=int, default=100, metavar="N", help="a progress line on stderr every N mailboxes (and at least every 5 s); default 100")
    resync.set_defaults(func=cmd_resync)

    reconcile = sub.add_parser("reconcile", help="make Planner equal the desired state now (what the nightly run does)")
    rwhich = reconcile.add_mutually_exclusive_group(required=True)
    rwhich.add_argument("--mailbox", action="append", default=[], help="a mailbox to reconcile (repeatable)")
    rwhich.add_argument("--all", action="store_true", help="every enrolled mailbox")
    reconcile.add_argument("--force", action="store_true", help="go ahead even past the mass-delete guard")
    reconcile.add_argument("--json", action="store_true", help="the reports as JSON instead of a table (progress stays on stderr)")
    reconcile.set_defaults(func=cmd_reconcile)

    explain = sub.add_parser("explain", help="why Planner does or does not block a time: what Exchange said, what was decided, what Planner got")
    explain.add_argument("--mailbox", required=True, help="the mailbox (caseworker's address)")
    explain.add_argument("--at", help="a local time (2026-12-01T09:30) or a whole day (2026-12-01); default now")
    explain.add_argument("--hours", type=float, help="look this many hours either side of --at (default 3; a whole day: 12)")
    explain.add_argument("--json", action="store_true", help="the answer as JSON")
    explain.set_defaults(func=cmd_explain)

    ical = sub.add_parser("export", help="write an iCalendar file of a mailbox's busy times: what plannersync holds and what Planner holds")
    ical.add_argument("--mailbox", required=True, help="the mailbox (caseworker's address)")
    ical.add_argument("--output", "-o", help="file to write, - for stdout; default plannersync-<mailbox>.ics here")
    ical.set_defaults(func=cmd_export)

    status = sub.add_parser("status", help="workers, queues and mailboxes at a glance")
    status.add_argument("--json", action="store_true", help="the same facts as one JSON document (what the status page serves at /status.json)")
    status.set_defaults(func=cmd_status)
    health = sub.add_parser("health", help="exit 0 when a worker's health file is fresh (for container healthchecks)")
    health.add_argument("worker", choices=list(WORKERS), help="the worker whose health file to check")
    health.set_defaults(func=cmd_health)

    dlq = sub.add_parser(
        "dlq",
        help="look at, replay and purge dead-lettered messages (looking is free; runbooks/replay.md)",
        description="list: show dead letters (all stay); show: one message whole; replay: back to the stage's work queue; "
        "purge: remove for good (needs --yes).",
    )
    dlq.add_argument("action", choices=("list", "show", "replay", "purge"), help="what to do")
    dlq.add_argument("stage", choices=CONSUMING_STAGES, help="whose dead-letter queue")
    dlq.add_argument("--limit", type=int, default=100, help="at most this many (list, replay); default 100")
    dlq.add_argument("--offset", type=int, default=0, help="list from this position (0 = the oldest)")
    dlq.add_argument("--all", action="store_true", help="no limit (list, replay)")
    dlq.add_argument("--message-id", help="only the message with this id (an unknown id is an error)")
    dlq.add_argument("--parked", action="store_true", help="only messages parked after 3 replays (list, purge)")
    dlq.add_argument("--dry-run", action="store_true", help="replay: list what would be replayed, move nothing")
    dlq.add_argument("--yes", action="store_true", help="purge: confirm removing the messages for good")
    dlq.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    dlq.add_argument("--progress-every", type=int, default=100, metavar="N", help="replay: a progress line on stderr every N dead letters (and at least every 5 s); default 100")
    dlq.set_defaults(func=cmd_dlq)
    return top


def _mailboxes_parser(sub: Any) -> None:
    mailboxes = sub.add_parser("mailboxes", help="enrolled mailboxes, and the allow and deny lists of enrolment from Planner")
    actions = mailboxes.add_subparsers(dest="mailboxes_action", required=True)
    backends = ("ews", "graph", "default")
    add = actions.add_parser("add", help="enrol mailboxes (or enable them again); every address is checked first")
    add.add_argument("addresses", nargs="*", metavar="ADDRESS", help="mailbox addresses; nothing is enrolled when one is invalid")
    add.add_argument("--backend", choices=backends, help="the reader: ews (on-premises), graph (Exchange Online), default (PLANNERSYNC_EXCHANGE__DEFAULT_BACKEND)")
    remove = actions.add_parser("remove", help="stop syncing mailboxes (disabled, history kept)")
    remove.add_argument("addresses", nargs="*", metavar="ADDRESS", help="mailbox addresses")
    listing = actions.add_parser("list", help="every mailbox with its status and backend")
    listing.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    set_backend = actions.add_parser("set-backend", help="serve a mailbox from another reader")
    set_backend.add_argument("address", help="an enrolled mailbox")
    set_backend.add_argument("backend", choices=backends, help="ews, graph, or default (the configured default)")
    for rule, verb in (("allow", "enrol only these (when the list is not empty)"), ("deny", "never enrol these; remove them and their busy times")):
        parser_ = actions.add_parser(rule, help=f"enrolment from Planner: {verb}; without an address, show the {rule} list")
        parser_.add_argument("addresses", nargs="*", metavar="ADDRESS", help=f"addresses to put on the {rule} list")
        parser_.add_argument("--json", action="store_true", help="list: one JSON object per line instead of a table")
        lift = actions.add_parser(f"un{rule}", help=f"take addresses off the {rule} list")
        lift.add_argument("addresses", nargs="*", metavar="ADDRESS", help=f"addresses to take off the {rule} list")
    sync = actions.add_parser("sync", help="enrol from Planner now (GetResources; what resource-sync does on its schedule)")
    sync.add_argument("--json", action="store_true", help="the report as JSON")
    mailboxes.set_defaults(func=cmd_mailboxes)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("plannersync")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as exc:
        message = operator_message(exc, _loaded_settings())
        if message is None:
            raise
        print(f"plannersync: {message}", file=sys.stderr)
        return EXIT_UNAVAILABLE


def _loaded_settings() -> Settings | None:
    """The settings, to name the database in a message; None when they do not load (then that was the problem)."""
    try:
        return load_settings()
    except ConfigError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
