"""Opaque Graph event ids: URL-safe base64 of the mailbox, the item key and (for an instance) its original start.

They look like Graph's (long base64 strings ending in ``=``) and carry their mailbox, so Alice's id is not found
in Bob's calendar.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime

_STAMP = "%Y%m%dT%H%M%SZ"
_PREFIX = "AAMkGSIM"


class BadId(ValueError):
    """An id this simulator did not hand out."""


@dataclass(frozen=True)
class EventRef:
    """What an event id points at: a single or series master by key, or one instance of a series."""

    mailbox: str
    key: int
    original_start: datetime | None = None


def _encode(*parts: str) -> str:
    return _PREFIX + base64.urlsafe_b64encode("\x1f".join(parts).encode()).decode()


def event_id(mailbox: str, key: int) -> str:
    return _encode("E", mailbox, str(key))


def instance_id(mailbox: str, key: int, original_start: datetime) -> str:
    return _encode("I", mailbox, str(key), original_start.astimezone(UTC).strftime(_STAMP))


def parse(value: str) -> EventRef:
    if not value.startswith(_PREFIX):
        raise BadId(value)
    try:
        parts = base64.urlsafe_b64decode(value[len(_PREFIX):].encode()).decode().split("\x1f")
        if parts[0] == "E" and len(parts) == 3:
            return EventRef(parts[1], int(parts[2]))
        if parts[0] == "I" and len(parts) == 4:
            return EventRef(parts[1], int(parts[2]), datetime.strptime(parts[3], _STAMP).replace(tzinfo=UTC))
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise BadId(value) from exc
    raise BadId(value)


def change_key(version: int) -> str:
    return base64.b64encode(f"GCK{version:012d}".encode()).decode()
