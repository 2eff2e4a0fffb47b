"""The identity platform's part: OpenID discovery, the client-credentials token endpoint and bearer tokens.

An app is registered with a client secret and/or certificates. A ``client_assertion`` (the JWT msal signs with the
certificate's key) is checked as Entra ID does: the certificate named by ``x5t#S256`` (or ``x5t``) must be
registered, the signature (PS256 or RS256) must verify, ``aud`` must be this token endpoint, ``iss`` and ``sub``
the client id, and ``exp``/``nbf`` must hold. Access tokens are opaque random strings with a lifetime.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CLOCK_SKEW = 300


@dataclass
class App:
    client_id: str
    secret: str | None = None
    certificates: list[x509.Certificate] = field(default_factory=list)


def _b64url(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def _thumbprints(cert: x509.Certificate) -> tuple[str, str]:
    der = cert.public_bytes(Encoding.DER)
    sha256 = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")
    sha1 = base64.urlsafe_b64encode(hashlib.sha1(der).digest()).decode().rstrip("=")  # noqa: S324 - x5t is SHA-1 by definition
    return sha256, sha1


class OAuthError(Exception):
    """A token request refused: (status, error, AADSTS description)."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status, self.error, self.description = status, error, description

    def body(self) -> dict[str, Any]:
        match = re.match(r"AADSTS(\d+)", self.description)
        code = int(match.group(1)) if match else 0
        return {"error": self.error, "error_description": self.description, "error_codes": [code],
                "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()), "trace_id": secrets.token_hex(8),
                "correlation_id": secrets.token_hex(8)}


class Auth:
    """Registered apps and issued tokens of one simulated tenant."""

    def __init__(self, tenant: str, token_lifetime: int = 3600) -> None:
        self.tenant = tenant
        self.token_lifetime = token_lifetime
        self.apps: dict[str, App] = {}
        self.issued = 0
        self._tokens: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def register(self, client_id: str, secret: str | None = None, certificate_pem: str | bytes | None = None) -> App:
        with self._lock:
            app = self.apps.setdefault(client_id, App(client_id))
            if secret:
                app.secret = secret
            if certificate_pem:
                data = certificate_pem.encode() if isinstance(certificate_pem, str) else certificate_pem
                app.certificates.extend(x509.load_pem_x509_certificates(data))
            return app

    def discovery(self, base: str) -> dict[str, Any]:
        root = f"{base}/{self.tenant}"
        return {
            "token_endpoint": f"{root}/oauth2/v2.0/token",
            "authorization_endpoint": f"{root}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{root}/oauth2/v2.0/devicecode",
            "issuer": f"{root}/v2.0",
            "jwks_uri": f"{root}/discovery/v2.0/keys",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "tenant_region_scope": "EU",
        }

    def issue(self, form: dict[str, str], token_endpoint: str) -> dict[str, Any]:
        """Answer a token request or raise OAuthError."""
        if form.get("grant_type") != "client_credentials":
            raise OAuthError(400, "unsupported_grant_type", "AADSTS70003: The app requested an unsupported grant type.")
        app = self.apps.get(form.get("client_id", ""))
        if app is None:
            raise OAuthError(400, "unauthorized_client", "AADSTS700016: Application not found in the directory.")
        scope = form.get("scope", "")
        if not scope.endswith("/.default"):
            raise OAuthError(400, "invalid_scope", "AADSTS1002012: The provided value for scope is not valid. "
                             "Client credential flows must have a scope value with /.default suffixed.")
        if form.get("client_assertion"):
            if form.get("client_assertion_type") != ASSERTION_TYPE:
                raise OAuthError(400, "invalid_request", "AADSTS50027: Invalid client_assertion_type.")
            self._check_assertion(app, form["client_assertion"], token_endpoint)
        elif form.get("client_secret") is not None:
            if not app.secret or not secrets.compare_digest(app.secret, form["client_secret"]):
                raise OAuthError(401, "invalid_client", "AADSTS7000215: Invalid client secret provided.")
        else:
            raise OAuthError(401, "invalid_client", "AADSTS7000218: The request body must contain client_assertion "
                             "or client_secret.")
        token = "sim." + secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = (app.client_id, time.time() + self.token_lifetime)
            self.issued += 1
        return {"token_type": "Bearer", "expires_in": self.token_lifetime, "ext_expires_in": self.token_lifetime,
                "access_token": token}

    def _check_assertion(self, app: App, assertion: str, token_endpoint: str) -> None:
        def refuse(why: str) -> OAuthError:
            return OAuthError(401, "invalid_client", f"AADSTS700027: Client assertion failed signature validation: {why}")

        try:
            header_b64, payload_b64, signature_b64 = assertion.split(".")
            header = json.loads(_b64url(header_b64))
            claims = json.loads(_b64url(payload_b64))
            signature = _b64url(signature_b64)
        except (ValueError, binascii.Error) as exc:
            raise refuse(f"not a JWT ({type(exc).__name__})") from None
        certificate = None
        for cert in app.certificates:
            sha256, sha1 = _thumbprints(cert)
            if str(header.get("x5t#S256", "")).rstrip("=") == sha256 or str(header.get("x5t", "")).rstrip("=") == sha1:
                certificate = cert
        if certificate is None:
            raise OAuthError(401, "invalid_client", "AADSTS700027: The certificate with identifier used to sign the "
                             "client assertion is not registered on application.")
        key = certificate.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise refuse("only RSA certificates are accepted")
        signed = f"{header_b64}.{payload_b64}".encode()
        try:
            if header.get("alg") == "PS256":
                key.verify(signature, signed, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.AUTO), hashes.SHA256())
            elif header.get("alg") == "RS256":
                key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
            else:
                raise refuse(f"algorithm {header.get('alg')!r}")
        except InvalidSignature:
            raise refuse("signature does not verify") from None
        now = time.time()
        if claims.get("aud") != token_endpoint:
            raise OAuthError(401, "invalid_client", "AADSTS700212: No matching federated identity record found for "
                             "presented assertion audience.")
        if claims.get("iss") != app.client_id or claims.get("sub") != app.client_id:
            raise OAuthError(401, "invalid_client", "AADSTS700021: Client assertion application identifier doesn't "
                             "match 'client_id' parameter.")
        if float(claims.get("exp", 0)) < now - CLOCK_SKEW:
            raise OAuthError(401, "invalid_client", "AADSTS700024: Client assertion is not within its valid time range.")
        if float(claims.get("nbf", 0)) > now + CLOCK_SKEW:
            raise OAuthError(401, "invalid_client", "AADSTS700024: Client assertion is not within its valid time range.")

    def check(self, authorization: str | None) -> str | None:
        """The client id of a valid bearer token, else None."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        with self._lock:
            found = self._tokens.get(authorization[7:].strip())
        if found is None or found[1] < time.time():
            return None
        return found[0]

    def revoke_all(self) -> int:
        with self._lock:
            count = len(self._tokens)
            self._tokens.clear()
            return count

    def active(self) -> int:
        now = time.time()
        with self._lock:
            return sum(1 for _client, expires in self._tokens.values() if expires >= now)
