"""Evaluation of FindItem ``m:Restriction`` trees on items (the subset exchangelib's filter() produces)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, cast

from .model import Item
from .soap import Element, t

FIELDS: dict[str, Callable[[Item], Any]] = {
    "calendar:Start": lambda i: i.start,
    "calendar:End": lambda i: i.end,
    "item:Subject": lambda i: i.subject,
    "calendar:UID": lambda i: i.uid,
    "calendar:LegacyFreeBusyStatus": lambda i: i.status,
    "calendar:CalendarItemType": lambda i: "RecurringMaster" if i.is_recurring else "Single",
    "calendar:IsAllDayEvent": lambda i: i.is_all_day,
    "calendar:IsCancelled": lambda i: i.is_cancelled,
    "calendar:IsRecurring": lambda i: False,
    "calendar:Location": lambda i: i.location,
    "item:Sensitivity": lambda i: i.sensitivity,
    "item:LastModifiedTime": lambda i: i.last_modified,
    "item:DateTimeCreated": lambda i: i.created,
}
_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "IsEqualTo": lambda a, b: a == b,
    "IsNotEqualTo": lambda a, b: a != b,
    "IsGreaterThan": lambda a, b: a > b,
    "IsGreaterThanOrEqualTo": lambda a, b: a >= b,
    "IsLessThan": lambda a, b: a < b,
    "IsLessThanOrEqualTo": lambda a, b: a <= b,
}


class UnsupportedRestriction(ValueError):
    """A restriction on a field or with an operator the simulator does not evaluate."""


def _local(elem: Element) -> str:
    tag = cast(str, elem.tag)  # lxml is untyped; restriction nodes are elements, whose tag is a str
    return tag.rsplit("}", 1)[-1]


def _field(elem: Element) -> tuple[str, Callable[[Item], Any]]:
    uri_elem = elem.find(t("FieldURI"))
    if uri_elem is None:
        raise UnsupportedRestriction("only FieldURI paths are supported")
    uri = uri_elem.get("FieldURI", "")
    if uri not in FIELDS:
        raise UnsupportedRestriction(uri)
    return uri, FIELDS[uri]


def _constant(uri: str, text: str) -> Any:
    if uri in ("calendar:Start", "calendar:End", "item:LastModifiedTime", "item:DateTimeCreated"):
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    if uri in ("calendar:IsAllDayEvent", "calendar:IsCancelled", "calendar:IsRecurring"):
        return text.lower() == "true"
    return text


def matches(node: Element, item: Item) -> bool:
    """Whether an item satisfies a restriction node (the Restriction element itself or any child)."""
    name = _local(node)
    if name == "Restriction":
        return all(matches(child, item) for child in node)
    if name == "And":
        return all(matches(child, item) for child in node)
    if name == "Or":
        return any(matches(child, item) for child in node)
    if name == "Not":
        return not all(matches(child, item) for child in node)
    if name == "Exists":
        _uri, get = _field(node)
        return get(item) not in (None, "")
    if name in _COMPARE:
        uri, get = _field(node)
        const = node.find(f"{t('FieldURIOrConstant')}/{t('Constant')}")
        if const is None:
            raise UnsupportedRestriction("comparison without a constant")
        value = get(item)
        return value is not None and _COMPARE[name](value, _constant(uri, const.get("Value", "")))
    if name == "Contains":
        uri, get = _field(node)
        const = node.find(t("Constant"))
        needle = const.get("Value", "") if const is not None else ""
        haystack = str(get(item) or "")
        if node.get("ContainmentComparison", "Exact") != "Exact":
            needle, haystack = needle.lower(), haystack.lower()
        mode = node.get("ContainmentMode", "Substring")
        if mode == "FullString":
            return haystack == needle
        if mode == "Prefixed":
            return haystack.startswith(needle)
        return needle in haystack
    raise UnsupportedRestriction(name)
