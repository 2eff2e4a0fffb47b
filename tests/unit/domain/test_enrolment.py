"""Enrolment from Planner, decided without I/O (decision 62 in docs/decisions.md)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest

from shared.domain.contracts import Interval
from shared.domain.delivery_plan import DeliveredRecord, plan
from shared.domain.enrolment import KnownMailbox, address_problem, plan_enrolment, removal_states


@dataclass(frozen=True)
class R:
    email: str
    is_case_worker: bool = True


def known(address: str, enabled: bool = True, status: str = "active") -> KnownMailbox:
    return KnownMailbox(address, enabled, status)


def test_every_caseworker_with_an_email_is_enrolled_once_lower_cased() -> None:
    result = plan_enrolment([R("Anne@K.dk"), R("bo@k.dk"), R("room@k.dk", is_case_worker=False), R("")], [], [], [])
    assert result.outcome == "applied" and result.enrol == ("anne@k.dk", "bo@k.dk")
    assert (result.not_case_workers, result.without_email, result.resources) == (1, 1, 4)


def test_an_allow_list_limits_enrolment_to_it_and_an_empty_one_limits_nothing() -> None:
    result = plan_enrolment([R("anne@k.dk"), R("bo@k.dk")], [], ["ANNE@k.dk"], [])
    assert result.enrol == ("anne@k.dk",) and result.not_allowed == ("bo@k.dk",)
    assert plan_enrolment([R("anne@k.dk"), R("bo@k.dk")], [], [], []).enrol == ("anne@k.dk", "bo@k.dk")


def test_the_deny_list_wins_and_an_enrolled_denied_mailbox_is_removed_even_when_planner_does_not_list_it() -> None:
    result = plan_enrolment([R("anne@k.dk"), R("bo@k.dk")], [known("bo@k.dk"), known("hand@k.dk")], ["anne@k.dk", "bo@k.dk"], ["anne@k.dk", "bo@k.dk", "hand@k.dk"])
    assert result.enrol == () and result.denied == ("anne@k.dk", "bo@k.dk")
    assert result.remove == ("bo@k.dk", "hand@k.dk")


def test_a_denied_mailbox_comes_back_when_the_deny_is_lifted_but_one_removed_by_hand_stays_out() -> None:
    result = plan_enrolment([R("anne@k.dk"), R("bo@k.dk"), R("cy@k.dk")], [known("anne@k.dk", False, "denied"), known("bo@k.dk", False, "removed"), known("cy@k.dk")], [], [])
    assert result.enrol == ("anne@k.dk",) and result.removed_by_hand == ("bo@k.dk",) and result.already_enrolled == 1
    assert result.remove == ()


def test_an_email_listed_twice_is_reported_and_enrolled_once() -> None:
    result = plan_enrolment([R("anne@k.dk"), R("ANNE@k.dk "), R("bo@k.dk")], [], [], [])
    assert result.duplicates == ("anne@k.dk",) and result.enrol == ("anne@k.dk", "bo@k.dk")
    assert result.as_dict()["duplicates"] == ["anne@k.dk"]


def test_an_invalid_email_is_reported_not_enrolled() -> None:
    result = plan_enrolment([R("anne k.dk"), R("bo@k.dk")], [], [], [])
    assert result.invalid == ("anne k.dk",) and result.enrol == ("bo@k.dk",) and "anne k.dk" in result.details


@pytest.mark.parametrize("answer", [[], None])
def test_an_empty_or_failed_answer_enrols_and_removes_nothing(answer: list[R] | None) -> None:
    result = plan_enrolment(answer, [known("bo@k.dk")], [], ["bo@k.dk"], failure=None if answer is not None else "HTTP 503")
    assert result.outcome == ("empty" if answer is not None else "failed")
    assert result.enrol == () and result.remove == () and result.reason
    assert answer is not None or "HTTP 503" in str(result.reason)


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("anne@kommune.dk", None),
        ("a.b+c@sub.kommune.dk", None),
        ("", "empty"),
        ("anne", "exactly one @"),
        ("anne@@k.dk", "exactly one @"),
        ("an ne@k.dk", "white space"),
        ("Anne <anne@k.dk>", "white space"),
        ("anne@k.dk,bo@k.dk", "exactly one @"),
        ("anne;@k.dk", "no <>"),
        ("anne@localhost", "not a domain name"),
        ("anne@k..dk", "not a domain name"),
        ("@k.dk", "no <>"),
        ("a" * 250 + "@k.dk", "longer than 254"),
    ],
)
def test_address_problem_names_what_is_wrong(address: str, problem: str | None) -> None:
    found = address_problem(address)
    assert (found is None) if problem is None else (found is not None and problem in found), found


def test_removal_states_delete_every_present_busy_time_but_never_a_planner_originated_one() -> None:
    start = datetime(2026, 12, 1, 9, tzinfo=timezone.utc)
    span = Interval(start=start, end=start + timedelta(hours=1))

    def row(key: str, present: bool, originated: bool = False, version: int = 5) -> DeliveredRecord:
        return DeliveredRecord("bo@k.dk", key, version, present, span if present else None, "e", "r", originated, 0, None)

    delivered = {"a": row("a", True), "b": row("b", False), "c": row("c", True, originated=True), "d": row("d", True, version=99)}
    states = removal_states("Bo@k.dk", delivered, now_version=50, correlation_id="resources-1")
    assert [(s.origin_id, s.version, s.interval, s.cause, s.mailbox) for s in states] == [
        ("a", 50, None, "reconcile", "bo@k.dk"),
        ("d", 99, None, "reconcile", "bo@k.dk"),
    ]
    assert all(plan(s, delivered[s.origin_id]).__class__.__name__ == "Send" for s in states)  # the publisher's rule deletes them
