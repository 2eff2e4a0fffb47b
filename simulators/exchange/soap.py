"""SOAP 1.1 envelopes, EWS namespaces, response messages and SOAP faults."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TypeAlias, cast

from lxml import etree

SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
MNS = "http://schemas.microsoft.com/exchange/services/2006/messages"
TNS = "http://schemas.microsoft.com/exchange/services/2006/types"
ENS = "http://schemas.microsoft.com/exchange/services/2006/errors"
NSMAP = {"s": SOAP, "m": MNS, "t": TNS}

# Exchange 2016 CU23 (the build the product is configured for in tests).
SERVER_VERSION = {"MajorVersion": "15", "MinorVersion": "1", "MajorBuildNumber": "2507", "MinorBuildNumber": "6"}

# lxml ships no type information (mypy sees it as Any); the explicit alias keeps ``Element`` usable in annotations.
Element: TypeAlias = etree._Element


def m(tag: str) -> str:
    return f"{{{MNS}}}{tag}"


def t(tag: str) -> str:
    return f"{{{TNS}}}{tag}"


def sub(parent: Element, tag: str, text: str | None = None, **attrs: str) -> Element:
    """Append a child element (tag already namespaced) with optional text and attributes."""
    child = etree.SubElement(parent, tag, {k: v for k, v in attrs.items() if v is not None})
    if text is not None:
        child.text = text
    return child


def envelope(body_content: Element | None, version: str = "V2017_07_11") -> bytes:
    env = etree.Element(f"{{{SOAP}}}Envelope", nsmap=NSMAP)
    header = sub(env, f"{{{SOAP}}}Header")
    sub(header, t("ServerVersionInfo"), **SERVER_VERSION, Version=version)
    body = sub(env, f"{{{SOAP}}}Body")
    if body_content is not None:
        body.append(body_content)
    return cast(bytes, etree.tostring(env, xml_declaration=True, encoding="utf-8"))  # lxml is untyped; with an encoding it returns bytes


def response(operation: str) -> tuple[Element, Element]:
    """The ``m:{Op}Response`` element and its ``m:ResponseMessages`` container."""
    root = etree.Element(m(f"{operation}Response"), nsmap=NSMAP)
    return root, sub(root, m("ResponseMessages"))


def message(container: Element, operation: str, code: str = "NoError", text: str | None = None) -> Element:
    """One ``m:{Op}ResponseMessage``: Success for NoError, Error otherwise."""
    msg = sub(container, m(f"{operation}ResponseMessage"), ResponseClass="Success" if code == "NoError" else "Error")
    if code != "NoError":
        sub(msg, m("MessageText"), text or code)
    sub(msg, m("ResponseCode"), code)
    if code != "NoError":
        sub(msg, m("DescriptiveLinkKey"), "0")
    return msg


def fault(code: str, text: str, back_off_ms: int | None = None) -> bytes:
    """A SOAP fault as Exchange sends it with HTTP 500 (throttling, impersonation, mailbox errors)."""
    env = etree.Element(f"{{{SOAP}}}Envelope", nsmap=NSMAP)
    body = sub(env, f"{{{SOAP}}}Body")
    flt = sub(body, f"{{{SOAP}}}Fault")
    sub(flt, "faultcode", f"a:{code}")
    sub(flt, "faultstring", text)
    detail = sub(flt, "detail")
    sub(detail, f"{{{ENS}}}ResponseCode", code)
    sub(detail, f"{{{ENS}}}Message", text)
    if back_off_ms is not None:
        xml = sub(detail, t("MessageXml"))
        sub(xml, t("Value"), str(back_off_ms), Name="BackOffMilliseconds")
    return cast(bytes, etree.tostring(env, xml_declaration=True, encoding="utf-8"))  # lxml is untyped; with an encoding it returns bytes


def xs_datetime(value: datetime) -> str:
    """UTC 'Z' form, as Exchange renders Start/End."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def xs_bool(value: bool) -> str:
    return "true" if value else "false"
