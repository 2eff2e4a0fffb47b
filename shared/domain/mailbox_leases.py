"""Which mailboxes a change-producer replica reads: a lease per mailbox in the state store (decision 91 in
docs/decisions.md). Pure: the caller passes the time, what the store holds, and which reads are under way.

Every replica, on each pass, counts the live replicas (a heartbeat or a lease not yet expired), takes its fair share
of the enrolled mailboxes (``ceil(enrolled / live)``), gives back what it holds above that share while some live
replica holds less (never a mailbox it is reading), and takes free mailboxes (never leased, released, or expired:
its holder stopped renewing) up to its share. A mailbox left free for longer than a lease TTL is taken by anyone,
share or not, so a miscounted replica can never leave a mailbox unread. Each replica prefers the mailboxes that rank
highest for it (rendezvous hashing): replicas taking at the same moment mostly want different mailboxes, and a
mailbox tends to go back to the replica that read it before.

The store makes each step one conditional statement (``Store.acquire_lease``, ``renew_leases``, ``hold_leases``,
``release_leases``), so two replicas deciding at once cannot both hold a mailbox; this module only decides what to try.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Iterable, Literal

from shared.domain.mailbox_reads import SyncPosition


@dataclass(frozen=True)
class Lease:
    """One mailbox's lease row: its holder (None: released) until ``expires_at``; ``epoch`` counts its acquisitions."""

    mailbox: str
    owner: str | None
    expires_at: datetime
    epoch: int = 0

    def held_at(self, now: datetime) -> bool:
        return self.owner is not None and self.expires_at > now


@dataclass(frozen=True)
class HeldLease:
    """What the fence before a read found of a mailbox this replica still holds: the lease's epoch (the read's state is
    saved only under it, decision 102) and the sync position the read goes on from, read under the fence (decision 109)."""

    epoch: int
    position: SyncPosition | None


@dataclass(frozen=True)
class ReplicaBeat:
    """A replica's heartbeat row: alive until ``expires_at``. ``incarnation`` tells one process from its successor
    under the same id; ``host``, ``process_key`` and ``pid`` let a successor on the same host see it is gone."""

    replica: str
    incarnation: str
    expires_at: datetime
    host: str | None = None
    process_key: str | None = None
    pid: int | None = None


@dataclass(frozen=True)
class LeasePlan:
    """What one pass does: ``release`` and then ``acquire`` (in this order of preference); ``keep`` stays held."""

    keep: frozenset[str]
    release: tuple[str, ...]
    acquire: tuple[str, ...]
    share: int
    live: int


def live_replicas(me: str, now: datetime, leases: Iterable[Lease], beats: Iterable[ReplicaBeat]) -> frozenset[str]:
    """The replicas alive now: ``me``, every unexpired heartbeat, and every holder of an unexpired lease."""
    alive = {me}
    alive.update(beat.replica for beat in beats if beat.expires_at > now)
    alive.update(lease.owner for lease in leases if lease.owner is not None and lease.held_at(now))
    return frozenset(alive)


def fair_share(enrolled: int, live: int) -> int:
    """The most mailboxes one replica should hold: ``ceil(enrolled / live)`` (every mailbox fits, none is crowded)."""
    return math.ceil(enrolled / max(1, live))


def rank(replica: str, mailbox: str) -> int:
    """How much ``replica`` wants ``mailbox`` (rendezvous hashing): the same for every replica that computes it."""
    return int.from_bytes(hashlib.sha256(f"{replica}\n{mailbox}".encode()).digest()[:8], "big")


def plan(me: str, now: datetime, ttl: timedelta, enrolled: Iterable[str], leases: Iterable[Lease], live: frozenset[str],
         reading: Iterable[str] = ()) -> LeasePlan:
    """One replica's pass over the leases (``leases`` as read after renewing its own).

    ``reading``: the mailboxes whose read is under way or queued here; never released. A lease held by ``me`` of a
    mailbox no longer enrolled is released (when not being read)."""
    wanted = set(enrolled)
    rows = {lease.mailbox: lease for lease in leases}
    busy = set(reading)
    mine = {m for m, lease in rows.items() if lease.owner == me and lease.held_at(now)}
    share = fair_share(len(wanted), len(live))
    counts: dict[str, int] = {}
    for lease in rows.values():
        if lease.owner is not None and lease.held_at(now) and lease.mailbox in wanted:
            counts[lease.owner] = counts.get(lease.owner, 0) + 1
    someone_short = any(counts.get(replica, 0) < share for replica in live if replica != me)
    release = sorted(m for m in mine - wanted if m not in busy)
    held = sorted(mine & wanted, key=lambda m: rank(me, m))   # lowest rank first: given back first
    surplus = len(held) - share
    if surplus > 0 and someone_short:
        release += [m for m in held if m not in busy][:surplus]
    keep = frozenset((mine & wanted) - set(release))
    free = sorted((m for m in wanted - mine if not (m in rows and rows[m].held_at(now))), key=lambda m: rank(me, m), reverse=True)
    room = max(0, share - len(keep))
    # beyond the share: a mailbox never leased, or left free for a whole TTL (no replica took it), so a miscounted
    # replica can leave none unread
    acquire = free[:room] + [m for m in free[room:] if m not in rows or rows[m].expires_at <= now - ttl]
    return LeasePlan(keep, tuple(release), tuple(acquire), share, len(live))


ClaimOutcome = Literal["mine", "take", "in_use"]


def claim(beat: ReplicaBeat | None, incarnation: str, now: datetime, gone: bool) -> ClaimOutcome:
    """Whether this process may beat as its replica id: the row is its own or absent ("mine"), left by a process that
    is gone or that stopped beating ("take"), or another live process uses the same id ("in_use": two processes
    under one id would read the same mailboxes, so this one holds nothing until that one stops)."""
    if beat is None or beat.incarnation == incarnation:
        return "mine"
    if gone or beat.expires_at <= now:
        return "take"
    return "in_use"
