"""The one consume loop on the real broker: confirms, retry ladder, dead-lettering, reconnects, stop."""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterator, Sequence

import pika
import pika.exceptions
import pytest
import requests
from structlog.testing import capture_logs

from shared.broker.consume_loop import Consumer, ConsumerOptions, Defer, Done, Inbound, Result, Together
from shared.broker.publishing import Confirms, Outgoing, Publisher, Send
from shared.broker.topology import Topology
from shared.config import Settings
from shared.domain.contracts import BusyTimeState, CalendarChange, CalendarItem, encode
from shared.domain.retry import Permanent, Transient
from tests.support.broker import MANAGEMENT, drain, publish_raw, queue_depth
from tests.support.waiting import wait_for

T = datetime(2026, 12, 1, 8, tzinfo=timezone.utc)


def change(n: int = 1) -> CalendarChange:
    item = CalendarItem(item_id=f"item-{n}", uid=f"uid-{n}", start=T, end=T + timedelta(hours=1), free_busy="Busy")
    return CalendarChange(correlation_id=f"corr-{n}-{uuid.uuid4().hex[:6]}", mailbox="anne@kommune.dk", observed_at=T, change="upsert", item_id=f"item-{n}", item=item)


class Recorder:
    """A handler whose behaviour per correlation id is scripted by the test."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.seen: list[str] = []
        self.fail_with: dict[str, BaseException] = {}
        self.fail_times: dict[str, int] = {}
        self.recorded: list[str] = []
        self.block = threading.Event()
        self.block.set()

    def __call__(self, batch: list[Inbound]) -> list[Result]:
        self.block.wait(30)
        results: list[Result] = []
        for inbound in batch:
            cid = inbound.message.correlation_id
            self.seen.append(cid)
            if cid in self.fail_with and self.fail_times.get(cid, 1) > 0:
                self.fail_times[cid] = self.fail_times.get(cid, 1) - 1
                results.append(self.fail_with[cid])
                continue
            state = BusyTimeState(correlation_id=cid, mailbox="anne@kommune.dk", origin_id=cid, version=1, interval=None)
            out = Outgoing(self.topology.busy_exchange, self.topology.busy_key("anne@kommune.dk"), state)
            results.append(Done(publish=[out], record=lambda cid=cid: self.recorded.append(cid)))
        return results


@pytest.fixture
def running(settings: Settings, topology: Topology) -> Iterator[tuple[Consumer, Recorder, Publisher]]:
    recorder = Recorder(topology)
    consumer = Consumer(settings.broker, topology, topology.stage("transformer"), recorder, ConsumerOptions(prefetch=10, batch_size=5))
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    wait_for(lambda: consumer.counters.connected, 15, what="consumer connected")
    publisher = Publisher(settings.broker, topology)
    yield consumer, recorder, publisher
    recorder.block.set()
    consumer.stop()
    thread.join(15)
    publisher.close()
    assert not thread.is_alive(), "consumer did not stop"


def send(publisher: Publisher, topology: Topology, message: CalendarChange) -> None:
    publisher.publish(Outgoing(topology.calendar_exchange, topology.change_key(message.mailbox), message))


def test_a_handled_message_is_published_recorded_and_acked(running, topology: Topology) -> None:  # type: ignore[no-untyped-def]
    consumer, recorder, publisher = running
    message = change()
    send(publisher, topology, message)
    got = drain(topology.stage("publisher").work_queue(), timeout=15)
    assert got and json.loads(got[0][1])["origin_id"] == message.correlation_id
    assert got[0][0].delivery_mode == 2 and got[0][0].correlation_id == message.correlation_id
    wait_for(lambda: recorder.recorded == [message.correlation_id], 10, what="record step")
    wait_for(lambda: queue_depth(topology, topology.stage("transformer").work_queue()) == 0, 10, what="ack")


def test_malformed_and_unknown_version_messages_are_dead_lettered_and_consuming_goes_on(running, topology: Topology) -> None:  # type: ignore[no-untyped-def]
    consumer, recorder, publisher = running
    stage = topology.stage("transformer")
    raw = json.loads(encode(change(2)))
    raw["schema_version"] = 7
    publish_raw(topology.calendar_exchange, "change.x", b"{this is not json")
    publish_raw(topology.calendar_exchange, "change.x", json.dumps(raw).encode())
    invalid = json.loads(encode(change(3)))
    invalid["item"]["end"] = "yesterday"
    publish_raw(topology.calendar_exchange, "change.x", json.dumps(invalid).encode())
    good = change(4)
    send(publisher, topology, good)
    dead = drain(stage.dead_letter_queue(), timeout=15, count=3)
    reasons = sorted(props.headers["x-plannersync-reason"] for props, _ in dead)
    assert len(reasons) == 3
    assert any("not JSON" in r for r in reasons)
    assert any("schema_version 7" in r for r in reasons)
    assert any("invalid message: item.end" in r for r in reasons)
    assert all(props.headers["x-original-queue"] == stage.work_queue() for props, _ in dead)
    wait_for(lambda: good.correlation_id in recorder.recorded, 10, what="the good message after the bad ones")
    assert recorder.seen == [good.correlation_id]  # bad messages never reached the handler


def test_a_transient_failure_climbs_the_retry_ladder_then_succeeds(running, topology: Topology) -> None:  # type: ignore[no-untyped-def]
    consumer, recorder, publisher = running
    message = change(5)
    recorder.fail_with[message.correlation_id] = Transient("Planner timeout")
    recorder.fail_times[message.correlation_id] = 2
    send(publisher, topology, message)
    wait_for(lambda: message.correlation_id in recorder.recorded, 20, what="success after two retries")
    assert recorder.seen.count(message.correlation_id) == 3
    assert consumer.counters.retried == 2 and consumer.counters.dead_lettered == 0


def test_after_the_retry_budget_a_message_is_dead_lettered_with_reason_attempts_and_first_failure(running, topology: Topology) -> None:  # type: ignore[no-untyped-def]
    consumer, recorder, publisher = running
    message = change(6)
    recorder.fail_with[message.correlation_id] = Transient("HTTP 503")
    recorder.fail_times[message.correlation_id] = 99
    send(publisher, topology, message)
    dead = drain(topology.stage("transformer").dead_letter_queue(), timeout=30)
    assert dead, "nothing dead-lettered"
    headers = dead[0][0].headers
    assert headers["x-retry-count"] == len(topology.ladder)
    assert "gave up after 4 attempts: HTTP 503" in headers["x-plannersync-reason"]
    first = datetime.fromisoformat(headers["x-first-failure-at"])
    assert first < datetime.fromisoformat(headers["x-dead-lettered-at"])
    assert recorder.seen.count(message.correlation_id) == len(topology.ladder) + 1


def test_a_permanent_failure_dead_letters_at_once(running, topology: Topology) -> None:  # type: ignore[no-untyped-def]
    consumer, recorder, publisher = running
    message = change(7)
    recorder.fail_with[message.correlation_id] = Permanent("receipt code 3: unknown resource", code=3)
    send(publisher, topology, message)
    dead = drain(topology.stage("transformer").dead_letter_queue(), timeout=15)
    assert dead and dead[0][0].headers["x-plannersync-reason"] == "code 3: receipt code 3: unknown resource"
    assert dead[0][0].headers["x-retry-count"] == 0
    assert recorder.seen.count(message.correlation_id) == 1


def test_the_consumer_reconnects_when_the_broker_drops_its_connection(running, topology: Topology) -> None:  # type: ignore[no-untyped-def]
    consumer, recorder, publisher = running
    wanted = f"{topology.prefix}.transformer"

    def mine() -> list[str]:
        connections = requests.get(f"{MANAGEMENT}/api/connections", auth=("guest", "guest"), timeout=5).json()
        return [c["name"] for c in connections if (c.get("client_properties") or {}).get("connection_name") == wanted]

    wait_for(mine, 20, interval=0.5, what="the consumer's connection in the management API")
    for name in mine():
        requests.delete(f"{MANAGEMENT}/api/connections/{requests.utils.quote(name, safe='')}", auth=("guest", "guest"), timeout=5)
    wait_for(lambda: not consumer.counters.connected, 10, what="connection loss noticed")
    message = change(8)
    send(publisher, topology, message)
    wait_for(lambda: message.correlation_id in recorder.recorded, 30, what="message handled after reconnect")


def test_stop_returns_unhandled_messages_to_the_queue(settings: Settings, topology: Topology) -> None:
    recorder = Recorder(topology)
    recorder.block.clear()  # the handler is stuck on its first batch
    consumer = Consumer(settings.broker, topology, topology.stage("transformer"), recorder, ConsumerOptions(prefetch=10, batch_size=1))
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    publisher = Publisher(settings.broker, topology)
    for n in range(3):
        send(publisher, topology, change(10 + n))
    publisher.close()
    wait_for(lambda: consumer._in_flight is not None, 15, what="a batch in flight")
    stop_asked = time.time()
    consumer.stop()
    # the loop beats once per turn (counters.beat_at) and checks for a stop right after; a beat after the first
    # beat past the stop means it saw the stop, kept the in-flight batch and went round again instead of returning
    seen_stop = wait_for(lambda: consumer.counters.beat_at > stop_asked and consumer.counters.beat_at, 10, interval=0.01, what="a loop turn after the stop")
    wait_for(lambda: consumer.counters.beat_at > seen_stop or not thread.is_alive(), 10, interval=0.01, what="another loop turn or the loop's end")
    assert thread.is_alive(), "must finish the in-flight batch first"
    recorder.block.set()
    thread.join(15)
    assert not thread.is_alive()
    assert len(recorder.recorded) == 1  # the in-flight one finished
    wait_for(lambda: queue_depth(topology, topology.stage("transformer").work_queue()) == 2, 10, what="the other two back in the queue")


def test_a_handler_past_its_deadline_shows_in_health_and_stop_abandons_it_after_the_grace(settings: Settings, topology: Topology) -> None:
    recorder = Recorder(topology)
    recorder.block.clear()  # the handler hangs, as one stuck on a dripping Planner did
    options = ConsumerOptions(prefetch=10, batch_size=1, handler_deadline=timedelta(seconds=1), stop_grace=timedelta(seconds=2))
    consumer = Consumer(settings.broker, topology, topology.stage("transformer"), recorder, options)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    publisher = Publisher(settings.broker, topology)
    send(publisher, topology, change(20))
    publisher.close()
    try:
        health = wait_for(lambda: (h := consumer.health()).state == "handler_overdue" and h, 20, what="health showing the overdue handler")
        assert not health.ok and health.facts["handler_running_s"] >= 1 and health.facts["handler_deadline_s"] == 1
        with capture_logs() as logs:
            consumer.stop()
            thread.join(20)  # a SIGTERM must end the worker within its grace period, stuck handler or not
        assert not thread.is_alive(), "stop waited for ever on the stuck handler"
        assert any(entry["event"] == "handler_abandoned" for entry in logs)
        wait_for(lambda: queue_depth(topology, topology.stage("transformer").work_queue()) == 1, 10, what="the abandoned message back in the queue")
        assert recorder.recorded == []
    finally:
        recorder.block.set()


def test_a_producers_connection_survives_an_idle_period_longer_than_its_heartbeat(settings: Settings, topology: Topology) -> None:
    heartbeat = 5
    broker = settings.broker.model_copy(update={"heartbeat": heartbeat})
    name = f"{topology.prefix}.idle-producer"

    def connections() -> list[str]:
        listed = requests.get(f"{MANAGEMENT}/api/connections", auth=("guest", "guest"), timeout=5).json()
        return sorted(c["name"] for c in listed if (c.get("client_properties") or {}).get("connection_name") == name)

    publisher = Publisher(broker, topology, name="idle-producer")
    try:
        with capture_logs() as logs:
            send(publisher, topology, change(30))
            before = wait_for(connections, 20, interval=0.5, what="the producer's connection in the management API")
            # quiet for three heartbeats: the broker drops a connection that missed two (or we wait that long)
            quiet_until = time.monotonic() + 3 * heartbeat + 5
            wait_for(lambda: time.monotonic() > quiet_until or not connections(), 3 * heartbeat + 30, interval=0.5, what="an idle period")
            send(publisher, topology, change(31))  # the first edit after the quiet: must simply work
        assert connections() == before  # the same connection, kept alive, not a new one
        assert not [entry for entry in logs if entry["event"] in ("publisher_connection_replaced", "publisher_connection_lost")]
        wait_for(lambda: queue_depth(topology, topology.stage("transformer").work_queue()) == 2, 10, what="both changes queued")
    finally:
        publisher.close()


def test_record_steps_of_a_batch_run_together_once_and_a_failing_one_is_found_and_fails_alone(settings: Settings, topology: Topology) -> None:
    calls: list[list[str]] = []

    def save(items: Sequence[str]) -> None:  # one call (one transaction) for the batch; refuses the poison
        calls.append(list(items))
        if any(item.startswith("corr-3-") for item in items):
            raise Permanent("the store refuses this one")

    gate = threading.Event()

    def handler(batch: list[Inbound]) -> list[Result]:
        gate.wait(30)
        results: list[Result] = []
        for inbound in batch:
            cid = inbound.message.correlation_id
            state = BusyTimeState(correlation_id=cid, mailbox="anne@kommune.dk", origin_id=cid, version=1, interval=None)
            results.append(Done(publish=[Outgoing(topology.busy_exchange, topology.busy_key("anne@kommune.dk"), state)], record=Together(save, cid)))
        return results

    messages = [change(n) for n in range(1, 6)]
    publisher = Publisher(settings.broker, topology)
    publisher.publish_many([Outgoing(topology.calendar_exchange, topology.change_key(m.mailbox), m) for m in messages])
    consumer = Consumer(settings.broker, topology, topology.stage("transformer"), handler, ConsumerOptions(prefetch=10, batch_size=5, linger=timedelta(seconds=2)))
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        gate.set()
        wait_for(lambda: consumer.counters.handled == 4 and consumer.counters.dead_lettered == 1, 20, what="the batch settled")
        ids = [m.correlation_id for m in messages]
        assert calls[0] == ids  # the whole batch in one call first
        assert sorted(map(tuple, calls[1:])) == sorted((cid,) for cid in ids)  # then each alone, to find the one at fault
        dead = drain(topology.stage("transformer").dead_letter_queue(), timeout=10)
        assert [props.correlation_id for props, _ in dead] == [messages[2].correlation_id]
        assert "the store refuses this one" in dead[0][0].headers["x-plannersync-reason"]
        wait_for(lambda: queue_depth(topology, topology.stage("transformer").work_queue()) == 0, 10, what="every message acked")
    finally:
        consumer.stop()
        thread.join(15)
        publisher.close()


def test_a_batch_of_publishes_is_confirmed_at_once_and_an_unroutable_one_fails_alone(settings: Settings, topology: Topology) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(settings.broker.amqp_url()))
    try:
        confirms = Confirms(connection.channel())
        queue = topology.stage("publisher").work_queue()
        props = pika.BasicProperties(delivery_mode=2)
        sends = [Send("", queue, f"m{n}".encode(), props) for n in range(300)]
        sends.insert(150, Send("", f"no-such-queue-{uuid.uuid4().hex[:6]}", b"lost", props))
        outcomes = confirms.publish(sends)
        assert [n for n, outcome in enumerate(outcomes) if outcome is not None] == [150]
        assert isinstance(outcomes[150], pika.exceptions.UnroutableError)
        assert queue_depth(topology, queue) == 300
        assert confirms.publish([Send("", queue, b"after", props)]) == [None]  # the channel goes on
    finally:
        connection.close()


def deferring_handler(topology: Topology, defer: dict[str, int], seen: list[tuple[str, int]]) -> Callable[[list[Inbound]], list[Result]]:
    """Defers each message named in ``defer`` that many times (``-1``: always), handles the rest; notes what it saw."""

    def handler(batch: list[Inbound]) -> list[Result]:
        results: list[Result] = []
        for inbound in batch:
            cid = inbound.message.correlation_id
            seen.append((cid, inbound.retry_count))
            if defer.get(cid, 0):
                defer[cid] -= 1
                results.append(Defer("another replica holds this key"))
                continue
            state = BusyTimeState(correlation_id=cid, mailbox="anne@kommune.dk", origin_id=cid, version=1, interval=None)
            results.append(Done(publish=[Outgoing(topology.busy_exchange, topology.busy_key("anne@kommune.dk"), state)]))
        return results

    return handler


def test_a_deferred_message_waits_in_the_loop_and_is_handled_later_without_a_retry_tier_or_an_attempt(
    settings: Settings, topology: Topology, monkeypatch: pytest.MonkeyPatch,
) -> None:
    messages = [change(n) for n in range(1, 11)]
    first = messages[0].correlation_id
    seen: list[tuple[str, int]] = []
    handler = deferring_handler(topology, {first: 3}, seen)
    publisher = Publisher(settings.broker, topology)
    publisher.publish_many([Outgoing(topology.calendar_exchange, topology.change_key(m.mailbox), m) for m in messages[:5]])
    options = ConsumerOptions(prefetch=20, batch_size=5, linger=timedelta(seconds=1), defer_first_wait=timedelta(seconds=1))
    consumer = Consumer(settings.broker, topology, topology.stage("transformer"), handler, options)
    thread = threading.Thread(target=consumer.run, daemon=True)
    # the loop's jitter never draws from the process-wide random generator (other threads of this process may)
    drawn_by_loop: list[tuple[float, float]] = []
    process_wide = random.uniform

    def watched(a: float, b: float) -> float:
        if threading.current_thread() is thread:
            drawn_by_loop.append((a, b))
        return process_wide(a, b)

    monkeypatch.setattr(random, "uniform", watched)
    with capture_logs() as logs:
        thread.start()
        try:
            wait_for(lambda: consumer.counters.handled == 4, 20, what="the first batch handled but its deferred message")
            # a whole later batch settles while the first message waits: it is acked message by message
            publisher.publish_many([Outgoing(topology.calendar_exchange, topology.change_key(m.mailbox), m) for m in messages[5:]])
            wait_for(lambda: consumer.counters.handled == 10, 20, what="every message handled")
            assert [n for cid, n in seen if cid == first] == [0] * 4  # handed over four times, never counted as an attempt
            assert consumer.counters.retried == 0 and consumer.counters.dead_lettered == 0 and consumer.health().facts["deferred"] == 1
            assert len(drain(topology.stage("publisher").work_queue(), timeout=10, count=10)) == 10  # each published once
            # Its later neighbours were acked while it waited, one by one: a multiple-ack would have acked it early, and
            # its own ack would then have made the broker close the channel (an unknown delivery tag), consumer and all,
            # and a message sent afterwards would never be handled.
            later = change(11)
            send(publisher, topology, later)
            wait_for(lambda: consumer.counters.handled == 11, 10, what="a message sent after the deferred one was acked")
            assert consumers_of(topology.stage("transformer").work_queue()) == 1
        finally:
            consumer.stop()
            thread.join(15)
            publisher.close()
    assert sum(1 for e in logs if e["event"] == "messages_deferred") == 1  # said once, not at every turn
    assert queue_depth(topology, topology.stage("transformer").work_queue()) == 0
    # the deferrals' jitter left the process-wide random state alone: another thread's draws from it while Hypothesis
    # draws make Hypothesis warn "Do not use the random module inside strategies"
    assert drawn_by_loop == []


def consumers_of(queue: str) -> int:
    """Consumers on ``queue`` now (a passive declare: exact, unlike the management API's sampled figures)."""
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672, credentials=pika.PlainCredentials("guest", "guest")))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.consumer_count)
    finally:
        connection.close()


def test_a_message_deferred_past_the_budget_climbs_the_retry_ladder(settings: Settings, topology: Topology) -> None:
    message = change(7)
    seen: list[tuple[str, int]] = []
    handler = deferring_handler(topology, {message.correlation_id: -1}, seen)
    publisher = Publisher(settings.broker, topology)
    send(publisher, topology, message)
    options = ConsumerOptions(prefetch=10, batch_size=5, defer_budget=timedelta(milliseconds=300))
    consumer = Consumer(settings.broker, topology, topology.stage("transformer"), handler, options)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: any(n == 1 for _, n in seen), 20, what="the message back from its first retry tier")
        assert consumer.counters.retried >= 1 and consumer.counters.handled == 0
    finally:
        consumer.stop()
        thread.join(15)
        publisher.close()


def test_the_loop_settles_and_stops_without_waiting_for_its_idle_poll(settings: Settings, topology: Topology) -> None:
    """Decision 112: a lingering batch is dispatched when its linger ends, a finished handler wakes the loop, and so
    does stop; none of them waits for the loop's idle poll (here two minutes, far longer than the test may take)."""
    recorder = Recorder(topology)
    options = ConsumerOptions(prefetch=10, batch_size=5, linger=timedelta(milliseconds=200), idle_poll=120.0)
    consumer = Consumer(settings.broker, topology, topology.stage("transformer"), recorder, options)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    wait_for(lambda: consumer.counters.connected, 15, what="consumer connected")
    publisher = Publisher(settings.broker, topology)
    try:
        for n in range(3):  # one at a time: each waits out its linger alone, is handled, settled and acked
            message = change(n)
            send(publisher, topology, message)
            wait_for(lambda: message.correlation_id in recorder.recorded, 20, what=f"message {n} recorded")
            wait_for(lambda: consumer.counters.handled == n + 1, 20, what=f"message {n} acked")
        assert len(drain(topology.stage("publisher").work_queue(), timeout=10, count=3)) == 3
        consumer.stop()
        thread.join(20)
        assert not thread.is_alive(), "the loop did not notice stop before its idle poll ended"
    finally:
        consumer.stop()
        publisher.close()


def test_a_paused_loop_with_messages_waiting_does_not_spin(settings: Settings, topology: Topology) -> None:
    """Decision 112's waits end when a batch is due; a paused loop (Planner down) has messages whose linger is over and
    no batch to start: it must still wait out its poll, not ask the broker for events in a tight loop. Measured as the
    loop thread's own CPU time while paused with a message waiting."""
    recorder = Recorder(topology)
    consumer = Consumer(settings.broker, topology, topology.stage("transformer"), recorder, ConsumerOptions(prefetch=10, batch_size=5))
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    wait_for(lambda: consumer.counters.connected, 15, what="consumer connected")
    publisher = Publisher(settings.broker, topology)
    try:
        consumer.pause_until(time.time() + 4, "test: Planner down")
        message = change(1)
        send(publisher, topology, message)
        wait_for(lambda: consumer.counters.paused_until > time.time() and queue_depth(topology, topology.stage("transformer").work_queue()) == 0,
                 10, what="the message delivered to the paused loop")
        assert thread.ident is not None
        clock = time.pthread_getcpuclockid(thread.ident)
        cpu_before, wall_before = time.clock_gettime(clock), time.monotonic()
        time.sleep(1.5)
        cpu = time.clock_gettime(clock) - cpu_before
        assert consumer.counters.handled == 0 and time.monotonic() - wall_before < 4  # still paused all along
        assert cpu < 0.5, f"the paused loop used {cpu:.2f} s of CPU in 1.5 s"
        wait_for(lambda: recorder.recorded == [message.correlation_id], 20, what="the message handled after the pause")
    finally:
        consumer.stop()
        thread.join(15)
        publisher.close()
