"""What ``plannersync status`` shows: mailboxes, queues and workers, in one place."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

from shared.adapters.store import Store
from shared.broker.topology import from_settings
from shared.config import Settings, mask_url
from shared.health import is_healthy, read_health


def collect_status(settings: Settings, store: Store) -> dict[str, Any]:
    synced = store.sync_positions()
    mailboxes = []
    for row in store.list_mailboxes():
        sync = synced.get(row.address)
        mailboxes.append(
            {
                "mailbox": row.address,
                "enabled": row.enabled,
                "exchange": row.status + (f" ({row.status_detail})" if row.status_detail else ""),
                "last_sync_at": sync.last_sync_at if sync else None,
                "last_full_sync_at": sync.last_full_sync_at if sync else None,
                "last_delivery_at": row.last_delivery_at,
                "last_error": row.last_error,
                "last_error_at": row.last_error_at,
            }
        )
    workers = {}
    for name, data in read_health(settings.status.health_dir).items():
        healthy, why = is_healthy(data, settings.status.stale_after.total_seconds(), time.time())
        workers[name] = {**{k: v for k, v in data.items() if k not in ("updated_ts", "beat_ts")}, "healthy": healthy, "why": why}
    state = {"state_dir": str(settings.state_dir), "database": mask_url(settings.database.url), "health_dir": str(settings.status.health_dir)}
    return {"state": state, "mailboxes": mailboxes, "queues": _queues(settings), "workers": workers, "planner_certificate": _certificate(settings)}


def _certificate(settings: Settings) -> dict[str, Any] | None:
    from datetime import datetime, timezone

    from shared.adapters.planner_client import client_certificate_expiry

    try:
        expiry = client_certificate_expiry(settings.planner)
    except Exception as exc:  # noqa: BLE001 - a status page must not fail on a bad certificate file
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}
    if expiry is None:
        return None
    return {"expires_at": expiry.isoformat(), "days_left": (expiry - datetime.now(timezone.utc)).days}


def _queues(settings: Settings) -> list[dict[str, Any]] | str:
    import requests

    topology = from_settings(settings.broker, settings.retry)
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
