"""HTTP front door: Basic auth, SOAP parsing, impersonation, faults, then an operation, the stream, or /_sim/."""

from __future__ import annotations

import base64
import binascii
import json
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import structlog
from lxml import etree

from . import control, faults, ids
from .faults import SOAP_FAULT_CODES, STREAM_KINDS, Fault
from .operations import MAILBOX_FREE, OPERATIONS, Context
from .soap import SOAP, envelope, fault, m, message, response, t
from .state import SimState
from .streaming import ChunkWriter, serve_stream

log = structlog.get_logger()
EWS_PATH = "/ews/exchange.asmx"
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=True)
_NON_STREAM_KINDS = tuple(k for k in faults.KINDS if k not in STREAM_KINDS)


class SimHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    state: SimState


class SoapRequest:
    """The parts of an EWS request the simulator routes on."""

    def __init__(self, raw: bytes) -> None:
        root = etree.fromstring(raw, _PARSER)
        body = root.find(f"{{{SOAP}}}Body")
        if body is None or len(body) == 0:
            raise ValueError("no SOAP Body")
        self.payload = body[0]
        self.operation = etree.QName(self.payload).localname
        header = root.find(f"{{{SOAP}}}Header")
        self.impersonated: str | None = None
        if header is not None:
            sid = header.find(f"{t('ExchangeImpersonation')}/{t('ConnectingSID')}")
            if sid is not None and len(sid):
                self.impersonated = (sid[0].text or "").strip().lower() or None

    def mailbox(self, user: str) -> str | None:
        """Impersonated mailbox, else one named in a folder id, else an id's mailbox, else the user's own."""
        if self.impersonated:
            return self.impersonated
        email = self.payload.find(f".//{t('DistinguishedFolderId')}/{t('Mailbox')}/{t('EmailAddress')}")
        if email is not None and email.text:
            return cast(str, email.text).strip().lower()  # lxml is untyped; an element's text is str or None
        for elem in self.payload.iter(t("FolderId"), t("ItemId")):
            try:
                if elem.tag == t("FolderId"):
                    return ids.parse_folder_id(elem.get("Id", ""))[0]
                return ids.parse_item_id(elem.get("Id", "")).mailbox
            except ids.BadId:
                continue
        return user.lower() if "@" in user else None


class EwsHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: SimHTTPServer
    server_version = "Microsoft-IIS/10.0"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # structured logs only

    # plumbing --------------------------------------------------------------------------------------------------
    _started: datetime | None = None   # when the request being handled arrived

    def _record(self, operation: str, mailbox: str | None, outcome: str) -> None:
        """A call in the log, with when it arrived and which client (User-Agent) sent it."""
        self.server.state.record(operation, mailbox, outcome, self._started, self.headers.get("User-Agent"))

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None, drip: Fault | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if drip is None:
            self.wfile.write(body)
            return
        try:   # a server that never stops answering: every piece arrives well within any read timeout
            for at in range(0, len(body), 64):
                self.wfile.write(body[at : at + 64])
                self.wfile.flush()
                time.sleep(drip.interval_ms / 1000)
        except OSError:
            self.close_connection = True   # the client gave up (its deadline cut the connection)

    def _json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload, default=str).encode(), "application/json; charset=utf-8")

    def _xml(self, status: int, body: bytes, headers: dict[str, str] | None = None, drip: Fault | None = None) -> None:
        self._send(status, body, "text/xml; charset=utf-8", headers, drip)

    def _user(self) -> str | None:
        header = self.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return None
        try:
            name, _, password = base64.b64decode(header[6:]).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        users = self.server.state.settings.users
        return name if users.get(name) == password else None

    # verbs -----------------------------------------------------------------------------------------------------
    def _control(self, method: str) -> None:
        body = self._body()
        status, payload = control.handle(self.server.state, method, self.path, body,
                                         self.headers.get("Content-Type", ""))
        self._json(status, payload)

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._started = datetime.now(UTC)
        if self.path.startswith("/_sim/"):
            return self._control("GET")
        if self.path.lower().startswith(EWS_PATH):
            if self._user() is None:
                return self._unauthorized()
            return self._send(200, b"EWS simulator: POST SOAP here\n", "text/plain")
        self._send(404, b"not found\n", "text/plain")

    def do_PUT(self) -> None:  # noqa: N802
        self._control("PUT") if self.path.startswith("/_sim/") else self._send(405, b"", "text/plain")

    def do_PATCH(self) -> None:  # noqa: N802
        self._control("PATCH") if self.path.startswith("/_sim/") else self._send(405, b"", "text/plain")

    def do_DELETE(self) -> None:  # noqa: N802
        self._control("DELETE") if self.path.startswith("/_sim/") else self._send(405, b"", "text/plain")

    def do_POST(self) -> None:  # noqa: N802
        self._started = datetime.now(UTC)
        if self.path.startswith("/_sim/"):
            return self._control("POST")
        if not self.path.lower().startswith(EWS_PATH):
            self._body()
            return self._send(404, b"not found\n", "text/plain")
        self._ews()

    def _unauthorized(self) -> None:
        self._record("-", None, "401")
        self._send(401, b"401 - Unauthorized\n", "text/plain", {"WWW-Authenticate": 'Basic realm="EWS simulator"'})

    # EWS -------------------------------------------------------------------------------------------------------
    def _ews(self) -> None:
        state = self.server.state
        raw = self._body()
        user = self._user()
        if user is None:
            return self._unauthorized()
        try:
            request = SoapRequest(raw)
        except (etree.XMLSyntaxError, ValueError) as exc:
            self._record("-", None, "ErrorSchemaValidation")
            return self._xml(500, fault("ErrorSchemaValidation", f"The request failed schema validation: {exc}"))
        op, mailbox = request.operation, request.mailbox(user)
        taken = state.faults.take(op, mailbox, _NON_STREAM_KINDS)
        forced: str | None = None
        drip = next((flt for flt in taken if flt.kind == "drip"), None)
        for flt in taken:
            if flt.kind == "latency":
                time.sleep(flt.latency_ms / 1000)
        for flt in taken:
            if flt.kind in SOAP_FAULT_CODES or flt.kind == "soap_fault":
                return self._soap_fault(op, mailbox, flt)
            if flt.kind == "http_503":
                self._record(op, mailbox, "503")
                return self._send(503, b"Service Unavailable\n", "text/plain",
                                  {"Retry-After": str(flt.retry_after), "Connection": "close"})
            if flt.kind == "invalid_sync_state":
                forced = "ErrorInvalidSyncStateData"
            elif flt.kind == "response_error":
                forced = flt.code
        if op not in MAILBOX_FREE and (mailbox is None or state.store.mailbox(mailbox) is None):
            self._record(op, mailbox, "ErrorNonExistentMailbox")
            return self._xml(500, fault("ErrorNonExistentMailbox", "The SMTP address has no mailbox associated "
                                        "with it."))
        log.info("exchange_sim_request", operation=op, mailbox=mailbox)
        if op == "GetStreamingEvents":
            return self._stream(request, mailbox)
        handler = OPERATIONS.get(op)
        if handler is None:
            self._record(op, mailbox, "ErrorInvalidRequest")
            return self._xml(500, fault("ErrorInvalidRequest", f"The simulator does not implement {op}."))
        ctx = Context(state.store, state.subs, mailbox or "", state.settings.view_limit, state.settings.events_page,
                      forced)
        if forced and op != "SyncFolderItems":
            root, msgs = response(op)
            message(msgs, op, forced, f"{forced} (injected)")
        else:
            try:
                with state.store.lock:
                    root = handler(request.payload, ctx)
            except Exception as exc:  # a simulator bug must not look like a hang to the client
                log.exception("exchange_sim_operation_failed", operation=op, mailbox=mailbox)
                self._record(op, mailbox, "ErrorInternalServerError")
                return self._xml(500, fault("ErrorInternalServerError", f"{type(exc).__name__}: {exc}"))
        codes = {c.text for c in root.iter(m("ResponseCode"))}
        self._record(op, mailbox, ",".join(sorted(codes)) or "NoError")
        headers = {}
        if op == "Subscribe":
            headers["Set-Cookie"] = f"X-BackEndOverrideCookie=SIMBE01~{mailbox}; path=/; HttpOnly"
        self._xml(200, envelope(root), headers, drip)

    def _soap_fault(self, op: str, mailbox: str | None, flt: Fault) -> None:
        code = flt.code or SOAP_FAULT_CODES.get(flt.kind, "ErrorInternalServerError")
        texts = {
            "ErrorServerBusy": "The server cannot service this request right now. Try again later.",
            "ErrorImpersonateUserDenied": "The account does not have permission to impersonate the requested user.",
            "ErrorNonExistentMailbox": "The SMTP address has no mailbox associated with it.",
            "ErrorMailboxMoveInProgress": "The mailbox is being moved. Try again later.",
        }
        self._record(op, mailbox, code)
        back_off = flt.back_off_ms if code == "ErrorServerBusy" else None
        self._xml(500, fault(code, texts.get(code, code), back_off))

    def _stream(self, request: SoapRequest, mailbox: str | None) -> None:
        state = self.server.state
        sids = [e.text or "" for e in request.payload.iter(t("SubscriptionId"))]
        minutes = int(request.payload.findtext(m("ConnectionTimeout")) or "30")
        stream_faults = state.faults.take("GetStreamingEvents", mailbox, STREAM_KINDS)
        self._record("GetStreamingEvents", mailbox, "NoError")
        self.close_connection = True

        def start_response() -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/xml; charset=utf-8")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()

        try:
            serve_stream(state, ChunkWriter(self.wfile, self.connection), sids, max(1, min(30, minutes)),
                         stream_faults[0] if stream_faults else None, start_response)
        except (BrokenPipeError, ConnectionResetError, OSError):
            log.info("exchange_sim_stream_client_gone", mailbox=mailbox)
