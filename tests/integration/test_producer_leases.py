"""Change-producer replicas' leases (decision 91) against the real store and, for the fence, the EWS simulator.

The e2e side (replicas as processes joining, SIGKILLed, stalled and stopped while the calendars are edited) is in
``tests/e2e/test_fault_suite.py``; here: a read fenced out once another replica holds the mailbox, a crashed
predecessor's leases freed at once on its host, and two processes under one replica id."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import pytest
from sqlalchemy import update

from services.change_producer.leases import MailboxLeases, ProcessIdentity, this_process
from services.change_producer.worker import build
from shared.adapters.store import Store, mailbox_leases, make_engine, upgrade
from shared.broker.topology import Topology
from shared.config import Settings
from shared.domain.mailbox_leases import ReplicaBeat
from simulators.exchange.server import RunningExchangeSim, start_server
from tests.support.producers import Collector, add_appointment, producer_settings
from tests.support.waiting import wait_for

ANNE, BO = "anne@jobcenter.dk", "bo@jobcenter.dk"
T0 = datetime(2026, 5, 4, 8, 0, tzinfo=timezone.utc)
TTL = timedelta(seconds=60)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    url = f"sqlite:///{tmp_path / 'x.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    s = Store(make_engine(url))
    upgrade(s.engine)
    return s


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def dead_pid() -> int:
    """The pid of a process that has ended (and was reaped): nothing runs under it now."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_a_replica_restarted_on_the_same_host_frees_its_crashed_predecessors_leases_at_once(store: Store) -> None:
    here = this_process()
    assert here.process_key is not None, "this test needs /proc (Linux)"
    mailboxes = [ANNE, BO, "ce@jobcenter.dk"]
    clock = Clock()
    gone = dead_pid()
    crashed = ReplicaBeat(f"{here.host}:{gone}", "old", T0 + TTL, here.host, here.process_key, gone)
    store.beat_replica(crashed, T0 - TTL)
    store.acquire_leases(mailboxes, crashed.replica, T0 + TTL, T0)
    elsewhere = ReplicaBeat("other-host:12", "x", T0 + TTL, "other-host", here.process_key, crashed.pid)   # not provably gone
    store.beat_replica(elsewhere, T0 - TTL)
    store.acquire_leases(["de@jobcenter.dk"], elsewhere.replica, T0 + TTL, T0)
    restarted = MailboxLeases(store, f"{here.host}:{here.pid}", TTL, clock, here)
    held = restarted.take_part(mailboxes + ["de@jobcenter.dk"], ())
    # at once, not after a TTL: its share (4 mailboxes, 2 live replicas) of what the crashed one held; the replica on
    # the other host is not known to be gone, so it keeps its own and counts
    assert len(held) == 2 and held < set(mailboxes)
    assert {lease.mailbox: lease.owner for lease in store.leases() if lease.owner is not None} == {
        **{m: restarted.me for m in held}, "de@jobcenter.dk": elsewhere.replica}
    assert {beat.replica for beat in store.replica_beats()} == {restarted.me, elsewhere.replica}


def test_a_replica_that_stalled_past_its_leases_is_fenced_out_and_takes_its_share_again(store: Store) -> None:
    mailboxes = [f"cw{n}@jobcenter.dk" for n in range(6)]
    clock_a, clock_b = Clock(), Clock()
    a = MailboxLeases(store, "a", TTL, clock_a, ProcessIdentity("h1", None, 1))
    b = MailboxLeases(store, "b", TTL, clock_b, ProcessIdentity("h2", None, 2))
    assert a.take_part(mailboxes, ()) == set(mailboxes)
    assert b.take_part(mailboxes, ()) == set()   # all held: b waits for a to give back its surplus
    clock_b.now = T0 + TTL + timedelta(seconds=1)   # a stalls (no pass) past its leases; b takes them over
    assert b.take_part(mailboxes, ()) == set(mailboxes)
    clock_a.now = clock_b.now
    assert a.fence(mailboxes[:2]) == {} and a.holding() == set(mailboxes[2:])   # a resumes: its queued reads do not start
    assert len(a.take_part(mailboxes, ())) == 0   # b holds all of them, unexpired: nothing to take yet
    clock_b.now += TTL / 3
    assert len(b.take_part(mailboxes, ())) == 3   # b sees a again and gives back its surplus
    clock_a.now = clock_b.now
    assert len(a.take_part(mailboxes, ())) == 3 and not a.holding() & b.holding()


def test_two_processes_under_one_replica_id_do_not_both_read_the_mailboxes(store: Store) -> None:
    mailboxes = [ANNE, BO]
    clock = Clock()
    first = MailboxLeases(store, "cp-1", TTL, clock, ProcessIdentity("h1", None, 1))
    copy = MailboxLeases(store, "cp-1", TTL, clock, ProcessIdentity("h2", None, 1))   # the same id given to a second host
    assert first.take_part(mailboxes, ()) == set(mailboxes)
    assert copy.take_part(mailboxes, ()) == set() and copy.in_use and copy.fence(mailboxes) == {}
    first.leave()
    clock.now += timedelta(seconds=1)
    assert copy.take_part(mailboxes, ()) == set(mailboxes) and not copy.in_use


# --- the fence in the worker, against the EWS simulator -----------------------------------------------------------


@pytest.fixture
def ews() -> Iterator[RunningExchangeSim]:
    import exchangelib.protocol

    sim = start_server(users={"svc": "pw"}, minute_seconds=2.0, keepalive_seconds=0.5, mailboxes=[ANNE, BO])
    yield sim
    sim.stop()
    exchangelib.protocol.close_connections()


@pytest.fixture
def collector(topology: Topology) -> Iterator[Collector]:
    c = Collector(topology)
    yield c
    c.close()


def add_item(sim: RunningExchangeSim, mailbox: str, day: int) -> dict[str, Any]:
    return add_appointment(sim, mailbox, day, f"uid-{mailbox[:2]}-{day}")


def test_a_read_is_fenced_out_once_another_replica_holds_the_mailbox(settings: Settings, topology: Topology, ews: RunningExchangeSim, collector: Collector) -> None:
    """The replica holds both mailboxes; then the store says another replica holds ANNE (as when this one stalled past
    its lease and the other took it over). A change in ANNE must not be read here, while BO goes on being read. The
    lease pass runs every 100 s in this test, so what stops the read is the fence."""
    store = Store.connect(settings.database_url())
    upgrade(store.engine)
    store.add_mailbox(ANNE)
    store.add_mailbox(BO)
    producer = build(producer_settings(settings, ews, replica_id="cp-a", lease_ttl="5m"))
    thread = threading.Thread(target=producer.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: store.sync_position(ANNE) and store.sync_position(BO), 20, what="both mailboxes read")
        wait_for(lambda: producer.health().facts["subscribed"] == 2, 20, what="both mailboxes subscribed")
        taken_at = datetime.now(timezone.utc)
        with store.engine.begin() as conn:
            conn.execute(update(mailbox_leases).where(mailbox_leases.c.mailbox == ANNE).values(owner="cp-b", expires_at=taken_at + timedelta(minutes=10)))
        anne, bo = add_item(ews, ANNE, 3), add_item(ews, BO, 3)
        wait_for(lambda: collector.changes_for(bo["uid"]), 20, what="BO still read")
        wait_for(lambda: ANNE not in producer.schedule.mailboxes, 20, what="ANNE dropped by the fence")
        assert producer.health().facts["mailboxes"] == 1
    finally:
        producer.stop()
        thread.join(20)
    late = [call for call in ews.state.call_log("SyncFolderItems", ANNE) if datetime.fromisoformat(call["started"]) > taken_at]
    assert late == [] and not collector.changes_for(anne["uid"])
    assert {lease.mailbox: lease.owner for lease in store.leases()} == {ANNE: "cp-b", BO: None}   # BO given back at the stop
    assert store.replica_beats() == []
    store.engine.dispose()
