"""HTTP front door: /_sim/ control, the identity platform (discovery, token), then Graph under /v1.0 (bearer token)."""

from __future__ import annotations

import json
import re
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import structlog

from . import api, control
from .auth import OAuthError
from .state import GraphSimState

log = structlog.get_logger()
VERSION = "/v1.0"
_DISCOVERY = re.compile(r"^/(?P<tenant>[^/]+)/v2\.0/\.well-known/openid-configuration$")
_TOKEN = re.compile(r"^/(?P<tenant>[^/]+)/oauth2/v2\.0/token$")


class GraphHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    state: GraphSimState


class GraphHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: GraphHTTPServer
    server_version = "Microsoft-IIS/10.0"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # structured logs only

    # plumbing --------------------------------------------------------------------------------------------------
    @property
    def base(self) -> str:
        address = self.server.server_address
        name = address[0].decode() if isinstance(address[0], bytes) else str(address[0])
        host = self.headers.get("Host") or f"{name}:{address[1]}"
        return f"{self.server.state.scheme}://{host}"

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None, drip: tuple[int, float] | None = None) -> None:
        body = json.dumps(payload, default=str).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if drip is None:
            self.wfile.write(body)
            return
        size, interval = drip
        try:
            for offset in range(0, len(body), size):
                self.wfile.write(body[offset: offset + size])
                self.wfile.flush()
                time.sleep(interval)
        except OSError:
            log.info("graph_sim_drip_client_gone")
            self.close_connection = True

    # verbs -----------------------------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._route("PUT")

    def do_PATCH(self) -> None:  # noqa: N802
        self._route("PATCH")

    def do_DELETE(self) -> None:  # noqa: N802
        self._route("DELETE")

    def _route(self, method: str) -> None:
        state = self.server.state
        raw = self._body()
        path = self.path.split("?", 1)[0]
        if path.startswith("/_sim/"):
            status, payload = control.handle(state, method, self.path, raw, self.headers.get("Content-Type", ""))
            return self._send(status, payload)
        if path.startswith(VERSION + "/"):
            return self._graph(method, raw)
        if method == "GET" and path == "/common/discovery/instance":
            return self._instance_discovery()
        match = _DISCOVERY.match(path)
        if method == "GET" and match:
            if match.group("tenant") != state.settings.tenant:
                return self._send(400, OAuthError(400, "invalid_tenant", f"AADSTS90002: Tenant '{match.group('tenant')}' "
                                                  "not found.").body())
            return self._send(200, state.auth.discovery(self.base))
        match = _TOKEN.match(path)
        if method == "POST" and match:
            return self._token(match.group("tenant"), raw)
        self._send(404, {"error": {"code": "NotFound", "message": f"No route {method} {path}."}})

    # identity platform -----------------------------------------------------------------------------------------
    def _instance_discovery(self) -> None:
        host = self.headers.get("Host", "")
        tenant = self.server.state.settings.tenant
        self._send(200, {"tenant_discovery_endpoint": f"{self.base}/{tenant}/v2.0/.well-known/openid-configuration",
                         "api-version": "1.1",
                         "metadata": [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}]})

    def _token(self, tenant: str, raw: bytes) -> None:
        state = self.server.state
        form = {k: v[0] for k, v in parse_qs(raw.decode("utf-8", "replace")).items()}
        taken = state.faults.take("token", None, ("token_error", "throttle", "unavailable", "server_error", "latency", "drip"))
        for fault in taken:
            if fault.kind == "latency":
                time.sleep(fault.latency_ms / 1000)
        drip = next(((f.drip_bytes, f.drip_interval_ms / 1000) for f in taken if f.kind == "drip"), None)
        try:
            for fault in taken:
                if fault.kind == "token_error":
                    raise OAuthError(401, fault.code or "invalid_client", "AADSTS7000215: Injected token failure.")
                if fault.kind in ("throttle", "unavailable", "server_error"):
                    status, code = fault.answer()
                    raise OAuthError(status, "temporarily_unavailable", f"AADSTS50196: {code} (injected).")
            if tenant != state.settings.tenant:
                raise OAuthError(400, "invalid_request", f"AADSTS90002: Tenant '{tenant}' not found.")
            answer = state.auth.issue(form, f"{self.base}/{tenant}/oauth2/v2.0/token")
        except OAuthError as exc:
            state.record("token", None, exc.status)
            log.info("graph_sim_token_refused", error=exc.error, client_id=form.get("client_id"), description=exc.description)
            return self._send(exc.status, exc.body(), drip=drip)
        state.record("token", None, 200)
        log.info("graph_sim_token_issued", client_id=form.get("client_id"),
                 method="certificate" if form.get("client_assertion") else "secret")
        self._send(200, answer, {"Cache-Control": "no-store"}, drip=drip)

    # Graph -----------------------------------------------------------------------------------------------------
    def _graph(self, method: str, raw: bytes) -> None:
        state = self.server.state
        if state.auth.check(self.headers.get("Authorization")) is None:
            state.record("-", None, 401)
            answer = api.error(401, "InvalidAuthenticationToken", "Access token is empty or invalid.",
                               {"WWW-Authenticate": 'Bearer realm="", error="invalid_token"'})
            return self._send(answer.status, answer.body, answer.headers)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            answer = api.error(400, "BadRequest", "Unable to read JSON request payload.")
            return self._send(answer.status, answer.body, answer.headers)
        target = self.path[len(VERSION):]
        request = api.Request.parse(method, target, dict(self.headers.items()), body, self.base + VERSION)
        try:
            answer = api.dispatch(state, request)
        except Exception as exc:  # a simulator bug must not look like a hang to the client
            log.exception("graph_sim_request_failed", path=request.path)
            answer = api.error(500, "ErrorInternalServerError", type(exc).__name__)
        log.info("graph_sim_request", method=method, path=request.path.split("/")[-1], status=answer.status)
        drip = (answer.drip.drip_bytes, answer.drip.drip_interval_ms / 1000) if answer.drip else None
        self._send(answer.status, answer.body, answer.headers, drip)
