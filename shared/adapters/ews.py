"""Exchange through EWS: the only module that imports exchangelib.

Reads only what deciding busy time needs (ids, UID, type, times, zones, status, flags, organizer)
with ``only_fields``: subjects, bodies, locations and attendees are never requested. The organizer is read
only to answer "is it one of Planner's addresses?" (``organizer_is_planner``); neither its address nor its
name leaves ``to_calendar_item`` (decision 71 in docs/decisions.md). Our reads parse those fields straight from
the answer (``_ReadItem``, decision 101); exchangelib builds the requests, sends them and checks the answers.

Traps handled here (decisions 22, 23 and 26 in docs/decisions.md):
- exchangelib converts all-day start/end to dates in a zone it chooses and can give an end before the
  start on the spring DST Sunday; we also keep the instants Exchange sent (``_CalendarItemWithInstants``)
  and let ``shared.domain.busy_rules`` derive the dates in the item's own zone.
- ``FailFast`` retry policy: exchangelib's back-off is global per service account, so one throttled
  mailbox would freeze all; we raise instead and back off per mailbox (``classify``).
- The session pool is sized for the open streams plus the worker threads (default pool size is 1), and keeps
  that size: exchangelib shrinks it on ErrorServerBusy under a lock it then waits on, which deadlocks every
  read once all sessions are in use (``_keep_pool_size``, decision 69).
- A configured CA bundle wins over ``REQUESTS_CA_BUNDLE``, and every request but a stream has a hard total deadline
  (``_EwsAdapter``): a server that drips its answer within the read timeout is cut, the session retired, and the
  read fails like any transient fault (decision 86).
- ``Folder.get_events`` never advances the watermark while MoreEvents is true: we page ourselves.
"""

from __future__ import annotations

import copy
import functools
import re
import ssl
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Iterator, NamedTuple

import requests
import requests.adapters
from exchangelib import (
    BASIC,
    IMPERSONATION,
    NTLM,
    Account,
    Build,
    Configuration,
    Credentials,
    EWSDateTime,
    EWSTimeZone,
    FailFast,
    Version,
)
from exchangelib import errors as ews_errors
from exchangelib.ewsdatetime import NaiveDateTimeNotAllowed
from exchangelib.folders.base import BaseFolder
from exchangelib.items import ID_ONLY
from exchangelib.items import CalendarItem as EwsCalendarItem
from exchangelib.properties import Notification, StatusEvent
from exchangelib.protocol import BaseProtocol
from exchangelib.services import GetStreamingEvents, SyncFolderItems
from exchangelib.services.common import folder_ids_element, shape_element
from exchangelib.util import TNS, DummyResponse, add_xml_child, create_element

from shared import metrics
from shared.adapters.deadline import DeadlineAdapter, deadline
from shared.adapters.deadline import current as current_deadline
from shared.config import ExchangeSettings
from shared.domain.busy_rules import organizer_flag
from shared.domain.contracts import CalendarItem, Interval
from shared.domain.mailbox_reads import SyncChange
from shared.domain.source_faults import SourceFault

VIEW_CAP = 1000  # Exchange's EWSFindCountLimit: the most items one CalendarView answers
MIN_VIEW_SLICE = timedelta(hours=1)
BUILDS = {
    "Exchange2013_SP1": Build(15, 0, 847, 32),
    "Exchange2016": Build(15, 1, 2507, 6),
    "Exchange2019": Build(15, 2, 1118, 7),
}
FIELDS = (
    "uid",
    "type",
    "start",
    "end",
    "original_start",
    "is_all_day",
    "legacy_free_busy_status",
    "is_cancelled",
    "sensitivity",
    "organizer",
    "last_modified_time",
    "_start_timezone",
    "_end_timezone",
)
_TYPES = {"Single": "single", "Occurrence": "occurrence", "Exception": "exception", "RecurringMaster": "master"}


class _CalendarItemWithInstants(EwsCalendarItem):
    """exchangelib's CalendarItem, unchanged, plus the Start/End instants exactly as Exchange sent them.

    Registered for the CalendarItem tag so every read returns it; other exchangelib users in the same
    process see the same behaviour as before (``start``/``end`` still become dates on all-day items).
    """

    __slots__ = ("raw_start", "raw_end")

    @classmethod
    def from_xml(cls, elem: Any, account: Any) -> Any:
        if getattr(_our_reads, "active", False):
            # our own reads: the requested fields (``FIELDS``) are read straight from the element into a plain record
            # (decision 101); exchangelib's item model is not built. ``to_calendar_item`` reads either.
            item = _ReadItem.from_xml(elem, account)
            elem.clear()
            return item
        raw_start, raw_end = _xml_instant(elem, "Start"), _xml_instant(elem, "End")  # before from_xml clears elem
        item = super().from_xml(elem=elem, account=account)
        item.raw_start, item.raw_end = raw_start, raw_end
        return item


_our_reads = threading.local()   # set while EwsConnection reads; other exchangelib users in the process are unaffected


def _t(name: str) -> str:
    return f"{{{TNS}}}{name}"


_BOOLEANS = {"true": True, "on": True, "false": False, "off": False}   # as exchangelib reads a boolean


class _Organizer:
    __slots__ = ("email_address",)

    def __init__(self, email_address: str | None) -> None:
        self.email_address = email_address


@dataclass(slots=True)
class _ReadItem:
    """A calendar item as our reads need it, with exchangelib's attribute names (what ``to_calendar_item`` and
    exchangelib's own id handling read), parsed from the answer's element as exchangelib's field parsers would."""

    id: str | None
    changekey: str | None
    uid: str | None
    type: str | None
    raw_start: datetime | None
    raw_end: datetime | None
    original_start: datetime | None
    last_modified_time: datetime | None
    is_all_day: bool | None
    is_cancelled: bool | None
    legacy_free_busy_status: str | None
    sensitivity: str | None
    organizer: _Organizer | None
    _start_timezone: str | None
    start: None = None   # exchangelib's converted times are not made: ``raw_start``/``raw_end`` are what is used
    end: None = None

    @classmethod
    def from_xml(cls, elem: Any, account: Any) -> _ReadItem:
        found = elem.find(_t("ItemId"))
        mailbox = elem.find(f"{_t('Organizer')}/{_t('Mailbox')}")
        zone = elem.find(_t("StartTimeZone"))
        return cls(
            id=found.get("Id") if found is not None else None,
            changekey=found.get("ChangeKey") if found is not None else None,
            uid=_text(elem, "UID"),
            type=_text(elem, "CalendarItemType"),
            raw_start=_xml_instant(elem, "Start"),
            raw_end=_xml_instant(elem, "End"),
            original_start=_xml_datetime(elem, "OriginalStart", account),
            last_modified_time=_xml_datetime(elem, "LastModifiedTime", account),
            is_all_day=_xml_boolean(elem, "IsAllDayEvent"),
            is_cancelled=_xml_boolean(elem, "IsCancelled"),
            legacy_free_busy_status=_text(elem, "LegacyFreeBusyStatus"),
            sensitivity=_text(elem, "Sensitivity"),
            organizer=_Organizer(_text(mailbox, "EmailAddress")) if mailbox is not None else None,
            _start_timezone=_ms_zone(zone.get("Id") or zone.get("Name")) if zone is not None else None,
        )


def _text(elem: Any, name: str) -> str | None:
    found = elem.find(_t(name))
    return (found.text or None) if found is not None else None


def _xml_boolean(elem: Any, name: str) -> bool | None:
    text = _text(elem, name)
    return _BOOLEANS.get(text.lower()) if text is not None else None


def _xml_datetime(elem: Any, name: str, account: Any) -> datetime | None:
    """A date-time field as exchangelib reads it: with its offset, or naive in the account's default zone."""
    text = _text(elem, name)
    if text is None:
        return None
    try:
        value = EWSDateTime.from_string(text)
    except NaiveDateTimeNotAllowed as naive:
        return naive.local_dt.replace(tzinfo=account.default_timezone) if account is not None else None
    except ValueError:
        return None
    return value if isinstance(value, datetime) else None


@functools.lru_cache(maxsize=512)
def _ms_zone(zone_id: str | None) -> str | None:
    """A StartTimeZone's Windows id as exchangelib keeps it (``EWSTimeZone.ms_id``); None when it knows none.
    Remembered: building the zone is a tenth of a millisecond, and a mailbox has a handful."""
    if not zone_id:
        return None
    try:
        return str(EWSTimeZone.from_ms_id(zone_id).ms_id)
    except ews_errors.UnknownTimeZone:
        return None


def _xml_instant(elem: Any, name: str) -> datetime | None:
    text = _text(elem, name)
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return value.astimezone(timezone.utc) if value.tzinfo else None


BaseFolder.ITEM_MODEL_MAP[EwsCalendarItem.response_tag()] = _CalendarItemWithInstants


class _CalendarSync(SyncFolderItems):
    """exchangelib's SyncFolderItems for our calendar reads, with the part of the request that never changes made once
    (decision 110 in docs/decisions.md): the fields asked for are resolved once per Exchange version, not checked and
    resolved again at every read as ``FolderCollection.sync_items`` does, and the ItemShape element they make is built
    once and copied into each request. exchangelib still builds the rest, sends it and checks the answer."""

    _fields: dict[Any, Any] = {}   # Exchange build -> the FieldPaths of ``FIELDS`` (a set, as exchangelib passes them)
    _shapes: dict[Any, Any] = {}   # (Exchange build, shape, fields) -> the ItemShape element asking for them
    _made = threading.Lock()

    @classmethod
    def fields(cls, folder: Any) -> Any:
        version = folder.account.version
        with cls._made:
            found = cls._fields.get(version.build)
            if found is None:
                for name in FIELDS:
                    folder.validate_item_field(field=name, version=version)
                found = cls._fields[version.build] = frozenset(f for f in folder.normalize_fields(fields=FIELDS) if not f.field.is_attribute)
            return found

    def _partial_get_payload(self, folder: Any, shape: Any, additional_fields: Any, sync_state: Any) -> Any:
        version = self.account.version
        key = (version.build, shape, frozenset(additional_fields))   # ``fields`` gives a frozenset: its hash is kept
        with self._made:
            template = self._shapes.get(key)
            if template is None:
                template = self._shapes[key] = shape_element(tag=self.shape_tag, shape=shape, additional_fields=additional_fields, version=version)
        payload = create_element(f"m:{self.SERVICE_NAME}")
        payload.append(copy.deepcopy(template))
        payload.append(folder_ids_element(folders=[folder], version=version, tag="m:SyncFolderId"))
        if sync_state:
            add_xml_child(payload, "m:SyncState", sync_state)
        return payload


class _WholeBodyResponse(requests.Response):
    """A response whose body, once read whole, is handed on in 64 KiB slices rather than byte by byte.

    exchangelib parses every answer from ``response.iter_content()``, whose chunk size defaults to one byte; for a
    body requests has already read (every answer but a stream's) that is a generator step per byte, half the CPU
    of reading a calendar (decision 93 in docs/decisions.md). A stream's body is not read yet and is left alone.
    """

    def iter_content(self, chunk_size: int | None = 1, decode_unicode: bool = False) -> Iterator[Any]:
        if chunk_size == 1 and not decode_unicode and getattr(self, "_content_consumed", False) and isinstance(self._content, bytes):
            body = self._content
            return (body[at : at + 65536] for at in range(0, len(body), 65536))
        return super().iter_content(chunk_size, decode_unicode)


class _EwsAdapter(DeadlineAdapter):
    """Verifies against the configured CA bundle, or the system store (REQUESTS_CA_BUNDLE has no say), and runs
    every request that is not a stream under a hard total deadline, its body included (decision 86).

    exchangelib builds its sessions itself, so the bundle and the deadline are class attributes set by
    ``EwsConnection``: one Exchange configuration per process (the producers each have one). requests reads a
    body after the adapter's ``send`` returns; here it is read inside the deadline, and requests finds it read.
    """

    ca_bundle: str | None = None
    call_deadline: float | None = None
    _pool_keys: dict[tuple[Any, ...], Any] = {}   # shared by every adapter: one configuration per process

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        super().cert_verify(conn, url, self.ca_bundle or _system_trust(), cert)

    def build_connection_pool_key_attributes(self, request: requests.PreparedRequest, verify: Any, cert: Any = None) -> Any:
        """The connection pool's key for a request, worked out once per server (decision 108 in docs/decisions.md):
        requests parses the URL and asks the file system whether the CA path is a folder at every request."""
        url = request.url or ""
        origin = url[: url.find("/", url.find("//") + 2)] if "//" in url else url
        key = (origin, cert if isinstance(cert, (str, tuple)) else None, self.ca_bundle)
        cached = self._pool_keys.get(key)
        if cached is None:
            cached = super().build_connection_pool_key_attributes(request, self.ca_bundle or _system_trust(), cert)
            self._pool_keys[key] = cached
        host_params, pool_kwargs = cached
        return dict(host_params), dict(pool_kwargs)

    def build_response(self, req: requests.PreparedRequest, resp: Any) -> requests.Response:
        response = super().build_response(req, resp)
        response.__class__ = _WholeBodyResponse   # same layout, one method more (decision 93)
        return response

    def send(self, request: requests.PreparedRequest, stream: bool = False, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        if stream or self.call_deadline is None or current_deadline() is not None:
            return super().send(request, stream=stream, **kwargs)
        with deadline(self.call_deadline, "EWS request"):
            response = super().send(request, stream=stream, **kwargs)
            _ = response.content
        return response


@functools.cache
def _system_trust() -> str | bool:
    """The system store's bundle, looked up once per process: requests asks for it at every request (decision 106)."""
    paths = ssl.get_default_verify_paths()
    return paths.cafile or paths.capath or True


_ENVELOPE_START = re.compile(rb"<(?:[\w.-]+:)?Envelope[\s/>]")
_ENVELOPE_END = re.compile(rb"</(?:[\w.-]+:)?Envelope\s*>")


def envelopes(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Each whole SOAP envelope in a stream of byte chunks, as soon as its end tag has arrived (decision 98).

    Chunks may split an envelope, or a tag, anywhere; bytes between envelopes (an XML declaration, whitespace) are
    dropped, as exchangelib's own splitter drops them."""
    buffer, searched = b"", 0
    for chunk in chunks:
        if not chunk:
            continue
        buffer += chunk
        while (end := _ENVELOPE_END.search(buffer, searched)) is not None:
            start = _ENVELOPE_START.search(buffer, 0, end.start())
            if start is not None:
                yield b"<?xml version='1.0' encoding='utf-8'?>\n" + buffer[start.start() : end.end()]
            buffer, searched = buffer[end.end() :], 0
        searched = max(0, len(buffer) - 64)   # only the tail is searched again: an end tag split by the chunk boundary


class _Notice(NamedTuple):
    """What ``EwsConnection.stream`` needs of one notification."""

    subscription_id: str | None
    changed: bool   # it carries an item or folder event, not only a status event (a keep-alive)


# the tags of the events exchangelib reads from a notification, as exchangelib maps them, but for the status event
_CHANGE_EVENTS = frozenset(tag for tag, cls in Notification.get_field_by_fieldname("events")._event_types_map.items() if cls is not StatusEvent)
_SUBSCRIPTION_ID = Notification.get_field_by_fieldname("subscription_id").response_tag()


class _StreamingEvents(GetStreamingEvents):
    """GetStreamingEvents whose HTTP read timeout is our silence watchdog, not minutes * 60 + 60, whose stream is
    split into envelopes a chunk at a time (decision 98), and whose notifications are read only for their subscription
    and whether they carry a change (decision 111)."""

    def __init__(self, *args: Any, silence: float, **kwargs: Any) -> None:
        self._silence = silence
        super().__init__(*args, **kwargs)

    timeout = property(lambda self: self._silence, lambda self, value: None)

    def _get_soap_messages(self, body: Any) -> Iterator[Any]:
        """As exchangelib's, with the envelopes found in whole HTTP chunks as they arrive. exchangelib reads the stream
        a byte at a time (each byte a pass through urllib3's chunked reader): most of the change producer's CPU for a
        notification. A stream that is not chunked (no Exchange sends one) is read as exchangelib reads it."""
        chunks = body.iter_content(chunk_size=None) if getattr(body.raw, "chunked", False) else body.iter_content(chunk_size=1)
        parent: Any = super(GetStreamingEvents, self)   # exchangelib's EWSService, past its stream override
        for document in envelopes(chunks):
            try:
                _, soap_body = parent._get_soap_parts(response=DummyResponse(content=document))
            except Exception:
                body.close()
                raise
            yield from parent._get_soap_messages(body=soap_body)
            if self.connection_status == self.CLOSED:
                break

    @staticmethod
    def _elem_to_obj(elem: Any) -> _Notice:
        """One notification, as far as ``stream`` needs it: exchangelib's ``Notification`` with every event's fields is
        not built (decision 111 in docs/decisions.md)."""
        found = elem.find(_SUBSCRIPTION_ID)
        return _Notice(found.text if found is not None else None, any(child.tag in _CHANGE_EVENTS for child in elem))


# --- failures -----------------------------------------------------------------------------------
def classify(error: BaseException) -> SourceFault:
    """What an exception from exchangelib (or requests under it) means for one mailbox."""
    name = type(error).__name__
    if isinstance(error, ews_errors.ErrorServerBusy):
        return SourceFault("throttled", name, getattr(error, "back_off", None))
    if isinstance(error, ews_errors.ErrorInvalidSyncStateData) or name in {"ErrorInvalidSyncStateData", "ErrorSyncFolderNotFound"}:
        return SourceFault("invalid_sync_state", name)
    if isinstance(error, (ews_errors.ErrorSubscriptionNotFound, ews_errors.ErrorExpiredSubscription, ews_errors.ErrorInvalidSubscription)):
        return SourceFault("subscription_lost", name)
    if isinstance(
        error,
        (
            ews_errors.ErrorImpersonateUserDenied,
            ews_errors.ErrorNonExistentMailbox,
            ews_errors.ErrorMailboxMoveInProgress,
            ews_errors.ErrorMailboxStoreUnavailable,
            ews_errors.ErrorImpersonationFailed,
            ews_errors.ErrorAccessDenied,
        ),
    ):
        return SourceFault("mailbox_unavailable", name)
    if "DeadlineExceeded" in str(error):   # exchangelib re-raises a cut request as ErrorTimeoutExpired (decision 86)
        return SourceFault("transient", "DeadlineExceeded: no complete EWS answer within its deadline")
    if isinstance(error, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError, requests.exceptions.Timeout)) or name in {"ErrorTimeoutExpired"}:
        return SourceFault("stream_broken", name)
    return SourceFault("transient", f"{name}: {str(error)[:200]}")


# --- mapping --------------------------------------------------------------------------------------
def _aware_utc(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            return None
        return datetime.fromtimestamp(value.timestamp(), tz=timezone.utc)
    return None


def _zone_id(value: Any) -> str | None:
    if value is None:
        return None
    return getattr(value, "ms_id", None) or getattr(value, "key", None) or str(value)


def to_calendar_item(item: Any, planner_organizers: frozenset[str] = frozenset()) -> CalendarItem:
    """exchangelib's calendar item → our content-free CalendarItem (missing fields stay None).

    ``planner_organizers`` (lower-cased) decides ``organizer_is_planner``; the organizer's address is not kept.
    """
    organizer = getattr(item, "organizer", None)
    status = getattr(item, "legacy_free_busy_status", None)
    return CalendarItem(
        item_id=item.id,
        change_key=getattr(item, "changekey", None),
        uid=getattr(item, "uid", None) or None,
        item_type=_TYPES.get(getattr(item, "type", None) or "Single", "single"),
        start=getattr(item, "raw_start", None) or _aware_utc(getattr(item, "start", None)),
        end=getattr(item, "raw_end", None) or _aware_utc(getattr(item, "end", None)),
        original_start=_aware_utc(getattr(item, "original_start", None)),
        time_zone=_zone_id(getattr(item, "_start_timezone", None)),
        all_day=bool(getattr(item, "is_all_day", False)),
        free_busy=status if status in ("Free", "Tentative", "Busy", "OOF", "NoData", "WorkingElsewhere") else None,
        cancelled=bool(getattr(item, "is_cancelled", False)),
        sensitivity=getattr(item, "sensitivity", None) or "Normal",
        organizer_is_planner=organizer_flag(getattr(organizer, "email_address", None) if organizer is not None else None, planner_organizers),
        last_modified=_aware_utc(getattr(item, "last_modified_time", None)),
    )


# --- the connection ----------------------------------------------------------------------------------
def _keep_pool_size() -> None:
    """Replaces ``Protocol.decrease_poolsize``: the pool keeps its size (decision 69 in docs/decisions.md).

    exchangelib answers ErrorServerBusy by taking a session out of its pool while holding the pool lock; with
    every session in use that wait tries to grow the pool, which needs the same lock, and the thread and then all
    threads deadlock. Throttling is handled per mailbox instead (``classify`` gives the wait Exchange asked for),
    and a smaller pool would starve reads behind the open streams anyway. exchangelib treats this error as
    "already as small as it gets".
    """
    raise ews_errors.SessionPoolMinSizeReached("plannersync keeps the EWS session pool size")


class EwsConnection:
    """One service account's EWS access, shared by all threads of a producer."""

    def __init__(self, settings: ExchangeSettings, zone: str, pool_size: int, planner_organizers: frozenset[str] = frozenset()) -> None:
        """``planner_organizers``: Planner's organizer addresses, lower-cased (``BusyPolicy.planner_organizers``)."""
        _EwsAdapter.ca_bundle = str(settings.ca_bundle) if settings.ca_bundle else None
        _EwsAdapter.call_deadline = settings.call_deadline.total_seconds()
        BaseProtocol.HTTP_ADAPTER_CLS = _EwsAdapter
        # which process calls: Exchange's (IIS) logs tell the replicas apart, and so does the simulator's call log
        BaseProtocol.USERAGENT = f"plannersync ({settings.replica()})"
        self.settings = settings
        self.planner_organizers = planner_organizers
        self.zone = EWSTimeZone(zone)
        self.config = Configuration(
            service_endpoint=settings.endpoint,
            credentials=Credentials(settings.username, settings.password.get_secret_value()),
            auth_type=NTLM if settings.auth_type == "NTLM" else BASIC,
            version=Version(build=BUILDS[settings.version]),
            retry_policy=FailFast(),
            max_connections=pool_size,
        )
        self._accounts: dict[str, Account] = {}
        self._lock = threading.Lock()

    def account(self, mailbox: str) -> Account:
        with self._lock:
            account = self._accounts.get(mailbox)
            if account is None:
                account = Account(mailbox, config=self.config, access_type=IMPERSONATION, autodiscover=False, default_timezone=self.zone)
                account.protocol.decrease_poolsize = _keep_pool_size   # one shared Protocol per endpoint+account
                self._accounts[mailbox] = account
            return account

    def forget(self, mailbox: str) -> None:
        with self._lock:
            self._accounts.pop(mailbox, None)

    def close(self) -> None:
        """Close the pooled sessions (the accounts share one Protocol per endpoint and service account)."""
        with self._lock:
            protocols = {id(account.protocol): account.protocol for account in self._accounts.values()}
        for protocol in protocols.values():
            protocol.close()

    # --- reads ------------------------------------------------------------------------------------
    @metrics.timed_exchange_call("ews", "sync", lambda error: classify(error).kind)
    def sync(self, mailbox: str, sync_state: str | None, page_size: int = 200) -> tuple[list[SyncChange], str]:
        """Everything that changed in the calendar since exactly ``sync_state`` (None: everything), and the new state.

        Calls SyncFolderItems page by page from exactly the state given, as ``FolderCollection.sync_items`` does,
        but never through the cached calendar folder's ``sync_items``: that would swap a None for the state its
        last completed read left on the folder object, so a retried first read or a full re-read would quietly
        continue from there (decision 25 in docs/decisions.md). Nothing here reads or writes that cached state.
        The request's fixed part is made once (``_CalendarSync``, decision 110).
        """
        calendar = self.account(mailbox).calendar
        service = _CalendarSync(account=calendar.account)
        fields = _CalendarSync.fields(calendar)
        changes = []
        _our_reads.active = True
        try:
            while True:
                for answer in service.call(folder=calendar, shape=ID_ONLY, additional_fields=fields, sync_state=sync_state,
                                           ignore=None, max_changes_returned=page_size, sync_scope=None):
                    if isinstance(answer, Exception):
                        raise answer
                    change_type, item = answer
                    if change_type in ("create", "update"):
                        changes.append(SyncChange("upsert", item.id, to_calendar_item(item, self.planner_organizers)))
                    elif change_type == "delete":
                        changes.append(SyncChange("delete", item.id, None))
                if service.sync_state is None:
                    raise RuntimeError("SyncFolderItems answered without a sync state")
                if service.sync_state == sync_state or service.includes_last_item_in_range:
                    return changes, str(service.sync_state)   # the same state back: nothing more to read, as exchangelib stops
                sync_state = service.sync_state
        finally:
            _our_reads.active = False

    @metrics.timed_exchange_call("ews", "view", lambda error: classify(error).kind)
    def view(self, mailbox: str, window: Interval) -> list[CalendarItem]:
        """Every occurrence and single item overlapping ``window``, paging around Exchange's view cap."""
        calendar = self.account(mailbox).calendar
        _our_reads.active = True
        try:
            return [to_calendar_item(item, self.planner_organizers) for item in self._view_items(calendar, window, FIELDS)]
        finally:
            _our_reads.active = False

    @metrics.timed_exchange_call("ews", "occurrences", lambda error: classify(error).kind)
    def occurrences(self, mailbox: str, window: Interval) -> list[CalendarItem]:
        """Every occurrence and exception overlapping ``window`` (what a changed series master needs), without the
        singles: the view's FindItem asks only for each item's type, and GetItem reads the instances alone
        (decision 100 in docs/decisions.md). An instance gone between the two requests fails the read (it is retried)."""
        calendar = self.account(mailbox).calendar
        _our_reads.active = True
        try:
            instances = [item for item in self._view_items(calendar, window, ("type",)) if item.type in ("Occurrence", "Exception")]
            found = []
            for item in calendar.account.fetch(ids=instances, folder=calendar, only_fields=FIELDS) if instances else []:
                if isinstance(item, Exception):
                    raise item
                found.append(to_calendar_item(item, self.planner_organizers))
            return found
        finally:
            _our_reads.active = False

    def _view_items(self, calendar: Any, window: Interval, fields: tuple[str, ...]) -> list[Any]:
        """exchangelib's items of the window's CalendarView with ``fields``, halving a page that hits the view cap."""
        found: dict[str, Any] = {}
        pending = [(window.start, window.end)]
        while pending:
            start, end = pending.pop()
            page = list(calendar.view(start=start.astimezone(self.zone), end=end.astimezone(self.zone), max_items=VIEW_CAP).only(*fields))
            if len(page) >= VIEW_CAP:
                if end - start <= MIN_VIEW_SLICE:
                    raise RuntimeError(f"more than {VIEW_CAP} items within {MIN_VIEW_SLICE}; cannot page the calendar view")
                middle = start + (end - start) / 2
                pending += [(start, middle), (middle, end)]
                continue
            for item in page:
                found[item.id] = item
        return list(found.values())

    # --- notifications ------------------------------------------------------------------------------
    def subscribe_streaming(self, mailbox: str) -> str:
        return str(self.account(mailbox).calendar.subscribe_to_streaming())

    def subscribe_pull(self, mailbox: str, timeout_minutes: int = 30) -> tuple[str, str]:
        subscription_id, watermark = self.account(mailbox).calendar.subscribe_to_pull(timeout=timeout_minutes)
        return subscription_id, watermark

    def stream(self, anchor: str, subscription_ids: list[str], minutes: int, silence: float) -> Iterator[str]:
        """Yield the subscription id of every notification that carries an item or folder event.

        Ends when Exchange closes the connection (ConnectionStatus Closed). A stream with no bytes at all
        (not even keep-alives) for ``silence`` seconds raises, instead of exchangelib's minutes + 60 s.
        """
        service = _StreamingEvents(account=self.account(anchor), silence=silence)
        for notice in service.call(subscription_ids=subscription_ids, connection_timeout=minutes):
            if isinstance(notice, Exception):
                raise notice
            if notice.changed and notice.subscription_id is not None:
                yield notice.subscription_id

    def pull(self, mailbox: str, subscription_id: str, watermark: str) -> tuple[bool, str]:
        """Read a pull subscription's events (paging by the last watermark); return (changed, new watermark)."""
        from exchangelib.services import GetEvents

        service = GetEvents(account=self.account(mailbox))
        changed = False
        while True:
            notification = service.get(subscription_id=subscription_id, watermark=watermark)
            for event in notification.events:
                watermark = event.watermark or watermark
                if type(event).__name__ != "StatusEvent":
                    changed = True
            if not notification.more_events:
                return changed, watermark

    def unsubscribe(self, mailbox: str, subscription_id: str) -> None:
        self.account(mailbox).calendar.unsubscribe(subscription_id)
