"""Prometheus /metrics from running worker processes: `plannersync run transformer|publisher` after real messages.

Three busy times and one malformed message go through the transformer and publisher processes; Planner (the
simulator) answers 503 twice first, so one call fails past the quick tries and its messages climb a retry tier. The
counters must have moved accordingly: messages in and out, the malformed one as a failure and a dead letter, the
retry, Planner call latency and errors, receipt codes, the end-to-end lag, and each worker's own health.
"""

from __future__ import annotations

import re
import socket
from datetime import datetime, timezone
from pathlib import Path

import requests

from shared.broker.publishing import Outgoing, Publisher
from shared.broker.topology import Topology
from shared.config import Settings
from simulators.planner.server import RunningPlannerSim
from tests.e2e.test_pipeline import MAILBOX, busy_change, sim_events, tomorrow_at
from tests.support.broker import publish_raw
from tests.support.processes import WorkerProcess
from tests.support.waiting import wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """Every sample of a /metrics page by its name and labels as written (``name{a="b"}``)."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    samples = {}
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)$", line)
        if match:
            samples[match.group(1)] = float(match.group(2))
    return samples


def test_running_workers_expose_counters_that_move_with_the_messages(
    settings: Settings, topology: Topology, worker_env: dict[str, str], planner_sim: RunningPlannerSim, processes: list[WorkerProcess], tmp_path: Path
) -> None:
    ports = {"transformer": free_port(), "publisher": free_port()}
    base = {**worker_env, "PLANNERSYNC_PLANNER__ENDPOINT": planner_sim.url, "PLANNERSYNC_PLANNER__LINGER": "50ms"}
    processes.append(WorkerProcess("transformer", {**base, "PLANNERSYNC_STATUS__METRICS_PORT": str(ports["transformer"])}, tmp_path).start())
    processes.append(WorkerProcess("publisher", {**base, "PLANNERSYNC_STATUS__METRICS_PORT": str(ports["publisher"])}, tmp_path).start())
    for worker, port in ports.items():  # up before any message: every failure kind starts at 0
        first = wait_for(lambda port=port: _try_scrape(port), 60, what=f"{worker} /metrics")
        assert first[f'plannersync_messages_in_total{{stage="{worker}"}}'] == 0
        assert first[f'plannersync_message_failures_total{{reason="malformed",stage="{worker}"}}'] == 0
    requests.post(f"{planner_sim.control_url}/faults", json={"type": "http_status", "status": 503, "times": 2}, timeout=5).raise_for_status()

    publisher = Publisher(settings.broker, topology)
    observed = datetime.now(timezone.utc)
    for hour in (9, 11, 13):
        publisher.publish(Outgoing(topology.calendar_exchange, topology.change_key(MAILBOX), busy_change(tomorrow_at(hour), observed=observed)))
    publish_raw(topology.calendar_exchange, topology.change_key(MAILBOX), b'{"schema_version": 1, "type": "nonsense"}')
    wait_for(lambda: len(sim_events(planner_sim)) == 3, 90, what="three busy times in Planner")

    def settled() -> dict[str, float] | None:
        t, p = scrape(ports["transformer"]), scrape(ports["publisher"])
        done = t['plannersync_messages_handled_total{stage="transformer"}'] >= 3 and p['plannersync_messages_handled_total{stage="publisher"}'] >= 3
        return {**t, **{f"publisher:{k}": v for k, v in p.items()}} if done else None

    m = wait_for(settled, 30, what="both workers to count their messages")
    t = {k: v for k, v in m.items() if not k.startswith("publisher:")}
    p = {k[len("publisher:") :]: v for k, v in m.items() if k.startswith("publisher:")}

    # transformer: 4 in, 3 states out, the malformed one failed and dead-lettered, the rest handled
    assert t['plannersync_messages_in_total{stage="transformer"}'] == 4
    assert t['plannersync_messages_out_total{stage="transformer"}'] == 3
    assert t['plannersync_message_failures_total{reason="malformed",stage="transformer"}'] == 1
    assert t['plannersync_dead_letters_total{stage="transformer"}'] == 1
    assert t['plannersync_worker_ok{worker="transformer"}'] == 1
    assert t['plannersync_worker_beat_timestamp_seconds{worker="transformer"}'] > observed.timestamp()

    # publisher: the 503s past the quick tries made one transient failure per message of that call, and a retry each
    transient = p['plannersync_message_failures_total{reason="transient",stage="publisher"}']
    assert transient >= 1 and p['plannersync_retries_total{stage="publisher"}'] == transient
    assert p['plannersync_dead_letters_total{stage="publisher"}'] == 0
    assert p['plannersync_messages_in_total{stage="publisher"}'] == 3 + transient  # the retried ones came back
    assert p['plannersync_planner_call_errors_total{kind="transient",operation="create"}'] >= 1
    assert p['plannersync_planner_call_seconds_count{operation="create"}'] >= 2
    assert p['plannersync_planner_call_seconds_sum{operation="create"}'] > 0
    assert p['plannersync_planner_receipts_total{code="0",operation="create"}'] == 3
    # end-to-end lag: from the Exchange read (observed_at, the state's version) to the receipt, for each busy time
    assert p['plannersync_end_to_end_lag_seconds_count{cause="change",operation="create"}'] == 3
    elapsed = (datetime.now(timezone.utc) - observed).total_seconds()
    assert 0 < p['plannersync_end_to_end_lag_seconds_sum{cause="change",operation="create"}'] <= 3 * elapsed
    assert p['plannersync_worker_ok{worker="publisher"}'] == 1


def test_metrics_are_off_unless_a_port_is_given_and_a_taken_port_is_one_line(worker_env: dict[str, str], tmp_path: Path, topology: Topology) -> None:
    import json
    import subprocess

    from tests.support.processes import PLANNERSYNC

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([PLANNERSYNC, "run", "transformer", "--metrics-port", str(port)], env=worker_env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    crashed = [json.loads(line) for line in done.stderr.splitlines() if '"worker_crashed"' in line]
    assert crashed and f"cannot serve metrics on 127.0.0.1:{port}" in crashed[0]["problem"]
    assert "PLANNERSYNC_STATUS__METRICS_PORT" in crashed[0]["problem"]


def _try_scrape(port: int) -> dict[str, float] | None:
    try:
        return scrape(port)
    except requests.RequestException:
        return None


def test_every_metric_the_shipped_alert_rules_use_is_one_plannersync_exports() -> None:
    import yaml

    root = Path(__file__).resolve().parents[2]
    rules = yaml.safe_load((root / "deploy" / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    assert {"PlannersyncWorkerDown", "PlannersyncDeadLetters", "PlannersyncLagHigh", "PlannersyncCertificateExpiresSoon", "PlannersyncNightlyRunMissed"} <= {
        rule["alert"] for rule in rules
    }
    defined = (root / "shared" / "metrics.py").read_text() + (root / "plannersync" / "status_page.py").read_text()
    for rule in rules:
        for name in re.findall(r"\bplannersync_[a-z_]+", rule["expr"]):
            base = re.sub(r"_(total|bucket|count|sum)$", "", name)
            stem = re.sub(r"^plannersync_(worker|health_file)_", "", base)  # health_samples builds these from a prefix
            assert f'"{base}"' in defined or f'_{stem}"' in defined, f"{rule['alert']} uses {name}, which nothing exports"
