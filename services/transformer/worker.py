"""The transformer: calendar changes and snapshots in, busy-time desired states out.

Gather (what was last decided for the mailbox, which parts of a snapshot are recorded), decide
(``shared.domain.transform_core``, pure: ``finish_snapshot_part`` says whether a part completes its
snapshot), apply (publish the states that change something, then remember every decision, then ack: done
by ``shared.broker.consume_loop``). Snapshot parts are remembered in the same transaction as their keys, so
a snapshot counts as complete only when every part's effects are stored.

Reads (decision 97): for a batch of changes only, the rows its changes can touch (``transform_core.reads_for``); a
mailbox with a snapshot part in the batch is read whole.

Replicas (decision 89 in docs/decisions.md): a batch first claims its mailboxes, and decides only for the ones it got,
reading what was decided for them after the claim; the others' messages are deferred (``Defer``: a moment later, in
a later batch). The record step of a mailbox's last message releases the claim in its own transaction, so no other
replica decides for a mailbox between a decision and its record.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Callable, Sequence

from shared.adapters.claims import Claims, replica_owner
from shared.adapters.store import WHOLE_MAILBOX, DesiredWrite, Store, open_store
from shared.broker.consume_loop import Consumer, ConsumerOptions, Defer, Done, Inbound, Result, Together
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
    reads_for,
)
from shared.logs import correlation, get_logger

log = get_logger(__name__)
STAGE = "transformer"
# How long a claim on a mailbox lasts: from the claim to the record step (a batch's decisions, its publishes and their
# confirms, its writes), normally well under a second; a replica that died holding one blocks it this long (decision 89).
CLAIM_TTL = timedelta(seconds=60)


@dataclass
class TransformerDeps:
    """What the transformer's handler needs: the store, where to publish, the busy policy and the clock."""

    store: Store
    topology: Topology
    policy: BusyPolicy
    clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)
    claims: Claims | None = None  # None: made from the store at the first batch

    def mailbox_claims(self) -> Claims:
        if self.claims is None:
            self.claims = Claims(self.store, STAGE, CLAIM_TTL)
        return self.claims


def handle(batch: Sequence[Inbound], deps: TransformerDeps) -> list[Result]:
    """Transform a batch; each message's decision sees the decisions of earlier messages in the batch."""
    claims = deps.mailbox_claims()
    wanted = {m.message.mailbox.lower() for m in batch if isinstance(m.message, (CalendarChange, CalendarSnapshot))}
    claimed = {mailbox for mailbox, _ in claims.take((mailbox, WHOLE_MAILBOX) for mailbox in wanted)}
    # what was last decided for every mailbox claimed, as far as its messages need it: one read for the batch, after
    # the claim (decisions 78, 89 and 97)
    mine: dict[str, list[CalendarChange | CalendarSnapshot]] = {mailbox: [] for mailbox in claimed}
    for m in batch:
        if isinstance(m.message, (CalendarChange, CalendarSnapshot)) and m.message.mailbox.lower() in mine:
            mine[m.message.mailbox.lower()].append(m.message)
    overlay = deps.store.desired_for({mailbox: reads_for(messages, deps.policy) for mailbox, messages in mine.items()})
    progress: dict[str, tuple[set[int], int | None]] = {}  # snapshot id -> parts recorded or handled in this batch, total
    results: list[Result] = []
    writes: dict[int, tuple[Decision, DesiredWrite]] = {}  # by position: built once the batch's last write per mailbox is known
    now = deps.clock()
    for inbound in batch:
        message = inbound.message
        with correlation(message.correlation_id, mailbox=getattr(message, "mailbox", "")):
            if not isinstance(message, (CalendarChange, CalendarSnapshot)):
                results.append(Permanent(f"transformer takes calendar messages, not {message.type}"))
                continue
            mailbox = message.mailbox.lower()
            if mailbox not in claimed:
                results.append(Defer("another transformer is deciding for this mailbox"))
                continue
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
            writes[len(results)] = (decision, DesiredWrite(mailbox, list(decision.remember), message.correlation_id, snapshot_part))
            results.append(Done())
            log.info("calendar_transformed", kind=message.type, emitted=len(decision.emit), remembered=len(decision.remember), rejected=len(decision.rejected))
    last = {write.mailbox: index for index, (_, write) in writes.items()}  # positions ascend: the last write of each mailbox
    if claimed - set(last):  # mailboxes whose messages were all refused: nothing to record, free them now
        deps.store.release_claims(STAGE, claims.owner, [(mailbox, WHOLE_MAILBOX) for mailbox in claimed - set(last)])
    for index, (decision, write) in writes.items():
        if last[write.mailbox] == index:
            write = replace(write, release=claims.release_with())  # once recorded, the mailbox is free for other replicas
        results[index] = _apply(decision, write, deps)
    return results


def _apply(decision: Decision, write: DesiredWrite, deps: TransformerDeps) -> Done:
    publish = [Outgoing(deps.topology.busy_exchange, deps.topology.busy_key(write.mailbox), state) for state in decision.emit]
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
    claims = Claims(store, STAGE, CLAIM_TTL, owner=replica_owner(settings.status.health_dir, STAGE))
    deps = TransformerDeps(store, topology, policy, claims=claims)
    # a backlog is read, confirmed and acked 500 at a time (decision 78)
    # a message of a mailbox another replica holds waits locally, past a claim left by a replica that died (decision 90)
    options = ConsumerOptions(prefetch=1000, batch_size=500, decoder=lambda body: decode_calendar(body, policy), defer_budget=2 * CLAIM_TTL)
    return Consumer(settings.broker, topology, topology.stage("transformer"), lambda batch: handle(batch, deps), options)
