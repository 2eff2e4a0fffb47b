"""Pure parts of the Planner client: times on the wire, failure classification, TLS session pinning."""

from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest
import requests
import structlog
import zeep.exceptions
from lxml import etree

from shared.adapters.planner_client import (
    PinnedSession,
    PlannerClient,
    PlannerEvent,
    ResponseTooLarge,
    build_session,
    classify,
    events_payload,
    fault_error_code,
    from_wire,
    to_wire,
)
from shared.config import PlannerSettings, RetrySettings
from shared.domain.retry import Permanent, Transient

CPH = ZoneInfo("Europe/Copenhagen")


@pytest.mark.parametrize(
    ("utc", "wire"),
    [
        (datetime(2026, 3, 29, 0, 59, tzinfo=timezone.utc), "2026-03-29T01:59:00+01:00"),
        (datetime(2026, 3, 29, 1, 0, tzinfo=timezone.utc), "2026-03-29T03:00:00+02:00"),
        (datetime(2026, 10, 25, 0, 30, tzinfo=timezone.utc), "2026-10-25T02:30:00+02:00"),
        (datetime(2026, 10, 25, 1, 30, tzinfo=timezone.utc), "2026-10-25T02:30:00+01:00"),
    ],
)
def test_times_go_out_with_the_offset_of_copenhagen_and_come_back_as_the_same_utc_instant(utc: datetime, wire: str) -> None:
    assert to_wire(utc, CPH) == wire
    assert from_wire(datetime.fromisoformat(wire), CPH) == utc


def test_a_time_without_offset_from_planner_is_read_as_copenhagen_local_time() -> None:
    assert from_wire(datetime(2026, 7, 1, 12, 0), CPH) == datetime(2026, 7, 1, 10, 0, tzinfo=timezone.utc)


def test_a_naive_time_is_refused_before_sending() -> None:
    with pytest.raises(Permanent, match="naive"):
        to_wire(datetime(2026, 7, 1, 12, 0), CPH)


def test_a_batch_must_hold_one_mailbox_compared_case_insensitively() -> None:
    start, end = datetime(2026, 7, 1, 8, tzinfo=timezone.utc), datetime(2026, 7, 1, 9, tzinfo=timezone.utc)
    payload = events_payload([PlannerEvent("a", "X@k.dk", start, end), PlannerEvent("b", "x@k.dk", start, end)], CPH)
    assert len(payload["CalendarEvent"]) == 2
    with pytest.raises(Permanent, match="one mailbox"):
        events_payload([PlannerEvent("a", "x@k.dk", start, end), PlannerEvent("b", "y@k.dk", start, end)], CPH)


def _fault(code: int | None) -> zeep.exceptions.Fault:
    detail = etree.fromstring(
        '<detail><f:FaultDetails xmlns:f="http://service.bm.dk/xml/schemas/2011/01/12/">'
        + (f"<f:ErrorCode>{code}</f:ErrorCode>" if code is not None else "")
        + "<f:Message>m</f:Message></f:FaultDetails></detail>"
    )
    return zeep.exceptions.Fault("boom", code="s:Server", detail=detail)


@pytest.mark.parametrize(
    ("error", "kind", "code"),
    [
        (requests.ReadTimeout(), Transient, None),
        (requests.ConnectionError(), Transient, None),
        (ResponseTooLarge("too big"), Transient, None),
        (zeep.exceptions.TransportError("x", status_code=500), Transient, None),
        (zeep.exceptions.TransportError("x", status_code=503), Transient, None),
        (zeep.exceptions.TransportError("x", status_code=408), Transient, None),
        (zeep.exceptions.TransportError("x", status_code=429), Transient, None),
        (zeep.exceptions.TransportError("x", status_code=400), Permanent, None),
        (zeep.exceptions.TransportError("x", status_code=404), Permanent, None),
        (zeep.exceptions.TransportError("x", status_code=200), Transient, None),
        (_fault(None), Transient, None),
        (_fault(15), Transient, 15),
        (_fault(16), Transient, 16),
        (_fault(4), Permanent, 4),
        (zeep.exceptions.DTDForbidden("x", None, None), Transient, None),
    ],
)
def test_failures_are_classified(error: Exception, kind: type, code: int | None) -> None:
    classified = classify(error, "CreateEvents")
    assert type(classified) is kind
    assert classified.code == code


def test_fault_error_code_reads_faultdetails() -> None:
    assert fault_error_code(_fault(12).detail) == 12
    assert fault_error_code(None) is None


def test_the_session_keeps_its_own_verify_whatever_requests_ca_bundle_says(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/somewhere/else.pem")
    monkeypatch.setenv("CURL_CA_BUNDLE", "/somewhere/else.pem")
    plain = requests.Session()
    assert plain.merge_environment_settings("https://x", {}, None, None, None)["verify"] == "/somewhere/else.pem"
    pinned = PinnedSession()
    pinned.verify = True
    assert pinned.merge_environment_settings("https://x", {}, None, None, None)["verify"] is True
    pinned.verify = False
    assert pinned.merge_environment_settings("https://x", {}, None, None, None)["verify"] is False


def test_turning_verification_off_logs_a_warning_every_time_a_client_is_built() -> None:
    settings = PlannerSettings(endpoint="https://127.0.0.1:9/x", insecure_skip_verify=True)
    with structlog.testing.capture_logs() as logs:
        PlannerClient.from_settings(settings, RetrySettings()).close()
        PlannerClient.from_settings(settings, RetrySettings()).close()
    assert [entry["event"] for entry in logs if entry["log_level"] == "warning"] == ["planner_tls_verification_disabled"] * 2


def test_verification_stays_on_by_default() -> None:
    session = build_session(PlannerSettings(endpoint="https://127.0.0.1:9/x"))
    assert session.verify is True
