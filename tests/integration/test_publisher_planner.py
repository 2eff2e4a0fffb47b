"""The publisher on the real broker against the Planner simulator over HTTPS with a client certificate.

The publisher runs as in production (``services.publisher.worker.build(settings)`` → ``Consumer``) in a
background thread, with the throwaway CA as its Planner CA bundle and the OCES-like PKCS#12 (passphrase in a
file) as its client certificate. Desired states go in through the busy exchange; what Planner ends up holding is
read back through the simulator's control API, dead letters from the publisher's dead-letter queue. Retry
ladders, linger and the outage cooldown are scaled down so the whole file runs in about a minute; outcomes are
awaited with deadlines, never with fixed sleeps.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import pika
import pytest
from structlog.testing import capture_logs

from services.publisher.worker import build
from shared.adapters.store import Store
from shared.broker.consume_loop import Consumer
from shared.broker.publishing import Outgoing, Publisher
from shared.broker.topology import (
    Topology,
    delete_everything,
    ensure_policies,
    from_settings,
)
from shared.config import DatabaseSettings, PlannerSettings, RetrySettings, Settings
from shared.domain.contracts import BusyTimeState, CalendarChange, Interval, version_of
from simulators.planner.server import RunningPlannerSim, SimTLS, start_server
from simulators.planner.state import SimResource
from tests.support.broker import MANAGEMENT, drain, queue_depth
from tests.support.dripping_server import DrippingServer
from tests.support.planner_control import SimControl
from tests.support.tls import ThrowawayPKI
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(120)

ANNA = "anna.jensen@testkommune.dk"
BO = "bo.hansen@testkommune.dk"
CARL = "carl.nielsen@testkommune.dk"
LADDER = "200ms,400ms,800ms,1s,1s"
OUTAGE_LADDER = "500ms,1s,2s,4s,8s,8s"  # ≈ 23.5 s: stands for the ≥ 6 h production budget
OUTAGE_SECONDS = 6  # stands for a 30-minute Planner outage
DAY = datetime.combine((datetime.now(timezone.utc) + timedelta(days=7)).date(), datetime.min.time(), tzinfo=timezone.utc)
_versions = itertools.count(version_of(datetime.now(timezone.utc)))

Held = dict[tuple[str, str], tuple[datetime, datetime]]


# --------------------------------------------------------------------------------------------- states


def at(hour: float) -> datetime:
    return DAY + timedelta(hours=hour)


def uid(tag: str = "uid") -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


def busy(mailbox: str, origin_id: str, start: float, hours: float = 1, version: int | None = None) -> BusyTimeState:
    return BusyTimeState(
        correlation_id=uuid.uuid4().hex,
        mailbox=mailbox,
        origin_id=origin_id,
        version=next(_versions) if version is None else version,
        interval=Interval(start=at(start), end=at(start + hours)),
    )


def absent(mailbox: str, origin_id: str, version: int | None = None) -> BusyTimeState:
    return BusyTimeState(
        correlation_id=uuid.uuid4().hex, mailbox=mailbox, origin_id=origin_id, version=next(_versions) if version is None else version, interval=None
    )


def holds(*states: BusyTimeState) -> Held:
    """What Planner should hold after these states: per key the newest one, when it is busy."""
    newest: dict[tuple[str, str], BusyTimeState] = {}
    for state in states:
        if state.key not in newest or newest[state.key].version < state.version:
            newest[state.key] = state
    return {key: (s.interval.start, s.interval.end) for key, s in newest.items() if s.interval is not None}


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sim(pki: ThrowawayPKI) -> Iterator[RunningPlannerSim]:
    running = start_server(
        tls=SimTLS(pki.server_cert, pki.server_key, client_ca=pki.ca_cert),
        resources=[SimResource.from_json({"name": name, "email": email}) for name, email in (("Anna", ANNA), ("Bo", BO), ("Carl", CARL))],
        planner_uid_patterns=[r"^PLANNER-"],
    )
    yield running
    running.stop()


@pytest.fixture
def control(sim: RunningPlannerSim, pki: ThrowawayPKI) -> Iterator[SimControl]:
    control = SimControl(sim, pki)
    control.reset()
    yield control
    control.close()


class PublisherRun:
    """This test's topology (declared, with policies), a confirming publisher, and the publisher worker in a thread."""

    def __init__(
        self, base: Settings, sim: RunningPlannerSim, pki: ThrowawayPKI, tmp_path: Path, ladder: str, cooldown: str, linger: str, planner_overrides: dict[str, Any]
    ) -> None:
        self.tmp_path = tmp_path
        values: dict[str, Any] = {
            "endpoint": sim.url,
            "ca_bundle": pki.ca_cert,
            "client_cert_p12": pki.client_p12,
            "client_cert_passphrase_file": str(pki.client_p12_passphrase_file),
            "timeout": "5s",
            "linger": linger,
            "outage_cooldown": cooldown,
            **planner_overrides,
        }
        planner = PlannerSettings(**{key: value for key, value in values.items() if value is not None})
        retry = RetrySettings(ladder=ladder, quick_attempts=2, quick_max_wait="100ms")
        self.settings = base.model_copy(update={"planner": planner, "retry": retry})
        self.topology: Topology = from_settings(self.settings.broker, self.settings.retry)
        connection = pika.BlockingConnection(pika.URLParameters(self.settings.broker.amqp_url()))
        self.topology.declare(connection.channel())
        connection.close()
        ensure_policies(self.topology, MANAGEMENT, "guest", "guest")
        self.stage = self.topology.stage("publisher")
        self.publisher = Publisher(self.settings.broker, self.topology)
        self.consumer: Consumer | None = None
        self._thread: threading.Thread | None = None
        self.database_url = ""

    # --- the worker ---------------------------------------------------------------------------
    def start(self, database: str = "state.db") -> Consumer:
        self.database_url = f"sqlite:///{self.tmp_path / database}"
        settings = self.settings.model_copy(update={"database": DatabaseSettings(url=self.database_url)})
        consumer = build(settings)
        thread = threading.Thread(target=consumer.run, name="publisher-under-test", daemon=True)
        thread.start()
        self.consumer, self._thread = consumer, thread
        wait_for(lambda: consumer.counters.connected, 15, what="publisher consuming")
        return consumer

    def stop(self) -> None:
        if self.consumer is None or self._thread is None:
            return
        self.consumer.stop()
        self._thread.join(20)
        assert not self._thread.is_alive(), "publisher did not stop"
        self.consumer = self._thread = None

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.publisher.close()
            delete_everything(self.topology, MANAGEMENT, "guest", "guest")

    # --- messages -----------------------------------------------------------------------------
    def send(self, *messages: BusyTimeState | CalendarChange) -> None:
        for message in messages:
            self.publisher.publish(Outgoing(self.topology.busy_exchange, self.topology.busy_key(message.mailbox), message))

    def settled(self) -> int:
        """Messages this worker finished with: acked as done, or dead-lettered (retries come back, so do not count)."""
        assert self.consumer is not None
        return self.consumer.counters.handled + self.consumer.counters.dead_lettered

    def step(self, *states: BusyTimeState, timeout: float = 20) -> None:
        """Publish states and wait until the worker has finished with every one of them."""
        target = self.settled() + len(states)
        self.send(*states)
        wait_for(lambda: self.settled() >= target, timeout, what=f"{len(states)} states settled")

    def dead_letter_depth(self) -> int:
        return queue_depth(self.topology, self.stage.dead_letter_queue())

    def store(self) -> Store:
        return Store.connect(self.database_url)


@pytest.fixture
def publisher_run(broker: str, settings: Settings, sim: RunningPlannerSim, pki: ThrowawayPKI, tmp_path: Path, control: SimControl) -> Iterator[Callable[..., PublisherRun]]:
    made: list[PublisherRun] = []

    def make(ladder: str = LADDER, cooldown: str = "1s", linger: str = "50ms", **planner: Any) -> PublisherRun:
        run = PublisherRun(settings, sim, pki, tmp_path, ladder, cooldown, linger, planner)
        made.append(run)
        return run

    yield make
    for run in made:
        run.close()


# --------------------------------------------------------------------------------------------- 1. receipt codes


def test_receipt_0_creates_the_busy_time_and_records_planners_identifier(publisher_run, control: SimControl) -> None:
    run = publisher_run()
    run.start()
    state = busy(ANNA, uid(), 9, hours=1.5)
    run.step(state)

    assert control.held() == holds(state)
    assert control.calls_for(state.origin_id) == [("CreateEvents", 0, "ok")]
    row = run.store().delivered(ANNA)[state.origin_id]
    assert row.present and row.version == state.version and row.last_code == 0
    assert row.planner_event_id == control.events(ANNA)[0]["calendar_event_identifier"]


def test_receipt_8_on_create_after_the_store_was_lost_becomes_an_update(publisher_run, control: SimControl) -> None:
    run = publisher_run()
    run.start("first.db")
    first = busy(ANNA, uid(), 9)
    run.step(first)  # Planner now holds the event
    run.stop()
    run.start("fresh.db")  # the publisher's memory of it is gone

    moved = busy(ANNA, first.origin_id, 13, hours=2)
    run.step(moved)

    assert control.held() == holds(moved)
    assert control.calls_for(first.origin_id) == [("CreateEvents", 0, "ok"), ("CreateEvents", 8, "ok"), ("UpdateEvents", 0, "ok")]
    assert run.dead_letter_depth() == 0


def test_receipt_10_on_update_becomes_a_create(publisher_run, control: SimControl) -> None:
    run = publisher_run()
    run.start()
    first = busy(BO, uid(), 9)
    run.step(first)
    control.reset()  # Planner lost the event (and the call log)

    moved = busy(BO, first.origin_id, 11)
    run.step(moved)

    assert control.held() == holds(moved)
    assert control.calls_for(first.origin_id) == [("UpdateEvents", 10, "ok"), ("CreateEvents", 0, "ok")]
    assert run.dead_letter_depth() == 0


def test_receipt_13_is_remembered_and_a_newer_state_of_that_key_makes_no_call(publisher_run, control: SimControl) -> None:
    run = publisher_run()
    run.start()
    echo = busy(ANNA, uid("PLANNER-meeting"), 10)  # the simulator answers 13 for Planner's own UIDs
    run.step(echo)
    assert control.calls_for(echo.origin_id) == [("CreateEvents", 13, "ok")]
    assert run.store().delivered(ANNA)[echo.origin_id].planner_originated

    newer = busy(ANNA, echo.origin_id, 14, version=echo.version + 1)
    sentinel = busy(ANNA, uid(), 8)
    run.step(newer, sentinel)

    assert control.calls_for(echo.origin_id) == [("CreateEvents", 13, "ok")]
    assert control.held() == holds(sentinel)
    assert run.dead_letter_depth() == 0


def test_receipts_15_and_16_climb_the_broker_ladder_then_deliver(publisher_run, control: SimControl) -> None:
    run = publisher_run()
    retried_twice, retried_once, fine = busy(ANNA, uid(), 9), busy(ANNA, uid(), 11), busy(ANNA, uid(), 13)
    control.fault(type="receipt_code", code=15, message="Planner er optaget, prøv igen", origin_ids=[retried_twice.origin_id], times=2)
    control.fault(type="receipt_code", code=16, message="Midlertidig fejl", origin_ids=[retried_once.origin_id], times=1)
    run.start()
    run.step(retried_twice, retried_once, fine)

    assert control.held() == holds(retried_twice, retried_once, fine)
    assert [code for _, code, _ in control.calls_for(retried_twice.origin_id)] == [15, 15, 0]
    assert [code for _, code, _ in control.calls_for(retried_once.origin_id)] == [16, 0]
    assert [code for _, code, _ in control.calls_for(fine.origin_id)] == [0]
    assert run.consumer is not None and run.consumer.counters.retried == 3  # through the tier queues, not in-process
    assert run.consumer.counters.dead_lettered == 0 and run.dead_letter_depth() == 0


def test_a_permanent_code_dead_letters_only_that_event_while_the_rest_of_the_batch_is_delivered(publisher_run, control: SimControl) -> None:
    run = publisher_run(linger="300ms")
    first, rejected, last = busy(CARL, uid(), 9), busy(CARL, uid(), 10), busy(CARL, uid(), 11)
    control.fault(type="receipt_code", code=3, message="Ressourcen findes ikke i Planner", origin_ids=[rejected.origin_id])
    run.send(first, rejected, last)  # queued before the worker starts: one batch, one CreateEvents call
    run.start()
    wait_for(lambda: run.settled() == 3, 20, what="the batch settled")

    creates = control.calls("CreateEvents")
    assert len(creates) == 1, creates
    assert dict(zip(creates[0]["origin_ids"], creates[0]["codes"])) == {first.origin_id: 0, rejected.origin_id: 3, last.origin_id: 0}
    assert control.held() == holds(first, last)

    assert run.dead_letter_depth() == 1
    [(properties, body)] = drain(run.stage.dead_letter_queue(), timeout=10, count=1)
    assert json.loads(body)["origin_id"] == rejected.origin_id
    assert properties.headers["x-plannersync-reason"] == "code 3: Ressourcen findes ikke i Planner"
    assert properties.headers["x-retry-count"] == 0
    assert properties.headers["x-original-queue"] == run.stage.work_queue()
    datetime.fromisoformat(properties.headers["x-first-failure-at"])
    assert run.dead_letter_depth() == 0
    assert run.consumer is not None and run.consumer.counters.retried == 0


def test_a_foreign_message_in_a_batch_is_dead_lettered_and_hides_no_busy_time(publisher_run, control: SimControl) -> None:
    run = publisher_run(linger="300ms")
    stray = CalendarChange(correlation_id=uuid.uuid4().hex, mailbox=ANNA, observed_at=datetime.now(timezone.utc), change="delete", item_id="AAMk-stray")
    state = busy(ANNA, uid(), 9)
    run.send(stray, state)  # one batch: a change that took a wrong turn onto the busy exchange, and a state
    run.start()
    wait_for(lambda: run.settled() == 2, 20, what="the batch settled")

    assert control.held() == holds(state)
    [(properties, _)] = drain(run.stage.dead_letter_queue(), timeout=10, count=1)
    assert "publisher takes busy_time_state messages" in properties.headers["x-plannersync-reason"]


# --------------------------------------------------------------------------------------------- 2. outage


def test_a_planner_outage_pauses_the_publisher_and_every_busy_time_arrives_afterwards(publisher_run, control: SimControl, record_property) -> None:
    run = publisher_run(ladder=OUTAGE_LADDER, cooldown="2s")
    consumer = run.start()
    keys = {(mailbox, k): uid(mailbox.split(".")[0]) for mailbox in (ANNA, BO, CARL) for k in range(5)}
    before = [busy(mailbox, keys[mailbox, k], 8 + k) for mailbox in (ANNA, BO, CARL) for k in range(3)]
    run.step(*before)
    assert control.held() == holds(*before)
    old = {s.key: s for s in before}

    during = [
        busy(ANNA, keys[ANNA, 0], 15),  # moved
        absent(ANNA, keys[ANNA, 1]),  # cancelled
        busy(ANNA, keys[ANNA, 3], 12),  # new
        busy(BO, keys[BO, 0], 14, hours=0.5),  # moved
        busy(BO, keys[BO, 2], 16),  # moved
        busy(BO, keys[BO, 3], 7),  # new
        busy(BO, keys[BO, 4], 17, hours=2),  # new
        absent(CARL, keys[CARL, 0]),  # cancelled
        busy(CARL, keys[CARL, 3], 13),  # new
        old[(CARL, keys[CARL, 1])],  # a duplicate of what Planner holds
        busy(CARL, keys[CARL, 2], 6, version=old[(CARL, keys[CARL, 2])].version - 1),  # an older version, late
    ]
    expected = holds(*before, *during)
    with capture_logs() as logs:
        control.fault(type="outage", seconds=OUTAGE_SECONDS)
        started = time.monotonic()
        run.send(*during[:5])
        wait_for(lambda: consumer.counters.paused_until > 0, 20, what="the publisher pausing for the outage")
        run.send(*during[5:])
        wait_for(lambda: control.held() == expected, 60, interval=0.2, what="every busy time in Planner after the outage")
        drained = time.monotonic() - started
        wait_for(lambda: run.settled() == len(before) + len(during), 20, what="every message acked")

    record_property("outage_drain_seconds", round(drained, 1))
    print(f"scaled {OUTAGE_SECONDS}s outage: Planner complete {drained:.1f}s after it began; retried {consumer.counters.retried} times")
    assert consumer.counters.pause_reason.startswith("planner_down")
    assert any(entry["event"] == "consumer_paused" for entry in logs)
    assert any(call["outcome"] == "outage_503" for call in control.calls())
    assert consumer.counters.dead_lettered == 0 and run.dead_letter_depth() == 0


# --------------------------------------------------------------------------------------------- 3. duplicates, replays, reordering


def test_duplicates_replays_and_reordered_versions_end_with_the_newest_state(publisher_run, control: SimControl) -> None:
    run = publisher_run()
    run.start()
    key = uid()
    v = {
        1: busy(ANNA, key, 9, version=1_000_001),
        2: busy(ANNA, key, 10, version=1_000_002),
        3: busy(ANNA, key, 11, version=1_000_003),
        4: busy(ANNA, key, 12, version=1_000_004),
        5: absent(ANNA, key, version=1_000_005),
        6: busy(ANNA, key, 14.5, hours=1.5, version=1_000_006),
    }

    def calls() -> int:
        return len(control.calls_for(key))

    run.step(v[3], v[1])
    assert control.held() == holds(v[3])
    made = calls()
    run.step(v[3], v[2])  # a duplicate and an older version
    assert control.held() == holds(v[3]) and calls() == made
    run.step(v[5], v[4])  # absent is the newest
    assert control.held() == {}
    run.step(v[6])  # busy again, at new times
    assert control.held() == holds(v[6])
    made = calls()
    run.step(v[1], v[5], v[3], v[2])  # replays after the fact
    assert control.held() == holds(v[6]) and calls() == made
    assert run.dead_letter_depth() == 0


def test_a_newer_state_that_needs_no_call_still_outranks_older_ones(publisher_run, control: SimControl) -> None:
    run = publisher_run()
    run.start()
    never, same = uid(), uid()

    run.step(absent(BO, never, version=2_000_003))  # cancelled before Planner ever heard of it
    run.step(busy(BO, never, 9, version=2_000_001), busy(BO, never, 10, version=2_000_002))  # late older versions
    assert control.held() == {} and control.calls_for(never) == []

    run.step(busy(BO, same, 9, version=3_000_001))
    run.step(busy(BO, same, 9, version=3_000_003))  # a newer version with the same times: nothing to send
    run.step(busy(BO, same, 13, version=3_000_002))  # an older version arriving late must not move it
    assert control.held() == {(BO, same): (at(9), at(10))}
    assert control.calls_for(same) == [("CreateEvents", 0, "ok")]


# --------------------------------------------------------------------------------------------- 4. and 5. transport faults


def test_http_500_503_and_connection_resets_are_retried_and_delivered(publisher_run, control: SimControl) -> None:
    run = publisher_run()
    control.fault(type="http_status", status=500, times=1)
    control.fault(type="http_status", status=503, times=2)
    control.fault(type="reset", times=3)
    states = [busy(ANNA, uid(), 9), busy(ANNA, uid(), 10), busy(BO, uid(), 9)]
    run.start()
    run.step(*states, timeout=30)

    assert control.held() == holds(*states)
    outcomes = [call["outcome"] for call in control.calls()]
    assert {"http_500", "http_503", "reset"} <= set(outcomes), outcomes
    assert run.consumer is not None and run.consumer.counters.retried >= 1
    assert run.consumer.counters.dead_lettered == 0 and run.dead_letter_depth() == 0


def test_a_response_that_is_not_xml_is_retried_and_delivered_once_planner_answers_properly(publisher_run, control: SimControl) -> None:
    run = publisher_run()
    control.fault(type="garbage", kind="not_xml")
    state = busy(CARL, uid(), 9)
    consumer = run.start()
    run.send(state)
    wait_for(lambda: consumer.counters.retried >= 2, 20, what="the message going round the retry ladder")
    assert consumer.counters.dead_lettered == 0 and run.dead_letter_depth() == 0
    assert control.held() == {}
    assert {call["outcome"] for call in control.calls()} == {"garbage_not_xml"}

    control.clear_faults()
    wait_for(lambda: control.held() == holds(state), 20, what="the busy time once the garbage stops")
    wait_for(lambda: run.settled() == 1, 10, what="the message acked")
    assert consumer.counters.dead_lettered == 0 and run.dead_letter_depth() == 0


# --------------------------------------------------------------------------------------------- 6. content, deadlines, TLS


def test_an_event_that_cannot_be_serialised_is_dead_lettered_alone_and_planner_is_not_taken_for_down(publisher_run, control: SimControl) -> None:
    run = publisher_run(linger="300ms")
    first, poison, last = busy(ANNA, uid(), 9), busy(ANNA, uid("bad\x01id"), 10), busy(ANNA, uid(), 11)
    run.send(first, poison, last)  # queued before the worker starts: one batch, one CreateEvents call
    consumer = run.start()
    wait_for(lambda: run.settled() == 3, 30, what="the batch settled")

    assert control.held() == holds(first, last)
    [(properties, body)] = drain(run.stage.dead_letter_queue(), timeout=10, count=1)
    assert json.loads(body)["origin_id"] == poison.origin_id
    assert "control character" in properties.headers["x-plannersync-reason"]
    assert properties.headers["x-retry-count"] == 0
    assert consumer.counters.retried == 0  # a content error is permanent at once, never climbs the ladder
    assert consumer.counters.paused_until == 0  # and never counts as Planner being down
    assert [call["origin_ids"] for call in control.calls("CreateEvents")] == [[first.origin_id, last.origin_id]]


def test_a_planner_that_drips_its_answer_is_cut_at_the_deadline_and_stop_still_returns(publisher_run) -> None:
    with DrippingServer(interval=0.1, body_length=100_000) as drip:
        run = publisher_run(endpoint=drip.url, timeout="1s")
        consumer = run.start()
        run.send(busy(ANNA, uid(), 9))
        wait_for(lambda: consumer.counters.retried >= 1, 40, what="the dripped call cut at its deadline and the message on the retry ladder")
        wait_for(lambda: drip.requests >= 4, 40, what="the retried message calling again")
        run.stop()  # while a call hangs on the drip again; must return within the grace period


def test_tls_failing_for_minutes_is_raised_to_an_error_with_its_cause_in_logs_and_health(publisher_run) -> None:
    # PLANNERSYNC_PLANNER__TLS_ALERT_AFTER=1s stands for the default few minutes
    run = publisher_run(ladder="300ms,600ms,1s,1s,1s,1s", client_cert_p12=None, client_cert_passphrase_file=None, tls_alert_after="1s")
    with capture_logs() as logs:
        consumer = run.start()
        run.send(busy(ANNA, uid(), 9))
        health = wait_for(lambda: (h := consumer.health()).facts.get("planner_tls_error") and h, 30, what="the TLS failure in health")
    assert health.facts["planner_tls_error"].startswith("no client certificate offered")
    assert health.state == "planner_tls_failing" and not health.ok
    datetime.fromisoformat(health.facts["planner_tls_failing_since"])
    errors = [entry for entry in logs if entry["event"] == "planner_tls_failing"]
    assert errors and errors[0]["log_level"] == "error" and errors[0]["cause"].startswith("no client certificate offered")
