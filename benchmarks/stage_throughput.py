"""Benchmark: each stage alone, beside the broker's raw rate measured in the same run. Prints figures; asserts nothing.

    .venv/bin/python benchmarks/stage_throughput.py --messages 5000 [--only raw,producer,transformer,publisher]

- raw publish: N persistent messages of a CalendarChange's size (pika alone, no plannersync code) into a quorum
  queue, mandatory, with a window of up to ``--window`` unconfirmed publishes;
- raw consume: the same N messages with prefetch ``--prefetch`` and one multiple-ack per ``--prefetch // 2``;
- producer: N CalendarChange messages (``--mailboxes``, 50 by default) through the project's ``Publisher``;
- transformer: N calendar changes waiting in its queue → time until it has handled them all (decode, busy rules,
  store, publish with confirms, ack), once on SQLite and once on PostgreSQL (127.0.0.1, a throwaway database);
- publisher: N busy-time states waiting in its queue → time until it has handled them all (batching per mailbox,
  receipts stored; SQLite), once into the in-process Planner simulator (SOAP over HTTP, zeep on both ends in this
  one process) and once into an instant Planner (the simulator's state called directly: the stage's own cost); with
  PostgreSQL among ``--databases``, into an instant Planner once more with its receipts in PostgreSQL.

``--held K`` gives the transformer's store K decided keys a mailbox before it starts, and the publisher's (into an
instant Planner) K events a mailbox held in Planner, with the database's statistics of them (``ANALYZE``), as a running
installation has; without it the store starts empty, and PostgreSQL plans every
lookup of a new table without statistics as a read of the whole table.

``--replicas N`` runs the transformer, and the publisher into an instant Planner, a second time as N replicas, each a
process of its own on the same queue (decision 89: a transformer's batch claims its mailboxes, a publisher's its keys),
from the moment every replica is built until all N messages are handled. Each publisher replica has an instant Planner
of its own; the messages' keys are all new, so each is one create wherever it goes.

The table gives each stage's rate and its share of the slower of the two raw rates (a stage both consumes and
publishes). Figures go to docs/benchmarks.md, never into assertions.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pika  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from shared.broker.publishing import Outgoing, Publisher  # noqa: E402
from shared.broker.topology import Topology, delete_everything, ensure_policies, from_settings  # noqa: E402
from shared.config import Settings, load_settings  # noqa: E402
from shared.domain.contracts import BusyTimeState, CalendarChange, CalendarItem, Interval, encode  # noqa: E402
from shared.logs import configure  # noqa: E402

MAILBOXES = [f"cw{n:04d}@jobcenter.example" for n in range(50)]  # --mailboxes sets how many
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
CPU_NOTES: list[str] = []  # the process's CPU time per message handled, per consumer run, in run order
DEADLINE_S = 110.0  # one stage never runs longer than this (keep each run short on a shared machine)


def changes(count: int, now: datetime) -> list[CalendarChange]:
    out = []
    for n in range(count):
        mailbox = MAILBOXES[n % len(MAILBOXES)]
        start = now + timedelta(days=1 + n % 60, hours=n % 8)
        item = CalendarItem(item_id=f"AAMkAG-item-{n:08d}-" + "x" * 100, uid=f"040000008200E00074C5B7101A82E008{n:032d}", start=start,
                            end=start + timedelta(minutes=45), free_busy="Busy", time_zone="Romance Standard Time")
        out.append(CalendarChange(correlation_id=uuid.uuid4().hex, mailbox=mailbox, observed_at=now, change="upsert", item_id=item.item_id, item=item))
    return out


def states(count: int, now: datetime) -> list[BusyTimeState]:
    version = int(now.timestamp() * 1_000_000)
    out = []
    for n in range(count):
        start = now + timedelta(days=1 + n % 60, hours=n % 8)
        out.append(BusyTimeState(correlation_id=uuid.uuid4().hex, mailbox=MAILBOXES[n % len(MAILBOXES)], origin_id=f"uid-{n:08d}-{start:%Y%m%d}",
                                 version=version, interval=Interval(start=start, end=start + timedelta(minutes=45))))
    return out


def hold(database_url: str, per_mailbox: int, now: datetime) -> None:
    """Give the transformer's store what a running installation's holds: ``per_mailbox`` decided keys in every mailbox
    (none of them a key the benchmark's changes touch), and the database's statistics of them (``ANALYZE``). A new
    table has no statistics until PostgreSQL's autovacuum first analyses it, and its planner then reads the whole table
    for every lookup by key."""
    from shared.adapters.store import DesiredWrite, open_store
    from shared.domain.transform_core import DesiredRecord

    store = open_store(database_url, auto_upgrade=True)
    version = int(now.timestamp() * 1_000_000)
    writes = []
    for mailbox in MAILBOXES:
        rows = []
        for n in range(per_mailbox):
            start = now + timedelta(days=1 + n % 60, hours=9)
            rows.append(DesiredRecord(f"held-{n:06d}-{start:%Y%m%d}", f"held-uid-{n:06d}", f"held-item-{n:06d}", version,
                                      Interval(start=start, end=start + timedelta(minutes=30))))
        writes.append(DesiredWrite(mailbox, rows, None, None))
    for first in range(0, len(writes), 50):
        store.save_desired_many(writes[first : first + 50])
    with store.engine.begin() as conn:
        conn.execute(text("ANALYZE"))
    store.engine.dispose()


def hold_delivered(database_url: str, per_mailbox: int, now: datetime) -> None:
    """``hold`` for the publisher's store: ``per_mailbox`` events every mailbox already holds in Planner (none of them a
    key the benchmark's messages touch), and the database's statistics of them."""
    from shared.adapters.store import delivered_events, open_store

    store = open_store(database_url, auto_upgrade=True)
    version = int(now.timestamp() * 1_000_000)
    rows = [{"mailbox": mailbox.lower(), "origin_id": f"held-{n:06d}", "version": version, "present": True, "start_at": now, "end_at": now,
             "planner_event_id": str(uuid.uuid4()), "planner_originated": False, "updated_at": now}
            for mailbox in MAILBOXES for n in range(per_mailbox)]
    with store.engine.begin() as conn:
        for first in range(0, len(rows), 5000):
            conn.execute(delivered_events.insert(), rows[first : first + 5000])
    with store.engine.begin() as conn:
        conn.execute(text("ANALYZE"))
    store.engine.dispose()


def _connection() -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", heartbeat=60))


def raw_rates(bodies: list[bytes], window: int, prefetch: int) -> tuple[float, float]:
    """The broker's own pace with pika alone: windowed confirms, then prefetch and multiple-ack."""
    queue = f"bench-raw-{uuid.uuid4().hex[:8]}"
    connection = _connection()
    channel = connection.channel()
    channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    confirmed = [0]

    def on_confirm(frame: Any) -> None:
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            raise RuntimeError("raw publish nacked")
        confirmed[0] = method.delivery_tag if method.multiple else max(confirmed[0], method.delivery_tag)

    ready = [False]
    channel._impl.confirm_delivery(ack_nack_callback=on_confirm, callback=lambda _frame: ready.__setitem__(0, True))  # windowed: pika's own mode waits per publish
    while not ready[0]:
        connection.process_data_events(time_limit=0.01)
    properties = pika.BasicProperties(delivery_mode=2, content_type="application/json")
    t0 = time.monotonic()
    for n, body in enumerate(bodies, start=1):
        channel._impl.basic_publish("", queue, body, properties, mandatory=True)  # queued: written by the I/O loop below
        while n - confirmed[0] >= window:
            connection.process_data_events(time_limit=0.001)
    while confirmed[0] < len(bodies):
        connection.process_data_events(time_limit=0.001)
    publish_rate = len(bodies) / (time.monotonic() - t0)

    channel.basic_qos(prefetch_count=prefetch)
    got = [0]
    every = max(1, prefetch // 2)

    def on_message(ch: Any, method: Any, _properties: Any, _body: bytes) -> None:
        got[0] += 1
        if got[0] % every == 0 or got[0] == len(bodies):
            ch.basic_ack(method.delivery_tag, multiple=True)

    t0 = time.monotonic()
    tag = channel.basic_consume(queue, on_message)
    while got[0] < len(bodies) and time.monotonic() - t0 < DEADLINE_S:
        connection.process_data_events(time_limit=0.01)
    consume_rate = got[0] / (time.monotonic() - t0)
    channel.basic_cancel(tag)
    channel.queue_delete(queue)
    connection.close()
    return publish_rate, consume_rate


def publish_all(producer: Publisher, outgoing: list[Outgoing]) -> None:
    many = getattr(producer, "publish_many", None)
    if many is not None:  # batched confirms (a window of 500), where the Publisher offers them
        many(outgoing)
    else:
        for out in outgoing:
            producer.publish(out)


def wait_until(done: Callable[[], bool]) -> float:
    t0 = time.monotonic()
    while not done() and time.monotonic() - t0 < DEADLINE_S:
        time.sleep(0.01)
    return time.monotonic() - t0


def run_consumer(consumer: Any, count: int, profile: bool) -> float:
    """Run a stage's consumer until it has settled ``count`` messages; its rate of messages handled.

    With ``profile``, the loop runs on this thread under cProfile (stage.prof) and the handler, which runs on its
    own thread one batch at a time, under a second one (stage-handler.prof).
    """
    settled = lambda: consumer.counters.handled + consumer.counters.dead_lettered >= count  # noqa: E731
    t0 = time.monotonic()
    if not profile:
        cpu0 = time.process_time()
        thread = threading.Thread(target=consumer.run, daemon=True)
        thread.start()
        wait_until(settled)
        seconds = time.monotonic() - t0
        cpu = time.process_time() - cpu0
        consumer.stop()
        thread.join(30)
        CPU_NOTES.append(f"{1e6 * cpu / max(1, consumer.counters.handled):.0f} µs CPU/msg, {100 * cpu / seconds:.0f} % of one core")
        return consumer.counters.handled / seconds
    import cProfile

    loop_profile, handler_profile = cProfile.Profile(), cProfile.Profile()
    handler = consumer.handler

    def profiled_handler(batch: Any) -> Any:
        handler_profile.enable()
        try:
            return handler(batch)
        finally:
            handler_profile.disable()

    consumer.handler = profiled_handler
    finished: list[float] = []

    def watch() -> None:
        wait_until(settled)
        finished.append(time.monotonic() - t0)
        consumer.stop()

    threading.Thread(target=watch, daemon=True).start()
    loop_profile.runcall(consumer.run)
    loop_profile.dump_stats("stage.prof")
    handler_profile.dump_stats("stage-handler.prof")
    return consumer.counters.handled / finished[0]


def make_settings(prefix: str, database_url: str, planner_url: str, workdir: Path) -> Settings:
    return load_settings(
        environ={},
        broker={"prefix": prefix},
        database={"url": database_url},
        planner={"endpoint": planner_url},
        status={"health_dir": str(workdir / "health")},
    )


def changes_out(topology: Topology, messages: list[CalendarChange]) -> list[Outgoing]:
    """The changes as the change producer publishes them, to the transformer's queue."""
    return [Outgoing(topology.calendar_exchange, topology.change_key(m.mailbox), m) for m in messages]


def states_out(topology: Topology, messages: list[BusyTimeState]) -> list[Outgoing]:
    """The busy-time states as the transformer publishes them, to the publisher's queue."""
    return [Outgoing(topology.busy_exchange, topology.busy_key(m.mailbox), m) for m in messages]


def publish_to(settings: Settings, topology: Topology, outgoing: list[Outgoing]) -> None:
    producer = Publisher(settings.broker, topology)
    publish_all(producer, outgoing)
    producer.close()


@contextmanager
def postgres_databases(count: int) -> Iterator[list[str]]:
    """``count`` new PostgreSQL databases' URLs, dropped afterwards: the same messages decided again in one database
    would find every key decided at their version already, and publish and write nothing."""
    names = [f"bench_{uuid.uuid4().hex[:8]}" for _ in range(count)]
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for name in names:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield [f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}" for name in names]
    finally:
        with admin.connect() as conn:
            for name in names:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def run_transformer(settings: Settings, topology: Topology, messages: list[CalendarChange], profile: bool = False) -> float:
    from services.transformer.worker import build as build_transformer

    publish_to(settings, topology, changes_out(topology, messages))
    return run_consumer(build_transformer(settings), len(messages), profile)


def build_instant_publisher(settings: Settings, topology: Topology) -> tuple[Any, Any]:
    """The publisher into an instant Planner: the simulator's own state, called without HTTP or XML
    (tests/support/planner_model.py, decision 60), so what is left is the stage's own cost. The consumer and the model."""
    from services.publisher.worker import HANDLER_DEADLINE, DaemonPool, OutageGuard, PublisherDeps, handle
    from shared.adapters.planner_client import PlannerEvent
    from shared.adapters.store import open_store
    from shared.broker.consume_loop import Consumer, ConsumerOptions
    from tests.support.planner_model import PlannerModel

    model = PlannerModel()
    guard = OutageGuard(settings.planner.outage_after_failures, settings.planner.outage_cooldown.total_seconds())
    deps = PublisherDeps(settings, open_store(settings.database_url(), True), model, guard, PlannerEvent,
                         DaemonPool(settings.planner.parallel_calls, "planner-call"))
    size = settings.planner.max_batch_messages
    options = ConsumerOptions(prefetch=2 * size, batch_size=size, linger=settings.planner.linger, handler_deadline=HANDLER_DEADLINE)
    return Consumer(settings.broker, topology, topology.stage("publisher"), lambda batch: handle(batch, deps), options), model


def _replica(stage: str, prefix: str, database_url: str, planner_url: str, workdir: str, ready: Any, go: Any, stop: Any, handled: Any,
             cpu: Any) -> None:
    """One replica of ``stage`` (transformer, or publisher into an instant Planner of its own), in a process of its own:
    built, then run from ``go`` to ``stop``, its count shared."""
    configure("WARNING", "console", service="benchmark")
    settings = make_settings(prefix, database_url, planner_url, Path(workdir))
    if stage == "transformer":
        from services.transformer.worker import build as build_transformer

        consumer = build_transformer(settings)
    else:
        consumer, _ = build_instant_publisher(settings, from_settings(settings.broker, settings.retry))
    ready.release()
    go.wait()
    cpu0 = time.process_time()
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    while not stop.is_set():
        handled.value = consumer.counters.handled + consumer.counters.dead_lettered
        time.sleep(0.005)
    cpu.value = time.process_time() - cpu0
    consumer.stop()
    thread.join(30)


def run_replicas(stage: str, settings: Settings, outgoing: list[Outgoing], replicas: int, workdir: Path) -> float:
    """``stage`` as ``replicas`` processes on one queue, ``outgoing`` waiting in it: the messages handled a second, all
    replicas together, from the moment every replica is built."""
    publish_to(settings, from_settings(settings.broker, settings.retry), outgoing)
    spawn = multiprocessing.get_context("spawn")
    ready, go, stop = spawn.Semaphore(0), spawn.Event(), spawn.Event()
    counts = [spawn.Value("i", 0) for _ in range(replicas)]
    cpus = [spawn.Value("d", 0.0) for _ in range(replicas)]
    procs = [spawn.Process(target=_replica, args=(stage, settings.broker.prefix, settings.database_url(), settings.planner.endpoint, str(workdir),
                                                  ready, go, stop, counts[i], cpus[i]), daemon=True) for i in range(replicas)]
    for proc in procs:
        proc.start()
    for _ in procs:
        if not ready.acquire(timeout=120):
            raise SystemExit("a replica was not built within 120 s")
    t0 = time.monotonic()
    go.set()
    wait_until(lambda: sum(c.value for c in counts) >= len(outgoing))
    seconds = time.monotonic() - t0
    stop.set()
    for proc in procs:
        proc.join(60)
    handled = int(sum(c.value for c in counts))
    cpu = float(sum(c.value for c in cpus))
    CPU_NOTES.append(f"{1e6 * cpu / max(1, handled):.0f} µs CPU/msg, {100 * cpu / seconds:.0f} % of one core; "
                     f"handled per replica: {', '.join(str(c.value) for c in counts)}")
    return handled / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--window", type=int, default=500, help="raw publish: unconfirmed publishes at most")
    parser.add_argument("--prefetch", type=int, default=500, help="raw consume: prefetch")
    parser.add_argument("--only", default="raw,producer,transformer,publisher")
    parser.add_argument("--mailboxes", type=int, default=50, help="the messages go round this many mailboxes")
    parser.add_argument("--databases", default="sqlite,postgresql", help="transformer: which stores to run it on; "
                        "publisher: with postgresql, also into an instant Planner on PostgreSQL")
    parser.add_argument("--held", type=int, default=0, help="transformer and publisher into an instant Planner: the store already "
                        "holds this many keys a mailbox (decided, or held in Planner), and the database's statistics of them, as a running "
                        "installation's does")
    parser.add_argument("--replicas", type=int, default=0, help="transformer and publisher (into instant Planners): also run each as "
                        "this many replica processes on one queue")
    parser.add_argument("--profile", default="", help="cProfile this stage (producer, transformer, publisher, publisher-instant) into stage.prof (+ stage-handler.prof); "
                        "the transformer on both databases keeps the PostgreSQL run's")
    args = parser.parse_args()
    only = set(args.only.split(","))
    MAILBOXES[:] = [f"cw{n:04d}@jobcenter.example" for n in range(args.mailboxes)]
    configure("WARNING", "console", service="benchmark")
    from simulators.planner.server import start_server

    now = datetime.now(timezone.utc)
    n = args.messages
    sample = changes(n, now)
    rows: list[tuple[str, float, str]] = []
    raw_publish = raw_consume = 0.0
    body = len(encode(sample[0]))
    print(f"stage throughput, {n} messages (CalendarChange {body} bytes), {len(MAILBOXES)} mailboxes, one process per stage, 2 cores shared")
    if "raw" in only:
        raw_publish, raw_consume = raw_rates([encode(m) for m in sample], args.window, args.prefetch)
        print(f"  raw publish (window {args.window}):               {raw_publish:8.0f} msg/s")
        print(f"  raw consume (prefetch {args.prefetch}, multiple-ack): {raw_consume:8.0f} msg/s")

    workdir = Path(tempfile.mkdtemp(prefix="plannersync-bench-"))
    planner = start_server()

    def profiled(stage: str, fn: Callable[[], float]) -> float:
        if stage != args.profile:
            return fn()
        import cProfile

        profiler = cProfile.Profile()
        try:
            return float(profiler.runcall(fn))
        finally:
            profiler.dump_stats("stage.prof")

    cleanups: list[Callable[[], None]] = []
    try:
        def fresh(database_url: str) -> tuple[Settings, Topology]:
            settings = make_settings(f"bench{uuid.uuid4().hex[:6]}", database_url, planner.url, workdir)
            topology = from_settings(settings.broker, settings.retry)
            credentials = (settings.broker.management_url, settings.broker.user, settings.broker.password.get_secret_value())
            ensure_policies(topology, *credentials)
            cleanups.append(lambda: delete_everything(topology, *credentials))
            return settings, topology

        if "producer" in only:
            settings, topology = fresh(f"sqlite:///{workdir / 'producer.db'}")
            producer = Publisher(settings.broker, topology)
            outgoing = changes_out(topology, sample)

            def produce() -> float:
                t0 = time.monotonic()
                publish_all(producer, outgoing)
                return n / (time.monotonic() - t0)

            rows.append(("producer publish (Publisher, confirmed)", profiled("producer", produce), CPU_NOTES.pop() if CPU_NOTES else ""))
            producer.close()

        databases = set(args.databases.split(","))
        held = f" ({args.held} held a mailbox)" if args.held else ""
        if "transformer" in only and "sqlite" in databases:
            settings, topology = fresh(f"sqlite:///{workdir / 'transformer.db'}")
            if args.held:
                hold(settings.database_url(), args.held, now)
            rows.append((f"transformer, SQLite{held}", run_transformer(settings, topology, sample, args.profile == "transformer"), CPU_NOTES.pop() if CPU_NOTES else ""))
            if args.replicas:
                settings, topology = fresh(f"sqlite:///{workdir / 'transformer-replicas.db'}")
                if args.held:
                    hold(settings.database_url(), args.held, now)
                rate = run_replicas("transformer", settings, changes_out(topology, changes(n, now)), args.replicas, workdir)
                rows.append((f"transformer, SQLite{held}, {args.replicas} replicas", rate, CPU_NOTES.pop() if CPU_NOTES else ""))
        if "transformer" in only and "postgresql" in databases:
            with postgres_databases(2 if args.replicas else 1) as urls:
                settings, topology = fresh(urls[0])
                if args.held:
                    hold(settings.database_url(), args.held, now)
                rows.append((f"transformer, PostgreSQL{held}", run_transformer(settings, topology, changes(n, now), args.profile == "transformer"),
                             CPU_NOTES.pop() if CPU_NOTES else ""))
                if args.replicas:
                    settings, topology = fresh(urls[1])
                    if args.held:
                        hold(settings.database_url(), args.held, now)
                    rate = run_replicas("transformer", settings, changes_out(topology, changes(n, now)), args.replicas, workdir)
                    rows.append((f"transformer, PostgreSQL{held}, {args.replicas} replicas", rate, CPU_NOTES.pop() if CPU_NOTES else ""))

        if "publisher" in only:
            from services.publisher.worker import build as build_publisher

            settings, topology = fresh(f"sqlite:///{workdir / 'publisher.db'}")
            publish_to(settings, topology, states_out(topology, states(n, now)))
            planner.state.reset()
            if args.profile.startswith("publisher"):  # the parallel Planner calls inline, so the handler's profile sees them
                import services.publisher.worker as publisher_worker

                publisher_worker.DaemonPool.map = lambda self, fn, items: iter([fn(item) for item in items])  # type: ignore[method-assign]
            rate = run_consumer(build_publisher(settings), n, args.profile == "publisher")
            calls = len(planner.state.calls())
            rows.append((f"publisher into the Planner simulator ({calls} SOAP calls)", rate, CPU_NOTES.pop() if CPU_NOTES else ""))

            # The same stage with an instant Planner (build_instant_publisher): what is left is the stage's own cost;
            # once with its receipts in SQLite and, with postgresql among --databases, once in PostgreSQL
            with postgres_databases(1 if "postgresql" in databases else 0) as urls:
                for name, url in [("", f"sqlite:///{workdir / 'publisher-instant.db'}"), *((", PostgreSQL", u) for u in urls)]:
                    settings, topology = fresh(url)
                    if args.held:
                        hold_delivered(settings.database_url(), args.held, now)
                    publish_to(settings, topology, states_out(topology, states(n, now)))
                    consumer, model = build_instant_publisher(settings, topology)
                    rate = run_consumer(consumer, n, args.profile == "publisher-instant" and not name)
                    rows.append((f"publisher into an instant Planner{name}{held} ({len(model.calls)} calls)", rate, CPU_NOTES.pop() if CPU_NOTES else ""))
            if args.replicas:   # each replica has an instant Planner of its own: every key is new, so each is one create
                settings, topology = fresh(f"sqlite:///{workdir / 'publisher-replicas.db'}")
                if args.held:
                    hold_delivered(settings.database_url(), args.held, now)
                rate = run_replicas("publisher", settings, states_out(topology, states(n, now)), args.replicas, workdir)
                rows.append((f"publisher into instant Planners{held}, {args.replicas} replicas", rate, CPU_NOTES.pop() if CPU_NOTES else ""))
    finally:
        planner.stop()
        for cleanup in cleanups:
            cleanup()

    raw = min(raw_publish, raw_consume)
    for name, rate, cpu in rows:
        share = f"{100 * rate / raw:5.1f} % of raw" if raw else ""
        print(f"  {name:<76} {rate:8.0f} msg/s  {share}  {cpu}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
