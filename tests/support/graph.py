"""Graph test helpers: an app registration's RSA certificate (Entra ID accepts RSA only) and GraphSettings for a
running Graph simulator."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from shared.config import GraphSettings
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
