"""The fault suite (issue 11): nothing lost, extra, wrong or doubled under faults, measured against the calendars.

Each scenario runs the change producer, the transformer and the publisher as processes (``plannersync run``)
against the real RabbitMQ through a TCP proxy the test controls (cuts need no broker restart), the EWS and Planner
simulators (Planner behind a proxy too, so it can be swapped for a dripping server), SQLite or PostgreSQL. It drives
random calendar edits over many mailboxes, injects its faults, settles (queues empty, Planner unchanged for a
moment, with a deadline) and compares Planner's events with what the test's own model of the calendars implies
(``tests/support/fault_suite.py``). It prints one line per scenario::

    fault-suite <scenario>: changes=N faults=F expected=E found=X missing=0 extra=0 wrong=0 duplicate_calls=0 dead_lettered=0

and asserts the zeros, that the only dead letters are the ones the scenario put there on purpose (poison bodies,
events Planner refuses for good), and that no worker died. ``--soak`` runs longer variants with more mailboxes on a
RabbitMQ node of the suite's own, which it restarts in the middle (the shared broker is never touched).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import exchangelib.protocol
import pytest

from shared.adapters.store import Store
from shared.broker.topology import Topology, from_settings
from shared.config import Settings
from simulators.exchange.server import RunningExchangeSim, start_server
from simulators.graph.server import RunningGraphSim
from simulators.graph.server import start_server as start_graph
from simulators.planner.server import RunningPlannerSim
from tests.support.dripping_server import DrippingServer
from tests.support.fault_suite import (
    STAGES,
    BrokerAt,
    Driver,
    Pipeline,
    Report,
    SwitchingProxy,
    Tally,
    account,
    enrol,
    pipeline_env,
    poison_bodies,
    settle,
)
from tests.support.graph import graph_env, write_app_certificate
from tests.support.processes import WorkerProcess
from tests.support.rabbit_node import OwnNode
from tests.support.settings import settings_from_env
from tests.support.tcp_proxy import TcpProxy
from tests.support.tls import write_pki

SETTLE_DEADLINE = 150.0  # an upper bound only: settling returns as soon as Planner equals the calendars and the queues are empty; a loaded CI machine needed more than 60 s once


@pytest.fixture(scope="module")
def report(request: pytest.FixtureRequest) -> Iterator[Report]:
    reporter = Report(request.config)
    request.config.pluginmanager.register(reporter, f"fault-suite-report-{id(reporter)}")
    yield reporter


@dataclass
class Rig:
    """Everything one scenario runs against."""

    name: str
    driver: Driver
    pipeline: Pipeline
    planner: RunningPlannerSim
    ews: RunningExchangeSim
    broker: BrokerAt
    broker_proxy: TcpProxy
    planner_proxy: SwitchingProxy
    topology: Topology
    report: Report
    settle_deadline: float = SETTLE_DEADLINE
    graph: RunningGraphSim | None = None   # serving the same calendars as ``ews`` when the mailboxes are on Graph
    graph_ca: Path | None = None           # the CA that signed the Graph simulator's HTTPS certificate

    def pace(self, edits: int, every: dict[int, Callable[[], Any]] | None = None, pause: tuple[float, float] = (0.005, 0.04)) -> None:
        """``edits`` random edits, paced on purpose (not a wait for anything) so faults land while work is in
        flight; ``every`` maps an edit number to a fault to inject just before it."""
        for n in range(edits):
            if every and n in every:
                every[n]()
            time.sleep(self.driver.rng.uniform(*pause))
            self.driver.edit()

    def pace_for(self, seconds: float, pause: tuple[float, float] = (0.01, 0.05)) -> None:
        """Random edits for ``seconds`` (a phase of a fault), paced as ``pace`` does."""
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            time.sleep(self.driver.rng.uniform(*pause))
            self.driver.edit()

    def finish(self, observed: Callable[[], dict[str, int]], allowed_dead_letters: dict[str, Any] | None = None, excluded: set[str] = frozenset(),  # type: ignore[assignment]
               deadline: float | None = None) -> Tally:
        deadline = deadline if deadline is not None else self.settle_deadline
        expected = self.driver.model.expected(set(excluded))
        work = [self.topology.stage(s).work_queue() for s in ("transformer", "publisher")]
        work += [self.topology.stage(s).retry_queue(d) for s in ("transformer", "publisher") for d in self.topology.tiers()]
        took = settle(self.planner, self.broker, work, expected, deadline, mailboxes=self.driver.mailboxes)
        tally = account(Tally(self.name, observed=observed()), self.driver, self.planner, self.broker, self.topology.dead_letter_queues(),
                        self.pipeline, allowed_dead_letters, excluded)
        tally.settled_in = took
        self.report(tally.line())
        assert not tally.problems(), f"{tally.line()}\n{tally.problems()}"
        return tally


@pytest.fixture
def rig_factory(worker_env: dict[str, str], planner_sim: RunningPlannerSim, processes: list[WorkerProcess], tmp_path: Path, report: Report, broker: str) -> Iterator[Callable[..., Rig]]:
    made: list[tuple[Rig, Topology, BrokerAt]] = []
    closers: list[Callable[[], Any]] = []

    def make(name: str, mailboxes: int, seed: int, database_url: str | None = None, broker_at: BrokerAt | None = None, settle_deadline: float = SETTLE_DEADLINE,
             on_graph: bool = False, **env: str) -> Rig:
        at = broker_at or BrokerAt()
        addresses = [f"cw{n:02d}.{name}@jobcenter.dk" for n in range(mailboxes)]
        ews = start_server(users={"svc": "pw"}, minute_seconds=2.0, keepalive_seconds=0.5, mailboxes=addresses)
        closers.append(ews.stop)
        graph: RunningGraphSim | None = None
        graph_ca: Path | None = None
        if on_graph:   # the same calendars through Microsoft Graph (HTTPS, certificate credentials); edits still go to the one store
            pki = write_pki(tmp_path / "graph-pki")
            app = write_app_certificate(tmp_path / "graph-app")
            graph = start_graph(tls=(str(pki.server_cert), str(pki.server_key)), store=ews.state.store, client_certificates=[app.certificate_pem])
            closers.append(graph.stop)
            graph_ca = pki.ca_cert
            env = {**graph_env(graph, app, pki.ca_cert), "PLANNERSYNC_EXCHANGE__DEFAULT_BACKEND": "graph", **env}
        broker_proxy = TcpProxy(at.port)
        closers.append(broker_proxy.close)
        planner_port = int(planner_sim.url.split(":")[2].split("/")[0])
        planner_proxy = SwitchingProxy(planner_port)
        closers.append(planner_proxy.close)
        planner_url = planner_sim.url.replace(f":{planner_port}/", f":{planner_proxy.port}/")
        base = {**worker_env, **({"PLANNERSYNC_DATABASE__URL": database_url} if database_url else {})}
        full_env = pipeline_env(base, broker_proxy, planner_url, ews, at, **env)
        settings: Settings = settings_from_env(full_env)
        topology = from_settings(settings.broker, settings.retry)
        enrol(full_env["PLANNERSYNC_DATABASE__URL"], addresses)
        driver = Driver(ews, addresses, seed, f"{name}-{seed}")
        closers.append(driver.close)
        log_dir = tmp_path / name   # each rig's worker logs apart (two rigs can share a test: two jobcentres)
        log_dir.mkdir(exist_ok=True)
        rig = Rig(name, driver, Pipeline(full_env, log_dir, processes), planner_sim, ews, at, broker_proxy, planner_proxy, topology, report, settle_deadline, graph, graph_ca)
        made.append((rig, topology, at))
        return rig

    yield make
    for rig, _topology, _at in made:
        rig.pipeline.stop_all()  # before the queues and the database go
    for closer in reversed(closers):
        closer()
    exchangelib.protocol.close_connections()
    from shared.broker.topology import delete_everything

    for _rig, topology, at in made:
        try:
            delete_everything(topology, at.management, "guest", "guest")
        except Exception:  # noqa: BLE001 - a soak node already gone
            pass


# ------------------------------------------------------------------------------------------------ scenarios


def broker_cuts(rig: Rig, seed_per_mailbox: int, edits: int, restart: Callable[[], None] | None = None) -> Tally:
    """The broker cut during the first reads (a one-shot cut armed by bytes, so it lands mid-burst, twice), then
    cut again and again during steady edits, and refused for a moment."""
    rig.driver.seed(seed_per_mailbox)
    seeded_busy = len(rig.driver.model.expected())
    rig.broker_proxy.cut_after(30_000)
    rig.pipeline.start()
    deadline = time.monotonic() + 30
    while rig.broker_proxy.cuts < 1 and time.monotonic() < deadline:
        time.sleep(0.05)  # the poll interval of this deadline: the first cut fires inside the first reads
    held_at_first_cut = len(rig.planner.state.events())
    rig.broker_proxy.cut_after(40_000)

    def refuse_for_a_moment() -> None:
        rig.broker_proxy.refuse()
        rig.broker_proxy.cut()
        time.sleep(1.5)  # the length of the fault (connections refused meanwhile)
        rig.broker_proxy.accept()

    step = max(1, edits // 6)
    restarts = [0]

    def restart_broker() -> None:
        if restart is not None:
            restart()
            restarts[0] += 1

    rig.pace(edits, {step: rig.broker_proxy.cut, 2 * step: rig.broker_proxy.cut, 3 * step: refuse_for_a_moment, 4 * step: rig.broker_proxy.cut,
                     5 * step: rig.broker_proxy.cut, 5 * step + step // 2: restart_broker})

    def observed() -> dict[str, int]:
        lost = sum(count for name in STAGES for event, count in rig.pipeline.events(name).items() if "connection_lost" in event or "reconnect" in event)
        return {"cut_during_first_reads": int(rig.broker_proxy.cuts >= 1 and held_at_first_cut < seeded_busy),
                "cuts": rig.broker_proxy.cuts, "connections_lost_in_logs": lost, **({"broker_restarts": restarts[0]} if restart else {})}

    return rig.finish(observed)


def sigkills(rig: Rig, seed_per_mailbox: int, edits: int, rounds: int) -> Tally:
    """SIGKILL of every worker at random points, repeatedly (each worker several times)."""
    rig.driver.seed(seed_per_mailbox)
    rig.pipeline.start()
    rng = random.Random(rig.driver.rng.random())
    victims = [name for _ in range(rounds) for name in rng.sample(STAGES, len(STAGES))]
    points = sorted(rng.sample(range(1, edits), len(victims)))
    rig.pace(edits, {point: (lambda name=name: rig.pipeline.sigkill(name)) for point, name in zip(points, victims)})
    return rig.finish(lambda: {f"sigkill:{name}": victims.count(name) for name in STAGES})


def planner_faults(rig: Rig, seed_per_mailbox: int, edits: int, hour: float) -> Tally:
    """Planner down for a (time-scaled) hour, reset mid-call, slow, dripping, answering garbage, refusing single
    events for a while (receipt 15) and two for good (a permanent code); poison bodies mixed into the calendar
    traffic. The only dead letters allowed: the poison bodies (transformer) and the two refused events (publisher)."""
    rig.driver.seed(seed_per_mailbox)
    rig.pipeline.start()
    planner = rig.planner.state

    def now() -> datetime:
        return datetime.now(timezone.utc)

    drip = DrippingServer(interval=0.05, body_length=50_000)
    poison = poison_bodies(rig.driver.mailboxes[0])
    refused_for_good: set[str] = set()

    def outage() -> None:
        planner.add_faults([{"type": "outage", "seconds": hour, "mode": "503"}], now())

    def reset_outage() -> None:
        planner.add_faults([{"type": "outage", "seconds": hour / 2, "mode": "reset"}], now())

    def slow() -> None:
        planner.add_faults([{"type": "latency", "seconds": 0.7, "times": 25}], now())

    def dripping_on() -> None:  # calls Planner already has are answered; the next ones drip
        rig.planner_proxy.switch(("127.0.0.1", int(drip.url.split(":")[2].split("/")[0])))

    def dripping_off() -> None:  # the dripping server never answers: cut it at once
        rig.planner_proxy.switch(("127.0.0.1", int(rig.planner.url.split(":")[2].split("/")[0])), hard=True)

    def garbage() -> None:
        planner.add_faults([{"type": "garbage", "kind": "not_xml", "times": 3},
                            {"type": "garbage", "kind": "billion_laughs", "times": 1},
                            {"type": "garbage", "kind": "oversized", "size": 25 * 1024 * 1024, "times": 1}], now())

    def refuse_single_events() -> None:
        live = sorted(key for key, item in rig.driver.model.items.items() if item is not None and item.busy() is not None and key[1] not in rig.driver.frozen)
        chosen = rig.driver.rng.sample(live, min(6, len(live)))
        planner.add_faults([{"type": "receipt_code", "code": 15, "message": "Try again", "origin_ids": [uid for _, uid in chosen], "times": len(chosen)}], now())
        for mailbox, uid in chosen:  # each of them travels while refused
            rig.driver.lengthen(mailbox, uid)

    def refuse_for_good() -> None:
        for _ in range(2):  # new busy items whose create Planner refuses with a permanent code: dead-lettered alone
            uid = rig.driver.next_uid()
            planner.add_faults([{"type": "receipt_code", "code": 99, "message": "Refused for good", "origin_ids": [uid]}], now())
            rig.driver.create(busy=True)
            refused_for_good.add(uid)
            rig.driver.frozen.add(uid)

    def poison_in() -> None:
        rig.broker.publish_raw(rig.topology.calendar_exchange, rig.topology.change_key(rig.driver.mailboxes[0]), poison)

    try:
        # one phase per fault, each with edits going on; the phases follow each other so no fault hides another
        rig.pace(edits // 4)
        outage()
        rig.pace_for(hour)
        poison_in()
        slow()
        rig.pace(edits // 4)
        reset_outage()
        rig.pace_for(hour / 2)
        dripping_on()
        rig.pace_for(3.0)
        dripping_off()
        garbage()
        rig.pace(edits // 4)
        refuse_single_events()
        rig.pace(edits // 8)
        refuse_for_good()
        poison_in()
        rig.pace(edits // 8)

        def observed() -> dict[str, int]:
            outcomes: dict[str, int] = {}
            codes: dict[int, int] = {}
            for call in planner.calls():
                outcomes[call.outcome] = outcomes.get(call.outcome, 0) + 1
                for code in call.codes:
                    codes[code] = codes.get(code, 0) + 1
            slow = sum(25 - (fault.times or 0) for fault in planner.faults() if fault.type == "latency")
            return {"outage_503": outcomes.get("outage_503", 0), "outage_reset": outcomes.get("outage_reset", 0), "slow": slow,
                    "dripped": drip.requests, "garbage": sum(v for k, v in outcomes.items() if k.startswith("garbage_")),
                    "receipt_15": codes.get(15, 0), "receipt_99": codes.get(99, 0), "poison_published": 2 * len(poison)}

        return rig.finish(
            observed,
            allowed_dead_letters={rig.topology.stage("transformer").dead_letter_queue(): set(poison),
                                  rig.topology.stage("publisher").dead_letter_queue(): set(refused_for_good)},
            excluded=refused_for_good, deadline=rig.settle_deadline + hour,
        )
    finally:
        dripping_off()
        drip.stop()


def exchange_and_database_faults(rig: Rig, seed_per_mailbox: int, edits: int, pg_admin: Any, database: str) -> Tally:
    """Exchange throttling (ErrorServerBusy with back-off), invalid sync states, streams cut and silent, and the
    database's connections terminated (PostgreSQL ``pg_terminate_backend``) again and again."""
    rig.driver.seed(seed_per_mailbox)
    rig.pipeline.start()
    mailboxes = rig.driver.mailboxes

    def throttle() -> None:
        for mailbox in mailboxes[:4]:
            rig.driver.ews_fault(kind="server_busy", mailbox=mailbox, operations=["SyncFolderItems"], count=3, back_off_ms=800)

    def invalidate() -> None:
        for mailbox in mailboxes[4:6]:
            rig.driver.invalidate_sync_states(mailbox)

    def stream_cut() -> None:
        rig.driver.ews_fault(kind="stream_cut", count=2, after_seconds=0.3)

    def stream_silent() -> None:
        rig.driver.ews_fault(kind="stream_silent", count=1, after_seconds=0.3)

    terminated = [0]

    def terminate_backends() -> None:
        rows = pg_admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (database,)).fetchall()
        terminated[0] += sum(1 for (done,) in rows if done)

    step = max(1, edits // 9)
    rig.pace(edits, {
        step: throttle, 2 * step: terminate_backends, 3 * step: invalidate, 4 * step: stream_cut, 5 * step: terminate_backends,
        6 * step: stream_silent, 7 * step: invalidate, 8 * step: terminate_backends,
    })

    def observed() -> dict[str, int]:
        outcomes: dict[str, int] = {}
        for call in rig.ews.state.call_log():
            outcomes[call["outcome"]] = outcomes.get(call["outcome"], 0) + 1
        streams = rig.pipeline.events("change-producer").get("stream_interrupted", 0)
        return {"server_busy": outcomes.get("ErrorServerBusy", 0), "invalid_sync_state": outcomes.get("ErrorInvalidSyncStateData", 0),
                "streams_interrupted": streams, "db_backends_terminated": terminated[0]}

    return rig.finish(observed)


def graph_faults(rig: Rig, seed_per_mailbox: int, edits: int) -> Tally:
    """Exchange Online through Microsoft Graph: throttling (429 with Retry-After) and 503s per mailbox, expired delta
    tokens (410), server errors, a mailbox briefly outside the app's scope (403) and not found (404), a dripping
    answer, replayed delta pages and removals of items never seen. (Instances without iCalUId need recurring series,
    which this suite's calendar model does not make; tests/integration/test_graph_adapter.py covers them.)"""
    assert rig.graph is not None
    graph = rig.graph
    rig.driver.seed(seed_per_mailbox)
    rig.pipeline.start()
    mailboxes = rig.driver.mailboxes

    def fault(**spec: Any) -> None:
        rig.driver.http.post(f"{graph.control_url}/faults", json=spec, timeout=10, verify=str(rig.graph_ca)).raise_for_status()

    def throttle() -> None:
        for mailbox in mailboxes[:3]:
            fault(kind="throttle", mailbox=mailbox, endpoints=["delta"], count=3, retry_after=1)

    def unavailable() -> None:
        for mailbox in mailboxes[3:5]:
            fault(kind="unavailable", mailbox=mailbox, count=2, retry_after=1)

    def expire_tokens() -> None:
        for mailbox in mailboxes[5:8]:
            fault(kind="sync_state_not_found", mailbox=mailbox, endpoints=["delta"], count=1)

    def out_of_scope() -> None:
        fault(kind="forbidden", mailbox=mailboxes[8], count=3)
        fault(kind="not_found", mailbox=mailboxes[9], count=2)

    def misbehave() -> None:
        fault(kind="server_error", endpoints=["delta"], count=3)
        fault(kind="delta_replay", count=4)
        fault(kind="phantom_removal", count=4)

    def drip() -> None:
        fault(kind="drip", mailbox=mailboxes[0], endpoints=["delta"], count=1, drip_bytes=1, drip_interval_ms=400)

    step = max(1, edits // 7)
    rig.pace(edits, {step: throttle, 2 * step: unavailable, 3 * step: expire_tokens, 4 * step: out_of_scope, 5 * step: misbehave,
                     6 * step: drip})

    def observed() -> dict[str, int]:
        statuses: dict[int, int] = {}
        for call in graph.state.call_log():
            statuses[call["status"]] = statuses.get(call["status"], 0) + 1
        return {f"http_{status}": statuses.get(status, 0) for status in (429, 503, 410, 500, 403, 404)}

    return rig.finish(observed)


# ------------------------------------------------------------------------------------------------ the default run


def test_broker_cuts_during_the_first_reads_and_steady_edits_lose_nothing(rig_factory: Callable[..., Rig], topology: Topology) -> None:
    broker_cuts(rig_factory("broker-cuts", mailboxes=15, seed=11), seed_per_mailbox=8, edits=150)


def test_every_worker_sigkilled_at_random_points_repeatedly_loses_nothing(rig_factory: Callable[..., Rig], topology: Topology) -> None:
    sigkills(rig_factory("sigkill", mailboxes=12, seed=12), seed_per_mailbox=5, edits=150, rounds=2)


def test_planner_down_slow_dripping_garbage_and_refusing_with_poison_in_the_traffic(rig_factory: Callable[..., Rig], topology: Topology) -> None:
    planner_faults(rig_factory("planner", mailboxes=12, seed=13), seed_per_mailbox=5, edits=160, hour=6.0)


def test_exchange_throttling_invalid_sync_states_broken_streams_and_database_cuts_on_postgresql(
    pg_url: str, pg_admin: Any, rig_factory: Callable[..., Rig], topology: Topology,
) -> None:
    rig = rig_factory("exchange-pg", mailboxes=12, seed=14, database_url=pg_url)
    exchange_and_database_faults(rig, seed_per_mailbox=5, edits=150, pg_admin=pg_admin, database=pg_url.rsplit("/", 1)[1])


def test_graph_throttling_expired_tokens_scope_errors_and_odd_delta_pages_lose_nothing(rig_factory: Callable[..., Rig], topology: Topology) -> None:
    graph_faults(rig_factory("graph", mailboxes=10, seed=16, on_graph=True), seed_per_mailbox=5, edits=150)


def test_two_jobcentres_side_by_side_on_one_broker_and_one_planner_each_end_equal_to_their_calendars(
    rig_factory: Callable[..., Rig], topology: Topology, tmp_path: Path,
) -> None:
    """Several jobcentres on one installation: a set of workers per jobcentre with its own prefix, database, health
    directory and jobcentre number (runbooks/jobcentres.md), edited at the same time, one broker, one Planner."""
    first = rig_factory("jc-a", mailboxes=6, seed=31, PLANNERSYNC_PLANNER__JOBCENTER_NUMBER="10100")
    second = rig_factory("jc-b", mailboxes=6, seed=32, database_url=f"sqlite:///{tmp_path / 'jc-b.db'}", PLANNERSYNC_BROKER__PREFIX=f"{topology.prefix}-b",
                         PLANNERSYNC_STATUS__HEALTH_DIR=str(tmp_path / "jc-b-health"), PLANNERSYNC_PLANNER__JOBCENTER_NUMBER="10200")
    assert second.topology.prefix != first.topology.prefix
    for rig in (first, second):
        rig.driver.seed(4)
        rig.pipeline.start()
    for _ in range(60):   # both jobcentres' caseworkers edit at once
        for rig in (first, second):
            time.sleep(rig.driver.rng.uniform(0.005, 0.03))
            rig.driver.edit()
    for rig in (first, second):
        rig.finish(lambda: {})
    calls = first.planner.state.calls()
    for rig, number in ((first, "10100"), (second, "10200")):
        uids = {uid for _mailbox, uid in rig.driver.model.expected()}
        theirs = [call for call in calls if uids & set(call.origin_ids)]
        assert theirs and {call.organisation for call in theirs} == {number}, (rig.name, {call.organisation for call in theirs})


def test_two_transformers_and_two_publishers_on_the_same_queues_lose_reorder_and_double_nothing(rig_factory: Callable[..., Rig], topology: Topology) -> None:
    """N replicas (issue 12, decisions 41, 89 and 90): a second transformer and a second publisher consume the same
    queues while the calendars are edited fast (the same appointments again and again), and one replica of each is
    SIGKILLed on the way (the claims it held block their mailboxes and event keys until they expire).

    Before the claims, about one run in two ended with an appointment created and then deleted still in Planner, or
    at the wrong times: a transformer decided a delete from a store that did not show the other one's create yet, and
    two publishers sent one key's calls at once, the older landing last. Then, about one run in five, a create sent by
    the SIGKILLed transformer before its record stayed in Planner: its delete, decided first by the other, found
    nothing to delete (decision 95; made every time by ``tests/e2e/test_transformer_replica_killed.py``)."""
    rig = rig_factory("replicas", mailboxes=8, seed=41)
    rig.driver.seed(5)
    rig.pipeline.start(*STAGES, "transformer#2", "publisher#2")
    rig.pace(200, {60: lambda: rig.pipeline.sigkill("transformer#2"), 130: lambda: rig.pipeline.sigkill("publisher")}, pause=(0.002, 0.02))
    rig.finish(lambda: {"transformers": 2, "publishers": 2, "killed": rig.pipeline.kills})


def reads_overlapping_across_clients(calls: list[dict[str, Any]]) -> list[str]:
    """Pairs of SyncFolderItems calls of one mailbox by two different clients (replicas) that were in the EWS
    simulator at the same time: each call from when it arrived (``started``) to when its answer was ready (``time``)."""
    by_mailbox: dict[str, list[tuple[datetime, datetime, str]]] = {}
    for call in calls:
        if call["started"] is None or call["client"] is None:
            continue
        span = (datetime.fromisoformat(call["started"]), datetime.fromisoformat(call["time"]), call["client"])
        by_mailbox.setdefault(call["mailbox"], []).append(span)
    overlaps = []
    for mailbox, spans in by_mailbox.items():
        spans.sort()
        for i, (start, end, client) in enumerate(spans):
            for other_start, other_end, other_client in spans[i + 1 :]:
                if other_start >= end:
                    break   # sorted by start: no later call can overlap this one
                if other_client != client:
                    overlaps.append(f"{mailbox}: {client} {start.time()}-{end.time()} and {other_client} {other_start.time()}-{other_end.time()}")
    return overlaps


def producer_replicas(rig: Rig, seed_per_mailbox: int) -> Tally:
    """Change-producer replicas come and go while the calendars are edited (issue 12, decision 91): one reads every
    mailbox; a second joins and they share them; the first is SIGKILLed (not restarted) and the second takes its
    mailboxes over once their leases expire; a third joins and they share again; the second stalls (SIGSTOP) past its
    leases, the third takes them, the second resumes (SIGCONT: its queued reads are fenced out) and they share again;
    the second stops cleanly (SIGTERM) and the third takes everything at its next pass. Each phase is edited until the leases in the store show it done
    (with a deadline). Planner must end equal to the calendars, and the EWS simulator's call log must show no two
    SyncFolderItems of one mailbox by two replicas at the same time."""
    mailboxes = rig.driver.mailboxes
    share = -(-len(mailboxes) // 2)
    store = Store.connect(rig.pipeline.env["PLANNERSYNC_DATABASE__URL"])
    host = socket.gethostname()

    def replica(name: str) -> str:   # the default replica id: <hostname>:<pid>
        return f"{host}:{rig.pipeline.pid(name)}"

    def holders() -> dict[str, int]:
        now = datetime.now(timezone.utc)
        counts: dict[str, int] = {}
        for lease in store.leases():
            if lease.held_at(now) and lease.mailbox in mailboxes and lease.owner is not None:
                counts[lease.owner] = counts.get(lease.owner, 0) + 1
        return counts

    def held_by(who: str) -> set[str]:
        now = datetime.now(timezone.utc)
        return {lease.mailbox for lease in store.leases() if lease.owner == who and lease.held_at(now)}

    def alone(who: str) -> bool:
        return holders() == {who: len(mailboxes)}

    def shared(*who: str) -> bool:
        held = holders()
        return set(held) == set(who) and sum(held.values()) == len(mailboxes) and max(held.values()) <= share

    def edit_until(done: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        """Random edits, paced as ``Rig.pace`` does, until ``done`` (a deadline, not a measure)."""
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"{what}: leases held {holders()}"
            for _ in range(5):
                time.sleep(rig.driver.rng.uniform(0.01, 0.05))
                rig.driver.edit()

    try:
        rig.driver.seed(seed_per_mailbox)
        rig.pipeline.start()
        first = replica("change-producer")
        edit_until(lambda: alone(first), "one replica reading every mailbox")
        rig.pipeline.start("change-producer#2")
        second = replica("change-producer#2")
        edit_until(lambda: shared(first, second), "a second replica taking its share")
        rig.pace(30)
        killed_at, orphaned = datetime.now(timezone.utc), held_by(first)
        rig.pipeline.kill("change-producer")
        edit_until(lambda: alone(second), "the survivor taking over the SIGKILLed replica's mailboxes")
        rig.pace(30)
        rig.pipeline.start("change-producer#3")
        third = replica("change-producer#3")
        edit_until(lambda: shared(second, third), "a third replica taking its share")
        rig.pace(30)
        os.kill(rig.pipeline.pid("change-producer#2"), signal.SIGSTOP)
        try:
            edit_until(lambda: alone(third), "the third taking over the stalled replica's mailboxes")
        finally:
            os.kill(rig.pipeline.pid("change-producer#2"), signal.SIGCONT)
        edit_until(lambda: shared(second, third), "the resumed replica taking its share again")
        rig.pace(30)
        stopped_at, handed_over = datetime.now(timezone.utc), held_by(second)
        assert rig.pipeline.stop("change-producer#2") == 0
        edit_until(lambda: alone(third), "the last replica taking over the stopped one's mailboxes")
        rig.pace(40)
    finally:
        store.engine.dispose()

    calls = rig.ews.state.call_log("SyncFolderItems")
    clients = {name: f"plannersync ({who})" for name, who in (("first", first), ("second", second), ("third", third))}
    reads = {name: sum(1 for call in calls if call["client"] == client) for name, client in clients.items()}

    def read_after(client: str, moment: datetime) -> set[str]:
        return {call["mailbox"] for call in calls if call["client"] == client and datetime.fromisoformat(call["started"]) > moment}

    changes = [entry for line in (rig.pipeline.log_dir / "replica-2" / "change-producer.log").read_text().splitlines() if line.startswith("{")
               and (entry := json.loads(line)).get("event") == "leases_changed"]
    takeovers = sum(1 for entry in changes if first in (entry.get("taken_over_from") or []))   # the second's, from the killed first
    lost = sum(entry.get("lost", 0) for entry in changes)   # the stalled second, at its first pass after resuming
    rig.report(f"fault-suite {rig.name}: SyncFolderItems by replica {reads}")
    tally = rig.finish(lambda: {"replicas": len(clients), "sigkilled": rig.pipeline.kills, "stalled": 1, "stopped_cleanly": 1,
                                "taken_over_after_expiry": takeovers, "lost_by_the_stalled": lost,
                                "orphaned_by_the_kill": len(orphaned), "handed_over_by_the_stop": len(handed_over)})
    # the mailboxes of the replica that went were read by the one that took them, after it went
    assert orphaned and orphaned <= read_after(clients["second"], killed_at), orphaned - read_after(clients["second"], killed_at)
    assert handed_over and handed_over <= read_after(clients["third"], stopped_at), handed_over - read_after(clients["third"], stopped_at)
    overlaps = reads_overlapping_across_clients(calls)
    assert not overlaps, f"{len(overlaps)} SyncFolderItems of one mailbox by two replicas at once: {overlaps[:5]}"
    return tally


# Once an open defect (one run in three, PostgreSQL): a replica stalled in a read past its lease saved its older sync
# state over its successor's, and an item created and deleted in between was never deleted. Fixed by decision 102;
# made alone, the way it happens, in tests/e2e/test_producer_stalled_save.py.
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_change_producer_replicas_join_and_leave_and_no_mailbox_is_read_by_two_at_once(
    database: str, rig_factory: Callable[..., Rig], topology: Topology, request: pytest.FixtureRequest,
) -> None:
    url = request.getfixturevalue("pg_url") if database == "postgresql" else None
    rig = rig_factory(f"producer-replicas-{database}", mailboxes=10, seed=51, database_url=url, PLANNERSYNC_EXCHANGE__LEASE_TTL="3s")
    producer_replicas(rig, seed_per_mailbox=4)


def lost_answers(rig: Rig, seed_per_mailbox: int) -> Tally:
    """Planner applies a CreateEvents but its answer is lost (the connection is cut while the call is in Planner's
    hands), Planner stays unreachable for a moment, and meanwhile the caseworker deletes the appointment. The event
    must not stay in Planner: its create's outcome is unknown, so the absent state has to send a Delete."""
    rig.driver.seed(seed_per_mailbox)
    rig.pipeline.start()
    settle(rig.planner, rig.broker, [rig.topology.stage("publisher").work_queue()], rig.driver.model.expected(), 30)
    planner = rig.planner.state
    planner.add_faults([{"type": "latency", "seconds": 1.5, "operations": ["CreateEvents"], "times": 1}], datetime.now(timezone.utc))
    mailbox, uid = rig.driver.create(busy=True)
    deadline = time.monotonic() + 20
    while not any(uid in call.origin_ids and call.outcome == "pending" for call in planner.calls()) and time.monotonic() < deadline:
        time.sleep(0.02)  # the poll interval of this deadline: the create is in Planner's hands
    rig.planner_proxy.refuse()
    rig.planner_proxy.cut()  # the answer is lost; Planner applies the create when its latency is over
    rig.driver.http.delete(f"{rig.driver.control}/mailboxes/{mailbox}/items/{uid}", timeout=10).raise_for_status()
    rig.driver.model.items[(mailbox, uid)] = None
    rig.driver.changes += 1
    deadline = time.monotonic() + 20
    while '"already_absent"' not in (rig.pipeline.log_dir / "publisher.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)  # the poll interval of this deadline: the publisher has judged the absent state
    time.sleep(0.5)  # keep Planner unreachable a moment longer (the fault's length)
    rig.planner_proxy.accept()
    return rig.finish(deadline=15, observed=lambda: {"answers_lost": rig.planner_proxy.cuts, "created_in_planner_unanswered": sum(
        1 for call in planner.calls() if uid in call.origin_ids and call.operation == "CreateEvents" and 0 in call.codes)})


def test_a_create_planner_applied_but_whose_answer_was_lost_is_deleted_when_the_appointment_goes(
    rig_factory: Callable[..., Rig], topology: Topology,
) -> None:
    lost_answers(rig_factory("lost-answer", mailboxes=3, seed=15), seed_per_mailbox=3)


# ------------------------------------------------------------------------------------------------ --soak: longer, more mailboxes, the suite's own node


@pytest.fixture(scope="module")
def own_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnNode]:
    node = OwnNode(tmp_path_factory.mktemp("fault-suite-node")).start()
    yield node
    node.stop()


def _on(node: OwnNode) -> BrokerAt:
    return BrokerAt(node.amqp_port, node.management_url)


@pytest.mark.soak
def test_soak_broker_cuts_and_a_restart_of_the_suites_own_node(rig_factory: Callable[..., Rig], own_node: OwnNode) -> None:
    rig = rig_factory("soak-broker", mailboxes=40, seed=21, broker_at=_on(own_node), settle_deadline=240)
    broker_cuts(rig, seed_per_mailbox=15, edits=1500, restart=own_node.restart)


@pytest.mark.soak
def test_soak_sigkills(rig_factory: Callable[..., Rig], own_node: OwnNode) -> None:
    sigkills(rig_factory("soak-sigkill", mailboxes=40, seed=22, broker_at=_on(own_node), settle_deadline=240), seed_per_mailbox=10, edits=1500, rounds=6)


@pytest.mark.soak
def test_soak_planner_faults(rig_factory: Callable[..., Rig], own_node: OwnNode) -> None:
    planner_faults(rig_factory("soak-planner", mailboxes=40, seed=23, broker_at=_on(own_node), settle_deadline=240), seed_per_mailbox=10, edits=1200, hour=30.0)


@pytest.mark.soak
def test_soak_exchange_and_database_faults(pg_url: str, pg_admin: Any, rig_factory: Callable[..., Rig], own_node: OwnNode) -> None:
    rig = rig_factory("soak-exchange-pg", mailboxes=40, seed=24, database_url=pg_url, broker_at=_on(own_node), settle_deadline=240)
    exchange_and_database_faults(rig, seed_per_mailbox=10, edits=1200, pg_admin=pg_admin, database=pg_url.rsplit("/", 1)[1])
