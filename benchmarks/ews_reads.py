"""Benchmark: what reading Exchange through EWS costs the change producer, per item and per change.

Prints figures; asserts nothing. Needs no broker or database:

    .venv/bin/python benchmarks/ews_reads.py --items 1000 --edits 40

The EWS simulator runs as its own process, so the CPU time measured here is the reader's alone (exchangelib,
requests, our mapping). Reads exactly as the producers do (``EwsConnection.sync`` from nothing or from the saved
state, ``EwsConnection.view`` over the sync window), and counts the requests the simulator answered:
- first read: SyncFolderItems from nothing of one mailbox of ``--items`` single appointments plus ``--series``
  weekly series; CPU ms per item;
- view: the window's CalendarView of the same mailbox (the nightly snapshot's read, and the occurrences of a series);
- per change: one appointment (or, one edit in ``--series-share``, one series) edited at a time, then the read the
  producer makes for it: SyncFolderItems from the saved state, plus the window's series instances when a series master changed
  (decision 37); requests and CPU ms per change.
``--profile FILE`` writes a cProfile of the per-change reads. ``--byte-chunks`` restores exchangelib's own way of handing a read answer to its parser, a byte at a time (the cost
before decision 93), for a side-by-side figure.
"""

from __future__ import annotations

import argparse
import cProfile
import random
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable
from zoneinfo import ZoneInfo

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.adapters import ews  # noqa: E402
from shared.config import BusySettings, load_settings  # noqa: E402
from shared.domain.busy_rules import sync_window  # noqa: E402
from shared.logs import configure  # noqa: E402

CPH = ZoneInfo("Europe/Copenhagen")
MAILBOX = "bench@jobcenter.dk"


def _timed(action: Callable[[], Any]) -> tuple[Any, float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    result = action()
    return result, (time.process_time() - cpu) * 1000, (time.perf_counter() - wall) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1000, help="single appointments in the mailbox")
    parser.add_argument("--series", type=int, default=20, help="weekly series in the mailbox")
    parser.add_argument("--edits", type=int, default=40)
    parser.add_argument("--series-share", type=float, default=0.1, help="share of edits that touch a series")
    parser.add_argument("--port", type=int, default=18282)
    parser.add_argument("--profile", default="", help="write a cProfile of the per-change reads to this file")
    parser.add_argument("--byte-chunks", action="store_true", help="exchangelib's byte-at-a-time parsing (before decision 93)")
    args = parser.parse_args()
    configure("WARNING")
    if args.byte_chunks:
        ews._EwsAdapter.build_response = ews.DeadlineAdapter.build_response  # type: ignore[method-assign]
    output = tempfile.NamedTemporaryFile("w+", suffix=".log")   # the simulator logs every item; a pipe would fill up
    sim = subprocess.Popen([sys.executable, "-m", "simulators.exchange.server", "--port", str(args.port), "--user", "svc", "--password", "pw",
                            "--mailbox", MAILBOX], cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, text=True)
    try:
        started = time.monotonic()
        while "control: " not in (log := Path(output.name).read_text()):   # "EWS simulator: URL  control: URL"
            if sim.poll() is not None or time.monotonic() - started > 30:
                raise SystemExit("the EWS simulator did not start:\n" + log)
            time.sleep(0.1)
        control = log.split("control: ")[1].split()[0]
        http = requests.Session()
        day = (datetime.now(CPH) + timedelta(days=1)).date()
        singles = [{"uid": f"single-{n}", "start": f"{day + timedelta(days=n // 8)}T{8 + n % 8:02d}:00",
                    "end": f"{day + timedelta(days=n // 8)}T{8 + n % 8:02d}:30", "status": "Busy", "timezone": "Romance Standard Time"}
                   for n in range(args.items)]
        series = [{"uid": f"series-{n}", "start": f"{day}T{7 + n % 3:02d}:{(n * 5) % 60:02d}", "end": f"{day}T{7 + n % 3:02d}:{(n * 5) % 60 + 4:02d}",
                   "status": "Busy", "timezone": "Romance Standard Time", "recurrence": {"pattern": "weekly", "count": 52}}
                  for n in range(args.series)]
        http.post(f"{control}/mailboxes/{MAILBOX}/items", json={"items": singles + series}, timeout=120).raise_for_status()
        settings = load_settings(environ={}, exchange={"endpoint": f"http://127.0.0.1:{args.port}/EWS/Exchange.asmx", "username": "svc", "password": "pw"})
        connection = ews.EwsConnection(settings.exchange, "Europe/Copenhagen", pool_size=2)
        window = sync_window(datetime.now(timezone.utc), BusySettings().policy())
        connection.sync(MAILBOX, None)   # warm: sessions, autodiscover-free account, imports

        def requests_since(mark: int) -> int:
            return len(http.get(f"{control}/calls", timeout=30).json()) - mark

        mark = requests_since(0)
        (changes, state), cpu, wall = _timed(lambda: connection.sync(MAILBOX, None))
        first_requests = requests_since(mark)
        print(f"first read: {len(changes)} items in {first_requests} requests, {wall:.0f} ms, CPU {cpu:.0f} ms ({cpu / len(changes):.2f} ms per item)")
        mark = requests_since(0)
        items, cpu, wall = _timed(lambda: connection.view(MAILBOX, window))
        print(f"view: {len(items)} items (occurrences expanded) in {requests_since(mark)} requests, {wall:.0f} ms, CPU {cpu:.0f} ms ({cpu / len(items):.2f} ms per item)")

        rng = random.Random(7)
        profiler = cProfile.Profile() if args.profile else None
        total_cpu, total_requests, series_edits = 0.0, 0, 0
        for n in range(args.edits):
            if args.series and rng.random() < args.series_share:
                uid, series_edits = f"series-{rng.randrange(args.series)}", series_edits + 1
            else:
                uid = f"single-{rng.randrange(args.items)}"
            minute = 10 + n % 40
            moved_to = day + timedelta(days=rng.randrange(60))
            http.patch(f"{control}/mailboxes/{MAILBOX}/items/{uid}", json={"start": f"{moved_to}T13:{minute:02d}", "end": f"{moved_to}T14:{minute:02d}",
                                                                            "timezone": "Romance Standard Time"}, timeout=30).raise_for_status()
            mark = requests_since(0)

            def read() -> Any:
                found, new_state = connection.sync(MAILBOX, state)
                if any(c.item is not None and c.item.item_type == "master" for c in found):
                    connection.occurrences(MAILBOX, window)   # the series' instances, as publish_sync reads them (decision 100)
                return found, new_state

            if profiler is not None:
                profiler.enable()
            (_found, state), cpu, _wall = _timed(read)
            if profiler is not None:
                profiler.disable()
            total_cpu += cpu
            total_requests += requests_since(mark)
        print(f"per change: {args.edits} edits ({series_edits} of a series): {total_requests / args.edits:.2f} requests and "
              f"CPU {total_cpu / args.edits:.1f} ms per change")
        if profiler is not None:
            profiler.dump_stats(args.profile)
        connection.close()
    finally:
        sim.terminate()
        sim.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
