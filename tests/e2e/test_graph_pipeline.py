"""Exchange Online through Graph, end to end: calendars on the Graph simulator (sharing one calendar store with the EWS
simulator) → change producer → transformer → publisher → Planner simulator.

- one representative calendar set ends with exactly the Planner state the EWS path gives (same OriginSystemIdentifiers);
- a mailbox switched from EWS to Graph gives Planner no call for its unchanged events, and an edit after the switch arrives;
- a hybrid pipeline (two mailboxes on each backend) delivers edits from all four;
- subject, body, location, organizer and attendee names (canaries) are in no message, log line or database row.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import exchangelib.protocol
import pika
import pytest
import requests
import sqlalchemy

from plannersync.workers import build_worker
from shared.adapters.store import Store, upgrade
from shared.broker.topology import Topology
from shared.config import Settings, load_settings
from simulators.exchange.server import RunningExchangeSim
from simulators.exchange.server import start_server as start_ews
from simulators.graph.server import RunningGraphSim
from simulators.graph.server import start_server as start_graph
from simulators.planner.server import RunningPlannerSim
from simulators.planner.server import start_server as start_planner
from tests.e2e.test_exchange_to_planner import dst_weekends
from tests.support.broker import BROKER_HOST
from tests.support.graph import AppCertificate, graph_env, with_graph
from tests.support.processes import PLANNERSYNC, WorkerProcess
from tests.support.producers import CPH, producer_settings
from tests.support.tls import ThrowawayPKI
from tests.support.waiting import wait_for

ANNE, BO, CARL, DORTE = "anne@kommune.example", "bo@kommune.example", "carl@kommune.example", "dorte@kommune.example"
OUTLOOK_UID = "040000008200E00074C5B7101A82E00800000000A0A742E5073DDA01000000000000000010000000998F8D5FA0E3F44D9B1C7C0B6E1A1B2C"
PLANNER_ORGANIZER = "planner@jobcenter.example"


@pytest.fixture
def ews() -> Iterator[RunningExchangeSim]:
    sim = start_ews(users={"svc": "pw"}, minute_seconds=2.0, keepalive_seconds=0.5, mailboxes=[ANNE, BO, CARL, DORTE])
    yield sim
    sim.stop()
    exchangelib.protocol.close_connections()


@pytest.fixture
def graph(ews: RunningExchangeSim, pki: ThrowawayPKI, app: AppCertificate) -> Iterator[RunningGraphSim]:
    sim = start_graph(tls=(str(pki.server_cert), str(pki.server_key)), store=ews.state.store, client_certificates=[app.certificate_pem])
    yield sim
    sim.stop()


def pipeline_settings(settings: Settings, ews: RunningExchangeSim, graph: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate,
                      planner: RunningPlannerSim, database: Path) -> Settings:
    base = with_graph(producer_settings(settings, ews), graph, app, pki.ca_cert)
    dumped = base.model_dump(mode="python", exclude={"planner", "busy", "database"})
    return load_settings(environ={}, **{
        **dumped,
        "database": {"url": f"sqlite:///{database}"},
        "planner": {"endpoint": planner.url, "linger": "50ms"},
        "busy": {"window_months": 24, "planner_organizers": [PLANNER_ORGANIZER], "planner_uid_patterns": ["^PLANNER-"]},
    })


class Pipeline:
    """Change producer, transformer and publisher in this process, each on its own thread."""

    def __init__(self, settings: Settings) -> None:
        self.workers = [build_worker(name, settings) for name in ("change-producer", "transformer", "publisher")]
        self.threads = [threading.Thread(target=w.run, daemon=True) for w in self.workers]

    def __enter__(self) -> Pipeline:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for worker in self.workers:
            worker.stop()
        for thread in self.threads:
            thread.join(30)


def at(day: date, hour: int, minute: int = 0) -> str:
    return f"{day.isoformat()}T{hour:02d}:{minute:02d}"


def seed_calendar(sim: RunningExchangeSim, mailbox: str) -> tuple[set[str], dict[str, Any]]:
    """A representative calendar: the origin ids the EWS path must deliver, and handles for later edits."""
    store = sim.state.store
    today = datetime.now(CPH).date()
    spring, autumn = dst_weekends(today)
    monday = today + timedelta(days=7 - today.weekday())
    wanted: set[str] = set()
    single = store.add(mailbox, {"uid": f"single-{uuid.uuid4().hex[:6]}@ext.example", "start": at(today + timedelta(days=2), 9),
                                 "end": at(today + timedelta(days=2), 10), "subject": "CANARY"})
    wanted.add(single.uid)
    private = store.add(mailbox, {"start": at(today + timedelta(days=3), 14), "end": at(today + timedelta(days=3), 15), "status": "Tentative",
                                  "sensitivity": "Private"})
    wanted.add(private.uid)
    series = store.add(mailbox, {"uid": OUTLOOK_UID, "start": at(monday, 9), "end": at(monday, 9, 30),
                                 "recurrence": {"pattern": "weekly", "days_of_week": ["Monday"], "count": 6}})
    week = [monday + timedelta(weeks=w) for w in range(6)]
    store.modify_occurrence(mailbox, series.key, {"original_start": at(week[1], 9), "start": at(week[1], 11), "end": at(week[1], 11, 45)})   # moved
    store.delete_occurrence(mailbox, series.key, {"original_start": at(week[2], 9)})                                                   # cancelled
    store.modify_occurrence(mailbox, series.key, {"original_start": at(week[3], 9), "status": "Tentative"})                             # exception
    wanted |= {f"{OUTLOOK_UID}${(monday + timedelta(weeks=w)):%Y%m%d}-090000" for w in (0, 1, 3, 4, 5)}
    for sunday in (spring, autumn):
        oof = store.add(mailbox, {"uid": f"oof-{sunday}-{uuid.uuid4().hex[:6]}", "start": (sunday - timedelta(days=1)).isoformat(),
                                  "end": (sunday + timedelta(days=1)).isoformat(), "all_day": True, "status": "OOF"})
        wanted.add(oof.uid)
    store.add(mailbox, {"start": at(today + timedelta(days=4), 12), "end": at(today + timedelta(days=4), 12, 30), "status": "Free"})
    store.add(mailbox, {"uid": f"by-organizer-{uuid.uuid4().hex[:6]}@planner.example", "start": at(today + timedelta(days=5), 10),
                        "end": at(today + timedelta(days=5), 11), "organizer": PLANNER_ORGANIZER})
    store.add(mailbox, {"uid": f"PLANNER-{uuid.uuid4().hex[:6]}", "start": at(today + timedelta(days=5), 13), "end": at(today + timedelta(days=5), 14),
                        "organizer": "someone@kommune.example"})
    external = store.add(mailbox, {"uid": "20261019T070000Z-4711@kalender.kommune.example", "start": at(today + timedelta(days=6), 8),
                                   "end": at(today + timedelta(days=6), 9), "organizer": "colleague@nabokommune.example"})
    wanted.add(external.uid)
    return wanted, {"series": series, "monday": monday, "single": single}


def held(planner: RunningPlannerSim, mailbox: str) -> dict[str, tuple[datetime, datetime]]:
    return {e.origin_id: (e.start, e.end) for e in planner.state.events(mailbox)}


def test_a_calendar_reaches_planner_the_same_through_graph_as_through_ews_and_a_switch_costs_no_planner_call(
    settings: Settings, topology: Topology, ews: RunningExchangeSim, graph: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate,
    tmp_path: Path,
) -> None:
    wanted, handles = seed_calendar(ews, ANNE)
    planner_ews = start_planner()
    planner_graph = start_planner()
    try:
        # 1. the mailbox on EWS
        config = pipeline_settings(settings, ews, graph, pki, app, planner_ews, tmp_path / "ews.db")
        store = Store.connect(config.database_url())
        upgrade(store.engine)
        store.add_mailbox(ANNE)
        with Pipeline(config):
            try:
                wait_for(lambda: set(held(planner_ews, ANNE)) == wanted, 60, interval=0.2, what=f"Planner to hold the {len(wanted)} busy times via EWS")
            except AssertionError:
                raise AssertionError(f"missing {wanted - set(held(planner_ews, ANNE))}, extra {set(held(planner_ews, ANNE)) - wanted}") from None
            via_ews = held(planner_ews, ANNE)
            calls_before = len(planner_ews.state.calls())

            # 2. the same mailbox moved to Graph: read in full by Graph, no Planner call for what did not change
            store.set_backend(ANNE, "graph")
            wait_for(lambda: (p := store.sync_position(ANNE)) is not None and p.backend == "graph", 30, what="the first read by Graph")
            monday, series = handles["monday"], handles["series"]
            graph.state.store.modify_occurrence(ANNE, series.key, {"original_start": at(monday + timedelta(weeks=4), 9),
                                                                   "start": at(monday + timedelta(weeks=4), 15),
                                                                   "end": at(monday + timedelta(weeks=4), 15, 30)})
            moved = f"{OUTLOOK_UID}${(monday + timedelta(weeks=4)):%Y%m%d}-090000"
            wait_for(lambda: held(planner_ews, ANNE)[moved][0].astimezone(CPH).hour == 15, 30, what="the edit after the switch in Planner")
            after_switch = planner_ews.state.calls()[calls_before:]
        assert {o for call in after_switch for o in call.origin_ids} == {moved}, [c.to_json() for c in after_switch]
        assert set(held(planner_ews, ANNE)) == wanted

        # 3. a fresh installation reads the (edited) mailbox through Graph from the start
        fresh = pipeline_settings(settings, ews, graph, pki, app, planner_graph, tmp_path / "graph.db")
        fresh_store = Store.connect(fresh.database_url())
        upgrade(fresh_store.engine)
        fresh_store.add_mailbox(ANNE, backend="graph")
        with Pipeline(fresh):
            wait_for(lambda: held(planner_graph, ANNE) == held(planner_ews, ANNE), 60, interval=0.2,
                     what="Planner to hold through Graph exactly what it holds through EWS")
    finally:
        planner_ews.stop()
        planner_graph.stop()
    assert via_ews != held(planner_graph, ANNE)                  # the edit is there ...
    assert {k: v for k, v in via_ews.items() if k != moved} == {k: v for k, v in held(planner_graph, ANNE).items() if k != moved}
    assert not [c for c in planner_graph.state.calls() if c.outcome != "ok"]


def test_a_hybrid_pipeline_delivers_edits_from_mailboxes_on_both_backends(
    settings: Settings, topology: Topology, ews: RunningExchangeSim, graph: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate,
    tmp_path: Path, planner_sim: RunningPlannerSim,
) -> None:
    config = pipeline_settings(settings, ews, graph, pki, app, planner_sim, tmp_path / "hybrid.db")
    store = Store.connect(config.database_url())
    upgrade(store.engine)
    backends = {ANNE: None, BO: "ews", CARL: "graph", DORTE: "graph"}
    for mailbox, backend in backends.items():
        store.add_mailbox(mailbox, backend=backend)   # type: ignore[arg-type]
    today = datetime.now(CPH).date()
    first = {m: ews.state.store.add(m, {"start": at(today + timedelta(days=2), 9 + n), "end": at(today + timedelta(days=2), 10 + n)})
             for n, m in enumerate(backends)}
    with Pipeline(config):
        wait_for(lambda: all(set(held(planner_sim, m)) == {first[m].uid} for m in backends), 60, what="every mailbox's first item in Planner")
        later = {m: ews.state.store.add(m, {"start": at(today + timedelta(days=3), 9 + n), "end": at(today + timedelta(days=3), 10 + n)})
                 for n, m in enumerate(backends)}
        for m in backends:
            ews.state.store.delete(m, first[m].key)
        wait_for(lambda: all(set(held(planner_sim, m)) == {later[m].uid} for m in backends), 30, what="every mailbox's edits in Planner")
    positions = {m: store.sync_position(m) for m in backends}
    assert {m: p.backend for m, p in positions.items() if p is not None} == {ANNE: "ews", BO: "ews", CARL: "graph", DORTE: "graph"}
    assert {c["mailbox"] for c in graph.state.call_log("delta")} == {CARL, DORTE}


@pytest.fixture
def tap(topology: Topology) -> Iterator[Any]:
    """A copy of every message on both exchanges, to search for canaries."""
    connection = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST))
    channel = connection.channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, topology.calendar_exchange, "#")
    channel.queue_bind(queue, topology.busy_exchange, "#")

    def bodies() -> list[bytes]:
        out = []
        while True:
            method, _p, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append(body)

    yield bodies
    connection.close()


def test_content_canaries_from_graph_are_in_no_message_log_line_or_database_row(
    settings: Settings, topology: Topology, worker_env: dict[str, str], ews: RunningExchangeSim, graph: RunningGraphSim, pki: ThrowawayPKI,
    app: AppCertificate, planner_sim: RunningPlannerSim, processes: list[WorkerProcess], tap: Any, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tag = uuid.uuid4().hex[:8]
    canaries = {name: f"CANARY{name.upper()}{tag}" for name in ("subject", "body", "location", "organizer", "attendee")}
    import simulators.graph.api as graph_api

    original = graph_api.event_json

    def with_names(*args: Any, **kwargs: Any) -> dict[str, Any]:   # Graph names people; the simulator by address only
        event = original(*args, **kwargs)
        event["organizer"] = {"emailAddress": {"name": canaries["organizer"], "address": event["organizer"]["emailAddress"]["address"]}}
        event["attendees"] = [{"type": "required", "status": {"response": "accepted"},
                               "emailAddress": {"name": canaries["attendee"], "address": f"{canaries['attendee'].lower()}@ext.example"}}]
        return event

    monkeypatch.setattr(graph_api, "event_json", with_names)
    today = datetime.now(CPH).date()
    content = {"subject": canaries["subject"], "body": canaries["body"], "location": canaries["location"]}
    store_ = graph.state.store
    single = store_.add(ANNE, {**content, "start": at(today + timedelta(days=2), 9), "end": at(today + timedelta(days=2), 10)})
    series = store_.add(ANNE, {**content, "uid": OUTLOOK_UID, "start": at(today + timedelta(days=1), 8), "end": at(today + timedelta(days=1), 8, 15),
                               "recurrence": {"pattern": "daily", "count": 4}})
    store_.modify_occurrence(ANNE, series.key, {"index": 1, "start": at(today + timedelta(days=2), 11), "end": at(today + timedelta(days=2), 11, 30)})

    db = Path(worker_env["PLANNERSYNC_DATABASE__URL"].removeprefix("sqlite:///"))
    store = Store.connect(worker_env["PLANNERSYNC_DATABASE__URL"])
    upgrade(store.engine)
    store.add_mailbox(ANNE, backend="graph")
    env = {
        **worker_env,
        **graph_env(graph, app, pki.ca_cert),
        "PLANNERSYNC_PLANNER__ENDPOINT": planner_sim.url,
        "PLANNERSYNC_PLANNER__LINGER": "50ms",
        "PLANNERSYNC_LOG__LEVEL": "DEBUG",
        "PLANNERSYNC_EXCHANGE__MAILBOX_RELOAD_INTERVAL": "500ms",
        "PLANNERSYNC_EXCHANGE__ENDPOINT": "http://127.0.0.1:9/unused",   # no EWS mailbox: never contacted
    }
    processes += [WorkerProcess(w, env, tmp_path).start() for w in ("change-producer", "transformer", "publisher")]
    wait_for(lambda: len(held(planner_sim, ANNE)) == 5, 60, what="the single and four occurrences in Planner")
    store_.update(ANNE, single.key, {"start": at(today + timedelta(days=2), 13), "end": at(today + timedelta(days=2), 14),
                                     "subject": canaries["subject"] + " moved"}, {"uid": single.uid, "start": at(today + timedelta(days=2), 9)})
    wait_for(lambda: held(planner_sim, ANNE)[single.uid][0].astimezone(CPH).hour == 13, 30, what="the moved single in Planner")
    resync = subprocess.run([PLANNERSYNC, "resync", "--mailbox", ANNE], env=env, capture_output=True, text=True, timeout=120)
    assert resync.returncode == 0 and "5 items published" in resync.stdout, resync.stdout + resync.stderr
    wait_for(lambda: (p := store.sync_position(ANNE)) is not None and p.last_full_sync_at is not None, 20, what="the re-based snapshot recorded")
    for proc in processes:
        assert proc.stop() == 0, proc.log()[-3000:]

    logs = "\n".join(proc.log() for proc in processes) + resync.stdout + resync.stderr
    messages = b"\n".join(tap())
    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    rows = []
    with engine.connect() as conn:
        for table in sqlalchemy.inspect(engine).get_table_names():
            rows += [json.dumps([str(v) for v in row]) for row in conn.execute(sqlalchemy.text(f'SELECT * FROM "{table}"'))]
    engine.dispose()
    assert messages and logs and rows
    assert "graph_delta_read" in logs and "busy_time_delivered" in logs
    for name, canary in canaries.items():
        for where, text in (("message", messages.decode(errors="replace")), ("log", logs), ("database", "\n".join(rows)),
                            ("planner", json.dumps([c.to_json() for c in planner_sim.state.calls()]))):
            assert canary.lower() not in text.lower(), f"{name} canary in a {where}"
        assert canary.encode() not in db.read_bytes()


def test_plannersync_sim_graph_serves_until_sigterm(tmp_path: Path) -> None:
    log = tmp_path / "sim.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([PLANNERSYNC, "sim", "graph", "--port", "0", "--mailbox", ANNE], stdout=out, stderr=subprocess.STDOUT)
    try:
        line = wait_for(lambda: next((x for x in log.read_text().splitlines() if x.startswith("Graph simulator: ")), None), 30, what="the banner")
        control = line.split("control: ")[1].strip()
        assert requests.get(f"{control}/health", timeout=5).json()["mailboxes"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
