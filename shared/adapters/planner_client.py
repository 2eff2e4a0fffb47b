"""Talks to Jobcenter Planner's PlannerExternalCalendarService (SOAP 1.1) — the only module that imports zeep.

``PlannerClient.from_settings(planner, retry)`` builds a client from our own contract copy (no WSDL is fetched),
with mutual TLS (PKCS#12 or a PEM pair), the configured CA bundle pinned against ``REQUESTS_CA_BUNDLE``, hardened
XML parsing and a response size cap. Every call carries the two headers Planner requires. Failures become
``shared.domain.retry.Transient`` or ``Permanent``; Transient ones get a few quick in-process tries (tenacity) first.

Receipts are returned as Planner sent them, never matched by position: the caller matches on OriginSystemIdentifier.
Only ids, codes and counts are logged.
"""

from __future__ import annotations

import os
import re
import ssl
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
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
from requests.adapters import HTTPAdapter

from shared.adapters.planner_contract import WSDL_PATH, Namespaces
from shared.config import PlannerSettings, RetrySettings
from shared.domain.retry import Permanent, Transient
from shared.logs import get_logger

log = get_logger(__name__)

SoapOperation = Literal["CreateEvents", "UpdateEvents", "DeleteEvents", "GetEvents", "GetResources"]
TRANSIENT_FAULT_CODES = frozenset({15, 16})
ORGANISATION_TYPE_JOBCENTER = 8
REQUEST_USER_TYPE_SYSTEM = 3
USER_FULL_NAME_MAX = 140
RID_MAX = 64
_READ_CHUNK = 64 * 1024


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


def classify(error: BaseException, operation: str) -> Transient | Permanent:
    """What a failed Planner call means. Messages carry codes and types, never response content."""
    if isinstance(error, (Transient, Permanent)):
        return error
    if isinstance(error, requests.Timeout):
        return Transient(f"{operation}: timeout ({type(error).__name__})")
    if isinstance(error, requests.exceptions.SSLError):
        return Transient(f"{operation}: TLS failure: {_tls_reason(error)}")
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
        return Permanent(f"{operation}: request does not fit the contract: {error.message}")
    if isinstance(error, requests.RequestException):
        return Transient(f"{operation}: HTTP failure ({type(error).__name__})")
    return Transient(f"{operation}: unexpected {type(error).__name__}")


def _tls_reason(error: BaseException) -> str:
    text = str(error)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "certificate verify failed: the server certificate is not trusted by the configured CA bundle or system store"
    match = re.search(r"\[SSL: ([A-Z0-9_]+)\]", text) or re.search(r"(TLSV1_ALERT_[A-Z_]+|SSLEOFError|SSLZeroReturnError)", text)
    return match.group(1).lower() if match else type(error).__name__


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


class _ContextAdapter(HTTPAdapter):
    """Uses one prepared SSLContext (trust anchors and client certificate) for every HTTPS connection."""

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
    if planner.insecure_skip_verify:
        log.warning("planner_tls_verification_disabled", endpoint_host=urlparse(planner.endpoint).hostname)
    return session


class CappedTransport(zeep.Transport):
    """Streams each response and stops reading at ``max_bytes``; loads nothing from the network but the calls."""

    def __init__(self, session: requests.Session, timeout: float, max_bytes: int) -> None:
        super().__init__(session=session, timeout=timeout, operation_timeout=timeout)
        self.max_bytes = max_bytes

    def post(self, address: str, message: bytes | str, headers: dict[str, str]) -> requests.Response:
        deadline = time.monotonic() + 2 * float(self.operation_timeout or 60)
        response = self.session.post(address, data=message, headers=headers, timeout=self.operation_timeout, stream=True)
        try:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > self.max_bytes:
                raise ResponseTooLarge(f"response of {declared} bytes exceeds the cap of {self.max_bytes}")
            response._content = b"".join(self._read(response, deadline))
        finally:
            response.close()
        return response

    def _read(self, response: requests.Response, deadline: float) -> Iterator[bytes]:
        total = 0
        for chunk in response.iter_content(_READ_CHUNK):
            total += len(chunk)
            if total > self.max_bytes:
                raise ResponseTooLarge(f"response exceeds the cap of {self.max_bytes} bytes")
            if time.monotonic() > deadline:
                raise requests.Timeout("response body took longer than the deadline")
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
    ) -> None:
        self._planner = planner
        self._retry = retry
        self._zone = ZoneInfo(zone)
        self._clock = clock
        self._session = session or build_session(planner)
        transport = CappedTransport(self._session, planner.timeout.total_seconds(), planner.max_response_bytes)
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
    def from_settings(cls, planner: PlannerSettings, retry: RetrySettings, zone: str = "Europe/Copenhagen") -> PlannerClient:
        return cls(planner, retry, zone)

    def close(self) -> None:
        self._session.close()

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
        return self._zeep.create_message(self._service, operation, _soapheaders=self.headers(operation), **payload)

    # ----------------------------------------------------------------------------------- calling

    def _receipts(self, operation: SoapOperation, events: list[PlannerEvent]) -> CallResult:
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
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self._retry.quick_attempts),
            wait=tenacity.wait_exponential(multiplier=0.25, max=self._retry.quick_max_wait.total_seconds()),
            retry=tenacity.retry_if_exception_type(Transient),
            reraise=True,
        )
        return retrying(self._attempt, operation, payload, count)

    def _attempt(self, operation: SoapOperation, payload: dict[str, Any], count: int) -> Any:
        started = time.monotonic()
        try:
            method = getattr(self._service, operation)
            response = method(_soapheaders=self.headers(operation), **payload)
        except Exception as exc:  # noqa: BLE001 - every failure is classified, nothing escapes unnamed
            failure = classify(exc, operation)
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
        if response is None:
            failure = Transient(f"{operation}: empty response")
            log.warning("planner_call_failed", operation=operation, items=count, transient=True, code=None, reason=failure.reason)
            raise failure
        log.debug("planner_call_completed", operation=operation, items=count, seconds=round(time.monotonic() - started, 3))
        return response
