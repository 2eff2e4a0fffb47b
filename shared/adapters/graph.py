"""Exchange Online through Microsoft Graph: the only module that talks to Graph (and the only msal user).

- Tokens: app-only, msal ``ConfidentialClientApplication`` with a certificate (a client secret as fallback),
  cached and renewed by msal before they expire; a 401 drops the cached token and retries once.
- Reads: ``view`` (paged calendarView, for snapshots) and ``sync`` (calendarView/delta, for changes); ``sync_many``
  reads the delta pages of several mailboxes through ``$batch``; ``series_uids`` reads series masters' UIDs
  (cached) for the rare instance whose own ``iCalUId`` gives none.
- Content is dropped the moment a page is parsed (``keep_busy_fields``): Graph sends subject, body and location
  with every delta entry. Logs carry ids, counts and codes only (decision 1 in docs/decisions.md).
- Limits: at most ``max_concurrent_per_mailbox`` requests in flight per mailbox; 429/503 and every other failure
  are raised, never slept on here, so one throttled mailbox waits alone (``classify``, decision 37).
- Transport: ``BoundedSession`` (the configured CA bundle wins, a hard deadline per request, a size cap), and the
  bearer token is only ever sent to the configured Graph URL, never to a link pointing elsewhere.

The change producer reads a Graph mailbox with ``sync_mailbox(..., GraphSyncReader(reader, window), ...,
backend="graph")`` every ``delta_interval``; the snapshot producer (and a 410 or a move between backends) with
``rebase_mailbox(mailbox, reader, ...)`` in ``shared/mailbox_passes.py`` (decisions 66 and 67 in docs/decisions.md).
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import msal
import requests
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from shared import metrics
from shared.adapters.deadline import DeadlineExceeded
from shared.adapters.tls_sessions import BoundedSession, ResponseTooLarge, trust_context
from shared.config import GraphSettings
from shared.domain.contracts import CalendarItem, Interval
from shared.domain.graph_events import (
    GraphEventError,
    NotAGlobalObjectId,
    calendar_item_from_event,
    is_removal,
    keep_busy_fields,
    missing_series_uid,
    series_uid_from_ical_uid,
    sync_change_from_event,
)
from shared.domain.mailbox_reads import SyncChange
from shared.domain.source_faults import SourceFault
from shared.logs import get_logger

log = get_logger(__name__)

PREFER_UTC = 'outlook.timezone="UTC"'
MASTER_CACHE_SIZE = 10_000
UTC = timezone.utc


# --- failures --------------------------------------------------------------------------------------------------------
class GraphError(Exception):
    """Graph answered with an HTTP error. ``code`` is Graph's error code; never the message text."""

    def __init__(self, status: int, code: str, mailbox: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status} {code}".strip())
        self.status, self.code, self.mailbox, self.retry_after = status, code, mailbox, retry_after


class SyncStateNotFound(GraphError):
    """410: the delta link is expired or unknown (syncStateNotFound, resyncRequired): read the mailbox in full."""


class GraphAuthError(Exception):
    """No token: the authority refused the app's credentials or could not be asked. Carries msal's error code."""


class GraphProtocolError(Exception):
    """An answer we cannot use: not JSON, no value list, a round without a deltaLink, a link to another host."""


def classify(error: BaseException) -> SourceFault:
    """What an exception from this adapter means for one mailbox (the read schedule acts on the kind)."""
    if isinstance(error, SyncStateNotFound):
        return SourceFault("invalid_sync_state", str(error))
    if isinstance(error, GraphError):
        if error.status == 429 or (error.status == 503 and error.retry_after is not None):
            return SourceFault("throttled", str(error), error.retry_after)
        if error.status in (403, 404):
            return SourceFault("mailbox_unavailable", str(error))
        if error.status == 410:
            return SourceFault("invalid_sync_state", str(error))
        return SourceFault("transient", str(error))
    if isinstance(error, GraphAuthError):
        return SourceFault("transient", f"token: {error}")
    if isinstance(error, ResponseTooLarge):
        return SourceFault("transient", "response too large")
    if isinstance(error, (requests.Timeout, DeadlineExceeded)):
        return SourceFault("transient", f"timeout ({type(error).__name__})")
    if isinstance(error, requests.RequestException):
        return SourceFault("transient", f"connection failed ({type(error).__name__})")
    return SourceFault("transient", f"{type(error).__name__}: {str(error)[:200]}")


def operator_detail(fault: SourceFault) -> str:
    """The mailbox status detail an operator reads (``plannersync status``, ``mailboxes list``) for a Graph fault:
    what it means and what to do, with Graph's status and code; never content (runbooks/graph.md)."""
    if fault.detail.startswith("HTTP 403"):
        return (f"Exchange Online refuses the app this mailbox ({fault.detail}): it is outside the app's RBAC for "
                "Applications scope; add it to the scope's mail-enabled security group (runbooks/graph.md)")
    if fault.detail.startswith("HTTP 404"):
        return (f"Exchange Online has no such mailbox ({fault.detail}): still on-premises (serve it with backend ews) "
                "or misspelt")
    if fault.kind == "throttled":
        return f"Graph asked us to wait ({fault.detail}); read again after its Retry-After"
    if fault.detail.startswith("token:"):
        return (f"no Graph token ({fault.detail.removeprefix('token: ')}): check PLANNERSYNC_GRAPH__TENANT_ID, __CLIENT_ID "
                "and the certificate registered with the app")
    return fault.detail


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


def _error_code(body: Any) -> str:
    error = body.get("error") if isinstance(body, Mapping) else None
    code = error.get("code") if isinstance(error, Mapping) else None
    return str(code)[:80] if code else ""


def graph_error(status: int, headers: Mapping[str, str], body: Any, mailbox: str | None) -> GraphError:
    """The typed error for one failed answer (a whole request or one part of a $batch)."""
    kind = SyncStateNotFound if status == 410 else GraphError
    lowered = {name.lower(): value for name, value in headers.items()}
    return kind(status, _error_code(body), mailbox, _retry_after(lowered.get("retry-after")))


# --- values ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchRequest:
    """One GET inside a $batch; ``url`` is relative to the Graph base URL (``/users/...``) or a link under it."""

    id: str
    url: str
    mailbox: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchResponse:
    """One part's answer; ``body`` has already had content dropped (events keep only their busy fields)."""

    id: str
    status: int
    headers: Mapping[str, str]
    body: Any


@dataclass(frozen=True)
class DeltaRound:
    """One mailbox's delta read: from ``delta_link``, or a new round over ``window`` when it is None."""

    mailbox: str
    delta_link: str | None
    window: Interval


@dataclass(frozen=True)
class DeltaResult:
    changes: list[SyncChange]
    delta_link: str


@dataclass
class _Page:
    entries: list[dict[str, Any]]
    next_link: str | None
    delta_link: str | None


def _stripped(body: Any) -> Any:
    """A Graph JSON answer with content dropped at once: event lists and single events keep only busy fields."""
    if not isinstance(body, dict):
        return body
    if "error" in body:
        return {"error": {"code": _error_code(body)}}
    if isinstance(body.get("value"), list):
        kept = {key: body[key] for key in ("@odata.nextLink", "@odata.deltaLink") if isinstance(body.get(key), str)}
        kept["value"] = [keep_busy_fields(entry) for entry in body["value"] if isinstance(entry, Mapping)]
        return kept
    if "id" in body:
        return keep_busy_fields(body)
    return {}


def _page(body: Any) -> _Page:
    if not isinstance(body, dict) or not isinstance(body.get("value"), list):
        raise GraphProtocolError("answer without a value list")
    return _Page(body["value"], body.get("@odata.nextLink"), body.get("@odata.deltaLink"))


def _stamp(moment: datetime, up: bool = False) -> str:
    utc = moment.astimezone(UTC)
    whole = utc.replace(microsecond=0)
    if up and whole < utc:
        whole += timedelta(seconds=1)
    return whole.strftime("%Y-%m-%dT%H:%M:%SZ")


def window_query(window: Interval) -> str:
    """``startDateTime=…&endDateTime=…`` covering ``window`` (whole seconds, UTC)."""
    return urlencode({"startDateTime": _stamp(window.start), "endDateTime": _stamp(window.end, up=True)})


def user_path(mailbox: str) -> str:
    return f"/users/{quote(mailbox.strip(), safe='@')}"


# --- tokens ---------------------------------------------------------------------------------------------------------
def _pem_blocks(text: str, kind: str) -> list[str]:
    blocks, inside = [], False
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith("-----BEGIN ") and kind in line:
            inside, lines = True, [line]
        elif inside:
            lines.append(line)
            if line.startswith("-----END "):
                blocks.append("\n".join(lines) + "\n")
                inside = False
    return blocks


def client_credential(settings: GraphSettings) -> str | dict[str, str]:
    """msal's client_credential: the certificate (key + certificate from one PEM file) or, failing that, the secret."""
    if settings.client_certificate is not None:
        text = settings.client_certificate.read_text(encoding="utf-8")
        keys, certificates = _pem_blocks(text, "PRIVATE KEY"), _pem_blocks(text, "CERTIFICATE")
        if len(keys) != 1 or not certificates:
            raise ValueError(f"{settings.client_certificate.name}: needs one private key and its certificate (PEM)")
        passphrase = settings.client_certificate_passphrase.get_secret_value() if settings.client_certificate_passphrase else None
        try:
            load_pem_private_key(keys[0].encode(), passphrase.encode() if passphrase else None)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{settings.client_certificate.name}: cannot read the private key ({type(exc).__name__})") from None
        credential = {"private_key": keys[0], "public_certificate": "".join(certificates)}
        if passphrase:
            credential["passphrase"] = passphrase
        return credential
    if settings.client_secret is not None and settings.client_secret.get_secret_value():
        return settings.client_secret.get_secret_value()
    raise ValueError("graph: configure client_certificate (or client_secret as a fallback)")


def graph_scope(graph_url: str) -> str:
    """The app-only scope for a Graph base URL: ``https://graph.microsoft.com/.default``."""
    parts = urlsplit(graph_url)
    return f"{parts.scheme}://{parts.netloc}/.default"


class GraphTokens:
    """App-only access tokens. msal caches them and asks again 5 minutes before expiry; built on first use."""

    def __init__(self, settings: GraphSettings, session: requests.Session) -> None:
        if not settings.tenant_id or not settings.client_id:
            raise ValueError("graph: tenant_id and client_id are required")
        self._credential = client_credential(settings)
        self._authority = f"{settings.authority_url.rstrip('/')}/{settings.tenant_id}"
        self._client_id = settings.client_id
        self._scopes = [graph_scope(settings.graph_url)]
        self._session = session
        self._app: msal.ConfidentialClientApplication | None = None
        self._lock = threading.Lock()

    def token(self) -> str:
        with self._lock:
            if self._app is None:
                try:
                    self._app = msal.ConfidentialClientApplication(
                        self._client_id,
                        client_credential=self._credential,
                        authority=self._authority,
                        http_client=self._session,
                        instance_discovery=False,
                        token_cache=msal.TokenCache(),
                    )
                except ValueError as exc:   # msal: the authority's discovery document could not be read
                    raise GraphAuthError(f"authority discovery failed ({type(exc).__name__})") from None
            result = self._app.acquire_token_for_client(scopes=self._scopes)
        token = result.get("access_token") if isinstance(result, dict) else None
        if not token:
            code = result.get("error", "no_token") if isinstance(result, dict) else "no_token"
            raise GraphAuthError(str(code)[:80])
        return str(token)

    def invalidate(self) -> None:
        """Forget the cached token (after a 401), so the next call asks the authority again."""
        with self._lock:
            if self._app is not None:
                self._app.remove_tokens_for_client()


# --- per-mailbox concurrency -----------------------------------------------------------------------------------------
class MailboxSlots:
    """At most ``capacity`` requests in flight per mailbox; several mailboxes are taken in a fixed order."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._cond = threading.Condition()
        self._busy: Counter[str] = Counter()

    @contextmanager
    def hold(self, counts: Mapping[str, int]) -> Iterator[None]:
        taken: list[tuple[str, int]] = []
        try:
            for mailbox in sorted(counts):
                wanted = counts[mailbox]
                if wanted > self.capacity:
                    raise ValueError(f"{wanted} requests for one mailbox exceed its {self.capacity} slots")
                with self._cond:
                    self._cond.wait_for(lambda: self._busy[mailbox] + wanted <= self.capacity)
                    self._busy[mailbox] += wanted
                taken.append((mailbox, wanted))
            yield
        finally:
            with self._cond:
                for mailbox, wanted in taken:
                    self._busy[mailbox] -= wanted
                    if self._busy[mailbox] <= 0:
                        del self._busy[mailbox]
                self._cond.notify_all()

    def in_flight(self, mailbox: str) -> int:
        with self._cond:
            return self._busy[mailbox.lower()]


# --- the reader ------------------------------------------------------------------------------------------------------
def build_session(settings: GraphSettings, pool_maxsize: int = 32) -> BoundedSession:
    """Pinned trust (``ca_bundle`` or the system store), a hard deadline per request, a response size cap."""
    return BoundedSession(trust_context(settings.ca_bundle), settings.timeout.total_seconds(), settings.max_response_bytes, pool_maxsize)


class GraphReader:
    """One app registration's Graph access, shared by all threads of a producer."""

    def __init__(
        self,
        settings: GraphSettings,
        *,
        session: requests.Session | None = None,
        tokens: GraphTokens | None = None,
        planner_organizers: frozenset[str] = frozenset(),
    ) -> None:
        """``planner_organizers``: Planner's organizer addresses, lower-cased (``BusyPolicy.planner_organizers``)."""
        self.settings = settings
        self.planner_organizers = planner_organizers
        self.base = settings.graph_url.rstrip("/")
        self._session = session or build_session(settings)
        self._tokens = tokens or GraphTokens(settings, self._session)
        self.slots = MailboxSlots(settings.max_concurrent_per_mailbox)
        self._masters: OrderedDict[tuple[str, str], str | None] = OrderedDict()
        self._masters_lock = threading.Lock()

    def close(self) -> None:
        self._session.close()

    # --- plumbing -----------------------------------------------------------------------------------------------
    def _prefer(self, page_size: int | None = None) -> str:
        return f"{PREFER_UTC}, odata.maxpagesize={page_size or self.settings.max_page_size}"

    def _absolute(self, url: str) -> str:
        if url.startswith("/"):
            return self.base + url
        if url.startswith(self.base + "/"):
            return url
        raise GraphProtocolError("a link outside the configured Graph URL")

    def _relative(self, url: str) -> str:
        return self._absolute(url)[len(self.base) :]

    def _call(self, method: str, url: str, counts: Mapping[str, int], prefer: str | None = None, body: Any = None) -> requests.Response:
        """One HTTP call with a bearer token (a 401 renews it once); raises GraphError for an error status."""
        absolute = self._absolute(url)
        with self.slots.hold({mailbox.lower(): n for mailbox, n in counts.items()}):
            for attempt in (1, 2):
                headers = {"Authorization": f"Bearer {self._tokens.token()}", "Accept": "application/json"}
                if prefer:
                    headers["Prefer"] = prefer
                response = self._session.request(method, absolute, headers=headers, json=body)
                if response.status_code == 401 and attempt == 1:
                    log.info("graph_token_rejected", status=401)
                    self._tokens.invalidate()
                    continue
                break
        if response.status_code >= 400:
            mailbox = next(iter(counts), None)
            raise graph_error(response.status_code, response.headers, _json_or_none(response), mailbox)
        return response

    def _get_page(self, mailbox: str, url: str, prefer: str) -> _Page:
        response = self._call("GET", url, {mailbox: 1}, prefer)
        return _page(_stripped(_json(response)))

    # --- reads --------------------------------------------------------------------------------------------------
    @metrics.timed_exchange_call("graph", "view", lambda error: classify(error).kind)
    def view(self, mailbox: str, window: Interval) -> list[CalendarItem]:
        """Every instance (single, occurrence, exception) overlapping ``window``, following nextLinks."""
        url: str | None = f"{user_path(mailbox)}/calendarView?{window_query(window)}"
        entries: list[dict[str, Any]] = []
        pages = 0
        while url:
            page = self._get_page(mailbox, url, self._prefer())
            entries.extend(page.entries)
            pages += 1
            url = page.next_link
        found: dict[str, CalendarItem] = {}
        masters = self.series_uids(mailbox, [m for m in (missing_series_uid(e) for e in entries) if m])
        for entry in entries:
            if is_removal(entry):
                continue
            try:
                item = calendar_item_from_event(entry, masters.get(entry.get("seriesMasterId") or ""), self.planner_organizers)
            except GraphEventError as exc:
                log.warning("graph_event_skipped", mailbox=mailbox, reason=str(exc))
                continue
            found[item.item_id] = item
        log.info("graph_view_read", mailbox=mailbox, items=len(found), pages=pages)
        return list(found.values())

    @metrics.timed_exchange_call("graph", "sync", lambda error: classify(error).kind)
    def sync(self, mailbox: str, delta_link: str | None, window: Interval, page_size: int | None = None) -> tuple[list[SyncChange], str]:
        """What changed since ``delta_link`` (None: a new round over ``window``, everything in it) and the next link.

        Raises SyncStateNotFound (410) when the link is no longer valid: start again with None.
        """
        url: str | None = delta_link or f"{user_path(mailbox)}/calendarView/delta?{window_query(window)}"
        entries: list[dict[str, Any]] = []
        pages = 0
        while True:
            assert url is not None
            page = self._get_page(mailbox, url, self._prefer(page_size))
            entries.extend(page.entries)
            pages += 1
            if page.delta_link:
                next_link = page.delta_link
                break
            if not page.next_link:
                raise GraphProtocolError("a delta page with neither nextLink nor deltaLink")
            url = page.next_link
        changes = self._changes(mailbox, entries)
        log.info("graph_delta_read", mailbox=mailbox, changes=len(changes), pages=pages, new_round=delta_link is None)
        return changes, self._absolute(next_link)

    def rebase(self, mailbox: str, window: Interval) -> tuple[list[CalendarItem], str]:
        """A new delta round over ``window``: every instance in it (a full view, e.g. for the nightly snapshot) and
        the round's delta link, so the changes that follow are read over the new window."""
        changes, link = self.sync(mailbox, None, window)
        return [change.item for change in changes if change.item is not None], link

    @metrics.timed_exchange_call("graph", "sync_batch")
    def sync_many(self, rounds: Sequence[DeltaRound], page_size: int | None = None) -> dict[str, DeltaResult | SourceFault]:
        """Delta reads of several mailboxes, their pages fetched together through $batch; a fault per failed mailbox."""
        if len({r.mailbox.lower() for r in rounds}) != len(rounds):
            raise ValueError("one round per mailbox")
        pending = {r.mailbox: r.delta_link or f"{user_path(r.mailbox)}/calendarView/delta?{window_query(r.window)}" for r in rounds}
        entries: dict[str, list[dict[str, Any]]] = {r.mailbox: [] for r in rounds}
        links: dict[str, str] = {}
        results: dict[str, DeltaResult | SourceFault] = {}
        prefer = self._prefer(page_size)
        while pending:
            order = list(pending)
            try:
                answers = self.batch([BatchRequest(str(n), pending[mb], mb, {"Prefer": prefer}) for n, mb in enumerate(order)])
            except Exception as exc:  # noqa: BLE001 - the whole batch failed: every mailbox in it has that fault
                fault = classify(exc)
                results.update({mb: fault for mb in order})
                break
            pending = {}
            for mailbox, answer in zip(order, answers):
                if answer.status >= 400:
                    results[mailbox] = classify(graph_error(answer.status, answer.headers, answer.body, mailbox))
                    continue
                try:
                    page = _page(answer.body)
                except GraphProtocolError as exc:
                    results[mailbox] = classify(exc)
                    continue
                entries[mailbox].extend(page.entries)
                if page.delta_link:
                    links[mailbox] = page.delta_link
                elif page.next_link:
                    pending[mailbox] = page.next_link
                else:
                    results[mailbox] = classify(GraphProtocolError("a delta page with neither nextLink nor deltaLink"))
        for mailbox, link in links.items():
            try:
                results[mailbox] = DeltaResult(self._changes(mailbox, entries[mailbox]), self._absolute(link))
            except Exception as exc:  # noqa: BLE001 - reading series masters failed for this mailbox only
                results[mailbox] = classify(exc)
        for result in results.values():
            if isinstance(result, SourceFault):   # one per mailbox whose read in the batch failed
                metrics.exchange_call_failed("graph", "sync_batch", result.kind)
        log.info("graph_delta_batch_read", mailboxes=len(rounds), failed=sum(isinstance(r, SourceFault) for r in results.values()))
        return results

    def _changes(self, mailbox: str, entries: list[dict[str, Any]]) -> list[SyncChange]:
        """One change per item id (the last entry wins: a round may replay an item); removals become deletes."""
        last: dict[str, dict[str, Any]] = {}
        for entry in entries:
            if isinstance(entry.get("id"), str) and entry["id"]:
                last.pop(entry["id"], None)
                last[entry["id"]] = entry
        masters = self.series_uids(mailbox, [m for m in (missing_series_uid(e) for e in last.values()) if m])
        changes = []
        for entry in last.values():
            try:
                changes.append(sync_change_from_event(entry, masters.get(entry.get("seriesMasterId") or ""), self.planner_organizers))
            except GraphEventError as exc:
                log.warning("graph_event_skipped", mailbox=mailbox, reason=str(exc))
        return changes

    def series_uids(self, mailbox: str, master_ids: Sequence[str]) -> dict[str, str | None]:
        """The EWS UID of each series master (None: gone, or no usable iCalUId); cached, unknown ones via $batch."""
        wanted = list(dict.fromkeys(master_ids))
        found: dict[str, str | None] = {}
        with self._masters_lock:
            for master_id in wanted:
                if (mailbox.lower(), master_id) in self._masters:
                    found[master_id] = self._masters[(mailbox.lower(), master_id)]
        missing = [m for m in wanted if m not in found]
        if not missing:
            return found
        requests_ = [
            BatchRequest(str(n), f"{user_path(mailbox)}/events/{quote(m, safe='')}?$select=iCalUId,type", mailbox) for n, m in enumerate(missing)
        ]
        for master_id, answer in zip(missing, self.batch(requests_)):
            if answer.status == 404:
                found[master_id] = None
                continue
            if answer.status >= 400:
                raise graph_error(answer.status, answer.headers, answer.body, mailbox)
            ical_uid = answer.body.get("iCalUId") if isinstance(answer.body, Mapping) else None
            try:
                found[master_id] = series_uid_from_ical_uid(ical_uid) if isinstance(ical_uid, str) else None
            except NotAGlobalObjectId:
                found[master_id] = None
            with self._masters_lock:
                self._masters[(mailbox.lower(), master_id)] = found[master_id]
                while len(self._masters) > MASTER_CACHE_SIZE:
                    self._masters.popitem(last=False)
        log.info("graph_series_masters_read", mailbox=mailbox, masters=len(missing))
        return found

    # --- $batch -------------------------------------------------------------------------------------------------
    def batch(self, requests_: Sequence[BatchRequest]) -> list[BatchResponse]:
        """GET requests through $batch (at most ``batch_size`` per call, at most the per-mailbox slots each);
        answers in request order, content dropped. Raises GraphError only when a whole $batch call fails."""
        if len({r.id for r in requests_}) != len(requests_):
            raise ValueError("batch request ids must be unique")
        answers: dict[str, BatchResponse] = {}
        for chunk in self._chunks(requests_):
            answers.update(self._batch_call(chunk))
        return [answers[r.id] for r in requests_]

    def _chunks(self, requests_: Sequence[BatchRequest]) -> Iterator[list[BatchRequest]]:
        chunk: list[BatchRequest] = []
        per_mailbox: Counter[str] = Counter()
        for request in requests_:
            key = (request.mailbox or "").lower()
            if chunk and (len(chunk) >= self.settings.batch_size or (key and per_mailbox[key] >= self.slots.capacity)):
                yield chunk
                chunk, per_mailbox = [], Counter()
            chunk.append(request)
            if key:
                per_mailbox[key] += 1
        if chunk:
            yield chunk

    def _batch_call(self, chunk: list[BatchRequest]) -> dict[str, BatchResponse]:
        body = {"requests": [{"id": r.id, "method": "GET", "url": self._relative(r.url), "headers": dict(r.headers)} for r in chunk]}
        counts = Counter(r.mailbox.lower() for r in chunk if r.mailbox)
        response = self._call("POST", "/$batch", counts, body=body)
        payload = _json(response)
        parts = payload.get("responses") if isinstance(payload, dict) else None
        if not isinstance(parts, list):
            raise GraphProtocolError("a $batch answer without responses")
        answers: dict[str, BatchResponse] = {}
        for part in parts:
            if not isinstance(part, Mapping) or not isinstance(part.get("id"), str) or not isinstance(part.get("status"), int):
                raise GraphProtocolError("a $batch answer part without id or status")
            headers = part.get("headers") if isinstance(part.get("headers"), Mapping) else {}
            answers[part["id"]] = BatchResponse(part["id"], part["status"], {str(k): str(v) for k, v in (headers or {}).items()}, _stripped(part.get("body")))
        missing = [r.id for r in chunk if r.id not in answers]
        if missing:
            raise GraphProtocolError(f"a $batch answer without {len(missing)} of its parts")
        return answers


def _json(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise GraphProtocolError(f"answer is not JSON (HTTP {response.status_code})") from None


def _json_or_none(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


class GraphSyncReader:
    """``shared.mailbox_passes.SyncReader`` over Graph for one pass: the delta round's window is fixed here.

    ``sync_mailbox(mailbox, GraphSyncReader(reader, window), positions, publish, window, observed_at, new_id,
    full=full, backend="graph")``: the stored sync state is the delta link; None starts a round over ``window``.
    """

    def __init__(self, reader: GraphReader, window: Interval) -> None:
        self.reader = reader
        self.window = window

    def view(self, mailbox: str, window: Interval) -> list[CalendarItem]:
        return self.reader.view(mailbox, window)

    def occurrences(self, mailbox: str, window: Interval) -> list[CalendarItem]:
        return self.reader.view(mailbox, window)   # Graph's calendarView: the instances come with the singles

    def sync(self, mailbox: str, sync_state: str | None, page_size: int = 200) -> tuple[list[SyncChange], str]:
        return self.reader.sync(mailbox, sync_state, self.window, min(page_size, self.reader.settings.max_page_size))

