"""The transformer: calendar changes and snapshots in, busy-time desired states out.

Gather (what was last decided for the mailbox), decide (``shared.domain.transform_core``, pure), apply
(publish the states that change something, then remember every decision, then ack: done by
``shared.broker.consume_loop``). Snapshot parts are remembered in the same transaction as their keys, so a
snapshot counts as complete only when every part's effects are stored.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Callable, Sequence

from shared.adapters.store import Store, open_store
from shared.broker.consume_loop import Consumer, ConsumerOptions, Done, Inbound, Result
from shared.broker.publishing import Outgoing
from shared.broker.topology import Topology, from_settings
from shared.config import Settings
from shared.domain.busy_rules import BusyPolicy
from shared.domain.contracts import CalendarChange, CalendarSnapshot
from shared.domain.retry import Permanent
from shared.domain.transform_core import (
    Decision,
    DesiredRecord,
    complete_snapshot,
    derive_change,
    derive_snapshot_part,
)
from shared.logs import correlation, get_logger

log = get_logger(__name__)


@dataclass
class TransformerDeps:
    store: Store
    topology: Topology
    policy: BusyPolicy
    clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)


def handle(batch: Sequence[Inbound], deps: TransformerDeps) -> list[Result]:
    """Transform a batch; each message's decision sees the decisions of earlier messages in the batch."""
    overlay: dict[str, dict[str, DesiredRecord]] = {}
    parts_seen: dict[str, set[int]] = {}
    results: list[Result] = []
    now = deps.clock()
    for inbound in batch:
        message = inbound.message
        with correlation(message.correlation_id, mailbox=getattr(message, "mailbox", None)):
            if not isinstance(message, (CalendarChange, CalendarSnapshot)):
                results.append(Permanent(f"transformer takes calendar messages, not {message.type}"))
                continue
            mailbox = message.mailbox.lower()
            if mailbox not in overlay:
                overlay[mailbox] = dict(deps.store.desired(mailbox))
            known = overlay[mailbox]
            snapshot_part = None
            if isinstance(message, CalendarChange):
                decision = derive_change(message, known, deps.policy, now)
                if decision.rejected and not decision.emit and not decision.remember and message.change == "upsert":
                    results.append(Permanent(f"item rejected: {decision.rejected[0][1]}"))
                    continue
            else:
                decision = derive_snapshot_part(message, known, deps.policy, now)
                snapshot_part = (message.snapshot_id, message.part, message.total_parts)
                decision = _maybe_complete(message, decision, known, deps, parts_seen)
            for item_id, reason in decision.rejected:
                log.warning("item_rejected", item_id=item_id[-24:], reason=reason)
            for state in decision.remember:
                known[state.origin_id] = state
            results.append(_apply(mailbox, message.correlation_id, decision, snapshot_part, deps))
            log.info("calendar_transformed", kind=message.type, emitted=len(decision.emit), remembered=len(decision.remember), rejected=len(decision.rejected))
    return results


def _maybe_complete(
    part: CalendarSnapshot, decision: Decision, known: dict[str, DesiredRecord], deps: TransformerDeps, parts_seen: dict[str, set[int]]
) -> Decision:
    recorded, total = deps.store.snapshot_progress(part.snapshot_id)
    seen = parts_seen.setdefault(part.snapshot_id, set()) | recorded | {part.part}
    parts_seen[part.snapshot_id] = seen
    total = part.total_parts or total
    if total is None or not seen >= set(range(1, total + 1)):
        return decision
    after_part = dict(known)
    for state in decision.remember:
        after_part[state.origin_id] = state
    closing = complete_snapshot(part.mailbox, part.snapshot_id, part.observed_at, part.window, after_part, part.correlation_id)
    log.info("snapshot_complete", snapshot_id=part.snapshot_id, parts=total, absent=len(closing.emit))
    merged_remember = {k.origin_id: k for k in decision.remember}
    merged_remember.update({k.origin_id: k for k in closing.remember})
    return replace(decision, emit=[*decision.emit, *closing.emit], remember=list(merged_remember.values()))


def _apply(mailbox: str, correlation_id: str, decision: Decision, snapshot_part: tuple[str, int, int | None] | None, deps: TransformerDeps) -> Done:
    publish = [Outgoing(deps.topology.busy_exchange, deps.topology.busy_key(mailbox), state) for state in decision.emit]
    rows = list(decision.remember)

    def record() -> None:
        deps.store.save_desired(mailbox, rows, correlation_id, snapshot_part=snapshot_part)

    return Done(publish=publish, record=record)


def build(settings: Settings) -> Consumer:
    """Wire the transformer: store, policy, consumer. Nothing connects at import."""
    store = open_store(settings.database_url(), settings.database.auto_upgrade)
    topology = from_settings(settings.broker, settings.retry)
    deps = TransformerDeps(store, topology, settings.busy.policy())
    options = ConsumerOptions(prefetch=200, batch_size=100)
    return Consumer(settings.broker, topology, topology.stage("transformer"), lambda batch: handle(batch, deps), options, settings.status.health_dir)
