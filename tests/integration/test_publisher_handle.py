"""The publisher's handler against the Planner simulator's in-memory model: receipts by identifier, per-event outcomes."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from services.publisher.worker import OutageGuard, PublisherDeps, handle
from shared.adapters.planner_client import PlannerEvent
from shared.adapters.store import Store, upgrade
from shared.broker.consume_loop import Done, Inbound
from shared.config import load_settings
from shared.domain.contracts import BusyTimeState, Interval
from shared.domain.retry import Permanent, Transient
from tests.support.planner_model import Pauser, PlannerModel

T = datetime(2026, 12, 1, 8, tzinfo=timezone.utc)
HOUR = Interval(start=T, end=T + timedelta(hours=1))
LATER = Interval(start=T + timedelta(hours=2), end=T + timedelta(hours=3))


_versions = itertools.count(1)


def state(origin: str, interval: Interval | None, mailbox: str = "anne@kommune.dk", version: int | None = None) -> Inbound:
    message = BusyTimeState(correlation_id=f"c-{origin}", mailbox=mailbox, origin_id=origin, version=version or next(_versions), interval=interval)
    return Inbound(message, delivery_tag=1, redelivered=False, retry_count=0)


@pytest.fixture
def planner() -> PlannerModel:
    return PlannerModel(clock=lambda: T)


@pytest.fixture
def deps(tmp_path: Path, planner: PlannerModel) -> PublisherDeps:
    store = Store.connect(f"sqlite:///{tmp_path / 'state.db'}")
    upgrade(store.engine)
    store.add_mailbox("anne@kommune.dk")
    settings = load_settings(planner={"batch_size": 2})
    return PublisherDeps(settings, store, planner, OutageGuard(3, 60.0, Pauser()), PlannerEvent)


def test_a_batch_is_delivered_in_calls_of_the_configured_size(deps: PublisherDeps, planner: PlannerModel) -> None:
    results = handle([state(f"u{i}", HOUR) for i in range(5)], deps)
    assert all(isinstance(r, Done) for r in results)
    assert [len(ids) for _, ids in planner.calls] == [2, 2, 1]
    assert sum(r.present for r in deps.store.delivered("anne@kommune.dk").values()) == 5


def test_two_mailboxes_never_share_a_call(deps: PublisherDeps, planner: PlannerModel) -> None:
    handle([state("a1", HOUR), state("b1", HOUR, mailbox="bo@kommune.dk")], deps)
    assert sorted(ids for _, ids in planner.calls) == [["a1"], ["b1"]]


def test_create_answered_8_becomes_an_update(deps: PublisherDeps, planner: PlannerModel) -> None:
    planner.seed("u1", "anne@kommune.dk", HOUR)
    results = handle([state("u1", LATER)], deps)
    assert results == [Done()]
    assert [op for op, _ in planner.calls] == ["create", "update"]
    assert planner.holds("u1", "anne@kommune.dk") == (LATER.start, LATER.end)


def test_update_answered_10_becomes_a_create(deps: PublisherDeps, planner: PlannerModel) -> None:
    handle([state("u1", HOUR)], deps)
    planner.forget("u1", "anne@kommune.dk")  # Planner lost it
    results = handle([state("u1", LATER)], deps)
    assert results == [Done()]
    assert [op for op, _ in planner.calls] == ["create", "update", "create"]


def test_code_13_is_remembered_and_never_sent_again(deps: PublisherDeps, planner: PlannerModel) -> None:
    planner.force_code("echo", 13)
    assert handle([state("echo", HOUR)], deps) == [Done()]
    assert deps.store.delivered("anne@kommune.dk")["echo"].planner_originated
    handle([state("echo", LATER)], deps)
    assert len(planner.calls) == 1


def test_a_mixed_batch_retries_and_dead_letters_only_the_failed_events(deps: PublisherDeps, planner: PlannerModel) -> None:
    planner.force_code("busy", 15)
    planner.force_code("bad", 3)
    results = handle([state("ok", HOUR), state("busy", HOUR), state("bad", HOUR)], deps)
    assert isinstance(results[0], Done)
    assert isinstance(results[1], Transient) and results[1].code == 15
    assert isinstance(results[2], Permanent) and results[2].code == 3 and "code 3" in results[2].reason
    assert deps.store.delivered("anne@kommune.dk")["bad"].last_code == 3


def test_a_missing_receipt_is_retried_not_assumed(deps: PublisherDeps, planner: PlannerModel) -> None:
    planner.drop_receipt_for.add("ghost")
    results = handle([state("ok", HOUR), state("ghost", HOUR)], deps)
    assert isinstance(results[0], Done) and isinstance(results[1], Transient)


def test_an_older_state_in_the_same_batch_makes_no_call(deps: PublisherDeps, planner: PlannerModel) -> None:
    results = handle([state("u1", LATER, version=10), state("u1", HOUR, version=5)], deps)
    assert results == [Done(), Done()]
    assert planner.calls == [("create", ["u1"])]
    assert planner.holds("u1", "anne@kommune.dk") == (LATER.start, LATER.end)


def test_a_delete_then_recreate_across_batches_ends_present(deps: PublisherDeps, planner: PlannerModel) -> None:
    handle([state("u1", HOUR, version=1)], deps)
    handle([state("u1", None, version=2)], deps)
    handle([state("u1", LATER, version=3)], deps)
    assert planner.holds("u1", "anne@kommune.dk") == (LATER.start, LATER.end)
    handle([state("u1", None, version=2)], deps)  # a late replay of the delete
    assert planner.holds("u1", "anne@kommune.dk") is not None


def test_consecutive_call_failures_pause_the_consumer(deps: PublisherDeps, planner: PlannerModel) -> None:
    planner.fault(type="http_status", status=503, times=3)
    for origin in ("a", "b", "c"):
        assert isinstance(handle([state(origin, HOUR)], deps)[0], Transient)
    assert deps.guard.consumer.paused and "planner_down" in deps.guard.consumer.paused[0]  # type: ignore[union-attr]
    assert deps.store.list_mailboxes()[0].last_error is not None


def test_a_success_records_the_delivery_time_for_the_mailbox(deps: PublisherDeps) -> None:
    handle([state("u1", HOUR)], deps)
    assert deps.store.list_mailboxes()[0].last_delivery_at is not None


def test_mailboxes_are_delivered_in_parallel_with_the_same_outcome(deps: PublisherDeps, planner: PlannerModel) -> None:
    from concurrent.futures import ThreadPoolExecutor

    deps.pool = ThreadPoolExecutor(max_workers=3)
    planner.force_code("bad", 3)
    batch = [state(f"m{n}-{i}", HOUR, mailbox=f"cw{n}@kommune.dk") for n in range(4) for i in range(3)] + [state("bad", HOUR, mailbox="cw0@kommune.dk")]
    results = handle(batch, deps)
    deps.pool.shutdown()
    assert [type(r).__name__ for r in results] == ["Done"] * 12 + ["Permanent"]
    per_mailbox = sorted(tuple(sorted(ids)) for _, ids in planner.calls)
    assert len(planner.calls) == 8  # batch_size 2: every mailbox has 3 or 4 events, so 2 calls each
    assert all(len({origin.split("-")[0] for origin in ids if origin != "bad"}) <= 1 for ids in per_mailbox)


@pytest.mark.parametrize(
    ("spec", "failure", "pauses"),
    [
        ({"type": "http_status", "status": 503}, Transient, True),
        ({"type": "outage", "seconds": 600, "mode": "reset"}, Transient, True),
        ({"type": "soap_fault", "error_code": 16}, Transient, True),
        ({"type": "garbage", "kind": "not_xml"}, Transient, True),
        ({"type": "http_status", "status": 400}, Permanent, False),
        ({"type": "soap_fault", "error_code": 3}, Permanent, False),
    ],
)
def test_a_call_level_fault_fails_every_event_of_the_call_as_the_client_classifies_it(
    deps: PublisherDeps, planner: PlannerModel, spec: dict[str, object], failure: type[Exception], pauses: bool
) -> None:
    planner.fault(**spec)
    for n in range(3):
        results = handle([state(f"a{n}", HOUR), state(f"b{n}", HOUR)], deps)
        assert [type(r) for r in results] == [failure, failure]
    rows = deps.store.delivered("anne@kommune.dk")   # every create was written ahead as maybe held (decision 84)
    held = {key: r for key, r in rows.items() if r.maybe_held or r.present}
    # a transport failure may have reached Planner: those creates stay maybe held (decision 68), never held; a SOAP
    # fault or a 4xx is Planner's own answer, nothing applied: the maybe written ahead is cleared
    maybe = failure is Transient and spec["type"] != "soap_fault"
    assert len(planner.calls) == 3 and len(held) == (6 if maybe else 0)
    assert all(r.maybe_held and not r.present and r.version == 0 and r.interval is None for r in held.values())
    assert bool(deps.guard.consumer.paused) is pauses  # type: ignore[union-attr]


def test_receipts_answered_in_another_order_are_matched_by_identifier(deps: PublisherDeps, planner: PlannerModel) -> None:
    planner.force_code("second", 3)
    results = handle([state("first", HOUR), state("second", HOUR)], deps)  # the model answers in reverse order
    assert isinstance(results[0], Done) and isinstance(results[1], Permanent)
    assert planner.holds("first", "anne@kommune.dk") == (HOUR.start, HOUR.end)


def _write_commits(deps: PublisherDeps, planner: PlannerModel) -> list[int]:
    """The count of Planner calls made when each transaction that wrote was committed (a read's commit, decision 118,
    is not counted)."""
    from sqlalchemy import event

    wrote: set[int] = set()
    calls_at_commit: list[int] = []

    def statement(conn: Any, cursor: Any, text: str, *_: Any) -> None:
        if not text.lstrip().upper().startswith("SELECT"):
            wrote.add(id(conn))

    def commit(conn: Any) -> None:
        if id(conn) in wrote:
            wrote.discard(id(conn))
            calls_at_commit.append(len(planner.calls))

    event.listen(deps.store.engine, "before_cursor_execute", statement)
    event.listen(deps.store.engine, "commit", commit)
    return calls_at_commit


def test_a_batch_writes_its_creates_ahead_in_one_transaction_whatever_its_calls(deps: PublisherDeps, planner: PlannerModel) -> None:
    """Decision 115: the creates of a batch's first calls are written ahead together, before any call leaves; the batch
    costs three transactions (claims, write ahead, receipts), not one more per create call (8 calls here)."""
    calls_at_commit = _write_commits(deps, planner)
    batch = [state(f"m{n}-{i}", HOUR, mailbox=f"cw{n}@kommune.dk") for n in range(4) for i in range(3)]
    results = handle(batch, deps)
    assert all(isinstance(r, Done) for r in results)
    assert len(planner.calls) == 8   # batch_size 2: 3 creates a mailbox make 2 calls each
    assert len(calls_at_commit) == 3, calls_at_commit
    assert calls_at_commit[1] == 0   # the write ahead was committed before the first call
    rows = {m: deps.store.delivered(f"cw{m}@kommune.dk") for m in range(4)}
    assert all(r.present and not r.maybe_held for held in rows.values() for r in held.values())
    assert sum(len(held) for held in rows.values()) == 12


def test_a_later_rounds_create_is_written_ahead_by_its_own_call(deps: PublisherDeps, planner: PlannerModel) -> None:
    """An update answered 10 "not found" turns into a create in the next round; that create is not the batch's, so its
    own call writes it ahead (decision 84), committed before it leaves."""

    handle([state("u1", HOUR)], deps)
    planner.forget("u1", "anne@kommune.dk")  # Planner lost it
    calls_at_commit = _write_commits(deps, planner)
    results = handle([state("u1", LATER)], deps)
    assert results == [Done()]
    assert [op for op, _ in planner.calls] == ["create", "update", "create"]
    assert calls_at_commit == [1, 2, 3]   # claims; the create's write ahead, after the update and before the create; receipts
    row = deps.store.delivered("anne@kommune.dk")["u1"]
    assert row.present and not row.maybe_held and row.interval == LATER
