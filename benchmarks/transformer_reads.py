"""Benchmark: what the transformer reads per batch, every decided row of its mailboxes or only what its changes need.

Prints figures; asserts nothing.

    .venv/bin/python benchmarks/transformer_reads.py --mailboxes 2000 --rows 200 --batch 50

A SQLite store (and PostgreSQL on 127.0.0.1 with ``--postgres``) holding ``--rows`` decided rows for each of
``--mailboxes`` mailboxes (singles, series occurrences, tombstones), then batches of ``--batch`` changes, each in
another mailbox (steady edits spread over many caseworkers), read both ways: ``Store.desired_many`` (every row of
the batch's mailboxes, as before decision 97) and ``Store.desired_for`` with ``reads_for`` (decision 97). Milliseconds
per batch, rows read per batch.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.adapters.store import DesiredWrite, Store, upgrade  # noqa: E402
from shared.config import BusySettings  # noqa: E402
from shared.domain.contracts import CalendarChange, CalendarItem, Interval  # noqa: E402
from shared.domain.transform_core import SNAPSHOT_MARKER, DesiredRecord, deleted_record_key, reads_for  # noqa: E402


def fill(store: Store, mailboxes: list[str], rows: int) -> None:
    start = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=1)
    writes = []
    for mailbox in mailboxes:
        records = [DesiredRecord(SNAPSHOT_MARKER, None, None, 1, Interval(start=start, end=start + timedelta(days=90)), "snap")]
        for n in range(rows - 1):
            at = start + timedelta(hours=n)
            if n % 10 == 9:      # a tombstone of a deleted item
                records.append(DesiredRecord(deleted_record_key(f"id-{n}"), f"u{n}", f"id-{n}", 2, None))
            elif n % 10 >= 6:    # occurrences of a series
                records.append(DesiredRecord(f"series{n // 10}${n}", f"series{n // 10}", f"id-series{n // 10}", 2, Interval(start=at, end=at + timedelta(hours=1))))
            else:
                records.append(DesiredRecord(f"u{n}", f"u{n}", f"id-{n}", 2, Interval(start=at, end=at + timedelta(hours=1))))
        writes.append(DesiredWrite(mailbox, records))
        if len(writes) == 50:
            store.save_desired_many(writes)
            writes = []
    if writes:
        store.save_desired_many(writes)


def run(url: str, mailbox_count: int, rows: int, batch: int, rounds: int) -> str:
    store = Store.connect(url)
    upgrade(store.engine)
    mailboxes = [f"cw{n:04d}@jobcenter.example" for n in range(mailbox_count)]
    began = time.monotonic()
    fill(store, mailboxes, rows)
    filled = time.monotonic() - began
    policy = BusySettings().policy()
    rng = random.Random(1)
    whole_ms, needed_ms, whole_rows, needed_rows = [], [], [], []
    for _ in range(rounds):
        chosen = rng.sample(mailboxes, batch)
        changes = {}
        for mailbox in chosen:
            n = rng.randrange(rows - 1)
            at = datetime.now(timezone.utc) + timedelta(days=2)
            item = CalendarItem(item_id=f"id-{n}", uid=f"u{n}", start=at, end=at + timedelta(hours=1), free_busy="Busy")
            changes[mailbox] = [CalendarChange(correlation_id=uuid.uuid4().hex, mailbox=mailbox, observed_at=datetime.now(timezone.utc),
                                               change="upsert", item_id=item.item_id, item=item)]
        t = time.perf_counter()
        every = store.desired_many(chosen)
        whole_ms.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        needed = store.desired_for({mailbox: reads_for(messages, policy) for mailbox, messages in changes.items()})
        needed_ms.append((time.perf_counter() - t) * 1000)
        whole_rows.append(sum(len(v) for v in every.values()))
        needed_rows.append(sum(len(v) for v in needed.values()))
    store.engine.dispose()
    return (f"{url.split(':')[0]}: {mailbox_count} mailboxes x {rows} rows (filled in {filled:.0f} s), batches of {batch} changes in {batch} mailboxes: "
            f"every row {statistics.median(whole_ms):.1f} ms ({statistics.median(whole_rows):.0f} rows), "
            f"only what the changes need {statistics.median(needed_ms):.1f} ms ({statistics.median(needed_rows):.0f} rows), median of {rounds}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mailboxes", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--postgres", default="", help="a PostgreSQL URL (an empty database) to measure as well")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        print(run(f"sqlite:///{directory}/state.db", args.mailboxes, args.rows, args.batch, args.rounds), flush=True)
    if args.postgres:
        print(run(args.postgres, args.mailboxes, args.rows, args.batch, args.rounds), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
