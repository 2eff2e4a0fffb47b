"""The transformer's scenario table, played as calendar edits, reaches Planner the same through Graph as through EWS.

``tests/unit/domain/test_transform_core.py``'s SCENARIOS are messages. Here every scenario that is a sequence of
edits to single appointments becomes those edits on two mailboxes of the simulators' one calendar store: one
mailbox enrolled on EWS, its twin on Graph. The whole pipeline (change producer, transformer, publisher) runs once
for all of them; after each step both twins must settle to the same Planner events, and at the end Planner holds
for each twin exactly the scenario's final state (same OriginSystemIdentifiers, same times), shifted from the
table's March 2026 to the coming weeks.

Left out, with the reason: scenarios whose messages carry their own clock or snapshot parts (they test message
order, not calendars), Graph's instance-level message scenarios (series G; the representative calendar in
``test_graph_pipeline.py`` covers series, moved, cancelled and exception occurrences through both), and the ones
that hinge on the exact "now" or window end (the real clock moves while a pipeline runs).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import exchangelib.protocol
import pytest

from plannersync.workers import build_worker
from shared.adapters.store import Store, upgrade
from shared.broker.topology import Topology
from shared.config import Settings, load_settings
from shared.domain.contracts import CalendarChange, CalendarItem
from simulators.exchange.model import DELETED_ITEMS
from simulators.exchange.server import RunningExchangeSim
from simulators.exchange.server import start_server as start_ews
from simulators.graph.server import RunningGraphSim
from simulators.graph.server import start_server as start_graph
from simulators.planner.server import RunningPlannerSim
from simulators.planner.server import start_server as start_planner
from tests.support.graph import AppCertificate, with_graph
from tests.support.producers import CPH, producer_settings
from tests.support.tls import ThrowawayPKI
from tests.unit.domain.test_transform_core import NOW, SCENARIOS, WINDOW, Scenario

TABLE_MONDAY = date(2026, 3, 16)   # NOW's day in the table
DST_2026 = datetime(2026, 3, 29, 2, tzinfo=CPH)   # table dates from here on are summer time; their shift is not exact
SETTLE = 60.0   # an upper bound per step: each step returns as soon as every twin agrees and stays so for QUIET seconds
QUIET = 1.5


def calendar_scenario(scenario: Scenario) -> bool:
    """Edits of single appointments, far enough from the table's now and window end to mean the same today."""
    for step in scenario.steps:
        if not isinstance(step, CalendarChange) or step.source != "ews":
            return False
        for it in [step.item] if step.item else []:
            if it.item_type != "single" or it.end <= NOW + timedelta(hours=12) or it.start >= WINDOW.end - timedelta(days=2):
                return False
    return True


RUN = [(n, s) for n, s in enumerate(SCENARIOS) if calendar_scenario(s)]


def shift_days() -> int:
    """Whole weeks from the table's Monday to a Monday two weeks ahead (weekdays and local times keep their meaning)."""
    target = datetime.now(CPH).date() + timedelta(days=14)
    return ((target - TABLE_MONDAY).days // 7 + 1) * 7


def item_spec(it: CalendarItem, days: int) -> dict[str, Any]:
    """The simulator's JSON item for a table CalendarItem, ``days`` later (local wall-clock times in its zone)."""
    start, end = (t.astimezone(CPH) + timedelta(days=days) for t in (it.start, it.end))
    planner_invitation = getattr(it, "organizer_is_planner", None) or (getattr(it, "organizer", None) or "").lower() == "noreply@planner.star.dk"
    spec: dict[str, Any] = {
        "uid": it.uid,
        "timezone": "Romance Standard Time",
        "status": it.free_busy,
        "sensitivity": it.sensitivity,
        "is_cancelled": it.cancelled,
        "organizer": "NoReply@Planner.STAR.dk" if planner_invitation else "colleague@kommune.example",
        "all_day": it.all_day,
    }
    if it.all_day:
        spec.update(start=start.date().isoformat(), end=end.date().isoformat())
    else:
        spec.update(start=start.replace(tzinfo=None).isoformat(timespec="minutes"), end=end.replace(tzinfo=None).isoformat(timespec="minutes"))
    return spec


class Twins:
    """One scenario on two mailboxes of one store: ``ews`` enrolled on EWS, ``graph`` on Graph."""

    def __init__(self, n: int, scenario: Scenario, days: int) -> None:
        self.scenario, self.days = scenario, days
        self.mailboxes = (f"s{n:02d}-ews@scenario.example", f"s{n:02d}-graph@scenario.example")
        self.twin_keys: dict[tuple[str, str], int] = {}   # (mailbox, the table's item id) -> simulator key

    def apply(self, store: Any, step: CalendarChange) -> None:
        for mailbox in self.mailboxes:
            key = self.twin_keys.get((mailbox, step.item_id))
            if step.change == "delete":
                if key is not None:
                    store.delete(mailbox, key)
                    del self.twin_keys[(mailbox, step.item_id)]
                continue
            assert step.item is not None
            spec = item_spec(step.item, self.days)
            if key is None:
                key = store.add(mailbox, spec).key
                self.twin_keys[(mailbox, step.item_id)] = key
            else:
                store.update(mailbox, key, spec, spec)
            in_deleted = store.item(mailbox, key).folder == DELETED_ITEMS
            if step.item.in_deleted_items != in_deleted:
                store.move(mailbox, key, DELETED_ITEMS if step.item.in_deleted_items else "calendar")

    def expected(self, after: int | None = None) -> dict[str, tuple[datetime, datetime]]:
        """Planner's events for this scenario at the end, or ``after`` that step (what the table's steps emitted so far)."""
        shift = timedelta(days=self.days)
        if after is None:
            return {uid: (i.start + shift, i.end + shift) for uid, i in self.scenario.final.items()}
        state: dict[str, tuple[datetime, datetime]] = {}
        for emitted in self.scenario.emits[: after + 1]:
            for uid, interval in emitted.items():
                if interval is None:
                    state.pop(uid, None)
                else:
                    state[uid] = (interval.start + shift, interval.end + shift)
        return state

    def reached(self, planner: RunningPlannerSim, after: int) -> bool:
        """Both twins hold what the table says after step ``after`` (the keys only where the shift is not exact)."""
        expected = self.expected(after)
        via_ews, via_graph = (held(planner, m) for m in self.mailboxes)
        return via_ews == via_graph and (via_ews == expected if self.exact() else set(via_ews) == set(expected))

    def exact(self) -> bool:
        """Whether the shifted times are exact (the table's times are winter time like the coming weeks)."""
        items = [s.item for s in self.scenario.steps if isinstance(s, CalendarChange) and s.item]
        return all(i.end < DST_2026 for i in items)


def held(planner: RunningPlannerSim, mailbox: str) -> dict[str, tuple[datetime, datetime]]:
    return {e.origin_id: (e.start, e.end) for e in planner.state.events(mailbox)}


@pytest.fixture
def sims(pki: ThrowawayPKI, app: AppCertificate) -> Iterator[tuple[RunningExchangeSim, RunningGraphSim, RunningPlannerSim]]:
    ews = start_ews(users={"svc": "pw"}, minute_seconds=2.0, keepalive_seconds=0.5)
    graph = start_graph(tls=(str(pki.server_cert), str(pki.server_key)), store=ews.state.store, client_certificates=[app.certificate_pem])
    planner = start_planner()
    yield ews, graph, planner
    planner.stop()
    graph.stop()
    ews.stop()
    exchangelib.protocol.close_connections()


def settings_for(settings: Settings, ews: RunningExchangeSim, graph: RunningGraphSim, pki: ThrowawayPKI, app: AppCertificate,
                 planner: RunningPlannerSim, database: Path) -> Settings:
    base = with_graph(producer_settings(settings, ews), graph, app, pki.ca_cert)
    dumped = base.model_dump(mode="python", exclude={"planner", "busy", "database"})
    return load_settings(environ={}, **{
        **dumped,
        "database": {"url": f"sqlite:///{database}"},
        "planner": {"endpoint": planner.url, "linger": "50ms"},
        "busy": {"planner_organizers": ["noreply@planner.star.dk"], "planner_uid_patterns": ["^STAR-PLANNER-"]},
    })


def settle(planner: RunningPlannerSim, twins: list[Twins], step: int) -> None:
    """Until both twins of every scenario hold what the table says after ``step``, unchanged for QUIET seconds
    (SETTLE at most), so each step is seen by both readers before the next one is made."""
    deadline = time.monotonic() + SETTLE
    last: Any = None
    since = time.monotonic()
    while time.monotonic() < deadline:
        now = [tuple(held(planner, m) for m in t.mailboxes) for t in twins]
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= QUIET and all(t.reached(planner, min(step, len(t.scenario.steps) - 1)) for t in twins):
            return
        time.sleep(0.1)   # the poll interval of this deadline
    behind = {t.scenario.name: {"ews": a, "graph": b, "expected": t.expected(min(step, len(t.scenario.steps) - 1))}
              for t, (a, b) in zip(twins, last) if not t.reached(planner, min(step, len(t.scenario.steps) - 1))}
    raise AssertionError(f"after step {step} Planner does not hold what the table says: {behind}")


def test_the_scenario_table_reaches_planner_the_same_through_graph_as_through_ews(
    settings: Settings, topology: Topology, sims: tuple[RunningExchangeSim, RunningGraphSim, RunningPlannerSim],
    pki: ThrowawayPKI, app: AppCertificate, tmp_path: Path,
) -> None:
    ews, graph, planner = sims
    days = shift_days()
    twins = [Twins(n, scenario, days) for n, scenario in RUN]
    assert len(twins) >= 30, [t.scenario.name for t in twins]   # the table shrank: look at calendar_scenario
    config = settings_for(settings, ews, graph, pki, app, planner, tmp_path / "state.db")
    store = Store.connect(config.database_url())
    upgrade(store.engine)
    for twin in twins:
        ews_box, graph_box = twin.mailboxes
        ews.state.store.ensure_mailbox(ews_box)
        ews.state.store.ensure_mailbox(graph_box)
        store.add_mailbox(ews_box, backend="ews")
        store.add_mailbox(graph_box, backend="graph")
    workers = [build_worker(name, config) for name in ("change-producer", "transformer", "publisher")]
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    try:
        for step in range(max(len(t.scenario.steps) for t in twins)):
            for twin in twins:
                if step < len(twin.scenario.steps):
                    twin.apply(ews.state.store, twin.scenario.steps[step])
            settle(planner, twins, step)
    finally:
        for worker in workers:
            worker.stop()
        for thread in threads:
            thread.join(30)

    wrong = {}
    for twin in twins:
        via_ews, via_graph = (held(planner, m) for m in twin.mailboxes)
        expected = twin.expected()
        if via_ews != via_graph or set(via_ews) != set(expected) or (twin.exact() and via_ews != expected):
            wrong[twin.scenario.name] = {"ews": via_ews, "graph": via_graph, "expected": expected}
    assert not wrong, wrong
    assert sum(len(t.scenario.final) for t in twins) >= 15   # the run delivered busy times, not only agreed on none
    assert not [c for c in planner.state.calls() if c.outcome != "ok"]
