"""Start the EWS simulator: in-process (``start_server``) or as a process (``main``)."""

from __future__ import annotations

import argparse
import ssl
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from simulators.process import announce_and_wait

from .http_handler import EwsHandler, SimHTTPServer
from .ical_loader import load_ics
from .state import Settings, SimState

log = structlog.get_logger()


@dataclass
class RunningExchangeSim:
    """A simulator serving in a background thread."""

    url: str  # the EWS endpoint, …/EWS/Exchange.asmx
    control_url: str  # …/_sim
    state: SimState
    host: str
    port: int
    _server: SimHTTPServer
    _thread: threading.Thread

    def stop(self) -> None:
        """Stop serving; open streams end (Closed) and the port is released."""
        self.state.stopping.set()
        with self.state.store.lock:
            self.state.store.changed.notify_all()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        log.info("exchange_sim_stopped", port=self.port)

    def __enter__(self) -> RunningExchangeSim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    host: str = "127.0.0.1",
    port: int = 0,
    users: dict[str, str] | None = None,
    minute_seconds: float = 60.0,
    tls: tuple[str, str] | None = None,
    *,
    mailboxes: Iterable[str] = (),
    keepalive_seconds: float = 5.0,
    view_limit: int = 1000,
    events_page: int = 50,
    default_tz: str = "Romance Standard Time",
) -> RunningExchangeSim:
    """Serve EWS and /_sim/ on host:port (0 = any free port); ``tls`` is (certfile, keyfile) for HTTPS."""
    settings = Settings(
        users=dict(users if users is not None else {"svc": "pw"}), minute_seconds=minute_seconds,
        keepalive_seconds=keepalive_seconds, view_limit=view_limit, events_page=events_page, default_tz=default_tz,
    )
    state = SimState(settings)
    for address in mailboxes:
        state.store.ensure_mailbox(address)
    server = SimHTTPServer((host, port), EwsHandler)
    server.state = state
    scheme = "http"
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certfile=tls[0], keyfile=tls[1])
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    bound_host, bound_port = server.server_address[:2]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name=f"exchange-sim-{bound_port}", daemon=True)
    thread.start()
    base = f"{scheme}://{host}:{bound_port}"
    log.info("exchange_sim_started", url=base, users=len(settings.users), tls=tls is not None)
    return RunningExchangeSim(f"{base}/EWS/Exchange.asmx", f"{base}/_sim", state, str(bound_host), int(bound_port),
                              server, thread)


def _users(args: argparse.Namespace) -> dict[str, str]:
    names, passwords = args.user or [], args.password or []
    if len(names) != len(passwords):
        raise SystemExit("give one --password per --user")
    users = dict(zip(names, passwords, strict=True))
    if args.users_file:
        for line in Path(args.users_file).read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                name, _, password = line.strip().partition(":")
                users[name] = password
    return users or {"svc": "pw"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exchange-sim", description="EWS (Exchange Web Services) simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8282)
    parser.add_argument("--tls-cert", help="PEM certificate: serve HTTPS")
    parser.add_argument("--tls-key", help="PEM private key for --tls-cert")
    parser.add_argument("--user", action="append", help="Basic auth user name (repeatable, pairs with --password)")
    parser.add_argument("--password", action="append", help="password for the --user in the same position")
    parser.add_argument("--users-file", help="file of name:password lines")
    parser.add_argument("--mailbox", action="append", default=[], help="create an empty mailbox (repeatable)")
    parser.add_argument("--load", action="append", default=[], metavar="MAILBOX=FILE.ics",
                        help="load an iCalendar file into a mailbox (repeatable)")
    parser.add_argument("--minute-seconds", type=float, default=60.0,
                        help="seconds per 'minute' for streaming ConnectionTimeout and pull Timeout (default 60)")
    parser.add_argument("--keepalive-seconds", type=float, default=5.0)
    parser.add_argument("--view-limit", type=int, default=1000, help="most items one FindItem returns (1000)")
    parser.add_argument("--timezone", default="Romance Standard Time", help="zone for local times without one")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        print("--tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    sim = start_server(
        args.host, args.port, _users(args), args.minute_seconds,
        (args.tls_cert, args.tls_key) if args.tls_cert else None,
        mailboxes=args.mailbox, keepalive_seconds=args.keepalive_seconds, view_limit=args.view_limit,
        default_tz=args.timezone,
    )
    for spec in args.load:
        mailbox, _, path = spec.partition("=")
        if not path:
            print(f"--load wants MAILBOX=FILE.ics, not {spec!r}", file=sys.stderr)
            sim.stop()
            return 2
        for item in load_ics(Path(path).read_bytes(), args.timezone):
            sim.state.store.add_parsed(mailbox, item)
    announce_and_wait(f"EWS simulator: {sim.url}  control: {sim.control_url}")
    sim.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
