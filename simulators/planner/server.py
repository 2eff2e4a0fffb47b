"""Jobcenter Planner simulator: the five SOAP operations of PlannerExternalCalendarService, plus a JSON control API.

Run it as a process (``python -m simulators.planner.server --port 8181``) or in a test
(``start_server(port=0)``). See docs/simulators/planner.md for the control API and the fault types.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import struct
import sys
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import structlog

from shared.adapters.planner_contract import (
    WSDL_PATH,
    ContractViolation,
    Namespaces,
    parse_xml,
    validate_envelope,
)
from simulators.planner import soap
from simulators.planner.state import CallRecord, Fault, SimResource, SimState
from simulators.process import announce_and_wait

log = structlog.get_logger()

SERVICE_PATH = "/PlannerExternalCalendarService.svc"
CONTROL_PREFIX = "/_sim"
MAX_REQUEST_BYTES = 10 * 1024 * 1024
SOCKET_TIMEOUT = 30.0


@dataclass(frozen=True)
class SimTLS:
    """Server certificate and key (PEM); with ``client_ca`` a client certificate signed by it is required."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.cert), str(self.key))
        if self.client_ca is not None:
            context.load_verify_locations(cafile=str(self.client_ca))
            context.verify_mode = ssl.CERT_REQUIRED
        return context


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: SimState, tls: SimTLS | None) -> None:
        self.state = state
        self.stopping = threading.Event()
        self.ssl_context = tls.context() if tls else None
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """TLS handshakes happen here, in the connection's own thread, so a slow client blocks nobody."""
        request.settimeout(SOCKET_TIMEOUT)
        if self.ssl_context is None:
            super().finish_request(request, client_address)
            return
        try:
            wrapped = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.info("planner_sim_tls_refused", reason=type(exc).__name__, detail=getattr(exc, "reason", None))
            return
        try:
            super().finish_request(wrapped, client_address)
        finally:
            wrapped.close()


class _Reset(Exception):
    """Raised to drop the connection without a response."""


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "PlannerSim/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        return  # structured logs only

    # ------------------------------------------------------------------------------ plumbing

    def _send(self, status: int, body: bytes, content_type: str = "text/xml; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data, indent=1).encode("utf-8"), "application/json")

    def _reset(self) -> None:
        """Close the socket with an RST and no response (connection reset by peer)."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        raise _Reset()

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_REQUEST_BYTES:
            raise ValueError("request too large")
        return self.rfile.read(length) if length else b""

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except _Reset:
            self.close_connection = True
        except (ConnectionError, TimeoutError, ssl.SSLError):
            self.close_connection = True

    # ------------------------------------------------------------------------------ routing

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        url = urlparse(self.path)
        if url.path.startswith(CONTROL_PREFIX + "/"):
            self._control("GET", url.path[len(CONTROL_PREFIX) :], parse_qs(url.query))
        elif url.path == SERVICE_PATH and url.query.lower() in ("wsdl", "singlewsdl"):
            self._send(200, WSDL_PATH.read_bytes())
        else:
            self._json(404, {"error": "not found"})

    def do_DELETE(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        if url.path.startswith(CONTROL_PREFIX + "/"):
            self._control("DELETE", url.path[len(CONTROL_PREFIX) :], parse_qs(url.query))
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        if url.path.startswith(CONTROL_PREFIX + "/"):
            self._control("POST", url.path[len(CONTROL_PREFIX) :], parse_qs(url.query))
        else:
            self._soap()

    # ------------------------------------------------------------------------------ control API

    def _control(self, method: str, path: str, query: dict[str, list[str]]) -> None:
        state = self.server.state
        try:
            payload = json.loads(self._body() or b"null") if method == "POST" else None
        except ValueError:
            self._json(400, {"error": "body is not JSON"})
            return
        try:
            if (method, path) == ("GET", "/health"):
                self._json(200, {"status": "ok", **state.health()})
            elif (method, path) == ("POST", "/reset"):
                state.reset()
                self._json(200, {"status": "reset"})
            elif (method, path) == ("POST", "/resources"):
                items = payload.get("resources") if isinstance(payload, dict) else payload
                if not isinstance(items, list):
                    raise ValueError("send a list of resources or {\"resources\": [...]}")
                resources = [SimResource.from_json(item) for item in items]
                state.set_resources(resources)
                self._json(200, {"resources": [_resource_json(resource) for resource in resources]})
            elif (method, path) == ("GET", "/resources"):
                self._json(200, {"resources": [_resource_json(resource) for resource in state.resources()]})
            elif (method, path) == ("GET", "/events"):
                emails = query.get("email")
                email = emails[0] if emails else None
                self._json(200, {"events": [event.to_json() for event in state.events(email)]})
            elif (method, path) == ("GET", "/calls"):
                self._json(200, {"calls": [call.to_json() for call in state.calls()]})
            elif (method, path) == ("GET", "/faults"):
                self._json(200, {"faults": [fault.to_json() for fault in state.faults()]})
            elif (method, path) == ("POST", "/faults"):
                specs = payload.get("faults", [payload]) if isinstance(payload, dict) else payload
                if not isinstance(specs, list) or not all(isinstance(spec, dict) for spec in specs):
                    raise ValueError("send a fault object, a list of them, or {\"faults\": [...]}")
                faults = state.add_faults(specs, soap.now_utc())
                self._json(200, {"faults": [fault.to_json() for fault in faults]})
            elif (method, path) == ("DELETE", "/faults"):
                state.clear_faults()
                self._json(200, {"faults": []})
            else:
                self._json(404, {"error": f"no control endpoint {method} {CONTROL_PREFIX}{path}"})
        except (ValueError, KeyError, TypeError) as exc:
            self._json(400, {"error": str(exc)})

    # ------------------------------------------------------------------------------ SOAP

    def _soap(self) -> None:
        state = self.server.state
        now = soap.now_utc()
        action = (self.headers.get("SOAPAction") or "").strip().strip('"')
        try:
            data = self._body()
        except ValueError:
            self._send(413, b"request too large", "text/plain")
            return
        try:
            envelope = parse_xml(data)
            body = validate_envelope(envelope, expect="request")
            operation = soap.operation_of(body)
            if action and action != f"{Namespaces.SERVICE}#{operation}":
                raise ContractViolation(f"SOAPAction {action!r} does not match the body element {operation}Request")
        except ContractViolation as exc:
            state.record(CallRecord(_operation_from_action(action), now, outcome="invalid_request"))
            log.info("planner_sim_invalid_request", operation=_operation_from_action(action))
            self._send(500, soap.fault("Client", f"Invalid request: {exc}"[:2000], soap.INVALID_REQUEST_ERROR_CODE))
            return

        call = CallRecord(operation, now, origin_ids=soap.origin_ids_of(body), outcome="pending", organisation=soap.active_organisation(envelope))
        state.record(call)  # on arrival, so a client that gave up is still counted
        answer_after = 0.0
        for fault in state.call_faults(operation, now):
            if fault.type == "latency":
                self.server.stopping.wait(fault.seconds or 0)
                continue
            if fault.type == "slow_answer":   # the answer is made now and sent later: it tells of Planner as it was
                answer_after += fault.seconds or 0
                continue
            call.outcome = _outcome(fault)
            log.info("planner_sim_fault_injected", operation=operation, fault=fault.type, fault_id=fault.id)
            self._inject(fault)
            return

        try:
            response = self._answer(operation, body, call, now)
            validate_envelope(response, expect="response")
        except ContractViolation as exc:  # a simulator bug: say so loudly, in a valid fault
            call.outcome = "simulator_error"
            self._send(500, soap.fault("Server", f"Simulator produced an invalid response: {exc}"[:2000], None))
            return
        call.outcome = "ok"
        log.info("planner_sim_call", operation=operation, events=len(call.origin_ids), codes=sorted(set(call.codes)))
        if answer_after:
            self.server.stopping.wait(answer_after)
        self._send(200, response)

    def _answer(self, operation: str, body: Any, call: CallRecord, now: datetime) -> bytes:
        state = self.server.state
        reference = str(uuid.uuid4())
        if operation in ("CreateEvents", "UpdateEvents", "DeleteEvents"):
            receipts = state.apply(operation, soap.events_of(body), now)
            call.codes = [receipt.code for receipt in receipts]
            return soap.receipts_response(operation, receipts, reference, now)
        if operation == "GetEvents":
            emails, start_from, start_to = soap.get_events_query(body)
            return soap.get_events_response(state.find_events(emails, start_from, start_to), reference)
        return soap.get_resources_response(state.resources(soap.get_resources_query(body)), reference)

    def _inject(self, fault: Fault) -> None:
        if fault.type == "reset" or (fault.type == "outage" and fault.mode == "reset"):
            self._reset()
        elif fault.type in ("http_status", "outage"):
            self._send(fault.status or 503, f"Injected HTTP {fault.status}".encode(), "text/html")
        elif fault.type == "soap_fault":
            self._send(fault.status or 500, soap.fault("Server", fault.message or "Injected fault", fault.error_code))
        elif fault.type == "garbage":
            self._garbage(fault)

    def _garbage(self, fault: Fault) -> None:
        if fault.kind == "not_xml":
            self._send(200, b"<html><body>Gateway says hello</body></html>\x00\xff not xml", "text/xml; charset=utf-8")
        elif fault.kind == "billion_laughs":
            self._send(200, soap.billion_laughs())
        else:  # oversized: a valid start, then padding without end
            size = fault.size or 0
            self.send_response(200)
            self.send_header("Content-Type", "text/xml; charset=utf-8")
            if fault.declare_length:
                self.send_header("Content-Length", str(size))
            self.end_headers()
            self.close_connection = True
            chunk = b" " * 65536
            try:
                self.wfile.write(b'<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">')
                sent = 0
                while sent < size and not self.server.stopping.is_set():
                    self.wfile.write(chunk)
                    sent += len(chunk)
            except OSError:
                pass


def _operation_from_action(action: str) -> str | None:
    return action.rsplit("#", 1)[-1] if "#" in action else None


def _outcome(fault: Fault) -> str:
    if fault.type == "outage":
        return "outage_reset" if fault.mode == "reset" else "outage_503"
    if fault.type == "http_status":
        return f"http_{fault.status}"
    if fault.type == "soap_fault":
        return f"soap_fault_{fault.error_code}" if fault.error_code is not None else "soap_fault"
    if fault.type == "garbage":
        return f"garbage_{fault.kind}"
    return fault.type


def _resource_json(resource: SimResource) -> dict[str, Any]:
    return {
        "name": resource.name,
        "rid": resource.rid,
        "email": resource.email,
        "planner_resource_id": resource.planner_resource_id,
        "is_case_worker": resource.is_case_worker,
        "description": resource.description,
    }


# ------------------------------------------------------------------------------------------- running


@dataclass
class RunningPlannerSim:
    """A simulator serving in a background thread. ``url`` is the SOAP endpoint, ``control_url`` the /_sim base."""

    url: str
    control_url: str
    state: SimState
    _server: _Server = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    def stop(self) -> None:
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> RunningPlannerSim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def load_resources(path: Path) -> list[SimResource]:
    data = json.loads(path.read_text(encoding="utf-8"))
    items = data.get("resources") if isinstance(data, dict) else data
    if items is None:
        raise TypeError(f"{path}: no resources (send a list of resources or {{\"resources\": [...]}})")
    return [SimResource.from_json(item) for item in items]


def start_server(
    host: str = "127.0.0.1",
    port: int = 0,
    tls: SimTLS | None = None,
    resources: list[SimResource] | None = None,
    planner_uid_patterns: list[str] | None = None,
) -> RunningPlannerSim:
    """Start the simulator in a background thread; ``port=0`` picks a free port."""
    state = SimState(resources, planner_uid_patterns)
    server = _Server((host, port), state, tls)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="planner-sim", daemon=True)
    thread.start()
    scheme = "https" if tls else "http"
    address, bound_port = server.server_address[:2]
    bound_host = address if isinstance(address, str) else address.decode()  # an AF_INET(6) socket reports a str
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    base = f"{scheme}://{shown}:{bound_port}"
    log.info("planner_sim_started", url=base + SERVICE_PATH, tls=bool(tls), client_certificate_required=bool(tls and tls.client_ca))
    return RunningPlannerSim(base + SERVICE_PATH, base + CONTROL_PREFIX, state, server, thread)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="planner-sim", description="Jobcenter Planner simulator (SOAP + /_sim control API)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8181)
    parser.add_argument("--tls-cert", type=Path, help="server certificate (PEM); enables HTTPS")
    parser.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    parser.add_argument("--client-ca", type=Path, help="CA (PEM) for client certificates; makes one REQUIRED")
    parser.add_argument("--seed-resources", type=Path, help="JSON list of resources (name, rid, email, planner_resource_id, is_case_worker)")
    parser.add_argument("--planner-uid-pattern", action="append", default=[], help="regex for Planner-originated OriginSystemIdentifiers (receipt 13); repeatable")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        print("--tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if args.client_ca and not args.tls_cert:
        print("--client-ca needs --tls-cert and --tls-key", file=sys.stderr)
        return 2
    tls = SimTLS(args.tls_cert, args.tls_key, args.client_ca) if args.tls_cert else None
    resources = load_resources(args.seed_resources) if args.seed_resources else []
    running = start_server(args.host, args.port, tls, resources, args.planner_uid_pattern)
    announce_and_wait(f"Planner simulator: SOAP {running.url}  control {running.control_url}/")
    running.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
