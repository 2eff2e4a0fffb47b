"""Benchmark: steady edits in Exchange → Planner, at a given rate over many mailboxes, with series edits among them.

Prints figures; asserts nothing. Run on a quiet machine with the local RabbitMQ:

    .venv/bin/python benchmarks/edit_latency.py --mailboxes 2000 --items 150 --rates 30,40,50 --seconds 30 --series-share 0.1

On a fresh prefix and SQLite store, with the EWS and Planner simulators in this process and the workers as processes
(`plannersync run change-producer transformer publisher`, or `--together`: `plannersync run all`):
- every mailbox gets ``--items`` busy appointments, ``--series`` of them weekly series of 12 occurrences, the rest
  singles; the pipeline loads them all into Planner first (not timed here: `benchmarks/scale.py` times the load);
- then ``--rate`` edits per second for ``--seconds`` (or one such phase per rate of ``--rates``, each waiting for the
  queues to empty before the next), each in a random mailbox, each item edited once: a single moved
  by half an hour, or, for ``--series-share`` of the edits, one occurrence of a series moved (an exception: the
  change producer reads the series master and its occurrences);
- the edits are made by a separate process (16 threads), so this process's CPU is the two simulators', and each
  phase prints the CPU milliseconds per edit of every worker process, of the simulators and of a local broker;
- an edit's latency is from just before the Exchange save to the first Planner call that names the event's key
  (the Planner simulator records when each call arrives): pipeline time, Exchange's own notification included;
- ``--idle S`` then waits S seconds with nothing happening and makes ``--cold-edits`` edits a second apart: the first
  edits after an idle spell (issue 12: as fast as a hot one).
"""

from __future__ import annotations

import argparse
import bisect
import gc
import json
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plannersync.local_workers import start_workers, stop_workers  # noqa: E402
from shared.broker.connection import connection_parameters  # noqa: E402
from shared.broker.topology import Topology, delete_everything  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.domain.busy_rules import ORIGIN_TIME_FORMAT  # noqa: E402
from shared.logs import configure  # noqa: E402
from simulators.exchange.server import start_server as start_exchange  # noqa: E402
from simulators.planner.server import start_server as start_planner  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from rig import prepare, worker_env  # noqa: E402
from scale import CPH, _peak_rss_mb, _queues_empty, _wait  # noqa: E402

SERIES_OCCURRENCES = 12


@dataclass
class Edit:
    mailbox: str
    origin_id: str
    series: bool
    at: datetime          # just before the save in Exchange (UTC)
    arrived: float | None = None   # seconds until the first Planner call naming the key


def _populate(control: str, mailboxes: list[str], items: int, series: int, rng: random.Random) -> dict[str, dict[str, list[Any]]]:
    """Each mailbox's singles (uid, start) and series (uid, first start), as created in the EWS simulator."""
    first = datetime.now(CPH).date() + timedelta(days=1)
    made: dict[str, dict[str, list[Any]]] = {}
    with requests.Session() as http:
        for mailbox in mailboxes:
            specs, singles, serieses = [], [], []
            for n in range(items):
                day = first + timedelta(days=rng.randrange(0, 60))
                start = datetime(day.year, day.month, day.day, rng.randrange(7, 15), rng.choice((0, 15, 30)), tzinfo=CPH)
                uid = f"e-{mailbox.split('@')[0]}-{n}"
                spec: dict[str, Any] = {"uid": uid, "start": start.strftime("%Y-%m-%dT%H:%M"),
                                        "end": (start + timedelta(minutes=45)).strftime("%Y-%m-%dT%H:%M"), "timezone": "Romance Standard Time"}
                if n < series:
                    spec["recurrence"] = {"pattern": "weekly", "count": SERIES_OCCURRENCES}
                    serieses.append((uid, start))
                else:
                    singles.append((uid, start))
                specs.append(spec)
            http.post(f"{control}/mailboxes/{mailbox}/items", json={"items": specs}, timeout=120).raise_for_status()
            made[mailbox] = {"singles": singles, "series": serieses}
    return made


@dataclass
class Planned:
    edit: Edit
    path: str              # under the control URL
    body: dict[str, Any]


def _plan(mailbox: str, made: dict[str, list[Any]], series: bool, rng: random.Random) -> Planned | None:
    """One edit of an item not edited before; None when the mailbox has none of that kind left."""
    pool = made["series"] if series else made["singles"]
    if not pool:
        return None
    uid, start = pool.pop(rng.randrange(len(pool)))
    if series:
        # an occurrence after the first and well inside the sync window (an index counts from 1)
        inside = [k for k in range(2, SERIES_OCCURRENCES + 1) if start + timedelta(weeks=k - 1) < datetime.now(CPH) + timedelta(days=80)]
        if not inside:
            return None
        index = rng.choice(inside)
        original = start + timedelta(weeks=index - 1)     # wall-clock time in Copenhagen, across DST as Exchange does
        moved = original + timedelta(minutes=30)
        origin_id = f"{uid}${original.strftime(ORIGIN_TIME_FORMAT)}"
        return Planned(Edit(mailbox, origin_id, True, datetime.now(timezone.utc)), f"/mailboxes/{mailbox}/items/{uid}/occurrences",
                       {"index": index, "start": moved.strftime("%Y-%m-%dT%H:%M"), "end": (moved + timedelta(minutes=45)).strftime("%Y-%m-%dT%H:%M")})
    moved = start + timedelta(minutes=30)
    return Planned(Edit(mailbox, uid, False, datetime.now(timezone.utc)), f"/mailboxes/{mailbox}/items/{uid}",
                   {"start": moved.strftime("%Y-%m-%dT%H:%M"), "end": (moved + timedelta(minutes=45)).strftime("%Y-%m-%dT%H:%M")})


class _Tap:
    """Copies of what the change producer and the transformer publish while the edits are made (a queue of this
    benchmark's own on each topic exchange): when each read began (a change's ``observed_at``), when its change and its
    busy-time state reached the broker, so a latency can be taken apart by stage."""

    def __init__(self, settings: Settings, topology: Topology) -> None:
        self.changes: dict[tuple[str, str], list[tuple[datetime, datetime]]] = {}   # (mailbox, uid) -> (observed_at, seen)
        self.states: dict[str, list[datetime]] = {}   # origin_id -> seen
        self._stopping = threading.Event()
        self._parameters = connection_parameters(settings.broker, "benchmark-tap")
        self._topology = topology
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="tap", daemon=True)
        self._thread.start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        import pika

        from shared.domain.contracts import BusyTimeState, CalendarChange, decode

        connection = pika.BlockingConnection(self._parameters)
        channel = connection.channel()
        queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        channel.queue_bind(queue, self._topology.calendar_exchange, "change.#")
        channel.queue_bind(queue, self._topology.busy_exchange, "#")
        ready.set()
        while not self._stopping.is_set():
            for method, _properties, body in channel.consume(queue, auto_ack=True, inactivity_timeout=0.2):
                if method is None:
                    break
                seen = datetime.now(timezone.utc)
                try:
                    message = decode(body)
                except Exception:  # noqa: BLE001 - not ours to judge here
                    continue
                if isinstance(message, CalendarChange) and message.item is not None and message.item.uid:
                    self.changes.setdefault((message.mailbox.lower(), message.item.uid), []).append((message.observed_at, seen))
                elif isinstance(message, BusyTimeState):
                    self.states.setdefault(message.origin_id, []).append(seen)
        connection.close()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(10)

    def stages(self, edits: list[Edit]) -> str:
        """p50 and p95 of: edit until its read began, until the change was published, until the state was published."""
        began, changed, stated = [], [], []
        for edit in edits:
            uid = edit.origin_id.split("$")[0]
            after = [(o, s) for o, s in self.changes.get((edit.mailbox.lower(), uid), []) if s >= edit.at]
            if after:
                observed, seen = min(after, key=lambda pair: pair[1])
                began.append((observed - edit.at).total_seconds())
                changed.append((seen - edit.at).total_seconds())
            states = [s for s in self.states.get(edit.origin_id, []) if s >= edit.at]
            if states:
                stated.append((min(states) - edit.at).total_seconds())

        def p(values: list[float]) -> str:
            if not values:
                return "-"
            ordered = sorted(values)
            return f"p50 {statistics.median(ordered):.2f} s, p95 {ordered[min(len(ordered) - 1, int(round(0.95 * len(ordered))) - 1)]:.2f} s ({len(ordered)})"
        return f"read began {p(began)}; change published {p(changed)}; busy time published {p(stated)}"

    def late_reads(self, edits: list[Edit], reads: list[dict[str, Any]]) -> str:
        """For the edits whose read began more than 5 s after them: was the mailbox read in between (a read that did
        not see the change) or not at all (the read waited)?"""
        by_mailbox: dict[str, list[datetime]] = {}
        for call in reads:
            if call.get("started") and call.get("mailbox"):
                by_mailbox.setdefault(call["mailbox"].lower(), []).append(datetime.fromisoformat(call["started"]))
        late = []
        for edit in edits:
            uid = edit.origin_id.split("$")[0]
            after = [(o, seen) for o, seen in self.changes.get((edit.mailbox.lower(), uid), []) if seen >= edit.at]
            if not after:
                continue
            observed, _ = min(after, key=lambda pair: pair[1])
            delay = (observed - edit.at).total_seconds()
            if delay > 5:
                calls = [t for t in by_mailbox.get(edit.mailbox.lower(), []) if edit.at + timedelta(seconds=0.5) < t < observed - timedelta(seconds=0.5)]
                late.append((edit, delay, calls))
        return _late_reads_summary(late)


def _late_reads_summary(late: list[tuple[Edit, float, list[datetime]]]) -> str:
    if not late:
        return "no read began more than 5 s after its edit"
    between = sum(1 for _, _, calls in late if calls)
    offsets = sorted(round(delay) for _, delay, _ in late)
    return (f"{len(late)} reads began more than 5 s after their edit (delays {offsets[0]}..{offsets[-1]} s); for {between} of them "
            f"the mailbox was read in between without the change being published")


def _send(control: str, requests_: list[tuple[str, dict[str, Any]]], rate: float) -> tuple[list[float], float]:
    """In the editor process: PATCH each edit at its time (``rate`` a second, on 16 threads, as people save
    independently); each save's start (epoch seconds), and how late the latest one started."""
    local = threading.local()
    began = time.monotonic()
    late = 0.0
    at = [0.0] * len(requests_)

    def one(n: int) -> None:
        if not hasattr(local, "http"):
            local.http = requests.Session()
        path, body = requests_[n]
        at[n] = time.time()
        local.http.patch(f"{control}{path}", json=body, timeout=30).raise_for_status()

    with ThreadPoolExecutor(max_workers=16) as pool:
        for n in range(len(requests_)):
            wait = began + n / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            else:
                late = max(late, -wait)
            pool.submit(one, n)
    return at, late


def _edits(editor: ProcessPoolExecutor, control: str, planned: list[Planned], rate: float) -> tuple[list[Edit], float]:
    """The planned edits made by the editor process (not this one, which runs both simulators); their save times."""
    at, late = editor.submit(_send, control, [(p.path, p.body) for p in planned], rate).result()
    for plan, started in zip(planned, at):
        plan.edit.at = datetime.fromtimestamp(started, timezone.utc)
    return [p.edit for p in planned], late


def _per_edit(calls: list[dict[str, Any]], edits: int) -> str:
    """The EWS requests made while the phase ran and its queues emptied, per edit, in all and by operation (issue 12:
    at most 2 per change, amortised). The notification stream itself is one long request and not counted."""
    counts: dict[str, int] = {}
    for call in calls:
        if call["operation"] != "GetStreamingEvents":
            counts[call["operation"]] = counts.get(call["operation"], 0) + 1
    by_operation = ", ".join(f"{operation} {n / max(1, edits):.2f}" for operation, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"{sum(counts.values()) / max(1, edits):.2f} ({by_operation})"


def _cpu_s(pid: int) -> float:
    """User plus system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _arrivals(edits: list[Edit], calls: list[Any]) -> None:
    """Each edit's latency: the first Create/Update call naming its key at or after the edit."""
    by_key: dict[str, list[datetime]] = {}
    for call in calls:
        if call.operation in ("CreateEvents", "UpdateEvents"):
            for origin_id in call.origin_ids:
                by_key.setdefault(origin_id, []).append(call.time)
    for edit in edits:
        times = sorted(by_key.get(edit.origin_id, []))
        at = bisect.bisect_left(times, edit.at)
        edit.arrived = (times[at] - edit.at).total_seconds() if at < len(times) else None


def _summary(edits: list[Edit]) -> str:
    arrived = sorted(e.arrived for e in edits if e.arrived is not None)
    if not arrived:
        return f"{len(edits)} edits, none arrived"
    p95 = arrived[min(len(arrived) - 1, int(round(0.95 * len(arrived))) - 1)]
    missing = len(edits) - len(arrived)
    return (f"{len(edits)} edits: p50 {statistics.median(arrived):.2f} s, p95 {p95:.2f} s, max {arrived[-1]:.2f} s"
            + (f", {missing} not arrived" if missing else ""))


def _thirds(edits: list[Edit]) -> str:
    """p50 latency of the edits made in each third of the phase: growing means a stage falls behind the rate."""
    ordered = sorted(edits, key=lambda e: e.at)
    parts = [ordered[n * len(ordered) // 3 : (n + 1) * len(ordered) // 3] for n in range(3)]
    return " / ".join(f"{statistics.median(a):.2f} s" if (a := [e.arrived for e in part if e.arrived is not None]) else "-" for part in parts)


class _DepthSampler:
    """The transformer's and publisher's queue depths (ready + unacked), every second while the edits are made."""

    def __init__(self, settings: Settings, topology: Topology) -> None:
        self.deepest = {"transformer": 0, "publisher": 0}
        self._stopping = threading.Event()
        base = settings.broker.management_url.rstrip("/")
        self._auth = (settings.broker.user, settings.broker.password.get_secret_value())
        vhost = quote(settings.broker.vhost, safe="")
        self._urls = {stage: f"{base}/api/queues/{vhost}/{quote(topology.stage(stage).work_queue(), safe='')}" for stage in self.deepest}
        self._thread = threading.Thread(target=self._run, name="depths", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(1.0):
            for stage, url in self._urls.items():
                try:
                    queue = requests.get(url, auth=self._auth, timeout=5).json()
                except requests.RequestException:
                    continue
                self.deepest[stage] = max(self.deepest[stage], int(queue.get("messages", 0)))

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(10)

    def summary(self) -> str:
        return ", ".join(f"{stage} {depth}" for stage, depth in self.deepest.items())


class _GcClock:
    """Wall time this process spends in the cyclic garbage collector (``gc.callbacks``): with the simulators holding
    every mailbox's items, a full collection walks all of them."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started


_GC = _GcClock()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mailboxes", type=int, default=2000)
    parser.add_argument("--items", type=int, default=150, help="busy appointments per mailbox")
    parser.add_argument("--series", type=int, default=5, help="of them weekly series (12 occurrences each)")
    parser.add_argument("--rate", type=float, default=50, help="edits per second")
    parser.add_argument("--rates", default="", help="several steady phases one after the other, e.g. 30,40,50 (instead of --rate)")
    parser.add_argument("--seconds", type=float, default=60, help="of each steady phase")
    parser.add_argument("--series-share", type=float, default=0.1, help="share of the edits that move a series occurrence")
    parser.add_argument("--idle", type=float, default=0, help="seconds of nothing before the cold edits")
    parser.add_argument("--cold-edits", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per phase")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a worker setting for this run, e.g. --set EXCHANGE__SYNC_WORKERS=8 (PLANNERSYNC_ is added)")
    parser.add_argument("--together", action="store_true", help="every worker in one process (plannersync run all)")
    args = parser.parse_args()
    configure("WARNING", "console", service="benchmark")

    prefix = f"blat{uuid.uuid4().hex[:6]}"
    workdir = Path(tempfile.mkdtemp(prefix="plannersync-latency-"))
    mailboxes = [f"cw{n:04d}@jobcenter.example" for n in range(args.mailboxes)]
    exchange = start_exchange(users={"svc": "pw"}, mailboxes=mailboxes)
    planner = start_planner()
    rng = random.Random(7)
    made = _populate(exchange.control_url, mailboxes, args.items, args.series, rng)
    # every mailbox on a streaming subscription, as runbooks/install.md asks beyond 600 caseworkers (200 a connection)
    env = worker_env(prefix, workdir, planner.url, exchange.url, PLANNERSYNC_EXCHANGE__STREAMING_CONNECTIONS=str(min(20, -(-args.mailboxes // 200))),
                     **dict(("PLANNERSYNC_" + name, value) for name, _, value in (setting.partition("=") for setting in args.set)))
    settings, topology = prepare(env, mailboxes)
    workers = start_workers(["all"] if args.together else ["change-producer", "transformer", "publisher"], env, workdir)
    store_kind = settings.database_url().split(":", 1)[0].split("+", 1)[0]
    print(f"plannersync edit latency ({os.cpu_count()} cores; broker, simulators and workers on this machine; {store_kind} store; "
          f"{'every worker in one process' if args.together else 'one process per worker'}): {args.mailboxes} mailboxes x {args.items} items "
          f"({args.series} weekly series each), {args.rates or f'{args.rate:g}'} edits/s for {args.seconds:g} s each, {args.series_share:.0%} of them series occurrences"
          + (f"; settings {', '.join(args.set)}" if args.set else ""), flush=True)
    try:
        counted = [0]

        def settled() -> bool:   # Planner's event count unchanged for a while and both queues empty
            now = planner.state.health()["events"]
            same, counted[0] = now == counted[0] and now > 0, now
            return same and _queues_empty(settings, topology)

        load = _wait(settled, args.timeout, quiet=5.0)
        producer_health = [json.loads(path.read_text()) for path in (workdir / "health").glob("*.json") if "subscribed" in path.read_text()]
        subscribed = producer_health[0]["subscribed"] if producer_health else "?"
        print(f"loaded: {counted[0]} busy times in Planner after {load:.0f} s; {subscribed} of {args.mailboxes} mailboxes on a streaming subscription", flush=True)

        broker = [int(pid) for pid in subprocess.run(["pgrep", "-x", "beam.smp"], capture_output=True, text=True).stdout.split()[:1]]   # a local RabbitMQ
        editor = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        editor.submit(time.sleep, 0).result()   # started before the clock runs
        for rate in (float(r) for r in args.rates.split(",")) if args.rates else [args.rate]:
            wanted = int(args.seconds * rate)
            planned = [p for _ in range(wanted) if (p := _plan(m := rng.choice(mailboxes), made[m], rng.random() < args.series_share, rng)) is not None]
            cpu_before = {pid: _cpu_s(pid) for pid in [proc.pid for proc in workers] + broker}
            own_before, gc_before = time.process_time(), _GC.seconds
            depths, tap = _DepthSampler(settings, topology), _Tap(settings, topology)
            calls_before = len(exchange.state.call_log())
            edits, late = _edits(editor, exchange.control_url, planned, rate)
            depths.stop()
            _wait(lambda: _queues_empty(settings, topology), args.timeout, quiet=3.0)
            tap.stop()
            ews_calls = exchange.state.call_log()[calls_before:]
            per_edit = {str(proc.args[-1]): (_cpu_s(proc.pid) - cpu_before[proc.pid]) * 1000 / max(1, len(edits)) for proc in workers}
            per_edit["simulators (this process)"] = (time.process_time() - own_before) * 1000 / max(1, len(edits))
            per_edit["of which their garbage collection"] = (_GC.seconds - gc_before) * 1000 / max(1, len(edits))
            for pid in broker:
                per_edit["broker (beam.smp)"] = (_cpu_s(pid) - cpu_before[pid]) * 1000 / max(1, len(edits))
            _arrivals(edits, planner.state.calls())
            print(f"steady at {rate:g}/s: {_summary(edits)} ({wanted} planned; the latest started {late:.2f} s late)")
            print(f"  singles: {_summary([e for e in edits if not e.series])}")
            print(f"  series occurrences: {_summary([e for e in edits if e.series])}")
            print(f"  by third of the phase (when the edit was made), p50: {_thirds(edits)}; deepest queue while editing: {depths.summary()}")
            print(f"  from the edit: {tap.stages(edits)}")
            print(f"  {tap.late_reads(edits, exchange.state.call_log('SyncFolderItems'))}")
            print(f"  EWS requests per edit: {_per_edit(ews_calls, len(edits))}")
            print("  CPU ms per edit: " + ", ".join(f"{name} {ms:.1f}" for name, ms in per_edit.items()), flush=True)

        if args.idle:
            time.sleep(args.idle)
            planned = [p for _ in range(args.cold_edits) if (p := _plan(m := rng.choice(mailboxes), made[m], False, rng)) is not None]
            cold, _ = _edits(editor, exchange.control_url, planned, 1.0)
            _wait(lambda: _queues_empty(settings, topology), args.timeout, quiet=3.0)
            _arrivals(cold, planner.state.calls())
            print(f"after {args.idle:.0f} s idle: {_summary(cold)}; first {cold[0].arrived if cold else float('nan'):.2f} s")
        editor.shutdown()
        peaks = {str(proc.args[-1]): _peak_rss_mb(proc.pid) for proc in workers}
        print("peak RSS MB: " + ", ".join(f"{name} {mb:.0f}" for name, mb in peaks.items()) + f"; together {sum(peaks.values()):.0f}")
        return 0
    finally:
        stop_workers(workers)
        exchange.stop()
        planner.stop()
        delete_everything(topology, settings.broker.management_url, settings.broker.user, settings.broker.password.get_secret_value())


if __name__ == "__main__":
    threading.current_thread().name = "benchmark"
    raise SystemExit(main())
