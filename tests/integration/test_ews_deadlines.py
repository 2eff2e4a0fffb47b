"""Every EWS request has a hard total deadline: an Exchange server that drips its answer is cut, and the read is tried again.

A read timeout does not bound a call: a server that sends its headers and then a few bytes a second never lets a 60 s
read timeout fire, and a SyncFolderItems answer of a few kilobytes dripped that way holds the reading thread (and
its mailbox) for an hour, until the wedge watchdog restarts the whole producer (decision 70). The simulator's
``drip`` fault makes that answer; the reader must give up at its deadline, retire the session, and read the
mailbox again when Exchange answers properly (decision 86 in docs/decisions.md).
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from typing import Iterator

import pytest
import requests

from services.change_producer.worker import build
from shared.adapters.ews import EwsConnection, classify
from shared.adapters.store import Store, upgrade
from shared.broker.topology import Topology
from shared.config import Settings
from simulators.exchange.server import RunningExchangeSim, start_server
from tests.support.producers import CPH, Collector, producer_settings
from tests.support.waiting import wait_for

ANNE = "anne@jobcenter.dk"


@pytest.fixture
def ews() -> Iterator[RunningExchangeSim]:
    import exchangelib.protocol

    sim = start_server(users={"svc": "pw"}, minute_seconds=2.0, keepalive_seconds=0.5, mailboxes=[ANNE])
    yield sim
    sim.stop()
    exchangelib.protocol.close_connections()


def _appointments(ews: RunningExchangeSim, count: int) -> set[str]:
    day = (datetime.now(CPH) + timedelta(days=1)).date()
    specs = [{"uid": f"drip-{n}", "start": f"{day}T{8 + n % 8:02d}:00", "end": f"{day}T{8 + n % 8:02d}:30", "status": "Busy",
              "timezone": "Romance Standard Time"} for n in range(count)]
    requests.post(f"{ews.control_url}/mailboxes/{ANNE}/items", json={"items": specs}, timeout=30).raise_for_status()
    return {spec["uid"] for spec in specs}


def _drip(ews: RunningExchangeSim, count: int) -> None:
    requests.post(f"{ews.control_url}/faults", json={"kind": "drip", "interval_ms": 500, "mailbox": ANNE, "operations": ["SyncFolderItems"],
                                                     "count": count}, timeout=10).raise_for_status()


def test_a_dripped_answer_is_cut_at_the_deadline_and_the_next_request_is_answered(settings: Settings, ews: RunningExchangeSim) -> None:
    uids = _appointments(ews, 20)     # an answer of several kilobytes: minutes at 64 bytes per half second
    _drip(ews, 1)
    connection = EwsConnection(producer_settings(settings, ews, call_deadline="2s").exchange, "Europe/Copenhagen", pool_size=2)
    outcome: dict[str, object] = {}

    def read() -> None:
        try:
            outcome["first"] = connection.sync(ANNE, None)
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test looks at
            outcome["first"] = exc

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(60)   # without a deadline the dripped answer takes minutes; the join gives up long before
    assert not reader.is_alive(), "the dripped answer still holds the read"
    first = outcome["first"]
    assert isinstance(first, Exception), "the dripped answer was read whole"
    fault = classify(first)
    assert fault.kind == "transient" and "DeadlineExceeded" in fault.detail, fault
    changes, state = connection.sync(ANNE, None)   # the cut session was retired: the next request is answered
    assert {c.item.uid for c in changes if c.item is not None} == uids and state
    connection.close()


def test_the_change_producer_reads_a_mailbox_whose_first_answers_drip(settings: Settings, topology: Topology, ews: RunningExchangeSim) -> None:
    uids = _appointments(ews, 20)
    _drip(ews, 2)
    store = Store.connect(settings.database_url())
    upgrade(store.engine)
    store.add_mailbox(ANNE)
    collector = Collector(topology)
    producer = build(producer_settings(settings, ews, call_deadline="2s"))
    thread = threading.Thread(target=producer.run, daemon=True)
    thread.start()
    try:
        seen: set[str] = set()

        def all_seen() -> bool:
            seen.update(m.item.uid for m in collector.poll() if m.type == "calendar_change" and m.item is not None)
            return seen >= uids

        wait_for(all_seen, 60, interval=0.2, what="every appointment on the broker after two dripped answers")
        calls = requests.get(f"{ews.control_url}/calls", params={"operation": "SyncFolderItems", "mailbox": ANNE}, timeout=10).json()
    finally:
        producer.stop()
        thread.join(20)
        collector.close()
    assert len(calls) >= 3   # two dripped answers given up, then one read whole
    assert store.sync_position(ANNE) is not None
