"""The message contracts: the only place a message's shape is defined.

Three messages travel the pipeline, each JSON with a ``type`` and a ``schema_version``:

- ``CalendarChange``: one item of one mailbox changed or disappeared (change-event producer).
- ``CalendarSnapshot``: one numbered part of everything in one mailbox's sync window at one moment
  (nightly producer); the part with ``final=True`` says how many parts there are.
- ``BusyTimeState``: what Planner should hold for one event key (mailbox + OriginSystemIdentifier):
  a busy interval, or absent, with a version that orders states of the same key.

By design none of them has a field for subject, body, location, attendees or categories
(decision 1 in docs/decisions.md); ``extra="forbid"`` makes a producer that tries to add one fail loudly.
The JSON Schemas in ``docs/contracts/`` are generated from these models (``plannersync contracts export``).

``decode`` has limits and strict types (decision 55 in docs/decisions.md): a body above ``MAX_BODY_BYTES``, JSON
nested deeper than ``MAX_DEPTH``, an integer outside 64 bits or NaN/Infinity is a ``MalformedMessage``; a
``schema_version`` must be exactly one of the known integers (``true`` is not), and fields are validated strictly
(no string to number, no number to boolean).

No organizer address travels (decision 71 in docs/decisions.md): a ``CalendarItem`` carries only
``organizer_is_planner``, worked out by the adapter that read it. Calendar messages are therefore at schema
version 2; a version-1 change or snapshot (its items carried ``organizer``, the address) still decodes: ``decode``
turns each address into the flag with the rule it is given, or into None (unknown) without one, and the
address goes no further than that call.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Annotated, Any, Callable, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

CALENDAR_SCHEMA_VERSION = 2  # calendar_change and calendar_snapshot; 1 carried the organizer's address (decision 71)
BUSY_SCHEMA_VERSION = 1      # busy_time_state
MAX_BODY_BYTES = 16 * 1024 * 1024  # RabbitMQ 4's default max message size; a snapshot part is far below it
MAX_DEPTH = 32  # the deepest message (a snapshot's items' times) is 4 levels
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1  # what every store column and every consumer can hold

FreeBusy = Literal["Free", "Tentative", "Busy", "OOF", "NoData", "WorkingElsewhere"]
ItemType = Literal["single", "occurrence", "exception", "master"]
Sensitivity = Literal["Normal", "Personal", "Private", "Confidential"]
Mailbox = Annotated[str, Field(min_length=3, max_length=254, pattern=r"^[^@\s]+@[^@\s]+$")]
OriginId = Annotated[str, Field(min_length=1, max_length=512)]
Source = Literal["ews", "graph", "ical", "demo"]


def _exactly_an_int(value: Any) -> Any:
    """``true`` equals 1 in Python; a schema version must really be the integer."""
    if type(value) is not int:
        raise ValueError(f"schema_version must be an integer, not {type(value).__name__}")
    return value


SchemaVersion1 = Annotated[Literal[1], BeforeValidator(_exactly_an_int)]
SchemaVersion2 = Annotated[Literal[2], BeforeValidator(_exactly_an_int)]
OrganizerRule = Callable[[str], bool]
"""Whether an organizer address is one of Planner's own (``busy_rules.organizer_rule``); used only at read time
and to upgrade version-1 messages."""


class UnknownSchemaVersion(ValueError):
    """A message whose type or schema_version this build does not know."""


class MalformedMessage(ValueError):
    """A body that is not a JSON object at all."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _utc(value: datetime) -> datetime:
    return value.astimezone(timezone.utc)


class Interval(_Model):
    """A busy interval, aware datetimes normalised to UTC; end after start."""

    start: AwareDatetime
    end: AwareDatetime

    @model_validator(mode="after")
    def _ordered(self) -> Interval:
        if self.end <= self.start:
            raise ValueError(f"end {self.end.isoformat()} is not after start {self.start.isoformat()}")
        object.__setattr__(self, "start", _utc(self.start))
        object.__setattr__(self, "end", _utc(self.end))
        return self


class CalendarItem(_Model):
    """Only what deciding busy time needs: times, status and identity. Never content."""

    item_id: str = Field(min_length=1, max_length=1024)
    change_key: str | None = Field(None, max_length=1024)
    uid: str | None = Field(None, max_length=480, description="iCalendar UID; None when Exchange gave none")
    item_type: ItemType = "single"
    start: AwareDatetime | None = None
    end: AwareDatetime | None = None
    original_start: AwareDatetime | None = Field(None, description="occurrences and exceptions: the start the series gave it")
    time_zone: str | None = Field(None, max_length=128, description="the item's Windows or IANA zone id")
    all_day: bool = False
    free_busy: FreeBusy | None = None
    cancelled: bool = False
    in_deleted_items: bool = False
    sensitivity: Sensitivity = "Normal"
    organizer_is_planner: bool | None = Field(
        None, description="the organizer is one of Planner's configured addresses; None when no organizer was read (decision 71)"
    )
    last_modified: AwareDatetime | None = None


class CalendarChange(_Model):
    """One item of one mailbox changed (``upsert``) or is gone (``delete``).

    For a recurring master, ``occurrences`` lists every occurrence and exception inside
    ``window`` as the producer expanded it, so occurrences that vanished can be noticed.
    ``observed_at`` (when the producer started the read that saw this) is the version.
    """

    type: Literal["calendar_change"] = "calendar_change"
    schema_version: SchemaVersion2 = 2
    correlation_id: str = Field(min_length=1, max_length=64)
    source: Source = "ews"
    mailbox: Mailbox
    observed_at: AwareDatetime
    change: Literal["upsert", "delete"]
    item_id: str = Field(min_length=1, max_length=1024)
    item: CalendarItem | None = None
    occurrences: list[CalendarItem] | None = None
    window: Interval | None = None

    @model_validator(mode="after")
    def _consistent(self) -> CalendarChange:
        if self.change == "upsert" and self.item is None:
            raise ValueError("an upsert carries the item")
        if self.change == "delete" and (self.item is not None or self.occurrences):
            raise ValueError("a delete carries only the item id")
        if self.occurrences is not None and self.window is None:
            raise ValueError("expanded occurrences need the window they were expanded over")
        return self


class CalendarSnapshot(_Model):
    """Part ``part`` of a snapshot; the part with ``final=True`` carries ``total_parts``.

    A snapshot is complete only when every part 1..total_parts has arrived. A producer that
    fails half way never sends the final part, so the snapshot never completes and never
    causes a deletion.
    """

    type: Literal["calendar_snapshot"] = "calendar_snapshot"
    schema_version: SchemaVersion2 = 2
    correlation_id: str = Field(min_length=1, max_length=64)
    source: Source = "ews"
    snapshot_id: str = Field(min_length=1, max_length=64)
    mailbox: Mailbox
    observed_at: AwareDatetime
    window: Interval
    part: int = Field(ge=1)
    final: bool = False
    total_parts: int | None = Field(None, ge=1)
    items: list[CalendarItem] = Field(default_factory=list)

    @model_validator(mode="after")
    def _parts(self) -> CalendarSnapshot:
        if self.final != (self.total_parts is not None):
            raise ValueError("total_parts is given exactly on the final part")
        if self.total_parts is not None and self.part != self.total_parts:
            raise ValueError("the final part is the last one")
        return self


class BusyTimeState(_Model):
    """What Planner should hold for one event key: ``interval`` busy, or ``None`` for absent."""

    type: Literal["busy_time_state"] = "busy_time_state"
    schema_version: SchemaVersion1 = 1
    correlation_id: str = Field(min_length=1, max_length=64)
    mailbox: Mailbox
    origin_id: OriginId
    version: int = Field(ge=0, description="microseconds since the epoch of the source observation")
    interval: Interval | None
    cause: Literal["change", "snapshot", "reconcile", "replay"] = "change"

    @property
    def key(self) -> tuple[str, str]:
        return (self.mailbox.lower(), self.origin_id)

    def message_id(self) -> str:
        """Deterministic: the same state published twice has the same id."""
        return stable_id("busy", self.mailbox.lower(), self.origin_id, str(self.version), self.interval.model_dump_json() if self.interval else "absent")


Message = CalendarChange | CalendarSnapshot | BusyTimeState
KNOWN_VERSIONS: dict[str, set[int]] = {"calendar_change": {1, 2}, "calendar_snapshot": {1, 2}, "busy_time_state": {1}}
CURRENT_VERSIONS: dict[str, int] = {
    "calendar_change": CALENDAR_SCHEMA_VERSION,
    "calendar_snapshot": CALENDAR_SCHEMA_VERSION,
    "busy_time_state": BUSY_SCHEMA_VERSION,
}
ALL_MODELS: dict[str, type[CalendarChange] | type[CalendarSnapshot] | type[BusyTimeState]] = {
    "calendar_change": CalendarChange,
    "calendar_snapshot": CalendarSnapshot,
    "busy_time_state": BusyTimeState,
}


def stable_id(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def version_of(moment: datetime) -> int:
    """A version number from an aware datetime: microseconds since the epoch."""
    delta = _utc(moment) - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def encode(message: CalendarChange | CalendarSnapshot | BusyTimeState) -> bytes:
    return message.model_dump_json().encode()


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > 19:
        raise MalformedMessage(f"an integer of {digits} digits is outside 64 bits")
    value = int(text)
    if not _INT_MIN <= value <= _INT_MAX:
        raise MalformedMessage(f"integer {text} is outside 64 bits")
    return value


def _no_constant(text: str) -> Any:
    raise MalformedMessage(f"{text} is not a JSON number")


def _depth(value: Any) -> int:
    """How deeply arrays and objects nest in ``value`` (a scalar is 0); iterative, so any depth is safe."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth + 1)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _flag_from_address(item: Any, organizer_is_planner: OrganizerRule | None) -> Any:
    """One version-1 item with its ``organizer`` address replaced by ``organizer_is_planner``.

    An address that version 1 itself refused (not a string, longer than 254) is left in place, so validation
    refuses the message as before; an item that already has the flag is not a version-1 item.
    """
    if not isinstance(item, dict):
        return item
    if "organizer_is_planner" in item:
        raise MalformedMessage("a version-1 calendar item has no organizer_is_planner")
    if "organizer" not in item:
        return item
    address = item["organizer"]
    if address is not None and (not isinstance(address, str) or len(address) > 254):
        return item
    upgraded = {name: value for name, value in item.items() if name != "organizer"}
    upgraded["organizer_is_planner"] = None if address is None or organizer_is_planner is None else organizer_is_planner(address)
    return upgraded


def upgrade_v1(raw: dict[str, Any], organizer_is_planner: OrganizerRule | None) -> dict[str, Any]:
    """A version-1 calendar change or snapshot as version 2 (decision 71 in docs/decisions.md).

    Each item's organizer address becomes ``organizer_is_planner``: the rule's answer, or None (unknown, so only
    the UID patterns can recognise a Planner invitation) when no rule is given. Nothing else changes.
    """
    upgraded = dict(raw, schema_version=CALENDAR_SCHEMA_VERSION)
    if "item" in upgraded:
        upgraded["item"] = _flag_from_address(upgraded["item"], organizer_is_planner)
    for name in ("occurrences", "items"):
        if isinstance(upgraded.get(name), list):
            upgraded[name] = [_flag_from_address(item, organizer_is_planner) for item in upgraded[name]]
    return upgraded


def decode(body: bytes, organizer_is_planner: OrganizerRule | None = None) -> Message:
    """Parse one message; raise MalformedMessage, UnknownSchemaVersion or pydantic's ValidationError with the reason.

    ``organizer_is_planner`` upgrades a version-1 calendar message's organizer addresses (``upgrade_v1``).
    """
    if len(body) > MAX_BODY_BYTES:
        raise MalformedMessage(f"a body of {len(body)} bytes is larger than {MAX_BODY_BYTES} bytes")
    try:
        raw: Any = json.loads(body, parse_int=_bounded_int, parse_constant=_no_constant)
    except RecursionError:
        raise MalformedMessage(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedMessage(f"not JSON: {exc}") from None
    # Nesting deeper than MAX_DEPTH needs more opening brackets than that; counting them is cheap, walking is not.
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and _depth(raw) > MAX_DEPTH:
        raise MalformedMessage(f"JSON nested deeper than {MAX_DEPTH} levels")
    if not isinstance(raw, dict):
        raise MalformedMessage("not a JSON object")
    kind, version = raw.get("type"), raw.get("schema_version")
    if not isinstance(kind, str) or kind not in KNOWN_VERSIONS:
        raise UnknownSchemaVersion(f"unknown message type {kind!r}"[:200])
    if type(version) is not int or version not in KNOWN_VERSIONS[kind]:
        raise UnknownSchemaVersion(f"{kind} schema_version {version!r} is not one of {sorted(KNOWN_VERSIONS[kind])}"[:200])
    if kind in ("calendar_change", "calendar_snapshot") and version == 1:
        body = json.dumps(upgrade_v1(raw, organizer_is_planner)).encode()  # strict validation still reads JSON
    return ALL_MODELS[kind].model_validate_json(body, strict=True)


def describe_validation(error: ValidationError) -> str:
    """A one-line, content-free description of what failed validation (field paths and messages only)."""
    parts = []
    for item in error.errors()[:5]:
        loc = ".".join(str(p) for p in item.get("loc", ()))
        parts.append(f"{loc or '<root>'}: {item['msg']}")
    more = error.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def json_schemas() -> dict[str, dict[str, Any]]:
    """The exported JSON Schema of each message, by file name."""
    return {f"{name}.v{CURRENT_VERSIONS[name]}.schema.json": model.model_json_schema() for name, model in ALL_MODELS.items()}
