"""Organizers and attendees are personal data the busy time does not need (decision 71 in docs/decisions.md).

A citizen's meeting and a Planner invitation, each with a distinctive organizer address, organizer name and
attendee names and addresses, are read through EWS and through Graph by the change producer and by a full
re-read (``plannersync resync``, the nightly snapshot's path); transformer and publisher run too, all as
processes with DEBUG logs. Then:

- none of the canary strings is in a message on either exchange, a log line, a database row (every table, and
  the database file's bytes) or a call to Planner;
- the citizen's meeting is busy time in Planner, and the Planner invitation is not: it is recognised by
  ``organizer_is_planner``, which the calendar messages carry instead of the address (its UID matches no
  configured pattern, so nothing else could recognise it).
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import exchangelib.protocol
import pika
import pytest
import sqlalchemy
from lxml import etree

from shared.adapters.store import Store, upgrade
from shared.broker.topology import Topology
from simulators.exchange.model import Item
from simulators.exchange.render import calendar_item as render_ews
from simulators.exchange.server import RunningExchangeSim
from simulators.exchange.server import start_server as start_ews
from simulators.graph.events import event_json
from simulators.graph.server import RunningGraphSim
from simulators.graph.server import start_server as start_graph
from simulators.planner.server import RunningPlannerSim
from tests.support.broker import BROKER_HOST
from tests.support.graph import AppCertificate, graph_env
from tests.support.processes import PLANNERSYNC, WorkerProcess
from tests.support.producers import CPH
from tests.support.tls import ThrowawayPKI
from tests.support.waiting import wait_for

MAILBOX = "anne@kommune.example"
PLANNER_ORGANIZER = "planner@jobcenter.example"


@pytest.fixture
def ews() -> Iterator[RunningExchangeSim]:
    sim = start_ews(users={"svc": "pw"}, minute_seconds=2.0, keepalive_seconds=0.5, mailboxes=[MAILBOX])
    yield sim
    sim.stop()
    exchangelib.protocol.close_connections()


@pytest.fixture
def graph(ews: RunningExchangeSim, pki: ThrowawayPKI, app: AppCertificate) -> Iterator[RunningGraphSim]:
    sim = start_graph(tls=(str(pki.server_cert), str(pki.server_key)), store=ews.state.store, client_certificates=[app.certificate_pem])
    yield sim
    sim.stop()


@pytest.fixture
def tap(topology: Topology) -> Iterator[Any]:
    """A copy of every message on the calendar and busy-time exchanges."""
    connection = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST))
    channel = connection.channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, topology.calendar_exchange, "#")
    channel.queue_bind(queue, topology.busy_exchange, "#")

    def bodies() -> list[bytes]:
        out = []
        while True:
            method, _p, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append(body)

    yield bodies
    connection.close()


def at(day: date, hour: int) -> str:
    return f"{day.isoformat()}T{hour:02d}:00"


def canaries() -> dict[str, str]:
    tag = uuid.uuid4().hex[:6]
    return {
        "organizer address": f"canary-organizer-{tag}@borger.dk",
        "organizer name": f"Canary Organizer {tag}",
        "attendee name": f"Canary Attendee Q9{tag}",
        "attendee address": f"canary-attendee-{tag}@laege.dk",
        "planner organizer name": f"Canary Planner {tag}",
        "colleague name": f"Canary Colleague {tag}",
    }


def served(item: Item) -> tuple[str, str]:
    """The item as the EWS simulator's XML and as the Graph simulator's JSON."""
    return etree.tostring(render_ews(etree.Element("x"), MAILBOX, item)).decode(), json.dumps(event_json(MAILBOX, item, None, (item.tz, None)))


def table_rows(db: Path) -> list[str]:
    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    rows = []
    try:
        with engine.connect() as conn:
            for table in sqlalchemy.inspect(engine).get_table_names():
                rows += [json.dumps([str(v) for v in row]) for row in conn.execute(sqlalchemy.text(f'SELECT * FROM "{table}"'))]
    finally:
        engine.dispose()
    return rows


def calendar_items(messages: list[bytes]) -> list[dict[str, Any]]:
    items = []
    for body in messages:
        message = json.loads(body)
        if message.get("type") == "calendar_change":
            items += [message["item"]] if message.get("item") else []
            items += message.get("occurrences") or []
        elif message.get("type") == "calendar_snapshot":
            items += message["items"]
    return items


@pytest.mark.parametrize("backend", ["ews", "graph"])
def test_organizer_and_attendee_canaries_are_nowhere_and_planner_invitations_are_still_recognised(
    backend: str, topology: Topology, worker_env: dict[str, str], ews: RunningExchangeSim, graph: RunningGraphSim, pki: ThrowawayPKI,
    app: AppCertificate, planner_sim: RunningPlannerSim, processes: list[WorkerProcess], tap: Any, tmp_path: Path,
) -> None:
    canary = canaries()
    today = datetime.now(CPH).date()
    calendar = ews.state.store
    citizen = calendar.add(MAILBOX, {
        "uid": f"citizen-{uuid.uuid4().hex[:6]}@kommune.example", "start": at(today + timedelta(days=2), 9), "end": at(today + timedelta(days=2), 10),
        "organizer": canary["organizer address"], "organizer_name": canary["organizer name"],
        "attendees": [{"name": canary["attendee name"], "address": canary["attendee address"]}, {"name": canary["colleague name"], "address": MAILBOX}],
    })
    invitation = calendar.add(MAILBOX, {
        "uid": f"meeting-{uuid.uuid4().hex[:6]}@jobnet.example", "start": at(today + timedelta(days=3), 13), "end": at(today + timedelta(days=3), 14),
        "organizer": "Planner@Jobcenter.Example", "organizer_name": canary["planner organizer name"],
        "attendees": [{"name": canary["attendee name"], "address": canary["attendee address"]}],
    })
    for item in (citizen, invitation):   # both simulators really send the names and addresses: nothing here is vacuous
        for sent in served(item):
            assert canary["attendee name"] in sent and canary["attendee address"] in sent
    for sent in served(citizen):
        assert canary["organizer address"] in sent and canary["organizer name"] in sent and canary["colleague name"] in sent

    db = Path(worker_env["PLANNERSYNC_DATABASE__URL"].removeprefix("sqlite:///"))
    store = Store.connect(worker_env["PLANNERSYNC_DATABASE__URL"])
    upgrade(store.engine)
    store.add_mailbox(MAILBOX, backend=backend)  # type: ignore[arg-type]
    env = {
        **worker_env,
        **graph_env(graph, app, pki.ca_cert),
        "PLANNERSYNC_PLANNER__ENDPOINT": planner_sim.url,
        "PLANNERSYNC_PLANNER__LINGER": "50ms",
        "PLANNERSYNC_LOG__LEVEL": "DEBUG",
        "PLANNERSYNC_BUSY__PLANNER_ORGANIZERS": PLANNER_ORGANIZER,
        "PLANNERSYNC_EXCHANGE__ENDPOINT": ews.url,
        "PLANNERSYNC_EXCHANGE__USERNAME": "svc",
        "PLANNERSYNC_EXCHANGE__PASSWORD": "pw",
        "PLANNERSYNC_EXCHANGE__STREAM_MINUTES": "1",
        "PLANNERSYNC_EXCHANGE__MAILBOX_RELOAD_INTERVAL": "500ms",
    }
    processes += [WorkerProcess(w, env, tmp_path).start() for w in ("change-producer", "transformer", "publisher")]

    def held() -> set[str]:
        return {e.origin_id for e in planner_sim.state.events(MAILBOX)}

    wait_for(lambda: held() == {citizen.uid}, 60, interval=0.3, what="the citizen's meeting, and only it, in Planner")
    resync = subprocess.run([PLANNERSYNC, "resync", "--mailbox", MAILBOX], env=env, capture_output=True, text=True, timeout=120)
    assert resync.returncode == 0 and "2 items published" in resync.stdout, resync.stdout + resync.stderr
    wait_for(lambda: (p := store.sync_position(MAILBOX)) is not None and p.last_full_sync_at is not None, 30, what="the full re-read recorded")
    wait_for(lambda: "snapshot_complete" in processes[1].log(), 30, what="the transformer to have taken the snapshot")
    for proc in processes:
        assert proc.stop() == 0, proc.log()[-3000:]

    # the busy time is produced, the invitation is recognised by the flag the messages carry
    assert held() == {citizen.uid}
    messages = tap()
    items = calendar_items(messages)
    flags = {(i["uid"], i["organizer_is_planner"]) for i in items}
    assert flags == {(citizen.uid, False), (invitation.uid, True)}, flags
    assert {json.loads(b)["type"] for b in messages} >= {"calendar_change", "calendar_snapshot", "busy_time_state"}

    # and no organizer or attendee is anywhere
    logs = "\n".join(proc.log() for proc in processes) + resync.stdout + resync.stderr
    assert "calendar_transformed" in logs and "busy_time_delivered" in logs
    rows = table_rows(db)
    assert rows
    planner_calls = json.dumps([c.to_json() for c in planner_sim.state.calls()])
    texts = {"message": b"\n".join(messages).decode(errors="replace"), "log": logs, "database row": "\n".join(rows), "Planner call": planner_calls}
    for name, value in canary.items():
        for where, text in texts.items():
            assert value.lower() not in text.lower(), f"the {name} is in a {where}"
        assert value.encode() not in db.read_bytes(), f"the {name} is in the database file"
    for where, text in texts.items():
        assert "jobcenter.example" not in text.lower(), f"Planner's organizer address is in a {where}"
