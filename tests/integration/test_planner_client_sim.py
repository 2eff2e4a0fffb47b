"""The Planner client against the Planner simulator over HTTPS with client certificates (throwaway CA)."""

from __future__ import annotations

import ssl
import threading
import tracemalloc
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests
from structlog.testing import capture_logs

from shared.adapters.planner_client import (
    CallResult,
    PlannerClient,
    PlannerEvent,
    Receipt,
)
from shared.config import PlannerSettings, RetrySettings
from shared.domain.retry import Permanent, Transient
from simulators.planner.server import RunningPlannerSim, SimTLS, start_server
from simulators.planner.state import SimResource
from tests.support.dripping_server import DrippingServer, DripTLS
from tests.support.planner_control import SimControl
from tests.support.tls import ThrowawayPKI

pytestmark = pytest.mark.timeout(120)

MAILBOX = "anna.jensen@testkommune.dk"
OTHER = "bo.hansen@testkommune.dk"
RESOURCES = [
    {"name": "Anna Jensen", "rid": "CVR:55568510-RID:1001", "email": MAILBOX, "is_case_worker": True},
    {"name": "Mødelokale 2", "rid": "CVR:55568510-RID:2002", "email": "lokale2@testkommune.dk", "is_case_worker": False, "description": "Lokale"},
]
QUICK = RetrySettings(quick_attempts=3, quick_max_wait="20ms")
T0 = datetime(2026, 5, 4, 7, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def sim(pki: ThrowawayPKI) -> Iterator[RunningPlannerSim]:
    running = start_server(
        tls=SimTLS(pki.server_cert, pki.server_key, client_ca=pki.ca_cert),
        resources=[SimResource.from_json(item) for item in RESOURCES],
        planner_uid_patterns=[r"^PLANNER-"],
    )
    yield running
    running.stop()


@pytest.fixture
def control(sim: RunningPlannerSim, pki: ThrowawayPKI) -> Iterator[SimControl]:
    control = SimControl(sim, pki)
    control.reset()
    yield control
    control.close()


@pytest.fixture
def make_client(sim: RunningPlannerSim, pki: ThrowawayPKI) -> Iterator[Callable[..., PlannerClient]]:
    built: list[PlannerClient] = []

    def build(retry: RetrySettings = QUICK, **overrides: Any) -> PlannerClient:
        values: dict[str, Any] = {
            "endpoint": sim.url,
            "ca_bundle": pki.ca_cert,
            "client_cert_p12": pki.client_p12,
            "client_cert_passphrase_file": str(pki.client_p12_passphrase_file),
            "timeout": "5s",
        }
        values.update(overrides)
        client = PlannerClient.from_settings(PlannerSettings(**{k: v for k, v in values.items() if v is not None}), retry)
        built.append(client)
        return client

    yield build
    for client in built:
        client.close()


def event(origin_id: str, start: datetime = T0, minutes: int = 60, email: str = MAILBOX) -> PlannerEvent:
    return PlannerEvent(origin_id, email, start, start + timedelta(minutes=minutes))


def by_origin(result: CallResult) -> dict[str, Receipt]:
    return {receipt.origin_id: receipt for receipt in result.receipts}


# --------------------------------------------------------------------------------------------- TLS


def test_a_client_with_the_pkcs12_certificate_and_passphrase_file_is_served(make_client, control) -> None:
    result = make_client().create_events([event("uid-p12")])
    assert [receipt.code for receipt in result.receipts] == [0]
    assert control.calls("CreateEvents")[0]["origin_ids"] == ["uid-p12"]


def test_a_client_with_a_pem_pair_is_served(make_client, pki, control) -> None:
    client = make_client(client_cert_p12=None, client_cert_passphrase_file=None, client_cert_pem=pki.client_cert, client_key_pem=pki.client_key)
    assert [r.email for r in client.get_resources()] == [MAILBOX, "lokale2@testkommune.dk"]


def test_a_request_without_a_client_certificate_is_refused(make_client, control) -> None:
    client = make_client(client_cert_p12=None, client_cert_passphrase_file=None)
    with pytest.raises(Transient):
        client.create_events([event("uid-nocert")])
    assert control.calls() == []


def test_the_control_api_also_requires_the_client_certificate(sim, pki) -> None:
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(sim.control_url + "/health", verify=str(pki.ca_cert), timeout=10)


def test_an_untrusted_server_certificate_fails_loudly_even_when_requests_ca_bundle_trusts_it(
    make_client, pki, control, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.ca_cert))  # the environment trusts the server...
    monkeypatch.setenv("CURL_CA_BUNDLE", str(pki.ca_cert))
    client = make_client(ca_bundle=pki.other_ca_cert)  # ...the configuration does not
    with pytest.raises(Transient, match="certificate verify failed"):
        client.create_events([event("uid-untrusted")])
    assert control.calls() == []


def test_the_system_store_does_not_trust_the_throwaway_ca_whatever_requests_ca_bundle_says(
    make_client, pki, control, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.ca_cert))
    client = make_client(ca_bundle=None)
    with pytest.raises(Transient, match="certificate verify failed"):
        client.get_resources()


def test_the_configured_bundle_wins_over_a_requests_ca_bundle_pointing_at_the_system_store(
    make_client, control, monkeypatch: pytest.MonkeyPatch
) -> None:
    system_bundle = ssl.get_default_verify_paths().openssl_cafile
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", system_bundle)
    monkeypatch.setenv("CURL_CA_BUNDLE", system_bundle)
    assert len(make_client().get_resources()) == 2


def test_a_server_with_a_certificate_from_another_ca_is_refused(pki, make_client) -> None:
    rogue = start_server(tls=SimTLS(pki.rogue_server_cert, pki.rogue_server_key, client_ca=pki.ca_cert))
    try:
        client = make_client(endpoint=rogue.url)
        with pytest.raises(Transient, match="certificate verify failed"):
            client.get_resources()
        assert rogue.state.calls() == []
    finally:
        rogue.stop()


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_insecure_skip_verify_reaches_a_server_no_ca_vouches_for(pki, make_client) -> None:
    rogue = start_server(tls=SimTLS(pki.rogue_server_cert, pki.rogue_server_key, client_ca=pki.ca_cert))
    try:
        client = make_client(endpoint=rogue.url, ca_bundle=None, insecure_skip_verify=True)
        assert client.get_resources() == []
    finally:
        rogue.stop()


class Clock:
    """A clock the test moves: minutes of failing calls pass without waiting for them."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.mark.parametrize(
    ("overrides", "cause"),
    [
        ({"client_cert_p12": None, "client_cert_passphrase_file": None}, "no client certificate offered"),
        ({"ca_bundle": "other"}, "server certificate not trusted"),
    ],
    ids=["no-client-certificate", "untrusted-server"],
)
def test_tls_failures_that_go_on_for_minutes_become_an_error_naming_the_cause(sim, pki, control, overrides, cause: str) -> None:
    values: dict[str, Any] = {
        "endpoint": sim.url,
        "ca_bundle": pki.ca_cert,
        "client_cert_p12": pki.client_p12,
        "client_cert_passphrase_file": str(pki.client_p12_passphrase_file),
        "timeout": "5s",
        **overrides,
    }
    if values["ca_bundle"] == "other":
        values["ca_bundle"] = pki.other_ca_cert
    clock = Clock()
    client = PlannerClient(PlannerSettings(**{k: v for k, v in values.items() if v is not None}), RetrySettings(quick_attempts=1), clock=clock)
    try:
        with capture_logs() as logs:
            for minute in range(0, 7):  # a call a minute, each refused in the handshake
                clock.now = T0 + timedelta(minutes=minute)
                with pytest.raises(Transient, match=cause):
                    client.create_events([event("uid-tls")])
                if minute < 5:
                    assert client.tls_trouble() is None, f"raised after only {minute} minutes"
        trouble = client.tls_trouble()
        assert trouble is not None and trouble.cause.startswith(cause) and trouble.since == T0
        errors = [entry for entry in logs if entry["event"] == "planner_tls_failing"]
        assert errors and all(entry["log_level"] == "error" for entry in errors)
        assert errors[0]["cause"].startswith(cause)
        assert control.calls() == []
    finally:
        client.close()


# --------------------------------------------------------------------------------------------- receipts


def test_create_then_create_again_gives_0_then_8_with_the_same_planner_id(make_client, control) -> None:
    client = make_client()
    first = client.create_events([event("uid-1")]).receipts[0]
    second = client.create_events([event("uid-1")]).receipts[0]
    assert (first.code, second.code) == (0, 8)
    assert first.planner_event_id == second.planner_event_id
    assert first.planner_resource_id == control.get("/resources")["resources"][0]["planner_resource_id"]
    assert first.received_at is not None and first.received_at.tzinfo == timezone.utc


def test_update_and_delete_of_an_unknown_event_give_10(make_client) -> None:
    client = make_client()
    assert [r.code for r in client.update_events([event("uid-unknown")]).receipts] == [10]
    assert [r.code for r in client.delete_events([event("uid-unknown")]).receipts] == [10]


def test_update_and_delete_of_a_known_event_give_0_and_change_what_planner_holds(make_client, control) -> None:
    client = make_client()
    client.create_events([event("uid-2")])
    assert client.update_events([event("uid-2", start=T0 + timedelta(hours=2))]).receipts[0].code == 0
    held = control.get("/events", email=MAILBOX)["events"]
    assert [datetime.fromisoformat(e["start"]) for e in held] == [T0 + timedelta(hours=2)]
    assert client.delete_events([event("uid-2")]).receipts[0].code == 0
    assert control.get("/events", email=MAILBOX)["events"] == []


def test_an_event_planner_put_in_the_calendar_gives_13(make_client) -> None:
    receipt = make_client().create_events([event("PLANNER-4711")]).receipts[0]
    assert (receipt.origin_id, receipt.code) == ("PLANNER-4711", 13)
    assert receipt.message


@pytest.mark.parametrize("code", [15, 16, 5])
def test_a_chosen_receipt_code_and_message_are_returned_and_parsed(make_client, control, code: int) -> None:
    control.fault(type="receipt_code", code=code, message=f"chosen {code}", origin_ids=["uid-chosen"], times=1)
    client = make_client()
    first = client.create_events([event("uid-chosen")]).receipts[0]
    second = client.create_events([event("uid-chosen")]).receipts[0]
    assert (first.code, first.message) == (code, f"chosen {code}")
    assert second.code == 0  # "times": 1 — the next try goes through


def test_a_mixed_batch_gives_one_receipt_per_event_matched_by_origin_id(make_client, control) -> None:
    client = make_client()
    client.create_events([event("uid-exists")])
    control.fault(type="receipt_code", code=5, message="bad", origin_ids=["uid-bad"])
    result = client.create_events([event("uid-new"), event("uid-bad"), event("uid-exists"), event("PLANNER-1")])
    codes = {origin: receipt.code for origin, receipt in by_origin(result).items()}
    assert codes == {"uid-new": 0, "uid-bad": 5, "uid-exists": 8, "PLANNER-1": 13}
    assert len(result.receipts) == 4
    assert result.reference and control.calls("CreateEvents")[-1]["codes"] == [0, 5, 8, 13]


def test_a_batch_for_two_mailboxes_is_refused_before_sending(make_client, control) -> None:
    with pytest.raises(Permanent):
        make_client().create_events([event("a"), event("b", email=OTHER)])
    assert control.calls() == []


# --------------------------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "http_status", "status": 500},
        {"type": "http_status", "status": 503},
        {"type": "reset"},
        {"type": "outage", "seconds": 600, "mode": "503"},
        {"type": "outage", "seconds": 600, "mode": "reset"},
        {"type": "soap_fault", "error_code": 15},
        {"type": "soap_fault", "error_code": 16},
        {"type": "soap_fault"},
    ],
    ids=["500", "503", "reset", "outage-503", "outage-reset", "fault-15", "fault-16", "fault-without-code"],
)
def test_a_transient_failure_is_retried_quickly_then_raised_as_transient(make_client, control, spec) -> None:
    control.fault(**spec)
    with pytest.raises(Transient) as raised:
        make_client().create_events([event("uid-t")])
    assert len(control.calls("CreateEvents")) == QUICK.quick_attempts
    if spec.get("error_code") is not None:
        assert raised.value.code == spec["error_code"]


def test_a_transient_failure_that_clears_within_the_quick_tries_succeeds(make_client, control) -> None:
    control.fault(type="http_status", status=503, times=2)
    result = make_client().create_events([event("uid-recovers")])
    assert [r.code for r in result.receipts] == [0]
    assert [call["outcome"] for call in control.calls("CreateEvents")] == ["http_503", "http_503", "ok"]


def test_a_call_builds_its_envelope_once_and_a_retry_builds_its_own(make_client, control, monkeypatch) -> None:
    """Decision 116: the envelope built before sending, to find content errors, is the one sent (zeep's service call
    built it a second time before); a later quick try builds its own, with the registration time of its attempt."""
    client = make_client()
    binding = client._service._binding
    real = binding._create
    built: list[Any] = []

    def counting(*args: Any, **kwargs: Any) -> Any:
        envelope, headers = real(*args, **kwargs)
        built.append(envelope)
        return envelope, headers

    monkeypatch.setattr(binding, "_create", counting)
    assert [r.code for r in client.create_events([event("uid-once")]).receipts] == [0]
    assert len(built) == 1
    control.fault(type="http_status", status=503, times=1)
    assert [r.code for r in client.create_events([event("uid-retried")]).receipts] == [0]
    assert len(built) == 3
    assert [call["outcome"] for call in control.calls("CreateEvents")] == ["ok", "http_503", "ok"]
    held = client.get_events([MAILBOX], T0 - timedelta(days=1), T0 + timedelta(days=1))   # a read is built once too
    assert sorted(e.origin_id for e in held) == ["uid-once", "uid-retried"]
    assert len(built) == 4


def test_latency_beyond_the_timeout_is_transient_after_the_quick_tries(make_client, control) -> None:
    control.fault(type="latency", seconds=3)
    with pytest.raises(Transient, match="timeout"):
        make_client(timeout="300ms").get_resources()
    assert len(control.calls("GetResources")) == QUICK.quick_attempts


@pytest.mark.parametrize("code", [3, 7, 14])
def test_a_soap_fault_with_a_permanent_error_code_is_permanent_and_not_retried(make_client, control, code) -> None:
    control.fault(type="soap_fault", error_code=code, message="nope")
    with pytest.raises(Permanent) as raised:
        make_client().update_events([event("uid-p")])
    assert raised.value.code == code
    assert len(control.calls("UpdateEvents")) == 1


def test_http_4xx_is_permanent_but_429_is_transient(make_client, control) -> None:
    control.fault(type="http_status", status=403, times=1)
    with pytest.raises(Permanent, match="HTTP 403"):
        make_client().get_resources()
    control.post("/reset")
    control.fault(type="http_status", status=429)
    with pytest.raises(Transient, match="HTTP 429"):
        make_client().get_resources()


def test_a_response_that_is_not_xml_is_a_transient_failure(make_client, control) -> None:
    control.fault(type="garbage", kind="not_xml")
    with pytest.raises(Transient, match="unparsable"):
        make_client().create_events([event("uid-g")])


def test_a_billion_laughs_response_is_refused_with_bounded_memory(make_client, control) -> None:
    control.fault(type="garbage", kind="billion_laughs")
    client = make_client()
    tracemalloc.start()
    try:
        with pytest.raises(Transient, match="unparsable"):
            client.create_events([event("uid-lol")])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 1024 * 1024
    assert {call["outcome"] for call in control.calls("CreateEvents")} == {"garbage_billion_laughs"}


@pytest.mark.parametrize("declare_length", [True, False], ids=["content-length", "streamed"])
def test_an_oversized_response_is_cut_off_at_the_cap(make_client, control, declare_length: bool) -> None:
    control.fault(type="garbage", kind="oversized", size=200 * 1024 * 1024, declare_length=declare_length)
    client = make_client(max_response_bytes=64 * 1024)
    tracemalloc.start()
    try:
        with pytest.raises(Transient, match="cap"):
            client.get_resources()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 1024 * 1024


def test_an_invalid_request_gets_a_soap_fault_naming_the_missing_header(sim, pki, control) -> None:
    envelope = """<?xml version="1.0" encoding="utf-8"?>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">
  <s:Header>
    <aoh:ActiveOrganisationHeader xmlns:aoh="http://rep.oio.dk/ams.dk/xml/schemas/2005/09/01/">
      <aoh:OrganisationTypeIdentifier>8</aoh:OrganisationTypeIdentifier>
      <aoh:OrganisationCode>10100</aoh:OrganisationCode>
    </aoh:ActiveOrganisationHeader>
  </s:Header>
  <s:Body>
    <ecs:GetResourcesRequest xmlns:ecs="http://service.bm.dk/PlannerExternalCalendarService/2015/03/27/"/>
  </s:Body>
</s:Envelope>"""
    response = control.session.post(
        sim.url,
        data=envelope.encode("utf-8"),
        headers={
            "Content-Type": "text/xml; charset=utf-8",
            "SOAPAction": '"http://service.bm.dk/pjaktass/1/PlannerExternalCalendarService#GetResources"',
        },
        timeout=10,
    )
    assert response.status_code == 500
    assert b"faultcode" in response.content and b"RequestUserMetadataHeader" in response.content
    assert b"<f:ErrorCode>1</f:ErrorCode>" in response.content
    assert control.calls()[-1]["outcome"] == "invalid_request"


# --------------------------------------------------------------------------------------------- deadlines


def _call_in_thread(call: Callable[[], Any], bound: float) -> BaseException | None:
    """Run ``call`` in a thread; fail when it is still running after ``bound`` seconds (a hung call must not hang the test)."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(bound)
    assert not thread.is_alive(), f"the call was still hanging after {bound} s"
    return outcome[0]


@pytest.mark.parametrize("drip_headers", [False, True], ids=["body", "headers"])
@pytest.mark.parametrize("tls", [False, True], ids=["http", "https-mtls"])
def test_a_response_dripped_within_the_read_timeout_is_cut_at_the_total_deadline(make_client, pki, drip_headers: bool, tls: bool) -> None:
    # Each byte comes well within the 1 s read timeout, the promised body never ends: only a total deadline stops it.
    server_tls = DripTLS(pki.server_cert, pki.server_key, client_ca=pki.ca_cert) if tls else None
    with DrippingServer(interval=0.1, body_length=100_000, drip_headers=drip_headers, tls=server_tls) as drip:
        client = make_client(endpoint=drip.url, timeout="1s")
        error = _call_in_thread(lambda: client.create_events([event("uid-drip")]), bound=40)
        assert isinstance(error, Transient), error
        assert "deadline" in error.reason
        assert drip.requests == QUICK.quick_attempts  # every quick try was cut, then the failure went to the caller


# --------------------------------------------------------------------------------------------- reads


def test_get_resources_returns_the_seeded_resources(make_client) -> None:
    resources = {resource.email: resource for resource in make_client().get_resources()}
    assert resources[MAILBOX].rid == "CVR:55568510-RID:1001"
    assert resources[MAILBOX].is_case_worker is True
    assert resources["lokale2@testkommune.dk"].is_case_worker is False
    assert resources["lokale2@testkommune.dk"].description == "Lokale"
    assert all(resource.planner_resource_id for resource in resources.values())


def test_get_events_returns_what_was_created_for_the_asked_mailboxes_and_range(make_client) -> None:
    client = make_client()
    client.create_events([event("uid-a"), event("uid-later", start=T0 + timedelta(days=40))])
    client.create_events([event("uid-b", email=OTHER)])
    found = client.get_events([MAILBOX], T0 - timedelta(days=1), T0 + timedelta(days=30))
    assert [(e.origin_id, e.start, e.end) for e in found] == [("uid-a", T0, T0 + timedelta(hours=1))]
    assert found[0].planner_event_id


SPRING = datetime(2026, 3, 29, 1, 0, tzinfo=timezone.utc)  # 02:00 CET becomes 03:00 CEST
AUTUMN = datetime(2026, 10, 25, 1, 0, tzinfo=timezone.utc)  # 03:00 CEST becomes 02:00 CET


@pytest.mark.parametrize("change", [SPRING, AUTUMN], ids=["spring", "autumn"])
def test_times_across_a_dst_change_come_back_equal(make_client, control, change: datetime) -> None:
    client = make_client()
    sent = [
        event("uid-across", start=change - timedelta(minutes=30), minutes=60),
        event("uid-before", start=change - timedelta(minutes=90), minutes=30),
        event("uid-after", start=change + timedelta(minutes=15), minutes=45),
    ]
    assert {r.code for r in client.create_events(sent).receipts} == {0}
    back = client.get_events([MAILBOX], change - timedelta(days=1), change + timedelta(days=1))
    assert {(e.origin_id, e.start, e.end) for e in back} == {(e.origin_id, e.start, e.end) for e in sent}
    held = {e["origin_id"]: e for e in control.get("/events", email=MAILBOX)["events"]}
    offsets = {held["uid-across"]["start"][-6:], held["uid-across"]["end"][-6:]}
    assert offsets == {"+01:00", "+02:00"}


# --------------------------------------------------------------------------------------------- CLI


def test_the_simulator_runs_as_a_process_with_tls_and_seeded_resources(pki, tmp_path: Path) -> None:
    import json
    import re
    import subprocess
    import sys

    seed = tmp_path / "resources.json"
    seed.write_text(json.dumps(RESOURCES), encoding="utf-8")
    args = [sys.executable, "-m", "simulators.planner", "--port", "0", "--tls-cert", str(pki.server_cert),
            "--tls-key", str(pki.server_key), "--client-ca", str(pki.ca_cert), "--seed-resources", str(seed)]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert process.stdout is not None
        for line in process.stdout:  # the start line is printed once the port is bound
            match = re.search(r"control (\S+)/", line)
            if match:
                break
        else:
            pytest.fail("the simulator exited without announcing its URLs")
        health = requests.get(match.group(1) + "/health", verify=str(pki.ca_cert),
                              cert=(str(pki.client_cert), str(pki.client_key)), timeout=10)
        assert health.json()["resources"] == 2
    finally:
        process.terminate()
        assert process.wait(timeout=20) == 0
