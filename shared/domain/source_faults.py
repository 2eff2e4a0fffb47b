"""What a failed read of one mailbox means, whatever the source (EWS today): the fault kinds the schedule acts on.

The adapter that talks to a calendar source classifies its own exceptions into a ``SourceFault``; the pure
read schedule (``read_schedule``) decides from the kind how long that mailbox waits. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FaultKind = Literal["throttled", "invalid_sync_state", "subscription_lost", "mailbox_unavailable", "stream_broken", "transient"]


@dataclass(frozen=True)
class SourceFault:
    """One classified failure: its kind, a content-free detail, and the wait the source asked for (seconds)."""

    kind: FaultKind
    detail: str
    back_off: float | None = None
