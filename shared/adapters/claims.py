"""One worker process's claims on keys, so that N replicas never work on the same key at once (decision 89 in
docs/decisions.md).

A handler takes the claims of its batch's keys before it reads what the store knows about them, works only on the
keys it got, and the store releases them in the transaction that records the work. A claim lasts ``ttl``: a replica
that dies holding one blocks that key for at most that long. Before an outside call that can last up to
``call_budget``, ``ready_for_call`` makes sure the claims outlast the call's end by ``margin``, renewing them all in one
statement when they would not, and says when one was lost meanwhile (taken back by another replica after it
expired: the call must not go out).

The owner is the replica, not the process: ``replica_owner`` hands a restarted replica (after a crash or a SIGKILL)
the owner id its previous process had, so its first batch takes back that process's leftover claims at once, as one
replica always could; only another replica waits for them to expire.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import IO, Iterable

from shared.adapters.store import ClaimKey, Store
from shared.health import hold_slot

MAX_REPLICAS_PER_HOST = 32


def replica_owner(directory: Path, stage: str) -> tuple[str, IO[str] | None]:
    """This replica's owner id, and the open slot file that keeps it (keep it open while the process lives).

    Slot files ``<stage>.replica-<n>.lock`` in ``directory`` (the health directory) each hold an owner id, made
    of the host name and a random part when the slot is first used. A process takes the first slot no live process
    holds (``flock``: the kernel lets go of it when the process dies, however it dies), so two replicas on one host
    never share an id and a restarted one gets its predecessor's. Without a usable directory: a random id.
    """
    try:
        held = hold_slot(directory, f"{stage}.replica", 1, MAX_REPLICAS_PER_HOST)
        if held is not None:
            _slot, handle = held
            handle.seek(0)
            owner = handle.read().strip()[:64]
            if not owner:
                owner = f"{socket.gethostname()[:40]}-{uuid.uuid4().hex[:16]}"
                handle.write(owner)
                handle.flush()
                os.fsync(handle.fileno())
            return owner, handle
    except OSError:
        pass
    return uuid.uuid4().hex, None


class Claims:
    """The claims of one stage in one process; one batch at a time (the consume loop runs one handler at a time)."""

    def __init__(
        self, store: Store, stage: str, ttl: timedelta, call_budget: timedelta = timedelta(0), margin: timedelta = timedelta(seconds=30),
        owner: tuple[str, IO[str] | None] | None = None,
    ) -> None:
        if ttl <= call_budget + margin:
            raise ValueError("a claim must outlast an outside call and the margin after it")
        self.store = store
        self.stage = stage
        self.ttl = ttl
        self.call_budget = call_budget
        self.margin = margin
        # ``replica_owner``'s: a restarted replica is the same owner; without one, this process alone
        self.owner, self._slot = owner if owner is not None else (uuid.uuid4().hex, None)
        self._lock = threading.Lock()
        self._held = 0
        self._lost = False  # one of this batch's claims was lost: no more outside calls in this batch
        self._until = 0.0  # time.monotonic() before which every claim taken or renewed is surely still ours

    def take(self, keys: Iterable[ClaimKey]) -> set[ClaimKey]:
        """Claim ``keys`` (this owner's claims left from an earlier batch are released first); the keys claimed."""
        began = time.monotonic()
        claimed = self.store.claim(self.stage, self.owner, keys, self.ttl)
        with self._lock:
            self._held, self._lost, self._until = len(claimed), False, began + self.ttl.total_seconds()
        return claimed

    def release_with(self) -> tuple[str, str]:
        """What the store's record step takes to release this owner's claims in its own transaction."""
        return (self.stage, self.owner)

    def ready_for_call(self) -> bool:
        """Whether an outside call may go out now: the claims last past its longest end plus the margin (renewed in one
        statement when they would not); False when one of them was lost."""
        needed = (self.call_budget + self.margin).total_seconds()
        with self._lock:
            began = time.monotonic()
            if self._lost or began + needed <= self._until:
                return not self._lost
            held = self.store.renew_claims(self.stage, self.owner, self.ttl)
            self._until = began + self.ttl.total_seconds()
            self._lost = held < self._held
            return not self._lost
