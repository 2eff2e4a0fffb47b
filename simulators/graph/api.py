"""The Graph API the simulator answers (v1.0, app-only): calendarView, calendarView/delta, events, instances, $batch.

``dispatch`` answers one request (also each part of a $batch) after faults and the per-mailbox concurrency limit:
more than ``concurrency_limit`` requests in flight for one mailbox answer 429 MailboxConcurrency, as Graph does.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from simulators.exchange.recurrence import expand
from simulators.exchange.store import NotFound

from . import ids
from .delta import Pending, UnknownToken, changes, fingerprint
from .events import event_json, output_zone, removed_json, selected
from .faults import ERROR_KINDS, Fault
from .instances import instances, resolve
from .state import GraphSimState

_UTC_ZONE = ("UTC", None)
_PREFER_TZ = re.compile(r'outlook\.timezone\s*=\s*"([^"]*)"', re.IGNORECASE)
_PREFER_PAGE = re.compile(r"odata\.maxpagesize\s*=\s*(\d+)", re.IGNORECASE)


@dataclass
class Request:
    method: str
    path: str  # after the version segment: /users/...
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: Any
    base: str  # …/v1.0, for links

    @classmethod
    def parse(cls, method: str, target: str, headers: dict[str, str], body: Any, base: str) -> Request:
        parts = urlsplit(target)
        return cls(method, parts.path, parse_qs(parts.query, keep_blank_values=True),
                   {k.lower(): v for k, v in headers.items()}, body, base)

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None


@dataclass
class Answer:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    drip: Fault | None = None


class BadRequest(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Answer:
    inner = {"code": code, "message": message,
             "innerError": {"date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"), "request-id": secrets.token_hex(8),
                            "client-request-id": secrets.token_hex(8)}}
    return Answer(status, {"error": inner}, headers or {})


# --- parameters ------------------------------------------------------------------------------------------------------
def _instant(value: str | None, name: str) -> datetime:
    if not value:
        raise BadRequest("ErrorInvalidParameter", "This request requires a time window specified by the query string "
                         "parameters StartDateTime and EndDateTime.")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise BadRequest("ErrorInvalidParameter", f"The value of parameter '{name}' is not a valid DateTime.") from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)


def _window(req: Request) -> tuple[datetime, datetime]:
    start, end = _instant(req.arg("startDateTime"), "startDateTime"), _instant(req.arg("endDateTime"), "endDateTime")
    if end < start:
        raise BadRequest("ErrorInvalidParameter", "The end of the time window is before its start.")
    return start, end


def _prefer(req: Request, state: GraphSimState) -> tuple[tuple[str, Any], int, dict[str, str]]:
    prefer = req.headers.get("prefer", "")
    tz_match, page_match = _PREFER_TZ.search(prefer), _PREFER_PAGE.search(prefer)
    tz = output_zone(tz_match.group(1) if tz_match else None)
    size = int(page_match.group(1)) if page_match else int(req.arg("$top") or state.settings.page_size)
    size = max(1, min(size, state.settings.max_page_size))
    applied = [f'outlook.timezone="{tz[0]}"'] + ([f"odata.maxpagesize={size}"] if page_match else [])
    return tz, size, {"Preference-Applied": ", ".join(applied)}


def _skip_token(start: datetime, end: datetime, offset: int) -> str:
    raw = json.dumps({"s": start.isoformat(), "e": end.isoformat(), "o": offset}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _from_skip_token(token: str) -> tuple[datetime, datetime, int]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        return datetime.fromisoformat(data["s"]), datetime.fromisoformat(data["e"]), int(data["o"])
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise BadRequest("ErrorInvalidUrlQuery", "The $skiptoken is not valid.") from None


def _user_link(req: Request, mailbox: str, tail: str, query: dict[str, str]) -> str:
    return f"{req.base}/users/{quote(mailbox, safe='@')}{tail}?{urlencode(query, safe='$')}"


# --- endpoints -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Flags:
    no_ical_uid: bool = False
    replay: bool = False
    phantom: bool = False


def _paged_events(state: GraphSimState, req: Request, mailbox: str, tail: str, rows: Callable[[datetime, datetime], list[Any]],
                  render: Callable[[Any, tuple[str, Any]], dict[str, Any]]) -> Answer:
    tz, size, applied = _prefer(req, state)
    token = req.arg("$skiptoken")
    start, end, offset = _from_skip_token(token) if token else (*_window(req), 0)
    with state.store.lock:
        found = rows(start, end)
        page = [render(row, tz) for row in found[offset: offset + size]]
    body: dict[str, Any] = {"@odata.context": f"{req.base}/$metadata#Collection(event)", "value": page}
    if offset + size < len(found):
        body["@odata.nextLink"] = _user_link(req, mailbox, tail, {"startDateTime": start.isoformat(),
                                                                  "endDateTime": end.isoformat(),
                                                                  "$skiptoken": _skip_token(start, end, offset + size)})
    return Answer(200, body, applied)


def calendar_view(state: GraphSimState, req: Request, mailbox: str, params: dict[str, str], flags: Flags) -> Answer:
    box = state.store.require(mailbox)
    return _paged_events(state, req, mailbox, "/calendarView", lambda s, e: instances(box, s, e),
                         lambda inst, tz: event_json(box.address, inst.item, inst.occ, tz, not flags.no_ical_uid))


def instances_of(state: GraphSimState, req: Request, mailbox: str, params: dict[str, str], flags: Flags) -> Answer:
    box = state.store.require(mailbox)
    with state.store.lock:
        item, occ = resolve(box, ids.parse(params["id"]))
    if occ is not None or item.recurrence is None:
        return error(400, "ErrorInvalidRequest", "The event is not a series master.")
    return _paged_events(state, req, mailbox, f"/events/{params['id']}/instances", lambda s, e: expand(item, s, e),
                         lambda o, tz: event_json(box.address, item, o, tz, not flags.no_ical_uid))


def event(state: GraphSimState, req: Request, mailbox: str, params: dict[str, str], flags: Flags) -> Answer:
    box = state.store.require(mailbox)
    tz, _size, applied = _prefer(req, state)
    with state.store.lock:
        item, occ = resolve(box, ids.parse(params["id"]))
        found = event_json(box.address, item, occ, tz, not flags.no_ical_uid, master=occ is None and item.is_recurring)
    select = [name.strip() for name in (req.arg("$select") or "").split(",") if name.strip()]
    return Answer(200, selected(found, select), applied)


def _current(state: GraphSimState, mailbox: str, start: datetime, end: datetime, tz: tuple[str, Any],
             flags: Flags) -> dict[str, tuple[str, dict[str, Any]]]:
    box = state.store.require(mailbox)
    current: dict[str, tuple[str, dict[str, Any]]] = {}
    with state.store.lock:
        for inst in instances(box, start, end):
            canonical = event_json(box.address, inst.item, inst.occ, _UTC_ZONE)
            served = canonical if (tz[0] == "UTC" and not flags.no_ical_uid) else \
                event_json(box.address, inst.item, inst.occ, tz, not flags.no_ical_uid)
            current[canonical["id"]] = (fingerprint(canonical), served)
    return current


def delta(state: GraphSimState, req: Request, mailbox: str, params: dict[str, str], flags: Flags) -> Answer:
    tz, size, applied = _prefer(req, state)
    skip, delta_token = req.arg("$skiptoken"), req.arg("$deltatoken")
    try:
        if skip:
            pending = state.delta.pending(skip, mailbox)
        elif delta_token:
            known = state.delta.round(delta_token, mailbox)
            entries, after = changes(known.known, _current(state, mailbox, known.start, known.end, tz, flags), removed_json)
            pending = Pending(mailbox, known.start, known.end, entries, after)
        else:
            start, end = _window(req)
            entries, after = changes({}, _current(state, mailbox, start, end, tz, flags), removed_json)
            pending = Pending(mailbox, start, end, entries, after)
    except UnknownToken:
        return error(410, "SyncStateNotFound", "The sync state generation is not found.")
    page, token, last = state.delta.page(pending, size)
    if flags.replay:
        page = page + list(reversed(page))
    if flags.phantom:
        page = page + [removed_json(ids.instance_id(mailbox, 10**9 + secrets.randbelow(10**6), datetime.now(UTC)))]
    body: dict[str, Any] = {"@odata.context": f"{req.base}/$metadata#Collection(event)", "value": page}
    link = "@odata.deltaLink" if last else "@odata.nextLink"
    body[link] = _user_link(req, mailbox, "/calendarView/delta", {"$deltatoken" if last else "$skiptoken": token})
    return Answer(200, body, applied)


Handler = Callable[[GraphSimState, Request, str, dict[str, str], Flags], Answer]
ROUTES: list[tuple[str, re.Pattern[str], Handler]] = [
    ("calendarView", re.compile(r"^/users/(?P<mb>[^/]+)/(?:calendar/)?calendarView$", re.IGNORECASE), calendar_view),
    ("delta", re.compile(r"^/users/(?P<mb>[^/]+)/(?:calendar/)?calendarView/delta$", re.IGNORECASE), delta),
    ("instances", re.compile(r"^/users/(?P<mb>[^/]+)/events/(?P<id>[^/]+)/instances$", re.IGNORECASE), instances_of),
    ("events", re.compile(r"^/users/(?P<mb>[^/]+)/events/(?P<id>[^/]+)$", re.IGNORECASE), event),
]
_ANSWER_KINDS = tuple(ERROR_KINDS) + ("latency", "drip", "no_ical_uid", "delta_replay", "phantom_removal")


def _route(req: Request) -> tuple[str, Handler, dict[str, str]] | None:
    for endpoint, pattern, handler in ROUTES:
        match = pattern.match(req.path)
        if match:
            return endpoint, handler, {k: unquote(v) for k, v in match.groupdict().items()}
    return None


def dispatch(state: GraphSimState, req: Request, over_limit: bool | None = None, in_batch: bool = False) -> Answer:
    """Answer one Graph request; ``over_limit`` is given for $batch parts (the batch counted them already)."""
    if req.path == "/$batch":
        return batch(state, req) if req.method == "POST" and not in_batch else error(400, "BadRequest", "Nested or non-POST $batch.")
    routed = _route(req)
    if routed is None or req.method != "GET":
        return error(400 if routed is None else 405, "BadRequest", f"Unsupported request {req.method} {req.path}.")
    endpoint, handler, params = routed
    mailbox = params["mb"].strip().lower()
    has_token = bool(req.arg("$deltatoken") or req.arg("$skiptoken"))
    kinds = tuple(k for k in _ANSWER_KINDS if k != "sync_state_not_found" or has_token)
    taken = state.faults.take(endpoint, mailbox, kinds)
    if over_limit is None:
        with state.in_flight([mailbox]) as over:
            answer = _answer(state, req, handler, mailbox, params, taken, bool(over))
    else:
        answer = _answer(state, req, handler, mailbox, params, taken, over_limit)
    state.record(endpoint, mailbox, answer.status, in_batch)
    return answer


def _answer(state: GraphSimState, req: Request, handler: Handler, mailbox: str, params: dict[str, str],
            taken: list[Fault], over_limit: bool) -> Answer:
    for fault in taken:
        if fault.kind == "latency":
            time.sleep(fault.latency_ms / 1000)
    for fault in taken:
        if fault.kind in ERROR_KINDS:
            status, code = fault.answer()
            headers = {"Retry-After": str(fault.retry_after)} if status in (429, 503) else {}
            return error(status, code, f"{code} (injected)", headers)
    if over_limit:
        return error(429, "MailboxConcurrency", "Application is over its MailboxConcurrency limit.", {"Retry-After": "1"})
    if state.store.mailbox(mailbox) is None:
        return error(404, "ErrorInvalidUser", f"The requested user '{mailbox}' is invalid.")
    kinds = {f.kind for f in taken}
    flags = Flags("no_ical_uid" in kinds, "delta_replay" in kinds, "phantom_removal" in kinds)
    try:
        answer = handler(state, req, mailbox, params, flags)
    except BadRequest as exc:
        return error(400, exc.code, str(exc))
    except (ids.BadId, NotFound):
        return error(404, "ErrorItemNotFound", "The specified object was not found in the store.")
    answer.drip = next((f for f in taken if f.kind == "drip"), None)
    return answer


def batch(state: GraphSimState, req: Request) -> Answer:
    """POST /$batch: up to ``max_batch`` GET parts, each answered (and faulted) on its own; answers in any order."""
    parts = req.body.get("requests") if isinstance(req.body, dict) else None
    if not isinstance(parts, list) or not parts:
        return error(400, "BadRequest", "Invalid batch payload format.")
    if len(parts) > state.settings.max_batch:
        return error(400, "BadRequest", f"Invalid batch payload format: the limit is {state.settings.max_batch} requests.")
    taken = state.faults.take("batch", None, _ANSWER_KINDS)
    for fault in taken:
        if fault.kind == "latency":
            time.sleep(fault.latency_ms / 1000)
    error_fault = next((f for f in taken if f.kind in ERROR_KINDS), None)
    if error_fault is not None:
        status, code = error_fault.answer()
        state.record("batch", None, status)
        return error(status, code, f"{code} (injected)", {"Retry-After": str(error_fault.retry_after)} if status in (429, 503) else {})
    inner: list[tuple[dict[str, Any], Request | None]] = []
    for part in parts:
        if not isinstance(part, dict) or not isinstance(part.get("id"), str) or not isinstance(part.get("url"), str):
            return error(400, "BadRequest", "Invalid batch payload format: every request needs an id and a url.")
        url = part["url"] if part["url"].startswith("/") else "/" + part["url"]
        headers = {**req.headers, **{k.lower(): str(v) for k, v in (part.get("headers") or {}).items()}}
        inner.append((part, Request.parse(str(part.get("method", "GET")).upper(), url, headers, None, req.base)))
    mailboxes = []
    for _part, request in inner:
        routed = _route(request) if request else None
        mailboxes.append(routed[2]["mb"].strip().lower() if routed else "")
    with state.in_flight([m for m in mailboxes if m]) as over:
        over_left = Counter(over)
        responses = []
        drips: list[Fault | None] = []
        for (part, request), mailbox in zip(inner, mailboxes, strict=True):
            over_limit = bool(mailbox) and over_left[mailbox] > 0
            if over_limit:
                over_left[mailbox] -= 1
            assert request is not None
            answer = dispatch(state, request, over_limit, in_batch=True)
            drips.append(answer.drip)
            responses.append({"id": part["id"], "status": answer.status,
                              "headers": {"Content-Type": "application/json", **answer.headers}, "body": answer.body})
    state.record("batch", None, 200)
    outer = Answer(200, {"responses": list(reversed(responses))})
    # Graph answers a $batch when its slowest part is done: a dripping part (or batch) makes the whole answer drip
    outer.drip = next((f for f in taken if f.kind == "drip"), None) or next((d for d in drips if d is not None), None)
    return outer
