"""Graph test helpers: an app registration's RSA certificate (Entra ID accepts RSA only), GraphSettings for a
running Graph simulator, and the same as worker settings (``with_graph``) or a worker process's env (``graph_env``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from shared.config import GraphSettings, Settings, load_settings
from simulators.graph.server import RunningGraphSim


@dataclass(frozen=True)
class AppCertificate:
    pem: Path  # private key and certificate in one file (what GraphSettings.client_certificate takes)
    certificate_pem: bytes  # the public part, registered with the app
    passphrase: str | None


def write_app_certificate(directory: Path, name: str = "app", passphrase: str | None = None) -> AppCertificate:
    """A self-signed RSA certificate for app-only auth, key and certificate in one PEM file (key encrypted when a
    passphrase is given)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"plannersync graph test {name}")])
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=2)).sign(key, hashes.SHA256())
    )
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase.encode()) if passphrase else serialization.NoEncryption()
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    path = directory / f"{name}.pem"
    path.write_bytes(key_pem + cert_pem)
    path.chmod(0o600)
    return AppCertificate(path, cert_pem, passphrase)


def graph_settings(sim: RunningGraphSim, **overrides: Any) -> GraphSettings:
    """GraphSettings pointing at a running simulator (client id and secret as ``start_server``'s defaults)."""
    values: dict[str, Any] = {
        "tenant_id": sim.tenant,
        "client_id": "plannersync-sim",
        "client_secret": "sim-secret",
        "authority_url": sim.authority_url,
        "graph_url": sim.url,
        "timeout": 10,
        "max_page_size": 5,
    }
    values.update(overrides)
    return GraphSettings(**values)


def graph_env(sim: RunningGraphSim, app: AppCertificate, ca_bundle: Path, **overrides: str) -> dict[str, str]:
    """``PLANNERSYNC_GRAPH__*`` for a worker process reading a running simulator with the app's certificate."""
    env = {
        "PLANNERSYNC_GRAPH__TENANT_ID": sim.tenant,
        "PLANNERSYNC_GRAPH__CLIENT_ID": "plannersync-sim",
        "PLANNERSYNC_GRAPH__CLIENT_CERTIFICATE": str(app.pem),
        "PLANNERSYNC_GRAPH__AUTHORITY_URL": sim.authority_url,
        "PLANNERSYNC_GRAPH__GRAPH_URL": sim.url,
        "PLANNERSYNC_GRAPH__CA_BUNDLE": str(ca_bundle),
        "PLANNERSYNC_GRAPH__DELTA_INTERVAL": "300ms",
        "PLANNERSYNC_GRAPH__TIMEOUT": "5s",
    }
    if app.passphrase:
        env["PLANNERSYNC_GRAPH__CLIENT_CERTIFICATE_PASSPHRASE"] = app.passphrase
    env.update({f"PLANNERSYNC_GRAPH__{name.upper()}": value for name, value in overrides.items()})
    return env


def with_graph(settings: Settings, sim: RunningGraphSim, app: AppCertificate, ca_bundle: Path, default_backend: str | None = None,
               **graph: Any) -> Settings:
    """``settings`` (already pointed at an EWS simulator or not) reading Graph mailboxes from ``sim`` with short timings:
    delta polled every 300 ms; ``graph`` overrides single values, ``default_backend`` sets the exchange default."""
    values: dict[str, Any] = {
        "tenant_id": sim.tenant, "client_id": "plannersync-sim", "client_certificate": app.pem,
        "client_certificate_passphrase": app.passphrase, "authority_url": sim.authority_url, "graph_url": sim.url,
        "ca_bundle": ca_bundle, "delta_interval": "300ms", "timeout": "5s", **graph,
    }
    dumped = settings.model_dump(mode="python", exclude={"graph"})
    if default_backend is not None:
        dumped["exchange"] = {**dumped["exchange"], "default_backend": default_backend}
    return load_settings(environ={}, **{**dumped, "graph": values})
