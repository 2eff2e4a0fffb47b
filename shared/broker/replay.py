"""Look at and replay dead-lettered messages (``plannersync dlq list|replay``).

Replay publishes a copy to the stage's own work queue through the default exchange (so other
subscribers are not fanned out to again), keeps body, message id, correlation id and headers,
adds ``x-replay-count``/``x-replayed-at``, resets ``x-retry-count``, waits for the confirm and only
then acks the dead letter. A message replayed three times already stays parked. Replays are
safe because the publisher compares versions: a stale replay cannot overwrite newer state.
For a bulk move the management UI's "Move messages" does the same (see runbooks/replay.md).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pika

from shared.broker.connection import open_connection
from shared.broker.publishing import REASON, RETRY_COUNT, copy_properties
from shared.broker.topology import from_settings
from shared.config import Settings

MAX_REPLAYS = 3


def _open(settings: Settings) -> tuple[pika.BlockingConnection, Any]:
    connection = open_connection(settings.broker, "replay")
    channel = connection.channel()
    channel.confirm_delivery()
    return connection, channel


def list_dead_letters(settings: Settings, stage: str, limit: int = 100) -> list[dict[str, Any]]:
    """Peek at up to ``limit`` dead letters; they all stay in the queue."""
    queue = from_settings(settings.broker, settings.retry).stage(stage).dead_letter_queue()
    connection, channel = _open(settings)
    rows = []
    try:
        for _ in range(limit):
            method, properties, _body = channel.basic_get(queue, auto_ack=False)
            if method is None:
                break
            headers = properties.headers or {}
            rows.append(
                {
                    "message_id": properties.message_id,
                    "correlation_id": properties.correlation_id,
                    "type": properties.type,
                    "reason": headers.get(REASON),
                    "retries": headers.get(RETRY_COUNT),
                    "first_failure_at": headers.get("x-first-failure-at"),
                    "dead_lettered_at": headers.get("x-dead-lettered-at"),
                    "replays": headers.get("x-replay-count", 0),
                }
            )
    finally:
        connection.close()  # unacked peeks return to the queue
    return rows


def replay(settings: Settings, stage: str, limit: int = 100, message_id: str | None = None, dry_run: bool = False) -> int:
    """Move up to ``limit`` dead letters (or the one with ``message_id``) back to the work queue."""
    named = from_settings(settings.broker, settings.retry).stage(stage)
    connection, channel = _open(settings)
    moved = 0
    try:
        depth = channel.queue_declare(named.dead_letter_queue(), passive=True).method.message_count
        for _ in range(depth):
            if moved >= limit:
                break
            method, properties, body = channel.basic_get(named.dead_letter_queue(), auto_ack=False)
            if method is None:
                break
            headers = dict(properties.headers or {})
            if message_id is not None and properties.message_id != message_id:
                continue
            if int(headers.get("x-replay-count", 0)) >= MAX_REPLAYS:
                continue
            if dry_run:
                moved += 1
                continue
            headers["x-replay-count"] = int(headers.get("x-replay-count", 0)) + 1
            headers["x-replayed-at"] = datetime.now(timezone.utc).isoformat()
            headers["x-last-dead-letter-reason"] = headers.pop(REASON, None)
            headers[RETRY_COUNT] = 0
            headers.pop("x-first-failure-at", None)
            channel.basic_publish("", named.work_queue(), body, copy_properties(properties, headers), mandatory=True)
            channel.basic_ack(method.delivery_tag)
            moved += 1
    finally:
        connection.close()  # everything not acked stays in the dead-letter queue
    return moved
