"""The JSON control API under /_sim/ (same port as Graph, no authentication): seed, edit, fault, observe.

Items use the EWS simulator's item format (``simulators/exchange/item_spec.py``) and go through the shared store,
so an edit shows up in the Graph delta and, on a shared store, in EWS too. ``{ref}`` is a Graph event id, an item's
numeric key or its UID.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote

from simulators.exchange.ical_loader import IcsError, load_ics
from simulators.exchange.item_spec import SpecError, describe
from simulators.exchange.model import Item
from simulators.exchange.store import NotFound

from . import ids
from .faults import FaultSpecError, parse_fault
from .state import GraphSimState

Reply = tuple[int, Any]
Route = Callable[[GraphSimState, dict[str, str], Any, dict[str, list[str]]], Reply]
ROUTES: list[tuple[str, re.Pattern[str], Route]] = []


def route(method: str, pattern: str) -> Callable[[Route], Route]:
    def register(func: Route) -> Route:
        ROUTES.append((method, re.compile("^/_sim" + pattern + "/?$"), func))
        return func

    return register


def _find(state: GraphSimState, mailbox: str, ref: str) -> Item:
    box = state.store.require(mailbox)
    try:
        parsed = ids.parse(ref)
        if parsed.mailbox == box.address and parsed.key in box.items:
            return box.items[parsed.key]
    except ids.BadId:
        pass
    return state.store.find(mailbox, ref)


def _item_json(state: GraphSimState, mailbox: str, item: Item) -> dict[str, Any]:
    address = state.store.require(mailbox).address
    return describe(item, address, ids.event_id(address, item.key))


@route("GET", "/health")
def health(state: GraphSimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    return 200, {"status": "ok", "mailboxes": len(state.store.mailboxes), "tenant": state.settings.tenant}


@route("POST", "/reset")
def reset(state: GraphSimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    state.reset()
    return 200, {"reset": True}


@route("GET", "/mailboxes")
def list_mailboxes(state: GraphSimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    with state.store.lock:
        return 200, [{"address": box.address, "items": len(box.items)} for box in state.store.mailboxes.values()]


@route("POST", "/mailboxes")
def create_mailbox(state: GraphSimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    if not isinstance(body, dict) or not body.get("address"):
        raise SpecError("send {\"address\": \"name@example\"}")
    box = state.store.ensure_mailbox(body["address"])
    return 201, {"address": box.address, "items": len(box.items)}


@route("PUT", "/mailboxes/(?P<mb>[^/]+)")
def put_mailbox(state: GraphSimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    box = state.store.ensure_mailbox(params["mb"])
    return 200, {"address": box.address, "items": len(box.items)}


@route("GET", "/mailboxes/(?P<mb>[^/]+)/items")
def list_items(state: GraphSimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    with state.store.lock:
        box = state.store.require(params["mb"])
        folder = query.get("folder", [None])[0]
        return 200, [_item_json(state, box.address, item) for item in sorted(box.items.values(), key=lambda i: (i.start, i.key))
                     if folder is None or item.folder == folder]


@route("POST", "/mailboxes/(?P<mb>[^/]+)/items")
def create_items(state: GraphSimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    """One item ({...}) or many ({"items": [...]})."""
    specs = body["items"] if isinstance(body, dict) and "items" in body else [body]
    if not all(isinstance(spec, dict) for spec in specs):
        raise SpecError("items must be JSON objects")
    with state.store.lock:
        created = state.store.add_many(params["mb"], specs)
        listed = [_item_json(state, params["mb"], item) for item in created]
    return 201, listed if isinstance(body, dict) and "items" in body else listed[0]


@route("GET", "/mailboxes/(?P<mb>[^/]+)/items/(?P<ref>[^/]+)")
def get_one(state: GraphSimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    return 200, _item_json(state, params["mb"], _find(state, params["mb"], params["ref"]))


@route("PATCH", "/mailboxes/(?P<mb>[^/]+)/items/(?P<ref>[^/]+)")
def change_item(state: GraphSimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    with state.store.lock:
        item = _find(state, params["mb"], params["ref"])
        state.store.update(params["mb"], item.key, body or {}, _item_json(state, params["mb"], item))
        return 200, _item_json(state, params["mb"], item)


@route("DELETE", "/mailboxes/(?P<mb>[^/]+)/items/(?P<ref>[^/]+)")
def delete_item(state: GraphSimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    item = _find(state, params["mb"], params["ref"])
    state.store.delete(params["mb"], item.key)
    return 200, {"deleted": item.key}


@route("POST", "/mailboxes/(?P<mb>[^/]+)/items/(?P<ref>[^/]+)/move")
def move_item(state: GraphSimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    item = _find(state, params["mb"], params["ref"])
    state.store.move(params["mb"], item.key, (body or {}).get("folder", "deleteditems"))
    return 200, _item_json(state, params["mb"], item)


@route("PATCH", "/mailboxes/(?P<mb>[^/]+)/items/(?P<ref>[^/]+)/occurrences")
def modify_occurrence(state: GraphSimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    item = _find(state, params["mb"], params["ref"])
    state.store.modify_occurrence(params["mb"], item.key, body or {})
    return 200, _item_json(state, params["mb"], item)


@route("DELETE", "/mailboxes/(?P<mb>[^/]+)/items/(?P<ref>[^/]+)/occurrences")
def delete_occurrence(state: GraphSimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    item = _find(state, params["mb"], params["ref"])
    state.store.delete_occurrence(params["mb"], item.key, body or {k: v[0] for k, v in query.items()})
    return 200, _item_json(state, params["mb"], item)


@route("POST", "/mailboxes/(?P<mb>[^/]+)/ics")
def load_calendar(state: GraphSimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    text = body["ics"] if isinstance(body, dict) else body
    items = load_ics(text, state.store.default_tz)
    with state.store.lock:
        stored = [state.store.add_parsed(params["mb"], item) for item in items]
        return 201, [_item_json(state, params["mb"], item) for item in stored]


@route("GET", "/faults")
def list_faults(state: GraphSimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    return 200, state.faults.describe()


@route("POST", "/faults")
def add_fault(state: GraphSimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    return 201, state.faults.add(parse_fault(body or {})).describe()


@route("DELETE", "/faults")
def clear_faults(state: GraphSimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    state.faults.remove()
    return 200, []


@route("DELETE", "/faults/(?P<fid>[0-9]+)")
def remove_fault(state: GraphSimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    state.faults.remove(int(params["fid"]))
    return 200, state.faults.describe()


@route("GET", "/calls")
def calls(state: GraphSimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    return 200, state.call_log(query.get("endpoint", [None])[0], query.get("mailbox", [None])[0])


@route("DELETE", "/calls")
def clear_calls(state: GraphSimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    state.clear_calls()
    return 200, []


@route("GET", "/concurrency")
def concurrency(state: GraphSimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    return 200, {"limit": state.settings.concurrency_limit, "peak": dict(state.peak_in_flight)}


@route("GET", "/apps")
def apps(state: GraphSimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    return 200, [{"client_id": app.client_id, "secret": app.secret is not None, "certificates": len(app.certificates)}
                 for app in state.auth.apps.values()]


@route("POST", "/apps")
def register_app(state: GraphSimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    if not isinstance(body, dict) or not body.get("client_id"):
        raise SpecError("send {\"client_id\": ..., \"secret\": ..., \"certificate_pem\": ...}")
    app = state.auth.register(body["client_id"], body.get("secret"), body.get("certificate_pem"))
    return 201, {"client_id": app.client_id, "secret": app.secret is not None, "certificates": len(app.certificates)}


@route("GET", "/tokens")
def tokens(state: GraphSimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    return 200, {"issued": state.auth.issued, "active": state.auth.active(), "lifetime": state.auth.token_lifetime}


@route("POST", "/tokens/revoke")
def revoke(state: GraphSimState, params: dict[str, str], body: Any, query: dict[str, list[str]]) -> Reply:
    return 200, {"revoked": state.auth.revoke_all()}


def handle(state: GraphSimState, method: str, raw_path: str, body: bytes, content_type: str) -> Reply:
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
