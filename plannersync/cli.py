"""The ``plannersync`` command. Every subcommand has ``--help``.

Configuration comes from the environment (see ``shared/config.py``) and is validated before
anything connects: a bad value prints the variable and what is wrong, and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

from plannersync.workers import CONSUMING_STAGES, WORKERS, build_worker
from shared.config import ConfigError, Settings, load_settings, masked

EXIT_CONFIG = 2


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
def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings()
    _configure_logs(settings, args.worker)
    from shared.health import HealthReporter
    from shared.logs import get_logger

    log = get_logger("plannersync.run")
    worker = build_worker(args.worker, settings)

    def _stop(signum: int, _frame: Any) -> None:
        log.info("stop_requested", signal=signal.Signals(signum).name)
        worker.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if args.ensure_topology:
        _ensure_policies(settings, force=False, quiet=True)
    reporter = HealthReporter(worker, args.worker, settings.status.health_dir)
    reporter.start()
    log.info("worker_starting", worker=args.worker, broker=f"{settings.broker.host}:{settings.broker.port}", prefix=settings.broker.prefix)
    try:
        worker.run()
    finally:
        reporter.stop()
    return 0


# --- config -------------------------------------------------------------------------------
def cmd_config_check(args: argparse.Namespace) -> int:
    settings = _settings()
    print(json.dumps(masked(settings), indent=2, default=str))
    print("configuration OK", file=sys.stderr)
    return 0


# --- db -----------------------------------------------------------------------------------
def cmd_db_upgrade(args: argparse.Namespace) -> int:
    settings = _settings()
    from shared.adapters.store import make_engine, upgrade

    version = upgrade(make_engine(settings.database_url()))
    print(f"database schema at version {version}")
    return 0


def cmd_db_prune(args: argparse.Namespace) -> int:
    settings = _settings()
    from datetime import datetime, timedelta, timezone

    from shared.adapters.store import open_store

    retention = timedelta(days=args.days) if args.days is not None else settings.database.retention
    counts = open_store(settings.database_url(), settings.database.auto_upgrade).prune(datetime.now(timezone.utc) - retention)
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

    password = Path(args.password_file).read_text().strip() if args.password_file else None
    document = from_settings(settings.broker, settings.retry).definitions(args.user if password is not None else None, password)
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _ensure_policies(settings: Settings, force: bool, quiet: bool = False) -> list[str]:
    from shared.broker.topology import ensure_policies, from_settings

    try:
        written = ensure_policies(
            from_settings(settings.broker, settings.retry),
            settings.broker.management_url,
            settings.broker.user,
            settings.broker.password.get_secret_value(),
            force=force,
        )
    except Exception as exc:  # noqa: BLE001 - reported, not fatal for workers
        if not quiet:
            raise
        from shared.logs import get_logger

        get_logger("plannersync.topology").warning("broker_policies_unverified", error=type(exc).__name__, detail=str(exc)[:200])
        return []
    return written


def cmd_topology_apply(args: argparse.Namespace) -> int:
    settings = _settings()
    from shared.broker.connection import open_connection
    from shared.broker.topology import from_settings

    topology = from_settings(settings.broker, settings.retry)
    connection = open_connection(settings.broker, "topology-apply")
    try:
        topology.declare(connection.channel())
    finally:
        connection.close()
    written = _ensure_policies(settings, force=args.force)
    print(f"declared {len(topology.queues())} queues; policies written: {len(written)} ({'forced' if args.force else 'missing ones only'})")
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
def cmd_mailboxes(args: argparse.Namespace) -> int:
    settings = _settings()
    from shared.adapters.store import Store, upgrade

    store = Store.connect(settings.database_url())
    upgrade(store.engine)
    if args.action == "add":
        for address in args.addresses:
            print(f"{address}: {'enrolled' if store.add_mailbox(address) else 'already enrolled'}")
    elif args.action == "remove":
        for address in args.addresses:
            print(f"{address}: {'removed' if store.remove_mailbox(address) else 'not enrolled'}")
    else:
        for row in store.list_mailboxes():
            print(f"{row.address}\t{'enabled' if row.enabled else 'disabled'}\t{row.status}\t{row.status_detail or ''}")
    return 0


# --- simulators, demo ----------------------------------------------------------------------------
def cmd_sim(args: argparse.Namespace) -> int:
    if args.system == "planner":
        from simulators.planner.server import main as planner_main

        return planner_main(args.sim_args)
    from simulators.exchange.server import main as exchange_main

    return exchange_main(args.sim_args)


def cmd_demo(args: argparse.Namespace) -> int:
    from plannersync.demo import run_demo

    return run_demo(seconds=args.seconds)


def cmd_resync(args: argparse.Namespace) -> int:
    settings = _settings()
    _configure_logs(settings, "resync")
    from services.snapshot_producer.worker import run_snapshots
    from shared.adapters.ews import EwsConnection
    from shared.adapters.store import open_store
    from shared.broker.topology import from_settings

    store = open_store(settings.database_url(), settings.database.auto_upgrade)
    mailboxes = [row.address for row in store.list_mailboxes(enabled_only=True)] if args.all else [m.lower() for m in args.mailbox]
    if not mailboxes:
        print("no mailboxes to resync (enrol some with `plannersync mailboxes add`)", file=sys.stderr)
        return 1
    exchange = EwsConnection(settings.exchange, settings.busy.time_zone, settings.exchange.snapshot_parallelism + 2)
    results = run_snapshots(settings, mailboxes, exchange, store, from_settings(settings.broker, settings.retry))
    for result in results:
        print(f"{result.mailbox}\t" + (f"{result.items} items published" if result.error is None else f"FAILED: {result.error}"))
    return 0 if all(r.error is None for r in results) else 1


def cmd_reconcile(args: argparse.Namespace) -> int:
    settings = _settings()
    _configure_logs(settings, "reconcile")
    from services.reconciler.worker import render_table, run_reconciliation

    reports = run_reconciliation(settings, None if args.all else [m.lower() for m in args.mailbox], force=args.force)
    print(json.dumps([r.as_dict() for r in reports], indent=2, default=str) if args.json else render_table(reports))
    return 0 if all(r.status == "reconciled" for r in reports) else 1


def cmd_status(args: argparse.Namespace) -> int:
    settings = _settings()
    from plannersync.status import collect_status
    from shared.adapters.store import open_store

    status = collect_status(settings, open_store(settings.database_url(), settings.database.auto_upgrade))
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return 0
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
    print("Mailboxes")
    for m in status["mailboxes"]:
        print(
            f"  {m['mailbox']:<36} {'enabled ' if m['enabled'] else 'disabled'} exchange: {m['exchange']:<30} "
            f"last sync {m['last_sync_at'] or '-'}  last delivery {m['last_delivery_at'] or '-'}"
            + (f"  last error {m['last_error_at']}: {m['last_error']}" if m["last_error"] else "")
        )
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    settings = _settings()
    from shared.health import is_healthy, read_health

    healthy, why = is_healthy(read_health(settings.status.health_dir).get(args.worker), settings.status.stale_after.total_seconds())
    print(f"{args.worker}: {'healthy' if healthy else 'unhealthy'} ({why})")
    return 0 if healthy else 1


def cmd_dlq(args: argparse.Namespace) -> int:
    settings = _settings()
    from shared.broker.replay import list_dead_letters, replay

    if args.action == "list":
        for row in list_dead_letters(settings, args.stage, limit=args.limit):
            print(json.dumps(row, default=str))
        return 0
    moved = replay(settings, args.stage, limit=args.limit, message_id=args.message_id, dry_run=args.dry_run)
    print(f"{'would replay' if args.dry_run else 'replayed'} {moved} message(s) from the {args.stage} dead-letter queue")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="plannersync", description="Exchange busy time into Jobcenter Planner.")
    sub = top.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one worker in the foreground until SIGTERM/SIGINT")
    run.add_argument("worker", choices=list(WORKERS))
    run.add_argument("--no-ensure-topology", dest="ensure_topology", action="store_false", help="do not create missing broker policies at start")
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
    ddl.add_argument("dialect", choices=("sqlite", "postgresql", "mssql"))
    ddl.set_defaults(func=cmd_db_ddl)

    topo = sub.add_parser("topology", help="the broker topology").add_subparsers(dest="action", required=True)
    export = topo.add_parser("export", help="write the RabbitMQ definitions file (for compose)")
    export.add_argument("--output", "-o", default="-", help="file to write, or - for stdout")
    export.add_argument("--user", default="plannersync", help="broker user to include (with --password-file)")
    export.add_argument("--password-file", help="include the user with this password's hash")
    export.set_defaults(func=cmd_topology_export)
    apply = topo.add_parser("apply", help="declare queues and create missing policies on a running broker")
    apply.add_argument("--force", action="store_true", help="overwrite policies an operator changed")
    apply.set_defaults(func=cmd_topology_apply)

    contracts = sub.add_parser("contracts", help="message contracts").add_subparsers(dest="action", required=True)
    cexport = contracts.add_parser("export", help="write the JSON Schemas")
    cexport.add_argument("--output", "-o", default="docs/contracts")
    cexport.set_defaults(func=cmd_contracts_export)

    mailboxes = sub.add_parser("mailboxes", help="enrolled mailboxes")
    mailboxes.add_argument("action", choices=("add", "remove", "list"))
    mailboxes.add_argument("addresses", nargs="*")
    mailboxes.set_defaults(func=cmd_mailboxes)

    sim = sub.add_parser("sim", help="run a simulator (planner or exchange); its own options follow")
    sim.add_argument("system", choices=("planner", "exchange"))
    sim.add_argument("sim_args", nargs=argparse.REMAINDER)
    sim.set_defaults(func=cmd_sim)

    demo = sub.add_parser("demo", help="run the whole pipeline against the local broker and the simulators")
    demo.add_argument("--seconds", type=float, default=60.0, help="give up waiting after this long")
    demo.set_defaults(func=cmd_demo)

    resync = sub.add_parser("resync", help="publish a snapshot of mailboxes now (what the nightly run does)")
    which = resync.add_mutually_exclusive_group(required=True)
    which.add_argument("--mailbox", action="append", default=[], help="a mailbox to resync (repeatable)")
    which.add_argument("--all", action="store_true", help="every enrolled mailbox")
    resync.set_defaults(func=cmd_resync)

    reconcile = sub.add_parser("reconcile", help="make Planner equal the desired state now (what the nightly run does)")
    rwhich = reconcile.add_mutually_exclusive_group(required=True)
    rwhich.add_argument("--mailbox", action="append", default=[], help="a mailbox to reconcile (repeatable)")
    rwhich.add_argument("--all", action="store_true", help="every enrolled mailbox")
    reconcile.add_argument("--force", action="store_true", help="go ahead even past the mass-delete guard")
    reconcile.add_argument("--json", action="store_true")
    reconcile.set_defaults(func=cmd_reconcile)

    status = sub.add_parser("status", help="workers, queues and mailboxes at a glance")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    health = sub.add_parser("health", help="exit 0 when a worker's health file is fresh (for container healthchecks)")
    health.add_argument("worker", choices=list(WORKERS))
    health.set_defaults(func=cmd_health)

    dlq = sub.add_parser("dlq", help="inspect and replay dead-lettered messages")
    dlq.add_argument("action", choices=("list", "replay"))
    dlq.add_argument("stage", choices=CONSUMING_STAGES)
    dlq.add_argument("--limit", type=int, default=100)
    dlq.add_argument("--message-id", help="replay only this message")
    dlq.add_argument("--dry-run", action="store_true")
    dlq.set_defaults(func=cmd_dlq)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
