"""A throwaway PKI for TLS tests: a CA, a server certificate for 127.0.0.1/localhost, and a client certificate
shaped like an OCES function certificate (PEM pair and PKCS#12 with a passphrase kept in a file)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Key = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Issued:
    key: Key
    cert: x509.Certificate


@dataclass(frozen=True)
class ThrowawayPKI:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_p12: Path
    client_p12_passphrase_file: Path
    other_ca_cert: Path  # a CA that signed nothing we serve
    rogue_server_cert: Path  # a server certificate for 127.0.0.1 from an untrusted CA
    rogue_server_key: Path


def _name(common_name: str, **extra: str) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COUNTRY_NAME, "DK"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if "organisation" in extra:
        attributes.insert(1, x509.NameAttribute(NameOID.ORGANIZATION_NAME, extra["organisation"]))
    if "serial" in extra:
        attributes.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, extra["serial"]))
    return x509.Name(attributes)


def make_ca(common_name: str) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(key, cert)


def issue(ca: Issued, subject: x509.Name, *, server: bool, not_before: datetime | None = None, not_after: datetime | None = None) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - timedelta(minutes=5))
        .not_valid_after(not_after or now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return Issued(key, builder.sign(ca.key, hashes.SHA256()))


def _pem_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _pem_key(path: Path, key: Key) -> Path:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)
    return path


def write_pki(directory: Path, passphrase: str = "Test-passphrase-æøå") -> ThrowawayPKI:
    """Generate everything into ``directory`` and return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca("plannersync throwaway test CA")
    server = issue(ca, _name("localhost"), server=True)
    client = issue(
        ca,
        _name(
            "plannersync test - Funktionscertifikat",
            organisation="Testkommune // CVR:55568510",
            serial="CVR:55568510-FID:9100000000518",
        ),
        server=False,
    )
    other = make_ca("plannersync other test CA")
    rogue = issue(other, _name("localhost"), server=True)
    p12 = directory / "client.p12"
    p12.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"plannersync-test",
            client.key,
            client.cert,
            [ca.cert],
            serialization.BestAvailableEncryption(passphrase.encode("utf-8")),
        )
    )
    passphrase_file = directory / "client.p12.passphrase"
    passphrase_file.write_text(passphrase + "\n", encoding="utf-8")
    return ThrowawayPKI(
        ca_cert=_pem_cert(directory / "ca.pem", ca.cert),
        server_cert=_pem_cert(directory / "server.pem", server.cert),
        server_key=_pem_key(directory / "server.key", server.key),
        client_cert=_pem_cert(directory / "client.pem", client.cert),
        client_key=_pem_key(directory / "client.key", client.key),
        client_p12=p12,
        client_p12_passphrase_file=passphrase_file,
        other_ca_cert=_pem_cert(directory / "other-ca.pem", other.cert),
        rogue_server_cert=_pem_cert(directory / "rogue.pem", rogue.cert),
        rogue_server_key=_pem_key(directory / "rogue.key", rogue.key),
    )


@dataclass(frozen=True)
class ClientCertificate:
    cert: Path
    key: Path
    p12: Path
    passphrase_file: Path


def write_client_certificate(directory: Path, name: str, *, not_before: datetime | None = None, not_after: datetime | None = None, passphrase: str = "Test-passphrase-æøå") -> ClientCertificate:
    """A client certificate from a CA of its own, with the validity asked for (an expired one, one expiring soon)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca(f"plannersync {name} test CA")
    client = issue(ca, _name(f"plannersync test - {name}"), server=False, not_before=not_before, not_after=not_after)
    p12 = directory / f"{name}.p12"
    p12.write_bytes(
        pkcs12.serialize_key_and_certificates(b"plannersync-test", client.key, client.cert, [ca.cert], serialization.BestAvailableEncryption(passphrase.encode("utf-8")))
    )
    passphrase_file = directory / f"{name}.p12.passphrase"
    passphrase_file.write_text(passphrase + "\n", encoding="utf-8")
    return ClientCertificate(_pem_cert(directory / f"{name}.pem", client.cert), _pem_key(directory / f"{name}.key", client.key), p12, passphrase_file)
