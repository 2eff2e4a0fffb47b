"""The publisher's handler against an in-memory Planner: receipts by identifier, per-event outcomes."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from services.publisher.worker import OutageGuard, PublisherDeps, handle
from shared.adapters.store import Store, upgrade
from shared.broker.consume_loop import Done, Inbound
from shared.config import load_settings
from shared.domain.contracts import BusyTimeState, Interval
from shared.domain.retry import Permanent, Transient

T = datetime(2026, 12, 1, 8, tzinfo=timezone.utc)
HOUR = Interval(start=T, end=T + timedelta(hours=1))
LATER = Interval(start=T + timedelta(hours=2), end=T + timedelta(hours=3))


@dataclass(frozen=True)
class Event:
    origin_id: str
    email: str
    start: datetime
    end: datetime


@dataclass(frozen=True)
class Receipt:
    origin_id: str
    code: int
    message: str | None = None
    planner_event_id: str | None = "0e0e0e0e-0000-0000-0000-000000000001"
    planner_resource_id: str | None = None
    received_at: datetime | None = T
    conflict_notification_sent: bool = False


@dataclass(frozen=True)
class CallResult:
    receipts: list[Receipt]
    reference: str = "11111111-2222-3333-4444-555555555555"


@dataclass
class FakePlanner:
    """Planner's receipt semantics in memory, plus forced codes and call failures."""

    events: dict[tuple[str, str], tuple[datetime, datetime]] = field(default_factory=dict)
    forced: dict[str, int] = field(default_factory=dict)
    fail_calls: int = 0
    drop_receipt_for: set[str] = field(default_factory=set)
    calls: list[tuple[str, list[str]]] = field(default_factory=list)

    def _run(self, op: str, events: list[Event]) -> CallResult:
        self.calls.append((op, [e.origin_id for e in events]))
        if self.fail_calls:
            self.fail_calls -= 1
            raise Transient("HTTP 503")
        receipts = []
        for e in reversed(events):  # answer out of order: matching must not be by position
            key = (e.origin_id, e.email)
            if e.origin_id in self.drop_receipt_for:
                continue
            code = self.forced.get(e.origin_id)
            if code is None:
                if op == "create":
                    code = 8 if key in self.events else 0
                else:
                    code = 0 if key in self.events else 10
            if code == 0:
                if op == "delete":
                    self.events.pop(key, None)
                else:
                    self.events[key] = (e.start, e.end)
            receipts.append(Receipt(e.origin_id, code, message=f"code {code}"))
        return CallResult(receipts)

    def create_events(self, events: list[Event]) -> CallResult:
        return self._run("create", events)

    def update_events(self, events: list[Event]) -> CallResult:
        return self._run("update", events)

    def delete_events(self, events: list[Event]) -> CallResult:
        return self._run("delete", events)


class Pauser:
    def __init__(self) -> None:
        self.paused: list[str] = []

    def pause_until(self, moment: float, reason: str) -> None:
        self.paused.append(reason)


_versions = itertools.count(1)


def state(origin: str, interval: Interval | None, mailbox: str = "anne@kommune.dk", version: int | None = None) -> Inbound:
    message = BusyTimeState(correlation_id=f"c-{origin}", mailbox=mailbox, origin_id=origin, version=version or next(_versions), interval=interval)
    return Inbound(message, delivery_tag=1, redelivered=False, retry_count=0)


@pytest.fixture
def deps(tmp_path: Path) -> PublisherDeps:
    store = Store.connect(f"sqlite:///{tmp_path / 'state.db'}")
    upgrade(store.engine)
    store.add_mailbox("anne@kommune.dk")
    settings = load_settings(planner={"batch_size": 2})
    return PublisherDeps(settings, store, FakePlanner(), OutageGuard(3, 60.0, Pauser()), Event)


def test_a_batch_is_delivered_in_calls_of_the_configured_size(deps: PublisherDeps) -> None:
    results = handle([state(f"u{i}", HOUR) for i in range(5)], deps)
    assert all(isinstance(r, Done) for r in results)
    assert [len(ids) for _, ids in deps.client.calls] == [2, 2, 1]
    assert deps.store.count_delivered("anne@kommune.dk", present=True) == 5


def test_two_mailboxes_never_share_a_call(deps: PublisherDeps) -> None:
    handle([state("a1", HOUR), state("b1", HOUR, mailbox="bo@kommune.dk")], deps)
    assert sorted(ids for _, ids in deps.client.calls) == [["a1"], ["b1"]]


def test_create_answered_8_becomes_an_update(deps: PublisherDeps) -> None:
    deps.client.events[("u1", "anne@kommune.dk")] = (T, T)
    results = handle([state("u1", LATER)], deps)
    assert results == [Done()]
    assert [op for op, _ in deps.client.calls] == ["create", "update"]
    assert deps.client.events[("u1", "anne@kommune.dk")] == (LATER.start, LATER.end)


def test_update_answered_10_becomes_a_create(deps: PublisherDeps) -> None:
    handle([state("u1", HOUR)], deps)
    deps.client.events.clear()  # Planner lost it
    results = handle([state("u1", LATER)], deps)
    assert results == [Done()]
    assert [op for op, _ in deps.client.calls] == ["create", "update", "create"]


def test_code_13_is_remembered_and_never_sent_again(deps: PublisherDeps) -> None:
    deps.client.forced["echo"] = 13
    assert handle([state("echo", HOUR)], deps) == [Done()]
    assert deps.store.delivered("anne@kommune.dk")["echo"].planner_originated
    handle([state("echo", LATER)], deps)
    assert len(deps.client.calls) == 1


def test_a_mixed_batch_retries_and_dead_letters_only_the_failed_events(deps: PublisherDeps) -> None:
    deps.client.forced.update({"busy": 15, "bad": 3})
    results = handle([state("ok", HOUR), state("busy", HOUR), state("bad", HOUR)], deps)
    assert isinstance(results[0], Done)
    assert isinstance(results[1], Transient) and results[1].code == 15
    assert isinstance(results[2], Permanent) and results[2].code == 3 and "code 3" in results[2].reason
    assert deps.store.delivered("anne@kommune.dk")["bad"].last_code == 3


def test_a_missing_receipt_is_retried_not_assumed(deps: PublisherDeps) -> None:
    deps.client.drop_receipt_for.add("ghost")
    results = handle([state("ok", HOUR), state("ghost", HOUR)], deps)
    assert isinstance(results[0], Done) and isinstance(results[1], Transient)


def test_an_older_state_in_the_same_batch_makes_no_call(deps: PublisherDeps) -> None:
    results = handle([state("u1", LATER, version=10), state("u1", HOUR, version=5)], deps)
    assert results == [Done(), Done()]
    assert deps.client.calls == [("create", ["u1"])]
    assert deps.client.events[("u1", "anne@kommune.dk")] == (LATER.start, LATER.end)


def test_a_delete_then_recreate_across_batches_ends_present(deps: PublisherDeps) -> None:
    handle([state("u1", HOUR, version=1)], deps)
    handle([state("u1", None, version=2)], deps)
    handle([state("u1", LATER, version=3)], deps)
    assert deps.client.events[("u1", "anne@kommune.dk")] == (LATER.start, LATER.end)
    handle([state("u1", None, version=2)], deps)  # a late replay of the delete
    assert ("u1", "anne@kommune.dk") in deps.client.events


def test_consecutive_call_failures_pause_the_consumer(deps: PublisherDeps) -> None:
    deps.client.fail_calls = 3
    for origin in ("a", "b", "c"):
        assert isinstance(handle([state(origin, HOUR)], deps)[0], Transient)
    assert deps.guard.consumer.paused and "planner_down" in deps.guard.consumer.paused[0]  # type: ignore[union-attr]
    assert deps.store.list_mailboxes()[0].last_error is not None


def test_a_success_records_the_delivery_time_for_the_mailbox(deps: PublisherDeps) -> None:
    handle([state("u1", HOUR)], deps)
    assert deps.store.list_mailboxes()[0].last_delivery_at is not None


def test_mailboxes_are_delivered_in_parallel_with_the_same_outcome(deps: PublisherDeps) -> None:
    from concurrent.futures import ThreadPoolExecutor

    deps.pool = ThreadPoolExecutor(max_workers=3)
    deps.client.forced["bad"] = 3
    batch = [state(f"m{n}-{i}", HOUR, mailbox=f"cw{n}@kommune.dk") for n in range(4) for i in range(3)] + [state("bad", HOUR, mailbox="cw0@kommune.dk")]
    results = handle(batch, deps)
    deps.pool.shutdown()
    assert [type(r).__name__ for r in results] == ["Done"] * 12 + ["Permanent"]
    per_mailbox = sorted(tuple(sorted(ids)) for _, ids in deps.client.calls)
    assert len(deps.client.calls) == 8  # batch_size 2: every mailbox has 3 or 4 events, so 2 calls each
    assert all(len({origin.split("-")[0] for origin in ids if origin != "bad"}) <= 1 for ids in per_mailbox)
