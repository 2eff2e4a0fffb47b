"""AMQP over TLS, and the broker user compose ships, against a second RabbitMQ node of this test (decision 46).

The node (tests/support/rabbitmq_node.py) listens for amqps only and demands a client certificate; it boots
with the definitions `plannersync topology export --password-file` renders, as compose's broker-definitions
service does: the user exists only because of them, with the password from the secret file.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pika
import pytest
import requests

from shared.broker.connection import open_connection
from shared.broker.topology import from_settings
from shared.config import load_settings
from tests.support.processes import PLANNERSYNC
from tests.support.rabbitmq_node import TlsNode, start_tls_node
from tests.support.tls import ThrowawayPKI, write_pki
from tests.support.waiting import wait_for


@dataclass
class Broker:
    node: TlsNode
    pki: ThrowawayPKI
    password: str
    env: dict[str, str]  # a worker's environment for this broker, over TLS with the client certificate


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PLANNERSYNC, *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    directory = tmp_path_factory.mktemp("tls-broker")
    pki = write_pki(directory / "pki")
    password = f"from-a-secret-{uuid.uuid4().hex[:8]}"
    secret = directory / "amqp_password"
    secret.write_text(password + "\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith("PLANNERSYNC_")}
    export_env = {**base, "PLANNERSYNC_BROKER__USER": "plannersync", "PLANNERSYNC_BROKER__PASSWORD_FILE": str(secret), "PLANNERSYNC_STATE_DIR": str(directory / "state")}
    done = run("topology", "export", "--password-file", str(secret), "-o", str(directory / "definitions.json"), env=export_env)
    assert done.returncode == 0, done.stderr
    node = start_tls_node(directory / "node", pki.ca_cert, pki.server_cert, pki.server_key, directory / "definitions.json", "plannersync", password)
    env = {
        **export_env,
        "PLANNERSYNC_BROKER__HOST": "127.0.0.1",
        "PLANNERSYNC_BROKER__TLS": "true",
        "PLANNERSYNC_BROKER__PORT": str(node.tls_port),
        "PLANNERSYNC_BROKER__CA_BUNDLE": str(pki.ca_cert),
        "PLANNERSYNC_BROKER__CLIENT_CERT": str(pki.client_cert),
        "PLANNERSYNC_BROKER__CLIENT_KEY": str(pki.client_key),
        "PLANNERSYNC_BROKER__MANAGEMENT_URL": node.management_url,
    }
    try:
        yield Broker(node, pki, password, env)
    finally:
        node.stop()


def test_the_user_from_the_rendered_definitions_logs_in_with_the_secret_and_is_not_an_administrator(tls_broker: Broker) -> None:
    auth = ("plannersync", tls_broker.password)
    whoami = requests.get(f"{tls_broker.node.management_url}/api/whoami", auth=auth, timeout=10).json()
    assert whoami["tags"] == ["policymaker"]
    assert requests.get(f"{tls_broker.node.management_url}/api/users", auth=auth, timeout=10).status_code in (401, 403)
    assert requests.get(f"{tls_broker.node.management_url}/api/whoami", auth=("guest", "guest"), timeout=10).status_code == 401  # no default user


def test_the_cli_applies_the_topology_and_reads_dead_letters_over_amqps(tls_broker: Broker) -> None:
    done = run("topology", "apply", env=tls_broker.env)
    assert done.returncode == 0, done.stderr
    assert f"amqps://127.0.0.1:{tls_broker.node.tls_port}" in done.stdout
    listed = run("dlq", "list", "publisher", env=tls_broker.env)
    assert listed.returncode == 0, listed.stderr
    assert "plannersync.publisher.dlq: showing none of 0 dead letters" in listed.stderr


def test_a_message_goes_round_over_tls_and_the_connection_shows_as_tls(tls_broker: Broker) -> None:
    settings = load_settings(environ=tls_broker.env)  # the mapping alone, as a worker with this environment
    topology = from_settings(settings.broker, settings.retry)
    connection = open_connection(settings.broker, "tls-test")
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        topology.declare(channel)
        queue = topology.stage("publisher").work_queue()
        channel.basic_publish("", queue, b"over tls", pika.BasicProperties(delivery_mode=2), mandatory=True)
        _method, _props, body = channel.basic_get(queue, auto_ack=True)
        assert body == b"over tls"

        def ours() -> list[dict[str, object]]:  # the management API lists a connection once its stats arrive (seconds)
            listed = requests.get(f"{tls_broker.node.management_url}/api/connections", auth=("plannersync", tls_broker.password), timeout=10).json()
            return [c for c in listed if c.get("client_properties", {}).get("connection_name") == "plannersync.tls-test"]

        found = wait_for(ours, timeout=30, what="the connection in the management API")
        assert found[0]["ssl"] is True and found[0]["peer_cert_subject"]
    finally:
        connection.close()


def test_the_user_reaches_only_its_own_prefix(tls_broker: Broker) -> None:
    settings = load_settings(environ=tls_broker.env)  # the mapping alone, as a worker with this environment
    connection = open_connection(settings.broker, "tls-test")
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            connection.channel().queue_declare("someone-else.queue")
        assert refused.value.reply_code == 403
    finally:
        if connection.is_open:
            connection.close()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"PLANNERSYNC_BROKER__CA_BUNDLE": "other_ca_cert"}, "failed: certificate not trusted"),
        ({"PLANNERSYNC_BROKER__HOST": "localhost", "PLANNERSYNC_BROKER__CLIENT_CERT": "", "PLANNERSYNC_BROKER__CLIENT_KEY": ""}, "amqps://localhost:"),
        ({"PLANNERSYNC_BROKER__PASSWORD_FILE": "wrong"}, "refused user 'plannersync': wrong user or password"),
    ],
    ids=["broker certificate from another CA", "no client certificate", "wrong password"],
)
def test_a_tls_or_credential_mistake_is_one_line_and_exit_3(tls_broker: Broker, tmp_path: Path, change: dict[str, str], expected: str) -> None:
    env = dict(tls_broker.env)
    for name, value in change.items():
        if value == "":
            env.pop(name)
        elif value == "other_ca_cert":
            env[name] = str(tls_broker.pki.other_ca_cert)
        elif value == "wrong":
            (tmp_path / "wrong").write_text("not-the-password\n")
            env[name] = str(tmp_path / "wrong")
        else:
            env[name] = value
    done = run("dlq", "list", "publisher", env=env)
    assert done.returncode == 3, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plannersync: ") and expected in lines[0], done.stderr
