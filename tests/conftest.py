"""Shared fixtures and hooks only: the real RabbitMQ and PostgreSQL on 127.0.0.1, isolated per test by random names.

A missing broker fails the run; it does not skip it. Helpers and constants that test modules import live in
tests/support/ (waiting, broker, database, settings, processes, producers), never here.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Iterator

import pika
import pytest
import requests

from shared.broker.topology import (
    Topology,
    delete_everything,
    ensure_policies,
    from_settings,
)
from shared.config import Settings
from tests.support.broker import BROKER_HOST, MANAGEMENT
from tests.support.database import PG_ADMIN, pg_database_url
from tests.support.graph import AppCertificate, write_app_certificate
from tests.support.settings import FAST_LADDER, settings_from_env
from tests.support.tls import ThrowawayPKI, write_pki


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="also run the long soak variants")
    parser.addoption("--open-defects", action="store_true", help="also run the tests of defects found but not fixed yet (they fail)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    soak = pytest.mark.skip(reason="soak variant: run with --soak")
    defect = pytest.mark.skip(reason="a defect found and not fixed yet (README, Status): run with --open-defects")
    for item in items:
        if "soak" in item.keywords and not config.getoption("--soak"):
            item.add_marker(soak)
        if "open_defect" in item.keywords and not config.getoption("--open-defects"):
            item.add_marker(defect)


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
    return settings_from_env(worker_env)


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
    yield pg_database_url(name)
    pg_admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ThrowawayPKI:
    """A throwaway CA with a server and a client certificate, one per test module (a module may define its own)."""
    return write_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> AppCertificate:
    """A Graph app registration's certificate (RSA, no passphrase), one per test module (a module may define its own)."""
    return write_app_certificate(tmp_path_factory.mktemp("app"))
