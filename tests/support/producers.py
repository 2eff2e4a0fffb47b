"""Builders for tests of the producers against the EWS simulator: their settings and a reader of what they publish."""

from __future__ import annotations

from typing import Any
from zoneinfo import ZoneInfo

import pika

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
