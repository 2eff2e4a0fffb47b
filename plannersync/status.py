"""What ``plannersync status`` and the status page (``plannersync run status-page``) show: one collection, two views.

Per mailbox: its reader (backend; None = the configured default), the change-producer replica holding its lease
(``read_by``; None when no replica holds one now, decision 91), its state with Exchange and the detail, the last
change seen (last_sync_at), the last snapshot (last_full_sync_at), the last delivery to Planner, the busy times
Planner holds (present delivered rows) and the last error with its time. Per stage: the work queue's depth, each
retry tier and the dead-letter queue (management API). The Planner certificate's expiry and every worker's health
file. Only ids, counts, states and times: there is no appointment content in the store to show (decision 1 in
docs/decisions.md).
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import quote

from plannersync.workers import CONSUMING_STAGES
from shared.adapters.store import Store
from shared.broker.topology import Topology, delay_label, from_settings
from shared.config import Settings, mask_url
from shared.health import is_healthy, read_health


def collect_status(settings: Settings, store: Store, certificate_file: Callable[[], datetime | None] | None = None) -> dict[str, Any]:
    """Everything ``status`` and the status page show. ``certificate_file``: read the Planner certificate's expiry
    from the file when the publisher does not report it (the command line, run with the secrets; the page never)."""
    synced = store.sync_positions()
    now = datetime.now(timezone.utc)
    readers = {lease.mailbox: lease.owner for lease in store.leases() if lease.held_at(now)}
    mailboxes = []
    for row in store.list_mailboxes():
        sync = synced.get(row.address)
        held = sum(1 for record in store.delivered(row.address).values() if record.present)
        mailboxes.append(
            {
                "mailbox": row.address,
                "enabled": row.enabled,
                "backend": row.backend,  # None: the configured default reader (decision 49)
                "read_by": readers.get(row.address),  # the change-producer replica holding its lease (decision 91)
                "status": row.status,
                "status_detail": row.status_detail,
                "exchange": row.status + (f" ({row.status_detail})" if row.status_detail else ""),
                "last_sync_at": sync.last_sync_at if sync else None,
                "last_full_sync_at": sync.last_full_sync_at if sync else None,
                "last_delivery_at": row.last_delivery_at,
                "busy_times_held": held,
                "last_error": row.last_error,
                "last_error_at": row.last_error_at,
            }
        )
    workers = {}
    for name, data in read_health(settings.status.health_dir).items():
        healthy, why = is_healthy(data, settings.status.stale_after.total_seconds(), time.time())
        workers[name] = {**{k: v for k, v in data.items() if k not in ("updated_ts", "beat_ts")}, "healthy": healthy, "why": why}
    state = {"state_dir": str(settings.state_dir), "database": mask_url(settings.database.url), "health_dir": str(settings.status.health_dir)}
    topology = from_settings(settings.broker, settings.retry)
    queues = _queues(settings, topology)
    return {
        "collected_at": datetime.now(timezone.utc).isoformat(),
        "state": state,
        "mailboxes": mailboxes,
        "mailboxes_by_status": dict(sorted(Counter(m["status"] for m in mailboxes if m["enabled"]).items())),
        "queues": queues,
        "stages": _stages(topology, queues),
        "workers": workers,
        "planner_certificate": _certificate(workers.get("publisher"), certificate_file),
    }


def _certificate(publisher: dict[str, Any] | None, certificate_file: Callable[[], datetime | None] | None) -> dict[str, Any] | None:
    """The Planner certificate's expiry as the publisher reports it in its health (decision 83), else read from the
    certificate file when the caller can (an operator's ``plannersync status`` with the secrets), else None."""
    reported = (publisher or {}).get("planner_certificate_expires_at")
    if isinstance(reported, str):
        held = datetime.fromisoformat(reported)
        return {"expires_at": held.isoformat(), "days_left": (held - datetime.now(timezone.utc)).days, "reported_by": "publisher"}
    if certificate_file is None:
        return None
    try:
        expiry = certificate_file()
    except Exception as exc:  # noqa: BLE001 - a status page must not fail on a bad certificate file
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}
    if expiry is None:
        return None
    return {"expires_at": expiry.isoformat(), "days_left": (expiry - datetime.now(timezone.utc)).days, "reported_by": "certificate file"}


def _stages(topology: Topology, queues: list[dict[str, Any]] | str) -> dict[str, Any]:
    """Per consuming stage: work queue, each retry tier (by delay) and the dead-letter queue; None when unknown."""
    depth = {q["queue"]: q for q in queues} if isinstance(queues, list) else {}
    stages: dict[str, Any] = {}
    for name in CONSUMING_STAGES:
        stage = topology.stage(name)
        stages[name] = {
            "work": depth.get(stage.work_queue()),
            "retry": {delay_label(delay): depth.get(stage.retry_queue(delay)) for delay in topology.tiers()},
            "dead_letters": depth.get(stage.dead_letter_queue()),
        }
    return stages


def _queues(settings: Settings, topology: Topology) -> list[dict[str, Any]] | str:
    import requests

    url = f"{settings.broker.management_url.rstrip('/')}/api/queues/{quote(settings.broker.vhost, safe='')}"
    try:
        response = requests.get(url, auth=(settings.broker.user, settings.broker.password.get_secret_value()), timeout=5, verify=settings.broker.management_verify())
        response.raise_for_status()
    except requests.HTTPError as exc:
        where = mask_url(settings.broker.management_url)
        if exc.response is not None and exc.response.status_code == 401:
            return f"the RabbitMQ management API at {where} refused user {settings.broker.user!r}: wrong user or password (PLANNERSYNC_BROKER__USER, PLANNERSYNC_BROKER__PASSWORD)"
        return f"the RabbitMQ management API at {where} answered HTTP {exc.response.status_code if exc.response is not None else '?'}"
    except requests.RequestException as exc:
        return f"cannot reach the RabbitMQ management API at {mask_url(settings.broker.management_url)} ({type(exc).__name__}; PLANNERSYNC_BROKER__MANAGEMENT_URL)"
    ours = set(topology.queues())
    return [
        {"queue": q["name"], "ready": q.get("messages_ready", 0), "unacked": q.get("messages_unacknowledged", 0), "consumers": q.get("consumers", 0)}
        for q in response.json()
        if q["name"] in ours
    ]
