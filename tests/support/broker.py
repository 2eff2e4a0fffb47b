"""The real RabbitMQ on 127.0.0.1: where it is, and reading queues directly."""

from __future__ import annotations

import time
from typing import Any

import pika

from shared.broker.topology import Topology

BROKER_HOST = "127.0.0.1"
MANAGEMENT = "http://127.0.0.1:15672"


def queue_depth(topology: Topology, queue: str) -> int:
    """Messages ready on ``queue`` now (``topology`` names the test's broker objects; the queue name is enough)."""
    connection = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


def drain(queue: str, timeout: float = 10.0, count: int = 1) -> list[tuple[Any, bytes]]:
    """Take ``count`` messages off a queue (acked), waiting up to ``timeout``."""
    connection = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST))
    got: list[tuple[Any, bytes]] = []
    try:
        channel = connection.channel()
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                connection.sleep(0.05)  # the poll interval of this deadline loop
                continue
            got.append((properties, body))
    finally:
        connection.close()
    return got


def publish_raw(exchange: str, routing_key: str, body: bytes) -> None:
    """Publish bytes as they are (malformed on purpose, say), persistent and confirmed, as a foreign producer would."""
    connection = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(exchange, routing_key, body, pika.BasicProperties(delivery_mode=2), mandatory=True)
    finally:
        connection.close()
