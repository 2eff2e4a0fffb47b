"""The OCES certificate's expiry is known, logged at start, and shown by plannersync status."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from structlog.testing import capture_logs

from services.publisher.worker import warn_if_certificate_expires
from shared.adapters.planner_client import client_certificate_expiry
from shared.config import PlannerSettings
from tests.support.tls import write_pki


def test_the_expiry_is_read_from_a_pkcs12_and_from_a_pem_pair(tmp_path: Path) -> None:
    pki = write_pki(tmp_path)
    from_p12 = client_certificate_expiry(
        PlannerSettings(client_cert_p12=pki.client_p12, client_cert_passphrase=pki.client_p12_passphrase_file.read_text().strip())
    )
    from_pem = client_certificate_expiry(PlannerSettings(client_cert_pem=pki.client_cert, client_key_pem=pki.client_key))
    assert from_p12 is not None and from_p12 == from_pem and from_p12 > datetime.now(timezone.utc)
    assert client_certificate_expiry(PlannerSettings()) is None


def test_a_certificate_expiring_within_30_days_is_warned_about_at_every_start() -> None:
    now = datetime(2026, 11, 28, tzinfo=timezone.utc)
    with capture_logs() as logs:
        assert warn_if_certificate_expires(now + timedelta(days=12, hours=1), now) == 12
        assert warn_if_certificate_expires(now + timedelta(days=200), now) == 200
        assert warn_if_certificate_expires(None, now) is None
    assert [(entry["event"], entry["log_level"]) for entry in logs] == [
        ("planner_certificate_expires_soon", "warning"),
        ("planner_certificate_valid", "info"),
    ]
