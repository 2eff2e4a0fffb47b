"""Benchmark: the transformer on nightly snapshots. Prints figures; asserts nothing.

    .venv/bin/python benchmarks/snapshot_transform.py --mailboxes 20 --items 1000

Two rounds of snapshots of the same calendars: the first creates every busy time (one BusyTimeState
published per item), the second is the ordinary night (nothing changed: nothing published, every key
marked as seen).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.transformer.worker import build  # noqa: E402
from shared.broker.publishing import Outgoing, Publisher  # noqa: E402
from shared.broker.topology import delete_everything, ensure_policies, from_settings  # noqa: E402
from shared.config import load_settings  # noqa: E402
from shared.domain.contracts import CalendarItem, Interval  # noqa: E402
from shared.domain.mailbox_reads import snapshot_parts  # noqa: E402
from shared.logs import configure  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mailboxes", type=int, default=20)
    parser.add_argument("--items", type=int, default=1000)
    args = parser.parse_args()
    configure("WARNING", "console", service="benchmark")
    workdir = tempfile.mkdtemp(prefix="plannersync-bench-")
    settings = load_settings(environ={}, broker={"prefix": f"bsnap{uuid.uuid4().hex[:6]}"}, database={"url": f"sqlite:///{workdir}/s.db"}, status={"health_dir": workdir})
    topology = from_settings(settings.broker, settings.retry)
    secret = settings.broker.password.get_secret_value()
    ensure_policies(topology, settings.broker.management_url, settings.broker.user, secret)
    now = datetime.now(timezone.utc)
    window = Interval(start=now, end=now + timedelta(days=90))

    def publish_round() -> int:
        producer = Publisher(settings.broker, topology)
        count = 0
        for m in range(args.mailboxes):
            mailbox = f"cw{m}@jobcenter.example"
            items = [
                CalendarItem(item_id=f"i{m}-{n}", uid=f"u{m}-{n}", start=now + timedelta(days=1 + n % 80, hours=n % 9),
                             end=now + timedelta(days=1 + n % 80, hours=n % 9, minutes=30), free_busy="Busy", time_zone="Romance Standard Time")
                for n in range(args.items)
            ]
            for part in snapshot_parts(mailbox, items, window, datetime.now(timezone.utc), settings.exchange.snapshot_part_size, uuid.uuid4().hex):
                producer.publish(Outgoing(topology.calendar_exchange, topology.snapshot_key(mailbox), part))
                count += 1
        producer.close()
        return count

    transformer = build(settings)
    thread = threading.Thread(target=transformer.run, daemon=True)
    thread.start()
    total = args.mailboxes * args.items
    print(f"transformer on snapshots: {args.mailboxes} mailboxes x {args.items} items, SQLite store")
    try:
        for label in ("first night (everything new)", "next night (nothing changed)"):
            base, started = transformer.counters.handled, time.monotonic()
            parts = publish_round()
            while transformer.counters.handled < base + parts and time.monotonic() - started < 1200:
                time.sleep(0.05)
            took = time.monotonic() - started
            print(f"  {label}: {total} items in {parts} parts in {took:.1f} s = {total / took:.0f} items/s")
    finally:
        transformer.stop()
        thread.join(30)
        delete_everything(topology, settings.broker.management_url, settings.broker.user, secret)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
