"""Exchange throttling (ErrorServerBusy) while every EWS session is in use must not stop the reads.

Found by the fault suite under load: exchangelib answers ErrorServerBusy by shrinking its session pool, and does so
holding the pool's lock while it waits for a free session. Once the pool is below its maximum, a second
ErrorServerBusy that arrives while every session is checked out makes that wait try to grow the pool, which takes
the same lock: the thread deadlocks, and every other thread that needs a session waits behind it for ever. The
producer's scheduler kept beating, so its health said running while no mailbox was read again (decision 69 in
docs/decisions.md).

The fault is made the way Exchange makes it: the simulator answers slowly (so the reads overlap and hold every
session) and answers ErrorServerBusy to some of them, twice.
"""

from __future__ import annotations

import threading
import time
from typing import Iterator

import pytest
import requests

from shared.adapters.ews import EwsConnection
from shared.config import Settings
from simulators.exchange.server import RunningExchangeSim, start_server
from tests.support.producers import producer_settings

MAILBOXES = [f"cw{i:02d}@jobcenter.dk" for i in range(8)]


@pytest.fixture
def ews() -> Iterator[RunningExchangeSim]:
    sim = start_server(users={"svc": "pw"}, mailboxes=MAILBOXES)
    yield sim
    sim.stop()   # not exchangelib's close_connections: after a deadlock it would block on the same lock


def test_throttling_while_every_session_is_busy_does_not_deadlock_the_reads(settings: Settings, ews: RunningExchangeSim) -> None:
    http = requests.Session()
    http.post(f"{ews.control_url}/faults", json={"kind": "latency", "latency_ms": 400, "operations": ["SyncFolderItems"]}, timeout=10).raise_for_status()
    for mailbox in MAILBOXES[:4]:
        http.post(f"{ews.control_url}/faults", json={"kind": "server_busy", "mailbox": mailbox, "operations": ["SyncFolderItems"], "count": 2,
                                                     "back_off_ms": 100}, timeout=10).raise_for_status()
    connection = EwsConnection(producer_settings(settings, ews).exchange, "Europe/Copenhagen", pool_size=3)
    outcomes: dict[str, str] = {}

    def read(mailbox: str) -> None:
        for _ in range(3):   # as the producer does: a throttled read is tried again
            try:
                connection.sync(mailbox, None)
            except Exception as exc:  # noqa: BLE001 - the outcome is what the test looks at
                outcomes[mailbox] = type(exc).__name__
                continue
            outcomes[mailbox] = "read"
            return

    threads = [threading.Thread(target=read, args=(mailbox,), daemon=True) for mailbox in MAILBOXES]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60   # a deadlock leaves the threads blocked for ever; 60 s is far beyond 8 reads
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    stuck = [mailbox for mailbox, thread in zip(MAILBOXES, threads) if thread.is_alive()]
    assert not stuck, f"reads blocked in the EWS session pool: {stuck}"
    connection.close()
    assert outcomes == {mailbox: "read" for mailbox in MAILBOXES}
