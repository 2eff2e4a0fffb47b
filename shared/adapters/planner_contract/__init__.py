"""plannersync's own copy of Jobcenter Planner's SOAP contract, and strict validation against it.

``WSDL_PATH`` is the contract the client (zeep) is built from and the simulator answers by. ``contract_schema()``
is an lxml ``XMLSchema`` over every type of the contract; ``validate_envelope()`` checks a whole SOAP 1.1 envelope
(body element and, for requests, the two required headers) and raises ``ContractViolation`` naming what is wrong.

The schemas live inline in the WSDL (as STAR publishes them). lxml cannot compile a WSDL, so each inline schema is
lifted into a document of its own and the imports between them are given locations an in-memory resolver serves.
``schema_from_wsdl(path, add_missing_imports=True)`` does the same for STAR's published WSDL, whose calendar-service
schema uses other namespaces without importing them (the tests use that to check wire identity).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from copy import deepcopy
from pathlib import Path
from typing import Any, Iterable, Literal

from lxml import etree

__all__ = [
    "WSDL_PATH",
    "SOAP11_ENV",
    "ContractViolation",
    "Namespaces",
    "contract_schema",
    "schema_from_wsdl",
    "safe_parser",
    "parse_xml",
    "validate_envelope",
]

WSDL_PATH = Path(__file__).with_name("PlannerExternalCalendarService.wsdl")

SOAP11_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
XSD = "http://www.w3.org/2001/XMLSchema"
WSDL = "http://schemas.xmlsoap.org/wsdl/"
_RESOLVER_SCHEME = "planner-contract:"


class Namespaces:
    """The contract's namespaces, by the prefixes the WSDL gives them."""

    SERVICE = "http://service.bm.dk/pjaktass/1/PlannerExternalCalendarService"
    CALENDAR = "http://service.bm.dk/PlannerExternalCalendarService/2015/03/27/"
    ACTIVE_ORGANISATION = "http://rep.oio.dk/ams.dk/xml/schemas/2005/09/01/"
    REQUEST_USER_METADATA = "http://service.bm.dk/RequestUserMetadata/2015/01/21/"
    FAULT = "http://service.bm.dk/xml/schemas/2011/01/12/"
    CODE_LIST_BASE = "http://service.bm.dk/pjaktass/2013/06/07/CodeListBase/"
    GUID = "http://microsoft.com/wsdl/types/"


OPERATIONS = ("CreateEvents", "UpdateEvents", "DeleteEvents", "GetEvents", "GetResources")
REQUIRED_HEADERS = (
    etree.QName(Namespaces.ACTIVE_ORGANISATION, "ActiveOrganisationHeader"),
    etree.QName(Namespaces.REQUEST_USER_METADATA, "RequestUserMetadataHeader"),
)
_QNAME_ATTRIBUTES = ("type", "base", "ref", "itemType", "substitutionGroup")


class ContractViolation(ValueError):
    """A document does not follow the Planner contract; the message names the element and the problem."""


def safe_parser() -> etree.XMLParser:
    """An lxml parser that loads no DTD, resolves no entity, touches no network and refuses huge trees."""
    return etree.XMLParser(
        resolve_entities=False,
        load_dtd=False,
        no_network=True,
        huge_tree=False,
        remove_blank_text=False,
        dtd_validation=False,
    )


def parse_xml(data: bytes) -> etree._Element:
    """Parse untrusted XML; a DOCTYPE (DTDs, entity declarations, billion laughs) is refused outright."""
    try:
        root = etree.fromstring(data, parser=safe_parser())
    except etree.XMLSyntaxError as exc:
        raise ContractViolation(f"not well-formed XML: {exc}") from None
    if root.getroottree().docinfo.doctype:
        raise ContractViolation("a DOCTYPE is not allowed")
    return root


class _MemoryResolver(etree.Resolver):
    def __init__(self, documents: dict[str, bytes]) -> None:
        super().__init__()
        self._documents = documents

    def resolve(self, system_url: str, public_id: str, context: object) -> Any:
        document = self._documents.get(system_url)
        if document is None:
            return None
        return self.resolve_string(document, context, base_url=system_url)


def _referenced_namespaces(schema: etree._Element) -> set[str]:
    namespaces: set[str] = set()
    for element in schema.iter(etree.Element):
        for attribute in _QNAME_ATTRIBUTES:
            value = element.get(attribute)
            if not value:
                continue
            prefix = value.split(":", 1)[0] if ":" in value else None
            namespace = element.nsmap.get(prefix)
            if namespace:
                namespaces.add(namespace)
    return namespaces


def _standalone(schema: etree._Element) -> etree._Element:
    """A copy of an inline schema as a root element, with every namespace declaration in scope kept."""
    copy = etree.Element(schema.tag, attrib=dict(schema.attrib), nsmap=dict(schema.nsmap))
    for child in schema:
        copy.append(deepcopy(child))
    return copy


def _lift_schemas(wsdl_path: Path, add_missing_imports: bool) -> tuple[dict[str, bytes], list[str]]:
    tree = etree.parse(str(wsdl_path), parser=safe_parser())
    inline = tree.getroot().findall(f"{{{WSDL}}}types/{{{XSD}}}schema")
    if not inline:
        raise ContractViolation(f"{wsdl_path}: no inline schemas in wsdl:types")
    location_of: dict[str, str] = {}
    for index, schema in enumerate(inline):
        namespace = schema.get("targetNamespace", "")
        location_of.setdefault(namespace, f"{_RESOLVER_SCHEME}schema-{index}.xsd")
    documents: dict[str, bytes] = {}
    for index, original in enumerate(inline):
        schema = _standalone(original)
        own = schema.get("targetNamespace", "")
        imports = schema.findall(f"{{{XSD}}}import")
        imported = {element.get("namespace") for element in imports}
        if add_missing_imports:
            missing = sorted(_referenced_namespaces(schema) - imported - {own, XSD, "http://www.w3.org/XML/1998/namespace"})
            for position, namespace in enumerate(missing):
                element = etree.Element(f"{{{XSD}}}import", namespace=namespace)
                schema.insert(len(imports) + position, element)
            imports = schema.findall(f"{{{XSD}}}import")
        for element in imports:
            namespace = element.get("namespace", "")
            if element.get("schemaLocation") is None and namespace in location_of:
                element.set("schemaLocation", location_of[namespace])
        documents[f"{_RESOLVER_SCHEME}schema-{index}.xsd"] = etree.tostring(schema)
    return documents, sorted(location_of)


def schema_from_wsdl(wsdl_path: Path, *, add_missing_imports: bool = False) -> etree.XMLSchema:
    """Compile every inline schema of a WSDL into one lxml XMLSchema.

    Strict by default: a schema that uses another namespace without importing it makes this raise
    ``etree.XMLSchemaParseError``. ``add_missing_imports=True`` repairs that in memory (for STAR's published WSDL).
    """
    documents, namespaces = _lift_schemas(wsdl_path, add_missing_imports)
    root_location = f"{_RESOLVER_SCHEME}root.xsd"
    driver = etree.Element(f"{{{XSD}}}schema", nsmap={"xs": XSD})
    for namespace in namespaces:
        index = next(url for url, doc in documents.items() if etree.fromstring(doc).get("targetNamespace", "") == namespace)
        etree.SubElement(driver, f"{{{XSD}}}import", namespace=namespace, schemaLocation=index)
    parser = safe_parser()
    parser.resolvers.add(_MemoryResolver(documents))
    driver_doc = etree.fromstring(etree.tostring(driver), parser=parser, base_url=root_location)
    return etree.XMLSchema(driver_doc.getroottree())


_per_thread = threading.local()
# One thread owns the contract's schema and does every validation (decision 99 in docs/decisions.md): libxml2 keeps a
# compiled schema's names in the dictionary of the thread that compiled it, and one schema validating on several
# threads at once failed now and then with "No matching global declaration available for the validation root" for a
# valid header (decision 96); a schema compiled per thread cost the Planner simulator, one thread per connection,
# a compilation per request.
_owner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="planner-contract")


def contract_schema() -> etree.XMLSchema:
    """The lxml XMLSchema of our own contract copy (strict: no repairs), compiled once per thread (8 ms)."""
    schema: etree.XMLSchema | None = getattr(_per_thread, "schema", None)
    if schema is None:
        schema = _per_thread.schema = schema_from_wsdl(WSDL_PATH)
    return schema


def _describe(log: Iterable[etree._LogEntry], limit: int = 3) -> str:
    messages = [entry.message for entry in list(log)[:limit]]
    return "; ".join(messages) or "invalid"


def _problem(document: bytes, schema: etree.XMLSchema | None) -> str | None:
    """On the owner thread: what is wrong with the document, or None."""
    schema = schema or contract_schema()   # the owner thread's own, compiled once: the executor keeps its one thread
    if schema.validate(etree.fromstring(document)):
        return None
    return _describe(schema.error_log)


def _validate_element(element: etree._Element, schema: etree.XMLSchema | None, what: str) -> None:
    problem = _owner.submit(_problem, etree.tostring(element), schema).result()
    if problem is not None:
        raise ContractViolation(f"{what} {etree.QName(element).localname}: {problem}")


Expect = Literal["request", "response", "any"]


def validate_envelope(
    envelope: bytes | etree._Element,
    *,
    expect: Expect = "request",
    schema: etree.XMLSchema | None = None,
) -> etree._Element:
    """Check a SOAP 1.1 envelope against the contract and return its body element.

    Requests need both ``ActiveOrganisationHeader`` and ``RequestUserMetadataHeader`` (each valid) and a
    ``<Operation>Request`` body element; responses a ``<Operation>Response`` or a ``soap:Fault``.
    Raises ``ContractViolation`` naming what is wrong.
    """
    root = parse_xml(envelope) if isinstance(envelope, bytes) else envelope
    if root.tag != f"{{{SOAP11_ENV}}}Envelope":
        raise ContractViolation(f"root element is {root.tag}, expected a SOAP 1.1 Envelope ({SOAP11_ENV})")
    header = root.find(f"{{{SOAP11_ENV}}}Header")
    body = root.find(f"{{{SOAP11_ENV}}}Body")
    if body is None:
        raise ContractViolation("the envelope has no soap:Body")
    children = [child for child in body if isinstance(child.tag, str)]
    if len(children) != 1:
        raise ContractViolation(f"soap:Body must hold exactly one element, found {len(children)}")
    payload = children[0]
    name = etree.QName(payload)

    if expect in ("request", "any") and not payload.tag == f"{{{SOAP11_ENV}}}Fault" and name.localname.endswith("Request"):
        _check_headers(header, schema)
    elif expect == "request":
        raise ContractViolation(f"body element {name.localname} is not a request of the contract")

    if payload.tag == f"{{{SOAP11_ENV}}}Fault":
        if expect == "request":
            raise ContractViolation("a request cannot be a soap:Fault")
        _check_fault(payload, schema)
        return payload
    if name.namespace != Namespaces.CALENDAR or name.localname.removesuffix("Request").removesuffix("Response") not in OPERATIONS:
        raise ContractViolation(f"body element {name.text} is not an operation of the contract")
    if expect == "response" and not name.localname.endswith("Response"):
        raise ContractViolation(f"body element {name.localname} is not a response")
    _validate_element(payload, schema, "body element")
    return payload


def _check_headers(header: etree._Element | None, schema: etree.XMLSchema | None) -> None:
    if header is None:
        raise ContractViolation("the envelope has no soap:Header; ActiveOrganisationHeader and RequestUserMetadataHeader are required")
    for required in REQUIRED_HEADERS:
        found = header.findall(required.text)
        if not found:
            raise ContractViolation(f"required SOAP header {required.localname} is missing")
        if len(found) > 1:
            raise ContractViolation(f"SOAP header {required.localname} appears {len(found)} times")
        _validate_element(found[0], schema, "header")
    known = {required.text for required in REQUIRED_HEADERS}
    for element in header:
        if isinstance(element.tag, str) and element.tag not in known and element.get(f"{{{SOAP11_ENV}}}mustUnderstand") in ("1", "true"):
            raise ContractViolation(f"header {element.tag} is marked mustUnderstand and is not part of the contract")


def _check_fault(fault: etree._Element, schema: etree.XMLSchema | None) -> None:
    if fault.find("faultcode") is None or fault.find("faultstring") is None:
        raise ContractViolation("soap:Fault needs faultcode and faultstring")
    detail = fault.find("detail")
    if detail is None:
        return
    for element in detail.findall(f"{{{Namespaces.FAULT}}}FaultDetails"):
        _validate_element(element, schema, "fault detail")
