"""Builders for tests of the producers against the EWS simulator: their settings and a reader of what they publish."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pika
import requests

from shared.broker.topology import Topology
from shared.config import Settings, load_settings
from shared.domain.contracts import CalendarChange, decode
from simulators.exchange.server import RunningExchangeSim
from tests.support.broker import BROKER_HOST

CPH = ZoneInfo("Europe/Copenhagen")  # the zone the caseworkers' Exchange items are written in


def producer_settings(settings: Settings, sim: RunningExchangeSim, **exchange: Any) -> Settings:
    """``settings`` pointed at the EWS simulator with short timings; ``exchange`` overrides single values."""
    values = {
        "endpoint": sim.url,
        "username": "svc",
        "password": "pw",
        "stream_minutes": 1,
        "stream_silence_timeout": "3s",
        "unsubscribed_poll_interval": "1s",
        "safety_sync_interval": "10m",
        "mailbox_reload_interval": "300ms",
        "transient_retry": "200ms",
        "unavailable_retry": "300ms",
        "failure_backoff_max": "1s",
        **exchange,
    }
    return load_settings(environ={}, **{**settings.model_dump(mode="python", exclude={"exchange"}), "exchange": values})


class Collector:
    """Reads CalendarChange/CalendarSnapshot messages off the transformer's work queue."""

    def __init__(self, topology: Topology) -> None:
        self.queue = topology.stage("transformer").work_queue()
        self.connection = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST))
        self.channel = self.connection.channel()
        self.messages: list[Any] = []

    def poll(self) -> list[Any]:
        while True:
            method, _props, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return self.messages
            self.messages.append(decode(body))

    def changes_for(self, uid: str) -> list[CalendarChange]:
        self.poll()
        return [m for m in self.messages if isinstance(m, CalendarChange) and m.item is not None and m.item.uid == uid]

    def close(self) -> None:
        self.connection.close()


def add_appointment(sim: RunningExchangeSim, mailbox: str, day: int, uid: str) -> dict[str, Any]:
    """A one-hour appointment at 09:00 local time ``day`` days from now, made through the simulator's control API (so
    it raises notifications like a caseworker's edit); the simulator's description of the item."""
    start = (datetime.now(CPH) + timedelta(days=day)).replace(hour=9, minute=0, second=0, microsecond=0)
    spec = {"start": start.strftime("%Y-%m-%dT%H:%M"), "end": (start + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M"),
            "timezone": "Romance Standard Time", "uid": uid}
    response = requests.post(f"{sim.control_url}/mailboxes/{mailbox}/items", json=spec, timeout=10)
    assert response.status_code == 201, response.text
    return dict(response.json())
