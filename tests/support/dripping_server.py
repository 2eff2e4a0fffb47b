"""A small HTTP(S) server that answers every request slowly on purpose: it promises a body with a Content-Length and
then drips it one byte at a time, each byte well within any read timeout, so that only a total deadline ends the call.

``drip_headers=True`` drips the status line and headers as well (a call stuck before it even has a response).
With ``tls`` it speaks HTTPS with the given certificate (and asks for a client certificate when ``client_ca`` is
given), as Planner's gateway does. ``requests`` counts what arrived; ``stop()`` ends every drip at once.
"""

from __future__ import annotations

import socket
import socketserver
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SERVICE_PATH = "/PlannerExternalCalendarService.svc"
BODY_START = b'<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>'


@dataclass(frozen=True)
class DripTLS:
    cert: Path
    key: Path
    client_ca: Path | None = None


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, drip: DrippingServer) -> None:
        self.drip = drip
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        drip = self.server.drip
        sock: Any = self.request
        sock.settimeout(10)
        try:
            if drip.context is not None:
                sock = drip.context.wrap_socket(sock, server_side=True)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            while len(rest) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                rest += chunk
            with drip.lock:
                drip.requests += 1
            headers = (
                "HTTP/1.1 200 OK\r\n"
                "Content-Type: text/xml; charset=utf-8\r\n"
                f"Content-Length: {drip.body_length}\r\n"
                "\r\n"
            ).encode()
            body = (BODY_START + b" " * drip.body_length)[: drip.body_length]
            if drip.drip_headers:
                self._drip(sock, headers + body)
            else:
                sock.sendall(headers)
                self._drip(sock, body)
        except (OSError, ssl.SSLError, ValueError):
            return
        finally:
            try:
                sock.close()
            except OSError:
                pass

    def _drip(self, sock: socket.socket, data: bytes) -> None:
        drip = self.server.drip
        for i in range(len(data)):
            if drip.stopping.wait(drip.interval):
                return
            sock.sendall(data[i : i + 1])


class DrippingServer:
    """Serves on 127.0.0.1:<free port> in a background thread; ``url`` is the Planner-like endpoint."""

    def __init__(self, interval: float = 0.1, body_length: int = 100_000, drip_headers: bool = False, tls: DripTLS | None = None) -> None:
        self.interval = interval
        self.body_length = body_length
        self.drip_headers = drip_headers
        self.requests = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.context: ssl.SSLContext | None = None
        if tls is not None:
            self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.context.load_cert_chain(str(tls.cert), str(tls.key))
            if tls.client_ca is not None:
                self.context.load_verify_locations(cafile=str(tls.client_ca))
                self.context.verify_mode = ssl.CERT_REQUIRED
        self._server = _Server(self)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="dripping-server", daemon=True)
        self._thread.start()
        host, port = self._server.server_address[:2]
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{port}{SERVICE_PATH}"

    def stop(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def __enter__(self) -> DrippingServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
