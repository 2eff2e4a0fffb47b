"""Talks to Jobcenter Planner's PlannerExternalCalendarService (SOAP 1.1) — the only module that imports zeep.

``PlannerClient.from_settings(planner, retry)`` builds a client from our own contract copy (no WSDL is fetched),
with mutual TLS (PKCS#12 or a PEM pair), the configured CA bundle pinned against ``REQUESTS_CA_BUNDLE``, hardened
XML parsing and a response size cap. Every call carries the two headers Planner requires. Failures become
``shared.domain.retry.Transient`` or ``Permanent``; Transient ones get a few quick in-process tries (tenacity) first.

Every HTTP attempt has a hard total deadline (``shared.adapters.deadline``): a server that drips its answer is cut
off, however slowly each byte comes (decision 51 in docs/decisions.md). An event whose values cannot be sent (a
control character in an id) is a ``ContentError`` for that event alone, found before anything is sent, never a
sign that Planner is down (decision 52). TLS failures that go on for minutes are raised to an error naming their
cause, and ``tls_trouble()`` tells health about them (decision 53).

Receipts are returned as Planner sent them, never matched by position: the caller matches on OriginSystemIdentifier.
Only ids, codes and counts are logged.
"""

from __future__ import annotations

import os
import re
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Literal
from urllib.parse import urlparse
from zoneinfo import ZoneInfo

import requests
import tenacity
import zeep
import zeep.exceptions
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    pkcs12,
)
from lxml import etree

from shared.adapters.deadline import DeadlineAdapter, DeadlineExceeded, deadline
from shared.adapters.planner_contract import WSDL_PATH, Namespaces
from shared.config import PlannerSettings, RetrySettings
from shared.domain.retry import ContentError, Permanent, Transient
from shared.logs import get_logger

log = get_logger(__name__)

SoapOperation = Literal["CreateEvents", "UpdateEvents", "DeleteEvents", "GetEvents", "GetResources"]
TRANSIENT_FAULT_CODES = frozenset({15, 16})
ORGANISATION_TYPE_JOBCENTER = 8
REQUEST_USER_TYPE_SYSTEM = 3
USER_FULL_NAME_MAX = 140
RID_MAX = 64
_READ_CHUNK = 64 * 1024
DEADLINE_FACTOR = 2  # an attempt's total deadline is this many times PlannerSettings.timeout (the per-read timeout)


# --------------------------------------------------------------------------------------------- values


@dataclass(frozen=True)
class PlannerEvent:
    """Busy time as Planner knows it: identified by (origin_id, email); times are aware."""

    origin_id: str
    email: str
    start: datetime
    end: datetime
    planner_resource_id: str | None = None
    planner_event_id: str | None = None


@dataclass(frozen=True)
class Receipt:
    """One CalendarEventReceipt, as parsed. ``code`` 0 is success; see PlannerSettings.receipt_actions."""

    origin_id: str
    code: int
    message: str | None
    planner_event_id: str | None
    planner_resource_id: str | None
    received_at: datetime | None
    conflict_notification_sent: bool


@dataclass(frozen=True)
class CallResult:
    receipts: list[Receipt]
    reference: str  # ServiceRequestLogReferenceIdentifier, for STAR's support


@dataclass(frozen=True)
class Resource:
    name: str
    rid: str
    email: str
    planner_resource_id: str | None
    is_case_worker: bool
    description: str | None


class ResponseTooLarge(Exception):
    """The response body passed ``max_response_bytes``; reading stopped there."""


# --------------------------------------------------------------------------------------------- times


def to_wire(value: datetime, zone: ZoneInfo) -> str:
    """An aware datetime as xs:dateTime with an explicit offset in ``zone``: ``2026-03-29T03:00:00+02:00``."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise Permanent("naive datetime given to the Planner client; times must be aware")
    return value.astimezone(zone).isoformat()


def from_wire(value: datetime | None, zone: ZoneInfo) -> datetime | None:
    """A parsed xs:dateTime as aware UTC; a value without offset is read as local time in ``zone``."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=zone)
    return value.astimezone(timezone.utc)


# --------------------------------------------------------------------------------------------- content


def _xml_char(code: int) -> bool:
    """XML 1.0's Char production: what an XML document may contain at all."""
    return code in (0x9, 0xA, 0xD) or 0x20 <= code <= 0xD7FF or 0xE000 <= code <= 0xFFFD or 0x10000 <= code <= 0x10FFFF


def _text_problem(name: str, value: str) -> str | None:
    for position, char in enumerate(value):
        if not _xml_char(ord(char)):
            kind = "a control character" if ord(char) < 0x20 or ord(char) == 0x7F else "a character XML cannot carry"
            return f"{name} has {kind} (U+{ord(char):04X} at position {position}) and cannot be sent to Planner"
    return None


def event_problem(event: PlannerEvent) -> str | None:
    """Why this event cannot be put in a request at all, or None. Content-free: names the field and the character."""
    for name, value in (("OriginSystemIdentifier", event.origin_id), ("OriginEmailAddress", event.email)):
        problem = _text_problem(name, value)
        if problem is not None:
            return problem
    for name, moment in (("start", event.start), ("end", event.end)):
        if moment.tzinfo is None or moment.utcoffset() is None:
            return f"{name} is a naive datetime; times must be aware"
    return None


# --------------------------------------------------------------------------------------------- payloads


def events_payload(events: list[PlannerEvent], zone: ZoneInfo) -> dict[str, Any]:
    """The body of CreateEvents/UpdateEvents/DeleteEvents; the Planner GUIDs are sent only when known."""
    if not events:
        raise Permanent("a Planner call needs at least one event")
    mailboxes = {event.email.lower() for event in events}
    if len(mailboxes) != 1:
        raise Permanent(f"one mailbox per Planner call, got {len(mailboxes)}")
    calendar_events = []
    for event in events:
        item: dict[str, Any] = {
            "CalendarEventStartTime": to_wire(event.start, zone),
            "CalendarEventEndTime": to_wire(event.end, zone),
            "OriginSystemIdentifier": event.origin_id,
            "OriginEmailAddress": event.email,
        }
        if event.planner_resource_id:
            item["PlannerResourceIdentifier"] = event.planner_resource_id
        if event.planner_event_id:
            item["CalendarEventIdentifier"] = event.planner_event_id
        calendar_events.append(item)
    return {"CalendarEvent": calendar_events}


def get_events_payload(emails: list[str], start_from: datetime, start_to: datetime, zone: ZoneInfo) -> dict[str, Any]:
    """The body of GetEvents: one CalendarResource per mailbox (as the reference client sends it) and a start range."""
    resources = [
        {
            "CalendarResourceName": "",
            "RID": email[:RID_MAX],
            "CalendarResourceEmailAddress": email,
            "CalendarResourceDescription": "",
            "IsCaseWorker": True,
        }
        for email in emails
    ]
    return {
        "CalendarResource": resources,
        "EventStartFromDateTime": to_wire(start_from, zone),
        "EventStartToDateTime": to_wire(start_to, zone),
    }


# --------------------------------------------------------------------------------------------- parsing


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def parse_receipt(item: Any, zone: ZoneInfo) -> Receipt:
    code_value = item.EventErrorCode
    code = int(code_value.CodeListItemIdentifier) if code_value is not None and code_value.CodeListItemIdentifier is not None else 0
    return Receipt(
        origin_id=str(item.OriginSystemIdentifier),
        code=code,
        message=_text(item.EventMessage),
        planner_event_id=_text(item.CalendarEventIdentifier),
        planner_resource_id=_text(item.PlannerResourceIdentifier),
        received_at=from_wire(item.EventReceivalTime, zone),
        conflict_notification_sent=bool(item.ConflictNotificationSent),
    )


def parse_event(item: Any, zone: ZoneInfo) -> PlannerEvent:
    start = from_wire(item.CalendarEventStartTime, zone)
    end = from_wire(item.CalendarEventEndTime, zone)
    assert start is not None and end is not None  # required by the schema
    return PlannerEvent(
        origin_id=str(item.OriginSystemIdentifier),
        email=str(item.OriginEmailAddress),
        start=start,
        end=end,
        planner_resource_id=_text(item.PlannerResourceIdentifier),
        planner_event_id=_text(item.CalendarEventIdentifier),
    )


def parse_resource(item: Any) -> Resource:
    return Resource(
        name=str(item.CalendarResourceName or ""),
        rid=str(item.RID),
        email=str(item.CalendarResourceEmailAddress),
        planner_resource_id=_text(item.PlannerResourceIdentifier),
        is_case_worker=bool(item.IsCaseWorker),
        description=_text(item.CalendarResourceDescription),
    )


# --------------------------------------------------------------------------------------------- failures


def fault_error_code(detail: etree._Element | None) -> int | None:
    """The ErrorCode of a FaultDetails in a SOAP fault's detail, if there is one."""
    if detail is None or not isinstance(detail, etree._Element):
        return None
    node = detail.find(f".//{{{Namespaces.FAULT}}}ErrorCode")
    if node is None or node.text is None:
        return None
    try:
        return int(node.text.strip())
    except ValueError:
        return None


def classify(error: BaseException, operation: str, client_certificate: bool = True) -> Transient | Permanent:
    """What a failed Planner call means. Messages carry codes and types, never response content.

    ``client_certificate`` says whether this client offers one; it tells a handshake refused for the lack of one
    from other handshake failures.
    """
    if isinstance(error, (Transient, Permanent)):
        return error
    if isinstance(error, DeadlineExceeded):
        return Transient(f"{operation}: timeout: {error}")
    if isinstance(error, requests.Timeout):
        return Transient(f"{operation}: timeout ({type(error).__name__})")
    cause = tls_cause(error, client_certificate)
    if cause is not None:
        return Transient(f"{operation}: TLS failure: {cause}")
    if isinstance(error, requests.ConnectionError):
        return Transient(f"{operation}: connection failed ({type(error).__name__})")
    if isinstance(error, ResponseTooLarge):
        return Transient(f"{operation}: {error}")
    if isinstance(error, zeep.exceptions.Fault):
        code = fault_error_code(error.detail if isinstance(error.detail, etree._Element) else None)
        reason = f"{operation}: SOAP fault {error.code or ''} {(error.message or '')[:200]}".strip()
        if code is None:
            return Transient(reason)
        if code in TRANSIENT_FAULT_CODES:
            return Transient(reason, code=code)
        return Permanent(reason, code=code)
    if isinstance(error, zeep.exceptions.TransportError):
        status = error.status_code or 0
        if status in (408, 429) or status >= 500:
            return Transient(f"{operation}: HTTP {status}")
        if 400 <= status < 500:
            return Permanent(f"{operation}: HTTP {status}")
        return Transient(f"{operation}: unparsable response (HTTP {status})")
    if isinstance(error, (zeep.exceptions.DTDForbidden, zeep.exceptions.EntitiesForbidden)):
        return Transient(f"{operation}: response with a DTD or entities refused")
    if isinstance(error, (etree.XMLSyntaxError, zeep.exceptions.XMLParseError, zeep.exceptions.XMLSyntaxError)):
        return Transient(f"{operation}: unparsable response")
    if isinstance(error, zeep.exceptions.ValidationError):
        return ContentError(f"{operation}: request does not fit the contract: {error.message}")
    if isinstance(error, requests.RequestException):
        return Transient(f"{operation}: HTTP failure ({type(error).__name__})")
    return Transient(f"{operation}: unexpected {type(error).__name__}")


def _tls_reason(error: BaseException) -> str:
    text = str(error)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "certificate verify failed: the server certificate is not trusted by the configured CA bundle or system store"
    match = re.search(r"\[SSL: ([A-Z0-9_]+)\]", text) or re.search(r"(TLSV1_ALERT_[A-Z_]+|SSLEOFError|SSLZeroReturnError)", text)
    return match.group(1).lower() if match else type(error).__name__


# OpenSSL's words in a failed handshake, and what they mean for an operator (checked in this order).
_TLS_CAUSES: tuple[tuple[str, str], ...] = (
    ("Hostname mismatch", "server certificate does not match the host name (certificate verify failed)"),
    ("IP address mismatch", "server certificate does not match the address (certificate verify failed)"),
    ("certificate has expired", "server certificate expired (certificate verify failed)"),
    ("CERTIFICATE_VERIFY_FAILED", "server certificate not trusted: certificate verify failed against the configured CA bundle or system store"),
    ("CERTIFICATE_REQUIRED", "no client certificate offered, and the server requires one"),
    ("TLSV1_ALERT_UNKNOWN_CA", "client certificate not trusted by the server (unknown CA)"),
    ("SSLV3_ALERT_CERTIFICATE_EXPIRED", "client certificate expired, says the server"),
    ("SSLV3_ALERT_CERTIFICATE_REVOKED", "client certificate revoked, says the server"),
    ("SSLV3_ALERT_BAD_CERTIFICATE", "client certificate refused by the server (bad certificate)"),
    ("SSLV3_ALERT_CERTIFICATE_UNKNOWN", "client certificate refused by the server (certificate unknown)"),
    ("TLSV1_ALERT_ACCESS_DENIED", "client certificate refused by the server (access denied)"),
    ("TLSV1_ALERT_PROTOCOL_VERSION", "no TLS version in common with the server"),
    ("UNSUPPORTED_PROTOCOL", "no TLS version in common with the server"),
    ("WRONG_VERSION_NUMBER", "the server does not speak TLS on this port"),
)
_HANDSHAKE_REFUSED = ("SSLV3_ALERT_HANDSHAKE_FAILURE", "SSLEOFError", "EOF occurred in violation of protocol", "UNEXPECTED_EOF", "SSLZeroReturnError")


def tls_cause(error: BaseException, client_certificate: bool = True) -> str | None:
    """What went wrong in a TLS handshake with Planner, in an operator's words; None when ``error`` is not a TLS failure.

    A server that requires a client certificate and gets none often just ends the handshake (an alert, or a bare
    EOF); a client that has none configured then knows why.
    """
    text = str(error)
    tls = isinstance(error, requests.exceptions.SSLError) or "SSL" in text or "TLSV1" in text
    if not tls:
        return None
    for marker, cause in _TLS_CAUSES:
        if marker in text:
            return cause
    refused = any(marker in text for marker in _HANDSHAKE_REFUSED)
    if refused and not client_certificate:
        return "no client certificate offered (none is configured), and the server ended the handshake"
    if refused:
        return f"the server ended the handshake ({_tls_reason(error)}); it may refuse the client certificate"
    if isinstance(error, requests.exceptions.SSLError):
        return _tls_reason(error)
    return None


@dataclass(frozen=True)
class TlsTrouble:
    """TLS towards Planner has failed for every call since ``since``: ``cause`` says why, in an operator's words."""

    cause: str
    since: datetime
    failures: int


class _TlsWatch:
    """Counts how long TLS failures have lasted without a call getting through; past ``alert_after``, an error."""

    def __init__(self, alert_after: timedelta, endpoint: str) -> None:
        self.alert_after = alert_after
        self.endpoint_host = urlparse(endpoint).hostname
        self._lock = threading.Lock()
        self._since: datetime | None = None
        self._failures = 0
        self._cause = ""
        self._raised_at: datetime | None = None

    def failed(self, cause: str, now: datetime) -> None:
        with self._lock:
            if self._since is None:
                self._since = now
            self._failures += 1
            self._cause = cause
            lasting = now - self._since
            due = lasting >= self.alert_after and (self._raised_at is None or now - self._raised_at >= self.alert_after)
            if due:
                self._raised_at = now
            since, failures = self._since, self._failures
        if due:  # again every alert_after while it lasts, so it cannot scroll away
            log.error(
                "planner_tls_failing",
                cause=cause,
                since=since.isoformat(),
                failing_for_s=round(lasting.total_seconds()),
                failures=failures,
                endpoint_host=self.endpoint_host,
            )

    def reached(self) -> None:
        """A call got through the handshake (whatever Planner then answered)."""
        with self._lock:
            raised, since = self._raised_at is not None, self._since
            self._since, self._failures, self._raised_at = None, 0, None
        if raised and since is not None:
            log.info("planner_tls_recovered", endpoint_host=self.endpoint_host, failing_since=since.isoformat())

    def trouble(self) -> TlsTrouble | None:
        with self._lock:
            if self._raised_at is None or self._since is None:
                return None
            return TlsTrouble(self._cause, self._since, self._failures)


# --------------------------------------------------------------------------------------------- transport


class PinnedSession(requests.Session):
    """A requests Session whose own ``verify`` and ``cert`` win over REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE.

    requests lets those variables replace a session's ``verify`` when ``trust_env`` is on; proxies from the
    environment are still honoured.
    """

    def merge_environment_settings(self, url, proxies, stream, verify, cert):  # type: ignore[no-untyped-def]
        merged = super().merge_environment_settings(url, proxies, stream, verify, cert)
        merged["verify"] = self.verify
        merged["cert"] = self.cert
        return merged


class _ContextAdapter(DeadlineAdapter):
    """Uses one prepared SSLContext (trust anchors and client certificate) for every HTTPS connection.

    Its connections are under the deadline of the call in flight (``shared.adapters.deadline``).
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)

    def proxy_manager_for(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["ssl_context"] = self._context
        return super().proxy_manager_for(*args, **kwargs)


def _write_private(directory: str, name: str, data: bytes) -> str:
    path = os.path.join(directory, name)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    return path


def _load_pkcs12(context: ssl.SSLContext, p12: Path, passphrase: str | None) -> None:
    """Unpack a PKCS#12 (OCES function certificate) into the context via 0600 temporary PEM files, removed at once."""
    try:
        key, certificate, chain = pkcs12.load_key_and_certificates(
            p12.read_bytes(), passphrase.encode("utf-8") if passphrase else None
        )
    except ValueError as exc:
        raise Permanent(f"cannot open client certificate {p12.name}: {exc}") from None
    if key is None or certificate is None:
        raise Permanent(f"client certificate {p12.name} has no private key or no certificate")
    certificates = b"".join(item.public_bytes(Encoding.PEM) for item in [certificate, *(chain or [])])
    key_pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    with tempfile.TemporaryDirectory(prefix="plannersync-tls-") as directory:
        os.chmod(directory, 0o700)
        cert_path = _write_private(directory, "client.crt.pem", certificates)
        key_path = _write_private(directory, "client.key.pem", key_pem)
        context.load_cert_chain(cert_path, key_path)


def client_certificate_expiry(planner: PlannerSettings) -> datetime | None:
    """When the configured client (OCES function) certificate stops being valid; None when none is configured."""
    from cryptography import x509

    if planner.client_cert_p12 is not None:
        passphrase = planner.client_cert_passphrase.get_secret_value().encode("utf-8") if planner.client_cert_passphrase else None
        _key, certificate, _chain = pkcs12.load_key_and_certificates(planner.client_cert_p12.read_bytes(), passphrase)
    elif planner.client_cert_pem is not None:
        certificate = x509.load_pem_x509_certificate(planner.client_cert_pem.read_bytes())
    else:
        return None
    return certificate.not_valid_after_utc if certificate is not None else None


def build_ssl_context(planner: PlannerSettings) -> ssl.SSLContext:
    """Trust anchors (``ca_bundle`` or the system store) and the client certificate for mutual TLS."""
    if planner.insecure_skip_verify:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif planner.ca_bundle is not None:
        context = ssl.create_default_context(cafile=str(planner.ca_bundle))
    else:
        context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if planner.client_cert_p12 is not None:
        passphrase = planner.client_cert_passphrase.get_secret_value() if planner.client_cert_passphrase else None
        _load_pkcs12(context, planner.client_cert_p12, passphrase)
    elif planner.client_cert_pem is not None and planner.client_key_pem is not None:
        context.load_cert_chain(str(planner.client_cert_pem), str(planner.client_key_pem))
    return context


def build_session(planner: PlannerSettings) -> requests.Session:
    """The requests Session zeep uses: our SSLContext on https://, verification pinned to the configuration."""
    session = PinnedSession()
    session.verify = not planner.insecure_skip_verify
    session.cert = None
    session.mount("https://", _ContextAdapter(build_ssl_context(planner)))
    session.mount("http://", DeadlineAdapter())  # plain HTTP (simulators, a TLS-terminating proxy): deadlines too
    if planner.insecure_skip_verify:
        log.warning("planner_tls_verification_disabled", endpoint_host=urlparse(planner.endpoint).hostname)
    return session


class CappedTransport(zeep.Transport):
    """Streams each response and stops reading at ``max_bytes``; loads nothing from the network but the calls.

    Each post (connect, TLS handshake, request, headers and body) runs under one hard total deadline of
    ``total_deadline`` seconds: past it, the connection is shut down and ``DeadlineExceeded`` raised. ``timeout`` is
    the per-read timeout (decision 51 in docs/decisions.md).
    """

    def __init__(self, session: requests.Session, timeout: float, max_bytes: int, total_deadline: float | None = None) -> None:
        super().__init__(session=session, timeout=timeout, operation_timeout=timeout)
        self.max_bytes = max_bytes
        self.total_deadline = total_deadline if total_deadline is not None else DEADLINE_FACTOR * timeout

    def post(self, address: str, message: bytes | str, headers: dict[str, str]) -> requests.Response:
        with deadline(self.total_deadline, "Planner call"):
            response = self.session.post(address, data=message, headers=headers, timeout=self.operation_timeout, stream=True)
            try:
                declared = response.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > self.max_bytes:
                    raise ResponseTooLarge(f"response of {declared} bytes exceeds the cap of {self.max_bytes}")
                response._content = b"".join(self._read(response))
            finally:
                response.close()
        return response

    def _read(self, response: requests.Response) -> Iterator[bytes]:
        total = 0
        for chunk in response.iter_content(_READ_CHUNK):
            total += len(chunk)
            if total > self.max_bytes:
                raise ResponseTooLarge(f"response exceeds the cap of {self.max_bytes} bytes")
            yield chunk

    def load(self, url: str) -> bytes:
        if urlparse(url).scheme not in ("", "file"):
            raise Permanent(f"refusing to fetch {url}: the contract is loaded from plannersync's own copy")
        return bytes(super().load(url))


# --------------------------------------------------------------------------------------------- client


class PlannerClient:
    """Calls Planner for one jobcentre. Thread-safe for sequential use per instance; build one per worker thread."""

    def __init__(
        self,
        planner: PlannerSettings,
        retry: RetrySettings,
        zone: str = "Europe/Copenhagen",
        *,
        session: requests.Session | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
        tls_alert_after: timedelta | None = None,
    ) -> None:
        self._planner = planner
        self._retry = retry
        self._zone = ZoneInfo(zone)
        self._clock = clock
        self._session = session or build_session(planner)
        self._client_certificate = planner.client_cert_p12 is not None or planner.client_cert_pem is not None
        self._tls = _TlsWatch(tls_alert_after if tls_alert_after is not None else planner.tls_alert_after, planner.endpoint)
        total = planner.call_deadline.total_seconds() if planner.call_deadline is not None else None
        transport = CappedTransport(self._session, planner.timeout.total_seconds(), planner.max_response_bytes, total_deadline=total)
        settings = zeep.Settings(
            strict=True,
            forbid_dtd=True,
            forbid_entities=True,
            forbid_external=True,
            xml_huge_tree=False,
            extra_http_headers={"User-Agent": "plannersync"},
        )
        self._zeep = zeep.Client(str(WSDL_PATH), transport=transport, settings=settings)
        self._service = self._zeep.create_service(
            f"{{{Namespaces.SERVICE}}}PlannerExternalCalendarServiceBinding", planner.endpoint
        )
        self._active_organisation = self._zeep.get_element(f"{{{Namespaces.ACTIVE_ORGANISATION}}}ActiveOrganisationHeader")
        self._request_user = self._zeep.get_element(f"{{{Namespaces.REQUEST_USER_METADATA}}}RequestUserMetadataHeader")

    @classmethod
    def from_settings(
        cls, planner: PlannerSettings, retry: RetrySettings, zone: str = "Europe/Copenhagen", tls_alert_after: timedelta | None = None
    ) -> PlannerClient:
        return cls(planner, retry, zone, tls_alert_after=tls_alert_after)

    def close(self) -> None:
        self._session.close()

    def tls_trouble(self) -> TlsTrouble | None:
        """TLS failures towards Planner that have lasted past the alert time (and were logged as an error), or None."""
        return self._tls.trouble()

    # ----------------------------------------------------------------------------------- operations

    def create_events(self, events: list[PlannerEvent]) -> CallResult:
        return self._receipts("CreateEvents", events)

    def update_events(self, events: list[PlannerEvent]) -> CallResult:
        return self._receipts("UpdateEvents", events)

    def delete_events(self, events: list[PlannerEvent]) -> CallResult:
        return self._receipts("DeleteEvents", events)

    def get_events(self, emails: list[str], start_from: datetime, start_to: datetime) -> list[PlannerEvent]:
        payload = get_events_payload(emails, start_from, start_to, self._zone)
        response = self._call("GetEvents", payload, count=len(emails))
        return [parse_event(item, self._zone) for item in (response.CalendarEvent or [])]

    def get_resources(self) -> list[Resource]:
        response = self._call("GetResources", {}, count=0)
        return [parse_resource(item) for item in (response.CalendarResource or [])]

    # ----------------------------------------------------------------------------------- envelope

    def headers(self, operation: str) -> list[Any]:
        """The ActiveOrganisationHeader and RequestUserMetadataHeader for one call."""
        organisation = self._planner.jobcenter_number
        user_full_name = f"{self._planner.user_full_name} : {operation}"[:USER_FULL_NAME_MAX]
        # The binding's order: RequestUserMetadataHeader, then ActiveOrganisationHeader.
        return [
            self._request_user(
                RequestUserStructure={
                    "UserFullName": user_full_name,
                    "RequestUserTypeIdentifier": {"CodeListItemIdentifier": REQUEST_USER_TYPE_SYSTEM},
                    "UserIdentifier": self._planner.request_user_identifier,
                },
                RequestOrganisationStructure={
                    "OrganisationTypeIdentifier": {"CodeListItemIdentifier": ORGANISATION_TYPE_JOBCENTER},
                    "OrganisationCode": organisation,
                },
                RegistrationDateTime=to_wire(self._clock(), self._zone),
            ),
            self._active_organisation(
                OrganisationTypeIdentifier=ORGANISATION_TYPE_JOBCENTER,
                OrganisationCode=organisation,
            ),
        ]

    def request_envelope(self, operation: SoapOperation, payload: dict[str, Any]) -> etree._Element:
        """The SOAP envelope a call would send (for contract tests); nothing is sent."""
        return self._build(operation, payload)[0]

    def _build(self, operation: SoapOperation, payload: dict[str, Any]) -> tuple[etree._Element, dict[str, str]]:
        """The envelope and HTTP headers of one call, as the service's own operation would build them (decision 116).

        zeep's ``ServiceProxy.<operation>(...)`` is its binding's ``send``: ``_create`` (the envelope and headers),
        the transport's ``post_xml`` and ``process_reply``. ``_call`` takes those three steps itself so that the envelope
        it builds to find content errors before sending is the one it sends, built once; zeep keeps the binding and its
        options on the proxy as ``_binding`` and ``_binding_options``."""
        binding = self._service._binding
        envelope, http_headers = binding._create(
            operation, (), {"_soapheaders": self.headers(operation), **payload}, client=self._zeep, options=self._service._binding_options
        )
        return envelope, http_headers

    def _send(self, operation: SoapOperation, envelope: etree._Element, http_headers: dict[str, str]) -> Any:
        """What zeep's ``send`` does after building: post the envelope, then read the reply (faults raised)."""
        binding = self._service._binding
        response = self._zeep.transport.post_xml(self._service._binding_options["address"], envelope, http_headers)
        return binding.process_reply(self._zeep, binding.get(operation), response)

    # ----------------------------------------------------------------------------------- calling

    def _receipts(self, operation: SoapOperation, events: list[PlannerEvent]) -> CallResult:
        problems = {event.origin_id: problem for event in events if (problem := event_problem(event)) is not None}
        if problems:
            first = next(iter(problems.values()))
            log.warning("planner_events_unsendable", operation=operation, events=len(events), unsendable=len(problems), reason=first)
            raise ContentError(f"{operation}: {first}", problems=problems)
        payload = events_payload(events, self._zone)
        response = self._call(operation, payload, count=len(events))
        receipts = [parse_receipt(item, self._zone) for item in (response.CalendarEventReceipt or [])]
        reference = str(response.ServiceRequestLogReferenceIdentifier)
        log.info(
            "planner_call_receipts",
            operation=operation,
            reference=reference,
            events=len(events),
            codes=sorted({receipt.code for receipt in receipts}),
        )
        return CallResult(receipts=receipts, reference=reference)

    def _call(self, operation: SoapOperation, payload: dict[str, Any], count: int) -> Any:
        try:
            built = [self._build(operation, payload)]  # a request that cannot be built is about its content, not Planner
        except (ValueError, TypeError, zeep.exceptions.Error) as exc:
            failure = ContentError(f"{operation}: the request cannot be built: {type(exc).__name__}: {str(exc)[:200]}")
            log.warning("planner_request_unbuildable", operation=operation, items=count, reason=failure.reason)
            raise failure from exc
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self._retry.quick_attempts),
            wait=tenacity.wait_exponential(multiplier=0.25, max=self._retry.quick_max_wait.total_seconds()),
            retry=tenacity.retry_if_exception_type(Transient),
            reraise=True,
        )
        return retrying(self._attempt, operation, payload, count, built)

    def _attempt(self, operation: SoapOperation, payload: dict[str, Any], count: int, built: list[tuple[etree._Element, dict[str, str]]]) -> Any:
        """One try: the envelope ``_call`` built, or for a later try one built again (its registration time is now's)."""
        started = time.monotonic()
        try:
            envelope, http_headers = built.pop() if built else self._build(operation, payload)
            response = self._send(operation, envelope, http_headers)
        except Exception as exc:  # noqa: BLE001 - every failure is classified, nothing escapes unnamed
            failure = classify(exc, operation, self._client_certificate)
            cause = tls_cause(exc, self._client_certificate)
            if cause is not None:
                self._tls.failed(cause, self._clock())
            elif not isinstance(exc, (requests.ConnectionError, requests.Timeout, DeadlineExceeded)):
                self._tls.reached()  # Planner answered (an HTTP error, a fault, garbage): the handshake worked
            log.warning(
                "planner_call_failed",
                operation=operation,
                items=count,
                transient=isinstance(failure, Transient),
                code=failure.code,
                reason=failure.reason,
                seconds=round(time.monotonic() - started, 3),
            )
            raise failure from exc
        self._tls.reached()
        if response is None:
            failure = Transient(f"{operation}: empty response")
            log.warning("planner_call_failed", operation=operation, items=count, transient=True, code=None, reason=failure.reason)
            raise failure
        log.debug("planner_call_completed", operation=operation, items=count, seconds=round(time.monotonic() - started, 3))
        return response
