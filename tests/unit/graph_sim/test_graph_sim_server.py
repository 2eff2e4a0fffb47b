"""The Graph simulator over HTTP(S): control API, identity endpoints, bearer tokens, and ``python -m simulators.graph``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from simulators.exchange.server import start_server as start_ews
from simulators.graph.server import RunningGraphSim, start_server
from tests.support.tls import write_pki

MB = "anne@k.dk"
REPO = Path(__file__).resolve().parents[3]
WINDOW = {"startDateTime": "2026-10-19T00:00:00Z", "endDateTime": "2026-10-26T00:00:00Z"}


@pytest.fixture
def sim() -> Iterator[RunningGraphSim]:
    running = start_server(mailboxes=[MB])
    yield running
    running.stop()


def token(sim: RunningGraphSim, secret: str = "sim-secret") -> requests.Response:
    form = {"grant_type": "client_credentials", "client_id": "plannersync-sim", "client_secret": secret,
            "scope": "https://graph.microsoft.com/.default"}
    return requests.post(f"{sim.authority_url}/{sim.tenant}/oauth2/v2.0/token", data=form, timeout=5)


def test_discovery_token_and_bearer(sim: RunningGraphSim) -> None:
    doc = requests.get(f"{sim.authority_url}/{sim.tenant}/v2.0/.well-known/openid-configuration", timeout=5).json()
    assert doc["token_endpoint"] == f"{sim.authority_url}/{sim.tenant}/oauth2/v2.0/token"
    assert requests.get(f"{sim.authority_url}/other/v2.0/.well-known/openid-configuration", timeout=5).status_code == 400
    assert requests.get(f"{sim.authority_url}/common/discovery/instance", timeout=5).json()["tenant_discovery_endpoint"].endswith(
        "/v2.0/.well-known/openid-configuration")
    refused = token(sim, "wrong")
    assert refused.status_code == 401 and refused.json()["error"] == "invalid_client"
    answer = token(sim).json()
    assert answer["token_type"] == "Bearer" and answer["expires_in"] == 3600
    url = f"{sim.url}/users/{MB}/calendarView"
    unauthorized = requests.get(url, params=WINDOW, timeout=5)
    assert unauthorized.status_code == 401 and unauthorized.json()["error"]["code"] == "InvalidAuthenticationToken"
    ok = requests.get(url, params=WINDOW, headers={"Authorization": f"Bearer {answer['access_token']}"}, timeout=5)
    assert ok.status_code == 200 and ok.json()["value"] == []
    assert requests.get(f"{sim.control_url}/tokens", timeout=5).json()["issued"] == 1


def test_control_api_seeds_edits_and_faults(sim: RunningGraphSim) -> None:
    control = sim.control_url
    created = requests.post(f"{control}/mailboxes/{MB}/items", json={"uid": "u1", "subject": "S", "start": "2026-10-19T09:00",
                                                                     "recurrence": {"pattern": "daily", "count": 3}}, timeout=5)
    assert created.status_code == 201
    event_id = created.json()["id"]
    assert requests.get(f"{control}/mailboxes/{MB}/items/{event_id}", timeout=5).json()["uid"] == "u1"
    assert requests.get(f"{control}/mailboxes/{MB}/items/u1", timeout=5).json()["id"] == event_id
    assert requests.patch(f"{control}/mailboxes/{MB}/items/u1/occurrences", json={"index": 2, "start": "2026-10-20T11:00"},
                          timeout=5).status_code == 200
    assert requests.delete(f"{control}/mailboxes/{MB}/items/u1/occurrences", params={"index": "3"}, timeout=5).status_code == 200
    listed = requests.get(f"{control}/mailboxes/{MB}/items", timeout=5).json()
    assert listed[0]["modified_occurrences"] and listed[0]["deleted_occurrences"]
    fault = requests.post(f"{control}/faults", json={"kind": "throttle", "mailbox": MB, "retry_after": 5}, timeout=5)
    assert fault.status_code == 201 and requests.get(f"{control}/faults", timeout=5).json()[0]["kind"] == "throttle"
    assert requests.post(f"{control}/faults", json={"kind": "nope"}, timeout=5).status_code == 400
    bearer = {"Authorization": f"Bearer {token(sim).json()['access_token']}"}
    throttled = requests.get(f"{sim.url}/users/{MB}/calendarView", params=WINDOW, headers=bearer, timeout=5)
    assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "5"
    assert requests.delete(f"{control}/faults", timeout=5).json() == []
    assert requests.get(f"{control}/calls", params={"endpoint": "calendarView"}, timeout=5).json()[0]["status"] == 429
    assert requests.post(f"{control}/tokens/revoke", timeout=5).json()["revoked"] == 1
    ics = (REPO / "tests" / "fixtures" / "ics" / "caseworker-week.ics").read_text(encoding="utf-8")
    loaded = requests.post(f"{control}/mailboxes/bo@k.dk/ics", data=ics.encode(), headers={"Content-Type": "text/calendar"}, timeout=5)
    assert loaded.status_code == 201 and loaded.json()
    assert requests.post(f"{control}/reset", timeout=5).json() == {"reset": True}
    assert requests.get(f"{control}/mailboxes", timeout=5).json() == []
    assert requests.get(f"{control}/nothing", timeout=5).status_code == 404


def test_on_an_ews_simulators_store_an_edit_through_either_control_api_shows_in_both() -> None:
    ews = start_ews(mailboxes=[MB])
    graph = start_server(store=ews.state.store)
    try:
        requests.post(f"{ews.control_url}/mailboxes/{MB}/items", json={"uid": "via-ews", "start": "2026-10-19T09:00"}, timeout=5)
        requests.post(f"{graph.control_url}/mailboxes/{MB}/items", json={"uid": "via-graph", "start": "2026-10-19T10:00"}, timeout=5)
        assert {i["uid"] for i in requests.get(f"{graph.control_url}/mailboxes/{MB}/items", timeout=5).json()} == {"via-ews", "via-graph"}
        assert {i["uid"] for i in requests.get(f"{ews.control_url}/mailboxes/{MB}/items", timeout=5).json()} == {"via-ews", "via-graph"}
    finally:
        graph.stop()
        ews.stop()


def test_https_with_a_given_certificate(tmp_path: Path) -> None:
    pki = write_pki(tmp_path)
    with start_server(tls=(str(pki.server_cert), str(pki.server_key))) as secure:
        assert secure.url.startswith("https://")
        assert requests.get(f"{secure.control_url}/health", verify=str(pki.ca_cert), timeout=5).json()["status"] == "ok"
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{secure.control_url}/health", verify=str(pki.other_ca_cert), timeout=5)


def test_python_m_simulators_graph_serves_until_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "simulators.graph", "--port", "0", "--mailbox", MB, "--load",
                                f"{MB}={REPO / 'tests' / 'fixtures' / 'ics' / 'caseworker-week.ics'}"],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        line = ""
        while "Graph simulator:" not in line:
            line = process.stdout.readline()
            assert line, "the simulator exited before it printed its URL"
        control = line.split("control: ")[1].strip()
        boxes = requests.get(f"{control}/mailboxes", timeout=5).json()
        assert boxes[0]["address"] == MB and boxes[0]["items"] > 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
