"""Benchmark: each consuming stage alone on the real broker. Prints figures; asserts nothing.

    .venv/bin/python benchmarks/stages.py --messages 5000

- transformer: N calendar changes (50 mailboxes) waiting in its queue → time to transform them all
  (decode, busy rules, store, publish with confirms, ack);
- publisher: N busy-time states waiting in its queue → time until the Planner simulator holds them all
  (batching per mailbox, SOAP over HTTP to the simulator, receipts stored).
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

import pika  # noqa: E402

from shared.broker.publishing import Outgoing, Publisher  # noqa: E402
from shared.broker.topology import delete_everything, ensure_policies, from_settings  # noqa: E402
from shared.config import load_settings  # noqa: E402
from shared.domain.contracts import CalendarChange, CalendarItem  # noqa: E402
from shared.logs import configure  # noqa: E402


def _depth(queue: str) -> int:
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=5000)
    args = parser.parse_args()
    configure("WARNING", "console", service="benchmark")
    from simulators.planner.server import start_server

    workdir = Path(tempfile.mkdtemp(prefix="plannersync-bench-"))
    planner = start_server()
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    settings = load_settings(
        environ={},
        broker={"prefix": prefix},
        database={"url": f"sqlite:///{workdir / 'state.db'}"},
        planner={"endpoint": planner.url},
        status={"health_dir": str(workdir / "health")},
    )
    topology = from_settings(settings.broker, settings.retry)
    ensure_policies(topology, settings.broker.management_url, settings.broker.user, settings.broker.password.get_secret_value())
    now = datetime.now(timezone.utc)
    mailboxes = [f"cw{n:02d}@jobcenter.example" for n in range(50)]
    try:
        producer = Publisher(settings.broker, topology)
        t0 = time.monotonic()
        for n in range(args.messages):
            mailbox = mailboxes[n % len(mailboxes)]
            start = now + timedelta(days=1 + n % 60, hours=n % 8)
            item = CalendarItem(item_id=f"item-{n}", uid=f"uid-{n}", start=start, end=start + timedelta(minutes=45), free_busy="Busy", time_zone="Romance Standard Time")
            change = CalendarChange(correlation_id=uuid.uuid4().hex, mailbox=mailbox, observed_at=now, change="upsert", item_id=item.item_id, item=item)
            producer.publish(Outgoing(topology.calendar_exchange, topology.change_key(mailbox), change))
        publish_rate = args.messages / (time.monotonic() - t0)

        from services.transformer.worker import build as build_transformer

        transformer = build_transformer(settings)
        t0 = time.monotonic()
        thread = threading.Thread(target=transformer.run, daemon=True)
        thread.start()
        queue = topology.stage("transformer").work_queue()
        while (_depth(queue) > 0 or transformer.counters.handled < args.messages) and time.monotonic() - t0 < 600:
            time.sleep(0.05)
        transform_s = time.monotonic() - t0
        transformer.stop()
        thread.join(30)

        from services.publisher.worker import build as build_publisher

        publisher = build_publisher(settings)
        t0 = time.monotonic()
        thread = threading.Thread(target=publisher.run, daemon=True)
        thread.start()
        while sum(len(planner.state.events(m)) for m in mailboxes) < args.messages and time.monotonic() - t0 < 600:
            time.sleep(0.05)
        publish_s = time.monotonic() - t0
        calls = planner.state.calls()
        publisher.stop()
        thread.join(30)

        print(f"plannersync stage benchmark, {args.messages} messages, 50 mailboxes, SQLite store, one process per stage")
        print(f"  producer publish with confirms: {publish_rate:.0f} msg/s")
        print(f"  transformer: {args.messages} changes in {transform_s:.1f} s = {args.messages / transform_s:.0f} msg/s")
        print(f"  publisher:   {args.messages} busy times into Planner in {publish_s:.1f} s = {args.messages / publish_s:.0f} events/s "
              f"({len(calls)} SOAP calls, {args.messages / max(1, len(calls)):.1f} events per call)")
        producer.close()
        return 0
    finally:
        planner.stop()
        delete_everything(topology, settings.broker.management_url, settings.broker.user, settings.broker.password.get_secret_value())


if __name__ == "__main__":
    raise SystemExit(main())
