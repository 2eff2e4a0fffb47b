"""Look at, replay and purge dead-lettered messages (``plannersync dlq list|show|replay|purge``).

Looking is free: a dead-letter queue is a classic queue with no delivery limit, and every message this module
takes to look at is left unacked and returns to its place when the channel closes (decision 42 in
docs/decisions.md). Nothing leaves a dead-letter queue except a replay or a purge the operator confirmed.

Listing shows the total and what is left after the page, never stops silently (decision 43). Replay publishes a
copy to the stage's own work queue through the default exchange (so other subscribers are not fanned out to
again), keeps body, message id, correlation id and headers (``x-first-failure-at`` included), moves the reason to
``x-last-dead-letter-reason``, adds ``x-replay-count``/``x-replayed-at``, resets ``x-retry-count``, waits for the
confirm and only then acks the dead letter (decision 29). A message replayed ``MAX_REPLAYS`` times is parked: it
stays, is listed as parked, and leaves only by ``purge``. Replays are safe because the publisher compares
versions: a stale replay cannot overwrite newer state (decision 6). The UI's "Move messages" keeps every header
instead (see runbooks/replay.md).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from shared.broker.connection import open_connection
from shared.broker.publishing import FIRST_FAILURE, REASON, RETRY_COUNT, copy_properties
from shared.broker.topology import Stage, from_settings
from shared.config import Settings

MAX_REPLAYS = 3
REPLAY_COUNT = "x-replay-count"


class UnknownMessage(LookupError):
    """No dead letter has the message id asked for; ``str()`` is one line for the operator."""


class Parked(LookupError):
    """The dead letter asked for is parked (replayed ``MAX_REPLAYS`` times); ``str()`` is one line for the operator."""


@dataclass(frozen=True)
class DeadLetter:
    """One dead letter as an operator needs to see it (no appointment content exists to show; decision 1)."""

    position: int  # 0 = the head of the queue
    message_id: str | None
    type: str | None
    mailbox: str | None
    origin_id: str | None
    original_queue: str | None
    reason: str | None
    attempts: int | None
    first_failure_at: str | None
    dead_lettered_at: str | None
    replays: int
    correlation_id: str | None
    parked: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Page:
    """A stretch of a dead-letter queue: ``letters`` from ``offset`` out of ``total``."""

    queue: str
    total: int
    offset: int
    letters: list[DeadLetter]

    @property
    def left(self) -> int:
        """Dead letters after this page."""
        return max(0, self.total - self.offset - len(self.letters))


@dataclass
class ReplayResult:
    queue: str
    total: int
    replayed: list[DeadLetter] = field(default_factory=list)
    parked: list[DeadLetter] = field(default_factory=list)
    dry_run: bool = False

    @property
    def left(self) -> int:
        """Dead letters still in the queue after this replay (parked ones included)."""
        return self.total - (0 if self.dry_run else len(self.replayed))


def _stage(settings: Settings, stage: str) -> Stage:
    return from_settings(settings.broker, settings.retry).stage(stage)


def describe(position: int, properties: BasicProperties, body: bytes) -> DeadLetter:
    """What a dead letter's headers and body say, for ours and for those the broker dead-lettered itself (``x-death``)."""
    headers = dict(properties.headers or {})
    deaths = headers.get("x-death") or []
    death = deaths[0] if deaths and isinstance(deaths[0], dict) else {}
    mailbox, origin = _keys(properties.type, body)
    attempts = headers.get(RETRY_COUNT)
    if attempts is None and death:
        attempts = death.get("count")
    first_failure = headers.get(FIRST_FAILURE) or _text(death.get("time"))
    reason = headers.get(REASON) or (f"broker: {_text(death.get('reason'))}" if death else None)
    replays = int(headers.get(REPLAY_COUNT, 0) or 0)
    return DeadLetter(
        position=position,
        message_id=properties.message_id,
        type=properties.type,
        mailbox=mailbox,
        origin_id=origin,
        original_queue=_text(headers.get("x-original-queue") or death.get("queue") or headers.get("x-first-death-queue")),
        reason=_text(reason),
        attempts=int(attempts) if isinstance(attempts, int) else None,
        first_failure_at=_text(first_failure),
        dead_lettered_at=_text(headers.get("x-dead-lettered-at")),
        replays=replays,
        correlation_id=properties.correlation_id,
        parked=replays >= MAX_REPLAYS,
    )


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat()
    return str(value)


def _keys(kind: str | None, body: bytes) -> tuple[str | None, str | None]:
    """(mailbox, origin id) from the body: the event key of a busy time, the item of a change, the snapshot part."""
    try:
        data = json.loads(body)
    except ValueError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    mailbox = data.get("mailbox") if isinstance(data.get("mailbox"), str) else None
    kind = kind or data.get("type")
    if kind == "busy_time_state":
        origin = data.get("origin_id")
    elif kind == "calendar_change":
        item = data.get("item")
        origin = (item.get("uid") if isinstance(item, dict) else None) or data.get("item_id")
    elif kind == "calendar_snapshot":
        origin = f"snapshot {data.get('snapshot_id')} part {data.get('part')}"
    else:
        origin = None
    return mailbox, origin if isinstance(origin, str) else None


def _peek(channel: BlockingChannel, queue: str, count: int) -> Iterator[tuple[int, Basic.GetOk, BasicProperties, bytes]]:
    """Take up to ``count`` messages from the head, unacked: they return to their places when the channel closes."""
    for position in range(count):
        method, properties, body = channel.basic_get(queue, auto_ack=False)
        if method is None:
            return
        yield position, method, properties, body


def _depth(channel: BlockingChannel, queue: str) -> int:
    return int(channel.queue_declare(queue, passive=True).method.message_count)


def _open(settings: Settings, name: str) -> tuple[pika.BlockingConnection, BlockingChannel]:
    connection = open_connection(settings.broker, name)
    channel = connection.channel()
    channel.confirm_delivery()
    return connection, channel


def list_dead_letters(settings: Settings, stage: str, limit: int | None = 100, offset: int = 0, message_id: str | None = None, parked_only: bool = False) -> Page:
    """Dead letters ``offset`` … ``offset + limit`` (all with ``limit=None``), optionally only one id or the parked ones; all stay."""
    queue = _stage(settings, stage).dead_letter_queue()
    connection, channel = _open(settings, "dlq-list")
    letters: list[DeadLetter] = []
    try:
        total = _depth(channel, queue)
        matched = 0
        for position, _method, properties, body in _peek(channel, queue, total):
            letter = describe(position, properties, body)
            if (message_id is not None and letter.message_id != message_id) or (parked_only and not letter.parked):
                continue
            matched += 1
            if matched <= offset:
                continue
            if limit is not None and len(letters) >= limit:
                if message_id is None and not parked_only:
                    break
                continue
            letters.append(letter)
        if message_id is not None and matched == 0:
            raise UnknownMessage(f"no dead letter with message id {message_id!r} in {queue} ({total} messages)")
        if message_id is not None or parked_only:
            total = matched
    finally:
        connection.close()  # nothing was acked: every message is back where it was
    return Page(queue, total, offset, letters)


def show_dead_letter(settings: Settings, stage: str, message_id: str) -> list[dict[str, Any]]:
    """Every copy of one dead letter whole: what ``list`` shows, every header and the body (it carries no content; decision 1)."""
    queue = _stage(settings, stage).dead_letter_queue()
    connection, channel = _open(settings, "dlq-show")
    shown = []
    try:
        total = _depth(channel, queue)
        for position, _method, properties, body in _peek(channel, queue, total):
            if properties.message_id != message_id:
                continue
            try:
                payload: Any = json.loads(body)
            except ValueError:
                payload = body.decode("utf-8", "replace")
            headers = {k: _plain(v) for k, v in (properties.headers or {}).items()}
            shown.append({**describe(position, properties, body).as_dict(), "headers": headers, "body": payload})
        if not shown:
            raise UnknownMessage(f"no dead letter with message id {message_id!r} in {queue} ({total} messages)")
    finally:
        connection.close()
    return shown


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, (bytes, datetime)):
        return _text(value)
    return value


def replay(
    settings: Settings,
    stage: str,
    limit: int | None = 100,
    message_id: str | None = None,
    dry_run: bool = False,
    progress: Callable[[int, ReplayResult], None] | None = None,
) -> ReplayResult:
    """Move up to ``limit`` dead letters (all with ``None``; or every copy of ``message_id``) back to the work queue.

    Parked messages are never replayed; asking for one by id raises ``Parked``, an id that is not there
    ``UnknownMessage``. ``dry_run`` takes nothing and returns what would be replayed. ``progress`` is called after
    each dead letter looked at, with how many were looked at so far and the result so far (``plannersync dlq replay``
    prints a line from it now and then).
    """
    named = _stage(settings, stage)
    queue = named.dead_letter_queue()
    connection, channel = _open(settings, "dlq-replay")
    try:
        total = _depth(channel, queue)
        result = ReplayResult(queue, total, dry_run=dry_run)
        matched = 0
        for position, method, properties, body in _peek(channel, queue, total):
            if limit is not None and len(result.replayed) >= limit:
                break
            if _replay_one(channel, named, result, message_id, dry_run, position, method, properties, body):
                matched += 1
            if progress is not None:
                progress(position + 1, result)
        if message_id is not None and matched == 0:
            raise UnknownMessage(f"no dead letter with message id {message_id!r} in {queue} ({total} messages)")
        if message_id is not None and not result.replayed:
            raise Parked(
                f"dead letter {message_id!r} is parked: it was replayed {MAX_REPLAYS} times already; "
                f"see it with `plannersync dlq show {stage} --message-id {message_id}`, "
                f"remove it with `plannersync dlq purge {stage} --message-id {message_id} --yes`"
            )
    finally:
        connection.close()  # everything not acked stays in the dead-letter queue, in its place
    return result


def _replay_one(
    channel: BlockingChannel, named: Stage, result: ReplayResult, message_id: str | None, dry_run: bool,
    position: int, method: Basic.GetOk, properties: BasicProperties, body: bytes,
) -> bool:
    """Replay one dead letter into ``result``, or count it as parked; False (left alone) when it is not ``message_id``."""
    letter = describe(position, properties, body)
    if message_id is not None and letter.message_id != message_id:
        return False
    if letter.parked:
        result.parked.append(letter)
        return True
    if not dry_run:
        channel.basic_publish("", named.work_queue(), body, copy_properties(properties, replay_headers(properties)), mandatory=True)
        channel.basic_ack(method.delivery_tag)  # only after the broker confirmed the copy
    result.replayed.append(letter)
    return True


def replay_headers(properties: BasicProperties) -> dict[str, Any]:
    """The headers of a replayed copy: first failure kept, reason moved aside, replays counted, retries reset."""
    headers = dict(properties.headers or {})
    headers[REPLAY_COUNT] = int(headers.get(REPLAY_COUNT, 0) or 0) + 1
    headers["x-replayed-at"] = datetime.now(timezone.utc).isoformat()
    headers["x-last-dead-letter-reason"] = headers.pop(REASON, None)
    headers[RETRY_COUNT] = 0
    headers.pop("x-delivery-count", None)
    return headers


def purge(settings: Settings, stage: str, message_id: str | None = None, parked_only: bool = False) -> int:
    """Remove dead letters for good: every one, every copy of ``message_id``, or the parked ones. Returns how many."""
    queue = _stage(settings, stage).dead_letter_queue()
    connection, channel = _open(settings, "dlq-purge")
    removed = 0
    try:
        total = _depth(channel, queue)
        if message_id is None and not parked_only:
            return int(channel.queue_purge(queue).method.message_count)
        for position, method, properties, body in _peek(channel, queue, total):
            letter = describe(position, properties, body)
            if (message_id is None or letter.message_id == message_id) and (not parked_only or letter.parked):
                channel.basic_ack(method.delivery_tag)
                removed += 1
        if message_id is not None and removed == 0:
            raise UnknownMessage(f"no {'parked ' if parked_only else ''}dead letter with message id {message_id!r} in {queue} ({total} messages)")
    finally:
        connection.close()
    return removed
