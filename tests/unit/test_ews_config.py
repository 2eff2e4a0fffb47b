"""How the EWS connection is configured: no autodiscover, no version probing, per-mailbox failure handling."""

from __future__ import annotations

import pytest
from exchangelib import BASIC, NTLM, FailFast

from shared.adapters.ews import BUILDS, EwsConnection
from shared.config import ExchangeSettings, load_settings


@pytest.mark.parametrize(("auth", "expected"), [("NTLM", NTLM), ("basic", BASIC)])
def test_auth_type_and_version_come_from_configuration(auth: str, expected: str) -> None:
    exchange = EwsConnection(ExchangeSettings(auth_type=auth, version="Exchange2013_SP1", password="x"), "Europe/Copenhagen", 7)  # type: ignore[arg-type]
    assert exchange.config.auth_type == expected
    assert exchange.config.version.build == BUILDS["Exchange2013_SP1"]
    assert isinstance(exchange.config.retry_policy, FailFast)  # exchangelib's back-off is global; ours is per mailbox
    assert exchange.config.max_connections == 7


def test_the_change_producer_sizes_the_pool_for_its_streams_and_workers(tmp_path: object) -> None:
    from services.change_producer.worker import build

    settings = load_settings(environ={}, database={"url": f"sqlite:///{tmp_path}/s.db"}, exchange={"streaming_connections": 3, "sync_workers": 5})
    producer = build(settings)
    assert producer.exchange.config.max_connections == 3 + 5 + 2
