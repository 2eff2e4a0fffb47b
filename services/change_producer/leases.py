"""The change producer's mailbox leases: which enrolled mailboxes this replica reads (decision 91 in docs/decisions.md).

``MailboxLeases.take_part`` is one pass, run by the scheduler every third of the lease TTL: beat, renew what it holds,
read the leases, ask ``shared.domain.mailbox_leases.plan`` what to give back and what to take, do it with the store's
conditional statements, and return the mailboxes it holds. ``fence`` is called by every read just before it starts:
only the mailboxes the store still says are this replica's are read, each lease extended by a TTL, so a replica that
stalled past its expiry (and lost its mailboxes to another) does not read them at the same time as their new holder.
``leave`` gives everything back on a clean stop, so the others take over at their next pass instead of after a TTL.

A replica starting on a host where an earlier replica's process is gone (same boot, same pid namespace, its pid no
longer running: a crash and a restart by the supervisor) frees that replica's leases at once, so a single replica
restarted after a crash reads its mailboxes at once, as before leases existed.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable, Iterable

from shared.adapters.store import Store
from shared.domain.mailbox_leases import ReplicaBeat, claim, live_replicas, plan
from shared.domain.mailbox_reads import Backend, SyncPosition
from shared.logs import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class ProcessIdentity:
    """Where this process runs: enough for a successor on the same host to see that it is gone."""

    host: str
    process_key: str | None   # boot id and pid namespace; None where /proc does not say
    pid: int

    def has_gone(self, beat: ReplicaBeat) -> bool:
        """True only when ``beat``'s process provably no longer runs: same host, boot and pid namespace, and its pid
        is this process's own or runs nothing. Anything else (another host, another namespace) is not known."""
        if beat.host != self.host or self.process_key is None or beat.process_key != self.process_key or beat.pid is None:
            return False
        if beat.pid == self.pid:
            return True   # two processes cannot hold one pid in one namespace at once
        try:
            os.kill(beat.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # it runs, as another user
        return False


def this_process() -> ProcessIdentity:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
        key: str | None = f"{boot}:{namespace}"
    except OSError:
        key = None
    return ProcessIdentity(socket.gethostname(), key, os.getpid())


class MailboxLeases:
    """One replica's leases; ``take_part`` from the scheduler thread, ``fence`` from any read thread."""

    def __init__(self, store: Store, replica: str, ttl: timedelta, clock: Callable[[], datetime], identity: ProcessIdentity | None = None) -> None:
        self.store = store
        self.me = replica
        self.ttl = ttl
        self.clock = clock
        self.identity = identity or this_process()
        self.incarnation = uuid.uuid4().hex
        self.started_at = clock()
        self.lock = threading.Lock()
        self.held: set[str] = set()   # under ``lock``
        self.fenced: dict[str, int] = {}   # mailbox -> the lease epoch its last fence found, under ``lock``
        self.live = 1
        self.share = 0
        self.in_use = False           # another live process beats under this replica id
        self.first = True

    def take_part(self, enrolled: Iterable[str], reading: Iterable[str]) -> set[str]:
        """One pass (see the module docstring); returns the mailboxes this replica holds now."""
        now = self.clock()
        expires = now + self.ttl
        beats = self.store.replica_beats()
        own = next((beat for beat in beats if beat.replica == self.me), None)
        outcome = claim(own, self.incarnation, now, own is not None and self.identity.has_gone(own))
        beat = ReplicaBeat(self.me, self.incarnation, expires, self.identity.host, self.identity.process_key, self.identity.pid)
        if outcome == "in_use" or not self.store.beat_replica(beat, self.started_at, own.incarnation if outcome == "take" and own else None):
            if not self.in_use:
                log.error("replica_id_in_use", replica=self.me, other_host=own.host if own else None, other_pid=own.pid if own else None,
                          detail="another live process uses this replica id; give each replica its own PLANNERSYNC_EXCHANGE__REPLICA_ID")
            self.in_use = True
            with self.lock:
                self.held = set()
            return set()
        self.in_use = False
        gone = [b for b in beats if b.replica != self.me and self.identity.has_gone(b)] if self.first else []
        for predecessor in gone:   # a crashed replica on this host: its mailboxes are free now, not after a TTL
            freed = self.store.release_leases(predecessor.replica, None, now)
            self.store.forget_replica(predecessor.replica, predecessor.incarnation)
            log.info("replica_gone_leases_freed", previous=predecessor.replica, leases=freed)
        self.first = False
        self.store.renew_leases(self.me, expires)
        leases = self.store.leases()
        gone_ids = {b.replica for b in gone}
        live = live_replicas(self.me, now, [lease for lease in leases if lease.owner not in gone_ids], [b for b in beats if b.replica not in gone_ids])
        wanted = {address.lower() for address in enrolled}
        decided = plan(self.me, now, self.ttl, wanted, leases, live, {address.lower() for address in reading})
        if decided.release:
            self.store.release_leases(self.me, decided.release, now)
        rows = {lease.mailbox: lease for lease in leases}
        acquired = self.store.acquire_leases(decided.acquire, self.me, expires, now) if decided.acquire else {}
        # a lease taken while its holder still owned it had expired: that replica died or stalled
        taken_from = {lease.owner for mailbox in acquired if (lease := rows.get(mailbox)) is not None and lease.owner not in (None, self.me)}
        with self.lock:
            before = self.held
            self.held = set(decided.keep) | set(acquired)
            held = set(self.held)
        if held != before or decided.live != self.live:
            log.info("leases_changed", replica=self.me, held=len(held), acquired=len(acquired), released=len(decided.release),
                     lost=len(before - held - set(decided.release)), live_replicas=decided.live, share=decided.share,
                     taken_over_from=sorted(taken_from) or None)
        self.live, self.share = decided.live, decided.share
        return held

    def fence(self, mailboxes: list[str]) -> dict[str, SyncPosition | None]:
        """Of ``mailboxes``, the ones this replica still holds in the store (each extended by a TTL): read only those,
        each from the sync position the fence read with it (decision 109). The epoch of each lease is kept for the
        read's save (``epoch_read_under``)."""
        if self.in_use:
            return {}
        held = self.store.hold_leases(self.me, mailboxes, self.clock() + self.ttl)
        lost = {address.lower() for address in mailboxes} - set(held)
        with self.lock:
            self.fenced.update({address: lease.epoch for address, lease in held.items()})
        if lost:
            self.lost(lost, "held by another replica now (this one stalled past its lease)")
        return {address: held[address.lower()].position for address in mailboxes if address.lower() in held}

    def epoch_read_under(self, mailbox: str) -> int | None:
        """The epoch of the lease the last fence of ``mailbox`` found (a mailbox is read by one thread at a time)."""
        with self.lock:
            return self.fenced.get(mailbox.lower())

    def lost(self, mailboxes: Iterable[str], detail: str) -> None:
        gone = {address.lower() for address in mailboxes}
        with self.lock:
            self.held -= gone
            for address in gone:
                self.fenced.pop(address, None)
        log.warning("lease_lost", replica=self.me, mailboxes=len(gone), detail=detail)

    def holding(self) -> set[str]:
        with self.lock:
            return set(self.held)

    def leave(self, reading: Iterable[str] = ()) -> None:
        """A clean stop: every lease not being read is given back and the heartbeat goes, so the other replicas take
        the mailboxes at their next pass. Leases of reads still running (a wedged read) expire on their own."""
        busy = {address.lower() for address in reading}
        now = self.clock()
        if self.in_use:
            return
        with self.lock:
            mine = sorted(self.held - busy)
            self.held &= busy
        if busy:
            self.store.release_leases(self.me, mine, now)
        else:
            self.store.release_leases(self.me, None, now)
            self.store.forget_replica(self.me, self.incarnation)
        log.info("leases_released", replica=self.me, released=len(mine), still_reading=len(busy))


class LeaseLost(Exception):
    """A read's sync state was not saved: another replica took the mailbox's lease while it ran."""


class LeasedPositions:
    """The store's sync positions as a fenced read sees them: a state is saved only while this replica holds the lease
    its read began under (decision 102 in docs/decisions.md), else ``LeaseLost`` is raised and nothing is saved; the
    messages already published are harmless (older than what the new holder reads, decision 95)."""

    def __init__(self, store: Store, leases: MailboxLeases) -> None:
        self.store = store
        self.leases = leases

    def sync_position(self, mailbox: str) -> SyncPosition | None:
        return self.store.sync_position(mailbox)

    def save_sync_position(self, mailbox: str, sync_state: str, read_at: datetime, full: bool, backend: Backend = "ews") -> None:
        epoch = self.leases.epoch_read_under(mailbox)
        if epoch is None or not self.store.save_sync_position(mailbox, sync_state, read_at, full, backend, lease=(self.leases.me, epoch)):
            raise LeaseLost(mailbox)
