"""Benchmark: Exchange (simulator) → producers → transformer → publisher → Planner (simulator).

Prints figures; asserts nothing. Run on a quiet machine with the local RabbitMQ:

    .venv/bin/python benchmarks/pipeline.py --mailboxes 20 --items 100 --edits 40

Measures
- initial load: from the workers' start until Planner holds every busy time of every mailbox;
- edit latency: one appointment moved at a time in Exchange, until Planner shows the new time
  (p50 / p95 / max), the figure that matters to a citizen booking a slot;
- Planner calls and events per call.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plannersync.local_workers import start_workers, stop_workers  # noqa: E402
from shared.broker.topology import delete_everything  # noqa: E402
from shared.logs import configure  # noqa: E402
from simulators.exchange.server import start_server as start_exchange  # noqa: E402
from simulators.planner.server import start_server as start_planner  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from rig import prepare, worker_env  # noqa: E402

CPH = ZoneInfo("Europe/Copenhagen")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mailboxes", type=int, default=20)
    parser.add_argument("--items", type=int, default=100, help="busy appointments per mailbox")
    parser.add_argument("--edits", type=int, default=40)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    configure("WARNING", "console", service="benchmark")

    prefix = f"bench{uuid.uuid4().hex[:6]}"
    workdir = Path(tempfile.mkdtemp(prefix="plannersync-bench-"))
    mailboxes = [f"caseworker{n:03d}@jobcenter.example" for n in range(args.mailboxes)]
    exchange = start_exchange(users={"svc": "pw"}, mailboxes=mailboxes)
    planner = start_planner()
    rng = random.Random(42)
    first = datetime.now(CPH).date() + timedelta(days=1)
    items: list[tuple[str, str, datetime]] = []
    seeding = time.monotonic()
    with requests.Session() as http:
        for mailbox in mailboxes:
            specs = []
            for n in range(args.items):
                day = first + timedelta(days=rng.randrange(0, 80))
                start = datetime(day.year, day.month, day.day, rng.randrange(7, 16), rng.choice((0, 15, 30, 45)), tzinfo=CPH)
                uid = f"bench-{mailbox.split('@')[0]}-{n}"
                spec = {"uid": uid, "start": start.strftime("%Y-%m-%dT%H:%M"), "end": (start + timedelta(minutes=45)).strftime("%Y-%m-%dT%H:%M"), "timezone": "Romance Standard Time"}
                specs.append(spec)
                items.append((mailbox, uid, start))
            http.post(f"{exchange.control_url}/mailboxes/{mailbox}/items", json={"items": specs}, timeout=60).raise_for_status()
    seeded_in = time.monotonic() - seeding

    env = worker_env(prefix, workdir, planner.url, exchange.url)
    settings, topology = prepare(env, mailboxes)
    workers: list[subprocess.Popen[bytes]] = []
    total = len(items)

    def held_count() -> int:   # the simulator's count: events() sorts every event held under its lock
        return planner.state.health()["events"]

    try:
        started = time.monotonic()
        workers = start_workers(["change-producer", "transformer", "publisher"], env, workdir)
        while held_count() < total and time.monotonic() - started < args.timeout:
            time.sleep(0.1)
        load = time.monotonic() - started
        calls_after_load = len(planner.state.calls())

        latencies = []
        for _ in range(args.edits):
            mailbox, uid, start = items[rng.randrange(total)]
            new_start = start + timedelta(minutes=rng.choice((60, 90, 120)))
            items[items.index((mailbox, uid, start))] = (mailbox, uid, new_start)
            t0 = time.monotonic()
            requests.patch(
                f"{exchange.control_url}/mailboxes/{mailbox}/items/{uid}",
                json={"start": new_start.strftime("%Y-%m-%dT%H:%M"), "end": (new_start + timedelta(minutes=45)).strftime("%Y-%m-%dT%H:%M")},
                timeout=10,
            ).raise_for_status()
            while time.monotonic() - t0 < 60:
                event = next((e for e in planner.state.events(mailbox) if e.origin_id == uid), None)
                if event is not None and event.start == new_start:
                    latencies.append(time.monotonic() - t0)
                    break
                time.sleep(0.02)
        calls = planner.state.calls()
        create_calls = [c for c in calls[:calls_after_load] if c.operation == "CreateEvents"]

        print(f"plannersync pipeline benchmark  ({os.cpu_count()} cores; broker, simulators and 3 workers on this machine)")
        print(f"  calendar: {args.mailboxes} mailboxes x {args.items} busy appointments = {total} (seeded in {seeded_in:.1f} s)")
        print(f"  initial load: {held_count()}/{total} busy times in Planner after {load:.1f} s = {total / load:.0f} busy times/s")
        print(f"    Planner calls: {len(create_calls)} CreateEvents, {total / max(1, len(create_calls)):.1f} events per call")
        if latencies:
            ordered = sorted(latencies)
            p95 = ordered[max(0, int(round(0.95 * len(ordered))) - 1)]
            print(
                f"  edit -> Planner latency over {len(latencies)}/{args.edits} edits: "
                f"p50 {statistics.median(ordered):.2f} s, p95 {p95:.2f} s, max {ordered[-1]:.2f} s"
            )
        print("  reference client for comparison: notification poll 4 s + send cycle 20 s, edits for today never sent")
        return 0
    finally:
        stop_workers(workers)
        exchange.stop()
        planner.stop()
        delete_everything(topology, settings.broker.management_url, settings.broker.user, settings.broker.password.get_secret_value())


if __name__ == "__main__":
    raise SystemExit(main())
