"""Our copy of the Planner contract: strictly valid, wire-identical to STAR's, and what the client sends fits it."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from shared.adapters.planner_client import (
    PlannerClient,
    PlannerEvent,
    events_payload,
    get_events_payload,
)
from shared.adapters.planner_contract import (
    WSDL_PATH,
    ContractViolation,
    contract_schema,
    schema_from_wsdl,
    validate_envelope,
)
from shared.config import PlannerSettings, RetrySettings
from simulators.planner import soap
from simulators.planner.state import ReceiptOutcome, SimEvent, SimResource

# STAR's published contract, kept verbatim in the repository (see tests/fixtures/reference/README.md)
REFERENCE_WSDL = Path(__file__).resolve().parents[2] / "fixtures" / "reference" / "PlannerExternalCalendarService.wsdl"
REFERENCE_SHA256 = "fa94b87edea77b2ba65716b7b4d8d7cd2643d8fd4757d8ac6f6f3219d783a168"
XSD = "http://www.w3.org/2001/XMLSchema"
WSDL = "http://schemas.xmlsoap.org/wsdl/"
SOAP_BINDING = "http://schemas.xmlsoap.org/wsdl/soap/"
QNAME_ATTRIBUTES = {"type", "base", "ref", "element", "message", "binding", "itemType"}
ZONE = __import__("zoneinfo").ZoneInfo("Europe/Copenhagen")
START = datetime(2026, 3, 29, 0, 30, tzinfo=timezone.utc)
GUID_A = "0f8fad5b-d9cb-469f-a165-70867728950e"
GUID_B = "7c9e6679-7425-40de-944b-e07fc1f90ae7"


def reference_wsdl() -> Path:
    """The published contract's path; its absence fails the test (these tests never skip)."""
    if not REFERENCE_WSDL.is_file():
        pytest.fail(f"the reference contract {REFERENCE_WSDL} is missing; restore it verbatim from git (tests/fixtures/reference/README.md)")
    return REFERENCE_WSDL


def reference_schema() -> etree.XMLSchema:
    return schema_from_wsdl(reference_wsdl(), add_missing_imports=True)


@pytest.fixture(scope="module")
def client() -> PlannerClient:
    settings = PlannerSettings(endpoint="http://127.0.0.1:9/PlannerExternalCalendarService.svc", user_full_name="x" * 100)
    return PlannerClient.from_settings(settings, RetrySettings())


def _events(with_ids: bool, count: int = 2) -> list[PlannerEvent]:
    return [
        PlannerEvent(
            origin_id=f"040000008200E00074C5B7101A82E008000000{i}$20260329-023000",
            email="Anna.Jensen@testkommune.dk",
            start=START + timedelta(hours=i),
            end=START + timedelta(hours=i, minutes=90),
            planner_resource_id=GUID_A if with_ids else None,
            planner_event_id=GUID_B if with_ids else None,
        )
        for i in range(count)
    ]


def _requests(client: PlannerClient) -> list[tuple[str, etree._Element]]:
    produced = []
    for operation in ("CreateEvents", "UpdateEvents", "DeleteEvents"):
        for with_ids in (False, True):
            for count in (1, 3):
                envelope = client.request_envelope(operation, events_payload(_events(with_ids, count), ZONE))
                produced.append((f"{operation}-ids={with_ids}-n={count}", envelope))
    for emails in ([], ["a@testkommune.dk"], ["a@testkommune.dk", "b" * 70 + "@testkommune.dk"]):
        payload = get_events_payload(emails, START, START + timedelta(days=92), ZONE)
        produced.append((f"GetEvents-{len(emails)}", client.request_envelope("GetEvents", payload)))
    produced.append(("GetResources", client.request_envelope("GetResources", {})))
    return produced


# --------------------------------------------------------------------------------------------- validity


def test_our_contract_compiles_as_a_strict_lxml_schema_without_repairs() -> None:
    assert isinstance(contract_schema(), etree.XMLSchema)
    assert isinstance(schema_from_wsdl(WSDL_PATH, add_missing_imports=False), etree.XMLSchema)


def test_the_reference_copy_is_the_published_file_unchanged() -> None:
    digest = hashlib.sha256(reference_wsdl().read_bytes()).hexdigest()
    assert digest == REFERENCE_SHA256, f"{REFERENCE_WSDL} was edited; it must stay byte for byte as STAR published it"


def test_the_published_contract_needs_the_imports_we_added() -> None:
    with pytest.raises(etree.XMLSchemaParseError, match="microsoft.com/wsdl/types|CodeListBase|xkom|RequestMetadata"):
        schema_from_wsdl(reference_wsdl())


def test_every_request_the_client_produces_fits_our_schema(client: PlannerClient) -> None:
    produced = _requests(client)
    assert len(produced) == 16
    for name, envelope in produced:
        body = validate_envelope(etree.tostring(envelope), expect="request")
        assert etree.QName(body).localname.endswith("Request"), name


def test_every_request_the_client_produces_fits_the_published_schema(client: PlannerClient) -> None:
    schema = reference_schema()
    for name, envelope in _requests(client):
        body = validate_envelope(etree.tostring(envelope), expect="request", schema=schema)
        assert body is not None, name


def test_requests_carry_both_headers_in_the_binding_order_with_times_and_offsets(client: PlannerClient) -> None:
    envelope = client.request_envelope("CreateEvents", events_payload(_events(False, 1), ZONE))
    header = envelope.find("{http://schemas.xmlsoap.org/soap/envelope/}Header")
    assert [etree.QName(child).localname for child in header] == ["RequestUserMetadataHeader", "ActiveOrganisationHeader"]
    texts = {etree.QName(node).localname: node.text for node in envelope.iter() if isinstance(node.tag, str) and len(node) == 0}
    assert texts["UserFullName"] == ("x" * 100 + " : CreateEvents")[:140]
    assert texts["CalendarEventStartTime"] == "2026-03-29T01:30:00+01:00"
    assert texts["CalendarEventEndTime"] == "2026-03-29T04:00:00+02:00"
    assert texts["OrganisationCode"] == "10100"
    assert texts["RegistrationDateTime"][-6:] in ("+01:00", "+02:00")
    names = {etree.QName(node).localname for node in envelope.iter() if isinstance(node.tag, str)}
    assert "PlannerResourceIdentifier" not in names and "CalendarEventIdentifier" not in names


def test_the_simulators_responses_fit_both_schemas() -> None:
    now = datetime(2026, 10, 25, 1, 30, tzinfo=timezone.utc)
    receipts = [
        ReceiptOutcome("uid-1", 0, None, GUID_A, GUID_B),
        ReceiptOutcome("uid-2", 8, "exists", GUID_A, None),
    ]
    event = SimEvent("uid-1", "a@testkommune.dk", now, now + timedelta(hours=1), GUID_A, None)
    resource = SimResource.from_json({"name": "A", "email": "a@testkommune.dk", "description": "d"})
    documents = [soap.receipts_response(op, receipts, GUID_B, now) for op in ("CreateEvents", "UpdateEvents", "DeleteEvents")]
    documents += [soap.get_events_response([event], GUID_B), soap.get_events_response([], GUID_B)]
    documents += [soap.get_resources_response([resource], GUID_B), soap.fault("Server", "boom", 15)]
    for schema in (contract_schema(), reference_schema()):
        for document in documents:
            assert validate_envelope(document, expect="response", schema=schema) is not None


# --------------------------------------------------------------------------------------------- envelope checks


def _envelope(client: PlannerClient) -> etree._Element:
    return client.request_envelope("GetResources", {})


@pytest.mark.parametrize("header", ["ActiveOrganisationHeader", "RequestUserMetadataHeader"])
def test_a_request_missing_a_header_is_named_in_the_violation(client: PlannerClient, header: str) -> None:
    envelope = _envelope(client)
    for node in list(envelope.iter(f"{{*}}{header}")):
        node.getparent().remove(node)
    with pytest.raises(ContractViolation, match=f"{header} is missing"):
        validate_envelope(etree.tostring(envelope))


def test_an_invalid_header_value_is_named_in_the_violation(client: PlannerClient) -> None:
    envelope = _envelope(client)
    active = next(envelope.iter("{*}ActiveOrganisationHeader"))
    next(active.iter("{*}OrganisationTypeIdentifier")).text = "0"
    with pytest.raises(ContractViolation, match="ActiveOrganisationHeader.*OrganisationTypeIdentifier"):
        validate_envelope(etree.tostring(envelope))


def test_an_invalid_body_is_named_in_the_violation(client: PlannerClient) -> None:
    envelope = client.request_envelope("CreateEvents", events_payload(_events(False, 1), ZONE))
    next(envelope.iter("{*}OriginEmailAddress")).text = "not-an-email"
    with pytest.raises(ContractViolation, match="CreateEventsRequest.*OriginEmailAddress"):
        validate_envelope(etree.tostring(envelope))


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        (b"not xml at all", "not well-formed"),
        (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]><x>&a;</x>', "DOCTYPE"),
        (b"<Envelope/>", "SOAP 1.1 Envelope"),
        (b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"/>', "no soap:Body"),
    ],
)
def test_documents_that_are_not_soap_envelopes_are_refused(document: bytes, problem: str) -> None:
    with pytest.raises(ContractViolation, match=problem):
        validate_envelope(document)


# --------------------------------------------------------------------------------------------- wire identity


def _resolve(element: etree._Element, name: str, value: str) -> str:
    if name not in QNAME_ATTRIBUTES:
        return value
    prefix, _, local = value.rpartition(":")
    return f"{{{element.nsmap.get(prefix or None, '')}}}{local}"


def _canonical(element: etree._Element) -> Any:
    """The contract's structure with prefixes resolved; comments and xsd:import left out."""
    children = [
        _canonical(child)
        for child in element
        if isinstance(child.tag, str) and child.tag != f"{{{XSD}}}import" and child.tag != f"{{{XSD}}}annotation"
    ]
    attributes = tuple(sorted((name, _resolve(element, name, value)) for name, value in element.attrib.items()))
    return (element.tag, attributes, (element.text or "").strip() if not children else "", tuple(children))


def _tree(path: Path) -> etree._Element:
    return etree.parse(str(path)).getroot()


def test_our_contract_is_wire_identical_to_the_published_one() -> None:
    assert _canonical(_tree(WSDL_PATH)) == _canonical(_tree(reference_wsdl()))


def test_namespaces_soap_actions_and_headers_match_the_published_contract() -> None:
    ours, theirs = _tree(WSDL_PATH), _tree(reference_wsdl())

    def summary(root: etree._Element) -> dict[str, Any]:
        return {
            "target": root.get("targetNamespace"),
            "schemas": sorted(s.get("targetNamespace") for s in root.iter(f"{{{XSD}}}schema")),
            "elements": sorted(
                (s.get("targetNamespace"), e.get("name"))
                for s in root.iter(f"{{{XSD}}}schema")
                for e in s.findall(f"{{{XSD}}}element")
            ),
            "actions": sorted(op.get("soapAction") for op in root.iter(f"{{{SOAP_BINDING}}}operation")),
            "headers": sorted((h.get("message"), h.get("part")) for h in root.iter(f"{{{SOAP_BINDING}}}header")),
        }

    assert summary(ours) == summary(theirs)
    assert len(summary(ours)["actions"]) == 5
    assert all(action.startswith("http://service.bm.dk/pjaktass/1/PlannerExternalCalendarService#") for action in summary(ours)["actions"])


def test_the_only_additions_are_imports_in_the_calendar_schema() -> None:
    def imports(root: etree._Element) -> set[tuple[str, str]]:
        return {
            (schema.get("targetNamespace"), element.get("namespace"))
            for schema in root.iter(f"{{{XSD}}}schema")
            for element in schema.findall(f"{{{XSD}}}import")
        }

    added = imports(_tree(WSDL_PATH)) - imports(_tree(reference_wsdl()))
    assert {schema for schema, _ in added} == {"http://service.bm.dk/PlannerExternalCalendarService/2015/03/27/"}
    assert len(added) == 4
