"""SOAP for the Planner simulator: read validated requests, write responses and faults that fit the contract."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import cast
from zoneinfo import ZoneInfo

from lxml import etree
from lxml.builder import ElementMaker

from shared.adapters.planner_contract import SOAP11_ENV, Namespaces
from simulators.planner.state import EventInput, ReceiptOutcome, SimEvent, SimResource

LOCAL_ZONE = ZoneInfo("Europe/Copenhagen")
INVALID_REQUEST_ERROR_CODE = 1  # the simulator's FaultDetails.ErrorCode for a request that breaks the contract

_SOAP = ElementMaker(namespace=SOAP11_ENV, nsmap={"s": SOAP11_ENV})
_CAL = ElementMaker(namespace=Namespaces.CALENDAR, nsmap={"ecs": Namespaces.CALENDAR, "clb": Namespaces.CODE_LIST_BASE})
_CLB = ElementMaker(namespace=Namespaces.CODE_LIST_BASE)
_FAULT = ElementMaker(namespace=Namespaces.FAULT, nsmap={"f": Namespaces.FAULT})


def parse_datetime(text: str | None) -> datetime | None:
    """xs:dateTime as an aware datetime; without an offset it is Copenhagen local time."""
    if text is None or not text.strip():
        return None
    value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=LOCAL_ZONE)


def wire_time(value: datetime) -> str:
    return value.isoformat()


def _child_text(element: etree._Element, name: str) -> str | None:
    child = element.find(f"{{{Namespaces.CALENDAR}}}{name}")
    return None if child is None else (child.text or "")


def operation_of(body: etree._Element) -> str:
    localname = cast(str, etree.QName(body).localname)  # lxml is untyped; QName.localname is a str
    return localname.removesuffix("Request").removesuffix("Response")


def events_of(body: etree._Element) -> list[EventInput]:
    events = []
    for item in body.findall(f"{{{Namespaces.CALENDAR}}}CalendarEvent"):
        start = parse_datetime(_child_text(item, "CalendarEventStartTime"))
        end = parse_datetime(_child_text(item, "CalendarEventEndTime"))
        assert start is not None and end is not None  # the schema requires both
        events.append(
            EventInput(
                origin_id=_child_text(item, "OriginSystemIdentifier") or "",
                email=_child_text(item, "OriginEmailAddress") or "",
                start=start,
                end=end,
            )
        )
    return events


def active_organisation(envelope: etree._Element) -> str | None:
    """The OrganisationCode of the request's ActiveOrganisationHeader (which jobcentre calls), if any."""
    for header in envelope.iter():
        if isinstance(header.tag, str) and header.tag.endswith("}ActiveOrganisationHeader"):
            for node in header.iter():
                if isinstance(node.tag, str) and node.tag.endswith("}OrganisationCode"):
                    return str(node.text) if node.text is not None else None
    return None


def origin_ids_of(body: etree._Element) -> list[str]:
    return [node.text or "" for node in body.iter(f"{{{Namespaces.CALENDAR}}}OriginSystemIdentifier")]


def get_events_query(body: etree._Element) -> tuple[list[str], datetime | None, datetime | None]:
    emails = [
        _child_text(resource, "CalendarResourceEmailAddress") or ""
        for resource in body.findall(f"{{{Namespaces.CALENDAR}}}CalendarResource")
    ]
    return emails, parse_datetime(_child_text(body, "EventStartFromDateTime")), parse_datetime(_child_text(body, "EventStartToDateTime"))


def get_resources_query(body: etree._Element) -> list[str]:
    return [node.text or "" for node in body.findall(f"{{{Namespaces.CALENDAR}}}EmailAddressIdentifier")]


# ------------------------------------------------------------------------------------------- responses


def envelope(payload: etree._Element) -> bytes:
    # lxml is untyped; with an encoding tostring returns bytes
    return cast(bytes, etree.tostring(_SOAP.Envelope(_SOAP.Body(payload)), xml_declaration=True, encoding="utf-8"))


def receipts_response(operation: str, receipts: list[ReceiptOutcome], reference: str, now: datetime) -> bytes:
    items = []
    for receipt in receipts:
        parts = []
        if receipt.planner_resource_identifier:
            parts.append(_CAL.PlannerResourceIdentifier(receipt.planner_resource_identifier))
        parts.append(_CAL.CalendarEventIdentifier(receipt.calendar_event_identifier))
        parts.append(_CAL.EventReceivalTime(wire_time(now.astimezone(LOCAL_ZONE))))
        parts.append(_CAL.EventErrorCode(_CLB.CodeListItemIdentifier(str(receipt.code))))
        if receipt.message is not None:
            parts.append(_CAL.EventMessage(receipt.message))
        parts.append(_CAL.OriginSystemIdentifier(receipt.origin_id))
        parts.append(_CAL.ConflictNotificationSent("false"))
        items.append(_CAL.CalendarEventReceipt(*parts))
    return envelope(getattr(_CAL, f"{operation}Response")(*items, _CAL.ServiceRequestLogReferenceIdentifier(reference)))


def get_events_response(events: list[SimEvent], reference: str) -> bytes:
    items = []
    for event in events:
        parts = [
            _CAL.CalendarEventStartTime(wire_time(event.start)),
            _CAL.CalendarEventEndTime(wire_time(event.end)),
            _CAL.OriginSystemIdentifier(event.origin_id),
            _CAL.OriginEmailAddress(event.email),
        ]
        if event.planner_resource_identifier:
            parts.append(_CAL.PlannerResourceIdentifier(event.planner_resource_identifier))
        parts.append(_CAL.CalendarEventIdentifier(event.calendar_event_identifier))
        items.append(_CAL.CalendarEvent(*parts))
    return envelope(_CAL.GetEventsResponse(*items, _CAL.ServiceRequestLogReferenceIdentifier(reference)))


def get_resources_response(resources: list[SimResource], reference: str) -> bytes:
    items = []
    for resource in resources:
        parts = [
            _CAL.CalendarResourceName(resource.name),
            _CAL.RID(resource.rid),
            _CAL.CalendarResourceEmailAddress(resource.email),
            _CAL.PlannerResourceIdentifier(resource.planner_resource_id),
        ]
        if resource.description is not None:
            parts.append(_CAL.CalendarResourceDescription(resource.description))
        parts.append(_CAL.IsCaseWorker("true" if resource.is_case_worker else "false"))
        items.append(_CAL.CalendarResource(*parts))
    return envelope(_CAL.GetResourcesResponse(*items, _CAL.ServiceRequestLogReferenceIdentifier(reference)))


def fault(faultcode: str, message: str, error_code: int | None) -> bytes:
    """A SOAP 1.1 fault with FaultDetails in its detail (as Planner's WCF service sends them)."""
    details = []
    if error_code is not None:
        details.append(_FAULT.ErrorCode(str(error_code)))
    details.append(_FAULT.Message(message))
    body = _SOAP.Fault(
        etree.Element("faultcode", nsmap={"s": SOAP11_ENV}),
        etree.Element("faultstring"),
        etree.Element("detail"),
    )
    body[0].text = f"s:{faultcode}"
    body[1].text = message
    body[2].append(_FAULT.FaultDetails(*details))
    return envelope(body)


def billion_laughs() -> bytes:
    lines = ['<?xml version="1.0"?>', "<!DOCTYPE lolz [", ' <!ENTITY lol "lol">']
    lines.append(' <!ENTITY lol1 "' + "&lol;" * 10 + '">')
    for level in range(2, 10):
        lines.append(f' <!ENTITY lol{level} "' + f"&lol{level - 1};" * 10 + '">')
    lines.append("]>")
    lines.append(f'<s:Envelope xmlns:s="{SOAP11_ENV}"><s:Body><lolz>&lol9;</lolz></s:Body></s:Envelope>')
    return "\n".join(lines).encode("utf-8")


def now_utc() -> datetime:
    return datetime.now(timezone.utc)
