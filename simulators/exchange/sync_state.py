"""SyncFolderItems: opaque sync states and the change list between a state and the folder's contents.

A sync state is the client's view of the folder ({item key: version}) compressed and base64-encoded, so it
survives client restarts (and even simulator restarts) and needs no server-side bookkeeping. Real Exchange
states are also opaque blobs that grow with the folder.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from dataclasses import dataclass

from .model import Item


class InvalidSyncState(ValueError):
    """A state this mailbox/folder did not hand out (answered with ErrorInvalidSyncStateData)."""


@dataclass(frozen=True)
class SyncChange:
    kind: str  # Create, Update, Delete
    key: int
    item: Item | None  # None for Delete


def encode(mailbox: str, folder: str, known: dict[int, int], epoch: int = 0) -> str:
    raw = json.dumps({"v": 1, "mb": mailbox, "f": folder, "e": epoch, "k": known}, separators=(",", ":")).encode()
    return base64.b64encode(zlib.compress(raw, 6)).decode()


def decode(state: str | None, mailbox: str, folder: str, epoch: int = 0) -> dict[int, int]:
    if not state:
        return {}
    try:
        data = json.loads(zlib.decompress(base64.b64decode(state.encode(), validate=True)))
        if data.get("v") != 1 or data.get("mb") != mailbox or data.get("f") != folder:
            raise InvalidSyncState("state belongs to another mailbox or folder")
        if data.get("e", 0) != epoch:
            raise InvalidSyncState("state was handed out before the mailbox's sync states were invalidated")
        return {int(k): int(v) for k, v in data["k"].items()}
    except (binascii.Error, zlib.error, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidSyncState(str(exc)) from exc


def changes(known: dict[int, int], items: list[Item], limit: int) -> tuple[list[SyncChange], dict[int, int], bool]:
    """Up to ``limit`` changes (oldest first), the client's view after them, and whether that is all."""
    current = {item.key: item for item in items}
    pending: list[tuple[int, SyncChange]] = []
    for key, item in current.items():
        if key not in known:
            pending.append((item.version, SyncChange("Create", key, item)))
        elif known[key] != item.version:
            pending.append((item.version, SyncChange("Update", key, item)))
    for key, version in known.items():
        if key not in current:
            pending.append((version, SyncChange("Delete", key, None)))
    pending.sort(key=lambda pair: (pair[0], pair[1].key))
    page = [change for _version, change in pending[:limit]]
    after = dict(known)
    for change in page:
        if change.kind == "Delete":
            after.pop(change.key, None)
        else:
            assert change.item is not None
            after[change.key] = change.item.version
    return page, after, len(pending) <= limit
