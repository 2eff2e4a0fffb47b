"""A node of a 3-node RabbitMQ cluster killed under load loses nothing, and the workers carry on on the others
(issue 12; decisions 80 to 82 and 87 in docs/decisions.md).

The test starts three RabbitMQ nodes of its own on free ports (``tests/support/rabbit_node.py``'s ``Cluster``: own
names, data and Erlang cookie, joined with ``rabbitmqctl join_cluster``; the shared broker is never touched), and
runs the change producer, the transformer and the publisher as processes (``plannersync run``) with all three
nodes in ``PLANNERSYNC_BROKER__HOSTS``, against the EWS and Planner simulators. The workers declare the topology
themselves, so the work queues and retry tiers are quorum queues with a member on every node, and their leaders on
the first node, where the workers connect (the worst case: the kill takes every leader with it).

Random calendar edits go on over several mailboxes (``tests/support/fault_suite.py``'s Driver); in the middle the
node every worker is connected to is killed with SIGKILL and the edits go on. Then the pipeline settles on the
surviving nodes, and the test asserts what the fault suite asserts (Planner equals the calendars: missing, extra,
wrong and duplicate calls 0; no worker died), that every worker's log shows it connected again to another node,
and, once the killed node is back (the dead-letter queues are classic queues on that node, decision 81), that no
message was dead-lettered.

A second test (``--soak``) kills the node that holds the dead-letter queues and sends poison messages: they must
wait for that node without stopping the stage, and only they may be dead-lettered, not the good messages delivered
in the same batch (decisions 81 and 87).
"""

from __future__ import annotations

import json
import time
import urllib.parse
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import exchangelib.protocol
import pytest
import requests

from shared.broker.topology import from_settings
from simulators.exchange.server import start_server
from simulators.planner.server import RunningPlannerSim
from tests.support.fault_suite import STAGES, BrokerAt, Driver, Pipeline, Report, Tally, account, enrol, pipeline_env, planner_held, poison_bodies, settle
from tests.support.processes import WorkerProcess
from tests.support.rabbit_node import Cluster, OwnNode
from tests.support.settings import settings_from_env

MAILBOXES = 12
SEED_PER_MAILBOX = 8
SETTLE_DEADLINE = 120.0  # an upper bound only: settling returns as soon as Planner equals the calendars and the queues are empty


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    started = Cluster(tmp_path_factory.mktemp("cluster")).start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def report(request: pytest.FixtureRequest) -> Iterator[Report]:
    reporter = Report(request.config)
    request.config.pluginmanager.register(reporter, f"cluster-report-{id(reporter)}")
    yield reporter


def log_events(log_dir: Path, worker: str) -> list[dict[str, Any]]:
    """The worker's JSON log lines, in order (every incarnation writes to the same file)."""
    path = log_dir / f"{worker}.log"
    out = []
    for line in (path.read_text(errors="replace").splitlines() if path.exists() else []):
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def nodes_reached(log_dir: Path, worker: str, since: int = 0) -> list[str]:
    """The broker nodes (host:port) the worker's connections reached, from its log lines after the first ``since``."""
    return [event["node"] for event in log_events(log_dir, worker)[since:] if event.get("event") == "broker_connected"]


def queue_info(node: OwnNode, queue: str) -> dict[str, Any]:
    url = f"{node.management_url}/api/queues/{urllib.parse.quote('/', safe='')}/{urllib.parse.quote(queue, safe='')}"
    response = requests.get(url, auth=("guest", "guest"), timeout=10)
    if response.status_code == 404:  # not declared yet
        return {}
    response.raise_for_status()
    return dict(response.json())


def bound(node: OwnNode, exchange: str, queue: str) -> bool:
    """Whether ``queue`` is bound to ``exchange`` (the management API of ``node``)."""
    vhost = urllib.parse.quote('/', safe='')
    url = f"{node.management_url}/api/bindings/{vhost}/e/{urllib.parse.quote(exchange, safe='')}/q/{urllib.parse.quote(queue, safe='')}"
    response = requests.get(url, auth=("guest", "guest"), timeout=10)
    return response.status_code == 200 and bool(response.json())


def wait_for(what: str, check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.2)  # the poll interval of this deadline


def pace_for(driver: Driver, seconds: float) -> None:
    """Random edits for ``seconds``, paced on purpose (not a wait for anything) so the kill lands while work is in flight."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        time.sleep(driver.rng.uniform(0.01, 0.05))
        driver.edit()


def test_a_node_killed_under_load_loses_nothing_and_the_workers_reconnect_to_the_others(
    cluster: Cluster, worker_env: dict[str, str], planner_sim: RunningPlannerSim, processes: list[WorkerProcess], tmp_path: Path, report: Report,
) -> None:
    first, second, _third = cluster.nodes
    addresses = [f"cw{n:02d}.cluster@jobcenter.dk" for n in range(MAILBOXES)]
    ews = start_server(users={"svc": "pw"}, minute_seconds=2.0, keepalive_seconds=0.5, mailboxes=addresses)
    driver = Driver(ews, addresses, seed=31, prefix="cluster-31")
    pipeline: Pipeline | None = None
    try:
        env = pipeline_env(worker_env, None, planner_sim.url, ews, BrokerAt(first.amqp_port, first.management_url),
                           PLANNERSYNC_BROKER__HOSTS=cluster.hosts())
        topology = from_settings(settings_from_env(env).broker, settings_from_env(env).retry)
        enrol(env["PLANNERSYNC_DATABASE__URL"], addresses)
        driver.seed(SEED_PER_MAILBOX)
        pipeline = Pipeline(env, tmp_path, processes)
        pipeline.start()

        # the workers are up on the first node, and the topology they declared is quorum queues on all three nodes
        wait_for("every worker connected", lambda: all(nodes_reached(tmp_path, name) for name in STAGES), 60)
        work = [topology.stage(s).work_queue() for s in ("transformer", "publisher")]
        retries = [topology.stage(s).retry_queue(d) for s in ("transformer", "publisher") for d in topology.tiers()]
        wait_for("the work queues declared", lambda: all(queue_info(second, q).get("members") for q in work + retries), 30)
        for queue in work + retries:
            info = queue_info(second, queue)
            assert info["type"] == "quorum" and sorted(info["members"]) == sorted(node.name for node in cluster.nodes), (queue, info)
        before = {name: nodes_reached(tmp_path, name) for name in STAGES}
        assert {node for nodes in before.values() for node in nodes} == {first.amqp_address}, before  # tried in order: all on the first
        leaders_on_victim = sum(queue_info(second, q)["leader"] == first.name for q in work + retries)

        pace_for(driver, 6.0)  # load: the initial reads and steady edits in flight
        lines_at_kill = {name: len(log_events(tmp_path, name)) for name in STAGES}
        held_at_kill = len(planner_sim.state.events())
        first.kill()
        killed_at = datetime.now(timezone.utc)
        pace_for(driver, 10.0)  # the edits go on while the workers find the other nodes

        survivors = {node.amqp_address for node in (cluster.nodes[1], cluster.nodes[2])}
        wait_for("every worker connected to a surviving node", lambda: all(
            set(nodes_reached(tmp_path, name, lines_at_kill[name])) & survivors for name in STAGES), 60)
        reconnected_in = max(  # the last worker's first connection to a surviving node, after the kill
            min(datetime.fromisoformat(event["timestamp"]) for event in log_events(tmp_path, name)[lines_at_kill[name]:]
                if event.get("event") == "broker_connected" and event["node"] in survivors) - killed_at
            for name in STAGES).total_seconds()
        broker = BrokerAt(second.amqp_port, second.management_url)
        settled_in = settle(planner_sim, broker, work + retries, driver.model.expected(), SETTLE_DEADLINE)

        # the dead-letter queues are classic queues on the node that declared them (the killed one): bring it back to look
        first.start()
        tally = account(Tally("cluster-node-killed", observed={}), driver, planner_sim, broker, topology.dead_letter_queues(), pipeline)
        tally.settled_in = settled_in
        after = {name: nodes_reached(tmp_path, name, lines_at_kill[name]) for name in STAGES}
        tally.observed = {
            "node_killed": 1,
            "quorum_leaders_on_killed_node": leaders_on_victim,
            "planner_events_at_kill": held_at_kill,
            "workers_reconnected_elsewhere": sum(bool(set(nodes) & survivors) for nodes in after.values()),
            "connection_lost_in_logs": sum(count for name in STAGES for event, count in pipeline.events(name).items() if "connection_lost" in event),
            "all_reconnected_within_ms": round(reconnected_in * 1000),
        }
        report(tally.line())
        assert not tally.problems(), f"{tally.line()}\n{tally.problems()}"
        assert tally.observed["workers_reconnected_elsewhere"] == len(STAGES), after
        assert held_at_kill < tally.expected, "the kill came after the work was done: it proves nothing"
    finally:
        if pipeline is not None:
            pipeline.stop_all()
        driver.close()
        ews.stop()
        exchangelib.protocol.close_connections()


@pytest.mark.soak  # waits for RabbitMQ's own at-least-once dead-lettering to retry once the node is back (minutes)
@pytest.mark.timeout(600)
def test_poison_messages_while_the_dead_letter_queues_node_is_down_wait_for_it_and_the_rest_flows(
    cluster: Cluster, worker_env: dict[str, str], planner_sim: RunningPlannerSim, processes: list[WorkerProcess], tmp_path: Path, report: Report,
) -> None:
    """Decision 81: the classic dead-letter queues live on the node that declared them. With that node down, poison
    messages cannot be dead-lettered; they must wait (not be lost, not stop the stage), and be in the dead-letter
    queue once the node is back, while every other change reaches Planner meanwhile."""
    first, second, _third = cluster.nodes
    if first not in cluster.up():  # the test before left it down (it failed before bringing it back)
        first.start()
    addresses = [f"cw{n:02d}.cluster-dlq@jobcenter.dk" for n in range(4)]
    ews = start_server(users={"svc": "pw"}, minute_seconds=2.0, keepalive_seconds=0.5, mailboxes=addresses)
    driver = Driver(ews, addresses, seed=32, prefix="cluster-32")
    pipeline: Pipeline | None = None
    try:
        env = pipeline_env(worker_env, None, planner_sim.url, ews, BrokerAt(first.amqp_port, first.management_url),
                           PLANNERSYNC_BROKER__HOSTS=cluster.hosts())
        topology = from_settings(settings_from_env(env).broker, settings_from_env(env).retry)
        enrol(env["PLANNERSYNC_DATABASE__URL"], addresses)
        driver.seed(4)
        pipeline = Pipeline(env, tmp_path, processes)
        pipeline.start()
        dlq = topology.stage("transformer").dead_letter_queue()
        wait_for("the dead-letter queue declared", lambda: queue_info(second, dlq).get("node") is not None, 60)
        assert queue_info(second, dlq)["node"] == first.name  # declared by the workers, through the first node
        # and bound: a worker declares every queue before any binding, and a kill in between would leave the queue
        # unbound once its node is back (no worker reconnects then to bind it), so dead letters could never reach it
        wait_for("the dead-letter queue bound", lambda: bound(second, topology.dead_letter_exchange, dlq), 60)

        first.kill()
        broker = BrokerAt(second.amqp_port, second.management_url)
        transformer_in = topology.stage("transformer").work_queue()
        wait_for("a new leader of the transformer's queue", lambda: queue_info(second, transformer_in).get("leader") not in (None, first.name), 30)
        poison = poison_bodies(addresses[0])
        broker.publish_raw(topology.calendar_exchange, topology.change_key(addresses[0]), poison)
        pace_for(driver, 8.0)  # the other changes go on
        # the transformer's queue keeps the poison messages (at-least-once dead-lettering waits for the target), so
        # the publisher's queues and Planner say when the rest has gone through
        work = [topology.stage("publisher").work_queue()] + [topology.stage(s).retry_queue(d) for s in ("transformer", "publisher") for d in topology.tiers()]
        settled_in = settle(planner_sim, broker, work, driver.model.expected(), SETTLE_DEADLINE)
        planner_while_down = planner_held(planner_sim) == driver.model.expected()
        # the dead letters the queue keeps for its target (the management API's figures are sampled every few seconds)
        wait_for("the poison messages held by the transformer's queue", lambda: (queue_info(second, transformer_in).get("messages_dlx") or 0) >= len(poison), 30)
        held = queue_info(second, transformer_in)["messages_dlx"]
        assert held == len(poison), f"the transformer's queue holds {held} dead letters, not only the {len(poison)} poison messages"

        first.start()  # RabbitMQ retries forwarding held dead letters every few minutes
        wait_for("the poison messages in the dead-letter queue", lambda: broker.depths([dlq])[dlq] >= len(poison), 400)
        tally = account(Tally("cluster-dlq-node-down", observed={}), driver, planner_sim, broker, topology.dead_letter_queues(), pipeline,
                        allowed_dead_letters={dlq: set(poison)})
        tally.settled_in = settled_in
        tally.observed.update({"dlq_node_killed": 1, "poison_published": len(poison), "held_while_down": held, "planner_equal_while_down": int(planner_while_down)})
        report(tally.line())
        assert not tally.problems(), f"{tally.line()}\n{tally.problems()}"
        assert planner_while_down, "the other changes did not reach Planner while the dead-letter queue's node was down"
        assert tally.observed["dead_lettered_on_purpose:transformer"] == len(poison)
    finally:
        if pipeline is not None:
            pipeline.stop_all()
        driver.close()
        ews.stop()
        exchangelib.protocol.close_connections()
