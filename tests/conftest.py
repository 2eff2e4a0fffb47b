"""Shared fixtures: the real RabbitMQ and PostgreSQL on 127.0.0.1, isolated per test by random names.

A missing broker fails the run; it does not skip it.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pika
import pytest
import requests

from shared.broker.topology import (
    Topology,
    delete_everything,
    ensure_policies,
    from_settings,
)
from shared.config import Settings, load_settings

BROKER_HOST = "127.0.0.1"
MANAGEMENT = "http://127.0.0.1:15672"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
FAST_LADDER = "300ms,600ms,1s"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="also run the long soak variants")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="soak variant: run with --soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1, what: str = "condition") -> Any:
    """Poll until ``condition()`` is truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def broker() -> str:
    try:
        pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, 5672, credentials=pika.PlainCredentials("guest", "guest"))).close()
    except pika.exceptions.AMQPError as exc:  # pragma: no cover - environment problem, reported loudly
        pytest.fail(f"RabbitMQ is not reachable on {BROKER_HOST}:5672 ({exc!r}); start it with `rabbitmq-server -detached`")
    try:
        requests.get(f"{MANAGEMENT}/api/overview", auth=("guest", "guest"), timeout=5).raise_for_status()
    except requests.RequestException as exc:  # pragma: no cover
        pytest.fail(f"RabbitMQ management API not reachable ({exc!r}); `rabbitmq-plugins enable rabbitmq_management`")
    return BROKER_HOST


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def worker_env(prefix: str, tmp_path: Path) -> dict[str, str]:
    """Environment for a worker process of this test: its own queues and database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLANNERSYNC_")}
    env.update(
        {
            "PLANNERSYNC_BROKER__PREFIX": prefix,
            "PLANNERSYNC_RETRY__LADDER": FAST_LADDER,
            "PLANNERSYNC_RETRY__QUICK_ATTEMPTS": "2",
            "PLANNERSYNC_RETRY__QUICK_MAX_WAIT": "200ms",
            "PLANNERSYNC_DATABASE__URL": f"sqlite:///{tmp_path / 'state.db'}",
            "PLANNERSYNC_LOG__LEVEL": "INFO",
            "PLANNERSYNC_STATUS__HEALTH_DIR": str(tmp_path / "health"),
        }
    )
    return env


@pytest.fixture
def settings(worker_env: dict[str, str]) -> Settings:
    return load_settings(environ=worker_env, **_nested(worker_env))


def _nested(env: dict[str, str]) -> dict[str, Any]:
    """Turn PLANNERSYNC_A__B=v into {"a": {"b": v}} so tests can build Settings without os.environ."""
    out: dict[str, Any] = {}
    for name, value in env.items():
        if name.startswith("PLANNERSYNC_"):
            top, _, key = name[len("PLANNERSYNC_") :].lower().partition("__")
            out.setdefault(top, {})[key] = value
    return out


@pytest.fixture
def topology(broker: str, settings: Settings) -> Iterator[Topology]:
    """Declared queues and policies for this test's prefix; everything deleted afterwards."""
    topo = from_settings(settings.broker, settings.retry)
    connection = pika.BlockingConnection(pika.URLParameters(settings.broker.amqp_url()))
    topo.declare(connection.channel())
    connection.close()
    ensure_policies(topo, MANAGEMENT, "guest", "guest")
    yield topo
    delete_everything(topo, MANAGEMENT, "guest", "guest")


def queue_depth(topology: Topology, queue: str) -> int:
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
                connection.sleep(0.05)
                continue
            got.append((properties, body))
    finally:
        connection.close()
    return got


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Any]:
    import psycopg

    try:
        conn = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:  # pragma: no cover
        pytest.fail(f"PostgreSQL is not reachable on 127.0.0.1:5432 ({exc})")
    yield conn
    conn.close()


@pytest.fixture
def pg_url(pg_admin: Any) -> Iterator[str]:
    name = f"ps_{uuid.uuid4().hex[:10]}"
    pg_admin.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    pg_admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
