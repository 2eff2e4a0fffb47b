"""Start the Graph simulator: in-process (``start_server``) or as a process (``main``, ``python -m simulators.graph``)."""

from __future__ import annotations

import argparse
import ssl
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from simulators.exchange.ical_loader import load_ics
from simulators.exchange.store import Store
from simulators.process import announce_and_wait

from .http_handler import VERSION, GraphHandler, GraphHTTPServer
from .state import GraphSimState, Settings

log = structlog.get_logger()


@dataclass
class RunningGraphSim:
    """A simulator serving in a background thread."""

    url: str  # Graph base URL, …/v1.0 (GraphSettings.graph_url)
    authority_url: str  # the identity platform, scheme://host:port (GraphSettings.authority_url)
    control_url: str  # …/_sim
    state: GraphSimState
    host: str
    port: int
    _server: GraphHTTPServer
    _thread: threading.Thread

    @property
    def tenant(self) -> str:
        return self.state.settings.tenant

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        log.info("graph_sim_stopped", port=self.port)

    def __enter__(self) -> RunningGraphSim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    host: str = "127.0.0.1",
    port: int = 0,
    tls: tuple[str, str] | None = None,
    *,
    store: Store | None = None,
    tenant: str = "sim-tenant",
    client_id: str = "plannersync-sim",
    client_secret: str | None = "sim-secret",
    client_certificates: Iterable[str | bytes] = (),
    mailboxes: Iterable[str] = (),
    page_size: int = 10,
    token_lifetime: int = 3600,
    concurrency_limit: int = 4,
    default_tz: str = "Romance Standard Time",
) -> RunningGraphSim:
    """Serve Graph, the token endpoint and /_sim/ on host:port (0 = any free port); ``tls`` is (certfile, keyfile).

    ``store``: serve an existing calendar store (``ews_sim.state.store``) so one scenario runs through both protocols.
    ``client_certificates``: PEM certificates registered for ``client_id`` (certificate credentials).
    """
    settings = Settings(tenant=tenant, page_size=page_size, token_lifetime=token_lifetime, concurrency_limit=concurrency_limit)
    state = GraphSimState(settings, store if store is not None else Store(default_tz=default_tz), "https" if tls else "http")
    state.auth.register(client_id, client_secret)
    for pem in client_certificates:
        state.auth.register(client_id, certificate_pem=pem)
    for address in mailboxes:
        state.store.ensure_mailbox(address)
    server = GraphHTTPServer((host, port), GraphHandler)
    server.state = state
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certfile=tls[0], keyfile=tls[1])
        server.socket = context.wrap_socket(server.socket, server_side=True)
    bound_host, bound_port = server.server_address[:2]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name=f"graph-sim-{bound_port}", daemon=True)
    thread.start()
    base = f"{state.scheme}://{host}:{bound_port}"
    log.info("graph_sim_started", url=base, tls=tls is not None, shared_store=store is not None)
    return RunningGraphSim(f"{base}{VERSION}", base, f"{base}/_sim", state, str(bound_host), int(bound_port), server, thread)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graph-sim", description="Microsoft Graph (Exchange Online calendars) simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8383)
    parser.add_argument("--tls-cert", help="PEM certificate: serve HTTPS")
    parser.add_argument("--tls-key", help="PEM private key for --tls-cert")
    parser.add_argument("--tenant", default="sim-tenant")
    parser.add_argument("--client-id", default="plannersync-sim")
    parser.add_argument("--client-secret", default="sim-secret", help="empty: certificate only")
    parser.add_argument("--client-certificate", action="append", default=[], metavar="PEM",
                        help="register the app's certificate (repeatable)")
    parser.add_argument("--mailbox", action="append", default=[], help="create an empty mailbox (repeatable)")
    parser.add_argument("--load", action="append", default=[], metavar="MAILBOX=FILE.ics",
                        help="load an iCalendar file into a mailbox (repeatable)")
    parser.add_argument("--page-size", type=int, default=10, help="page size when no odata.maxpagesize is asked for")
    parser.add_argument("--token-lifetime", type=int, default=3600, help="access token lifetime in seconds")
    parser.add_argument("--timezone", default="Romance Standard Time", help="zone for local times without one")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        print("--tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    loads = []
    for spec in args.load:
        mailbox, _, path = spec.partition("=")
        if not path:
            print(f"--load wants MAILBOX=FILE.ics, not {spec!r}", file=sys.stderr)
            return 2
        loads.append((mailbox, Path(path)))
    sim = start_server(
        args.host, args.port, (args.tls_cert, args.tls_key) if args.tls_cert else None, tenant=args.tenant,
        client_id=args.client_id, client_secret=args.client_secret or None,
        client_certificates=[Path(p).read_bytes() for p in args.client_certificate], mailboxes=args.mailbox,
        page_size=args.page_size, token_lifetime=args.token_lifetime, default_tz=args.timezone,
    )
    for mailbox, path in loads:
        for item in load_ics(path.read_bytes(), args.timezone):
            sim.state.store.add_parsed(mailbox, item)
    announce_and_wait(f"Graph simulator: {sim.url}  authority: {sim.authority_url}/{sim.tenant}  control: {sim.control_url}")
    sim.stop()
    return 0
