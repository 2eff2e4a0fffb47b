"""Every Exchange call is timed and every failure counted by kind, for EWS and Graph alike (runbooks/monitoring.md):
``plannersync_exchange_call_seconds{backend,call}`` and ``plannersync_exchange_call_errors{backend,call,kind}``.
Measured against the simulators, with faults they inject."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import exchangelib.protocol
import pytest
import requests
from prometheus_client import REGISTRY

from shared.adapters.ews import EwsConnection
from shared.adapters.graph import DeltaRound, GraphError, GraphReader
from shared.config import ExchangeSettings
from shared.domain.contracts import Interval
from simulators.exchange.server import RunningExchangeSim
from simulators.exchange.server import start_server as start_ews
from simulators.graph.server import RunningGraphSim
from simulators.graph.server import start_server as start_graph
from tests.support.graph import graph_settings
from tests.support.tls import ThrowawayPKI

ANNE, BO = "anne@kommune.example", "bo@kommune.example"


def calls(backend: str, call: str) -> float:
    return REGISTRY.get_sample_value("plannersync_exchange_call_seconds_count", {"backend": backend, "call": call}) or 0.0


def errors(backend: str, call: str, kind: str) -> float:
    return REGISTRY.get_sample_value("plannersync_exchange_call_errors_total", {"backend": backend, "call": call, "kind": kind}) or 0.0


def window() -> Interval:
    now = datetime.now(UTC)
    return Interval(start=now, end=now + timedelta(days=30))


@pytest.fixture
def graph(pki: ThrowawayPKI) -> Iterator[RunningGraphSim]:
    sim = start_graph(tls=(str(pki.server_cert), str(pki.server_key)), mailboxes=[ANNE, BO])
    yield sim
    sim.stop()


@pytest.fixture
def ews() -> Iterator[RunningExchangeSim]:
    sim = start_ews(users={"svc": "pw"}, mailboxes=[ANNE])
    yield sim
    sim.stop()
    exchangelib.protocol.close_connections()


def test_graph_calls_are_timed_and_their_faults_counted_by_kind(graph: RunningGraphSim, pki: ThrowawayPKI) -> None:
    reader = GraphReader(graph_settings(graph, ca_bundle=pki.ca_cert))
    before = (calls("graph", "sync"), calls("graph", "view"), calls("graph", "sync_batch"))
    throttled = errors("graph", "sync", "throttled")
    in_batch = errors("graph", "sync_batch", "throttled")
    reader.sync(ANNE, None, window())
    reader.view(ANNE, window())
    requests.post(f"{graph.control_url}/faults", json={"kind": "throttle", "mailbox": ANNE, "endpoint": "delta", "count": 1, "retry_after": 1},
                  timeout=10, verify=str(pki.ca_cert)).raise_for_status()
    with pytest.raises(GraphError):
        reader.sync(ANNE, None, window())
    requests.post(f"{graph.control_url}/faults", json={"kind": "throttle", "mailbox": ANNE, "endpoint": "delta", "count": 1, "retry_after": 1},
                  timeout=10, verify=str(pki.ca_cert)).raise_for_status()
    results = reader.sync_many([DeltaRound(ANNE, None, window()), DeltaRound(BO, None, window())])
    assert (calls("graph", "sync"), calls("graph", "view"), calls("graph", "sync_batch")) == (before[0] + 2, before[1] + 1, before[2] + 1)
    assert errors("graph", "sync", "throttled") == throttled + 1
    assert errors("graph", "sync_batch", "throttled") == in_batch + 1   # ANNE's part failed, BO's did not
    assert not isinstance(results[BO], Exception)
    reader.close()


def test_ews_calls_are_timed_and_their_faults_counted_by_kind(ews: RunningExchangeSim) -> None:
    settings = ExchangeSettings(endpoint=ews.url, username="svc", password="pw")
    connection = EwsConnection(settings, "Europe/Copenhagen", pool_size=2)
    before = calls("ews", "sync")
    busy = errors("ews", "sync", "throttled")
    connection.sync(ANNE, None)
    requests.post(f"{ews.control_url}/faults", json={"kind": "server_busy", "mailbox": ANNE, "operations": ["SyncFolderItems"], "count": 1,
                                                     "back_off_ms": 100}, timeout=10).raise_for_status()
    with pytest.raises(Exception):  # noqa: B017 - exchangelib's ErrorServerBusy; the counter is what is checked
        connection.sync(ANNE, None)
    assert calls("ews", "sync") == before + 2
    assert errors("ews", "sync", "throttled") == busy + 1
    connection.close()
