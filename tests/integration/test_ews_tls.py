"""EWS over HTTPS: the configured CA bundle is what decides, never REQUESTS_CA_BUNDLE from the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import exchangelib.protocol
import pytest

from shared.adapters.ews import EwsConnection
from shared.config import ExchangeSettings
from simulators.exchange.server import RunningExchangeSim, start_server
from tests.support.tls import ThrowawayPKI, write_pki

SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


@pytest.fixture
def pki(tmp_path: Path) -> ThrowawayPKI:
    return write_pki(tmp_path / "pki")


@pytest.fixture
def https_sim(pki: ThrowawayPKI) -> Iterator[RunningExchangeSim]:
    sim = start_server(users={"svc": "pw"}, tls=(str(pki.server_cert), str(pki.server_key)), mailboxes=["anne@k.dk"])
    yield sim
    sim.stop()
    exchangelib.protocol.close_connections()


def _exchange(sim: RunningExchangeSim, ca_bundle: Path | None) -> EwsConnection:
    exchangelib.protocol.close_connections()  # exchangelib caches protocols per endpoint and credentials
    return EwsConnection(ExchangeSettings(endpoint=sim.url, username="svc", password="pw", ca_bundle=ca_bundle), "Europe/Copenhagen", 2)


def test_the_configured_ca_is_trusted_whatever_the_environment_says(https_sim: RunningExchangeSim, pki: ThrowawayPKI, monkeypatch: pytest.MonkeyPatch) -> None:
    assert https_sim.url.startswith("https://")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", SYSTEM_BUNDLE)
    changes, state = _exchange(https_sim, pki.ca_cert).sync("anne@k.dk", None)
    assert changes == [] and state


def test_an_untrusted_server_fails_loudly_even_when_the_environment_would_trust_it(https_sim: RunningExchangeSim, pki: ThrowawayPKI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.ca_cert))
    with pytest.raises(Exception, match="(?i)certificate verify failed"):
        _exchange(https_sim, pki.other_ca_cert).sync("anne@k.dk", None)


def test_without_a_configured_bundle_the_system_store_decides_not_the_environment(https_sim: RunningExchangeSim, pki: ThrowawayPKI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.ca_cert))  # would trust the simulator if it counted
    with pytest.raises(Exception, match="(?i)certificate verify failed"):
        _exchange(https_sim, None).sync("anne@k.dk", None)
