"""Message contracts: versioned, content-free, exported schemas in sync."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.domain.contracts import (
    ALL_MODELS,
    MAX_BODY_BYTES,
    MAX_DEPTH,
    BusyTimeState,
    CalendarChange,
    CalendarItem,
    CalendarSnapshot,
    Interval,
    MalformedMessage,
    UnknownSchemaVersion,
    decode,
    describe_validation,
    encode,
    json_schemas,
    version_of,
)

ROOT = Path(__file__).resolve().parents[3]
T0 = datetime(2026, 12, 1, 8, 0, tzinfo=timezone.utc)
CONTENT_FIELDS = {"subject", "body", "location", "attendees", "categories", "required_attendees", "optional_attendees"}


def change(**overrides: object) -> CalendarChange:
    data: dict[str, object] = {
        "correlation_id": "c1",
        "mailbox": "anne@kommune.dk",
        "observed_at": T0,
        "change": "upsert",
        "item_id": "AAMk1",
        "item": CalendarItem(item_id="AAMk1", uid="uid-1", start=T0, end=T0 + timedelta(hours=1), free_busy="Busy"),
    }
    data.update(overrides)
    return CalendarChange(**data)  # type: ignore[arg-type]


def test_every_message_round_trips_through_json() -> None:
    window = Interval(start=T0, end=T0 + timedelta(days=90))
    messages = [
        change(),
        change(change="delete", item=None),
        CalendarSnapshot(correlation_id="c2", snapshot_id="s1", mailbox="anne@kommune.dk", observed_at=T0, window=window, part=1, final=True, total_parts=1),
        BusyTimeState(correlation_id="c3", mailbox="anne@kommune.dk", origin_id="uid-1", version=5, interval=window),
        BusyTimeState(correlation_id="c3", mailbox="anne@kommune.dk", origin_id="uid-1", version=6, interval=None),
    ]
    for message in messages:
        assert decode(encode(message)) == message


def test_no_contract_has_a_field_for_appointment_content() -> None:
    for model in [*ALL_MODELS.values(), CalendarItem]:
        assert not CONTENT_FIELDS & set(model.model_fields), model.__name__


def test_a_producer_cannot_smuggle_a_subject_into_a_message() -> None:
    raw = json.loads(encode(change()))
    raw["item"]["subject"] = "Tandlæge"
    with pytest.raises(ValidationError):
        decode(json.dumps(raw).encode())


def test_an_unknown_schema_version_is_refused_with_the_reason() -> None:
    raw = json.loads(encode(change()))
    raw["schema_version"] = 99
    with pytest.raises(UnknownSchemaVersion, match="schema_version 99"):
        decode(json.dumps(raw).encode())


@pytest.mark.parametrize("body", [b"not json", b"[1,2]", b"\xff\xfe"])
def test_malformed_bodies_are_refused(body: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode(body)


def test_an_unknown_message_type_is_refused() -> None:
    with pytest.raises(UnknownSchemaVersion, match="unknown message type"):
        decode(b'{"type": "mystery", "schema_version": 1}')


def test_an_interval_must_end_after_it_starts_and_is_kept_in_utc() -> None:
    with pytest.raises(ValidationError, match="not after start"):
        Interval(start=T0, end=T0)
    cph = timezone(timedelta(hours=1))
    interval = Interval(start=datetime(2026, 12, 1, 9, tzinfo=cph), end=datetime(2026, 12, 1, 10, tzinfo=cph))
    assert interval.start == T0 and interval.start.utcoffset() == timedelta(0)


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValidationError):
        change(observed_at=datetime(2026, 12, 1, 8, 0))


def test_a_snapshot_final_part_carries_the_total() -> None:
    window = Interval(start=T0, end=T0 + timedelta(days=1))
    with pytest.raises(ValidationError, match="total_parts"):
        CalendarSnapshot(correlation_id="c", snapshot_id="s", mailbox="a@b.dk", observed_at=T0, window=window, part=2, final=True)
    with pytest.raises(ValidationError, match="last one"):
        CalendarSnapshot(correlation_id="c", snapshot_id="s", mailbox="a@b.dk", observed_at=T0, window=window, part=2, final=True, total_parts=3)


def test_the_same_state_has_the_same_message_id_and_another_version_another() -> None:
    a = BusyTimeState(correlation_id="x", mailbox="A@b.dk", origin_id="u", version=1, interval=None)
    b = BusyTimeState(correlation_id="y", mailbox="a@b.dk", origin_id="u", version=1, interval=None)
    c = BusyTimeState(correlation_id="x", mailbox="a@b.dk", origin_id="u", version=2, interval=None)
    assert a.message_id() == b.message_id() != c.message_id()


def test_versions_order_like_the_times_they_come_from() -> None:
    assert version_of(T0) < version_of(T0 + timedelta(microseconds=1))
    assert version_of(T0.astimezone(timezone(timedelta(hours=2)))) == version_of(T0)


def test_exported_json_schemas_match_the_models() -> None:
    exported = ROOT / "docs" / "contracts"
    for name, schema in json_schemas().items():
        path = exported / name
        assert path.is_file(), f"{path} missing: run `plannersync contracts export`"
        assert json.loads(path.read_text()) == schema, f"{name} drifted from shared/domain/contracts.py: run `plannersync contracts export`"
    assert {p.name for p in exported.glob("*.schema.json")} == set(json_schemas())


# --------------------------------------------------------------------------------------------- limits and strict types


def test_a_body_over_the_size_limit_is_malformed_before_it_is_parsed() -> None:
    body = encode(change())
    with pytest.raises(MalformedMessage, match="larger than"):
        decode(body + b" " * (MAX_BODY_BYTES - len(body) + 1))
    assert decode(body + b" " * (MAX_BODY_BYTES - len(body))) == change()  # at the limit: fine


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 5_000, 200_000])
def test_json_nested_past_the_limit_is_malformed_at_any_depth(depth: int) -> None:
    body = b'{"type": "calendar_change", "schema_version": 1, "x": ' + b"[" * depth + b"]" * depth + b"}"
    with pytest.raises(MalformedMessage, match=f"nested deeper than {MAX_DEPTH}"):
        decode(body)


@pytest.mark.parametrize("number", ["9" * 5000, str(2**63), str(-(2**63) - 1), "1" + "0" * 19])
def test_integers_outside_64_bits_are_malformed(number: str) -> None:
    body = encode(BusyTimeState(correlation_id="c", mailbox="a@b.dk", origin_id="u", version=1, interval=None))
    with pytest.raises(MalformedMessage, match="64 bits"):
        decode(body.replace(b'"version":1', b'"version":' + number.encode()))


def test_the_largest_64_bit_version_is_fine() -> None:
    body = encode(BusyTimeState(correlation_id="c", mailbox="a@b.dk", origin_id="u", version=2**63 - 1, interval=None))
    assert decode(body).version == 2**63 - 1  # type: ignore[union-attr]


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_are_malformed(constant: bytes) -> None:
    with pytest.raises(MalformedMessage, match="not a JSON number"):
        decode(b'{"type": "busy_time_state", "schema_version": 1, "version": ' + constant + b"}")


@pytest.mark.parametrize("version", [True, 1.0, "1", None, [1]])
def test_schema_version_must_be_exactly_an_integer(version: object) -> None:
    raw = json.loads(encode(change()))
    raw["schema_version"] = version
    with pytest.raises(UnknownSchemaVersion, match="schema_version"):
        decode(json.dumps(raw).encode())


def test_a_model_refuses_a_boolean_schema_version_too() -> None:
    with pytest.raises(ValidationError, match="schema_version"):
        CalendarChange.model_validate({**json.loads(encode(change())), "schema_version": True})


@pytest.mark.parametrize(
    ("path", "value"),
    [(("item", "all_day"), 1), (("item", "cancelled"), "true"), (("observed_at",), 1_800_000_000)],
    ids=["number-as-boolean", "string-as-boolean", "number-as-datetime"],
)
def test_fields_are_validated_strictly(path: tuple[str, ...], value: object) -> None:
    raw = json.loads(encode(change()))
    target = raw
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ValidationError, match=path[-1]):
        decode(json.dumps(raw).encode())


@pytest.mark.parametrize("kind", [["calendar_change"], {"a": 1}, 7])
def test_a_type_that_is_not_a_string_is_refused_not_crashed_on(kind: object) -> None:
    with pytest.raises(UnknownSchemaVersion, match="unknown message type"):
        decode(json.dumps({"type": kind, "schema_version": 1}).encode())


# --- version 1 (items carried the organizer's address) still decodes: decision 71 in docs/decisions.md -------------
PLANNER = "noreply@planner.star.dk"
CITIZEN = "canary-organizer-7f3a@borger.dk"


def is_planner(address: str) -> bool:
    return address.strip().lower() == PLANNER


def v1_item(organizer: object = CITIZEN, **fields: object) -> dict[str, object]:
    """A CalendarItem as a version-1 producer wrote it: the address in ``organizer``, no flag."""
    item = json.loads(CalendarItem(item_id="AAMk1", uid="uid-1", start=T0, end=T0 + timedelta(hours=1), free_busy="Busy").model_dump_json())
    del item["organizer_is_planner"]
    item["organizer"] = organizer
    item.update(fields)
    return item


def v1_change(*organizers: object) -> bytes:
    raw = json.loads(encode(change()))
    raw["schema_version"] = 1
    raw["item"] = v1_item(organizers[0])
    if len(organizers) > 1:
        raw["occurrences"] = [v1_item(o, item_id=f"AAMk-occ{n}", item_type="occurrence", original_start=raw["item"]["start"]) for n, o in enumerate(organizers[1:])]
        raw["window"] = {"start": T0.isoformat(), "end": (T0 + timedelta(days=90)).isoformat()}
    return json.dumps(raw).encode()


def v1_snapshot(*organizers: object) -> bytes:
    window = Interval(start=T0, end=T0 + timedelta(days=90))
    raw = json.loads(encode(CalendarSnapshot(correlation_id="c2", snapshot_id="s1", mailbox="anne@kommune.dk", observed_at=T0, window=window,
                                             part=1, final=True, total_parts=1)))
    raw["schema_version"] = 1
    raw["items"] = [v1_item(o, item_id=f"AAMk{n}") for n, o in enumerate(organizers)]
    return json.dumps(raw).encode()


def test_calendar_messages_are_written_at_version_2_without_an_organizer_address() -> None:
    raw = json.loads(encode(change()))
    assert raw["schema_version"] == 2 and "organizer" not in raw["item"] and raw["item"]["organizer_is_planner"] is None
    assert "organizer" not in CalendarItem.model_fields


def test_a_version_1_change_decodes_with_its_organizer_address_turned_into_the_flag() -> None:
    message = decode(v1_change(CITIZEN, "NoReply@Planner.STAR.dk", None), is_planner)
    assert isinstance(message, CalendarChange) and message.schema_version == 2
    assert message.item is not None and message.item.organizer_is_planner is False
    assert message.occurrences is not None and [o.organizer_is_planner for o in message.occurrences] == [True, None]
    assert CITIZEN not in encode(message).decode() and "planner.star.dk" not in encode(message).decode().lower()


def test_a_version_1_snapshot_decodes_with_every_items_address_turned_into_the_flag() -> None:
    message = decode(v1_snapshot(PLANNER, CITIZEN, None), is_planner)
    assert isinstance(message, CalendarSnapshot) and message.schema_version == 2
    assert [i.organizer_is_planner for i in message.items] == [True, False, None]
    assert CITIZEN not in encode(message).decode()


def test_without_a_rule_a_version_1_address_becomes_unknown_not_an_error() -> None:
    message = decode(v1_change(PLANNER))
    assert isinstance(message, CalendarChange) and message.item is not None and message.item.organizer_is_planner is None


def test_a_version_1_item_without_an_organizer_field_decodes() -> None:
    raw = json.loads(v1_change(CITIZEN))
    del raw["item"]["organizer"]
    message = decode(json.dumps(raw).encode(), is_planner)
    assert isinstance(message, CalendarChange) and message.item is not None and message.item.organizer_is_planner is None


@pytest.mark.parametrize("organizer", [7, ["a@b.dk"], "x" * 250 + "@b.dk"], ids=["number", "list", "too-long"])
def test_an_organizer_version_1_refused_is_still_refused_without_the_address_in_the_reason(organizer: object) -> None:
    with pytest.raises(ValidationError, match="organizer") as refused:
        decode(v1_change(organizer), is_planner)
    assert "@b.dk" not in describe_validation(refused.value)


def test_a_version_1_item_carrying_the_version_2_flag_is_malformed() -> None:
    raw = json.loads(v1_change(CITIZEN))
    raw["item"]["organizer_is_planner"] = True
    with pytest.raises(MalformedMessage, match="organizer_is_planner"):
        decode(json.dumps(raw).encode(), is_planner)


def test_a_version_2_message_cannot_carry_an_organizer_address() -> None:
    raw = json.loads(encode(change()))
    raw["item"]["organizer"] = CITIZEN
    with pytest.raises(ValidationError, match="organizer"):
        decode(json.dumps(raw).encode(), is_planner)


def test_busy_time_states_stay_at_version_1() -> None:
    state = BusyTimeState(correlation_id="c3", mailbox="anne@kommune.dk", origin_id="uid-1", version=5, interval=None)
    assert json.loads(encode(state))["schema_version"] == 1
    with pytest.raises(UnknownSchemaVersion, match="schema_version 2"):
        decode(json.dumps({**json.loads(encode(state)), "schema_version": 2}).encode())
