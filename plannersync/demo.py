"""``plannersync demo``: the whole pipeline on the embedded defaults, against the local RabbitMQ.

It starts the EWS simulator (a caseworker's calendar) and the Planner simulator in-process, runs the
change producer, the transformer and the publisher as real worker processes (``plannersync run``),
lets the first sync carry the calendar into Planner, then edits appointments in Exchange and prints
how long each edit took to reach Planner. Queues get a throwaway prefix, the state store a
temporary SQLite file; both are removed at the end, so the demo never touches a real installation.

The broker is the operator's: the broker settings are read once from the environment (host, port, user,
password, virtual host, TLS, management URL) and the workers, the setup and the cleanup all use exactly
those (decision 48 in docs/decisions.md). The demo says where it runs and, at the end, what it removed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Callable
from zoneinfo import ZoneInfo

import requests

from plannersync.local_workers import start_workers, stop_workers
from shared.adapters.store import Store, upgrade
from shared.broker.topology import delete_everything, ensure_policies, from_settings
from shared.config import BrokerSettings, Settings, load_settings, mask_url

MAILBOX = "caseworker@jobcenter.example"
CPH = ZoneInfo("Europe/Copenhagen")


def _calendar(first: date) -> list[dict[str, Any]]:
    """A caseworker's calendar from tomorrow: what Exchange holds before the demo starts editing."""
    day = first.isoformat()
    next_week = (first + timedelta(days=7)).isoformat()
    return [
        {"uid": "demo-meeting", "start": f"{day}T09:00", "end": f"{day}T10:00", "status": "Busy", "subject": "Team meeting"},
        {"uid": "demo-dentist", "start": f"{day}T13:00", "end": f"{day}T14:00", "status": "Tentative", "sensitivity": "Private", "subject": "Dentist"},
        {"uid": "demo-lunch", "start": f"{day}T12:00", "end": f"{day}T12:30", "status": "Free", "subject": "Lunch"},
        {"uid": "demo-homework", "start": next_week, "all_day": True, "status": "WorkingElsewhere", "subject": "Working from home"},
        {"uid": "demo-course", "start": (first + timedelta(days=2)).isoformat(), "end": (first + timedelta(days=4)).isoformat(), "all_day": True, "status": "OOF", "subject": "Course"},
        {
            "uid": "demo-standup", "start": f"{day}T08:30", "end": f"{day}T08:45", "status": "Busy", "subject": "Stand-up",
            "recurrence": {"pattern": "weekly", "days_of_week": ["Monday", "Wednesday", "Friday"], "count": 6},
        },
    ]


def broker_environment(broker: BrokerSettings, workdir: Path) -> dict[str, str]:
    """The operator's broker settings as the environment of the demo's workers; the password in a file of the demo's own."""
    password_file = workdir / "broker_password"
    password_file.write_text(broker.password.get_secret_value())
    password_file.chmod(0o600)
    env = {
        "PLANNERSYNC_BROKER__HOST": broker.host,
        "PLANNERSYNC_BROKER__PORT": str(broker.port),
        "PLANNERSYNC_BROKER__VHOST": broker.vhost,
        "PLANNERSYNC_BROKER__USER": broker.user,
        "PLANNERSYNC_BROKER__PASSWORD_FILE": str(password_file),
        "PLANNERSYNC_BROKER__MANAGEMENT_URL": broker.management_url,
        "PLANNERSYNC_BROKER__HEARTBEAT": str(broker.heartbeat),
        "PLANNERSYNC_BROKER__TLS": "true" if broker.tls else "false",
    }
    for name in ("ca_bundle", "client_cert", "client_key"):
        value = getattr(broker, name)
        if value is not None:
            env[f"PLANNERSYNC_BROKER__{name.upper()}"] = str(value)
    return env


def run_demo(seconds: float = 60.0, operator: Settings | None = None) -> int:
    """Run the demo on the operator's broker (``operator``'s broker settings; the environment's when not given)."""
    operator = operator or load_settings()
    prefix = f"demo{uuid.uuid4().hex[:6]}"
    workdir = Path(tempfile.mkdtemp(prefix="plannersync-demo-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLANNERSYNC_")}
    env.update(broker_environment(operator.broker, workdir))
    env.update(
        {
            "PLANNERSYNC_BROKER__PREFIX": prefix,
            "PLANNERSYNC_STATE_DIR": str(workdir),
            "PLANNERSYNC_PLANNER__LINGER": "100ms",
            "PLANNERSYNC_EXCHANGE__USERNAME": "svc-plannersync",
            "PLANNERSYNC_EXCHANGE__PASSWORD": "demo",
        }
    )
    settings = _settings_for(env, workdir)  # the very settings the workers load: setup and cleanup use them too
    topology = from_settings(settings.broker, settings.retry)
    management = (settings.broker.management_url, settings.broker.user, settings.broker.password.get_secret_value())
    ok = False
    try:
        ok = _run(seconds, settings, topology, env, workdir, management)
        return 0 if ok else 1
    finally:
        left = delete_everything(topology, *management, verify=settings.broker.management_verify())
        left += _leftovers(settings, prefix)
        if not ok:
            _show_logs(workdir)
        shutil.rmtree(workdir, ignore_errors=True)
        if left:
            print(f"\ncould not remove from {settings.broker.where()}: {', '.join(sorted(set(left)))}")
        else:
            print(f"\nremoved the queues, exchanges and policies '{prefix}.*' from {settings.broker.where()} and {workdir}")


def _settings_for(env: dict[str, str], workdir: Path) -> Settings:
    try:
        return load_settings(environ=env)
    except Exception:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _leftovers(settings: Settings, prefix: str) -> list[str]:
    """Anything of the demo's prefix still on the broker (none, unless the cleanup failed)."""
    from urllib.parse import quote

    vhost = quote(settings.broker.vhost, safe="")
    auth = (settings.broker.user, settings.broker.password.get_secret_value())
    found = []
    for kind in ("queues", "exchanges", "policies"):
        try:
            response = requests.get(f"{settings.broker.management_url.rstrip('/')}/api/{kind}/{vhost}", auth=auth, timeout=10, verify=settings.broker.management_verify())
            response.raise_for_status()
        except requests.RequestException as exc:
            return [f"{kind} (cannot check: {type(exc).__name__})"]
        found += [f"{kind[:-1] if kind != 'policies' else 'policy'} {item['name']}" for item in response.json() if str(item.get("name", "")).startswith(prefix + ".")]
    return found


def _show_logs(workdir: Path) -> None:
    for log in sorted(workdir.glob("*.log")):
        print(f"\n----- {log.stem} (last lines) -----")
        print("\n".join(log.read_text(errors="replace").splitlines()[-25:]))


def _run(seconds: float, settings: Settings, topology: Any, env: dict[str, str], workdir: Path, management: tuple[str, str, str]) -> bool:
    from shared.logs import configure
    from simulators.exchange.server import start_server as start_exchange
    from simulators.planner.server import start_server as start_planner

    configure("WARNING", "console", service="demo")  # the simulators run in this process: keep their logs out of the way
    exchange = start_exchange(users={"svc-plannersync": "demo"}, mailboxes=[MAILBOX])
    planner = start_planner()
    env.update({"PLANNERSYNC_PLANNER__ENDPOINT": planner.url, "PLANNERSYNC_EXCHANGE__ENDPOINT": exchange.url})
    control = f"{exchange.control_url}/mailboxes/{MAILBOX}"
    tomorrow = datetime.now(CPH).date() + timedelta(days=1)
    workers: list[subprocess.Popen[bytes]] = []
    print(f"plannersync demo on broker {settings.broker.where()} (virtual host '{settings.broker.vhost}', user '{settings.broker.user}')")
    print(f"  queues, exchanges and policies '{settings.broker.prefix}.*'; management API {mask_url(settings.broker.management_url)}")
    print(f"  state and worker logs in {workdir}")
    print(f"  Exchange simulator {exchange.url}  (mailbox {MAILBOX})")
    print(f"  Planner simulator  {planner.url}")
    try:
        for spec in _calendar(tomorrow):
            requests.post(f"{control}/items", json={**spec, "timezone": "Romance Standard Time"}, timeout=10).raise_for_status()
        store = Store.connect(settings.database_url())
        upgrade(store.engine)
        store.add_mailbox(MAILBOX)
        store.engine.dispose()
        return _pipeline(seconds, settings, topology, env, workdir, management, planner, control, tomorrow, workers)
    finally:
        stop_workers(workers)
        exchange.stop()
        planner.stop()


def _pipeline(
    seconds: float,
    settings: Settings,
    topology: Any,
    env: dict[str, str],
    workdir: Path,
    management: tuple[str, str, str],
    planner: Any,
    control: str,
    tomorrow: date,
    workers: list[subprocess.Popen[bytes]],
) -> bool:
    """The demo's steps, each timed until Planner shows it; True when every step arrived in time."""

    def held() -> dict[str, tuple[datetime, datetime]]:
        return {e.origin_id: (e.start, e.end) for e in planner.state.events(MAILBOX)}

    def wait(condition: Callable[[dict[str, tuple[datetime, datetime]]], bool]) -> float | None:
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            if condition(held()):
                return time.monotonic() - started
            time.sleep(0.05)
        return None

    ok = True
    ensure_policies(topology, *management, verify=settings.broker.management_verify())
    workers.extend(start_workers(["change-producer", "transformer", "publisher"], env, workdir))

    took = wait(lambda h: "demo-meeting" in h and "demo-course" in h and sum(k.startswith("demo-standup$") for k in h) == 6)
    ok &= _report("first sync: the calendar reaches Planner", took)
    _show(held())

    at = tomorrow.isoformat()
    requests.patch(f"{control}/items/demo-meeting", json={"start": f"{at}T10:00", "end": f"{at}T11:30"}, timeout=10).raise_for_status()
    moved = datetime.fromisoformat(f"{at}T10:00").replace(tzinfo=CPH)
    ok &= _report("move the team meeting to 10:00-11:30", wait(lambda h: h.get("demo-meeting", (None,))[0] == moved))

    requests.delete(f"{control}/items/demo-dentist", timeout=10).raise_for_status()
    ok &= _report("delete the dentist appointment", wait(lambda h: "demo-dentist" not in h))

    requests.patch(f"{control}/items/demo-lunch", json={"status": "Busy"}, timeout=10).raise_for_status()
    ok &= _report("mark lunch as busy", wait(lambda h: "demo-lunch" in h))

    requests.delete(f"{control}/items/demo-standup/occurrences", json={"index": 2}, timeout=10).raise_for_status()
    ok &= _report("cancel one stand-up of the series", wait(lambda h: sum(k.startswith("demo-standup$") for k in h) == 5))
    print()
    _show(held())
    calls = planner.state.calls()
    print(f"\nPlanner received {len(calls)} calls: " + ", ".join(f"{c.operation}({len(c.origin_ids)})" for c in calls))
    print("\nresult: " + ("OK - Planner follows the calendar" if ok else "FAILED - the worker logs follow"))
    return ok


def _report(step: str, took: float | None) -> bool:
    print(f"  {step:<45} " + (f"in Planner after {took:.2f} s" if took is not None else "NOT SEEN in time"))
    return took is not None


def _show(events: dict[str, tuple[datetime, datetime]]) -> None:
    print("\n  Planner holds (Europe/Copenhagen):")
    for origin, (start, end) in sorted(events.items(), key=lambda e: e[1][0]):
        print(f"    {start.astimezone(CPH):%a %d %b %H:%M} - {end.astimezone(CPH):%a %d %b %H:%M}  {origin}")
    print()
