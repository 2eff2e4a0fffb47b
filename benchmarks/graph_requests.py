"""Benchmark: Microsoft Graph requests per change and per nightly mailbox, counted at the Graph simulator.

Prints figures; asserts nothing. Needs no broker or database:

    .venv/bin/python benchmarks/graph_requests.py --mailboxes 20 --items 200 --edits 40

Reads exactly as the producers do (``sync_mailbox`` over ``GraphSyncReader`` for changes, ``rebase_mailbox`` for the
nightly snapshot, default page size 100) against the simulator over HTTPS with a certificate credential, and counts
the requests the simulator answered (Graph calls and token calls apart):
- first read: the first delta round of every mailbox;
- idle poll: one delta poll of every mailbox with nothing changed (what every ``delta_interval`` costs);
- per change: one item edited at a time in a random mailbox, then one poll of every mailbox (as the producer does);
- nightly: ``rebase`` of every mailbox (the whole window in a new delta round), per mailbox.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Sequence
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.adapters.graph import DeltaResult, DeltaRound, GraphReader, GraphSyncReader  # noqa: E402
from shared.config import BusySettings  # noqa: E402
from shared.domain.busy_rules import sync_window  # noqa: E402
from shared.domain.contracts import CalendarChange, CalendarSnapshot  # noqa: E402
from shared.domain.mailbox_reads import Backend, SyncPosition  # noqa: E402
from shared.logs import configure  # noqa: E402
from shared.mailbox_passes import rebase_mailbox, sync_mailbox  # noqa: E402
from simulators.graph.server import start_server  # noqa: E402
from tests.support.graph import graph_settings, write_app_certificate  # noqa: E402
from tests.support.tls import write_pki  # noqa: E402

CPH = ZoneInfo("Europe/Copenhagen")


class Positions:
    """The store's sync positions, in memory."""

    def __init__(self) -> None:
        self.rows: dict[str, SyncPosition] = {}

    def sync_position(self, mailbox: str) -> SyncPosition | None:
        return self.rows.get(mailbox)

    def save_sync_position(self, mailbox: str, sync_state: str, read_at: datetime, full: bool, backend: Backend = "ews") -> None:
        self.rows[mailbox] = SyncPosition(sync_state, read_at, read_at if full else None, backend)


def at(days: int, hour: int, minute: int = 0) -> str:
    day = (datetime.now(CPH) + timedelta(days=days)).date()
    return f"{day.isoformat()}T{hour:02d}:{minute:02d}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mailboxes", type=int, default=20)
    parser.add_argument("--items", type=int, default=200, help="instances per mailbox in the window (singles and daily series)")
    parser.add_argument("--edits", type=int, default=40)
    parser.add_argument("--page-size", type=int, default=100, help="PLANNERSYNC_GRAPH__MAX_PAGE_SIZE")
    args = parser.parse_args(argv)
    configure("WARNING", "console", service="benchmark")
    rng = random.Random(7)
    tmp = Path(tempfile.mkdtemp(prefix="graph-bench-"))
    pki, app = write_pki(tmp / "pki"), write_app_certificate(tmp / "app")
    mailboxes = [f"caseworker{n:03d}@kommune.example" for n in range(args.mailboxes)]
    sim = start_server(tls=(str(pki.server_cert), str(pki.server_key)), client_certificates=[app.certificate_pem], mailboxes=mailboxes)
    keys: dict[str, list[int]] = {}
    for mailbox in mailboxes:
        keys[mailbox] = []
        series = args.items // 4 // 10                  # a quarter of the instances in daily series of 10
        for n in range(series):
            sim.state.store.add(mailbox, {"start": at(1 + n, 7), "end": at(1 + n, 7, 30), "recurrence": {"pattern": "daily", "count": 10}, "subject": "x"})
        for n in range(args.items - series * 10):
            keys[mailbox].append(sim.state.store.add(mailbox, {"start": at(1 + n % 80, 8 + n % 9), "end": at(1 + n % 80, 8 + n % 9, 45)}).key)
    settings = graph_settings(sim, client_secret=None, client_certificate=app.pem, ca_bundle=pki.ca_cert, max_page_size=args.page_size)
    reader = GraphReader(settings)
    positions = Positions()
    published: list[Any] = []
    policy = BusySettings().policy()

    def publish(messages: Sequence[CalendarChange | CalendarSnapshot]) -> None:
        published.extend(messages)

    def poll_all() -> int:
        changes = 0
        for mailbox in mailboxes:
            now = datetime.now(timezone.utc)
            window = sync_window(now, policy)
            changes += sync_mailbox(mailbox, GraphSyncReader(reader, window), positions, publish, window, now, lambda: "id", backend="graph").published
        return changes

    def counted() -> tuple[int, int]:
        calls = sim.state.call_log()
        return sum(1 for c in calls if c["endpoint"] != "token"), sum(1 for c in calls if c["endpoint"] == "token")

    def section(name: str, run: Any) -> tuple[int, int, Any]:
        sim.state.clear_calls()
        result = run()
        graph_calls, token_calls = counted()
        return graph_calls, token_calls, result

    first, first_tokens, first_changes = section("first", poll_all)
    idle, _, _ = section("idle", poll_all)

    def poll_batched() -> int:
        """What the change producer does with due Graph mailboxes (decision 72): their delta rounds through $batch."""
        now = datetime.now(timezone.utc)
        window = sync_window(now, policy)
        changes = 0
        for start in range(0, len(mailboxes), settings.batch_size):
            rounds = [DeltaRound(m, p.sync_state if (p := positions.sync_position(m)) else None, window) for m in mailboxes[start : start + settings.batch_size]]
            for mailbox, outcome in reader.sync_many(rounds).items():
                if isinstance(outcome, DeltaResult):
                    positions.save_sync_position(mailbox, outcome.delta_link, now, full=False, backend="graph")
                    changes += len(outcome.changes)
        return changes

    batched_idle, _, _ = section("idle, batched", poll_batched)
    batched_http = sum(1 for c in sim.state.call_log() if c["endpoint"] == "batch")

    def edits() -> int:
        found = 0
        for n in range(args.edits):
            mailbox = rng.choice(mailboxes)
            key = rng.choice(keys[mailbox])
            sim.state.store.update(mailbox, key, {"start": at(2 + n % 60, 14), "end": at(2 + n % 60, 15)}, {})
            found += poll_all()
        return found

    edit_calls, _, edit_changes = section("edits", edits)
    polls = args.edits * args.mailboxes

    def nightly() -> int:
        items = 0
        for mailbox in mailboxes:
            now = datetime.now(timezone.utc)
            items += rebase_mailbox(mailbox, reader, positions, publish, sync_window(now, policy), now, 500, "snap")
        return items

    night, _, night_items = section("nightly", nightly)
    sim.stop()

    print(f"Graph requests, {args.mailboxes} mailboxes x {args.items} instances, page size {args.page_size} (counted at the simulator)")
    print(f"  first read     {first} requests for {first_changes} instances ({first / args.mailboxes:.1f} per mailbox), {first_tokens} token request(s)")
    print(f"  idle poll      {idle} requests per poll of {args.mailboxes} mailboxes ({idle / args.mailboxes:.2f} per mailbox)")
    print(f"  idle, $batch   {batched_http} HTTP requests per poll of {args.mailboxes} mailboxes ({batched_http / args.mailboxes:.2f} per mailbox;"
          f" {batched_idle - batched_http} delta reads inside them), batch size {settings.batch_size} (decision 72)")
    print(f"  per change     {edit_calls} requests for {args.edits} edits found as {edit_changes} changes in {polls} mailbox polls:"
          f" {(edit_calls - polls) / args.edits:.2f} beyond the idle polls per change, {edit_calls / args.edits:.1f} per edit including"
          f" a poll of every mailbox")
    print(f"  nightly        {night} requests for {night_items} instances: {night / args.mailboxes:.1f} per mailbox")
    per_hour = 3600 / settings.delta_interval.total_seconds()
    print(f"  polling budget {per_hour:.0f} requests per mailbox per hour at delta_interval {settings.delta_interval.total_seconds():.0f} s"
          f" ({per_hour / 6:.0f} per 10 minutes against Graph's 10,000)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
