"""One worker process's claims on keys, so that N replicas never work on the same key at once (decision 89 in
docs/decisions.md).

A handler takes the claims of its batch's keys before it reads what the store knows about them, works only on the
keys it got, and the store releases them in the transaction that records the work. A claim lasts ``ttl``: a replica
that dies holding one blocks that key for at most that long. Before an outside call that can last up to
``call_budget``, ``ready_for_call`` makes sure the claims outlast the call's end by ``margin``, renewing them all in one
statement when they would not, and says when one was lost meanwhile (taken back by another replica after it
expired: the call must not go out).
"""

from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta
from typing import Iterable

from shared.adapters.store import ClaimKey, Store


class Claims:
    """The claims of one stage in one process; one batch at a time (the consume loop runs one handler at a time)."""

    def __init__(self, store: Store, stage: str, ttl: timedelta, call_budget: timedelta = timedelta(0), margin: timedelta = timedelta(seconds=30)) -> None:
        if ttl <= call_budget + margin:
            raise ValueError("a claim must outlast an outside call and the margin after it")
        self.store = store
        self.stage = stage
        self.ttl = ttl
        self.call_budget = call_budget
        self.margin = margin
        self.owner = uuid.uuid4().hex  # this process, this start: a restarted replica is another owner
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
