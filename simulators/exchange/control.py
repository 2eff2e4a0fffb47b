"""The JSON control API under /_sim/ (same port as EWS, no authentication): seed, edit, fault, observe.

Every edit goes through the store, so it raises notifications and SyncFolderItems changes like a user's edit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote

from . import ids
from .faults import FaultSpecError, parse_fault
from .ical_loader import IcsError, load_ics
from .item_spec import SpecError, describe
from .state import SimState
from .store import NotFound

Reply = tuple[int, Any]
Route = Callable[[SimState, dict[str, str], Any, dict[str, list[str]]], Reply]
ROUTES: list[tuple[str, re.Pattern[str], Route]] = []


def route(method: str, pattern: str) -> Callable[[Route], Route]:
    def register(func: Route) -> Route:
        ROUTES.append((method, re.compile("^/_sim" + pattern + "/?$"), func))
        return func

    return register


def _item_json(state: SimState, mailbox: str, key: int) -> dict[str, Any]:
    item = state.store.item(mailbox, key)
    return describe(item, state.store.require(mailbox).address, ids.item_id(state.store.require(mailbox).address, key))


@route("GET", "/health")
def health(state: SimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    return 200, {"status": "ok", "mailboxes": len(state.store.mailboxes)}


@route("POST", "/reset")
def reset(state: SimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    state.reset()
    return 200, {"reset": True}


@route("GET", "/mailboxes")
def list_mailboxes(state: SimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    with state.store.lock:
        return 200, [{"address": box.address, "items": len(box.items)} for box in state.store.mailboxes.values()]


@route("POST", "/mailboxes")
def create_mailbox(state: SimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    if not isinstance(body, dict) or not body.get("address"):
        raise SpecError("send {\"address\": \"name@example\"}")
    box = state.store.ensure_mailbox(body["address"])
    return 201, {"address": box.address, "items": len(box.items)}


@route("PUT", "/mailboxes/(?P<mb>[^/]+)")
def put_mailbox(state: SimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    box = state.store.ensure_mailbox(params["mb"])
    return 200, {"address": box.address, "items": len(box.items)}


@route("POST", "/mailboxes/(?P<mb>[^/]+)/invalidate-sync-states")
def invalidate_sync_states(state: SimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    """As after a mailbox move or restore: every SyncFolderItems state handed out so far is rejected."""
    with state.store.lock:
        epoch = state.store.invalidate_sync_states(params["mb"])
    return 200, {"address": params["mb"].lower(), "sync_epoch": epoch}


@route("GET", "/mailboxes/(?P<mb>[^/]+)/items")
def list_items(state: SimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    with state.store.lock:
        box = state.store.require(params["mb"])
        folder = query.get("folder", [None])[0]
        return 200, [
            describe(item, box.address, ids.item_id(box.address, item.key))
            for item in sorted(box.items.values(), key=lambda i: (i.start, i.key))
            if folder is None or item.folder == folder
        ]


@route("POST", "/mailboxes/(?P<mb>[^/]+)/items")
def create_items(state: SimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    """One item ({...}) or many ({"items": [...]}; one notification per item)."""
    specs = body["items"] if isinstance(body, dict) and "items" in body else [body]
    if not all(isinstance(spec, dict) for spec in specs):
        raise SpecError("items must be JSON objects")
    with state.store.lock:
        created = state.store.add_many(params["mb"], specs)
        listed = [_item_json(state, params["mb"], item.key) for item in created]
    return 201, listed if isinstance(body, dict) and "items" in body else listed[0]


@route("GET", "/mailboxes/(?P<mb>[^/]+)/items/(?P<ref>[^/]+)")
def get_one(state: SimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    item = state.store.find(params["mb"], params["ref"])
    return 200, _item_json(state, params["mb"], item.key)


@route("PATCH", "/mailboxes/(?P<mb>[^/]+)/items/(?P<ref>[^/]+)")
def change_item(state: SimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    with state.store.lock:
        item = state.store.find(params["mb"], params["ref"])
        current = _item_json(state, params["mb"], item.key)
        state.store.update(params["mb"], item.key, body or {}, current)
        return 200, _item_json(state, params["mb"], item.key)


@route("DELETE", "/mailboxes/(?P<mb>[^/]+)/items/(?P<ref>[^/]+)")
def delete_item(state: SimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    item = state.store.find(params["mb"], params["ref"])
    state.store.delete(params["mb"], item.key)
    return 200, {"deleted": item.key}


@route("POST", "/mailboxes/(?P<mb>[^/]+)/items/(?P<ref>[^/]+)/move")
def move_item(state: SimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    item = state.store.find(params["mb"], params["ref"])
    state.store.move(params["mb"], item.key, (body or {}).get("folder", "deleteditems"))
    return 200, _item_json(state, params["mb"], item.key)


@route("PATCH", "/mailboxes/(?P<mb>[^/]+)/items/(?P<ref>[^/]+)/occurrences")
def modify_occurrence(state: SimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    item = state.store.find(params["mb"], params["ref"])
    state.store.modify_occurrence(params["mb"], item.key, body or {})
    return 200, _item_json(state, params["mb"], item.key)


@route("DELETE", "/mailboxes/(?P<mb>[^/]+)/items/(?P<ref>[^/]+)/occurrences")
def delete_occurrence(state: SimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    item = state.store.find(params["mb"], params["ref"])
    ref = body or {k: v[0] for k, v in query.items()}
    state.store.delete_occurrence(params["mb"], item.key, ref)
    return 200, _item_json(state, params["mb"], item.key)


@route("POST", "/mailboxes/(?P<mb>[^/]+)/ics")
def load_calendar(state: SimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    text = body["ics"] if isinstance(body, dict) else body
    items = load_ics(text, state.settings.default_tz)
    with state.store.lock:
        stored = [state.store.add_parsed(params["mb"], item) for item in items]
        return 201, [_item_json(state, params["mb"], item.key) for item in stored]


@route("GET", "/faults")
def list_faults(state: SimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    return 200, state.faults.describe()


@route("POST", "/faults")
def add_fault(state: SimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    fault = state.faults.add(parse_fault(body or {}))
    return 201, fault.describe()


@route("DELETE", "/faults")
def clear_faults(state: SimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    state.faults.remove()
    return 200, []


@route("DELETE", "/faults/(?P<fid>[0-9]+)")
def remove_fault(state: SimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    state.faults.remove(int(params["fid"]))
    return 200, state.faults.describe()


@route("GET", "/calls")
def calls(state: SimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    return 200, state.call_log(query.get("operation", [None])[0], query.get("mailbox", [None])[0])


@route("DELETE", "/calls")
def clear_calls(state: SimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    state.clear_calls()
    return 200, []


@route("GET", "/subscriptions")
def subscriptions(state: SimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    return 200, [
        {"id": s.id, "mailbox": s.mailbox, "kind": s.kind, "pending_events": len(s.events), "gone": s.gone}
        for s in list(state.subs.by_id.values())
    ]


@route("POST", "/subscriptions/(?P<sid>[^/]+)/expire")
def expire_subscription(state: SimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    state.subs.expire(params["sid"], (body or {}).get("code", "ErrorSubscriptionNotFound"))
    return 200, {"expired": params["sid"]}


def handle(state: SimState, method: str, raw_path: str, body: bytes, content_type: str) -> Reply:
    """Dispatch one control request; errors become 400/404 JSON answers."""
    path, _, query_string = raw_path.partition("?")
    query = parse_qs(query_string)
    payload: Any = None
    if body:
        if "json" in content_type or body.lstrip()[:1] in (b"{", b"["):
            try:
                payload = json.loads(body)
            except ValueError:
                return 400, {"error": "body is not valid JSON"}
        else:
            payload = body.decode("utf-8")
    for verb, pattern, func in ROUTES:
        match = pattern.match(path)
        if match and verb == method:
            params = {k: unquote(v) for k, v in match.groupdict().items()}
            try:
                return func(state, params, payload, query)
            except NotFound as exc:
                return 404, {"error": str(exc)}
            except (SpecError, FaultSpecError, IcsError, KeyError, TypeError, ValueError) as exc:
                return 400, {"error": f"{type(exc).__name__}: {exc}"}
    return 404, {"error": f"no control endpoint {method} {path}"}
