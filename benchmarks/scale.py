"""Benchmark: the same work at 250, 500, 1,000 and 2,000 mailboxes: initial load, nights, reconciliation, memory.

Prints figures; asserts nothing. Run on a quiet machine with the local RabbitMQ:

    .venv/bin/python benchmarks/scale.py --mailboxes 250,500,1000,2000 --items 150

For each size, on a fresh prefix and SQLite store, with the EWS and Planner simulators in this process and the
workers as processes (`plannersync run ...`):
- initial load: change producer, transformer and publisher from nothing until Planner holds every busy time;
- unchanged night: the change producer stopped, `plannersync resync --all` (the nightly snapshot of every mailbox)
  and the transformer and publisher until both queues are empty: seconds, per mailbox, per item, Planner calls;
- changed night: 15 appointments moved in one mailbox in ten, then the same: Planner calls per changed event;
- reconciliation: `plannersync reconcile --all` (GetEvents for `reconcile.mailboxes_per_call` mailboxes a call);
- memory: the peak resident size (VmHWM) of every worker and of the resync and reconcile commands, and their sum;
- CPU: each worker's and this process's (the simulators') CPU time during the initial load, per busy time.
Every mailbox is on a streaming subscription (200 a connection), as runbooks/install.md asks beyond 600 caseworkers;
``--streaming-connections 3`` (the default, on-premises Exchange's own limit) leaves the rest polled every 30 s.
``--load-only`` stops after the initial load.
``--together`` runs every worker in one process (`plannersync run all`, decision 94) instead; the change producer then
keeps running through the nights, so the changed night's edits reach Planner live and its calls are not counted.
Time per mailbox and per item should not grow with the count (issue 12's scaling table).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote
from zoneinfo import ZoneInfo

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plannersync.local_workers import PLANNERSYNC, start_workers, stop_workers  # noqa: E402
from shared.broker.topology import Topology, delete_everything  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.logs import configure  # noqa: E402
from simulators.exchange.server import start_server as start_exchange  # noqa: E402
from simulators.planner.server import start_server as start_planner  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from rig import prepare, worker_env  # noqa: E402

CPH = ZoneInfo("Europe/Copenhagen")


@dataclass
class Row:
    mailboxes: int
    items: int
    figures: dict[str, float] = field(default_factory=dict)


def _peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _cpu_s(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _queues_empty(settings: Settings, topology: Topology) -> bool:
    base = settings.broker.management_url.rstrip("/")
    auth = (settings.broker.user, settings.broker.password.get_secret_value())
    vhost = quote(settings.broker.vhost, safe="")
    for stage in ("transformer", "publisher"):
        name = quote(topology.stage(stage).work_queue(), safe="")
        queue = requests.get(f"{base}/api/queues/{vhost}/{name}", auth=auth, timeout=10).json()
        if queue.get("messages", 1) or queue.get("messages_unacknowledged", 1):
            return False
    return True


def _wait(condition: Callable[[], bool], timeout: float, quiet: float = 0.0) -> float:
    """Seconds until ``condition`` held (and, with ``quiet``, still held ``quiet`` seconds later)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            if not quiet:
                return time.monotonic() - started
            time.sleep(quiet)
            if condition():
                return time.monotonic() - started - quiet
        time.sleep(1.0)
    raise SystemExit(f"not done after {timeout:.0f} s")


def _command(args: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """Run ``plannersync ARGS`` to its end; its seconds and its peak RSS (MB), read while it runs."""
    started = time.monotonic()
    with log.open("ab") as out:
        proc = subprocess.Popen([PLANNERSYNC, *args], env=env, stdout=out, stderr=subprocess.STDOUT)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, _peak_rss_mb(proc.pid))
            time.sleep(0.2)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"plannersync {' '.join(args)} exited {proc.returncode}; see {log}")
    return time.monotonic() - started, peak


def one_size(mailbox_count: int, items: int, timeout: float, together: bool, connections: int | None, load_only: bool) -> Row:
    row = Row(mailbox_count, items)
    prefix = f"bscale{uuid.uuid4().hex[:6]}"
    workdir = Path(tempfile.mkdtemp(prefix="plannersync-scale-"))
    mailboxes = [f"cw{n:04d}@jobcenter.example" for n in range(mailbox_count)]
    exchange = start_exchange(users={"svc": "pw"}, mailboxes=mailboxes)
    planner = start_planner()
    rng = random.Random(mailbox_count)
    first = datetime.now(CPH).date() + timedelta(days=1)
    specs_by_mailbox: dict[str, list[dict[str, Any]]] = {}
    with requests.Session() as http:
        for mailbox in mailboxes:
            specs = []
            for n in range(items):
                day = first + timedelta(days=rng.randrange(0, 80))
                start = datetime(day.year, day.month, day.day, rng.randrange(7, 16), rng.choice((0, 15, 30, 45)), tzinfo=CPH)
                specs.append({"uid": f"s-{mailbox.split('@')[0]}-{n}", "start": start.strftime("%Y-%m-%dT%H:%M"),
                              "end": (start + timedelta(minutes=45)).strftime("%Y-%m-%dT%H:%M"), "timezone": "Romance Standard Time"})
            http.post(f"{exchange.control_url}/mailboxes/{mailbox}/items", json={"items": specs}, timeout=120).raise_for_status()
            specs_by_mailbox[mailbox] = specs
    if connections is None:
        connections = min(20, -(-mailbox_count // 200))
    env = worker_env(prefix, workdir, planner.url, exchange.url, PLANNERSYNC_EXCHANGE__STREAMING_CONNECTIONS=str(connections))
    settings, topology = prepare(env, mailboxes)
    row.figures["connections"] = connections
    total = mailbox_count * items
    producer: list[subprocess.Popen[bytes]] = []
    stages: list[subprocess.Popen[bytes]] = []
    peaks: dict[str, float] = {}
    log = workdir / "commands.log"
    stage_names = ("all",) if together else ("transformer", "publisher")

    def held() -> int:
        # the simulator's count; its events() sorts every event under its lock, which at 300,000 events took 40 % of
        # this process's CPU polled once a second and slowed the load it measured as the count grew
        return planner.state.health()["events"]

    def calls() -> list[Any]:
        return list(planner.state.calls())

    try:
        if together:
            stages = start_workers(["all"], env, workdir)
        else:
            stages = start_workers(["transformer", "publisher"], env, workdir)
            producer = start_workers(["change-producer"], env, workdir)
        own_cpu = time.process_time()
        load = _wait(lambda: held() >= total, timeout)
        for name, proc in [*zip(("change-producer",), producer), *zip(stage_names, stages)]:
            row.figures[f"cpu_{name}"] = _cpu_s(proc.pid) * 1e6 / total
        row.figures["cpu_simulators"] = (time.process_time() - own_cpu) * 1e6 / total
        if producer:
            peaks["change-producer"] = _peak_rss_mb(producer[0].pid)
            stop_workers(producer)
        _wait(lambda: _queues_empty(settings, topology), timeout, quiet=2.0)
        row.figures.update({"load_s": load, "load_per_s": total / load})
        if load_only:
            return row

        before = len(calls())
        resync_s, peaks["resync"] = _command(["resync", "--all", "--progress-every", "100000"], env, log)
        drained = _wait(lambda: _queues_empty(settings, topology), timeout, quiet=2.0)
        night = resync_s + drained
        row.figures.update({"night_s": night, "night_ms_per_mailbox": night * 1000 / mailbox_count, "night_us_per_item": night * 1e6 / total,
                            "night_calls": len(calls()) - before})

        changed_mailboxes = mailboxes[:: 10]
        with requests.Session() as http:
            for mailbox in changed_mailboxes:
                for spec in rng.sample(specs_by_mailbox[mailbox], 15):
                    moved = datetime.fromisoformat(spec["start"]).replace(tzinfo=CPH) + timedelta(hours=1)
                    http.patch(f"{exchange.control_url}/mailboxes/{mailbox}/items/{spec['uid']}",
                               json={"start": moved.strftime("%Y-%m-%dT%H:%M"), "end": (moved + timedelta(minutes=45)).strftime("%Y-%m-%dT%H:%M")},
                               timeout=30).raise_for_status()
        before = len(calls())
        resync_s, peak = _command(["resync", "--all", "--progress-every", "100000"], env, log)
        peaks["resync"] = max(peaks["resync"], peak)
        drained = _wait(lambda: _queues_empty(settings, topology), timeout, quiet=2.0)
        changed_calls = len(calls()) - before if not together else float("nan")   # the live change producer sent them
        row.figures.update({"changed_night_s": resync_s + drained, "changed_events": 15 * len(changed_mailboxes), "changed_calls": changed_calls})

        before_calls = calls()
        reconcile_s, peaks["reconcile"] = _command(["reconcile", "--all"], env, log)
        get_events = sum(1 for c in calls()[len(before_calls):] if c.operation == "GetEvents")
        row.figures.update({"reconcile_s": reconcile_s, "reconcile_get_events": get_events})
        for name, proc in zip(stage_names, stages):
            peaks[name] = _peak_rss_mb(proc.pid)
        row.figures.update({f"rss_{name}": mb for name, mb in peaks.items()})
        row.figures["workers_mb"] = sum(mb for name, mb in peaks.items() if name not in ("resync", "reconcile"))
        row.figures["commands_mb"] = max(peaks["resync"], peaks["reconcile"])   # one at a time, at night
        return row
    finally:
        stop_workers(producer + stages)
        exchange.stop()
        planner.stop()
        delete_everything(topology, settings.broker.management_url, settings.broker.user, settings.broker.password.get_secret_value())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mailboxes", default="250,500,1000,2000", help="comma-separated sizes")
    parser.add_argument("--items", type=int, default=150, help="busy appointments per mailbox")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per phase")
    parser.add_argument("--together", action="store_true", help="every worker in one process (plannersync run all)")
    parser.add_argument("--streaming-connections", type=int, default=None,
                        help="the change producer's streaming connections; default: enough for every mailbox (200 a connection, at most 20)")
    parser.add_argument("--load-only", action="store_true", help="stop after the initial load")
    args = parser.parse_args()
    configure("WARNING", "console", service="benchmark")
    print(f"plannersync scale benchmark ({os.cpu_count()} cores; broker, simulators and workers on this machine; SQLite; "
          f"{'every worker in one process' if args.together else 'one process per worker'})")
    rows = []
    for size in (int(s) for s in args.mailboxes.split(",")):
        row = one_size(size, args.items, args.timeout, args.together, args.streaming_connections, args.load_only)
        rows.append(row)
        f = row.figures
        cpu = ", ".join(f"{k[4:]} {v:.0f}" for k, v in f.items() if k.startswith("cpu_"))
        print(f"{size} mailboxes x {args.items}, {f['connections']:.0f} streaming connections: load {f['load_s']:.0f} s "
              f"({f['load_per_s']:.0f}/s); CPU us per busy time during the load: {cpu}", flush=True)
        if args.load_only:
            continue
        print(f"{size} mailboxes x {args.items}: unchanged night {f['night_s']:.1f} s "
              f"({f['night_ms_per_mailbox']:.1f} ms/mailbox, {f['night_us_per_item']:.0f} us/item, {f['night_calls']:.0f} Planner calls); "
              f"changed night {f['changed_night_s']:.1f} s, {f['changed_events']:.0f} events in {f['changed_calls']:.0f} calls; "
              f"reconcile {f['reconcile_s']:.1f} s in {f['reconcile_get_events']:.0f} GetEvents; "
              f"peak RSS MB: " + ", ".join(f"{k[4:]} {v:.0f}" for k, v in f.items() if k.startswith("rss_")), flush=True)
    if args.load_only:
        return 0
    print("\n| mailboxes | load, busy times/s | unchanged night: s, ms/mailbox, us/item, Planner calls | changed night: events, calls | reconcile: s, GetEvents | peak RSS: workers + the larger nightly command |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        f = row.figures
        print(f"| {row.mailboxes:,} | {f['load_per_s']:.0f} | {f['night_s']:.1f}, {f['night_ms_per_mailbox']:.1f}, {f['night_us_per_item']:.0f}, {f['night_calls']:.0f} "
              f"| {f['changed_events']:.0f}, {f['changed_calls']:.0f} | {f['reconcile_s']:.1f}, {f['reconcile_get_events']:.0f} "
              f"| {f['workers_mb']:.0f} + {f['commands_mb']:.0f} MB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
