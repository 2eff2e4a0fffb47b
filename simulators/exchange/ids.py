"""Opaque EWS ids: item, occurrence, folder, subscription and watermark ids are base64 of a small tuple.

They look like Exchange's (long base64 strings) and carry the mailbox, so an id from Alice's mailbox is
simply not found while impersonating Bob.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime

_STAMP = "%Y%m%dT%H%M%SZ"


class BadId(ValueError):
    """An id this simulator did not hand out."""


def _encode(*parts: str) -> str:
    return base64.b64encode("\x1f".join(("SIM",) + parts).encode()).decode()


def _decode(value: str) -> list[str]:
    try:
        parts = base64.b64decode(value.encode(), validate=True).decode().split("\x1f")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise BadId(value) from exc
    if not parts or parts[0] != "SIM":
        raise BadId(value)
    return parts[1:]


@dataclass(frozen=True)
class ItemRef:
    """What an item id points at: an item by key, or one occurrence of it by original start."""

    mailbox: str
    key: int
    original_start: datetime | None = None


def item_id(mailbox: str, key: int) -> str:
    return _encode("I", mailbox, str(key))


def occurrence_id(mailbox: str, key: int, original_start: datetime) -> str:
    return _encode("O", mailbox, str(key), original_start.astimezone(UTC).strftime(_STAMP))


def parse_item_id(value: str) -> ItemRef:
    parts = _decode(value)
    try:
        if parts[0] == "I" and len(parts) == 3:
            return ItemRef(parts[1], int(parts[2]))
        if parts[0] == "O" and len(parts) == 4:
            original = datetime.strptime(parts[3], _STAMP).replace(tzinfo=UTC)
            return ItemRef(parts[1], int(parts[2]), original)
    except ValueError as exc:
        raise BadId(value) from exc
    raise BadId(value)


def change_key(version: int) -> str:
    return base64.b64encode(f"CK{version:012d}".encode()).decode()


def folder_id(mailbox: str, folder: str) -> str:
    return _encode("F", mailbox, folder)


def parse_folder_id(value: str) -> tuple[str, str]:
    parts = _decode(value)
    if parts[0] != "F" or len(parts) != 3:
        raise BadId(value)
    return parts[1], parts[2]


def watermark(subscription: str, seq: int) -> str:
    return _encode("W", subscription, str(seq))


def parse_watermark(value: str) -> tuple[str, int]:
    parts = _decode(value)
    if parts[0] != "W" or len(parts) != 3:
        raise BadId(value)
    try:
        return parts[1], int(parts[2])
    except ValueError as exc:
        raise BadId(value) from exc
