"""The fault suite's harness: an independent model of the calendars, a driver of edits, the pipeline as processes
behind TCP proxies, settling, and the accounting against Planner (issue 11, ``tests/e2e/test_fault_suite.py``).

The oracle is the test's own model of every edit it made through the EWS simulator's control API, judged by the
busy rules as the product documents them (README, ``shared/domain/busy_rules.py``'s docstring), not by calling
them: busy when the status is Busy, Tentative or OOF, the item is in the calendar folder and not cancelled; a timed
item is busy from its start to its end; an all-day item from 00:00 of its date to 00:00 of the next day in
Europe/Copenhagen. Every item is a single with a UID unique across mailboxes, so the Planner key is the UID.

The workers reach RabbitMQ through ``broker_proxy`` (a :class:`~tests.support.tcp_proxy.TcpProxy`) and Planner
through ``planner_proxy``, whose target can be switched to a dripping server and back. The accounting reads
Planner's events and its call log, the dead-letter queues through the management API, and the processes.
"""

from __future__ import annotations

import json
import random
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pika
import pytest
import requests

from shared.adapters.store import Store, upgrade
from simulators.exchange.server import RunningExchangeSim
from simulators.planner.server import RunningPlannerSim
from tests.support.processes import WorkerProcess
from tests.support.producers import CPH
from tests.support.tcp_proxy import TcpProxy, _Pair

BUSY = {"Busy", "Tentative", "OOF"}
STAGES = ("change-producer", "transformer", "publisher")
UTC = timezone.utc


# --------------------------------------------------------------------------------------------- the model


@dataclass
class ModelItem:
    start: datetime  # wall clock in Europe/Copenhagen (aware)
    end: datetime
    status: str = "Busy"
    all_day: bool = False
    folder: str = "calendar"
    cancelled: bool = False

    def busy(self) -> tuple[datetime, datetime] | None:
        if self.status not in BUSY or self.folder != "calendar" or self.cancelled:
            return None
        if self.all_day:
            day = self.start.date()
            return (datetime.combine(day, datetime.min.time(), CPH).astimezone(UTC),
                    datetime.combine(day + timedelta(days=1), datetime.min.time(), CPH).astimezone(UTC))
        return self.start.astimezone(UTC), self.end.astimezone(UTC)

    def spec(self, uid: str) -> dict[str, Any]:
        base: dict[str, Any] = {"uid": uid, "status": self.status, "timezone": "Romance Standard Time"}
        if self.all_day:
            return {**base, "start": self.start.date().isoformat(), "all_day": True}
        return {**base, "start": self.start.strftime("%Y-%m-%dT%H:%M"), "end": self.end.strftime("%Y-%m-%dT%H:%M")}


class CalendarModel:
    """What the calendars hold, edit by edit, and the busy times they imply."""

    def __init__(self) -> None:
        self.items: dict[tuple[str, str], ModelItem | None] = {}  # None: hard-deleted

    def expected(self, excluded: set[str] = frozenset()) -> dict[tuple[str, str], tuple[datetime, datetime]]:  # type: ignore[assignment]
        out = {}
        for (mailbox, uid), item in self.items.items():
            busy = item.busy() if item is not None else None
            if busy is not None and uid not in excluded:
                out[(mailbox, uid)] = busy
        return out


class Driver:
    """Random edits of the simulated calendars through the control API, each recorded in the model."""

    def __init__(self, ews: RunningExchangeSim, mailboxes: list[str], seed: int, prefix: str) -> None:
        self.control = ews.control_url
        self.ews = ews
        self.mailboxes = mailboxes
        self.rng = random.Random(seed)
        self.model = CalendarModel()
        self.http = requests.Session()
        self.http.trust_env = False
        self.changes = 0
        self.frozen: set[str] = set()  # uids no longer edited (a scenario refuses them for good)
        self._n = 0
        self._prefix = prefix
        self._day0 = datetime.now(CPH).date() + timedelta(days=2)

    def close(self) -> None:
        self.http.close()

    def _new_item(self) -> ModelItem:
        rng = self.rng
        day = self._day0 + timedelta(days=rng.randrange(0, 45))
        roll = rng.random()
        if roll < 0.06:
            start = datetime.combine(day, datetime.min.time(), CPH)
            return ModelItem(start, start + timedelta(days=1), status="OOF", all_day=True)
        start = datetime(day.year, day.month, day.day, rng.randrange(7, 17), rng.choice((0, 15, 30, 45)), tzinfo=CPH)
        status = "Busy" if roll < 0.75 else "Tentative" if roll < 0.85 else "OOF" if roll < 0.9 else "Free"
        return ModelItem(start, start + timedelta(minutes=rng.choice((15, 30, 45, 60, 90))), status=status)

    def _uid(self) -> str:
        self._n += 1
        return f"{self._prefix}-{self._n}"

    def seed(self, per_mailbox: int) -> int:
        """Items created in one request per mailbox (before the workers start: the first reads find them)."""
        for mailbox in self.mailboxes:
            batch = []
            for _ in range(per_mailbox):
                uid, item = self._uid(), self._new_item()
                batch.append(item.spec(uid))
                self.model.items[(mailbox, uid)] = item
            self.http.post(f"{self.control}/mailboxes/{mailbox}/items", json={"items": batch}, timeout=30).raise_for_status()
            self.changes += len(batch)
        return per_mailbox * len(self.mailboxes)

    def create(self, busy: bool = True) -> tuple[str, str]:
        """One new item in a random mailbox (a busy one when ``busy``); returns its key."""
        mailbox, uid = self.rng.choice(self.mailboxes), self._uid()
        item = self._new_item()
        while busy and item.busy() is None:
            item = self._new_item()
        self.http.post(f"{self.control}/mailboxes/{mailbox}/items", json=item.spec(uid), timeout=10).raise_for_status()
        self.model.items[(mailbox, uid)] = item
        self.changes += 1
        return mailbox, uid

    def next_uid(self) -> str:
        return f"{self._prefix}-{self._n + 1}"

    def lengthen(self, mailbox: str, uid: str) -> None:
        """Make an item five minutes longer (so it travels again); all-day items turn Busy/Tentative instead."""
        item = self.model.items[(mailbox, uid)]
        assert item is not None
        if item.all_day:
            item.status = "Tentative" if item.status != "Tentative" else "Busy"
            body: dict[str, Any] = {"status": item.status}
        else:
            item.end += timedelta(minutes=5)
            body = {"end": item.end.strftime("%Y-%m-%dT%H:%M")}
        self.http.patch(f"{self.control}/mailboxes/{mailbox}/items/{uid}", json=body, timeout=10).raise_for_status()
        self.changes += 1

    def edit(self) -> str:
        """One random edit; returns what it did."""
        rng = self.rng
        mailbox = rng.choice(self.mailboxes)
        live = [uid for (mb, uid), item in self.model.items.items() if mb == mailbox and item is not None and uid not in self.frozen]
        action = rng.choice(["create"] * 4 + ["move"] * 3 + ["resize", "status", "delete", "trash", "restore", "cancel"]) if live else "create"
        base = f"{self.control}/mailboxes/{mailbox}/items"
        if action == "create":
            uid, item = self._uid(), self._new_item()
            self.http.post(base, json=item.spec(uid), timeout=10).raise_for_status()
            self.model.items[(mailbox, uid)] = item
        else:
            uid = rng.choice(live)
            item = self.model.items[(mailbox, uid)]
            assert item is not None
            if action == "restore" and item.folder == "calendar":
                action = "trash"
            if action in ("move", "resize") and item.all_day:
                action = "status"
            if action == "move":
                shift = timedelta(minutes=rng.choice((-90, -30, 15, 45, 120, 24 * 60)))
                item.start, item.end = item.start + shift, item.end + shift
                self.http.patch(f"{base}/{uid}", json={"start": item.start.strftime("%Y-%m-%dT%H:%M"), "end": item.end.strftime("%Y-%m-%dT%H:%M")}, timeout=10).raise_for_status()
            elif action == "resize":
                item.end = item.start + timedelta(minutes=rng.choice((20, 50, 75)))
                self.http.patch(f"{base}/{uid}", json={"end": item.end.strftime("%Y-%m-%dT%H:%M")}, timeout=10).raise_for_status()
            elif action == "status":
                item.status = rng.choice([s for s in ("Busy", "Free", "Tentative", "OOF") if s != item.status])
                self.http.patch(f"{base}/{uid}", json={"status": item.status}, timeout=10).raise_for_status()
            elif action == "delete":
                self.http.delete(f"{base}/{uid}", timeout=10).raise_for_status()
                self.model.items[(mailbox, uid)] = None
            elif action == "trash":
                item.folder = "deleteditems" if item.folder == "calendar" else "calendar"
                self.http.post(f"{base}/{uid}/move", json={"folder": item.folder}, timeout=10).raise_for_status()
            elif action == "restore":
                item.folder = "calendar"
                self.http.post(f"{base}/{uid}/move", json={"folder": "calendar"}, timeout=10).raise_for_status()
            elif action == "cancel":
                item.cancelled = not item.cancelled
                self.http.patch(f"{base}/{uid}", json={"is_cancelled": item.cancelled}, timeout=10).raise_for_status()
        self.changes += 1
        return action

    def ews_fault(self, **spec: Any) -> None:
        self.http.post(f"{self.control}/faults", json=spec, timeout=10).raise_for_status()

    def clear_ews_faults(self) -> None:
        self.http.delete(f"{self.control}/faults", timeout=10).raise_for_status()

    def invalidate_sync_states(self, mailbox: str, timeout: float = 30.0) -> None:
        """Exchange rejects every sync state handed out so far (a mailbox move). Only a state handed out can be
        rejected, so this first waits (``timeout`` at most) for the mailbox's first successful SyncFolderItems: on
        a loaded machine the first reads may still be running when the scenario gets here."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not any(
            call["outcome"] == "NoError" for call in self.ews.state.call_log("SyncFolderItems", mailbox.lower())
        ):
            time.sleep(0.1)   # the poll interval of this bounded wait
        self.http.post(f"{self.control}/mailboxes/{mailbox}/invalidate-sync-states", timeout=10).raise_for_status()


# --------------------------------------------------------------------------------------------- proxies


class SwitchingProxy(TcpProxy):
    """A TcpProxy whose target can be switched without cutting a call in flight.

    ``switch(target)`` sends new connections to ``target`` and closes the old ones only once they are idle (the
    last bytes went server to client, a moment ago): an HTTP call Planner has received is answered, never cut, so
    the switch itself loses no answer. ``switch(target, hard=True)`` cuts at once (leaving a server that never
    answers anyway, such as the dripping one)."""

    def __init__(self, target_port: int) -> None:
        self._last: dict[int, list[float]] = {}  # id(pair) -> [last upstream, last downstream]
        super().__init__(target_port)

    def _pump(self, pair: _Pair, source: Any, sink: Any, upstream: bool) -> None:
        stamps = self._last.setdefault(id(pair), [0.0, 0.0])
        try:
            while not pair.closed.is_set():
                data = source.recv(65536)
                if not data:
                    break
                stamps[0 if upstream else 1] = time.monotonic()
                sink.sendall(data)
        except OSError:
            pass
        pair.close()

    def switch(self, target: tuple[str, int], hard: bool = False, timeout: float = 15.0) -> None:
        self.target = target
        if hard:
            self.cut()
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                pairs = list(self._pairs)
            if not pairs:
                return
            for pair in pairs:
                up, down = self._last.get(id(pair), [0.0, 0.0])
                if down >= up and time.monotonic() - max(up, down) > 0.3:
                    with self._lock:
                        if pair in self._pairs:
                            self._pairs.remove(pair)
                    pair.close()
            time.sleep(0.02)  # the poll interval of this switch deadline
        self.cut()


# --------------------------------------------------------------------------------------------- the broker


@dataclass(frozen=True)
class BrokerAt:
    """Where a RabbitMQ node listens (the shared one, or the soak's own)."""

    port: int = 5672
    management: str = "http://127.0.0.1:15672"

    def connection(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", self.port, connection_attempts=3, retry_delay=1))

    def depths(self, queues: list[str]) -> dict[str, int]:
        """Messages ready in each queue now (AMQP passive declares: exact, unlike the management API's sampled stats)."""
        connection = self.connection()
        try:
            channel = connection.channel()
            return {queue: channel.queue_declare(queue, passive=True).method.message_count for queue in queues}
        finally:
            connection.close()

    def peek(self, queue: str, limit: int = 5000) -> list[dict[str, Any]]:
        """Every message in ``queue`` with its headers, through the management API (requeued, so nothing is taken)."""
        url = f"{self.management}/api/queues/{urllib.parse.quote('/', safe='')}/{urllib.parse.quote(queue, safe='')}/get"
        response = requests.post(url, auth=("guest", "guest"), timeout=30,
                                 json={"count": limit, "ackmode": "ack_requeue_true", "encoding": "base64", "truncate": 2_000_000})
        response.raise_for_status()
        return list(response.json())

    def publish_raw(self, exchange: str, routing_key: str, bodies: list[bytes]) -> None:
        connection = self.connection()
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            for body in bodies:
                channel.basic_publish(exchange, routing_key, body, pika.BasicProperties(delivery_mode=2, content_type="application/json"), mandatory=True)
        finally:
            connection.close()


def poison_bodies(mailbox: str) -> list[bytes]:
    """Malformed messages a foreign or broken producer could put on the calendar exchange (decision 55)."""
    nested = b"[" * 200 + b"]" * 200
    return [
        b"not json at all",
        b"\x00\x01\x02",
        json.dumps({"schema_version": True, "kind": "change", "mailbox": mailbox}).encode(),
        b'{"schema_version": 1, "mailbox": "' + mailbox.encode() + b'", "version": 1' + b"9" * 40 + b"}",
        nested,
        json.dumps({"schema_version": 99, "mailbox": mailbox}).encode(),
        json.dumps({"schema_version": 1, "kind": "change", "mailbox": mailbox, "item": "free text"}).encode(),
    ]


# --------------------------------------------------------------------------------------------- the run


@dataclass
class Tally:
    scenario: str
    changes: int = 0
    faults: int = 0
    expected: int = 0
    found: int = 0
    missing: list[Any] = field(default_factory=list)
    extra: list[Any] = field(default_factory=list)
    wrong: list[Any] = field(default_factory=list)
    duplicate_calls: list[Any] = field(default_factory=list)
    dead_lettered: list[Any] = field(default_factory=list)  # unexpected dead letters
    dead_workers: list[str] = field(default_factory=list)
    settled_in: float = 0.0
    observed: dict[str, int] = field(default_factory=dict)  # each injected fault, as seen taking effect
    histories: dict[str, Any] = field(default_factory=dict)  # Planner calls of the events found wrong (for the failure message)

    def line(self) -> str:
        return (f"fault-suite {self.scenario}: changes={self.changes} faults={self.faults} expected={self.expected} "
                f"found={self.found} missing={len(self.missing)} extra={len(self.extra)} wrong={len(self.wrong)} "
                f"duplicate_calls={len(self.duplicate_calls)} dead_lettered={len(self.dead_lettered)}"
                + (f" dead_workers={len(self.dead_workers)}" if self.dead_workers else "")
                + f" | settled in {self.settled_in:.1f}s; observed " + ",".join(f"{k}:{v}" for k, v in self.observed.items()))

    def problems(self) -> dict[str, Any]:
        return {name: value if isinstance(value, dict) else value[:10] for name, value in (("missing", self.missing), ("extra", self.extra), ("wrong", self.wrong),
                ("duplicate_calls", self.duplicate_calls), ("dead_lettered", self.dead_lettered), ("dead_workers", self.dead_workers),
                ("faults_not_observed", [k for k, v in self.observed.items() if v <= 0]), ("planner_calls_of_suspects", self.histories)) if value}


class Pipeline:
    """The three workers as processes of one test, behind the broker and Planner proxies."""

    def __init__(self, env: dict[str, str], log_dir: Path, processes: list[WorkerProcess]) -> None:
        self.env = env
        self.log_dir = log_dir
        self.processes = processes
        self.workers: dict[str, WorkerProcess] = {}
        self.kills = 0

    def start(self, *names: str) -> None:
        """Start workers by name; ``"transformer#2"`` is a second replica of the transformer (its own log directory)."""
        for name in names or STAGES:
            worker = name.partition("#")[0]
            self.workers[name] = WorkerProcess(worker, self.env, self._log_dir(name)).start()
            self.processes.append(self.workers[name])

    def _log_dir(self, name: str) -> Path:
        replica = name.partition("#")[2]
        if not replica:
            return self.log_dir
        path = self.log_dir / f"replica-{replica}"
        path.mkdir(exist_ok=True)
        return path

    def sigkill(self, name: str) -> None:
        self.workers[name].kill()
        self.kills += 1
        self.start(name)

    def kill(self, name: str) -> None:
        """SIGKILL a worker and leave it dead (a replica that goes away for good); no longer counted by ``dead``."""
        self.workers.pop(name).kill()
        self.kills += 1

    def stop(self, name: str) -> int:
        """SIGTERM a worker (a replica leaving cleanly) and wait for it; returns its exit status."""
        return self.workers.pop(name).stop()

    def pid(self, name: str) -> int:
        process = self.workers[name].process
        assert process is not None
        return process.pid

    def events(self, name: str) -> dict[str, int]:
        """How often each log event occurs in the worker's log (every incarnation writes to the same file)."""
        counts: dict[str, int] = {}
        path = self._log_dir(name) / f"{name.partition('#')[0]}.log"
        for line in (path.read_text(errors="replace").splitlines() if path.exists() else []):
            if line.startswith("{"):
                try:
                    event = json.loads(line).get("event")
                except ValueError:
                    continue
                counts[event] = counts.get(event, 0) + 1
        return counts

    def stop_all(self) -> None:
        for proc in self.workers.values():
            if proc.process is not None and proc.process.poll() is None:
                proc.process.kill()
                proc.process.wait(10)

    def dead(self) -> list[str]:
        out = []
        for name, proc in self.workers.items():
            assert proc.process is not None
            if proc.process.poll() is not None:
                out.append(f"{name} exited {proc.process.returncode}")
            elif "worker_crashed" in proc.log():
                out.append(f"{name} logged worker_crashed")
        return out


def pipeline_env(base: dict[str, str], broker_proxy: TcpProxy | None, planner_url: str, ews: RunningExchangeSim, broker: BrokerAt, **extra: str) -> dict[str, str]:
    """The workers' environment; without ``broker_proxy`` they reach ``broker`` directly (or the nodes ``extra`` names)."""
    return {
        **base,
        "PLANNERSYNC_BROKER__PORT": str(broker_proxy.port if broker_proxy is not None else broker.port),
        "PLANNERSYNC_BROKER__MANAGEMENT_URL": broker.management,
        "PLANNERSYNC_BROKER__RECONNECT_MAX_DELAY": "1s",
        "PLANNERSYNC_BROKER__HEARTBEAT": "5",
        "PLANNERSYNC_PLANNER__ENDPOINT": planner_url,
        "PLANNERSYNC_PLANNER__LINGER": "50ms",
        "PLANNERSYNC_PLANNER__TIMEOUT": "2s",
        "PLANNERSYNC_PLANNER__OUTAGE_COOLDOWN": "1s",
        # the production ladder (10s,1m,5m,30m,2h,2h,2h: 6.6 h) scaled like the suite's "hour" (a few seconds)
        "PLANNERSYNC_RETRY__LADDER": "200ms,500ms,1s,2s,4s,8s,8s",
        "PLANNERSYNC_EXCHANGE__ENDPOINT": ews.url,
        "PLANNERSYNC_EXCHANGE__USERNAME": "svc",
        "PLANNERSYNC_EXCHANGE__PASSWORD": "pw",
        "PLANNERSYNC_EXCHANGE__STREAM_MINUTES": "1",
        "PLANNERSYNC_EXCHANGE__STREAM_SILENCE_TIMEOUT": "3s",
        "PLANNERSYNC_EXCHANGE__SAFETY_SYNC_INTERVAL": "20s",
        "PLANNERSYNC_EXCHANGE__UNSUBSCRIBED_POLL_INTERVAL": "2s",
        "PLANNERSYNC_EXCHANGE__MAILBOX_RELOAD_INTERVAL": "500ms",
        "PLANNERSYNC_EXCHANGE__TRANSIENT_RETRY": "200ms",
        "PLANNERSYNC_EXCHANGE__UNAVAILABLE_RETRY": "300ms",
        "PLANNERSYNC_EXCHANGE__FAILURE_BACKOFF_MAX": "2s",
        **extra,
    }


def enrol(database_url: str, mailboxes: list[str]) -> None:
    store = Store.connect(database_url)
    upgrade(store.engine)
    for mailbox in mailboxes:
        store.add_mailbox(mailbox)
    store.engine.dispose()


def planner_held(planner: RunningPlannerSim, mailboxes: list[str] | None = None) -> dict[tuple[str, str], tuple[datetime, datetime]]:
    """Planner's events by (mailbox, origin id); only ``mailboxes``' when given (another jobcentre shares Planner)."""
    wanted = None if mailboxes is None else {m.lower() for m in mailboxes}
    return {(event.email.lower(), event.origin_id): (event.start, event.end) for event in planner.state.events()
            if wanted is None or event.email.lower() in wanted}


def settle(planner: RunningPlannerSim, broker: BrokerAt, work_queues: list[str], expected: dict[Any, Any], deadline: float, quiet_for: float = 2.0,
           mailboxes: list[str] | None = None) -> float:
    """Wait until the pipeline is quiet: work and retry queues empty and Planner's events unchanged for ``quiet_for``
    seconds, and Planner matching ``expected`` (or ``deadline`` seconds gone, then the accounting says what is off)."""
    began = time.monotonic()
    last: Any = None
    stable_since = time.monotonic()
    while True:
        held = planner_held(planner, mailboxes)
        if held != last:
            last, stable_since = held, time.monotonic()
        now = time.monotonic()
        if now - stable_since >= quiet_for and not any(broker.depths(work_queues).values()):
            if held == expected or now - began > deadline:
                return now - began
        if now - began > deadline + 30:  # queues never empty: account anyway
            return now - began
        time.sleep(0.25)  # the poll interval of this settle deadline


def duplicate_calls(planner: RunningPlannerSim) -> list[str]:
    """Creates Planner answered "already exists" (8), and second successful creates of an event without a delete
    between: the same busy time sent as new twice. Origin ids are unique across mailboxes in this suite."""
    held: set[str] = set()
    out = []
    for call in planner.state.calls():
        if call.outcome != "ok":
            continue
        for origin_id, code in zip(call.origin_ids, call.codes):
            if call.operation == "CreateEvents":
                if code == 8 or (code == 0 and origin_id in held):
                    out.append(f"{call.time.isoformat()} CreateEvents {origin_id} code {code}")
                if code == 0:
                    held.add(origin_id)
            elif call.operation == "DeleteEvents" and code == 0:
                held.discard(origin_id)
    return out


def account(tally: Tally, driver: Driver, planner: RunningPlannerSim, broker: BrokerAt, dead_letter_queues: list[str],
            pipeline: Pipeline, allowed_dead_letters: dict[str, set[bytes] | set[str]] | None = None, excluded: set[str] = frozenset()) -> Tally:  # type: ignore[assignment]
    """Fill in the tally: Planner against the model, the call log, the dead-letter queues, the processes.

    ``allowed_dead_letters`` maps a dead-letter queue to the bodies (bytes) or origin ids (str, found in the body)
    that belong there; anything else there is counted. ``excluded`` uids are expected absent (refused for good)."""
    expected = driver.model.expected(set(excluded))
    held = planner_held(planner, driver.mailboxes)
    tally.changes, tally.expected, tally.found = driver.changes, len(expected), len(held)
    tally.missing = sorted(set(expected) - set(held))
    tally.extra = sorted(set(held) - set(expected))
    tally.wrong = sorted(key for key in set(expected) & set(held) if held[key] != expected[key])
    tally.duplicate_calls = duplicate_calls(planner)
    allowed = allowed_dead_letters or {}
    import base64

    for queue in dead_letter_queues:
        for message in broker.peek(queue):
            body = base64.b64decode(message["payload"])
            reason = (message.get("properties", {}).get("headers") or {}).get("x-plannersync-reason") or (message.get("properties", {}).get("headers") or {})
            ok = allowed.get(queue, set())
            if body in ok or any(isinstance(token, str) and token.encode() in body for token in ok):
                tally.observed[f"dead_lettered_on_purpose:{queue.rsplit('.', 2)[-2]}"] = tally.observed.get(f"dead_lettered_on_purpose:{queue.rsplit('.', 2)[-2]}", 0) + 1
                continue
            tally.dead_lettered.append(f"{queue}: {body[:120]!r} {str(reason)[:300]}")
    for queue, tokens in allowed.items():
        if tokens:
            tally.observed.setdefault(f"dead_lettered_on_purpose:{queue.rsplit('.', 2)[-2]}", 0)
    tally.dead_workers = pipeline.dead()
    suspects = [uid for _mb, uid in tally.extra[:3] + tally.missing[:3] + tally.wrong[:3]] + [line.split()[2] for line in tally.duplicate_calls[:3]]
    for uid in dict.fromkeys(suspects):
        history = [(call.time.strftime("%H:%M:%S.%f")[:-3], call.operation, dict(zip(call.origin_ids, call.codes)).get(uid), call.outcome)
                   for call in planner.state.calls() if uid in call.origin_ids]
        tally.histories[uid] = history
    tally.faults = sum(value for key, value in tally.observed.items() if not key.startswith("dead_lettered_on_purpose"))
    return tally


class Report:
    """Prints each scenario's line on the terminal at once (also under -q) and again in the summary."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        capture = self.config.pluginmanager.getplugin("capturemanager")
        reporter = self.config.pluginmanager.getplugin("terminalreporter")
        if capture is not None and reporter is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line("")
                reporter.write_line(line)
        else:  # pragma: no cover - run without the terminal plugin
            sys.__stdout__.write(line + "\n")

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.lines:
            terminalreporter.section("fault suite")
            for line in self.lines:
                terminalreporter.write_line(line)


def next_weekday(day: date) -> date:
    return day + timedelta(days=(7 - day.weekday()) % 7)
