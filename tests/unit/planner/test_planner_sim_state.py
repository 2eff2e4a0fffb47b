"""The Planner simulator's store and fault rules, without sockets."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from simulators.planner.state import (
    NIL_GUID,
    EventInput,
    SimResource,
    SimState,
    parse_fault,
)

NOW = datetime(2026, 6, 1, 8, tzinfo=timezone.utc)


def ev(origin: str, email: str = "a@k.dk") -> EventInput:
    return EventInput(origin, email, NOW, NOW + timedelta(hours=1))


def test_events_are_keyed_by_origin_id_and_case_insensitive_email_with_a_stable_guid() -> None:
    state = SimState([SimResource.from_json({"email": "A@k.dk"})])
    first = state.apply("CreateEvents", [ev("u1", "a@K.dk")], NOW)[0]
    again = state.apply("CreateEvents", [ev("u1", "A@k.DK")], NOW)[0]
    assert (first.code, again.code) == (0, 8)
    assert first.calendar_event_identifier == again.calendar_event_identifier != NIL_GUID
    assert first.planner_resource_identifier is not None
    assert state.apply("DeleteEvents", [ev("u1", "a@k.dk")], NOW)[0].code == 0
    assert state.apply("UpdateEvents", [ev("u1")], NOW)[0].code == 10


def test_a_chosen_receipt_code_applies_only_the_given_number_of_times() -> None:
    state = SimState()
    state.add_faults([{"type": "receipt_code", "code": 16, "origin_ids": ["u"], "times": 2}], NOW)
    codes = [state.apply("CreateEvents", [ev("u"), ev("v")], NOW)[0].code for _ in range(3)]
    assert codes == [16, 16, 0]


def test_planner_uid_patterns_give_13_and_store_nothing() -> None:
    state = SimState(planner_uid_patterns=[r"^PLANNER-"])
    assert state.apply("CreateEvents", [ev("PLANNER-1")], NOW)[0].code == 13
    assert state.events() == []


def test_an_outage_ends_at_its_time_and_faults_can_be_limited_to_operations() -> None:
    state = SimState()
    state.add_faults([{"type": "outage", "seconds": 60}, {"type": "reset", "operations": ["GetEvents"]}], NOW)
    assert [f.type for f in state.call_faults("CreateEvents", NOW)] == ["outage"]
    assert [f.type for f in state.call_faults("GetEvents", NOW + timedelta(seconds=61))] == ["reset"]


@pytest.mark.parametrize(
    "spec",
    [{"type": "nope"}, {"type": "receipt_code", "code": 5}, {"type": "http_status", "status": 200}, {"type": "garbage", "kind": "x"}, {"type": "reset", "times": 0}],
)
def test_bad_fault_specifications_are_refused(spec: dict) -> None:
    with pytest.raises(ValueError):
        parse_fault(spec, 1, NOW)


def test_stacked_faults_fail_one_call_each_in_order_and_latency_combines() -> None:
    state = SimState()
    state.add_faults(
        [
            {"type": "latency", "seconds": 0.1, "times": 2},
            {"type": "http_status", "status": 500, "times": 1},
            {"type": "http_status", "status": 503, "times": 2},
            {"type": "reset", "times": 3},
        ],
        NOW,
    )
    applied = [[f.type + (str(f.status) if f.status else "") for f in state.call_faults("CreateEvents", NOW)] for _ in range(7)]
    assert applied == [
        ["latency", "http_status500"],
        ["latency", "http_status503"],
        ["http_status503"],
        ["reset"],
        ["reset"],
        ["reset"],
        [],
    ]
