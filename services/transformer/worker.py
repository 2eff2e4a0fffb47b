"""The transformer: calendar changes and snapshots in, busy-time desired states out.

Gather (what was last decided for the mailbox, which parts of a snapshot are recorded), decide
(``shared.domain.transform_core``, pure: ``finish_snapshot_part`` says whether a part completes its
snapshot), apply (publish the states that change something, then remember every decision, then ack: done
by ``shared.broker.consume_loop``). Snapshot parts are remembered in the same transaction as their keys, so
a snapshot counts as complete only when every part's effects are stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Sequence

from shared.adapters.store import DesiredWrite, Store, open_store
from shared.broker.consume_loop import Consumer, ConsumerOptions, Done, Inbound, Result, Together
from shared.broker.publishing import Outgoing
from shared.broker.topology import Topology, from_settings
from shared.config import Settings
from shared.domain.busy_rules import BusyPolicy, organizer_flag
from shared.domain.contracts import CalendarChange, CalendarSnapshot, Message, decode
from shared.domain.retry import Permanent
from shared.domain.transform_core import (
    Decision,
    derive_change,
    derive_snapshot_part,
    finish_snapshot_part,
)
from shared.logs import correlation, get_logger

log = get_logger(__name__)


@dataclass
class TransformerDeps:
    """What the transformer's handler needs: the store, where to publish, the busy policy and the clock."""

    store: Store
    topology: Topology
    policy: BusyPolicy
    clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)


def handle(batch: Sequence[Inbound], deps: TransformerDeps) -> list[Result]:
    """Transform a batch; each message's decision sees the decisions of earlier messages in the batch."""
    # what was last decided for every mailbox of the batch: one read for the batch, not one per mailbox (decision 78)
    overlay = deps.store.desired_many({m.message.mailbox for m in batch if isinstance(m.message, (CalendarChange, CalendarSnapshot))})
    progress: dict[str, tuple[set[int], int | None]] = {}  # snapshot id -> parts recorded or handled in this batch, total
    results: list[Result] = []
    now = deps.clock()
    for inbound in batch:
        message = inbound.message
        with correlation(message.correlation_id, mailbox=getattr(message, "mailbox", "")):
            if not isinstance(message, (CalendarChange, CalendarSnapshot)):
                results.append(Permanent(f"transformer takes calendar messages, not {message.type}"))
                continue
            mailbox = message.mailbox.lower()
            known = overlay[mailbox]
            snapshot_part = None
            if isinstance(message, CalendarChange):
                decision = derive_change(message, known, deps.policy, now)
                if decision.rejected and not decision.emit and not decision.remember and message.change == "upsert":
                    results.append(Permanent(f"item rejected: {decision.rejected[0][1]}"))
                    continue
            else:
                if message.snapshot_id not in progress:   # nothing of this batch is stored before it is settled
                    progress[message.snapshot_id] = deps.store.snapshot_progress(message.snapshot_id)
                parts, total = progress[message.snapshot_id]
                decision = derive_snapshot_part(message, known, deps.policy, now)
                decision = finish_snapshot_part(message, decision, known, parts, total)
                progress[message.snapshot_id] = (parts | {message.part}, total if total is not None else message.total_parts)
                snapshot_part = (message.snapshot_id, message.part, message.total_parts)
                if decision.completed_snapshot is not None:
                    log.info("snapshot_complete", snapshot_id=message.snapshot_id, part=message.part, emitted=len(decision.emit))
            for item_id, reason in decision.rejected:
                log.warning("item_rejected", item_id=item_id[-24:], reason=reason)
            for state in decision.remember:
                known[state.origin_id] = state
            results.append(_apply(mailbox, message.correlation_id, decision, snapshot_part, deps))
            log.info("calendar_transformed", kind=message.type, emitted=len(decision.emit), remembered=len(decision.remember), rejected=len(decision.rejected))
    return results


def _apply(mailbox: str, correlation_id: str, decision: Decision, snapshot_part: tuple[str, int, int | None] | None, deps: TransformerDeps) -> Done:
    publish = [Outgoing(deps.topology.busy_exchange, deps.topology.busy_key(mailbox), state) for state in decision.emit]
    write = DesiredWrite(mailbox, list(decision.remember), correlation_id, snapshot_part)
    return Done(publish=publish, record=Together(deps.store.save_desired_many, write))  # the batch's writes in one transaction


def decode_calendar(body: bytes, policy: BusyPolicy) -> Message:
    """``contracts.decode``; a version-1 message (queued or dead-lettered before the upgrade) has its organizer
    addresses turned into ``organizer_is_planner`` with the policy's addresses (decision 71 in docs/decisions.md)."""
    return decode(body, lambda address: organizer_flag(address, policy.planner_organizers) is True)


def build(settings: Settings) -> Consumer:
    """Wire the transformer: store, policy, consumer. Nothing connects at import."""
    store = open_store(settings.database_url(), settings.database.auto_upgrade)
    topology = from_settings(settings.broker, settings.retry)
    policy = settings.busy.policy()
    deps = TransformerDeps(store, topology, policy)
    # a backlog is read, confirmed and acked 500 at a time (decision 78)
    options = ConsumerOptions(prefetch=1000, batch_size=500, decoder=lambda body: decode_calendar(body, policy))
    return Consumer(settings.broker, topology, topology.stage("transformer"), lambda batch: handle(batch, deps), options)
