"""The status page: ``plannersync run status-page``, a read-only web page and JSON of what ``plannersync status`` shows.

A worker like the others (run/stop/health, decision 19 in docs/decisions.md): every ``status.page_refresh`` it
collects the status once (``plannersync.status.collect_status``: store, management API, health files, certificate)
and serves that snapshot to every request, so a busy browser or proxy never adds load on the store or the broker.
``/`` is server-rendered HTML with a little CSS and no script at all, every value escaped; ``/status.json`` is the
same data. It binds to ``PLANNERSYNC_STATUS__PAGE_HOST``:``__PAGE_PORT`` (127.0.0.1:8470); anything wider goes
behind the operator's own reverse proxy, which does authentication and TLS (decision 65 in docs/decisions.md). Nothing on it can change
anything: GET and HEAD only. The snapshot also feeds Prometheus (mailboxes by status, queue depths, health files,
certificate days left; ``shared/metrics.py``).
"""

from __future__ import annotations

import html
import json
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import urlsplit

from plannersync.status import collect_status
from shared import metrics
from shared.adapters.store import Store, open_store
from shared.config import Settings
from shared.logs import get_logger
from shared.workers import Health

log = get_logger(__name__)
CERTIFICATE_WARNING_DAYS = 30
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


class CannotServe(Exception):
    """The page cannot listen where it was told to; ``str()`` is the one line for the operator."""


class StatusPage:
    """Collects the status every ``refresh`` seconds and serves the latest snapshot over HTTP."""

    def __init__(self, settings: Settings, collect: Callable[[], dict[str, Any]] | None = None) -> None:
        self.settings = settings
        self.host, self.port = settings.status.page_host, settings.status.page_port
        self.refresh = settings.status.page_refresh.total_seconds()
        self._collect = collect or self._collect_from_store
        self._store: Store | None = None
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self.beat_at = time.time()
        self.snapshot: dict[str, Any] | None = None
        self.snapshot_at: float | None = None
        self.problem: str | None = None
        self.requests = 0
        self._unregister: Callable[[], None] | None = None

    # --- the worker shape -----------------------------------------------------------------------
    def run(self) -> None:
        try:
            server = ThreadingHTTPServer((self.host, self.port), _handler(self))
        except OSError as exc:
            raise CannotServe(f"the status page cannot listen on {self.host}:{self.port}: {exc.strerror or exc} (PLANNERSYNC_STATUS__PAGE_HOST, PLANNERSYNC_STATUS__PAGE_PORT)") from None
        server.daemon_threads = True
        self._server = server
        self.port = int(server.server_address[1])
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="status-page-http", daemon=True).start()
        self._unregister = metrics.register_gauges(lambda: status_samples(self.snapshot))
        log.info("status_page_serving", url=f"http://{self.host}:{self.port}/", refresh_s=self.refresh)
        try:
            while not self._stop.is_set():
                self._refresh()
                deadline = time.monotonic() + self.refresh
                while not self._stop.is_set() and time.monotonic() < deadline:
                    self.beat_at = time.time()
                    self._stop.wait(min(1.0, max(0.0, deadline - time.monotonic())))
        finally:
            server.shutdown()
            server.server_close()
            if self._unregister is not None:
                self._unregister()
            log.info("worker_stopped", stage="status-page")

    def stop(self) -> None:
        self._stop.set()

    def health(self) -> Health:
        facts: dict[str, Any] = {"url": f"http://{self.host}:{self.port}/", "requests": self.requests}
        if self.snapshot_at is not None:
            facts["collected_at"] = datetime.fromtimestamp(self.snapshot_at, timezone.utc).isoformat()
        if self.problem is not None:
            facts["problem"] = self.problem
        ok = self.problem is None and self._server is not None
        state = "serving" if ok else ("starting" if self._server is None and self.problem is None else "collect_failed")
        return Health(state, self.beat_at, ok=ok, facts=facts)

    # --- collecting ---------------------------------------------------------------------------------
    def _collect_from_store(self) -> dict[str, Any]:
        if self._store is None:  # read-only: never creates or migrates the schema
            self._store = open_store(self.settings.database_url(), auto_upgrade=False)
        return collect_status(self.settings, self._store)

    def _refresh(self) -> None:
        try:
            snapshot = self._collect()
        except Exception as exc:  # noqa: BLE001 - the page shows the problem instead of dying
            self.problem = f"cannot read the status: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            log.warning("status_collect_failed", error=type(exc).__name__, detail=str(exc)[:200])
            return
        self.snapshot, self.snapshot_at, self.problem = snapshot, time.time(), None
        certificate = snapshot.get("planner_certificate") or {}
        if certificate.get("expires_at"):
            metrics.certificate_expiry(datetime.fromisoformat(certificate["expires_at"]))

    # --- serving ------------------------------------------------------------------------------------------
    def page(self) -> tuple[int, str, bytes]:
        if self.snapshot is None:
            body = render_waiting(self.problem, self.refresh)
            return 503, "text/html; charset=utf-8", body.encode()
        return 200, "text/html; charset=utf-8", render_page(self.snapshot, self.refresh, self.problem).encode()

    def json(self) -> tuple[int, str, bytes]:
        if self.snapshot is None:
            return 503, "application/json", json.dumps({"error": self.problem or "not collected yet"}).encode()
        data = {**self.snapshot, "problem": self.problem}
        return 200, "application/json", json.dumps(data, indent=2, default=str).encode()


def _handler(page: StatusPage) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "plannersync-status"
        sys_version = ""

        def do_GET(self) -> None:
            self._answer(body=True)

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def _answer(self, body: bool) -> None:
            page.requests += 1
            path = urlsplit(self.path).path
            if path in ("/", "/index.html"):
                code, kind, content = page.page()
            elif path == "/status.json":
                code, kind, content = page.json()
            else:
                code, kind, content = 404, "text/plain; charset=utf-8", b"not found\n"
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(content)))
            for name, value in SECURITY_HEADERS.items():
                self.send_header(name, value)
            self.end_headers()
            if body:
                self.wfile.write(content)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass  # worker logs stay JSON lines; the reverse proxy keeps the access log

    return Handler


def build(settings: Settings) -> StatusPage:
    """The status page worker; nothing listens or connects until ``run()``."""
    return StatusPage(settings)


# --- metrics from the snapshot ------------------------------------------------------------------------------
def status_samples(snapshot: dict[str, Any] | None) -> list[metrics.Sample]:
    """Mailboxes by status, queue depths per stage and tier, management API reachable, the workers' health files."""
    if snapshot is None:
        return []
    samples = [metrics.Sample("plannersync_mailboxes", "Enrolled mailboxes by their state with Exchange", float(n), {"status": s}) for s, n in snapshot["mailboxes_by_status"].items()]
    samples.append(metrics.Sample("plannersync_management_api_up", "1 when the status page could read the queues", 0.0 if isinstance(snapshot["queues"], str) else 1.0))
    for stage, tiers in snapshot["stages"].items():
        rows = [("work", tiers["work"]), *((f"retry.{delay}", q) for delay, q in tiers["retry"].items()), ("dlq", tiers["dead_letters"])]
        for tier, queue in rows:
            if queue is not None:
                value = float(queue["ready"] + queue["unacked"])
                samples.append(metrics.Sample("plannersync_queue_messages", "Messages in a stage's work queue, retry tier or dead-letter queue", value, {"stage": stage, "tier": tier}))
    for worker, data in snapshot["workers"].items():
        samples.extend(metrics.health_samples(worker, data, bool(data.get("healthy")), metrics.timestamp_of(data.get("beat_at")), prefix="plannersync_health_file"))
    return samples


# --- HTML -------------------------------------------------------------------------------------------------------
CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d1d1f;background:#fff}
h1{font-size:1.4em;margin:0 0 .2em} h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;width:100%;margin-bottom:.5em}
th,td{border:1px solid #d0d4da;padding:.3em .5em;text-align:left;vertical-align:top}
th{background:#eef1f5} td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{background:#e3f4e6} .bad{background:#fbe2e0} .warn{background:#fff3d6}
.meta{color:#555} code{font-size:.95em}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _when(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return str(value)
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return str(value)


def _cell(field: str, value: Any, css: str = "") -> str:
    classes = f' class="{css}"' if css else ""
    return f'<td data-field="{_e(field)}"{classes}>{_e(value)}</td>'


def _page(title: str, refresh: float, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta http-equiv=\"refresh\" content=\"{max(5, int(refresh))}\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def render_waiting(problem: str | None, refresh: float) -> str:
    text = problem or "collecting the status for the first time"
    return _page("plannersync status", refresh, f'<h1>plannersync status</h1>\n<p class="bad" id="problem">{_e(text)}</p>')


def render_page(status: dict[str, Any], refresh: float, problem: str | None = None) -> str:
    parts = [
        "<h1>plannersync status</h1>",
        f'<p class="meta">Collected <span id="collected-at">{_e(_when(status.get("collected_at")))}</span>; '
        f'reloads every {_e(max(5, int(refresh)))} s. Store <code>{_e(status["state"]["database"])}</code>, health files '
        f'<code>{_e(status["state"]["health_dir"])}</code>. <a href="status.json">JSON</a></p>',
    ]
    if problem:
        parts.append(f'<p class="bad" id="problem">Showing the last good snapshot: {_e(problem)}</p>')
    parts.append(_certificate_html(status.get("planner_certificate")))
    parts.append(_workers_html(status["workers"]))
    parts.append(_stages_html(status["stages"], status["queues"]))
    parts.append(_mailboxes_html(status["mailboxes"], status.get("mailboxes_by_status", {})))
    return _page("plannersync status", refresh, "\n".join(parts))


def _certificate_html(certificate: dict[str, Any] | None) -> str:
    if certificate is None:
        return '<h2>Planner certificate</h2>\n<p id="certificate">no client certificate configured</p>'
    if certificate.get("error"):
        return f'<h2>Planner certificate</h2>\n<p id="certificate" class="bad">{_e(certificate["error"])}</p>'
    days = int(certificate["days_left"])
    css = "bad" if days < 0 else ("warn" if days < CERTIFICATE_WARNING_DAYS else "ok")
    return (
        f'<h2>Planner certificate</h2>\n<p id="certificate" class="{css}">expires {_e(_when(certificate["expires_at"]))} '
        f'(<span data-field="days_left">{_e(days)}</span> days left)</p>'
    )


def _workers_html(workers: dict[str, dict[str, Any]]) -> str:
    if not workers:
        return '<h2>Workers</h2>\n<p id="workers">no health files</p>'
    rows = []
    for name, data in sorted(workers.items()):
        css = "ok" if data.get("healthy") else "bad"
        rows.append(
            f'<tr data-worker="{_e(name)}">{_cell("worker", name)}{_cell("healthy", "ok" if data.get("healthy") else "BAD", css)}'
            f'{_cell("why", data.get("why"))}{_cell("updated_at", _when(data.get("updated_at")))}'
            f'{_cell("last_run_at", _when(data.get("last_run_at")))}{_cell("next_run_at", _when(data.get("next_run_at")))}</tr>'
        )
    head = "<tr><th>worker</th><th>health</th><th>state</th><th>health file written</th><th>last nightly run</th><th>next nightly run</th></tr>"
    return f'<h2>Workers</h2>\n<table id="workers">{head}\n' + "\n".join(rows) + "</table>"


def _depth(queue: dict[str, Any] | None) -> str:
    return "?" if queue is None else str(queue["ready"] + queue["unacked"])


def _stages_html(stages: dict[str, Any], queues: list[dict[str, Any]] | str) -> str:
    if isinstance(queues, str):
        return f'<h2>Queues</h2>\n<p id="queues" class="bad">{_e(queues)}</p>'
    rows = []
    for name, tiers in stages.items():
        work = tiers["work"]
        retry = ", ".join(f"{delay}: {_depth(q)}" for delay, q in tiers["retry"].items())
        dead = tiers["dead_letters"]
        dead_css = "ok" if dead is not None and dead["ready"] + dead["unacked"] == 0 else "bad"
        rows.append(
            f'<tr data-stage="{_e(name)}">{_cell("stage", name)}{_cell("queued", _depth(work), "n")}'
            f'{_cell("consumers", "?" if work is None else work["consumers"], "n")}{_cell("retry", retry)}'
            f'{_cell("dead_letters", _depth(dead), "n " + dead_css)}</tr>'
        )
    head = "<tr><th>stage</th><th>queued</th><th>consumers</th><th>retry tiers (messages waiting)</th><th>dead letters</th></tr>"
    return f'<h2>Queues</h2>\n<table id="queues">{head}\n' + "\n".join(rows) + "</table>"


def _mailboxes_html(mailboxes: list[dict[str, Any]], by_status: dict[str, int]) -> str:
    summary = ", ".join(f"{status}: {count}" for status, count in by_status.items()) or "none enrolled"
    if not mailboxes:
        return f'<h2>Mailboxes</h2>\n<p id="mailboxes">{_e(summary)}</p>'
    rows = []
    for m in mailboxes:
        css = "bad" if m["last_error"] else ""
        backend = m["backend"] or "default"
        rows.append(
            f'<tr data-mailbox="{_e(m["mailbox"])}">{_cell("mailbox", m["mailbox"])}{_cell("enabled", "yes" if m["enabled"] else "no")}'
            f'{_cell("backend", backend)}{_cell("read_by", m["read_by"] or "")}{_cell("status", m["status"])}{_cell("status_detail", m["status_detail"] or "")}'
            f'{_cell("last_sync_at", _when(m["last_sync_at"]))}{_cell("last_full_sync_at", _when(m["last_full_sync_at"]))}'
            f'{_cell("last_delivery_at", _when(m["last_delivery_at"]))}{_cell("busy_times_held", m["busy_times_held"], "n")}'
            f'{_cell("last_error", m["last_error"] or "", css)}{_cell("last_error_at", _when(m["last_error_at"]) if m["last_error"] else "")}</tr>'
        )
    head = (
        "<tr><th>mailbox</th><th>enabled</th><th>reader</th><th>read by</th><th>state</th><th>detail</th><th>last change seen</th>"
        "<th>last snapshot</th><th>last delivery</th><th>busy times held</th><th>last error</th><th>at</th></tr>"
    )
    return f'<h2>Mailboxes</h2>\n<p id="mailbox-summary">{_e(summary)}</p>\n<table id="mailboxes">{head}\n' + "\n".join(rows) + "</table>"
